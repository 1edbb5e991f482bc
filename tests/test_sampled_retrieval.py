"""SampledRetrieval: TFRS equivalence, the correction, exact hits, fit, errors.

Oracles: `tfrs.tasks.Retrieval` for in-batch negatives, and a NumPy
computation of the corrected softmax from explicit candidates.
"""

import numpy as np
import pytest

import tfrec_fast  # noqa: F401  (selects tf_keras before TF loads)
import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras

from tfrec_fast import samplers
from tfrec_fast.losses import SampledSoftmax
from tfrec_fast.tasks import SampledRetrieval

Reduction = tf_keras.losses.Reduction
C, D, B = 30, 6, 8


class FixedCandidates(samplers.CandidateSampler):
    """Returns the same candidates and log q every time (test oracle)."""

    def __init__(self, num_items, ids, log_q, **kwargs):
        super().__init__(num_items, seed=0, **kwargs)
        self.ids = np.asarray(ids, np.int64)
        self.log_q = np.asarray(log_q, np.float32)

    def _draw(self, seed, shape, query, positives, item_table):
        return tf.constant(self.ids), tf.constant(self.log_q)

    def _log_prob(self, query, ids):
        table = np.full(self.num_items, -np.log(self.num_items), np.float32)
        table[self.ids.reshape(-1)] = self.log_q.reshape(-1)
        return tf.gather(table, ids)


def numpy_losses(query, positive, ids, cand, log_q, num_draws,
                 cand_ids, positive_log_q=None, temperature=1.0):
    """Per-query loss by the formula; candidates equal to the positive out."""
    out = []
    for b in range(len(query)):
        s_p = query[b] @ positive[b] / temperature
        if positive_log_q is not None:
            s_p -= np.log(num_draws) + positive_log_q[b]
        logits = [s_p]
        for j in range(len(cand)):
            if cand_ids[j] != ids[b]:
                logits.append(query[b] @ cand[j] / temperature
                              - np.log(num_draws) - log_q[j])
        logits = np.asarray(logits, np.float64)
        top = logits.max()
        out.append(np.log(np.exp(logits - top).sum()) + top - s_p)
    return np.asarray(out)


@pytest.fixture
def batch():
    rng = np.random.default_rng(0)
    query = rng.normal(size=(B, D)).astype(np.float32)
    positive = rng.normal(size=(B, D)).astype(np.float32)
    ids = np.array([3, 7, 3, 11, 0, 7, 20, 5], np.int64)  # two duplicates
    return query, positive, ids


# --------------------------------------------------- sampler=None vs TFRS

@pytest.mark.parametrize("reduction", [Reduction.SUM,
                                       Reduction.SUM_OVER_BATCH_SIZE])
@pytest.mark.parametrize("hits", [True, False])
@pytest.mark.parametrize("with_probability", [True, False])
def test_in_batch_equals_tfrs_retrieval(batch, reduction, hits,
                                        with_probability):
    query, positive, ids = batch
    rng = np.random.default_rng(1)
    weight = rng.uniform(0.5, 2.0, size=B).astype(np.float32)
    extra = {}
    if with_probability:
        extra["candidate_sampling_probability"] = rng.uniform(
            0.01, 0.5, size=B).astype(np.float32)
    ours = SampledRetrieval(remove_accidental_hits=hits, temperature=0.7,
                            reduction=reduction)
    theirs = tfrs.tasks.Retrieval(
        loss=tf_keras.losses.CategoricalCrossentropy(from_logits=True,
                                                     reduction=reduction),
        temperature=0.7, remove_accidental_hits=hits)
    q, c = tf.constant(query), tf.constant(positive)
    with tf.GradientTape(persistent=True) as tape:
        tape.watch([q, c])
        a = ours(q, c, sample_weight=weight, candidate_ids=ids, **extra)
        b = theirs(q, c, sample_weight=weight, candidate_ids=ids, **extra)
    np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5)
    for x in (q, c):
        np.testing.assert_allclose(tape.gradient(a, x).numpy(),
                                   tape.gradient(b, x).numpy(), rtol=1e-4,
                                   atol=1e-5)


def test_default_reduction_is_tfrs_default(batch):
    query, positive, ids = batch
    ours = SampledRetrieval(remove_accidental_hits=False)
    assert ours.reduction == Reduction.SUM
    np.testing.assert_allclose(
        ours(query, positive).numpy(),
        tfrs.tasks.Retrieval()(query, positive).numpy(), rtol=1e-5)
    del ids


def test_string_candidate_ids_remove_hits(batch):
    query, positive, ids = batch
    names = np.array([f"item{i}" for i in ids])
    task = SampledRetrieval(reduction=Reduction.NONE)
    np.testing.assert_allclose(
        task(query, positive, candidate_ids=names).numpy(),
        task(query, positive, candidate_ids=ids).numpy(), rtol=1e-6)


# -------------------------------------------------------- the correction

def test_drawn_candidates_match_formula(batch):
    query, positive, ids = batch
    rng = np.random.default_rng(2)
    table = rng.normal(size=(C, D)).astype(np.float32)
    drawn = np.array([1, 3, 8, 7, 25], np.int64)  # 3 and 7 are positives
    log_q = np.log(rng.uniform(0.01, 0.2, size=5)).astype(np.float32)
    sampler = FixedCandidates(C, drawn, log_q)
    tower = lambda i: tf.gather(table, i)  # noqa: E731
    for correct in (False, True):
        task = SampledRetrieval(sampler, 5, candidate_tower=tower,
                                correct_positive=correct, temperature=0.5,
                                reduction=Reduction.NONE)
        got = task(query, positive, candidate_ids=ids).numpy()
        positive_log_q = (sampler.log_prob(None, ids).numpy() if correct
                          else None)
        want = numpy_losses(query, positive, ids, table[drawn], log_q, 5,
                            drawn, positive_log_q, temperature=0.5)
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_per_query_candidates_match_formula(batch):
    query, positive, ids = batch
    rng = np.random.default_rng(3)
    table = rng.normal(size=(C, D)).astype(np.float32)
    drawn = rng.integers(0, C, size=(B, 4))
    drawn[0, 2] = ids[0]  # a hit in row 0
    log_q = np.log(rng.uniform(0.01, 0.2, size=(B, 4))).astype(np.float32)
    task = SampledRetrieval(FixedCandidates(C, drawn, log_q), 4,
                            candidate_tower=tf_keras.layers.Embedding(
                                C, D, weights=[table]),
                            shared=False, reduction=Reduction.NONE)
    got = task(query, positive, candidate_ids=ids).numpy()
    want = [numpy_losses(query[b:b + 1], positive[b:b + 1], ids[b:b + 1],
                         table[drawn[b]], log_q[b], 4, drawn[b])[0]
            for b in range(B)]
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_logq_direction(batch):
    """A more probable negative is pushed down less: its logit goes down."""
    query, positive, ids = batch
    table = np.random.default_rng(4).normal(size=(C, D)).astype(np.float32)
    drawn = np.array([1, 2, 4], np.int64)

    def loss(log_q):
        task = SampledRetrieval(FixedCandidates(C, drawn, log_q), 3,
                                candidate_tower=lambda i: tf.gather(table, i),
                                reduction=Reduction.NONE)
        return task(query, positive, candidate_ids=ids).numpy()

    rare = loss(np.log([0.01, 0.01, 0.01]).astype(np.float32))
    popular = loss(np.log([0.01, 0.5, 0.01]).astype(np.float32))
    assert np.all(popular < rare)
    # Same with in-batch candidates and TFRS-style probabilities.
    task = SampledRetrieval(reduction=Reduction.NONE)
    p = np.full(B, 0.01, np.float32)
    base = task(query, positive, candidate_ids=ids,
                candidate_sampling_probability=p).numpy()
    p[6] = 0.5  # id 20, only row 6's positive
    raised = task(query, positive, candidate_ids=ids,
                  candidate_sampling_probability=p).numpy()
    others = np.arange(B) != 6
    assert np.all(raised[others] < base[others])
    assert raised[6] > base[6]  # its own positive logit went down


def test_in_batch_sampler_uses_estimator_log_q(batch):
    query, positive, ids = batch
    sampler = samplers.InBatch(C, learning_rate=0.5)
    task = SampledRetrieval(sampler, reduction=Reduction.NONE)
    assert task.correct_positive
    for _ in range(3):  # warm the estimator
        task(query, positive, candidate_ids=ids)
    got = task(query, positive, candidate_ids=ids).numpy()
    log_q = sampler.log_expected_count(ids).numpy() - np.log(B)
    want = numpy_losses(query, positive, ids, positive, log_q, B, ids,
                        positive_log_q=log_q)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    # Duplicated ids (3 and 7, twice per batch) are estimated as more
    # frequent than the others.
    count = sampler.log_expected_count(ids).numpy()
    assert count[0] > count[3] and count[1] > count[3]


class MixedFixed(FixedCandidates):
    """The batch's positives then fixed drawn ids (the "mixed" layout)."""

    in_batch_candidates = "mixed"

    def _draw(self, seed, shape, query, positives, item_table):
        ids = tf.concat([positives, tf.constant(self.ids)], 0)
        log_q = tf.concat([tf.fill(tf.shape(positives), -2.0),
                           tf.constant(self.log_q)], 0)
        return ids, log_q


def test_mixed_layout_matches_formula(batch):
    query, positive, ids = batch
    rng = np.random.default_rng(5)
    table = rng.normal(size=(C, D)).astype(np.float32)
    drawn = np.array([3, 9, 12], np.int64)
    log_q = np.log(rng.uniform(0.01, 0.2, size=3)).astype(np.float32)
    task = SampledRetrieval(MixedFixed(C, drawn, log_q), 3,
                            candidate_tower=lambda i: tf.gather(table, i),
                            reduction=Reduction.NONE)
    assert task.correct_positive
    got = task(query, positive, candidate_ids=ids).numpy()
    cand = np.concatenate([positive, table[drawn]])
    all_log_q = np.concatenate([np.full(B, -2.0, np.float32), log_q])
    want = numpy_losses(query, positive, ids, cand, all_log_q, B + 3,
                        np.concatenate([ids, drawn]),
                        positive_log_q=np.full(B, -2.0))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def _mixed(other):
    return samplers.Mixed(samplers.InBatch(C), other)


@pytest.mark.parametrize("make_sampler,shared,correct", [
    (lambda: _mixed(samplers.Uniform(C, seed=4)), True, True),
    (lambda: _mixed(samplers.Uniform(C, seed=4)), False, True),
    (lambda: samplers.HardNegatives(samplers.Uniform(C, seed=4), 12), True,
     False),
    (lambda: _mixed(samplers.HardNegatives(samplers.Uniform(C, seed=4), 12)),
     True, True),
])
def test_library_samplers_agree_with_sampled_softmax(batch, make_sampler,
                                                     shared, correct):
    """With candidate_tower = the item table, the task is SampledSoftmax."""
    query, _, ids = batch
    table = np.random.default_rng(6).normal(size=(C, D)).astype(np.float32)
    tower = tf_keras.layers.Embedding(C, D, weights=[table])
    task = SampledRetrieval(make_sampler(), 4, candidate_tower=tower,
                            shared=shared, reduction=Reduction.NONE)
    assert task.correct_positive == correct
    loss = SampledSoftmax(make_sampler(), 4, shared=shared,
                          correct_positive=correct, reduction=Reduction.NONE)
    for _ in range(2):  # the second step reads a trained estimator
        got = task(query, table[ids], candidate_ids=ids).numpy()
        want = loss(query, table, ids).numpy()
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)


def test_per_query_sampler_rejects_global_negatives(batch):
    query, positive, ids = batch
    task = SampledRetrieval(
        samplers.HardNegatives(samplers.Uniform(C, seed=0), 8), 3,
        candidate_tower=tf_keras.layers.Embedding(C, D),
        global_negatives=True)
    with pytest.raises(ValueError, match="global_negatives needs shared"):
        task(query, positive, candidate_ids=ids)


# ------------------------------------------------------- accidental hits

def test_in_batch_hit_gets_zero_gradient_and_changes_nothing(batch):
    query, positive, ids = batch  # ids[0] == ids[2] == 3
    task = SampledRetrieval(reduction=Reduction.NONE)
    c = tf.constant(positive)
    with tf.GradientTape() as tape:
        tape.watch(c)
        row0 = task(query, c, candidate_ids=ids)[0]
    grad = tape.gradient(row0, c).numpy()
    assert np.all(grad[2] == 0.0)  # the duplicate of row 0's positive
    assert np.all(grad[3] != 0.0)  # an ordinary negative
    keep = np.arange(B) != 2
    without = task(query[keep], positive[keep], candidate_ids=ids[keep])
    np.testing.assert_allclose(row0.numpy(), without.numpy()[0], rtol=1e-6)
    # Without removal the duplicate counts as a negative.
    plain = SampledRetrieval(remove_accidental_hits=False,
                             reduction=Reduction.NONE)
    assert plain(query, positive, candidate_ids=ids).numpy()[0] > row0


def test_drawn_hit_gets_zero_gradient_and_changes_nothing(batch):
    query, positive, ids = batch
    negatives = tf_keras.layers.Embedding(C, D)  # tower of drawn ids only
    # ids[1] = 7 is row 1's positive; log(K) + log q is the same in both
    # sets, so removing the hit must leave the loss exactly as it was.
    without_hit = np.array([1, 2, 4], np.int64)
    with_hit = np.array([1, 2, 4, 7], np.int64)
    results = []
    for drawn in (without_hit, with_hit):
        k = len(drawn)
        log_q = np.full(k, np.log(0.1) - np.log(k), np.float32)
        task = SampledRetrieval(FixedCandidates(C, drawn, log_q), k,
                                candidate_tower=negatives,
                                reduction=Reduction.NONE)
        with tf.GradientTape() as tape:
            row1 = task(query, positive, candidate_ids=ids)[1]
        grad = tf.convert_to_tensor(
            tape.gradient(row1, negatives.embeddings)).numpy()
        results.append((row1.numpy(), grad))
    np.testing.assert_allclose(results[0][0], results[1][0], rtol=1e-6)
    assert np.all(results[1][1][7] == 0.0)
    assert np.all(results[1][1][1] != 0.0)


# ---------------------------------------------------------------- metrics

def test_batch_and_loss_metrics(batch):
    query, positive, ids = batch
    accuracy = tf_keras.metrics.CategoricalAccuracy()
    mean_loss = tf_keras.metrics.Mean()
    task = SampledRetrieval(batch_metrics=[accuracy],
                            loss_metrics=[mean_loss])
    loss = task(query, positive, candidate_ids=ids)
    scores = query @ positive.T
    best = []
    for b in range(B):
        others = [scores[b, j] for j in range(B) if ids[j] != ids[b]]
        best.append(scores[b, b] > max(others))
    assert accuracy.result().numpy() == pytest.approx(np.mean(best))
    assert mean_loss.result().numpy() == pytest.approx(loss.numpy())
    accuracy.reset_state()
    task(query, positive, candidate_ids=ids, compute_batch_metrics=False)
    assert accuracy.count.numpy() == 0


class TwoTower(tfrs.Model):
    """Users u like items (3u + k) mod C, k < 3."""

    def __init__(self, num_users, make_task):
        super().__init__()
        self.users = tf_keras.layers.Embedding(num_users, 8)
        self.items = tf_keras.layers.Embedding(C, 8)
        self.task = make_task(self.items)

    def compute_loss(self, inputs, training=False):
        return self.task(self.users(inputs["user"]),
                         self.items(inputs["item"]),
                         candidate_ids=inputs["item"],
                         compute_metrics=not training)


def _likes(num_users=20):
    users = np.repeat(np.arange(num_users), 3)
    items = (3 * users + np.tile(np.arange(3), num_users)) % C
    return tf.data.Dataset.from_tensor_slices(
        {"user": users, "item": items.astype(np.int64)})


@pytest.mark.parametrize("mode", ["in_batch", "in_batch_sampler", "uniform",
                                  "mixed"])
def test_fit_lowers_loss_and_reports_factorized_metrics(mode):
    tf_keras.utils.set_random_seed(0)
    data = _likes()

    def make_task(items):
        corpus = tf.data.Dataset.range(C).batch(10).map(
            lambda i: (i, items(i)))
        metric = tfrs.metrics.FactorizedTopK(
            tfrs.layers.factorized_top_k.Streaming(k=5).index_from_dataset(
                corpus), ks=(1, 5))
        if mode == "in_batch":
            return SampledRetrieval(metrics=metric)
        if mode == "in_batch_sampler":
            return SampledRetrieval(samplers.InBatch(C), metrics=metric)
        if mode == "mixed":
            return SampledRetrieval(_mixed(samplers.Uniform(C, seed=1)), 8,
                                    candidate_tower=items, metrics=metric)
        return SampledRetrieval(samplers.Uniform(C, seed=1), 16,
                                candidate_tower=items, metrics=metric)

    model = TwoTower(20, make_task)
    model.compile(optimizer=tf_keras.optimizers.Adam(0.05))
    train = data.shuffle(60, seed=0).batch(12)
    before = model.evaluate(data.batch(60), return_dict=True, verbose=0)
    history = model.fit(train, epochs=12, verbose=0).history["loss"]
    after = model.evaluate(data.batch(60), return_dict=True, verbose=0)
    assert history[-1] < 0.7 * history[0]
    key = "factorized_top_k/top_5_categorical_accuracy"
    assert set(after) >= {"loss", key,
                          "factorized_top_k/top_1_categorical_accuracy"}
    # Each user has 3 liked items; chance of one in the top 5 is 5 / 30.
    assert after[key] > 0.6 > before[key]
    # Sampler state is part of the model.
    if mode != "in_batch":
        tracked = {id(v) for v in model.variables}
        assert model.task.sampler.variables
        assert all(id(v) in tracked for v in model.task.sampler.variables)


# ------------------------------------------------------------ bad inputs

def test_bad_inputs_name_the_argument(batch):
    query, positive, ids = batch
    task = SampledRetrieval()
    with pytest.raises(ValueError, match="same batch size"):
        task(query, positive[:5], candidate_ids=ids)
    with pytest.raises(ValueError, match="query_embeddings must be"):
        task(query[None], positive, candidate_ids=ids)
    with pytest.raises(ValueError, match="candidate_embeddings must be"):
        task(query, positive[0], candidate_ids=ids)
    with pytest.raises(ValueError, match="query_embeddings must be floating"):
        task(query.astype(np.int32), positive, candidate_ids=ids)
    with pytest.raises(ValueError, match="candidate_ids must be"):
        task(query, positive, candidate_ids=ids[:, None])
    with pytest.raises(ValueError, match="candidate_ids must have one id"):
        task(query, positive, candidate_ids=ids[:3])
    with pytest.raises(ValueError, match="candidate_ids .* is required"):
        task(query, positive)
    with pytest.raises(ValueError, match="sample_weight must be"):
        task(query, positive, candidate_ids=ids, sample_weight=np.ones(3))
    with pytest.raises(ValueError, match="width D"):
        task(query, positive[:, :3], candidate_ids=ids)

    tower = tf_keras.layers.Embedding(C, D)
    uniform = samplers.Uniform(C, seed=0)
    for bad in (0, -2, 1.5):
        with pytest.raises(ValueError, match="num_negatives"):
            SampledRetrieval(uniform, bad, candidate_tower=tower)
    with pytest.raises(ValueError, match="num_negatives is required"):
        SampledRetrieval(uniform, candidate_tower=tower)
    with pytest.raises(ValueError, match="candidate_tower is required"):
        SampledRetrieval(uniform, 4)
    with pytest.raises(ValueError, match="num_negatives is not used"):
        SampledRetrieval(None, 4)
    with pytest.raises(ValueError, match="global_negatives needs shared"):
        SampledRetrieval(uniform, 4, candidate_tower=tower, shared=False,
                         global_negatives=True)
    with pytest.raises(ValueError, match="temperature"):
        SampledRetrieval(temperature=0.0)
    with pytest.raises(ValueError, match="sampler must be"):
        SampledRetrieval("uniform", 4, candidate_tower=tower)

    drawn = SampledRetrieval(uniform, 4, candidate_tower=tower)
    with pytest.raises(ValueError, match="candidate_ids must be int"):
        drawn(query, positive, candidate_ids=ids.astype(np.float32))
    with pytest.raises(tf.errors.InvalidArgumentError, match="candidate_ids"):
        drawn(query, positive, candidate_ids=ids + C)
    with pytest.raises(ValueError, match="candidate_sampling_probability"):
        drawn(query, positive, candidate_ids=ids,
              candidate_sampling_probability=np.ones(B, np.float32))


def test_get_config_round_trip():
    task = SampledRetrieval(samplers.Uniform(C, seed=3), 7,
                            candidate_tower=tf_keras.layers.Embedding(C, D),
                            shared=False, temperature=0.5,
                            reduction=Reduction.SUM_OVER_BATCH_SIZE)
    config = task.get_config()
    copy = SampledRetrieval.from_config(config)
    assert isinstance(copy.sampler, samplers.Uniform)
    assert copy.sampler.seed == 3
    assert isinstance(copy.candidate_tower, tf_keras.layers.Embedding)
    for key in ("num_negatives", "shared", "temperature", "reduction",
                "correct_positive", "remove_accidental_hits",
                "global_negatives"):
        assert copy.get_config()[key] == config[key]
    with pytest.raises(NotImplementedError, match="candidate_tower"):
        SampledRetrieval(samplers.Uniform(C), 2,
                         candidate_tower=lambda i: i).get_config()
