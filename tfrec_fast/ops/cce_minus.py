"""Sampled-negative softmax cross-entropy without [N, K] logits ("CCE-").

For row t with hidden state h_t, target y_t and K negatives n_tj (per row) or
n_j (shared), each with its sampler's log q:

    s_tc   = h_t . w_c + b_c
    s'_tj  = s_{t, n_tj} - log(K q(n_tj))     (-inf when n_tj == y_t)
    loss_t = log(exp(s_{t, y_t}) + sum_j exp(s'_tj)) - s_{t, y_t}

Negatives are either given (ids + log q from any sampler) or generated from
the counter-based RNG of `tfrec_fast.ops.counter_rng` (uniform, or unigram by
an alias table), keyed by (seed, step, row_offset + t, j), so the fused
kernels regenerate them in the backward and no [N, K] id tensor exists.

`cce_minus_reference` is the pure-TF meaning: negatives in chunks with an
online log-sum-exp, only lse [N] kept, logits recomputed in the backward; it
runs under XLA. `cce_minus` runs the fused op TfrecFastCceMinus when the op
library is loaded.

dW: dense [C, D] for per-row negatives (as IndexedSlices it would have
N (K + 1) rows, more than C in the usual case, and generated negatives have
no ids to index by); IndexedSlices of K + N rows (the draws, then the
targets) for shared negatives.
"""

import collections

import tensorflow as tf

from tfrec_fast.ops import _library
from tfrec_fast.ops import counter_rng
from tfrec_fast.ops.cut_cross_entropy import FUSED_DTYPES
from tfrec_fast.ops.cut_cross_entropy import finish_logsumexp
from tfrec_fast.ops.cut_cross_entropy import prepare_logit_inputs
from tfrec_fast.ops.validate_ids import validate_ids_reference

DEFAULT_CHUNK = 32

GivenNegatives = collections.namedtuple("GivenNegatives", ["ids", "log_q"])
GivenNegatives.__doc__ = """Negatives drawn outside the loss.

Attributes:
    ids: int [N, K] (per row) or [K] (shared by every row).
    log_q: float [same shape]: log probability of one draw of each id.
"""

GeneratedNegatives = collections.namedtuple(
    "GeneratedNegatives",
    ["num", "seed", "step", "row_offset", "unigram"])
GeneratedNegatives.__doc__ = """K negatives per row drawn inside the loss.

Attributes:
    num: K, a non-negative Python int.
    seed: int scalar (tensor or Python int).
    step: int scalar; change it every call (e.g. a sampler's draw counter).
    row_offset: int scalar added to the row index (distinct rows across
        replicas); 0 on one device.
    unigram: None for uniform draws, else (accept float32 [C], alias int64
        [C], log_q_table float32 [C]) of a `tfrec_fast.samplers.Unigram`.
"""


def generated_negatives(num, seed, step, row_offset=0, unigram=None):
    """A `GeneratedNegatives` with checked K (see its attributes)."""
    if isinstance(num, bool) or not isinstance(num, int) or num < 0:
        raise ValueError(f"num negatives must be an int >= 0, got {num!r}")
    return GeneratedNegatives(num, seed, step, row_offset, unigram)


def _log_k(num):
    """float32 log(K) computed in float64, as the kernels do (K = 0 -> 0)."""
    num = tf.cast(num, tf.float64)
    return tf.cast(tf.math.log(tf.maximum(num, 1.0)), tf.float32)


def _check_negatives(negatives, num_items, hidden=None):
    """Validates `negatives`; returns (kind, tensors) for the two paths.

    kind is "given" (ids int64, log_kq float32), "uniform" or "unigram"
    (accept, alias int64, log_q_table). `hidden` [N, D], when given, is
    checked statically against per-row ids [N, K].
    """
    if isinstance(negatives, GivenNegatives):
        ids = tf.convert_to_tensor(negatives.ids)
        log_q = tf.convert_to_tensor(negatives.log_q)
        if ids.dtype not in (tf.int32, tf.int64):
            raise ValueError(f"negative ids must be int32 or int64, got "
                             f"{ids.dtype.name}")
        if ids.shape.rank not in (1, 2):
            raise ValueError("negative ids must be [K] (shared) or [N, K] "
                             f"(per row), got shape {ids.shape}")
        if not log_q.dtype.is_floating:
            raise ValueError(f"log_q must be floating point, got "
                             f"{log_q.dtype.name}")
        if not ids.shape.is_compatible_with(log_q.shape):
            raise ValueError(f"negative ids {ids.shape} and log_q "
                             f"{log_q.shape} must have the same shape")
        if (hidden is not None and ids.shape.rank == 2
                and not ids.shape[:1].is_compatible_with(hidden.shape[:1])):
            # (The reference would fail later in an einsum, unreadably.)
            raise ValueError(f"per-row negative ids {ids.shape} must have "
                             f"the N rows of hidden {hidden.shape}")
        log_kq = (tf.cast(log_q, tf.float32) +
                  _log_k(tf.shape(ids, out_type=tf.int64)[-1]))
        return "given", (ids, log_kq)
    if isinstance(negatives, GeneratedNegatives):
        if negatives.unigram is None:
            return "uniform", ()
        accept, alias, log_q_table = negatives.unigram
        accept = tf.cast(accept, tf.float32)
        alias = tf.cast(alias, tf.int64)
        log_q_table = tf.cast(log_q_table, tf.float32)
        for name, table in (("accept", accept), ("alias", alias),
                            ("log_q_table", log_q_table)):
            if table.shape.rank is not None and table.shape.rank != 1:
                raise ValueError(f"unigram {name} must be [C], got shape "
                                 f"{table.shape}")
        return "unigram", (accept, alias, log_q_table)
    raise ValueError("negatives must be GivenNegatives or GeneratedNegatives, "
                     f"got {type(negatives).__name__}")


def _rng_key(negatives):
    if isinstance(negatives, GeneratedNegatives):
        return tf.stack([tf.cast(negatives.seed, tf.int64),
                         tf.cast(negatives.step, tf.int64),
                         tf.cast(negatives.row_offset, tf.int64)])
    return tf.zeros([3], tf.int64)


def cce_minus_reference(hidden, item_table, targets, negatives,
                        item_bias=None, remove_accidental_hits=True,
                        chunk_size=DEFAULT_CHUNK):
    """Per-row sampled softmax cross-entropy, chunked over negatives (pure TF).

    Args:
        hidden: float [N, D] hidden states.
        item_table: float [C, D] item embeddings (same dtype as hidden).
        targets: int [N] target ids in [0, C).
        negatives: `GivenNegatives` or `GeneratedNegatives`.
        item_bias: optional float [C].
        remove_accidental_hits: negatives equal to the row's target get
            probability exactly 0.
        chunk_size: negatives per chunk; peak memory is [N, chunk_size, D]
            gathered rows (per-row negatives).

    Returns:
        float32 [N] losses. Differentiable in hidden, item_table and
        item_bias (see the module docstring for the dW layout).

    Raises:
        ValueError: ranks, dtypes or static shapes that do not fit.
        tf.errors.InvalidArgumentError: ids outside [0, C) (not checked
            under XLA, which drops assertions).
    """
    hidden, item_table, item_bias, targets = prepare_logit_inputs(
        hidden, item_table, targets, item_bias)
    num_items = tf.shape(item_table, out_type=tf.int64)[0]
    kind, tensors = _check_negatives(negatives, num_items, hidden)
    if kind == "given":
        ids, log_kq = tensors
        tensors = (validate_ids_reference(ids, num_items, "negative_ids"),
                   log_kq)
    elif kind == "unigram":
        accept, alias, log_q_table = tensors
        tensors = (accept, validate_ids_reference(alias, num_items,
                                                  "alias_index"),
                   log_q_table)
    num = None if kind == "given" else negatives.num
    return _cce_minus_chunked(hidden, item_table, item_bias,
                              tf.cast(targets, tf.int64), kind, tensors, num,
                              _rng_key(negatives),
                              bool(remove_accidental_hits), int(chunk_size))


class _ChunkedNegatives:
    """Chunk i of the negatives: ids, log(K q) and validity, [N or 1, chunk].

    Negatives are padded to a multiple of `chunk` so that every chunk has a
    static shape (XLA); padded ones are invalid and get -inf.
    """

    def __init__(self, kind, tensors, num, rng_key, num_rows, num_items,
                 chunk):
        self.kind, self.chunk, self.num_items = kind, chunk, num_items
        self.rng_key = rng_key
        if kind == "given":
            ids, log_kq = tensors
            self.shared = ids.shape.rank == 1
            self.num = tf.shape(ids)[-1]
            ids2 = tf.cast(ids, tf.int64)
            log_kq2 = log_kq
            if self.shared:
                ids2, log_kq2 = ids2[tf.newaxis], log_kq2[tf.newaxis]
            pad = (-self.num) % chunk
            self.ids = tf.pad(ids2, [[0, 0], [0, pad]])
            self.log_kq = tf.pad(log_kq2, [[0, 0], [0, pad]])
        else:
            self.shared = False
            self.num = tf.constant(num, tf.int32)
            self.rows = tf.range(tf.cast(num_rows, tf.int64)) + rng_key[2]
            self.log_k = _log_k(num)
            # Uniform: as the kernels, float(log(double K) - log(double C)),
            # computed once rather than per chunk.
            self.uniform_log_kq = tf.cast(
                tf.math.log(tf.cast(max(num, 1), tf.float64)) -
                tf.math.log(tf.cast(num_items, tf.float64)), tf.float32)
            if kind == "unigram":
                self.accept, self.alias, self.log_q_table = tensors
        self.num_chunks = (self.num + chunk - 1) // chunk

    def __call__(self, i):
        start = i * self.chunk
        valid = (tf.range(self.chunk) + start < self.num)[tf.newaxis]
        if self.kind == "given":
            ids = self.ids[:, start:start + self.chunk]
            log_kq = self.log_kq[:, start:start + self.chunk]
            ids.set_shape([None, self.chunk])
            log_kq.set_shape([None, self.chunk])
            return ids, log_kq, valid
        seed, step = self.rng_key[0], self.rng_key[1]
        if self.kind == "uniform":
            ids = counter_rng.uniform_draws(seed, step, self.rows, self.chunk,
                                            self.num_items, first_draw=start)
            log_kq = tf.fill(tf.shape(ids), self.uniform_log_kq)
        else:
            ids = counter_rng.unigram_draws(seed, step, self.rows, self.chunk,
                                            self.accept, self.alias,
                                            first_draw=start)
            log_kq = self.log_k + tf.gather(self.log_q_table, ids)
        return ids, log_kq, valid


def _cce_minus_chunked(hidden, item_table, item_bias, targets, kind, tensors,
                       num, rng_key, remove_hits, chunk):
    h = tf.cast(hidden, tf.float32)
    w = tf.cast(item_table, tf.float32)
    b = (item_bias if item_bias is not None
         else tf.zeros(tf.shape(w)[:1], tf.float32))
    num_items = tf.shape(w, out_type=tf.int64)[0]
    negs = _ChunkedNegatives(kind, tensors, num, rng_key, tf.shape(h)[0],
                             num_items, chunk)
    neg_inf = tf.constant(-float("inf"), tf.float32)

    def corrected_logits(h, w, b, i):
        """[N, chunk] corrected negative logits of chunk i, and its ids."""
        ids, log_kq, valid = negs(i)
        if negs.shared:
            logits = tf.matmul(h, tf.gather(w, ids[0]), transpose_b=True)
        else:
            logits = tf.einsum("td,tkd->tk", h, tf.gather(w, ids))
        logits = logits + tf.gather(b, ids) - log_kq
        keep = tf.broadcast_to(valid, tf.shape(logits))
        if remove_hits:
            keep &= tf.not_equal(ids, targets[:, tf.newaxis])
        return tf.where(keep, logits, neg_inf), ids

    @tf.custom_gradient
    def loss_fn(h, w, b):
        positive = (tf.reduce_sum(h * tf.gather(w, targets), axis=1) +
                    tf.gather(b, targets))

        def body(i, running_max, running_sum):
            logits, _ = corrected_logits(h, w, b, i)
            tile_max = tf.reduce_max(logits, axis=1)
            new_max = tf.maximum(running_max, tile_max)
            running_sum = (running_sum * tf.exp(running_max - new_max) +
                           tf.reduce_sum(tf.exp(logits - new_max[:, None]),
                                         axis=1))
            return i + 1, new_max, running_sum

        # The positive starts the running (max, sum): every row has a finite
        # max unless its own logit is +-inf or NaN.
        # parallel_iterations=1 (here and in the backward): one tile alive
        # at a time; TF's default runs 10 iterations at once (10x memory).
        _, running_max, running_sum = tf.while_loop(
            lambda i, *_: i < negs.num_chunks, body,
            (tf.constant(0), positive, tf.ones_like(positive)),
            parallel_iterations=1)
        lse = finish_logsumexp(running_max, running_sum)
        loss = lse - positive

        def grad(d_loss):
            g = tf.cast(d_loss, tf.float32)
            d_positive = g * (tf.exp(positive - lse) - 1.0)  # [N]
            d_h = d_positive[:, tf.newaxis] * tf.gather(w, targets)

            def grad_body(i, d_h, d_w, d_b):
                logits, ids = corrected_logits(h, w, b, i)
                d_logits = tf.exp(logits - lse[:, tf.newaxis]) * g[:, None]
                if negs.shared:
                    rows = tf.gather(w, ids[0])  # [chunk, D]
                    d_h += tf.matmul(d_logits, rows)
                    d_w = d_w.write(i, tf.matmul(d_logits, h,
                                                 transpose_a=True))
                    d_b = d_b.write(i, tf.reduce_sum(d_logits, axis=0))
                else:
                    d_h += tf.einsum("tk,tkd->td", d_logits,
                                     tf.gather(w, ids))
                    d_w = tf.tensor_scatter_nd_add(
                        d_w, tf.reshape(ids, [-1, 1]),
                        tf.reshape(d_logits[:, :, tf.newaxis] *
                                   h[:, tf.newaxis, :], [-1, tf.shape(h)[1]]))
                    d_b = tf.tensor_scatter_nd_add(
                        d_b, tf.reshape(ids, [-1, 1]),
                        tf.reshape(d_logits, [-1]))
                return i + 1, d_h, d_w, d_b

            if negs.shared:
                n = negs.num_chunks
                init = (tf.TensorArray(tf.float32, size=n,
                                       element_shape=[chunk, None]),
                        tf.TensorArray(tf.float32, size=n,
                                       element_shape=[chunk]))
            else:
                init = (tf.zeros_like(w), tf.zeros_like(b))
            _, d_h, d_w, d_b = tf.while_loop(
                lambda i, *_: i < negs.num_chunks, grad_body,
                (tf.constant(0), d_h) + init,
                parallel_iterations=1)
            d_pos_rows = d_positive[:, tf.newaxis] * h
            if negs.shared:
                num = negs.num
                values = tf.concat([
                    tf.reshape(d_w.stack(), [-1, tf.shape(h)[1]])[:num],
                    d_pos_rows], axis=0)
                indices = tf.concat([negs.ids[0, :num], targets], axis=0)
                d_w = tf.IndexedSlices(values, indices,
                                       tf.shape(w, out_type=tf.int64))
                d_b = tf.math.unsorted_segment_sum(
                    tf.concat([tf.reshape(d_b.stack(), [-1])[:num],
                               d_positive], axis=0), indices, num_items)
            else:
                d_w = tf.tensor_scatter_nd_add(d_w, targets[:, tf.newaxis],
                                               d_pos_rows)
                d_b = tf.tensor_scatter_nd_add(d_b, targets[:, tf.newaxis],
                                               d_positive)
            return d_h, d_w, d_b

        return loss, grad

    return loss_fn(h, w, b)


def cce_minus(hidden, item_table, targets, negatives, item_bias=None,
              remove_accidental_hits=True, use_fused=None):
    """Per-row sampled softmax cross-entropy without [N, K] logits.

    Same meaning as `cce_minus_reference`; runs the fused op when the op
    library is loaded (else the reference, after one OpLibraryWarning).
    Custom ops have no XLA kernels: under `jit_compile=True` pass
    `use_fused=False`.

    Args:
        hidden: float [N, D] hidden states (float32, float16 or bfloat16 for
            the fused op; computed in float32).
        item_table: float [C, D] item embeddings, same dtype as hidden.
        targets: int32/int64 [N] target ids in [0, C).
        negatives: `GivenNegatives(ids, log_q)` (ids [N, K] per row or [K]
            shared) or `generated_negatives(num, seed, step, row_offset,
            unigram)` (K per row, drawn inside the op).
        item_bias: optional float [C].
        remove_accidental_hits: negatives equal to the row's target get
            probability exactly 0.
        use_fused: True to require the fused op, False for the reference,
            None to pick.

    Returns:
        float32 [N] losses.

    Raises:
        ValueError: ranks, dtypes or static shapes that do not fit.
        tf.errors.InvalidArgumentError: ids outside [0, C).
    """
    module = None if use_fused is False else _library.fused_module(
        "tfrec_fast_cce_minus", "TfrecFastCceMinus", use_fused)
    hidden_t = tf.convert_to_tensor(hidden)
    if module is not None and hidden_t.dtype not in FUSED_DTYPES:
        if use_fused:
            raise ValueError("use_fused=True: the fused cce_minus takes "
                             "float32, float16 or bfloat16, got "
                             f"{hidden_t.dtype.name}")
        module = None
    if module is None:
        return cce_minus_reference(
            hidden_t, item_table, targets, negatives, item_bias=item_bias,
            remove_accidental_hits=remove_accidental_hits)
    hidden, item_table, item_bias, targets = prepare_logit_inputs(
        hidden_t, item_table, targets, item_bias, check_targets=False)
    num_items = tf.shape(item_table, out_type=tf.int64)[0]
    kind, tensors = _check_negatives(negatives, num_items, hidden)
    empty_f = tf.zeros([0], tf.float32)
    empty_i = tf.zeros([0], targets.dtype)
    ids, log_kq = empty_i, empty_f
    accept, alias, log_q_table = empty_f, tf.zeros([0], tf.int64), empty_f
    num = 0
    if kind == "given":
        ids, log_kq = tensors
        ids = tf.cast(ids, targets.dtype)
    else:
        num = negatives.num
        if kind == "unigram":
            accept, alias, log_q_table = tensors
    bias = item_bias if item_bias is not None else empty_f
    loss, _ = module.tfrec_fast_cce_minus(
        hidden, item_table, bias, targets, ids, log_kq, accept, alias,
        log_q_table, _rng_key(negatives), sampling=kind, num_negatives=num,
        remove_accidental_hits=bool(remove_accidental_hits))
    return loss


@tf.RegisterGradient("TfrecFastCceMinus")
def _cce_minus_grad(op, d_loss, d_logsumexp):
    """d_hidden, d_item_table (dense or IndexedSlices), d_item_bias."""
    del d_logsumexp  # an auxiliary output, not differentiated
    inputs = list(op.inputs)
    module = _library.DEFAULT_LIBRARY.module()
    d_hidden, d_table, d_bias = module.tfrec_fast_cce_minus_grad(
        *inputs, op.outputs[1], d_loss,
        sampling=op.get_attr("sampling"),
        num_negatives=op.get_attr("num_negatives"),
        remove_accidental_hits=op.get_attr("remove_accidental_hits"))
    item_table, item_bias, targets, ids = inputs[1:5]
    shared = (op.get_attr("sampling") == b"given" and ids.shape.rank == 1)
    if shared:
        # Compact rows of concat(negative ids, targets): IndexedSlices.
        indices = tf.concat([tf.cast(ids, tf.int64),
                             tf.cast(targets, tf.int64)], axis=0)
        d_table = tf.IndexedSlices(d_table, indices,
                                   tf.shape(item_table, out_type=tf.int64))
        if item_bias.shape[0] != 0:
            d_bias = tf.math.unsorted_segment_sum(
                d_bias, indices, tf.shape(item_table, out_type=tf.int64)[0])
    return (d_hidden, d_table, d_bias) + (None,) * (len(inputs) - 3)

