"""Exact GELU with a hand-written gradient, for the transformer FFNs.

`tf.nn.gelu(x, approximate=False)` is 0.5 x erfc(-x / sqrt 2); its autodiff
gradient differentiates erfc and both products (~12 elementwise passes over
[T, F]). The closed form x phi(x) + Phi(x) reuses the forward's Phi(x):
about half the passes, same values within float rounding.
"""

import math

import tensorflow as tf
import tf_keras

_INV_SQRT2 = 1.0 / math.sqrt(2.0)
_INV_SQRT_2PI = 1.0 / math.sqrt(2.0 * math.pi)


@tf.custom_gradient
def exact_gelu(x):
    """x * Phi(x), Phi the standard normal CDF; gradient Phi(x) + x phi(x).

    Args:
        x: float tensor, any shape.

    Returns:
        Same shape and dtype as x (= `tf.nn.gelu(x, approximate=False)`).
    """
    cdf = 0.5 * tf.math.erfc(x * -_INV_SQRT2)

    def grad(dy):
        pdf = tf.exp(-0.5 * tf.square(x)) * _INV_SQRT_2PI
        return dy * (cdf + x * pdf)

    return x * cdf, grad


def fast_activation(activation):
    """The activation to run for `activation` (a tf_keras activation
    function): `exact_gelu` for tf_keras' exact gelu, else itself.

    Layers keep serialising the activation they were given; only what runs
    changes.
    """
    return exact_gelu if activation is tf_keras.activations.gelu else activation
