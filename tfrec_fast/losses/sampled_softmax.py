"""Sampled softmax: the positive against K sampled negatives, logQ-corrected.

Pieces, each usable alone (tasks compose them the way TFRS composes its loss
layers):

- `accidental_hits`: which negatives equal a row's positive (or any of the
  row's listed positives).
- `corrected_softmax_cross_entropy`: per-row loss from positive and negative
  logits, the `- log(K q)` correction and the hit mask.
- `SampledSoftmax`: the Keras loss layer over hidden states, an item table
  and a `CandidateSampler`.

Correction: a candidate drawn with probability q per draw out of K draws has
expected count K q among the negatives, so its logit gets `- log(K q)`; then
the sampled softmax is a consistent estimate of the full softmax (Bengio &
Senecal 2008; Blanc & Rendle 2018). Popular items are drawn more often and
so are pushed down less per draw: their corrected logit goes *down*
(subtract log q; TFRS once added it).
"""

import numpy as np
import tensorflow as tf
import tf_keras

from tfrec_fast import distribute
from tfrec_fast._serialization import config_with_layers
from tfrec_fast.ops.validate_ids import validate_ids
from tfrec_fast.samplers.base import check_num
from tfrec_fast.samplers.base import check_positive_correction
from tfrec_fast.samplers.base import sampler_query_for

Reduction = tf_keras.losses.Reduction


def accidental_hits(negative_ids, positives, listed_positives=None):
    """Marks negatives that are in fact positives of the row.

    Args:
        negative_ids: int [K] shared or [T, K] per-row candidate ids.
        positives: int [T] positive id of each row.
        listed_positives: optional int RaggedTensor [T, (P)]: further ids
            that count as positives of each row (e.g. everything the user
            interacted with).

    Returns:
        bool [T, K]: True where the candidate must get probability zero.

    Raises:
        ValueError: non-integer ids, or ranks / rows that do not fit (ids
            are compared, never looked up, so their range is not checked).
    """
    negative_ids = tf.convert_to_tensor(negative_ids)
    positives = tf.convert_to_tensor(positives)
    for name, ids in (("negative_ids", negative_ids),
                      ("positives", positives)):
        if not ids.dtype.is_integer:
            raise ValueError(f"{name} must be integer ids, got "
                             f"{ids.dtype.name}")
    if negative_ids.shape.rank not in (None, 1, 2):
        raise ValueError(f"negative_ids must be [K] (shared) or [T, K] (per "
                         f"row), got shape {negative_ids.shape}")
    if positives.shape.rank not in (None, 1):
        raise ValueError(f"positives must be [T], got shape "
                         f"{positives.shape}")
    if negative_ids.shape.rank == 2 and \
            not negative_ids.shape[:1].is_compatible_with(positives.shape):
        raise ValueError(f"per-row negative_ids {negative_ids.shape} must "
                         f"have the T rows of positives {positives.shape}")
    negative_ids = tf.cast(negative_ids, tf.int64)
    positives = tf.cast(positives, tf.int64)
    # tf.equal, not ==: a Tensor's == answers a plain False for shapes that
    # do not broadcast instead of raising.
    if negative_ids.shape.rank == 1:
        hits = tf.equal(positives[:, tf.newaxis], negative_ids[tf.newaxis, :])
    else:
        hits = tf.equal(positives[:, tf.newaxis], negative_ids)
    if listed_positives is None:
        return hits
    listed = tf.cast(listed_positives.flat_values, tf.int64)  # [N]
    rows = listed_positives.value_rowids()  # [N]
    if negative_ids.shape.rank == 1:
        listed_hits = listed[:, tf.newaxis] == negative_ids[tf.newaxis, :]
    else:
        listed_hits = (listed[:, tf.newaxis]
                       == tf.gather(negative_ids, rows))  # [N, K]
    listed_hits = tf.math.unsorted_segment_max(
        tf.cast(listed_hits, tf.int32), rows, tf.shape(positives)[0]) > 0
    return hits | listed_hits


def corrected_softmax_cross_entropy(positive_logits, negative_logits,
                                    negative_log_q, num_draws,
                                    positive_log_q=None, hits=None):
    """Per-row sampled softmax cross-entropy with the logQ correction.

    Args:
        positive_logits: float [T] logit of each row's positive.
        negative_logits: float [T, K] logits of the candidates.
        negative_log_q: float [K] or [T, K] log probability of one draw of
            each candidate.
        num_draws: K used in the correction (int or scalar tensor): the
            number of draws the candidates came from.
        positive_log_q: optional float [T]; when given the positive logit is
            corrected too (`- log(K q)`), as when positives are themselves
            sampled (in-batch candidates).
        hits: optional bool [T, K]; True entries get probability exactly 0.

    Returns:
        float32 [T]: logsumexp(corrected logits) - corrected positive logit.

    Raises:
        ValueError: ranks or rows that do not fit, non-bool hits, or a
            static num_draws < 1 with negatives (log(K q) would be -inf).
    """
    positive_logits = tf.convert_to_tensor(positive_logits)
    negative_logits = tf.convert_to_tensor(negative_logits)
    if positive_logits.shape.rank not in (None, 1):
        raise ValueError(f"positive_logits must be [T], got shape "
                         f"{positive_logits.shape}")
    if negative_logits.shape.rank not in (None, 2):
        raise ValueError(f"negative_logits must be [T, K], got shape "
                         f"{negative_logits.shape}")
    if not negative_logits.shape[:1].is_compatible_with(
            positive_logits.shape[:1]):
        raise ValueError(f"negative_logits {negative_logits.shape} and "
                         f"positive_logits {positive_logits.shape} must "
                         "have the same T")
    if hits is not None and tf.convert_to_tensor(hits).dtype != tf.bool:
        raise ValueError(f"hits must be bool [T, K], got "
                         f"{tf.convert_to_tensor(hits).dtype.name}")
    static_draws = tf.get_static_value(num_draws)
    if (static_draws is not None and static_draws < 1
            and negative_logits.shape[-1] != 0):
        raise ValueError(f"num_draws must be >= 1 when there are negatives, "
                         f"got {static_draws}")
    log_k = tf.math.log(tf.cast(num_draws, tf.float32))
    negative_logits = tf.cast(negative_logits, tf.float32) - (
        log_k + tf.cast(negative_log_q, tf.float32))
    positive_logits = tf.cast(positive_logits, tf.float32)
    if positive_log_q is not None:
        positive_logits -= log_k + tf.cast(positive_log_q, tf.float32)
    if hits is not None:
        # -inf, not a large negative number: exp(-inf) is exactly 0 and the
        # gradient through tf.where to a masked entry is exactly 0.
        negative_logits = tf.where(
            hits, tf.constant(-float("inf"), tf.float32), negative_logits)
    logits = tf.concat([positive_logits[:, tf.newaxis], negative_logits], 1)
    return tf.reduce_logsumexp(logits, axis=1) - positive_logits


def reduce_losses(losses, sample_weight, reduction):
    """Keras reduction of per-row losses, correct under tf.distribute.

    SUM_OVER_BATCH_SIZE (and AUTO) divide by the number of rows of the
    *global* batch: inside a replica of a strategy with N > 1 replicas each
    replica returns its share, sum(w * loss) / global_rows, so that the sum
    over replicas (what gradient all-reduce and Keras' reported loss
    compute) equals the single-device mean on the same global batch.

    Args:
        losses: float [T].
        sample_weight: optional float [T] or scalar.
        reduction: a `tf_keras.losses.Reduction` value.

    Returns:
        [T] for NONE, else a scalar.
    """
    if sample_weight is not None:
        losses *= tf.cast(sample_weight, losses.dtype)
    if reduction == Reduction.NONE:
        return losses
    total = tf.reduce_sum(losses)
    if reduction == Reduction.SUM:
        return total
    rows = tf.cast(tf.size(losses), losses.dtype)
    return tf.math.divide_no_nan(total, distribute.sum_across_replicas(rows))


def check_temperature(temperature):
    """A finite temperature > 0 as a float; ValueError naming it otherwise."""
    if (isinstance(temperature, bool)
            or not isinstance(temperature, (int, float, np.floating))
            or not np.isfinite(temperature) or not temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, "
                         f"got {temperature!r}")
    return float(temperature)


def check_reduction(reduction):
    Reduction.validate(reduction)
    return reduction


def flatten_loss_inputs(hidden, item_table, targets, sample_weight):
    """The inputs of a fused loss layer as [N, D], [C, D] (hidden's dtype),
    [N] and [N] (or None), from dense or ragged [B, (L), ...] ones."""
    if isinstance(sample_weight, tf.RaggedTensor):
        sample_weight = sample_weight.flat_values
    hidden, targets = flatten_rows(hidden, targets, "targets")
    item_table = tf.convert_to_tensor(item_table)
    if item_table.dtype != hidden.dtype:
        item_table = tf.cast(item_table, hidden.dtype)
    return hidden, item_table, targets, sample_weight


def flatten_rows(hidden, positives, ids_name="positives"):
    """Flattens ragged [B, (L), D] / [B, (L)] inputs to [T, D] / [T].

    `ids_name` is the name of `positives` in the caller's signature (for
    the error messages, e.g. "targets").
    """
    if isinstance(hidden, tf.RaggedTensor) != isinstance(
            positives, tf.RaggedTensor):
        raise ValueError(f"hidden and {ids_name} must both be ragged or "
                         "both dense")
    if isinstance(hidden, tf.RaggedTensor):
        if hidden.ragged_rank != 1 or positives.ragged_rank != 1:
            raise ValueError(f"ragged hidden / {ids_name} must have ragged "
                             "rank 1 ([B, (L), D] and [B, (L)])")
        tf.debugging.assert_equal(
            hidden.row_splits, tf.cast(positives.row_splits,
                                       hidden.row_splits.dtype),
            message=f"hidden and {ids_name} must have the same row lengths")
        hidden, positives = hidden.flat_values, positives.flat_values
    hidden = tf.convert_to_tensor(hidden)
    positives = tf.convert_to_tensor(positives)
    if hidden.shape.rank != 2:
        raise ValueError(f"hidden must be [T, D] or ragged [B, (L), D], got "
                         f"shape {hidden.shape}")
    if positives.shape.rank != 1:
        raise ValueError(f"{ids_name} must be [T] (or ragged [B, (L)]), got "
                         f"shape {positives.shape}")
    if not positives.dtype.is_integer:
        raise ValueError(f"{ids_name} must be integer ids, got "
                         f"{positives.dtype.name}")
    if not hidden.dtype.is_floating:
        raise ValueError(f"hidden must be floating point, got "
                         f"{hidden.dtype.name}")
    if not hidden.shape[:1].is_compatible_with(positives.shape):
        raise ValueError(f"hidden {hidden.shape} and {ids_name} "
                         f"{positives.shape} must have the same number of "
                         "rows T")
    return hidden, positives


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class SampledSoftmax(tf_keras.layers.Layer):
    """Sampled softmax cross-entropy over an item table.

    For each row t with hidden state h_t and positive p_t, draws K negatives
    from `sampler` (shared by all rows or per row) and computes

        loss_t = logsumexp([s_p, s_1 - log(K q_1), ..., s_K - log(K q_K)])
                 - s_p,    s_j = h_t . w_j / temperature (+ bias_j)

    where negatives equal to p_t (or to any of the row's `listed_positives`)
    get probability exactly 0. With `correct_positive=True` the positive's
    logit is corrected by `- log(K q_p)` too (appropriate when positives are
    themselves drawn from q, e.g. in-batch candidates; `q_p` then comes from
    `sampler.log_prob`).

    Args:
        sampler: a `tfrec_fast.samplers.CandidateSampler`.
        num_negatives: K, a positive int (ignored by in-batch samplers,
            whose candidates are the batch's positives).
        shared: one negative set for the whole batch ([K] ids, one matmul)
            or per row ([T, K], gathers [T, K, D] rows).
        correct_positive: subtract log(K q) from the positive logit too.
        remove_accidental_hits: give hits probability 0 (default). Turn off
            only to measure what hits cost.
        temperature: logits are divided by it before the correction.
        global_negatives: under a `tf.distribute` strategy, gather the
            candidate ids and log q of every replica so that each row is
            scored against all N * K negatives (shared negatives only). The
            item table is mirrored, so candidate rows are looked up locally
            and gradients stay exact.
        reduction: a `tf_keras.losses.Reduction`; AUTO and
            SUM_OVER_BATCH_SIZE take the mean over rows (see
            `reduce_losses` for the scaling under a strategy).
    """

    def __init__(self, sampler, num_negatives=None, shared=True,
                 correct_positive=False, remove_accidental_hits=True,
                 temperature=1.0, global_negatives=False,
                 reduction=Reduction.AUTO, **kwargs):
        super().__init__(**kwargs)
        self.sampler = sampler
        self.num_negatives = (None if num_negatives is None
                              else check_num(num_negatives, "num_negatives"))
        self.shared = bool(shared)
        self.correct_positive = bool(correct_positive)
        check_positive_correction(sampler, self.correct_positive)
        self.remove_accidental_hits = bool(remove_accidental_hits)
        self.temperature = check_temperature(temperature)
        if global_negatives and not shared:
            raise ValueError("global_negatives needs shared negatives: "
                             "per-row negatives belong to their rows")
        self.global_negatives = bool(global_negatives)
        self.reduction = check_reduction(reduction)

    def get_config(self):
        config = super().get_config()
        config.update(
            sampler=tf_keras.layers.serialize(self.sampler),
            num_negatives=self.num_negatives, shared=self.shared,
            correct_positive=self.correct_positive,
            remove_accidental_hits=self.remove_accidental_hits,
            temperature=self.temperature,
            global_negatives=self.global_negatives,
            reduction=self.reduction)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config_with_layers(config, ("sampler",),
                                        custom_objects))

    def call(self, hidden, item_table, positives, sample_weight=None,
             listed_positives=None, item_bias=None, sampler_query=None):
        """Computes the loss.

        Args:
            hidden: float [T, D] or RaggedTensor [B, (L), D] hidden states.
            item_table: float [C, D] item embeddings.
            positives: int [T] (or ragged [B, (L)]) positive ids.
            sample_weight: optional float [T] (or ragged [B, (L)]) weights.
            listed_positives: optional int RaggedTensor [T, (P)] of further
                ids that must never count as negatives of row t.
            item_bias: optional float [C] added to every logit.
            sampler_query: int [T] user ids, for samplers that condition on
                the user (`takes_user_ids`, e.g. `CollaborativeSampler`);
                other samplers ignore it.

        Returns:
            Scalar loss, or float32 [T] with Reduction.NONE.
        """
        if isinstance(sample_weight, tf.RaggedTensor):
            sample_weight = sample_weight.flat_values
        hidden, positives = flatten_rows(hidden, positives)
        item_table = tf.convert_to_tensor(item_table)
        if item_table.shape.rank != 2:
            raise ValueError(f"item_table must be [C, D], got shape "
                             f"{item_table.shape}")
        num_items = tf.shape(item_table, out_type=tf.int64)[0]
        positives = tf.cast(validate_ids(positives, num_items,
                                         arg_name="positives"), tf.int64)
        if listed_positives is not None:
            listed_positives = validate_ids(listed_positives, num_items,
                                            arg_name="listed_positives")
        query = sampler_query_for(self.sampler, hidden, sampler_query)

        ids, log_q = self.sampler.sample(
            query, self.num_negatives, shared=self.shared,
            positives=positives, item_table=item_table)
        ids = validate_ids(ids, num_items, arg_name="sampled ids")
        if self.global_negatives:
            ids, log_q = distribute.gather_across_replicas((ids, log_q),
                                                           differentiable=False)
        num_draws = tf.shape(ids)[-1]

        logits_dtype = hidden.dtype
        table = tf.cast(item_table, logits_dtype)
        positive_logits = tf.reduce_sum(
            hidden * tf.gather(table, positives), axis=1)
        if ids.shape.rank == 1:  # shared
            negative_logits = tf.matmul(hidden, tf.gather(table, ids),
                                        transpose_b=True)  # [T, K]
        else:
            negative_logits = tf.einsum("td,tkd->tk", hidden,
                                        tf.gather(table, ids))
        positive_logits = tf.cast(positive_logits, tf.float32)
        negative_logits = tf.cast(negative_logits, tf.float32)
        if self.temperature != 1.0:
            positive_logits /= self.temperature
            negative_logits /= self.temperature
        if item_bias is not None:
            item_bias = tf.cast(item_bias, tf.float32)
            positive_logits += tf.gather(item_bias, positives)
            negative_logits += tf.gather(item_bias, ids)

        positive_log_q = None
        if self.correct_positive:
            positive_log_q = self.sampler.log_prob(
                query, positives[:, tf.newaxis])[:, 0]
        hits = None
        if self.remove_accidental_hits:
            hits = accidental_hits(ids, positives, listed_positives)
        if getattr(self.sampler, "learns_from_rewards", False) and \
                ids.shape.rank == 2:
            # The sampler learns from the loss on its own negatives.
            self.sampler.add_reward_loss(query, ids, negative_logits,
                                         positive_logits, observed=hits)
        losses = corrected_softmax_cross_entropy(
            positive_logits, negative_logits, log_q, num_draws,
            positive_log_q=positive_log_q, hits=hits)
        return reduce_losses(losses, sample_weight, self.reduction)
