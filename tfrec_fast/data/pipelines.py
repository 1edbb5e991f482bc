"""tf.data pipelines yielding padding-free (ragged) next-item batches.

Batches are assembled per batch from flat item arrays: a batch of row
indices is gathered into per-row (start, length) pairs, expanded with
`tf.ragged.range`, and the items are wrapped with
`tf.RaggedTensor.from_row_splits`. Row splits are int64. Nothing is padded.
"""

import numbers

import numpy as np
import tensorflow as tf

from tfrec_fast.data.sequences import SequenceData
from tfrec_fast.data.split import EvalSet


def next_item_dataset(train: SequenceData, batch_size: int, max_len: int,
                      shuffle: bool = True, seed: int = 0,
                      drop_remainder: bool = False,
                      with_users: bool = False) -> tf.data.Dataset:
    """Next-item training batches: every position predicts the next item.

    For each row s with len(s) >= 2 (shorter rows are skipped) the example is
    inputs = s[:-1] and targets = s[1:], both cut to their most recent
    `max_len` positions, so targets[t] is the item after inputs[t] and both
    rows have the same length min(len(s) - 1, max_len).

    Args:
        train: Training sequences (U rows).
        batch_size: Rows per batch, >= 1.
        max_len: Maximum positions per row, >= 1.
        shuffle: Shuffle the rows, with a new order every epoch (iteration
            over the dataset); the sequence of orders is fixed by `seed`.
        seed: Shuffle seed: an int, or an int64 scalar tensor (e.g. derived
            from the epoch inside `resumable_epochs`), which gives one
            order, a pure function of the seed, on every iteration.
        drop_remainder: Drop a last batch smaller than `batch_size`.
        with_users: Also yield each row's index in `train` (its user), for
            samplers that condition on the user.

    Returns:
        tf.data.Dataset of dicts with, for B rows per batch:
            "item_ids": tf.RaggedTensor int64 [B, (L)], int64 row splits.
            "targets": tf.RaggedTensor int64 [B, (L)], same row splits.
            "users": tf.Tensor int64 [B] (only with `with_users`).

    Raises:
        ValueError: Bad `batch_size` / `max_len`, or no row has length >= 2.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("max_len", max_len)
    lengths = train.lengths
    rows = np.flatnonzero(lengths >= 2)
    if rows.size == 0:
        raise ValueError("next_item_dataset needs at least one sequence of "
                         "length >= 2; all training sequences are shorter.")
    row_lengths = np.minimum(lengths[rows] - 1, max_len)
    # Inputs of a row are items[start:start + n]; targets are one further.
    starts = train.row_splits[rows + 1] - 1 - row_lengths
    items = tf.constant(train.items, dtype=tf.int64)
    starts = tf.constant(starts, dtype=tf.int64)
    row_lengths = tf.constant(row_lengths, dtype=tf.int64)

    row_users = tf.constant(rows, dtype=tf.int64)

    def make_batch(batch_rows):
        positions = _ragged_positions(starts, row_lengths, batch_rows)
        batch = {
            "item_ids": positions.with_flat_values(
                tf.gather(items, positions.flat_values)),
            "targets": positions.with_flat_values(
                tf.gather(items, positions.flat_values + 1)),
        }
        if with_users:
            batch["users"] = tf.gather(row_users, batch_rows)
        return batch

    dataset = tf.data.Dataset.range(rows.size)
    if shuffle and tf.is_tensor(seed):
        # tf.data's shuffle cannot take a symbolic seed (it compares it in
        # Python), and the order must be a pure function of the seed.
        order = tf.random.experimental.stateless_shuffle(
            tf.range(rows.size, dtype=tf.int64),
            seed=tf.stack([tf.cast(seed, tf.int64),
                           tf.constant(0x5EED, tf.int64)]))
        dataset = tf.data.Dataset.from_tensor_slices(order)
    elif shuffle:
        dataset = dataset.shuffle(rows.size, seed=seed,
                                  reshuffle_each_iteration=True)
    return _batch_and_map(dataset, batch_size, drop_remainder, make_batch)


def eval_dataset(eval_set: EvalSet, batch_size: int,
                 max_len: int) -> tf.data.Dataset:
    """Evaluation batches in EvalSet order (no shuffling).

    Args:
        eval_set: The examples (E of them).
        batch_size: Examples per batch, >= 1; the last batch may be smaller.
        max_len: Each history is cut to its most recent `max_len` items.

    Returns:
        tf.data.Dataset of dicts with, for B examples per batch:
            "item_ids": tf.RaggedTensor int64 [B, (L)], int64 row splits,
                the (truncated) histories.
            "targets": tf.Tensor int64 [B], the items to predict.
            "users": tf.Tensor int64 [B], the examples' row indices.

    Raises:
        ValueError: Bad `batch_size` / `max_len`, or an empty `eval_set`.
    """
    _check_positive_int("batch_size", batch_size)
    _check_positive_int("max_len", max_len)
    if len(eval_set) == 0:
        raise ValueError("eval_dataset got an EvalSet with no examples.")
    row_lengths = np.minimum(eval_set.history_lengths, max_len)
    starts = eval_set.history_splits[1:] - row_lengths
    history_items = tf.constant(eval_set.history_items, dtype=tf.int64)
    starts = tf.constant(starts, dtype=tf.int64)
    row_lengths = tf.constant(row_lengths, dtype=tf.int64)
    targets = tf.constant(eval_set.targets, dtype=tf.int64)
    users = tf.constant(eval_set.users, dtype=tf.int64)

    def make_batch(batch_rows):
        positions = _ragged_positions(starts, row_lengths, batch_rows)
        return {
            "item_ids": positions.with_flat_values(
                tf.gather(history_items, positions.flat_values)),
            "targets": tf.gather(targets, batch_rows),
            "users": tf.gather(users, batch_rows),
        }

    dataset = tf.data.Dataset.range(len(eval_set))
    return _batch_and_map(dataset, batch_size, False, make_batch)


def _ragged_positions(starts: tf.Tensor, lengths: tf.Tensor,
                      batch_rows: tf.Tensor) -> tf.RaggedTensor:
    """Flat-array positions of the selected rows.

    Args:
        starts: int64 [R], first position of each row.
        lengths: int64 [R], length of each row.
        batch_rows: int64 [B], rows to select.

    Returns:
        tf.RaggedTensor int64 [B, (L)] with int64 row splits; row b is
        starts[batch_rows[b]] + range(lengths[batch_rows[b]]).
    """
    batch_starts = tf.gather(starts, batch_rows)
    batch_lengths = tf.gather(lengths, batch_rows)
    row_splits = tf.concat(
        [tf.zeros([1], tf.int64), tf.cumsum(batch_lengths)], axis=0)
    row_of_position = tf.repeat(tf.range(tf.size(batch_rows, tf.int64)),
                                batch_lengths)
    offsets = tf.gather(batch_starts - row_splits[:-1], row_of_position)
    flat = offsets + tf.range(row_splits[-1], dtype=tf.int64)
    return tf.RaggedTensor.from_row_splits(flat, row_splits, validate=False)


def _batch_and_map(dataset: tf.data.Dataset, batch_size: int,
                   drop_remainder: bool, make_batch) -> tf.data.Dataset:
    """Batches a dataset of row indices and maps each batch to tensors."""
    return (dataset
            .batch(batch_size, drop_remainder=drop_remainder)
            .map(make_batch, num_parallel_calls=tf.data.AUTOTUNE,
                 deterministic=True)
            .prefetch(tf.data.AUTOTUNE))


def _check_positive_int(name: str, value) -> None:
    """Raises ValueError unless `value` is an integer >= 1."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or value < 1):
        raise ValueError(f"{name} must be an integer >= 1, got {value!r}.")
