"""One process of the MultiWorkerMirroredStrategy test (test_multiworker.py).

Usage:
    python _multiworker_worker.py worker OUT_DIR   # TF_CONFIG names the task
    python _multiworker_worker.py single OUT_DIR   # no strategy, reference

Trains two tfrec_fast models for `STEPS` steps of SGD on the same tiny
synthetic data and writes `OUT_DIR/<model>.npz` (losses, final weights):

- `two_tower`: `HistoryTwoTower` with `SampledRetrieval(global_negatives=
  True)`: in-batch negatives gathered over the replicas of both workers.
- `sasrec`: `SASRec` (padding-free encoder, fused attention op) with
  `NextItemTask(SampledSoftmax(...))` over a fixed candidate set.

Both negatives sets are deterministic, so a 2-worker run over a global batch
must reach the weights of one process that sees the whole global batch.
Worker w reads rows [w * B/2, (w + 1) * B/2) of every global batch of B
rows; "single" reads the global batches whole.
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
from tfrec_fast.losses import SampledSoftmax
from tfrec_fast.tasks import NextItemTask
from tfrec_fast.tasks import SampledRetrieval

NUM_ITEMS, DIM, MAX_LEN = 30, 8, 8
GLOBAL_BATCH, STEPS, NUM_WORKERS = 8, 4, 2
LEARNING_RATE = 0.5
MAX_LIFETIME_S = 240  # no process of the test outlives this


def global_batches():
    """STEPS global batches of GLOBAL_BATCH sequences (numpy id lists)."""
    rng = np.random.default_rng(0)
    batches = []
    for _ in range(STEPS):
        # Uneven lengths: the workers hold different numbers of positions,
        # which the global-batch loss scaling has to get right.
        batches.append([rng.integers(0, NUM_ITEMS, size=rng.integers(2, 7))
                        for _ in range(GLOBAL_BATCH)])
    return batches


def dataset_for(pipeline, num_pipelines):
    """The batches of input pipeline `pipeline` of `num_pipelines`.

    Pipeline p gets the p-th contiguous slice of every global batch, in
    global-batch order, so step s of every pipeline is part of global
    batch s.
    """
    rows_per_pipeline = GLOBAL_BATCH // num_pipelines
    rows = []
    for batch in global_batches():
        rows += batch[pipeline * rows_per_pipeline:
                      (pipeline + 1) * rows_per_pipeline]
    item_ids = tf.ragged.constant([r[:-1] for r in rows], dtype=tf.int64)
    targets = tf.ragged.constant([r[1:] for r in rows], dtype=tf.int64)
    return tf.data.Dataset.from_tensor_slices(
        {"item_ids": item_ids, "targets": targets}).batch(rows_per_pipeline)


def dataset_fn(input_context):
    """DatasetCreator callback: this worker's share of each global batch."""
    return dataset_for(input_context.input_pipeline_id,
                       input_context.num_input_pipelines)


def build(name):
    """A freshly seeded model; the same weights in every process."""
    tf_keras.utils.set_random_seed(1)
    if name == "two_tower":
        return models.HistoryTwoTower(
            NUM_ITEMS, SampledRetrieval(
                global_negatives=True, temperature=0.5,
                reduction=tf_keras.losses.Reduction.SUM_OVER_BATCH_SIZE),
            dim=DIM, max_len=MAX_LEN)
    loss = SampledSoftmax(FixedCandidates(NUM_ITEMS, [3, 7, 11, 19, 23, 0]),
                          num_negatives=6)
    return models.SASRec(NUM_ITEMS, max_len=MAX_LEN, dim=DIM, num_blocks=1,
                         dropout=0.0, task=NextItemTask(loss))


class _StepLosses(tf_keras.callbacks.Callback):
    """Records the loss of every step.

    `tfrs.Model.train_step` returns the step's loss itself (not a running
    mean metric), so `logs["loss"]` after batch s is the loss of step s:
    under a strategy, the sum of the replicas' losses.
    """

    def __init__(self):
        super().__init__()
        self.losses = []

    def on_train_batch_end(self, batch, logs=None):
        self.losses.append(float(logs["loss"]))


def initial_weights(name):
    """The weights `build(name)` starts from (made by one eager loss)."""
    model = build(name)
    model.compute_loss(next(iter(dataset_for(0, 1))))
    return [np.asarray(w) for w in model.get_weights()]


def train(name, strategy):
    with strategy.scope():
        model = build(name)
        model.compile(optimizer=tf_keras.optimizers.SGD(LEARNING_RATE))
    record = _StepLosses()
    model.fit(tf_keras.utils.experimental.DatasetCreator(dataset_fn),
              epochs=1, steps_per_epoch=STEPS, verbose=0, callbacks=[record])
    weights = [np.asarray(w) for w in model.get_weights()]
    return np.array(record.losses), weights


def main(mode, out_dir):
    exit_with_parent(MAX_LIFETIME_S)
    # Two cores are shared by every process of the test.
    tf.config.threading.set_intra_op_parallelism_threads(1)
    tf.config.threading.set_inter_op_parallelism_threads(2)
    if mode == "worker":
        strategy = tf.distribute.MultiWorkerMirroredStrategy()
        task = json.loads(os.environ["TF_CONFIG"])["task"]
        tag = f"worker{task['index']}"
        assert strategy.num_replicas_in_sync == NUM_WORKERS, (
            strategy.num_replicas_in_sync)
    elif mode == "single":
        strategy = tf.distribute.get_strategy()
        tag = "single"
    else:
        raise SystemExit(f"unknown mode {mode!r}")
    for name in ("two_tower", "sasrec"):
        losses, weights = train(name, strategy)
        arrays = {f"w{i}": w for i, w in enumerate(weights)}
        if mode == "single":
            arrays.update({f"init{i}": w for i, w in
                           enumerate(initial_weights(name))})
        np.savez(os.path.join(out_dir, f"{tag}_{name}.npz"), losses=losses,
                 **arrays)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2])
