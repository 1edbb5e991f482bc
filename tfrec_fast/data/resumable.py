"""An endless tf.data stream of epochs that resumes at a checkpointed batch.

`model.fit` restarted from a mid-epoch checkpoint (`tf_keras.callbacks.
BackupAndRestore(save_freq=N)`) skips the epochs and the steps already done
but not the data: it starts a new iterator, whose first batches are the
first batches of an epoch, and a `shuffle(reshuffle_each_iteration=True)`
in a fresh process replays the order of the first epoch. This stream makes
batch g (counted over the whole run) a pure function of g and starts at
the batch a variable says (`tfrec_fast.callbacks.ResumableBackup.start`,
the batches the restored checkpoint has trained), so a restarted run sees
exactly the batches that the uninterrupted one would have.
"""

import tensorflow as tf


def resumable_epochs(make_epoch, steps_per_epoch, position):
    """Epochs `make_epoch(0), make_epoch(1), ...` end to end, from `position`.

    Batch g of the stream is batch g % N of `make_epoch(g // N)` (N =
    `steps_per_epoch`). The first batch is g = `position`, read when the
    stream's iterator takes its first batch. Pass
    `tfrec_fast.callbacks.ResumableBackup.start`: that callback restores
    the backup in `on_train_begin` (before `fit` starts the iterator) and
    sets `start` to the batches trained so far, so a restarted `fit`
    continues with the batch after the last one the backup holds.

    `position` must not change while the iterator runs. In particular do
    not pass `model.optimizer.iterations`: the train step increments it
    with no order against taking its batch, so the stream would read 0 or
    1 at random (and skip the first batch or not).

    Train with `model.fit(stream, epochs=E, steps_per_epoch=N)`; the stream
    is infinite (Keras asks for `steps_per_epoch`), and one iterator serves
    every epoch.

    Args:
        make_epoch: function of an int64 scalar tensor `epoch` returning the
            tf.data.Dataset of that epoch's batches: a pure function of
            `epoch`, e.g. rows shuffled with a seed derived from it
            (`next_item_dataset(..., seed=seed + epoch)`), never with an
            unseeded or per-iteration reshuffle. Each epoch must yield
            exactly N batches (checked while iterating).
        steps_per_epoch: N, batches per epoch, a positive int.
        position: int64 scalar variable (or int): how many batches are
            already trained, e.g. `ResumableBackup.start`.

    Returns:
        An infinite tf.data.Dataset of the batches from `position` on.

    Raises:
        ValueError: `steps_per_epoch` is not a positive int.
        tf.errors.FailedPreconditionError (while iterating): an epoch has
            not exactly N batches.

    Example (a whole run in `tfrec_fast.callbacks.ResumableBackup`):

        >>> import tfrec_fast  # selects tf_keras before TensorFlow loads
        >>> import tensorflow as tf
        >>> from tfrec_fast import data
        >>> def make_epoch(epoch):  # epoch e: 0..5 shuffled, 2 batches
        ...     return data.next_item_dataset(
        ...         data.synthetic_zipf(6, 20, mean_length=5, seed=0,
        ...                             length_distribution="constant"),
        ...         batch_size=3, max_len=4, seed=100 + epoch,
        ...         with_users=True)
        >>> stream = data.resumable_epochs(make_epoch, 2, position=3)
        >>> first = next(iter(stream))  # epoch 1, batch 1
        >>> again = list(make_epoch(tf.constant(1, tf.int64)))[1]
        >>> first["users"].numpy().tolist() == again["users"].numpy().tolist()
        True
    """
    if isinstance(steps_per_epoch, bool) or not isinstance(
            steps_per_epoch, int) or steps_per_epoch < 1:
        raise ValueError(f"steps_per_epoch must be a positive int, got "
                         f"{steps_per_epoch!r}")
    steps = steps_per_epoch

    def epoch_batches(epoch):
        return make_epoch(epoch).apply(
            tf.data.experimental.assert_cardinality(steps))

    def from_position(_):
        # Runs when the iterator takes its first batch: after fit's
        # on_train_begin, where ResumableBackup sets the position.
        start = tf.cast(tf.convert_to_tensor(position), tf.int64)
        first_epoch = start // steps
        return (tf.data.Dataset.range(first_epoch, tf.int64.max)
                .flat_map(epoch_batches)
                .skip(start % steps))

    return (tf.data.Dataset.range(1)
            .flat_map(from_position)
            .apply(tf.data.experimental.assert_cardinality(
                tf.data.INFINITE_CARDINALITY)))
