"""Full-catalog softmax cross-entropy: the plain reference for next-item losses.

Materialises the [T, C] logits. It is the baseline that the fused losses
(CutCrossEntropy, CCEMinus) must equal in value and beat in memory and time.
"""

import tensorflow as tf


def full_softmax_cross_entropy(hidden, item_table, targets, item_bias=None):
    """Per-position cross-entropy of each target against the whole catalog.

    Args:
        hidden: float [T, D] hidden states (T = total positions, no padding).
        item_table: float [C, D] item embeddings.
        targets: int [T] target item ids in [0, C).
        item_bias: optional float [C] added to every logit.

    Returns:
        float32 [T] losses, -log softmax(hidden @ item_table^T + bias)[target].
    """
    logits = tf.matmul(hidden, item_table, transpose_b=True)  # [T, C]
    if item_bias is not None:
        logits += item_bias
    return tf.nn.sparse_softmax_cross_entropy_with_logits(
        labels=targets, logits=tf.cast(logits, tf.float32))
