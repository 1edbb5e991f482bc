"""CutCrossEntropy / CCEMinus: reference == naive TF, fused op == reference.

The naive TF losses materialise the logits (full_softmax_cross_entropy, and
the SampledSoftmax pieces on gathered rows); the references chunk and
recompute; the fused ops are held to the references in values and all three
gradients (1e-5 relative to the magnitude), including adversarial inputs.
"""

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings, strategies as st

import tfrec_fast  # noqa: F401  (selects tf_keras first)
import tf_keras

from tfrec_fast import ops
from tfrec_fast import samplers
from tfrec_fast.losses import CCEMinus
from tfrec_fast.losses import CutCrossEntropy
from tfrec_fast.losses import accidental_hits
from tfrec_fast.losses import corrected_softmax_cross_entropy
from tfrec_fast.losses import full_softmax_cross_entropy
from tfrec_fast.ops import _library
from tfrec_fast.ops import counter_rng

MODULE = _library.DEFAULT_LIBRARY.module()
needs_cce_op = pytest.mark.skipif(
    MODULE is None or not hasattr(MODULE, "tfrec_fast_cut_cross_entropy"),
    reason="op library without TfrecFastCutCrossEntropy")
needs_cce_minus_op = pytest.mark.skipif(
    MODULE is None or not hasattr(MODULE, "tfrec_fast_cce_minus"),
    reason="op library without TfrecFastCceMinus")


def _problem(n, c, d, seed, scale=1.0, bias=True):
    rng = np.random.default_rng(seed)
    h = tf.constant(rng.normal(size=(n, d)) * scale, tf.float32)
    w = tf.constant(rng.normal(size=(c, d)), tf.float32)
    b = tf.constant(rng.normal(size=c), tf.float32) if bias else None
    y = tf.constant(rng.integers(0, c, n), tf.int64)
    g = tf.constant(rng.uniform(0.5, 1.5, n), tf.float32)  # upstream grad
    return h, w, b, y, g


def _loss_and_grads(fn, h, w, b, g):
    """[loss, dh, dw, db] of sum(g * fn()) as dense NumPy arrays."""
    watched = [h, w] + ([b] if b is not None else [])
    with tf.GradientTape() as tape:
        tape.watch(watched)
        loss = fn()
        total = tf.reduce_sum(loss * g)
    grads = tape.gradient(total, watched)
    return [loss.numpy()] + [tf.convert_to_tensor(x).numpy() for x in grads]


def _assert_close(got, want, rtol=1e-5):
    for name, x, z in zip(["loss", "d_hidden", "d_item_table", "d_bias"],
                          got, want):
        scale = max(1.0, float(np.max(np.abs(z)))) if z.size else 1.0
        np.testing.assert_allclose(x, z, rtol=0, atol=rtol * scale,
                                   err_msg=name)


def _naive_sampled(h, w, b, y, ids, log_q):
    """The SampledSoftmax pieces on materialised logits (the oracle)."""
    rows = tf.gather(w, ids)
    if ids.shape.rank == 1:
        negative = tf.matmul(h, rows, transpose_b=True)
    else:
        negative = tf.einsum("td,tkd->tk", h, rows)
    positive = tf.reduce_sum(h * tf.gather(w, y), axis=1)
    if b is not None:
        negative += tf.gather(b, ids)
        positive += tf.gather(b, y)
    return corrected_softmax_cross_entropy(
        positive, negative, log_q, tf.shape(ids)[-1],
        hits=accidental_hits(ids, y))


# ------------------------------------------------ references vs naive TF

@pytest.mark.parametrize("n, c, d, chunk, bias, scale", [
    (37, 5001, 16, 1000, True, 1.0),
    (5, 1, 3, 7, False, 1.0),      # C = 1: loss 0
    (0, 17, 4, 8, True, 1.0),      # N = 0
    (9, 300, 8, 64, True, 3e3),    # huge logits
])
def test_cut_cross_entropy_reference_equals_full_softmax(n, c, d, chunk,
                                                         bias, scale):
    h, w, b, y, g = _problem(n, c, d, seed=n + c, scale=scale, bias=bias)
    got = _loss_and_grads(lambda: ops.cut_cross_entropy_reference(
        h, w, y, b, chunk_size=chunk), h, w, b, g)
    want = _loss_and_grads(lambda: full_softmax_cross_entropy(h, w, y, b),
                           h, w, b, g)
    _assert_close(got, want)


def test_cut_cross_entropy_reference_ties_and_xla():
    # Every logit equal: loss log C, gradient (1/C - onehot) terms.
    h = tf.ones([4, 3])
    w = tf.ones([10, 3])
    y = tf.constant([0, 3, 3, 9])
    np.testing.assert_allclose(
        ops.cut_cross_entropy_reference(h, w, y, chunk_size=4).numpy(),
        np.full(4, np.log(10.0)), rtol=1e-6)
    h, w, b, y, g = _problem(11, 700, 8, seed=3)
    compiled = tf.function(
        lambda: _grads_tensors(lambda: ops.cut_cross_entropy_reference(
            h, w, y, b, chunk_size=256), h, w, b, g), jit_compile=True)
    want = _loss_and_grads(lambda: full_softmax_cross_entropy(h, w, y, b),
                           h, w, b, g)
    _assert_close([x.numpy() for x in compiled()], want)


def _grads_tensors(fn, h, w, b, g):
    with tf.GradientTape() as tape:
        tape.watch([h, w, b])
        loss = fn()
        total = tf.reduce_sum(loss * g)
    return [loss] + [tf.convert_to_tensor(x)
                     for x in tape.gradient(total, [h, w, b])]


@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_cce_minus_reference_equals_naive_sampled_softmax(shared, bias):
    n, c, d, k = 13, 40, 8, 37
    h, w, b, y, g = _problem(n, c, d, seed=5, bias=bias)
    rng = np.random.default_rng(6)
    shape = [k] if shared else [n, k]
    ids = rng.integers(0, c, shape)
    if not shared:
        ids[0, :5] = y.numpy()[0]  # accidental hits
        ids[1, :] = y.numpy()[1]   # every negative is the positive
    ids = tf.constant(ids)
    log_q = tf.constant(rng.normal(size=shape) - 3, tf.float32)
    got = _loss_and_grads(lambda: ops.cce_minus_reference(
        h, w, y, ops.GivenNegatives(ids, log_q), b, chunk_size=8),
        h, w, b, g)
    want = _loss_and_grads(lambda: _naive_sampled(h, w, b, y, ids, log_q),
                           h, w, b, g)
    _assert_close(got, want)
    if not shared:
        assert got[0][1] == 0.0  # only the positive is left


@pytest.mark.parametrize("unigram", [False, True])
def test_cce_minus_reference_generated_negatives(unigram):
    n, c, d, k = 9, 50, 8, 21
    h, w, b, y, g = _problem(n, c, d, seed=7)
    rows = tf.range(n, dtype=tf.int64) + 100
    if unigram:
        sampler = samplers.Unigram(np.arange(1, c + 1), seed=0)
        tables = (sampler.accept, sampler.alias, sampler.log_q_table)
        ids = counter_rng.unigram_draws(3, 11, rows, k, sampler.accept,
                                        sampler.alias)
        log_q = tf.gather(sampler.log_q_table, ids)
    else:
        tables = None
        ids = counter_rng.uniform_draws(3, 11, rows, k, c)
        log_q = tf.fill([n, k], -float(np.log(c)))
    negatives = ops.generated_negatives(k, 3, 11, 100, tables)
    got = _loss_and_grads(lambda: ops.cce_minus_reference(
        h, w, y, negatives, b, chunk_size=4), h, w, b, g)
    want = _loss_and_grads(lambda: _naive_sampled(h, w, b, y, ids, log_q),
                           h, w, b, g)
    _assert_close(got, want)


def test_counter_rng_matches_python_integers():
    mask = (1 << 64) - 1

    def mix(z):
        z ^= z >> 30
        z = (z * 0xBF58476D1CE4E5B9) & mask
        z ^= z >> 27
        z = (z * 0x94D049BB133111EB) & mask
        return z ^ (z >> 31)

    def draw(seed, step, row, j, c):
        key = mix(mix(seed & mask) ^ (step & mask))
        bits = mix((mix(key ^ (row & mask)) + (j + 1) * 0x9E3779B97F4A7C15)
                   & mask)
        return min(int(float(bits >> 11) * 2.0 ** -53 * float(c)), c - 1)

    rows = [0, 5, 2 ** 40, -1]
    got = counter_rng.uniform_draws(-7, 123456789, tf.constant(rows), 6,
                                    100003).numpy()
    want = [[draw(-7, 123456789, r, j, 100003) for j in range(6)]
            for r in rows]
    np.testing.assert_array_equal(got, want)
    # Under XLA too (uint64 arithmetic and one float64 multiply).
    compiled = tf.function(lambda: counter_rng.uniform_draws(
        -7, 123456789, tf.constant(rows), 6, 100003), jit_compile=True)
    np.testing.assert_array_equal(compiled().numpy(), want)


def test_generated_draws_follow_their_distribution():
    c = 8
    ids = counter_rng.uniform_draws(1, 2, tf.range(500, dtype=tf.int64), 64,
                                    c).numpy().ravel()
    counts = np.bincount(ids, minlength=c)
    expected = len(ids) / c
    assert ((counts - expected) ** 2 / expected).sum() < 30  # chi2(7) p<1e-4
    sampler = samplers.Unigram([1, 2, 4, 8, 16, 32, 64, 128], seed=0)
    ids = counter_rng.unigram_draws(1, 2, tf.range(500, dtype=tf.int64), 64,
                                    sampler.accept,
                                    sampler.alias).numpy().ravel()
    expected = len(ids) * np.exp(sampler.log_q_table.numpy())
    counts = np.bincount(ids, minlength=c)
    assert ((counts - expected) ** 2 / expected).sum() < 30


# ------------------------------------------------ fused ops vs references

@needs_cce_op
@pytest.mark.parametrize("n, c, d, bias, scale, index_dtype", [
    (64, 3416, 64, False, 1.0, tf.int64),
    (37, 1001, 19, True, 1.0, tf.int32),
    (5, 1, 3, True, 1.0, tf.int64),
    (0, 17, 4, True, 1.0, tf.int64),
    (33, 257, 16, True, 2e3, tf.int64),
])
def test_fused_cut_cross_entropy_equals_reference(n, c, d, bias, scale,
                                                  index_dtype):
    h, w, b, y, g = _problem(n, c, d, seed=11 + n, scale=scale, bias=bias)
    y = tf.cast(y, index_dtype)
    got = _loss_and_grads(lambda: ops.cut_cross_entropy(
        h, w, y, b, use_fused=True), h, w, b, g)
    want = _loss_and_grads(lambda: ops.cut_cross_entropy_reference(
        h, w, y, b), h, w, b, g)
    _assert_close(got, want)


def _negatives(kind, n, c, k, rng, y):
    if kind == "given_row":
        ids = rng.integers(0, c, (n, k))
        if n:
            ids[0, :3] = y.numpy()[0]  # accidental hits
        return ops.GivenNegatives(
            tf.constant(ids), tf.constant(rng.normal(size=(n, k)) - 2,
                                          tf.float32))
    if kind == "given_shared":
        return ops.GivenNegatives(
            tf.constant(rng.integers(0, c, k)),
            tf.constant(rng.normal(size=k) - 2, tf.float32))
    if kind == "uniform":
        return ops.generated_negatives(k, 5, 9, 3)
    sampler = samplers.Unigram(rng.integers(1, 50, c), seed=0)
    return ops.generated_negatives(
        k, 5, 9, 3, (sampler.accept, sampler.alias, sampler.log_q_table))


@needs_cce_minus_op
@pytest.mark.parametrize("kind", ["given_row", "given_shared", "uniform",
                                  "unigram"])
@pytest.mark.parametrize("n, c, d, k, bias", [
    (64, 3416, 64, 256, True),
    (13, 40, 7, 50, False),   # K > C: repeats and hits
    (4, 1, 3, 5, True),       # C = 1: every negative is a hit
    (0, 17, 4, 8, True),      # N = 0
    (9, 30, 8, 0, True),      # K = 0 (given shapes [N, 0] / [0])
])
def test_fused_cce_minus_equals_reference(kind, n, c, d, k, bias):
    h, w, b, y, g = _problem(n, c, d, seed=21 + n + k, bias=bias)
    negatives = _negatives(kind, n, c, k, np.random.default_rng(k), y)
    got = _loss_and_grads(lambda: ops.cce_minus(
        h, w, y, negatives, b, use_fused=True), h, w, b, g)
    want = _loss_and_grads(lambda: ops.cce_minus_reference(
        h, w, y, negatives, b), h, w, b, g)
    _assert_close(got, want)


@needs_cce_op
@needs_cce_minus_op
@settings(max_examples=40, deadline=None, derandomize=True)
@given(n=st.integers(0, 40), c=st.integers(1, 300), d=st.integers(1, 40),
       k=st.integers(0, 40), bias=st.booleans(),
       kind=st.sampled_from(["given_row", "given_shared", "uniform",
                             "unigram"]),
       seed=st.integers(0, 2 ** 16))
def test_fused_ops_equal_references_on_generated_cases(n, c, d, k, bias,
                                                       kind, seed):
    h, w, b, y, g = _problem(n, c, d, seed=seed, bias=bias)
    got = _loss_and_grads(lambda: ops.cut_cross_entropy(
        h, w, y, b, use_fused=True), h, w, b, g)
    want = _loss_and_grads(lambda: ops.cut_cross_entropy_reference(
        h, w, y, b), h, w, b, g)
    _assert_close(got, want)
    negatives = _negatives(kind, n, c, k, np.random.default_rng(seed), y)
    got = _loss_and_grads(lambda: ops.cce_minus(
        h, w, y, negatives, b, use_fused=True), h, w, b, g)
    want = _loss_and_grads(lambda: ops.cce_minus_reference(
        h, w, y, negatives, b), h, w, b, g)
    _assert_close(got, want)


@needs_cce_op
@needs_cce_minus_op
@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_fused_ops_take_half_precision(dtype):
    h, w, b, y, g = _problem(16, 300, 32, seed=2)
    h16, w16 = tf.cast(h, dtype), tf.cast(w, dtype)
    # Reference on the same rounded inputs, in float32.
    h32, w32 = tf.cast(h16, tf.float32), tf.cast(w16, tf.float32)
    got = ops.cut_cross_entropy(h16, w16, y, b, use_fused=True).numpy()
    want = ops.cut_cross_entropy_reference(h32, w32, y, b).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    negatives = ops.generated_negatives(32, 1, 2)
    got = ops.cce_minus(h16, w16, y, negatives, b, use_fused=True).numpy()
    want = ops.cce_minus_reference(h32, w32, y, negatives, b).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
    with tf.GradientTape() as tape:
        tape.watch([h16, w16])
        loss = tf.reduce_sum(ops.cut_cross_entropy(h16, w16, y, b))
    d_h, d_w = tape.gradient(loss, [h16, w16])
    assert d_h.dtype == dtype and d_w.dtype == dtype


# ------------------------------------------------ bad input, both paths

@pytest.mark.parametrize("use_fused", [False, None])
@pytest.mark.parametrize("bad", [-1, 50])
def test_out_of_range_ids_raise_invalid_argument(use_fused, bad):
    h, w, b, y, _ = _problem(4, 50, 8, seed=1)
    bad_y = tf.constant([0, bad, 2, 3], tf.int64)
    with pytest.raises(tf.errors.InvalidArgumentError, match="targets"):
        ops.cut_cross_entropy(h, w, bad_y, b, use_fused=use_fused)
    with pytest.raises(tf.errors.InvalidArgumentError, match="targets"):
        ops.cce_minus(h, w, bad_y, ops.generated_negatives(4, 1, 1), b,
                      use_fused=use_fused)
    bad_ids = ops.GivenNegatives(tf.constant([[1, bad]] * 4),
                                 tf.zeros([4, 2]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="negative"):
        ops.cce_minus(h, w, y, bad_ids, b, use_fused=use_fused)


def test_wrong_ranks_and_dtypes_raise_value_errors():
    h, w, b, y, _ = _problem(4, 50, 8, seed=1)
    cases = [
        (lambda: ops.cut_cross_entropy(h[0], w, y), "hidden must be"),
        (lambda: ops.cut_cross_entropy(h, w[:, :3], y), "same D"),
        (lambda: ops.cut_cross_entropy(h, w, tf.cast(y, tf.float32)),
         "targets must be integer"),
        (lambda: ops.cut_cross_entropy(h, tf.cast(w, tf.float64), y),
         "share a dtype"),
        (lambda: ops.cut_cross_entropy(h, w, y[:3]), "same N"),
        (lambda: ops.cut_cross_entropy(h, w, y, b[:3]), "same C"),
        (lambda: ops.cce_minus(h, w, y, ops.GivenNegatives(
            tf.zeros([4, 2, 1], tf.int64), tf.zeros([4, 2, 1]))),
         r"\[K\] \(shared\) or \[N, K\]"),
        (lambda: ops.cce_minus(h, w, y, ops.GivenNegatives(
            tf.zeros([4, 2], tf.int64), tf.zeros([4, 3]))), "same shape"),
        (lambda: ops.cce_minus(h, w, y, (1, 2)), "GivenNegatives or"),
        (lambda: ops.generated_negatives(-1, 0, 0), "int >= 0"),
    ]
    for fn, message in cases:
        with pytest.raises(ValueError, match=message):
            fn()


@pytest.mark.parametrize("use_fused", [False, None])
def test_nan_inputs_give_nan_loss(use_fused):
    h, w, b, y, _ = _problem(4, 50, 8, seed=1)
    h = tf.tensor_scatter_nd_update(h, [[1, 0]], [float("nan")])
    loss = ops.cut_cross_entropy(h, w, y, b, use_fused=use_fused).numpy()
    assert np.isnan(loss[1]) and np.isfinite(loss[[0, 2, 3]]).all()
    loss = ops.cce_minus(h, w, y, ops.generated_negatives(8, 1, 1), b,
                         use_fused=use_fused).numpy()
    assert np.isnan(loss[1]) and np.isfinite(loss[[0, 2, 3]]).all()


# ------------------------------------------------ the Keras loss layers

def test_cut_cross_entropy_layer_equals_full_softmax_on_ragged_input():
    h, w, b, y, _ = _problem(7, 60, 8, seed=4)
    splits = tf.constant([0, 3, 3, 7], tf.int64)
    hidden = tf.RaggedTensor.from_row_splits(h, splits)
    targets = tf.RaggedTensor.from_row_splits(y, splits)
    weights = tf.RaggedTensor.from_row_splits(tf.range(7.0), splits)
    layer = CutCrossEntropy(temperature=0.5)
    got = layer(hidden, w, targets, sample_weight=weights, item_bias=b)
    want = tf.reduce_mean(full_softmax_cross_entropy(h / 0.5, w, y, b) *
                          tf.range(7.0))
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5)
    clone = CutCrossEntropy.from_config(layer.get_config())
    assert clone.temperature == 0.5


@pytest.mark.parametrize("sampler_name, in_kernel", [
    ("uniform", True), ("unigram", True), ("log-uniform", False)])
def test_cce_minus_layer_draws_fresh_negatives_each_call(sampler_name,
                                                         in_kernel):
    c = 60
    sampler = {"uniform": samplers.Uniform(c, seed=3),
               "unigram": samplers.Unigram(np.arange(1, c + 1), seed=3),
               "log-uniform": samplers.LogUniform(c, seed=3)}[sampler_name]
    layer = CCEMinus(sampler, 16, reduction=tf_keras.losses.Reduction.NONE)
    assert layer.in_kernel == in_kernel
    h, w, _, y, _ = _problem(5, c, 8, seed=4)
    first, second = layer(h, w, y).numpy(), layer(h, w, y).numpy()
    assert not np.array_equal(first, second)
    assert int(sampler.draw_counter.numpy()) == 2
    # The same counter reproduces the same draws (checkpoint semantics).
    sampler.draw_counter.assign(1)
    np.testing.assert_array_equal(layer(h, w, y).numpy(), second)
    config = layer.get_config()
    clone = CCEMinus.from_config(config)
    assert (clone.num_negatives, clone.in_kernel, clone.shared) == (
        16, in_kernel, False)


def test_cce_minus_layer_argument_errors():
    with pytest.raises(ValueError, match="in_kernel=True needs per-row"):
        CCEMinus(samplers.LogUniform(10), 4, in_kernel=True)
    with pytest.raises(ValueError, match="in_kernel=True needs per-row"):
        CCEMinus(samplers.Uniform(10), 4, shared=True, in_kernel=True)
    with pytest.raises(ValueError, match="num_negatives is required"):
        CCEMinus(samplers.Uniform(10))
    with pytest.raises(ValueError, match="CandidateSampler"):
        CCEMinus("uniform", 4)


def test_cce_minus_layer_shared_negatives_equal_sampled_softmax():
    from tfrec_fast.losses import SampledSoftmax
    c = 80
    h, w, b, y, _ = _problem(9, c, 8, seed=8)
    fused = CCEMinus(samplers.Unigram(np.arange(1, c + 1), seed=5), 32,
                     shared=True)
    plain = SampledSoftmax(samplers.Unigram(np.arange(1, c + 1), seed=5), 32,
                           shared=True)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([h, w])
        got = fused(h, w, y, item_bias=b)
        want = plain(h, w, y, item_bias=b)
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-5)
    for x, z in zip(tape.gradient(got, [h, w]), tape.gradient(want, [h, w])):
        np.testing.assert_allclose(tf.convert_to_tensor(x).numpy(),
                                   tf.convert_to_tensor(z).numpy(),
                                   atol=1e-6)
