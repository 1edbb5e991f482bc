"""Training callbacks: mid-epoch backups that resume to the same run.

`ResumableBackup` is `tf_keras.callbacks.BackupAndRestore` plus the one
number a restarted `model.fit` needs to feed the right batches: how many
batches the restored checkpoint has trained. Together with
`tfrec_fast.data.resumable_epochs` (which batches) and the package's
counter-keyed random streams (`tfrec_fast.layers.ResumableDropout`, the
samplers' draw counters: which masks and negatives), a run that is killed
and restarted continues exactly as the uninterrupted run would have
(tests/test_resume.py).
"""

import tensorflow as tf
import tf_keras


class ResumableBackup(tf_keras.callbacks.BackupAndRestore):
    """`BackupAndRestore` that also says where the data stream restarts.

    On `on_train_begin` it restores the latest backup (as
    `BackupAndRestore` does: weights, optimizer slots and step counter,
    sampler state, dropout counters, the epoch and batch reached) and then
    sets `start` to the number of batches trained so far, the optimizer's
    `iterations` (0 for a new run). `start` does not change while `fit`
    runs, so a `tfrec_fast.data.resumable_epochs` stream given it starts at
    the batch after the last one the backup holds.

    (Reading `model.optimizer.iterations` itself from the stream would
    race: the train step increments it in the same graph as it takes its
    batch, with no order between the two.)

    Args:
        backup_dir: directory of the backups (as for `BackupAndRestore`).
        save_freq: "epoch", or back up every N batches (mid-epoch resume).
        delete_checkpoint: delete the backup when `fit` ends normally.
        **kwargs: other `BackupAndRestore` arguments.

    Attributes:
        start: int64 scalar variable, the batches already trained when the
            current `fit` began (set in `on_train_begin`).

    Example:

        >>> import tempfile
        >>> import tfrec_fast  # selects tf_keras before TensorFlow loads
        >>> import tensorflow as tf
        >>> import tf_keras
        >>> from tfrec_fast import data
        >>> from tfrec_fast.callbacks import ResumableBackup
        >>> from tfrec_fast.models import SASRec
        >>> seqs = data.synthetic_zipf(64, 30, mean_length=6, seed=0)
        >>> def make_epoch(epoch):  # a new, fixed order every epoch
        ...     return data.next_item_dataset(seqs, 16, max_len=8,
        ...                                   seed=1000 + epoch)
        >>> steps = int(make_epoch(tf.constant(0, tf.int64)).cardinality())
        >>> tf_keras.utils.set_random_seed(0)  # same dropout / sampler seeds
        >>> model = SASRec(30, max_len=8, dim=8, num_blocks=1)
        >>> model.compile(optimizer=tf_keras.optimizers.Adam(1e-3))
        >>> # Built before fit: the backup restores into existing variables.
        >>> _ = model(tf.ragged.constant([[1, 2]], dtype=tf.int64))
        >>> backup = ResumableBackup(tempfile.mkdtemp(), save_freq=2)
        >>> stream = data.resumable_epochs(make_epoch, steps, backup.start)
        >>> history = model.fit(stream, epochs=2, steps_per_epoch=steps,
        ...                     callbacks=[backup], verbose=0)
        >>> int(model.optimizer.iterations) == 2 * steps
        True

    Killed and run again, the same script resumes from the last backup
    with the batches, dropout masks and sampler draws that the
    uninterrupted run would have had.
    """

    def __init__(self, backup_dir, save_freq="epoch", delete_checkpoint=True,
                 **kwargs):
        super().__init__(backup_dir, save_freq=save_freq,
                         delete_checkpoint=delete_checkpoint, **kwargs)
        self.start = tf.Variable(0, dtype=tf.int64, trainable=False,
                                 name="resume_start")

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)  # restores the backup, if any
        self.start.assign(tf.cast(self.model.optimizer.iterations, tf.int64))
