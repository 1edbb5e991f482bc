"""Full-catalog ranking evaluation computed in item blocks.

Every function here scores users against the WHOLE catalog of ``C`` items, but
never materialises a ``[U, C]`` score matrix: the catalog is processed in
blocks of ``block_size`` items and only one ``[U, block_size]`` float32 score
block is alive at a time (peak memory is roughly ``4 * U * block_size`` bytes
for the block plus the same again for temporaries).

Exclusions (typically the user's history) are given in CSR form:

* ``exclude_splits``: int64 ``[U + 1]`` row splits, ``exclude_splits[0] == 0``,
  non-decreasing, ``exclude_splits[-1] == nnz``.
* ``exclude_items``: int64 ``[nnz]`` item ids in ``[0, C)``; the ids excluded
  for user ``u`` are ``exclude_items[exclude_splits[u]:exclude_splits[u + 1]]``.
  Duplicates are allowed.

This is exactly ``(ragged.row_splits, ragged.values)`` of a ``tf.RaggedTensor``
of shape ``[U, (L)]``.

Only core TensorFlow ops are used, so :func:`top_k_excluding` and
:func:`rank_of_targets` run eagerly, inside ``tf.function`` and inside a
serving SavedModel.

Input validation: static problems (wrong rank, mismatched ``D``, bad ``k`` or
``block_size``, wrong dtype) always raise ``ValueError`` naming the argument.
Value problems (ids outside ``[0, C)``, malformed splits, ``k > C`` when ``C``
is only known at run time) raise ``ValueError`` when executing eagerly; inside
a ``tf.function`` they become ``tf.debugging`` assertions that raise
``tf.errors.InvalidArgumentError`` with a message naming the argument.
"""

from __future__ import annotations

import numbers
from typing import (
    Callable, Dict, Mapping, NamedTuple, Optional, Sequence, Tuple, Union
)

import numpy as np
import tensorflow as tf

from tfrec_fast.ops.validate_ids import validate_ids

__all__ = [
    "top_k_excluding",
    "rank_of_targets",
    "ranking_metrics",
    "evaluate_full_ranking",
]

DEFAULT_BLOCK_SIZE = 65536

_NEG_INF = float("-inf")
_NAN = float("nan")


# ---------------------------------------------------------------------------
# Validation helpers.
# ---------------------------------------------------------------------------


class _Inputs(NamedTuple):
    """Validated, converted inputs shared by the public functions.

    Attributes:
        queries: float32 ``[U, D]``.
        item_embeddings: floating ``[C, D]`` (original dtype; blocks are cast
            to float32 one at a time so a bf16 table is never copied whole).
        exclude_splits: int64 ``[U + 1]`` or None.
        exclude_items: int64 ``[nnz]`` or None.
        item_bias: floating ``[C]`` or None.
        checks: run-time assertion ops (graph mode only; empty when eager).
    """

    queries: tf.Tensor
    item_embeddings: tf.Tensor
    exclude_splits: Optional[tf.Tensor]
    exclude_items: Optional[tf.Tensor]
    item_bias: Optional[tf.Tensor]
    checks: list


def _check_python_int(value, name: str, minimum: int = 1) -> int:
    """Returns ``value`` as a Python int, raising ValueError if it is not >= minimum."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"`{name}` must be a Python int, got {value!r}.")
    value = int(value)
    if value < minimum:
        raise ValueError(f"`{name}` must be >= {minimum}, got {value}.")
    return value


def _to_tensor(value, name: str, rank: int, kind: str) -> tf.Tensor:
    """Converts ``value`` to a tensor and checks its static rank and dtype kind.

    Args:
        value: Tensor-like (``tf.Variable`` is read).
        name: Argument name used in error messages.
        rank: Required rank.
        kind: ``"float"`` or ``"int"``.

    Returns:
        The converted tensor (dtype unchanged).

    Raises:
        ValueError: on a static rank mismatch or a wrong dtype kind.
    """
    if isinstance(value, (tf.RaggedTensor, tf.SparseTensor)):
        raise ValueError(f"`{name}` must be a dense tensor, got {type(value).__name__}.")
    try:
        tensor = tf.convert_to_tensor(value)
    except (TypeError, ValueError) as err:
        raise ValueError(f"`{name}` could not be converted to a tensor: {err}") from err
    if kind == "float" and not tensor.dtype.is_floating:
        raise ValueError(f"`{name}` must be a floating tensor, got dtype {tensor.dtype.name}.")
    if kind == "int" and not tensor.dtype.is_integer:
        raise ValueError(f"`{name}` must be an integer tensor, got dtype {tensor.dtype.name}.")
    if tensor.shape.rank is not None and tensor.shape.rank != rank:
        raise ValueError(
            f"`{name}` must have rank {rank}, got shape {tensor.shape}."
        )
    if tensor.shape.rank is None:
        tensor = tf.ensure_shape(tensor, [None] * rank)
    return tensor


def _check_static_dim(tensor: tf.Tensor, axis: int, expected, name: str, what: str) -> None:
    """Raises ValueError if a statically known dim differs from ``expected``."""
    actual = tensor.shape[axis]
    if actual is not None and expected is not None and actual != expected:
        raise ValueError(f"`{name}` must have {what} = {expected}, got shape {tensor.shape}.")


def _check_ids_in_range(ids: tf.Tensor, num_items: tf.Tensor, name: str) -> list:
    """Checks ``0 <= ids < num_items``.

    Args:
        ids: int64 tensor of any shape.
        num_items: int64 scalar ``C``.
        name: Argument name used in error messages.

    Returns:
        A list of assertion ops in graph mode, ``[]`` when eager.

    Raises:
        ValueError: eagerly, if an id is out of range.
    """
    message = f"`{name}` must contain item ids in [0, C)"
    if tf.executing_eagerly():
        if tf.size(ids) > 0:
            low, high = int(tf.reduce_min(ids)), int(tf.reduce_max(ids))
            c = int(num_items)
            if low < 0 or high >= c:
                raise ValueError(f"{message} with C = {c}; got min {low}, max {high}.")
        return []
    # The project's one id check; its reference path uses core ops only, so
    # this stays valid inside serving graphs.
    return [validate_ids(ids, num_items, arg_name=name, use_fused=False)]


def _check_splits(splits: tf.Tensor, nnz: tf.Tensor) -> list:
    """Checks that int64 ``splits`` are valid CSR row splits for ``nnz`` values.

    Returns:
        A list of assertion ops in graph mode, ``[]`` when eager.

    Raises:
        ValueError: eagerly, if the splits are malformed.
    """
    message = (
        "`exclude_splits` must be non-decreasing, start at 0 and end at "
        "len(exclude_items)"
    )
    if tf.executing_eagerly():
        values = splits.numpy()
        if (
            values.size == 0
            or values[0] != 0
            or values[-1] != int(nnz)
            or np.any(np.diff(values) < 0)
        ):
            raise ValueError(f"{message}; got {values[:10]}{'...' if values.size > 10 else ''} "
                             f"with len(exclude_items) = {int(nnz)}.")
        return []
    return [
        tf.debugging.assert_equal(splits[0], tf.constant(0, tf.int64), message=message),
        tf.debugging.assert_equal(splits[-1], nnz, message=message),
        tf.debugging.assert_non_negative(splits[1:] - splits[:-1], message=message),
    ]


def _item_bias(item_bias) -> tf.Tensor:
    """Converts ``item_bias``: float ``[C]`` or per-user ``[U, C]``."""
    item_bias = tf.convert_to_tensor(item_bias)
    if item_bias.shape.rank not in (1, 2) or not item_bias.dtype.is_floating:
        raise ValueError(
            f"`item_bias` must be a float [C] or per-user [U, C] tensor; got dtype "
            f"{item_bias.dtype.name} and shape {item_bias.shape}.")
    return item_bias


def _num_items(item_embeddings: tf.Tensor) -> tf.Tensor:
    """Returns ``C`` as an int64 scalar (static when known)."""
    static = item_embeddings.shape[0]
    if static is not None:
        return tf.constant(static, tf.int64)
    return tf.shape(item_embeddings, out_type=tf.int64)[0]


def _validate_common(
    queries, item_embeddings, exclude_splits, exclude_items, item_bias
) -> _Inputs:
    """Validates the arguments shared by ``top_k_excluding`` and ``rank_of_targets``.

    Returns:
        An :class:`_Inputs` tuple.

    Raises:
        ValueError: for invalid arguments (see module docstring).
    """
    queries = tf.cast(_to_tensor(queries, "queries", 2, "float"), tf.float32)
    item_embeddings = _to_tensor(item_embeddings, "item_embeddings", 2, "float")
    dim_q, dim_i = queries.shape[1], item_embeddings.shape[1]
    if dim_q is not None and dim_i is not None and dim_q != dim_i:
        raise ValueError(
            f"`item_embeddings` must have the same last dimension D as `queries`; got "
            f"item_embeddings shape {item_embeddings.shape} and queries shape {queries.shape}."
        )
    num_items = _num_items(item_embeddings)
    num_users = queries.shape[0]
    checks = []

    if item_bias is not None:
        item_bias = _item_bias(item_bias)
        _check_static_dim(item_bias, item_bias.shape.rank - 1, item_embeddings.shape[0],
                          "item_bias", "length C")
        if item_bias.shape.rank == 2 and num_users is not None:
            _check_static_dim(item_bias, 0, num_users, "item_bias", "U rows")
        # One rank for the traced cores (their tf.functions relax shapes
        # across calls): a shared bias is one row, broadcast over users.
        if item_bias.shape.rank == 1:
            item_bias = item_bias[tf.newaxis, :]

    if (exclude_splits is None) != (exclude_items is None):
        raise ValueError(
            "`exclude_splits` and `exclude_items` must be given together (or both None); got "
            f"exclude_splits={'None' if exclude_splits is None else 'tensor'}, "
            f"exclude_items={'None' if exclude_items is None else 'tensor'}."
        )
    if exclude_splits is not None:
        exclude_splits = tf.cast(_to_tensor(exclude_splits, "exclude_splits", 1, "int"), tf.int64)
        exclude_items = tf.cast(_to_tensor(exclude_items, "exclude_items", 1, "int"), tf.int64)
        if num_users is not None:
            _check_static_dim(exclude_splits, 0, num_users + 1, "exclude_splits", "length U + 1")
        else:
            checks.append(tf.debugging.assert_equal(
                tf.shape(exclude_splits, out_type=tf.int64)[0],
                tf.shape(queries, out_type=tf.int64)[0] + 1,
                message="`exclude_splits` must have length U + 1"))
        nnz = tf.size(exclude_items, out_type=tf.int64)
        checks += _check_splits(exclude_splits, nnz)
        checks += _check_ids_in_range(exclude_items, num_items, "exclude_items")

    return _Inputs(queries, item_embeddings, exclude_splits, exclude_items, item_bias, checks)


def _with_checks(checks: list, tensor: tf.Tensor) -> tf.Tensor:
    """Makes ``tensor`` depend on the run-time ``checks`` (no-op when empty)."""
    if not checks:
        return tensor
    with tf.control_dependencies(checks):
        return tf.identity(tensor)


# ---------------------------------------------------------------------------
# Block computations (no validation; shared by the public functions).
# ---------------------------------------------------------------------------


class _Exclusions(NamedTuple):
    """Exclusion pairs sorted by item id, so each block is a contiguous slice.

    Attributes:
        items: int64 ``[nnz]`` excluded item ids, ascending.
        rows: int64 ``[nnz]`` user (row) index of each pair.
    """

    items: tf.Tensor
    rows: tf.Tensor


def _sort_exclusions(exclude_splits: tf.Tensor, exclude_items: tf.Tensor) -> _Exclusions:
    """Converts CSR exclusions to (row, item) pairs sorted by item.

    Args:
        exclude_splits: int64 ``[U + 1]``.
        exclude_items: int64 ``[nnz]``.

    Returns:
        An :class:`_Exclusions` tuple.
    """
    lengths = exclude_splits[1:] - exclude_splits[:-1]
    rows = tf.repeat(tf.range(tf.size(lengths, out_type=tf.int64), dtype=tf.int64), lengths)
    order = tf.argsort(exclude_items)
    return _Exclusions(tf.gather(exclude_items, order), tf.gather(rows, order))


def _block_exclusion_indices(
    exclusions: _Exclusions, start: tf.Tensor, end: tf.Tensor
) -> tf.Tensor:
    """Returns the exclusion pairs inside items ``[start, end)`` as block indices.

    Args:
        exclusions: Sorted exclusion pairs.
        start: int64 scalar, first item of the block.
        end: int64 scalar, one past the last item of the block.

    Returns:
        int64 ``[n, 2]`` ``(row, item - start)`` indices into the score block.
    """
    bounds = tf.searchsorted(
        exclusions.items, tf.stack([start, end]), side="left", out_type=tf.int64
    )
    items = exclusions.items[bounds[0]:bounds[1]] - start
    rows = exclusions.rows[bounds[0]:bounds[1]]
    return tf.stack([rows, items], axis=1)


def _block_scores(
    queries: tf.Tensor,
    item_embeddings: tf.Tensor,
    item_bias: Optional[tf.Tensor],
    start: tf.Tensor,
    end: tf.Tensor,
) -> tf.Tensor:
    """Scores all users against items ``[start, end)``.

    Args:
        queries: float32 ``[U, D]``.
        item_embeddings: floating ``[C, D]``.
        item_bias: floating ``[1, C]`` (shared), per-user ``[U, C]``, or None.
        start: int64 scalar.
        end: int64 scalar.

    Returns:
        float32 ``[U, end - start]``.
    """
    block = tf.cast(item_embeddings[start:end], tf.float32)
    scores = tf.matmul(queries, block, transpose_b=True)
    if item_bias is not None:  # [1, C] or [U, C]
        scores += tf.cast(item_bias[:, start:end], tf.float32)
    return scores


def _fill_at(scores: tf.Tensor, indices: tf.Tensor, value: float) -> tf.Tensor:
    """Sets ``scores[indices]`` to ``value``; float32 ``[U, B]`` -> ``[U, B]``."""
    updates = tf.fill(tf.shape(indices)[:1], tf.constant(value, scores.dtype))
    return tf.tensor_scatter_nd_update(scores, indices, updates)


def _merge_top_k(
    best_scores: tf.Tensor,
    best_ids: tf.Tensor,
    block_scores: tf.Tensor,
    block_ids: tf.Tensor,
    k: int,
) -> Tuple[tf.Tensor, tf.Tensor]:
    """Merges a block's top-k into the running top-k.

    ``tf.math.top_k`` puts the lower index first among equal values, and every
    running id is lower than every block id, so concatenating running first
    keeps the "ties broken by lower item id" order.

    Args:
        best_scores: float32 ``[U, k]``, sorted descending.
        best_ids: int64 ``[U, k]``.
        block_scores: float32 ``[U, kb]``, sorted descending.
        block_ids: int64 ``[U, kb]``, all greater than any id in ``best_ids``.
        k: Number of results to keep.

    Returns:
        ``(scores float32 [U, k], ids int64 [U, k])``.
    """
    scores = tf.concat([best_scores, block_scores], axis=1)
    ids = tf.concat([best_ids, block_ids], axis=1)
    top_scores, positions = tf.math.top_k(scores, k=k, sorted=True)
    return top_scores, tf.gather(ids, positions, batch_dims=1)


def _top_k_core(
    queries: tf.Tensor,
    item_embeddings: tf.Tensor,
    k: int,
    exclude_splits: Optional[tf.Tensor],
    exclude_items: Optional[tf.Tensor],
    item_bias: Optional[tf.Tensor],
    block_size: int,
) -> Tuple[tf.Tensor, tf.Tensor]:
    """Blockwise top-k; assumes validated inputs and ``k <= C``.

    The effective block is ``max(block_size, k)`` so the first block alone
    yields ``k`` candidates and the running top-k never holds placeholders.

    Returns:
        ``(ids int64 [U, k], scores float32 [U, k])``.
    """
    num_items = _num_items(item_embeddings)
    block = tf.constant(max(block_size, k), tf.int64)
    exclusions = None
    if exclude_splits is not None:
        exclusions = _sort_exclusions(exclude_splits, exclude_items)

    def scored_block(start):
        end = tf.minimum(start + block, num_items)
        scores = _block_scores(queries, item_embeddings, item_bias, start, end)
        if exclusions is not None:
            scores = _fill_at(scores, _block_exclusion_indices(exclusions, start, end), _NEG_INF)
        return scores

    start = tf.constant(0, tf.int64)
    best_scores, best_positions = tf.math.top_k(scored_block(start), k=k, sorted=True)
    best_ids = tf.cast(best_positions, tf.int64)

    def body(start, best_scores, best_ids):
        scores = scored_block(start)
        block_k = tf.minimum(tf.constant(k, tf.int32), tf.shape(scores)[1])
        block_scores, block_positions = tf.math.top_k(scores, k=block_k, sorted=True)
        block_ids = tf.cast(block_positions, tf.int64) + start
        best_scores, best_ids = _merge_top_k(best_scores, best_ids, block_scores, block_ids, k)
        return start + block, best_scores, best_ids

    _, best_scores, best_ids = tf.while_loop(
        lambda start, *_: start < num_items,
        body,
        (start + block, best_scores, best_ids),
        parallel_iterations=1,
    )
    return best_ids, best_scores


def _rank_core(
    queries: tf.Tensor,
    item_embeddings: tf.Tensor,
    targets: tf.Tensor,
    exclude_splits: Optional[tf.Tensor],
    exclude_items: Optional[tf.Tensor],
    item_bias: Optional[tf.Tensor],
    block_size: int,
) -> tf.Tensor:
    """Blockwise pessimistic rank; assumes validated inputs.

    In each block, excluded pairs and the target's own column are set to NaN
    (``NaN >= x`` is False), then ``score >= target_score`` is counted.

    Returns:
        int64 ``[U]``.
    """
    num_items = _num_items(item_embeddings)
    block = tf.constant(block_size, tf.int64)
    exclusions = None
    if exclude_splits is not None:
        exclusions = _sort_exclusions(exclude_splits, exclude_items)

    target_rows = tf.cast(tf.gather(item_embeddings, targets), tf.float32)
    target_scores = tf.reduce_sum(queries * target_rows, axis=1)
    if item_bias is not None:  # [1, C] or [U, C]
        bias_rows = tf.minimum(tf.range(tf.size(targets, out_type=tf.int64)),
                               tf.shape(item_bias, out_type=tf.int64)[0] - 1)
        target_scores += tf.cast(tf.gather_nd(item_bias, tf.stack([bias_rows, targets], 1)),
                                 tf.float32)
    target_scores = target_scores[:, tf.newaxis]
    user_rows = tf.range(tf.size(targets, out_type=tf.int64), dtype=tf.int64)

    def body(start, counts):
        end = tf.minimum(start + block, num_items)
        scores = _block_scores(queries, item_embeddings, item_bias, start, end)
        in_block = (targets >= start) & (targets < end)
        indices = tf.stack(
            [tf.boolean_mask(user_rows, in_block), tf.boolean_mask(targets, in_block) - start],
            axis=1,
        )
        if exclusions is not None:
            indices = tf.concat([indices, _block_exclusion_indices(exclusions, start, end)], 0)
        scores = _fill_at(scores, indices, _NAN)
        block_counts = tf.reduce_sum(tf.cast(scores >= target_scores, tf.int32), axis=1)
        return start + block, counts + tf.cast(block_counts, tf.int64)

    _, counts = tf.while_loop(
        lambda start, _: start < num_items,
        body,
        (tf.constant(0, tf.int64), tf.zeros_like(targets)),
        parallel_iterations=1,
    )
    return counts


# ---------------------------------------------------------------------------
# Public API.
# ---------------------------------------------------------------------------


def top_k_excluding(
    queries,
    item_embeddings,
    k: int,
    exclude_splits=None,
    exclude_items=None,
    item_bias=None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> Tuple[tf.Tensor, tf.Tensor]:
    """Top-k items over the whole catalog, excluding per-user items.

    ``score[u, j] = queries[u] . item_embeddings[j] (+ item_bias[j])``, with
    ``score[u, j] = -inf`` for every excluded pair. The catalog is scanned in
    blocks of ``max(block_size, k)`` items; each block's top-k is merged into a
    running top-k, so no ``[U, C]`` matrix is ever built.

    If a user has fewer than ``k`` non-excluded items, the remaining slots are
    filled with excluded items (score ``-inf``, lowest ids first).

    Args:
        queries: float ``[U, D]`` query embeddings (computed in float32).
        item_embeddings: float ``[C, D]`` item embeddings (tensor or variable;
            cast to float32 one block at a time).
        k: Python int, ``1 <= k <= C``.
        exclude_splits: Optional int32/int64 ``[U + 1]`` CSR row splits of the
            exclusion lists. Must be given together with ``exclude_items``.
        exclude_items: Optional int32/int64 ``[nnz]`` excluded item ids in
            ``[0, C)``. Duplicates are allowed.
        item_bias: Optional float ``[C]`` added to every user's scores, or
            ``[U, C]``, one row per user (e.g. a sampler's log-probabilities
            for integrated prediction).
        block_size: Python int >= 1, number of items scored per block.

    Returns:
        A tuple ``(ids, scores)``: ids int64 ``[U, k]`` and scores float32
        ``[U, k]``, sorted by descending score with ties broken by lower item
        id.

    Raises:
        ValueError: on bad ranks, mismatched ``D``, ``k < 1``, ``k > C``,
            ``block_size < 1``, malformed splits or ids outside ``[0, C)``
            (value checks become ``InvalidArgumentError`` assertions inside a
            ``tf.function``).
    """
    k = _check_python_int(k, "k")
    block_size = _check_python_int(block_size, "block_size")
    inputs = _validate_common(queries, item_embeddings, exclude_splits, exclude_items, item_bias)
    checks = list(inputs.checks)
    num_items_static = inputs.item_embeddings.shape[0]
    if num_items_static is not None:
        if k > num_items_static:
            raise ValueError(f"`k` must be <= C = {num_items_static}, got k = {k}.")
    else:
        checks.append(tf.debugging.assert_less_equal(
            tf.constant(k, tf.int64), _num_items(inputs.item_embeddings),
            message="`k` must be <= C (number of rows of `item_embeddings`)"))
    return _top_k_core(
        _with_checks(checks, inputs.queries),
        inputs.item_embeddings,
        k,
        inputs.exclude_splits,
        inputs.exclude_items,
        inputs.item_bias,
        block_size,
    )


def _validate_rank_inputs(
    queries, item_embeddings, targets, exclude_splits, exclude_items, item_bias
) -> Tuple[_Inputs, tf.Tensor]:
    """Validates ``rank_of_targets`` arguments.

    Returns:
        ``(inputs, targets int64 [U])`` with run-time checks in ``inputs.checks``.
    """
    inputs = _validate_common(queries, item_embeddings, exclude_splits, exclude_items, item_bias)
    targets = tf.cast(_to_tensor(targets, "targets", 1, "int"), tf.int64)
    checks = list(inputs.checks)
    if inputs.queries.shape[0] is not None:
        _check_static_dim(targets, 0, inputs.queries.shape[0], "targets", "length U")
    else:
        checks.append(tf.debugging.assert_equal(
            tf.size(targets), tf.shape(inputs.queries)[0],
            message="`targets` must have length U (rows of `queries`)"))
    checks += _check_ids_in_range(targets, _num_items(inputs.item_embeddings), "targets")
    return inputs._replace(checks=checks), targets


def rank_of_targets(
    queries,
    item_embeddings,
    targets,
    exclude_splits=None,
    exclude_items=None,
    item_bias=None,
    block_size: int = DEFAULT_BLOCK_SIZE,
) -> tf.Tensor:
    """0-based pessimistic rank of each user's target among non-excluded items.

    Tie rule (pessimistic)::

        rank[u] = #{ j : j != targets[u], j not excluded for u,
                         score[u, j] >= score[u, targets[u]] }

    so every item tied with the target is counted as ranked ahead of it, and a
    degenerate model that scores all items equally gets the WORST rank
    (``C - 1 - #excluded non-target items``), never the best.

    The target itself is always ranked, even if it appears in the user's
    exclusion list (exclusion never removes the target). Its score is a dot
    product of gathered rows; in each block the target's own column is masked
    out, so small floating-point differences between that dot product and the
    blockwise matmul score of the same item cannot change the count. NaN
    scores of other items are never counted.

    Args:
        queries: float ``[U, D]`` query embeddings (computed in float32).
        item_embeddings: float ``[C, D]`` item embeddings.
        targets: int32/int64 ``[U]`` target item ids in ``[0, C)``.
        exclude_splits: Optional int32/int64 ``[U + 1]`` CSR row splits.
        exclude_items: Optional int32/int64 ``[nnz]`` excluded ids in ``[0, C)``.
        item_bias: Optional float ``[C]`` or per-user ``[U, C]``.
        block_size: Python int >= 1, number of items scored per block.

    Returns:
        int64 ``[U]`` ranks in ``[0, C - 1]``.

    Raises:
        ValueError: on bad ranks, mismatched ``D`` or ``U``, ``block_size < 1``,
            malformed splits or ids outside ``[0, C)`` (value checks become
            ``InvalidArgumentError`` assertions inside a ``tf.function``).
    """
    block_size = _check_python_int(block_size, "block_size")
    inputs, targets = _validate_rank_inputs(
        queries, item_embeddings, targets, exclude_splits, exclude_items, item_bias
    )
    return _rank_core(
        _with_checks(inputs.checks, inputs.queries),
        inputs.item_embeddings,
        targets,
        inputs.exclude_splits,
        inputs.exclude_items,
        inputs.item_bias,
        block_size,
    )


def _check_ks(ks) -> Tuple[int, ...]:
    """Returns ``ks`` as a tuple of ints >= 1 (a single int is accepted)."""
    if isinstance(ks, numbers.Integral) and not isinstance(ks, bool):
        ks = (ks,)
    try:
        ks = tuple(ks)
    except TypeError as err:
        raise ValueError(f"`ks` must be an int or a sequence of ints, got {ks!r}.") from err
    if not ks:
        raise ValueError("`ks` must not be empty.")
    return tuple(_check_python_int(k, "ks") for k in ks)


def ranking_metrics(
    ranks, ks: Union[int, Sequence[int]] = (10,), num_items: Optional[int] = None
) -> Dict[str, float]:
    """HR@K, NDCG@K and MRR@K from 0-based ranks (one relevant item per user).

    For each ``K`` in ``ks``::

        HR@K   = mean(rank < K)
        NDCG@K = mean(1 / log2(rank + 2)  if rank < K else 0)
        MRR@K  = mean(1 / (rank + 1)      if rank < K else 0)

    Args:
        ranks: int ``[N]`` ranks (tensor, array or sequence), all >= 0.
        ks: A cutoff or a sequence of cutoffs, each an int >= 1.
        num_items: Optional catalog size ``C``; when given, ranks must be
            ``< C``.

    Returns:
        ``{"HR@K": float, "NDCG@K": float, "MRR@K": float}`` for every K, in
        the order of ``ks``.

    Raises:
        ValueError: if ``ranks`` is empty, not 1-D, not integer or out of
            range, or if ``ks``/``num_items`` are invalid.
    """
    ks = _check_ks(ks)
    if isinstance(ranks, (tf.Tensor, tf.Variable)):
        ranks = ranks.numpy()
    ranks = np.asarray(ranks)
    if ranks.ndim != 1:
        raise ValueError(f"`ranks` must be 1-D, got shape {ranks.shape}.")
    if ranks.size == 0:
        raise ValueError("`ranks` must not be empty.")
    if not np.issubdtype(ranks.dtype, np.integer):
        raise ValueError(f"`ranks` must be integers, got dtype {ranks.dtype}.")
    if ranks.min() < 0:
        raise ValueError(f"`ranks` must be >= 0, got min {ranks.min()}.")
    if num_items is not None:
        num_items = _check_python_int(num_items, "num_items")
        if ranks.max() >= num_items:
            raise ValueError(
                f"`ranks` must be < num_items = {num_items}, got max {ranks.max()}."
            )
    ranks = ranks.astype(np.float64)
    metrics = {}
    for k in ks:
        hit = ranks < k
        metrics[f"HR@{k}"] = float(np.mean(hit))
        metrics[f"NDCG@{k}"] = float(np.mean(np.where(hit, 1.0 / np.log2(ranks + 2.0), 0.0)))
        metrics[f"MRR@{k}"] = float(np.mean(np.where(hit, 1.0 / (ranks + 1.0), 0.0)))
    return metrics


_rank_batch = tf.function(_rank_core, reduce_retracing=True)


def _ragged_exclusions(batch: Mapping, key: str, arg_name: str) -> Tuple[tf.Tensor, tf.Tensor]:
    """Returns ``(row_splits int64 [B + 1], values int64 [nnz])`` of ``batch[key]``."""
    if key not in batch:
        raise ValueError(
            f"`{arg_name}`: dataset element has no key {key!r}; keys are {sorted(batch)}."
        )
    ragged = batch[key]
    if not isinstance(ragged, tf.RaggedTensor) or ragged.ragged_rank != 1:
        raise ValueError(
            f"`{arg_name}`: dataset[{key!r}] must be a tf.RaggedTensor [B, (L)] with "
            f"ragged_rank 1, got {type(ragged).__name__}."
        )
    if ragged.values.shape.rank != 1 or not ragged.values.dtype.is_integer:
        raise ValueError(
            f"`{arg_name}`: dataset[{key!r}] must hold scalar integer ids, got values "
            f"{ragged.values.dtype.name} {ragged.values.shape}."
        )
    return tf.cast(ragged.row_splits, tf.int64), tf.cast(ragged.values, tf.int64)


def evaluate_full_ranking(
    query_fn: Callable[[tf.RaggedTensor], tf.Tensor],
    item_embeddings,
    dataset: tf.data.Dataset,
    ks: Union[int, Sequence[int]] = (10,),
    item_bias=None,
    block_size: int = DEFAULT_BLOCK_SIZE,
    exclude_key: Optional[str] = None,
) -> Dict[str, float]:
    """Full-catalog HR/NDCG/MRR with each user's history excluded.

    Iterates ``dataset`` eagerly. For every batch, ``query_fn`` is called (as
    given, i.e. eagerly unless it is itself a ``tf.function``) on the history,
    then the pessimistic target ranks are computed by a ``tf.function``
    (``reduce_retracing=True``) around :func:`rank_of_targets`' blockwise loop.

    Each dataset element is a dict with:

    * ``"item_ids"``: int ``tf.RaggedTensor`` ``[B, (L)]``, the history; the
      model input and, unless ``exclude_key`` is given, the exclusion list
      (the FULL history of the element is excluded).
    * ``"targets"``: int ``[B]``, the held-out item of each user. A target
      that also appears in the exclusion list is still ranked.
    * ``exclude_key`` (optional): int ``tf.RaggedTensor`` ``[B, (M)]`` used as
      the exclusion list instead of ``"item_ids"``.

    Args:
        query_fn: Callable mapping the ragged history ``[B, (L)]`` to float
            query embeddings ``[B, D]``.
        item_embeddings: float ``[C, D]`` item embeddings (tensor or variable).
        dataset: ``tf.data.Dataset`` of dicts as described above.
        ks: A cutoff or a sequence of cutoffs, each an int >= 1.
        item_bias: Optional float ``[C]``, or a callable mapping each dataset
            element (the dict) to a per-user float ``[B, C]`` bias, e.g. a
            sampler's ``log p(item | user)`` for integrated prediction.
        block_size: Python int >= 1, number of items scored per block.
        exclude_key: Optional dataset key of the ragged exclusion lists.

    Returns:
        :func:`ranking_metrics` of all ranks plus ``"num_users"`` (an int, the
        number of evaluated users).

    Raises:
        ValueError: on invalid arguments or dataset elements, or if the dataset
            is empty.
        RuntimeError: if called inside a ``tf.function``.
    """
    if not tf.executing_eagerly():
        raise RuntimeError("evaluate_full_ranking must be called eagerly, not in a tf.function.")
    if not callable(query_fn):
        raise ValueError(f"`query_fn` must be callable, got {query_fn!r}.")
    ks = _check_ks(ks)
    block_size = _check_python_int(block_size, "block_size")
    if exclude_key is not None and not isinstance(exclude_key, str):
        raise ValueError(f"`exclude_key` must be a str or None, got {exclude_key!r}.")
    item_embeddings = _to_tensor(item_embeddings, "item_embeddings", 2, "float")
    if item_bias is not None and not callable(item_bias):
        item_bias = _to_tensor(item_bias, "item_bias", 1, "float")
    exclusion_key = "item_ids" if exclude_key is None else exclude_key
    exclusion_arg = "dataset" if exclude_key is None else "exclude_key"

    all_ranks = []
    for batch in dataset:
        if not isinstance(batch, Mapping) or "item_ids" not in batch or "targets" not in batch:
            raise ValueError(
                "`dataset` elements must be dicts with keys 'item_ids' and 'targets'."
            )
        splits, values = _ragged_exclusions(batch, exclusion_key, exclusion_arg)
        _ragged_exclusions(batch, "item_ids", "dataset")
        queries = query_fn(batch["item_ids"])
        inputs, targets = _validate_rank_inputs(
            queries, item_embeddings, batch["targets"], splits, values,
            item_bias(batch) if callable(item_bias) else item_bias,
        )
        ranks = _rank_batch(
            inputs.queries, inputs.item_embeddings, targets,
            inputs.exclude_splits, inputs.exclude_items, inputs.item_bias, block_size,
        )
        all_ranks.append(ranks.numpy())

    if not all_ranks or sum(r.size for r in all_ranks) == 0:
        raise ValueError("`dataset` produced no users to evaluate.")
    ranks = np.concatenate(all_ranks)
    metrics = ranking_metrics(ranks, ks, num_items=int(item_embeddings.shape[0]))
    metrics["num_users"] = int(ranks.size)
    return metrics
