"""The raw CutCrossEntropy ops (TfrecFastCutCrossEntropy and its gradient).

The CPU kernels must equal a NumPy float64 brute force (the [N, C] logits,
softmax, and the three gradients) on random shapes that stress the blocking
(N = 0, C = 1, D not a whole vector, odd N and C, several item blocks and
row chunks), on large logits and ties, with and without bias, int32 and
int64 targets, and half / bfloat16 inputs; bad inputs fail with errors that
name the argument.
"""

import os
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings, strategies as st

import tfrec_fast  # noqa: F401  (selects tf_keras before anything else)
from tfrec_fast.ops import _library

from cpu_isa_testing import assert_passes_on_every_isa

LIB = _library.DEFAULT_LIBRARY
needs_library = pytest.mark.skipif(
    not os.path.isfile(LIB.library_path),
    reason="op library not built (pip install . builds it)")
TOL = 1e-5


def _ops():
    module = LIB.module()
    if module is None or not hasattr(module, "tfrec_fast_cut_cross_entropy"):
        pytest.skip("op library without TfrecFastCutCrossEntropy")
    return module


def _reference(h, w, b, y, g):
    """float64 loss, lse, dh, dw, db from the full [N, C] logits."""
    h = np.asarray(h, np.float64)
    w = np.asarray(w, np.float64)
    n = h.shape[0]
    s = h @ w.T + (np.asarray(b, np.float64) if b.size else 0.0)
    rows = np.arange(n)
    if s.shape[1]:
        top = s.max(axis=1, keepdims=True)
        lse = top[:, 0] + np.log(np.exp(s - top).sum(axis=1))
    else:
        lse = np.zeros([n])
    loss = lse - s[rows, y]
    ds = np.exp(s - lse[:, None])
    ds[rows, y] -= 1.0
    ds *= np.asarray(g, np.float64)[:, None]
    db = ds.sum(axis=0) if b.size else np.zeros([0])
    return loss, lse, ds @ w, ds.T @ h, db


def _close(name, got, want, tol=TOL):
    got = np.asarray(tf.cast(got, tf.float32))
    assert got.shape == want.shape, (name, got.shape, want.shape)
    # Both sides sum many float32 products in different orders: the error
    # scales with the tensor's largest entry.
    scale = max(1.0, float(np.abs(want).max())) if want.size else 1.0
    np.testing.assert_allclose(got, want, atol=tol * scale, rtol=tol,
                               err_msg=name)


def _case(n, d, c, bias=True, seed=0, scale=0.5, zero_rows=0.0):
    rng = np.random.default_rng(seed)
    h = (scale * rng.standard_normal((n, d))).astype(np.float32)
    w = (scale * rng.standard_normal((c, d))).astype(np.float32)
    b = rng.standard_normal(c if bias else 0).astype(np.float32)
    y = rng.integers(0, max(c, 1), n)
    g = rng.standard_normal(n).astype(np.float32)
    g[rng.random(n) < zero_rows] = 0.0  # masked rows: no gradient
    return h, w, b, y, g


def _run(h, w, b, y, g, tidx=tf.int64, dtype=tf.float32):
    m = _ops()
    h = tf.cast(tf.constant(h), dtype)
    w = tf.cast(tf.constant(w), dtype)
    b = tf.constant(b, tf.float32)
    y = tf.constant(y, tidx)
    loss, lse = m.tfrec_fast_cut_cross_entropy(h, w, b, y)
    dh, dw, db = m.tfrec_fast_cut_cross_entropy_grad(h, w, b, y, lse,
                                                     tf.constant(g))
    assert loss.dtype == lse.dtype == db.dtype == tf.float32
    assert dh.dtype == dw.dtype == dtype
    return loss, lse, dh, dw, db


def _check(case, tidx=tf.int64, tol=TOL):
    got = _run(*case, tidx=tidx)
    want = _reference(*case)
    for name, a, b in zip(("loss", "lse", "dh", "dw", "db"), got, want):
        _close(name, a, b, tol)
    return got


# ------------------------------------------------------------ values, grads

@needs_library
@pytest.mark.parametrize("n, d, c", [
    (1, 1, 1),          # one row, one item
    (5, 16, 1),         # C = 1: loss 0, gradients 0
    (7, 17, 3),         # D not a whole vector, C < one vector
    (13, 64, 256),      # exactly one item block
    (31, 33, 257),      # one item past a block
    (61, 8, 1031),      # several blocks, odd C, D < one vector
    (483, 20, 300),     # two row chunks, a short last tile
    (100, 70, 600),     # D > 64, several blocks over two workers
])
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "no_bias"])
def test_matches_numpy(n, d, c, bias):
    tidx = tf.int32 if (n + c) % 2 else tf.int64
    _check(_case(n, d, c, bias, seed=n * 7 + c, zero_rows=0.2), tidx)


@needs_library
@pytest.mark.parametrize("tidx", [tf.int32, tf.int64])
def test_int32_and_int64_targets(tidx):
    _check(_case(40, 24, 300, seed=3), tidx)


@needs_library
def test_large_logits_and_ties():
    # Integer h and w: the logits (|s| up to 3e4) are exact in float32, so
    # only the softmax is tested, and equal logits (ties) are common.
    rng = np.random.default_rng(1)
    n, d, c = 50, 3, 700
    h = rng.integers(-100, 101, (n, d)).astype(np.float32)
    w = rng.integers(-100, 101, (c, d)).astype(np.float32)
    w[300:310] = w[5]  # exact ties with item 5, across blocks
    b = rng.integers(-5, 6, c).astype(np.float32)
    y = rng.integers(0, c, n)
    y[:10] = 5
    g = rng.standard_normal(n).astype(np.float32)
    # lse is a float32 output of magnitude ~|s|: its rounding (half an ulp,
    # 2^-24 |s|) moves every p = exp(s - lse) of the backward by as much,
    # relatively, so the tolerance grows with the logits.
    top = float(np.abs(h @ w.T + b).max())
    loss = _check((h, w, b, y, g), tol=TOL + 2.0**-23 * top)[0].numpy()
    assert np.isfinite(loss).all() and (loss >= 0).all()


@needs_library
def test_all_logits_equal():
    # w = 0, no bias: every logit is 0, lse = log C, p = 1 / C.
    n, d, c = 9, 5, 1000
    h, _, _, y, g = _case(n, d, c, bias=False, seed=2)
    w = np.zeros((c, d), np.float32)
    loss, lse, dh, dw, _ = _check((h, w, np.zeros(0, np.float32), y, g))
    np.testing.assert_allclose(loss, np.full(n, np.log(c)), rtol=1e-6)
    np.testing.assert_allclose(lse, np.full(n, np.log(c)), rtol=1e-6)
    np.testing.assert_array_equal(dh.numpy(), 0.0)


@needs_library
def test_dominant_target_gives_zero_loss():
    # The target's logit is 1e4 above the rest: loss exactly 0 (the target
    # logit is taken from the same tile as the log-sum-exp terms).
    n, d, c = 6, 16, 500
    h, w, _, _, g = _case(n, d, c, bias=False, seed=4)
    y = np.full(n, 300)
    b = np.zeros(c, np.float32)
    b[300] = 1e4
    loss, lse, dh, dw, db = _run(h, w, b, y, g)
    np.testing.assert_array_equal(loss.numpy(), 0.0)
    # p = one-hot(y) exactly: no gradient anywhere.
    for t in (dh, dw, db):
        np.testing.assert_array_equal(t.numpy(), 0.0)


@needs_library
def test_zero_upstream_gradient_rows():
    h, w, b, y, _ = _case(30, 12, 400, seed=5)
    g = np.zeros(30, np.float32)
    _, lse = _ops().tfrec_fast_cut_cross_entropy(h, w, b, y)
    dh, dw, db = _ops().tfrec_fast_cut_cross_entropy_grad(h, w, b, y, lse, g)
    for t in (dh, dw, db):
        np.testing.assert_array_equal(t.numpy(), 0.0)
    g[[0, 29]] = [1.5, -2.0]  # two live rows at the ends
    _check((h, w, b, y, g))


@needs_library
@pytest.mark.parametrize("dtype, tol", [(tf.float16, 2e-3),
                                        (tf.bfloat16, 1.6e-2)])
def test_half_precision_inputs_are_computed_in_float32(dtype, tol):
    h, w, b, y, g = _case(50, 24, 300, seed=6)
    # The reference sees the values the op sees: the inputs rounded to dtype.
    h = tf.cast(tf.cast(h, dtype), tf.float32).numpy()
    w = tf.cast(tf.cast(w, dtype), tf.float32).numpy()
    got = _run(h, w, b, y, g, dtype=dtype)
    want = _reference(h, w, b, y, g)
    for name, a, ref in zip(("loss", "lse", "dh", "dw", "db"), got, want):
        # loss, lse, db are float32 outputs of a float32 computation.
        _close(name, a, ref, tol if name in ("dh", "dw") else TOL)


@needs_library
def test_no_rows():
    m = _ops()
    for c, bias in ((5, 5), (5, 0), (0, 0)):
        h = tf.zeros([0, 8])
        w = tf.ones([c, 8])
        b = tf.ones([bias])
        y = tf.zeros([0], tf.int64)
        loss, lse = m.tfrec_fast_cut_cross_entropy(h, w, b, y)
        assert loss.shape == lse.shape == (0,)
        dh, dw, db = m.tfrec_fast_cut_cross_entropy_grad(
            h, w, b, y, lse, tf.zeros([0]))
        assert dh.shape == (0, 8) and dw.shape == (c, 8)
        assert db.shape == (bias,)
        np.testing.assert_array_equal(dw.numpy(), 0.0)
        np.testing.assert_array_equal(db.numpy(), 0.0)


@needs_library
def test_nan_inputs_give_nan_not_a_crash():
    h, w, b, y, g = _case(20, 16, 600, seed=7)
    h[3, 2] = np.nan
    loss, lse, dh, dw, db = _run(h, w, b, y, g)
    loss = loss.numpy()
    assert np.isnan(loss[3]) and np.isnan(lse.numpy()[3])
    assert np.isfinite(np.delete(loss, 3)).all()
    assert np.isnan(dw.numpy()).any()  # row 3 is live: NaN reaches dW
    w[400, 0] = np.nan  # a NaN item: every row's lse is NaN
    loss = _run(h, w, b, y, g)[0].numpy()
    assert np.isnan(loss).all()


@needs_library
def test_deterministic():
    case = _case(300, 32, 2000, seed=8)
    first = _run(*case)
    second = _run(*case)
    for a, b in zip(first, second):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


# ------------------------------------------------------------- bad inputs

def _bad(h_shape=(4, 8), w_shape=(10, 8), b_len=10, y=None, tidx=tf.int64,
         lse_shape=None, g_shape=None):
    h = tf.zeros(h_shape)
    w = tf.zeros(w_shape)
    b = tf.zeros([b_len])
    y = tf.constant([0, 1, 2, 3] if y is None else y, tidx)
    if lse_shape is None and g_shape is None:
        return _ops().tfrec_fast_cut_cross_entropy(h, w, b, y)
    return _ops().tfrec_fast_cut_cross_entropy_grad(
        h, w, b, y, tf.zeros(lse_shape or [4]), tf.zeros(g_shape or [4]))


@needs_library
@pytest.mark.parametrize("kwargs, message", [
    (dict(h_shape=(4,)), "hidden must be a matrix"),
    (dict(w_shape=(10, 8, 1)), "item_table must be a matrix"),
    (dict(w_shape=(10, 7)), "must have the same D"),
    (dict(b_len=9), "item_bias must be [C] = [10]"),
    (dict(y=[0, 1, 2]), "targets must be [N] = [4]"),
    (dict(w_shape=(0, 8), b_len=0), "C = 0"),
    (dict(y=[0, 1, 10, 3]), "targets[2] = 10 is out of range [0, 10)"),
    (dict(y=[0, -1, 2, 3], tidx=tf.int32),
     "targets[1] = -1 is out of range [0, 10)"),
    (dict(y=[0, 1, 2, 2**40]),
     f"targets[3] = {2**40} is out of range [0, 10)"),
    (dict(lse_shape=[3]), "logsumexp must be [N] = [4]"),
    (dict(g_shape=[4, 1]), "d_loss must be [N] = [4]"),
    (dict(y=[0, 1, 10, 3], lse_shape=[4]),
     "targets[2] = 10 is out of range [0, 10)"),
])
def test_bad_inputs_name_the_argument(kwargs, message):
    with pytest.raises(tf.errors.InvalidArgumentError) as info:
        _bad(**kwargs)
    assert message in info.value.message


@needs_library
def test_graph_shapes():
    m = _ops()

    @tf.function(input_signature=[tf.TensorSpec([None, None]),
                                  tf.TensorSpec([None, 6]),
                                  tf.TensorSpec([None]),
                                  tf.TensorSpec([None], tf.int32)])
    def run(h, w, b, y):
        loss, lse = m.tfrec_fast_cut_cross_entropy(h, w, b, y)
        grads = m.tfrec_fast_cut_cross_entropy_grad(h, w, b, y, lse, loss)
        assert grads[0].shape.as_list() == [None, 6]
        assert grads[1].shape.as_list() == [None, 6]
        return loss, grads

    h, w, b, y, _ = _case(11, 6, 40, seed=9)
    loss, (dh, dw, db) = run(h, w, b, y.astype(np.int32))
    want = _reference(h, w, b, y, loss.numpy())
    _close("loss", loss, want[0])
    _close("dh", dh, want[2])
    # Static mismatches fail while tracing.
    with pytest.raises(ValueError, match="Dimension"):
        tf.function(lambda: m.tfrec_fast_cut_cross_entropy(
            tf.zeros([4, 8]), tf.zeros([10, 7]), tf.zeros([10]),
            tf.zeros([4], tf.int64))).get_concrete_function()


# ----------------------------------------------------- every code path / ISA

_ISA_SCRIPT = textwrap.dedent("""
    import sys
    sys.path.insert(0, "tests")
    import test_cut_cross_entropy_op as t
    for n, d, c, bias in ((37, 19, 600, True), (500, 64, 300, False)):
        t._check(t._case(n, d, c, bias, seed=n, zero_rows=0.1))
    print("ok")
""")


@needs_library
def test_every_instruction_set_matches_numpy():
    # Each instruction set the vector code is compiled for, as far as this
    # CPU runs it (TFREC_FAST_CPU_ISA caps the run-time pick).
    assert_passes_on_every_isa(_ISA_SCRIPT)


# ------------------------------------------------------------ property test

@needs_library
@settings(max_examples=50, deadline=None, derandomize=True)
@given(st.integers(0, 70), st.integers(1, 40), st.integers(1, 700),
       st.booleans(), st.floats(0.05, 2.0), st.integers(0, 2**31 - 1))
def test_property_matches_numpy(n, d, c, bias, scale, seed):
    _check(_case(n, d, c, bias, seed=seed, scale=scale, zero_rows=0.3),
           tf.int32 if seed % 2 else tf.int64)
