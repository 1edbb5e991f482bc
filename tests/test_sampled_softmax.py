"""SampledSoftmax: the correction, accidental hits, reductions, bad input.

The oracle is a NumPy computation of the same formula from the same draws.
"""

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tfrec_fast  # noqa: F401
from tfrec_fast import losses
from tfrec_fast import samplers
from tfrec_fast.losses import SampledSoftmax

Reduction = tf_keras.losses.Reduction
C, D, T = 40, 8, 6


class FixedCandidates(samplers.CandidateSampler):
    """Returns the same candidates and log q every time (test oracle)."""

    def __init__(self, num_items, ids, log_q, **kwargs):
        super().__init__(num_items, seed=0, **kwargs)
        self.ids, self.log_q = np.asarray(ids), np.asarray(log_q, np.float32)

    def _draw(self, seed, shape, query, positives, item_table):
        return tf.constant(self.ids, tf.int64), tf.constant(self.log_q)

    def _log_prob(self, query, ids):
        table = np.full(self.num_items, np.log(1.0 / self.num_items),
                        np.float32)
        table[self.ids.reshape(-1)] = self.log_q.reshape(-1)
        return tf.gather(table, ids)


@pytest.fixture
def inputs():
    rng = np.random.default_rng(0)
    hidden = rng.normal(size=(T, D)).astype(np.float32)
    table = rng.normal(size=(C, D)).astype(np.float32)
    positives = rng.integers(0, C, size=T)
    return hidden, table, positives


def numpy_loss(hidden, table, positives, ids, log_q, correct_positive_log_q=None,
               listed=None, temperature=1.0, bias=None):
    """Per-row loss by the formula, from explicit candidates."""
    ids = np.broadcast_to(ids, (len(positives), ids.shape[-1]))
    log_q = np.broadcast_to(log_q, ids.shape)
    k = ids.shape[1]
    bias = np.zeros(len(table)) if bias is None else bias
    out = []
    for t, p in enumerate(positives):
        s_p = hidden[t] @ table[p] / temperature + bias[p]
        if correct_positive_log_q is not None:
            s_p -= np.log(k) + correct_positive_log_q[t]
        logits = [s_p]
        for j, lq in zip(ids[t], log_q[t]):
            hit = j == p or (listed is not None and j in listed[t])
            if not hit:
                logits.append(hidden[t] @ table[j] / temperature + bias[j]
                              - np.log(k) - lq)
        logits = np.array(logits, np.float64)
        out.append(np.log(np.exp(logits - logits.max()).sum()) + logits.max()
                   - s_p)
    return np.array(out)


@pytest.mark.parametrize("shared", [True, False])
def test_matches_numpy_formula(inputs, shared):
    hidden, table, positives = inputs
    rng = np.random.default_rng(1)
    shape = (5,) if shared else (T, 5)
    ids = rng.integers(0, C, size=shape)
    ids.flat[0] = positives[0]  # an accidental hit in row 0
    log_q = np.log(rng.uniform(0.01, 0.1, size=shape)).astype(np.float32)
    loss = SampledSoftmax(FixedCandidates(C, ids, log_q), 5, shared=shared,
                          temperature=0.5, reduction=Reduction.NONE)
    bias = rng.normal(size=C).astype(np.float32)
    got = loss(hidden, table, positives, item_bias=bias)
    want = numpy_loss(hidden, table, positives, ids, log_q, temperature=0.5,
                      bias=bias)
    np.testing.assert_allclose(got.numpy(), want, rtol=1e-5, atol=1e-5)


def test_positive_correction_is_an_explicit_option(inputs):
    hidden, table, positives = inputs
    ids = np.arange(10, 15)
    log_q = np.log(np.full(5, 0.05, np.float32))
    sampler = FixedCandidates(C, ids, log_q)
    corrected = SampledSoftmax(sampler, 5, correct_positive=True,
                               reduction=Reduction.NONE)
    pos_log_q = sampler.log_prob(None, positives).numpy()
    want = numpy_loss(hidden, table, positives, ids, log_q,
                      correct_positive_log_q=pos_log_q)
    np.testing.assert_allclose(corrected(hidden, table, positives).numpy(),
                               want, rtol=1e-5, atol=1e-6)


def test_logq_correction_pushes_popular_items_down():
    # Two negatives with equal raw logits: the popular one (large q) must end
    # up with the lower corrected logit, so it gets less softmax mass.
    hits = tf.zeros([1, 2], tf.bool)
    negative_logits = tf.constant([[2.0, 2.0]])
    popular, rare = np.log(0.5), np.log(0.001)
    log_q = tf.constant([popular, rare])
    loss_fn = losses.corrected_softmax_cross_entropy
    # Gradient of the loss w.r.t. each negative logit = its softmax mass.
    with tf.GradientTape() as tape:
        tape.watch(negative_logits)
        loss = loss_fn(tf.constant([1.0]), negative_logits, log_q, 2,
                       hits=hits)
    mass = tape.gradient(loss, negative_logits).numpy()[0]
    assert mass[0] < mass[1]
    np.testing.assert_allclose(mass[1] / mass[0], 0.5 / 0.001, rtol=1e-4)


def test_accidental_hits_get_exactly_zero_probability(inputs):
    hidden, table, positives = inputs
    ids = np.array([positives[0], positives[0], 3, 4])
    sampler = FixedCandidates(C, ids, np.log(np.full(4, 0.25, np.float32)))
    listed = tf.ragged.constant([[3]] + [[]] * (T - 1), tf.int64)
    loss = SampledSoftmax(sampler, 4, reduction=Reduction.SUM)
    table_var = tf.Variable(table)
    with tf.GradientTape() as tape:
        value = loss(hidden[:1], table_var, positives[:1],
                     listed_positives=listed[:1])
    grad = tf.convert_to_tensor(tape.gradient(value, table_var)).numpy()
    # Row 0: candidates 0, 1 equal the positive, 2 (item 3) is listed: only
    # item 4 competes. The gradient w.r.t. item 3's row is exactly zero.
    assert np.all(grad[3] == 0.0)
    s_p = hidden[0] @ table[positives[0]]
    s_4 = hidden[0] @ table[4] - np.log(4 * 0.25)
    want = np.logaddexp(s_p, s_4) - s_p
    np.testing.assert_allclose(value.numpy(), want, rtol=1e-5)
    # Removing hits off lets them compete.
    off = SampledSoftmax(sampler, 4, remove_accidental_hits=False,
                         reduction=Reduction.SUM)
    assert off(hidden[:1], table, positives[:1]).numpy() > value.numpy()


def test_all_candidates_hits_gives_zero_loss(inputs):
    hidden, table, positives = inputs
    sampler = FixedCandidates(C, np.full(3, positives[0]), np.zeros(3))
    loss = SampledSoftmax(sampler, 3, reduction=Reduction.NONE)
    assert loss(hidden[:1], table, positives[:1]).numpy()[0] == 0.0


def test_ragged_inputs_equal_flat(inputs):
    hidden, table, positives = inputs
    lengths = [2, 0, 4]
    make = lambda: SampledSoftmax(samplers.Uniform(C, seed=7), 8)  # noqa: E731
    flat = make()(hidden, table, positives)
    ragged = make()(tf.RaggedTensor.from_row_lengths(hidden, lengths), table,
                    tf.RaggedTensor.from_row_lengths(positives, lengths))
    np.testing.assert_allclose(flat.numpy(), ragged.numpy(), rtol=1e-6)


def test_reductions_and_sample_weight(inputs):
    hidden, table, positives = inputs
    weights = np.linspace(0.0, 1.0, T).astype(np.float32)

    def run(reduction, **kw):
        loss = SampledSoftmax(samplers.Uniform(C, seed=3), 8,
                              reduction=reduction)
        return loss(hidden, table, positives, **kw).numpy()

    per_row = run(Reduction.NONE)
    assert per_row.shape == (T,)
    np.testing.assert_allclose(run(Reduction.SUM), per_row.sum(), rtol=1e-6)
    np.testing.assert_allclose(run(Reduction.AUTO), per_row.mean(), rtol=1e-6)
    np.testing.assert_allclose(
        run(Reduction.SUM_OVER_BATCH_SIZE, sample_weight=weights),
        (per_row * weights).sum() / T, rtol=1e-6)


def test_seeded_draws_reproduce(inputs):
    hidden, table, positives = inputs
    a = SampledSoftmax(samplers.Unigram(np.arange(C) + 1.0, seed=11), 8)
    b = SampledSoftmax(samplers.Unigram(np.arange(C) + 1.0, seed=11), 8)
    first = [float(a(hidden, table, positives)) for _ in range(3)]
    assert first == [float(b(hidden, table, positives)) for _ in range(3)]
    assert len(set(first)) == 3  # each call draws anew


def test_inside_tf_function_and_gradients(inputs):
    hidden, table, positives = inputs
    table_var = tf.Variable(table)
    loss = SampledSoftmax(samplers.LogUniform(C, seed=1), 8, shared=False)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            value = loss(hidden, table_var, positives)
        return value, tape.gradient(value, table_var)

    value, grad = step()
    assert np.isfinite(value.numpy())
    assert isinstance(grad, tf.IndexedSlices)  # only touched rows
    assert loss.sampler.draw_counter.numpy() == 1


def test_config_round_trip():
    loss = SampledSoftmax(samplers.Unigram([3, 1, 2], alpha=0.5, seed=4), 2,
                          shared=False, correct_positive=True,
                          temperature=0.1, reduction=Reduction.SUM)
    clone = SampledSoftmax.from_config(loss.get_config())
    assert clone.get_config() == loss.get_config()
    assert isinstance(clone.sampler, samplers.Unigram)


@pytest.mark.parametrize("kwargs, match", [
    (dict(num_negatives=0), "num_negatives"),
    (dict(num_negatives=-3), "num_negatives"),
    (dict(num_negatives=4, temperature=0.0), "temperature"),
    (dict(num_negatives=4, shared=False, global_negatives=True),
     "global_negatives"),
    (dict(num_negatives=4, reduction="mean-ish"), "reduction|Reduction"),
])
def test_bad_constructor_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        SampledSoftmax(samplers.Uniform(C, seed=0), **kwargs)


def test_bad_call_arguments(inputs):
    hidden, table, positives = inputs
    loss = SampledSoftmax(samplers.Uniform(C, seed=0), 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="positives"):
        loss(hidden, table, np.where(np.arange(T) == 2, C, positives))
    with pytest.raises(tf.errors.InvalidArgumentError, match="positives"):
        loss(hidden, table, np.where(np.arange(T) == 2, -1, positives))
    with pytest.raises(ValueError, match="hidden"):
        loss(hidden[None], table, positives)
    with pytest.raises(ValueError, match="positives"):
        loss(hidden, table, positives.astype(np.float32))
    with pytest.raises(ValueError, match="positives"):
        loss(hidden, table, positives[:, None])
    with pytest.raises(ValueError, match="item_table"):
        loss(hidden, table[None], positives)
    with pytest.raises(ValueError, match="ragged"):
        loss(tf.RaggedTensor.from_row_lengths(hidden, [T]), table, positives)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match="listed_positives"):
        loss(hidden, table, positives,
             listed_positives=tf.ragged.constant([[C + 5]] * T, tf.int64))
