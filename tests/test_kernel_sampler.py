"""KernelSampler: exact kernel draws from a tree, its updates, state, errors.

Every check runs on both paths: the compiled CPU ops ("fused") and the
pure-TF references ("reference", a categorical over brute-force
probabilities and a level-by-level TF tree build / update). The oracle is
`kernel_log_probabilities`: q by brute force over the catalog in float64.

Goodness of fit: Pearson's statistic of the draw counts against N q, summed
over query rows, compared with the Wilson-Hilferty chi-square quantile at
z = 5 as in tests/test_samplers.py (a correct sampler fails by chance with
probability < 1e-6; the seeds are fixed, so each test is deterministic).
Probabilities off by +-10% land far above it (asserted).
"""

import math
import os
import subprocess
import sys

import numpy as np
import pytest
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st

import tfrec_fast  # noqa: F401  (selects tf_keras before TF loads)
import tensorflow as tf
import tf_keras

from tfrec_fast import data
from tfrec_fast.ops import _library
from tfrec_fast.losses import CCEMinus
from tfrec_fast.losses import SampledSoftmax
from tfrec_fast.models import SASRec
from tfrec_fast.ops import kernel_sampler as kernel_ops
from tfrec_fast.samplers import KernelSampler
from tfrec_fast.tasks import NextItemTask
from tfrec_fast.tasks import SampledRetrieval

_MODULE = _library.DEFAULT_LIBRARY.module()
FUSED = _MODULE is not None and hasattr(_MODULE,
                                        "tfrec_fast_kernel_sampler_draw")
PATHS = [pytest.param(True, id="fused", marks=pytest.mark.skipif(
    not FUSED, reason="op library without the kernel sampler ops")),
         pytest.param(False, id="reference")]


def chi2_critical(dof, z=5.0):
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def pearson(ids, probabilities):
    """Pearson statistic of per-row draw counts vs N q, summed over rows."""
    total = 0.0
    for row, p in zip(ids, probabilities):
        observed = np.bincount(row, minlength=len(p))
        expected = len(row) * p
        total += float(np.sum((observed - expected) ** 2 / expected))
    return total


def random_table(rng, num_items, dim, scale=0.5):
    return (scale * rng.normal(size=(num_items, dim))).astype(np.float32)


def brute_log_q(query, table, alpha):
    return kernel_ops.kernel_log_probabilities(query, table, alpha).numpy()


def assert_tree_is_fresh_build(sampler, table):
    """Tree == build of `table` (float32 rounding of running leaf sums)."""
    want = kernel_ops.build_tree_reference(tf.constant(table),
                                           sampler.leaf_size).numpy()
    got = sampler.tree.numpy()
    scale = max(1.0, float(np.abs(want).max()))
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-6 * scale)
    np.testing.assert_array_equal(sampler.snapshot.numpy(), table)


# ---------------------------------------------------------------------------
# Layout and build.

@pytest.mark.parametrize("num_items,leaf_size", [(1, 1), (5, 8), (37, 4),
                                                 (64, 8), (100, 1)])
def test_counts_cover_every_item_once(num_items, leaf_size):
    layout = kernel_ops.tree_layout(num_items, 3, leaf_size)
    counts = kernel_ops.tree_counts(layout)
    assert counts[1] == num_items
    assert counts[layout.num_leaves:].sum() == num_items
    for node in range(1, layout.num_leaves):
        assert counts[node] == counts[2 * node] + counts[2 * node + 1]


@pytest.mark.parametrize("fused", PATHS)
@pytest.mark.parametrize("num_items,dim,leaf_size",
                         [(1, 4, 1), (7, 3, 16), (37, 5, 4), (200, 17, 8)])
def test_build_matches_reference_and_brute_sums(fused, num_items, dim,
                                                leaf_size):
    rng = np.random.default_rng(num_items)
    table = random_table(rng, num_items, dim)
    sampler = KernelSampler(num_items, dim, leaf_size=leaf_size,
                            item_table=table, use_fused=fused)
    assert_tree_is_fresh_build(sampler, table)
    root = kernel_ops.unpack_symmetric(sampler.tree.numpy()[1], dim).numpy()
    table64 = table.astype(np.float64)
    np.testing.assert_allclose(root, table64.T @ table64, rtol=1e-5,
                               atol=1e-5)
    np.testing.assert_array_equal(sampler.tree.numpy()[0], 0.0)


# ---------------------------------------------------------------------------
# Exactness.

@pytest.mark.parametrize("fused", PATHS)
def test_log_q_and_log_prob_equal_brute_force(fused):
    rng = np.random.default_rng(1)
    num_items, dim, alpha = 300, 16, 50.0
    table = random_table(rng, num_items, dim)
    query = rng.normal(size=(6, dim)).astype(np.float32)
    sampler = KernelSampler(num_items, dim, alpha=alpha, leaf_size=7,
                            item_table=table, seed=3, use_fused=fused)
    ids, log_q = sampler.sample(query, 64, shared=False, item_table=table)
    assert ids.shape == (6, 64) and ids.dtype == tf.int64
    assert log_q.dtype == tf.float32
    want = brute_log_q(query, table, alpha)
    np.testing.assert_allclose(log_q.numpy(),
                               np.take_along_axis(want, ids.numpy(), 1),
                               rtol=1e-5)
    # log_prob of any ids: per row [T, K] and shared [K], e.g. positives.
    any_ids = rng.integers(0, num_items, size=(6, 9))
    np.testing.assert_allclose(sampler.log_prob(query, any_ids).numpy(),
                               np.take_along_axis(want, any_ids, 1),
                               rtol=1e-5)
    shared = np.array([0, 5, num_items - 1])
    np.testing.assert_allclose(sampler.log_prob(query, shared).numpy(),
                               want[:, shared], rtol=1e-5)
    np.testing.assert_allclose(sampler.probabilities(query).numpy(),
                               np.exp(want), rtol=1e-9)


@pytest.mark.parametrize("fused", PATHS)
def test_draw_frequencies_match_kernel_probabilities(fused):
    rng = np.random.default_rng(2)
    num_items, dim, alpha, draws = 40, 6, 30.0, 40000
    table = random_table(rng, num_items, dim)
    query = rng.normal(size=(3, dim)).astype(np.float32)
    # leaf_size 3: 14 leaves, a heap whose leaves sit at two depths.
    sampler = KernelSampler(num_items, dim, alpha=alpha, leaf_size=3,
                            item_table=table, seed=11, use_fused=fused)
    ids = sampler.sample(query, draws, shared=False,
                         item_table=table)[0].numpy()
    probabilities = np.exp(brute_log_q(query, table, alpha))
    assert probabilities.min() * draws > 5  # the chi-square regime
    dof = 3 * (num_items - 1)
    assert pearson(ids, probabilities) < chi2_critical(dof)
    # The test has power: probabilities off by +-10% fail it.
    wrong = probabilities * np.where(np.arange(num_items) % 2, 1.1, 0.9)
    wrong /= wrong.sum(axis=1, keepdims=True)
    assert pearson(ids, wrong) > 2 * chi2_critical(dof)


def test_peaked_proposal_over_a_deep_tree():
    """A large alpha and 2000 items (9 levels): the descent stays exact."""
    rng = np.random.default_rng(3)
    num_items, dim, alpha, draws = 2000, 8, 1000.0, 30000
    table = random_table(rng, num_items, dim)
    query = rng.normal(size=(2, dim)).astype(np.float32)
    sampler = KernelSampler(num_items, dim, alpha=alpha, leaf_size=5,
                            item_table=table, seed=5)
    ids = sampler.sample(query, draws, shared=False,
                         item_table=table)[0].numpy()
    probabilities = np.exp(brute_log_q(query, table, alpha))
    # Pool the catalog into 40 bins of equal expected mass per row, so that
    # every bin is well inside the chi-square regime.
    total, dof = 0.0, 0
    for row, p in zip(ids, probabilities):
        order = np.argsort(-p)
        bins = np.minimum((np.cumsum(p[order]) * 40).astype(int), 39)
        bin_of = np.empty(num_items, int)
        bin_of[order] = bins
        observed = np.bincount(bin_of[row], minlength=40)
        expected = draws * np.bincount(bin_of, weights=p, minlength=40)
        keep = expected > 0
        total += float(np.sum((observed[keep] - expected[keep]) ** 2
                              / expected[keep]))
        dof += int(keep.sum()) - 1
    assert total < chi2_critical(dof)


def test_generic_isa_draws_the_same():
    """The SSE build of the draw kernel (TFREC_FAST_CPU_ISA=generic) gives
    the draws of the widest one, up to rounding at split boundaries."""
    if not FUSED:
        pytest.skip("op library without the kernel sampler ops")
    script = (
        "import tfrec_fast, numpy as np\n"
        "from tfrec_fast.samplers import KernelSampler\n"
        "rng = np.random.default_rng(0)\n"
        "w = (0.5 * rng.normal(size=(500, 24))).astype(np.float32)\n"
        "h = rng.normal(size=(8, 24)).astype(np.float32)\n"
        "s = KernelSampler(500, 24, alpha=20.0, leaf_size=6, item_table=w,"
        " seed=4, use_fused=True)\n"
        "ids, lq = s.sample(h, 200, shared=False, item_table=w)\n"
        "np.save(__import__('sys').argv[1], np.stack([ids.numpy(),"
        " lq.numpy().view(np.int32)]))\n")
    results = []
    for isa in ("generic", "native"):
        out = os.path.join(os.environ.get("TMPDIR", "/tmp"),
                           f"tfrec_ks_isa_{os.getpid()}_{isa}.npy")
        env = dict(os.environ, TFREC_FAST_CPU_ISA=isa,
                   TF_CPP_MIN_LOG_LEVEL="3")
        subprocess.run([sys.executable, "-c", script, out], check=True,
                       env=env, cwd=os.path.dirname(os.path.dirname(
                           os.path.abspath(__file__))))
        results.append(np.load(out))
        os.remove(out)
    same = np.mean(results[0][0] == results[1][0])
    assert same > 0.99, same


# ---------------------------------------------------------------------------
# Keeping up with training.

def _perturb(rng, table, rows, kind):
    table = table.copy()
    if kind == "noise":
        table[rows] += 0.3 * rng.normal(size=(len(rows), table.shape[1]))
    elif kind == "zero":
        table[rows] = 0.0
    else:  # "swap": rows exchange values (the sums of a leaf may not move)
        table[rows] = table[rows[::-1]]
    return table


@pytest.mark.parametrize("fused", PATHS)
@settings(max_examples=8, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**16),
       steps=st.lists(st.tuples(st.integers(0, 60),
                                st.sampled_from(["noise", "zero", "swap"]),
                                st.booleans()),
                      min_size=1, max_size=6),
       leaf_size=st.sampled_from([1, 3, 8]))
def test_random_updates_keep_the_tree_a_fresh_build(fused, seed, steps,
                                                    leaf_size):
    rng = np.random.default_rng(seed)
    num_items, dim = 61, 5
    table = random_table(rng, num_items, dim)
    sampler = KernelSampler(num_items, dim, leaf_size=leaf_size,
                            max_changed_fraction=0.5, item_table=table,
                            use_fused=fused)
    for num_rows, kind, explicit in steps:
        rows = rng.choice(num_items, size=num_rows, replace=False)
        table = _perturb(rng, table, rows, kind)
        if explicit:
            # update(ids) with repeats; rows not listed must not move.
            listed = np.concatenate([rows, rows[:2]]).astype(np.int64)
            assert int(sampler.update(table, listed)) == len(rows)
        else:
            changed, rebuilt = sampler.refresh(table)
            assert int(changed) <= num_rows
            assert bool(rebuilt) == (int(changed) > num_items // 2)
        assert_tree_is_fresh_build(sampler, table)


@pytest.mark.parametrize("fused", PATHS)
def test_update_leaves_unlisted_rows_alone(fused):
    rng = np.random.default_rng(4)
    table = random_table(rng, 30, 4)
    sampler = KernelSampler(30, 4, leaf_size=4, item_table=table,
                            refresh="manual", use_fused=fused)
    moved = table.copy()
    moved[[3, 17]] += 1.0
    sampler.update(moved, [3])
    expected = table.copy()
    expected[3] = moved[3]
    assert_tree_is_fresh_build(sampler, expected)


@pytest.mark.parametrize("fused", PATHS)
def test_refresh_policies(fused):
    rng = np.random.default_rng(5)
    num_items, dim = 50, 4
    table = random_table(rng, num_items, dim)
    query = rng.normal(size=(2, dim)).astype(np.float32)

    manual = KernelSampler(num_items, dim, refresh="manual", use_fused=fused)
    manual.sample(query, 4, shared=False)  # no item_table needed
    np.testing.assert_array_equal(manual.snapshot.numpy(), 0.0)
    manual.rebuild(table)
    assert_tree_is_fresh_build(manual, table)

    auto = KernelSampler(num_items, dim, use_fused=fused)
    with pytest.raises(ValueError, match="item_table"):
        auto.sample(query, 4, shared=False)
    auto.sample(query, 4, shared=False, item_table=table)
    assert_tree_is_fresh_build(auto, table)

    every3 = KernelSampler(num_items, dim, refresh=3, use_fused=fused)
    tables = [_perturb(rng, table, np.arange(i, i + 3), "noise")
              for i in range(7)]
    for call, current in enumerate(tables):
        every3.sample(query, 4, shared=False, item_table=current)
        # Refreshed on calls 0, 3, 6; in between the tree stays.
        assert_tree_is_fresh_build(every3, tables[call - call % 3])


@pytest.mark.parametrize("fused", PATHS)
def test_tree_follows_a_variable_inside_tf_function(fused):
    rng = np.random.default_rng(6)
    num_items, dim = 40, 4
    table = tf.Variable(random_table(rng, num_items, dim))
    sampler = KernelSampler(num_items, dim, leaf_size=4,
                            max_changed_fraction=0.2, use_fused=fused)
    query = tf.constant(rng.normal(size=(3, dim)).astype(np.float32))

    @tf.function
    def step(rows, delta):
        ids, log_q = sampler.sample(query, 8, shared=False, item_table=table)
        table.scatter_add(tf.IndexedSlices(delta, rows))
        return ids, log_q

    for i in range(4):
        # Step 0 rebuilds (every row differs from the zero snapshot), the
        # later ones update 3 rows along their paths.
        rows = tf.constant([i, 10 + i, 30 + i])
        before = table.numpy()
        _, log_q = step(rows, tf.ones([3, dim]))
        assert_tree_is_fresh_build(sampler, before)
        assert np.all(np.isfinite(log_q.numpy()))


# ---------------------------------------------------------------------------
# Random stream and state.

@pytest.mark.parametrize("fused", PATHS)
def test_draws_are_deterministic_given_the_seed(fused):
    rng = np.random.default_rng(7)
    table = random_table(rng, 80, 6)
    query = rng.normal(size=(5, 6)).astype(np.float32)

    def draws(seed, rows=5):
        sampler = KernelSampler(80, 6, item_table=table, seed=seed,
                                use_fused=fused)
        return [sampler.sample(query[:rows], 16, shared=False,
                               item_table=table)[0].numpy()
                for _ in range(2)]

    first, again, other = draws(1), draws(1), draws(2)
    np.testing.assert_array_equal(first, again)
    assert not np.array_equal(first[0], first[1])  # the counter advances
    assert not np.array_equal(first[0], other[0])
    if fused:
        # A row's draws depend on its own index only, not on the batch.
        np.testing.assert_array_equal(draws(1, rows=2)[0], first[0][:2])


@pytest.mark.parametrize("fused", PATHS)
def test_checkpoint_round_trip_reproduces_the_next_draws(fused, tmp_path):
    rng = np.random.default_rng(8)
    table = random_table(rng, 60, 5)
    query = rng.normal(size=(4, 5)).astype(np.float32)
    sampler = KernelSampler(60, 5, leaf_size=4, item_table=table, seed=9,
                            use_fused=fused)
    sampler.sample(query, 8, shared=False, item_table=table)
    path = tf.train.Checkpoint(sampler=sampler).save(str(tmp_path / "ks"))
    want = sampler.sample(query, 8, shared=False, item_table=table)

    restored = KernelSampler.from_config(sampler.get_config())
    tf.train.Checkpoint(sampler=restored).restore(path).assert_consumed()
    assert restored.draw_counter.numpy() == 1
    np.testing.assert_array_equal(restored.tree.numpy(), sampler.tree.numpy())
    assert_tree_is_fresh_build(restored, table)
    got = restored.sample(query, 8, shared=False, item_table=table)
    np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())
    np.testing.assert_array_equal(got[1].numpy(), want[1].numpy())


def test_get_config_round_trip():
    sampler = KernelSampler(20, 3, alpha=7.5, leaf_size=2, refresh=4,
                            max_changed_fraction=0.25, seed=3)
    config = sampler.get_config()
    clone = tf_keras.layers.deserialize(tf_keras.layers.serialize(sampler))
    assert isinstance(clone, KernelSampler)
    for key in ("num_items", "dim", "alpha", "leaf_size", "refresh",
                "max_changed_fraction", "seed"):
        assert clone.get_config()[key] == config[key]


# ---------------------------------------------------------------------------
# In the losses and in model.fit.

def test_sasrec_fit_with_sampled_softmax_per_row(toy_split):
    tf_keras.utils.set_random_seed(0)
    sampler = KernelSampler(toy_split.num_items, 16, alpha=10.0, leaf_size=4,
                            seed=7)
    task = NextItemTask(SampledSoftmax(sampler, 8, shared=False))
    model = SASRec(toy_split.num_items, max_len=12, dim=16, num_blocks=1,
                   num_heads=2, dropout=0.0, task=task)
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2))
    train = data.next_item_dataset(toy_split.train, batch_size=32, max_len=12)
    losses = model.fit(train, epochs=6, verbose=0).history["loss"]
    assert np.all(np.isfinite(losses)) and losses[-1] < 0.7 * losses[0]
    assert any(v is sampler.tree for v in model.non_trainable_variables)
    steps = int(sampler.draw_counter.numpy())
    assert steps > 0
    # "auto": the tree described the table of the last step's start, which
    # Adam has moved since; one refresh brings it to the final table.
    changed, rebuilt = sampler.refresh(model.item_table)
    assert bool(rebuilt)
    assert_tree_is_fresh_build(sampler, model.item_table.numpy())


def test_cce_minus_given_negatives_from_the_kernel_sampler():
    rng = np.random.default_rng(9)
    num_items, dim = 50, 8
    table = tf.Variable(random_table(rng, num_items, dim))
    hidden = tf.constant(rng.normal(size=(6, dim)).astype(np.float32))
    targets = tf.constant(rng.integers(0, num_items, size=6))
    sampler = KernelSampler(num_items, dim, alpha=5.0, seed=1)
    loss = CCEMinus(sampler, 16, shared=False,
                    reduction=tf_keras.losses.Reduction.NONE)
    with tf.GradientTape() as tape:
        value = loss(hidden, table, targets)
    assert value.shape == (6,) and np.all(np.isfinite(value.numpy()))
    gradient = tape.gradient(value, table)
    assert gradient is not None
    # The same negatives through SampledSoftmax give the same loss.
    again = KernelSampler(num_items, dim, alpha=5.0, seed=1)
    reference = SampledSoftmax(again, 16, shared=False,
                               reduction=tf_keras.losses.Reduction.NONE)
    np.testing.assert_allclose(reference(hidden, table, targets).numpy(),
                               value.numpy(), rtol=1e-4, atol=1e-5)


def test_sampled_retrieval_per_query_negatives():
    rng = np.random.default_rng(10)
    num_items, dim = 40, 8
    items = tf_keras.layers.Embedding(num_items, dim)
    items.build(None)
    sampler = KernelSampler(num_items, dim, alpha=5.0, seed=2)
    task = SampledRetrieval(sampler, num_negatives=8, candidate_tower=items,
                            shared=False)
    query = tf.Variable(rng.normal(size=(5, dim)).astype(np.float32))
    ids = tf.constant([1, 4, 9, 16, 25], tf.int64)
    with tf.GradientTape() as tape:
        value = task(query, items(ids), candidate_ids=ids)
    assert np.isfinite(float(value))
    assert tape.gradient(value, query) is not None
    with pytest.raises(ValueError, match="shared=False"):
        SampledRetrieval(sampler, num_negatives=8, candidate_tower=items)(
            query, items(ids), candidate_ids=ids)


# ---------------------------------------------------------------------------
# Bad input.

@pytest.mark.parametrize("kwargs,match", [
    (dict(alpha=0.0), "alpha"), (dict(alpha=-1.0), "alpha"),
    (dict(alpha=float("nan")), "alpha"), (dict(alpha=float("inf")), "alpha"),
    (dict(alpha=True), "alpha"), (dict(leaf_size=0), "leaf_size"),
    (dict(leaf_size=2.5), "leaf_size"), (dict(dim=0), "dim"),
    (dict(refresh="sometimes"), "refresh"), (dict(refresh=0), "refresh"),
    (dict(max_changed_fraction=1.5), "max_changed_fraction"),
    (dict(use_fused="yes"), "use_fused")])
def test_bad_arguments(kwargs, match):
    args = dict(num_items=10, dim=4)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        KernelSampler(**args)


@pytest.mark.parametrize("fused", PATHS)
def test_bad_inputs_raise_clear_errors(fused):
    rng = np.random.default_rng(11)
    table = random_table(rng, 20, 4)
    query = rng.normal(size=(3, 4)).astype(np.float32)
    sampler = KernelSampler(20, 4, item_table=table, use_fused=fused)
    with pytest.raises(ValueError, match="shared=False"):
        sampler.sample(query, 4, item_table=table)  # shared defaults to True
    with pytest.raises(ValueError, match="item_table"):
        sampler.sample(query, 4, shared=False, item_table=table[:10])
    with pytest.raises(ValueError, match="query"):
        sampler.sample(query[:, :3], 4, shared=False, item_table=table)
    with pytest.raises(ValueError, match="query"):
        sampler.log_prob(None, [1])
    bad_table = table.copy()
    bad_table[7, 2] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN|finite"):
        sampler.sample(query, 4, shared=False, item_table=bad_table)
    bad_table[7, 2] = np.inf
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN|finite"):
        sampler.refresh(bad_table)
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN|finite"):
        sampler.update(bad_table, [7])
    sampler.update(bad_table, [3])  # finite rows of a table with a bad one
    bad_query = query.copy()
    bad_query[1, 0] = np.nan
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN|finite"):
        sampler.sample(bad_query, 4, shared=False, item_table=table)
    with pytest.raises(tf.errors.InvalidArgumentError, match="NaN|finite"):
        sampler.log_prob(bad_query, [1, 2])
    with pytest.raises(tf.errors.InvalidArgumentError, match="out of range"):
        sampler.log_prob(query, [[1, 20]] * 3)
    with pytest.raises(tf.errors.InvalidArgumentError, match="out of range"):
        sampler.log_prob(query, [-1])
    with pytest.raises(tf.errors.InvalidArgumentError, match="out of range"):
        sampler.update(table, [0, 20])


def test_replicas_refresh_their_trees_and_draw_independently():
    if len(tf.config.list_logical_devices("CPU")) < 2:
        pytest.skip("needs 2 logical CPUs (tests/conftest.py)")
    rng = np.random.default_rng(12)
    table_value = random_table(rng, 50, 4)
    query = tf.constant(rng.normal(size=(6, 4)).astype(np.float32))
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        sampler = KernelSampler(50, 4, alpha=20.0, seed=1)
        table = tf.Variable(table_value)

    @tf.function
    def step():
        return strategy.run(lambda: sampler.sample(query, 32, shared=False,
                                                   item_table=table))

    ids, log_q = step()
    ids = [t.numpy() for t in strategy.experimental_local_results(ids)]
    log_q = [t.numpy() for t in strategy.experimental_local_results(log_q)]
    assert not np.array_equal(ids[0], ids[1])
    want = brute_log_q(query.numpy(), table_value, 20.0)
    for replica_ids, replica_log_q in zip(ids, log_q):
        np.testing.assert_allclose(
            replica_log_q, np.take_along_axis(want, replica_ids, 1),
            rtol=1e-5)
    for snapshot in sampler.snapshot.values:
        np.testing.assert_array_equal(snapshot.numpy(), table_value)


def test_example_builds_per_row_tasks_and_trains(toy_split):
    """examples/kernel_sampler_movielens.py without ML-100k: its tasks on
    the toy data, one epoch, and its results table."""
    import importlib.util  # pylint: disable=import-outside-toplevel
    import pathlib  # pylint: disable=import-outside-toplevel
    examples = pathlib.Path(__file__).resolve().parents[1] / "examples"
    sys.path.insert(0, str(examples))
    spec = importlib.util.spec_from_file_location(
        "kernel_sampler_example", examples / "kernel_sampler_movielens.py")
    example = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(example)
    args = example.parse_args(["--dim", "16", "--negatives", "8"])
    assert args.samplers == ["kernel", "uniform"]
    assert example.build_task(args, "full", None, toy_split.train,
                              toy_split.num_items) is None
    task = example.build_task(args, "kernel", 8, toy_split.train,
                              toy_split.num_items)
    assert isinstance(task.loss_fn, CCEMinus)
    assert isinstance(task.loss_fn.sampler, KernelSampler)
    assert not task.loss_fn.shared
    tf_keras.utils.set_random_seed(0)
    model = SASRec(toy_split.num_items, max_len=12, dim=16, num_blocks=1,
                   num_heads=1, dropout=0.0, task=task)
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2))
    train = data.next_item_dataset(toy_split.train, batch_size=32, max_len=12)
    loss = model.fit(train, epochs=1, verbose=0).history["loss"]
    assert np.isfinite(loss[-1])
    record = {"test": {"HR@10": 0.5, "NDCG@10": 0.25},
              "seconds_per_epoch": 1.0, "epochs_trained": 1}
    text = example.table([dict(record, sampler="full", K=None),
                          dict(record, sampler="uniform", K=8),
                          dict(record, sampler="kernel", K=8)])
    assert "+0.0%" in text and "kernel" in text
