"""Hard negatives: the highest-scoring items of a pool drawn from a sampler."""

import math

import tensorflow as tf
import tf_keras

from tfrec_fast._serialization import config_with_layers

from tfrec_fast.ops.validate_ids import validate_ids
from tfrec_fast.samplers.base import CandidateSampler
from tfrec_fast.samplers.base import check_num
from tfrec_fast.samplers.base import check_positives
from tfrec_fast.samplers.base import check_query
from tfrec_fast.samplers.base import check_rows
from tfrec_fast.samplers.base import check_sampler
from tfrec_fast.samplers.in_batch import InBatch
from tfrec_fast.samplers.mixed import Mixed
from tfrec_fast.samplers.mixed import resolve_num


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class HardNegatives(CandidateSampler):
    """The top-`num` of a pool of `pool_size` draws, scored by the model.

    Dynamic negative sampling (Zhang et al., "Optimizing top-n collaborative
    filtering via dynamic negative item sampling", SIGIR 2013), with a pool
    of P = `pool_size` draws from `base` instead of one:

    1. draw P candidates from `base` (one pool shared by every row when
       `shared=True`, else one pool per row);
    2. score them with the current model, s = query . item_table[id]
       (no gradient flows through the selection);
    3. keep each row's `num` highest-scoring pool entries. Pool entries
       equal to the row's positive (when `positives` is given) and repeats
       of an id already in the row's pool are ranked last, so the kept
       items are distinct non-positives whenever the pool holds at least
       `num` of them (otherwise the rest are filled with those entries,
       which the loss masks or counts twice).

    The result is always per row: ids [T, num].

    **log q returned**: `base`'s log q of the kept id plus
    log(P / num), so that the loss's correction log(num) + log_q equals
    log(P q_base), the correction each item would get in a sampled softmax
    over the whole pool. The kept items then stand for the pool's largest
    terms of the normaliser (a lower bound of the pool's corrected
    logsumexp, tight when a few scores dominate). `log_prob(query, ids,
    num)` returns the same quantity for any id, broadcast to one row per
    query row.

    **Bias, honestly**: the kept set is not a sample from any known
    distribution: whether an item is kept depends on the other pool draws
    and on the scores, and its inclusion probability has no closed form.
    log_q above is a heuristic, not a probability, and the estimator is
    *biased towards hard negatives on purpose*: high-scoring items are
    pushed down far more often than their share of the softmax normaliser,
    which approximates the top of the softmax (useful for ranking metrics)
    rather than the full softmax; the loss is not a consistent estimate of
    the full cross-entropy and its value is not comparable with other
    samplers'. The hardest negatives are also the most likely *false
    negatives* (relevant items the user has not interacted with yet, or
    near-duplicates of the positive); pass `listed_positives` to the loss
    to mask known ones, keep `num` well below `pool_size` only if the
    catalog tolerates that risk, and consider mixing with uniform or
    in-batch candidates (`Mixed(in_batch, HardNegatives(...))`). With
    num = pool_size nothing is selected and it reduces to `base`.

    Args:
        base: the `CandidateSampler` that draws the pool (not InBatch,
            Mixed or HardNegatives).
        pool_size: P, draws per pool, a positive int; `num` must be <= P.
        seed: unused (the pool uses `base`'s stream, the selection is
            deterministic); kept for the `CandidateSampler` interface.
    """

    query_dependent = True
    # log_prob needs the num of the candidate set (log(P / num)).
    log_prob_needs_num = True

    def __init__(self, base, pool_size, seed=None, **kwargs):
        kwargs.pop("num_items", None)  # from get_config; base rules
        base = check_sampler(base, "base")
        if isinstance(base, (InBatch, Mixed, HardNegatives)):
            raise ValueError(f"base must draw pool_size candidates on its own "
                             f"(e.g. Uniform, Unigram), got "
                             f"{type(base).__name__}")
        pool_size = check_num(pool_size, "pool_size")
        if not isinstance(pool_size, int):
            raise ValueError("pool_size must be a Python int")
        super().__init__(base.num_items, seed=seed, **kwargs)
        self.base = base
        self.pool_size = pool_size
        self._last_num = None

    def get_config(self):
        config = super().get_config()
        config.update(base=tf_keras.layers.serialize(self.base),
                      pool_size=self.pool_size)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config_with_layers(config, ("base",), custom_objects))

    def _check_num(self, num):
        num = check_num(num)
        if isinstance(num, int):
            if num > self.pool_size:
                raise ValueError(
                    f"HardNegatives keeps num of its pool_size = "
                    f"{self.pool_size} pool draws; num must be <= pool_size, "
                    f"got num={num}")
            return num
        with tf.control_dependencies([tf.debugging.assert_less_equal(
                num, tf.constant(self.pool_size, num.dtype),
                message=f"HardNegatives: num must be <= pool_size = "
                        f"{self.pool_size}")]):
            return tf.identity(num)

    def sample(self, query, num, shared=True, positives=None,
               item_table=None):
        """Draws a pool from `base` and keeps each row's top-`num`.

        Args:
            query: float [T, D] query rows (required: they score the pool).
            num: kept candidates per row, 1 <= num <= pool_size.
            shared: one pool for every row (one [T, P] matmul) or one pool
                per row ([T, P, D] gathered rows).
            positives: optional int [T]; pool entries equal to the row's
                positive are ranked last.
            item_table: float [C, D] item embeddings (required).

        Returns:
            (ids int64 [T, num], log_q float32 [T, num]): the kept ids,
            best first, and base log q + log(pool_size / num).
        """
        num = self._check_num(num)
        if query is None:
            raise ValueError("HardNegatives scores its pool with the query; "
                             "pass query [T, D]")
        if item_table is None:
            raise ValueError("HardNegatives scores its pool with the item "
                             "embeddings; pass item_table [C, D]")
        query = check_query(query)
        item_table = check_query(item_table, arg_name="item_table")
        if (item_table.shape[0] is not None
                and item_table.shape[0] != self.num_items):
            raise ValueError(f"item_table must have num_items = "
                             f"{self.num_items} rows, got shape "
                             f"{item_table.shape}")
        if (query.shape[1] is not None and item_table.shape[1] is not None
                and query.shape[1] != item_table.shape[1]):
            raise ValueError(f"query [T, D] and item_table [C, D] must have "
                             f"the same D, got {query.shape} and "
                             f"{item_table.shape}")
        if positives is not None:
            positives = check_positives(positives, self.num_items,
                                        "HardNegatives")
            checks = check_rows(query, tf.shape(positives)[0],
                                "HardNegatives")
            with tf.control_dependencies(checks):
                positives = tf.identity(positives)
        pool, pool_log_q = self.base.sample(query, self.pool_size,
                                            shared=shared,
                                            positives=positives,
                                            item_table=item_table)
        rows = tf.shape(query)[0]
        table = tf.stop_gradient(tf.cast(item_table, query.dtype))
        query = tf.stop_gradient(query)
        if pool.shape.rank == 1:
            scores = tf.matmul(query, tf.gather(table, pool),
                               transpose_b=True)  # [T, P]
            masked = repeats(pool[tf.newaxis])  # [1, P]
            pool = tf.broadcast_to(pool[tf.newaxis], [rows, self.pool_size])
            pool_log_q = tf.broadcast_to(pool_log_q[tf.newaxis],
                                         [rows, self.pool_size])
        else:
            scores = tf.einsum("td,tpd->tp", query, tf.gather(table, pool))
            masked = repeats(pool)
        if positives is not None:
            masked = masked | (pool == positives[:, tf.newaxis])
        scores = tf.where(masked, tf.constant(-math.inf, scores.dtype),
                          scores)
        _, keep = tf.math.top_k(scores, k=num)  # [T, num]
        ids = tf.gather(pool, keep, batch_dims=1)
        log_q = tf.gather(pool_log_q, keep, batch_dims=1) + self._log_ratio(
            num)
        self._last_num = num if isinstance(num, int) else None
        return ids, log_q

    def _log_ratio(self, num):
        return (math.log(self.pool_size)
                - tf.math.log(tf.cast(num, tf.float32)))

    def log_prob(self, query, ids, num=None):
        """base log q + log(pool_size / num), one row per query row.

        Not a probability (see the class docstring): the quantity `sample`
        returns as log q, for any id.

        Args:
            query: [T, D] query rows (required).
            ids: int [K] (the same ids for every row) or [T, K], in [0, C).
            num: the kept count the correction refers to; None for the num
                of the latest `sample` call.

        Returns:
            float32 [T, K].
        """
        num = resolve_num(num, self._last_num, "HardNegatives")
        if isinstance(num, int) and num > self.pool_size:
            raise ValueError(f"num must be <= pool_size = {self.pool_size}, "
                             f"got num={num}")
        ids = tf.cast(validate_ids(ids, self.num_items, arg_name="ids"),
                      tf.int64)
        if query is None:
            raise ValueError("HardNegatives probabilities depend on the "
                             "query; pass query [T, D]")
        query = check_query(query)
        if ids.shape.rank is not None and ids.shape.rank not in (1, 2):
            raise ValueError(f"ids must be [K] or [T, K], got shape "
                             f"{ids.shape}")
        if ids.shape.rank == 1:
            ids = tf.broadcast_to(ids[tf.newaxis],
                                  [tf.shape(query)[0], tf.shape(ids)[0]])
        base_query = query if self.base.query_dependent else None
        log_q = self.base.log_prob(base_query, ids)
        return log_q + self._log_ratio(num)

    def _log_prob(self, query, ids):
        return self.log_prob(query, ids)


def repeats(ids):
    """bool [R, P]: True where ids[r, p] equals an earlier ids[r, p' < p]."""
    order = tf.argsort(ids, axis=1, stable=True)
    ordered = tf.gather(ids, order, batch_dims=1)
    repeated = tf.concat([tf.zeros_like(ordered[:, :1], tf.bool),
                          ordered[:, 1:] == ordered[:, :-1]], axis=1)
    # Scatter back: position order[r, j] gets repeated[r, j].
    inverse = tf.argsort(order, axis=1, stable=True)
    return tf.gather(repeated, inverse, batch_dims=1)
