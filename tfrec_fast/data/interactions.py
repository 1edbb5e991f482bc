"""A raw interaction log: who interacted with what, and when."""

import dataclasses

import numpy as np


def _as_1d(name: str, values, dtype) -> np.ndarray:
    """Converts `values` to a 1-D array of `dtype`, or raises ValueError.

    Args:
        name: Field name used in error messages.
        values: Array-like of shape [N].
        dtype: Target numpy dtype (np.int64 or np.float64).

    Returns:
        np.ndarray of shape [N] and dtype `dtype` (no copy when already so).
    """
    array = np.asarray(values)
    if array.ndim != 1:
        raise ValueError(
            f"Interactions.{name} must be 1-D, got shape {array.shape}.")
    if dtype == np.int64 and array.size and array.dtype.kind not in "iu":
        raise ValueError(
            f"Interactions.{name} must hold integers, got dtype "
            f"{array.dtype}.")
    return array.astype(dtype, copy=False)


@dataclasses.dataclass(frozen=True)
class Interactions:
    """An interaction log with raw (file) ids, in file order.

    Attributes:
        users: np.ndarray int64 [N], raw user id of each interaction.
        items: np.ndarray int64 [N], raw item id of each interaction.
        timestamps: np.ndarray float64 [N], time of each interaction. Formats
            without timestamps use the line order 0.0, 1.0, ..., N - 1.
    """

    users: np.ndarray
    items: np.ndarray
    timestamps: np.ndarray

    def __post_init__(self):
        users = _as_1d("users", self.users, np.int64)
        items = _as_1d("items", self.items, np.int64)
        timestamps = _as_1d("timestamps", self.timestamps, np.float64)
        if not users.shape == items.shape == timestamps.shape:
            raise ValueError(
                "Interactions fields must have equal lengths, got "
                f"users [{users.shape[0]}], items [{items.shape[0]}], "
                f"timestamps [{timestamps.shape[0]}].")
        object.__setattr__(self, "users", users)
        object.__setattr__(self, "items", items)
        object.__setattr__(self, "timestamps", timestamps)

    def __len__(self) -> int:
        """Returns N, the number of interactions."""
        return int(self.users.shape[0])

    @property
    def num_interactions(self) -> int:
        """N, the number of interactions."""
        return len(self)
