"""MirroredStrategy on 2 and 4 logical CPUs equals one device.

Each replica gets a known slice of one global batch (uneven slices on
purpose); its loss and gradients are computed inside the replica with a
GradientTape; the sum of the replicas' losses and of their gradients must
equal the single-device loss and gradients on the whole batch. The logical
devices are made in conftest.py; the strategies and slicing helpers live in
distribute_testing.py.
"""

import numpy as np
import pytest

import tfrec_fast  # noqa: F401  (selects tf_keras before TF loads)
import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras

from tfrec_fast.losses import SampledSoftmax
from tfrec_fast.tasks import NextItemTask
from tfrec_fast.tasks import SampledRetrieval

from distribute_testing import SLICES
from distribute_testing import TOL
from distribute_testing import FixedCandidates
from distribute_testing import concat as _concat
from distribute_testing import replica_sum as _replica_sum
from distribute_testing import split as _split
from distribute_testing import strategy  # noqa: F401  (fixture)
from distribute_testing import variables as _variables

Reduction = tf_keras.losses.Reduction
C, D = 24, 5
REDUCTIONS = [Reduction.SUM, Reduction.SUM_OVER_BATCH_SIZE]


# ------------------------------------------ (a) in-batch, global negatives

def _two_tower_batch(seed=0):
    rng = np.random.default_rng(seed)
    users = rng.normal(size=(12, D)).astype(np.float32)
    items = rng.normal(size=(C, D)).astype(np.float32)
    user_ids = rng.integers(0, 12, size=10)
    # Duplicates within and across replica slices: accidental hits.
    item_ids = np.array([4, 9, 4, 17, 2, 9, 21, 2, 4, 13], np.int64)
    probability = rng.uniform(0.02, 0.4, size=10).astype(np.float32)
    weight = rng.uniform(0.5, 2.0, size=10).astype(np.float32)
    return users, items, user_ids, item_ids, probability, weight


def _retrieval_step(task, user_table, item_table, user_ids, item_ids,
                    probability, weight):
    with tf.GradientTape() as tape:
        loss = task(tf.gather(user_table, user_ids),
                    tf.gather(item_table, item_ids),
                    candidate_ids=item_ids, sample_weight=weight,
                    candidate_sampling_probability=probability)
    grads = tape.gradient(loss, [user_table, item_table])
    return loss, [tf.convert_to_tensor(g) for g in grads]


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_in_batch_global_negatives_equal_one_device(strategy, reduction):
    users, items, user_ids, item_ids, probability, weight = _two_tower_batch()
    single = SampledRetrieval(reduction=reduction, temperature=0.5)
    want_loss, want_grads = _retrieval_step(
        single, tf.Variable(users), tf.Variable(items), user_ids, item_ids,
        probability, weight)

    task = SampledRetrieval(global_negatives=True, reduction=reduction,
                            temperature=0.5)
    user_table, item_table = _variables(strategy, users, items)

    @tf.function
    def step(values):
        return strategy.run(lambda v: _retrieval_step(
            task, user_table, item_table, *v), (values,))

    loss, grads = _replica_sum(strategy, step(_split(
        strategy, user_ids, item_ids, probability, weight)))
    np.testing.assert_allclose(loss, want_loss.numpy(), **TOL)
    for got, want in zip(grads, want_grads):
        np.testing.assert_allclose(got, want.numpy(), **TOL)


def test_in_batch_local_negatives_are_per_replica(strategy):
    """Without global negatives each replica is its own in-batch softmax."""
    users, items, user_ids, item_ids, probability, weight = _two_tower_batch()
    task = SampledRetrieval(reduction=Reduction.NONE)
    user_table, item_table = _variables(strategy, users, items)

    @tf.function
    def step(values):
        return strategy.run(lambda v: _retrieval_step(
            task, user_table, item_table, *v)[0], (values,))

    got = _concat(strategy, step(_split(strategy, user_ids, item_ids,
                                        probability, weight)))
    want, start = [], 0
    for size in SLICES[strategy.num_replicas_in_sync]:
        rows = slice(start, start + size)
        want.append(task(users[user_ids[rows]], items[item_ids[rows]],
                         candidate_ids=item_ids[rows],
                         sample_weight=weight[rows],
                         candidate_sampling_probability=probability[rows]))
        start += size
    np.testing.assert_allclose(got, np.concatenate(want), **TOL)


# --------------------------- (b) SampledSoftmax with fixed shared candidates

def _softmax_batch(seed=1):
    rng = np.random.default_rng(seed)
    hidden = rng.normal(size=(10, D)).astype(np.float32)
    table = rng.normal(size=(C, D)).astype(np.float32)
    positives = np.array([1, 5, 7, 5, 0, 11, 3, 7, 19, 2], np.int64)
    weight = rng.uniform(0.5, 2.0, size=10).astype(np.float32)
    return hidden, table, positives, weight


def _softmax_step(loss_layer, table, hidden, positives, weight):
    with tf.GradientTape() as tape:
        tape.watch(hidden)
        loss = loss_layer(hidden, table, positives, sample_weight=weight)
    d_hidden, d_table = tape.gradient(loss, [hidden, table])
    return loss, d_hidden, tf.convert_to_tensor(d_table)


def _run_softmax(strategy, loss_layer, hidden, table, positives, weight):
    (table_var,) = _variables(strategy, table)

    @tf.function
    def step(values):
        return strategy.run(lambda v: _softmax_step(
            loss_layer, table_var, v[0], v[1], v[2]), (values,))

    loss, d_hidden, d_table = step(_split(strategy, hidden, positives,
                                          weight))
    return (_replica_sum(strategy, loss), _concat(strategy, d_hidden),
            _replica_sum(strategy, d_table))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("global_negatives", [False, True])
def test_sampled_softmax_equals_one_device(strategy, reduction,
                                           global_negatives):
    hidden, table, positives, weight = _softmax_batch()
    n = strategy.num_replicas_in_sync
    rng = np.random.default_rng(2)
    # One candidate set per replica (ids overlap the positives: hits).
    ids = rng.integers(0, C, size=(n, 6))
    ids[:, 0] = positives[0]
    log_q = np.log(rng.uniform(0.01, 0.2, size=(n, 6))).astype(np.float32)
    if global_negatives:
        # Replica r draws set r; one device sees their concatenation.
        replicated = FixedCandidates(C, ids, log_q, per_replica=True)
        reference = FixedCandidates(C, ids.reshape(-1), log_q.reshape(-1))
    else:
        # Every replica uses the same shared set.
        replicated = FixedCandidates(C, ids[0], log_q[0])
        reference = FixedCandidates(C, ids[0], log_q[0])
    options = dict(num_negatives=6, temperature=0.8, reduction=reduction)
    want_loss, want_hidden, want_table = _softmax_step(
        SampledSoftmax(reference, **options), tf.Variable(table),
        tf.constant(hidden), positives, weight)
    loss, d_hidden, d_table = _run_softmax(
        strategy, SampledSoftmax(replicated, global_negatives=global_negatives,
                                 **options), hidden, table, positives, weight)
    np.testing.assert_allclose(loss, want_loss.numpy(), **TOL)
    np.testing.assert_allclose(d_hidden, want_hidden.numpy(), **TOL)
    np.testing.assert_allclose(d_table, want_table.numpy(), **TOL)


# ------------------------------------------------------ (c) the reductions

def test_replica_sum_is_single_device_mean_and_sum(strategy):
    hidden, table, positives, weight = _softmax_batch(seed=3)
    reference = FixedCandidates(C, [2, 8, 5, 13], np.log([.1, .05, .2, .1]))
    losses = SampledSoftmax(reference, 4, reduction=Reduction.NONE)(
        hidden, table, positives, sample_weight=weight).numpy()
    for reduction, want in ((Reduction.SUM_OVER_BATCH_SIZE, losses.mean()),
                            (Reduction.AUTO, losses.mean()),
                            (Reduction.SUM, losses.sum())):
        loss, _, _ = _run_softmax(
            strategy, SampledSoftmax(reference, 4, reduction=reduction),
            hidden, table, positives, weight)
        np.testing.assert_allclose(loss, want, **TOL)


@pytest.mark.parametrize("with_weight", [False, True])
def test_next_item_task_replica_sum_is_global_mean(strategy, with_weight):
    hidden, table, positives, weight = _softmax_batch(seed=4)
    if not with_weight:
        weight = np.ones_like(weight)
    task = NextItemTask()  # full-softmax reference loss
    want = tf_keras.losses.sparse_categorical_crossentropy(
        positives, hidden @ table.T, from_logits=True).numpy()
    want = (want * weight).sum() / weight.sum()
    (table_var,) = _variables(strategy, table)

    @tf.function
    def step(values):
        h, p, w = values
        return strategy.run(
            lambda h, p, w: task(h, table_var, p,
                                 sample_weight=w if with_weight else None),
            (h, p, w))

    got = _replica_sum(strategy, step(_split(strategy, hidden, positives,
                                             weight)))
    np.testing.assert_allclose(got, want, **TOL)


# ----------------------------------- fit: one step equals one device's step

class TwoTower(tfrs.Model):

    def __init__(self, users, items, task):
        super().__init__()
        self.users = tf_keras.layers.Embedding(
            len(users), D, embeddings_initializer=tf_keras.initializers.
            Constant(users))
        self.items = tf_keras.layers.Embedding(
            len(items), D, embeddings_initializer=tf_keras.initializers.
            Constant(items))
        self.task = task

    def compute_loss(self, inputs, training=False):
        return self.task(self.users(inputs["user"]),
                         self.items(inputs["item"]),
                         candidate_ids=inputs["item"])


def test_fit_step_with_global_negatives_equals_one_device(strategy):
    users, items = _two_tower_batch(seed=5)[:2]
    batch = 4 * strategy.num_replicas_in_sync  # fit splits it evenly
    rng = np.random.default_rng(6)
    item_ids = rng.integers(0, C, size=batch)
    item_ids[1] = item_ids[-1]  # a hit across replicas
    data = tf.data.Dataset.from_tensor_slices(
        {"user": rng.integers(0, 12, size=batch), "item": item_ids}
    ).batch(batch)

    def fit(model):
        model.compile(optimizer=tf_keras.optimizers.SGD(0.1))
        loss = model.fit(data, epochs=1, verbose=0).history["loss"][0]
        return loss, [v.numpy() for v in model.trainable_variables]

    want_loss, want_weights = fit(TwoTower(users, items, SampledRetrieval()))
    with strategy.scope():
        model = TwoTower(users, items,
                         SampledRetrieval(global_negatives=True))
    loss, weights = fit(model)
    np.testing.assert_allclose(loss, want_loss, **TOL)
    for got, want in zip(weights, want_weights):
        np.testing.assert_allclose(got, want, **TOL)
    assert not np.allclose(want_weights[1], items)  # the step did something
