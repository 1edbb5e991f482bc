"""Padding-free attention over packed sequences: values + row_splits.

The layout is FlashAttention's varlen API and `tf.RaggedTensor`'s: the T
tokens of B sequences are packed along axis 0 and `row_splits` [B + 1] gives
each sequence's [start, end). Each token attends only to tokens of its own
sequence (and, when causal, only to itself and earlier ones).

`ragged_attention_reference` is the pure-TF meaning of the op: it pads the
batch to its longest row in memory, which is what the fused op avoids. It is
the test oracle and the serving path (core ops only).
"""

import math

import tensorflow as tf


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
    row_splits = tf.cast(row_splits, tf.int64)
    check_packed(queries, keys, values, row_splits)
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
