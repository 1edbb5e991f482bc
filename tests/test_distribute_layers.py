"""Layers, losses and samplers under MirroredStrategy equal one device.

Every replica gets a known slice of one global batch of 10 rows (uneven
slices; ragged inputs are split by rows, with empty rows and length-1 rows
in the slices), see distribute_testing.py. What must hold:

- layers: the replicas' outputs concatenated equal the single-device output
  on the whole batch; the replicas' gradients of a sum loss, summed
  (inputs: concatenated), equal the single-device gradients;
- losses: the sum of the replicas' reduced losses and gradients equals the
  single-device ones when every row sees the same negatives;
- samplers: draws are keyed by (seed, draw counter, replica id), so
  replicas draw deliberately different streams (replica 0 draws the
  single-device stream). What holds: log q of given ids equals the
  single-device values; the draw counter advances once per step; replica
  r's draws are the sampler's draws under key (seed, counter, r); a loss
  given the replicas' negatives equals the single-device loss given the
  same negatives; sampler state updates equal the single-device ones (or,
  where documented, replica 0's: `InBatch`).
"""

import numpy as np
import pytest

import tfrec_fast  # noqa: F401  (selects tf_keras before TF loads)
import tensorflow as tf
import tf_keras

from tfrec_fast import layers
from tfrec_fast import losses as losses_lib
from tfrec_fast import ops
from tfrec_fast import samplers

from distribute_testing import SLICES
from distribute_testing import TOL
from distribute_testing import FixedCandidates
from distribute_testing import bounds
from distribute_testing import concat
from distribute_testing import local_values
from distribute_testing import replica_sum
from distribute_testing import split
from distribute_testing import split_ragged
from distribute_testing import strategy  # noqa: F401  (fixture)
from distribute_testing import variables

Reduction = tf_keras.losses.Reduction
D = 8
# 10 rows; the slices (6 | 4 and 3 | 3 | 2 | 2) hold empty rows and
# length-1 rows, and the last of 4 replicas gets two empty rows: no tokens.
LENGTHS = np.array([3, 0, 5, 1, 2, 4, 1, 3, 0, 0], np.int64)
MAX_LEN = int(LENGTHS.max())


def _gradients(tape, loss, sources):
    """Dense gradients (gathers give IndexedSlices); zeros for sources the
    loss does not reach (so replicas return the same structure)."""
    grads = tape.gradient(loss, sources)
    return [tf.zeros_like(s) if g is None else tf.convert_to_tensor(g)
            for g, s in zip(grads, sources)]


def _same_layer(strategy, make, build):
    """(single-device layer, mirrored layer) with the same weights."""
    single = make()
    build(single)
    with strategy.scope():
        mirrored = make()
        build(mirrored)
    mirrored.set_weights(single.get_weights())
    return single, mirrored


# -------------------------------------------------------- ragged layers

RAGGED_LAYERS = {
    "attention_causal": lambda: layers.RaggedMultiHeadAttention(
        2, 4, causal=True),
    "attention_bidirectional": lambda: layers.RaggedMultiHeadAttention(
        2, 4, causal=False, output_dim=6),
    "block_post_ln_bidirectional": lambda: layers.RaggedTransformerBlock(
        2, D, causal=False, norm_first=False, activation="relu"),
    "positions_from_end": lambda: layers.RaggedPositionalEmbedding(
        MAX_LEN, D, from_end=True),
    # Pre-LN causal blocks, fused attention (call_padded below: the
    # pure-TF reference attention).
    "encoder_causal": lambda: layers.SequenceEncoder(
        MAX_LEN, D, num_blocks=2, num_heads=2, dropout=0.0, ffn_dim=12),
    "encoder_bidirectional": lambda: layers.SequenceEncoder(
        MAX_LEN, D, num_blocks=1, num_heads=2, dropout=0.0, causal=False,
        norm_first=False, from_end=True),
}


def _ragged_batch(seed, out_dim):
    rng = np.random.default_rng(seed)
    tokens = int(LENGTHS.sum())
    x = rng.normal(size=(tokens, D)).astype(np.float32)
    cotangent = rng.normal(size=(tokens, out_dim)).astype(np.float32)
    return x, cotangent


def _ragged_step(layer, lengths, x, cotangent):
    """Output and gradients of sum(layer(x) * cotangent) on ragged rows."""
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = layer(tf.RaggedTensor.from_row_lengths(x, lengths),
                    training=False)
        loss = tf.reduce_sum(out.flat_values * cotangent)
    grads = _gradients(tape, loss, [x] + layer.trainable_variables)
    return out.flat_values, grads[0], grads[1:]


@pytest.mark.parametrize("name", list(RAGGED_LAYERS))
def test_ragged_layer_equals_one_device(strategy, name):
    out_dim = 6 if name == "attention_bidirectional" else D
    x, cotangent = _ragged_batch(seed=len(name), out_dim=out_dim)
    everything = tf.RaggedTensor.from_row_lengths(x, LENGTHS)
    single, layer = _same_layer(strategy, RAGGED_LAYERS[name],
                                lambda l: l(everything))
    want_out, want_dx, want_dw = _ragged_step(
        single, tf.constant(LENGTHS), tf.constant(x), tf.constant(cotangent))

    @tf.function
    def step(values):
        return strategy.run(lambda v: _ragged_step(layer, *v), (values,))

    out, dx, dw = step(split_ragged(strategy, LENGTHS, x, cotangent))
    np.testing.assert_allclose(concat(strategy, out), want_out.numpy(), **TOL)
    np.testing.assert_allclose(concat(strategy, dx), want_dx.numpy(), **TOL)
    assert len(dw) == len(want_dw) > 0
    for got, want in zip(replica_sum(strategy, dw), want_dw):
        np.testing.assert_allclose(got, want.numpy(), **TOL)
    assert np.any(want_dx.numpy() != 0) or name.startswith("positions")
    assert all(np.any(w.numpy() != 0) for w in want_dw)


# -------------------------------------------------------- padded layers

def _causal_mask(lengths, width):
    valid = np.arange(width)[np.newaxis] < lengths[:, np.newaxis]
    causal = np.tril(np.ones([width, width], bool))
    return causal[np.newaxis] & valid[:, np.newaxis, :]


PADDED_LAYERS = {
    # name: (make, call(layer, x [B, L, D], lengths [B], mask [B, L, L]))
    "padded_block": (
        lambda: layers.PaddedTransformerBlock(2, D, ffn_dim=12),
        lambda layer, x, lengths, mask: layer(x, mask, training=False)),
    "padded_encoder": (
        lambda: layers.PaddedSequenceEncoder(MAX_LEN, D, num_blocks=2,
                                             num_heads=2, dropout=0.0),
        lambda layer, x, lengths, mask: layer(x, lengths, training=False)),
    "encoder_call_padded": (
        lambda: layers.SequenceEncoder(MAX_LEN, D, num_blocks=1,
                                       num_heads=2, dropout=0.0),
        lambda layer, x, lengths, mask: layer.call_padded(x, lengths)),
}


def _padded_step(layer, call, x, lengths, mask, cotangent):
    with tf.GradientTape() as tape:
        tape.watch(x)
        out = call(layer, x, lengths, mask)
        loss = tf.reduce_sum(out * cotangent)
    grads = _gradients(tape, loss, [x] + layer.trainable_variables)
    return out, grads[0], grads[1:]


@pytest.mark.parametrize("name", list(PADDED_LAYERS))
def test_padded_layer_equals_one_device(strategy, name):
    make, call = PADDED_LAYERS[name]
    rng = np.random.default_rng(3)
    # Padding holds noise, not zeros: masking must hide it on every replica.
    x = rng.normal(size=(10, MAX_LEN, D)).astype(np.float32)
    cotangent = rng.normal(size=(10, MAX_LEN, D)).astype(np.float32)
    mask = _causal_mask(LENGTHS, MAX_LEN)
    inputs = (x, LENGTHS, mask)
    single, layer = _same_layer(
        strategy, make, lambda l: call(l, *map(tf.constant, inputs)))
    want_out, want_dx, want_dw = _padded_step(
        single, call, *map(tf.constant, inputs + (cotangent,)))

    @tf.function
    def step(values):
        return strategy.run(lambda v: _padded_step(layer, call, *v),
                            (values,))

    out, dx, dw = step(split(strategy, x, LENGTHS, mask, cotangent))
    np.testing.assert_allclose(concat(strategy, out), want_out.numpy(), **TOL)
    np.testing.assert_allclose(concat(strategy, dx), want_dx.numpy(), **TOL)
    assert len(dw) == len(want_dw) > 0
    for got, want in zip(replica_sum(strategy, dw), want_dw):
        np.testing.assert_allclose(got, want.numpy(), **TOL)
    assert np.any(want_dx.numpy() != 0)
    assert all(np.any(w.numpy() != 0) for w in want_dw)


# ------------------------------------------------------- IntegratedScorer

NUM_USERS, C = 6, 12


def _interactions(seed=4):
    """A user-item graph; user 5 has no interactions (walk fallback)."""
    rng = np.random.default_rng(seed)
    users = np.repeat(np.arange(5), [3, 2, 4, 1, 3])
    items = rng.choice(C, size=users.size)
    return users, items


def _collaborative(seed=0, **kwargs):
    users, items = _interactions()
    return samplers.CollaborativeSampler.from_interactions(
        users, items, NUM_USERS, C, seed=seed, **kwargs)


def _randomise_walk(sampler, seed=5):
    """Non-zero walk logits, so probabilities depend on every logit."""
    rng = np.random.default_rng(seed)
    for variable in sampler.trainable_variables:
        variable.assign(rng.normal(size=variable.shape).astype(np.float32))


SCORER_SAMPLERS = {
    # The three ways to a catalog's log p: item_probabilities (user ids),
    # log_prob of a query-dependent sampler (float queries), and log_prob
    # of a query-independent one.
    "collaborative": lambda: _collaborative(exclude_observed=True),
    "kernel": lambda: samplers.KernelSampler(
        C, D, alpha=5.0, leaf_size=4, refresh="manual", item_table=_table()),
    "unigram": lambda: samplers.Unigram(np.arange(C) + 1.0, alpha=0.75),
}


def _scorer_step(scorer, scores, query, cotangent):
    with tf.GradientTape() as tape:
        tape.watch(scores)
        out = scorer(scores, query)
        loss = tf.reduce_sum(out * cotangent)
    grads = _gradients(tape, loss, [scores] + scorer.trainable_variables)
    return out, grads[0], grads[1:]


@pytest.mark.parametrize("name", list(SCORER_SAMPLERS))
def test_integrated_scorer_equals_one_device(strategy, name):
    rng = np.random.default_rng(6)
    scores = rng.normal(size=(10, C)).astype(np.float32)
    query = (np.array([0, 5, 2, 2, 1, 4, 3, 0, 5, 1], np.int64)
             if name == "collaborative"
             else rng.normal(size=(10, D)).astype(np.float32))
    cotangent = rng.normal(size=(10, C)).astype(np.float32)

    def build(scorer):
        if scorer.trainable_variables:
            _randomise_walk(scorer.sampler)

    single, scorer = _same_layer(
        strategy, lambda: layers.IntegratedScorer(SCORER_SAMPLERS[name](),
                                                  weight=0.7), build)
    want_out, want_ds, want_dw = _scorer_step(
        single, *map(tf.constant, (scores, query, cotangent)))

    @tf.function
    def step(values):
        return strategy.run(lambda v: _scorer_step(scorer, *v), (values,))

    out, ds, dw = step(split(strategy, scores, query, cotangent))
    np.testing.assert_allclose(concat(strategy, out), want_out.numpy(), **TOL)
    np.testing.assert_allclose(concat(strategy, ds), want_ds.numpy(), **TOL)
    assert np.any(want_ds.numpy() != 0)
    assert len(dw) == len(want_dw)
    assert (len(dw) == 3) == (name == "collaborative")  # the walk logits
    for got, want in zip(replica_sum(strategy, dw), want_dw):
        assert np.any(want.numpy() != 0)
        np.testing.assert_allclose(got, want.numpy(), **TOL)


# --------------------------------------------------------------- losses

K = 5
TOKENS = int(LENGTHS.sum())


class RowCandidates(samplers.CandidateSampler):
    """Per-row candidates of the global batch: each replica gets its rows.

    Args:
        num_items: catalog size.
        ids: int [N, K] candidates of the global batch's N rows.
        log_q: float [N, K].
        row_bounds: {num_replicas: bounds}: replica r of a strategy of n
            replicas gets rows [bounds[r], bounds[r + 1]); one device gets
            all N.
    """

    def __init__(self, num_items, ids, log_q, row_bounds, **kwargs):
        super().__init__(num_items, seed=0, **kwargs)
        self.ids = np.asarray(ids, np.int64)
        self.log_q = np.asarray(log_q, np.float32)
        self.row_bounds = row_bounds

    def _draw(self, seed, shape, query, positives, item_table):
        context = tf.distribute.get_replica_context()
        start = 0
        if context.num_replicas_in_sync > 1:
            start = tf.constant(self.row_bounds[
                context.num_replicas_in_sync], tf.int32)[
                    context.replica_id_in_sync_group]
        rows = tf.range(start, start + shape[0])
        return (tf.gather(tf.constant(self.ids), rows),
                tf.gather(tf.constant(self.log_q), rows))

    def _log_prob(self, query, ids):
        raise NotImplementedError("not needed: positives stay uncorrected")


def _row_bounds(ragged):
    """Row (or, for the ragged batch, token) bounds per strategy size."""
    bounds_of = {n: np.cumsum([0] + s) for n, s in SLICES.items()}
    if not ragged:
        return bounds_of
    tokens = np.concatenate([[0], np.cumsum(LENGTHS)])
    return {n: tokens[b] for n, b in bounds_of.items()}


def _given(shared, ragged=False, seed=7):
    """Given candidates (hits with the targets likely: C is small)."""
    rng = np.random.default_rng(seed)
    rows = TOKENS if ragged else 10
    shape = [K] if shared else [rows, K]
    ids = rng.integers(0, C, size=shape)
    log_q = np.log(rng.uniform(0.02, 0.3, size=shape))
    if shared:
        return FixedCandidates(C, ids, log_q)
    return RowCandidates(C, ids, log_q, _row_bounds(ragged))


def _keras_loss(layer):
    """A loss layer as a loss function: with reduction AUTO, the mean over
    the *global* batch's rows under a strategy (see `reduce_losses`)."""
    def loss(hidden, table, targets, weight, bias):
        return layer(hidden, table, targets, sample_weight=weight,
                     item_bias=bias)
    return loss


def _full_softmax(hidden, table, targets, weight, bias):
    if isinstance(hidden, tf.RaggedTensor):  # a function on packed rows
        hidden, targets = hidden.flat_values, targets.flat_values
        weight = weight.flat_values
    losses = losses_lib.full_softmax_cross_entropy(
        hidden, table, targets, item_bias=bias) * weight
    return tf.reduce_sum(losses)


def _corrected(sampler):
    """corrected_softmax_cross_entropy on given per-row candidates, the
    positive corrected too and hits masked; the sum over rows."""
    def loss(hidden, table, targets, weight, bias):
        ids, log_q = sampler.sample(hidden, K, shared=False)
        positive = tf.reduce_sum(hidden * tf.gather(table, targets), 1)
        negative = tf.einsum("td,tkd->tk", hidden, tf.gather(table, ids))
        losses = losses_lib.corrected_softmax_cross_entropy(
            positive + tf.gather(bias, targets),
            negative + tf.gather(bias, ids), log_q, K,
            positive_log_q=tf.fill(tf.shape(positive), -np.log(C)),
            hits=losses_lib.accidental_hits(ids, targets)) * weight
        return tf.reduce_sum(losses)
    return loss


def _cce_minus(sampler, **options):
    return _keras_loss(losses_lib.CCEMinus(
        sampler, K, temperature=0.8, **options)), sampler


def _unigram(seed=3):
    return samplers.Unigram(np.arange(C) % 4 + 1.0, alpha=0.75, seed=seed)


LOSSES = {
    # name: (ragged rows?, build() -> (loss(hidden, table, targets, weight,
    #        bias), sampler or None)); build runs under the strategy's scope
    #        for the replicated run.
    "cut_cross_entropy": (True, lambda: (_keras_loss(
        losses_lib.CutCrossEntropy(temperature=0.7)), None)),
    "cut_cross_entropy_reference": (False, lambda: (_keras_loss(
        losses_lib.CutCrossEntropy(use_fused=False)), None)),
    "full_softmax_cross_entropy": (True, lambda: (_full_softmax, None)),
    "corrected_softmax_cross_entropy": (False, lambda: (
        _corrected(_given(False)), None)),
    "cce_minus_given_shared": (False, lambda: _cce_minus(
        _given(True), shared=True)),
    "cce_minus_given_per_row": (True, lambda: _cce_minus(
        _given(False, ragged=True))),
    # In-kernel negatives are keyed by (seed, step, global row): the
    # replicas draw exactly the single-device negatives of their rows.
    "cce_minus_uniform_in_kernel": (True, lambda: _cce_minus(
        samplers.Uniform(C, seed=3))),
    "cce_minus_unigram_in_kernel": (False, lambda: _cce_minus(_unigram())),
    "cce_minus_unigram_in_kernel_reference": (True, lambda: _cce_minus(
        _unigram(), use_fused=False)),
}


def _loss_step(loss, table, bias, lengths, hidden, targets, weight):
    """The loss and its gradients (hidden: per row)."""
    def rows(x):
        if lengths is None:
            return x
        return tf.RaggedTensor.from_row_lengths(x, lengths)

    with tf.GradientTape() as tape:
        tape.watch(hidden)
        value = loss(rows(hidden), table, rows(targets), rows(weight), bias)
    return value, _gradients(tape, value, [hidden, table, bias])


@pytest.mark.parametrize("name", list(LOSSES))
def test_loss_equals_one_device(strategy, name):
    ragged, build = LOSSES[name]
    rows = TOKENS if ragged else 10
    rng = np.random.default_rng(8)
    hidden = rng.normal(size=(rows, D)).astype(np.float32)
    targets = rng.integers(0, C, size=rows)
    weight = rng.uniform(0.5, 2.0, size=rows).astype(np.float32)
    table = rng.normal(size=(C, D)).astype(np.float32)
    bias = rng.normal(scale=0.1, size=C).astype(np.float32)

    loss, sampler = build()
    want_loss, want_grads = _loss_step(
        loss, tf.Variable(table), tf.Variable(bias),
        tf.constant(LENGTHS) if ragged else None,
        *map(tf.constant, (hidden, targets, weight)))
    with strategy.scope():
        replicated, replicated_sampler = build()
    table_var, bias_var = variables(strategy, table, bias)

    @tf.function
    def step(values):
        def fn(v):
            if not ragged:
                v = (None,) + v
            return _loss_step(replicated, table_var, bias_var, *v)
        return strategy.run(fn, (values,))

    values = (split_ragged(strategy, LENGTHS, hidden, targets, weight)
              if ragged else split(strategy, hidden, targets, weight))
    value, (d_hidden, d_table, d_bias) = step(values)
    np.testing.assert_allclose(replica_sum(strategy, value),
                               want_loss.numpy(), **TOL)
    np.testing.assert_allclose(concat(strategy, d_hidden),
                               want_grads[0].numpy(), **TOL)
    assert np.any(want_grads[0].numpy() != 0)
    for got, want in zip(replica_sum(strategy, [d_table, d_bias]),
                         want_grads[1:]):
        assert np.any(want.numpy() != 0)
        np.testing.assert_allclose(got, want.numpy(), **TOL)
    if sampler is not None:
        # One draw per step, on every copy, as on one device.
        assert int(sampler.draw_counter.numpy()) == 1
        assert local_values(strategy, replicated_sampler.draw_counter) == [
            1] * strategy.num_replicas_in_sync


def test_reference_id_check_accepts_a_replica_without_rows():
    """The pure-TF id check in a graph, of no ids: what a replica whose rows
    are all empty runs (the reference losses check their targets with it);
    it used to fail gathering the first bad id of an empty tensor."""
    check = tf.function(lambda ids: ops.validate_ids(ids, C, use_fused=False))
    assert check(tf.zeros([0], tf.int64)).shape == [0]
    with pytest.raises(tf.errors.InvalidArgumentError, match="out of range"):
        check(tf.constant([3, C], tf.int64))


# ------------------------------------------------------------- samplers

def _replica_key(seed, counter, replica):
    """The documented key of a draw: (seed, draw counter, replica id)."""
    key = tf.random.experimental.stateless_fold_in(
        tf.constant([seed, 0x5EED], tf.int32), counter)
    return tf.random.experimental.stateless_fold_in(key, replica)


def _table(seed=9):
    return np.random.default_rng(seed).normal(size=(C, D)).astype(np.float32)


SAMPLERS = {
    # name: (make, shared draws?); the seed is 11 for every stream.
    "uniform": (lambda: samplers.Uniform(C, seed=11), True),
    "log_uniform": (lambda: samplers.LogUniform(C, seed=11), True),
    "unigram": (lambda: _unigram(seed=11), False),
    "in_batch": (lambda: samplers.InBatch(C, learning_rate=0.5,
                                          seed=11), True),
    "mixed": (lambda: samplers.Mixed(
        samplers.InBatch(C, learning_rate=0.5),
        samplers.Uniform(C, seed=11)), True),
    "hard_negatives": (lambda: samplers.HardNegatives(
        samplers.Uniform(C, seed=11), pool_size=8), False),
    "kernel": (lambda: samplers.KernelSampler(
        C, D, alpha=5.0, leaf_size=4, refresh="manual",
        item_table=_table(), seed=11), False),
    "collaborative": (lambda: _collaborative(seed=11, max_length=2), False),
}
CONTEXT_FREE = ("uniform", "log_uniform", "unigram")


def _drawing(sampler):
    """The sampler whose stream (and draw counter) a sampler draws from."""
    if isinstance(sampler, samplers.Mixed):
        return sampler.other
    if isinstance(sampler, samplers.HardNegatives):
        return sampler.base
    return sampler


def _sampler_batch(name, seed=10):
    """Query rows (user ids for CollaborativeSampler), positives, ids."""
    rng = np.random.default_rng(seed)
    if name == "collaborative":
        query = np.array([0, 5, 2, 2, 1, 4, 3, 0, 5, 1], np.int64)
    else:
        query = rng.normal(size=(10, D)).astype(np.float32)
    positives = rng.integers(0, C, size=10)
    positives[3] = positives[7]  # a repeat within and across slices
    ids = rng.integers(0, C, size=(10, K))
    return query, positives, ids


def _num_kwargs(sampler, num):
    return {"num": num} if getattr(sampler, "log_prob_needs_num",
                                   False) else {}


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_log_prob_equals_one_device(strategy, name):
    make, _ = SAMPLERS[name]
    query, positives, ids = _sampler_batch(name)
    single = make()
    with strategy.scope():
        replicated = make()
    for sampler in (single, replicated):
        if name in ("in_batch", "mixed"):
            # Warm the estimator (cross-replica: every copy) so that log q
            # is not the same for every id.
            in_batch = getattr(sampler, "in_batch", sampler)
            for _ in range(3):
                in_batch.sample(None, positives=positives)
        if name == "collaborative":
            _randomise_walk(sampler)
    kwargs = _num_kwargs(single, K)

    @tf.function
    def step(values):
        return strategy.run(
            lambda q, i: replicated.log_prob(q, i, **kwargs), values)

    got = local_values(strategy, step(split(strategy, query, ids)))
    b = bounds(strategy)
    if name in ("in_batch", "mixed"):
        # log q counts the T candidates of the query's batch: per replica,
        # T is the replica's rows.
        want = [single.log_prob(query[b[r]:b[r + 1]], ids[b[r]:b[r + 1]],
                                **kwargs).numpy() for r in range(len(got))]
    else:
        want = np.split(single.log_prob(query, ids, **kwargs).numpy(), b[1:-1])
    for got_r, want_r in zip(got, want):
        # (-inf: items a CollaborativeSampler user observed, never drawn.)
        assert np.isfinite(want_r).mean() > 0.5
        np.testing.assert_allclose(got_r, want_r, **TOL)


ESTIMATOR = ("step", "last_seen", "period", "num_intervals")


@pytest.mark.parametrize("name", list(SAMPLERS))
def test_sampler_draws_follow_seed_counter_and_replica(strategy, name):
    make, shared = SAMPLERS[name]
    query, positives, _ = _sampler_batch(name)
    table = _table()
    single = make()
    with strategy.scope():
        replicated = make()
    (table_var,) = variables(strategy, table)
    if name == "collaborative":
        _randomise_walk(single)
        _randomise_walk(replicated)
    kwargs = _num_kwargs(single, K)

    def draw(sampler, q, p, t):
        return sampler.sample(q, K, shared=shared, positives=p, item_table=t)

    @tf.function
    def step(values):
        return strategy.run(lambda q, p: draw(replicated, q, p, table_var),
                            values)

    b = bounds(strategy)
    values = split(strategy, query, positives)
    for counter in range(2):
        ids, log_q = (local_values(strategy, v) for v in step(values))
        # Replica 0 draws what one device draws on the same rows.
        want_ids, want_log_q = draw(single, query[:b[1]], positives[:b[1]],
                                    table)
        np.testing.assert_array_equal(ids[0], want_ids.numpy())
        np.testing.assert_allclose(log_q[0], want_log_q.numpy(), **TOL)
        for r, (ids_r, log_q_r) in enumerate(zip(ids, log_q)):
            rows = slice(b[r], b[r + 1])
            # Every replica's log q is the single-device log q of its ids.
            np.testing.assert_allclose(
                log_q_r, single.log_prob(query[rows], ids_r, **kwargs),
                **TOL)
            if name in CONTEXT_FREE:
                # Replica r's draws are those of key (seed, counter, r).
                shape = [K] if shared else [b[r + 1] - b[r], K]
                key = _replica_key(11, counter, r)
                want_r, _ = single._draw(  # pylint: disable=protected-access
                    key, tf.constant(shape), None, None, None)
                np.testing.assert_array_equal(ids_r, want_r.numpy())
                if r:  # distinct streams
                    assert not np.array_equal(ids_r[:2], ids[0][:2])
        # The counter moved once per step, on every copy, as on one device.
        assert _drawing(single).draw_counter.numpy() == counter + 1
        assert local_values(strategy, _drawing(replicated).draw_counter) \
            == [counter + 1] * strategy.num_replicas_in_sync
        if name in ("in_batch", "mixed"):
            # The estimator takes replica 0's positives (see InBatch): one
            # device fed replica 0's rows holds the same state, on every
            # copy.
            for variable in ESTIMATOR:
                want = getattr(getattr(single, "in_batch", single),
                               variable).numpy()
                for copy in local_values(strategy, getattr(
                        getattr(replicated, "in_batch", replicated),
                        variable)):
                    np.testing.assert_array_equal(copy, want)


def _kernel_state(sampler):
    return [sampler.tree, sampler.snapshot]


def _assert_same_kernel_state(strategy, replicated, single):
    for variable, want in zip(_kernel_state(replicated),
                              _kernel_state(single)):
        for copy in local_values(strategy, variable):
            np.testing.assert_allclose(copy, want.numpy(), rtol=1e-6,
                                       atol=1e-6)


@pytest.mark.parametrize("use_fused", [None, False],
                         ids=["fused", "reference"])
def test_kernel_sampler_tree_updates_equal_one_device(strategy, use_fused):
    rng = np.random.default_rng(13)
    tables = [_table(seed) for seed in (20, 21, 22)]
    tables[1][:4] = tables[0][:4]  # some rows unchanged
    query = rng.normal(size=(10, D)).astype(np.float32)
    update_ids = np.array([0, 3, 3, 7, 1, 11, 2, 7, 5, 9], np.int64)

    def make():
        # refresh=2: on the 1st, 3rd, ... sample() (by the draw counter);
        # max_changed_fraction=1: path updates, not rebuilds.
        return samplers.KernelSampler(
            C, D, alpha=5.0, leaf_size=4, refresh=2,
            max_changed_fraction=1.0, item_table=tables[0], seed=11,
            use_fused=use_fused)

    single = make()
    with strategy.scope():
        replicated = make()
    (table,) = variables(strategy, tables[0])
    # Built under the scope: every copy holds the tree of the table.
    _assert_same_kernel_state(strategy, replicated, single)

    @tf.function
    def refresh_step(values):
        # sample() first moves the tree to the (mirrored) table when due.
        return strategy.run(lambda q: replicated.sample(
            q, K, shared=False, item_table=table), values)

    for new_table, due in ((tables[1], True), (tables[2], False)):
        table.assign(new_table)
        refresh_step(split(strategy, query))
        single.sample(query, K, shared=False, item_table=new_table)
        _assert_same_kernel_state(strategy, replicated, single)
        assert np.array_equal(single.snapshot.numpy(), new_table) == due

    @tf.function
    def update_step(values):
        # Each replica lists the rows of its own batch.
        return strategy.run(lambda i: replicated.update(table, i), values)

    updated = update_step(split(strategy, update_ids))
    want = single.update(tables[2], update_ids)
    assert local_values(strategy, updated) == [want.numpy()] * len(
        local_values(strategy, updated))
    _assert_same_kernel_state(strategy, replicated, single)
    # Rows no replica listed keep their old snapshot.
    assert not np.allclose(single.snapshot.numpy()[4], tables[2][4])

    # From the cross-replica context (e.g. a callback): every copy.
    replicated.rebuild(tables[0])
    single.rebuild(tables[0])
    _assert_same_kernel_state(strategy, replicated, single)


# ------------------------------------- losses given the replicas' negatives

class _Records:
    """Plain holder (Keras would track a dict attribute of a layer)."""

    def __init__(self):
        self.draws = {}


class Tap(samplers.CandidateSampler):
    """`inner`'s draws, kept per replica; or replayed given per-row draws.

    Rewards (`add_reward_loss`) go to `inner`, so a reward-learning sampler
    learns from the loss as it would as the loss's own sampler.

    Args:
        inner: the sampler that draws (and learns from rewards).
        replay: None, or (ids [N, K], log_q [N, K]) to return instead of
            drawing (one device: the whole batch).
    """

    def __init__(self, inner, replay=None, **kwargs):
        super().__init__(inner.num_items, seed=0, **kwargs)
        self.inner = inner
        self.replay = replay
        self.query_dependent = inner.query_dependent
        self.takes_user_ids = getattr(inner, "takes_user_ids", False)
        self.learns_from_rewards = getattr(inner, "learns_from_rewards",
                                           False)
        self.records = _Records()

    def sample(self, query, num, shared=True, positives=None,
               item_table=None):
        if self.replay is not None:
            return tuple(tf.constant(v) for v in self.replay)
        ids, log_q = self.inner.sample(query, num, shared=shared,
                                       positives=positives,
                                       item_table=item_table)
        replica = tf.get_static_value(
            tf.distribute.get_replica_context().replica_id_in_sync_group)
        self.records.draws[int(replica)] = (ids, log_q)
        return ids, log_q

    def log_prob(self, query, ids):
        return self.inner.log_prob(query, ids)

    def add_reward_loss(self, *args, **kwargs):
        self.inner.add_reward_loss(*args, **kwargs)


REAL_SAMPLER_LOSSES = {
    # name: (sampler, loss layer class, shared draws?)
    "uniform_sampled_softmax_shared": ("uniform", "SampledSoftmax", True),
    "log_uniform_cce_minus_shared": ("log_uniform", "CCEMinus", True),
    "unigram_cce_minus_per_row": ("unigram", "CCEMinus", False),
    "hard_negatives_cce_minus": ("hard_negatives", "CCEMinus", False),
    "kernel_sampled_softmax": ("kernel", "SampledSoftmax", False),
    "collaborative_sampled_softmax": ("collaborative", "SampledSoftmax",
                                      False),
}


def _real_loss_step(loss, table, bias, hidden, positives, users):
    """Mean loss, the sampler's reward surrogates (value 0) and the
    gradients of their sum."""
    sampler = loss.sampler
    with tf.GradientTape() as tape:
        tape.watch(hidden)
        mean = loss(hidden, table, positives, item_bias=bias,
                    sampler_query=users)
        surrogate = tf.add_n([tf.constant(0.0)] + sampler.inner.losses)
        total = mean + surrogate
    sources = [hidden, table, bias] + sampler.inner.trainable_variables
    return mean, surrogate, _gradients(tape, total, sources)


@pytest.mark.parametrize("name", list(REAL_SAMPLER_LOSSES))
def test_loss_given_the_replicas_draws_equals_one_device(strategy, name):
    sampler_name, layer_name, shared = REAL_SAMPLER_LOSSES[name]
    make = SAMPLERS[sampler_name][0]
    hidden, positives, _ = _sampler_batch("uniform", seed=14)
    users = _sampler_batch("collaborative")[0]
    table, bias = _table(15), np.linspace(-0.2, 0.2, C).astype(np.float32)
    options = dict(shared=shared, reduction=Reduction.SUM_OVER_BATCH_SIZE)
    if layer_name == "CCEMinus":
        options["in_kernel"] = False  # the sampler's own stream
    layer_class = getattr(losses_lib, layer_name)

    with strategy.scope():
        tap = Tap(make())
        loss = layer_class(tap, K, **options)
    if sampler_name == "collaborative":
        _randomise_walk(tap.inner)
    table_var, bias_var = variables(strategy, table, bias)

    @tf.function
    def step(values):
        def fn(h, p, u):
            out = _real_loss_step(loss, table_var, bias_var, h, p, u)
            replica = tf.get_static_value(tf.distribute.get_replica_context(
            ).replica_id_in_sync_group)
            return out, tap.records.draws[int(replica)]
        return strategy.run(fn, values)

    (mean, surrogate, grads), draws = step(
        split(strategy, hidden, positives, users))
    # One device, every row given the negatives its replica drew (a shared
    # set: the replica's rows each get it).
    b = bounds(strategy)
    ids, log_q = [], []
    for r, (ids_r, log_q_r) in enumerate(zip(
            *(local_values(strategy, v) for v in draws))):
        rows = b[r + 1] - b[r]
        ids.append(np.broadcast_to(ids_r, (rows, ids_r.shape[-1])))
        log_q.append(np.broadcast_to(log_q_r, (rows, ids_r.shape[-1])))
    single_inner = make()
    single_inner.set_weights(tap.inner.get_weights())
    options["shared"] = False
    single = layer_class(Tap(single_inner, replay=(
        np.concatenate(ids), np.concatenate(log_q))), K, **options)
    want_mean, want_surrogate, want_grads = _real_loss_step(
        single, tf.Variable(table), tf.Variable(bias),
        *map(tf.constant, (hidden, positives, users)))
    np.testing.assert_allclose(replica_sum(strategy, mean),
                               want_mean.numpy(), **TOL)
    np.testing.assert_allclose(concat(strategy, grads[0]),
                               want_grads[0].numpy(), **TOL)
    for got, want in zip(replica_sum(strategy, grads[1:]), want_grads[1:]):
        np.testing.assert_allclose(got, want.numpy(), **TOL)
    # Nothing above compared zeros with zeros; a reward-learning sampler's
    # REINFORCE surrogate (value 0) reached its walk logits.
    assert all(np.any(g.numpy() != 0) for g in want_grads)
    assert len(want_grads) == (6 if sampler_name == "collaborative" else 3)
    np.testing.assert_allclose(replica_sum(strategy, surrogate),
                               want_surrogate.numpy(), **TOL)


def test_unigram_set_counts_reaches_every_replica(strategy):
    """set_counts (cross-replica) replaces every copy's tables: the replicas
    draw and score from the new distribution, as one device does."""
    counts = np.arange(C) % 4 + 1.0
    new_counts = np.arange(C)[::-1] + 0.5
    single = samplers.Unigram(counts, alpha=0.75, seed=11)
    with strategy.scope():
        replicated = samplers.Unigram(counts, alpha=0.75, seed=11)
    single.set_counts(new_counts)
    replicated.set_counts(new_counts)
    for name in ("accept", "alias", "log_q_table"):
        for copy in local_values(strategy, getattr(replicated, name)):
            np.testing.assert_array_equal(copy, getattr(single, name).numpy())
    ids = np.arange(10 * K).reshape(10, K) % C

    @tf.function
    def step(values):
        return strategy.run(lambda i: (replicated.log_prob(None, i),
                                       replicated.sample(None, K)), values)

    log_q, (drawn, drawn_log_q) = step(split(strategy, ids))
    np.testing.assert_allclose(concat(strategy, log_q),
                               single.log_prob(None, ids).numpy(), **TOL)
    want_ids, want_log_q = single.sample(None, K)  # replica 0's stream
    np.testing.assert_array_equal(local_values(strategy, drawn)[0],
                                  want_ids.numpy())
    np.testing.assert_allclose(local_values(strategy, drawn_log_q)[0],
                               want_log_q.numpy(), **TOL)
