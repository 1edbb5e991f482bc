"""HistoryTwoTower: prefix queries equal served queries; fit; export."""

import numpy as np

import tfrec_fast  # noqa: F401  (selects tf_keras before TF loads)
import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras

from tfrec_fast import export
from tfrec_fast.models import HistoryTwoTower


def _model(num_items=20, max_len=50):
    tf_keras.utils.set_random_seed(0)
    return HistoryTwoTower(num_items, tfrs.tasks.Retrieval(), dim=8,
                           max_len=max_len)


def test_prefix_queries_equal_whole_history_queries():
    model = _model()
    ids = tf.ragged.constant([[1, 2, 3], [4], [5, 6, 7, 8, 9]], tf.int64)
    prefixes = model.prefix_queries(ids)  # [9, 8]
    assert prefixes.shape == (9, 8)
    for cut in (1, 2, 3, 5):
        head = ids[:, :cut]
        want = tf.gather(prefixes, ids.row_starts() + head.row_lengths() - 1)
        np.testing.assert_allclose(model.query_embeddings(head).numpy(),
                                   want.numpy(), atol=1e-6)


def test_max_len_keeps_the_latest_items():
    model = _model(max_len=2)
    long = tf.ragged.constant([[1, 2, 3, 4]], tf.int64)
    np.testing.assert_allclose(
        model.query_embeddings(long).numpy(),
        model.query_embeddings(long[:, -2:]).numpy(), atol=1e-6)


def test_fit_lowers_loss_and_exports(tmp_path):
    # Each user walks items in steps of 3: the next item is predictable.
    rng = np.random.default_rng(0)
    rows = []
    for _ in range(64):
        start, length = rng.integers(20), rng.integers(3, 9)
        rows.append([(start + 3 * s) % 20 for s in range(length)])
    ids = tf.ragged.constant([r[:-1] for r in rows], tf.int64)
    targets = tf.ragged.constant([r[1:] for r in rows], tf.int64)
    dataset = tf.data.Dataset.from_tensor_slices(
        {"item_ids": ids, "targets": targets}).batch(16)
    model = _model()
    model.compile(optimizer=tf_keras.optimizers.Adam(0.05))
    history = model.fit(dataset, epochs=15, verbose=0).history["loss"]
    assert history[-1] < 0.5 * history[0]
    path = export.export_for_serving(model, str(tmp_path / "sm"), k=3)
    report = export.verify_servable(path, [[0, 3, 6], [9, 0, 0]], [3, 1])
    assert report["unregistered_ops"] == []
    assert report["top_ids"][0][0] == 9  # after 0, 3, 6 comes 9
    assert report["top_ids"][1][0] == 12
