"""The transformer blocks' token-wise parts with hand-written gradients
(TokenLayerNormalization, exact_gelu) equal the stock TF / tf_keras ones."""

import functools

import numpy as np
import pytest

import tfrec_fast  # noqa: F401  (selects tf_keras before TF loads)
import tensorflow as tf
import tf_keras

from tfrec_fast import ops
from tfrec_fast.layers.gelu import exact_gelu
from tfrec_fast.layers.gelu import fast_activation
from tfrec_fast.layers.token_layer_norm import TokenLayerNormalization

from cpu_isa_testing import assert_passes_on_every_isa


def _pair(epsilon, dim):
    ours = TokenLayerNormalization(epsilon=epsilon)
    stock = tf_keras.layers.LayerNormalization(epsilon=epsilon)
    ours.build([None, dim])
    stock.build([None, dim])
    rng = np.random.default_rng(1)
    weights = [rng.normal(size=dim).astype(np.float32) for _ in range(2)]
    ours.set_weights(weights)
    stock.set_weights(weights)
    return ours, stock


def _call_with(layer, use_fused, inputs):
    """TokenLayerNormalization.call on the fused op or the reference."""
    return tf.cast(ops.layer_norm(
        tf.cast(inputs, tf.float32), tf.cast(layer.gamma, tf.float32),
        tf.cast(layer.beta, tf.float32), layer.epsilon, use_fused=use_fused),
        inputs.dtype)


def _value_and_grads(layer, x, dy):
    with tf.GradientTape() as tape:
        tape.watch(x)
        y = layer(x)
        loss = tf.reduce_sum(y * dy)
    return [y] + tape.gradient(loss, [x] + layer.trainable_variables)


@pytest.mark.parametrize("use_fused", [True, False], ids=["fused", "reference"])
@pytest.mark.parametrize("epsilon", [1e-6, 1e-3])
@pytest.mark.parametrize("rows", [0, 1, 37, 1500])
@pytest.mark.parametrize("dim", [24, 5])
def test_matches_keras_layer_norm(epsilon, rows, dim, use_fused):
    if use_fused and not ops.build_info()["cpu_ops"]:
        pytest.skip("op library not built")
    ours, stock = _pair(epsilon, dim)
    ours.call = functools.partial(_call_with, ours, use_fused)
    rng = np.random.default_rng(rows)
    # Rows with an offset and a scale far from 0 / 1, and a constant row
    # (variance 0: rstd = 1 / sqrt(epsilon)).
    x = rng.normal(3.0, 5.0, size=(rows, dim)).astype(np.float32)
    if rows > 1:
        x[1] = 2.5
    x = tf.constant(x)
    dy = tf.constant(rng.normal(size=(rows, dim)).astype(np.float32))
    got = _value_and_grads(ours, x, dy)
    want = _value_and_grads(stock, x, dy)
    for g, w, name in zip(got, want, ["y", "dx", "dgamma", "dbeta"]):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=2e-5,
                                   atol=2e-5 if epsilon > 1e-5 else 2e-4,
                                   err_msg=name)


def test_same_weights_and_config_as_keras():
    ours, stock = _pair(1e-6, 8)
    assert [v.name for v in ours.weights] == [v.name.replace(
        stock.name, ours.name) for v in stock.weights]
    config = ours.get_config()
    config.pop("name")
    assert config.pop("use_fused") is None  # the one addition
    stock_config = stock.get_config()
    stock_config.pop("name")
    assert config == stock_config


def test_other_ranks_use_the_keras_code():
    ours = TokenLayerNormalization(epsilon=1e-6, beta_initializer="ones")
    stock = tf_keras.layers.LayerNormalization(epsilon=1e-6,
                                               beta_initializer="ones")
    x = tf.constant(np.random.default_rng(0).normal(size=(2, 3, 8)),
                    tf.float32)
    np.testing.assert_allclose(ours(x).numpy(), stock(x).numpy(), atol=1e-6)


@pytest.mark.parametrize("policy", ["mixed_float16", "mixed_bfloat16"])
def test_mixed_precision_computes_in_float32(policy):
    x = tf.constant(np.random.default_rng(0).normal(
        100.0, 0.01, size=(5, 16)), tf.float32)
    previous = tf_keras.mixed_precision.global_policy()
    tf_keras.mixed_precision.set_global_policy(policy)
    try:
        ours = TokenLayerNormalization(epsilon=1e-6)
        stock = tf_keras.layers.LayerNormalization(epsilon=1e-6)
        y, want = ours(x), stock(x)
    finally:
        tf_keras.mixed_precision.set_global_policy(previous)
    assert y.dtype == want.dtype == ours.compute_dtype
    assert ours.gamma.dtype == tf.float32
    np.testing.assert_allclose(tf.cast(y, tf.float32).numpy(),
                               tf.cast(want, tf.float32).numpy(), atol=1e-2)


def test_exact_gelu_matches_tf_gelu_values_and_gradient():
    x = tf.constant(np.concatenate([
        np.linspace(-12.0, 12.0, 401), [0.0, -40.0, 40.0]]), tf.float32)
    dy = tf.constant(np.random.default_rng(0).normal(size=x.shape),
                     tf.float32)
    results = []
    for fn in (exact_gelu, lambda v: tf.nn.gelu(v, approximate=False)):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = fn(x)
        results.append((y, tape.gradient(y, x, output_gradients=dy)))
    (y, dx), (want_y, want_dx) = results
    np.testing.assert_allclose(y.numpy(), want_y.numpy(), rtol=1e-6,
                               atol=1e-6)
    np.testing.assert_allclose(dx.numpy(), want_dx.numpy(), rtol=1e-5,
                               atol=1e-6)


def test_fast_activation_swaps_only_exact_gelu():
    assert fast_activation(tf_keras.activations.get("gelu")) is exact_gelu
    relu = tf_keras.activations.get("relu")
    assert fast_activation(relu) is relu


def _op_types(layer, use_fused):
    fn = tf.function(lambda x: layer(x, use_fused=use_fused))
    graph = fn.get_concrete_function(
        tf.TensorSpec([None, 8], tf.float32)).graph
    return {op.type for op in graph.get_operations()}


def test_use_fused_picks_the_op_or_core_ops():
    if not ops.build_info()["cpu_ops"]:
        pytest.skip("op library not built")
    layer = TokenLayerNormalization(epsilon=1e-6)
    assert "TfrecFastLayerNorm" in _op_types(layer, None)
    # Serving graphs (SequenceEncoder.call_padded) pass use_fused=False.
    assert not any(t.startswith("TfrecFast")
                   for t in _op_types(layer, False))
    layer = TokenLayerNormalization(epsilon=1e-6, use_fused=False)
    assert not any(t.startswith("TfrecFast")
                   for t in _op_types(layer, None))
    restored = TokenLayerNormalization.from_config(layer.get_config())
    assert restored.use_fused is False and restored.epsilon == 1e-6


_ONE_WIDE_ROWS_SCRIPT = """
import numpy as np
import tensorflow as tf
import tfrec_fast
from tfrec_fast import ops
rng = np.random.default_rng(0)
# D = 1 (and D = 17: a vector body plus a tail, rows of one repeated value):
# x_hat = 0, so dx = rstd (g - mean(g)); for D = 1 that is exactly 0, with
# rstd = 1000 amplifying any rounding difference between g and its mean.
for dim in (1, 17):
    x = np.repeat(rng.integers(-2, 3, (93, 1)), dim, 1).astype(np.float32)
    x = tf.constant(x)
    dy = tf.constant(rng.uniform(-1.5, 1.5, (93, dim)).astype(np.float32))
    gamma = tf.constant(rng.normal(size=dim).astype(np.float32))
    grads = []
    for fused in (True, False):
        with tf.GradientTape() as tape:
            tape.watch(x)
            y = ops.layer_norm(x, gamma, tf.zeros([dim]), 1e-6,
                               use_fused=fused)
        grads.append(tape.gradient(y, x, output_gradients=dy).numpy())
    if dim == 1:
        assert not grads[0].any() and not grads[1].any(), grads[0].max()
    np.testing.assert_allclose(grads[0], grads[1], rtol=1e-5,
                               atol=1e-5 * np.abs(grads[1]).max())
print("ok")
"""


@pytest.mark.skipif(not ops.build_info()["cpu_ops"],
                    reason="op library not built")
def test_layer_norm_gradient_where_rows_are_constant_on_every_isa():
    # FMA contraction once made dy * gamma - mean(g) skip the rounding of g
    # on the AVX2 / AVX-512 paths: D = 1 rows got dx ~ 3e-5 instead of 0.
    exec(compile(_ONE_WIDE_ROWS_SCRIPT, "<one-wide rows>", "exec"), {})
    assert_passes_on_every_isa(_ONE_WIDE_ROWS_SCRIPT)
