"""Shared pieces of the tf.distribute tests (test_distribute*.py).

The strategies run on the logical CPU devices made in conftest.py. Replica
r of a strategy with n replicas gets rows SLICES[n][r] of a global batch of
10 rows (uneven on purpose); `split` / `split_ragged` hand out such slices,
`replica_sum` and `concat` put per-replica results back together.
The multi-process tests' children (_multiworker_worker.py, _ps_cluster.py)
use `FixedCandidates` and `exit_with_parent` from here too.
"""

import os
import threading
import time

import numpy as np
import pytest

import tfrec_fast  # noqa: F401  (selects tf_keras before TF loads)
import tensorflow as tf

from tfrec_fast import samplers

SLICES = {2: [6, 4], 4: [3, 3, 2, 2]}  # rows per replica; 10 in all
TOL = dict(rtol=1e-5, atol=1e-5)

_STRATEGIES = {}


def mirrored_strategy(n):
    """The (cached) MirroredStrategy over the first `n` logical CPUs.

    Skips the calling test when fewer than `n` logical CPUs exist.
    """
    devices = [d.name for d in tf.config.list_logical_devices("CPU")]
    if len(devices) < n:
        pytest.skip(f"needs {n} logical CPU devices (see conftest.py)")
    if n not in _STRATEGIES:
        # Strategies of one process share the runtime's collective group
        # keys; two of different sizes must not use the same ones. TF's own
        # tests (strategy_combinations.py) move the key base the same way;
        # the second move leaves a fresh base to strategies made later.
        # pylint: disable=protected-access
        mirrored = tf.distribute.MirroredStrategy
        mirrored._collective_key_base += 100000
        _STRATEGIES[n] = mirrored(devices[:n])
        mirrored._collective_key_base += 100000
    return _STRATEGIES[n]


@pytest.fixture(params=[2, 4], ids=["2_replicas", "4_replicas"])
def strategy(request):
    """A MirroredStrategy on 2, then 4, logical CPUs."""
    return mirrored_strategy(request.param)


def bounds(strategy):
    """Row bounds of the replicas' slices: replica r has [b[r], b[r + 1])."""
    return np.cumsum([0] + SLICES[strategy.num_replicas_in_sync])


class FixedCandidates(samplers.CandidateSampler):
    """The same candidates every call; with `per_replica`, set r in replica r.

    Args:
        num_items: catalog size.
        ids: int [K], or [N, K] with `per_replica=True`.
        log_q: float, same shape as `ids`; None: -log(num_items) (uniform).
        per_replica: pick row r of ids / log_q in replica r.
    """

    def __init__(self, num_items, ids, log_q=None, per_replica=False,
                 **kwargs):
        super().__init__(num_items, seed=0, **kwargs)
        self.ids = np.asarray(ids, np.int64)
        if log_q is None:
            log_q = np.full(self.ids.shape, -np.log(num_items))
        self.log_q = np.asarray(log_q, np.float32)
        self.per_replica = per_replica

    def _draw(self, seed, shape, query, positives, item_table):
        ids, log_q = tf.constant(self.ids), tf.constant(self.log_q)
        if self.per_replica:
            context = tf.distribute.get_replica_context()
            replica = context.replica_id_in_sync_group
            ids, log_q = ids[replica], log_q[replica]
        return ids, log_q

    def _log_prob(self, query, ids):
        return tf.fill(tf.shape(ids), -np.log(self.num_items).astype(
            np.float32))


def exit_with_parent(max_lifetime_s):
    """Exits this process when its parent goes away or after a deadline.

    For the children of the multi-process tests: a worker whose peer died
    waits in a collective forever and a server never returns from `join()`;
    the test kills them, but if the test process itself dies they must not
    linger.

    Args:
        max_lifetime_s: seconds after which the process exits regardless.
    """
    parent, start = os.getppid(), time.monotonic()

    def watch():
        while (os.getppid() == parent
               and time.monotonic() - start < max_lifetime_s):
            time.sleep(0.5)
        os._exit(3)  # pylint: disable=protected-access

    threading.Thread(target=watch, daemon=True).start()


def split(strategy, *arrays):
    """Per-replica values: replica r gets rows SLICES[n][r] of each array."""
    b = bounds(strategy)

    def piece(context):
        r = context.replica_id_in_sync_group
        return tuple(tf.constant(a[b[r]:b[r + 1]]) for a in arrays)

    return strategy.experimental_distribute_values_from_function(piece)


def split_ragged(strategy, lengths, *flat_arrays):
    """Per-replica ragged rows: replica r gets rows SLICES[n][r].

    Args:
        strategy: the strategy.
        lengths: int [B] row lengths of the global batch.
        *flat_arrays: [T, ...] packed values of the global batch.

    Returns:
        Per-replica tuples (row_lengths [B_r], *flat values [T_r, ...]);
        `tf.RaggedTensor.from_row_lengths` inside the replica rebuilds the
        replica's rows.
    """
    lengths = np.asarray(lengths, np.int64)
    b = bounds(strategy)
    token_bounds = np.concatenate([[0], np.cumsum(lengths)])[b]

    def piece(context):
        r = context.replica_id_in_sync_group
        rows = slice(b[r], b[r + 1])
        tokens = slice(token_bounds[r], token_bounds[r + 1])
        return (tf.constant(lengths[rows]),) + tuple(
            tf.constant(a[tokens]) for a in flat_arrays)

    return strategy.experimental_distribute_values_from_function(piece)


def replica_sum(strategy, values):
    """Sum over replicas of each (per-replica) tensor, as NumPy."""
    return tf.nest.map_structure(
        lambda v: strategy.reduce(tf.distribute.ReduceOp.SUM, v, axis=None)
        .numpy(), values)


def concat(strategy, value):
    """The replicas' values concatenated along axis 0 (replica order)."""
    return np.concatenate([t.numpy() for t in
                           strategy.experimental_local_results(value)])


def local_values(strategy, value):
    """Each replica's copy of a (mirrored) value, as NumPy."""
    return [t.numpy() for t in strategy.experimental_local_results(value)]


def variables(strategy, *values):
    """Mirrored variables holding `values`."""
    with strategy.scope():
        return [tf.Variable(v) for v in values]
