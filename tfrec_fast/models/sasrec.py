"""SASRec as a `tfrs.Model`: item embeddings -> sequence encoder -> next-item task.

The default encoder is the padding-free `SequenceEncoder` (ragged end to
end: embedding lookup, blocks and loss all run on the packed tokens);
`encoder="padded"` selects the reference `PaddedSequenceEncoder` (stock
tf_keras attention on padded input). Both compute the same function. The
default task is the full-softmax cross-entropy. Input and output item
embeddings are shared, as in SASRec.
"""

import tensorflow as tf
import tf_keras

from tfrec_fast.layers.padded_transformer import PaddedSequenceEncoder
from tfrec_fast.layers.sequence_encoder import SequenceEncoder
from tfrec_fast.models.loss_scaling import LossScalingModel
from tfrec_fast.ops.validate_ids import validate_ids
from tfrec_fast.tasks.next_item import NextItemTask


def position_users(inputs, item_ids):
    """int64 [T] user of every position, or None without `inputs["users"]`.

    Batches from `next_item_dataset(..., with_users=True)` carry each row's
    user; samplers that condition on the user (`CollaborativeSampler`) take
    one per position.
    """
    users = inputs.get("users") if hasattr(inputs, "get") else None
    if users is None:
        return None
    return tf.repeat(tf.cast(users, tf.int64), item_ids.row_lengths())


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


class SASRec(LossScalingModel):
    """Self-attentive sequential recommender.

    A `tfrs.Model`; under a `mixed_float16` policy its train step applies
    the loss scaling of the `LossScaleOptimizer` that `compile` adds
    (`tfrs.Model`'s own step does not, and float16 gradients underflow).

    Args:
        num_items: catalog size C; item ids are in [0, C).
        max_len: longest history the encoder sees (older items are dropped).
        dim: embedding width D.
        num_blocks: transformer blocks.
        num_heads: attention heads.
        dropout: dropout rate.
        encoder: "ragged" (default, None means the same): the padding-free
            `SequenceEncoder`; "padded": the reference
            `PaddedSequenceEncoder`; or an encoder layer with either
            interface: ragged (`layer(ragged [B, (L), D]) -> ragged` plus
            `call_padded(dense [B, L, D], lengths [B]) -> [B, L, D]` in core
            TF ops, for serving) or padded (`layer(dense, lengths)`).
        task: optional `NextItemTask`; defaults to full-softmax CE.
        use_fused: for the default ragged encoder: fused attention op True /
            False / None (pick). Serving always uses the pure-TF reference.

    Inputs to `compute_loss` / `fit` are dicts with `item_ids` and `targets`,
    both int64 `tf.RaggedTensor` [B, (L)] with equal row lengths, and
    optionally `users` int64 [B] (`next_item_dataset(with_users=True)`),
    handed to the task as every position's `sampler_query`.
    """

    def __init__(self, num_items, max_len=200, dim=64, num_blocks=2,
                 num_heads=1, dropout=0.2, encoder="ragged", task=None,
                 use_fused=None):
        super().__init__()
        self.num_items = num_items
        self.max_len = max_len
        self.item_embedding = tf_keras.layers.Embedding(
            num_items, dim, name="item_embedding",
            embeddings_initializer=tf_keras.initializers.RandomNormal(
                stddev=dim ** -0.5))
        if encoder is None or isinstance(encoder, str):
            if encoder in (None, "ragged"):
                encoder = SequenceEncoder(
                    max_len, dim, num_blocks=num_blocks, num_heads=num_heads,
                    dropout=dropout, causal=True, use_fused=use_fused)
            elif encoder == "padded":
                encoder = PaddedSequenceEncoder(
                    max_len, dim, num_blocks=num_blocks, num_heads=num_heads,
                    dropout=dropout)
            else:
                raise ValueError(f"SASRec: encoder must be 'ragged', 'padded'"
                                 f" or a layer, got {encoder!r}")
        self.encoder = encoder
        # Ragged encoders run ragged end to end and serve via call_padded.
        self.uses_ragged_encoder = callable(getattr(encoder, "call_padded",
                                                    None))
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
            float [B, L, D]; positions past `lengths` are zero.
        """
        if self.uses_ragged_encoder:
            return self.encoder.call_padded(self.item_embedding(ids), lengths,
                                            training=training)
        return self.encoder(self.item_embedding(ids), lengths,
                            training=training)

    def call(self, item_ids, training=None):
        """Hidden state of every position.

        Args:
            item_ids: int64 RaggedTensor [B, (L)], each row at most max_len.

        Returns:
            float RaggedTensor [B, (L), D].
        """
        if self.uses_ragged_encoder:
            # Lookup on the packed ids; nothing is padded on this path.
            embedded = item_ids.with_flat_values(
                self.item_embedding(item_ids.flat_values))  # [B, (L), D]
            return self.encoder(embedded, training=training)
        lengths = item_ids.row_lengths()
        hidden = self.encode_padded(item_ids.to_tensor(), lengths,
                                    training=training)
        return tf.RaggedTensor.from_tensor(hidden, lengths=lengths)

    def compute_loss(self, inputs, training=False):
        item_ids = validate_ids(inputs["item_ids"], self.num_items,
                                arg_name="item_ids")
        hidden = self(item_ids, training=training).flat_values  # [T, D]
        targets = inputs["targets"].flat_values  # [T]
        users = position_users(inputs, item_ids)
        if users is None:
            return self.task(hidden, self.item_table, targets)
        return self.task(hidden, self.item_table, targets,
                         sampler_query=users)

    def query_embeddings(self, item_ids):
        """float [B, D]: the hidden state after each history's last item.

        Args:
            item_ids: int64 RaggedTensor [B, (L)] histories.
        """
        item_ids = item_ids[:, -self.max_len:]
        if self.uses_ragged_encoder:
            hidden = self(item_ids, training=False)  # [B, (L), D]
            # Last token of each row; an empty row gives zeros.
            last = hidden[:, -1:].to_tensor(shape=[None, 1, None])
            return last[:, 0]
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
