"""NextItemTask: the loss layer of a sequential (next-item) recommender."""

import tensorflow as tf
import tf_keras

from tfrec_fast.losses.full_softmax import full_softmax_cross_entropy
from tfrec_fast.ops.validate_ids import validate_ids


class NextItemTask(tf_keras.layers.Layer):
    """Mean next-item loss over all (unpadded) positions of a batch.

    Like `tfrs.tasks.Retrieval`, it is a layer a `tfrs.Model` calls from
    `compute_loss`. The per-position loss is pluggable; the default is the
    full-catalog softmax cross-entropy reference.

    Args:
        loss_fn: callable (hidden [T, D], item_table [C, D], targets [T]) ->
            per-position losses [T]. Defaults to `full_softmax_cross_entropy`.
    """

    def __init__(self, loss_fn=None, **kwargs):
        super().__init__(**kwargs)
        self.loss_fn = loss_fn or full_softmax_cross_entropy

    def call(self, hidden, item_table, targets, sample_weight=None):
        """Computes the loss.

        Args:
            hidden: float [T, D] hidden states of every position.
            item_table: float [C, D] item embeddings (output side).
            targets: int [T] next item of every position.
            sample_weight: optional float [T] weights.

        Returns:
            Scalar float32: the weighted mean per-position loss.
        """
        targets = validate_ids(targets, tf.shape(item_table, out_type=tf.int64)[0],
                               arg_name="targets")
        losses = self.loss_fn(hidden, item_table, targets)
        if sample_weight is None:
            return tf.reduce_mean(losses)
        sample_weight = tf.cast(sample_weight, losses.dtype)
        return tf.math.divide_no_nan(tf.reduce_sum(losses * sample_weight),
                                     tf.reduce_sum(sample_weight))
