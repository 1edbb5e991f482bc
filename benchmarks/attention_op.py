"""Packed attention, forward + backward: fused op vs padded TF paths.

    python benchmarks/attention_op.py --json out.json [--quick] [--repeats N]

B sequences with lengths uniform in [0.2 L, L], H heads of size Dh. Measured
(one tf.function step: attention, a weighted sum, gradients):
  tfrec_fast.ragged_attention      the fused op on packed [T, H, Dh]
  tf.padded_reference              ragged_attention_reference (pads in memory)
  tf_keras.mha_core_padded         tf_keras MultiHeadAttention's attention core
                                   (_compute_attention) on padded [B, L, H, Dh]
                                   with a [B, L, L] mask
and, for a whole attention layer with model width D = H * Dh:
  tfrec_fast.ragged_attention+projections   Q/K/V/output projections on the
                                   packed tokens around the fused op
  tf_keras.MultiHeadAttention      the tf_keras layer on padded [B, L, D]
(gradients with respect to the inputs and, for layers, their weights).

Records: impl, config {batch, max_len, heads, head_dim, causal, tokens,
padded_tokens, threads}, step_s.
"""

import os
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tfrec_fast  # noqa: E402,F401  (selects tf_keras)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import _common  # noqa: E402
from tfrec_fast import ops  # noqa: E402


def _case(rng, batch, max_len, heads, head_dim):
    lengths = rng.integers(max(1, int(0.2 * max_len)), max_len + 1,
                           size=batch)
    splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    tokens = int(splits[-1])

    def packed(d):
        return tf.constant(rng.standard_normal((tokens, heads, d)),
                           tf.float32)

    return lengths, tf.constant(splits), packed


def _padded(x, splits, max_len):  # [T, H, d] -> [B, L, H, d]
    ragged = tf.RaggedTensor.from_row_splits(x, splits)
    return ragged.to_tensor(shape=[ragged.nrows(), max_len] + x.shape[1:])


def _mask(lengths, max_len, causal):
    valid = tf.sequence_mask(lengths, max_len)
    mask = valid[:, tf.newaxis, :] & valid[:, :, tf.newaxis]
    if causal:
        mask &= tf.linalg.band_part(tf.ones((max_len, max_len), tf.bool),
                                    -1, 0)[tf.newaxis]
    return mask


def _core_step(attend, q, k, v, w):
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch([q, k, v])
            loss = tf.reduce_sum(attend(q, k, v) * w)
        grads = tape.gradient(loss, [q, k, v])
        return loss + sum(tf.reduce_sum(g) for g in grads)
    return step


def _layer_step(layer_fn, x, variables, w):
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(layer_fn(x) * w)
        grads = tape.gradient(loss, [x] + variables)
        return loss + sum(tf.reduce_sum(g) for g in grads)
    return step


def measure(batch, max_len, heads, head_dim, causal, repeats, rng):
    lengths, splits, packed = _case(rng, batch, max_len, heads, head_dim)
    q, k, v, w = (packed(head_dim) for _ in range(4))
    config = {"batch": batch, "max_len": max_len, "heads": heads,
              "head_dim": head_dim, "causal": causal,
              "tokens": int(splits[-1]), "padded_tokens": batch * max_len,
              "threads": os.cpu_count()}
    steps = {}
    if ops.build_info()["cpu_ops"]:
        steps["tfrec_fast.ragged_attention"] = _core_step(
            lambda a, b, c: ops.ragged_attention(a, b, c, splits, causal,
                                                 use_fused=True), q, k, v, w)
    steps["tf.padded_reference"] = _core_step(
        lambda a, b, c: ops.ragged_attention(a, b, c, splits, causal,
                                             use_fused=False), q, k, v, w)

    mha = tf_keras.layers.MultiHeadAttention(heads, head_dim)
    mask = _mask(lengths, max_len, causal)
    pq, pk, pv, pw = (_padded(x, splits, max_len) for x in (q, k, v, w))
    xd = tf.reshape(pq, [batch, max_len, heads * head_dim])
    mha(xd, xd, attention_mask=mask)  # builds the layer
    steps["tf_keras.mha_core_padded"] = _core_step(
        lambda a, b, c: mha._compute_attention(  # pylint: disable=protected-access
            a, b, c, attention_mask=mask)[0], pq, pk, pv, pw)

    # Whole layers: padded tf_keras MHA vs projections + fused op.
    width = heads * head_dim
    wd = tf.reshape(pw, [batch, max_len, width])
    steps["tf_keras.MultiHeadAttention"] = _layer_step(
        lambda x: mha(x, x, attention_mask=mask), xd,
        mha.trainable_variables, wd)
    if ops.build_info()["cpu_ops"]:
        xp = tf.reshape(q, [-1, width])
        wp = tf.reshape(w, [-1, width])
        kernels = [tf.Variable(tf.random.normal([width, width], stddev=0.1))
                   for _ in range(4)]
        biases = [tf.Variable(tf.zeros([width])) for _ in range(4)]

        def packed_layer(x):
            qh, kh, vh = (tf.reshape(x @ kernels[i] + biases[i],
                                     [-1, heads, head_dim]) for i in range(3))
            att = ops.ragged_attention(qh, kh, vh, splits, causal,
                                       use_fused=True)
            return tf.reshape(att, [-1, width]) @ kernels[3] + biases[3]

        steps["tfrec_fast.ragged_attention+projections"] = _layer_step(
            packed_layer, xp, kernels + biases, wp)

    # Interleaved (one run of each per round) so that load from other
    # processes on a shared machine hits every implementation alike.
    times = {name: [] for name in steps}
    for name, step in steps.items():
        for _ in range(2):
            step().numpy()
    for _ in range(repeats):
        for name, step in steps.items():
            times[name].append(_common.median_seconds(
                lambda: step().numpy(), 1, warmup=0))
    records = []
    for name in steps:
        step_s = statistics.median(times[name])
        records.append({"impl": name, "config": config, "step_s": step_s})
        print(f"{name:45s} L={max_len:4d} causal={causal!s:5s} "
              f"{step_s * 1e3:9.2f} ms", file=sys.stderr, flush=True)
    return records


def main():
    args = _common.parse_args(__doc__.splitlines()[0])
    rng = np.random.default_rng(0)
    lens = [50, 200] if args.quick else [50, 200, 512]
    records = []
    for causal in (True, False):
        for max_len in lens:
            records += measure(64, max_len, 2, 32, causal, args.repeats, rng)
    _common.write(records, args)


if __name__ == "__main__":
    main()
