"""Leave-one-out train / validation / test split of item sequences."""

import dataclasses

import numpy as np

from tfrec_fast.data._csr import as_int64_1d
from tfrec_fast.data._csr import check_row_splits
from tfrec_fast.data._csr import segment_indices
from tfrec_fast.data._csr import splits_from_lengths
from tfrec_fast.data.sequences import SequenceData

MIN_EVAL_LENGTH = 3


@dataclasses.dataclass(frozen=True)
class EvalSet:
    """Next-item evaluation examples: a history and the item that follows it.

    Example e belongs to row `users[e]` of the SequenceData it came from; its
    history is `history_items[history_splits[e]:history_splits[e + 1]]`
    (oldest first) and the item to predict is `targets[e]`.

    Attributes:
        history_splits: np.ndarray int64 [E + 1], CSR row boundaries.
        history_items: np.ndarray int64 [E_total], item ids of all histories.
        targets: np.ndarray int64 [E], the held-out next item of each example.
        users: np.ndarray int64 [E], row index into the SequenceData.
    """

    history_splits: np.ndarray
    history_items: np.ndarray
    targets: np.ndarray
    users: np.ndarray

    def __post_init__(self):
        splits = as_int64_1d("EvalSet.history_splits", self.history_splits)
        items = as_int64_1d("EvalSet.history_items", self.history_items)
        targets = as_int64_1d("EvalSet.targets", self.targets)
        users = as_int64_1d("EvalSet.users", self.users)
        check_row_splits(splits, items.shape[0], "EvalSet.history_splits")
        num_examples = splits.shape[0] - 1
        if targets.shape[0] != num_examples or users.shape[0] != num_examples:
            raise ValueError(
                f"EvalSet has {num_examples} histories but {targets.shape[0]} "
                f"targets and {users.shape[0]} users.")
        object.__setattr__(self, "history_splits", splits)
        object.__setattr__(self, "history_items", items)
        object.__setattr__(self, "targets", targets)
        object.__setattr__(self, "users", users)

    def __len__(self) -> int:
        """Returns E, the number of examples."""
        return int(self.targets.shape[0])

    @property
    def num_examples(self) -> int:
        """E, the number of examples."""
        return len(self)

    @property
    def history_lengths(self) -> np.ndarray:
        """np.ndarray int64 [E], the length of each history."""
        return np.diff(self.history_splits)

    def history(self, e: int) -> np.ndarray:
        """Returns the history of example `e`: int64 [history_lengths[e]]."""
        if not 0 <= e < len(self):
            raise IndexError(f"Example {e} out of range for {len(self)}.")
        return self.history_items[self.history_splits[e]:
                                  self.history_splits[e + 1]]


@dataclasses.dataclass(frozen=True)
class Split:
    """A leave-one-out split (see `leave_one_out`).

    Attributes:
        train: SequenceData with the same rows and vocabularies as the input.
        validation: EvalSet predicting each evaluated user's second-last item.
        test: EvalSet predicting each evaluated user's last item.
        num_items: Size of the item vocabulary.
    """

    train: SequenceData
    validation: EvalSet
    test: EvalSet
    num_items: int


def leave_one_out(seqs: SequenceData) -> Split:
    """Splits every sequence s (length L) leave-one-out, SASRec style.

    Users with L >= 3 are evaluated:

    * train: s[:-2];
    * validation: history s[:-2], target s[-2];
    * test: history s[:-1], target s[-1] (the history includes the
      validation target).

    Users with L < 3 keep their whole sequence in train and appear in neither
    EvalSet. So for an evaluated user, train + [validation target] +
    [test target] == s. EvalSet rows are in row order and `users` gives the
    row index into `seqs` (and into `train`, which has the same rows).

    Args:
        seqs: The full sequences (U rows).

    Returns:
        Split with train U rows, validation and test E rows each, where E is
        the number of rows with L >= 3.
    """
    lengths = seqs.lengths
    starts = seqs.row_splits[:-1]
    evaluated = lengths >= MIN_EVAL_LENGTH
    train_lengths = np.where(evaluated, lengths - 2, lengths)
    train = dataclasses.replace(
        seqs,
        row_splits=splits_from_lengths(train_lengths),
        items=seqs.items[segment_indices(starts, train_lengths)])
    users = np.flatnonzero(evaluated).astype(np.int64)
    return Split(
        train=train,
        validation=_eval_set(seqs, users, holdout=2),
        test=_eval_set(seqs, users, holdout=1),
        num_items=seqs.num_items)


def _eval_set(seqs: SequenceData, users: np.ndarray, holdout: int) -> EvalSet:
    """EvalSet with history s[:-holdout] and target s[-holdout] per user.

    Args:
        seqs: The full sequences.
        users: int64 [E], rows to evaluate (each of length >= holdout).
        holdout: 1 (test) or 2 (validation).
    """
    starts = seqs.row_splits[users]
    history_lengths = seqs.row_splits[users + 1] - starts - holdout
    return EvalSet(
        history_splits=splits_from_lengths(history_lengths),
        history_items=seqs.items[segment_indices(starts, history_lengths)],
        targets=seqs.items[starts + history_lengths],
        users=users)
