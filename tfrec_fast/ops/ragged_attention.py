"""Padding-free attention over packed sequences: values + row_splits.

The layout is FlashAttention's varlen API and `tf.RaggedTensor`'s: the T
tokens of B sequences are packed along axis 0 and `row_splits` [B + 1] gives
each sequence's [start, end). Each token attends only to tokens of its own
sequence (and, when causal, only to itself and earlier ones).

`ragged_attention_reference` is the pure-TF meaning of the op: it pads the
batch to its longest row in memory, which is what the fused op avoids. It is
the test oracle and the serving path (core ops only).

`ragged_attention_qkvpacked` is the same on one [T, 3, H, D] tensor (a
fused Q/K/V projection's output), read and differentiated in place.

`ragged_attention` runs the fused op TfrecFastRaggedAttention
(custom_ops/kernels/ragged_attention.h: per (sequence, head) tiles, online
softmax, no padding, no [L, L] matrix) when the op library is loaded, and the
reference otherwise; its gradient is the fused TfrecFastRaggedAttentionGrad,
which recomputes the probabilities from the saved per-row log-sum-exp.
"""

import math

import tensorflow as tf

from tfrec_fast.ops import _library


def check_packed(queries, keys, values, row_splits):
    """Checks shapes and dtypes of packed attention inputs.

    Raises:
        ValueError: ranks, shapes or dtypes that do not fit together.
    """
    for name, x in (("queries", queries), ("keys", keys), ("values", values)):
        if x.shape.rank is not None and x.shape.rank != 3:
            raise ValueError(f"{name} must be packed [T, H, Dh], got shape "
                             f"{x.shape}")
        if not x.dtype.is_floating:
            raise ValueError(f"{name} must be floating point, got "
                             f"{x.dtype.name}")
    if not (queries.dtype == keys.dtype == values.dtype):
        raise ValueError(f"queries, keys and values must share a dtype, got "
                         f"{queries.dtype.name}, {keys.dtype.name}, "
                         f"{values.dtype.name}")
    if not queries.shape.is_compatible_with(keys.shape):
        raise ValueError(f"queries {queries.shape} and keys {keys.shape} must "
                         "have the same shape")
    if not keys.shape[:2].is_compatible_with(values.shape[:2]):
        raise ValueError(f"keys {keys.shape} and values {values.shape} must "
                         "have the same [T, H]")
    if row_splits.shape.rank is not None and row_splits.shape.rank != 1:
        raise ValueError(f"row_splits must be [B + 1], got shape "
                         f"{row_splits.shape}")
    if not row_splits.dtype.is_integer:
        raise ValueError(f"row_splits must be integer, got "
                         f"{row_splits.dtype.name}")


def checked_row_splits(row_splits, num_tokens):
    """int64 `row_splits`, after the fused op's checks (same wording).

    The padded reference packs and unpacks rows without bounds checks
    (`RaggedTensor.from_row_splits(validate=False)`): splits past T would
    read past the end of the packed tokens. Rules: at least one entry,
    row_splits[0] = 0, non-decreasing, row_splits[-1] = T.

    Args:
        row_splits: int64 [B + 1].
        num_tokens: T, int64 scalar (dimension 0 of queries).

    Raises:
        tf.errors.InvalidArgumentError: a rule is broken (eagerly: the first
            bad entry, as the fused op says it; in a graph: an assertion
            that prints row_splits and T).
    """
    if tf.executing_eagerly():
        splits, total = row_splits.numpy().tolist(), int(num_tokens)
        problem = None
        if not splits:
            problem = "row_splits must have at least one entry (B + 1 >= 1)"
        elif splits[0] != 0:
            problem = f"row_splits[0] must be 0, got {splits[0]}"
        else:
            for b in range(1, len(splits)):
                if splits[b] < splits[b - 1]:
                    problem = (f"row_splits must be non-decreasing, but "
                               f"row_splits[{b}] = {splits[b]} < "
                               f"row_splits[{b - 1}] = {splits[b - 1]}")
                    break
            if problem is None and splits[-1] != total:
                problem = (f"row_splits[-1] = row_splits[{len(splits) - 1}] "
                           f"= {splits[-1]} must equal the number of packed "
                           f"tokens T = {total} (dimension 0 of queries)")
        if problem:
            raise tf.errors.InvalidArgumentError(None, None, problem)
        return row_splits
    valid = tf.logical_and(tf.size(row_splits) > 0, tf.reduce_all(tf.concat(
        [tf.equal(row_splits[:1], 0),
         row_splits[1:] >= row_splits[:-1],
         tf.equal(row_splits[-1:], num_tokens)], axis=0)))
    check = tf.debugging.Assert(
        valid, ["row_splits must start at 0, be non-decreasing and end at "
                "the number of packed tokens T (dimension 0 of queries); "
                "row_splits =", row_splits, "T =", num_tokens], summarize=16)
    with tf.control_dependencies([check]):
        return tf.identity(row_splits)


def ragged_attention_reference(queries, keys, values, row_splits,
                               causal=True, scale=None):
    """Softmax attention within each packed sequence (pure TF, padded).

    Args:
        queries: float [T, H, Dh] packed queries.
        keys: float [T, H, Dh] packed keys.
        values: float [T, H, Dv] packed values.
        row_splits: int [B + 1] sequence boundaries (row_splits[0] = 0,
            row_splits[B] = T, non-decreasing).
        causal: token i sees tokens j <= i of its sequence; else all of them.
        scale: score multiplier; default 1 / sqrt(Dh).

    Returns:
        float [T, H, Dv]: out_i = sum_j softmax_j(scale * q_i . k_j) v_j over
        the tokens j that token i sees. Scores and softmax are computed in
        float32 for half-precision inputs.
    """
    queries, keys, values = (tf.convert_to_tensor(x)
                             for x in (queries, keys, values))
    row_splits = tf.convert_to_tensor(row_splits)
    check_packed(queries, keys, values, row_splits)  # before the cast
    row_splits = checked_row_splits(tf.cast(row_splits, tf.int64),
                                    tf.shape(queries, out_type=tf.int64)[0])
    if scale is None:
        scale = 1.0 / math.sqrt(queries.shape[-1])
    dtype = queries.dtype
    compute = tf.float32 if dtype in (tf.float16, tf.bfloat16) else dtype

    def padded(x):  # [T, H, d] -> [B, H, L, d]
        ragged = tf.RaggedTensor.from_row_splits(tf.cast(x, compute),
                                                 row_splits, validate=False)
        return tf.transpose(ragged.to_tensor(), [0, 2, 1, 3])

    q, k, v = padded(queries), padded(keys), padded(values)
    lengths = row_splits[1:] - row_splits[:-1]  # [B]
    width = tf.shape(q, out_type=tf.int64)[2]
    key_valid = tf.sequence_mask(lengths, width)[:, tf.newaxis, tf.newaxis, :]
    mask = key_valid  # [B, 1, 1, L]
    if causal:
        positions = tf.range(width)
        mask = mask & (positions[tf.newaxis, :] <= positions[:, tf.newaxis])
    scores = tf.matmul(q, k, transpose_b=True) * tf.cast(scale, compute)
    # A large finite negative, not -inf: padded query rows (all keys masked)
    # stay finite and are dropped below; every real row sees itself.
    scores = tf.where(mask, scores, tf.cast(-1e30, compute))
    out = tf.matmul(tf.nn.softmax(scores, axis=-1), v)  # [B, H, L, Dv]
    out = tf.transpose(out, [0, 2, 1, 3])  # [B, L, H, Dv]
    packed = tf.RaggedTensor.from_tensor(out, lengths=lengths).flat_values
    return tf.cast(packed, dtype)


# Dtypes the fused op takes (half and bfloat16 are computed in float32).
_FUSED_DTYPES = (tf.float32, tf.float16, tf.bfloat16)


def ragged_attention(queries, keys, values, row_splits, causal=True,
                     scale=None, use_fused=None):
    """Softmax attention within each packed sequence, without padding.

    Same meaning as `ragged_attention_reference`; runs the fused op from the
    compiled library (a multi-threaded CPU kernel, and a CUDA kernel in GPU
    builds; never pads, keeps only a per-row log-sum-exp for the backward)
    when it is loaded, else the reference after one `OpLibraryWarning`.
    Differentiable with respect to queries, keys and values. Custom ops
    have no XLA kernels: do not call it under `jit_compile=True`.

    Args:
        queries: float [T, H, Dh] packed queries.
        keys: float [T, H, Dh] packed keys.
        values: float [T, H, Dv] packed values.
        row_splits: int32/int64 [B + 1] sequence boundaries (row_splits[0]
            = 0, non-decreasing, row_splits[B] = T), e.g. a RaggedTensor's
            `row_splits`.
        causal: token i sees tokens j <= i of its sequence; else all of them.
        scale: score multiplier; default 1 / sqrt(Dh).
        use_fused: True to require the fused op (raises if it is not built
            or does not take the dtype), False to force the reference, None
            to pick (the fused op for float32/float16/bfloat16 when loaded).

    Returns:
        [T, H, Dv] of the input dtype.

    Raises:
        ValueError: ranks, shapes or dtypes that do not fit together.
        tf.errors.InvalidArgumentError: (fused op) row_splits that do not
            start at 0, decrease, or do not end at T; shapes that only turn
            out wrong at run time. The message names the argument.
    """
    queries, keys, values = (tf.convert_to_tensor(x)
                             for x in (queries, keys, values))
    row_splits = tf.convert_to_tensor(row_splits)
    check_packed(queries, keys, values, row_splits)
    module = None if use_fused is False else _library.fused_module(
        "tfrec_fast_ragged_attention", "TfrecFastRaggedAttention", use_fused)
    if module is None:
        return ragged_attention_reference(queries, keys, values, row_splits,
                                          causal=causal, scale=scale)
    if queries.dtype not in _FUSED_DTYPES:
        if use_fused:
            raise ValueError(
                "use_fused=True: the fused ragged_attention takes float32, "
                f"float16 or bfloat16 queries/keys/values, got "
                f"{queries.dtype.name}")
        return ragged_attention_reference(queries, keys, values, row_splits,
                                          causal=causal, scale=scale)
    scale, row_splits = _fused_op_args(scale, queries, "queries",
                                       row_splits)
    out, _ = module.tfrec_fast_ragged_attention(
        queries, keys, values, row_splits, causal=bool(causal), scale=scale)
    return out


def _fused_op_args(scale, tensor, name, row_splits):
    """The fused ops' float `scale` (default 1 / sqrt(the static last
    dimension of `tensor`)) and int32/int64 row_splits."""
    if scale is None:
        head_dim = tensor.shape[-1]
        if head_dim is None:
            raise ValueError("scale=None needs a static head dimension "
                             f"({name} shape {tensor.shape}); pass scale")
        scale = 1.0 / math.sqrt(head_dim)
    if row_splits.dtype not in (tf.int32, tf.int64):
        row_splits = tf.cast(row_splits, tf.int64)
    return float(scale), row_splits


def _check_qkv_packed(qkv, row_splits):
    if qkv.shape.rank is not None and (qkv.shape.rank != 4
                                       or qkv.shape[1] not in (None, 3)):
        raise ValueError("qkv must be packed [T, 3, H, D] (queries, keys, "
                         f"values), got shape {qkv.shape}")
    if not qkv.dtype.is_floating:
        raise ValueError(f"qkv must be floating point, got {qkv.dtype.name}")
    shape = qkv.shape
    part = tf.TensorSpec(  # what each of qkv[:, 0], [:, 1], [:, 2] is
        None if shape.rank is None else shape[:1].concatenate(shape[2:]),
        qkv.dtype)
    check_packed(part, part, part, row_splits)


def ragged_attention_qkvpacked(qkv, row_splits, causal=True, scale=None,
                               use_fused=None):
    """`ragged_attention` on queries, keys and values packed in one tensor.

    FlashAttention's varlen `qkvpacked` form: a self-attention layer's fused
    Q/K/V projection gives [T, 3 H D] = [T, 3, H, D] directly, and the fused
    CPU op reads q, k, v in place and writes the gradient as one [T, 3, H,
    D] tensor, so the projection needs neither a split forward nor a concat
    backward. Same values as `ragged_attention(qkv[:, 0], qkv[:, 1],
    qkv[:, 2], ...)`. The packed op has a CPU kernel only: where a GPU is
    visible the three slices go to `ragged_attention` (its CUDA kernels).
    No XLA kernel.

    Args:
        qkv: float [T, 3, H, D]: queries qkv[:, 0], keys qkv[:, 1], values
            qkv[:, 2].
        row_splits: int32/int64 [B + 1] sequence boundaries (row_splits[0]
            = 0, non-decreasing, row_splits[B] = T).
        causal: token i sees tokens j <= i of its sequence; else all of them.
        scale: score multiplier; default 1 / sqrt(D).
        use_fused: as for `ragged_attention` (False: the pure-TF reference).

    Returns:
        [T, H, D] of the input dtype.

    Raises:
        ValueError: ranks, shapes or dtypes that do not fit together.
        tf.errors.InvalidArgumentError: (fused op) bad row_splits, as for
            `ragged_attention`.
    """
    qkv = tf.convert_to_tensor(qkv)
    row_splits = tf.convert_to_tensor(row_splits)
    _check_qkv_packed(qkv, row_splits)
    if use_fused is False:
        return ragged_attention_reference(*tf.unstack(qkv, 3, axis=1),
                                          row_splits, causal=causal,
                                          scale=scale)
    module = None
    if not tf.config.list_logical_devices("GPU"):
        module = _library.fused_module("tfrec_fast_ragged_attention_qkv_packed",
                                       "TfrecFastRaggedAttentionQkvPacked",
                                       use_fused)
    if module is None or qkv.dtype not in _FUSED_DTYPES:
        return ragged_attention(*tf.unstack(qkv, 3, axis=1), row_splits,
                                causal=causal, scale=scale,
                                use_fused=use_fused)
    scale, row_splits = _fused_op_args(scale, qkv, "qkv", row_splits)
    out, _ = module.tfrec_fast_ragged_attention_qkv_packed(
        qkv, row_splits, causal=bool(causal), scale=scale)
    return out


@tf.RegisterGradient("TfrecFastRaggedAttentionQkvPacked")
def _ragged_attention_qkvpacked_grad(op, d_out, d_logsumexp):
    """d_qkv from the fused backward; logsumexp carries no gradient."""
    del d_logsumexp
    qkv, row_splits = op.inputs
    if d_out is None:
        return tf.zeros_like(qkv), None
    module = _library.DEFAULT_LIBRARY.module()
    d_qkv = module.tfrec_fast_ragged_attention_qkv_packed_grad(
        qkv, row_splits, op.outputs[0], op.outputs[1], d_out,
        causal=op.get_attr("causal"), scale=op.get_attr("scale"))
    return d_qkv, None


@tf.RegisterGradient("TfrecFastRaggedAttention")
def _ragged_attention_grad(op, d_out, d_logsumexp):
    """dq, dk, dv from the fused backward; logsumexp carries no gradient."""
    del d_logsumexp
    queries, keys, values, row_splits = op.inputs
    if d_out is None:
        return (tf.zeros_like(queries), tf.zeros_like(keys),
                tf.zeros_like(values), None)
    module = _library.DEFAULT_LIBRARY.module()
    d_queries, d_keys, d_values = module.tfrec_fast_ragged_attention_grad(
        queries, keys, values, row_splits, op.outputs[0], op.outputs[1],
        d_out, causal=op.get_attr("causal"), scale=op.get_attr("scale"))
    return d_queries, d_keys, d_values, None
