"""ReinforcedSamplerModel: one `model.fit` trains the recommender and its sampler.

A sampler that learns from rewards (`tfrec_fast.samplers.
CollaborativeSampler`) adds a REINFORCE surrogate to its layer losses
whenever a loss layer scores its negatives. In a plain `tfrs.Model` that
surrogate is part of `model.losses` and the model's optimizer trains the
sampler too. This model gives the sampler its own optimizer (and learning
rate) instead: the train step splits the trainable variables into the
sampler's and the rest and applies each optimizer to its own.
"""

import tensorflow as tf
import tensorflow_recommenders as tfrs


def reward_learning_samplers(model):
    """The layers of `model` that learn from rewards (deduplicated)."""
    found = []
    for layer in model._flatten_layers(include_self=False):  # pylint: disable=protected-access
        if getattr(layer, "learns_from_rewards", False) and not any(
                layer is seen for seen in found):
            found.append(layer)
    return found


class ReinforcedSamplerModel(tfrs.Model):
    """A `tfrs.Model` whose reward-learning samplers have their own optimizer.

    Subclass it as you would `tfrs.Model` (implement `compute_loss`) and
    pass `sampler_optimizer`; `compile(optimizer=...)` sets the
    recommender's optimizer as usual. Each training step:

    - computes `compute_loss(inputs, training=True)` and the model's layer
      losses; the samplers' REINFORCE surrogates (value 0) are among them;
    - applies `optimizer` to the gradients of every trainable variable that
      is not a sampler's, and `sampler_optimizer` to the samplers' ones.

    The sampler's gradients come only from its surrogate: loss layers use
    its log q without gradient. Both optimizers are tracked, so a
    checkpoint of the model restores both.

    Args:
        sampler_optimizer: a tf_keras optimizer for the samplers' variables.
            None uses the model's optimizer for everything (the same as
            `tfrs.Model`).
    """

    def __init__(self, sampler_optimizer=None, **kwargs):
        super().__init__(**kwargs)
        self.sampler_optimizer = sampler_optimizer

    def train_step(self, inputs):
        with tf.GradientTape() as tape:
            loss = self.compute_loss(inputs, training=True)
            regularization_loss = tf.reduce_sum(
                [tf.reduce_sum(l) for l in self.losses])
            total_loss = loss + regularization_loss
        variables = self.trainable_variables
        sampler_ids = set()
        if self.sampler_optimizer is not None:
            for sampler in reward_learning_samplers(self):
                sampler_ids.update(id(v) for v in sampler.trainable_variables)
        gradients = tape.gradient(total_loss, variables)
        model_pairs, sampler_pairs = [], []
        for gradient, variable in zip(gradients, variables):
            if gradient is None:
                continue
            pairs = sampler_pairs if id(variable) in sampler_ids else \
                model_pairs
            pairs.append((gradient, variable))
        self.optimizer.apply_gradients(model_pairs)
        if sampler_pairs:
            self.sampler_optimizer.apply_gradients(sampler_pairs)
        metrics = {metric.name: metric.result() for metric in self.metrics}
        metrics["loss"] = loss
        metrics["regularization_loss"] = regularization_loss
        metrics["total_loss"] = total_loss
        return metrics
