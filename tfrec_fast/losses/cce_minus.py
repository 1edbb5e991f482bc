"""CCEMinus: sampled softmax without [N, K] logits or gathered [N, K, D] rows."""

import tensorflow as tf
import tf_keras

from tfrec_fast import distribute
from tfrec_fast._serialization import config_with_layers
from tfrec_fast.losses.sampled_softmax import check_reduction
from tfrec_fast.losses.sampled_softmax import check_temperature
from tfrec_fast.losses.sampled_softmax import flatten_loss_inputs
from tfrec_fast.losses.sampled_softmax import reduce_losses
from tfrec_fast.ops.cce_minus import GivenNegatives
from tfrec_fast.ops.cce_minus import cce_minus
from tfrec_fast.ops.cce_minus import generated_negatives
from tfrec_fast.samplers.base import check_num
from tfrec_fast.samplers.base import check_sampler
from tfrec_fast.samplers.base import sampler_query_for
from tfrec_fast.samplers.uniform import Uniform
from tfrec_fast.samplers.unigram import Unigram

Reduction = tf_keras.losses.Reduction

# Samplers whose draws the fused kernel can generate itself.
_IN_KERNEL_SAMPLERS = (Uniform, Unigram)


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class CCEMinus(tf_keras.layers.Layer):
    """Sampled softmax cross-entropy, fused ("CCE-", arXiv 2509.09682).

    Same loss as `SampledSoftmax` (positive uncorrected, each negative's
    logit `- log(K q)`, accidental hits at probability exactly 0):

        loss_t = log(exp(s_p) + sum_j exp(s_j - log(K q_j))) - s_p

    but the fused op computes the K dot products per row in registers: no
    [N, K] logits, no gathered [N, K, D] rows, and with per-row negatives
    from a `Uniform` or `Unigram` sampler not even the [N, K] ids: the
    kernel draws them from a counter-based RNG keyed by (sampler seed, the
    sampler's draw counter, row) and regenerates them in the backward.
    Other samplers (and shared negatives) hand their ids and log q to the op.
    See docs/fused_cross_entropy.md.

    Args:
        sampler: a `tfrec_fast.samplers.CandidateSampler`.
        num_negatives: K, a positive int (ignored by in-batch samplers).
        shared: one negative set for the batch ([K]) or K per row.
        in_kernel: draw per-row negatives inside the kernel. None: whenever
            the sampler is a `Uniform` or `Unigram` and `shared` is False.
            The draws follow the sampler's distribution but not its own
            random stream (the kernel has its own RNG).
        remove_accidental_hits: negatives equal to the row's target get
            probability 0 (default).
        temperature: logits are divided by it.
        reduction: a `tf_keras.losses.Reduction` (AUTO: mean over rows).
        use_fused: True to require the fused op, False for the pure-TF
            reference, None to pick.

    Example:
        >>> from tfrec_fast.samplers import Uniform
        >>> loss = CCEMinus(Uniform(100, seed=1), num_negatives=16)
        >>> hidden = tf.random.normal([6, 8])
        >>> table = tf.random.normal([100, 8])
        >>> float(loss(hidden, table, tf.constant([1, 2, 3, 4, 5, 6]))) > 0
        True
    """

    def __init__(self, sampler, num_negatives=None, shared=False,
                 in_kernel=None, remove_accidental_hits=True,
                 temperature=1.0, reduction=Reduction.AUTO, use_fused=None,
                 **kwargs):
        super().__init__(**kwargs)
        self.sampler = check_sampler(sampler, "sampler")
        self.num_negatives = (None if num_negatives is None
                              else check_num(num_negatives, "num_negatives"))
        self.shared = bool(shared)
        can_generate = (not self.shared and
                        type(sampler) in _IN_KERNEL_SAMPLERS)
        if in_kernel and not can_generate:
            raise ValueError(
                "in_kernel=True needs per-row negatives (shared=False) from "
                "a Uniform or Unigram sampler, got "
                f"{type(sampler).__name__} with shared={self.shared}")
        self.in_kernel = can_generate if in_kernel is None else bool(
            in_kernel)
        if self.in_kernel and self.num_negatives is None:
            raise ValueError("num_negatives is required with a "
                             f"{type(sampler).__name__} sampler")
        self.remove_accidental_hits = bool(remove_accidental_hits)
        self.temperature = check_temperature(temperature)
        self.reduction = check_reduction(reduction)
        self.use_fused = use_fused

    def get_config(self):
        config = super().get_config()
        config.update(
            sampler=tf_keras.layers.serialize(self.sampler),
            num_negatives=self.num_negatives, shared=self.shared,
            in_kernel=self.in_kernel,
            remove_accidental_hits=self.remove_accidental_hits,
            temperature=self.temperature, reduction=self.reduction,
            use_fused=self.use_fused)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config_with_layers(config, ("sampler",),
                                        custom_objects))

    def _negatives(self, hidden, item_table, targets, sampler_query):
        if self.in_kernel:
            # The draw counter makes every call's draws new and restores
            # with the checkpoint; the row offset separates replicas.
            step = self.sampler.draw_counter.assign_add(1,
                                                        read_value=True) - 1
            unigram = None
            if isinstance(self.sampler, Unigram):
                unigram = (self.sampler.accept, self.sampler.alias,
                           self.sampler.log_q_table)
            return generated_negatives(
                self.num_negatives, self.sampler.seed, step,
                distribute.replica_row_offset(tf.shape(hidden)[0]), unigram)
        ids, log_q = self.sampler.sample(
            sampler_query_for(self.sampler, hidden, sampler_query),
            self.num_negatives, shared=self.shared,
            positives=tf.cast(targets, tf.int64), item_table=item_table)
        return GivenNegatives(ids, log_q)

    def call(self, hidden, item_table, targets, sample_weight=None,
             item_bias=None, sampler_query=None):
        """Computes the loss.

        A sampler that learns from rewards (`CollaborativeSampler`) gets
        none here: the fused op never forms the negatives' logits. Train it
        through `SampledSoftmax` / `SampledRetrieval`, or keep it fixed.

        Args:
            hidden: float [N, D] or RaggedTensor [B, (L), D] hidden states.
            item_table: float [C, D] item embeddings.
            targets: int [N] (or ragged [B, (L)]) target ids in [0, C).
            sample_weight: optional float [N] (or ragged [B, (L)]).
            item_bias: optional float [C] added to every logit.
            sampler_query: int [N] user ids, for samplers that condition on
                the user (`takes_user_ids`); other samplers ignore it.

        Returns:
            Scalar loss, or float32 [N] with Reduction.NONE.
        """
        hidden, item_table, targets, sample_weight = flatten_loss_inputs(
            hidden, item_table, targets, sample_weight)
        # The sampler sees the unscaled hidden states (as in SampledSoftmax).
        negatives = self._negatives(hidden, item_table, targets,
                                    sampler_query)
        if self.temperature != 1.0:
            hidden = hidden / tf.cast(self.temperature, hidden.dtype)
        losses = cce_minus(hidden, item_table, targets, negatives,
                           item_bias=item_bias,
                           remove_accidental_hits=self.remove_accidental_hits,
                           use_fused=self.use_fused)
        return reduce_losses(losses, sample_weight, self.reduction)
