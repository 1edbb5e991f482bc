"""Processes of the ParameterServerStrategy test (test_multiworker.py).

Usage:
    python _ps_cluster.py server CLUSTER_JSON JOB INDEX
        A `tf.distribute.Server` for task JOB:INDEX ("worker" or "ps"); it
        serves until killed (or until its parent process goes away).
    python _ps_cluster.py chief CLUSTER_JSON OUT_DIR
        The coordinator: a `ParameterServerStrategy` whose variables are
        split over the two parameter servers (`FixedShardsPartitioner(2)`),
        a `SASRec` with a fused `CCEMinus` loss trained by `model.fit`
        (`DatasetCreator`, `steps_per_execution`) on the workers, then every
        tfrec_fast loss evaluated on a worker against the sharded item
        table. Writes OUT_DIR/ps_result.json.
"""

import json
import os
import sys

import numpy as np

import tfrec_fast  # noqa: F401  (sets TF_USE_LEGACY_KERAS before TF loads)
import tensorflow as tf
import tf_keras

from distribute_testing import FixedCandidates
from distribute_testing import exit_with_parent
from tfrec_fast import models
from tfrec_fast import samplers
from tfrec_fast.losses import CCEMinus
from tfrec_fast.losses import CutCrossEntropy
from tfrec_fast.losses import SampledSoftmax
from tfrec_fast.ops import _library
from tfrec_fast.tasks import NextItemTask

NUM_ITEMS, DIM, MAX_LEN = 48, 8, 8
BATCH, STEPS_PER_EPOCH, EPOCHS = 16, 6, 4
MAX_LIFETIME_S = 240  # no process of the test outlives this


def limit_threads():
    # Two cores are shared by the five processes of the cluster.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)


def serve(cluster, job, index):
    """Runs the server of task `job`:`index` of `cluster` (a dict)."""
    # Functions the chief sends here call the fused ops: their kernels must
    # be registered in this process before the first one arrives.
    if _library.DEFAULT_LIBRARY.module() is None:
        raise SystemExit("the tfrec_fast op library did not load")
    limit_threads()
    server = tf.distribute.Server(tf.train.ClusterSpec(cluster), job_name=job,
                                  task_index=index, protocol="grpc",
                                  start=True)
    server.join()


# ------------------------------------------------------------------- chief

def sequences(count, seed):
    """Histories walking a cycle of stride 5: the next item is learnable."""
    rng = np.random.default_rng(seed)
    rows = []
    for _ in range(count):
        start, length = rng.integers(NUM_ITEMS), rng.integers(3, 9)
        rows.append([(start + 5 * k) % NUM_ITEMS for k in range(length)])
    return rows


def dataset_fn(input_context):
    """Each worker's own endless stream of batches (seeded by worker)."""
    rows = sequences(64, seed=input_context.input_pipeline_id)
    item_ids = tf.ragged.constant([r[:-1] for r in rows], dtype=tf.int64)
    targets = tf.ragged.constant([r[1:] for r in rows], dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices(
        {"item_ids": item_ids, "targets": targets}).shuffle(
            64, seed=0).batch(BATCH).repeat()


# Fresh loss layers per call: samplers keep draw counters, and the sharded
# and the plain table must meet the same negatives.
LOSSES = {
    "sampled_softmax": lambda: SampledSoftmax(
        FixedCandidates(NUM_ITEMS, [1, 4, 9, 16, 25, 36]), num_negatives=6),
    "sampled_softmax_per_row": lambda: SampledSoftmax(
        samplers.Uniform(NUM_ITEMS, seed=5), num_negatives=5, shared=False),
    "cce_minus_in_kernel": lambda: CCEMinus(
        samplers.Uniform(NUM_ITEMS, seed=7), num_negatives=5),
    "cce_minus_shared": lambda: CCEMinus(
        FixedCandidates(NUM_ITEMS, [2, 3, 5, 7, 11]), num_negatives=5,
        shared=True),
    "cut_cross_entropy": CutCrossEntropy,
    "next_item_full_softmax": NextItemTask,
}


def loss_checks(strategy, coordinator, table):
    """Values and table gradients of every loss, sharded vs plain table.

    Runs on a worker (scheduled through the coordinator), as fit's steps do.

    Returns:
        {name: (loss on the sharded table, loss on a plain copy, max |grad
        difference|, max |grad|)}.
    """
    rng = np.random.default_rng(3)
    hidden = tf.constant(rng.normal(size=(10, DIM)).astype(np.float32))
    targets = tf.constant(rng.integers(0, NUM_ITEMS, size=10), tf.int64)
    shards = table.variables
    plain = tf.concat(shards, axis=0)  # a constant copy of the table

    def one(name):
        # Sampler state is variables: made here, outside the function.
        with strategy.scope():
            on_shards, on_plain = LOSSES[name](), LOSSES[name]()

        @tf.function
        def step():
            with tf.GradientTape(persistent=True) as tape:
                tape.watch(plain)
                sharded_loss = on_shards(hidden, table, targets)
                plain_loss = on_plain(hidden, plain, targets)
            sharded_grad = tf.concat(
                [tf.convert_to_tensor(g) for g in
                 tape.gradient(sharded_loss, shards)], axis=0)
            plain_grad = tf.convert_to_tensor(tape.gradient(plain_loss,
                                                            plain))
            return (sharded_loss, plain_loss,
                    tf.reduce_max(tf.abs(sharded_grad - plain_grad)),
                    tf.reduce_max(tf.abs(plain_grad)))

        def run():
            return strategy.run(step)

        result = coordinator.schedule(tf.function(run))
        return [float(v) for v in result.fetch()]

    return {name: one(name) for name in LOSSES}


def chief(cluster, out_dir):
    """Trains and checks on the cluster; writes out_dir/ps_result.json."""
    limit_threads()
    resolver = tf.distribute.cluster_resolver.SimpleClusterResolver(
        tf.train.ClusterSpec(cluster), task_type="chief", task_id=0,
        rpc_layer="grpc")
    strategy = tf.distribute.experimental.ParameterServerStrategy(
        resolver, variable_partitioner=(
            tf.distribute.experimental.partitioners.FixedShardsPartitioner(
                2)))
    # One coordinator per strategy: fit finds and uses this one.
    coordinator = tf.distribute.experimental.coordinator.ClusterCoordinator(
        strategy)
    with strategy.scope():
        tf_keras.utils.set_random_seed(0)
        model = models.SASRec(
            NUM_ITEMS, max_len=MAX_LEN, dim=DIM, num_blocks=1, dropout=0.0,
            task=NextItemTask(CCEMinus(samplers.Uniform(NUM_ITEMS, seed=1),
                                       num_negatives=8)))
        model.compile(optimizer=tf_keras.optimizers.Adam(0.05),
                      steps_per_execution=2)
        # SASRec builds its embedding on demand: the table exists before
        # fit, so its starting values can be kept.
        table = model.item_table
    initial = [v.numpy() for v in table.variables]
    history = model.fit(
        tf_keras.utils.experimental.DatasetCreator(dataset_fn),
        epochs=EPOCHS, steps_per_epoch=STEPS_PER_EPOCH, verbose=0)
    result = {
        # tfrs.Model returns its loss as a plain tensor, not a Keras metric,
        # so under PS fit reports each epoch's last step (with a warning).
        "losses": [float(x) for x in history.history["loss"]],
        "table_type": type(table).__name__,
        "table_shape": table.shape.as_list(),
        "shard_devices": [v.device for v in table.variables],
        "shard_shapes": [v.shape.as_list() for v in table.variables],
        "trainable_shards": sum(1 for v in model.trainable_variables
                                if any(v is s for s in table.variables)),
        "shard_changes": [float(np.abs(v.numpy() - start).max())
                          for v, start in zip(table.variables, initial)],
        "variables": [[v.name, v.device] for v in model.variables],
        "loss_checks": loss_checks(strategy, coordinator, table),
    }
    with open(os.path.join(out_dir, "ps_result.json"), "w") as f:
        json.dump(result, f)


def main(argv):
    exit_with_parent(MAX_LIFETIME_S)
    cluster = json.loads(argv[2])
    if argv[1] == "server":
        serve(cluster, argv[3], int(argv[4]))
    elif argv[1] == "chief":
        chief(cluster, argv[3])
        sys.stdout.flush()
        sys.stderr.flush()
        # Skip the interpreter's teardown of the coordinator's threads (it
        # waits seconds on the remote workers); the result is written.
        os._exit(0)  # pylint: disable=protected-access
    else:
        raise SystemExit(f"unknown mode {argv[1]!r}")


if __name__ == "__main__":
    main(sys.argv)
