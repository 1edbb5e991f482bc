"""Per-user, time-ordered item sequences in CSR (row_splits) form."""

import dataclasses
import numbers

import numpy as np
import tensorflow as tf

from tfrec_fast.data._csr import as_int64_1d
from tfrec_fast.data._csr import check_row_splits
from tfrec_fast.data._csr import segment_indices
from tfrec_fast.data._csr import splits_from_lengths
from tfrec_fast.data.interactions import Interactions

ITEM_ORDERS = ("frequency", "raw")


@dataclasses.dataclass(frozen=True)
class SequenceData:
    """Per-user item sequences, oldest first, in CSR form.

    Row u holds the items of user `user_vocab[u]` in time order:
    `items[row_splits[u]:row_splits[u + 1]]`.

    Attributes:
        row_splits: np.ndarray int64 [U + 1], CSR row boundaries.
        items: np.ndarray int64 [N], re-indexed item ids in [0, num_items).
        num_items: Size of the item vocabulary.
        user_vocab: np.ndarray int64 [U], raw user id of each row.
        item_vocab: np.ndarray int64 [num_items], raw item id of each new id.
    """

    row_splits: np.ndarray
    items: np.ndarray
    num_items: int
    user_vocab: np.ndarray
    item_vocab: np.ndarray

    def __post_init__(self):
        row_splits = as_int64_1d("SequenceData.row_splits", self.row_splits)
        items = as_int64_1d("SequenceData.items", self.items)
        user_vocab = as_int64_1d("SequenceData.user_vocab", self.user_vocab)
        item_vocab = as_int64_1d("SequenceData.item_vocab", self.item_vocab)
        num_items = self.num_items
        if not isinstance(num_items, numbers.Integral) or num_items < 1:
            raise ValueError("SequenceData.num_items must be a positive "
                             f"integer, got {self.num_items!r}.")
        check_row_splits(row_splits, items.shape[0],
                         "SequenceData.row_splits")
        if user_vocab.shape[0] != row_splits.shape[0] - 1:
            raise ValueError(
                f"SequenceData.user_vocab has {user_vocab.shape[0]} entries "
                f"for {row_splits.shape[0] - 1} rows.")
        if item_vocab.shape[0] != self.num_items:
            raise ValueError(
                f"SequenceData.item_vocab has {item_vocab.shape[0]} entries, "
                f"expected num_items={self.num_items}.")
        if items.size and (items.min() < 0 or items.max() >= self.num_items):
            raise ValueError(
                f"SequenceData.items must lie in [0, {self.num_items}), got "
                f"[{items.min()}, {items.max()}].")
        object.__setattr__(self, "row_splits", row_splits)
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "num_items", int(self.num_items))
        object.__setattr__(self, "user_vocab", user_vocab)
        object.__setattr__(self, "item_vocab", item_vocab)

    @property
    def num_users(self) -> int:
        """U, the number of rows (users)."""
        return int(self.row_splits.shape[0] - 1)

    @property
    def num_interactions(self) -> int:
        """N, the total number of items over all rows."""
        return int(self.items.shape[0])

    @property
    def lengths(self) -> np.ndarray:
        """np.ndarray int64 [U], the length of each row."""
        return np.diff(self.row_splits)

    def sequence(self, u: int) -> np.ndarray:
        """Returns row `u`, oldest first.

        Returns:
            np.ndarray int64 [lengths[u]], a view into `items`.

        Raises:
            IndexError: `u` is not in [0, num_users).
        """
        if not 0 <= u < self.num_users:
            raise IndexError(
                f"Row {u} out of range for {self.num_users} users.")
        return self.items[self.row_splits[u]:self.row_splits[u + 1]]

    def to_ragged(self) -> tf.RaggedTensor:
        """Returns all rows as tf.RaggedTensor int64 [U, (L)], int64 splits."""
        return tf.RaggedTensor.from_row_splits(
            values=tf.constant(self.items, dtype=tf.int64),
            row_splits=tf.constant(self.row_splits, dtype=tf.int64),
            validate=False)


def to_sequences(interactions: Interactions, item_order: str = "frequency",
                 min_length: int = 1) -> SequenceData:
    """Groups an interaction log into per-user, time-ordered sequences.

    Users (rows) are ordered by raw id ascending. Each user's items are
    sorted by timestamp with a stable sort, so ties keep file order. Users
    with fewer than `min_length` interactions are dropped, then items are
    re-indexed over the remaining interactions:

    * "frequency": id 0 is the most frequent item, ties broken by raw id
      ascending, so Zipf / log-uniform samplers apply to the ids directly;
    * "raw": ids follow the raw item ids in ascending order.

    Args:
        interactions: The log; users/items int64 [N], timestamps float64 [N].
        item_order: "frequency" or "raw".
        min_length: Minimum number of interactions a user needs to be kept.

    Returns:
        SequenceData with U kept users and N' <= N interactions.

    Raises:
        ValueError: Bad `item_order` or `min_length`, or no user is left.
    """
    if item_order not in ITEM_ORDERS:
        raise ValueError(f"item_order must be one of {ITEM_ORDERS}, got "
                         f"{item_order!r}.")
    if not isinstance(min_length, numbers.Integral) or min_length < 1:
        raise ValueError(
            f"min_length must be an integer >= 1, got {min_length!r}.")
    order = _user_time_order(interactions.users, interactions.timestamps)
    sorted_users = interactions.users[order]
    user_splits = _run_splits(sorted_users)
    lengths = np.diff(user_splits)
    kept_users = lengths >= min_length
    if not kept_users.any():
        raise ValueError(
            f"No user has at least min_length={min_length} interactions "
            f"(the log has {len(interactions)} interactions).")
    sorted_items = interactions.items[order]
    if not kept_users.all():
        sorted_items = sorted_items[np.repeat(kept_users, lengths)]
    item_vocab, item_ids = _reindex_items(sorted_items, item_order)
    return SequenceData(
        row_splits=splits_from_lengths(lengths[kept_users]),
        items=item_ids,
        num_items=int(item_vocab.shape[0]),
        user_vocab=sorted_users[user_splits[:-1][kept_users]],
        item_vocab=item_vocab)


def _user_time_order(users: np.ndarray, times: np.ndarray) -> np.ndarray:
    """Permutation sorting by (user, timestamp), ties kept in input order.

    Args:
        users: int64 [N], user of each interaction.
        times: float64 [N], timestamp of each interaction.

    Returns:
        np.ndarray int64 [N].
    """
    order = np.argsort(times, kind="stable")
    return order[np.argsort(users[order], kind="stable")]


def _run_splits(sorted_values: np.ndarray) -> np.ndarray:
    """Boundaries of the runs of equal values in a sorted array.

    Args:
        sorted_values: int64 [N], N >= 0, sorted.

    Returns:
        np.ndarray int64 [R + 1] for R runs: 0, run ends..., N.
    """
    if sorted_values.shape[0] == 0:
        return np.zeros(1, dtype=np.int64)
    starts = np.flatnonzero(sorted_values[1:] != sorted_values[:-1]) + 1
    return np.concatenate(
        [[0], starts, [sorted_values.shape[0]]]).astype(np.int64)


def _reindex_items(raw_items: np.ndarray, item_order: str):
    """Maps raw item ids to dense ids.

    Args:
        raw_items: int64 [N], raw item ids.
        item_order: "frequency" or "raw" (see `to_sequences`).

    Returns:
        (item_vocab int64 [I] raw id of each new id, new ids int64 [N]).
    """
    vocab, inverse, counts = np.unique(
        raw_items, return_inverse=True, return_counts=True)
    inverse = inverse.reshape(-1).astype(np.int64, copy=False)
    if item_order == "raw":
        return vocab, inverse
    # `vocab` is ascending, so a stable sort breaks count ties by raw id.
    by_frequency = np.argsort(-counts, kind="stable")
    new_id = np.empty_like(by_frequency)
    new_id[by_frequency] = np.arange(by_frequency.shape[0])
    return vocab[by_frequency], new_id[inverse]


def truncate(seqs: SequenceData, max_len: int) -> SequenceData:
    """Keeps the most recent `max_len` items of every row.

    Item ids and vocabularies are unchanged (an item may no longer occur).

    Args:
        seqs: The sequences.
        max_len: Maximum row length, >= 1.

    Returns:
        SequenceData with lengths min(seqs.lengths, max_len).

    Raises:
        ValueError: `max_len` is not an integer >= 1.
    """
    if not isinstance(max_len, numbers.Integral) or max_len < 1:
        raise ValueError(f"max_len must be an integer >= 1, got {max_len!r}.")
    new_lengths = np.minimum(seqs.lengths, max_len)
    starts = seqs.row_splits[1:] - new_lengths
    return dataclasses.replace(
        seqs,
        row_splits=splits_from_lengths(new_lengths),
        items=seqs.items[segment_indices(starts, new_lengths)])
