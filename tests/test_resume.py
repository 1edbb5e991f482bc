"""Fault tolerance: training SIGKILLed mid-epoch resumes to the same state.

The end-to-end test runs tests/_resume_train.py (a CoSam SASRec: ragged
SASRec with dropout 0.3, a sampled softmax whose `CollaborativeSampler`
has a draw counter and learns its walk weights with its own Adam) three
times: once uninterrupted, once SIGKILLed by this process after batch
PAUSE_AT (in the middle of an epoch, two batches after the last
`callbacks.ResumableBackup` backup), and once more in the killed run's
directory, which restores the backup and finishes. The restarted run's
per-batch losses and its final state (every checkpointed value: weights,
both optimizers' slots and step counters, the sampler's walk weights and
draw counter, the dropout layers' call counters) equal the uninterrupted
run's bit for bit, with no tolerance: on the CPU every op of this model
gives the same bits for the same inputs. (The children see no GPU: GPU
kernels that accumulate with atomics, such as scatter-adds of embedding
gradients, are not bit-reproducible, and the test is about resuming.)

What makes that hold (each is tested on its own below as well):
- dataset position: `data.resumable_epochs` starts the stream at
  `ResumableBackup.start`, the restored optimizer step count, set before
  `fit` starts the iterator; epoch e's order is a pure function of e
  (`next_item_dataset(seed=1000 + epoch)`). Keras alone restarts the
  epoch's data from its first batch, and a stream reading the optimizer's
  `iterations` itself races with the train step that increments it (the
  child logs each step's users, so a skipped batch fails the test);
- dropout: `layers.ResumableDropout` keys its masks by a checkpointed call
  counter; stock tf_keras Dropout draws from stateful RNG that no
  checkpoint holds (its masks differ after a restart; the control below);
- sampler draws: keyed by the sampler's draw counter, a variable.
"""

import doctest
import importlib.util
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

import tfrec_fast  # noqa: F401  (selects tf_keras before TF loads)
import tensorflow as tf
import tf_keras

from tfrec_fast import data
from tfrec_fast.callbacks import ResumableBackup
from tfrec_fast.layers import PaddedSequenceEncoder
from tfrec_fast.layers import ResumableDropout
from tfrec_fast.layers import SequenceEncoder
from tfrec_fast.models import SASRec

REPO = Path(__file__).resolve().parent.parent
CHILD_PATH = Path(__file__).with_name("_resume_train.py")
CHILD_TIMEOUT_S = 300  # generous: two shared cores; never a pass criterion
PAUSE_AT = 9  # batch (over the run) after which the child is killed


def _child_module():
    spec = importlib.util.spec_from_file_location("_resume_train",
                                                  CHILD_PATH)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


CHILD = _child_module()


@pytest.fixture
def children():
    """Started child processes; any still running at the end is killed."""
    procs = []
    try:
        yield procs
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                pass


def _start(children, workdir, *args):
    env = dict(os.environ, PYTHONPATH=str(REPO), TF_USE_LEGACY_KERAS="1",
               TF_CPP_MIN_LOG_LEVEL="3",
               # CPU only: GPU atomics (scatter-adds of embedding
               # gradients) are not bit-reproducible; see the docstring.
               CUDA_VISIBLE_DEVICES="")
    with open(workdir / "child.log", "ab") as log:  # the child dups it
        proc = subprocess.Popen(  # pylint: disable=consider-using-with
            [sys.executable, str(CHILD_PATH), str(workdir), *args],
            cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    children.append(proc)
    return proc


def _log_tail(workdir):
    path = workdir / "child.log"
    return path.read_text(errors="replace")[-3000:] if path.exists() else ""


def _wait(proc, workdir):
    try:
        proc.wait(timeout=CHILD_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        proc.kill()
        pytest.fail(f"child timed out:\n{_log_tail(workdir)}")
    assert proc.returncode == 0, _log_tail(workdir)


def _wait_for_file(path, proc, workdir):
    deadline = time.monotonic() + CHILD_TIMEOUT_S
    while not path.exists():
        if proc.poll() is not None:
            pytest.fail(f"child exited ({proc.returncode}) before writing "
                        f"{path.name}:\n{_log_tail(workdir)}")
        if time.monotonic() > deadline:
            pytest.fail(f"child never wrote {path.name}:\n"
                        f"{_log_tail(workdir)}")
        time.sleep(0.2)


def _log(workdir):
    """The children's per-batch records, in the order they were trained."""
    lines = (workdir / "losses.jsonl").read_text().splitlines()
    return [json.loads(line) for line in lines]


def _checkpoint_values(path):
    reader = tf.train.load_checkpoint(str(path))
    return {name: reader.get_tensor(name)
            for name in reader.get_variable_to_shape_map()
            if name != "_CHECKPOINTABLE_OBJECT_GRAPH"}


def test_sigkill_mid_epoch_then_restart_matches_uninterrupted(children,
                                                              tmp_path):
    full_dir, fault_dir = tmp_path / "full", tmp_path / "fault"
    full_dir.mkdir()
    fault_dir.mkdir()
    full = _start(children, full_dir)
    victim = _start(children, fault_dir, "--pause-at", str(PAUSE_AT))
    _wait_for_file(fault_dir / "reached", victim, fault_dir)
    victim.send_signal(signal.SIGKILL)
    victim.wait(timeout=30)
    assert victim.returncode == -signal.SIGKILL

    # Batch g of the run: batch g % N of epoch g // N (N = steps).
    make_epoch = CHILD.make_epoch_fn(CHILD.train_sequences())
    batches = [batch["users"].numpy().tolist()
               for epoch in range(CHILD.EPOCHS)
               for batch in make_epoch(tf.constant(epoch, tf.int64))]
    steps = len(batches) // CHILD.EPOCHS
    # The backup the restart will use: mid-epoch, before the kill.
    backup = _checkpoint_values(fault_dir / "backup" / "chief")
    resumed_at = int(backup["model/optimizer/_iterations/.ATTRIBUTES/"
                            "VARIABLE_VALUE"])
    last_save = (PAUSE_AT + 1) // CHILD.SAVE_FREQ * CHILD.SAVE_FREQ
    assert resumed_at == last_save
    assert 0 < resumed_at <= PAUSE_AT  # batches after it are lost
    assert resumed_at % steps != 0  # mid-epoch
    assert PAUSE_AT // steps == resumed_at // steps < CHILD.EPOCHS - 1

    restart = _start(children, fault_dir)
    _wait(restart, fault_dir)
    _wait(full, full_dir)

    total = steps * CHILD.EPOCHS
    full_log = _log(full_dir)
    assert [r["step"] for r in full_log] == list(range(total))
    # Every step trained its own batch (none skipped, none repeated).
    assert [r["users"] for r in full_log] == batches
    expected = {r["step"]: r["loss"] for r in full_log}
    fault_log = _log(fault_dir)
    killed = [r for r in fault_log if r["pid"] == victim.pid]
    restarted = [r for r in fault_log if r["pid"] == restart.pid]
    assert len(killed) + len(restarted) == len(fault_log)
    assert [r["step"] for r in killed] == list(range(PAUSE_AT + 1))
    # The restart redoes the batches after the backup, then the rest,
    # each on the batch of the uninterrupted run and with its loss, exactly.
    assert [r["step"] for r in restarted] == list(range(resumed_at, total))
    for record in killed + restarted:
        assert record["users"] == batches[record["step"]]
        assert record["loss"] == expected[record["step"]], record

    want = _checkpoint_values(full_dir / "final")
    got = _checkpoint_values(fault_dir / "final")
    assert sorted(got) == sorted(want)
    different = [name for name in want
                 if not np.array_equal(got[name], want[name])]
    assert not different
    # The comparison covers the state that has to travel, and it moved.
    prefix = {
        "draw_counter": "model/task/loss_fn/sampler/draw_counter",
        "walk": "model/task/loss_fn/sampler/user_to_item_logits",
        "sampler_optimizer": "model/sampler_optimizer/_iterations",
        "optimizer": "model/optimizer/_iterations",
        "input_dropout": "model/encoder/input_dropout/call_counter",
        "residual_dropout":
            "model/encoder/blocks/0/residual_dropout/call_counter",
    }
    value = {key: want[name + "/.ATTRIBUTES/VARIABLE_VALUE"]
             for key, name in prefix.items()}
    assert value["draw_counter"] == total
    assert value["optimizer"] == value["sampler_optimizer"] == total
    assert value["input_dropout"] == total
    assert value["residual_dropout"] == 2 * total  # two calls per block
    assert np.any(value["walk"] != 0)  # learned by the sampler's Adam
    slots = [name for name in want if name.startswith(
        "model/sampler_optimizer/_variables/")]
    assert slots and any(np.any(want[name] != 0) for name in slots)


def test_resumable_dropout_masks_restored_by_checkpoint(tmp_path):
    x = tf.ones([4, 32])
    layer = ResumableDropout(0.5, seed=3)
    checkpoint = tf.train.Checkpoint(layer=layer)
    path = checkpoint.write(str(tmp_path / "resumable"))
    masks = [layer(x, training=True).numpy() for _ in range(3)]
    assert not np.array_equal(masks[0], masks[1])  # a new mask per call
    assert set(np.unique(masks[0])) == {0.0, 2.0}  # kept units scaled
    checkpoint.read(path).assert_consumed()
    replay = [layer(x, training=True).numpy() for _ in range(3)]
    for mask, again in zip(masks, replay):
        np.testing.assert_array_equal(again, mask)
    np.testing.assert_array_equal(layer(x, training=False), x)
    # Config round trip: same seed, so the same stream from counter 0.
    clone = tf_keras.layers.deserialize(tf_keras.layers.serialize(layer))
    assert isinstance(clone, ResumableDropout) and clone.seed == 3
    np.testing.assert_array_equal(clone(x, training=True), masks[0])
    # The counter is checkpointed, yet not a Keras weight: weight lists
    # (and get_weights / set_weights between encoders) are unchanged.
    assert layer.weights == [] and int(layer.call_counter) == 3

    # Control: stock Dropout's stateful RNG is not in the checkpoint.
    tf_keras.utils.set_random_seed(0)
    stock = tf_keras.layers.Dropout(0.5)
    path = tf.train.Checkpoint(layer=stock).write(str(tmp_path / "stock"))
    first = stock(x, training=True).numpy()
    tf.train.Checkpoint(layer=stock).read(path)
    assert not np.array_equal(stock(x, training=True).numpy(), first)


def test_sequence_encoder_dropout_is_resumable_and_weights_unchanged(
        tmp_path):
    tf_keras.utils.set_random_seed(1)
    encoder = SequenceEncoder(max_len=6, dim=8, num_blocks=2, dropout=0.4)
    x = tf.RaggedTensor.from_row_lengths(tf.random.normal([9, 8]), [4, 0, 5])
    encoder(x)
    checkpoint = tf.train.Checkpoint(encoder=encoder)
    path = checkpoint.write(str(tmp_path / "ckpt"))
    first = encoder(x, training=True).flat_values.numpy()
    second = encoder(x, training=True).flat_values.numpy()
    assert not np.allclose(first, second)  # dropout active
    checkpoint.read(path)
    np.testing.assert_array_equal(
        encoder(x, training=True).flat_values, first)
    # The counters are not weights: the weight list still matches the
    # padded reference encoder's (stock Dropout) one to one.
    counters = [layer.call_counter for layer in encoder._flatten_layers()
                if isinstance(layer, ResumableDropout)]
    assert len(counters) == 1 + 2 * 2  # input; per block attention, residual
    assert not [w for w in encoder.weights
                if any(w is counter for counter in counters)]
    padded = PaddedSequenceEncoder(6, 8, num_blocks=2, dropout=0.4)
    padded(x.to_tensor(), x.row_lengths())
    padded.set_weights(encoder.get_weights())
    np.testing.assert_allclose(
        tf.RaggedTensor.from_tensor(padded(x.to_tensor(), x.row_lengths()),
                                    lengths=x.row_lengths()).flat_values,
        encoder(x).flat_values, atol=1e-5)


def _stream(position, steps, epochs=3):
    def make_epoch(epoch):
        # 2 batches of 3 from a 6-row epoch, a pure function of the epoch.
        order = tf.random.experimental.stateless_shuffle(
            tf.range(6, dtype=tf.int64),
            seed=tf.stack([epoch, tf.constant(7, tf.int64)]))
        return tf.data.Dataset.from_tensor_slices(order + 10 * epoch).batch(3)
    stream = data.resumable_epochs(make_epoch, steps, position)
    batches = stream.take(epochs * steps).as_numpy_iterator()
    return [batch.tolist() for batch in batches]


def test_resumable_epochs_starts_at_position_read_when_iterated():
    whole = _stream(0, 2)
    assert sorted(whole[0] + whole[1]) == list(range(6))
    assert sorted(whole[4] + whole[5]) == list(range(20, 26))
    assert whole[0:2] != [[b - 10 for b in batch] for batch in whole[2:4]]
    for start in (1, 2, 3):
        assert _stream(start, 2)[:6 - start] == whole[start:]
    # A variable is read when the iterator starts, not when the stream is
    # built (fit restores the checkpoint in between).
    position = tf.Variable(0, dtype=tf.int64)
    stream = data.resumable_epochs(
        lambda e: tf.data.Dataset.range(4).map(lambda i: i + 4 * e), 4,
        position)
    position.assign(6)
    assert list(stream.take(3).as_numpy_iterator()) == [6, 7, 8]
    assert stream.cardinality() == tf.data.INFINITE_CARDINALITY


def test_resumable_epochs_rejects_wrong_epoch_lengths():
    with pytest.raises(ValueError, match="steps_per_epoch"):
        data.resumable_epochs(lambda e: tf.data.Dataset.range(3), 0, 0)
    for length in (3, 5):  # epochs of 4 batches are announced
        stream = data.resumable_epochs(
            lambda e, n=length: tf.data.Dataset.range(n), 4, 0)
        with pytest.raises(tf.errors.FailedPreconditionError,
                           match="expected to contain 4 elements"):
            list(stream.take(8).as_numpy_iterator())


def test_next_item_dataset_tensor_seed_is_a_fixed_order():
    seqs = data.synthetic_zipf(20, 15, mean_length=5, seed=2)

    def rows(seed):
        batches = data.next_item_dataset(seqs, 4, 6, seed=seed,
                                         with_users=True)
        return [u for b in batches for u in b["users"].numpy().tolist()]

    first = rows(tf.constant(5, tf.int64))
    assert first == rows(tf.constant(5, tf.int64))
    assert first != rows(tf.constant(6, tf.int64))
    assert sorted(first) == sorted(rows(5))  # the same rows, reordered


class _Crash(tf_keras.callbacks.Callback):
    """Raises after batch `at` of the run (an in-process stand-in for a
    kill: fit stops without on_train_end, so the backup stays)."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_train_batch_end(self, batch, logs=None):
        if int(self.model.optimizer.iterations) - 1 == self.at:
            raise RuntimeError("crash")


class _Users(tf_keras.callbacks.Callback):
    def __init__(self):
        super().__init__()
        self.seen = []

    def on_train_batch_end(self, batch, logs=None):
        self.seen.append([int(u) for u in logs["users"]])


class _UsersSASRec(SASRec):
    def train_step(self, inputs):
        logs = super().train_step(inputs)
        logs["users"] = inputs["users"]
        return logs


def test_resumable_backup_start_is_the_restored_step_count(tmp_path):
    seqs = data.synthetic_zipf(24, 20, mean_length=5, seed=3,
                               length_distribution="constant")

    def make_epoch(epoch):
        return data.next_item_dataset(seqs, 6, 6, seed=epoch,
                                      with_users=True)

    batches = [b["users"].numpy().tolist() for e in range(2)
               for b in make_epoch(tf.constant(e, tf.int64))]

    def run(*extra):
        tf_keras.utils.set_random_seed(0)
        model = _UsersSASRec(20, max_len=6, dim=8, num_blocks=1)
        model.compile(optimizer=tf_keras.optimizers.Adam(1e-2))
        model(tf.ragged.constant([[1, 2]], dtype=tf.int64))
        backup = ResumableBackup(str(tmp_path), save_freq=2)
        users = _Users()
        stream = data.resumable_epochs(make_epoch, 4, backup.start)
        model.fit(stream, epochs=2, steps_per_epoch=4, verbose=0,
                  callbacks=[backup, users, *extra])
        return backup, users.seen

    with pytest.raises(RuntimeError, match="crash"):
        run(_Crash(at=6))  # backups after batches 1, 3 and 5
    backup, seen = run()
    assert int(backup.start) == 6  # epoch 1, batch 2
    assert seen == batches[6:]
    fresh, seen = run()  # the backup was deleted at the end of fit
    assert int(fresh.start) == 0 and seen == batches


@pytest.mark.parametrize("module", [
    "tfrec_fast.callbacks", "tfrec_fast.data.resumable",
    "tfrec_fast.layers.dropout"])
def test_docstring_examples_run(module):
    results = doctest.testmod(importlib.import_module(module),
                              extraglobs={"tf": tf}, verbose=False)
    assert results.attempted > 0 and results.failed == 0
