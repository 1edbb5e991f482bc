"""SASRec, ragged (default) and padded encoders: training lowers the loss,
both encoders compute the same function, export round trip."""

import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

import tfrec_fast  # noqa: F401
from tfrec_fast import data
from tfrec_fast import export
from tfrec_fast import layers
from tfrec_fast import metrics
from tfrec_fast.models import SASRec
from tfrec_fast.models import last_window


def _model(split, **kwargs):
    tf_keras.utils.set_random_seed(0)
    model = SASRec(split.num_items, max_len=12, dim=16, num_blocks=1,
                   num_heads=2, dropout=0.0, **kwargs)
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2))
    return model


ENCODERS = ["ragged", "padded"]


@pytest.mark.parametrize("encoder", ENCODERS)
def test_fit_lowers_loss_and_learns_the_cycle(toy_split, encoder):
    model = _model(toy_split, encoder=encoder)
    train = data.next_item_dataset(toy_split.train, batch_size=32, max_len=12)
    history = model.fit(train, epochs=15, verbose=0)
    losses = history.history["loss"]
    assert losses[-1] < 0.5 * losses[0]
    test = data.eval_dataset(toy_split.test, batch_size=64, max_len=12)
    result = metrics.evaluate_full_ranking(model.query_embeddings,
                                           model.item_table, test)
    assert result["HR@10"] > 0.8  # chance is about 10 / 25


def test_out_of_range_ids_fail_with_argument_name(toy_split):
    model = _model(toy_split)
    bad = {"item_ids": tf.ragged.constant([[0, 99]], tf.int64),
           "targets": tf.ragged.constant([[1, 2]], tf.int64)}
    with pytest.raises(tf.errors.InvalidArgumentError, match="item_ids"):
        model.compute_loss(bad)
    bad = {"item_ids": tf.ragged.constant([[0, 1]], tf.int64),
           "targets": tf.ragged.constant([[1, -2]], tf.int64)}
    with pytest.raises(tf.errors.InvalidArgumentError, match="targets"):
        model.compute_loss(bad)


@pytest.mark.parametrize("encoder", ENCODERS)
def test_padded_and_ragged_paths_agree(toy_split, encoder):
    model = _model(toy_split, encoder=encoder)
    ragged = tf.ragged.constant([[1, 4, 7], [2], [5, 8, 11, 14]], tf.int64)
    dense = ragged.to_tensor()
    np.testing.assert_allclose(
        model.query_embeddings(ragged).numpy(),
        model.serving_query(dense, ragged.row_lengths()).numpy(),
        rtol=1e-5, atol=1e-5)


def test_default_encoder_is_ragged(toy_split):
    model = _model(toy_split)
    assert isinstance(model.encoder, layers.SequenceEncoder)
    assert model.uses_ragged_encoder
    padded = _model(toy_split, encoder="padded")
    assert isinstance(padded.encoder, layers.PaddedSequenceEncoder)
    assert not padded.uses_ragged_encoder
    with pytest.raises(ValueError, match="encoder"):
        _model(toy_split, encoder="flash")


def test_encoder_layer_argument(toy_split):
    # A layer instance is used as given (here a bidirectional encoder).
    encoder = layers.SequenceEncoder(12, 16, num_blocks=1, num_heads=2,
                                     dropout=0.0, causal=False)
    model = _model(toy_split, encoder=encoder)
    assert model.encoder is encoder
    ragged = tf.ragged.constant([[1, 4, 7], [2, 5]], tf.int64)
    assert model(ragged).shape.as_list() == [2, None, 16]
    np.testing.assert_allclose(
        model.query_embeddings(ragged).numpy(),
        model.serving_query(ragged.to_tensor(), ragged.row_lengths()).numpy(),
        rtol=1e-5, atol=1e-5)


def test_ragged_and_padded_sasrec_equal_with_same_weights(toy_split):
    ragged_model = _model(toy_split, encoder="ragged")
    padded_model = _model(toy_split, encoder="padded")
    batch = next(iter(data.next_item_dataset(toy_split.train, batch_size=16,
                                             max_len=12)))
    ragged_model.compute_loss(batch)
    padded_model.compute_loss(batch)
    padded_model.set_weights(ragged_model.get_weights())
    losses, grads = [], []
    for model in (ragged_model, padded_model):
        with tf.GradientTape() as tape:
            loss = model.compute_loss(batch)
        losses.append(loss.numpy())
        grads.append([tf.convert_to_tensor(g).numpy() for g in
                      tape.gradient(loss, model.trainable_variables)])
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-5)
    for a, b in zip(*grads):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5)
    histories = tf.ragged.constant([[1, 4, 7], [], [5, 8, 11, 14]], tf.int64)
    np.testing.assert_allclose(
        ragged_model.query_embeddings(histories).numpy(),
        padded_model.query_embeddings(histories).numpy(), rtol=1e-5,
        atol=1e-5)


def test_last_window_keeps_most_recent_items():
    ids = tf.constant([[1, 2, 3, 4, 5], [6, 7, 0, 0, 0]], tf.int64)
    window, lengths = last_window(ids, tf.constant([5, 2], tf.int64), 3)
    np.testing.assert_array_equal(window.numpy(), [[3, 4, 5], [6, 7, 0]])
    np.testing.assert_array_equal(lengths.numpy(), [3, 2])


@pytest.mark.parametrize("encoder", ENCODERS)
def test_export_round_trip_in_fresh_process(toy_split, tmp_path, encoder):
    model = _model(toy_split, encoder=encoder)
    model.fit(data.next_item_dataset(toy_split.train, batch_size=32,
                                     max_len=12), epochs=2, verbose=0)
    path = export.export_for_serving(model, str(tmp_path / "sm"), k=5)
    histories = [[1, 4, 7, 10], [2, 5, 0, 0]]
    lengths = [4, 2]
    report = export.verify_servable(path, histories, lengths)
    assert report["unregistered_ops"] == []
    ragged = tf.RaggedTensor.from_tensor(tf.constant(histories, tf.int64),
                                         lengths=tf.constant(lengths,
                                                             tf.int64))
    expected_ids, expected_scores = metrics.top_k_excluding(
        model.query_embeddings(ragged), model.item_table, 5,
        exclude_splits=ragged.row_splits, exclude_items=ragged.flat_values)
    assert report["top_ids"] == expected_ids.numpy().tolist()
    np.testing.assert_allclose(report["top_scores"], expected_scores.numpy(),
                               rtol=1e-5)
    for row, length in zip(histories, lengths):
        assert not set(row[:length]) & set(report["top_ids"][0 if length == 4
                                                             else 1])


def test_verify_servable_names_unregistered_ops(toy_split, tmp_path):
    # A SavedModel that calls the fused op (which stock TF lacks) must fail.
    from tfrec_fast.ops import _library  # pylint: disable=import-outside-toplevel
    module_lib = _library.DEFAULT_LIBRARY.module()
    if module_lib is None:
        pytest.skip("op library not built")

    class Uses(tf.Module):

        @tf.function(input_signature=[
            tf.TensorSpec([None, None], tf.int64, name="history_ids"),
            tf.TensorSpec([None], tf.int64, name="history_lengths")])
        def serve(self, history_ids, history_lengths):
            ids = module_lib.tfrec_fast_validate_ids(
                history_ids, tf.constant(10, tf.int64))
            return {"top_ids": ids, "top_scores": tf.cast(ids, tf.float32)}

    uses = Uses()
    path = str(tmp_path / "bad")
    tf.saved_model.save(uses, path, signatures={"serving_default": uses.serve})
    with pytest.raises(ValueError, match="TfrecFastValidateIds"):
        export.verify_servable(path)


def test_export_rejects_models_without_serving_protocol(tmp_path):
    with pytest.raises(ValueError, match="serving_query"):
        export.export_for_serving(tf_keras.Sequential(), str(tmp_path / "x"))


def test_export_runs_in_tensorflows_saved_model_cli(toy_split, tmp_path):
    # TensorFlow's own tool, as a TF Serving user would check a model.
    cli = os.path.join(os.path.dirname(sys.executable), "saved_model_cli")
    if not os.path.exists(cli):
        pytest.skip("saved_model_cli is not installed next to this Python")
    model = _model(toy_split)
    path = export.export_for_serving(model, str(tmp_path / "sm"), k=3)
    proc = subprocess.run(
        [cli, "run", "--dir", path, "--tag_set", "serve",
         "--signature_def", "serving_default", "--input_exprs",
         "history_ids=[[1, 4, 7], [2, 0, 0]];history_lengths=[3, 1]"],
        capture_output=True, text=True, check=False, timeout=300,
        env=dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3"))
    assert proc.returncode == 0, proc.stderr[-2000:]
    served = proc.stdout[proc.stdout.index("Result for output key top_ids"):]
    served = served.split(":", 1)[1].split("Result for", 1)[0]
    served_ids = [int(v) for v in re.findall(r"-?\d+", served)]
    ragged = tf.ragged.constant([[1, 4, 7], [2]], tf.int64)
    expected, _ = metrics.top_k_excluding(
        model.query_embeddings(ragged), model.item_table, 3,
        exclude_splits=ragged.row_splits, exclude_items=ragged.flat_values)
    assert served_ids == expected.numpy().reshape(-1).tolist()
