"""Padding-free transformer block on `tf.RaggedTensor` sequences.

Everything but the attention itself (LayerNorm, the feed-forward network,
dropout, residuals) is token-wise, so it runs on the packed tokens
(`flat_values` [T, D]) and never sees padding; the attention runs per row
through `RaggedMultiHeadAttention`.
"""

import tf_keras

from tfrec_fast.layers import _ragged_checks
from tfrec_fast.layers.dropout import ResumableDropout
from tfrec_fast.layers.gelu import fast_activation
from tfrec_fast.layers.ragged_attention import RaggedMultiHeadAttention
from tfrec_fast.layers.token_layer_norm import TokenLayerNormalization


def check_heads(where, num_heads, dim):
    """Raises ValueError unless `dim` is a positive multiple of `num_heads`."""
    for arg, value in (("num_heads", num_heads), ("dim", dim)):
        if not _ragged_checks.is_positive_int(value):
            raise ValueError(f"{where}: {arg} must be a positive int, got "
                             f"{value!r}")
    if dim % num_heads:
        raise ValueError(f"{where}: dim ({dim}) must be divisible by "
                         f"num_heads ({num_heads})")


def check_rate(where, arg, rate):
    if not 0.0 <= rate < 1.0:
        raise ValueError(f"{where}: {arg} must be in [0, 1), got {rate}")


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class RaggedTransformerBlock(tf_keras.layers.Layer):
    """Transformer encoder block on ragged sequences [B, (L), D].

    Pre-LN (`norm_first=True`, the default; as `PaddedTransformerBlock` and
    SASRec):
        x = x + Dropout(MHA(LN1(x)));  x = x + Dropout(FFN(LN2(x)))
    Post-LN (`norm_first=False`; as BERT / BERT4Rec):
        x = LN1(x + Dropout(MHA(x)));  x = LN2(x + Dropout(FFN(x)))
    with FFN(h) = Dense_D(activation(Dense_F(h))) and MHA a
    `RaggedMultiHeadAttention` of `num_heads` heads of width dim / num_heads.

    With `norm_first=True, activation="gelu", epsilon=1e-6` and dropout 0
    (or training=False) it computes exactly the function of
    `tfrec_fast.layers.PaddedTransformerBlock` on the valid positions, and
    its sublayers have the same names and weight shapes.

    Args:
        num_heads: attention heads H; must divide `dim`.
        dim: model width D.
        ffn_dim: hidden width F of the feed-forward part (default D).
        dropout: rate of the dropout on both residual branches.
        attention_dropout: rate of the attention-output dropout inside the
            attention layer (default: `dropout`; see RaggedMultiHeadAttention
            for how it differs from probability dropout).
        causal: token i attends only to tokens j <= i of its row.
        norm_first: pre-LN (True) or post-LN (False).
        activation: FFN activation (name or callable), e.g. "gelu", "relu".
        epsilon: LayerNormalization epsilon.
        use_fused: fused attention and LayerNorm ops: True / False / None
            (pick).
        **kwargs: base Layer arguments.

    Call arguments:
        inputs: float RaggedTensor [B, (L), D], ragged_rank 1.
        training: enables dropout.
        use_fused: per-call override of the layer's `use_fused`.

    Returns:
        float RaggedTensor [B, (L), D] with the row splits of `inputs`.
    """

    def __init__(self, num_heads, dim, ffn_dim=None, dropout=0.0,
                 attention_dropout=None, causal=True, norm_first=True,
                 activation="gelu", epsilon=1e-6, use_fused=None, **kwargs):
        super().__init__(**kwargs)
        where = f"RaggedTransformerBlock '{self.name}'"
        check_heads(where, num_heads, dim)
        check_rate(where, "dropout", dropout)
        if attention_dropout is not None:
            check_rate(where, "attention_dropout", attention_dropout)
        self.num_heads = num_heads = int(num_heads)
        self.dim = dim = int(dim)
        self.ffn_dim = int(ffn_dim or dim)
        self.dropout = dropout
        self.attention_dropout = attention_dropout
        self.causal = bool(causal)
        self.norm_first = bool(norm_first)
        self.activation = tf_keras.activations.get(activation)
        self.epsilon = epsilon
        self.use_fused = use_fused
        self.attention_norm = TokenLayerNormalization(
            epsilon=epsilon, use_fused=use_fused, name="attention_norm")
        self.attention = RaggedMultiHeadAttention(
            num_heads, dim // num_heads, causal=causal, output_dim=dim,
            dropout=dropout if attention_dropout is None else attention_dropout,
            use_fused=use_fused, name="attention")
        self.ffn_norm = TokenLayerNormalization(
            epsilon=epsilon, use_fused=use_fused, name="ffn_norm")
        self.ffn_in = tf_keras.layers.Dense(self.ffn_dim,
                                            activation=fast_activation(
                                                self.activation),
                                            name="ffn_in")
        self.ffn_out = tf_keras.layers.Dense(dim, name="ffn_out")
        # Checkpoints restore its masks (resumed training reproduces).
        self.residual_dropout = ResumableDropout(dropout)

    @property
    def _where(self):
        return f"RaggedTransformerBlock '{self.name}'"

    def build(self, input_shape):
        _ragged_checks.check_built_shape(input_shape, self._where, self.dim)
        super().build(input_shape)

    def call(self, inputs, training=None, use_fused=None):
        _ragged_checks.check_ragged_sequence(inputs, self._where, "inputs",
                                             dim=self.dim)
        x = inputs.flat_values  # [T, D]

        def attend(h):  # [T, D] -> [T, D]
            return self.attention(inputs.with_flat_values(h),
                                  training=training,
                                  use_fused=use_fused).flat_values

        def ffn(h):  # [T, D] -> [T, D]
            return self.ffn_out(self.ffn_in(h))

        def drop(h):
            return self.residual_dropout(h, training=training)

        def attention_norm(h):
            return self.attention_norm(h, use_fused=use_fused)

        def ffn_norm(h):
            return self.ffn_norm(h, use_fused=use_fused)

        if self.norm_first:
            x = x + drop(attend(attention_norm(x)))
            x = x + drop(ffn(ffn_norm(x)))
        else:
            x = attention_norm(x + drop(attend(x)))
            x = ffn_norm(x + drop(ffn(x)))
        return inputs.with_flat_values(x)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads,
                "dim": self.dim, "ffn_dim": self.ffn_dim,
                "dropout": self.dropout,
                "attention_dropout": self.attention_dropout,
                "causal": self.causal, "norm_first": self.norm_first,
                "activation": tf_keras.activations.serialize(self.activation),
                "epsilon": self.epsilon, "use_fused": self.use_fused}
