"""Counter-based negative draws, bit for bit as custom_ops/kernels/counter_rng.h.

A draw is a pure function of (seed, step, row, j): the fused CCEMinus kernels
generate negatives from it in the forward and regenerate the same ones in the
backward, so no [N, K] id tensor exists. This module is the same function in
TensorFlow (uint64 arithmetic and one float64 multiply, all exact or
correctly rounded), used by the pure-TF reference and for shared draws. It
runs under XLA.

    Mix64(z)              SplitMix64's finaliser (mod 2^64)
    CallKey(seed, step)   = Mix64(Mix64(seed) ^ step)
    RowKey(key, row)      = Mix64(key ^ row)
    DrawBits(row_key, j)  = Mix64(row_key + (j + 1) * 0x9e3779b97f4a7c15)
    Column(bits, C)       = min(int64(float64(bits >> 11) * 2^-53 * C), C - 1)
    Coin(bits)            = float32(Mix64(bits ^ 0xd1b54a32d192ed03) >> 40)
                            * 2^-24
"""

import tensorflow as tf

_GOLDEN = 0x9E3779B97F4A7C15
_COIN_SALT = 0xD1B54A32D192ED03
_MUL_1 = 0xBF58476D1CE4E5B9
_MUL_2 = 0x94D049BB133111EB


def _u64(x):
    return tf.constant(x, tf.uint64)


def _xor_shift(z, shift):
    return tf.bitwise.bitwise_xor(z, tf.bitwise.right_shift(z, _u64(shift)))


def mix64(z):
    """SplitMix64's finaliser on uint64 tensors (elementwise)."""
    z = _xor_shift(z, 30) * _u64(_MUL_1)
    z = _xor_shift(z, 27) * _u64(_MUL_2)
    return _xor_shift(z, 31)


def _as_u64(x):
    """int tensor -> uint64 with two's-complement bits (as C++ casts)."""
    return tf.bitcast(tf.cast(x, tf.int64), tf.uint64)


def call_key(seed, step):
    """uint64 scalar key of one call: Mix64(Mix64(seed) ^ step)."""
    return mix64(tf.bitwise.bitwise_xor(mix64(_as_u64(seed)), _as_u64(step)))


def draw_bits(seed, step, rows, num_draws, first_draw=0):
    """uint64 [R, K] random bits of draws first..first+K-1 of the given rows.

    Args:
        seed: int scalar.
        step: int scalar.
        rows: int [R] global row indices (row_offset + t).
        num_draws: K, int scalar.
        first_draw: index of the first draw (chunks of a row's K draws).
    """
    row_keys = mix64(tf.bitwise.bitwise_xor(call_key(seed, step),
                                            _as_u64(rows)))  # [R]
    draws = tf.range(tf.cast(num_draws, tf.int64), dtype=tf.int64) + (
        tf.cast(first_draw, tf.int64) + 1)
    return mix64(row_keys[:, tf.newaxis] +
                 _as_u64(draws)[tf.newaxis, :] * _u64(_GOLDEN))


def column(bits, num_items):
    """int64 ids in [0, C) from the 53 high bits (shape of `bits`)."""
    unit = tf.cast(tf.bitwise.right_shift(bits, _u64(11)),
                   tf.float64) * (2.0 ** -53)
    num_items = tf.cast(num_items, tf.int64)
    ids = tf.cast(unit * tf.cast(num_items, tf.float64), tf.int64)
    return tf.minimum(ids, num_items - 1)


def coin(bits):
    """float32 in [0, 1) with 24 random bits (shape of `bits`)."""
    mixed = mix64(tf.bitwise.bitwise_xor(bits, _u64(_COIN_SALT)))
    return tf.cast(tf.bitwise.right_shift(mixed, _u64(40)),
                   tf.float32) * (2.0 ** -24)


def uniform_draws(seed, step, rows, num_draws, num_items, first_draw=0):
    """int64 [R, K] uniform ids in [0, C), as the kernels generate them."""
    return column(draw_bits(seed, step, rows, num_draws, first_draw),
                  num_items)


def unigram_draws(seed, step, rows, num_draws, accept, alias, first_draw=0):
    """int64 [R, K] ids from Walker's alias table, as the kernels draw them.

    Args:
        seed, step, rows, num_draws, first_draw: as `draw_bits`.
        accept: float32 [C] probability of keeping the column.
        alias: int [C] the column's alias.
    """
    bits = draw_bits(seed, step, rows, num_draws, first_draw)
    columns = column(bits, tf.shape(accept, out_type=tf.int64)[0])
    keep = coin(bits) < tf.gather(accept, columns)
    return tf.where(keep, columns,
                    tf.cast(tf.gather(alias, columns), tf.int64))
