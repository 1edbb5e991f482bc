"""The train step of the package's `tfrs.Model`s, with mixed-precision loss
scaling.

`tfrs.Model.train_step` differentiates the unscaled loss and hands the
gradients to `optimizer.apply_gradients`. Under a `mixed_float16` policy
tf_keras' `compile` wraps the optimizer in a `LossScaleOptimizer`, which
then never scales anything (it only logs "You forgot to call
LossScaleOptimizer.get_scaled_loss()"): float16 activation gradients below
float16's smallest subnormal (about 6e-8) flush to zero and the weights
behind them stop learning. `LossScalingModel.train_step` is the same step
with the loss scaled before the backward pass and the gradients unscaled
after it, as `tf_keras.Model.train_step` does through `optimizer.minimize`.
"""

import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras


class LossScalingModel(tfrs.Model):
    """A `tfrs.Model` whose train step applies a LossScaleOptimizer's scale.

    With any other optimizer (float32 and `mixed_bfloat16` policies, where
    `compile` does not wrap it) the step is exactly `tfrs.Model`'s.
    """

    def train_step(self, inputs):
        optimizer = self.optimizer
        scaling = isinstance(optimizer,
                             tf_keras.mixed_precision.LossScaleOptimizer)
        with tf.GradientTape() as tape:
            loss = self.compute_loss(inputs, training=True)
            regularization_loss = tf.reduce_sum(
                [tf.reduce_sum(l) for l in self.losses])
            total_loss = loss + regularization_loss
            differentiated = (optimizer.get_scaled_loss(total_loss)
                              if scaling else total_loss)
        variables = self.trainable_variables
        gradients = tape.gradient(differentiated, variables)
        if scaling:
            # Non-finite gradients (scale too large) stay non-finite: the
            # optimizer then skips the step and halves the scale.
            gradients = optimizer.get_unscaled_gradients(gradients)
        optimizer.apply_gradients(zip(gradients, variables))
        metrics = {metric.name: metric.result() for metric in self.metrics}
        metrics["loss"] = loss
        metrics["regularization_loss"] = regularization_loss
        metrics["total_loss"] = total_loss
        return metrics
