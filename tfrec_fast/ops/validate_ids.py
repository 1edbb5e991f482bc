"""`validate_ids`: ids must lie in [0, num_items) before they index a table."""

import tensorflow as tf

from tfrec_fast.ops import _library


def validate_ids_reference(ids, num_items, arg_name="ids"):
    """Pure-TF reference of `validate_ids` (same checks, same result).

    Args:
        ids: int32/int64 tensor of any shape, or a `tf.RaggedTensor` (its
            `flat_values` are checked).
        num_items: Scalar catalog size C.
        arg_name: Argument name used in the error.

    Returns:
        `ids`, after a check that fails with InvalidArgumentError naming the
        first bad id and its flat position.

    Raises:
        ValueError: `ids` is not an integer tensor (float ids would be
            truncated silently).
    """
    if isinstance(ids, tf.RaggedTensor):
        return ids.with_flat_values(
            validate_ids_reference(ids.flat_values, num_items, arg_name))
    ids = tf.convert_to_tensor(ids)
    if not ids.dtype.is_integer:
        raise ValueError(
            f"{arg_name} must be integer ids, got {ids.dtype.name}")
    num_items = tf.cast(num_items, tf.int64)
    flat = tf.cast(tf.reshape(ids, [-1]), tf.int64)
    bad = tf.where((flat < 0) | (flat >= num_items))[:, 0]
    if tf.executing_eagerly():
        if tf.size(bad) > 0:
            position = int(bad[0])
            index = ", ".join(
                str(int(i)) for i in tf.unravel_index(position, tf.shape(
                    ids, out_type=tf.int64)).numpy()) if ids.shape.rank else ""
            raise tf.errors.InvalidArgumentError(
                None, None,
                f"{arg_name}[{index}] = {int(flat[position])} is out of range "
                f"[0, {int(num_items)}): the first bad id is at flat position "
                f"{position} of {arg_name} with shape "
                f"[{','.join(map(str, ids.shape.as_list()))}]")
        return ids
    first = tf.concat([bad, [-1]], axis=0)[0]
    # The Assert's data runs even when the check passes: gather from a
    # padded copy so that empty ids (e.g. a replica without rows) are valid.
    first_id = tf.gather(tf.concat([flat, [0]], axis=0), tf.maximum(first, 0))
    check = tf.debugging.Assert(
        tf.equal(tf.size(bad), 0),
        [f"{arg_name} has an id out of range [0, num_items): num_items =",
         num_items, "first bad id =", first_id,
         "at flat position", first], summarize=1)
    with tf.control_dependencies([check]):
        return tf.identity(ids)


def validate_ids(ids, num_items, arg_name="ids", use_fused=None):
    """Checks that every id lies in [0, num_items) and returns `ids`.

    Runs the fused op from the compiled library (multi-threaded, no
    temporaries) when it is loaded, else `validate_ids_reference`.

    Args:
        ids: int32/int64 tensor of any shape, or a `tf.RaggedTensor` (its
            `flat_values` are checked; positions refer to them).
        num_items: Scalar catalog size C (Python int or int tensor).
        arg_name: Name of the argument, used in the error message.
        use_fused: True to require the fused op (raises if it is not
            built), False to force the reference, None to pick.

    Returns:
        `ids` unchanged (same shape and dtype; a RaggedTensor stays ragged).

    Raises:
        tf.errors.InvalidArgumentError: an id is negative or >= num_items; the
            message names `arg_name`, the first bad id and its position.
        ValueError: `ids` is not an integer tensor.
    """
    if isinstance(ids, tf.RaggedTensor):
        return ids.with_flat_values(
            validate_ids(ids.flat_values, num_items, arg_name, use_fused))
    ids = tf.convert_to_tensor(ids)
    if ids.dtype not in (tf.int32, tf.int64):
        raise ValueError(
            f"{arg_name} must be int32 or int64 ids, got {ids.dtype.name}")
    module = None if use_fused is False else _library.DEFAULT_LIBRARY.module()
    if module is None:
        if use_fused:
            raise RuntimeError("use_fused=True but the op library is not "
                               "loaded: " + str(_library.build_info()))
        return validate_ids_reference(ids, num_items, arg_name)
    return module.tfrec_fast_validate_ids(
        ids, tf.cast(num_items, tf.int64), arg_name=arg_name)
