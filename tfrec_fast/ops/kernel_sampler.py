"""Quadratic-kernel sampler ops: tree layout, build, update, draw, references.

The proposal of `tfrec_fast.samplers.KernelSampler` (Blanc & Rendle, ICML
2018) over an item table w [C, D], for a query h [D]:

    q_i(h) = K(h, w_i) / sum_j K(h, w_j),     K(h, w) = alpha (h . w)^2 + 1.

Sum K over any set of items is alpha <Z, h h^T> + n with Z = sum w w^T and n
the set's size, so a binary tree whose nodes keep Z and n is sampled exactly
by descending from the root, O(D^2 log C) per draw. The layout (shared with
custom_ops/kernels/kernel_sampler.h, which says it in full):

- items in id order, leaves of `leaf_size` consecutive items, num_leaves =
  ceil(C / leaf_size);
- heap order: node i has children 2i, 2i + 1; leaves are nodes
  num_leaves..2 num_leaves - 1; row 0 is unused (zero);
- tree float32 [2 num_leaves, S]: each node's Z as its upper triangle,
  row-major, zero-padded to S = a multiple of 16 floats;
- counts int64 [2 num_leaves]: items under each node;
- snapshot float32 [C, D]: the item rows the tree describes.

Three compiled CPU ops do the work (`TfrecFastKernelSamplerDraw`,
`...Refresh`, `...Update`); each has a pure-TF reference here, used when the
op library is not loaded (one warning) or with `use_fused=False`. The
references are exact too but not fast: the draw reference is a categorical
over brute-force probabilities (O(T C D)), the same distribution, not the
same draws.
"""

import collections

import numpy as np
import tensorflow as tf

from tfrec_fast.ops import _library
from tfrec_fast.ops.validate_ids import validate_ids

PACK_ALIGN = 16

TreeLayout = collections.namedtuple(
    "TreeLayout", ["num_items", "dim", "leaf_size", "num_leaves", "num_rows",
                   "stride"])


def packed_size(dim):
    """D (D + 1) / 2: entries of a D x D upper triangle."""
    return dim * (dim + 1) // 2


def packed_stride(dim):
    """Floats per packed tree row: packed_size(dim) rounded up to 16."""
    return -(-packed_size(dim) // PACK_ALIGN) * PACK_ALIGN


def tree_layout(num_items, dim, leaf_size):
    """The TreeLayout of C = num_items rows of width D in leaves of L."""
    num_leaves = -(-int(num_items) // int(leaf_size))
    return TreeLayout(int(num_items), int(dim), int(leaf_size), num_leaves,
                      2 * num_leaves, packed_stride(int(dim)))


def tree_counts(layout):
    """int64 [num_rows]: items under each node (row 0: 0)."""
    counts = np.zeros(layout.num_rows, np.int64)
    for node in range(layout.num_rows - 1, 0, -1):
        if node >= layout.num_leaves:
            first = (node - layout.num_leaves) * layout.leaf_size
            counts[node] = min(layout.leaf_size, layout.num_items - first)
        else:
            counts[node] = counts[2 * node] + counts[2 * node + 1]
    return counts


def _triangle(dim):
    """Flat positions i * D + j of the upper triangle, row-major (i <= j)."""
    rows, cols = np.triu_indices(dim)
    return rows * dim + cols


def pack_outer(x, stride=None, dtype=tf.float64):
    """Packed upper triangles of x_n x_n^T.

    Args:
        x: float [N, D].
        stride: row width S of the result (>= D (D + 1) / 2; zero-padded);
            None for packed_stride(D).
        dtype: computation and result dtype.

    Returns:
        [N, S] of `dtype`.
    """
    x = tf.cast(x, dtype)
    dim = x.shape[-1]
    stride = packed_stride(dim) if stride is None else stride
    outer = tf.reshape(x[:, :, tf.newaxis] * x[:, tf.newaxis, :],
                       [-1, dim * dim])
    packed = tf.gather(outer, _triangle(dim), axis=1)
    return tf.pad(packed, [[0, 0], [0, stride - packed_size(dim)]])


def unpack_symmetric(packed, dim, dtype=tf.float64):
    """The symmetric [D, D] matrix of a packed upper triangle [>= P]."""
    flat = tf.scatter_nd(_triangle(dim)[:, np.newaxis],
                         tf.cast(packed[:packed_size(dim)], dtype),
                         [dim * dim])
    upper = tf.reshape(flat, [dim, dim])
    return upper + tf.transpose(upper) - tf.linalg.diag(
        tf.linalg.diag_part(upper))


# ---------------------------------------------------------------------------
# Brute force: the oracle.

def kernel_logits(query, table, alpha):
    """float64 [T, C]: log K(h_t, w_i) = log(alpha (h_t . w_i)^2 + 1)."""
    scores = tf.matmul(tf.cast(query, tf.float64), tf.cast(table, tf.float64),
                       transpose_b=True)
    return tf.math.log1p(alpha * tf.square(scores))


def check_query_and_table(query, table, table_name="table"):
    """Static checks: query [T, D] and table [C, D] of the same D.

    Raises:
        ValueError: a rank or D that does not fit (instead of a MatMul
            shape error that names neither argument).
    """
    query = tf.convert_to_tensor(query)
    # A variable's (or array's) shape without reading or converting it.
    table_shape = tf.TensorShape(table.shape if hasattr(table, "shape")
                                 else tf.convert_to_tensor(table).shape)
    for name, shape, layout in (("query", query.shape, "[T, D]"),
                                (table_name, table_shape, "[C, D]")):
        if shape.rank is not None and shape.rank != 2:
            raise ValueError(f"{name} must be {layout}, got shape {shape}")
    if not query.shape[-1:].is_compatible_with(table_shape[-1:]):
        raise ValueError(f"query {query.shape} and {table_name} "
                         f"{table_shape} must have the same D")
    return query, table


def kernel_log_probabilities(query, table, alpha):
    """float64 [T, C]: exact log q_i(h_t) by brute force over the catalog.

    Args:
        query: float [T, D].
        table: float [C, D] item rows.
        alpha: the kernel's alpha (> 0).

    Raises:
        ValueError: ranks or D that do not fit.
    """
    query, table = check_query_and_table(query, table)
    return tf.nn.log_softmax(kernel_logits(query, table, alpha), axis=-1)


def tree_log_normaliser(query, root, num_items, alpha):
    """float64 [T]: log sum_i K(h_t, w_i) = log(alpha h^T Z_root h + C).

    Args:
        query: float [T, D].
        root: float [S] packed Z of the root (tree row 1).
        num_items: C.
        alpha: the kernel's alpha.
    """
    query = tf.cast(query, tf.float64)
    z = unpack_symmetric(root, query.shape[-1])
    quadratic = tf.reduce_sum(tf.matmul(query, z) * query, axis=-1)
    return tf.math.log(alpha * tf.maximum(quadratic, 0.0) + num_items)


# ---------------------------------------------------------------------------
# Tree build and update (pure TF).

def build_tree_reference(table, leaf_size):
    """The tree [2 num_leaves, S] of `table` [C, D] (static shape), in TF.

    Leaves sum their items' outer products in float64 (rounded once to
    float32), internal nodes are the float32 sum of their children, as the
    op builds it.
    """
    table = tf.convert_to_tensor(table)
    num_items, dim = table.shape
    layout = tree_layout(num_items, dim, leaf_size)
    padded = tf.pad(tf.cast(table, tf.float64),
                    [[0, layout.num_leaves * leaf_size - num_items], [0, 0]])
    padded = tf.reshape(padded, [layout.num_leaves, leaf_size, dim])
    sums = tf.reshape(tf.einsum("lad,lae->lde", padded, padded),
                      [layout.num_leaves, dim * dim])
    leaves = tf.cast(tf.pad(tf.gather(sums, _triangle(dim), axis=1),
                            [[0, 0], [0, layout.stride - packed_size(dim)]]),
                     tf.float32)  # nodes num_leaves .. 2 num_leaves - 1
    # Level by level from the deepest: depth d holds nodes [2^d, 2^(d+1)),
    # internal ones (< num_leaves) first, whose children open depth d + 1.
    levels = {}
    max_depth = (layout.num_rows - 1).bit_length() - 1
    for depth in range(max_depth, -1, -1):
        lo, hi = 2 ** depth, min(2 ** (depth + 1), layout.num_rows)
        parts = []
        internal = max(0, min(hi, layout.num_leaves) - lo)
        if internal:
            children = levels[depth + 1][:2 * internal]
            parts.append(children[0::2] + children[1::2])
        if hi > layout.num_leaves:
            start = max(lo, layout.num_leaves) - layout.num_leaves
            parts.append(leaves[start:hi - layout.num_leaves])
        levels[depth] = tf.concat(parts, 0) if len(parts) > 1 else parts[0]
    return tf.concat([tf.zeros([1, layout.stride], tf.float32)]
                     + [levels[d] for d in range(max_depth + 1)], 0)


def _check_finite_table(table, ids=None):
    """`table`, after a check that it (or its rows `ids`) is finite."""
    message = ("item_table has NaN/Inf entries: the kernel sampler cannot "
               "build its tree from non-finite item embeddings")
    if ids is None:
        return tf.debugging.check_numerics(table, message)
    check = tf.debugging.check_numerics(tf.gather(table, ids), message)
    with tf.control_dependencies([check]):
        return tf.identity(table)


def _update_rows_reference(tree, snapshot, table, ids, layout):
    """Pure-TF UpdateRows: ids int64 [R] sorted unique, variables updated."""
    new = tf.gather(table, ids)
    delta = pack_outer(new, layout.stride) - pack_outer(
        tf.gather(snapshot, ids), layout.stride)  # float64 [R, S]
    leaf = layout.num_leaves + ids // layout.leaf_size
    leaves, index = tf.unique(leaf)
    leaf_delta = tf.math.unsorted_segment_sum(delta, index,
                                              tf.size(leaves))
    rows = tf.cast(tf.cast(tf.gather(tree, leaves), tf.float64) + leaf_delta,
                   tf.float32)
    tree.scatter_update(tf.IndexedSlices(rows, leaves))
    snapshot.scatter_update(tf.IndexedSlices(new, ids))
    # Ancestors, deepest level first (leaves sit at depths D-1 and D).
    max_depth = (layout.num_rows - 1).bit_length() - 1
    deep = leaves >= 2 ** max_depth
    leaf_depth = tf.where(deep, tf.constant(max_depth, tf.int64),
                          tf.constant(max_depth - 1, tf.int64))
    for depth in range(max_depth - 1, -1, -1):
        above = leaf_depth > depth
        nodes, _ = tf.unique(tf.bitwise.right_shift(
            tf.boolean_mask(leaves, above),
            tf.boolean_mask(leaf_depth, above) - depth))
        sums = tf.gather(tree, 2 * nodes) + tf.gather(tree, 2 * nodes + 1)
        tree.scatter_update(tf.IndexedSlices(sums, nodes))
    return tf.size(ids, out_type=tf.int64)


def _table_float32(table, layout, arg_name="item_table"):
    table = tf.convert_to_tensor(table)
    if not table.dtype.is_floating:
        raise ValueError(f"{arg_name} must be a float [C, D] tensor, got "
                         f"{table.dtype.name}")
    if table.shape.rank != 2 or (
            table.shape[0] is not None and table.shape[0] != layout.num_items
    ) or (table.shape[1] is not None and table.shape[1] != layout.dim):
        raise ValueError(f"{arg_name} must have shape [num_items, dim] = "
                         f"[{layout.num_items}, {layout.dim}], got "
                         f"{table.shape}")
    # Static [C, D] from here on (the reference build needs it).
    return tf.ensure_shape(tf.cast(table, tf.float32),
                           [layout.num_items, layout.dim])


def kernel_sampler_refresh_reference(tree, snapshot, table, max_changed,
                                     layout):
    """Pure-TF refresh; see `kernel_sampler_refresh`."""
    table = _check_finite_table(_table_float32(table, layout))
    changed = tf.where(tf.reduce_any(
        tf.not_equal(tf.convert_to_tensor(snapshot), table), axis=1))[:, 0]
    num_changed = tf.size(changed, out_type=tf.int64)
    rebuild = num_changed > tf.cast(max_changed, tf.int64)

    def do_rebuild():
        tree.assign(build_tree_reference(table, layout.leaf_size))
        snapshot.assign(table)
        return tf.constant(0, tf.int64)

    def do_update():
        return _update_rows_reference(tree, snapshot, table, changed, layout)

    if tf.executing_eagerly():
        if bool(rebuild):
            do_rebuild()
        elif int(num_changed):
            do_update()
    else:
        tf.cond(rebuild, do_rebuild, do_update)
    return num_changed, rebuild


def kernel_sampler_update_reference(tree, snapshot, table, ids, layout):
    """Pure-TF update; see `kernel_sampler_update`."""
    table = _table_float32(table, layout)
    ids, _ = tf.unique(tf.reshape(tf.cast(ids, tf.int64), [-1]))
    ids = tf.sort(ids)
    table = _check_finite_table(table, ids)
    return _update_rows_reference(tree, snapshot, table, ids, layout)


def _fused(op_function, op_name, use_fused):
    if use_fused is False:
        return None
    return _library.fused_module(op_function, op_name, use_fused)


def _check_ids(ids, num_items):
    ids = tf.convert_to_tensor(ids)
    if not ids.dtype.is_integer:
        raise ValueError(f"ids must be integer ids, got {ids.dtype.name}")
    ids = tf.cast(ids, tf.int64)
    if ids.shape.rank is not None and ids.shape.rank != 1:
        raise ValueError(f"ids must be [R], got shape {ids.shape}")
    return validate_ids(ids, num_items, arg_name="ids")


def kernel_sampler_refresh(tree, snapshot, table, max_changed, layout,
                           use_fused=None):
    """Brings `tree` and `snapshot` (variables) up to date with `table`.

    Rows where the snapshot differs from the table are moved along their
    tree paths; when more than `max_changed` differ (any negative value:
    always), the tree is rebuilt from the table instead.

    Args:
        tree: float32 variable [2 num_leaves, S].
        snapshot: float32 variable [C, D].
        table: float [C, D] current item table (must be finite).
        max_changed: int scalar, the most changed rows updated in place.
        layout: the TreeLayout.
        use_fused: True / False / None (see `_library.fused_module`).

    Returns:
        (num_changed int64 scalar, rebuilt bool scalar).

    Raises:
        tf.errors.InvalidArgumentError: table has NaN or Inf entries.
    """
    module = _fused("tfrec_fast_kernel_sampler_refresh",
                    "TfrecFastKernelSamplerRefresh", use_fused)
    if module is None:
        return kernel_sampler_refresh_reference(tree, snapshot, table,
                                                max_changed, layout)
    table = _table_float32(table, layout)
    num_changed, rebuilt = module.tfrec_fast_kernel_sampler_refresh(
        tree.handle, snapshot.handle, table,
        tf.cast(max_changed, tf.int64), leaf_size=layout.leaf_size)
    return num_changed, rebuilt


def kernel_sampler_update(tree, snapshot, table, ids, layout, use_fused=None):
    """Moves the tree to `table` on rows `ids` (repeats ignored).

    Args:
        tree, snapshot, layout, use_fused: as `kernel_sampler_refresh`.
        table: float [C, D]; the listed rows must be finite.
        ids: int [R] in [0, C).

    Returns:
        int64 scalar: distinct rows updated.
    """
    ids = _check_ids(ids, layout.num_items)
    module = _fused("tfrec_fast_kernel_sampler_update",
                    "TfrecFastKernelSamplerUpdate", use_fused)
    if module is None:
        return kernel_sampler_update_reference(tree, snapshot, table, ids,
                                               layout)
    table = _table_float32(table, layout)
    return module.tfrec_fast_kernel_sampler_update(
        tree.handle, snapshot.handle, table, ids, leaf_size=layout.leaf_size)


# ---------------------------------------------------------------------------
# Draws.

def _check_num_draws(num):
    """ValueError for a static K < 1 (the reference would return no draws,
    or fail inside StatelessMultinomial, where the op refuses)."""
    static_num = tf.get_static_value(num)
    if static_num is not None and int(static_num) < 1:
        raise ValueError(f"num (K) must be >= 1, got {int(static_num)}")


def kernel_sampler_draw_reference(query, snapshot, key, num, alpha):
    """K exact draws per row by brute force (categorical over q).

    Args:
        query: float [T, D].
        snapshot: float [C, D] item rows.
        key: int32 [2] stateless key.
        num: K.
        alpha: the kernel's alpha.

    Returns:
        (ids int64 [T, K], log_q float32 [T, K]).

    Raises:
        ValueError: a static K < 1, ranks or D that do not fit (as
            `kernel_sampler_draw`).
        tf.errors.InvalidArgumentError: query has NaN or Inf entries.
    """
    _check_num_draws(num)
    query, _ = check_query_and_table(query, snapshot, "snapshot")
    query = tf.debugging.check_numerics(
        tf.cast(query, tf.float32),
        "query has NaN/Inf entries: the kernel sampler needs finite queries")
    log_q = kernel_log_probabilities(query, snapshot, alpha)  # [T, C]
    ids = tf.random.stateless_categorical(log_q, num, seed=key,
                                          dtype=tf.int64)
    return ids, tf.cast(tf.gather(log_q, ids, batch_dims=1), tf.float32)


def kernel_sampler_draw(query, tree, counts, snapshot, key, num, alpha,
                        layout, use_fused=None):
    """K draws with replacement per query row from the kernel proposal.

    The op descends the tree (O(D^2 log C) per draw); the reference draws
    from the brute-force probabilities of `snapshot`. Both are exact
    samplers of the same q; their draws differ.

    Args:
        query: float [T, D] (finite).
        tree: float32 [2 num_leaves, S] (tensor or variable).
        counts: int64 [2 num_leaves].
        snapshot: float32 [C, D] the rows the tree describes.
        key: int32 [2] random key; draws are a pure function of it.
        num: K >= 1, int or int scalar tensor.
        alpha: the kernel's alpha (> 0).
        layout: the TreeLayout.
        use_fused: True / False / None.

    Returns:
        (ids int64 [T, K], log_q float32 [T, K]).

    Raises:
        ValueError: a static K < 1 (both paths; the op also refuses a
            dynamic one), ranks or D of query and snapshot that do not fit.
        tf.errors.InvalidArgumentError: query has NaN or Inf entries.
    """
    _check_num_draws(num)
    query, _ = check_query_and_table(query, snapshot, "snapshot")
    query = tf.cast(query, tf.float32)
    module = _fused("tfrec_fast_kernel_sampler_draw",
                    "TfrecFastKernelSamplerDraw", use_fused)
    if module is None:
        return kernel_sampler_draw_reference(query, snapshot, key, num, alpha)
    return module.tfrec_fast_kernel_sampler_draw(
        query, tree, counts, snapshot, tf.cast(key, tf.int32),
        tf.cast(num, tf.int32), alpha=float(alpha),
        leaf_size=layout.leaf_size)
