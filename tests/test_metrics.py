"""Tests for tfrec_fast.metrics (blockwise full-catalog ranking)."""

import math
import os

os.environ.setdefault("TF_USE_LEGACY_KERAS", "1")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np
import pytest
import tensorflow as tf
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tfrec_fast.metrics import (
    evaluate_full_ranking,
    rank_of_targets,
    ranking_metrics,
    top_k_excluding,
)


# ---------------------------------------------------------------------------
# NumPy brute-force reference: full [U, C] score matrix.
# ---------------------------------------------------------------------------


def bf_scores(queries, items, bias=None):
    """float64 [U, C] scores (exact for the integer-valued test data)."""
    scores = np.asarray(queries, np.float64) @ np.asarray(items, np.float64).T
    if bias is not None:
        scores = scores + np.asarray(bias, np.float64)[None, :]
    return scores


def bf_excluded(num_users, num_items, splits=None, excl=None):
    """bool [U, C], True where (user, item) is excluded."""
    mask = np.zeros((num_users, num_items), bool)
    if splits is not None:
        for u in range(num_users):
            mask[u, excl[splits[u]:splits[u + 1]]] = True
    return mask


def bf_top_k(queries, items, k, splits=None, excl=None, bias=None):
    """(ids [U, k], scores [U, k]) by descending score, ties by lower id."""
    scores = bf_scores(queries, items, bias)
    scores[bf_excluded(*scores.shape, splits, excl)] = -np.inf
    ids = np.empty((scores.shape[0], k), np.int64)
    for u, row in enumerate(scores):
        order = np.lexsort((np.arange(row.size), -row))  # primary: -score
        ids[u] = order[:k]
    return ids, np.take_along_axis(scores, ids, axis=1)


def bf_ranks(queries, items, targets, splits=None, excl=None, bias=None):
    """Pessimistic 0-based ranks, int64 [U]."""
    scores = bf_scores(queries, items, bias)
    excluded = bf_excluded(*scores.shape, splits, excl)
    ranks = np.empty(scores.shape[0], np.int64)
    for u, t in enumerate(targets):
        others = ~excluded[u]
        others[t] = False
        ranks[u] = np.sum(scores[u][others] >= scores[u, t])
    return ranks


def bf_metrics(ranks, ks):
    out = {}
    for k in ks:
        hr = ndcg = mrr = 0.0
        for r in ranks:
            if r < k:
                hr += 1
                ndcg += 1 / math.log2(r + 2)
                mrr += 1 / (r + 1)
        n = len(ranks)
        out.update({f"HR@{k}": hr / n, f"NDCG@{k}": ndcg / n, f"MRR@{k}": mrr / n})
    return out


# ---------------------------------------------------------------------------
# Random problems.
# ---------------------------------------------------------------------------


def make_problem(seed, num_users=6, num_items=23, dim=4, max_excl=5, integer=True,
                 with_bias=False):
    """Random problem; integer-valued floats give exact scores and many ties."""
    rng = np.random.default_rng(seed)
    if integer:
        queries = rng.integers(-2, 3, (num_users, dim)).astype(np.float32)
        items = rng.integers(-2, 3, (num_items, dim)).astype(np.float32)
        bias = rng.integers(-2, 3, num_items).astype(np.float32) if with_bias else None
    else:
        queries = rng.normal(size=(num_users, dim)).astype(np.float32)
        items = rng.normal(size=(num_items, dim)).astype(np.float32)
        bias = rng.normal(size=num_items).astype(np.float32) if with_bias else None
    lengths = rng.integers(0, max_excl + 1, num_users)
    lists = [rng.choice(num_items, size=n, replace=False) for n in lengths]
    splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    excl = np.concatenate(lists + [np.zeros(0, np.int64)]).astype(np.int64)
    # Half of the targets come from the history (exclusion must not drop them).
    targets = rng.integers(0, num_items, num_users).astype(np.int64)
    for u, lst in enumerate(lists):
        if len(lst) and u % 2 == 0:
            targets[u] = lst[0]
    return dict(queries=queries, items=items, bias=bias, splits=splits, excl=excl,
                targets=targets, max_excl=int(lengths.max()))


BLOCK_SIZES = [1, 4, 7, 23, 64, 65536]  # 4 and 7 do not divide C = 23.


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("with_excl", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_top_k_matches_brute_force(block_size, with_excl, with_bias):
    p = make_problem(block_size * 7 + with_excl * 2 + with_bias, with_bias=with_bias)
    splits, excl = (p["splits"], p["excl"]) if with_excl else (None, None)
    c = p["items"].shape[0]
    for k in sorted({1, 3, 10, c - p["max_excl"]}):
        ids, scores = top_k_excluding(p["queries"], p["items"], k, splits, excl,
                                      item_bias=p["bias"], block_size=block_size)
        assert ids.dtype == tf.int64 and scores.dtype == tf.float32
        assert ids.shape == (6, k) and scores.shape == (6, k)
        want_ids, want_scores = bf_top_k(p["queries"], p["items"], k, splits, excl, p["bias"])
        np.testing.assert_array_equal(ids.numpy(), want_ids)
        np.testing.assert_array_equal(scores.numpy(), want_scores.astype(np.float32))
        if with_excl:
            assert np.all(np.isfinite(scores.numpy()))


@pytest.mark.parametrize("block_size", BLOCK_SIZES)
@pytest.mark.parametrize("with_excl", [False, True])
@pytest.mark.parametrize("with_bias", [False, True])
def test_rank_matches_brute_force(block_size, with_excl, with_bias):
    p = make_problem(100 + block_size * 7 + with_excl * 2 + with_bias, with_bias=with_bias)
    splits, excl = (p["splits"], p["excl"]) if with_excl else (None, None)
    ranks = rank_of_targets(p["queries"], p["items"], p["targets"], splits, excl,
                            item_bias=p["bias"], block_size=block_size)
    assert ranks.dtype == tf.int64 and ranks.shape == (6,)
    want = bf_ranks(p["queries"], p["items"], p["targets"], splits, excl, p["bias"])
    np.testing.assert_array_equal(ranks.numpy(), want)


@pytest.mark.parametrize("block_size", [5, 64, 1000])
def test_continuous_embeddings(block_size):
    p = make_problem(7, num_users=9, num_items=301, dim=8, max_excl=20, integer=False,
                     with_bias=True)
    ids, scores = top_k_excluding(p["queries"], p["items"], 17, p["splits"], p["excl"],
                                  item_bias=p["bias"], block_size=block_size)
    want_ids, want_scores = bf_top_k(p["queries"], p["items"], 17, p["splits"], p["excl"],
                                     p["bias"])
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_allclose(scores.numpy(), want_scores, rtol=1e-5, atol=1e-5)
    ranks = rank_of_targets(p["queries"], p["items"], p["targets"], p["splits"], p["excl"],
                            item_bias=p["bias"], block_size=block_size)
    np.testing.assert_array_equal(
        ranks.numpy(),
        bf_ranks(p["queries"], p["items"], p["targets"], p["splits"], p["excl"], p["bias"]))


def test_larger_catalog_many_blocks():
    p = make_problem(3, num_users=4, num_items=20011, dim=8, max_excl=50, integer=False)
    ids, _ = top_k_excluding(p["queries"], p["items"], 10, p["splits"], p["excl"],
                             block_size=4096)
    want_ids, _ = bf_top_k(p["queries"], p["items"], 10, p["splits"], p["excl"])
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    ranks = rank_of_targets(p["queries"], p["items"], p["targets"], p["splits"], p["excl"],
                            block_size=4096)
    np.testing.assert_array_equal(
        ranks.numpy(), bf_ranks(p["queries"], p["items"], p["targets"], p["splits"], p["excl"]))


# ---------------------------------------------------------------------------
# Ties, exclusion corner cases.
# ---------------------------------------------------------------------------


def test_all_zero_embeddings_give_worst_rank_and_lowest_ids():
    c, d = 30, 4
    queries = np.zeros((3, d), np.float32)
    items = np.zeros((c, d), np.float32)
    splits = np.array([0, 0, 3, 6], np.int64)
    excl = np.array([0, 1, 5, 2, 2, 29], np.int64)  # duplicates allowed
    targets = np.array([7, 1, 29], np.int64)  # user 1 and 2: target in history
    ranks = rank_of_targets(queries, items, targets, splits, excl, block_size=8).numpy()
    # Worst rank = number of non-excluded items other than the target.
    np.testing.assert_array_equal(ranks, [c - 1, c - 1 - 2, c - 1 - 1])
    metrics = ranking_metrics(ranks, ks=(10,))
    assert metrics == {"HR@10": 0.0, "NDCG@10": 0.0, "MRR@10": 0.0}
    ids, scores = top_k_excluding(queries, items, 4, splits, excl, block_size=3)
    np.testing.assert_array_equal(ids.numpy(), [[0, 1, 2, 3], [2, 3, 4, 6], [0, 1, 3, 4]])
    np.testing.assert_array_equal(scores.numpy(), np.zeros((3, 4)))


def test_ties_pessimistic_with_duplicate_rows():
    items = np.array([[1.0], [2.0], [2.0], [2.0], [0.0]], np.float32)
    queries = np.array([[1.0], [1.0]], np.float32)
    ranks = rank_of_targets(queries, items, [2, 4], block_size=2).numpy()
    # Target 2 ties with items 1 and 3 -> both counted ahead.
    np.testing.assert_array_equal(ranks, [2, 4])
    ids, _ = top_k_excluding(queries, items, 3, block_size=2)
    np.testing.assert_array_equal(ids.numpy(), [[1, 2, 3], [1, 2, 3]])


def test_fewer_candidates_than_k_fills_with_excluded_minus_inf():
    items = np.eye(4, dtype=np.float32)
    queries = np.ones((1, 4), np.float32)
    ids, scores = top_k_excluding(queries, items, 4, [0, 2], [3, 1], block_size=2)
    np.testing.assert_array_equal(ids.numpy(), [[0, 2, 1, 3]])
    np.testing.assert_array_equal(scores.numpy(), [[1.0, 1.0, -np.inf, -np.inf]])


def test_empty_exclusions_and_zero_users():
    p = make_problem(11)
    u = p["queries"].shape[0]
    ids, _ = top_k_excluding(p["queries"], p["items"], 5, np.zeros(u + 1, np.int64),
                             np.zeros(0, np.int64), block_size=4)
    np.testing.assert_array_equal(ids.numpy(), bf_top_k(p["queries"], p["items"], 5)[0])
    ids, scores = top_k_excluding(np.zeros((0, 4), np.float32), p["items"], 5,
                                  np.zeros(1, np.int64), np.zeros(0, np.int64))
    assert ids.shape == (0, 5) and scores.shape == (0, 5)
    ranks = rank_of_targets(np.zeros((0, 4), np.float32), p["items"], np.zeros(0, np.int64))
    assert ranks.shape == (0,)


def test_int32_inputs_and_float16_items():
    p = make_problem(12)
    ids, _ = top_k_excluding(p["queries"], p["items"].astype(np.float16), 5,
                             p["splits"].astype(np.int32), p["excl"].astype(np.int32),
                             block_size=4)
    want, _ = bf_top_k(p["queries"], p["items"], 5, p["splits"], p["excl"])
    np.testing.assert_array_equal(ids.numpy(), want)
    ranks = rank_of_targets(p["queries"], tf.Variable(p["items"]),
                            p["targets"].astype(np.int32), block_size=4)
    np.testing.assert_array_equal(ranks.numpy(), bf_ranks(p["queries"], p["items"], p["targets"]))


# ---------------------------------------------------------------------------
# tf.function.
# ---------------------------------------------------------------------------


def test_inside_tf_function_with_dynamic_shapes():
    p = make_problem(21, with_bias=True)
    spec = [
        tf.TensorSpec([None, None], tf.float32),
        tf.TensorSpec([None, None], tf.float32),
        tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([None], tf.int64),
        tf.TensorSpec([None], tf.float32),
        tf.TensorSpec([None], tf.int64),
    ]

    @tf.function(input_signature=spec)
    def fn(queries, items, splits, excl, bias, targets):
        ids, scores = top_k_excluding(queries, items, 6, splits, excl, bias, block_size=5)
        ranks = rank_of_targets(queries, items, targets, splits, excl, bias, block_size=5)
        return ids, scores, ranks

    args = (p["queries"], p["items"], p["splits"], p["excl"], p["bias"], p["targets"])
    ids, scores, ranks = fn(*args)
    want_ids, want_scores = bf_top_k(p["queries"], p["items"], 6, p["splits"], p["excl"],
                                     p["bias"])
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_array_equal(scores.numpy(), want_scores)
    np.testing.assert_array_equal(
        ranks.numpy(),
        bf_ranks(p["queries"], p["items"], p["targets"], p["splits"], p["excl"], p["bias"]))

    bad_excl = p["excl"].copy()
    bad_excl[0] = 23
    with pytest.raises(tf.errors.InvalidArgumentError, match="exclude_items"):
        fn(p["queries"], p["items"], p["splits"], bad_excl, p["bias"], p["targets"])
    with pytest.raises(tf.errors.InvalidArgumentError, match="targets"):
        fn(*args[:5], np.full_like(p["targets"], -1))


def test_inside_tf_function_static_shapes():
    p = make_problem(22)

    @tf.function
    def fn(queries, items):
        return top_k_excluding(queries, items, 4, block_size=6)

    ids, _ = fn(tf.constant(p["queries"]), tf.constant(p["items"]))
    np.testing.assert_array_equal(ids.numpy(), bf_top_k(p["queries"], p["items"], 4)[0])


# ---------------------------------------------------------------------------
# Hypothesis property test.
# ---------------------------------------------------------------------------


@st.composite
def problems(draw):
    num_users = draw(st.integers(1, 4))
    num_items = draw(st.integers(1, 30))
    dim = draw(st.integers(1, 3))
    seed = draw(st.integers(0, 2**31 - 1))
    rng = np.random.default_rng(seed)
    queries = rng.integers(-2, 3, (num_users, dim)).astype(np.float32)
    items = rng.integers(-2, 3, (num_items, dim)).astype(np.float32)
    bias = rng.integers(-1, 2, num_items).astype(np.float32) if draw(st.booleans()) else None
    max_excl = draw(st.integers(0, num_items - 1))
    lengths = rng.integers(0, max_excl + 1, num_users)
    excl = np.concatenate(
        [rng.integers(0, num_items, n) for n in lengths] + [np.zeros(0, np.int64)]
    ).astype(np.int64)  # with duplicates
    splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    k = draw(st.integers(1, num_items - max_excl))
    block_size = draw(st.integers(1, num_items + 3))
    targets = rng.integers(0, num_items, num_users).astype(np.int64)
    return queries, items, bias, splits, excl, k, block_size, targets


@settings(max_examples=40, deadline=None, derandomize=True,
          suppress_health_check=[HealthCheck.too_slow])
@given(problems())
def test_property_matches_brute_force(problem):
    queries, items, bias, splits, excl, k, block_size, targets = problem
    ids, scores = top_k_excluding(queries, items, k, splits, excl, bias, block_size)
    want_ids, want_scores = bf_top_k(queries, items, k, splits, excl, bias)
    np.testing.assert_array_equal(ids.numpy(), want_ids)
    np.testing.assert_array_equal(scores.numpy(), want_scores)
    ranks = rank_of_targets(queries, items, targets, splits, excl, bias, block_size)
    np.testing.assert_array_equal(ranks.numpy(),
                                  bf_ranks(queries, items, targets, splits, excl, bias))


# ---------------------------------------------------------------------------
# ranking_metrics.
# ---------------------------------------------------------------------------


def test_metric_formulas_hand_computed():
    ranks = [0, 1, 4, 10, 20]
    m = ranking_metrics(np.array(ranks), ks=(1, 5, 10))
    assert list(m) == ["HR@1", "NDCG@1", "MRR@1", "HR@5", "NDCG@5", "MRR@5",
                       "HR@10", "NDCG@10", "MRR@10"]
    assert m["HR@1"] == pytest.approx(1 / 5)
    assert m["NDCG@1"] == pytest.approx(1 / 5)
    assert m["MRR@1"] == pytest.approx(1 / 5)
    assert m["HR@5"] == pytest.approx(3 / 5)
    assert m["NDCG@5"] == pytest.approx((1 + 1 / math.log2(3) + 1 / math.log2(6)) / 5)
    assert m["MRR@5"] == pytest.approx((1 + 1 / 2 + 1 / 5) / 5)
    assert m["HR@10"] == pytest.approx(3 / 5)  # rank 10 is not < 10
    assert m == pytest.approx(bf_metrics(ranks, (1, 5, 10)))
    assert ranking_metrics(tf.constant([3], tf.int64), ks=4) == pytest.approx(
        {"HR@4": 1.0, "NDCG@4": 1 / math.log2(5), "MRR@4": 0.25})


@pytest.mark.parametrize("kwargs, match", [
    (dict(ranks=[]), "ranks"),
    (dict(ranks=[[0]]), "ranks"),
    (dict(ranks=[-1]), "ranks"),
    (dict(ranks=[0.5]), "ranks"),
    (dict(ranks=[0], ks=(0,)), "ks"),
    (dict(ranks=[0], ks=()), "ks"),
    (dict(ranks=[5], num_items=5), "ranks"),
    (dict(ranks=[0], num_items=0), "num_items"),
])
def test_ranking_metrics_bad_inputs(kwargs, match):
    with pytest.raises(ValueError, match=match):
        ranking_metrics(**kwargs)


# ---------------------------------------------------------------------------
# Bad inputs.
# ---------------------------------------------------------------------------


def _good():
    p = make_problem(31)
    return dict(queries=p["queries"], item_embeddings=p["items"], exclude_splits=p["splits"],
                exclude_items=p["excl"], item_bias=np.zeros(23, np.float32))


@pytest.mark.parametrize("change, match", [
    (dict(queries=np.zeros((6,), np.float32)), "queries"),
    (dict(queries=np.zeros((6, 4), np.int32)), "queries"),
    (dict(item_embeddings=np.zeros((23, 4, 1), np.float32)), "item_embeddings"),
    (dict(item_embeddings=np.zeros((23, 5), np.float32)), "item_embeddings"),
    (dict(k=0), "`k`"),
    (dict(k=24), "`k`"),
    (dict(k=2.0), "`k`"),
    (dict(block_size=0), "block_size"),
    (dict(exclude_splits=None), "exclude_splits"),
    (dict(exclude_splits=np.array([0, 1, 2], np.int64)), "exclude_splits"),
    (dict(exclude_splits=np.array([1, 1, 1, 1, 1, 1, 1], np.int64)), "exclude_splits"),
    (dict(exclude_items=np.full(1000, 3, np.int64)), "exclude_splits"),
    (dict(exclude_items=None), "exclude_items"),
    (dict(exclude_items=np.array([0.0])), "exclude_items"),
    (dict(item_bias=np.zeros(22, np.float32)), "item_bias"),
    (dict(item_bias=np.zeros((23, 1), np.float32)), "item_bias"),
])
def test_top_k_bad_inputs(change, match):
    args = dict(_good(), k=3, block_size=4)
    args.update(change)
    with pytest.raises(ValueError, match=match):
        top_k_excluding(**args)


@pytest.mark.parametrize("bad_id", [-1, 23])
def test_out_of_range_ids(bad_id):
    args = _good()
    excl = args["exclude_items"].copy()
    excl[-1] = bad_id
    with pytest.raises(ValueError, match="exclude_items"):
        top_k_excluding(**dict(args, exclude_items=excl), k=3)
    with pytest.raises(ValueError, match="exclude_items"):
        rank_of_targets(**dict(args, exclude_items=excl), targets=np.zeros(6, np.int64))
    targets = np.zeros(6, np.int64)
    targets[2] = bad_id
    with pytest.raises(ValueError, match="targets"):
        rank_of_targets(**args, targets=targets)


def test_rank_bad_targets_shape():
    args = _good()
    with pytest.raises(ValueError, match="targets"):
        rank_of_targets(**args, targets=np.zeros(5, np.int64))
    with pytest.raises(ValueError, match="targets"):
        rank_of_targets(**args, targets=np.zeros((6, 1), np.int64))
    with pytest.raises(ValueError, match="targets"):
        rank_of_targets(**args, targets=np.zeros(6, np.float32))
    with pytest.raises(ValueError, match="block_size"):
        rank_of_targets(**args, targets=np.zeros(6, np.int64), block_size=-3)


# ---------------------------------------------------------------------------
# evaluate_full_ranking.
# ---------------------------------------------------------------------------


def _eval_setup(seed=41, num_users=7, num_items=40, dim=4):
    rng = np.random.default_rng(seed)
    items = rng.integers(-2, 3, (num_items, dim)).astype(np.float32)
    bias = rng.integers(-1, 2, num_items).astype(np.float32)
    lengths = rng.integers(1, 6, num_users)
    history = rng.integers(0, num_items, lengths.sum()).astype(np.int64)
    splits = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int64)
    targets = rng.integers(0, num_items, num_users).astype(np.int64)
    targets[0] = history[0]  # a target inside the history is still ranked
    extra_lengths = rng.integers(0, 4, num_users)
    extra = rng.integers(0, num_items, extra_lengths.sum()).astype(np.int64)
    extra_splits = np.concatenate([[0], np.cumsum(extra_lengths)]).astype(np.int64)
    return items, bias, history, splits, targets, extra, extra_splits


def _query_fn(items):
    table = tf.constant(items)

    def query_fn(item_ids):
        # Sum of history embeddings: [B, (L)] -> [B, D].
        return tf.reduce_sum(tf.gather(table, item_ids), axis=1)

    return query_fn


def _np_queries(items, history, splits):
    return np.stack([items[history[a:b]].sum(0) for a, b in zip(splits[:-1], splits[1:])])


@pytest.mark.parametrize("use_bias", [False, True])
def test_evaluate_full_ranking_matches_brute_force(use_bias):
    items, bias, history, splits, targets, _, _ = _eval_setup()
    bias = bias if use_bias else None
    ds = tf.data.Dataset.from_tensor_slices({
        "item_ids": tf.RaggedTensor.from_row_splits(history, splits),
        "targets": targets,
    }).batch(3)
    metrics = evaluate_full_ranking(_query_fn(items), items, ds, ks=(1, 5, 10), item_bias=bias,
                                    block_size=16)
    queries = _np_queries(items, history, splits)
    ranks = bf_ranks(queries, items, targets, splits, history, bias)
    want = bf_metrics(ranks, (1, 5, 10))
    assert metrics.pop("num_users") == 7
    assert metrics == pytest.approx(want)


def test_evaluate_full_ranking_exclude_key_and_from_row_splits_batches():
    items, _, history, splits, targets, extra, extra_splits = _eval_setup(seed=42)
    # Build the batches directly with from_row_splits (two batches: 4 + 3 users).
    def batch(lo, hi, ids, ids_splits):
        s = ids_splits[lo:hi + 1]
        return tf.RaggedTensor.from_row_splits(ids[s[0]:s[-1]], s - s[0])

    elements = [
        {"item_ids": batch(lo, hi, history, splits),
         "exclude_ids": batch(lo, hi, extra, extra_splits),
         "targets": tf.constant(targets[lo:hi])}
        for lo, hi in [(0, 4), (4, 7)]
    ]
    ds = tf.data.Dataset.from_generator(
        lambda: iter(elements),
        output_signature={
            "item_ids": tf.RaggedTensorSpec([None, None], tf.int64, 1, tf.int64),
            "exclude_ids": tf.RaggedTensorSpec([None, None], tf.int64, 1, tf.int64),
            "targets": tf.TensorSpec([None], tf.int64),
        })
    metrics = evaluate_full_ranking(_query_fn(items), items, ds, ks=(3, 10), block_size=7,
                                    exclude_key="exclude_ids")
    queries = _np_queries(items, history, splits)
    ranks = bf_ranks(queries, items, targets, extra_splits, extra)
    assert metrics.pop("num_users") == 7
    assert metrics == pytest.approx(bf_metrics(ranks, (3, 10)))
    # Default: history is the exclusion list.
    default = evaluate_full_ranking(_query_fn(items), items, ds, ks=(3, 10), block_size=7)
    ranks = bf_ranks(queries, items, targets, splits, history)
    assert default.pop("num_users") == 7
    assert default == pytest.approx(bf_metrics(ranks, (3, 10)))


def test_evaluate_full_ranking_bad_inputs():
    items, _, history, splits, targets, _, _ = _eval_setup()
    ds = tf.data.Dataset.from_tensor_slices({
        "item_ids": tf.RaggedTensor.from_row_splits(history, splits),
        "targets": targets,
    }).batch(4)
    with pytest.raises(ValueError, match="exclude_key"):
        evaluate_full_ranking(_query_fn(items), items, ds, exclude_key="missing")
    with pytest.raises(ValueError, match="dataset"):
        evaluate_full_ranking(_query_fn(items), items, ds.take(0))
    with pytest.raises(ValueError, match="item_embeddings"):
        evaluate_full_ranking(_query_fn(items), items[:, :2], ds)
    with pytest.raises(ValueError, match="ks"):
        evaluate_full_ranking(_query_fn(items), items, ds, ks=(0,))
    dense = tf.data.Dataset.from_tensor_slices(
        {"item_ids": np.zeros((4, 2), np.int64), "targets": np.zeros(4, np.int64)}).batch(2)
    with pytest.raises(ValueError, match="dataset"):
        evaluate_full_ranking(lambda x: tf.zeros([2, 4]), items, dense)
