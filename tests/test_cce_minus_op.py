"""The raw CCEMinus ops (TfrecFastCceMinus and TfrecFastCceMinusGrad).

Every mode (given per-row ids [N, K], given shared ids [K], uniform and
unigram draws generated in the kernel) must equal a float64 NumPy brute force
in loss, logsumexp and every gradient. For the generated modes the brute
force draws its ids with a NumPy copy of custom_ops/kernels/counter_rng.h
(Python ints mod 2^64), so matching it pins the kernel's RNG bit for bit.
Edge cases: accidental hits (exactly zero probability and gradient),
repeated ids, every negative equal to the target, K > C, C = 1, N = 0,
K = 0, bias or not, int32 / int64 ids, half / bfloat16 inputs, NaN inputs,
and bad inputs (InvalidArgumentError naming the argument). The generated ids
are also checked for their distribution (a loose chi-square, read from the
op's own bias gradient).
"""

import os
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import tfrec_fast  # noqa: F401  (selects tf_keras before anything else)
from tfrec_fast.ops import _library
from tfrec_fast.samplers.unigram import alias_table

LIB = _library.DEFAULT_LIBRARY
pytestmark = pytest.mark.skipif(
    not os.path.isfile(LIB.library_path),
    reason="op library not built (pip install . builds it)")

ATOL = RTOL = 1e-5


def _module():
    module = LIB.module()
    if module is None or not hasattr(module, "tfrec_fast_cce_minus"):
        pytest.skip("op library without TfrecFastCceMinus")
    return module


# ---------------------------------------------------------------------------
# counter_rng.h in Python ints (mod 2^64).

M64 = (1 << 64) - 1
GOLDEN = 0x9E3779B97F4A7C15
COIN_SALT = 0xD1B54A32D192ED03


def mix64(z):
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & M64
    return z ^ (z >> 31)


def call_key(seed, step):
    return mix64(mix64(seed & M64) ^ (step & M64))


def draw_bits(row_key, j):
    return mix64((row_key + (j + 1) * GOLDEN) & M64)


def column(bits, num_items):
    # The 53 high bits as a double in [0, 1), times C (one rounded multiply,
    # as in C++), truncated.
    c = int(float(bits >> 11) * 2.0 ** -53 * float(num_items))
    return min(c, num_items - 1)


def coin(bits):
    return float(mix64(bits ^ COIN_SALT) >> 40) * 2.0 ** -24  # exact


def rng_ids(key, num_rows, num, num_items, accept=None, alias=None):
    """int64 [N, K] ids the kernel draws for rng_key = (seed, step, offset)."""
    seed, step, row_offset = (int(v) for v in key)
    ck = call_key(seed, step)
    out = np.zeros((num_rows, num), np.int64)
    for t in range(num_rows):
        rk = mix64(ck ^ ((row_offset + t) & M64))
        for j in range(num):
            bits = draw_bits(rk, j)
            c = column(bits, num_items)
            if accept is not None and not coin(bits) < float(accept[c]):
                c = int(alias[c])
            out[t, j] = c
    return out


def test_rng_reference_matches_tf_counter_rng():
    """The NumPy copy equals tfrec_fast.ops.counter_rng (same function)."""
    from tfrec_fast.ops import counter_rng
    key = (123456789, -5, 7)
    ours = rng_ids(key, 3, 20, 1000)
    theirs = counter_rng.uniform_draws(key[0], key[1],
                                       tf.range(3, dtype=tf.int64) + key[2],
                                       20, 1000).numpy()
    np.testing.assert_array_equal(ours, theirs)


# ---------------------------------------------------------------------------
# Brute force (float64).

def brute_force(h, w, b, y, ids, log_kq, remove_hits, g, shared):
    """loss, lse, dh, dw, db; dw / db compact [K + N] rows when shared."""
    h, w = h.astype(np.float64), w.astype(np.float64)
    n, d = h.shape
    c = w.shape[0]
    has_bias = b is not None
    b = np.zeros(c) if b is None else b.astype(np.float64)
    ids2 = np.broadcast_to(ids, (n, ids.shape[-1])) if shared else ids
    log_kq2 = (np.broadcast_to(log_kq, ids2.shape) if shared else log_kq)
    k = ids2.shape[1]
    s_pos = np.einsum("td,td->t", h, w[y]) + b[y]
    s_neg = (np.einsum("td,tkd->tk", h, w[ids2]) + b[ids2] -
             log_kq2.astype(np.float64))
    if remove_hits:
        s_neg = np.where(ids2 == y[:, None], -np.inf, s_neg)
    m = np.maximum(s_pos, s_neg.max(axis=1, initial=-np.inf))
    lse = m + np.log(np.exp(s_pos - m) + np.exp(s_neg - m[:, None]).sum(1))
    loss = lse - s_pos
    g = g.astype(np.float64)
    ds_pos = g * (np.exp(s_pos - lse) - 1.0)
    ds_neg = g[:, None] * np.exp(s_neg - lse[:, None])
    dh = ds_pos[:, None] * w[y] + np.einsum("tk,tkd->td", ds_neg, w[ids2])
    if shared:
        dw = np.concatenate([ds_neg.T @ h, ds_pos[:, None] * h])
        db = np.concatenate([ds_neg.sum(0), ds_pos])
    else:
        dw = np.zeros((c, d))
        db = np.zeros(c)
        np.add.at(dw, y, ds_pos[:, None] * h)
        np.add.at(db, y, ds_pos)
        np.add.at(dw, ids2.reshape(-1),
                  (ds_neg[:, :, None] * h[:, None, :]).reshape(n * k, d))
        np.add.at(db, ids2.reshape(-1), ds_neg.reshape(-1))
    if not has_bias:
        db = np.zeros([0])
    return loss, lse, dh, dw, db, k


def generated_log_kq(ids, num, num_items, log_q_table=None):
    """float32 log(K q) exactly as the kernels compute it."""
    log_k = np.float32(np.log(np.float64(max(num, 1))))
    if log_q_table is None:
        value = np.float32(np.log(np.float64(max(num, 1))) -
                           np.log(np.float64(num_items)))
        return np.full(ids.shape, value, np.float32)
    return (log_k + log_q_table[ids]).astype(np.float32)


# ---------------------------------------------------------------------------
# Running the ops.

EMPTY_F = np.zeros([0], np.float32)
EMPTY_I64 = np.zeros([0], np.int64)


def run_op(h, w, b, y, sampling, ids=None, log_kq=None, num=0, key=(0, 0, 0),
           unigram=None, remove_hits=True, g=None, dtype=tf.float32,
           idx_dtype=tf.int64):
    """(loss, lse, dh, dw, db) as float64 NumPy from the forward and grad."""
    m = _module()
    idx = idx_dtype.as_numpy_dtype
    accept, alias, log_q = unigram if unigram is not None else (
        EMPTY_F, EMPTY_I64, EMPTY_F)
    inputs = [
        tf.cast(tf.constant(h, tf.float32), dtype),
        tf.cast(tf.constant(w, tf.float32), dtype),
        tf.constant(EMPTY_F if b is None else b, tf.float32),
        tf.constant(np.asarray(y).astype(idx)),
        tf.constant((np.zeros([0]) if ids is None else ids).astype(idx)),
        tf.constant(EMPTY_F if log_kq is None else log_kq, tf.float32),
        tf.constant(accept, tf.float32),
        tf.constant(alias, tf.int64),
        tf.constant(log_q, tf.float32),
        tf.constant(np.asarray(key, np.int64)),
    ]
    attrs = dict(sampling=sampling, num_negatives=num,
                 remove_accidental_hits=remove_hits)
    loss, lse = m.tfrec_fast_cce_minus(*inputs, **attrs)
    if g is None:
        g = np.ones(len(y), np.float32)
    dh, dw, db = m.tfrec_fast_cce_minus_grad(
        *inputs, lse, tf.constant(g, tf.float32), **attrs)
    assert loss.dtype == tf.float32 and lse.dtype == tf.float32
    assert dh.dtype == dtype and dw.dtype == dtype and db.dtype == tf.float32
    return tuple(tf.cast(t, tf.float64).numpy()
                 for t in (loss, lse, dh, dw, db))


def assert_close(got, want, atol=ATOL, rtol=RTOL):
    names = ("loss", "lse", "dh", "dw", "db")
    for name, a, e in zip(names, got, want):
        assert a.shape == e.shape, (name, a.shape, e.shape)
        # Float32 sums in another order: the tolerance scales with the
        # tensor's magnitude.
        scale = max(1.0, float(np.abs(e).max())) if e.size else 1.0
        np.testing.assert_allclose(a, e, atol=atol * scale, rtol=rtol,
                                   err_msg=name)


def problem(n, d, c, seed=0, scale=0.5, bias=True):
    rng = np.random.default_rng(seed)
    h = (scale * rng.standard_normal((n, d))).astype(np.float32)
    w = (scale * rng.standard_normal((c, d))).astype(np.float32)
    b = (0.3 * rng.standard_normal(c)).astype(np.float32) if bias else None
    y = rng.integers(0, c, n)
    g = rng.uniform(0.5, 1.5, n).astype(np.float32)
    return rng, h, w, b, y, g


def check_given(h, w, b, y, g, ids, log_q, remove_hits=True, **kw):
    shared = ids.ndim == 1
    log_kq = (log_q + np.float32(np.log(max(ids.shape[-1], 1)))).astype(
        np.float32)
    got = run_op(h, w, b, y, "given", ids=ids, log_kq=log_kq,
                 remove_hits=remove_hits, g=g, **kw)
    want = brute_force(h, w, b, y, ids, log_kq, remove_hits, g, shared)[:5]
    return got, want


# ---------------------------------------------------------------------------
# Given negatives.

@pytest.mark.parametrize("d", [13, 64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("idx_dtype", [tf.int32, tf.int64])
def test_given_per_row_matches_brute_force(d, bias, idx_dtype):
    rng, h, w, b, y, g = problem(37, d, 29, seed=d, bias=bias)
    ids = rng.integers(0, 29, (37, 45))  # repeats (K > C) and hits
    ids[:5, 3] = y[:5]
    ids[7, :] = y[7]  # every negative is the target
    log_q = rng.normal(-3.0, 0.5, ids.shape).astype(np.float32)
    got, want = check_given(h, w, b, y, g, ids, log_q, idx_dtype=idx_dtype)
    assert_close(got, want)
    assert got[0][7] == 0.0  # only hits: loss exactly 0


@pytest.mark.parametrize("d", [13, 64])
@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize("idx_dtype", [tf.int32, tf.int64])
def test_given_shared_matches_brute_force(d, bias, idx_dtype):
    rng, h, w, b, y, g = problem(45, d, 300, seed=d + 1, bias=bias)
    ids = rng.integers(0, 300, 300)  # K = 300: two column blocks
    ids[10] = ids[11] = ids[12]  # repeated draws: one row each
    ids[20] = y[3]  # a hit for row 3 (and any row with the same target)
    log_q = rng.normal(-5.0, 0.5, ids.shape).astype(np.float32)
    got, want = check_given(h, w, b, y, g, ids, log_q, idx_dtype=idx_dtype)
    assert_close(got, want)
    assert got[3].shape == (300 + 45, d)


def test_hits_get_exactly_zero_probability_and_gradient():
    rng, h, w, b, y, g = problem(6, 8, 5, seed=3)
    ids = np.tile(np.arange(5), (6, 1))  # every row draws its target once
    log_q = np.full(ids.shape, np.log(0.2), np.float32)
    loss, _, dh, dw, db = check_given(h, w, b, y, g, ids, log_q)[0]
    keep = ids != y[:, None]
    other = check_given(h, w, b, y, g,
                        ids[keep].reshape(6, 4),
                        log_q[keep].reshape(6, 4) + np.float32(
                            np.log(5 / 4)))[0]
    # Same corrections log(K q) with the hit dropped: identical results.
    for a, e in zip((loss, dh, dw, db), (other[0], other[2], other[3],
                                         other[4])):
        np.testing.assert_allclose(a, e, rtol=1e-6, atol=1e-6)


def test_remove_accidental_hits_false_keeps_hits():
    rng, h, w, b, y, g = problem(20, 16, 7, seed=4)
    ids = rng.integers(0, 7, (20, 9))
    ids[:, 0] = y
    log_q = np.full(ids.shape, np.log(1 / 7), np.float32)
    got, want = check_given(h, w, b, y, g, ids, log_q, remove_hits=False)
    assert_close(got, want)
    shared_ids = np.concatenate([[y[0]], rng.integers(0, 7, 8)])
    got, want = check_given(h, w, b, y, g, shared_ids, log_q[0],
                            remove_hits=False)
    assert_close(got, want)


def test_all_negatives_equal_to_the_positive():
    _, h, w, b, y, g = problem(4, 8, 6, seed=5)
    y = np.full(4, 2)
    for ids in (np.full((4, 5), 2), np.full(5, 2)):
        log_q = np.zeros(ids.shape, np.float32)
        loss, lse, dh, dw, db = check_given(h, w, b, y, g, ids, log_q)[0]
        assert np.all(loss == 0.0)
        assert np.all(dh == 0.0) and np.all(dw == 0.0) and np.all(db == 0.0)


def test_single_item_catalog():
    _, h, w, b, y, g = problem(5, 8, 1, seed=6)
    for sampling, kw in (("given", dict(ids=np.zeros((5, 3), np.int64),
                                        log_kq=np.zeros((5, 3),
                                                        np.float32))),
                         ("uniform", dict(num=4)),
                         ("unigram", dict(num=4, unigram=(
                             np.ones(1, np.float32), np.zeros(1, np.int64),
                             np.zeros(1, np.float32))))):
        loss, lse, dh, dw, db = run_op(h, w, b, y, sampling, g=g, **kw)
        assert np.all(loss == 0.0), sampling
        assert np.all(dh == 0.0) and np.all(dw == 0.0), sampling


def test_zero_negatives_gives_zero_loss():
    _, h, w, b, y, g = problem(5, 8, 9, seed=7)
    for sampling, kw in (("given", dict(ids=np.zeros((5, 0), np.int64),
                                        log_kq=np.zeros((5, 0),
                                                        np.float32))),
                         ("given", dict(ids=np.zeros(0, np.int64),
                                        log_kq=np.zeros(0, np.float32))),
                         ("uniform", dict(num=0))):
        loss, lse, dh, dw, db = run_op(h, w, b, y, sampling, g=g, **kw)
        assert np.all(loss == 0.0), sampling
        s_pos = np.einsum("td,td->t", h, w[y]) + b[y]
        np.testing.assert_allclose(lse, s_pos, rtol=1e-6, atol=1e-6)
        assert np.all(dh == 0.0) and np.all(dw == 0.0), sampling


def test_no_rows():
    _, h, w, b, y, _ = problem(0, 8, 9, seed=8)
    y = np.zeros([0], np.int64)
    g = np.zeros([0], np.float32)
    for sampling, kw, rows in (
            ("given", dict(ids=np.zeros((0, 4), np.int64),
                           log_kq=np.zeros((0, 4), np.float32)), 9),
            ("given", dict(ids=np.array([1, 2, 3]),
                           log_kq=np.zeros(3, np.float32)), 3),
            ("uniform", dict(num=5), 9)):
        loss, lse, dh, dw, db = run_op(h, w, b, y, sampling, g=g, **kw)
        assert loss.shape == (0,) and lse.shape == (0,) and dh.shape == (0, 8)
        assert dw.shape == (rows, 8) and db.shape == (rows,)
        assert np.all(dw == 0.0) and np.all(db == 0.0)


def test_odd_hidden_sizes():
    """D = 0, vector tails (D % 16 != 0) and D > 128, every mode."""
    for d in (0, 1, 17, 130):
        rng, h, w, b, y, g = problem(19, d, 7, seed=30 + d)
        ids = rng.integers(0, 7, (19, 21))
        log_q = rng.normal(-2.0, 0.3, ids.shape).astype(np.float32)
        for neg, lq in ((ids, log_q), (ids[0], log_q[0])):
            assert_close(*check_given(h, w, b, y, g, neg, lq))
        got = run_op(h, w, b, y, "uniform", num=21, key=(1, 2, 3), g=g)
        drawn = rng_ids((1, 2, 3), 19, 21, 7)
        want = brute_force(h, w, b, y, drawn, generated_log_kq(drawn, 21, 7),
                           True, g, False)[:5]
        assert_close(got, want)


# ---------------------------------------------------------------------------
# Generated negatives (pins the RNG bit for bit).

@pytest.mark.parametrize("d", [13, 64])
@pytest.mark.parametrize("bias", [True, False])
def test_uniform_matches_brute_force_on_rng_ids(d, bias):
    n, c, k = 23, 19, 37  # K > C: repeats; K not a multiple of 16
    key = (20240601, 17, 1000)
    rng, h, w, b, y, g = problem(n, d, c, seed=10 + d, bias=bias)
    got = run_op(h, w, b, y, "uniform", num=k, key=key, g=g)
    ids = rng_ids(key, n, k, c)
    log_kq = generated_log_kq(ids, k, c)
    want = brute_force(h, w, b, y, ids, log_kq, True, g, False)[:5]
    assert_close(got, want)
    # Another step draws other negatives (another loss).
    other = run_op(h, w, b, y, "uniform", num=k, key=(20240601, 18, 1000),
                   g=g)
    assert not np.allclose(other[0], got[0])


@pytest.mark.parametrize("idx_dtype", [tf.int32, tf.int64])
def test_unigram_matches_brute_force_on_rng_ids(idx_dtype):
    n, c, k, d = 21, 40, 50, 24
    key = (-3, 123456789012, 5)
    rng, h, w, b, y, g = problem(n, d, c, seed=11)
    probs = rng.uniform(0.1, 2.0, c) ** 3
    probs /= probs.sum()
    accept, alias = alias_table(probs)
    accept = accept.astype(np.float32)
    log_q_table = np.log(probs).astype(np.float32)
    unigram = (accept, alias, log_q_table)
    got = run_op(h, w, b, y, "unigram", num=k, key=key, unigram=unigram,
                 g=g, idx_dtype=idx_dtype)
    ids = rng_ids(key, n, k, c, accept, alias)
    log_kq = generated_log_kq(ids, k, c, log_q_table)
    want = brute_force(h, w, b, y, ids, log_kq, True, g, False)[:5]
    assert_close(got, want)


def _draw_counts(sampling, c, n, k, unigram=None):
    """Counts of the op's own draws, read from its bias gradient.

    With h = 0 every logit is its bias; the bias b = log(K q) (as float32,
    the same rounding as the kernel's correction) makes every corrected
    negative logit exactly 0, so each draw adds the same g p to d_bias.
    """
    h = np.zeros((n, 4), np.float32)
    w = np.zeros((c, 4), np.float32)
    y = np.zeros(n, np.int64)
    log_kq = generated_log_kq(np.arange(c), k, c,
                              None if unigram is None else unigram[2])
    b = log_kq
    loss, lse, _, _, db = run_op(h, w, b, y, sampling, num=k,
                                 key=(99, 1, 0), unigram=unigram,
                                 remove_hits=False)
    p_neg = np.exp(-lse[0])
    assert np.allclose(lse, lse[0])
    # Items 1.. (never a target): count = d_bias / p, float32 sums of up to a
    # few thousand equal terms. Item 0 (every row's target) by difference.
    counts = db[1:] / p_neg
    rounded = np.round(counts)
    np.testing.assert_allclose(counts, rounded, atol=0.25)
    rounded = np.concatenate([[n * k - rounded.sum()], rounded])
    assert rounded[0] >= 0
    return rounded


def _assert_chi_square(counts, expected):
    dof = len(counts) - 1
    stat = float(((counts - expected) ** 2 / expected).sum())
    # Loose: mean dof, standard deviation sqrt(2 dof).
    assert stat < dof + 6.0 * np.sqrt(2.0 * dof), (stat, dof)


def test_uniform_draws_are_uniform():
    c, n, k = 50, 400, 100
    counts = _draw_counts("uniform", c, n, k)
    _assert_chi_square(counts, np.full(c, n * k / c))


def test_unigram_draws_follow_the_alias_distribution():
    c, n, k = 50, 400, 100
    probs = np.arange(1, c + 1, dtype=np.float64) ** 1.5
    probs /= probs.sum()
    accept, alias = alias_table(probs)
    unigram = (accept.astype(np.float32), alias,
               np.log(probs).astype(np.float32))
    counts = _draw_counts("unigram", c, n, k, unigram)
    _assert_chi_square(counts, n * k * probs)


# ---------------------------------------------------------------------------
# Dtypes, NaN, determinism.

@pytest.mark.parametrize("dtype", [tf.float16, tf.bfloat16])
def test_half_and_bfloat16_inputs(dtype):
    rng, h, w, b, y, g = problem(30, 32, 50, seed=12)
    h = tf.cast(tf.cast(h, dtype), tf.float32).numpy()  # representable
    w = tf.cast(tf.cast(w, dtype), tf.float32).numpy()
    ids = rng.integers(0, 50, (30, 20))
    log_q = np.full(ids.shape, np.log(1 / 50), np.float32)
    for neg in (ids, ids[0]):
        got, want = check_given(h, w, b, y, g, neg, log_q[0] if
                                neg.ndim == 1 else log_q, dtype=dtype)
        # Gradients are rounded to the input dtype on output.
        tol = 1e-2 if dtype == tf.float16 else 2e-2
        assert_close(got, want, atol=tol, rtol=tol)
    got = run_op(h, w, b, y, "uniform", num=33, key=(1, 2, 3), g=g,
                 dtype=dtype)
    ids = rng_ids((1, 2, 3), 30, 33, 50)
    want = brute_force(h, w, b, y, ids, generated_log_kq(ids, 33, 50), True,
                       g, False)[:5]
    assert_close(got, want, atol=2e-2, rtol=2e-2)


def test_nan_inputs_give_nan_loss():
    rng, h, w, b, y, g = problem(8, 16, 12, seed=13)
    h[2, 3] = np.nan
    w[y[5], 0] = np.nan  # row 5's positive
    ids = rng.integers(0, 12, (8, 6))
    log_q = np.zeros(ids.shape, np.float32)
    for neg in (ids, ids[0]):
        loss = check_given(h, w, b, y, g, neg, log_q[0] if neg.ndim == 1
                           else log_q)[0][0]
        assert np.isnan(loss[2]) and np.isnan(loss[5])
    loss = run_op(h, w, b, y, "uniform", num=7, key=(1, 1, 1), g=g)[0]
    assert np.isnan(loss[2]) and np.isnan(loss[5])


def test_backward_is_deterministic():
    rng, h, w, b, y, g = problem(300, 32, 60, seed=14)
    first = run_op(h, w, b, y, "uniform", num=64, key=(5, 6, 7), g=g)
    second = run_op(h, w, b, y, "uniform", num=64, key=(5, 6, 7), g=g)
    for a, e in zip(first, second):
        np.testing.assert_array_equal(a, e)
    ids = rng.integers(0, 60, 64)
    log_kq = np.zeros(64, np.float32)
    first = run_op(h, w, b, y, "given", ids=ids, log_kq=log_kq, g=g)
    second = run_op(h, w, b, y, "given", ids=ids, log_kq=log_kq, g=g)
    for a, e in zip(first, second):
        np.testing.assert_array_equal(a, e)


def test_larger_batch_matches_brute_force():
    """Many row tasks, item blocks and shared chunks (parallel paths)."""
    n, d, c, k = 600, 64, 500, 40
    rng, h, w, b, y, g = problem(n, d, c, seed=15)
    key = (7, 8, 9)
    got = run_op(h, w, b, y, "uniform", num=k, key=key, g=g)
    ids = rng_ids(key, n, k, c)
    want = brute_force(h, w, b, y, ids, generated_log_kq(ids, k, c), True,
                       g, False)[:5]
    assert_close(got, want)
    shared = rng.integers(0, c, 70)
    got, want = check_given(h, w, b, y, g, shared,
                            np.full(70, np.log(1 / c), np.float32))
    assert_close(got, want)


# ---------------------------------------------------------------------------
# Bad inputs.

def _raw(h, w, b, y, ids, log_kq, accept=EMPTY_F, alias=EMPTY_I64,
         log_q=EMPTY_F, key=(0, 0, 0), sampling="given", num=0):
    m = _module()
    return m.tfrec_fast_cce_minus(
        tf.constant(h, tf.float32), tf.constant(w, tf.float32),
        tf.constant(b, tf.float32), tf.constant(y, tf.int64),
        tf.constant(ids, tf.int64), tf.constant(log_kq, tf.float32),
        tf.constant(accept, tf.float32), tf.constant(alias, tf.int64),
        tf.constant(log_q, tf.float32), tf.constant(key, tf.int64),
        sampling=sampling, num_negatives=num)


def test_bad_inputs_raise_invalid_argument():
    h = np.zeros((3, 4), np.float32)
    w = np.zeros((5, 4), np.float32)
    b = np.zeros(5, np.float32)
    y = np.array([0, 1, 2])
    ids = np.array([[0, 1], [2, 3], [4, 0]])
    lk = np.zeros((3, 2), np.float32)
    ok = np.ones(5, np.float32), np.arange(5), np.zeros(5, np.float32)
    cases = [
        (dict(y=np.array([0, 5, 1])), r"targets\[1\] = 5 is out of range"),
        (dict(y=np.array([0, -1, 1])), r"targets\[1\] = -1"),
        (dict(ids=np.array([[0, 1], [2, 7], [4, 0]])),
         r"negative_ids\[1, 1\] = 7 is out of range \[0, 5\)"),
        (dict(ids=np.array([0, 9]), log_kq=np.zeros(2, np.float32)),
         r"negative_ids\[1\] = 9"),
        (dict(log_kq=np.zeros((3, 3), np.float32)), "negative_log_kq"),
        (dict(ids=np.zeros((3, 2, 1), np.int64),
              log_kq=np.zeros((3, 2, 1), np.float32)), "negative_ids"),
        (dict(ids=np.zeros((2, 2), np.int64),
              log_kq=np.zeros((2, 2), np.float32)), "negative_ids"),
        (dict(b=np.zeros(4, np.float32)), "item_bias"),
        (dict(w=np.zeros((5, 3), np.float32)), "item_table"),
        (dict(y=np.array([0, 1])), "targets"),
        (dict(key=(0, 0)), "rng_key"),
        (dict(sampling="uniform", num=2), "negative_ids must be empty"),
        (dict(sampling="unigram", num=2, ids=EMPTY_I64, log_kq=EMPTY_F,
              accept=np.ones(4, np.float32), alias=ok[1], log_q=ok[2]),
         "alias_accept"),
        (dict(sampling="unigram", num=2, ids=EMPTY_I64, log_kq=EMPTY_F,
              accept=ok[0], alias=np.array([0, 1, 2, 3, 8]), log_q=ok[2]),
         r"alias_index\[4\] = 8 is out of range"),
        (dict(sampling="unigram", num=2, ids=EMPTY_I64, log_kq=EMPTY_F,
              accept=ok[0], alias=ok[1], log_q=np.zeros(6, np.float32)),
         "log_q_table"),
    ]
    for change, pattern in cases:
        kw = dict(h=h, w=w, b=b, y=y, ids=ids, log_kq=lk)
        kw.update(change)
        with pytest.raises((tf.errors.InvalidArgumentError, ValueError),
                           match=pattern):
            _raw(**kw)
    # The valid call works, and negative K is refused.
    _raw(h, w, b, y, ids, lk)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError),
                       match="num_negatives"):
        _raw(h, w, b, y, EMPTY_I64, EMPTY_F, sampling="uniform", num=-1)


def test_static_shapes_in_a_graph():
    m = _module()

    @tf.function
    def shapes(ids, log_kq, sampling, num):
        h = tf.zeros([6, 8])
        w = tf.zeros([11, 8])
        y = tf.zeros([6], tf.int64)
        inputs = [h, w, tf.zeros([11]), y, ids, log_kq, EMPTY_F, EMPTY_I64,
                  EMPTY_F, tf.zeros([3], tf.int64)]
        attrs = dict(sampling=sampling, num_negatives=num)
        loss, lse = m.tfrec_fast_cce_minus(*inputs, **attrs)
        grads = m.tfrec_fast_cce_minus_grad(*inputs, lse, loss, **attrs)
        return [t.shape.as_list() for t in (loss, lse) + tuple(grads)]

    per_row = shapes(tf.zeros([6, 4], tf.int64), tf.zeros([6, 4]), "given",
                     0)
    shared = shapes(tf.zeros([4], tf.int64), tf.zeros([4]), "given", 0)
    generated = shapes(EMPTY_I64, EMPTY_F, "uniform", 3)
    assert per_row == [[6], [6], [6, 8], [11, 8], [11]]
    assert shared == [[6], [6], [6, 8], [10, 8], [10]]
    assert generated == [[6], [6], [6, 8], [11, 8], [11]]


# ---------------------------------------------------------------------------
# Other instruction sets and thread counts (fresh processes: both are fixed
# when the library is first used).

_CHILD = r"""
import sys
import numpy as np
import tensorflow as tf
tf.config.threading.set_intra_op_parallelism_threads(int(sys.argv[2]))
sys.path.insert(0, sys.argv[3])
import test_cce_minus_op as t
np.savez(sys.argv[1], *[np.asarray(x) for x in t._fixed_results()])
"""


def _fixed_results():
    """Every mode on one fixed problem (for bitwise comparisons)."""
    n, d, c, k = 333, 64, 97, 40
    rng, h, w, b, y, g = problem(n, d, c, seed=21)
    out = []
    out += run_op(h, w, b, y, "uniform", num=k, key=(3, 4, 5), g=g)
    ids = rng.integers(0, c, (n, k))
    log_kq = rng.normal(-2.0, 0.3, (n, k)).astype(np.float32)
    out += run_op(h, w, b, y, "given", ids=ids, log_kq=log_kq, g=g)
    out += run_op(h, w, b, y, "given", ids=ids[0], log_kq=log_kq[0], g=g)
    return out


def _child_results(tmp_path, threads, isa=None):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    if isa is not None:
        env["TFREC_FAST_CPU_ISA"] = isa
    path = str(tmp_path / f"out_{threads}_{isa}.npz")
    subprocess.run([sys.executable, "-c", _CHILD, path, str(threads),
                    os.path.dirname(os.path.abspath(__file__))],
                   env=env, check=True)
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def test_results_do_not_depend_on_the_thread_count(tmp_path):
    ours = _fixed_results()
    one_thread = _child_results(tmp_path, threads=1)
    for a, e in zip(ours, one_thread):
        np.testing.assert_array_equal(a, e)


def test_baseline_instruction_set_matches(tmp_path):
    """TFREC_FAST_CPU_ISA=generic (4-wide vectors, the only code on
    non-x86 builds): the same results up to rounding. (avx2 is checked the
    same way by running this file with TFREC_FAST_CPU_ISA=avx2.)"""
    ours = _fixed_results()
    theirs = _child_results(tmp_path, threads=2, isa="generic")
    for a, e in zip(theirs, ours):
        scale = max(1.0, float(np.abs(e).max())) if e.size else 1.0
        np.testing.assert_allclose(a, e, atol=1e-5 * scale, rtol=1e-5)
