"""LayerNormalization over the last axis of packed tokens, with a
hand-written gradient.

tf_keras' `LayerNormalization` with epsilon < 1.001e-5 (the transformer
blocks' 1e-6) builds `tf.nn.moments` + `tf.nn.batch_normalization`, whose
autodiff gradient is ~20 elementwise passes over [T, D] (Tile, Neg, repeated
means); on the CPU they cost more than the block's attention. The closed form
below needs 8 passes forward and 11 backward, same values within float
rounding.
"""

import tensorflow as tf
import tf_keras


def layer_norm(x, gamma, beta, epsilon):
    """Normalises each row of x over its last axis, then scales and shifts.

    y = (x - mean(x)) / sqrt(var(x) + epsilon) * gamma + beta, row-wise.
    The gradient is the closed form (with x_hat the normalised x, rstd the
    row's 1 / sqrt(var + epsilon) and g = dy * gamma):
    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)),
    dgamma = sum over rows of dy * x_hat, dbeta = sum over rows of dy.

    Args:
        x: float32 [N, D].
        gamma: float32 [D].
        beta: float32 [D].
        epsilon: float added to the variance.

    Returns:
        float32 [N, D].
    """

    @tf.custom_gradient
    def normalise(x, gamma, beta):
        mean = tf.reduce_mean(x, axis=-1, keepdims=True)  # [N, 1]
        centred = x - mean
        variance = tf.reduce_mean(tf.square(centred), axis=-1, keepdims=True)
        rstd = tf.math.rsqrt(variance + epsilon)  # [N, 1]
        x_hat = centred * rstd

        def grad(dy):
            g = dy * gamma
            d_gamma = tf.reduce_sum(dy * x_hat, axis=0)
            d_beta = tf.reduce_sum(dy, axis=0)
            d_x = rstd * (g - tf.reduce_mean(g, axis=-1, keepdims=True)
                          - x_hat * tf.reduce_mean(g * x_hat, axis=-1,
                                                   keepdims=True))
            return d_x, d_gamma, d_beta

        return x_hat * gamma + beta, grad

    return normalise(x, gamma, beta)


class TokenLayerNormalization(tf_keras.layers.LayerNormalization):
    """tf_keras `LayerNormalization` on [T, D] packed tokens, last axis.

    The same layer (weights `gamma` [D] and `beta` [D], config,
    checkpoints); rank-2 inputs with the default axis, centre and scale run
    `layer_norm` (closed-form gradient), anything else the parent's code.
    Under a mixed-precision policy it computes in float32 and returns the
    input's dtype, as the parent does.

    Call args:
        inputs: float [T, D].

    Returns:
        [T, D] of the input's dtype.
    """

    def call(self, inputs):
        if (isinstance(inputs, tf.RaggedTensor) or inputs.shape.rank != 2
                or self.axis != [1] or not (self.center and self.scale)):
            return super().call(inputs)
        inputs = tf.cast(inputs, self.compute_dtype)
        input_dtype = inputs.dtype
        # Statistics in float32 whatever the policy (as the parent does).
        outputs = layer_norm(tf.cast(inputs, tf.float32),
                             tf.cast(self.gamma, tf.float32),
                             tf.cast(self.beta, tf.float32), self.epsilon)
        return tf.cast(outputs, input_dtype)
