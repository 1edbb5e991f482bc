"""Child process of tests/test_resume.py: trains, and may be killed midway.

Trains a CoSam SASRec (ragged SASRec with dropout whose sampled softmax
draws from a `CollaborativeSampler` that learns its walk with its own Adam,
`ReinforcedSamplerModel`) with `model.fit` on a `data.resumable_epochs`
stream and a `callbacks.ResumableBackup(save_freq=SAVE_FREQ)` backup in
WORKDIR/backup, so that a rerun of the same command resumes where the last
backup left off.

Writes, in WORKDIR:
    losses.jsonl  one line {"step": g, "loss": ..., "users": [...],
                  "pid": ...} per batch trained (g counts batches over the
                  whole run, from 0; users: the batch's rows), appended by
                  every process that trains in WORKDIR;
    reached       written after batch `--pause-at` (then the process waits
                  to be killed: the parent sends SIGKILL);
    final         a `tf.train.Checkpoint(model=model)` of the state after
                  the last batch (weights, both optimizers' slots and step
                  counters, sampler walk weights and draw counter, dropout
                  call counters).

    python tests/_resume_train.py WORKDIR [--pause-at G]
"""

import argparse
import json
import os
import sys
import time

import tfrec_fast  # noqa: F401  (selects tf_keras before TF loads)
import tensorflow as tf
import tf_keras

from tfrec_fast import data
from tfrec_fast.callbacks import ResumableBackup
from tfrec_fast.losses import SampledSoftmax
from tfrec_fast.models import ReinforcedSamplerModel
from tfrec_fast.models import SASRec
from tfrec_fast.samplers import CollaborativeSampler
from tfrec_fast.tasks import NextItemTask

NUM_USERS, NUM_ITEMS, MAX_LEN, BATCH = 96, 40, 8, 16
EPOCHS = 3
SAVE_FREQ = 4  # batches between backups


class CoSamSASRec(ReinforcedSamplerModel, SASRec):
    """SASRec whose walk sampler has its own optimizer."""

    def train_step(self, inputs):
        logs = super().train_step(inputs)
        logs["users"] = inputs["users"]  # which batch this step trained
        return logs


def train_sequences():
    """Fixed synthetic histories (row u = user u), all of length >= 2."""
    return data.synthetic_zipf(NUM_USERS, NUM_ITEMS, mean_length=6,
                               max_length=12, length_distribution="uniform",
                               seed=0)


def make_epoch_fn(sequences):
    def make_epoch(epoch):
        # A new order every epoch, a pure function of the epoch.
        return data.next_item_dataset(sequences, BATCH, MAX_LEN,
                                      seed=1000 + epoch, with_users=True)
    return make_epoch


def build_model(sequences):
    """The model, its optimizers compiled and its variables created."""
    # Seeds of the sampler and of every dropout layer (drawn from NumPy at
    # construction): equal in every process that builds the model.
    tf_keras.utils.set_random_seed(0)
    sampler = CollaborativeSampler.from_sequences(
        sequences, NUM_ITEMS, stop_probability=0.5, max_length=3)
    task = NextItemTask(SampledSoftmax(
        sampler, 8, shared=False, reduction=tf_keras.losses.Reduction.NONE))
    model = CoSamSASRec(
        sampler_optimizer=tf_keras.optimizers.Adam(0.05),
        num_items=NUM_ITEMS, max_len=MAX_LEN, dim=16, num_blocks=1,
        num_heads=2, dropout=0.3, task=task)
    model.compile(optimizer=tf_keras.optimizers.Adam(0.01))
    # Built before fit, as BackupAndRestore asks: it builds the optimizer's
    # slots and restores into them in on_train_begin. (The sampler
    # optimizer's slots, created at its first step, get the backup's values
    # by deferred restoration.)
    model(tf.ragged.constant([[1, 2]], dtype=tf.int64))
    return model


class LossLog(tf_keras.callbacks.Callback):
    """Appends each batch's loss; pauses (to be killed) after one batch."""

    def __init__(self, path, pause_at, reached_path):
        super().__init__()
        self.path = path
        self.pause_at = pause_at
        self.reached_path = reached_path

    def on_train_batch_end(self, batch, logs=None):
        step = int(self.model.optimizer.iterations) - 1  # batches done - 1
        with open(self.path, "a", encoding="utf-8") as f:
            f.write(json.dumps({
                "step": step, "loss": float(logs["loss"]),
                "users": [int(u) for u in logs["users"]],
                "pid": os.getpid()}) + "\n")
        if step == self.pause_at:
            with open(self.reached_path, "w", encoding="utf-8") as f:
                f.write(str(os.getpid()))
            # The parent SIGKILLs us here, mid-epoch; should it be gone,
            # do not linger.
            deadline = time.monotonic() + 600
            while time.monotonic() < deadline:
                time.sleep(1)
            os._exit(3)  # pylint: disable=protected-access


def main(argv):
    parser = argparse.ArgumentParser()
    parser.add_argument("workdir")
    parser.add_argument("--pause-at", type=int, default=-1)
    args = parser.parse_args(argv)
    sequences = train_sequences()
    make_epoch = make_epoch_fn(sequences)
    steps = int(make_epoch(tf.constant(0, tf.int64)).cardinality())
    model = build_model(sequences)
    backup = ResumableBackup(os.path.join(args.workdir, "backup"),
                             save_freq=SAVE_FREQ)
    stream = data.resumable_epochs(make_epoch, steps, backup.start)
    callbacks = [
        backup,
        LossLog(os.path.join(args.workdir, "losses.jsonl"), args.pause_at,
                os.path.join(args.workdir, "reached")),
    ]
    model.fit(stream, epochs=EPOCHS, steps_per_epoch=steps,
              callbacks=callbacks, verbose=0)
    tf.train.Checkpoint(model=model).write(
        os.path.join(args.workdir, "final"))
    with open(os.path.join(args.workdir, "meta.json"), "w",
              encoding="utf-8") as f:
        json.dump({"steps_per_epoch": steps, "epochs": EPOCHS,
                   "save_freq": SAVE_FREQ}, f)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
