"""Padded transformer encoder from stock tf_keras layers (the reference).

SASRec-style causal self-attention on right-padded [B, L, D] input with a
causal + padding mask, built from `tf_keras.layers.MultiHeadAttention`. It is
the baseline that the padding-free ragged blocks must match and beat.
"""

import tensorflow as tf
import tf_keras


def check_padded(x, where, arg, dim):
    """`x` as a float tensor [B, L, dim]; ValueError naming `arg` if not.

    (Unchecked, a wrong input fails deep inside LayerNormalization or
    MultiHeadAttention with a message naming neither, and a RaggedTensor
    would be padded silently.)
    """
    if isinstance(x, tf.RaggedTensor):
        raise ValueError(f"{where}: `{arg}` must be a dense right-padded "
                         f"tensor [B, L, {dim}], got a tf.RaggedTensor; use "
                         "the ragged layers (RaggedTransformerBlock, "
                         "SequenceEncoder) or x.to_tensor()")
    x = tf.convert_to_tensor(x)
    if x.shape.rank != 3 or x.shape[-1] != dim:
        raise ValueError(f"{where}: `{arg}` must be [B, L, {dim}], got shape "
                         f"{x.shape}")
    if not x.dtype.is_floating:
        raise ValueError(f"{where}: `{arg}` must be floating point, got "
                         f"{x.dtype.name}")
    return x


class PaddedTransformerBlock(tf_keras.layers.Layer):
    """Pre-LayerNorm block: x + MHA(LN(x)), then x + FFN(LN(x)).

    Args:
        num_heads: attention heads; `dim` must be divisible by it.
        dim: model width D.
        ffn_dim: hidden width of the feed-forward part (default D).
        dropout: dropout rate on attention weights and both residual branches.
    """

    def __init__(self, num_heads, dim, ffn_dim=None, dropout=0.0, **kwargs):
        super().__init__(**kwargs)
        if dim % num_heads:
            raise ValueError(f"dim ({dim}) must be divisible by num_heads "
                             f"({num_heads})")
        self.num_heads = num_heads
        self.dim = dim
        self.ffn_dim = ffn_dim or dim
        self.dropout = dropout
        self.attention_norm = tf_keras.layers.LayerNormalization(epsilon=1e-6)
        self.attention = tf_keras.layers.MultiHeadAttention(
            num_heads=num_heads, key_dim=dim // num_heads, dropout=dropout)
        self.ffn_norm = tf_keras.layers.LayerNormalization(epsilon=1e-6)
        self.ffn_in = tf_keras.layers.Dense(self.ffn_dim, activation="gelu")
        self.ffn_out = tf_keras.layers.Dense(dim)
        self.residual_dropout = tf_keras.layers.Dropout(dropout)

    def call(self, x, attention_mask, training=None):
        """Args: x float [B, L, D]; attention_mask bool [B, L, L]."""
        x = check_padded(x, f"PaddedTransformerBlock '{self.name}'", "x",
                         self.dim)
        h = self.attention_norm(x)
        h = self.attention(h, h, h, attention_mask=attention_mask,
                           training=training)
        x = x + self.residual_dropout(h, training=training)
        h = self.ffn_out(self.ffn_in(self.ffn_norm(x)))
        return x + self.residual_dropout(h, training=training)

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads,
                "dim": self.dim, "ffn_dim": self.ffn_dim,
                "dropout": self.dropout}


class PaddedSequenceEncoder(tf_keras.layers.Layer):
    """Causal transformer encoder over right-padded sequences.

    Adds learned absolute positions (counted from the start of each
    sequence), applies `num_blocks` PaddedTransformerBlocks under a causal and
    padding mask, and a final LayerNorm.

    Args:
        max_len: longest sequence L it accepts (size of the position table).
        dim: model width D.
        num_blocks: number of transformer blocks.
        num_heads: attention heads per block.
        dropout: dropout rate.
    """

    def __init__(self, max_len, dim, num_blocks=2, num_heads=1, dropout=0.2,
                 **kwargs):
        super().__init__(**kwargs)
        self.max_len = max_len
        self.dim = dim
        self.num_blocks = num_blocks
        self.num_heads = num_heads
        self.dropout = dropout
        self.positions = tf_keras.layers.Embedding(max_len, dim)
        self.input_dropout = tf_keras.layers.Dropout(dropout)
        self.blocks = [PaddedTransformerBlock(num_heads, dim, dropout=dropout,
                                              name=f"block_{i}")
                       for i in range(num_blocks)]
        self.final_norm = tf_keras.layers.LayerNormalization(epsilon=1e-6)

    def call(self, embeddings, lengths, training=None):
        """Encodes a padded batch.

        Args:
            embeddings: float [B, L, D] item embeddings, right-padded, L <=
                max_len.
            lengths: int [B] number of real positions per row.

        Returns:
            float [B, L, D] hidden states; rows past `lengths` are zero.

        Raises:
            ValueError: wrong ranks, dtypes or inner dimension.
            tf.errors.InvalidArgumentError: a length outside [0, L], or
                L > max_len.
        """
        where = f"PaddedSequenceEncoder '{self.name}'"
        embeddings = check_padded(embeddings, where, "embeddings", self.dim)
        lengths = tf.convert_to_tensor(lengths)
        if lengths.shape.rank != 1 or not lengths.dtype.is_integer:
            raise ValueError(f"{where}: lengths must be int [B], got "
                             f"{lengths.dtype.name} {lengths.shape}")
        length = tf.shape(embeddings)[1]
        checks = [
            tf.debugging.assert_non_negative(
                lengths, message=f"{where}: negative lengths"),
            tf.debugging.assert_less_equal(
                tf.cast(lengths, tf.int32), length,
                message=f"{where}: lengths exceed the padded width L of "
                        "embeddings"),
            tf.debugging.assert_less_equal(
                length, self.max_len,
                message=f"{where}: embeddings have more positions L than "
                        f"max_len = {self.max_len}; cut histories to their "
                        "last max_len items first (L, max_len)")]
        # Both through the checks: in a graph the position lookup of a too
        # long L would otherwise race them (and say "indices[200] = 200").
        with tf.control_dependencies([c for c in checks if c is not None]):
            lengths = tf.identity(lengths)
            length = tf.identity(length)
        valid = tf.sequence_mask(lengths, length)  # [B, L]
        x = embeddings * tf.sqrt(tf.cast(self.dim, embeddings.dtype))
        x += self.positions(tf.range(length))[tf.newaxis]
        x = self.input_dropout(x, training=training)
        causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)
        attention_mask = causal[tf.newaxis] & valid[:, tf.newaxis, :]
        keep = tf.cast(valid, x.dtype)[..., tf.newaxis]
        # tf.where, not x * keep: a NaN / Inf in the padding would survive a
        # multiplication by 0 and reach the row's real positions.
        x = tf.where(valid[..., tf.newaxis], x, tf.zeros_like(x))
        for block in self.blocks:
            x = block(x, attention_mask, training=training) * keep
        return self.final_norm(x) * keep

    def get_config(self):
        return {**super().get_config(), "max_len": self.max_len,
                "dim": self.dim, "num_blocks": self.num_blocks,
                "num_heads": self.num_heads, "dropout": self.dropout}
