"""Dropout whose masks a checkpoint restores (counter-keyed stateless RNG)."""

import numbers

import numpy as np
import tensorflow as tf
import tf_keras

# Salt of the mask stream, so that a dropout layer and a sampler that happen
# to share a seed still draw unrelated bits.
_SALT = 0xD50


def _replica_id():
    """The replica id in the current tf.distribute sync group (0 outside)."""
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context: one logical stream
        return tf.constant(0, tf.int32)
    return tf.cast(context.replica_id_in_sync_group, tf.int32)


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class ResumableDropout(tf_keras.layers.Dropout):
    """`tf_keras.layers.Dropout` whose next masks a checkpoint restores.

    Stock Dropout draws its masks from TensorFlow's stateful random ops (or
    from a `tf.random.Generator` that tf_keras deliberately leaves out of
    checkpoints), so a run restored from a checkpoint drops other units than
    the run that wrote it would have. Here the mask of every training call
    is a stateless draw keyed by (seed, call counter, replica id), and the
    counter is a variable that checkpoints carry: restoring a checkpoint
    restores the masks that follow it. Replicas of a `tf.distribute`
    strategy share the counter and draw different masks.

    The counter (`call_counter`, int64) is a checkpoint dependency of the
    layer (`tf.train.Checkpoint`, `tf_keras.callbacks.BackupAndRestore`,
    `save_weights` in the TensorFlow format) but not one of its `weights`:
    `get_weights` / `set_weights` of a model holding it see the same list
    as with stock Dropout.

    Rates, `noise_shape`, scaling by 1 / (1 - rate) and `training`
    handling are those of `tf_keras.layers.Dropout`; only the random
    stream differs.

    Args:
        rate: fraction of the input units to drop, in [0, 1).
        noise_shape: as for `tf_keras.layers.Dropout`.
        seed: int seed of the mask stream. None draws one from NumPy's
            global generator at construction (so `tf_keras.utils.
            set_random_seed` makes it reproducible) and records it in
            `get_config()`.
        **kwargs: base Layer arguments.

    Example:

        >>> import tempfile
        >>> layer = ResumableDropout(0.5, seed=1)
        >>> checkpoint = tf.train.Checkpoint(layer=layer)
        >>> path = checkpoint.write(tempfile.mkdtemp() + "/ckpt")
        >>> x = tf.ones([2, 8])
        >>> first = layer(x, training=True)   # counter 0 -> 1
        >>> second = layer(x, training=True)  # another mask
        >>> _ = checkpoint.read(path)         # counter back to 0
        >>> bool(tf.reduce_all(layer(x, training=True) == first))
        True
    """

    def __init__(self, rate, noise_shape=None, seed=None, **kwargs):
        if seed is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        super().__init__(rate, noise_shape=noise_shape, seed=int(seed),
                         **kwargs)
        self._create_call_counter()

    @tf.__internal__.tracking.no_automatic_dependency_tracking
    def _create_call_counter(self):
        # Kept out of the Keras weight lists (the assignment is untracked) so
        # that weight lists match stock Dropout's, e.g. the ragged and the
        # padded encoders' one to one; tracked explicitly for checkpoints.
        # ONLY_FIRST_REPLICA: replicas share one counter, as the samplers'
        # draw counters.
        self.call_counter = tf.Variable(
            0, dtype=tf.int64, trainable=False, name="call_counter",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        self._track_trackable(self.call_counter, name="call_counter")

    def next_seed(self):
        """int32 [2] key of the next mask; advances the call counter."""
        count = self.call_counter.assign_add(1, read_value=True) - 1
        key = tf.random.experimental.stateless_fold_in(
            tf.constant([self.seed % (2**31 - 1), _SALT], tf.int32),
            tf.cast(count % (2**31 - 1), tf.int32))
        return tf.random.experimental.stateless_fold_in(key, _replica_id())

    def call(self, inputs, training=None):
        if isinstance(self.rate, numbers.Real) and self.rate == 0:
            return tf.identity(inputs)
        if training is None:
            training = tf_keras.backend.learning_phase()

        def dropped():
            return tf.nn.experimental.stateless_dropout(
                inputs, self.rate, seed=self.next_seed(),
                noise_shape=self._get_noise_shape(inputs))

        return tf.__internal__.smart_cond.smart_cond(
            training, dropped, lambda: tf.identity(inputs))
