"""NextItemTask with a SampledSoftmax layer: SASRec fit, sampler state."""

import numpy as np
import pytest

import tfrec_fast  # noqa: F401  (selects tf_keras before TF loads)
import tensorflow as tf
import tf_keras

from tfrec_fast import data
from tfrec_fast import metrics
from tfrec_fast import samplers
from tfrec_fast.losses import SampledSoftmax
from tfrec_fast.losses import full_softmax_cross_entropy
from tfrec_fast.models import SASRec
from tfrec_fast.tasks import NextItemTask

Reduction = tf_keras.losses.Reduction


def _sampled_model(split, seed=0):
    tf_keras.utils.set_random_seed(seed)
    task = NextItemTask(SampledSoftmax(samplers.Uniform(split.num_items,
                                                        seed=7), 16))
    model = SASRec(split.num_items, max_len=12, dim=16, num_blocks=1,
                   num_heads=2, dropout=0.0, task=task)
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2))
    return model


def test_sasrec_fits_with_sampled_softmax(toy_split):
    model = _sampled_model(toy_split)
    train = data.next_item_dataset(toy_split.train, batch_size=32, max_len=12)
    losses = model.fit(train, epochs=15, verbose=0).history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    test = data.eval_dataset(toy_split.test, batch_size=64, max_len=12)
    result = metrics.evaluate_full_ranking(model.query_embeddings,
                                           model.item_table, test)
    assert result["HR@10"] > 0.8  # chance is about 10 / 25


def test_sampler_state_is_tracked_and_checkpointed(toy_split, tmp_path):
    model = _sampled_model(toy_split)
    train = data.next_item_dataset(toy_split.train, batch_size=32, max_len=12)
    model.fit(train.take(3), epochs=1, verbose=0)
    counter = model.task.loss_fn.sampler.draw_counter
    assert counter.numpy() == 3  # one draw per training step
    assert any(v is counter for v in model.variables)
    assert any(v is counter for v in model.non_trainable_variables)
    path = tf.train.Checkpoint(model=model).save(str(tmp_path / "ckpt"))

    restored = _sampled_model(toy_split, seed=1)
    restored.fit(train.take(1), epochs=1, verbose=0)  # creates the variables
    tf.train.Checkpoint(model=restored).restore(path).assert_consumed()
    sampler = restored.task.loss_fn.sampler
    assert sampler.draw_counter.numpy() == 3
    # The restored stream continues where the saved one stopped.
    want = model.task.loss_fn.sampler.sample(None, 16)[0].numpy()
    np.testing.assert_array_equal(sampler.sample(None, 16)[0].numpy(), want)


class FixedCandidates(samplers.CandidateSampler):

    def __init__(self, num_items, ids, **kwargs):
        super().__init__(num_items, seed=0, **kwargs)
        self.ids = np.asarray(ids, np.int64)

    def _draw(self, seed, shape, query, positives, item_table):
        return tf.constant(self.ids), tf.fill([len(self.ids)], -2.0)

    def _log_prob(self, query, ids):
        return tf.fill(tf.shape(ids), -2.0)


def test_reductions_of_a_loss_layer():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(7, 4)).astype(np.float32)
    table = rng.normal(size=(12, 4)).astype(np.float32)
    targets = rng.integers(0, 12, size=7)
    weight = rng.uniform(0.5, 2.0, size=7).astype(np.float32)
    sampler = FixedCandidates(12, [1, 4, 9])
    per_row = SampledSoftmax(sampler, 3, reduction=Reduction.NONE)(
        hidden, table, targets).numpy()
    # A NONE layer: the task takes the weighted mean.
    task = NextItemTask(SampledSoftmax(sampler, 3, reduction=Reduction.NONE))
    np.testing.assert_allclose(task(hidden, table, targets).numpy(),
                               per_row.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        task(hidden, table, targets, sample_weight=weight).numpy(),
        (per_row * weight).sum() / weight.sum(), rtol=1e-6)
    # A reducing layer reduces itself (Keras semantics).
    task = NextItemTask(SampledSoftmax(sampler, 3, reduction=Reduction.SUM))
    np.testing.assert_allclose(
        task(hidden, table, targets, sample_weight=weight).numpy(),
        (per_row * weight).sum(), rtol=1e-6)
    # The default per-position callable: the full softmax mean.
    full = full_softmax_cross_entropy(hidden, table, targets).numpy()
    np.testing.assert_allclose(NextItemTask()(hidden, table, targets).numpy(),
                               full.mean(), rtol=1e-6)


def test_get_config_and_bad_loss():
    task = NextItemTask(SampledSoftmax(samplers.Uniform(30, seed=2), 8))
    copy = NextItemTask.from_config(task.get_config())
    assert isinstance(copy.loss_fn, SampledSoftmax)
    assert copy.loss_fn.num_negatives == 8
    assert copy.loss_fn.sampler.seed == 2
    assert NextItemTask.from_config(NextItemTask().get_config()).loss_fn is \
        full_softmax_cross_entropy
    with pytest.raises(ValueError, match="loss_fn must be callable"):
        NextItemTask("softmax")
    with pytest.raises(NotImplementedError, match="loss_fn"):
        NextItemTask(lambda h, w, t: h).get_config()
