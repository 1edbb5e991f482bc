"""Padding-free transformer sequence encoder (SASRec / BERT4Rec style)."""

import math

import tensorflow as tf
import tf_keras

from tfrec_fast.layers import _ragged_checks
from tfrec_fast.layers.dropout import ResumableDropout
from tfrec_fast.layers.positional import RaggedPositionalEmbedding
from tfrec_fast.layers.ragged_transformer import check_heads
from tfrec_fast.layers.ragged_transformer import check_rate
from tfrec_fast.layers.ragged_transformer import RaggedTransformerBlock
from tfrec_fast.layers.token_layer_norm import TokenLayerNormalization


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class SequenceEncoder(tf_keras.layers.Layer):
    """Transformer encoder over ragged histories: [B, (L), D] -> [B, (L), D].

    x = inputs * sqrt(D) (if `scale_embeddings`) + positions (learned,
    counted from each row's start, or end with `from_end`), then dropout,
    `num_blocks` `RaggedTransformerBlock`s and a LayerNorm: a final one after
    the blocks for pre-LN (`norm_first=True`), or, for post-LN blocks (whose
    outputs are already normalised), one on the input embeddings as in BERT.
    Every step but the attention runs on the packed tokens; nothing is padded.

    `causal=True` is SASRec (each position sees its past); `causal=False` is
    BERT4Rec (each position sees its whole row).

    With the defaults (pre-LN, gelu, epsilon 1e-6, positions from the start,
    scaled inputs) and dropout 0 (or training=False) it computes exactly the
    function of `tfrec_fast.layers.PaddedSequenceEncoder` on the valid
    positions, with weights of the same names and shapes.

    `call_padded` computes the same function from right-padded [B, L, D]
    input + lengths with core TF ops only (pure-TF reference attention); it
    is the serving path (`SASRec.serving_query`).

    Args:
        max_len: longest row accepted (size of the position table); longer
            rows raise InvalidArgumentError.
        dim: model width D.
        num_blocks: transformer blocks N.
        num_heads: attention heads per block; must divide `dim`.
        dropout: rate of the input dropout and the blocks' residual (and,
            unless `attention_dropout` is given, attention-output) dropout.
            All of it is `ResumableDropout`: a checkpoint restores the
            masks that follow it, so resumed training reproduces.
        causal: causal self-attention (SASRec) or bidirectional (BERT4Rec).
        ffn_dim: hidden width of the blocks' FFN (default D).
        attention_dropout: attention-output dropout rate (default `dropout`).
        norm_first: pre-LN blocks + final LayerNorm (True), or post-LN blocks
            + LayerNorm of the input embeddings (False).
        activation: FFN activation, e.g. "gelu" or "relu".
        epsilon: LayerNormalization epsilon.
        from_end: count positions from the end of each row.
        scale_embeddings: multiply the inputs by sqrt(D) (SASRec).
        use_fused: fused attention and LayerNorm ops: True / False / None
            (pick).
        **kwargs: base Layer arguments.

    Call arguments:
        embeddings: float RaggedTensor [B, (L), D], ragged_rank 1, every row
            at most `max_len` long (empty rows allowed; B may be 0).
        training: enables dropout.
        use_fused: per-call override of the layer's `use_fused`.

    Returns:
        float RaggedTensor [B, (L), D] hidden states, row splits of the input.
    """

    def __init__(self, max_len, dim, num_blocks=2, num_heads=1, dropout=0.2,
                 causal=True, ffn_dim=None, attention_dropout=None,
                 norm_first=True, activation="gelu", epsilon=1e-6,
                 from_end=False, scale_embeddings=True, use_fused=None,
                 **kwargs):
        super().__init__(**kwargs)
        where = f"SequenceEncoder '{self.name}'"
        check_heads(where, num_heads, dim)
        check_rate(where, "dropout", dropout)
        if not (_ragged_checks.is_positive_int(num_blocks)
                or num_blocks == 0):
            raise ValueError(f"{where}: num_blocks must be an int >= 0, got "
                             f"{num_blocks!r}")
        self.max_len = int(max_len)
        self.dim = dim = int(dim)
        self.num_blocks = num_blocks = int(num_blocks)
        self.num_heads = num_heads = int(num_heads)
        self.dropout = dropout
        self.causal = bool(causal)
        self.ffn_dim = int(ffn_dim or dim)
        self.attention_dropout = attention_dropout
        self.norm_first = bool(norm_first)
        self.activation = tf_keras.activations.get(activation)
        self.epsilon = epsilon
        self.from_end = bool(from_end)
        self.scale_embeddings = bool(scale_embeddings)
        self.use_fused = use_fused
        self.positions = RaggedPositionalEmbedding(
            max_len, dim, from_end=from_end, name="positions")
        # Checkpoints restore its masks (resumed training reproduces).
        self.input_dropout = ResumableDropout(dropout)
        self.blocks = [
            RaggedTransformerBlock(
                num_heads, dim, ffn_dim=self.ffn_dim, dropout=dropout,
                attention_dropout=attention_dropout, causal=causal,
                norm_first=norm_first, activation=self.activation,
                epsilon=epsilon, use_fused=use_fused, name=f"block_{i}")
            for i in range(num_blocks)]
        norm = TokenLayerNormalization(
            epsilon=epsilon, use_fused=use_fused,
            name="final_norm" if norm_first else "input_norm")
        self.final_norm = norm if norm_first else None
        self.input_norm = None if norm_first else norm

    @property
    def _where(self):
        return f"SequenceEncoder '{self.name}'"

    def build(self, input_shape):
        _ragged_checks.check_built_shape(input_shape, self._where, self.dim)
        super().build(input_shape)

    def call(self, embeddings, training=None, use_fused=None):
        _ragged_checks.check_ragged_sequence(embeddings, self._where,
                                             "embeddings", dim=self.dim)
        return self._encode(embeddings, training, use_fused)

    def _encode(self, embeddings, training, use_fused):
        """Ragged [B, (L), D] -> ragged [B, (L), D]; inputs already checked."""
        x = embeddings.flat_values  # [T, D]
        if self.scale_embeddings:
            x = x * tf.cast(math.sqrt(self.dim), x.dtype)
        x = x + tf.cast(self.positions(embeddings).flat_values, x.dtype)
        if self.input_norm is not None:
            x = self.input_norm(x, use_fused=use_fused)
        x = self.input_dropout(x, training=training)
        hidden = embeddings.with_flat_values(x)
        for block in self.blocks:
            hidden = block(hidden, training=training, use_fused=use_fused)
        if self.final_norm is not None:
            hidden = hidden.with_flat_values(
                self.final_norm(hidden.flat_values, use_fused=use_fused))
        return hidden

    def call_padded(self, embeddings, lengths, training=None):
        """The same encoder on right-padded input, core TF ops only.

        Packs the valid positions, runs the blocks with the pure-TF reference
        attention and LayerNorm (never the fused ops, so a SavedModel of this
        graph loads in stock TensorFlow) and pads the result again.

        Args:
            embeddings: float [B, L, D] item embeddings, right-padded.
            lengths: int [B] valid positions per row, 0 <= lengths <= L, and
                <= max_len.
            training: enables dropout.

        Returns:
            float [B, L, D] hidden states; positions past `lengths` are zero.

        Raises:
            ValueError: wrong ranks or inner dimension.
            tf.errors.InvalidArgumentError: a length outside [0, L], or a
                row longer than max_len.
        """
        embeddings = tf.convert_to_tensor(embeddings)
        lengths = tf.convert_to_tensor(lengths)
        if embeddings.shape.rank != 3 or embeddings.shape[-1] != self.dim:
            raise ValueError(f"{self._where}.call_padded: embeddings must be "
                             f"[B, L, {self.dim}], got shape "
                             f"{embeddings.shape}")
        if lengths.shape.rank != 1 or not lengths.dtype.is_integer:
            raise ValueError(f"{self._where}.call_padded: lengths must be int "
                             f"[B], got {lengths.dtype.name} {lengths.shape}")
        lengths = tf.cast(lengths, tf.int64)
        width = tf.shape(embeddings, out_type=tf.int64)[1]
        checks = [tf.debugging.assert_non_negative(
                      lengths, message=f"{self._where}: negative lengths"),
                  tf.debugging.assert_less_equal(
                      lengths, width,
                      message=f"{self._where}: lengths exceed the padded "
                              "width L of embeddings")]
        with tf.control_dependencies([c for c in checks if c is not None]):
            lengths = tf.identity(lengths)
        ragged = tf.RaggedTensor.from_tensor(embeddings, lengths=lengths)
        hidden = self._encode(ragged, training, use_fused=False)
        return hidden.to_tensor(
            shape=tf.stack([tf.shape(embeddings, out_type=tf.int64)[0], width,
                            self.dim]))

    def get_config(self):
        return {**super().get_config(), "max_len": self.max_len,
                "dim": self.dim, "num_blocks": self.num_blocks,
                "num_heads": self.num_heads, "dropout": self.dropout,
                "causal": self.causal, "ffn_dim": self.ffn_dim,
                "attention_dropout": self.attention_dropout,
                "norm_first": self.norm_first,
                "activation": tf_keras.activations.serialize(self.activation),
                "epsilon": self.epsilon, "from_end": self.from_end,
                "scale_embeddings": self.scale_embeddings,
                "use_fused": self.use_fused}
