"""Unigram sampler: q ∝ (count + smoothing)^alpha, O(1) draws by alias table."""

import numpy as np
import tensorflow as tf
import tf_keras

from tfrec_fast.samplers.base import CandidateSampler


def alias_table(probabilities):
    """Walker's alias table (Vose's O(n) construction).

    Draw: pick a column i uniformly, keep i with probability `accept[i]`,
    else take `alias[i]`.

    Args:
        probabilities: float64 [n], non-negative, summing to 1.

    Returns:
        (accept float64 [n] in [0, 1], alias int64 [n]).
    """
    n = len(probabilities)
    scaled = np.asarray(probabilities, np.float64) * n
    accept = np.ones(n, np.float64)
    alias = np.arange(n, dtype=np.int64)
    small = [i for i in range(n) if scaled[i] < 1.0]
    large = [i for i in range(n) if scaled[i] >= 1.0]
    while small and large:
        s, l = small.pop(), large.pop()
        accept[s] = scaled[s]
        alias[s] = l
        scaled[l] -= 1.0 - scaled[s]
        (small if scaled[l] < 1.0 else large).append(l)
    # Leftovers are 1 up to rounding.
    return accept, alias


def unigram_weights(counts, alpha, smoothing):
    """Checks counts and returns (counts + smoothing)^alpha, normalised.

    Raises:
        ValueError: counts not 1-D, not finite, negative, or with items of
            weight zero (they could never be drawn and their log q would be
            -inf).
    """
    counts = np.asarray(counts, np.float64)
    if counts.ndim != 1 or counts.size == 0:
        raise ValueError(f"counts must be a non-empty 1-D array of per-item "
                         f"counts, got shape {counts.shape}")
    if not np.all(np.isfinite(counts)):
        bad = int(np.flatnonzero(~np.isfinite(counts))[0])
        raise ValueError(f"counts[{bad}] = {counts[bad]} is not finite")
    if np.any(counts < 0):
        bad = int(np.flatnonzero(counts < 0)[0])
        raise ValueError(f"counts[{bad}] = {counts[bad]} is negative; counts "
                         "must be >= 0")
    if not np.isfinite(alpha) or alpha < 0:
        raise ValueError(f"alpha must be a finite number >= 0, got {alpha}")
    if not np.isfinite(smoothing) or smoothing < 0:
        raise ValueError(f"smoothing must be a finite number >= 0, got "
                         f"{smoothing}")
    weights = (counts + smoothing) ** alpha
    zeros = np.flatnonzero(weights <= 0)
    if zeros.size:
        raise ValueError(
            f"counts has {zeros.size} item(s) of weight 0 (first: "
            f"counts[{int(zeros[0])}] = {counts[zeros[0]]}); they could never "
            "be sampled and their log q would be -inf. Pass smoothing > 0 "
            "(e.g. 1) to add a pseudo-count to every item")
    return weights / weights.sum()


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class Unigram(CandidateSampler):
    """Items in proportion to (count + smoothing)^alpha.

    alpha = 1 is the popularity distribution, alpha = 0.75 the word2vec
    smoothing, alpha = 0 uniform. Draws are O(1) each through an alias table
    kept in variables (`accept`, `alias`, `log_q_table`); `set_counts`
    replaces the distribution in place.

    Args:
        counts: float/int [C] per-item counts (e.g. training interactions);
            the catalog size is `len(counts)`.
        alpha: exponent applied to the counts.
        smoothing: pseudo-count added to every item before the exponent;
            counts with zeros need smoothing > 0.
        seed: see `CandidateSampler`.
    """

    def __init__(self, counts, alpha=1.0, smoothing=0.0, seed=None,
                 **kwargs):
        kwargs.pop("num_items", None)  # from get_config; len(counts) rules
        probabilities = unigram_weights(counts, alpha, smoothing)
        super().__init__(len(probabilities), seed=seed, **kwargs)
        self.alpha = float(alpha)
        self.smoothing = float(smoothing)
        self._counts = np.asarray(counts, np.float64)
        accept, alias = alias_table(probabilities)
        c = self.num_items
        self.accept = self.add_weight(
            name="accept", shape=[c], dtype=tf.float32, trainable=False,
            initializer=tf_constant(accept, tf.float32))
        self.alias = self.add_weight(
            name="alias", shape=[c], dtype=tf.int64, trainable=False,
            initializer=tf_constant(alias, tf.int64))
        self.log_q_table = self.add_weight(
            name="log_q_table", shape=[c], dtype=tf.float32, trainable=False,
            initializer=tf_constant(np.log(probabilities), tf.float32))

    def set_counts(self, counts):
        """Replaces the distribution (same catalog size, same alpha)."""
        probabilities = unigram_weights(counts, self.alpha, self.smoothing)
        if len(probabilities) != self.num_items:
            raise ValueError(f"counts must have {self.num_items} entries, got "
                             f"{len(probabilities)}")
        self._counts = np.asarray(counts, np.float64)
        accept, alias = alias_table(probabilities)
        self.accept.assign(accept.astype(np.float32))
        self.alias.assign(alias)
        self.log_q_table.assign(np.log(probabilities).astype(np.float32))

    def get_config(self):
        config = super().get_config()
        config.update(counts=self._counts.tolist(), alpha=self.alpha,
                      smoothing=self.smoothing)
        return config

    def _draw(self, seed, shape, query, positives, item_table):
        seeds = tf.random.experimental.stateless_split(seed, 2)
        column = tf.random.stateless_uniform(shape, seeds[0], minval=0,
                                             maxval=self.num_items,
                                             dtype=tf.int64)
        coin = tf.random.stateless_uniform(shape, seeds[1])
        ids = tf.where(coin < tf.gather(self.accept, column), column,
                       tf.gather(self.alias, column))
        return ids, tf.gather(self.log_q_table, ids)

    def _log_prob(self, query, ids):
        return tf.gather(self.log_q_table, ids)


def tf_constant(value, dtype):
    """A Keras initializer returning a fixed array."""
    def initializer(shape, dtype=dtype, **kwargs):
        del kwargs
        return tf.reshape(tf.constant(value, dtype), shape)
    return initializer
