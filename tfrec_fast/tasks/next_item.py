"""NextItemTask: the loss layer of a sequential (next-item) recommender."""

import tensorflow as tf
import tf_keras

from tfrec_fast._serialization import config_with_layers
from tfrec_fast import distribute
from tfrec_fast.losses.full_softmax import full_softmax_cross_entropy
from tfrec_fast.ops.validate_ids import validate_ids

Reduction = tf_keras.losses.Reduction


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class NextItemTask(tf_keras.layers.Layer):
    """Next-item loss over all (unpadded) positions of a batch.

    Like `tfrs.tasks.Retrieval`, it is a layer a `tfrs.Model` calls from
    `compute_loss`. The loss is pluggable:

    - a per-position callable `(hidden [T, D], item_table [C, D],
      targets [T]) -> losses [T]` (default: the full-catalog softmax
      cross-entropy reference); the task returns the weighted mean
      `sum(w * loss) / sum(w)` (w = 1 without `sample_weight`);
    - a loss layer with a Keras `reduction` (e.g.
      `tfrec_fast.losses.SampledSoftmax(sampler, num_negatives)`), called
      as `loss(hidden, item_table, targets, sample_weight=...)`: it reduces
      itself (Keras semantics; AUTO is the mean over positions). A layer
      with Reduction.NONE returns [T] losses and the task takes the weighted
      mean as for a callable. The layer is tracked by the task, so its
      variables (sampler state) are the model's and checkpoints carry them.

    Under a `tf.distribute` strategy the mean divides by the total (weight)
    over *all* replicas, so the sum of the replicas' losses (what
    `tf_keras` reports and the summed gradients optimise) is the mean over
    the global batch.

    Mixed precision: under a `mixed_float16` / `mixed_bfloat16` policy the
    loss gets `hidden` in the compute dtype (Keras autocasts it) and
    `item_table` as passed (a float32 variable when it comes from a
    `tf_keras.layers.Embedding`, which does not autocast its table). The
    package's losses cast the table to hidden's dtype, compute the
    log-softmax in float32 and return float32; a custom callable must
    accept the two dtypes too. The task's mean is float32.

    Args:
        loss_fn: the per-position callable or loss layer described above.
            Defaults to `full_softmax_cross_entropy`.
    """

    def __init__(self, loss_fn=None, **kwargs):
        super().__init__(**kwargs)
        if loss_fn is not None and not callable(loss_fn):
            raise ValueError(f"loss_fn must be callable (a per-position loss "
                             f"function or a loss layer), got {loss_fn!r}")
        self.loss_fn = loss_fn or full_softmax_cross_entropy

    def get_config(self):
        """Config; the loss must be a Keras layer or the default function.

        Raises:
            NotImplementedError: `loss_fn` is a custom plain callable.
        """
        config = super().get_config()
        if self.loss_fn is full_softmax_cross_entropy:
            config["loss_fn"] = None
        elif isinstance(self.loss_fn, tf_keras.layers.Layer):
            config["loss_fn"] = tf_keras.layers.serialize(self.loss_fn)
        else:
            raise NotImplementedError(
                "get_config needs loss_fn to be a Keras layer or the default, "
                f"got {self.loss_fn!r}")
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config_with_layers(config, ("loss_fn",),
                                        custom_objects))

    def call(self, hidden, item_table, targets, sample_weight=None,
             sampler_query=None):
        """Computes the loss.

        Args:
            hidden: float [T, D] hidden states of every position.
            item_table: float [C, D] item embeddings (output side).
            targets: int [T] next item of every position.
            sample_weight: optional float [T] weights.
            sampler_query: passed to a sampled loss whose sampler conditions
                on something other than the hidden states (e.g. int [T]
                user ids of the positions for `CollaborativeSampler`).

        Returns:
            Scalar float32 loss (see the class docstring for the reduction).
        """
        targets = validate_ids(
            targets, tf.shape(item_table, out_type=tf.int64)[0],
            arg_name="targets")
        # Only sampled losses take it; full-catalog losses ignore it.
        extra = {} if sampler_query is None or getattr(
            self.loss_fn, "sampler", None) is None else {
                "sampler_query": sampler_query}
        reduction = getattr(self.loss_fn, "reduction", None)
        if reduction is not None:
            losses = self.loss_fn(hidden, item_table, targets,
                                  sample_weight=sample_weight, **extra)
            if reduction != Reduction.NONE:
                return losses
            sample_weight_applied = True
        else:
            losses = self.loss_fn(hidden, item_table, targets, **extra)
            sample_weight_applied = False
        losses = tf.cast(losses, tf.float32)
        if sample_weight is None:
            total = tf.reduce_sum(losses)
            count = tf.cast(tf.size(losses), tf.float32)
        else:
            weight = tf.cast(sample_weight, tf.float32) * tf.ones_like(losses)
            total = tf.reduce_sum(
                losses if sample_weight_applied else losses * weight)
            count = tf.reduce_sum(weight)
        return tf.math.divide_no_nan(total,
                                     distribute.sum_across_replicas(count))
