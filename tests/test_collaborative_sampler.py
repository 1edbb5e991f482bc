"""CollaborativeSampler (CoSam): the walk, draws, learning, state, errors.

The oracle of the walk is an independent NumPy simulation of the walk the
module docstring describes, walker by walker. Goodness of fit: Pearson's
statistic of the counts against N p, summed over users, compared with the
Wilson-Hilferty chi-square quantile at z = 5 as in tests/test_samplers.py
(a correct sampler fails by chance with probability < 1e-6; the seeds are
fixed, so each test is deterministic). Each fit test also checks that a
wrong distribution lands above that threshold, so the test has power.

Also covered: the reward hook of `SampledSoftmax` / `SampledRetrieval`,
`ReinforcedSamplerModel` in `model.fit`, `IntegratedScorer`, the per-user
`item_bias` of the ranking metrics and the `users` plumbing of the data
pipeline and the models.

The toy graph (U = 4 users, C = 6 items):

    user 0: items 0, 1, 2      item 5: nobody (the walk always stops there)
    user 1: items 1, 3         user 3: no items (only jumps)
    user 2: items 2, 3, 4
"""

import math

import numpy as np
import pytest

import tfrec_fast  # noqa: F401  (selects tf_keras before TF loads)
import tensorflow as tf
import tf_keras

from tfrec_fast import data
from tfrec_fast.layers import IntegratedScorer
from tfrec_fast.losses import SampledSoftmax
from tfrec_fast.metrics import evaluate_full_ranking
from tfrec_fast.metrics import rank_of_targets
from tfrec_fast.metrics import ranking_metrics
from tfrec_fast.metrics import top_k_excluding
from tfrec_fast.models import HistoryTwoTower
from tfrec_fast.models import ReinforcedSamplerModel
from tfrec_fast.models import SASRec
from tfrec_fast.models.sasrec import position_users
from tfrec_fast.samplers import CollaborativeSampler
from tfrec_fast.samplers import Uniform
from tfrec_fast.samplers import Unigram
from tfrec_fast.samplers.collaborative import graph_edges
from tfrec_fast.tasks import NextItemTask
from tfrec_fast.tasks import SampledRetrieval

NUM_USERS, NUM_ITEMS = 4, 6
EDGE_USERS = np.array([0, 0, 0, 1, 1, 2, 2, 2])
EDGE_ITEMS = np.array([0, 1, 2, 1, 3, 2, 3, 4])
OBSERVED = {0: [0, 1, 2], 1: [1, 3], 2: [2, 3, 4], 3: []}
ALL_USERS = np.arange(NUM_USERS)


def chi2_critical(dof, z=5.0):
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def pearson(counts, probabilities):
    """Pearson statistic of count rows vs N p (items with p > 0), summed,
    and its degrees of freedom."""
    total, dof = 0.0, 0
    for row, p in zip(counts, probabilities):
        support = p > 0
        expected = row.sum() * p[support]
        total += float(np.sum((row[support] - expected) ** 2 / expected))
        dof += int(support.sum()) - 1
    return total, dof


def toy_sampler(logit_seed=0, **kwargs):
    """The toy graph; random non-zero logits unless logit_seed is None."""
    kwargs.setdefault("stop_probability", 0.4)
    kwargs.setdefault("max_length", 3)
    kwargs.setdefault("seed", 1)
    sampler = CollaborativeSampler.from_interactions(
        EDGE_USERS, EDGE_ITEMS, NUM_USERS, NUM_ITEMS, **kwargs)
    # The toy edges are already sorted by (user, item): logit e is edge e.
    np.testing.assert_array_equal(sampler.edge_index.numpy(),
                                  np.stack([EDGE_USERS, EDGE_ITEMS], 1))
    if logit_seed is not None:
        rng = np.random.default_rng(logit_seed)
        edges = EDGE_USERS.size
        sampler.user_to_item_logits.assign(rng.normal(size=edges))
        sampler.item_to_user_logits.assign(rng.normal(size=edges))
        sampler.jump_logits.assign(rng.normal(size=NUM_USERS))
    return sampler


def softmax(logits):
    e = np.exp(logits - logits.max())
    return e / e.sum()


def simulate_walks(sampler, start_user, num_walks, rng):
    """Emitted-item counts [C] of `num_walks` NumPy walks from a user.

    Follows the module docstring step by step, from the sampler's logits
    and its constructor arguments only (not from its walk code).
    """
    w1 = sampler.user_to_item_logits.numpy().astype(np.float64)
    w2 = sampler.item_to_user_logits.numpy().astype(np.float64)
    w0 = sampler.jump_logits.numpy().astype(np.float64)
    num_users, num_items = sampler.num_users, sampler.num_items
    user = np.full(num_walks, start_user)
    emitted = np.full(num_walks, -1)
    active = np.ones(num_walks, bool)
    for _ in range(sampler.max_length):
        # At a user: jump (option 0) or one of the user's edges.
        item = np.full(num_walks, -1)
        for u in range(num_users):
            at = np.flatnonzero(active & (user == u))
            if not at.size:
                continue
            edges = np.flatnonzero(EDGE_USERS == u)
            choice = rng.choice(edges.size + 1, size=at.size,
                                p=softmax(np.concatenate([[w0[u]],
                                                          w1[edges]])))
            uniform = rng.integers(num_items, size=at.size)
            along = EDGE_ITEMS[edges][np.maximum(choice - 1, 0)] \
                if edges.size else uniform
            item[at] = np.where(choice == 0, uniform, along)
        # At an item: stop, or back to one of its users by softmax of w2.
        for i in range(num_items):
            at = np.flatnonzero(active & (item == i))
            if not at.size:
                continue
            edges = np.flatnonzero(EDGE_ITEMS == i)
            stop = 1.0 if edges.size == 0 else sampler.stop_probability
            stops = rng.random(at.size) < stop
            emitted[at[stops]] = i
            active[at[stops]] = False
            movers = at[~stops]
            if movers.size:
                user[movers] = EDGE_USERS[edges][rng.choice(
                    edges.size, size=movers.size, p=softmax(w2[edges]))]
    # Past max_length user -> item moves: a uniform item.
    left = np.flatnonzero(active)
    emitted[left] = rng.integers(num_items, size=left.size)
    return np.bincount(emitted, minlength=num_items)


def observed_mask():
    mask = np.zeros((NUM_USERS, NUM_ITEMS), bool)
    for user, items in OBSERVED.items():
        mask[user, items] = True
    return mask


# ---------------------------------------------------------------------------
# The walk's distribution.

def test_item_probabilities_match_monte_carlo_walks():
    sampler = toy_sampler()
    probs = sampler.item_probabilities(ALL_USERS,
                                       exclude_observed=False).numpy()
    assert probs.shape == (NUM_USERS, NUM_ITEMS)
    np.testing.assert_allclose(probs.sum(1), 1.0, atol=1e-5)
    assert np.all(probs > 0)
    rng = np.random.default_rng(123)
    counts = np.stack([simulate_walks(sampler, u, 100_000, rng)
                       for u in ALL_USERS])
    statistic, dof = pearson(counts, probs.astype(np.float64))
    assert dof == NUM_USERS * (NUM_ITEMS - 1)
    assert statistic < chi2_critical(dof)
    # Power: the walk with every logit 0 is far off at this sample size.
    flat = toy_sampler(logit_seed=None).item_probabilities(
        ALL_USERS, exclude_observed=False).numpy()
    assert pearson(counts, flat.astype(np.float64))[0] > \
        10 * chi2_critical(dof)


def test_duplicate_and_reordered_users_get_their_own_rows():
    sampler = toy_sampler()
    single = sampler.item_probabilities(ALL_USERS).numpy()
    users = np.array([2, 0, 2, 3, 1, 0])
    np.testing.assert_allclose(sampler.item_probabilities(users).numpy(),
                               single[users], rtol=1e-6, atol=1e-7)
    # [T, 1] user ids are accepted as [T].
    np.testing.assert_allclose(
        sampler.item_probabilities(users[:, None]).numpy(), single[users],
        rtol=1e-6, atol=1e-7)


def test_user_without_history_is_a_fallback_not_an_error():
    sampler = toy_sampler()
    assert sampler.observed_items([3]).to_list() == [[]]
    probs = sampler.item_probabilities([3]).numpy()[0]
    np.testing.assert_allclose(probs.sum(), 1.0, atol=1e-5)
    # Nothing to exclude: the same distribution as without exclusion.
    np.testing.assert_allclose(
        probs, sampler.item_probabilities([3], exclude_observed=False)
        .numpy()[0], rtol=1e-6)
    ids, log_q = sampler.sample([3, 3], 50, shared=False)
    assert np.all(np.isfinite(log_q.numpy()))
    assert np.all((ids.numpy() >= 0) & (ids.numpy() < NUM_ITEMS))
    # With stop_probability 1 the first (uniform) jump is always emitted.
    stopping = toy_sampler(stop_probability=1.0)
    np.testing.assert_allclose(stopping.item_probabilities([3]).numpy()[0],
                               np.full(NUM_ITEMS, 1 / NUM_ITEMS), rtol=1e-6)


# ---------------------------------------------------------------------------
# Draws and log q.

def test_draws_match_item_probabilities_and_log_q_is_exact():
    sampler = toy_sampler()
    users = np.array([0, 1, 2, 3, 2])
    probs = sampler.item_probabilities(users).numpy()  # exclude_observed
    ids, log_q = sampler.sample(users, 20_000, shared=False)
    ids, log_q = ids.numpy(), log_q.numpy()
    assert ids.shape == (5, 20_000) and ids.dtype == np.int64
    assert log_q.dtype == np.float32
    counts = np.stack([np.bincount(row, minlength=NUM_ITEMS) for row in ids])
    assert np.all(counts[probs == 0] == 0)
    statistic, dof = pearson(counts, probs.astype(np.float64))
    assert statistic < chi2_critical(dof)
    wrong = probs * np.where(np.arange(NUM_ITEMS) % 2, 1.1, 0.9)
    wrong /= wrong.sum(1, keepdims=True)
    assert pearson(counts, wrong)[0] > chi2_critical(dof)
    # log q of every draw, and log_prob of the same ids ([T, K]).
    want = np.log(np.take_along_axis(probs, ids, 1))
    np.testing.assert_allclose(log_q, want, rtol=1e-6)
    np.testing.assert_allclose(sampler.log_prob(users, ids).numpy(), want,
                               rtol=1e-6)
    # Shared ids [K]: every row scored.
    shared = np.array([5, 0, 3])
    with np.errstate(divide="ignore"):
        want_shared = np.log(probs[:, shared])
    np.testing.assert_allclose(sampler.log_prob(users, shared).numpy(),
                               want_shared, rtol=1e-6)


def test_draws_are_reproducible_and_advance():
    first = toy_sampler(seed=5).sample(ALL_USERS, 30, shared=False)[0]
    sampler = toy_sampler(seed=5)
    again = sampler.sample(ALL_USERS, 30, shared=False)[0]
    np.testing.assert_array_equal(first.numpy(), again.numpy())
    later = sampler.sample(ALL_USERS, 30, shared=False)[0]
    assert not np.array_equal(later.numpy(), again.numpy())
    assert int(sampler.draw_counter.numpy()) == 2


def test_exclude_observed_renormalises_and_never_draws_observed():
    sampler = toy_sampler()
    mask = observed_mask()
    raw = sampler.item_probabilities(ALL_USERS,
                                     exclude_observed=False).numpy()
    kept = sampler.item_probabilities(ALL_USERS).numpy()
    mass = (raw * mask).sum(1, keepdims=True)
    np.testing.assert_array_equal(kept[mask], 0.0)
    np.testing.assert_allclose(kept, np.where(mask, 0.0, raw / (1 - mass)),
                               rtol=1e-5)
    np.testing.assert_allclose(kept.sum(1), 1.0, atol=1e-5)
    ids = sampler.sample(np.repeat(ALL_USERS, 50), 200, shared=False)[0]
    ids = ids.numpy().reshape(NUM_USERS, -1)
    for user, items in OBSERVED.items():
        assert not np.isin(ids[user], items).any()
    log_q = sampler.log_prob(ALL_USERS, np.arange(NUM_ITEMS)).numpy()
    assert np.all(np.isneginf(log_q[mask]))
    assert np.all(np.isfinite(log_q[~mask]))

    keeping = toy_sampler(exclude_observed=False)
    ids = keeping.sample(np.repeat(ALL_USERS, 50), 200, shared=False)[0]
    ids = ids.numpy().reshape(NUM_USERS, -1)
    for user, items in OBSERVED.items():
        assert np.isin(items, ids[user]).all()
    log_q = keeping.log_prob(ALL_USERS, np.arange(NUM_ITEMS)).numpy()
    np.testing.assert_allclose(np.exp(log_q), raw, rtol=1e-6)


def test_observed_items_lists_each_users_training_items():
    sampler = toy_sampler()
    assert sampler.observed_items([2, 0, 3]).to_list() == [
        OBSERVED[2], OBSERVED[0], OBSERVED[3]]


def test_graph_edges_deduplicate_and_sort():
    users, items = graph_edges([2, 0, 2, 0, 0], [1, 3, 1, 0, 3], 3, 4)
    np.testing.assert_array_equal(users, [0, 0, 2])
    np.testing.assert_array_equal(items, [0, 3, 1])
    sampler = CollaborativeSampler.from_interactions(
        [2, 0, 2, 0, 0], [1, 3, 1, 0, 3], 3, 4)
    assert sampler.num_edges == 3
    np.testing.assert_array_equal(sampler.user_splits.numpy(), [0, 2, 2, 3])
    np.testing.assert_array_equal(sampler.item_degree.numpy(), [1, 1, 0, 1])


# ---------------------------------------------------------------------------
# Learning.

def test_reinforce_raises_the_probability_of_rewarded_negatives():
    sampler = toy_sampler(logit_seed=None, seed=3)
    users = np.array([0, 1, 3])  # item 4 is a negative of all three
    rewarded = 4
    before = sampler.item_probabilities(users).numpy()[:, rewarded]
    optimizer = tf_keras.optimizers.Adam(0.1)
    for _ in range(25):
        ids, _ = sampler.sample(users, 64, shared=False)
        rewards = tf.cast(tf.equal(ids, rewarded), tf.float32) * 3.0
        with tf.GradientTape() as tape:
            surrogate = sampler.reinforce_loss(users, ids, rewards)
        assert float(surrogate) == 0.0
        variables = sampler.trainable_variables
        optimizer.apply_gradients(zip(tape.gradient(surrogate, variables),
                                      variables))
    after = sampler.item_probabilities(users).numpy()[:, rewarded]
    assert np.all(after > 1.5 * before), (before, after)


def test_reinforce_gradient_is_the_advantage_weighted_score_function():
    sampler = toy_sampler()
    users = np.array([0, 2])
    ids = np.array([[3, 5, 3], [0, 5, 1]])
    rewards = np.array([[1.0, 0.0, 2.0], [0.5, 0.5, 3.5]], np.float32)
    variables = sampler.trainable_variables
    with tf.GradientTape() as tape:
        surrogate = sampler.reinforce_loss(users, ids, rewards)
    got = tape.gradient(surrogate, variables)
    advantage = rewards - rewards.mean(1, keepdims=True)
    with tf.GradientTape() as tape:
        log_q = sampler.log_prob(users, ids)
        want_objective = -tf.reduce_mean(advantage * log_q)
    want = tape.gradient(want_objective, variables)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-5,
                                   atol=1e-7)


def test_sampled_softmax_hands_its_negatives_rewards():
    sampler = toy_sampler(seed=4)
    rng = np.random.default_rng(2)
    table = tf.constant(rng.normal(size=(NUM_ITEMS, 5)).astype(np.float32))
    hidden = tf.constant(rng.normal(size=(4, 5)).astype(np.float32))
    positives = tf.constant([0, 3, 4, 1], tf.int64)
    users = tf.constant([0, 1, 2, 3], tf.int64)
    loss = SampledSoftmax(sampler, 7, shared=False)
    with tf.GradientTape() as tape:
        value = loss(hidden, table, positives, sampler_query=users)
    assert np.isfinite(float(value))
    assert len(sampler.losses) == 1 and float(sampler.losses[0]) == 0.0
    gradients = tape.gradient(sampler.losses[0],
                              sampler.trainable_variables)
    assert all(g is not None for g in gradients)
    assert any(np.abs(g.numpy()).max() > 0 for g in gradients)


def test_rewards_are_the_pairwise_loss_and_observed_reward_on_hits():
    # Without exclusion the positives can be drawn: those hits get
    # observed_reward; every other negative softplus(s_neg - s_pos).
    def make():
        return toy_sampler(exclude_observed=False, observed_reward=-2.0,
                           seed=8)

    sampler, twin = make(), make()
    rng = np.random.default_rng(5)
    table = rng.normal(size=(NUM_ITEMS, 3)).astype(np.float32)
    hidden = rng.normal(size=(4, 3)).astype(np.float32)
    positives = np.array([0, 3, 4, 5])
    users = np.array([0, 1, 2, 3])
    with tf.GradientTape() as tape:
        SampledSoftmax(sampler, 20, shared=False)(hidden, table, positives,
                                                  sampler_query=users)
        (surrogate,) = sampler.losses
    got = tape.gradient(surrogate, sampler.trainable_variables)

    ids = twin.sample(users, 20, shared=False)[0].numpy()  # the same draws
    hits = ids == positives[:, None]
    assert hits.any() and not hits.all()
    negative = np.einsum("td,tkd->tk", hidden, table[ids])
    positive = np.sum(hidden * table[positives], 1)[:, None]
    rewards = np.where(hits, -2.0, np.logaddexp(0.0, negative - positive))
    with tf.GradientTape() as tape:
        want = twin.reinforce_loss(users, ids, rewards.astype(np.float32))
    want = tape.gradient(want, twin.trainable_variables)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g.numpy(), w.numpy(), rtol=1e-4,
                                   atol=1e-6)


# ---------------------------------------------------------------------------
# State.

def test_checkpoint_round_trip_reproduces_draws_and_probabilities(tmp_path):
    sampler = toy_sampler(seed=6)
    sampler.sample(ALL_USERS, 4, shared=False)
    checkpoint = tf.train.Checkpoint(sampler=sampler)
    path = checkpoint.save(str(tmp_path / "cosam"))
    want_ids, want_log_q = sampler.sample(ALL_USERS, 16, shared=False)
    want_probs = sampler.item_probabilities(ALL_USERS).numpy()
    # Move the logits and the counter; restoring brings both back.
    sampler.jump_logits.assign_add(tf.ones([NUM_USERS]))
    sampler.sample(ALL_USERS, 4, shared=False)
    checkpoint.restore(path).assert_consumed()
    ids, log_q = sampler.sample(ALL_USERS, 16, shared=False)
    np.testing.assert_array_equal(ids.numpy(), want_ids.numpy())
    np.testing.assert_array_equal(log_q.numpy(), want_log_q.numpy())

    # A layer from the config gets its graph and logits from the checkpoint.
    clone = CollaborativeSampler.from_config(sampler.get_config())
    assert clone.get_config() == sampler.get_config()
    tf.train.Checkpoint(sampler=clone).restore(path).assert_consumed()
    np.testing.assert_array_equal(clone.edge_index.numpy(),
                                  sampler.edge_index.numpy())
    np.testing.assert_allclose(clone.item_probabilities(ALL_USERS).numpy(),
                               want_probs, rtol=1e-6)
    ids, _ = clone.sample(ALL_USERS, 16, shared=False)
    np.testing.assert_array_equal(ids.numpy(), want_ids.numpy())


def test_serialize_round_trip_keeps_the_options():
    sampler = toy_sampler(stop_probability=0.7, max_length=5,
                          exclude_observed=False, observed_reward=2.5,
                          initial_jump_logit=-1.0, seed=11)
    clone = tf_keras.layers.deserialize(tf_keras.layers.serialize(sampler))
    assert isinstance(clone, CollaborativeSampler)
    for key in ("num_users", "num_items", "num_edges", "stop_probability",
                "max_length", "exclude_observed", "observed_reward",
                "initial_jump_logit", "seed"):
        assert clone.get_config()[key] == sampler.get_config()[key]
    np.testing.assert_allclose(clone.jump_logits.numpy(), -1.0)


def test_set_graph_resets_the_logits():
    sampler = toy_sampler()
    sampler.set_graph(EDGE_USERS[::-1], EDGE_ITEMS[::-1])  # any order
    np.testing.assert_array_equal(sampler.edge_index.numpy(),
                                  np.stack([EDGE_USERS, EDGE_ITEMS], 1))
    np.testing.assert_array_equal(sampler.user_to_item_logits.numpy(), 0.0)
    np.testing.assert_array_equal(sampler.item_to_user_logits.numpy(), 0.0)
    np.testing.assert_array_equal(sampler.jump_logits.numpy(), 0.0)
    with pytest.raises(ValueError, match="distinct"):
        sampler.set_graph(np.zeros(8, np.int64), np.zeros(8, np.int64))
    with pytest.raises(ValueError, match="num_edges"):
        sampler.set_graph(EDGE_USERS[:3], EDGE_ITEMS[:3])


# ---------------------------------------------------------------------------
# Users in the pipeline and the models; training in model.fit.

def test_next_item_dataset_yields_each_rows_user(toy_split):
    train = toy_split.train
    batches = list(data.next_item_dataset(train, 16, max_len=5,
                                          shuffle=True, with_users=True))
    seen = []
    for batch in batches:
        users = batch["users"].numpy()
        assert batch["users"].dtype == tf.int64
        assert users.shape == (batch["item_ids"].nrows(),)
        for user, ids, targets in zip(users, batch["item_ids"].to_list(),
                                      batch["targets"].to_list()):
            row = train.sequence(user)
            assert ids == list(row[-len(ids) - 1:-1])
            assert targets == list(row[-len(ids):])
        seen.extend(users)
    assert sorted(seen) == list(np.flatnonzero(train.lengths >= 2))
    plain = next(iter(data.next_item_dataset(train, 16, max_len=5)))
    assert "users" not in plain


def test_position_users_repeats_each_rows_user():
    item_ids = tf.ragged.constant([[1, 2, 3], [4], [5, 6]], tf.int64)
    users = position_users({"users": tf.constant([7, 0, 2])}, item_ids)
    np.testing.assert_array_equal(users.numpy(), [7, 7, 7, 0, 2, 2])
    assert users.dtype == tf.int64
    assert position_users({"item_ids": item_ids}, item_ids) is None


class ReinforcedSASRec(ReinforcedSamplerModel):
    """SASRec whose CoSam sampler trains with its own optimizer."""

    def __init__(self, recommender, **kwargs):
        super().__init__(**kwargs)
        self.recommender = recommender

    def compute_loss(self, inputs, training=False):
        return self.recommender.compute_loss(inputs, training=training)


def fit_reinforced_sasrec(split, sampler_optimizer):
    tf_keras.utils.set_random_seed(0)
    sampler = CollaborativeSampler.from_sequences(
        split.train, split.num_items, seed=2)
    recommender = SASRec(split.num_items, max_len=20, dim=16, num_blocks=1,
                         dropout=0.0, task=NextItemTask(
                             SampledSoftmax(sampler, 8, shared=False)))
    model = ReinforcedSASRec(recommender,
                             sampler_optimizer=sampler_optimizer)
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2))
    train = data.next_item_dataset(split.train, batch_size=40, max_len=20,
                                   with_users=True)
    recommender.compute_loss(next(iter(train)))  # builds the weights
    before = {"sampler": [v.numpy() for v in sampler.trainable_variables],
              "items": recommender.item_table.numpy()}
    history = model.fit(train, epochs=2, verbose=0).history
    return model, sampler, before, history


def test_reinforced_model_trains_sampler_with_its_own_optimizer(toy_split):
    sampler_optimizer = tf_keras.optimizers.Adam(0.05)
    model, sampler, before, history = fit_reinforced_sasrec(
        toy_split, sampler_optimizer)
    assert np.all(np.isfinite(history["loss"]))
    # The surrogates are 0: they add nothing to the reported loss.
    np.testing.assert_allclose(history["regularization_loss"], 0.0)
    assert int(sampler_optimizer.iterations.numpy()) > 0
    assert int(sampler.draw_counter.numpy()) > 0
    assert any(np.abs(after.numpy() - start).max() > 1e-3 for after, start
               in zip(sampler.trainable_variables, before["sampler"]))
    assert np.abs(model.recommender.item_table.numpy()
                  - before["items"]).max() > 1e-3


def test_reinforced_model_keeps_sampler_out_of_the_model_optimizer(
        toy_split):
    # A sampler optimizer that cannot move anything: if the model's
    # optimizer touched the sampler, its logits would move.
    sampler_optimizer = tf_keras.optimizers.SGD(0.0)
    model, sampler, before, _ = fit_reinforced_sasrec(toy_split,
                                                      sampler_optimizer)
    assert int(sampler_optimizer.iterations.numpy()) > 0
    for after, start in zip(sampler.trainable_variables, before["sampler"]):
        np.testing.assert_array_equal(after.numpy(), start)
    assert np.abs(model.recommender.item_table.numpy()
                  - before["items"]).max() > 1e-3


def test_plain_tfrs_model_trains_sampler_through_model_losses(toy_split):
    tf_keras.utils.set_random_seed(0)
    sampler = CollaborativeSampler.from_sequences(
        toy_split.train, toy_split.num_items, seed=3)
    model = None
    task = SampledRetrieval(
        sampler, 8, shared=False,
        candidate_tower=lambda ids: model.candidate_embedding(ids))
    model = HistoryTwoTower(toy_split.num_items, task, dim=8, max_len=20)
    model.compile(optimizer=tf_keras.optimizers.Adam(0.05))
    train = data.next_item_dataset(toy_split.train, batch_size=40,
                                   max_len=20, with_users=True)
    batch = next(iter(train))
    model.compute_loss(batch, training=True)
    # The surrogate is one of model.losses (value 0) and reaches the sampler.
    assert len(model.losses) == 1 and float(model.losses[0]) == 0.0
    before = [v.numpy() for v in sampler.trainable_variables]
    history = model.fit(train, epochs=2, verbose=0).history["loss"]
    assert np.all(np.isfinite(history))
    assert any(np.abs(after.numpy() - start).max() > 1e-3 for after, start
               in zip(sampler.trainable_variables, before))


# ---------------------------------------------------------------------------
# Integrated prediction.

def test_integrated_scorer_adds_the_walks_log_probability():
    sampler = toy_sampler()
    scorer = IntegratedScorer(sampler, weight=0.5)
    rng = np.random.default_rng(3)
    scores = rng.normal(size=(5, NUM_ITEMS)).astype(np.float32)
    users = np.array([0, 3, 2, 0, 1])
    raw = sampler.item_probabilities(users, exclude_observed=False).numpy()
    want = scores + 0.5 * np.log(raw)
    np.testing.assert_allclose(scorer(scores, users).numpy(), want,
                               rtol=1e-5)
    np.testing.assert_allclose(scorer.item_bias(users).numpy(),
                               0.5 * np.log(raw), rtol=1e-5)


def test_integrated_scorer_with_a_query_independent_sampler():
    counts = np.array([5.0, 1.0, 0.0, 3.0])
    sampler = Unigram(counts, smoothing=1.0, seed=0)
    scorer = IntegratedScorer(sampler)
    scores = np.arange(8, dtype=np.float32).reshape(2, 4)
    q = (counts + 1.0) / (counts + 1.0).sum()
    np.testing.assert_allclose(scorer(scores, None).numpy(),
                               scores + np.log(q), rtol=1e-5)


def test_integrated_scorer_floors_zero_probabilities():
    # Never jumping and always stopping, user 0 reaches only its own items:
    # the others get p_s = 0 (exp underflows), whose log the floor catches.
    sampler = toy_sampler(logit_seed=None, stop_probability=1.0)
    sampler.jump_logits.assign(tf.fill([NUM_USERS], -200.0))
    raw = sampler.item_probabilities([0], exclude_observed=False).numpy()[0]
    np.testing.assert_array_equal(raw[3:], 0.0)
    scorer = IntegratedScorer(sampler, min_log_prob=-20.0)
    out = scorer(np.zeros((1, NUM_ITEMS), np.float32), [0]).numpy()[0]
    np.testing.assert_allclose(out[3:], -20.0)
    np.testing.assert_allclose(out[:3], np.log(1 / 3), rtol=1e-5)


def test_integrated_scorer_config_round_trip():
    sampler = toy_sampler()
    scorer = IntegratedScorer(sampler, weight=0.25, min_log_prob=-12.0)
    clone = IntegratedScorer.from_config(scorer.get_config())
    assert isinstance(clone.sampler, CollaborativeSampler)
    assert clone.get_config() == scorer.get_config()
    # The config carries no graph: the weights bring it.
    clone.sampler.set_weights(sampler.get_weights())
    scores = np.zeros((NUM_USERS, NUM_ITEMS), np.float32)
    np.testing.assert_allclose(clone(scores, ALL_USERS).numpy(),
                               scorer(scores, ALL_USERS).numpy(), rtol=1e-6)

    unigram = IntegratedScorer(Unigram([3, 1, 2], seed=0), weight=2.0)
    again = tf_keras.layers.deserialize(tf_keras.layers.serialize(unigram))
    np.testing.assert_allclose(again(np.zeros((1, 3)), None).numpy(),
                               unigram(np.zeros((1, 3)), None).numpy())


# ---------------------------------------------------------------------------
# Per-user item_bias in the ranking metrics.

def numpy_ranks(scores, targets, exclusions):
    """Pessimistic ranks: items (not excluded, not the target) >= target."""
    ranks = []
    for row, target, excluded in zip(scores, targets, exclusions):
        keep = np.ones(row.size, bool)
        keep[list(excluded)] = False
        keep[target] = False
        ranks.append(int(np.sum(row[keep] >= row[target])))
    return np.array(ranks)


def ranking_problem(seed=4, num_users=5, num_items=11, dim=3):
    rng = np.random.default_rng(seed)
    queries = rng.normal(size=(num_users, dim)).astype(np.float32)
    items = rng.normal(size=(num_items, dim)).astype(np.float32)
    bias = (2.0 * rng.normal(size=(num_users, num_items))).astype(np.float32)
    targets = rng.integers(num_items, size=num_users)
    exclusions = [rng.choice(num_items, size=rng.integers(0, 4),
                             replace=False) for _ in range(num_users)]
    return queries, items, bias, targets, exclusions


def csr(lists):
    splits = np.concatenate([[0], np.cumsum([len(x) for x in lists])])
    values = np.concatenate([np.asarray(x, np.int64) for x in lists])
    return splits.astype(np.int64), values.astype(np.int64)


def test_rank_of_targets_with_a_per_user_bias():
    queries, items, bias, targets, exclusions = ranking_problem()
    splits, values = csr(exclusions)
    scores = queries @ items.T + bias
    want = numpy_ranks(scores, targets, exclusions)
    got = rank_of_targets(queries, items, targets, splits, values,
                          item_bias=bias, block_size=4)
    np.testing.assert_array_equal(got.numpy(), want)
    # The bias is per user: different from the same rows' mean bias.
    shared = rank_of_targets(queries, items, targets, splits, values,
                             item_bias=bias.mean(0), block_size=4)
    assert not np.array_equal(shared.numpy(), want)


def test_top_k_excluding_with_a_per_user_bias():
    queries, items, bias, _, exclusions = ranking_problem(seed=5)
    splits, values = csr(exclusions)
    scores = (queries @ items.T + bias).astype(np.float64)
    for user, excluded in enumerate(exclusions):
        scores[user, list(excluded)] = -np.inf
    want = np.argsort(-scores, axis=1, kind="stable")[:, :3]
    ids, top = top_k_excluding(queries, items, 3, splits, values,
                               item_bias=bias, block_size=4)
    np.testing.assert_array_equal(ids.numpy(), want)
    np.testing.assert_allclose(top.numpy(),
                               np.take_along_axis(scores, want, 1),
                               rtol=1e-5, atol=1e-5)


def test_per_user_bias_with_the_wrong_shape_is_rejected():
    queries, items, bias, targets, _ = ranking_problem()
    with pytest.raises(ValueError, match="item_bias"):
        rank_of_targets(queries, items, targets, item_bias=bias[:, :-1])
    with pytest.raises((ValueError, tf.errors.InvalidArgumentError),
                       match="item_bias"):
        rank_of_targets(queries, items, targets, item_bias=bias[:-1])


def test_evaluate_full_ranking_with_integrated_prediction():
    rng = np.random.default_rng(6)
    num_users, num_items, dim = 7, 9, 4
    users = np.repeat(np.arange(num_users), 3)
    history = rng.integers(num_items, size=users.size)
    sampler = CollaborativeSampler.from_interactions(
        users, history, num_users, num_items, seed=0)
    sampler.jump_logits.assign(rng.normal(size=num_users))
    scorer = IntegratedScorer(sampler)
    items = rng.normal(size=(num_items, dim)).astype(np.float32)
    histories = [list(history[users == u]) for u in range(num_users)]
    targets = rng.integers(num_items, size=num_users)
    dataset = tf.data.Dataset.from_tensor_slices({
        "item_ids": tf.ragged.constant(histories, tf.int64),
        "targets": tf.constant(targets, tf.int64),
        "users": tf.range(num_users, dtype=tf.int64)}).batch(3)

    def query_fn(item_ids):
        return tf.reduce_mean(tf.gather(items, item_ids), axis=1)

    calls = []

    def bias_fn(batch):
        calls.append(int(tf.size(batch["users"])))
        return scorer.item_bias(batch["users"])

    got = evaluate_full_ranking(query_fn, items, dataset, ks=(1, 3),
                                item_bias=bias_fn)
    assert calls == [3, 3, 1]
    queries = np.stack([items[h].mean(0) for h in histories])
    log_p = np.log(sampler.item_probabilities(
        np.arange(num_users), exclude_observed=False).numpy())
    ranks = numpy_ranks(queries @ items.T + log_p, targets, histories)
    want = ranking_metrics(ranks, (1, 3), num_items=num_items)
    assert got["num_users"] == num_users
    for key, value in want.items():
        assert got[key] == pytest.approx(value)
    plain = evaluate_full_ranking(query_fn, items, dataset, ks=(1, 3))
    plain_ranks = numpy_ranks(queries @ items.T, targets, histories)
    assert plain["MRR@3"] == pytest.approx(
        ranking_metrics(plain_ranks, 3)["MRR@3"])


# ---------------------------------------------------------------------------
# Bad input.

@pytest.mark.parametrize("bad_users", [[0, 4], [-1], [2, 2, 7]])
def test_unknown_users_are_invalid_argument_errors(bad_users):
    sampler = toy_sampler()
    with pytest.raises(tf.errors.InvalidArgumentError, match="user_ids"):
        sampler.item_probabilities(bad_users)
    with pytest.raises(tf.errors.InvalidArgumentError, match="user_ids"):
        sampler.sample(bad_users, 3, shared=False)
    with pytest.raises(tf.errors.InvalidArgumentError, match="user_ids"):
        sampler.log_prob(bad_users, [0, 1])


def test_non_integer_users_are_value_errors():
    sampler = toy_sampler()
    with pytest.raises(ValueError, match="sampler_query"):
        sampler.item_probabilities(tf.constant([0.0, 1.0]))
    with pytest.raises(ValueError, match="sampler_query"):
        sampler.sample(tf.constant([0.0, 1.0]), 3, shared=False)
    with pytest.raises(ValueError, match="sampler_query"):
        sampler.sample(tf.zeros([2, 4], tf.int64), 3, shared=False)
    # A loss layer not given sampler_query hands over the hidden states.
    loss = SampledSoftmax(sampler, 3, shared=False)
    with pytest.raises(ValueError, match="sampler_query"):
        loss(tf.zeros([2, 4]), tf.zeros([NUM_ITEMS, 4]),
             tf.constant([0, 1]))


def test_shared_draws_are_rejected():
    sampler = toy_sampler()
    with pytest.raises(ValueError, match="shared=False"):
        sampler.sample(ALL_USERS, 3)
    with pytest.raises(ValueError, match="shared=False"):
        SampledSoftmax(sampler, 3)(tf.zeros([4, 2]), tf.zeros([NUM_ITEMS, 2]),
                                   tf.constant([0, 1, 2, 3]),
                                   sampler_query=ALL_USERS)


def test_out_of_range_ids_in_log_prob_are_rejected():
    sampler = toy_sampler()
    with pytest.raises(tf.errors.InvalidArgumentError, match="ids"):
        sampler.log_prob(ALL_USERS, [0, NUM_ITEMS])


@pytest.mark.parametrize("users,items,match", [
    ([], [], "empty"),
    ([0, 1], [0], "equal"),
    ([0, 4], [0, 1], "users"),
    ([0, 1], [0, 6], "items"),
    ([0.0, 1.0], [0, 1], "integer")])
def test_bad_interaction_logs(users, items, match):
    with pytest.raises(ValueError, match=match):
        CollaborativeSampler.from_interactions(users, items, 4, 6)


@pytest.mark.parametrize("kwargs,match", [
    (dict(stop_probability=0.0), "stop_probability"),
    (dict(stop_probability=1.5), "stop_probability"),
    (dict(stop_probability=float("nan")), "stop_probability"),
    (dict(stop_probability=True), "stop_probability"),
    (dict(max_length=0), "max_length"),
    (dict(max_length=2.5), "max_length"),
    (dict(observed_reward=float("inf")), "observed_reward"),
    (dict(initial_jump_logit=float("nan")), "initial_jump_logit")])
def test_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=match):
        CollaborativeSampler.from_interactions(EDGE_USERS, EDGE_ITEMS,
                                               NUM_USERS, NUM_ITEMS, **kwargs)


@pytest.mark.parametrize("name", ["user_to_item_logits",
                                  "item_to_user_logits", "jump_logits"])
def test_non_finite_logits_are_invalid_argument_errors(name):
    sampler = toy_sampler()
    variable = getattr(sampler, name)
    variable.assign(tf.tensor_scatter_nd_update(variable, [[1]],
                                                [float("nan")]))
    with pytest.raises(tf.errors.InvalidArgumentError, match="finite"):
        sampler.item_probabilities(ALL_USERS)
    with pytest.raises(tf.errors.InvalidArgumentError, match="finite"):
        sampler.sample(ALL_USERS, 2, shared=False)


def test_user_who_observed_every_item_cannot_draw():
    # User 0 observed all 3 items (the float rounding of the observed mass
    # is exactly 1 here); user 1 one of them.
    sampler = CollaborativeSampler.from_interactions(
        [0, 0, 0, 1], [0, 1, 2, 0], 2, 3, seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="every item"):
        sampler.sample([1, 0], 4, shared=False)
    # Without exclusion there is no problem.
    keeping = CollaborativeSampler.from_interactions(
        [0, 0, 0, 1], [0, 1, 2, 0], 2, 3, exclude_observed=False, seed=0)
    ids, log_q = keeping.sample([1, 0], 4, shared=False)
    assert np.all(np.isfinite(log_q.numpy()))


def test_user_who_observed_every_item_cannot_draw_despite_rounding():
    sampler = CollaborativeSampler.from_interactions([0, 0], [0, 1], 1, 2,
                                                     seed=0)
    with pytest.raises(tf.errors.InvalidArgumentError, match="every item"):
        sampler.sample([0], 3, shared=False)


def test_positive_correction_is_refused_when_positives_have_zero_q():
    sampler = CollaborativeSampler.from_interactions([0, 0, 1, 1],
                                                     [0, 1, 1, 2], 2, 5)
    with pytest.raises(ValueError, match="correct_positive"):
        SampledSoftmax(sampler, 4, shared=False, correct_positive=True)
    with pytest.raises(ValueError, match="correct_positive"):
        SampledRetrieval(sampler, 4, candidate_tower=lambda ids: ids,
                         shared=False, correct_positive=True)
    keeping = CollaborativeSampler.from_interactions(
        [0, 0, 1, 1], [0, 1, 1, 2], 2, 5, exclude_observed=False)
    SampledSoftmax(keeping, 4, shared=False, correct_positive=True)


def test_draws_over_many_users_never_hit_zero_probability_items():
    # Every row's CDF sits in one float64 array; rounding of one row's total
    # must not move a draw into its neighbour (which once gave observed ids).
    rng = np.random.default_rng(3)
    users = rng.integers(0, 300, 6000)
    items = rng.zipf(1.3, 6000) % 400
    sampler = CollaborativeSampler.from_interactions(users, items, 300, 400,
                                                     seed=5)
    ids, log_q = sampler.sample(np.arange(300), 500, shared=False)
    assert np.all(np.isfinite(log_q.numpy()))
    observed = sampler.observed_items(np.arange(300)).to_list()
    for row, seen in zip(ids.numpy(), observed):
        assert not set(row.tolist()) & set(seen)


def test_samplers_that_do_not_take_user_ids_ignore_the_batch_users(toy_split):
    # Batches with users train any sampler: only CoSam reads them.
    model = SASRec(toy_split.num_items, max_len=20, dim=16, num_blocks=1,
                   task=NextItemTask(SampledSoftmax(
                       Uniform(toy_split.num_items, seed=0), 4,
                       shared=False)))
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2))
    train = data.next_item_dataset(toy_split.train, batch_size=4, max_len=20,
                                   with_users=True)
    history = model.fit(train, epochs=1, verbose=0)
    assert np.isfinite(history.history["loss"][0])


def test_ranking_accepts_shared_and_per_user_bias_in_turn():
    # The traced ranking core relaxes shapes across calls: a per-user
    # [U, C] bias after a shared [C] one (and back) must both work.
    rng = np.random.default_rng(0)
    queries = rng.normal(size=(3, 4)).astype(np.float32)
    items = rng.normal(size=(7, 4)).astype(np.float32)
    targets = np.array([1, 4, 6])
    shared = rng.normal(size=7).astype(np.float32)
    per_user = rng.normal(size=(3, 7)).astype(np.float32)
    for bias in (shared, per_user, shared):
        ranks = rank_of_targets(queries, items, targets, item_bias=bias)
        scores = queries @ items.T + bias
        want = [(scores[u] >= scores[u, t]).sum() - 1
                for u, t in enumerate(targets)]
        np.testing.assert_array_equal(ranks.numpy(), want)
    dataset = tf.data.Dataset.from_tensors({
        "item_ids": tf.ragged.constant([[0], [2, 3], [5]], tf.int64),
        "targets": tf.constant(targets, tf.int64)})
    for bias in (shared, (lambda batch: per_user), shared):
        result = evaluate_full_ranking(lambda ids: queries, items, dataset,
                                       item_bias=bias)
        assert result["num_users"] == 3
