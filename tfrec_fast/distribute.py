"""tf.distribute helpers shared by losses and tasks.

Outside a strategy, or with one replica, every helper is the identity.
"""

import tensorflow as tf


def _replica_context():
    """The replica context when inside a multi-replica step, else None."""
    if not tf.distribute.has_strategy():
        return None
    context = tf.distribute.get_replica_context()
    if context is None or context.num_replicas_in_sync <= 1:
        return None
    return context


def sum_across_replicas(value):
    """Sum of `value` over the replicas of the current step."""
    context = _replica_context()
    if context is None:
        return value
    return context.all_reduce(tf.distribute.ReduceOp.SUM, value)


def gather_across_replicas(values, differentiable=True):
    """Concatenates tensors of every replica along axis 0, replica order.

    Replicas may hold different numbers of rows.

    Args:
        values: a tensor or nested structure of tensors, each [n_r, ...].
        differentiable: when True, gradients flow back to each replica's own
            rows only; TensorFlow's all_gather gradient all-reduces the
            upstream gradient first, so the result equals the single-device
            gradient on the concatenated batch. When False the gathered
            values are constants.

    Returns:
        The same structure with [sum_r n_r, ...] tensors.
    """
    context = _replica_context()
    if context is None:
        return values
    if not differentiable:
        values = tf.nest.map_structure(tf.stop_gradient, values)
    # One all_gather per tensor: the gradient of a structure's all_gather
    # all-reduces the gradients of all its tensors packed into one concat,
    # which fails on mixed dtypes (e.g. int64 ids next to float embeddings).
    return tf.nest.map_structure(lambda v: context.all_gather(v, axis=0),
                                 values)


def replica_row_offset(num_rows):
    """Index of this replica's first row in the gathered batch.

    Args:
        num_rows: int32 scalar, rows of this replica.

    Returns:
        int32 scalar: the sum of the row counts of the replicas before this one.
    """
    context = _replica_context()
    if context is None:
        return tf.constant(0, tf.int32)
    counts = context.all_gather(tf.reshape(tf.cast(num_rows, tf.int32), [1]),
                                axis=0)
    return tf.reduce_sum(counts[:context.replica_id_in_sync_group])
