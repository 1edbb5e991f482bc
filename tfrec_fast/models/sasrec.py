"""SASRec as a `tfrs.Model`: item embeddings -> sequence encoder -> next-item task.

The reference configuration uses `PaddedSequenceEncoder` (stock tf_keras
attention on padded input) and the full-softmax cross-entropy. Input and
output item embeddings are shared, as in SASRec.
"""

import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras

from tfrec_fast.layers.padded_transformer import PaddedSequenceEncoder
from tfrec_fast.ops.validate_ids import validate_ids
from tfrec_fast.tasks.next_item import NextItemTask


def last_window(history_ids, lengths, max_len):
    """The most recent `max_len` items of each padded row, right-padded.

    Core TF ops only (used inside serving graphs).

    Args:
        history_ids: int [B, L] ids, right-padded.
        lengths: int [B] valid length of each row (<= L).
        max_len: window size W.

    Returns:
        (ids int64 [B, min(L, W)], lengths int64 [B]).
    """
    history_ids = tf.cast(history_ids, tf.int64)
    lengths = tf.cast(lengths, tf.int64)
    width = tf.minimum(tf.shape(history_ids, out_type=tf.int64)[1], max_len)
    start = tf.maximum(lengths - width, 0)  # [B]
    columns = start[:, tf.newaxis] + tf.range(width)[tf.newaxis]  # [B, W]
    new_lengths = tf.minimum(lengths, width)
    valid = tf.sequence_mask(new_lengths, width)
    ids = tf.gather(history_ids, tf.where(valid, columns, 0), batch_dims=1)
    return tf.where(valid, ids, tf.zeros_like(ids)), new_lengths


class SASRec(tfrs.Model):
    """Self-attentive sequential recommender.

    Args:
        num_items: catalog size C; item ids are in [0, C).
        max_len: longest history the encoder sees (older items are dropped).
        dim: embedding width D.
        num_blocks: transformer blocks.
        num_heads: attention heads.
        dropout: dropout rate.
        encoder: optional encoder layer with the `PaddedSequenceEncoder`
            interface; defaults to the padded reference.
        task: optional `NextItemTask`; defaults to full-softmax CE.

    Inputs to `compute_loss` / `fit` are dicts with `item_ids` and `targets`,
    both int64 `tf.RaggedTensor` [B, (L)] with equal row lengths.
    """

    def __init__(self, num_items, max_len=200, dim=64, num_blocks=2,
                 num_heads=1, dropout=0.2, encoder=None, task=None):
        super().__init__()
        self.num_items = num_items
        self.max_len = max_len
        self.item_embedding = tf_keras.layers.Embedding(
            num_items, dim, name="item_embedding",
            embeddings_initializer=tf_keras.initializers.RandomNormal(
                stddev=dim ** -0.5))
        self.encoder = encoder or PaddedSequenceEncoder(
            max_len, dim, num_blocks=num_blocks, num_heads=num_heads,
            dropout=dropout)
        self.task = task or NextItemTask()

    @property
    def item_table(self):
        """float [C, D] item embeddings (input and output side)."""
        if not self.item_embedding.built:
            self.item_embedding.build(None)
        return self.item_embedding.embeddings

    def encode_padded(self, ids, lengths, training=None):
        """Hidden states of right-padded histories.

        Args:
            ids: int64 [B, L] item ids, L <= max_len.
            lengths: int64 [B].

        Returns:
            float [B, L, D].
        """
        return self.encoder(self.item_embedding(ids), lengths,
                            training=training)

    def call(self, item_ids, training=None):
        """Hidden state of every position.

        Args:
            item_ids: int64 RaggedTensor [B, (L)], each row at most max_len.

        Returns:
            float RaggedTensor [B, (L), D].
        """
        lengths = item_ids.row_lengths()
        hidden = self.encode_padded(item_ids.to_tensor(), lengths,
                                    training=training)
        return tf.RaggedTensor.from_tensor(hidden, lengths=lengths)

    def compute_loss(self, inputs, training=False):
        item_ids = validate_ids(inputs["item_ids"], self.num_items,
                                arg_name="item_ids")
        hidden = self(item_ids, training=training).flat_values  # [T, D]
        targets = inputs["targets"].flat_values  # [T]
        return self.task(hidden, self.item_table, targets)

    def query_embeddings(self, item_ids):
        """float [B, D]: the hidden state after each history's last item.

        Args:
            item_ids: int64 RaggedTensor [B, (L)] histories.
        """
        item_ids = item_ids[:, -self.max_len:]
        dense, lengths = item_ids.to_tensor(), item_ids.row_lengths()
        hidden = self.encode_padded(dense, lengths, training=False)
        return tf.gather(hidden, tf.maximum(lengths - 1, 0), batch_dims=1)

    # Serving protocol (tfrec_fast.export): core TF ops on dense + lengths.
    def serving_query(self, history_ids, lengths):
        """float [B, D] from dense int64 [B, L] ids and int64 [B] lengths."""
        ids, lengths = last_window(history_ids, lengths, self.max_len)
        ids = validate_ids(ids, self.num_items, arg_name="history_ids",
                           use_fused=False)
        hidden = self.encode_padded(ids, lengths, training=False)
        return tf.gather(hidden, tf.maximum(lengths - 1, 0), batch_dims=1)

    def serving_candidates(self):
        """(item_table float [C, D], item_bias float [C] or None)."""
        return self.item_table, None
