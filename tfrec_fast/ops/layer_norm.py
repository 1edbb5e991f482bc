"""Token-wise LayerNorm over the last axis of [N, D] rows: a fused CPU op
and its pure-TF reference.

The transformer blocks normalise every packed token twice per block. Built
from TensorFlow ops (`tf.nn.moments` + `tf.nn.batch_normalization`, as
tf_keras does for epsilon < 1.001e-5) the forward and its autodiff gradient
are ~30 elementwise passes over [N, D]; the fused op is one pass each way.
The reference computes the same closed form with ~8 + ~11 TF ops.
"""

import tensorflow as tf

from tfrec_fast.ops import _library


def _check(x, gamma, beta):
    if x.shape.rank is not None and x.shape.rank != 2:
        raise ValueError(f"layer_norm: x must be [N, D], got shape {x.shape}")
    for name, v in (("gamma", gamma), ("beta", beta)):
        if v.shape.rank is not None and v.shape.rank != 1:
            raise ValueError(f"layer_norm: {name} must be [D], got shape "
                             f"{v.shape}")
        if not x.shape[-1:].is_compatible_with(v.shape):
            raise ValueError(f"layer_norm: {name} {v.shape} must be [D] with "
                             f"the D of x {x.shape}")
    for name, v in (("x", x), ("gamma", gamma), ("beta", beta)):
        if v.dtype != tf.float32:
            raise ValueError(f"layer_norm: {name} must be float32, got "
                             f"{v.dtype.name}")


def layer_norm_reference(x, gamma, beta, epsilon):
    """`layer_norm` from TensorFlow ops, with the closed-form gradient.

    dx = rstd * (g - mean(g) - x_hat * mean(g * x_hat)) with x_hat the
    normalised x, rstd the row's 1 / sqrt(var + epsilon) and g = dy * gamma;
    dgamma = sum over rows of dy * x_hat, dbeta = sum over rows of dy.
    Arguments and result as `layer_norm`.
    """
    x, gamma, beta = (tf.convert_to_tensor(v) for v in (x, gamma, beta))
    _check(x, gamma, beta)

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


def layer_norm(x, gamma, beta, epsilon, use_fused=None):
    """Normalises each row of x over its last axis, then scales and shifts.

    y = (x - mean(x)) / sqrt(var(x) + epsilon) * gamma + beta, row-wise
    (the biased variance, as tf_keras' LayerNormalization). Differentiable
    with respect to x, gamma and beta. The fused op has a CPU kernel only:
    where a GPU is visible the reference runs (on the GPU). No XLA kernel.

    Args:
        x: float32 [N, D].
        gamma: float32 [D].
        beta: float32 [D].
        epsilon: float added to the variance.
        use_fused: True to require the fused op, False to force the
            reference, None to pick (the fused op when loaded and no GPU is
            visible).

    Returns:
        float32 [N, D].

    Raises:
        ValueError: wrong ranks, mismatched D, or dtypes other than float32.
    """
    x, gamma, beta = (tf.convert_to_tensor(v) for v in (x, gamma, beta))
    _check(x, gamma, beta)
    if use_fused is None and tf.config.list_logical_devices("GPU"):
        use_fused = False
    module = None if use_fused is False else _library.fused_module(
        "tfrec_fast_layer_norm", "TfrecFastLayerNorm", use_fused)
    if module is None:
        return layer_norm_reference(x, gamma, beta, epsilon)
    y, _, _ = module.tfrec_fast_layer_norm(x, gamma, beta,
                                           epsilon=float(epsilon))
    return y


@tf.RegisterGradient("TfrecFastLayerNorm")
def _layer_norm_grad(op, d_y, d_mean, d_rstd):
    """dx, dgamma, dbeta from the fused backward; mean and rstd are
    auxiliary outputs without gradient."""
    del d_mean, d_rstd
    x, gamma, _ = op.inputs
    module = _library.DEFAULT_LIBRARY.module()
    return module.tfrec_fast_layer_norm_grad(x, gamma, op.outputs[1],
                                             op.outputs[2], d_y)
