"""Padding-free multi-head attention on `tf.RaggedTensor` sequences.

The Q/K/V and output projections run on the packed tokens (`flat_values`
[T, D], T = total tokens of the batch) and the attention itself runs per
sequence over `row_splits` through `tfrec_fast.ops.ragged_attention`, so no
[B, L_max, D] tensor is ever built by this layer (the fused op keeps any
padding in on-chip memory; the pure-TF reference it falls back to pads
internally). Self-attention with key_dim == value_dim projects q, k and v
with one matmul into [T, 3, H, D] and hands that tensor to
`ragged_attention_qkvpacked`, which reads it and writes its gradient in
place (no split forward, no concat backward).
"""

import importlib

import tensorflow as tf
import tf_keras

from tfrec_fast.layers import _ragged_checks
from tfrec_fast.layers.dropout import ResumableDropout

# The module, not the function of the same name that `tfrec_fast.ops`
# re-exports (`from tfrec_fast.ops import ragged_attention` gives the latter).
attention_ops = importlib.import_module("tfrec_fast.ops.ragged_attention")


def packed_attention(queries, keys, values, row_splits, causal=True,
                     use_fused=None):
    """Per-sequence softmax attention on packed tokens, fused when possible.

    Args:
        queries: float [T, H, Dk] packed queries.
        keys: float [T, H, Dk] packed keys.
        values: float [T, H, Dv] packed values.
        row_splits: int [B + 1] sequence boundaries.
        causal: token i attends to tokens j <= i of its own sequence only.
        use_fused: False runs the pure-TF reference directly (core TF ops
            only: the serving path, independent of the op library); True and
            None go through `tfrec_fast.ops.ragged_attention.ragged_attention`
            (True requires the fused op, None picks it when it is loaded).

    Returns:
        float [T, H, Dv], scores scaled by 1 / sqrt(Dk).

    Raises:
        RuntimeError: use_fused=True but the op library is not loaded.
    """
    if use_fused is False:
        return attention_ops.ragged_attention_reference(
            queries, keys, values, row_splits, causal=causal)
    return attention_ops.ragged_attention(queries, keys, values, row_splits,
                                          causal=causal, use_fused=use_fused)


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class RaggedMultiHeadAttention(tf_keras.layers.Layer):
    """Multi-head attention within each row of a ragged batch.

    Self-attention by default: `layer(x)` with x float RaggedTensor
    [B, (L), D] returns [B, (L), output_dim]. Separate `value` (and `key`)
    ragged inputs are accepted when they have the same row splits as `query`
    (token i of row b attends to the tokens of row b of key/value); cross
    attention between rows of different lengths is not supported.

    The weights have the layouts of `tf_keras.layers.MultiHeadAttention`
    (query/key/value kernels [D, H, key_dim], biases [H, key_dim]; output
    kernel [H, value_dim, output_dim], bias [output_dim]), so weights copy
    one to one between the two, and with dropout 0 the two compute the same
    function (scores scaled by 1 / sqrt(key_dim), softmax over the keys a
    token may see).

    Dropout: unlike `tf_keras.layers.MultiHeadAttention`, which drops
    individual attention probabilities (and so needs the [B, H, L, L]
    probability tensor that the fused op never stores), `dropout` here is
    applied to the per-head attention output [T, H, value_dim] before the
    output projection. It regularises the same branch but is not the same
    distribution: a dropped entry removes a whole head channel of a token's
    context, not one key's contribution. With `dropout=0` (or at inference)
    the two layers agree exactly.

    Args:
        num_heads: number of heads H.
        key_dim: width of each query/key head Dk.
        value_dim: width of each value head Dv (default key_dim).
        causal: token i sees only tokens j <= i of its row (SASRec); False
            lets every token see its whole row (BERT4Rec).
        dropout: rate of dropout on the attention output (see above).
        use_bias: add biases to the four projections.
        output_dim: width of the output (default: the query's D).
        use_fused: True / False / None: fused op required / pure-TF reference
            / pick (see `packed_attention`). A `use_fused` passed to `call`
            overrides it.
        kernel_initializer: initializer of the projection kernels.
        bias_initializer: initializer of the projection biases.
        **kwargs: base Layer arguments (name, dtype, ...).

    Call arguments:
        query: float RaggedTensor [B, (L), D], ragged_rank 1.
        value: optional float RaggedTensor [B, (L), Dvin] with the same row
            splits (default: `query`).
        key: optional float RaggedTensor [B, (L), Dkin] with the same row
            splits (default: `value`).
        training: enables dropout.
        use_fused: per-call override of the layer's `use_fused`.

    Returns:
        float RaggedTensor [B, (L), output_dim] with the row splits of query.
    """

    def __init__(self, num_heads, key_dim, value_dim=None, causal=True,
                 dropout=0.0, use_bias=True, output_dim=None, use_fused=None,
                 kernel_initializer="glorot_uniform",
                 bias_initializer="zeros", **kwargs):
        super().__init__(**kwargs)
        for arg, value in (("num_heads", num_heads), ("key_dim", key_dim),
                           ("value_dim", value_dim or key_dim),
                           ("output_dim", output_dim or 1)):
            if not _ragged_checks.is_positive_int(value):
                raise ValueError(f"RaggedMultiHeadAttention: {arg} must be a "
                                 f"positive int, got {value!r}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"RaggedMultiHeadAttention: dropout must be in "
                             f"[0, 1), got {dropout}")
        self.num_heads = num_heads = int(num_heads)
        self.key_dim = key_dim = int(key_dim)
        self.value_dim = int(value_dim or key_dim)
        self.causal = bool(causal)
        self.dropout = dropout
        self.use_bias = use_bias
        self.output_dim = None if output_dim is None else int(output_dim)
        self.use_fused = use_fused
        self.kernel_initializer = tf_keras.initializers.get(kernel_initializer)
        self.bias_initializer = tf_keras.initializers.get(bias_initializer)
        self._input_dims = None  # (query, key, value) widths, once called

        def projection(name, heads_dim):
            return tf_keras.layers.EinsumDense(
                "ab,bcd->acd", output_shape=(num_heads, heads_dim),
                bias_axes="cd" if use_bias else None, name=name,
                **self._initializers())

        self.query_dense = projection("query", key_dim)
        self.key_dense = projection("key", key_dim)
        self.value_dense = projection("value", self.value_dim)
        self.output_dense = None  # needs D when output_dim is None
        # Checkpoints restore its masks (resumed training reproduces).
        self.output_dropout = ResumableDropout(dropout)

    def _initializers(self):
        return {"kernel_initializer": tf_keras.initializers.get(
                    tf_keras.initializers.serialize(self.kernel_initializer)),
                "bias_initializer": tf_keras.initializers.get(
                    tf_keras.initializers.serialize(self.bias_initializer))}

    @property
    def _where(self):
        return f"RaggedMultiHeadAttention '{self.name}'"

    def build(self, input_shape):
        # Keras passes the query's shape only. The projections are built from
        # the first call's query/key/value widths (as tf_keras MHA does), so
        # a key/value of another width than the query is possible.
        input_shape = tf.TensorShape(input_shape)
        if input_shape.rank != 3 or input_shape[-1] is None:
            raise ValueError(
                f"{self._where}: query must be a RaggedTensor [B, (L), D] "
                f"with known D, got shape {input_shape}")
        super().build(input_shape)

    def _build_projections(self, query_dim, key_dim, value_dim):
        """Fixes the input widths on the first call; the projections create
        their weights on their first call (under Keras' init scope)."""
        if self._input_dims is not None:
            return
        self.output_dense = tf_keras.layers.EinsumDense(
            "abc,bcd->ad", output_shape=(self.output_dim or query_dim,),
            bias_axes="d" if self.use_bias else None,
            name="attention_output", **self._initializers())
        self._input_dims = (query_dim, key_dim, value_dim)

    def call(self, query, value=None, key=None, training=None,
             use_fused=None):
        _ragged_checks.check_ragged_sequence(query, self._where, "query")
        value = query if value is None else value
        key = value if key is None else key
        _ragged_checks.check_ragged_sequence(value, self._where, "value")
        _ragged_checks.check_ragged_sequence(key, self._where, "key")
        dims = (query.shape[-1], key.shape[-1], value.shape[-1])
        self._build_projections(*dims)
        for arg, got, want in zip(("query", "key", "value"), dims,
                                  self._input_dims):
            if got != want:
                raise ValueError(
                    f"{self._where}: `{arg}` has inner dimension {got} but "
                    f"the layer was built for {want}")
        checks = []
        for other, arg in ((value, "value"), (key, "key")):
            if other is not query:
                checks += _ragged_checks.check_same_rows(
                    query, other, self._where, ("query", arg))
        row_splits = query.row_splits
        if checks:
            with tf.control_dependencies(checks):
                row_splits = tf.identity(row_splits)
        use_fused = self.use_fused if use_fused is None else use_fused
        if key is query and value is query:
            for layer in (self.query_dense, self.key_dense, self.value_dense):
                if not layer.built:  # creates its weights (no rows to do)
                    layer(query.flat_values[:0])
            qkv = self._project_self(query.flat_values)
            if self.key_dim == self.value_dim:
                # Read in place by the fused op: no split, no concat.
                context = attention_ops.ragged_attention_qkvpacked(
                    tf.reshape(qkv, [-1, 3, self.num_heads, self.key_dim]),
                    row_splits, causal=self.causal, use_fused=use_fused)
            else:
                widths = (self.key_dim, self.key_dim, self.value_dim)
                parts = tf.split(qkv, [self.num_heads * w for w in widths],
                                 axis=1)
                queries, keys, values = (
                    tf.reshape(part, [-1, self.num_heads, w])
                    for part, w in zip(parts, widths))
                context = packed_attention(queries, keys, values, row_splits,
                                           causal=self.causal,
                                           use_fused=use_fused)
        else:
            queries = self.query_dense(query.flat_values)  # [T, H, Dk]
            keys = self.key_dense(key.flat_values)  # [T, H, Dk]
            values = self.value_dense(value.flat_values)  # [T, H, Dv]
            context = packed_attention(queries, keys, values, row_splits,
                                       causal=self.causal,
                                       use_fused=use_fused)
        context = self.output_dropout(context, training=training)
        return query.with_flat_values(self._project_output(context))

    def _project_self(self, x):
        """Self-attention's q, k, v from one matmul with the three kernels
        side by side ([D, H (2 Dk + Dv)]): one GEMM forward and two backward
        instead of three and six, the same values as the three layers.

        Args:
            x: float [T, D].

        Returns:
            [T, H Dk | H Dk | H Dv]: queries, keys and values side by side
            (each [T, H, width] row-major), in the projections' compute
            dtype.
        """
        dtype = self.query_dense.compute_dtype
        x = tf.cast(x, dtype)
        layers = (self.query_dense, self.key_dense, self.value_dense)
        kernel = tf.concat([tf.reshape(tf.cast(layer.kernel, dtype),
                                       [x.shape[-1], -1])
                            for layer in layers], axis=1)
        fused = tf.matmul(x, kernel)
        if self.use_bias:  # BiasAdd: its gradient is a fast BiasAddGrad
            fused = tf.nn.bias_add(fused, tf.concat(
                [tf.reshape(tf.cast(layer.bias, dtype), [-1])
                 for layer in layers], axis=0))
        return fused

    def _project_output(self, context):
        """The output projection as one [T, H Dv] x [H Dv, Do] matmul.

        Same weights and values as `output_dense`; its einsum runs the
        kernel gradient several times slower than a plain matmul on the CPU
        (TF 2.21's oneDNN einsum, ~1.9 ms vs ~0.2 ms at T = 7,700, D = 64).

        Args:
            context: [T, H, Dv] attention output.

        Returns:
            [T, Do] in the projection's compute dtype.
        """
        layer = self.output_dense
        if not layer.built:  # creates its weights (no rows to do)
            layer(context[:0])
        dtype = layer.compute_dtype
        kernel = tf.cast(layer.kernel, dtype)
        heads_width = self.num_heads * self.value_dim
        out = tf.matmul(tf.reshape(tf.cast(context, dtype), [-1, heads_width]),
                        tf.reshape(kernel, [heads_width, -1]))
        if self.use_bias:
            out = tf.nn.bias_add(out, tf.cast(layer.bias, dtype))
        return out

    def get_config(self):
        return {**super().get_config(), "num_heads": self.num_heads,
                "key_dim": self.key_dim, "value_dim": self.value_dim,
                "causal": self.causal, "dropout": self.dropout,
                "use_bias": self.use_bias, "output_dim": self.output_dim,
                "use_fused": self.use_fused,
                "kernel_initializer": tf_keras.initializers.serialize(
                    self.kernel_initializer),
                "bias_initializer": tf_keras.initializers.serialize(
                    self.bias_initializer)}
