"""Vectorised helpers for CSR (row_splits + flat values) ragged arrays."""

import numpy as np


def splits_from_lengths(lengths: np.ndarray) -> np.ndarray:
    """Row splits of rows with the given lengths.

    Args:
        lengths: int [R], non-negative row lengths.

    Returns:
        np.ndarray int64 [R + 1]: 0, then the cumulative sum of `lengths`.
    """
    splits = np.zeros(lengths.shape[0] + 1, dtype=np.int64)
    np.cumsum(lengths, out=splits[1:])
    return splits


def segment_indices(starts: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """Flat indices of the segments [starts[r], starts[r] + lengths[r]).

    Equivalent to `np.concatenate([np.arange(s, s + n) for s, n in ...])`
    without the Python loop.

    Args:
        starts: int [R], first index of each segment.
        lengths: int [R], non-negative length of each segment.

    Returns:
        np.ndarray int64 [sum(lengths)], the segments' indices in order.
    """
    starts = np.asarray(starts, dtype=np.int64)
    lengths = np.asarray(lengths, dtype=np.int64)
    splits = splits_from_lengths(lengths)
    # Index k of output row r is starts[r] + (k - splits[r]).
    offsets = np.repeat(starts - splits[:-1], lengths)
    return offsets + np.arange(splits[-1], dtype=np.int64)


def check_row_splits(row_splits: np.ndarray, num_values: int,
                     owner: str) -> None:
    """Raises ValueError unless `row_splits` are valid CSR splits.

    Args:
        row_splits: int64 [R + 1].
        num_values: Length of the flat values array they index.
        owner: Name used in error messages, e.g. "SequenceData.row_splits".
    """
    if row_splits.ndim != 1 or row_splits.shape[0] < 1:
        raise ValueError(f"{owner} must be 1-D with at least one entry, got "
                         f"shape {row_splits.shape}.")
    if row_splits[0] != 0 or row_splits[-1] != num_values:
        raise ValueError(
            f"{owner} must start at 0 and end at the number of values "
            f"({num_values}), got {row_splits[0]} and {row_splits[-1]}.")
    if np.any(np.diff(row_splits) < 0):
        raise ValueError(f"{owner} must be non-decreasing.")


def as_int64_1d(name: str, values) -> np.ndarray:
    """Converts `values` to a 1-D int64 array or raises ValueError."""
    array = np.asarray(values)
    if array.ndim != 1 or (array.size and array.dtype.kind not in "iu"):
        raise ValueError(f"{name} must be a 1-D integer array, got shape "
                         f"{array.shape} and dtype {array.dtype}.")
    return array.astype(np.int64, copy=False)
