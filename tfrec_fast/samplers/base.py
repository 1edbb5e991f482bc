"""CandidateSampler: the one interface every negative sampler implements.

A sampler proposes candidate item ids for a sampled softmax and says how
likely each proposal was, so that the loss can correct for it:

    ids, log_q = sampler.sample(query, num)          # shared: [K], [K]
    ids, log_q = sampler.sample(query, num, shared=False)   # per row: [T, K]
    log_q = sampler.log_prob(query, ids)

`log_q` is the log of the probability of one draw (draws are with
replacement), so that `K * q` is the expected number of times an item is
drawn and the loss subtracts `log(K * q)` from the candidate's logit.
Samplers whose draw count is not K i.i.d. draws (in-batch candidates,
mixtures) define `log_q` through that identity: `log(K) + log_q` is the log
of the item's expected count among the K candidates.

State (draw counters, frequency estimates, alias tables) lives in
non-trainable `tf.Variable`s so checkpoints and SavedModels carry it. Draws
are stateless-random ops keyed by `(seed, draw counter, replica id)`: the
same seed and counter give the same draws, restoring a checkpoint restores
the next draws, and replicas of a `tf.distribute` strategy draw
independently.
"""

import numpy as np
import tensorflow as tf
import tf_keras

from tfrec_fast.ops.validate_ids import validate_ids


def _replica_id():
    """The replica id in the current tf.distribute sync group (0 outside)."""
    context = tf.distribute.get_replica_context()
    if context is None:  # cross-replica context: one logical stream
        return tf.constant(0, tf.int32)
    return tf.cast(context.replica_id_in_sync_group, tf.int32)


def check_num(num, arg_name="num"):
    """Checks a sample count: a positive integer (Python or scalar tensor).

    Returns:
        The count as a Python int when static, else an int32 scalar tensor
        guarded by an assertion.

    Raises:
        ValueError: a static count that is not a positive integer.
    """
    if isinstance(num, (bool, np.bool_)):
        raise ValueError(f"{arg_name} must be a positive integer, got {num!r}")
    if isinstance(num, (int, np.integer)):
        if num <= 0:
            raise ValueError(f"{arg_name} must be a positive integer, got {num}")
        return int(num)
    num = tf.convert_to_tensor(num)
    if not num.dtype.is_integer or num.shape.rank not in (None, 0):
        raise ValueError(f"{arg_name} must be a positive integer scalar, got "
                         f"{num.dtype.name} with shape {num.shape}")
    static = tf.get_static_value(num)
    if static is not None:
        return check_num(int(static), arg_name)
    num = tf.cast(num, tf.int32)
    with tf.control_dependencies([tf.debugging.assert_positive(
            num, message=f"{arg_name} must be a positive integer")]):
        return tf.identity(num)


def check_query(query, arg_name="query", floating=True):
    """Converts `query` and checks that it is a [T, D] (float) tensor."""
    query = tf.convert_to_tensor(query)
    if query.shape.rank is not None and query.shape.rank != 2:
        raise ValueError(f"{arg_name} must have rank 2 ([T, D]), got shape "
                         f"{query.shape}")
    if floating and not query.dtype.is_floating:
        raise ValueError(f"{arg_name} must be a floating-point [T, D] tensor, "
                         f"got {query.dtype.name}")
    return query


def check_positives(positives, num_items, owner):
    """Checks int [T] positives in [0, num_items); returns them as int64."""
    if positives is None:
        raise ValueError(f"{owner} needs positives: int [T] positive ids of "
                         "the batch (its in-batch candidates)")
    positives = tf.convert_to_tensor(positives)
    if not positives.dtype.is_integer:
        raise ValueError(f"positives must be integer ids, got "
                         f"{positives.dtype.name}")
    if positives.shape.rank is not None and positives.shape.rank != 1:
        raise ValueError(f"positives must have rank 1 ([T]), got shape "
                         f"{positives.shape}")
    positives = validate_ids(positives, num_items, arg_name="positives")
    return tf.cast(positives, tf.int64)


def check_rows(query, num_rows, owner):
    """Checks that query [T, D] has `num_rows` rows (statically or at run)."""
    if query is None:
        return []
    static_query = query.shape[0]
    static_rows = tf.get_static_value(num_rows)
    if static_query is not None and static_rows is not None:
        if static_query != int(static_rows):
            raise ValueError(f"{owner}: query has {static_query} rows but "
                             f"positives has {int(static_rows)}; they must "
                             "describe the same T rows")
        return []
    return [tf.debugging.assert_equal(
        tf.shape(query, out_type=tf.int64)[0], tf.cast(num_rows, tf.int64),
        message=f"{owner}: query and positives must have the same number "
                "of rows T")]


def check_positive_correction(sampler, correct_positive):
    """ValueError when the positive's q would be 0 (its log q is -inf).

    Samplers that never emit a row's positives (`excludes_positives`, e.g.
    `CollaborativeSampler(exclude_observed=True)`) give them q = 0, so a
    loss must not correct the positive by it.
    """
    if correct_positive and getattr(sampler, "excludes_positives", False):
        raise ValueError(
            f"correct_positive=True with {type(sampler).__name__}, which "
            f"never emits a row's positives (q = 0, log q = -inf): leave "
            f"the positive uncorrected")


def sampler_query_for(sampler, query, sampler_query):
    """What `sampler` conditions on: `sampler_query` for samplers whose
    query is user ids (`takes_user_ids`, e.g. `CollaborativeSampler`),
    else `query` (the hidden states / query embeddings). Models hand every
    loss the batch's users when their data has them; samplers that do not
    take user ids never see them."""
    if sampler_query is not None and getattr(sampler, "takes_user_ids",
                                             False):
        return sampler_query
    return query


def check_sampler(sampler, arg_name):
    """Checks that a sub-sampler argument is a CandidateSampler."""
    if not isinstance(sampler, CandidateSampler):
        raise ValueError(f"{arg_name} must be a tfrec_fast CandidateSampler, "
                         f"got {type(sampler).__name__}")
    return sampler


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class CandidateSampler(tf_keras.layers.Layer):
    """Base class of negative samplers over a catalog of `num_items` items.

    Subclasses implement `_draw(seed, shape, query, positives, item_table)`
    and `_log_prob(query, ids)`; this class validates arguments, advances the
    draw counter and keys the random stream.

    Args:
        num_items: catalog size C; ids are in [0, C).
        seed: int seed of the random stream. None draws one from NumPy's
            global generator at construction (so `tf_keras.utils.
            set_random_seed` makes it reproducible) and records it in
            `get_config()`.
        **kwargs: base Layer arguments. `dtype` defaults to "float32"
            whatever the global policy is.

    Mixed precision: a sampler's dtype policy is float32 by default even
    under a `mixed_float16` / `mixed_bfloat16` global policy, so its state
    variables are plain float32 variables (not AutoCastVariables that a
    calling loss layer would read in half precision), queries of any float
    dtype are scored in float32 (or float64), and log q is always float32.
    """

    # True when the draw depends on the query (log_prob then returns one row
    # of probabilities per query row).
    query_dependent = False

    def __init__(self, num_items, seed=None, **kwargs):
        # Half-precision log q / alias tables / kernel trees would bias the
        # logQ correction (and the compiled tree ops need float32 state).
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if isinstance(num_items, bool) or not isinstance(
                num_items, (int, np.integer)) or num_items <= 0:
            raise ValueError(
                f"num_items must be a positive integer, got {num_items!r}")
        self.num_items = int(num_items)
        if seed is None:
            seed = int(np.random.randint(0, 2**31 - 1))
        self.seed = int(seed)
        # ONLY_FIRST_REPLICA: replicas share one counter; their streams
        # differ through the replica id folded into the key.
        self.draw_counter = self.add_weight(
            name="draw_counter", shape=[], dtype=tf.int64, trainable=False,
            initializer="zeros",
            aggregation=tf.VariableAggregation.ONLY_FIRST_REPLICA)
        # No inputs to build from: the state is complete here.
        self.built = True

    def get_config(self):
        config = super().get_config()
        config.update(num_items=self.num_items, seed=self.seed)
        return config

    def next_seed(self):
        """int32 [2] key of the next draw; advances the draw counter."""
        counter = self.draw_counter.assign_add(1, read_value=True) - 1
        key = tf.random.experimental.stateless_fold_in(
            tf.constant([self.seed, 0x5EED], tf.int32),
            tf.cast(counter % (2**31 - 1), tf.int32))
        return tf.random.experimental.stateless_fold_in(key, _replica_id())

    def sample(self, query, num, shared=True, positives=None,
               item_table=None):
        """Draws candidates with replacement.

        Args:
            query: float [T, D] query rows (hidden states / query
                embeddings), or None for samplers that ignore it when
                `shared` is True. Per-row draws take T from it.
            num: K, a positive int (or int scalar tensor).
            shared: True for one set of K candidates shared by every row,
                False for K candidates per row.
            positives: optional int [T] positive ids of the rows (used by
                in-batch samplers; ignored by the others).
            item_table: optional float [C, D] item embeddings (used by
                samplers that score candidates; ignored by the others).

        Returns:
            (ids int64 [K] or [T, K], log_q float32 of the same shape):
            candidates and the log probability of one draw of each.
        """
        num = check_num(num)
        if query is not None:
            query = check_query(query, floating=False)
        if not shared and query is None:
            raise ValueError("per-row draws (shared=False) need query [T, D] "
                             "to know the number of rows T")
        if self.query_dependent and query is None:
            raise ValueError(f"{type(self).__name__} draws depend on the "
                             "query; pass query [T, D]")
        if positives is not None:
            positives = check_positives(positives, self.num_items,
                                        type(self).__name__)
        if shared:
            shape = tf.reshape(tf.cast(num, tf.int32), [1])
        else:
            shape = tf.stack([tf.shape(query)[0], tf.cast(num, tf.int32)])
        ids, log_q = self._draw(self.next_seed(), shape, query=query,
                                positives=positives, item_table=item_table)
        return tf.cast(ids, tf.int64), tf.cast(log_q, tf.float32)

    def log_prob(self, query, ids):
        """Log probability of one draw of each id.

        Args:
            query: float [T, D] query rows, or None for samplers that ignore
                the query.
            ids: int ids of any shape; for query-dependent samplers [K]
                (every row scored) or [T, K].

        Returns:
            float32 log q with the shape of `ids` ([T, K] for query-dependent
            samplers given shared ids [K]).
        """
        ids = validate_ids(ids, self.num_items, arg_name="ids")
        if self.query_dependent and query is None:
            raise ValueError(f"{type(self).__name__} probabilities depend on "
                             "the query; pass query [T, D]")
        return tf.cast(self._log_prob(query, tf.cast(ids, tf.int64)),
                       tf.float32)

    def _draw(self, seed, shape, query, positives, item_table):
        raise NotImplementedError

    def _log_prob(self, query, ids):
        raise NotImplementedError
