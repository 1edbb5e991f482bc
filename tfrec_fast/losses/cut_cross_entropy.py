"""CutCrossEntropy: the full-catalog softmax loss without [N, C] logits."""

import tensorflow as tf
import tf_keras

from tfrec_fast.losses.sampled_softmax import check_reduction
from tfrec_fast.losses.sampled_softmax import check_temperature
from tfrec_fast.losses.sampled_softmax import flatten_loss_inputs
from tfrec_fast.losses.sampled_softmax import reduce_losses
from tfrec_fast.ops.cut_cross_entropy import cut_cross_entropy

Reduction = tf_keras.losses.Reduction


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class CutCrossEntropy(tf_keras.layers.Layer):
    """Full-catalog softmax cross-entropy, fused (Wijmans et al., 2025).

        loss_t = log sum_c exp(s_tc) - s_{t, y_t},
        s_tc = h_t . w_c / temperature (+ b_c)

    Equal to `full_softmax_cross_entropy` in values and gradients, but the
    [N, C] logits (and their [N, C] gradient) are never materialised: the
    fused op (or the chunked pure-TF reference when the op library is
    missing) keeps only a per-row log-sum-exp and recomputes logit tiles in
    the backward. The item-table gradient is dense [C, D]. See
    docs/fused_cross_entropy.md.

    Args:
        temperature: logits are divided by it (h is scaled before the op).
        reduction: a `tf_keras.losses.Reduction`; AUTO and
            SUM_OVER_BATCH_SIZE take the mean over rows (global under a
            strategy, see `reduce_losses`).
        use_fused: True to require the fused op, False for the pure-TF
            reference (e.g. under XLA), None to pick.

    Example:
        >>> loss = CutCrossEntropy()
        >>> hidden = tf.random.normal([6, 8])
        >>> table = tf.random.normal([100, 8])
        >>> float(loss(hidden, table, tf.constant([1, 2, 3, 4, 5, 6]))) > 0
        True
    """

    def __init__(self, temperature=1.0, reduction=Reduction.AUTO,
                 use_fused=None, **kwargs):
        super().__init__(**kwargs)
        self.temperature = check_temperature(temperature)
        self.reduction = check_reduction(reduction)
        self.use_fused = use_fused

    def get_config(self):
        config = super().get_config()
        config.update(temperature=self.temperature, reduction=self.reduction,
                      use_fused=self.use_fused)
        return config

    def call(self, hidden, item_table, targets, sample_weight=None,
             item_bias=None):
        """Computes the loss.

        Args:
            hidden: float [N, D] or RaggedTensor [B, (L), D] hidden states.
            item_table: float [C, D] item embeddings.
            targets: int [N] (or ragged [B, (L)]) target ids in [0, C).
            sample_weight: optional float [N] (or ragged [B, (L)]).
            item_bias: optional float [C] added to every logit.

        Returns:
            Scalar loss, or float32 [N] with Reduction.NONE.
        """
        hidden, item_table, targets, sample_weight = flatten_loss_inputs(
            hidden, item_table, targets, sample_weight)
        if self.temperature != 1.0:
            hidden = hidden / tf.cast(self.temperature, hidden.dtype)
        losses = cut_cross_entropy(hidden, item_table, targets,
                                   item_bias=item_bias,
                                   use_fused=self.use_fused)
        return reduce_losses(losses, sample_weight, self.reduction)
