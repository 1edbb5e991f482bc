"""Property tests: every fused op equals its reference on >= 1,000 cases.

Each test draws `EXAMPLES` (>= 1,000) cases with hypothesis (derandomized, so
CI runs the same cases every time) and holds the fused op of the compiled
library to its pure-TF reference (same module, same meaning):

- validate_ids: the same pass / fail, the same output, and the reference's
  message (first bad id, its index and flat position) inside the op's;
- ragged_attention: values and gradients w.r.t. queries, keys and values;
- cut_cross_entropy: values and gradients w.r.t. hidden, item table, bias;
- cce_minus, given negatives (per row / shared) and generated negatives
  (uniform / unigram): values and the three gradients;
- layer_norm: values and gradients w.r.t. x, gamma and beta (rows across
  the op's task boundaries, D = 1, constant rows, large offsets);
- kernel sampler: tree build (refresh), refresh / update after changes
  (tree, snapshot and counts), and the log q of the fused op's draws against
  the brute-force log q of `kernel_log_probabilities` (the draw reference
  samples from it; draws cannot be compared id by id). K >= 1 there: the
  draw op refuses K = 0 (KernelSampler.sample takes a positive K), where
  the reference returns [T, 0].

Shapes are small (CI has 2 cores) and include the edges: N = 0, B = 0,
empty and length-1 sequences, C = 1, K = 0, K > C; values include huge and
tiny logits, exact ties, duplicated ids and rows, accidental hits (every
negative equal to the positive), dominant targets, half-precision inputs.
Arrays are drawn with NumPy from a hypothesis-chosen seed; shapes, regimes
and edge flags are hypothesis choices (so it aims at their boundaries).

Tolerance: 1e-5 relative to each tensor's largest entry (as in the op
tests; half-precision inputs: 2e-3 float16, 1.6e-2 bfloat16 on tensors
returned in that dtype), plus an elementwise float32-rounding bound where
large logits meet cancellation: every probability carries a relative error
of a few ulps of the largest logit before cancellation (2^-21 max
sum_d |h_d w_d|), and a gradient entry's bound is that times the sum of
the absolute terms it adds up (computed in float64 NumPy). So a positive
that is also a negative (d_positive = -d_negative in exact arithmetic),
or a query that sees one key, is held to what float32 can give, and small
logits stay at 1e-5.

Set TFREC_FAST_PROPERTY_EXAMPLES to run more cases (never fewer than 1,000).

Measured runtime (1,000 examples each; eager; a 2-core box shared with
other jobs, load ~2.7; `pytest --durations=0`, two runs):
    test_validate_ids_fused_equals_reference                     3.7 s / 3.4 s
    test_ragged_attention_fused_equals_reference                18.5 s / 19.4 s
    test_cut_cross_entropy_fused_equals_reference               17.7 s / 18.8 s
    test_cce_minus_given_negatives_fused_equals_reference       15.2 s / 16.2 s
    test_cce_minus_generated_negatives_fused_equals_reference   21.6 s / 24.1 s
    test_kernel_sampler_fused_equals_reference                  17.6 s / 18.0 s
    whole file (pytest wall, imports included)                   99 s / 105 s
The same cases pass with TFREC_FAST_CPU_ISA=generic and =avx2 (AVX-512
box), and 2,500-4,000 random (not derandomized) cases per test passed too.
"""

import os

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck
from hypothesis import event
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import tfrec_fast  # noqa: F401  (selects tf_keras before anything else)
from tfrec_fast import ops
from tfrec_fast.ops import _library
from tfrec_fast.ops import counter_rng
from tfrec_fast.ops import kernel_sampler as ks
from tfrec_fast.samplers.unigram import alias_table

LIB = _library.DEFAULT_LIBRARY


def _has_ops(op_functions):
    # The file check first: without a built library, nothing is loaded (and
    # no OpLibraryWarning is raised at collection).
    if not os.path.isfile(LIB.library_path):
        return False
    module = LIB.module()
    return module is not None and all(hasattr(module, name)
                                      for name in op_functions)


def needs(*op_functions):
    return pytest.mark.skipif(
        not _has_ops(op_functions),
        reason=f"op library not loaded or without {', '.join(op_functions)}"
               " (pip install . builds it)")


pytestmark = pytest.mark.skipif(
    not os.path.isfile(LIB.library_path),
    reason="op library not built (pip install . builds it)")

EXAMPLES = max(1000, int(os.environ.get("TFREC_FAST_PROPERTY_EXAMPLES", 0)))
PROPERTY = settings(max_examples=EXAMPLES, deadline=None, derandomize=True,
                    database=None, print_blob=False,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.data_too_large])

TOL = 1e-5
HALF_TOL = {"float16": 2e-3, "bfloat16": 1.6e-2}
SEEDS = st.integers(0, 2**32 - 1)


def _ints(lo, hi, edges=()):
    """Integers in [lo, hi]: the `edges` about 12% of the time, else uniform.

    In composite examples hypothesis draws each integer's simplest value
    (its lower bound) for 20-45% of the cases, which would make most cases
    degenerate (D = 1, N = 0, ...). The draw is rotated so that its simplest
    value lands mid-range, and the edges get a fixed share.
    """
    span = hi - lo + 1

    def pick(i):
        i = (i + 5000) % 10000
        if edges and i < 1200:
            return edges[i % len(edges)]
        return lo + i % span

    return st.integers(0, 9999).map(pick)

# Mostly float32; the fused ops also take half precision (computed in
# float32), the references compute it in float32 too.
FLOAT_DTYPES = st.sampled_from(["float32"] * 6 + ["float16", "bfloat16"])
INDEX_DTYPES = st.sampled_from([tf.int32, tf.int64])

# Value regimes of float inputs.
#   normal: scale * N(0, 1) (scale drawn in [0.05, 3]);
#   tiny: 1e-20 N(0, 1) (every logit ~0: near ties, denormal products);
#   huge: integers in [-100, 100] (exact float32 logits up to ~1e5, a
#         one-hot softmax, exact ties between items);
#   ties: integers in {-1, 0, 1} (many exact ties);
#   zeros: all 0 (every logit equal);
#   outliers: normal with 5% entries of +-300.
REGIMES = ("normal", "tiny", "huge", "ties", "zeros", "outliers")
HALF_SAFE_REGIMES = ("normal", "ties", "zeros")


def _values(rng, shape, regime, scale=1.0):
    if regime == "normal":
        x = scale * rng.standard_normal(shape)
    elif regime == "tiny":
        x = 1e-20 * rng.standard_normal(shape)
    elif regime == "huge":
        x = rng.integers(-100, 101, shape).astype(np.float64)
    elif regime == "ties":
        x = rng.integers(-1, 2, shape).astype(np.float64)
    elif regime == "zeros":
        x = np.zeros(shape)
    else:
        x = scale * rng.standard_normal(shape)
        mask = rng.random(shape) < 0.05
        x[mask] = 300.0 * rng.choice([-1.0, 1.0], size=int(mask.sum()))
    return x.astype(np.float32)


def _regime(draw, dtype):
    return draw(st.sampled_from(HALF_SAFE_REGIMES if dtype != "float32"
                                else REGIMES))


def _cotangent(rng, shape, kind):
    """Upstream gradient: ones, random, or random with zeroed (masked) rows."""
    if kind == "ones":
        return np.ones(shape, np.float32)
    g = rng.uniform(-1.5, 1.5, shape).astype(np.float32)
    if kind == "masked" and g.size:
        g[rng.random(shape[0]) < 0.3] = 0.0
    return g


COTANGENTS = st.sampled_from(["ones", "random", "masked"])


def _value_and_grads(fn, inputs, cotangent):
    """[fn(*inputs), d sum(fn * cotangent) / d inputs...] as tensors."""
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        out = fn(*inputs)
        total = tf.reduce_sum(tf.cast(out, tf.float32) * cotangent)
    grads = tape.gradient(total, inputs,
                          unconnected_gradients=tf.UnconnectedGradients.ZERO)
    return [out] + [tf.convert_to_tensor(g) for g in grads]


def _assert_close(names, got, want, tol, extra=None):
    """got == want up to tol (relative, and absolute times the tensor's
    largest entry; one for all or one per tensor) plus an optional
    elementwise bound per tensor."""
    extra = [None] * len(names) if extra is None else extra
    tols = tol if isinstance(tol, tuple) else (tol,) * len(names)
    for name, a, b, tol, more in zip(names, got, want, tols, extra):
        assert a.dtype == b.dtype, (name, a.dtype, b.dtype)
        assert a.shape == b.shape, (name, a.shape, b.shape)
        a = tf.cast(a, tf.float64).numpy()
        b = tf.cast(b, tf.float64).numpy()
        # Both sides sum float32 products in different orders: the error
        # scales with the tensor's largest entry.
        scale = max(1.0, float(np.max(np.abs(b)))) if b.size else 1.0
        atol = tol * scale + (0.0 if more is None else more)
        bad = ~(np.abs(a - b) <= atol + tol * np.abs(b))
        bad &= ~((a == b) | (np.isnan(a) & np.isnan(b)))  # equal infinities
        assert not bad.any(), (
            f"{name}: {int(bad.sum())} of {b.size} entries differ; fused "
            f"{a[bad][:8]}, reference {b[bad][:8]}, tolerance "
            f"{(np.broadcast_to(atol, b.shape) + tol * np.abs(b))[bad][:8]}"
            f" at {np.argwhere(bad)[:8].tolist()}")


# ---------------------------------------------------------------------------
# validate_ids

def _bad_values(dtype, num_items):
    low = -(2**31) if dtype == tf.int32 else -(2**63)
    high = 2**31 - 1 if dtype == tf.int32 else 2**63 - 1
    values = [-1, low, high, num_items, num_items + 7]
    return [v for v in values if low <= v <= high and not 0 <= v < num_items]


@st.composite
def _id_cases(draw):
    dtype = draw(INDEX_DTYPES)
    rank = draw(_ints(1, 3, edges=(0,)))
    shape = [draw(_ints(0, 6, edges=(0, 1))) for _ in range(rank)]
    num_items = draw(st.one_of(
        _ints(0, 300, edges=(0, 1)),
        st.sampled_from([2**31 - 1, 2**31, 2**40])))
    num_bad = draw(st.sampled_from([0, 0, 1, 2, 5]))
    bad = _bad_values(dtype, num_items)
    bad_values = draw(st.lists(st.sampled_from(bad), min_size=num_bad,
                               max_size=num_bad)) if bad else []
    as_tensor = draw(st.sampled_from([None, tf.int32, tf.int64]))
    if as_tensor == tf.int32 and num_items >= 2**31:
        as_tensor = tf.int64
    arg_name = draw(st.from_regex(r"[A-Za-z_][A-Za-z0-9_]{0,11}",
                                  fullmatch=True))
    ragged = draw(st.booleans())
    return (dtype, shape, num_items, bad_values, as_tensor, arg_name, ragged,
            draw(SEEDS))


def _outcome(fn):
    try:
        return fn(), None
    except tf.errors.InvalidArgumentError as e:
        return None, e.message


@needs("tfrec_fast_validate_ids")
@PROPERTY
@given(_id_cases())
def test_validate_ids_fused_equals_reference(case):
    dtype, shape, num_items, bad_values, as_tensor, arg_name, ragged, seed = (
        case)
    rng = np.random.default_rng(seed)
    np_dtype = dtype.as_numpy_dtype
    ids = rng.integers(0, max(num_items, 1), size=shape,
                       dtype=np.int64).astype(np_dtype)
    flat = ids.reshape(-1)
    if flat.size and bad_values:
        positions = rng.choice(flat.size, size=min(len(bad_values),
                                                   flat.size), replace=False)
        flat[positions] = np.asarray(bad_values[:len(positions)], np_dtype)
    bad = (flat < 0) | (flat >= num_items)
    n_items = (num_items if as_tensor is None
               else tf.constant(num_items, as_tensor))
    tensor = tf.constant(ids, dtype)
    if ragged and ids.ndim >= 1:
        # Ragged ids: flat_values are checked; positions refer to them.
        splits = np.sort(rng.integers(0, flat.size + 1, 3))
        splits = np.concatenate([[0], splits, [flat.size]])
        tensor = tf.RaggedTensor.from_row_splits(tf.constant(flat, dtype),
                                                 splits)
        fused = _outcome(lambda: ops.validate_ids(
            tensor, n_items, arg_name, use_fused=True))
        reference = _outcome(lambda: ops.validate_ids(
            tensor, n_items, arg_name, use_fused=False))
        out_values = lambda x: x.flat_values  # noqa: E731
    else:
        fused = _outcome(lambda: ops.validate_ids(
            tensor, n_items, arg_name, use_fused=True))
        reference = _outcome(lambda: ops.validate_ids_reference(
            tensor, n_items, arg_name))
        out_values = lambda x: x  # noqa: E731
    (got, got_error), (want, want_error) = fused, reference
    event("bad ids" if bad.any() else "valid ids")
    if not flat.size:
        event("no ids")
    assert (got_error is None) == (want_error is None) == (not bad.any()), (
        got_error, want_error)
    if want_error is None:
        assert isinstance(got, type(want))
        assert got.dtype == want.dtype == dtype
        np.testing.assert_array_equal(out_values(got).numpy(),
                                      out_values(want).numpy())
        if ragged and ids.ndim >= 1:
            np.testing.assert_array_equal(got.row_splits.numpy(),
                                          want.row_splits.numpy())
        return
    first = int(np.flatnonzero(bad)[0])
    assert f"flat position {first} of {arg_name}" in want_error
    assert f"= {int(flat[first])} is out of range [0, {num_items})" in (
        want_error)
    # The op's message (behind TF's "{{function_node ...}}" prefix and
    # before its "[Op:...]" suffix) says exactly what the reference says.
    assert want_error in got_error, (got_error, want_error)


# ---------------------------------------------------------------------------
# ragged_attention

@st.composite
def _attention_cases(draw):
    rows = draw(_ints(0, 8, edges=(1,)))
    lengths = [draw(_ints(0, 30, edges=(0, 1))) for _ in range(rows)]
    heads = draw(_ints(1, 4))
    head_dim = draw(_ints(1, 16, edges=(1,)))
    value_dim = draw(_ints(1, 16, edges=(1,)))
    causal = draw(st.booleans())
    scale = draw(st.one_of(st.none(), st.just(0.0),
                           st.floats(-2.0, 2.0, width=32)))
    dtype = draw(FLOAT_DTYPES)
    score_regime = _regime(draw, dtype)
    value_regime = _regime(draw, dtype)
    magnitude = draw(st.floats(0.05, 3.0))
    splits_dtype = draw(INDEX_DTYPES)
    cotangent = draw(COTANGENTS)
    return (lengths, heads, head_dim, value_dim, causal, scale, dtype,
            score_regime, value_regime, magnitude, splits_dtype, cotangent,
            draw(SEEDS))


def _attention_bounds(q, k, v, w, splits, causal, scale, dtype):
    """Elementwise float32-rounding bounds on [out, dq, dk, dv].

    Per sequence and head, in float64: P = softmax(scale Q K^T) over the
    keys each query sees. Each p_ij carries a relative error eta_i of a few
    ulps of the largest score |scale| |q_i| . |k_j| (before cancellation);
    dS_ij = p_ij (w_i . v_j - w_i . out_i) also carries the rounding of
    those two dot products, relative to |w_i| . |v| (their difference
    cancels exactly for a query that sees one key, in exact arithmetic
    only). Half inputs: the fused backward takes w_i . out_i from the
    output rounded to the input dtype (one ulp of each entry), the
    reference from its float32 output. Each output's bound sums the
    absolute terms it adds up.
    """
    q, k, v, w = (x.astype(np.float64) for x in (q, k, v, w))
    bounds = [np.zeros(x.shape) for x in (v, q, k, v)]
    dot_eps = v.shape[-1] * 2.0**-23
    out_eps = {"float16": 2.0**-10, "bfloat16": 2.0**-7}.get(dtype, 0.0)
    for start, end in zip(splits[:-1], splits[1:]):
        if end == start:
            continue
        rows = slice(start, end)
        qs, ks_, vs, ws = q[rows], k[rows], v[rows], w[rows]
        sizes = abs(scale) * np.einsum("ihd,jhd->hij", np.abs(qs),
                                       np.abs(ks_))
        scores = scale * np.einsum("ihd,jhd->hij", qs, ks_)
        length = end - start
        mask = (np.tril(np.ones((length, length), bool)) if causal
                else np.ones((length, length), bool))
        scores = np.where(mask, scores, -np.inf)
        p = np.exp(scores - scores.max(axis=2, keepdims=True))
        p /= p.sum(axis=2, keepdims=True)  # [H, L, L]
        eta = 2.0**-21 * (np.where(mask, sizes, 0.0).max(axis=2) +
                          np.log(length))  # [H, L]
        vabs, wabs = np.abs(vs), np.abs(ws)
        d_p = np.einsum("ihd,jhd->hij", ws, vs)
        d_p_abs = np.einsum("ihd,jhd->hij", wabs, vabs)
        delta = (p * d_p).sum(axis=2, keepdims=True)
        delta_abs = (p * d_p_abs).sum(axis=2, keepdims=True)
        d_s = p * (eta[:, :, None] * (np.abs(d_p - delta) + delta_abs) +
                   dot_eps * (d_p_abs + delta_abs) + out_eps * delta_abs)
        pe = p * eta[:, :, None]
        bounds[0][rows] = np.einsum("hij,jhd->ihd", pe, vabs)
        bounds[1][rows] = abs(scale) * np.einsum("hij,jhd->ihd", d_s,
                                                 np.abs(ks_))
        bounds[2][rows] = abs(scale) * np.einsum("hij,ihd->jhd", d_s,
                                                 np.abs(qs))
        bounds[3][rows] = np.einsum("hij,ihd->jhd", pe, wabs)
    return bounds


@needs("tfrec_fast_ragged_attention", "tfrec_fast_ragged_attention_grad")
@PROPERTY
@given(_attention_cases())
def test_ragged_attention_fused_equals_reference(case):
    (lengths, heads, head_dim, value_dim, causal, scale, dtype, score_regime,
     value_regime, magnitude, splits_dtype, cotangent, seed) = case
    rng = np.random.default_rng(seed)
    splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = int(splits[-1])
    event(f"{dtype}, {score_regime} scores")
    event("causal" if causal else "bidirectional")
    if not tokens:
        event("no tokens")
    if 0 in lengths and tokens:
        event("an empty row among others")
    if 1 in lengths:
        event("a length-1 row")
    q = _values(rng, (tokens, heads, head_dim), score_regime, magnitude)
    k = _values(rng, (tokens, heads, head_dim), score_regime, magnitude)
    v = _values(rng, (tokens, heads, value_dim), value_regime)
    if tokens > 1 and rng.random() < 0.2:
        k[rng.integers(tokens)] = k[0]  # duplicated keys: tied scores
    w = _cotangent(rng, (tokens, heads, value_dim), cotangent)
    tf_dtype = tf.as_dtype(dtype)
    inputs = [tf.cast(tf.constant(x), tf_dtype) for x in (q, k, v)]
    row_splits = tf.constant(splits, splits_dtype)
    w = tf.constant(w)

    def run(use_fused):
        return _value_and_grads(
            lambda q, k, v: ops.ragged_attention(
                q, k, v, row_splits, causal=causal, scale=scale,
                use_fused=use_fused), inputs, w)

    effective_scale = 1.0 / np.sqrt(head_dim) if scale is None else scale
    # Bounds from the (half-rounded) inputs both sides see.
    bounds = _attention_bounds(
        *(tf.cast(x, tf.float64).numpy() for x in inputs), w.numpy(), splits,
        causal, float(np.float32(effective_scale)), dtype)
    _assert_close(("out", "d_queries", "d_keys", "d_values"), run(True),
                  run(False), HALF_TOL.get(dtype, TOL), bounds)


# ---------------------------------------------------------------------------
# layer_norm

@st.composite
def _layer_norm_cases(draw):
    rows = draw(_ints(0, 700, edges=(0, 1, 255, 256, 257, 513)))
    dim = draw(_ints(1, 80, edges=(1, 2, 15, 16, 17, 64)))
    epsilon = draw(st.sampled_from([1e-6, 1e-6, 1e-5, 1e-3, 1.0]))
    offset = draw(st.sampled_from([0.0, 0.0, 3.0, -50.0]))
    regime = draw(st.sampled_from(["normal", "normal", "ties", "zeros",
                                   "constant rows"]))
    magnitude = draw(st.floats(0.05, 3.0))
    return (rows, dim, epsilon, offset, regime, magnitude,
            draw(COTANGENTS), draw(SEEDS))


@needs("tfrec_fast_layer_norm", "tfrec_fast_layer_norm_grad")
@PROPERTY
@given(_layer_norm_cases())
def test_layer_norm_fused_equals_reference(case):
    rows, dim, epsilon, offset, regime, magnitude, cotangent, seed = case
    rng = np.random.default_rng(seed)
    event(f"{regime} rows")
    if regime == "constant rows":  # variance 0: rstd = 1 / sqrt(epsilon)
        x = np.repeat(rng.standard_normal((rows, 1)), dim, axis=1)
    else:
        x = _values(rng, (rows, dim), regime, magnitude).astype(np.float64)
    x = (x + offset).astype(np.float32)
    gamma = rng.standard_normal(dim).astype(np.float32)
    beta = rng.standard_normal(dim).astype(np.float32)
    w = tf.constant(_cotangent(rng, (rows, dim), cotangent))
    inputs = [tf.constant(v) for v in (x, gamma, beta)]

    def run(use_fused):
        return _value_and_grads(
            lambda x, g, b: ops.layer_norm(x, g, b, epsilon,
                                           use_fused=use_fused), inputs, w)

    # Both sides sum each row in float32 in different orders: the centred
    # values carry ~D ulps of the row's largest |x|, amplified by rstd.
    x64 = x.astype(np.float64)
    spread = np.abs(x64).max(axis=1, keepdims=True) if rows else 0.0
    rstd = 1.0 / np.sqrt(x64.var(axis=1, keepdims=True) + epsilon)
    slack = dim * 2.0**-23 * spread * rstd if rows else 0.0
    w64 = np.abs(w.numpy().astype(np.float64))
    bounds = [slack * np.abs(gamma),
              slack * rstd * np.abs(gamma) * (w64 + w64.mean(
                  axis=1, keepdims=True) if rows else 0.0),
              (slack * w64).sum(axis=0) if rows else 0.0,
              None]
    _assert_close(("y", "d_x", "d_gamma", "d_beta"), run(True), run(False),
                  TOL, bounds)


# ---------------------------------------------------------------------------
# cut_cross_entropy and cce_minus: shared problem generator

@st.composite
def _logit_problems(draw):
    n = draw(_ints(0, 40, edges=(0, 1)))
    c = draw(_ints(1, 300, edges=(1, 2)))
    d = draw(_ints(1, 16, edges=(1,)))
    dtype = draw(FLOAT_DTYPES)
    regime = _regime(draw, dtype)
    return dict(
        n=n, c=c, d=d, dtype=dtype, regime=regime,
        scale=draw(st.floats(0.05, 3.0)),
        bias=draw(st.sampled_from([None, "normal", "dominant", "huge"])),
        targets=draw(st.sampled_from(["random", "same", "edges"])),
        duplicate_items=draw(st.booleans()),
        target_dtype=draw(INDEX_DTYPES),
        cotangent=draw(COTANGENTS),
        seed=draw(SEEDS))


def _make_problem(p):
    """rng and NumPy h, w, b (or None), y, g of a drawn problem."""
    rng = np.random.default_rng(p["seed"])
    n, c, d = p["n"], p["c"], p["d"]
    event(f"{p['dtype']}, {p['regime']} values")
    if n == 0:
        event("N = 0")
    if c == 1:
        event("C = 1")
    h = _values(rng, (n, d), p["regime"], p["scale"])
    w = _values(rng, (c, d), p["regime"], p["scale"])
    if p["duplicate_items"] and c > 1:
        # Items with the same embedding (tied logits, across item blocks).
        rows = rng.integers(0, c, size=max(1, c // 4))
        w[rows] = w[rng.integers(c)]
    if p["targets"] == "same":
        y = np.full(n, rng.integers(c))
    elif p["targets"] == "edges":
        y = rng.choice([0, c - 1], size=n)
    else:
        y = rng.integers(0, c, n)
    b = None
    if p["bias"] is not None:
        b = rng.standard_normal(c).astype(np.float32)
        if p["bias"] == "huge":
            b = rng.integers(-1000, 1001, c).astype(np.float32)
        elif p["bias"] == "dominant" and n:
            b[y[0]] = 1e4  # a target far above the rest: loss exactly 0
    g = _cotangent(rng, (n,), p["cotangent"])
    return rng, h, w, b, y, g


def _to_tensors(p, h, w, b, y, g):
    dtype = tf.as_dtype(p["dtype"])
    h = tf.cast(tf.constant(h), dtype)
    w = tf.cast(tf.constant(w), dtype)
    b = None if b is None else tf.constant(b)
    y = tf.constant(y, p["target_dtype"])
    return h, w, b, y, tf.constant(g)


def _as_float64(x):
    return None if x is None else tf.cast(x, tf.float64).numpy()


def _rounding_bounds(h, w, b, g, ids, logits):
    """Elementwise float32-rounding bounds on [loss, dh, dW, (db)].

    Both sides compute the logits s_tj (in their own summation orders) and
    a float32 log-sum-exp: each probability p_tj = exp(s_tj - lse_t) carries
    a relative error of a few ulps of the largest logit (taken before any
    cancellation: sum_d |h_td w_jd| + |b_j| + |correction|) on each side; a
    gradient entry's error is that times the sum of |p g h| (or |p g w|) it
    adds up. Cancellation (e.g. a target that is also a negative, where
    d_positive ~ -d_negative) does not shrink the rounding.

    Args:
        h, w, g: float64 NumPy [N, D], [C, D], [N]; b: the bias or None.
        ids: int [N, J] the candidate items of each row, or None for every
            item (J = C).
        logits: (values, sizes) float64 [N, J]: the logits (-inf: excluded
            candidates) and their sizes before cancellation.
    """
    values, sizes = logits
    n = values.shape[0]
    c, d = w.shape
    finite = np.isfinite(values)
    top = np.max(np.where(finite, values, -np.inf), axis=1, initial=-np.inf)
    shift = np.where(np.isfinite(top), top, 0.0)[:, None]
    p = np.exp(np.where(finite, values - shift, -np.inf))
    p /= np.maximum(p.sum(axis=1, keepdims=True), 1e-300)
    live = np.where(finite, sizes, 0.0)
    size = (float(live.max()) + np.log(values.shape[1])) if live.size else 0.0
    eta = 2.0**-21 * size
    coefficient = np.abs(g)[:, None] * p  # [N, J]
    habs, wabs = np.abs(h), np.abs(w)
    if ids is None:
        dh = coefficient @ wabs
        dw = coefficient.T @ habs
        db = coefficient.sum(axis=0)
    else:
        dh = np.einsum("tj,tjd->td", coefficient, wabs[ids])
        dw = np.zeros((c, d))
        np.add.at(dw, ids.reshape(-1), (coefficient[:, :, None] *
                                        habs[:, None, :]).reshape(-1, d))
        db = np.zeros(c)
        np.add.at(db, ids.reshape(-1), coefficient.reshape(-1))
    bounds = [np.full(n, eta), eta * dh, eta * dw]
    return bounds + ([eta * db] if b is not None else [])


def _full_catalog_logits(h, w, b):
    """float64 [N, C] logits and their sizes before cancellation."""
    bias = np.zeros(w.shape[0]) if b is None else b
    return h @ w.T + bias, np.abs(h) @ np.abs(w).T + np.abs(bias)


def _loss_and_grads(fn, h, w, b, g):
    inputs = [h, w] + ([b] if b is not None else [])
    if b is None:
        return _value_and_grads(lambda h, w: fn(h, w, None), inputs, g)
    return _value_and_grads(fn, inputs, g)


LOSS_NAMES = ("loss", "d_hidden", "d_item_table", "d_item_bias")


def _loss_tols(dtype):
    # Half inputs: dh, dW come back rounded to the input dtype; the loss and
    # d_bias are float32 results of float32 arithmetic on both sides.
    half = HALF_TOL.get(dtype, TOL)
    return (TOL, half, half, TOL)


# ---------------------------------------------------------------------------
# cut_cross_entropy

@needs("tfrec_fast_cut_cross_entropy", "tfrec_fast_cut_cross_entropy_grad")
@PROPERTY
@given(_logit_problems(), st.sampled_from([2048, 2048, 64, 7]))
def test_cut_cross_entropy_fused_equals_reference(problem, chunk_size):
    _, *arrays = _make_problem(problem)
    h, w, b, y, g = _to_tensors(problem, *arrays)
    got = _loss_and_grads(lambda h, w, b: ops.cut_cross_entropy(
        h, w, y, b, use_fused=True), h, w, b, g)
    # The reference at several chunk sizes (its online log-sum-exp over
    # several item chunks is part of what it means).
    want = _loss_and_grads(lambda h, w, b: ops.cut_cross_entropy_reference(
        h, w, y, b, chunk_size=chunk_size), h, w, b, g)
    h64, w64, b64 = (_as_float64(x) for x in (h, w, b))
    bounds = _rounding_bounds(h64, w64, b, g.numpy(), None,
                              _full_catalog_logits(h64, w64, b64))
    _assert_close(LOSS_NAMES, got, want, _loss_tols(problem["dtype"]), bounds)


# ---------------------------------------------------------------------------
# cce_minus

@st.composite
def _given_negatives(draw):
    return dict(
        shared=draw(st.booleans()),
        k=draw(_ints(0, 20, edges=(0, 1))),
        ids=draw(st.sampled_from(["random", "hits", "all_hits", "repeats",
                                  "edges"])),
        log_q=draw(st.sampled_from(["uniform", "noisy", "wide", "extreme",
                                    "equal"])),
        ids_dtype=draw(INDEX_DTYPES),
        remove_hits=draw(st.booleans()))


def _make_given(rng, spec, n, c, y):
    k = spec["k"]
    shape = [k] if spec["shared"] else [n, k]
    ids = rng.integers(0, c, shape)
    if ids.size:
        if spec["ids"] == "hits" and n:
            # Accidental hits: negatives equal to (some) rows' targets.
            mask = rng.random(shape) < 0.3
            hit = (np.broadcast_to(y[0], shape) if spec["shared"]
                   else np.broadcast_to(y[:, None], shape))
            ids = np.where(mask, hit, ids)
        elif spec["ids"] == "all_hits" and n:
            # Every negative is the positive (shared: row 0's target, which
            # is every row's under targets="same").
            ids = (np.full(shape, y[0]) if spec["shared"]
                   else np.broadcast_to(y[:, None], shape).copy())
        elif spec["ids"] == "repeats":
            ids = np.full(shape, rng.integers(c))
        elif spec["ids"] == "edges":
            ids = rng.choice([0, c - 1], size=shape)
    if spec["log_q"] == "uniform":
        log_q = np.full(shape, -np.log(c))
    elif spec["log_q"] == "noisy":
        log_q = -np.log(c) + 0.3 * rng.standard_normal(shape)
    elif spec["log_q"] == "wide":
        log_q = -3.0 + 3.0 * rng.standard_normal(shape)
    elif spec["log_q"] == "extreme":
        log_q = rng.choice([-40.0, -1e-6, 0.0, 20.0], size=shape)
    else:
        log_q = np.full(shape, -1.5)
    return ops.GivenNegatives(tf.constant(ids, spec["ids_dtype"]),
                              tf.constant(log_q, tf.float32))


def _sampled_candidates(y, negatives, num_rows, num_items, remove_hits):
    """ids [N, 1 + K] (the target, then the negatives), log(K q) [N, K] and
    the removed hits [N, K] (generated ids: the reference's own draws)."""
    if isinstance(negatives, ops.GivenNegatives):
        ids = negatives.ids.numpy().astype(np.int64)
        num = ids.shape[-1]
        ids = np.broadcast_to(ids, (num_rows, num))
        log_kq = np.broadcast_to(negatives.log_q.numpy().astype(np.float64),
                                 ids.shape) + np.log(max(num, 1))
    else:
        num = negatives.num
        rows = tf.range(num_rows, dtype=tf.int64) + tf.cast(
            negatives.row_offset, tf.int64)
        seed, step = negatives.seed, negatives.step
        if negatives.unigram is None:
            ids = counter_rng.uniform_draws(seed, step, rows, num,
                                            num_items).numpy()
            log_kq = np.full(ids.shape, np.log(max(num, 1) / num_items))
        else:
            accept, alias, log_q_table = negatives.unigram
            ids = counter_rng.unigram_draws(seed, step, rows, num, accept,
                                            alias).numpy()
            log_kq = (log_q_table.numpy().astype(np.float64)[ids] +
                      np.log(max(num, 1)))
        ids = ids.astype(np.int64).reshape(num_rows, num)
        log_kq = log_kq.reshape(num_rows, num)
    hits = (ids == y[:, None]) if remove_hits else np.zeros(ids.shape, bool)
    return np.concatenate([y[:, None], ids], axis=1), log_kq, hits


def _sampled_logits(h, w, b, ids, log_kq, hits):
    """float64 [N, 1 + K] logits (positive, corrected negatives) and sizes."""
    bias = np.zeros(w.shape[0]) if b is None else b
    rows = w[ids]  # [N, 1 + K, D]
    values = np.einsum("td,tjd->tj", h, rows) + bias[ids]
    sizes = np.einsum("td,tjd->tj", np.abs(h), np.abs(rows)) + np.abs(
        bias[ids])
    values[:, 1:] -= log_kq
    sizes[:, 1:] += np.abs(log_kq)
    values[:, 1:][hits] = -np.inf
    return values, sizes


def _check_cce_minus(problem, arrays, negatives, remove_hits, chunk_size):
    h, w, b, y, g = _to_tensors(problem, *arrays)
    got = _loss_and_grads(lambda h, w, b: ops.cce_minus(
        h, w, y, negatives, b, remove_accidental_hits=remove_hits,
        use_fused=True), h, w, b, g)
    want = _loss_and_grads(lambda h, w, b: ops.cce_minus_reference(
        h, w, y, negatives, b, remove_accidental_hits=remove_hits,
        chunk_size=chunk_size), h, w, b, g)
    h64, w64, b64 = (_as_float64(x) for x in (h, w, b))
    ids, log_kq, hits = _sampled_candidates(
        y.numpy().astype(np.int64), negatives, problem["n"], problem["c"],
        remove_hits)
    bounds = _rounding_bounds(h64, w64, b, g.numpy(), ids, _sampled_logits(
        h64, w64, b64, ids, log_kq, hits))
    num = ids.shape[1] - 1
    event(f"K = {min(num, 2)}{'+' if num >= 2 else ''}")
    if num > problem["c"]:
        event("K > C")
    if problem["n"] and num and hits.all():
        event("every negative is a removed hit")
    _assert_close(LOSS_NAMES, got, want, _loss_tols(problem["dtype"]), bounds)


@needs("tfrec_fast_cce_minus", "tfrec_fast_cce_minus_grad")
@PROPERTY
@given(_logit_problems(), _given_negatives(), st.sampled_from([32, 32, 3]))
def test_cce_minus_given_negatives_fused_equals_reference(problem, spec,
                                                          chunk_size):
    rng, *arrays = _make_problem(problem)
    negatives = _make_given(rng, spec, problem["n"], problem["c"], arrays[3])
    event("shared" if spec["shared"] else "per row")
    _check_cce_minus(problem, arrays, negatives, spec["remove_hits"],
                     chunk_size)


@st.composite
def _generated_negatives(draw):
    int64 = st.integers(-(2**63), 2**63 - 1)
    return dict(
        k=draw(_ints(0, 20, edges=(0, 1))),
        key=(draw(st.one_of(st.integers(0, 10), int64)), draw(int64),
             draw(st.one_of(st.integers(0, 10), int64))),
        key_dtype=draw(st.sampled_from([None, tf.int64])),
        unigram=draw(st.sampled_from([None, "mild", "skewed", "dominant"])),
        remove_hits=draw(st.booleans()))


def _make_generated(rng, spec, c):
    tables = None
    if spec["unigram"] is not None:
        if spec["unigram"] == "mild":
            probs = rng.uniform(0.5, 1.5, c)
        elif spec["unigram"] == "skewed":
            probs = rng.uniform(0.01, 1.0, c) ** 4
        else:
            probs = np.full(c, 1e-3)
            probs[rng.integers(c)] = 1e3
        probs = probs / probs.sum()
        accept, alias = alias_table(probs)
        tables = (tf.constant(accept, tf.float32), tf.constant(alias),
                  tf.constant(np.log(probs), tf.float32))
    key = spec["key"]
    if spec["key_dtype"] is not None:
        key = tuple(tf.constant(x, spec["key_dtype"]) for x in key)
    return ops.generated_negatives(spec["k"], *key, unigram=tables)


@needs("tfrec_fast_cce_minus", "tfrec_fast_cce_minus_grad")
@PROPERTY
@given(_logit_problems(), _generated_negatives(),
       st.sampled_from([32, 32, 3]))
def test_cce_minus_generated_negatives_fused_equals_reference(
        problem, spec, chunk_size):
    rng, *arrays = _make_problem(problem)
    negatives = _make_generated(rng, spec, problem["c"])
    event("uniform" if spec["unigram"] is None else "unigram")
    _check_cce_minus(problem, arrays, negatives, spec["remove_hits"],
                     chunk_size)


# ---------------------------------------------------------------------------
# kernel sampler: tree build / refresh / update and draws

@st.composite
def _kernel_cases(draw):
    return dict(
        c=draw(_ints(1, 300, edges=(1, 2))),
        d=draw(_ints(1, 16, edges=(1,))),
        leaf_size=draw(_ints(1, 40, edges=(1, 2))),
        alpha=draw(st.one_of(st.sampled_from([1e-3, 1.0, 1e3]),
                             st.floats(1e-3, 1e3))),
        t=draw(_ints(0, 20, edges=(0, 1))),
        # K >= 1: the draw op refuses K = 0 (KernelSampler.sample takes a
        # positive K), where the reference returns [T, 0].
        k=draw(_ints(1, 20, edges=(1,))),
        table=draw(st.sampled_from(["normal", "zeros", "ties", "huge",
                                    "duplicates", "zero_rows"])),
        # (sampled_from draws its first and last entries most often)
        query=draw(st.sampled_from(["normal", "zeros", "nan", "large",
                                    "orthogonal", "normal"])),
        change=draw(st.sampled_from(["noise", "zero", "none", "swap",
                                     "huge", "noise"])),
        changed_rows=draw(_ints(0, 300, edges=(0, 1))),
        how=draw(st.sampled_from(["refresh", "update"])),
        max_changed=draw(_ints(-1, 300, edges=(-1, 0))),
        key=(draw(st.integers(-(2**31), 2**31 - 1)),
             draw(st.integers(-(2**31), 2**31 - 1))),
        seed=draw(SEEDS))


def _kernel_table(rng, kind, c, d):
    if kind == "normal":
        return (0.5 * rng.standard_normal((c, d))).astype(np.float32)
    if kind == "zeros":
        return np.zeros((c, d), np.float32)
    if kind == "ties":
        return rng.integers(-1, 2, (c, d)).astype(np.float32)
    if kind == "huge":
        return rng.integers(-100, 101, (c, d)).astype(np.float32)
    table = (0.5 * rng.standard_normal((c, d))).astype(np.float32)
    rows = rng.random(c) < 0.3
    table[rows] = 0.0 if kind == "zero_rows" else table[0]
    return table


def _kernel_query(rng, kind, t, d, table):
    if kind == "zeros":
        return np.zeros((t, d), np.float32)  # q uniform
    if kind == "large":
        return (30.0 * rng.standard_normal((t, d))).astype(np.float32)
    query = rng.standard_normal((t, d)).astype(np.float32)
    if kind == "orthogonal" and d > 1:
        # Orthogonal to the first item: its kernel value is ~1.
        first = table[0].astype(np.float64)
        if first @ first > 0:
            query = (query - np.outer(query @ first, first) /
                     (first @ first)).astype(np.float32)
    if kind == "nan" and t:
        query[rng.integers(t), rng.integers(d)] = np.nan
    return query


def _kernel_change(rng, kind, table, num_rows):
    table = table.copy()
    c = table.shape[0]
    rows = rng.choice(c, size=min(num_rows, c), replace=False)
    if kind == "noise":
        table[rows] += (0.3 * rng.standard_normal(
            (len(rows), table.shape[1]))).astype(np.float32)
    elif kind == "zero":
        table[rows] = 0.0
    elif kind == "swap":
        table[rows] = table[rows[::-1]]
    elif kind == "huge":
        table[rows] = rng.integers(-100, 101, (len(rows), table.shape[1]))
    return table, rows


def _tree_state(layout):
    with tf.device("/CPU:0"):
        return (tf.Variable(tf.zeros([layout.num_rows, layout.stride])),
                tf.Variable(tf.zeros([layout.num_items, layout.dim])))


def _assert_same_trees(fused, reference):
    (tree_f, snap_f), (tree_r, snap_r) = fused, reference
    want = tree_r.numpy()
    # Float32 sums of the children in the same order; leaves are float64
    # sums rounded once (the order may differ: rounding only).
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(tree_f.numpy(), want, rtol=0,
                               atol=2e-6 * scale, err_msg="tree")
    np.testing.assert_array_equal(snap_f.numpy(), snap_r.numpy())


def _assert_draws_exact(case, query, layout, tree, table, key):
    t, k, alpha = case["t"], case["k"], case["alpha"]
    counts = tf.constant(ks.tree_counts(layout))
    draw = lambda fused: ks.kernel_sampler_draw(  # noqa: E731
        query, tree, counts, table, key, k, alpha, layout, use_fused=fused)
    if np.isnan(query).any():
        # Both paths refuse a non-finite query.
        for fused in (True, False):
            with pytest.raises(tf.errors.InvalidArgumentError,
                               match="NaN|finite"):
                draw(fused)
        return
    ids, log_q = draw(True)
    ref_ids, ref_log_q = draw(False)
    assert ids.dtype == ref_ids.dtype == tf.int64
    assert log_q.dtype == ref_log_q.dtype == tf.float32
    assert ids.shape == ref_ids.shape == (t, k)
    assert log_q.shape == ref_log_q.shape == (t, k)
    ids = ids.numpy()
    assert ((ids >= 0) & (ids < layout.num_items)).all(), ids
    got = log_q.numpy().astype(np.float64)
    q64, w64 = query.astype(np.float64), table.numpy().astype(np.float64)
    rows = w64[ids]  # [T, K, D]
    dots = np.einsum("td,tkd->tk", q64, rows)
    # Float32 rounding bounds of the op: the dot products h . w_i (in the
    # numerator log(alpha (h . w)^2 + 1)) and the quadratic form h^T Z h of
    # the packed root (in the normaliser alpha h^T Z h + C).
    dim, num_items = layout.dim, layout.num_items
    dot_error = 4 * dim * 2.0**-24 * np.sqrt(
        (q64**2).sum(1)[:, None] * (rows**2).sum(2))
    numerator_error = (2 * alpha * np.abs(dots) * dot_error /
                       (1 + alpha * dots**2))
    z_tree = ks.unpack_symmetric(tree.numpy()[1], dim).numpy()
    quadratic = np.einsum("td,de,te->t", q64, z_tree, q64)
    normaliser = alpha * np.maximum(quadratic, 0.0) + num_items
    squared_norm = (q64**2).sum(1)
    eval_error = (alpha * squared_norm * 8 * dim * 2.0**-24 *
                  np.abs(z_tree).sum() / normaliser)
    # (1) The op's q is the tree's: log K(h, w_i) - log(alpha h^T Z h + C)
    # (what KernelSampler.log_prob computes from the same tree).
    want = np.log1p(alpha * dots**2) - np.log(normaliser)[:, None]
    _assert_log_q(got, want, ids, TOL + numerator_error +
                  eval_error[:, None], "log_q vs tree normaliser")
    # (2) ... and the brute-force q of the reference (softmax over the whole
    # catalog in float64), up to the float32 drift of the tree's Z from the
    # snapshot's W^T W (running sums updated in place; the tree tests hold
    # it to 2e-6 of a fresh build).
    brute = ks.kernel_log_probabilities(query, table, alpha).numpy()
    brute = np.take_along_axis(brute, ids, 1)
    drift = np.abs(z_tree - w64.T @ w64).sum()
    drift_error = alpha * squared_norm * drift / normaliser
    _assert_log_q(got, brute, ids, TOL + numerator_error +
                  (eval_error + 2 * drift_error)[:, None],
                  "log_q vs brute force")


def _assert_log_q(got, want, ids, atol, what):
    bad = np.abs(got - want) > atol + TOL * np.abs(want)
    assert not bad.any(), (what, got[bad], want[bad], ids[bad],
                           np.broadcast_to(atol, want.shape)[bad])


@needs("tfrec_fast_kernel_sampler_draw", "tfrec_fast_kernel_sampler_refresh",
       "tfrec_fast_kernel_sampler_update")
@PROPERTY
@given(_kernel_cases())
def test_kernel_sampler_fused_equals_reference(case):
    rng = np.random.default_rng(case["seed"])
    c, d = case["c"], case["d"]
    layout = ks.tree_layout(c, d, case["leaf_size"])
    table = _kernel_table(rng, case["table"], c, d)
    fused, reference = _tree_state(layout), _tree_state(layout)
    if c == 1:
        event("C = 1")
    if case["t"] == 0:
        event("T = 0")
    if case["query"] == "nan":
        event("NaN query: both raise")

    # Build: refresh from the zero snapshot with max_changed = -1.
    built = [ks.kernel_sampler_refresh(*state, table, -1, layout,
                                       use_fused=use_fused)
             for state, use_fused in ((fused, True), (reference, False))]
    assert [int(x) for x in built[0]] == [int(x) for x in built[1]]
    _assert_same_trees(fused, reference)

    query = _kernel_query(rng, case["query"], case["t"], d, table)
    _assert_draws_exact(case, query, layout, fused[0], fused[1],
                        case["key"])

    # Change some rows, then refresh (changed rows in place, or a rebuild
    # past max_changed) or update(ids) with repeats and unlisted changes.
    if case["change"] == "none":
        new_table, rows = table, np.zeros([0], np.int64)
    else:
        new_table, rows = _kernel_change(rng, case["change"], table,
                                         case["changed_rows"])
    if case["how"] == "refresh":
        results = [ks.kernel_sampler_refresh(
            *state, new_table, case["max_changed"], layout,
            use_fused=use_fused)
            for state, use_fused in ((fused, True), (reference, False))]
        assert [int(x) for x in results[0]] == [int(x) for x in results[1]]
        event("refresh: rebuilt" if bool(results[0][1]) else
              f"refresh: {min(int(results[0][0]), 1)}+ rows in place")
    else:
        listed = rows[:max(0, len(rows) - 1)]  # one changed row unlisted
        listed = np.concatenate([listed, listed[:2]]).astype(np.int64)
        listed = rng.permutation(listed)
        results = [int(ks.kernel_sampler_update(
            *state, new_table, tf.constant(listed, tf.int64), layout,
            use_fused=use_fused))
            for state, use_fused in ((fused, True), (reference, False))]
        assert results[0] == results[1] == len(np.unique(listed))
        event("update(ids)")
    _assert_same_trees(fused, reference)
    _assert_draws_exact(case, query, layout, fused[0], fused[1],
                        (case["key"][0], case["key"][1] ^ 1))
