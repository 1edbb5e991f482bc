"""CollaborativeSampler (CoSam): a learnable random walk on the user-item graph.

Chen et al., "Learning Recommenders for Implicit Feedback with Importance
Resampling" / CoSam (ACM TOIS 39(3), 2021). The sampler of user u is a walk
on the bipartite graph of the training interactions:

- at a user u': move to one of u''s items i with probability
  e^{w1(u', i)} / Z(u'), or jump to a uniformly random item with
  probability e^{w0(u')} / Z(u'),  Z(u') = e^{w0(u')} + sum_i e^{w1(u', i)};
- at an item i: stop and emit i with probability `stop_probability` (always,
  for an item nobody interacted with), else move to one of i's users u'' with
  probability e^{w2(i, u'')} / sum_u e^{w2(i, u)};
- after `max_length` moves user -> item without stopping, emit a uniformly
  random item.

Every step is normalised, so p_s(. | u) sums to 1 by construction. The
emission probability is the sum over all paths of at most `max_length`
user -> item moves; `item_probabilities` computes it exactly for a batch of
users by propagating their walk distributions through the graph (sparse
matmuls over the E edges; dense vectors only of size [users of the batch,
U] and [users of the batch, C], never U x C): O(max_length * E) per distinct
user of a call.

Draws come from that exact distribution (the same distribution as
simulating the walk; tests compare with Monte Carlo walks), so log q is exact
for every drawn id. With `exclude_observed=True` a user's training items are
never emitted: q is the walk's distribution conditioned on not landing on one
of them,

    q(j | u) = p_s(j | u) / (1 - sum_{i observed by u} p_s(i | u)),  j not
    observed;  q(j | u) = 0 for observed j,

which is what rejecting such walks and walking again gives.

Learning: w0, w1, w2 are trainable. A loss layer that scores the emitted
negatives (`SampledSoftmax`, `SampledRetrieval`) calls `add_reward_loss` with
the recommender's pairwise loss on each negative, softplus(s_neg - s_pos), as
the reward: a REINFORCE surrogate whose gradient moves probability towards
negatives the recommender still ranks too high (see `reinforce_loss`).
Train the sampler with its own optimizer through
`tfrec_fast.models.ReinforcedSamplerModel`, or with the model's optimizer in
any `tfrs.Model` (the surrogate is one of `model.losses`; its value is 0).

Integrated prediction (`tfrec_fast.layers.IntegratedScorer`): score(u, j) =
model score + log p_s(j | u), the walk's probability without exclusion.
"""

import numbers
import os

import numpy as np
import tensorflow as tf
import tf_keras

from tfrec_fast import distribute
from tfrec_fast.ops.validate_ids import validate_ids
from tfrec_fast.samplers.base import CandidateSampler
from tfrec_fast.samplers.base import check_num


def _check_int(value, name, minimum):
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got "
                         f"{value!r}")
    return int(value)


def _check_probability(value, name):
    if isinstance(value, (bool, np.bool_)) or not isinstance(
            value, numbers.Real) or not 0.0 < float(value) <= 1.0:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def graph_edges(users, items, num_users, num_items):
    """Deduplicated, user-sorted edges of an interaction log.

    Args:
        users: int [N] user of each interaction, in [0, num_users).
        items: int [N] item of each interaction, in [0, num_items).
        num_users: U.
        num_items: C.

    Returns:
        (edge_users, edge_items): int64 [E] each, sorted by (user, item),
        one entry per distinct (user, item) pair.

    Raises:
        ValueError: lengths differ, ids out of range, or no interaction.
    """
    users = np.asarray(users)
    items = np.asarray(items)
    if users.ndim != 1 or items.ndim != 1 or users.shape != items.shape:
        raise ValueError(f"users and items must be int [N] arrays of equal "
                         f"length, got shapes {users.shape} and "
                         f"{items.shape}")
    if users.size == 0:
        raise ValueError("the interaction graph is empty: CoSam needs at "
                         "least one (user, item) interaction")
    for name, ids, size in (("users", users, num_users),
                            ("items", items, num_items)):
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"{name} must be integer ids, got {ids.dtype}")
        if ids.min() < 0 or ids.max() >= size:
            raise ValueError(f"{name} must lie in [0, {size}), got ids in "
                             f"[{ids.min()}, {ids.max()}]")
    keys = np.unique(users.astype(np.int64) * num_items
                     + items.astype(np.int64))
    return keys // num_items, keys % num_items


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class CollaborativeSampler(CandidateSampler):
    """Per-user negatives from a learnable walk on the interaction graph.

    `sample(user_ids [T], K, shared=False)` -> ids int64 [T, K] and exact
    log q [T, K]; `log_prob(user_ids [T], ids)` for any ids ([K] or
    [T, K]); `item_probabilities(user_ids [B])` -> [B, C] (module docstring
    for the walk). The query is a user id per row (pass it to the loss
    layers as `sampler_query`); e.g. for SASRec, every position's user.

    **Shared draws** (`shared=True`) raise a ValueError: q depends on the
    user. With `exclude_observed=True` a training positive has q = 0, so
    loss layers must not correct the positive (`correct_positive=True` is a
    ValueError there).

    **Users without interactions** (rows of the graph with no edge) are
    not an error: their walk starts with a jump to a uniform item and goes
    on from there like any walk (uniform q when `stop_probability` is 1);
    they have no observed items to exclude. Ids outside
    [0, U) are an InvalidArgumentError. A user who observed every item has
    no negative to emit: InvalidArgumentError when drawn with
    `exclude_observed=True`.

    **State** (variables, so checkpoints and SavedModels carry it):
    `edge_index` int64 [E, 2] (user, item) sorted by user, `user_splits`
    int64 [U + 1] (CSR of the edges by user), `item_degree` int64 [C], the
    trainable logits `user_to_item_logits` w1 [E], `item_to_user_logits`
    w2 [E] (w2 of edge e is the weight of walking from its item back to its
    user) and `jump_logits` w0 [U], and the draw counter. Memory: 24 bytes
    per edge + 12 per user + 8 per item (1M items, 10M edges: ~0.24 GB).
    `get_config` records the sizes, not the graph: a layer made by
    `from_config` gets its graph from the weights it loads.

    **Cost** per call: O(max_length * E * B_u) for the B_u distinct users of
    the call (sparse matmuls), plus O(B_u * C) for the distributions and
    O(T K log C) for the draws. Memory: a few [C, B_u] float32 tensors.

    Args:
        num_users: U.
        num_items: C.
        num_edges: E, the number of distinct (user, item) edges.
        edges: optional (edge_users, edge_items) int [E] arrays from
            `graph_edges`; None leaves the graph to be loaded (checkpoint /
            weights / `set_graph`).
        stop_probability: probability of stopping at an item that has users,
            in (0, 1].
        max_length: maximum number of user -> item moves, >= 1; past it the
            walk emits a uniformly random item.
        exclude_observed: never emit a user's training items (q
            renormalised, module docstring).
        observed_reward: the reward, in place of the recommender's loss, of
            an emitted negative that the loss layer counts as an accidental
            hit (the row's positive or listed positives; possible only with
            `exclude_observed=False`): a false negative the sampler should
            learn to avoid.
        initial_jump_logit: initial w0 (w1 and w2 start at 0: every move
            uniform among a node's edges; the jump has weight e^{w0} against
            1 per edge).
        seed: seed of the draws.
    """

    query_dependent = True
    # The query is int user ids (a loss layer's `sampler_query`).
    takes_user_ids = True
    # Loss layers hand this sampler rewards for its negatives (add_reward_loss).
    learns_from_rewards = True

    def __init__(self, num_users, num_items, num_edges, edges=None,
                 stop_probability=0.5, max_length=3, exclude_observed=True,
                 observed_reward=0.0, initial_jump_logit=0.0, seed=None,
                 **kwargs):
        super().__init__(num_items, seed=seed, **kwargs)
        self.num_users = _check_int(num_users, "num_users", 1)
        self.num_edges = _check_int(num_edges, "num_edges", 1)
        self.stop_probability = _check_probability(stop_probability,
                                                   "stop_probability")
        self.max_length = _check_int(max_length, "max_length", 1)
        self.exclude_observed = bool(exclude_observed)
        self.observed_reward = float(observed_reward)
        if not np.isfinite(self.observed_reward):
            raise ValueError(f"observed_reward must be finite, got "
                             f"{observed_reward!r}")
        self.initial_jump_logit = float(initial_jump_logit)
        if not np.isfinite(self.initial_jump_logit):
            raise ValueError(f"initial_jump_logit must be finite, got "
                             f"{initial_jump_logit!r}")
        self.edge_index = self.add_weight(
            name="edge_index", shape=[self.num_edges, 2], dtype=tf.int64,
            trainable=False, initializer="zeros")
        self.user_splits = self.add_weight(
            name="user_splits", shape=[self.num_users + 1],
            dtype=tf.int64, trainable=False, initializer="zeros")
        self.item_degree = self.add_weight(
            name="item_degree", shape=[self.num_items], dtype=tf.int64,
            trainable=False, initializer="zeros")
        self.user_to_item_logits = self.add_weight(
            name="user_to_item_logits", shape=[self.num_edges],
            dtype=tf.float32, initializer="zeros")
        self.item_to_user_logits = self.add_weight(
            name="item_to_user_logits", shape=[self.num_edges],
            dtype=tf.float32, initializer="zeros")
        self.jump_logits = self.add_weight(
            name="jump_logits", shape=[self.num_users], dtype=tf.float32,
            initializer=tf_keras.initializers.Constant(
                self.initial_jump_logit))
        if edges is not None:
            self.set_graph(*edges)

    @property
    def excludes_positives(self):
        """True when training items (every positive) have q = 0."""
        return self.exclude_observed

    @classmethod
    def from_interactions(cls, users, items, num_users, num_items, **kwargs):
        """A sampler over the graph of an interaction log ([N] ids each)."""
        edge_users, edge_items = graph_edges(users, items, num_users,
                                             num_items)
        return cls(num_users, num_items, edge_users.size,
                   edges=(edge_users, edge_items), **kwargs)

    @classmethod
    def from_sequences(cls, sequences, num_items, **kwargs):
        """A sampler over `tfrec_fast.data.SequenceData` (row u = user u)."""
        users = np.repeat(np.arange(sequences.num_users), sequences.lengths)
        return cls.from_interactions(users, sequences.items,
                                     sequences.num_users, num_items, **kwargs)

    def get_config(self):
        config = super().get_config()
        config.update(num_users=self.num_users, num_edges=self.num_edges,
                      stop_probability=self.stop_probability,
                      max_length=self.max_length,
                      exclude_observed=self.exclude_observed,
                      observed_reward=self.observed_reward,
                      initial_jump_logit=self.initial_jump_logit)
        return config

    def set_graph(self, edge_users, edge_items):
        """Loads the graph (from `graph_edges`) and resets the logits.

        Args:
            edge_users: int [E]; with edge_items, distinct (user, item)
                pairs (sorted by (user, item) saves a sort).
            edge_items: int [E].
        """
        edge_users = np.asarray(edge_users, np.int64)
        edge_items = np.asarray(edge_items, np.int64)
        if edge_users.shape != (self.num_edges,) or (
                edge_items.shape != (self.num_edges,)):
            raise ValueError(f"the graph must have num_edges = "
                             f"{self.num_edges} edges, got arrays of shapes "
                             f"{edge_users.shape} and {edge_items.shape}")
        users, items = edge_users, edge_items
        for name, ids, size in (("edge_users", users, self.num_users),
                                ("edge_items", items, self.num_items)):
            if ids.min() < 0 or ids.max() >= size:
                raise ValueError(f"{name} must lie in [0, {size}), got ids "
                                 f"in [{ids.min()}, {ids.max()}]")
        keys = users * self.num_items + items
        if np.any(np.diff(keys) <= 0):  # sort only when needed (O(E log E))
            keys = np.sort(keys)
            if np.any(np.diff(keys) == 0):
                raise ValueError("edges must be distinct (user, item) pairs;"
                                 " use graph_edges() to deduplicate")
            users, items = keys // self.num_items, keys % self.num_items
        self.edge_index.assign(np.stack([users, items], axis=1))
        self.user_splits.assign(np.concatenate(
            [[0], np.cumsum(np.bincount(users, minlength=self.num_users))]))
        self.item_degree.assign(np.bincount(items, minlength=self.num_items))
        self.user_to_item_logits.assign(tf.zeros([self.num_edges]))
        self.item_to_user_logits.assign(tf.zeros([self.num_edges]))
        self.jump_logits.assign(
            tf.fill([self.num_users], self.initial_jump_logit))

    # ------------------------------------------------------------ the walk

    def _transitions(self):
        """Normalised walk steps from the current logits.

        Returns:
            (to_item [E], to_user [E], jump [U], stop [C]): float32
            probabilities of moving along each edge user -> item, along each
            edge item -> user, of jumping, and of stopping at each item.

        Raises:
            InvalidArgumentError: a logit is NaN or Inf.
        """
        message = ("CollaborativeSampler: walk logits must be finite (a "
                   "NaN/Inf here usually means the sampler's learning rate "
                   "is too high)")
        w1 = tf.debugging.check_numerics(self.user_to_item_logits, message)
        w2 = tf.debugging.check_numerics(self.item_to_user_logits, message)
        w0 = tf.debugging.check_numerics(self.jump_logits, message)
        edge_users = self.edge_index[:, 0]
        edge_items = self.edge_index[:, 1]
        # Log-normaliser of each user: logsumexp over {w0(u)} U {w1(u, .)}.
        user_max = tf.maximum(w0, tf.math.unsorted_segment_max(
            w1, edge_users, self.num_users))
        user_sum = tf.exp(w0 - user_max) + tf.math.unsorted_segment_sum(
            tf.exp(w1 - tf.gather(user_max, edge_users)), edge_users,
            self.num_users)
        user_log_z = user_max + tf.math.log(user_sum)
        to_item = tf.exp(w1 - tf.gather(user_log_z, edge_users))
        jump = tf.exp(w0 - user_log_z)
        # Items: softmax of w2 over each item's edges (items without edges
        # get an empty segment; the walk always stops there).
        item_max = tf.math.unsorted_segment_max(w2, edge_items,
                                                self.num_items)
        shifted = tf.exp(w2 - tf.gather(item_max, edge_items))
        item_sum = tf.math.unsorted_segment_sum(shifted, edge_items,
                                                self.num_items)
        to_user = shifted / tf.gather(item_sum, edge_items)
        stop = tf.where(self.item_degree > 0, self.stop_probability, 1.0)
        return to_item, to_user, jump, stop

    def _check_users(self, user_ids, use_fused=None):
        user_ids = tf.convert_to_tensor(user_ids)
        if user_ids.shape.rank == 2 and user_ids.shape[1] == 1:
            user_ids = user_ids[:, 0]
        if not user_ids.dtype.is_integer or user_ids.shape.rank != 1:
            raise ValueError(
                f"CollaborativeSampler: the query must be int user ids [T] "
                f"(pass them as sampler_query), got {user_ids.dtype.name} "
                f"with shape {user_ids.shape}")
        user_ids = validate_ids(user_ids, self.num_users, arg_name="user_ids",
                                use_fused=use_fused)
        return tf.cast(user_ids, tf.int64)

    def item_probabilities(self, user_ids, exclude_observed=None,
                           use_fused=None):
        """Exact emission probabilities of every item for each user.

        Args:
            user_ids: int [B] users, in [0, U).
            exclude_observed: None for the sampler's setting; False gives
                the walk's own p_s (what integrated prediction adds); True
                the distribution the draws use.
            use_fused: how user ids are validated (`validate_ids`); False
                keeps the graph to core TensorFlow ops (serving).

        Returns:
            float32 [B, C], rows summing to 1 (up to rounding).
        """
        user_ids = self._check_users(user_ids, use_fused)
        if exclude_observed is None:
            exclude_observed = self.exclude_observed
        unique_users, row_of = tf.unique(user_ids, out_idx=tf.int64)
        probs = self._unique_user_probabilities(unique_users,
                                                exclude_observed)
        return tf.gather(tf.transpose(probs), row_of)

    def _unique_user_probabilities(self, users, exclude_observed):
        """float32 [C, B_u]: column b is the distribution of users[b]."""
        to_item, to_user, jump, stop = self._transitions()
        shape = tf.constant([self.num_users, self.num_items], tf.int64)
        walk = (tf.SparseTensor(self.edge_index, to_item, shape),
                tf.SparseTensor(self.edge_index, to_user, shape),
                jump[:, tf.newaxis], stop[:, tf.newaxis])
        # Columns in chunks of _CHUNK users: the sparse x dense matmuls
        # gather a row of the dense side per edge, and narrow rows keep
        # that in cache (1M items: 64 users cost 7.5x 16 users in one
        # matmul, 4x in chunks). TF's sparse x dense matmul runs on one
        # thread: independent groups of chunks run one per core.
        size = tf.size(users)
        num_chunks = (size + _CHUNK - 1) // _CHUNK
        chunks = tf.reshape(
            tf.pad(users, [[0, num_chunks * _CHUNK - size]]),
            [num_chunks, _CHUNK])  # padded with user 0, dropped below
        num_groups = _propagation_groups()
        bounds = [num_chunks * g // num_groups
                  for g in range(num_groups + 1)]
        parts = [tf.map_fn(
            lambda chunk: self._propagate(chunk, *walk),
            chunks[bounds[g]:bounds[g + 1]], parallel_iterations=1,
            fn_output_signature=tf.TensorSpec([self.num_items, _CHUNK],
                                              tf.float32))
            for g in range(num_groups)]
        emitted = tf.reshape(
            tf.transpose(tf.concat(parts, 0), [1, 0, 2]),
            [self.num_items, num_chunks * _CHUNK])[:, :size]
        if exclude_observed:
            emitted = self._without_observed(emitted, users)
        return emitted

    def _propagate(self, users, user_to_item, item_to_user, jump, stop):
        """float32 [C, B]: the walks' emission distributions of `users`."""
        num_items = tf.cast(self.num_items, tf.float32)
        num_users = tf.size(users)
        # at_users [U, B]: where the walkers of each column stand.
        at_users = tf.scatter_nd(
            tf.stack([users, tf.range(num_users, dtype=tf.int64)], 1),
            tf.ones([num_users]), [self.num_users, num_users])
        emitted = tf.zeros([self.num_items, num_users])
        for move in range(self.max_length):
            jumped = tf.reduce_sum(at_users * jump, 0)
            at_items = tf.sparse.sparse_dense_matmul(
                user_to_item, at_users, adjoint_a=True) + jumped / num_items
            emitted += at_items * stop
            moving = at_items * (1.0 - stop)
            if move + 1 < self.max_length:  # the last walk back is unused
                at_users = tf.sparse.sparse_dense_matmul(item_to_user, moving)
        # Walkers still moving after max_length moves emit a uniform item.
        return emitted + tf.reduce_sum(moving, 0) / num_items

    def observed_items(self, user_ids):
        """int64 RaggedTensor [B, (n_u)]: each user's training items."""
        user_ids = self._check_users(user_ids)
        return self._observed(user_ids)

    def _observed(self, users):
        starts = tf.gather(self.user_splits, users)
        limits = tf.gather(self.user_splits, users + 1)
        edges = tf.ragged.range(starts, limits)
        return edges.with_flat_values(
            tf.gather(self.edge_index[:, 1], edges.flat_values))

    def _without_observed(self, probs, users):
        """Zeroes each column's observed items and renormalises."""
        observed = self._observed(users)
        indices = tf.stack([observed.flat_values,
                            observed.value_rowids()], axis=1)
        observed_mass = tf.math.unsorted_segment_sum(
            tf.gather_nd(probs, indices), observed.value_rowids(),
            tf.size(users))
        remaining = 1.0 - observed_mass
        # Counted, not read off the mass: rounding can leave 1 - 1e-7.
        check = tf.debugging.assert_less(
            observed.row_lengths(), tf.cast(self.num_items, tf.int64),
            message=(
                "CollaborativeSampler: a user observed every item; there is "
                "no negative to emit with exclude_observed=True"))
        with tf.control_dependencies([check]):
            probs = tf.tensor_scatter_nd_update(
                probs, indices, tf.zeros([tf.shape(indices)[0]]))
        return probs / remaining[tf.newaxis, :]

    # ------------------------------------------------ CandidateSampler API

    def sample(self, query, num, shared=True, positives=None,
               item_table=None):
        """Draws K negatives per row from the row's user's walk.

        Args:
            query: int [T] user id of each row.
            num: K.
            shared: must be False (q depends on the user).
            positives, item_table: ignored.

        Returns:
            (ids int64 [T, K], log_q float32 [T, K]); log_q carries no
            gradient (the sampler learns through `add_reward_loss`).
        """
        if shared:
            raise ValueError(
                "CollaborativeSampler draws per user: pass shared=False "
                "(one candidate set for the batch has no single q)")
        num = check_num(num)
        users = self._check_users(query)
        unique_users, row_of = tf.unique(users, out_idx=tf.int64)
        probs = tf.transpose(self._unique_user_probabilities(
            unique_users, self.exclude_observed))  # [B_u, C]
        ids = _draw_rows(probs, row_of, num, self.next_seed())
        log_q = tf.math.log(tf.gather_nd(
            probs, tf.stack([tf.broadcast_to(row_of[:, tf.newaxis],
                                             tf.shape(ids)), ids], -1)))
        return ids, tf.stop_gradient(log_q)

    def log_prob(self, query, ids):
        """log q of `ids` ([K] for every row, or [T, K]) for users [T]."""
        users = self._check_users(query)
        ids = tf.cast(validate_ids(ids, self.num_items, arg_name="ids"),
                      tf.int64)
        return tf.math.log(self._probabilities_of(users, ids,
                                                  self.exclude_observed))

    def _probabilities_of(self, users, ids, exclude_observed):
        """q of ids [K] (every row) or [T, K] for users [T]."""
        unique_users, row_of = tf.unique(users, out_idx=tf.int64)
        probs = tf.transpose(self._unique_user_probabilities(
            unique_users, exclude_observed))
        if ids.shape.rank == 1:
            return tf.gather(tf.gather(probs, row_of), ids, axis=1)
        rows = tf.broadcast_to(row_of[:, tf.newaxis], tf.shape(ids))
        return tf.gather_nd(probs, tf.stack([rows, ids], -1))

    # ---------------------------------------------------------- learning

    def reinforce_loss(self, query, ids, rewards):
        """REINFORCE surrogate for draws `ids` [T, K] of users `query` [T].

        Its value is 0; its gradient w.r.t. the walk logits is

            - 1/T sum_t 1/K sum_k (r_tk - mean_k r_tk) grad log q(ids_tk | u_t)

        (the row mean as baseline), so minimising it raises the probability
        of negatives with above-average reward. Under a `tf.distribute`
        strategy T is the number of rows of the *global* batch (each
        replica returns its share, as `reduce_losses` does), so the
        replicas' gradients, summed by the all-reduce, are the
        single-device gradient.

        Args:
            query: int [T] users.
            ids: int [T, K] ids drawn for them.
            rewards: float [T, K] (no gradient is taken through them).

        Returns:
            float32 scalar.
        """
        users = self._check_users(query)
        ids = tf.cast(ids, tf.int64)
        rewards = tf.stop_gradient(tf.cast(rewards, tf.float32))
        advantage = rewards - tf.reduce_mean(rewards, axis=1, keepdims=True)
        q = self._probabilities_of(users, ids, self.exclude_observed)
        # Observed items have q = 0 when excluded (never drawn): no term,
        # and no log(0) whose gradient would be NaN.
        log_q = tf.math.log(tf.where(q > 0, q, 1.0))
        terms = tf.reduce_mean(
            advantage * (log_q - tf.stop_gradient(log_q)), axis=1)
        rows = distribute.sum_across_replicas(
            tf.cast(tf.size(terms), tf.float32))
        return -tf.math.divide_no_nan(tf.reduce_sum(terms), rows)

    def add_reward_loss(self, query, ids, negative_logits, positive_logits,
                        observed=None):
        """Adds the REINFORCE surrogate to this layer's losses.

        Called by loss layers with the logits of the emitted negatives: the
        reward of a negative is the recommender's pairwise loss on it,
        softplus(s_neg - s_pos), and `observed_reward` where `observed`
        (hits on the row's positives / observed items).

        Args:
            query: int [T] users.
            ids: int [T, K] drawn ids.
            negative_logits: float [T, K].
            positive_logits: float [T].
            observed: optional bool [T, K].
        """
        rewards = tf.nn.softplus(tf.cast(negative_logits, tf.float32)
                                 - tf.cast(positive_logits,
                                           tf.float32)[:, tf.newaxis])
        if observed is not None:
            rewards = tf.where(observed, self.observed_reward, rewards)
        self.add_loss(self.reinforce_loss(query, ids, rewards))

    def _draw(self, seed, shape, query, positives, item_table):
        raise NotImplementedError("CollaborativeSampler overrides sample()")

    def _log_prob(self, query, ids):
        raise NotImplementedError("CollaborativeSampler overrides log_prob()")


# Users per propagation chunk (columns of the dense side of a matmul).
_CHUNK = 8


def _propagation_groups():
    """Column groups of a propagation: the cores TF may use, 1 to 8."""
    threads = tf.config.threading.get_inter_op_parallelism_threads() or \
        os.cpu_count() or 1
    return int(min(max(threads, 1), 8))


def _draw_rows(probs, row_of, num, seed):
    """K draws per row t from the distribution probs[row_of[t]].

    Inverse-CDF on one float64 array of all distributions' CDFs, row b
    shifted by 2 b (a gap of ~1 between rows, so rounding of a row's total
    can never reach into the next), so one searchsorted serves every row.

    Args:
        probs: float32 [B_u, C] (rows sum to ~1; zero entries never drawn).
        row_of: int [T] row of probs for each output row.
        num: K.
        seed: int32 [2] stateless seed.

    Returns:
        int64 [T, K].
    """
    num_rows = tf.shape(probs, out_type=tf.int64)[0]
    num_items = tf.shape(probs, out_type=tf.int64)[1]
    cdf = tf.cumsum(tf.cast(probs, tf.float64), axis=1)
    total = cdf[:, -1]
    offsets = 2.0 * tf.range(num_rows, dtype=tf.float64)
    flat_cdf = tf.reshape(cdf + offsets[:, tf.newaxis], [-1])
    row_of = tf.cast(row_of, tf.int64)
    uniform = tf.random.stateless_uniform(
        tf.stack([tf.size(row_of), tf.cast(num, tf.int32)]), seed,
        dtype=tf.float64)
    targets = (tf.gather(offsets, row_of)[:, tf.newaxis]
               + uniform * tf.gather(total, row_of)[:, tf.newaxis])
    position = tf.reshape(tf.searchsorted(
        flat_cdf[tf.newaxis, :], tf.reshape(targets, [1, -1]),
        side="right", out_type=tf.int64), tf.shape(targets))
    ids = position - row_of[:, tf.newaxis] * num_items
    # Rounding can put a draw past the row's last item with mass.
    last = num_items - 1 - tf.argmax(
        tf.reverse(tf.cast(probs > 0, tf.int32), [1]), axis=1,
        output_type=tf.int64)
    return tf.clip_by_value(ids, 0, tf.gather(last, row_of)[:, tf.newaxis])
