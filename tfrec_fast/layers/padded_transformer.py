"""Padded transformer encoder from stock tf_keras layers (the reference).

SASRec-style causal self-attention on right-padded [B, L, D] input with a
causal + padding mask, built from `tf_keras.layers.MultiHeadAttention`. It is
the baseline that the padding-free ragged blocks must match and beat.
"""

import tensorflow as tf
import tf_keras


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
        """
        length = tf.shape(embeddings)[1]
        valid = tf.sequence_mask(lengths, length)  # [B, L]
        x = embeddings * tf.sqrt(tf.cast(self.dim, embeddings.dtype))
        x += self.positions(tf.range(length))[tf.newaxis]
        x = self.input_dropout(x, training=training)
        causal = tf.linalg.band_part(tf.ones([length, length], tf.bool), -1, 0)
        attention_mask = causal[tf.newaxis] & valid[:, tf.newaxis, :]
        keep = tf.cast(valid, x.dtype)[..., tf.newaxis]
        x *= keep
        for block in self.blocks:
            x = block(x, attention_mask, training=training) * keep
        return self.final_norm(x) * keep

    def get_config(self):
        return {**super().get_config(), "max_len": self.max_len,
                "dim": self.dim, "num_blocks": self.num_blocks,
                "num_heads": self.num_heads, "dropout": self.dropout}
