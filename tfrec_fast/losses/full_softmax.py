"""Full-catalog softmax cross-entropy: the plain reference for next-item losses.

Materialises the [T, C] logits. It is the baseline that the fused losses
(CutCrossEntropy, CCEMinus) must equal in value and beat in memory and time.
"""

import tensorflow as tf

from tfrec_fast.losses.sampled_softmax import flatten_rows
from tfrec_fast.ops.validate_ids import validate_ids_reference


def full_softmax_cross_entropy(hidden, item_table, targets, item_bias=None):
    """Per-position cross-entropy of each target against the whole catalog.

    Mixed precision: the logits matmul runs in hidden's dtype (the item
    table is cast to it, as a Keras layer's compute dtype would), then the
    logits are cast to float32 before the bias is added and before the
    log-softmax, whose sum over the C items runs in float32.

    Args:
        hidden: float [T, D] hidden states (T = total positions, no padding),
            or a RaggedTensor [B, (L), D] (its tokens are the positions).
        item_table: float [C, D] item embeddings (any float dtype).
        targets: int [T] target item ids in [0, C) (ragged [B, (L)] with a
            ragged `hidden`).
        item_bias: optional float [C] added to every logit.

    Returns:
        float32 [T] losses, -log softmax(hidden @ item_table^T + bias)[target].

    Raises:
        ValueError: ranks, dtypes or row counts that do not fit.
        tf.errors.InvalidArgumentError: targets outside [0, C) (TF's own
            cross-entropy kernel would not name them on CPU and returns NaN
            on GPU).
    """
    hidden, targets = flatten_rows(hidden, targets, "targets")
    if tf.convert_to_tensor(item_table).shape.rank not in (None, 2):
        raise ValueError(f"item_table must be [C, D], got shape "
                         f"{tf.convert_to_tensor(item_table).shape}")
    targets = validate_ids_reference(
        targets, tf.shape(item_table, out_type=tf.int64)[0], "targets")
    item_table = tf.cast(item_table, hidden.dtype)
    logits = tf.matmul(hidden, item_table, transpose_b=True)  # [T, C]
    logits = tf.cast(logits, tf.float32)
    if item_bias is not None:
        logits += tf.cast(item_bias, tf.float32)
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=targets, logits=logits)
