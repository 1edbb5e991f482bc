"""The fused packed-attention op (TfrecFastRaggedAttention and its gradient).

The fused op must equal `ragged_attention_reference` (the padded pure-TF
meaning) in values and in gradients with respect to queries, keys and values,
for causal and bidirectional attention, on adversarial batches (rows of
length 1, empty rows, one long row among short ones, no rows at all) and on
random small shapes; bad row_splits and mismatched shapes fail with errors
that name the argument. The q/k/v-packed op (TfrecFastRaggedAttentionQkvPacked:
one [T, 3, H, D] tensor read and differentiated in place) must equal the
unpacked op bit for bit.
"""

import os
import sys
import textwrap

import numpy as np
import pytest
import tensorflow as tf
from hypothesis import given, settings, strategies as st

import tfrec_fast  # noqa: F401  (selects tf_keras before anything else)
from tfrec_fast import ops
from tfrec_fast.ops import _library
import tfrec_fast.ops.ragged_attention  # noqa: F401

from cpu_isa_testing import assert_passes_on_every_isa

# `tfrec_fast.ops.ragged_attention` the attribute is the function; the module:
ra = sys.modules["tfrec_fast.ops.ragged_attention"]

LIB = _library.DEFAULT_LIBRARY
needs_library = pytest.mark.skipif(
    not os.path.isfile(LIB.library_path),
    reason="op library not built (pip install . builds it)")

ATOL = RTOL = 1e-5


def _case(lengths, heads, head_dim, value_dim=None, seed=0, magnitude=1.0,
          dtype=tf.float32):
    """Random packed q, k, v, a cotangent w, and int64 row_splits."""
    value_dim = head_dim if value_dim is None else value_dim
    rng = np.random.default_rng(seed)
    splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = int(splits[-1])

    def rand(d, scale=1.0):
        return tf.cast(tf.constant(
            scale * rng.standard_normal((tokens, heads, d)), tf.float32),
            dtype)

    return (rand(head_dim, magnitude), rand(head_dim, magnitude),
            rand(value_dim), rand(value_dim), tf.constant(splits))


def _forward_backward(q, k, v, w, splits, causal, use_fused, scale=None):
    with tf.GradientTape() as tape:
        tape.watch([q, k, v])
        out = ra.ragged_attention(q, k, v, splits, causal=causal,
                                  scale=scale, use_fused=use_fused)
        loss = tf.reduce_sum(tf.cast(out, tf.float32) * tf.cast(w,
                                                                 tf.float32))
    grads = tape.gradient(loss, [q, k, v])
    return [out] + [tf.convert_to_tensor(g) for g in grads]


def _assert_fused_matches_reference(q, k, v, w, splits, causal, scale=None,
                                    atol=ATOL, rtol=RTOL):
    fused = _forward_backward(q, k, v, w, splits, causal, True, scale)
    reference = _forward_backward(q, k, v, w, splits, causal, False, scale)
    for name, a, b in zip(("out", "dq", "dk", "dv"), fused, reference):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        a, b = tf.cast(a, tf.float32).numpy(), tf.cast(b, tf.float32).numpy()
        # atol scales with the tensor's magnitude: both sides accumulate in
        # float32 in different orders, and gradients (sums of many products
        # with cancellation) carry errors relative to their largest entry.
        scale_of_b = max(1.0, float(np.abs(b).max())) if b.size else 1.0
        np.testing.assert_allclose(a, b, atol=atol * scale_of_b, rtol=rtol,
                                   err_msg=name)
    return fused


def test_exports():
    assert ops.ragged_attention is ra.ragged_attention
    assert ops.ragged_attention_reference is ra.ragged_attention_reference
    assert ops.ragged_attention_qkvpacked is ra.ragged_attention_qkvpacked


@needs_library
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("heads", [1, 2, 4])
def test_matches_reference_with_short_and_empty_rows(causal, heads):
    lengths = [3, 1, 0, 17, 64, 5, 0, 33, 1]
    _assert_fused_matches_reference(*_case(lengths, heads, 32), causal)


@needs_library
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("head_dim, value_dim", [(5, 3), (1, 40), (48, 17)])
def test_head_and_value_sizes_that_are_not_whole_vectors(causal, head_dim,
                                                         value_dim):
    _assert_fused_matches_reference(
        *_case([9, 1, 30], 2, head_dim, value_dim, seed=1), causal)


@needs_library
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_large_scores_over_several_key_blocks(causal):
    # Rows longer than a key block (256) with scores in the hundreds: the
    # online softmax rescales as the running max grows block by block.
    q, k, v, w, splits = _case([600, 300, 2], 1, 16, seed=2, magnitude=6.0)
    _assert_fused_matches_reference(q, k, v, w, splits, causal,
                                    atol=2e-5, rtol=2e-5)


@needs_library
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_one_long_row_among_short_ones(causal):
    # The long row is split over several work items (its query rows in
    # chunks whose dK, dV partials are summed afterwards).
    lengths = [5, 2000, 1, 9, 0, 3]
    _assert_fused_matches_reference(*_case(lengths, 1, 8, seed=3), causal,
                                    atol=2e-5, rtol=2e-5)


@needs_library
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("lengths", [[], [0], [0, 0, 0]],
                         ids=["B=0", "B=1 empty", "B=3 empty"])
def test_no_tokens(causal, lengths):
    q, k, v, w, splits = _case(lengths, 2, 4, 3)
    out, dq, dk, dv = _forward_backward(q, k, v, w, splits, causal, True)
    assert out.shape == (0, 2, 3) and dq.shape == (0, 2, 4)
    assert dk.shape == (0, 2, 4) and dv.shape == (0, 2, 3)


@needs_library
def test_explicit_scale_and_int32_row_splits():
    q, k, v, w, splits = _case([7, 0, 12], 2, 8, seed=4)
    fused = _assert_fused_matches_reference(q, k, v, w, splits, True,
                                            scale=0.3)
    again = _forward_backward(q, k, v, w, tf.cast(splits, tf.int32), True,
                              True, scale=0.3)
    for a, b in zip(fused, again):
        np.testing.assert_array_equal(a.numpy(), b.numpy())


@needs_library
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
def test_inside_tf_function_with_unknown_shapes(causal):
    spec = tf.TensorSpec([None, 2, 8], tf.float32)

    @tf.function(input_signature=[spec] * 4 + [
        tf.TensorSpec([None], tf.int64)])
    def step(q, k, v, w, splits):
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            out = ops.ragged_attention(q, k, v, splits, causal=causal,
                                       scale=0.25)
            loss = tf.reduce_sum(out * w)
        return [out] + tape.gradient(loss, [q, k, v])

    graph = step.get_concrete_function().graph
    types = {op.type for op in graph.get_operations()}
    assert "TfrecFastRaggedAttention" in types
    assert "TfrecFastRaggedAttentionGrad" in types
    for lengths in ([4, 0, 11], [1], []):
        q, k, v, w, splits = _case(lengths, 2, 8, seed=5)
        got = step(q, k, v, w, splits)
        want = _forward_backward(q, k, v, w, splits, causal, False,
                                 scale=0.25)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=ATOL,
                                       rtol=RTOL)


@needs_library
def test_ragged_tensor_row_splits():
    ids = tf.ragged.constant([[1, 2, 3], [], [4]])
    q, k, v, w, _ = _case([3, 0, 1], 1, 4, seed=6)
    a = ops.ragged_attention(q, k, v, ids.row_splits, use_fused=True)
    b = ops.ragged_attention_reference(q, k, v, ids.row_splits)
    np.testing.assert_allclose(a.numpy(), b.numpy(), atol=ATOL, rtol=RTOL)


@needs_library
@pytest.mark.parametrize("dtype, tol", [(tf.float16, 2e-3),
                                        (tf.bfloat16, 2e-2)])
def test_half_precision_is_computed_in_float32(dtype, tol):
    q, k, v, w, splits = _case([6, 1, 20], 2, 8, seed=7, dtype=dtype)
    _assert_fused_matches_reference(q, k, v, w, splits, True, atol=tol,
                                    rtol=tol)


@needs_library
def test_float64_falls_back_to_reference_unless_fused_is_required():
    q, k, v, w, splits = _case([4, 2], 1, 4, seed=8, dtype=tf.float64)
    got = ops.ragged_attention(q, k, v, splits)
    want = ops.ragged_attention_reference(q, k, v, splits)
    assert got.dtype == tf.float64
    np.testing.assert_allclose(got.numpy(), want.numpy(), rtol=1e-12)
    with pytest.raises(ValueError, match="float64"):
        ops.ragged_attention(q, k, v, splits, use_fused=True)


def test_use_fused_false_is_the_reference():
    q, k, v, w, splits = _case([4, 0, 2], 2, 4, seed=9)
    got = ops.ragged_attention(q, k, v, splits, causal=False,
                               use_fused=False)
    want = ops.ragged_attention_reference(q, k, v, splits, causal=False)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_library_without_the_attention_op_falls_back_once(monkeypatch):
    # An op library from an older build (no TfrecFastRaggedAttention).
    monkeypatch.setattr(LIB, "module", lambda: object())
    monkeypatch.setattr(_library, "_stale_library_warned", set())
    q, k, v, _, splits = _case([3, 2], 1, 4, seed=10)
    want = ops.ragged_attention_reference(q, k, v, splits)
    with pytest.warns(ops.OpLibraryWarning, match="without"):
        got = ops.ragged_attention(q, k, v, splits)
    np.testing.assert_array_equal(got.numpy(), want.numpy())
    with pytest.raises(RuntimeError, match="use_fused=True"):
        ops.ragged_attention(q, k, v, splits, use_fused=True)


# ---------------------------------------------------------------- bad input

@needs_library
@pytest.mark.parametrize("splits, message", [
    ([1, 3, 5], r"row_splits\[0\] must be 0, got 1"),
    ([0, 3, 2, 5], r"row_splits must be non-decreasing.*row_splits\[2\] = 2"
                   r" < row_splits\[1\] = 3"),
    ([0, 3, 4], r"row_splits\[-1\].* = 4 must equal the number of packed "
                r"tokens T = 5"),
    ([0, 3, 6], r"row_splits\[-1\].* = 6 must equal .* T = 5"),
])
def test_bad_row_splits_name_the_argument(splits, message):
    q, k, v, _, _ = _case([5], 1, 4)
    for dtype in (tf.int64, tf.int32):
        with pytest.raises(tf.errors.InvalidArgumentError, match=message):
            ops.ragged_attention(q, k, v, tf.constant(splits, dtype),
                                 use_fused=True)
    fn = tf.function(lambda s: ops.ragged_attention(q, k, v, s,
                                                    use_fused=True))
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        fn(tf.constant(splits, tf.int64))


@needs_library
def test_bad_row_splits_in_the_gradient_op():
    q, k, v, w, splits = _case([5], 1, 4)
    module = LIB.module()
    out, lse = module.tfrec_fast_ragged_attention(q, k, v, splits, scale=0.5)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"row_splits\[0\] must be 0"):
        module.tfrec_fast_ragged_attention_grad(
            q, k, v, tf.constant([2, 5], tf.int64), out, lse, w, scale=0.5)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError),
                       match="logsumexp"):
        module.tfrec_fast_ragged_attention_grad(
            q, k, v, splits, out, lse[:, :, tf.newaxis], w, scale=0.5)


@pytest.mark.parametrize("use_fused", [
    pytest.param(True, id="fused", marks=needs_library),
    pytest.param(False, id="reference")])
@pytest.mark.parametrize("change, message", [
    (lambda q, k, v, s: (q[0], k, v, s), "queries must be packed"),
    (lambda q, k, v, s: (q, k[:, :, :2], v, s), "keys"),
    (lambda q, k, v, s: (q, k, v[:3], s), "values"),
    (lambda q, k, v, s: (q, k, v, s[tf.newaxis]), "row_splits"),
    (lambda q, k, v, s: (tf.cast(q, tf.int32), k, v, s),
     "queries must be floating"),
    (lambda q, k, v, s: (q, k, tf.cast(v, tf.float64), s), "share a dtype"),
    (lambda q, k, v, s: (q, k, v, tf.cast(s, tf.float32)),
     "row_splits must be integer"),
])
def test_static_shape_and_dtype_mismatches_name_the_argument(
        use_fused, change, message):
    q, k, v, _, splits = _case([5], 2, 4)
    with pytest.raises(ValueError, match=message):
        ops.ragged_attention(*change(q, k, v, splits), use_fused=use_fused)


@needs_library
@pytest.mark.parametrize("q_shape, k_shape, v_shape, s_shape, message", [
    ([5, 2, 4], [4, 2, 4], [5, 2, 4], [2], "keys"),
    ([5, 2, 4], [5, 2, 4], [5, 1, 4], [2], "values"),
    ([5, 2, 4], [5, 2, 4], [6, 2, 4], [2], "values"),
    ([5, 8], [5, 2, 4], [5, 2, 4], [2], "queries"),
    ([5, 2, 4], [5, 2, 4], [5, 2, 4], [1, 2], "row_splits"),
    ([5, 2, 4], [5, 2, 4], [5, 2, 4], [0], "row_splits"),
])
def test_run_time_shape_mismatches_name_the_argument(q_shape, k_shape,
                                                     v_shape, s_shape,
                                                     message):
    # Unknown ranks at trace time: only the kernel can tell.
    spec = tf.TensorSpec(None, tf.float32)
    module = LIB.module()

    @tf.function(input_signature=[spec] * 3 + [tf.TensorSpec(None,
                                                             tf.int64)])
    def fused(q, k, v, s):
        return module.tfrec_fast_ragged_attention(q, k, v, s, scale=0.5)[0]

    splits = np.zeros(s_shape, np.int64)
    if splits.ndim == 1 and splits.size:
        splits[-1] = q_shape[0]
    with pytest.raises(tf.errors.InvalidArgumentError, match=message):
        fused(tf.zeros(q_shape), tf.zeros(k_shape), tf.zeros(v_shape),
              tf.constant(splits))


# ----------------------------------------------------- every code path / ISA

_ISA_SCRIPT = textwrap.dedent("""
    import sys
    import numpy as np
    import tensorflow as tf
    import tfrec_fast
    from tfrec_fast import ops
    rng = np.random.default_rng(0)
    for causal in (True, False):
        for lengths, h, dh, dv in (([3, 0, 40, 1, 300], 2, 8, 5),
                                   ([700, 20, 9], 1, 33, 32)):
            splits = tf.constant(np.concatenate([[0], np.cumsum(lengths)]),
                                 tf.int64)
            t = int(sum(lengths))
            q, k = (tf.constant(rng.standard_normal((t, h, dh)), tf.float32)
                    for _ in range(2))
            v, w = (tf.constant(rng.standard_normal((t, h, dv)), tf.float32)
                    for _ in range(2))
            res = []
            for fused in (True, False):
                with tf.GradientTape() as tape:
                    tape.watch([q, k, v])
                    out = ops.ragged_attention(q, k, v, splits, causal,
                                               use_fused=fused)
                    loss = tf.reduce_sum(out * w)
                res.append([out] + [tf.convert_to_tensor(g) for g in
                                    tape.gradient(loss, [q, k, v])])
            for a, b in zip(*res):
                np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-5,
                                           rtol=2e-5)
            qkv = tf.stack([q, k, tf.reverse(q, [0])], axis=1)
            res = []
            for fused in (True, False):
                with tf.GradientTape() as tape:
                    tape.watch(qkv)
                    out = ops.ragged_attention_qkvpacked(
                        qkv, splits, causal, use_fused=fused)
                    loss = tf.reduce_sum(out * tf.reverse(q, [1]))
                res.append([out, tape.gradient(loss, qkv)])
            for a, b in zip(*res):
                np.testing.assert_allclose(a.numpy(), b.numpy(), atol=2e-5,
                                           rtol=2e-5)
    print("ok")
""")


@needs_library
def test_every_instruction_set_matches_reference():
    # Each instruction set the vector code is compiled for, as far as this
    # CPU runs it (TFREC_FAST_CPU_ISA caps the run-time pick).
    assert_passes_on_every_isa(_ISA_SCRIPT)


# ------------------------------------------------------------ property test

@st.composite
def _batches(draw):
    lengths = draw(st.lists(st.integers(0, 40), min_size=0, max_size=6))
    heads = draw(st.integers(1, 3))
    head_dim = draw(st.integers(1, 20))
    value_dim = draw(st.integers(1, 20))
    causal = draw(st.booleans())
    scale = draw(st.one_of(st.none(), st.floats(0.05, 2.0)))
    seed = draw(st.integers(0, 2**31 - 1))
    return lengths, heads, head_dim, value_dim, causal, scale, seed


@needs_library
@settings(max_examples=40, deadline=None, derandomize=True)
@given(_batches())
def test_property_fused_equals_reference(batch):
    lengths, heads, head_dim, value_dim, causal, scale, seed = batch
    q, k, v, w, splits = _case(lengths, heads, head_dim, value_dim, seed=seed)
    _assert_fused_matches_reference(q, k, v, w, splits, causal, scale=scale)


# ------------------------------------------------- q/k/v packed [T, 3, H, D]

def _qkv_case(lengths, heads, dim, seed=0, magnitude=1.0, dtype=tf.float32):
    """Random qkv [T, 3, H, D], cotangent [T, H, D] and int64 row_splits."""
    q, k, v, w, splits = _case(lengths, heads, dim, seed=seed,
                               magnitude=magnitude, dtype=dtype)
    return tf.stack([q, k, v], axis=1), w, splits


def _qkvpacked_forward_backward(qkv, w, splits, causal, use_fused,
                                scale=None):
    with tf.GradientTape() as tape:
        tape.watch(qkv)
        out = ra.ragged_attention_qkvpacked(qkv, splits, causal=causal,
                                            scale=scale, use_fused=use_fused)
        loss = tf.reduce_sum(tf.cast(out, tf.float32) * tf.cast(w,
                                                                 tf.float32))
    return out, tf.convert_to_tensor(tape.gradient(loss, qkv))


def _assert_qkvpacked_is_the_unpacked_op(qkv, w, splits, causal, scale=None,
                                         tol=2e-5):
    """Packed fused == unpacked fused exactly (the same arithmetic, with
    strided reads and writes), and the unpacked op == the reference."""
    out, d_qkv = _qkvpacked_forward_backward(qkv, w, splits, causal, True,
                                             scale)
    q, k, v = tf.unstack(qkv, 3, axis=1)
    want = _assert_fused_matches_reference(q, k, v, w, splits, causal, scale,
                                           atol=tol, rtol=tol)
    assert out.dtype == want[0].dtype and d_qkv.shape == qkv.shape
    np.testing.assert_array_equal(out.numpy(), want[0].numpy())
    np.testing.assert_array_equal(d_qkv.numpy(),
                                  tf.stack(want[1:], axis=1).numpy())


@needs_library
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidir"])
@pytest.mark.parametrize("lengths, heads, dim", [
    ([3, 1, 0, 17, 64, 5, 0, 33, 1], 2, 32),  # short, length-1 and empty rows
    ([9, 1, 30], 3, 5),  # D not a whole vector
    ([5, 2000, 1, 9, 0, 3], 1, 8),  # one long row: split items, reduce
    ([600, 300, 2], 4, 16),  # several key blocks
    ([200, 57], 1, 64),
], ids=["short", "odd-D", "long-row", "key-blocks", "D=64"])
def test_qkvpacked_equals_unpacked_op_and_reference(causal, lengths, heads,
                                                    dim):
    _assert_qkvpacked_is_the_unpacked_op(
        *_qkv_case(lengths, heads, dim, seed=len(lengths)), causal)


@needs_library
@pytest.mark.parametrize("lengths", [[], [0], [0, 0, 0]],
                         ids=["B=0", "B=1 empty", "B=3 empty"])
def test_qkvpacked_no_tokens(lengths):
    qkv, w, splits = _qkv_case(lengths, 2, 4)
    out, d_qkv = _qkvpacked_forward_backward(qkv, w, splits, True, True)
    assert out.shape == (0, 2, 4) and d_qkv.shape == (0, 3, 2, 4)


@needs_library
@pytest.mark.parametrize("dtype, tol", [(tf.float16, 2e-3),
                                        (tf.bfloat16, 2e-2)])
def test_qkvpacked_half_precision(dtype, tol):
    qkv, w, splits = _qkv_case([6, 1, 20], 2, 8, seed=7, dtype=dtype)
    _assert_qkvpacked_is_the_unpacked_op(qkv, w, splits, True, tol=tol)


@needs_library
def test_qkvpacked_inside_tf_function_with_unknown_shapes():
    spec = tf.TensorSpec([None, 3, 2, 8], tf.float32)

    @tf.function(input_signature=[spec, tf.TensorSpec([None, 2, 8]),
                                  tf.TensorSpec([None], tf.int64)])
    def step(qkv, w, splits):
        with tf.GradientTape() as tape:
            tape.watch(qkv)
            out = ops.ragged_attention_qkvpacked(qkv, splits, causal=False)
            loss = tf.reduce_sum(out * w)
        return out, tape.gradient(loss, qkv)

    types = {op.type for op in step.get_concrete_function().graph
             .get_operations()}
    assert {"TfrecFastRaggedAttentionQkvPacked",
            "TfrecFastRaggedAttentionQkvPackedGrad"} <= types
    assert "TfrecFastRaggedAttention" not in types  # no split, no concat
    for lengths in ([4, 0, 11], [1], []):
        qkv, w, splits = _qkv_case(lengths, 2, 8, seed=5)
        got = step(qkv, w, splits)
        want = _qkvpacked_forward_backward(qkv, w, splits, False, False)
        for a, b in zip(got, want):
            np.testing.assert_allclose(a.numpy(), b.numpy(), atol=ATOL,
                                       rtol=RTOL)


def test_qkvpacked_use_fused_false_is_the_reference():
    qkv, _, splits = _qkv_case([4, 0, 2], 2, 4, seed=9)
    got = ops.ragged_attention_qkvpacked(qkv, splits, use_fused=False)
    want = ops.ragged_attention_reference(*tf.unstack(qkv, 3, axis=1),
                                          splits)
    np.testing.assert_array_equal(got.numpy(), want.numpy())


def test_qkvpacked_where_a_gpu_is_visible_runs_the_unpacked_op(monkeypatch):
    # The packed op has no CUDA kernel: the slices go to ragged_attention,
    # whose CUDA kernels run on the GPU.
    calls = []

    def spy(q, k, v, row_splits, causal=True, scale=None, use_fused=None):
        calls.append((q.shape.as_list(), v.shape.as_list(), use_fused))
        return ops.ragged_attention_reference(q, k, v, row_splits, causal,
                                              scale)

    monkeypatch.setattr(tf.config, "list_logical_devices",
                        lambda kind=None: ["GPU:0"] if kind == "GPU" else [])
    monkeypatch.setattr(ra, "ragged_attention", spy)
    qkv, _, splits = _qkv_case([4, 2], 2, 4, seed=11)
    out = ops.ragged_attention_qkvpacked(qkv, splits)
    assert calls == [([6, 2, 4], [6, 2, 4], None)]
    assert out.shape == (6, 2, 4)


@needs_library
def test_qkvpacked_float64_falls_back_unless_fused_is_required():
    qkv, _, splits = _qkv_case([4, 2], 1, 4, seed=8, dtype=tf.float64)
    got = ops.ragged_attention_qkvpacked(qkv, splits)
    assert got.dtype == tf.float64
    with pytest.raises(ValueError, match="float64"):
        ops.ragged_attention_qkvpacked(qkv, splits, use_fused=True)


@pytest.mark.parametrize("use_fused", [
    pytest.param(True, id="fused", marks=needs_library),
    pytest.param(False, id="reference")])
@pytest.mark.parametrize("change, message", [
    (lambda qkv, s: (qkv[:, 0], s), r"qkv must be packed \[T, 3, H, D\]"),
    (lambda qkv, s: (qkv[:, :2], s), r"qkv must be packed .*\(5, 2, 2, 4\)"),
    (lambda qkv, s: (tf.cast(qkv, tf.int32), s), "qkv must be floating"),
    (lambda qkv, s: (qkv, s[tf.newaxis]), "row_splits must be"),
    (lambda qkv, s: (qkv, tf.cast(s, tf.float32)),
     "row_splits must be integer"),
], ids=["rank", "not-3", "int", "splits-rank", "splits-float"])
def test_qkvpacked_static_mismatches_name_the_argument(use_fused, change,
                                                       message):
    qkv, _, splits = _qkv_case([5], 2, 4)
    with pytest.raises(ValueError, match=message):
        ops.ragged_attention_qkvpacked(*change(qkv, splits),
                                       use_fused=use_fused)


@needs_library
def test_qkvpacked_run_time_errors_name_the_argument():
    module = LIB.module()

    @tf.function(input_signature=[tf.TensorSpec(None, tf.float32),
                                  tf.TensorSpec(None, tf.int64)])
    def fused(qkv, s):
        return module.tfrec_fast_ragged_attention_qkv_packed(
            qkv, s, scale=0.5)[0]

    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"qkv must be packed \[T, 3, H, D\]"):
        fused(tf.zeros([5, 2, 1, 4]), tf.constant([0, 5], tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"row_splits\[0\] must be 0, got 2"):
        fused(tf.zeros([5, 3, 1, 4]), tf.constant([2, 5], tf.int64))
    qkv, w, splits = _qkv_case([5], 1, 4)
    out, lse = module.tfrec_fast_ragged_attention_qkv_packed(qkv, splits,
                                                             scale=0.5)
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"row_splits\[-1\].* = 4 must equal"):
        module.tfrec_fast_ragged_attention_qkv_packed_grad(
            qkv, tf.constant([0, 4], tf.int64), out, lse, w, scale=0.5)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError),
                       match="logsumexp"):
        module.tfrec_fast_ragged_attention_qkv_packed_grad(
            qkv, splits, out, lse[:3], w, scale=0.5)
    with pytest.raises((tf.errors.InvalidArgumentError, ValueError),
                       match="d_out"):
        module.tfrec_fast_ragged_attention_qkv_packed_grad(
            qkv, splits, out, lse, w[:, :, :2], scale=0.5)


@needs_library
@settings(max_examples=30, deadline=None, derandomize=True)
@given(_batches())
def test_property_qkvpacked_equals_unpacked_op(batch):
    lengths, heads, head_dim, _, causal, scale, seed = batch
    _assert_qkvpacked_is_the_unpacked_op(
        *_qkv_case(lengths, heads, head_dim, seed=seed), causal, scale)
