"""Learned absolute position embeddings for ragged sequences."""

import tensorflow as tf
import tf_keras

from tfrec_fast.layers import _ragged_checks


def ragged_positions(row_splits, from_end=False):
    """Position of every packed token within its row.

    Args:
        row_splits: int [B + 1] row boundaries.
        from_end: count from each row's last token (0 = last) instead of
            its first (0 = first).

    Returns:
        int64 [T] positions, T = row_splits[-1].
    """
    row_splits = tf.cast(row_splits, tf.int64)
    lengths = row_splits[1:] - row_splits[:-1]  # [B]
    starts = tf.repeat(row_splits[:-1], lengths)  # [T]
    positions = tf.range(row_splits[-1], dtype=tf.int64) - starts
    if from_end:
        positions = tf.repeat(lengths, lengths) - 1 - positions
    return positions


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class RaggedPositionalEmbedding(tf_keras.layers.Layer):
    """Learned embedding of each token's position within its row.

    Positions count from the start of each row (0 = oldest item, as
    `PaddedSequenceEncoder`) or, with `from_end=True`, from its end (0 = most
    recent item), which keeps the embedding of "the latest item" the same
    whatever the history length.

    Rows longer than `max_len` are an error, not clipped or wrapped: the call
    fails with `tf.errors.InvalidArgumentError` naming the longest row and
    `max_len` (cut histories to their last `max_len` items first, e.g.
    `ids[:, -max_len:]`).

    Args:
        max_len: size of the position table; the longest row allowed.
        dim: embedding width D.
        from_end: count positions from the end of each row.
        embeddings_initializer: initializer of the [max_len, D] table
            (default "uniform", as tf_keras.layers.Embedding).
        **kwargs: base Layer arguments.

    Call arguments:
        inputs: RaggedTensor [B, (L), ...] of any dtype and inner shape,
            ragged_rank 1 (e.g. ids [B, (L)] or embeddings [B, (L), D]); only
            its row splits are used.

    Returns:
        RaggedTensor [B, (L), D] of the layer's compute dtype with the row
        splits of `inputs`: the position embedding of every token.
    """

    def __init__(self, max_len, dim, from_end=False,
                 embeddings_initializer="uniform", **kwargs):
        super().__init__(**kwargs)
        for arg, value in (("max_len", max_len), ("dim", dim)):
            if not _ragged_checks.is_positive_int(value):
                raise ValueError(f"RaggedPositionalEmbedding: {arg} must be a "
                                 f"positive int, got {value!r}")
        self.max_len = int(max_len)
        self.dim = int(dim)
        self.from_end = bool(from_end)
        self.embeddings_initializer = tf_keras.initializers.get(
            embeddings_initializer)

    def build(self, input_shape):
        self.embeddings = self.add_weight(
            "embeddings", shape=[self.max_len, self.dim],
            initializer=self.embeddings_initializer, trainable=True)
        super().build(input_shape)

    def position_ids(self, row_splits):
        """int64 [T] positions of the packed tokens, checked < max_len.

        Raises:
            tf.errors.InvalidArgumentError: a row is longer than max_len.
        """
        row_splits = tf.cast(row_splits, tf.int64)
        longest = tf.reduce_max(
            tf.concat([row_splits[1:] - row_splits[:-1], [0]], axis=0))
        check = tf.debugging.assert_less_equal(
            longest, tf.constant(self.max_len, tf.int64),
            message=f"RaggedPositionalEmbedding '{self.name}': a row is "
                    f"longer than max_len = {self.max_len}; cut histories "
                    "to their last max_len items first (longest row, "
                    "max_len)")
        with tf.control_dependencies([check] if check is not None else []):
            return tf.identity(ragged_positions(row_splits, self.from_end))

    def call(self, inputs):
        _ragged_checks.check_ragged_sequence(
            inputs, f"RaggedPositionalEmbedding '{self.name}'", "inputs",
            floating=False, inner_rank=None)
        positions = self.position_ids(inputs.row_splits)  # [T]
        table = tf.cast(self.embeddings, self.compute_dtype)
        return tf.RaggedTensor.from_row_splits(
            tf.gather(table, positions), inputs.row_splits, validate=False)

    def get_config(self):
        return {**super().get_config(), "max_len": self.max_len,
                "dim": self.dim, "from_end": self.from_end,
                "embeddings_initializer": tf_keras.initializers.serialize(
                    self.embeddings_initializer)}
