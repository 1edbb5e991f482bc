"""IntegratedScorer: model score + the sampler's log-probability.

CoSam's integrated prediction (Chen et al., 2021): a model trained on
negatives from a sampler p_s learns scores relative to what p_s already
proposes; ranking by

    score(u, j) = model_score(u, j) + weight * log p_s(j | u)

puts the sampler's knowledge back. `p_s` is the sampler's own emission
probability, without excluding the user's observed items (those are
excluded from the ranking anyway).
"""

import tensorflow as tf
import tf_keras

from tfrec_fast._serialization import config_with_layers
from tfrec_fast.samplers.base import check_sampler


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class IntegratedScorer(tf_keras.layers.Layer):
    """Adds `weight * log p_s(item | query)` of a sampler to model scores.

    Works with any sampler: query-dependent ones that describe a whole
    catalog distribution per query (`CollaborativeSampler.
    item_probabilities`), and query-independent ones through `log_prob`
    of every item (e.g. popularity: + weight * log q(j)).

    Uses core TensorFlow ops only, so it can be part of an exported
    serving signature.

    Args:
        sampler: a `tfrec_fast.samplers.CandidateSampler`.
        weight: the factor of log p_s; 1 is CoSam's product p_s * score in
            log space.
        min_log_prob: floor of log p_s (an item with p_s = 0 would get
            -inf).
    """

    def __init__(self, sampler, weight=1.0, min_log_prob=-30.0, **kwargs):
        super().__init__(**kwargs)
        self.sampler = check_sampler(sampler, "sampler")
        self.weight = float(weight)
        self.min_log_prob = float(min_log_prob)
        self.built = True  # no weights of its own

    def get_config(self):
        config = super().get_config()
        config.update(sampler=tf_keras.layers.serialize(self.sampler),
                      weight=self.weight, min_log_prob=self.min_log_prob)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config_with_layers(config, ("sampler",),
                                        custom_objects))

    def log_probabilities(self, query):
        """float32 [B, C] (or [C] for query-independent samplers)."""
        sampler = self.sampler
        all_items = tf.range(sampler.num_items, dtype=tf.int64)
        if hasattr(sampler, "item_probabilities"):
            # Core ops only (no fused id check): this runs in serving too.
            probs = sampler.item_probabilities(query, exclude_observed=False,
                                               use_fused=False)
            log_p = tf.math.log(probs)
        elif sampler.query_dependent:
            log_p = sampler.log_prob(query, all_items)
        else:  # every id is in range: no id check needed
            log_p = sampler._log_prob(None, all_items)  # pylint: disable=protected-access
        return tf.maximum(log_p, self.min_log_prob)

    def call(self, scores, query):
        """Integrated scores.

        Args:
            scores: float [B, C] model scores of every item.
            query: what the sampler conditions on (int [B] user ids for
                `CollaborativeSampler`; ignored by query-independent
                samplers).

        Returns:
            float32 [B, C].

        Raises:
            ValueError: scores are not [B, C] with C = sampler.num_items.
        """
        scores = tf.convert_to_tensor(scores)
        if scores.shape.rank not in (None, 2) or not scores.shape[
                -1:].is_compatible_with([self.sampler.num_items]):
            # (Else: an "Incompatible shapes" add, or a silent broadcast.)
            raise ValueError(
                f"IntegratedScorer: scores must be [B, C] with C = "
                f"sampler.num_items = {self.sampler.num_items}, got shape "
                f"{scores.shape}")
        return tf.cast(scores, tf.float32) + self.weight * \
            self.log_probabilities(query)

    def item_bias(self, query):
        """float32 [B, C] (or [C]): the term `call` adds, for rankers that
        take a bias (`tfrec_fast.metrics.rank_of_targets`,
        `top_k_excluding`)."""
        return self.weight * self.log_probabilities(query)
