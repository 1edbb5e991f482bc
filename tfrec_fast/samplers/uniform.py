"""Context-free samplers with closed-form probabilities: Uniform, LogUniform."""

import math

import tensorflow as tf
import tf_keras

from tfrec_fast.samplers.base import CandidateSampler


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class Uniform(CandidateSampler):
    """Every item with probability 1 / C.

    Args:
        num_items: catalog size C.
        seed: see `CandidateSampler`.
    """

    def _draw(self, seed, shape, query, positives, item_table):
        ids = tf.random.stateless_uniform(shape, seed, minval=0,
                                          maxval=self.num_items,
                                          dtype=tf.int64)
        return ids, self._log_prob(None, ids)

    def _log_prob(self, query, ids):
        return tf.fill(tf.shape(ids), -math.log(self.num_items))


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class LogUniform(CandidateSampler):
    """Zipf-like: q(k) = log((k + 2) / (k + 1)) / log(C + 1).

    The probability falls with the id, so it only approximates popularity
    when ids are sorted by decreasing frequency (id 0 the most popular), as
    `tfrec_fast.data.to_sequences(item_order="frequency")` produces. It is
    the distribution of `tf.random.log_uniform_candidate_sampler`, drawn
    here with replacement.

    Args:
        num_items: catalog size C.
        seed: see `CandidateSampler`.
    """

    def _draw(self, seed, shape, query, positives, item_table):
        # Inverse CDF: P(id <= k) = log(k + 2) / log(C + 1).
        u = tf.random.stateless_uniform(shape, seed, dtype=tf.float64)
        ids = tf.cast(tf.floor(tf.exp(u * math.log(self.num_items + 1.0))),
                      tf.int64) - 1
        ids = tf.clip_by_value(ids, 0, self.num_items - 1)
        return ids, self._log_prob(None, ids)

    def _log_prob(self, query, ids):
        k = tf.cast(ids, tf.float64)
        log_q = (tf.math.log(tf.math.log1p(1.0 / (k + 1.0)))
                 - math.log(math.log(self.num_items + 1.0)))
        return tf.cast(log_q, tf.float32)
