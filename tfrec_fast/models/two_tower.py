"""A two-tower retrieval model whose query tower reads the item history.

Query tower: the mean embedding of the history so far and the embedding of
the latest item, concatenated and projected (a bag-of-items tower in the
style of YouTube's candidate generator). Candidate tower: an item embedding
table. Trained on every prefix of every training sequence at once (prefix
means by a cumulative sum over the packed ragged values), with any loss
layer that takes (query embeddings, candidate embeddings, candidate ids):
`tfrec_fast.tasks.SampledRetrieval` or `tfrs.tasks.Retrieval`.

Serving: the query of a dense right-padded history (+ lengths) uses core ops
only, so `tfrec_fast.export.export_for_serving` applies.
"""

import tensorflow as tf
import tf_keras

from tfrec_fast.models.loss_scaling import LossScalingModel
from tfrec_fast.models.sasrec import last_window
from tfrec_fast.models.sasrec import position_users
from tfrec_fast.ops.validate_ids import validate_ids


class HistoryTwoTower(LossScalingModel):
    """Two towers: item history -> query, item id -> candidate.

    A `tfrs.Model`; under a `mixed_float16` policy its train step applies
    the loss scaling of the `LossScaleOptimizer` that `compile` adds.

    Args:
        num_items: catalog size C.
        task: the retrieval task, called as
            `task(query_embeddings [T, D], candidate_embeddings [T, D],
            candidate_ids=[T], compute_metrics=...)`.
        dim: embedding width D.
        max_len: the query tower sees at most the last `max_len` items.

    Inputs to `compute_loss` / `fit`: dicts with `item_ids` and `targets`,
    int64 RaggedTensors [B, (L)] with equal row lengths (as from
    `tfrec_fast.data.next_item_dataset`): the prefix ending at item_ids[b, t]
    is a query whose positive candidate is targets[b, t]. An optional
    `users` int64 [B] (`next_item_dataset(with_users=True)`) is handed to the
    task as every query's `sampler_query`.
    """

    def __init__(self, num_items, task, dim=64, max_len=200):
        super().__init__()
        self.num_items = num_items
        self.max_len = max_len
        def init():
            return tf_keras.initializers.RandomNormal(stddev=dim ** -0.5)

        self.history_embedding = tf_keras.layers.Embedding(
            num_items, dim, embeddings_initializer=init(),
            name="history_embedding")
        self.query_projection = tf_keras.layers.Dense(dim,
                                                      name="query_projection")
        self.candidate_embedding = tf_keras.layers.Embedding(
            num_items, dim, embeddings_initializer=init(),
            name="candidate_embedding")
        self.task = task

    @property
    def item_table(self):
        """float [C, D]: the candidate tower applied to every item."""
        if not self.candidate_embedding.built:
            self.candidate_embedding.build(None)
        return self.candidate_embedding.embeddings

    def _query(self, history_mean, latest):
        return self.query_projection(tf.concat([history_mean, latest], -1))

    def prefix_queries(self, item_ids):
        """Query embedding after every position.

        Args:
            item_ids: int64 RaggedTensor [B, (L)].

        Returns:
            float [T, D], T = total positions: row t encodes the history up
            to and including position t of its row. Under a mixed policy
            the running sums are float32 (a half-precision sum over the
            whole batch would leave the short prefixes' means with the
            rounding error of the batch total); the means are then cast to
            the compute dtype.
        """
        embeddings = self.history_embedding(item_ids.flat_values)  # [T, D]
        totals = tf.cumsum(tf.cast(embeddings, tf.float32), axis=0)
        # Subtract the running total at each row's start.
        starts = tf.gather(item_ids.row_starts(), item_ids.value_rowids())
        before = tf.gather(tf.pad(totals, [[1, 0], [0, 0]]), starts)
        counts = tf.cast(tf.range(tf.size(item_ids.flat_values,
                                          out_type=tf.int64)) - starts + 1,
                         tf.float32)
        means = (totals - before) / counts[:, tf.newaxis]
        return self._query(tf.cast(means, embeddings.dtype), embeddings)

    def compute_loss(self, inputs, training=False):
        item_ids = validate_ids(inputs["item_ids"], self.num_items,
                                arg_name="item_ids")
        targets = validate_ids(inputs["targets"].flat_values, self.num_items,
                               arg_name="targets")
        queries = self.prefix_queries(item_ids)
        extra = {}
        users = position_users(inputs, item_ids)
        if users is not None:  # for samplers that condition on the user
            extra["sampler_query"] = users
        return self.task(queries, self.candidate_embedding(targets),
                         candidate_ids=targets,
                         compute_metrics=not training, **extra)

    def query_embeddings(self, item_ids):
        """float [B, D]: the query after each whole history.

        Args:
            item_ids: int64 RaggedTensor [B, (L)], every row non-empty.
        """
        item_ids = item_ids[:, -self.max_len:]
        return self.serving_query(item_ids.to_tensor(), item_ids.row_lengths())

    # Serving protocol (tfrec_fast.export): core TF ops on dense + lengths.
    def serving_query(self, history_ids, lengths):
        """float [B, D] from dense int64 [B, L] ids and int64 [B] lengths."""
        ids, lengths = last_window(history_ids, lengths, self.max_len)
        ids = validate_ids(ids, self.num_items, arg_name="history_ids",
                           use_fused=False)
        embeddings = self.history_embedding(ids)  # [B, L, D]
        # The mean in float32 under a mixed policy, as in prefix_queries.
        mask = tf.sequence_mask(lengths, tf.shape(ids)[1],
                                dtype=tf.float32)[..., tf.newaxis]
        mean = tf.cast(tf.math.divide_no_nan(
            tf.reduce_sum(tf.cast(embeddings, tf.float32) * mask, axis=1),
            tf.cast(lengths, tf.float32)[:, tf.newaxis]), embeddings.dtype)
        latest = tf.gather(embeddings, tf.maximum(lengths - 1, 0),
                           batch_dims=1)
        return self._query(mean, latest)

    def serving_candidates(self):
        """(item_table float [C, D], item_bias None)."""
        return self.item_table, None
