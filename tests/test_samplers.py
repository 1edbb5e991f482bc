"""Tests of every CandidateSampler: distributions, state, errors.

Goodness of fit: counts of sampled ids are compared with the counts the
sampler claims, N * exp(log q) (or, for candidate sets that are not i.i.d.
draws, the expected counts exp(log K + log q)), with Pearson's statistic
sum((O - E)^2 / E). scipy is not installed, so the critical value comes
from the Wilson-Hilferty approximation of the chi-square quantile,

    chi2_{k, p} ~= k (1 - 2 / (9k) + z sqrt(2 / (9k)))^3.

With z = 5 (normal tail 2.9e-7) and the k = 11, 12 used here, the
approximate quantile (53.1, 55.1) has an exact chi-square tail of 1.7e-7
(checked by numerical integration of the density), so a correct sampler
fails by chance with probability < 2e-7. The test is generous: all
draws use fixed seeds so each test is deterministic anyway, and z = 5 leaves
room for the extra variance of expected counts that are themselves
estimates (InBatch, Mixed); a sampler that is off by a visible fraction of
its probabilities still lands far above it (several tests assert that).
"""

import math

import numpy as np
import pytest
import tensorflow as tf
import tf_keras

from tfrec_fast.losses.sampled_softmax import SampledSoftmax
from tfrec_fast.samplers import CandidateSampler
from tfrec_fast.samplers import HardNegatives
from tfrec_fast.samplers import InBatch
from tfrec_fast.samplers import LogUniform
from tfrec_fast.samplers import Mixed
from tfrec_fast.samplers import Uniform
from tfrec_fast.samplers import Unigram

C = 12  # catalog size of most tests
COUNTS = np.array([30, 1, 0, 7, 12, 3, 5, 0, 2, 9, 1, 4], np.float64)


def chi2_critical(dof, z=5.0):
    """Wilson-Hilferty upper quantile of chi-square(dof) at normal score z."""
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def chi2_stat(observed, expected):
    observed = np.asarray(observed, np.float64)
    expected = np.asarray(expected, np.float64)
    assert np.all(expected > 0)
    return float(np.sum((observed - expected) ** 2 / expected))


def assert_fits(observed, expected, dof):
    stat = chi2_stat(observed, expected)
    assert stat < chi2_critical(dof), (stat, chi2_critical(dof), observed,
                                       expected)
    return stat


def context_free(name, seed=7):
    if name == "uniform":
        return Uniform(C, seed=seed)
    if name == "log_uniform":
        return LogUniform(C, seed=seed)
    return Unigram(COUNTS, alpha=0.75, smoothing=1.0, seed=seed)


CONTEXT_FREE = ["uniform", "log_uniform", "unigram"]


def item_table(d=4, seed=0):
    return tf.constant(np.random.default_rng(seed).normal(size=(C, d)),
                       tf.float32)


def queries(t=3, d=4, seed=1):
    return tf.constant(np.random.default_rng(seed).normal(size=(t, d)),
                       tf.float32)


def draw_args(name, shared=True, t=3):
    """(sampler, kwargs for sample) of a sampler of every kind."""
    positives = tf.constant(np.arange(t) % C, tf.int64)
    if name in CONTEXT_FREE:
        return context_free(name), dict(query=queries(t), num=5,
                                         shared=shared)
    if name == "in_batch":
        return InBatch(C, seed=3), dict(query=queries(t), num=None,
                                        positives=positives)
    if name == "mixed":
        return (Mixed(InBatch(C), Unigram(COUNTS, smoothing=1.0, seed=5)),
                dict(query=queries(t), num=5, shared=shared,
                     positives=positives))
    assert name == "hard_negatives"
    return (HardNegatives(Uniform(C, seed=9), pool_size=8),
            dict(query=queries(t), num=3, shared=shared,
                 positives=positives, item_table=item_table()))


ALL = CONTEXT_FREE + ["in_batch", "mixed", "hard_negatives"]
RANDOM = CONTEXT_FREE + ["mixed", "hard_negatives"]


def log_prob_of(sampler, query, ids, num):
    if getattr(sampler, "log_prob_needs_num", False):
        return sampler.log_prob(query, ids, num=num)
    return sampler.log_prob(query, ids)


# ---------------------------------------------------------------- context free


@pytest.mark.parametrize("name", CONTEXT_FREE)
@pytest.mark.parametrize("shared", [True, False])
def test_context_free_goodness_of_fit(name, shared):
    sampler = context_free(name, seed=11 if shared else 12)
    if shared:
        ids, log_q = sampler.sample(None, 30000)
    else:
        ids, log_q = sampler.sample(queries(60), 500, shared=False)
    q = np.exp(sampler.log_prob(None, tf.range(C)).numpy())
    observed = np.bincount(ids.numpy().ravel(), minlength=C)
    assert_fits(observed, q * ids.numpy().size, C - 1)
    # The same counts against a distribution off by 30% on one item fail.
    wrong = q.copy()
    wrong[0] *= 1.3
    wrong /= wrong.sum()
    assert chi2_stat(observed, wrong * ids.numpy().size) > chi2_critical(
        C - 1)


@pytest.mark.parametrize("name", CONTEXT_FREE)
def test_context_free_log_prob_normalised_and_consistent(name):
    sampler = context_free(name)
    log_p = sampler.log_prob(None, tf.range(C, dtype=tf.int64))
    assert log_p.dtype == tf.float32 and log_p.shape == [C]
    np.testing.assert_allclose(np.exp(log_p.numpy()).sum(), 1.0, rtol=1e-5)
    ids, log_q = sampler.sample(queries(4), 6, shared=False)
    np.testing.assert_allclose(log_q.numpy(),
                               sampler.log_prob(None, ids).numpy(), rtol=1e-6)


def test_unigram_probabilities_follow_counts():
    sampler = Unigram(COUNTS, alpha=0.75, smoothing=1.0)
    weights = (COUNTS + 1.0) ** 0.75
    np.testing.assert_allclose(
        np.exp(sampler.log_prob(None, tf.range(C)).numpy()),
        weights / weights.sum(), rtol=1e-5)


def test_log_uniform_probabilities():
    sampler = LogUniform(C)
    k = np.arange(C)
    np.testing.assert_allclose(
        np.exp(sampler.log_prob(None, tf.range(C)).numpy()),
        np.log((k + 2.0) / (k + 1.0)) / np.log(C + 1.0), rtol=1e-5)


# ---------------------------------------------------- shapes, dtypes, seeds


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("shared", [True, False])
def test_shapes_dtypes_and_log_prob_of_draws(name, shared):
    if name == "in_batch" and not shared:
        pytest.skip("in-batch candidates are shared only")
    t = 3
    sampler, kwargs = draw_args(name, shared, t)
    ids, log_q = sampler.sample(**kwargs)
    assert ids.dtype == tf.int64 and log_q.dtype == tf.float32
    num = kwargs["num"] or t
    expected_shape = {
        "in_batch": [t],
        "mixed": [t + num] if shared else [t, t + num],
        "hard_negatives": [t, num],
    }.get(name, [num] if shared else [t, num])
    assert ids.shape == expected_shape and log_q.shape == expected_shape
    assert np.all((ids.numpy() >= 0) & (ids.numpy() < C))
    assert np.all(np.isfinite(log_q.numpy()))
    np.testing.assert_allclose(
        log_q.numpy(),
        log_prob_of(sampler, kwargs["query"], ids, num).numpy(), rtol=1e-5,
        atol=1e-6)


@pytest.mark.parametrize("name", RANDOM)
def test_same_seed_and_counter_same_draws(name):
    first, kwargs = draw_args(name)
    second, _ = draw_args(name)
    a = [first.sample(**kwargs)[0].numpy() for _ in range(2)]
    b = [second.sample(**kwargs)[0].numpy() for _ in range(2)]
    np.testing.assert_array_equal(a[0], b[0])
    np.testing.assert_array_equal(a[1], b[1])
    assert not np.array_equal(a[0], a[1])  # the counter moves the stream
    # Rewinding the draw counter replays the draws.
    stream = first.other if name == "mixed" else (
        first.base if name == "hard_negatives" else first)
    stream.draw_counter.assign(0)
    np.testing.assert_array_equal(first.sample(**kwargs)[0].numpy(), a[0])


@pytest.mark.parametrize("name", CONTEXT_FREE)
def test_different_seeds_different_draws(name):
    a, _ = context_free(name, seed=1).sample(None, 200)
    b, _ = context_free(name, seed=2).sample(None, 200)
    assert not np.array_equal(a.numpy(), b.numpy())


def test_composed_samplers_follow_their_parts_seeds():
    positives = tf.constant([0, 1, 2], tf.int64)
    draws = []
    for seed in (1, 2):
        mixed = Mixed(InBatch(C), Uniform(C, seed=seed))
        draws.append(mixed.sample(None, 50, positives=positives)[0].numpy())
    assert not np.array_equal(draws[0], draws[1])
    np.testing.assert_array_equal(draws[0][:3], [0, 1, 2])
    np.testing.assert_array_equal(draws[1][:3], [0, 1, 2])
    hard = [HardNegatives(Uniform(C, seed=seed), pool_size=10).sample(
        queries(20), 2, shared=False, item_table=item_table())[0].numpy()
            for seed in (1, 2)]
    assert not np.array_equal(hard[0], hard[1])


@pytest.mark.parametrize("name", ALL)
def test_inside_tf_function(name):
    eager, kwargs = draw_args(name)
    graph, _ = draw_args(name)
    expected = [eager.sample(**kwargs) for _ in range(2)]
    static = dict(kwargs)
    query, positives = static.pop("query"), static.pop("positives", None)

    @tf.function(input_signature=[tf.TensorSpec([None, 4], tf.float32),
                                  tf.TensorSpec([None], tf.int64)])
    def draw(q, p):
        extra = {} if positives is None else {"positives": p}
        return graph.sample(q, **static, **extra)

    p = positives if positives is not None else tf.zeros([3], tf.int64)
    for want in expected:
        ids, log_q = draw(query, p)
        np.testing.assert_array_equal(ids.numpy(), want[0].numpy())
        np.testing.assert_allclose(log_q.numpy(), want[1].numpy(),
                                   rtol=1e-6)


# ------------------------------------------------------------- serialisation


@pytest.mark.parametrize("name", ALL)
def test_config_round_trip(name):
    sampler, kwargs = draw_args(name)
    config = tf_keras.layers.serialize(sampler)
    clone = tf_keras.layers.deserialize(config)
    assert type(clone) is type(sampler)
    assert clone.get_config() == sampler.get_config()
    a, log_a = sampler.sample(**kwargs)
    b, log_b = clone.sample(**kwargs)
    np.testing.assert_array_equal(a.numpy(), b.numpy())
    np.testing.assert_allclose(log_a.numpy(), log_b.numpy(), rtol=1e-6)
    # from_config directly, too.
    again = type(sampler).from_config(sampler.get_config())
    assert again.get_config() == sampler.get_config()


def test_config_keeps_parameters():
    sampler = InBatch(C, learning_rate=0.2, num_buckets=5, seed=4,
                      warmup=False)
    config = sampler.get_config()
    assert (config["learning_rate"], config["num_buckets"], config["seed"],
            config["warmup"]) == (0.2, 5, 4, False)
    hard = HardNegatives(Unigram(COUNTS, smoothing=2.0), pool_size=7)
    clone = HardNegatives.from_config(hard.get_config())
    assert clone.pool_size == 7 and isinstance(clone.base, Unigram)
    assert clone.base.smoothing == 2.0


@pytest.mark.parametrize("name", ALL)
def test_checkpoint_round_trip(name, tmp_path):
    sampler, kwargs = draw_args(name)
    sampler.sample(**kwargs)
    checkpoint = tf.train.Checkpoint(sampler=sampler)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    saved_state = [v.numpy().copy() for v in sampler.variables]
    after = [sampler.sample(**kwargs) for _ in range(2)]
    checkpoint.restore(path).assert_consumed()
    for v, value in zip(sampler.variables, saved_state):
        np.testing.assert_array_equal(v.numpy(), value)
    again = [sampler.sample(**kwargs) for _ in range(2)]
    for (a, log_a), (b, log_b) in zip(after, again):
        np.testing.assert_array_equal(a.numpy(), b.numpy())
        np.testing.assert_allclose(log_a.numpy(), log_b.numpy(), rtol=1e-6)
    # A fresh sampler with the same config restores the same state.
    fresh, _ = draw_args(name)
    tf.train.Checkpoint(sampler=fresh).restore(path).assert_consumed()
    np.testing.assert_array_equal(fresh.sample(**kwargs)[0].numpy(),
                                  after[0][0].numpy())


def test_in_batch_checkpoint_restores_estimator(tmp_path):
    sampler = InBatch(C, learning_rate=0.1)
    for t in range(1, 8):
        sampler.sample(None, positives=[t % 3, 5, 5])
    checkpoint = tf.train.Checkpoint(sampler=sampler)
    path = checkpoint.save(str(tmp_path / "ckpt"))
    period = sampler.estimated_period(tf.range(C)).numpy()
    assert sampler.step.numpy() == 7
    for _ in range(5):
        sampler.sample(None, positives=[9])
    assert not np.array_equal(sampler.estimated_period(tf.range(C)).numpy(),
                              period)
    fresh = InBatch(C, learning_rate=0.1)
    tf.train.Checkpoint(sampler=fresh).restore(path).assert_consumed()
    assert fresh.step.numpy() == 7
    np.testing.assert_array_equal(fresh.estimated_period(tf.range(C)).numpy(),
                                  period)
    np.testing.assert_array_equal(fresh.last_seen.numpy()[[0, 1, 2, 5]],
                                  [6, 7, 5, 7])


def test_saved_model_carries_sampler_variables(tmp_path):
    mixed = Mixed(InBatch(C, seed=1), Unigram(COUNTS, smoothing=1.0, seed=2))
    for t in range(6):
        mixed.sample(None, 4, positives=[t % 4, 7, 7])
    module = tf.Module()
    module.sampler = mixed
    spec = [tf.TensorSpec([None, 4], tf.float32),
            tf.TensorSpec([None], tf.int64)]
    module.log_prob = tf.function(
        lambda q, ids: mixed.log_prob(q, ids, num=4), input_signature=spec)
    module.sample = tf.function(
        lambda q, p: mixed.sample(q, 4, positives=p), input_signature=spec)
    path = str(tmp_path / "saved")
    tf.saved_model.save(module, path)
    loaded = tf.saved_model.load(path)
    all_ids = tf.range(C, dtype=tf.int64)
    np.testing.assert_allclose(loaded.log_prob(queries(3), all_ids).numpy(),
                               mixed.log_prob(queries(3), all_ids,
                                              num=4).numpy(), rtol=1e-6)
    assert int(loaded.sampler.in_batch.step.numpy()) == 6
    np.testing.assert_array_equal(loaded.sampler.in_batch.period.numpy(),
                                  mixed.in_batch.period.numpy())
    np.testing.assert_array_equal(loaded.sampler.other.log_q_table.numpy(),
                                  mixed.other.log_q_table.numpy())
    # The loaded functions update the loaded variables like the original.
    positives = tf.constant([1, 7, 7], tf.int64)
    want = mixed.sample(queries(3), 4, positives=positives)
    got = loaded.sample(queries(3), positives)
    np.testing.assert_array_equal(got[0].numpy(), want[0].numpy())
    np.testing.assert_allclose(got[1].numpy(), want[1].numpy(), rtol=1e-6)
    assert int(loaded.sampler.in_batch.step.numpy()) == 7


# ------------------------------------------------------------------ InBatch


def run_stream(sampler, stream, num=None):
    """Feeds every row of stream [S, T] to sampler.sample in one graph."""
    stream = tf.constant(stream, tf.int64)

    @tf.function
    def feed():
        for i in tf.range(tf.shape(stream)[0]):
            if num is None:
                sampler.sample(None, positives=stream[i])
            else:
                sampler.sample(None, num, positives=stream[i])

    feed()


def test_in_batch_converges_on_periodic_stream():
    # Item 0 every step, 1 every 2nd, 2 every 5th, 3 twice per batch, and
    # item 4 every 3rd step in pairs (item 11 fills the rows).
    stream = []
    for t in range(1, 401):
        row = [0, 3, 3]
        row += [1] if t % 2 == 0 else [11]
        row += [2] if t % 5 == 0 else [11]
        row += [4, 4] if t % 3 == 0 else [11, 11]
        stream.append(row)
    for warmup in (True, False):
        sampler = InBatch(C, learning_rate=0.05, warmup=warmup)
        run_stream(sampler, stream)
        period = sampler.estimated_period(tf.range(5)).numpy()
        np.testing.assert_allclose(period, [1, 2, 5, 0.5, 1.5], rtol=1e-5)
        # The expected counts behind log q: log(T) + log_q = -log(B).
        ids, log_q = sampler.sample(queries(7), positives=[0, 1, 2, 3, 3,
                                                            4, 4])
        np.testing.assert_allclose(
            np.exp(log_q.numpy() + np.log(7)),
            1 / sampler.estimated_period(ids).numpy(), rtol=1e-5)
    assert sampler.step.numpy() == 401


def test_in_batch_tracks_a_change_of_frequency():
    sampler = InBatch(C, learning_rate=0.05)
    stream = [[1] if t % 2 == 0 else [0] for t in range(200)]
    stream += [[1] if t % 10 == 0 else [0] for t in range(4000)]
    run_stream(sampler, stream)
    np.testing.assert_allclose(sampler.estimated_period([1]).numpy(), [10],
                               rtol=0.01)


def test_in_batch_never_seen_items():
    sampler = InBatch(C)
    sampler.sample(None, positives=[0])
    sampler.sample(None, positives=[1])
    sampler.sample(None, positives=[1, 2])
    # No interval yet (2 seen once, 5 never): B = max(step, 1) = 3.
    np.testing.assert_allclose(
        sampler.estimated_period([0, 1, 2, 5]).numpy(), [3, 1, 3, 3])
    np.testing.assert_allclose(
        sampler.estimated_period([0, 1, 2, 5], never_seen="zero").numpy(),
        [3, 1, 3, np.inf])
    np.testing.assert_allclose(
        sampler.log_prob(queries(4), [5]).numpy(), [-np.log(3 * 4)],
        rtol=1e-6)
    assert InBatch(C).estimated_period([3]).numpy()[0] == 1.0  # step 0


def test_in_batch_hash_buckets_share_slots():
    sampler = InBatch(C, num_buckets=4, learning_rate=0.5)
    run_stream(sampler, [[1] if t % 2 else [5] for t in range(40)])
    # 1 and 5 share bucket 1: the bucket appears every step.
    np.testing.assert_allclose(sampler.estimated_period([1, 5, 9]).numpy(),
                               [1, 1, 1])
    assert sampler.period.shape == [4]


def test_in_batch_goodness_of_fit():
    rng = np.random.default_rng(3)
    p = np.array([0.3, 0.15, 0.12, 0.1, 0.08, 0.07, 0.05, 0.04, 0.03, 0.03,
                  0.02, 0.01])
    t = 6
    warm, test = 4000, 1000
    # Learning rate below 1 / appearances: every interval is averaged.
    sampler = InBatch(C, learning_rate=1.0 / (warm * t))
    run_stream(sampler, rng.choice(C, size=(warm, t), p=p))
    predicted = np.exp(sampler.log_prob(queries(t), tf.range(C)).numpy()
                       + np.log(t))  # expected count per batch
    np.testing.assert_allclose(predicted, t * p, rtol=0.25)
    # log_prob over the catalog sums to ~1 once the estimate has converged.
    np.testing.assert_allclose(predicted.sum() / t, 1.0, atol=0.03)
    observed = np.bincount(rng.choice(C, size=(test, t), p=p).ravel(),
                           minlength=C)
    assert_fits(observed, test * predicted, C)
    # Ignoring duplicates within a batch (counting presence) is rejected.
    presence = 1 - (1 - p) ** t
    assert chi2_stat(observed, test * presence) > 10 * chi2_critical(C)


def test_in_batch_candidates_and_num():
    sampler = InBatch(C)
    positives = tf.constant([4, 2, 4], tf.int32)
    ids, log_q = sampler.sample(queries(3), None, positives=positives)
    np.testing.assert_array_equal(ids.numpy(), [4, 2, 4])
    assert ids.dtype == tf.int64
    np.testing.assert_allclose(log_q.numpy(), [-np.log(3)] * 3, rtol=1e-6)
    with pytest.raises(ValueError, match="num"):
        sampler.sample(queries(3), 0, positives=positives)
    with pytest.raises(ValueError, match="shared"):
        sampler.sample(queries(3), None, shared=False, positives=positives)
    # num = K: K uniform draws from the positives, same per-draw log q.
    ids, log_q = sampler.sample(queries(3), 2000, positives=positives)
    assert ids.shape == [2000]
    assert set(np.unique(ids.numpy())) == {2, 4}
    np.testing.assert_allclose(np.mean(ids.numpy() == 4), 2 / 3, atol=0.04)
    np.testing.assert_allclose(
        log_q.numpy(), sampler.log_prob(queries(3), ids).numpy(), rtol=1e-6)

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32)])
    def dynamic(num):
        return sampler.sample(None, num, positives=positives)[0]

    assert dynamic(tf.constant(7)).shape == [7]
    with pytest.raises(tf.errors.InvalidArgumentError, match="num"):
        dynamic(tf.constant(0))


def test_in_batch_under_mirrored_strategy():
    devices = tf.config.list_logical_devices("CPU")
    if len(devices) < 2:
        pytest.skip("needs 2 logical CPU devices")
    strategy = tf.distribute.MirroredStrategy([d.name for d in devices[:2]])
    with strategy.scope():
        sampler = InBatch(C, learning_rate=0.5)
    reference = InBatch(C, learning_rate=0.5)
    per_replica = [[[0, 1, 1], [2, 3, 3]], [[0, 4, 1], [5, 6, 6]],
                   [[0, 1, 7], [8, 3, 9]]]

    @tf.function
    def step(values):
        def fn(batch):
            return sampler.sample(None, positives=batch)
        return strategy.run(fn, args=(values,))

    for replica_batches in per_replica:
        values = strategy.experimental_distribute_values_from_function(
            lambda ctx, b=replica_batches: tf.constant(
                b[ctx.replica_id_in_sync_group], tf.int64))
        outputs = step(values)
        _, want_log_q = reference.sample(None, positives=replica_batches[0])
        ids = strategy.experimental_local_results(outputs[0])
        log_q = strategy.experimental_local_results(outputs[1])
        for replica, batch in enumerate(replica_batches):
            np.testing.assert_array_equal(ids[replica].numpy(), batch)
        # Both replicas read replica 0's estimate, after this step.
        np.testing.assert_allclose(log_q[0].numpy(), want_log_q.numpy(),
                                   rtol=1e-6)
        np.testing.assert_allclose(
            log_q[1].numpy(),
            reference.log_expected_count(replica_batches[1]).numpy()
            - np.log(3), rtol=1e-6)
        assert np.all(np.isfinite(log_q[1].numpy()))
    # One step per synchronous step; the estimate is replica 0's stream;
    # every copy holds the same state.
    for name in ("step", "last_seen", "period", "num_intervals"):
        copies = [v.numpy() for v in getattr(sampler, name).values]
        np.testing.assert_array_equal(copies[0], copies[1])
        np.testing.assert_array_equal(copies[0],
                                      getattr(reference, name).numpy())
    assert sampler.step.numpy() == 3


# -------------------------------------------------------------------- Mixed


def test_mixed_monte_carlo():
    rng = np.random.default_rng(5)
    p = np.array([0.25, 0.2, 0.15, 0.1, 0.08, 0.06, 0.05, 0.04, 0.03, 0.02,
                  0.02, 0.0])  # item 11 never in a batch
    t, num, warm, trials = 4, 6, 2000, 1500
    other = Unigram(COUNTS, alpha=0.5, smoothing=1.0, seed=8)
    mixed = Mixed(InBatch(C, learning_rate=1.0 / (2 * warm * t)), other)
    run_stream(mixed, rng.choice(C, size=(warm, t), p=p), num=num)
    stream = tf.constant(rng.choice(C, size=(trials, t), p=p), tf.int64)
    all_ids = tf.range(C, dtype=tf.int64)
    k = t + num

    @tf.function
    def monte_carlo(shared):
        observed = tf.zeros([C], tf.float64)
        expected = tf.zeros([C], tf.float64)
        for i in tf.range(trials):
            query = tf.zeros([t, 2])
            ids, log_q = mixed.sample(query, num, shared=shared,
                                      positives=stream[i])
            if not shared:  # rows are exchangeable: count row 0
                ids, log_q = ids[0], log_q[0]
            observed += tf.cast(tf.math.bincount(
                ids, minlength=C, maxlength=C, dtype=tf.int64), tf.float64)
            expected += tf.cast(tf.exp(
                tf.math.log(float(k)) + mixed.log_prob(query, all_ids,
                                                       num=num)), tf.float64)
        return observed, expected

    q_other = np.exp(other.log_prob(None, all_ids).numpy())
    for shared in (True, False):
        observed, expected = (x.numpy() for x in monte_carlo(shared))
        assert_fits(observed, expected, C)
        # The candidates' mean count matches T p + num q_other.
        np.testing.assert_allclose(expected / trials, t * p + num * q_other,
                                   rtol=0.1)
        # Without the in-batch part (or without the draws) it is rejected.
        assert chi2_stat(observed, trials * num * q_other * k / num) > (
            10 * chi2_critical(C))
    # The never-seen item gets only the other part.
    np.testing.assert_allclose(
        np.exp(mixed.log_prob(queries(t), [11], num=num).numpy() + np.log(k)),
        num * q_other[11], rtol=1e-5)
    # exp(log_prob) over the catalog sums to ~1 once converged.
    total = np.exp(mixed.log_prob(queries(t), all_ids, num=num).numpy()).sum()
    np.testing.assert_allclose(total, 1.0, atol=0.03)


def test_mixed_log_q_formula():
    in_batch = InBatch(C)
    mixed = Mixed(in_batch, Uniform(C, seed=1))
    for _ in range(3):
        mixed.sample(None, 5, positives=[0, 0, 3])
    query = queries(3)
    ids, log_q = mixed.sample(query, 5, positives=[0, 0, 3])
    count = 1 / in_batch.estimated_period(ids, never_seen="zero").numpy()
    expected = np.log(count + 5.0 / C) - np.log(3 + 5)
    np.testing.assert_allclose(log_q.numpy(), expected, rtol=1e-5)
    np.testing.assert_array_equal(ids.numpy()[:3], [0, 0, 3])
    # log_prob defaults to the num of the latest sample.
    np.testing.assert_allclose(mixed.log_prob(query, ids).numpy(),
                               log_q.numpy(), rtol=1e-6)
    per_row_ids, per_row_q = mixed.sample(query, 2, shared=False,
                                          positives=[0, 0, 3])
    np.testing.assert_array_equal(per_row_ids.numpy()[:, :3],
                                  [[0, 0, 3]] * 3)
    np.testing.assert_allclose(
        per_row_q.numpy(), mixed.log_prob(query, per_row_ids).numpy(),
        rtol=1e-6)


def test_mixed_with_hard_negatives_is_per_row():
    hard = HardNegatives(Uniform(C, seed=2), pool_size=6)
    mixed = Mixed(InBatch(C), hard)
    assert mixed.query_dependent
    query = queries(3)
    ids, log_q = mixed.sample(query, 2, positives=[1, 2, 3],
                              item_table=item_table())
    assert ids.shape == [3, 5] and log_q.shape == [3, 5]
    # The drawn part's correction is the pool's: log(num) + log q_hard =
    # log(P / C).
    count = 1 / mixed.in_batch.estimated_period(
        ids, never_seen="zero").numpy()
    np.testing.assert_allclose(
        log_q.numpy(), np.log(count + 6.0 / C) - np.log(5), rtol=1e-5)


# ----------------------------------------------------------- HardNegatives


def reference_top(query, table, pool, num, positives):
    """Top-num pool scores per row, positives and repeats ranked last."""
    scores = query @ table.T  # [T, C]
    top = []
    for row in range(query.shape[0]):
        row_pool = pool if pool.ndim == 1 else pool[row]
        seen, values = set(), []
        for item in row_pool:
            if item in seen or item == positives[row]:
                continue
            seen.add(item)
            values.append(scores[row, item])
        top.append(sorted(values, reverse=True)[:num])
    return np.array(top)


@pytest.mark.parametrize("shared", [True, False])
def test_hard_negatives_keep_top_scores_of_pool(shared):
    t, pool_size, num = 5, 9, 3
    query, table = queries(t), item_table()
    positives = np.array([0, 1, 2, 3, 4])
    hard = HardNegatives(Unigram(COUNTS, smoothing=1.0, seed=21),
                         pool_size=pool_size)
    twin = Unigram(COUNTS, smoothing=1.0, seed=21)  # replays the pool
    for _ in range(3):
        ids, log_q = hard.sample(query, num, shared=shared,
                                 positives=positives, item_table=table)
        pool, pool_log_q = twin.sample(query, pool_size, shared=shared)
        scores = (query.numpy() @ table.numpy().T)
        kept = np.take_along_axis(scores, ids.numpy(), axis=1)
        np.testing.assert_allclose(
            kept, reference_top(query.numpy(), table.numpy(), pool.numpy(),
                                num, positives), rtol=1e-5)
        for row in range(t):
            row_pool = pool.numpy() if shared else pool.numpy()[row]
            assert set(ids.numpy()[row]) <= set(row_pool)
            assert positives[row] not in ids.numpy()[row]
            assert len(set(ids.numpy()[row])) == num
        base_q = twin.log_prob(None, ids).numpy()
        np.testing.assert_allclose(
            log_q.numpy(), base_q + np.log(pool_size / num), rtol=1e-5)


def test_hard_negatives_goodness_of_fit_and_bias():
    table, query = item_table(), queries(1)
    scores = (query.numpy() @ table.numpy().T)[0]
    trials = 3000
    # num == pool_size keeps the whole pool: the draws follow exp(log q).
    hard = HardNegatives(Unigram(COUNTS, smoothing=1.0, seed=4), pool_size=4)
    query_rows = tf.tile(query, [trials, 1])
    ids, log_q = hard.sample(query_rows, 4, shared=False, item_table=table)
    observed = np.bincount(ids.numpy().ravel(), minlength=C)
    q = np.exp(hard.log_prob(query, tf.range(C), num=4).numpy()[0])
    np.testing.assert_allclose(q.sum(), 1.0, rtol=1e-5)
    assert_fits(observed, q * ids.numpy().size, C - 1)
    # num < pool_size: biased towards high scores on purpose; the best
    # item is kept far more often than its base share and the fit fails.
    ids, _ = hard.sample(query_rows, 1, shared=False, item_table=table)
    observed = np.bincount(ids.numpy().ravel(), minlength=C)
    base_q = np.exp(hard.base.log_prob(None, tf.range(C)).numpy())
    assert chi2_stat(observed, base_q * trials) > 10 * chi2_critical(C - 1)
    best = int(np.argmax(scores))
    assert observed[best] > 2 * base_q[best] * trials
    # The kept item is never below the pool's best: P(best kept) equals
    # P(best in a pool of 4) = 1 - (1 - q)^4.
    np.testing.assert_allclose(observed[best] / trials,
                               1 - (1 - base_q[best]) ** 4, atol=0.03)


def test_hard_negatives_log_prob_shapes():
    hard = HardNegatives(Uniform(C), pool_size=10)
    query = queries(3)
    assert hard.log_prob(query, [1, 2], num=5).shape == [3, 2]
    np.testing.assert_allclose(hard.log_prob(query, [[1], [2], [3]],
                                             num=5).numpy(),
                               np.full([3, 1], np.log(10 / 5 / C)),
                               rtol=1e-6)
    with pytest.raises(ValueError, match="num"):
        hard.log_prob(query, [1])  # no sample yet, no num


def test_samplers_in_sampled_softmax():
    query, table = queries(4), item_table()
    positives = tf.constant([1, 2, 2, 5], tf.int64)
    for sampler, num, shared in [
            (InBatch(C), None, True),
            (Mixed(InBatch(C), Uniform(C, seed=1)), 5, True),
            (Mixed(InBatch(C), Uniform(C, seed=1)), 5, False),
            (HardNegatives(Uniform(C, seed=2), pool_size=8), 3, False),
            (Mixed(InBatch(C), HardNegatives(Uniform(C), pool_size=8)), 3,
             True)]:
        loss = SampledSoftmax(sampler, num, shared=shared,
                              correct_positive=True)
        value = loss(query, table, positives)
        assert np.isfinite(value.numpy()) and value.numpy() > 0


# ---------------------------------------------------------------- bad input


@pytest.mark.parametrize("name", CONTEXT_FREE)
def test_bad_num(name):
    sampler = context_free(name)
    for num in (0, -3, True, 2.5):
        with pytest.raises(ValueError, match="num"):
            sampler.sample(None, num)

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32)])
    def dynamic(num):
        return sampler.sample(None, num)[0]

    with pytest.raises(tf.errors.InvalidArgumentError, match="num"):
        dynamic(tf.constant(0))


def test_bad_num_composed():
    positives = [1, 2]
    with pytest.raises(ValueError, match="num"):
        Mixed(InBatch(C), Uniform(C)).sample(None, 0, positives=positives)
    hard = HardNegatives(Uniform(C), pool_size=4)
    with pytest.raises(ValueError, match="num"):
        hard.sample(queries(2), 0, item_table=item_table())
    with pytest.raises(ValueError, match="pool_size"):
        hard.sample(queries(2), 5, item_table=item_table())
    with pytest.raises(ValueError, match="pool_size"):
        HardNegatives(Uniform(C), pool_size=0)

    @tf.function(input_signature=[tf.TensorSpec([], tf.int32)])
    def dynamic(num):
        return hard.sample(queries(2), num, item_table=item_table())[0]

    assert dynamic(tf.constant(4)).shape == [2, 4]
    with pytest.raises(tf.errors.InvalidArgumentError, match="pool_size"):
        dynamic(tf.constant(5))


def test_missing_arguments():
    query = queries(2)
    with pytest.raises(ValueError, match="positives"):
        InBatch(C).sample(query)
    with pytest.raises(ValueError, match="positives"):
        Mixed(InBatch(C), Uniform(C)).sample(query, 3)
    hard = HardNegatives(Uniform(C), pool_size=4)
    with pytest.raises(ValueError, match="query"):
        hard.sample(None, 2, item_table=item_table())
    with pytest.raises(ValueError, match="item_table"):
        hard.sample(query, 2)
    with pytest.raises(ValueError, match="query"):
        Uniform(C).sample(None, 3, shared=False)
    with pytest.raises(ValueError, match="query"):
        InBatch(C).log_prob(None, [1])
    with pytest.raises(ValueError, match="query"):
        Mixed(InBatch(C), Uniform(C)).log_prob(None, [1], num=2)
    with pytest.raises(ValueError, match="query"):
        hard.log_prob(None, [1], num=2)
    with pytest.raises(ValueError, match="num"):
        Mixed(InBatch(C), Uniform(C)).log_prob(query, [1])


@pytest.mark.parametrize("name", ALL)
@pytest.mark.parametrize("bad", [[-1], [C], [[0, C + 3]]])
def test_log_prob_rejects_bad_ids(name, bad):
    sampler, kwargs = draw_args(name)
    if name == "hard_negatives" and np.ndim(bad) == 2:
        bad = bad * 3  # [T, K] rows must match the query's T = 3
    with pytest.raises(tf.errors.InvalidArgumentError, match="ids"):
        log_prob_of(sampler, kwargs["query"], tf.constant(bad, tf.int64),
                    num=kwargs["num"] or 3)


@pytest.mark.parametrize("name", ["in_batch", "mixed", "hard_negatives"])
def test_bad_positives(name):
    sampler, kwargs = draw_args(name)
    for bad, error in [([0, -1, 2], tf.errors.InvalidArgumentError),
                       ([0, 1, C], tf.errors.InvalidArgumentError),
                       ([[0, 1, 2]], ValueError),
                       ([0.0, 1.0, 2.0], ValueError)]:
        kwargs["positives"] = tf.constant(bad)
        with pytest.raises(error, match="positives"):
            sampler.sample(**kwargs)


def test_log_prob_rejects_float_ids():
    with pytest.raises(ValueError, match="ids"):
        Uniform(C).log_prob(None, tf.constant([1.0]))
    with pytest.raises(ValueError, match="ids"):
        InBatch(C).log_prob(queries(2), tf.constant([1.0]))


@pytest.mark.parametrize("counts", [[1.0, 0.0, 2.0], [1.0, -1.0, 2.0],
                                    [1.0, np.nan, 2.0], [1.0, np.inf, 2.0],
                                    [], [[1.0, 2.0]]])
def test_unigram_rejects_bad_counts(counts):
    with pytest.raises(ValueError, match="counts"):
        Unigram(counts)


def test_unigram_zero_counts_with_smoothing_are_drawable():
    sampler = Unigram([0.0, 0.0, 5.0], smoothing=1.0, seed=1)
    np.testing.assert_allclose(
        np.exp(sampler.log_prob(None, [0, 1, 2]).numpy()), [1 / 8, 1 / 8,
                                                             6 / 8],
        rtol=1e-5)
    ids, _ = sampler.sample(None, 2000)
    assert set(np.unique(ids.numpy())) == {0, 1, 2}


@pytest.mark.parametrize("name", ALL)
def test_bad_query_rank(name):
    sampler, kwargs = draw_args(name, shared=name == "in_batch")
    kwargs["query"] = tf.zeros([3, 4, 1])
    with pytest.raises(ValueError, match="query"):
        sampler.sample(**kwargs)


def test_bad_query_dtype_and_table():
    hard = HardNegatives(Uniform(C), pool_size=4)
    with pytest.raises(ValueError, match="query"):
        hard.sample(tf.zeros([2, 4], tf.int32), 2, item_table=item_table())
    with pytest.raises(ValueError, match="query"):
        hard.log_prob(tf.zeros([2, 4], tf.int32), [1], num=2)
    with pytest.raises(ValueError, match="item_table"):
        hard.sample(queries(2), 2, item_table=tf.zeros([C]))
    with pytest.raises(ValueError, match="item_table"):
        hard.sample(queries(2), 2, item_table=tf.zeros([C + 1, 4]))
    with pytest.raises(ValueError, match="same D"):
        hard.sample(queries(2), 2, item_table=tf.zeros([C, 5]))
    with pytest.raises(ValueError, match="rows"):
        InBatch(C).sample(queries(4), positives=[1, 2, 3])


def test_bad_constructor_arguments():
    for rate in (0.0, -0.1, 1.5, float("nan")):
        with pytest.raises(ValueError, match="learning_rate"):
            InBatch(C, learning_rate=rate)
    for buckets in (0, -2, 2.5, True):
        with pytest.raises(ValueError, match="num_buckets"):
            InBatch(C, num_buckets=buckets)
    for num_items in (0, -1, 2.0, None):
        with pytest.raises(ValueError, match="num_items"):
            InBatch(num_items)
    with pytest.raises(ValueError, match="num_items"):
        Mixed(InBatch(C), Uniform(C + 1))
    with pytest.raises(ValueError, match="in_batch"):
        Mixed(Uniform(C), Uniform(C))
    with pytest.raises(ValueError, match="other"):
        Mixed(InBatch(C), InBatch(C))
    with pytest.raises(ValueError, match="other"):
        Mixed(InBatch(C), "uniform")
    with pytest.raises(ValueError, match="base"):
        HardNegatives(InBatch(C), pool_size=4)
    with pytest.raises(ValueError, match="never_seen"):
        InBatch(C).estimated_period([1], never_seen="sometimes")


def test_samplers_are_candidate_samplers():
    for name in ALL:
        sampler, _ = draw_args(name)
        assert isinstance(sampler, CandidateSampler)
    assert HardNegatives.query_dependent and not InBatch.query_dependent
    assert not Mixed(InBatch(C), Uniform(C)).query_dependent
