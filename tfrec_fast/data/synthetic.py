"""Synthetic Zipf-distributed item sequences for benchmarks and tests."""

import math
import numbers
from typing import Optional

import numpy as np

from tfrec_fast.data._csr import splits_from_lengths
from tfrec_fast.data.sequences import SequenceData

LENGTH_DISTRIBUTIONS = ("geometric", "uniform", "constant")


def synthetic_zipf(num_users: int, num_items: int, mean_length: float = 50,
                   max_length: Optional[int] = None,
                   zipf_exponent: float = 1.0,
                   length_distribution: str = "geometric",
                   seed: int = 0) -> SequenceData:
    """Random sequences with Zipf item popularity, id 0 the most popular.

    Items are drawn i.i.d. with P(item k) proportional to
    1 / (k + 1) ** zipf_exponent. Sequence lengths (all >= 1) follow
    `length_distribution`:

    * "geometric": geometric on {1, 2, ...} with mean `mean_length`, clipped
      to `max_length` when given;
    * "uniform": uniform on [max(1, int(0.2 * max_length)), max_length], as in
      ByteTransformer's variable-length benchmark (`mean_length` is unused;
      `max_length` is required);
    * "constant": every length is `mean_length` (an integer), clipped to
      `max_length` when given.

    Deterministic for a given `seed` (numpy Generator); about 1 s for
    100k users x 50 items over a 1M-item catalogue.

    Args:
        num_users: U, number of sequences, >= 1.
        num_items: Catalogue size, >= 1.
        mean_length: Mean length, >= 1 (used by "geometric", "constant").
        max_length: Optional upper bound on lengths, >= 1.
        zipf_exponent: Popularity exponent, finite and >= 0 (0 is uniform).
        length_distribution: "geometric", "uniform" or "constant".
        seed: Seed of the numpy random Generator.

    Returns:
        SequenceData with U rows, items int64 [N] in [0, num_items), and
        identity vocabularies (user_vocab = arange(U),
        item_vocab = arange(num_items)).

    Raises:
        ValueError: An argument is out of range (the message names it).
    """
    _check_arguments(num_users, num_items, mean_length, max_length,
                     zipf_exponent, length_distribution)
    rng = np.random.default_rng(seed)
    lengths = _draw_lengths(rng, num_users, mean_length, max_length,
                            length_distribution)
    row_splits = splits_from_lengths(lengths)
    items = _draw_zipf_items(rng, num_items, zipf_exponent,
                             int(row_splits[-1]))
    return SequenceData(
        row_splits=row_splits,
        items=items,
        num_items=num_items,
        user_vocab=np.arange(num_users, dtype=np.int64),
        item_vocab=np.arange(num_items, dtype=np.int64))


def _draw_lengths(rng: np.random.Generator, num_users: int,
                  mean_length: float, max_length: Optional[int],
                  distribution: str) -> np.ndarray:
    """Draws sequence lengths.

    Returns:
        np.ndarray int64 [num_users], every entry in [1, max_length].
    """
    if distribution == "uniform":
        low = max(1, int(0.2 * max_length))
        return rng.integers(low, max_length, size=num_users, endpoint=True,
                            dtype=np.int64)
    if distribution == "constant":
        lengths = np.full(num_users, int(mean_length), dtype=np.int64)
    else:
        lengths = rng.geometric(1.0 / mean_length, size=num_users)
        lengths = lengths.astype(np.int64, copy=False)
    if max_length is not None:
        np.minimum(lengths, max_length, out=lengths)
    return lengths


def _draw_zipf_items(rng: np.random.Generator, num_items: int,
                     exponent: float, size: int) -> np.ndarray:
    """Draws `size` items with P(k) proportional to 1 / (k + 1) ** exponent.

    Inverse-CDF sampling: O(num_items + size * log(num_items)).

    Returns:
        np.ndarray int64 [size], entries in [0, num_items).
    """
    weights = np.arange(1, num_items + 1, dtype=np.float64) ** -exponent
    cdf = np.cumsum(weights)
    cdf /= cdf[-1]
    items = np.searchsorted(cdf, rng.random(size), side="right")
    # Guard against cdf[-1] rounding below a draw.
    return np.minimum(items, num_items - 1).astype(np.int64, copy=False)


def _check_arguments(num_users, num_items, mean_length, max_length,
                     zipf_exponent, length_distribution) -> None:
    """Raises ValueError, naming the argument, for an invalid argument."""
    _check_int("num_users", num_users, 1)
    _check_int("num_items", num_items, 1)
    if max_length is not None:
        _check_int("max_length", max_length, 1)
    if length_distribution not in LENGTH_DISTRIBUTIONS:
        raise ValueError(
            f"length_distribution must be one of {LENGTH_DISTRIBUTIONS}, got "
            f"{length_distribution!r}.")
    if length_distribution == "uniform" and max_length is None:
        raise ValueError(
            'max_length is required with length_distribution="uniform".')
    if (isinstance(mean_length, bool)
            or not isinstance(mean_length, numbers.Real)
            or not math.isfinite(mean_length) or mean_length < 1):
        raise ValueError(
            f"mean_length must be a finite number >= 1, got {mean_length!r}.")
    if length_distribution == "constant" and mean_length != int(mean_length):
        raise ValueError(
            'mean_length must be an integer with length_distribution='
            f'"constant", got {mean_length!r}.')
    if (isinstance(zipf_exponent, bool)
            or not isinstance(zipf_exponent, numbers.Real)
            or not math.isfinite(zipf_exponent) or zipf_exponent < 0):
        raise ValueError(
            f"zipf_exponent must be a finite number >= 0, got "
            f"{zipf_exponent!r}.")


def _check_int(name: str, value, minimum: int) -> None:
    """Raises ValueError unless `value` is an integer >= `minimum`."""
    if (isinstance(value, bool) or not isinstance(value, numbers.Integral)
            or value < minimum):
        raise ValueError(
            f"{name} must be an integer >= {minimum}, got {value!r}.")
