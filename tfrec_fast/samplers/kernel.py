"""KernelSampler: adaptive negatives from a quadratic kernel, sampled exactly.

Blanc & Rendle, "Adaptive sampled softmax with kernel based sampling" (ICML
2018). The proposal of query h over the item table w [C, D] is

    q_i(h) = (alpha (h . w_i)^2 + 1) / (alpha h^T Z h + C),
    Z = sum_j w_j w_j^T,

which is large where the model's score |h . w_i| is large, so for a
trained model it is closer to the softmax exp(h . w_i) than a uniform or
popularity proposal and a sampled softmax needs fewer negatives for the same
bias (benchmarks/sampler_bias.py). The kernel is symmetric in the score: it
also favours items with large negative scores, and with a large alpha on a
barely trained model (small, flat scores) it can be further from the softmax
than uniform. Draws descend a binary
tree of outer-product sums (see `tfrec_fast.ops.kernel_sampler`): O(D^2
log C) per draw, exact q, per query row, with replacement.
"""

import numbers

import numpy as np
import tensorflow as tf
import tf_keras

from tfrec_fast import distribute
from tfrec_fast.ops import kernel_sampler as kernel_ops
from tfrec_fast.samplers.base import CandidateSampler
from tfrec_fast.samplers.base import check_query

REFRESH_POLICIES = ("auto", "manual")


def check_refresh(refresh):
    """"auto", "manual" or a positive int N; ValueError otherwise."""
    if isinstance(refresh, str):
        if refresh not in REFRESH_POLICIES:
            raise ValueError(f"refresh must be 'auto', 'manual' or a positive "
                             f"int N (every N-th sample call), got "
                             f"{refresh!r}")
        return refresh
    if isinstance(refresh, (bool, np.bool_)) or not isinstance(
            refresh, (int, np.integer)) or refresh < 1:
        raise ValueError(f"refresh must be 'auto', 'manual' or a positive "
                         f"int N (every N-th sample call), got {refresh!r}")
    return int(refresh)


def default_leaf_size(dim):
    """2 D clipped to [32, 256]: the fastest leaf size measured on CPU
    (benchmarks/kernel_sampler.py: leaves of ~2 D items balance the leaf's
    item products against the tree's node products and keep the tree small
    enough for the caches)."""
    return int(min(256, max(32, 2 * dim)))


def _check_positive_int(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    return int(value)


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class KernelSampler(CandidateSampler):
    """Per-row negatives, q_i(h) ∝ alpha (h . w_i)^2 + 1, exact tree draws.

    **Draws** are per query row (`sample(h [T, D], K, shared=False,
    item_table=w [C, D])` -> ids, log q [T, K]), with replacement, from the
    proposal of the item rows the tree currently holds (its *snapshot*).
    log q is exact for that proposal: log(alpha (h . w_i)^2 + 1) -
    log(alpha <Z_root, h h^T> + C). `log_prob(h, ids)` gives the same for
    any ids ([K] for every row, or [T, K]), e.g. the positive's.

    **Shared draws** (`shared=True`) raise a ValueError: the proposal
    depends on the query, so one candidate set for the batch has no
    per-row q; pass `shared=False` to SampledSoftmax / SampledRetrieval /
    CCEMinus. (A mixture over the batch's rows would be exact, but the
    rest of the package scores shared candidates with per-row log q.)

    **Keeping up with training** (`refresh`): the tree describes the
    snapshot; `sample` compares the snapshot with the `item_table` it is
    given (O(C D)) and

    - "auto": on every call, updates the changed rows along their tree
      paths (O(D^2 log C) each), or rebuilds the tree (O(C D^2)) when more
      than `max_changed_fraction` of the rows changed. Dense optimizers
      (Adam, Adagrad) move every row every step, so this is a rebuild per
      step; fine for catalogs up to ~1e5 items, otherwise use N;
    - N (int): the same, on every N-th `sample` call (the first included),
      counted by the sampler's draw counter; in between the draws use the
      stale snapshot, and log q stays exact *for the proposal used* (which
      is all the logQ correction needs);
    - "manual": never by itself; call `refresh(item_table)`,
      `update(item_table, ids)` (e.g. the rows a sparse optimizer touched)
      or `rebuild(item_table)`.

    After any of these the tree equals a fresh build of the snapshot (up to
    float32 rounding of the leaves' running sums; internal nodes are
    recomputed from their children exactly as a build does).

    **State** (non-trainable variables, so checkpoints and SavedModels carry
    it): `tree` float32 [2 ceil(C / L), S] (upper triangles of the node sums
    Z, S = D (D + 1) / 2 rounded up to 16: Z is symmetric, so half the
    memory and half the work per node), `tree_counts` int64, `snapshot`
    float32 [C, D], and the draw counter. Until the first refresh / rebuild
    the snapshot is zero, so q is uniform. The variables live on the CPU.

    **Random stream**: the op's draws are a pure function of (seed, draw
    counter, replica id, row, draw); restoring a checkpoint restores the
    next draws. Without the op library the pure-TF reference (a categorical
    over brute-force probabilities, O(T C D)) draws from the same q with
    different draws, after one warning.

    Args:
        num_items: C.
        dim: D, the width of query rows and item embeddings.
        alpha: the kernel's weight of (h . w)^2, a finite number > 0 (the
            paper uses 100). Larger alpha follows the scores more sharply.
        leaf_size: L >= 1, items per leaf, or None for
            `default_leaf_size(dim)` = 2 D clipped to [32, 256]. Memory of
            the tree is about 2 C / L * D^2 / 2 floats; a draw costs about
            2 log2(C / L) node products of D^2 / 2 plus L item products of
            D.
        refresh: "auto", "manual" or a positive int N (see above).
        max_changed_fraction: in [0, 1]; more changed rows than this
            fraction of C trigger a rebuild instead of path updates.
        item_table: optional float [C, D] to build the tree from now.
        seed: see `CandidateSampler`.
        use_fused: True to require the compiled ops, False to use the pure-TF
            references, None to use the ops when they are loaded.
    """

    query_dependent = True

    def __init__(self, num_items, dim, alpha=100.0, leaf_size=None,
                 refresh="auto", max_changed_fraction=0.1, item_table=None,
                 seed=None, use_fused=None, **kwargs):
        if (isinstance(alpha, (bool, np.bool_))
                or not isinstance(alpha, numbers.Real)
                or not np.isfinite(alpha) or not alpha > 0):
            raise ValueError(f"alpha must be a finite number > 0, got "
                             f"{alpha!r}")
        dim = _check_positive_int(dim, "dim")
        if leaf_size is None:
            leaf_size = default_leaf_size(dim)
        leaf_size = _check_positive_int(leaf_size, "leaf_size")
        refresh = check_refresh(refresh)
        if (isinstance(max_changed_fraction, (bool, np.bool_))
                or not isinstance(max_changed_fraction, numbers.Real)
                or not 0.0 <= max_changed_fraction <= 1.0):
            raise ValueError(f"max_changed_fraction must be a number in "
                             f"[0, 1], got {max_changed_fraction!r}")
        if use_fused not in (None, True, False):
            raise ValueError(f"use_fused must be None, True or False, got "
                             f"{use_fused!r}")
        super().__init__(num_items, seed=seed, **kwargs)
        self.dim = dim
        self.alpha = float(alpha)
        self.leaf_size = leaf_size
        self.refresh_policy = refresh
        self.max_changed_fraction = float(max_changed_fraction)
        self.use_fused = use_fused
        self.layout = kernel_ops.tree_layout(num_items, dim, leaf_size)
        counts = kernel_ops.tree_counts(self.layout)
        # On the CPU: the tree ops are CPU kernels that write in place.
        with tf.device("/CPU:0"):
            self.tree = self.add_weight(
                name="tree", shape=[self.layout.num_rows, self.layout.stride],
                dtype=tf.float32, trainable=False, initializer="zeros",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.tree_counts = self.add_weight(
                name="tree_counts", shape=[self.layout.num_rows],
                dtype=tf.int64, trainable=False,
                initializer=lambda shape, dtype=None: tf.constant(
                    counts, tf.int64),
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
            self.snapshot = self.add_weight(
                name="snapshot", shape=[num_items, dim], dtype=tf.float32,
                trainable=False, initializer="zeros",
                aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        if item_table is not None:
            self.rebuild(item_table)

    def get_config(self):
        config = super().get_config()
        config.update(dim=self.dim, alpha=self.alpha,
                      leaf_size=self.leaf_size, refresh=self.refresh_policy,
                      max_changed_fraction=self.max_changed_fraction,
                      use_fused=self.use_fused)
        return config

    # -- keeping the tree up to date --------------------------------------

    @property
    def max_changed(self):
        """Most changed rows `refresh` updates along paths (else rebuild)."""
        return int(np.floor(self.max_changed_fraction * self.num_items))

    def refresh(self, item_table):
        """Moves the tree to `item_table`: changed rows, or a rebuild.

        Args:
            item_table: float [C, D] (finite).

        Returns:
            (num_changed int64 scalar, rebuilt bool scalar).
        """
        return self._on_every_copy(
            kernel_ops.kernel_sampler_refresh, self._table(item_table),
            self.max_changed)

    def update(self, item_table, ids):
        """Moves the tree to `item_table` on rows `ids` only (int [R]).

        For sparse training, where the step knows which rows it touched:
        O(D^2 log C) per row and no O(C D) comparison. Rows not listed keep
        their snapshot values even if the table has moved.

        Under a `tf.distribute` strategy, called inside a replica, every
        replica updates the rows that any replica lists (their ids are
        gathered), so the mirrored copies stay equal: the update of the
        global batch.

        Returns:
            int64 scalar: distinct rows updated.
        """
        ids = distribute.gather_across_replicas(tf.convert_to_tensor(ids),
                                                differentiable=False)
        return self._on_every_copy(kernel_ops.kernel_sampler_update,
                                   self._table(item_table), ids)

    def rebuild(self, item_table):
        """Rebuilds the tree from `item_table` [C, D] (O(C D^2))."""
        self._on_every_copy(kernel_ops.kernel_sampler_refresh,
                            self._table(item_table), -1)

    def _on_every_copy(self, op, table, arg):
        """`op(tree, snapshot, table, arg, layout, use_fused)`, which writes
        the tree and snapshot in place, on every copy of mirrored state.

        Inside a replica each replica writes its own copies, as plain
        variables (from the same inputs, so the copies stay equal; the
        pure-TF reference assigns inside `tf.cond`, where a mirrored
        variable's cross-replica sync is not allowed). Outside one (e.g. at
        construction under `strategy.scope()`, or from a callback) the op
        runs once per copy, through the strategy's `update`.

        Returns:
            The op's result (the first copy's, for mirrored state).
        """
        def run(tree, snapshot, table, arg):
            return op(tree, snapshot, table, arg, self.layout, self.use_fused)

        strategy = getattr(self.tree, "distribute_strategy", None)
        if strategy is None:
            return run(self.tree, self.snapshot, table, arg)
        if (tf.distribute.has_strategy()
                and tf.distribute.get_replica_context() is not None):
            def local(variable):  # in a replica, .device is its copy's
                return next((
                    copy for copy in strategy.experimental_local_results(
                        variable) if copy.device == variable.device),
                    variable)
            return run(local(self.tree), local(self.snapshot), table, arg)
        with strategy.scope():
            # In the update of copy i, `snapshot.handle` is copy i too.
            result = strategy.extended.update(
                self.tree, lambda tree: run(tree, self.snapshot, table, arg),
                group=False)
        return tf.nest.map_structure(
            lambda value: strategy.experimental_local_results(value)[0],
            result)

    def _table(self, item_table):
        if item_table is None:
            raise ValueError("KernelSampler needs item_table [C, D]")
        table = tf.stop_gradient(tf.convert_to_tensor(item_table))
        if not table.dtype.is_floating:
            raise ValueError(f"item_table must be float [C, D], got "
                             f"{table.dtype.name}")
        if table.shape.rank != 2 or not table.shape.is_compatible_with(
                [self.num_items, self.dim]):
            raise ValueError(f"item_table must have shape [num_items, dim] "
                             f"= [{self.num_items}, {self.dim}], got "
                             f"{table.shape}")
        return table

    def _maybe_refresh(self, item_table):
        """Applies the refresh policy before a draw."""
        policy = self.refresh_policy
        if policy == "manual":
            return
        if item_table is None:
            raise ValueError(
                "KernelSampler(refresh=" + repr(policy) + ") keeps its tree "
                "up to date with the item table: pass item_table [C, D] to "
                "sample(), or use refresh='manual' and call refresh() / "
                "update() / rebuild() yourself")
        if policy == "auto":
            self.refresh(item_table)
            return
        due = tf.equal(self.draw_counter % policy, 0)
        if tf.executing_eagerly():
            if bool(due):
                self.refresh(item_table)
            return

        def run():
            num_changed, _ = self.refresh(item_table)
            return num_changed

        tf.cond(due, run, lambda: tf.constant(0, tf.int64))

    # -- drawing -----------------------------------------------------------

    def _check_query(self, query):
        query = check_query(query)
        if query.shape[-1] is not None and query.shape[-1] != self.dim:
            raise ValueError(f"query must be [T, dim = {self.dim}], got "
                             f"shape {query.shape}")
        return tf.stop_gradient(query)

    def sample(self, query, num, shared=True, positives=None,
               item_table=None):
        """K draws per query row from the kernel proposal.

        Args:
            query: float [T, D] query rows (finite).
            num: K, a positive int (or int scalar tensor).
            shared: must be False (see the class docstring).
            positives: optional int [T]; checked, not used (accidental hits
                are the loss's business).
            item_table: float [C, D] item embeddings; required unless
                refresh="manual". The tree is refreshed from it first,
                according to the refresh policy.

        Returns:
            (ids int64 [T, K], log_q float32 [T, K]).

        Raises:
            ValueError: shared=True, query missing or of the wrong width,
                item_table missing or of the wrong shape.
            tf.errors.InvalidArgumentError: NaN/Inf in query or item_table.
        """
        if shared:
            raise ValueError(
                "KernelSampler draws a candidate set per query row (its "
                "proposal depends on the query), so shared=True has no "
                "per-row q; use shared=False, e.g. SampledSoftmax(sampler, "
                "K, shared=False), SampledRetrieval(sampler, K, "
                "shared=False, ...) or CCEMinus(sampler, K, shared=False)")
        if query is None:
            raise ValueError("KernelSampler draws depend on the query; pass "
                             "query [T, D]")
        query = self._check_query(query)
        self._maybe_refresh(None if item_table is None
                            else self._table(item_table))
        return super().sample(query, num, shared=False, positives=positives,
                              item_table=item_table)

    def _draw(self, seed, shape, query, positives, item_table):
        del positives, item_table  # the tree holds what the draw needs
        # Next to the tree: placed on a GPU, the draw would copy the whole
        # tree and snapshot to the device every call (the GPU kernel serves
        # `kernel_sampler_draw` on arrays that already live there).
        with tf.device(self.tree.device):
            return kernel_ops.kernel_sampler_draw(
                query, self.tree, self.tree_counts, self.snapshot, seed,
                shape[1], self.alpha, self.layout, self.use_fused)

    def _log_prob(self, query, ids):
        query = self._check_query(query)
        query = tf.debugging.check_numerics(
            tf.cast(query, tf.float32),
            "query has NaN/Inf entries: the kernel sampler needs finite "
            "queries")
        if ids.shape.rank not in (1, 2):
            raise ValueError(f"ids must be [K] (the same ids for every row) "
                             f"or [T, K], got shape {ids.shape}")
        if ids.shape.rank == 1:
            ids = tf.broadcast_to(ids[tf.newaxis],
                                  [tf.shape(query)[0], tf.shape(ids)[0]])
        rows = tf.gather(tf.convert_to_tensor(self.snapshot), ids)  # [T, K, D]
        dots = tf.einsum("td,tkd->tk", tf.cast(query, tf.float64),
                         tf.cast(rows, tf.float64))
        log_kernel = tf.math.log1p(self.alpha * tf.square(dots))
        log_norm = kernel_ops.tree_log_normaliser(
            query, tf.convert_to_tensor(self.tree)[1], self.num_items,
            self.alpha)
        return log_kernel - log_norm[:, tf.newaxis]

    def log_prob(self, query, ids):
        """Exact log q of one draw of each id, for each query row.

        Args:
            query: float [T, D].
            ids: int [K] (scored for every row) or [T, K], in [0, C).

        Returns:
            float32 [T, K].
        """
        if query is None:
            raise ValueError("KernelSampler probabilities depend on the "
                             "query; pass query [T, D]")
        return super().log_prob(query, ids)

    def probabilities(self, query):
        """float64 [T, C]: exact q by brute force over the snapshot (the
        oracle the tree must match; O(T C D))."""
        query = self._check_query(query)
        return tf.exp(kernel_ops.kernel_log_probabilities(
            query, self.snapshot, self.alpha))
