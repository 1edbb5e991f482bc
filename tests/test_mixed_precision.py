"""Mixed precision: every layer, loss, task, query sampler and model under
the `mixed_float16` and `mixed_bfloat16` global policies, against float32.

Each check builds the float32 object and the mixed one with the same
weights, runs both on the same float32 inputs (the mixed one rounds them to
its compute dtype, as Keras' autocast does) and compares outputs, losses
and gradients; variables must stay float32, layer outputs come in the
compute dtype and losses in float32.

Tolerances are multiples of the compute dtype's machine epsilon
eps = 2^-10 (float16) or 2^-7 (bfloat16), the relative spacing of
floats at 1 (unit roundoff eps / 2):

- layers (relative Frobenius error of outputs and of weight gradients):
  each matmul / LayerNorm of a block rounds its inputs and output once
  (half an eps each at worst, ~1 eps in the norm of a whole tensor) and
  the few roundings along a block add up: LAYER_TOL = 4 eps (float16
  ~4e-3, bfloat16 ~3e-2); gradients, where the backward matmuls round
  again, GRAD_TOL = 4 eps, for all gradients together and per variable
  (see `assert_gradients_close` for gradients that are exactly 0).
- losses (absolute error per row): the loss is log-sum-exp(s) - s_y with
  logits s_c = h . w_c; rounding h and w to the compute dtype moves each
  logit by at most ~2 u ||h|| ||w_c|| (Cauchy-Schwarz over the D-term dot
  product), rounding a logit itself by u |s_c|; log-sum-exp is 1-Lipschitz
  in the max norm, so |loss error| <= LOSS_FACTOR eps ||h_t|| max_c ||w_c||
  with LOSS_FACTOR = 2 (u = eps / 2). Loss gradients: GRAD_TOL.
- models after `fit` with SGD (losses per step, and the weight changes,
  i.e. the summed gradients): FIT_TOL = 4 eps relative.

Measured on CPU: layers and gradients at most ~1.6 eps, models ~0.9 eps,
losses ~0.3 of their bound: every tolerance has a margin of 2.5x or more.

Accumulation in float32 is checked apart, with tolerances that half
precision could not meet: log-sum-exps over catalogs whose sum of
exponentials overflows float16 (C = 70,000 > 65,504) and over logits whose
exponentials overflow it must match float64 to float32 precision, and so
must samplers' log q.

`TFREC_MP_REPORT=1 pytest -s tests/test_mixed_precision.py` prints every
measured error next to its tolerance.
"""

import math
import os

import numpy as np
import pytest

import tfrec_fast  # noqa: F401  (selects tf_keras before TensorFlow loads)
import tensorflow as tf
import tf_keras

from tfrec_fast import layers
from tfrec_fast import losses
from tfrec_fast import models
from tfrec_fast import ops
from tfrec_fast import samplers
from tfrec_fast import tasks
from tfrec_fast.ops import _library

POLICIES = ("mixed_float16", "mixed_bfloat16")
COMPUTE = {"mixed_float16": tf.float16, "mixed_bfloat16": tf.bfloat16}
# Machine epsilon (spacing of floats at 1) of each policy's compute dtype.
EPS = {"mixed_float16": 2.0 ** -10, "mixed_bfloat16": 2.0 ** -7}
LAYER_TOL = 4
GRAD_TOL = 4
LOSS_FACTOR = 2
FIT_TOL = 4
# float32 accumulation: what a float32 log-sum-exp reaches, far below
# either half-precision epsilon.
FP32_TOL = 1e-5

_MODULE = _library.DEFAULT_LIBRARY.module()
HAS_OPS = _MODULE is not None
# Fused op when the library is built, and the pure-TF reference always.
FUSED_CHOICES = (True, False) if HAS_OPS else (False,)

_REPORT = os.environ.get("TFREC_MP_REPORT")  # print measured errors


def _report(name, policy, error, tolerance):
    if _REPORT:
        print(f"\n[mp] {name:40s} {policy:15s} err {error:.3g} "
              f"tol {tolerance:.3g}")


@pytest.fixture(autouse=True)
def float32_policy_around_each_test(request):
    """Every test starts and ends under the float32 global policy, so that
    no other test module ever sees a mixed one (even after a failure)."""
    tf_keras.mixed_precision.set_global_policy("float32")
    request.addfinalizer(
        lambda: tf_keras.mixed_precision.set_global_policy("float32"))


@pytest.fixture(params=POLICIES)
def policy(request):
    """The mixed policy under test (set by the tests where they build)."""
    return request.param


def _set_policy(name):
    tf_keras.mixed_precision.set_global_policy(name)


def relative_error(got, want):
    """||got - want|| / ||want|| (Frobenius, float64)."""
    got = np.asarray(tf.cast(got, tf.float64))
    want = np.asarray(tf.cast(want, tf.float64))
    return float(np.linalg.norm(got - want) / np.linalg.norm(want))


def assert_close(name, policy, got, want, factor):
    tolerance = factor * EPS[policy]
    error = relative_error(got, want)
    _report(name, policy, error, tolerance)
    assert error <= tolerance, (name, policy, error, tolerance)


def assert_float32_variables(layer):
    """Every floating variable of `layer` is stored in float32."""
    floating = [v for v in layer.variables if v.dtype.is_floating]
    assert floating
    for variable in floating:
        # Mixed layers wrap them in AutoCastVariables, which a layer's call
        # reads in the compute dtype; the storage is float32.
        assert getattr(variable, "true_dtype", variable.dtype) == \
            tf.float32, variable.name


def _ragged(seed, lengths=(5, 1, 8, 3), dim=16):
    rng = np.random.default_rng(seed)
    values = rng.normal(size=(sum(lengths), dim)).astype(np.float32)
    return tf.RaggedTensor.from_row_lengths(values, lengths)


def _values(x):
    return x.flat_values if isinstance(x, tf.RaggedTensor) else x


def _forward_and_gradients(layer, call, probe):
    """Output of `call(layer)` and the weight gradients of a fixed random
    linear functional of it (float32 `probe`)."""
    with tf.GradientTape() as tape:
        out = call(layer)
        objective = tf.reduce_sum(tf.cast(_values(out), tf.float32) * probe)
    return out, tape.gradient(objective, layer.trainable_weights)


def _check_layer(name, policy, factory, call, seed=0):
    """Float32 and mixed copies of a layer: dtypes, outputs, gradients."""
    _set_policy("float32")
    reference = factory()
    want = call(reference)  # builds
    _set_policy(policy)
    mixed = factory()
    call(mixed)  # builds (lazily created sublayers take the policy too)
    mixed.set_weights(reference.get_weights())
    assert_float32_variables(mixed)
    probe = tf.constant(np.random.default_rng(seed).normal(
        size=_values(want).shape), tf.float32)
    got, got_grads = _forward_and_gradients(mixed, call, probe)
    want, want_grads = _forward_and_gradients(reference, call, probe)
    assert _values(got).dtype == COMPUTE[policy], name
    assert _values(want).dtype == tf.float32
    if isinstance(want, tf.RaggedTensor):
        np.testing.assert_array_equal(got.row_splits, want.row_splits)
    assert_close(name, policy, _values(got), _values(want), LAYER_TOL)
    assert len(got_grads) == len(want_grads) > 0
    for g in got_grads:
        assert g.dtype == tf.float32  # gradients of float32 variables
    assert_gradients_close(name, policy, got_grads, want_grads,
                           [v.name for v in mixed.trainable_weights])
    return mixed, reference


def assert_gradients_close(name, policy, got, want, names):
    """All gradients together within GRAD_TOL eps (relative), and each
    variable's within GRAD_TOL eps of the larger of its own norm and the
    mean norm per variable.

    The floor matters for gradients that are zero in exact arithmetic
    (e.g. of the key bias, to which softmax is invariant): their computed
    values are rounding noise of cancelling terms the size of the other
    gradients, in float32 and in half precision alike.
    """
    got = [np.asarray(tf.cast(tf.convert_to_tensor(g), tf.float64))
           for g in got]
    want = [np.asarray(tf.cast(tf.convert_to_tensor(w), tf.float64))
            for w in want]
    assert_close(f"{name} gradients", policy,
                 np.concatenate([g.ravel() for g in got]),
                 np.concatenate([w.ravel() for w in want]), GRAD_TOL)
    norms = [np.linalg.norm(w) for w in want]
    floor = float(np.mean(norms))
    for variable, g, w, norm in zip(names, got, want, norms):
        error = np.linalg.norm(g - w) / max(norm, floor)
        _report(f"{name} d/{variable}", policy, error,
                GRAD_TOL * EPS[policy])
        assert error <= GRAD_TOL * EPS[policy], (name, variable, error)


# ----------------------------------------------------------------- layers


@pytest.mark.parametrize("use_fused", FUSED_CHOICES)
def test_ragged_multi_head_attention(policy, use_fused):
    x = _ragged(1)
    _check_layer(
        f"RaggedMultiHeadAttention fused={use_fused}", policy,
        lambda: layers.RaggedMultiHeadAttention(2, 8, use_fused=use_fused),
        lambda layer: layer(x))


def test_ragged_multi_head_attention_cross_inputs(policy):
    # Separate key / value inputs: the three-projection path.
    x, memory = _ragged(2), _ragged(3)
    _check_layer("RaggedMultiHeadAttention cross", policy,
                 lambda: layers.RaggedMultiHeadAttention(2, 8, causal=False),
                 lambda layer: layer(x, value=memory))


@pytest.mark.parametrize("norm_first", [True, False])
def test_ragged_transformer_block(policy, norm_first):
    x = _ragged(4)
    _check_layer(
        f"RaggedTransformerBlock norm_first={norm_first}", policy,
        lambda: layers.RaggedTransformerBlock(2, 16, ffn_dim=32,
                                              norm_first=norm_first),
        lambda layer: layer(x))


def test_ragged_positional_embedding(policy):
    ids = tf.ragged.constant([[3, 1, 4], [1], [5, 9, 2, 6, 5]], tf.int64)
    mixed, reference = _check_layer(
        "RaggedPositionalEmbedding", policy,
        lambda: layers.RaggedPositionalEmbedding(8, 16, from_end=True),
        lambda layer: layer(ids))
    # A lookup: exactly the float32 table rounded once.
    np.testing.assert_array_equal(
        mixed(ids).flat_values,
        tf.cast(reference(ids).flat_values, COMPUTE[policy]))


def test_sequence_encoder_ragged_and_padded(policy):
    x = _ragged(5)
    mixed, reference = _check_layer(
        "SequenceEncoder", policy,
        lambda: layers.SequenceEncoder(8, 16, num_blocks=2, num_heads=2,
                                       dropout=0.0),
        lambda layer: layer(x))
    # The serving path (core ops, padded) under the same policy.
    dense, lengths = x.to_tensor(), x.row_lengths()
    got = mixed.call_padded(dense, lengths)
    want = reference.call_padded(dense, lengths)
    assert got.dtype == COMPUTE[policy]
    assert_close("SequenceEncoder.call_padded", policy, got, want,
                 LAYER_TOL)
    mask = tf.sequence_mask(lengths, tf.shape(dense)[1])
    np.testing.assert_array_equal(
        tf.boolean_mask(got, ~mask), 0.0)  # padding stays exactly zero


def test_padded_transformer_block(policy):
    x = _ragged(6)
    dense = x.to_tensor()
    width = dense.shape[1]
    valid = tf.sequence_mask(x.row_lengths(), width)
    causal = tf.linalg.band_part(tf.ones([width, width], tf.bool), -1, 0)
    mask = causal[tf.newaxis] & valid[:, tf.newaxis, :]
    _check_layer("PaddedTransformerBlock", policy,
                 lambda: layers.PaddedTransformerBlock(2, 16),
                 lambda layer: layer(dense, mask))


def test_padded_sequence_encoder(policy):
    x = _ragged(7)
    dense, lengths = x.to_tensor(), x.row_lengths()
    _check_layer("PaddedSequenceEncoder", policy,
                 lambda: layers.PaddedSequenceEncoder(8, 16, num_heads=2,
                                                      dropout=0.0),
                 lambda layer: layer(dense, lengths))


def test_integrated_scorer_adds_float32_log_probabilities(policy):
    counts = np.arange(1, 101, dtype=np.float64) ** 2
    scores = tf.random.stateless_normal([3, 100], [1, 2])
    _set_policy("float32")
    want_bias = layers.IntegratedScorer(
        samplers.Unigram(counts, seed=1), weight=0.5).item_bias(None)
    _set_policy(policy)
    sampler = samplers.Unigram(counts, seed=1)
    scorer = layers.IntegratedScorer(sampler, weight=0.5)
    half_scores = tf.cast(scores, COMPUTE[policy])  # a mixed model's scores
    got = scorer(half_scores, None)
    # log p of this catalog reaches -12.7; in the compute dtype it would
    # be off by up to eps * 12.7 / 2 (0.05 in bfloat16). The sampler's
    # table stays a float32 variable and the sum is taken in float32.
    assert sampler.log_q_table.dtype == tf.float32
    assert got.dtype == tf.float32
    bias = scorer.item_bias(None)
    assert bias.dtype == tf.float32
    np.testing.assert_array_equal(bias, want_bias)
    np.testing.assert_array_equal(
        got, tf.cast(half_scores, tf.float32) + want_bias)


# ----------------------------------------------------------------- losses


def _loss_problem(seed, rows=24, items=300, dim=16, scale=0.5):
    rng = np.random.default_rng(seed)
    hidden = tf.Variable(rng.normal(size=(rows, dim)) * scale,
                         dtype=tf.float32)
    table = tf.Variable(rng.normal(size=(items, dim)) * scale,
                        dtype=tf.float32)
    targets = tf.constant(rng.integers(0, items, rows), tf.int64)
    return hidden, table, targets


def _loss_bound(policy, hidden, table):
    """LOSS_FACTOR eps ||h_t|| max_c ||w_c||: the per-row bound [T]."""
    return LOSS_FACTOR * EPS[policy] * tf.norm(hidden, axis=1) * tf.reduce_max(
        tf.norm(table, axis=1))


def _check_loss(name, policy, make, problem=None, rounded=False):
    """Losses and gradients of `make()` under float32 and under `policy`.

    Args:
        make: returns a callable (hidden, table, targets) -> float32 [T]
            per-row losses, or a scalar (the mean over rows).
        problem: (hidden, table, targets) variables; default
            `_loss_problem(0)`.
        rounded: give the float32 run the inputs rounded to the compute
            dtype too, for query-dependent samplers: the same query values
            then draw the same negatives (a draw near a boundary of the
            proposal could otherwise flip).
    """
    hidden, table, targets = problem or _loss_problem(0)
    compute = COMPUTE[policy]
    if rounded:
        hidden.assign(tf.cast(tf.cast(hidden, compute), tf.float32))
        table.assign(tf.cast(tf.cast(table, compute), tf.float32))
    results = {}
    for name_policy in ("float32", policy):
        _set_policy(name_policy)
        loss = make()
        with tf.GradientTape() as tape:
            # Hidden states come from the model's layers, in their compute
            # dtype; the item table is the float32 variable.
            dtype = compute if name_policy == policy else tf.float32
            value = loss(tf.cast(hidden, dtype), table, targets)
            mean = tf.reduce_mean(value)
        results[name_policy] = (value, tape.gradient(mean, [hidden, table]))
    got, got_grads = results[policy]
    want, want_grads = results["float32"]
    assert got.dtype == tf.float32, name
    assert got.shape == want.shape
    bound = _loss_bound(policy, hidden, table)
    if got.shape.rank == 0:  # the mean of the rows' losses
        bound = tf.reduce_mean(bound)
    error = tf.abs(got - want)
    _report(name, policy, float(tf.reduce_max(error / bound)) * LOSS_FACTOR,
            LOSS_FACTOR)
    assert bool(tf.reduce_all(error <= bound)), (name, error.numpy(),
                                                 bound.numpy())
    for g in got_grads:
        assert g.dtype == tf.float32, name
    assert_gradients_close(name, policy, got_grads, want_grads,
                           ("hidden", "table"))
    return got, want


NONE = tf_keras.losses.Reduction.NONE


@pytest.mark.parametrize("use_fused", FUSED_CHOICES)
def test_cut_cross_entropy(policy, use_fused):
    _check_loss(f"CutCrossEntropy fused={use_fused}", policy,
                lambda: losses.CutCrossEntropy(reduction=NONE,
                                               use_fused=use_fused))


@pytest.mark.parametrize("use_fused", FUSED_CHOICES)
@pytest.mark.parametrize("negatives", ["in_kernel", "shared_unigram"])
def test_cce_minus(policy, use_fused, negatives):
    def make():
        if negatives == "in_kernel":  # the kernel draws uniform ids
            return losses.CCEMinus(samplers.Uniform(300, seed=3), 32,
                                   reduction=NONE, use_fused=use_fused)
        # Given shared ids and log q from a Unigram's float32 tables.
        counts = np.arange(1, 301, dtype=np.float64)
        return losses.CCEMinus(samplers.Unigram(counts, seed=3), 32,
                               shared=True, reduction=NONE,
                               use_fused=use_fused)
    _check_loss(f"CCEMinus {negatives} fused={use_fused}", policy, make)


@pytest.mark.parametrize("shared", [True, False])
def test_sampled_softmax(policy, shared):
    _check_loss(f"SampledSoftmax shared={shared}", policy,
                lambda: losses.SampledSoftmax(
                    samplers.Uniform(300, seed=5), 32, shared=shared,
                    reduction=NONE))


def test_full_softmax_cross_entropy(policy):
    # A function: it gets compute-dtype hidden states and the float32 table.
    _check_loss("full_softmax_cross_entropy", policy,
                lambda: losses.full_softmax_cross_entropy)


def test_corrected_softmax_cross_entropy(policy):
    def make():
        def loss(h, w, t):
            # Shared negatives 0..31 with log q of a 300-item uniform, all
            # in the dtype of the hidden states.
            dtype = h.dtype
            w = tf.cast(w, dtype)
            negatives = tf.range(32, dtype=tf.int64)
            log_q = tf.fill([32], tf.cast(-math.log(300.0), dtype))
            return losses.corrected_softmax_cross_entropy(
                tf.reduce_sum(h * tf.gather(w, t), axis=1),
                tf.matmul(h, tf.gather(w, negatives), transpose_b=True),
                log_q, 32, hits=losses.accidental_hits(negatives, t))
        return loss
    _check_loss("corrected_softmax_cross_entropy", policy, make)


# -------------------------------------------- float32 accumulation checks


def _lse_float64(logits):
    logits = np.asarray(logits, np.float64)
    top = logits.max(axis=1, keepdims=True)
    return (np.log(np.exp(logits - top).sum(axis=1)) + top[:, 0])


# 70,000 equal logits: the sum of exponentials (70,000 after the max shift)
# overflows float16 (max 65,504), and a half-precision running sum stalls
# once adding 1 no longer changes it (at 2,048 in float16, 256 in
# bfloat16). The loss must be log(70,000) to float32 precision.
_LARGE_CATALOG = 70_000


def _large_catalog_problem():
    hidden = tf.zeros([4, 8])
    table = tf.random.stateless_normal([_LARGE_CATALOG, 8], [3, 4])
    targets = tf.constant([0, 1, _LARGE_CATALOG - 2, _LARGE_CATALOG - 1],
                          tf.int64)
    return hidden, table, targets


@pytest.mark.parametrize("use_fused", FUSED_CHOICES)
def test_cut_cross_entropy_sums_a_large_catalog_in_float32(policy,
                                                           use_fused):
    _set_policy(policy)
    loss = losses.CutCrossEntropy(reduction=NONE, use_fused=use_fused)
    got = loss(*_large_catalog_problem())
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got, np.full(4, math.log(_LARGE_CATALOG)),
                               rtol=FP32_TOL)


def test_next_item_task_sums_a_large_catalog_in_float32(policy):
    _set_policy(policy)
    got = tasks.NextItemTask()(*_large_catalog_problem())  # full softmax
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got, math.log(_LARGE_CATALOG), rtol=FP32_TOL)


def _large_logit_problem(policy, rows=16, items=500, dim=8):
    """Inputs in the compute dtype whose logits reach beyond 30 (exp
    overflows float16 beyond 11.1), and the logits in float64."""
    compute = COMPUTE[policy]
    rng = np.random.default_rng(11)
    hidden = tf.cast(rng.normal(size=(rows, dim)) * 2.0, compute)
    table = tf.cast(rng.normal(size=(items, dim)) * 2.0, compute)
    targets = tf.constant(rng.integers(0, items, rows), tf.int64)
    logits = np.asarray(tf.cast(hidden, tf.float64)) @ np.asarray(
        tf.cast(table, tf.float64)).T
    assert logits.max() > 30
    return hidden, table, targets, logits


@pytest.mark.parametrize("use_fused", FUSED_CHOICES)
def test_fused_losses_take_large_logits_in_float32(policy, use_fused):
    # The fused losses compute the logits of the rounded h and w in
    # float32: they match float64 on the same inputs to float32 precision.
    hidden, table, targets, logits = _large_logit_problem(policy)
    rows = np.arange(len(targets))
    _set_policy(policy)
    got = losses.CutCrossEntropy(reduction=NONE, use_fused=use_fused)(
        hidden, table, targets)
    want = _lse_float64(logits) - logits[rows, targets]
    np.testing.assert_allclose(got, want, rtol=FP32_TOL, atol=FP32_TOL)

    # CCE- with given per-row negatives (hits masked) and a log q of -20,
    # i.e. a 5e8-item catalog: half-precision log q would be off by 0.01
    # (float16) to 0.06 (bfloat16).
    ids = tf.constant(np.random.default_rng(12).integers(
        0, logits.shape[1], (len(targets), 64)), tf.int64)
    log_q = tf.fill(ids.shape, tf.constant(-20.0, tf.float32))
    got = ops.cce_minus(hidden, table, targets,
                        ops.GivenNegatives(ids, log_q), use_fused=use_fused)
    assert got.dtype == tf.float32
    negatives = (np.take_along_axis(logits, np.asarray(ids), axis=1)
                 - math.log(64.0) + 20.0)
    negatives[np.asarray(ids) == np.asarray(targets)[:, None]] = -np.inf
    positive = logits[rows, targets]
    want = _lse_float64(np.concatenate([positive[:, None], negatives],
                                       axis=1)) - positive
    np.testing.assert_allclose(got, want, rtol=FP32_TOL, atol=FP32_TOL)


def test_materialised_losses_take_large_logits_in_float32(policy):
    # full_softmax_cross_entropy and SampledSoftmax round each logit to
    # the compute dtype (the matmul runs in it); the log-softmax of those
    # rounded logits is then exact in float32.
    hidden, table, targets, _ = _large_logit_problem(policy)
    rows = np.arange(len(targets))
    rounded = np.asarray(tf.cast(tf.cast(
        tf.matmul(hidden, table, transpose_b=True), tf.float32), tf.float64))
    want = _lse_float64(rounded) - rounded[rows, targets]
    got = losses.full_softmax_cross_entropy(hidden, table, targets)
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got, want, rtol=FP32_TOL, atol=FP32_TOL)

    # corrected_softmax_cross_entropy on those rounded logits, with a
    # float16 log q: the correction and the log-sum-exp run in float32.
    negatives = tf.cast(rounded[:, :100], COMPUTE[policy])
    log_q = tf.fill([100], tf.constant(-6.0, COMPUTE[policy]))
    positive = tf.cast(rounded[rows, targets], COMPUTE[policy])
    got = losses.corrected_softmax_cross_entropy(positive, negatives, log_q,
                                                 100)
    assert got.dtype == tf.float32
    corrected = rounded[:, :100] - math.log(100.0) + 6.0
    pos = rounded[rows, targets]
    want = _lse_float64(np.concatenate([pos[:, None], corrected],
                                       axis=1)) - pos
    np.testing.assert_allclose(got, want, rtol=FP32_TOL, atol=FP32_TOL)


def test_sampled_losses_correct_a_huge_catalog_in_float32(policy):
    # Uniform negatives of a 10^6-item catalog, K = 4096, every logit 0:
    # each negative counts C / K = 244 after the logQ correction and the
    # normaliser is 1 + C = 1,000,001 (float16 tops out at 65,504). With
    # hits kept, loss = log(1 + C) exactly, whichever ids were drawn.
    items, num = 1_000_000, 4096
    want = math.log(1.0 + items)
    _set_policy(policy)
    hidden = tf.zeros([3, 4])
    table = tf.zeros([items, 4])
    targets = tf.constant([0, 5, 7], tf.int64)
    for loss in (
            losses.SampledSoftmax(samplers.Uniform(items, seed=1), num,
                                  remove_accidental_hits=False,
                                  reduction=NONE),
            losses.CCEMinus(samplers.Uniform(items, seed=1), num,
                            remove_accidental_hits=False, reduction=NONE)):
        got = loss(hidden, table, targets)
        assert got.dtype == tf.float32
        np.testing.assert_allclose(got, np.full(3, want), rtol=FP32_TOL)


# ------------------------------------------------------------------ tasks


@pytest.mark.parametrize("loss", ["default", "cut_cross_entropy",
                                  "sampled_softmax", "per_position"])
def test_next_item_task(policy, loss):
    def make():
        if loss == "default":  # full_softmax_cross_entropy
            return tasks.NextItemTask()
        if loss == "cut_cross_entropy":
            return tasks.NextItemTask(losses.CutCrossEntropy())
        if loss == "sampled_softmax":
            return tasks.NextItemTask(losses.SampledSoftmax(
                samplers.Uniform(300, seed=7), 32))
        # Reduction.NONE: the task takes the weighted mean itself.
        return tasks.NextItemTask(losses.CCEMinus(
            samplers.Uniform(300, seed=7), 32, reduction=NONE))
    got, _ = _check_loss(f"NextItemTask {loss}", policy, make)
    assert got.shape.rank == 0


class _Tower:
    """Candidate tower over the test's table variable: the embeddings in
    the queries' dtype, as a mixed-policy Embedding layer returns them."""

    table = None

    def __call__(self, ids):
        return tf.gather(self.table, ids)


def _retrieval(make_sampler, **kwargs):
    """A `make` for _check_loss: SampledRetrieval over the table."""
    def make():
        tower = _Tower()
        task = tasks.SampledRetrieval(
            make_sampler(), candidate_tower=tower,
            reduction=NONE, **kwargs)

        def loss(hidden, table, targets):
            tower.table = tf.cast(table, hidden.dtype)
            return task(hidden, tower(targets), candidate_ids=targets,
                        item_table=tower.table)
        return loss
    return make


def _separated_problem(rows=24, items=60, dim=8):
    """Scores with gaps: item c's score is (c + 1) / C times a positive
    per-row scale, so a row's candidates rank in id order and no two
    distinct scores are within rounding error of each other (relative gaps
    of at least 1 / C = 1.7%, against bfloat16's 0.4% rounding)."""
    rng = np.random.default_rng(3)
    direction = rng.normal(size=dim)
    direction /= np.linalg.norm(direction)
    table = np.outer(np.arange(1, items + 1) / items, direction)
    hidden = np.outer(rng.uniform(0.5, 1.5, rows), direction) * 2.0
    targets = rng.integers(0, items, rows)
    return (tf.Variable(hidden, dtype=tf.float32),
            tf.Variable(table, dtype=tf.float32),
            tf.constant(targets, tf.int64))


@pytest.mark.parametrize("sampler", ["in_batch", "uniform", "kernel",
                                     "hard_negatives"])
def test_sampled_retrieval(policy, sampler):
    problem, rounded = None, False
    if sampler == "in_batch":
        make = _retrieval(lambda: None)
    elif sampler == "uniform":
        make = _retrieval(lambda: samplers.Uniform(300, seed=9),
                          num_negatives=32)
    elif sampler == "kernel":
        problem, rounded = _loss_problem(0), True
        table = problem[1]

        def kernel_sampler():
            # Both runs draw from a tree of the same float32 table.
            return samplers.KernelSampler(
                300, 16, alpha=10.0, refresh="manual", seed=9,
                item_table=tf.cast(tf.cast(table, COMPUTE[policy]),
                                   tf.float32))
        make = _retrieval(kernel_sampler, num_negatives=16, shared=False)
    else:
        # Top-8 of a 24-draw pool: selections agree when no two scores
        # are within rounding error of each other.
        problem = _separated_problem()
        make = _retrieval(lambda: samplers.HardNegatives(
            samplers.Uniform(60, seed=9), pool_size=24), num_negatives=8)
    _check_loss(f"SampledRetrieval {sampler}", policy, make,
                problem=problem, rounded=rounded)


# --------------------------------------------------------------- samplers


def test_kernel_sampler_log_q_in_float32(policy):
    rng = np.random.default_rng(13)
    items, dim, alpha = 500, 16, 50.0
    table = tf.constant(rng.normal(size=(items, dim)), tf.float32)
    query = tf.cast(tf.constant(rng.normal(size=(6, dim)), tf.float32),
                    COMPUTE[policy])  # what a mixed model hands over
    _set_policy(policy)
    sampler = samplers.KernelSampler(items, dim, alpha=alpha, seed=2)
    for variable in sampler.variables:  # plain variables, float32 state
        assert variable.dtype in (tf.float32, tf.int64)
        assert type(variable).__name__ != "AutoCastVariable"
    ids, log_q = sampler.sample(query, 64, shared=False,
                                item_table=tf.cast(table, COMPUTE[policy]))
    assert ids.dtype == tf.int64 and log_q.dtype == tf.float32
    # The refresh stored the (half-precision) table it was given in the
    # float32 snapshot, and the draws' log q is that proposal's, computed
    # in float32 or better: it matches float64 to float32 precision.
    np.testing.assert_array_equal(sampler.snapshot,
                                  tf.cast(tf.cast(table, COMPUTE[policy]),
                                          tf.float32))
    want = _kernel_log_q_float64(query, sampler.snapshot, alpha, ids)
    np.testing.assert_allclose(log_q, want, rtol=0, atol=FP32_TOL)
    np.testing.assert_allclose(sampler.log_prob(query, ids), want, rtol=0,
                               atol=FP32_TOL)
    # log q spans several nats here: rounded to the compute dtype it would
    # be off by up to eps * |log q| / 2 (bfloat16: > 0.01), far above
    # FP32_TOL.
    assert float(tf.reduce_max(log_q) - tf.reduce_min(log_q)) > 5


def _kernel_log_q_float64(query, table, alpha, ids):
    """log q_i(h) of the quadratic kernel, brute force in float64."""
    query = np.asarray(tf.cast(query, tf.float64))
    table = np.asarray(tf.cast(table, tf.float64))
    kernel = alpha * (query @ table.T) ** 2 + 1.0  # [T, C]
    log_q = np.log(kernel) - np.log(kernel.sum(axis=1, keepdims=True))
    return np.take_along_axis(log_q, np.asarray(ids), axis=1)


def test_hard_negatives_select_by_score_and_keep_float32_log_q(policy):
    rng = np.random.default_rng(17)
    items, dim, pool, num = 400, 16, 40, 8
    table = tf.constant(rng.normal(size=(items, dim)), tf.float32)
    query = tf.constant(rng.normal(size=(10, dim)), tf.float32)
    compute = COMPUTE[policy]
    _set_policy(policy)
    sampler = samplers.HardNegatives(samplers.Uniform(items, seed=4), pool)
    base_twin = samplers.Uniform(items, seed=4)  # draws the same pool
    ids, log_q = sampler.sample(tf.cast(query, compute), num, shared=False,
                                item_table=tf.cast(table, compute))
    assert ids.dtype == tf.int64 and log_q.dtype == tf.float32
    # log q: the base's float32 log q plus log(pool / num), exactly.
    np.testing.assert_allclose(
        log_q, base_twin.log_prob(None, ids) + math.log(pool / num),
        rtol=0, atol=1e-6)
    # The kept ids are the pool's best by the exact (float64) scores, up
    # to ties within the half-precision scores' rounding: every kept id
    # scores at least the best left-out one, less the bound.
    pool_ids, _ = base_twin.sample(query, pool, shared=False)
    exact = np.einsum("td,tpd->tp", np.float64(query),
                      np.float64(tf.gather(table, pool_ids)))
    kept = np.asarray(ids)
    bound = (LOSS_FACTOR * EPS[policy] * np.linalg.norm(query, axis=1) *
             np.linalg.norm(table, axis=1).max())
    for row in range(kept.shape[0]):
        in_pool = np.asarray(pool_ids[row])
        kept_scores = exact[row][np.isin(in_pool, kept[row])]
        left_scores = exact[row][~np.isin(in_pool, kept[row])]
        assert len(set(kept[row])) == num
        assert kept_scores.min() >= left_scores.max() - bound[row], row


# ----------------------------------------------------------------- models


def _sequences(rows=32, items=40, seed=0):
    """Batches of histories that walk items in steps of 3 (learnable)."""
    rng = np.random.default_rng(seed)
    walks = []
    for _ in range(rows):
        start, length = rng.integers(items), rng.integers(4, 10)
        walks.append([(start + 3 * step) % items for step in range(length)])
    ids = tf.ragged.constant([w[:-1] for w in walks], tf.int64)
    targets = tf.ragged.constant([w[1:] for w in walks], tf.int64)
    return tf.data.Dataset.from_tensor_slices(
        {"item_ids": ids, "targets": targets}).batch(16)


def _sasrec(make_task=None):
    """A factory of small SASRec models (default task: full softmax)."""
    def make():
        return models.SASRec(40, max_len=10, dim=16, num_blocks=1,
                             num_heads=2, dropout=0.0,
                             task=make_task() if make_task else None)
    return make


def _two_tower():
    model = models.HistoryTwoTower(40, task=None, dim=16, max_len=10)
    # The mean over queries: with TFRS' default SUM, float16 gradients of
    # a 100-query batch overflow at the initial loss scale 2^15, and the
    # LossScaleOptimizer skips the first steps while it halves the scale
    # (as designed, but then the runs are not comparable step by step).
    model.task = tasks.SampledRetrieval(
        samplers.Uniform(40, seed=5), 16,
        candidate_tower=model.candidate_embedding,
        reduction=tf_keras.losses.Reduction.SUM_OVER_BATCH_SIZE)
    return model


def _fit(policy, make_model, dataset, learning_rate, initial=None):
    """Builds a model under `policy`, loads `initial` weights (if given)
    and fits one epoch of plain SGD.

    Returns:
        (model, per-step losses, the weights it started from, its
        trainable variables' values before and after).
    """
    _set_policy(policy)
    model = make_model()
    model.compute_loss(next(iter(dataset)))  # creates every variable
    if initial is not None:
        model.set_weights(initial)
    start = model.get_weights()
    before = [v.numpy() for v in model.trainable_variables]
    model.compile(optimizer=tf_keras.optimizers.SGD(learning_rate))
    step_losses = []
    model.fit(dataset, epochs=1, verbose=0, callbacks=[
        tf_keras.callbacks.LambdaCallback(
            on_train_batch_end=lambda batch, logs: step_losses.append(
                float(logs["loss"])))])
    after = [v.numpy() for v in model.trainable_variables]
    return model, np.array(step_losses), start, before, after


def _check_fit(name, policy, make_model, dataset, learning_rate=0.5):
    """`fit` under float32 and under `policy` from the same weights.

    With SGD the weight change is -learning_rate times the summed
    gradients, so comparing the changes compares the gradients the train
    step applied (unscaled, for float16's LossScaleOptimizer).
    """
    _, want_losses, start, before, want_after = _fit(
        "float32", make_model, dataset, learning_rate)
    model, got_losses, _, got_before, got_after = _fit(
        policy, make_model, dataset, learning_rate, initial=start)
    for b, g in zip(before, got_before):
        np.testing.assert_array_equal(b, g)
    # tf_keras wraps the optimizer for float16 (loss scaling) only.
    scaled = isinstance(model.optimizer,
                        tf_keras.mixed_precision.LossScaleOptimizer)
    assert scaled == (policy == "mixed_float16")
    for variable in model.variables:
        assert variable.dtype in (tf.float32, tf.int64, tf.int32), \
            variable.name
    assert len(got_losses) == len(want_losses) > 1
    assert np.all(np.isfinite(got_losses))
    assert_close(f"{name} step losses", policy, got_losses, want_losses,
                 FIT_TOL)
    assert_close(f"{name} weight changes", policy,
                 np.concatenate([(a - b).ravel()
                                 for a, b in zip(got_after, before)]),
                 np.concatenate([(a - b).ravel()
                                 for a, b in zip(want_after, before)]),
                 FIT_TOL)
    return model


def test_sasrec_fit(policy):
    model = _check_fit("SASRec", policy, _sasrec(), _sequences())
    ids = tf.ragged.constant([[1, 4, 7], [2]], tf.int64)
    assert model(ids).flat_values.dtype == COMPUTE[policy]
    assert model.query_embeddings(ids).dtype == COMPUTE[policy]


def test_history_two_tower_fit(policy):
    model = _check_fit("HistoryTwoTower", policy, _two_tower, _sequences())
    ids = tf.ragged.constant([[1, 4, 7], [2]], tf.int64)
    assert model.query_embeddings(ids).dtype == COMPUTE[policy]


def test_float16_fit_scales_the_loss_against_underflow():
    # A loss 1e-5 times the usual one (as from tiny sample weights or a
    # sum over a huge batch turned into a mean): its float16 gradients at
    # the hidden states are ~1e-5 / T * |p - onehot| |w| < 1e-7, under
    # float16's smallest subnormal (6e-8) or a few ulps above it. Unscaled
    # they flush to zero or keep no significant digit and the encoder
    # would not learn; the LossScaleOptimizer's 2^15 lifts them into
    # float16's normal range, so the update matches float32's.
    def tiny_loss():
        # The task hands a per-position callable the hidden states in the
        # compute dtype and the float32 table variable (tf_keras'
        # Embedding does not autocast its table); the raw op wants one
        # dtype.
        return tasks.NextItemTask(lambda h, w, t: 1e-5 * ops.cut_cross_entropy(
            h, tf.cast(w, h.dtype), t))
    _check_fit("SASRec tiny loss", "mixed_float16", _sasrec(tiny_loss),
               _sequences(), learning_rate=1e4)


def test_history_two_tower_prefix_means_sum_in_float32(policy):
    # ~2,700 packed positions: the running sum over the batch (what each
    # prefix mean subtracts from) grows to ~sqrt(T) times an embedding.
    # Summed in the compute dtype, every partial sum is rounded relative
    # to that total, and the short prefixes' means drown in it (bfloat16:
    # errors of the order of the means themselves).
    rng = np.random.default_rng(19)
    lengths = rng.integers(1, 40, 128)
    ids = tf.RaggedTensor.from_row_lengths(
        rng.integers(0, 40, lengths.sum()), lengths)
    _set_policy("float32")
    reference = models.HistoryTwoTower(40, task=None, dim=16, max_len=40)
    want = reference.prefix_queries(ids)
    _set_policy(policy)
    model = models.HistoryTwoTower(40, task=None, dim=16, max_len=40)
    model.prefix_queries(ids[:1])  # builds
    model.set_weights(reference.get_weights())
    got = model.prefix_queries(ids)
    assert got.dtype == COMPUTE[policy]
    assert_close("HistoryTwoTower.prefix_queries", policy, got, want,
                 LAYER_TOL)
    # And the served query (dense + lengths) is the last prefix's.
    last = tf.gather(got, ids.row_limits() - 1)
    served = model.query_embeddings(ids)
    assert served.dtype == COMPUTE[policy]
    assert_close("HistoryTwoTower.query_embeddings", policy, served, last,
                 LAYER_TOL)
