"""Input checks shared by the ragged (padding-free) layers.

Every ragged layer takes `tf.RaggedTensor` [B, (L), D]: ragged_rank 1 (only
the sequence axis is ragged) and a uniform, statically known inner width D.
These helpers turn anything else into a `ValueError` that names the layer,
the argument and the fix, before any op runs.
"""

import numbers

import tensorflow as tf


def is_positive_int(value):
    """True for a Python or NumPy integer >= 1 (not a bool)."""
    return (isinstance(value, numbers.Integral)
            and not isinstance(value, bool) and value >= 1)


def describe(x):
    """Short description of a tensor-like value for error messages."""
    if isinstance(x, tf.RaggedTensor):
        return (f"tf.RaggedTensor of shape {x.shape}, ragged_rank "
                f"{x.ragged_rank}, dtype {x.dtype.name}")
    shape = getattr(x, "shape", None)
    dtype = getattr(getattr(x, "dtype", None), "name", None)
    return f"{type(x).__name__} of shape {shape}, dtype {dtype}"


def check_ragged_sequence(x, where, arg="inputs", dim=None, floating=True,
                          inner_rank=1):
    """Checks that `x` is a ragged batch of sequences [B, (L), ...].

    Args:
        x: the value passed to the layer.
        where: who is checking, e.g. "RaggedTransformerBlock 'block_0'".
        arg: name of the argument, for the message.
        dim: expected inner width D (None: any statically known width).
        floating: require a floating dtype.
        inner_rank: number of uniform dimensions after the ragged one: 1 for
            [B, (L), D] features, 0 for [B, (L)] ids, None for any.

    Raises:
        ValueError: `x` is not a RaggedTensor, has ragged_rank != 1, the wrong
            rank, an unknown or wrong inner width, or a non-float dtype.
    """
    want = "[B, (L), D]" if inner_rank == 1 else "[B, (L), ...]"
    if inner_rank == 0:
        want = "[B, (L)]"
    if not isinstance(x, tf.RaggedTensor):
        raise ValueError(
            f"{where}: `{arg}` must be a tf.RaggedTensor {want} (sequences "
            f"packed along the ragged axis), got {describe(x)}. Convert "
            "right-padded input with tf.RaggedTensor.from_tensor(x, "
            "lengths=lengths), or use the layer's padded entry point where "
            "it has one.")
    if x.ragged_rank != 1:
        raise ValueError(
            f"{where}: `{arg}` must have ragged_rank 1 (only the sequence "
            f"axis ragged, uniform inner dimensions), got {describe(x)}. A "
            "ragged feature axis is not supported; pad or slice the features "
            "to a fixed width D first.")
    if inner_rank is not None and x.shape.rank != 2 + inner_rank:
        raise ValueError(f"{where}: `{arg}` must be {want}, got {describe(x)}")
    if inner_rank == 1:
        width = x.shape[-1]
        if width is None:
            raise ValueError(
                f"{where}: the inner dimension D of `{arg}` must be known "
                f"statically, got {describe(x)}. Give it when building the "
                "RaggedTensor (e.g. tf_keras.Input(shape=[None, D], "
                "ragged=True)).")
        if dim is not None and width != dim:
            raise ValueError(
                f"{where}: `{arg}` has inner dimension {width} but the layer "
                f"was built for D = {dim} ({describe(x)})")
    if floating and not x.dtype.is_floating:
        raise ValueError(f"{where}: `{arg}` must be floating point, got "
                         f"{describe(x)}")


def check_built_shape(input_shape, where, dim):
    """Build-time check of a [B, (L), D] input shape against width `dim`.

    Raises:
        ValueError: rank is not 3 or the inner width is not `dim`.
    """
    shape = tf.TensorShape(input_shape)
    if shape.rank is not None and shape.rank != 3:
        raise ValueError(f"{where}: inputs must be [B, (L), D] with D = {dim}, "
                         f"got shape {shape}")
    if shape.rank == 3 and shape[-1] is not None and shape[-1] != dim:
        raise ValueError(f"{where}: inputs have inner dimension {shape[-1]} "
                         f"but the layer was built for D = {dim}")


def check_same_rows(a, b, where, names):
    """Asserts at run time that two ragged tensors share their row splits.

    Args:
        a, b: RaggedTensors [B, (L), ...].
        where: who is checking (for the message).
        names: (name of a, name of b).

    Returns:
        A list of assertion ops ([] when `a` and `b` share the same row
        partition object, or when the check could be decided statically).

    Raises:
        ValueError: statically different numbers of tokens or rows.
    """
    if a.row_splits is b.row_splits:
        return []
    for what, sa, sb in (("rows", a.row_splits.shape, b.row_splits.shape),
                         ("tokens", a.flat_values.shape[:1],
                          b.flat_values.shape[:1])):
        if not sa.is_compatible_with(sb):
            raise ValueError(
                f"{where}: `{names[0]}` and `{names[1]}` must have the same "
                f"row lengths; their {what} differ ({sa} vs {sb})")
    sa = tf.cast(a.row_splits, tf.int64)
    sb = tf.cast(b.row_splits, tf.int64)
    n = tf.minimum(tf.size(sa), tf.size(sb))
    same = tf.logical_and(tf.equal(tf.size(sa), tf.size(sb)),
                          tf.reduce_all(tf.equal(sa[:n], sb[:n])))
    return [tf.debugging.Assert(
        same, [f"{where}: `{names[0]}` and `{names[1]}` must have the same "
               "row splits; got", sa, "and", sb], summarize=16)]
