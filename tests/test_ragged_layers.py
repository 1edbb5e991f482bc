"""Padding-free transformer layers on tf.RaggedTensor.

The ragged layers are held equal (values and gradients, fp32) to the same
math computed on padded input: the stock-tf_keras padded reference
(`PaddedTransformerBlock` / `PaddedSequenceEncoder` / `MultiHeadAttention`,
weights copied one to one) for the SASRec configuration, and a small padded
reference written here for the other configurations (post-LN, bidirectional,
relu, positions from the end). Tolerances (fp32): rtol 1e-5 plus an
absolute 1e-5 * max(1, largest |entry| of the expected tensor); elements
near zero (e.g. the key-bias gradient, zero in exact arithmetic) have no
meaningful relative error. Observed errors are ~1e-7 relative.
"""

import math

# pylint: disable=g-bad-import-order,wrong-import-order
import tfrec_fast  # noqa: F401  (selects tf_keras before TF and TFRS load)
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras

from tfrec_fast import layers
from tfrec_fast.layers.ragged_attention import attention_ops
from tfrec_fast.ops import _library
from tfrec_fast.tasks.next_item import NextItemTask


def _ragged(lengths, dim, seed=0, dtype=tf.float32):
    """float RaggedTensor [B, (L), dim] of normal values, int64 row splits."""
    lengths = np.asarray(lengths, np.int64)
    values = np.random.default_rng(seed).normal(
        size=(int(lengths.sum()), dim))
    return tf.RaggedTensor.from_row_lengths(tf.constant(values, dtype),
                                            tf.constant(lengths))


def _close(actual, expected, rtol=1e-5, atol=1e-5):
    actual = tf.convert_to_tensor(actual).numpy()
    expected = tf.convert_to_tensor(expected).numpy()
    scale = max(float(np.abs(expected).max(initial=0.0)), 1.0)
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol * scale)


def _grads(tape, loss, sources):
    return [tf.zeros_like(s) if g is None else tf.convert_to_tensor(g)
            for g, s in zip(tape.gradient(loss, sources), sources)]


def _run_ragged(layer, x, weights, **kwargs):
    """(output [B, (L), D], d loss / d inputs, d loss / d trainables)."""
    inputs = x.flat_values
    with tf.GradientTape() as tape:
        tape.watch(inputs)
        out = layer(x.with_flat_values(inputs), **kwargs)
        loss = tf.reduce_sum(out.flat_values * weights.flat_values)
    grads = _grads(tape, loss, [inputs] + layer.trainable_variables)
    return out, grads[0], grads[1:]


def _run_padded(fn, variables, x, weights):
    """The same on padded input: fn(dense [B, L, D], lengths) -> dense."""
    dense, lengths = x.to_tensor(), x.row_lengths()
    with tf.GradientTape() as tape:
        tape.watch(dense)
        out = fn(dense, lengths)
        loss = tf.reduce_sum(out * weights.to_tensor())
    grads = _grads(tape, loss, [dense] + variables)
    d_inputs = tf.RaggedTensor.from_tensor(grads[0], lengths=lengths)
    return out, d_inputs.flat_values, grads[1:]


def _assert_same(ragged_run, padded_run, lengths):
    out, d_x, d_w = ragged_run
    out_p, d_x_p, d_w_p = padded_run
    assert out.row_lengths().numpy().tolist() == list(lengths)
    _close(out.flat_values,
           tf.RaggedTensor.from_tensor(out_p, lengths=out.row_lengths())
           .flat_values)
    _close(d_x, d_x_p)
    assert len(d_w) == len(d_w_p)
    for a, b in zip(d_w, d_w_p):
        _close(a, b)


# --- a padded reference of the general configurations, written here -------

def _padded_attention(attention, h, mask):
    """tf_keras-MHA math on dense h [B, L, D] with bool mask [B, L, L]."""
    def project(dense, x):
        out = tf.einsum("bld,dhk->blhk", x, dense.kernel)
        return out + dense.bias if dense.bias is not None else out
    q = project(attention.query_dense, h)
    k = project(attention.key_dense, h)
    v = project(attention.value_dense, h)
    scores = tf.einsum("blhk,bmhk->bhlm", q, k) / math.sqrt(
        attention.key_dim)
    scores = tf.where(mask[:, tf.newaxis], scores, -1e9)
    context = tf.einsum("bhlm,bmhv->blhv", tf.nn.softmax(scores), v)
    out = tf.einsum("blhv,hvd->bld", context, attention.output_dense.kernel)
    return out + attention.output_dense.bias


def _layer_norm(norm, x):
    mean, variance = tf.nn.moments(x, axes=[-1], keepdims=True)
    return ((x - mean) * tf.math.rsqrt(variance + norm.epsilon) * norm.gamma
            + norm.beta)


def _padded_block(block, x, mask):
    def attend(h):
        return _padded_attention(block.attention, h, mask)

    def ffn(h):
        return block.ffn_out(block.ffn_in(h))

    if block.norm_first:
        x = x + attend(_layer_norm(block.attention_norm, x))
        return x + ffn(_layer_norm(block.ffn_norm, x))
    x = _layer_norm(block.attention_norm, x + attend(x))
    return _layer_norm(block.ffn_norm, x + ffn(x))


def _mask(lengths, width, causal):
    valid = tf.sequence_mask(lengths, width)
    mask = valid[:, tf.newaxis, :] & valid[:, :, tf.newaxis]
    if causal:
        mask &= tf.linalg.band_part(tf.ones([width, width], tf.bool), -1, 0)
    return mask | tf.eye(width, dtype=tf.bool)  # padded rows stay finite


def _padded_encoder(encoder, x, lengths):
    width = tf.shape(x)[1]
    lengths = tf.cast(lengths, tf.int32)
    keep = tf.cast(tf.sequence_mask(lengths, width), x.dtype)[..., None]
    if encoder.scale_embeddings:
        x = x * math.sqrt(encoder.dim)
    positions = tf.range(width)[tf.newaxis]
    if encoder.from_end:
        positions = tf.maximum(lengths[:, tf.newaxis] - 1 - positions, 0)
    x += tf.gather(encoder.positions.embeddings,
                   positions + tf.zeros_like(keep[..., 0], tf.int32))
    if encoder.input_norm is not None:
        x = _layer_norm(encoder.input_norm, x)
    mask = _mask(lengths, width, encoder.causal)
    for block in encoder.blocks:
        x = _padded_block(block, x, mask)
    if encoder.final_norm is not None:
        x = _layer_norm(encoder.final_norm, x)
    return x * keep


# --- attention ---------------------------------------------------------------

@pytest.mark.parametrize("causal", [True, False])
def test_attention_matches_tf_keras_mha(causal):
    lengths = [3, 1, 0, 5]
    x = _ragged(lengths, 6)
    weights = _ragged(lengths, 7, seed=1)
    ragged = layers.RaggedMultiHeadAttention(2, key_dim=3, value_dim=5,
                                             output_dim=7, causal=causal)
    stock = tf_keras.layers.MultiHeadAttention(2, key_dim=3, value_dim=5,
                                               output_shape=7)
    ragged(x)
    dense = x.to_tensor()
    stock(dense, dense)
    stock.set_weights(ragged.get_weights())

    def padded(dense, lengths):
        mask = _mask(lengths, tf.shape(dense)[1], causal)
        return stock(dense, dense, attention_mask=mask)

    _assert_same(_run_ragged(ragged, x, weights),
                 _run_padded(padded, stock.trainable_variables, x, weights),
                 lengths)


def test_attention_separate_key_value_inputs():
    lengths = [2, 4]
    query, key, value = (_ragged(lengths, d, seed=s)
                         for s, d in ((0, 4), (1, 6), (2, 3)))
    ragged = layers.RaggedMultiHeadAttention(2, key_dim=4, causal=False)
    out = ragged(query, value=value, key=key)
    assert out.shape.as_list() == [2, None, 4]
    stock = tf_keras.layers.MultiHeadAttention(2, key_dim=4)
    stock(query.to_tensor(), value.to_tensor(), key=key.to_tensor())
    stock.set_weights(ragged.get_weights())
    mask = _mask(query.row_lengths(), 4, causal=False)
    expected = stock(query.to_tensor(), value.to_tensor(), key=key.to_tensor(),
                     attention_mask=mask)
    _close(out.to_tensor(), expected * tf.sequence_mask(
        query.row_lengths(), 4, tf.float32)[..., None])


def test_attention_dispatch_passes_use_fused(monkeypatch):
    calls = []

    def spy(q, k, v, row_splits, causal=True, scale=None, use_fused=None):
        calls.append((causal, use_fused))
        return attention_ops.ragged_attention_reference(q, k, v, row_splits,
                                                        causal, scale)

    def spy_qkvpacked(qkv, row_splits, causal=True, scale=None,
                      use_fused=None):
        calls.append(("qkvpacked", causal, use_fused))
        return attention_ops.ragged_attention_reference(
            *tf.unstack(qkv, 3, axis=1), row_splits, causal, scale)

    monkeypatch.setattr(attention_ops, "ragged_attention", spy, raising=False)
    monkeypatch.setattr(attention_ops, "ragged_attention_qkvpacked",
                        spy_qkvpacked, raising=False)
    x = _ragged([2, 3], 4)
    layer = layers.RaggedMultiHeadAttention(1, 4, causal=False,
                                            use_fused=True)
    layer(x)  # self-attention, key_dim == value_dim: one packed tensor
    assert calls == [("qkvpacked", False, True)]
    wide_values = layers.RaggedMultiHeadAttention(1, 4, value_dim=3,
                                                  causal=False)
    wide_values(x)  # q/k and v widths differ: three tensors
    assert calls[-1] == (False, None)
    del calls[:]
    layer(x, use_fused=False)  # call-time override: reference, no dispatch
    wide_values(x, use_fused=False)
    assert calls == [("qkvpacked", False, False)]
    encoder = layers.SequenceEncoder(8, 4, num_blocks=1, dropout=0.0)
    encoder(x)
    assert calls[-1] == ("qkvpacked", True, None)
    count = len(calls)
    encoder.call_padded(x.to_tensor(), x.row_lengths())  # serving: reference
    assert calls[count:] and all(c[-1] is False for c in calls[count:])


def test_use_fused_true_without_fused_op_fails(monkeypatch):
    # As if the op library were not built.
    monkeypatch.setattr(_library.DEFAULT_LIBRARY, "module", lambda: None)
    layer = layers.RaggedMultiHeadAttention(1, 4, use_fused=True)
    with pytest.raises(RuntimeError, match="use_fused=True"):
        layer(_ragged([2], 4))


def test_attention_dropout_is_on_the_output():
    x = _ragged([5, 3], 8)
    layer = layers.RaggedMultiHeadAttention(2, 4, dropout=0.5)
    tf_keras.utils.set_random_seed(1)
    inference = layer(x, training=False)
    _close(layer(x).flat_values, inference.flat_values)
    trained = layer(x, training=True)
    assert not np.allclose(trained.flat_values, inference.flat_values)


# --- block -------------------------------------------------------------------

@pytest.mark.parametrize("lengths", [[3, 1, 0, 6], [1], [0, 0]])
def test_block_matches_padded_transformer_block(lengths):
    x = _ragged(lengths, 8)
    weights = _ragged(lengths, 8, seed=1)
    ragged = layers.RaggedTransformerBlock(2, 8, ffn_dim=12, dropout=0.1)
    padded = layers.PaddedTransformerBlock(2, 8, ffn_dim=12, dropout=0.1)
    ragged(x)
    width = max(max(lengths), 1)
    padded(tf.zeros([1, width, 8]), tf.ones([1, width, width], tf.bool))
    padded.set_weights(ragged.get_weights())

    def run_padded(dense, lengths):
        valid = tf.sequence_mask(lengths, tf.shape(dense)[1], tf.float32)
        mask = _mask(lengths, tf.shape(dense)[1], causal=True)
        return padded(dense, mask, training=False) * valid[..., None]

    _assert_same(
        _run_ragged(ragged, x, weights, training=False),
        _run_padded(run_padded, padded.trainable_variables, x, weights),
        lengths)


@pytest.mark.parametrize("norm_first,causal,activation", [
    (False, False, "relu"), (False, True, "gelu"), (True, False, "relu")])
def test_block_configurations_match_padded_math(norm_first, causal,
                                                activation):
    lengths = [4, 1, 0, 7]
    x = _ragged(lengths, 6)
    weights = _ragged(lengths, 6, seed=1)
    block = layers.RaggedTransformerBlock(
        3, 6, ffn_dim=10, causal=causal, norm_first=norm_first,
        activation=activation, epsilon=1e-5)
    block(x)

    def padded(dense, lengths):
        valid = tf.sequence_mask(lengths, tf.shape(dense)[1], tf.float32)
        mask = _mask(lengths, tf.shape(dense)[1], causal)
        return _padded_block(block, dense, mask) * valid[..., None]

    _assert_same(_run_ragged(block, x, weights),
                 _run_padded(padded, block.trainable_variables, x, weights),
                 lengths)


# --- encoder -----------------------------------------------------------------

ENCODER_CASES = {
    "mixed": ([1, 0, 5, 3, 2], 16, 2),
    "one_long_row": ([3, 2000, 1, 0, 2], 8, 1),
    "zero_rows": ([], 8, 2),
}


# use_fused=None runs the fused op when the library has it (else the same
# reference as False), so these cases also hold the fused path to the padded
# reference.
@pytest.mark.parametrize("use_fused", [None, False])
@pytest.mark.parametrize("case", sorted(ENCODER_CASES))
def test_encoder_matches_padded_sequence_encoder(case, use_fused):
    lengths, dim, num_blocks = ENCODER_CASES[case]
    x = _ragged(lengths, dim)
    weights = _ragged(lengths, dim, seed=1)
    max_len = max(lengths + [1])
    ragged = layers.SequenceEncoder(max_len, dim, num_blocks=num_blocks,
                                    num_heads=2, dropout=0.0,
                                    use_fused=use_fused)
    padded = layers.PaddedSequenceEncoder(max_len, dim, num_blocks=num_blocks,
                                          num_heads=2, dropout=0.0)
    ragged(_ragged([max_len], dim))
    padded(tf.zeros([1, max_len, dim]), tf.constant([max_len]))
    padded.set_weights(ragged.get_weights())
    ragged_run = _run_ragged(ragged, x, weights)
    _assert_same(ragged_run,
                 _run_padded(padded, padded.trainable_variables, x, weights),
                 lengths)
    out, d_x, d_w = ragged_run  # zero rows: empty output, zero gradients
    assert out.shape.as_list() == [len(lengths), None, dim]
    assert out.flat_values.shape.as_list() == [sum(lengths), dim]
    assert d_x.shape.as_list() == [sum(lengths), dim]
    if not lengths:
        assert all(not np.any(g.numpy()) for g in d_w)
    # The serving path computes the same from padded input.
    dense = tf.pad(x.to_tensor(shape=[len(lengths), max_len, dim]),
                   [[0, 0], [0, 2], [0, 0]])  # wider than the longest row
    served = ragged.call_padded(dense, x.row_lengths())
    assert served.shape.as_list() == [len(lengths), max_len + 2, dim]
    _close(served, out.to_tensor(shape=[len(lengths), max_len + 2, dim]))


@pytest.mark.parametrize("config", [
    dict(causal=False, norm_first=False, activation="relu", from_end=True,
         scale_embeddings=False, ffn_dim=20, epsilon=1e-3),  # BERT4Rec-like
    dict(causal=True, from_end=True),
    dict(causal=False, num_blocks=0),
])
def test_encoder_configurations_match_padded_math(config):
    config = {"num_blocks": 2, **config}
    lengths = [1, 0, 6, 3]
    x = _ragged(lengths, 8)
    weights = _ragged(lengths, 8, seed=1)
    encoder = layers.SequenceEncoder(6, 8, num_heads=2, dropout=0.0, **config)
    encoder(x)
    _assert_same(
        _run_ragged(encoder, x, weights),
        _run_padded(lambda d, l: _padded_encoder(encoder, d, l),
                    encoder.trainable_variables, x, weights), lengths)
    _close(encoder.call_padded(x.to_tensor(), x.row_lengths()),
           encoder(x).to_tensor())


def test_encoder_in_tf_function_matches_eager():
    encoder = layers.SequenceEncoder(8, 8, num_blocks=1, num_heads=2,
                                     dropout=0.0)
    spec = tf.RaggedTensorSpec([None, None, 8], tf.float32, 1, tf.int64)
    graph_fn = tf.function(encoder, input_signature=[spec])
    for lengths in ([3, 0, 8], [1], []):
        x = _ragged(lengths, 8)
        _close(graph_fn(x).flat_values, encoder(x).flat_values)
    padded_fn = tf.function(encoder.call_padded, input_signature=[
        tf.TensorSpec([None, None, 8]), tf.TensorSpec([None], tf.int64)])
    x = _ragged([2, 5], 8)
    _close(padded_fn(x.to_tensor(), x.row_lengths()), encoder(x).to_tensor())


def test_encoder_dropout_only_in_training():
    x = _ragged([4, 2], 8)
    encoder = layers.SequenceEncoder(8, 8, num_blocks=1, num_heads=2,
                                     dropout=0.3)
    _close(encoder(x).flat_values, encoder(x, training=False).flat_values)
    assert not np.allclose(encoder(x, training=True).flat_values,
                           encoder(x).flat_values)


# --- positions ---------------------------------------------------------------

def test_positions_from_start_and_end():
    ids = tf.ragged.constant([[5, 6, 7], [], [8]], tf.int64)
    np.testing.assert_array_equal(
        layers.ragged_positions(ids.row_splits).numpy(), [0, 1, 2, 0])
    np.testing.assert_array_equal(
        layers.ragged_positions(ids.row_splits, from_end=True).numpy(),
        [2, 1, 0, 0])
    for from_end, expected in ((False, [0, 1, 2, 0]), (True, [2, 1, 0, 0])):
        layer = layers.RaggedPositionalEmbedding(3, 4, from_end=from_end)
        out = layer(ids)  # ids work as input: only the row splits matter
        assert out.shape.as_list() == [3, None, 4]
        np.testing.assert_array_equal(out.row_splits, ids.row_splits)
        np.testing.assert_array_equal(
            out.flat_values, tf.gather(layer.embeddings, expected))


def test_rows_longer_than_max_len_fail():
    layer = layers.RaggedPositionalEmbedding(3, 4)
    layer(tf.ragged.constant([[1, 2, 3], [4]]))  # max_len itself is fine
    too_long = tf.ragged.constant([[1, 2, 3, 4], [5]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_len = 3"):
        layer(too_long)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_len = 3"):
        tf.function(layer)(too_long)
    encoder = layers.SequenceEncoder(3, 4, num_blocks=1)
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_len"):
        encoder(_ragged([4, 1], 4))
    with pytest.raises(tf.errors.InvalidArgumentError, match="max_len"):
        encoder.call_padded(tf.zeros([1, 5, 4]), tf.constant([4]))


# --- Keras integration -------------------------------------------------------

def _all_layers():
    return [layers.RaggedMultiHeadAttention(2, 4, value_dim=3, causal=False,
                                            dropout=0.1, output_dim=8),
            layers.RaggedTransformerBlock(2, 8, ffn_dim=16, dropout=0.1,
                                          norm_first=False,
                                          activation="relu", epsilon=1e-5),
            layers.RaggedPositionalEmbedding(10, 8, from_end=True),
            layers.SequenceEncoder(10, 8, num_blocks=2, num_heads=2,
                                   dropout=0.1, causal=False,
                                   norm_first=False, from_end=True)]


@pytest.mark.parametrize("index", range(4))
def test_get_config_round_trip(index):
    layer = _all_layers()[index]
    x = _ragged([3, 0, 2], 8)
    expected = layer(x)
    serialized = tf_keras.layers.serialize(layer)
    assert serialized["registered_name"] == (
        f"tfrec_fast>{type(layer).__name__}")
    copy = tf_keras.layers.deserialize(serialized)
    assert type(copy) is type(layer)
    assert copy.get_config() == layer.get_config()
    copy(x)
    copy.set_weights(layer.get_weights())
    _close(copy(x).flat_values, expected.flat_values)


def test_functional_model_save_and_load(tmp_path):
    inputs = tf_keras.Input(shape=[None, 8], ragged=True)
    hidden = layers.SequenceEncoder(10, 8, num_blocks=1, num_heads=2,
                                    dropout=0.0)(inputs)
    hidden = layers.RaggedTransformerBlock(2, 8, norm_first=False)(hidden)
    model = tf_keras.Model(inputs, hidden)
    assert model.output.shape.as_list() == [None, None, 8]
    x = _ragged([3, 0, 5], 8)
    expected = model(x)
    assert isinstance(expected, tf.RaggedTensor)
    rebuilt = tf_keras.Model.from_config(model.get_config())
    rebuilt.set_weights(model.get_weights())
    _close(rebuilt(x).flat_values, expected.flat_values)
    path = str(tmp_path / "model.keras")
    model.save(path)
    loaded = tf_keras.models.load_model(path)
    _close(loaded(x).flat_values, expected.flat_values)


class _TinyNextItem(tfrs.Model):
    """A subclassed tfrs.Model: ragged ids -> embeddings -> encoder -> CE."""

    def __init__(self, num_items, dim):
        super().__init__()
        self.items = tf_keras.layers.Embedding(num_items, dim)
        self.encoder = layers.SequenceEncoder(8, dim, num_blocks=1,
                                              num_heads=2, dropout=0.1)
        self.task = NextItemTask()

    def call(self, ids, training=None):
        embedded = ids.with_flat_values(self.items(ids.flat_values))
        return self.encoder(embedded, training=training)

    def compute_loss(self, inputs, training=False):
        hidden = self(inputs["item_ids"], training=training)
        return self.task(hidden.flat_values, self.items.embeddings,
                         inputs["targets"].flat_values)


def test_tfrs_model_fit_lowers_loss():
    tf_keras.utils.set_random_seed(0)
    rng = np.random.default_rng(0)
    rows = [list((rng.integers(12) + 2 * np.arange(rng.integers(2, 9))) % 12)
            for _ in range(64)]
    ids = tf.ragged.constant([r[:-1] for r in rows], tf.int64)
    targets = tf.ragged.constant([r[1:] for r in rows], tf.int64)
    dataset = tf.data.Dataset.from_tensor_slices(
        {"item_ids": ids, "targets": targets}).batch(16)
    model = _TinyNextItem(12, 16)
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2))
    losses = model.fit(dataset, epochs=8, verbose=0).history["loss"]
    assert np.isfinite(losses).all()
    assert losses[-1] < 0.7 * losses[0]


# --- bad input ---------------------------------------------------------------

def test_dense_input_is_rejected():
    encoder = layers.SequenceEncoder(8, 4, num_blocks=1)
    with pytest.raises(ValueError, match="must be a tf.RaggedTensor"):
        encoder(tf.zeros([2, 3, 4]))
    with pytest.raises(ValueError, match="must be a tf.RaggedTensor"):
        layers.RaggedTransformerBlock(1, 4)(tf_keras.Input(shape=[None, 4]))
    with pytest.raises(ValueError, match="must be a tf.RaggedTensor"):
        layers.RaggedMultiHeadAttention(1, 4)(tf.zeros([2, 3, 4]))
    with pytest.raises(ValueError, match="must be a tf.RaggedTensor"):
        layers.RaggedPositionalEmbedding(8, 4)(tf.zeros([2, 3], tf.int64))


def test_wrong_ragged_structure_is_rejected():
    block = layers.RaggedTransformerBlock(1, 2)
    ragged_features = tf.ragged.constant([[[1.0, 2.0], [3.0]]])
    assert ragged_features.ragged_rank == 2
    with pytest.raises(ValueError, match="ragged_rank 1"):
        block(ragged_features)
    uniform_then_ragged = tf.RaggedTensor.from_uniform_row_length(
        tf.RaggedTensor.from_row_lengths(tf.ones([4, 2]), [1, 3]), 2)
    with pytest.raises(ValueError, match="ragged_rank 1"):
        block(uniform_then_ragged)
    with pytest.raises(ValueError, match="must be \\[B, \\(L\\), D\\]"):
        block(tf.ragged.constant([[1.0, 2.0], [3.0]]))
    with pytest.raises(ValueError, match="floating point"):
        layers.RaggedMultiHeadAttention(1, 2)(
            tf.ragged.constant([[[1, 2]], [[3, 4]]], ragged_rank=1))
    unknown_width = tf.function(lambda v, s: block(
        tf.RaggedTensor.from_row_splits(v, s)))
    with pytest.raises(ValueError, match="known statically"):
        unknown_width.get_concrete_function(
            tf.TensorSpec([None, None]), tf.TensorSpec([None], tf.int64))


def test_dimension_mismatches_are_rejected():
    with pytest.raises(ValueError, match="built for D = 8"):
        layers.SequenceEncoder(8, 8, num_blocks=1)(_ragged([2], 6))
    with pytest.raises(ValueError, match="built for D = 8"):
        inputs = tf_keras.Input(shape=[None, 6], ragged=True)
        layers.RaggedTransformerBlock(2, 8)(inputs)
    attention = layers.RaggedMultiHeadAttention(2, 4)
    attention(_ragged([2], 8))
    with pytest.raises(ValueError, match="built for 8"):
        attention(_ragged([2], 6))
    with pytest.raises(ValueError, match="call_padded"):
        layers.SequenceEncoder(8, 8).call_padded(tf.zeros([1, 2, 6]), [2])
    with pytest.raises(ValueError, match="lengths"):
        layers.SequenceEncoder(8, 8).call_padded(tf.zeros([1, 2, 8]), [[2]])
    with pytest.raises(tf.errors.InvalidArgumentError, match="lengths"):
        layers.SequenceEncoder(8, 8).call_padded(tf.zeros([1, 2, 8]), [3])


def test_numpy_integer_arguments_are_accepted():
    encoder = layers.SequenceEncoder(np.int64(8), np.int32(4),
                                     num_blocks=np.int64(1),
                                     num_heads=np.int64(2))
    assert encoder(_ragged([2], 4)).shape.as_list() == [1, None, 4]
    assert isinstance(encoder.get_config()["dim"], int)


def test_heads_must_divide_dim():
    with pytest.raises(ValueError, match="divisible by num_heads"):
        layers.RaggedTransformerBlock(3, 8)
    with pytest.raises(ValueError, match="divisible by num_heads"):
        layers.SequenceEncoder(8, 10, num_heads=4)
    with pytest.raises(ValueError, match="num_heads"):
        layers.RaggedMultiHeadAttention(0, 4)
    with pytest.raises(ValueError, match="dropout"):
        layers.RaggedTransformerBlock(1, 4, dropout=1.0)


def test_key_value_rows_must_match_query_rows():
    attention = layers.RaggedMultiHeadAttention(1, 4, causal=False)
    query = _ragged([2, 3], 4)
    with pytest.raises(tf.errors.InvalidArgumentError, match="row splits"):
        attention(query, value=_ragged([3, 2], 4))
    with pytest.raises(ValueError, match="same row lengths"):
        attention(query, value=_ragged([2, 3, 1], 4))
