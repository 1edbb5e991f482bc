"""LayerNormalization over the last axis of packed tokens, on the fused
LayerNorm op (`tfrec_fast.ops.layer_norm`).

tf_keras' `LayerNormalization` with epsilon < 1.001e-5 (the transformer
blocks' 1e-6) builds `tf.nn.moments` + `tf.nn.batch_normalization`, whose
forward and autodiff gradient are ~30 elementwise passes over [T, D]; on the
CPU they cost more than the block's attention. The op is one pass each way,
with the same values within float rounding.
"""

import tensorflow as tf
import tf_keras

from tfrec_fast.ops.layer_norm import layer_norm


class TokenLayerNormalization(tf_keras.layers.LayerNormalization):
    """tf_keras `LayerNormalization` on [T, D] packed tokens, last axis.

    The same layer (weights `gamma` [D] and `beta` [D], config,
    checkpoints); rank-2 inputs with the default axis, centre and scale run
    `tfrec_fast.ops.layer_norm`, anything else the parent's code. Under a
    mixed-precision policy it computes in float32 and returns the input's
    dtype, as the parent does.

    Args:
        use_fused: the fused LayerNorm op: True / False / None (pick; see
            `tfrec_fast.ops.layer_norm`). Serving graphs pass False (core TF
            ops only).
        **kwargs: `tf_keras.layers.LayerNormalization` arguments.

    Call args:
        inputs: float [T, D].
        use_fused: per-call override of the layer's `use_fused`.

    Returns:
        [T, D] of the input's dtype.
    """

    def __init__(self, use_fused=None, **kwargs):
        super().__init__(**kwargs)
        self.use_fused = use_fused

    def call(self, inputs, use_fused=None):
        if (isinstance(inputs, tf.RaggedTensor) or inputs.shape.rank != 2
                or self.axis != [1] or not (self.center and self.scale)):
            return super().call(inputs)
        if use_fused is None:
            use_fused = self.use_fused
        inputs = tf.cast(inputs, self.compute_dtype)
        input_dtype = inputs.dtype
        # Statistics in float32 whatever the policy (as the parent does).
        outputs = layer_norm(tf.cast(inputs, tf.float32),
                             tf.cast(self.gamma, tf.float32),
                             tf.cast(self.beta, tf.float32), self.epsilon,
                             use_fused=use_fused)
        return tf.cast(outputs, input_dtype)

    def get_config(self):
        return {**super().get_config(), "use_fused": self.use_fused}
