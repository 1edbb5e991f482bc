"""Full-catalog softmax cross-entropy without the [N, C] logits.

    s_tc = h_t . w_c + b_c,  lse_t = log sum_c exp(s_tc),
    loss_t = lse_t - s_{t, y_t}

`cut_cross_entropy_reference` is the pure-TF meaning: items are processed in
chunks with an online (max, sum) log-sum-exp, only lse [N] is kept, and the
backward recomputes each chunk's logits (the "cut cross-entropy" of Wijmans
et al., 2025). Peak memory is one [N, chunk] tile instead of [N, C]. It runs
under XLA and is the test oracle and the fallback.

`cut_cross_entropy` runs the fused op TfrecFastCutCrossEntropy
(custom_ops/kernels/cut_cross_entropy.h; register-tiled, the tile never
leaves cache) when the op library is loaded, and the reference otherwise.
dW is dense [C, D] in both: every item receives gradient.
"""

import tensorflow as tf

from tfrec_fast.ops import _library
from tfrec_fast.ops.validate_ids import validate_ids_reference

# Dtypes the fused op takes (half and bfloat16 are computed in float32).
FUSED_DTYPES = (tf.float32, tf.float16, tf.bfloat16)
DEFAULT_CHUNK = 2048


def check_logit_inputs(hidden, item_table, item_bias, targets):
    """Checks ranks and dtypes shared by the fused cross-entropy losses.

    Raises:
        ValueError: a rank, dtype or static dimension that does not fit.
    """
    if hidden.shape.rank is not None and hidden.shape.rank != 2:
        raise ValueError(f"hidden must be [N, D], got shape {hidden.shape}")
    if item_table.shape.rank is not None and item_table.shape.rank != 2:
        raise ValueError(f"item_table must be [C, D], got shape "
                         f"{item_table.shape}")
    for name, x in (("hidden", hidden), ("item_table", item_table)):
        if not x.dtype.is_floating:
            raise ValueError(f"{name} must be floating point, got "
                             f"{x.dtype.name}")
    if hidden.dtype != item_table.dtype:
        raise ValueError(f"hidden ({hidden.dtype.name}) and item_table "
                         f"({item_table.dtype.name}) must share a dtype")
    if not hidden.shape[-1:].is_compatible_with(item_table.shape[-1:]):
        raise ValueError(f"hidden {hidden.shape} and item_table "
                         f"{item_table.shape} must have the same D")
    if targets.shape.rank is not None and targets.shape.rank != 1:
        raise ValueError(f"targets must be [N], got shape {targets.shape}")
    if not targets.dtype.is_integer:
        raise ValueError(f"targets must be integer, got {targets.dtype.name}")
    if not hidden.shape[:1].is_compatible_with(targets.shape):
        raise ValueError(f"hidden {hidden.shape} and targets {targets.shape} "
                         "must have the same N")
    if item_bias is not None:
        if item_bias.shape.rank is not None and item_bias.shape.rank != 1:
            raise ValueError(f"item_bias must be [C], got shape "
                             f"{item_bias.shape}")
        if not item_bias.shape.is_compatible_with(item_table.shape[:1]):
            raise ValueError(f"item_bias {item_bias.shape} and item_table "
                             f"{item_table.shape} must have the same C")


def prepare_logit_inputs(hidden, item_table, targets, item_bias,
                         check_targets=True):
    """Converts and checks the inputs; returns (h, w, b float32 or None, y).

    Args:
        check_targets: check targets against [0, C) with pure-TF ops
            (InvalidArgumentError; under XLA, which drops assertions, it is
            not checked). The fused ops check their ids themselves.
    """
    hidden = tf.convert_to_tensor(hidden)
    item_table = tf.convert_to_tensor(item_table)
    targets = tf.convert_to_tensor(targets)
    if item_bias is not None:
        item_bias = tf.convert_to_tensor(item_bias)
        if not item_bias.dtype.is_floating:
            raise ValueError(f"item_bias must be floating point, got "
                             f"{item_bias.dtype.name}")
    check_logit_inputs(hidden, item_table, item_bias, targets)
    if check_targets:
        targets = validate_ids_reference(
            targets, tf.shape(item_table, out_type=tf.int64)[0], "targets")
    if item_bias is not None:
        item_bias = tf.cast(item_bias, tf.float32)
    return hidden, item_table, item_bias, targets


def pad_to_chunks(x, chunk, fill=0):
    """Pads axis 0 of `x` to a multiple of `chunk`; returns [n, chunk, ...].

    Static chunk shapes keep the reference's loops XLA-compilable.
    """
    size = tf.shape(x)[0]
    num_chunks = (size + chunk - 1) // chunk
    pad = num_chunks * chunk - size
    paddings = tf.concat([[[0, pad]],
                          tf.zeros([tf.rank(x) - 1, 2], tf.int32)], axis=0)
    padded = tf.pad(x, paddings, constant_values=fill)
    return tf.reshape(padded, tf.concat([[num_chunks, chunk],
                                         tf.shape(x)[1:]], axis=0))


def _online_logsumexp(running_max, running_sum, logits):
    """Merges a [N, k] tile of logits into the running (max, sum)."""
    tile_max = tf.reduce_max(logits, axis=1)
    new_max = tf.maximum(running_max, tile_max)
    # A row whose logits so far are all -inf keeps max -inf: shift by 0.
    shift = tf.where(tf.math.is_inf(new_max) & (new_max < 0), 0.0, new_max)
    running_sum = (running_sum * tf.exp(running_max - shift) +
                   tf.reduce_sum(tf.exp(logits - shift[:, tf.newaxis]),
                                 axis=1))
    return new_max, running_sum


def finish_logsumexp(running_max, running_sum):
    """log(sum) + max, -inf where the row had no finite logit.

    A NaN sum (a NaN logit, or a +inf one: inf - inf) stays NaN, as in the
    fused kernels; only an exact 0 (every logit -inf) gives -inf.
    """
    return tf.where(tf.equal(running_sum, 0.0),
                    tf.constant(-float("inf"), tf.float32),
                    tf.math.log(running_sum) + running_max)


def cut_cross_entropy_reference(hidden, item_table, targets, item_bias=None,
                                chunk_size=DEFAULT_CHUNK):
    """Per-row full-catalog cross-entropy, chunked over items (pure TF).

    Args:
        hidden: float [N, D] hidden states.
        item_table: float [C, D] item embeddings (same dtype as hidden).
        targets: int [N] target ids in [0, C).
        item_bias: optional float [C].
        chunk_size: items per chunk; peak memory is an [N, chunk_size] tile.

    Returns:
        float32 [N] losses. Differentiable in hidden, item_table (dense
        [C, D] gradient) and item_bias.

    Raises:
        ValueError: ranks, dtypes or static shapes that do not fit.
        tf.errors.InvalidArgumentError: targets outside [0, C).
    """
    hidden, item_table, item_bias, targets = prepare_logit_inputs(
        hidden, item_table, targets, item_bias)
    return _cut_cross_entropy_chunked(hidden, item_table, item_bias,
                                      tf.cast(targets, tf.int64),
                                      int(chunk_size))


def _cut_cross_entropy_chunked(hidden, item_table, item_bias, targets, chunk):
    # Half-precision inputs are computed in float32; the casts' gradients
    # return d_hidden and d_item_table in the input dtype.
    h = tf.cast(hidden, tf.float32)
    w = tf.cast(item_table, tf.float32)
    b = (item_bias if item_bias is not None
         else tf.zeros(tf.shape(w)[:1], tf.float32))

    @tf.custom_gradient
    def loss_fn(h, w, b):
        num_items = tf.shape(w)[0]
        w_chunks = pad_to_chunks(w, chunk)  # [n, chunk, D]
        # Padded items get -inf logits: probability 0, no gradient.
        b_chunks = pad_to_chunks(b, chunk, fill=-float("inf"))
        num_rows = tf.shape(h)[0]

        def body(i, running_max, running_sum):
            logits = (tf.matmul(h, w_chunks[i], transpose_b=True) +
                      b_chunks[i])
            running_max, running_sum = _online_logsumexp(
                running_max, running_sum, logits)
            return i + 1, running_max, running_sum

        # parallel_iterations=1 (here and in the backward): one tile alive
        # at a time; TF's default runs 10 iterations at once (10x memory).
        _, running_max, running_sum = tf.while_loop(
            lambda i, *_: i < tf.shape(w_chunks)[0], body,
            (tf.constant(0), tf.fill([num_rows], -float("inf")),
             tf.zeros([num_rows])),
            parallel_iterations=1)
        lse = finish_logsumexp(running_max, running_sum)
        target_logits = (tf.reduce_sum(h * tf.gather(w, targets), axis=1) +
                         tf.gather(b, targets))
        loss = lse - target_logits

        def grad(d_loss):
            g = tf.cast(d_loss, tf.float32)

            def grad_body(i, d_h, d_w_chunks, d_b_chunks):
                logits = (tf.matmul(h, w_chunks[i], transpose_b=True) +
                          b_chunks[i])
                d_logits = tf.exp(logits - lse[:, tf.newaxis]) * g[:, None]
                d_h += tf.matmul(d_logits, w_chunks[i])
                d_w_chunks = d_w_chunks.write(
                    i, tf.matmul(d_logits, h, transpose_a=True))
                d_b_chunks = d_b_chunks.write(i, tf.reduce_sum(d_logits, 0))
                return i + 1, d_h, d_w_chunks, d_b_chunks

            n = tf.shape(w_chunks)[0]
            _, d_h, d_w_chunks, d_b_chunks = tf.while_loop(
                lambda i, *_: i < n, grad_body,
                (tf.constant(0), tf.zeros_like(h),
                 tf.TensorArray(tf.float32, size=n,
                                element_shape=[chunk, None]),
                 tf.TensorArray(tf.float32, size=n, element_shape=[chunk])),
                parallel_iterations=1)
            d_w = tf.reshape(d_w_chunks.stack(), [-1, tf.shape(w)[1]])
            d_b = tf.reshape(d_b_chunks.stack(), [-1])
            # The -onehot(target) part of softmax - onehot, outside the loop.
            d_h -= g[:, tf.newaxis] * tf.gather(w, targets)
            d_w = d_w[:num_items] - tf.math.unsorted_segment_sum(
                g[:, tf.newaxis] * h, targets, num_items)
            d_b = d_b[:num_items] - tf.math.unsorted_segment_sum(
                g, targets, num_items)
            return d_h, d_w, d_b

        return loss, grad

    return loss_fn(h, w, b)


def cut_cross_entropy(hidden, item_table, targets, item_bias=None,
                      use_fused=None):
    """Per-row full-catalog cross-entropy without the [N, C] logits.

    Same meaning as `cut_cross_entropy_reference`; runs the fused op when the
    op library is loaded (else the reference, after one OpLibraryWarning).
    Custom ops have no XLA kernels: under `jit_compile=True` pass
    `use_fused=False`.

    Args:
        hidden: float [N, D] hidden states (float32, float16 or bfloat16 for
            the fused op; computed in float32).
        item_table: float [C, D] item embeddings, same dtype as hidden.
        targets: int32/int64 [N] target ids in [0, C).
        item_bias: optional float [C].
        use_fused: True to require the fused op, False for the reference,
            None to pick.

    Returns:
        float32 [N] losses. Gradients: hidden and item_table (dense
        [C, D]) in their dtype, item_bias float32.

    Raises:
        ValueError: ranks, dtypes or static shapes that do not fit.
        tf.errors.InvalidArgumentError: targets outside [0, C).
    """
    module = None if use_fused is False else _library.fused_module(
        "tfrec_fast_cut_cross_entropy", "TfrecFastCutCrossEntropy",
        use_fused)
    hidden, item_table, item_bias, targets = prepare_logit_inputs(
        hidden, item_table, targets, item_bias, check_targets=module is None)
    if module is not None and hidden.dtype not in FUSED_DTYPES:
        if use_fused:
            raise ValueError("use_fused=True: the fused cut_cross_entropy "
                             "takes float32, float16 or bfloat16, got "
                             f"{hidden.dtype.name}")
        module = None
        targets = validate_ids_reference(
            targets, tf.shape(item_table, out_type=tf.int64)[0], "targets")
    if module is None:
        return _cut_cross_entropy_chunked(hidden, item_table, item_bias,
                                          tf.cast(targets, tf.int64),
                                          DEFAULT_CHUNK)
    bias = item_bias if item_bias is not None else tf.zeros([0], tf.float32)
    loss, _ = module.tfrec_fast_cut_cross_entropy(hidden, item_table, bias,
                                                  targets)
    return loss


@tf.RegisterGradient("TfrecFastCutCrossEntropy")
def _cut_cross_entropy_grad(op, d_loss, d_logsumexp):
    """d_hidden, d_item_table (dense), d_item_bias; none for targets."""
    del d_logsumexp  # an auxiliary output, not differentiated
    hidden, item_table, item_bias, targets = op.inputs
    module = _library.DEFAULT_LIBRARY.module()
    d_hidden, d_table, d_bias = module.tfrec_fast_cut_cross_entropy_grad(
        hidden, item_table, item_bias, targets, op.outputs[1], d_loss)
    return d_hidden, d_table, d_bias, None
