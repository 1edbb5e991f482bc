"""In-batch candidates with a streaming frequency estimate (Yi et al. 2019).

The candidates of an in-batch softmax are the positives of the batch itself:
every row is scored against the other rows' positives. Popular items show up
in many batches, so they are pushed down far more often than rare ones; the
logQ correction removes that bias, and it needs each item's expected count
per batch. `InBatch` estimates it online with the streaming estimator of
Yi et al., "Sampling-bias-corrected neural modeling for large corpus item
recommendations", RecSys 2019 (Algorithm 2), kept in variables so that
checkpoints and SavedModels carry it.
"""

import math

import numpy as np
import tensorflow as tf
import tf_keras

from tfrec_fast.ops.validate_ids import validate_ids
from tfrec_fast.samplers.base import CandidateSampler
from tfrec_fast.samplers.base import check_num
from tfrec_fast.samplers.base import check_positives
from tfrec_fast.samplers.base import check_query
from tfrec_fast.samplers.base import check_rows

# num_intervals saturates here; it only matters below 1 / learning_rate.
_MAX_INTERVALS = 2**30


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class InBatch(CandidateSampler):
    """The batch's positives as candidates, logQ from a streaming estimate.

    `sample(query, positives=p)` returns the T positives `p` themselves as
    shared candidates (every row is scored against every positive of the
    batch; the loss masks a row's own positive as an accidental hit) and
    counts the call as one training step of the estimator below.

    **Estimator** (Yi et al. 2019, Algorithm 2). Variables, one slot per
    item (or per hash bucket `id mod num_buckets`):

    - `step` (int64 scalar): the global step t, +1 per `sample` call;
    - `last_seen` A[h] (int64): the last step the slot was seen (0 = never);
    - `period` B[h] (float32): moving estimate of the number of steps
      between two appearances of the slot;
    - `num_intervals` n[h] (int32): how many intervals B[h] has absorbed
      (saturating), used by the warm-up.

    At step t, a slot seen before gets B <- (1 - a) B + a (t - A) and
    A <- t. The expected count of the item per batch is then 1 / B, and

        log(T) + log_q = -log(B)

    so the loss's `- log(K q)` correction (K = T) subtracts log(1 / B).
    Details this implementation fixes:

    - **Duplicates within a batch**: an item seen c times in one batch is
      treated as c appearances spread evenly over the steps since it was
      last seen: c updates with interval (t - A) / c, applied in closed
      form (the same value c times). An item in every batch twice thus
      converges to B = 1/2 (expected count 2), not to B = 0 as the paper's
      per-occurrence loop (second occurrence: t - A = 0) would drift to.
      The count of an item's first batch is not used (there is no interval
      to split yet).
    - **Items never seen**: the first appearance only records A (there is
      no interval yet: counting one from step 0 would pin a late-arriving
      popular item at B = t for ~1 / a appearances). Until its second
      appearance, and for items never seen at all, the estimate is
      B = max(t, 1): at most once in the t steps so far. So at step 1 every
      positive has expected count 1, and an unseen item's expected count
      shrinks as 1 / t. (Finite on purpose: under a strategy, a replica's
      positive may never have reached the estimator, and its log q must
      not be -inf. `log_expected_count(ids, never_seen="zero")` gives
      never-seen items expected count 0 instead; `Mixed` uses it.)
    - **Warm-up** (`warmup=True`): the n-th interval of a slot is averaged
      with rate max(a, 1 / n) instead of a, i.e. B is the plain mean of the
      first 1 / a intervals and the exponential moving average of the paper
      afterwards (a bias-corrected start, in the spirit of Adam's). Without
      it B would keep its first interval with weight (1 - a)^n and need
      ~3 / a appearances to forget it. `warmup=False` uses rate 1 for the
      first interval (B starts at it) and a after.

    With `num_buckets` < C, colliding items share a slot: the estimate is
    the expected count of the bucket, an overestimate for each of its items
    (Yi et al. use several hash functions and keep the largest B to reduce
    this; one is kept here). Items that stop appearing keep their last B
    (the estimator only updates on appearances).

    **tf.distribute**: create the sampler inside `strategy.scope()`. The
    variables are mirrored with aggregation ONLY_FIRST_REPLICA: each
    synchronous step advances `step` once, and the estimator is updated
    with the positives of replica 0 only (the other replicas' updates are
    discarded; all copies receive replica 0's). B then estimates the
    expected count per *replica* batch of replica 0's stream, which is the
    right quantity for per-replica in-batch candidates when batches are
    sharded at random (every replica draws from the same distribution),
    from 1 / N of the data. Every replica reads the same state, so replicas
    agree on log q. With `SampledSoftmax(global_negatives=True)` the
    gathered candidates number N T and log(N T) + log_q = log(N / B), again
    the expected count among them.

    Args:
        num_items: catalog size C.
        learning_rate: the estimator's a in (0, 1]; about the inverse of the
            number of appearances the estimate averages over.
        num_buckets: None for one slot per item (exact), or H slots indexed
            by `id mod H` (memory H * 20 bytes instead of C * 20).
        seed: unused by the draws (candidates are deterministic); kept for
            the `CandidateSampler` interface.
        warmup: average the first 1 / a intervals of a slot with equal
            weights (see above).
    """

    def __init__(self, num_items, learning_rate=0.01, num_buckets=None,
                 seed=None, warmup=True, **kwargs):
        super().__init__(num_items, seed=seed, **kwargs)
        learning_rate = float(learning_rate)
        if not (math.isfinite(learning_rate) and 0.0 < learning_rate <= 1.0):
            raise ValueError(f"learning_rate must be in (0, 1], got "
                             f"{learning_rate}")
        if num_buckets is not None and (
                isinstance(num_buckets, bool)
                or not isinstance(num_buckets, (int, np.integer))
                or num_buckets <= 0):
            raise ValueError(f"num_buckets must be None or a positive "
                             f"integer, got {num_buckets!r}")
        self.learning_rate = learning_rate
        self.num_buckets = None if num_buckets is None else int(num_buckets)
        self.warmup = bool(warmup)
        # Intervals averaged with rate 1 / n before rate a takes over:
        # 1 / n >= a  <=>  n <= 1 / a.
        self._mean_intervals = min(
            int(math.floor(1.0 / learning_rate + 1e-9)), _MAX_INTERVALS)
        slots = self.num_items if self.num_buckets is None else min(
            self.num_buckets, self.num_items)
        self.num_slots = slots
        only_first = tf.VariableAggregation.ONLY_FIRST_REPLICA
        self.step = self.add_weight(
            name="step", shape=[], dtype=tf.int64, trainable=False,
            initializer="zeros", aggregation=only_first)
        self.last_seen = self.add_weight(
            name="last_seen", shape=[slots], dtype=tf.int64,
            trainable=False, initializer="zeros", aggregation=only_first)
        self.period = self.add_weight(
            name="period", shape=[slots], dtype=tf.float32, trainable=False,
            initializer="zeros", aggregation=only_first)
        self.num_intervals = self.add_weight(
            name="num_intervals", shape=[slots], dtype=tf.int32,
            trainable=False, initializer="zeros", aggregation=only_first)

    def get_config(self):
        config = super().get_config()
        config.update(learning_rate=self.learning_rate,
                      num_buckets=self.num_buckets, warmup=self.warmup)
        return config

    def _slots(self, ids):
        ids = tf.cast(ids, tf.int64)
        if self.num_slots == self.num_items:
            return ids
        return tf.math.floormod(ids, self.num_slots)

    def sample(self, query, num=None, shared=True, positives=None,
               item_table=None):
        """Returns the batch's positives and advances the estimator one step.

        Args:
            query: optional [T, D] query rows; only checked against
                the number of positives (the candidates do not depend on
                it).
            num: None for all T positives as candidates; an int K for K
                uniform draws with replacement from the batch's positives
                (for batches of many more positions than negatives wanted,
                e.g. sequential models with ~10k positions per batch).
            shared: must be True: in-batch candidates are shared by every
                row (use `Mixed` to add per-row draws).
            positives: int [T] positive ids of the batch (required).
            item_table: ignored.

        Returns:
            (ids int64 [T] or [K], log_q float32 of the same shape): the
            candidates and log_q = -log(B) - log(T), read after this step's
            update (per draw: T q is the item's expected count among the T
            positives, K q among K draws from them).

        Raises:
            ValueError: positives missing or not int [T], shared=False,
                num not None and not T, query not [T, D].
            tf.errors.InvalidArgumentError: a positive outside [0, C), or
                num draws asked from a batch of no positives.
        """
        del item_table
        if not shared:
            raise ValueError(
                "InBatch candidates are the batch's positives, shared by "
                "every row; shared=False is not supported (use Mixed to add "
                "per-row draws from another sampler)")
        positives = check_positives(positives, self.num_items, "InBatch")
        rows = tf.shape(positives, out_type=tf.int64)[0]
        checks = []
        if query is not None:
            query = check_query(query, floating=False)
            checks += check_rows(query, rows, "InBatch")
        if num is not None:
            # Said here: the RNG's own error ("Need minval < maxval") names
            # neither num nor positives.
            checks.append(tf.debugging.assert_positive(
                rows, message="InBatch: num draws from the positives of "
                "the batch need at least one positive (T = 0)"))
        with tf.control_dependencies(checks):
            positives = tf.identity(positives)
            # (In a graph the draws below would otherwise race the check.)
            rows = tf.identity(rows)
        self._update(positives)
        ids = positives
        if num is not None:
            # K uniform draws (with replacement) from the batch's positives:
            # item j is drawn with probability count_j / T per draw, whose
            # expectation is the same per-draw q as for the whole batch.
            num = check_num(num)
            picks = tf.random.stateless_uniform(
                tf.reshape(tf.cast(num, tf.int32), [1]), self.next_seed(),
                minval=0, maxval=rows, dtype=tf.int64)
            ids = tf.gather(positives, picks)
        log_q = (self._log_expected_count(ids)
                 - tf.math.log(tf.cast(rows, tf.float32)))
        return ids, log_q

    def _update(self, positives):
        """One estimator step with the batch's positives (int64 [T])."""
        slots, _, counts = tf.unique_with_counts(self._slots(positives),
                                                 out_idx=tf.int64)
        t = self.step.assign_add(1, read_value=True)
        last = tf.gather(self.last_seen, slots)
        seen_intervals = tf.cast(tf.gather(self.num_intervals, slots),
                                 tf.int64)
        old = tf.cast(tf.gather(self.period, slots), tf.float64)
        seen = last > 0
        c = tf.cast(counts, tf.float64)
        interval = tf.cast(t - last, tf.float64) / c
        decay = tf.constant(1.0 - self.learning_rate, tf.float64)
        if self.warmup:
            # c updates at rates max(a, 1 / (n + i)), i = 1..c: the first m
            # are running-mean updates, the rest moving-average ones. The old
            # value keeps weight prod(1 - rate) = n / (n + m) * decay^(c - m).
            mean_steps = tf.clip_by_value(
                self._mean_intervals - seen_intervals, 0, counts)
            n = tf.cast(seen_intervals, tf.float64)
            m = tf.cast(mean_steps, tf.float64)
            keep = tf.math.divide_no_nan(n, n + m) * tf.pow(decay, c - m)
        else:
            keep = tf.where(seen_intervals > 0, tf.pow(decay, c),
                            tf.zeros_like(c))
        new = keep * old + (1.0 - keep) * interval
        new_period = tf.cast(tf.where(seen, new, old), tf.float32)
        new_intervals = tf.where(
            seen, tf.minimum(seen_intervals + counts, _MAX_INTERVALS),
            seen_intervals)
        self.period.scatter_update(tf.IndexedSlices(new_period, slots))
        self.num_intervals.scatter_update(
            tf.IndexedSlices(tf.cast(new_intervals, tf.int32), slots))
        self.last_seen.scatter_update(
            tf.IndexedSlices(tf.fill(tf.shape(slots), t), slots))

    def _period(self, ids, never_seen="once"):
        slots = self._slots(ids)
        period = tf.gather(self.period, slots)
        known = tf.gather(self.num_intervals, slots) > 0
        steps = tf.cast(tf.maximum(self.step.read_value(), 1), tf.float32)
        if never_seen == "zero":
            seen = tf.gather(self.last_seen, slots) > 0
            steps = tf.where(seen, steps, tf.constant(math.inf, tf.float32))
        return tf.where(known, period, steps)

    def _log_expected_count(self, ids, never_seen="once"):
        return -tf.math.log(self._period(ids, never_seen))

    @staticmethod
    def _check_never_seen(never_seen):
        if never_seen not in ("once", "zero"):
            raise ValueError(f"never_seen must be 'once' or 'zero', got "
                             f"{never_seen!r}")

    def estimated_period(self, ids, never_seen="once"):
        """Estimated steps between appearances, B, of each id.

        Args:
            ids: int ids of any shape, in [0, C).
            never_seen: B of ids whose slot has no interval yet. "once":
                max(step, 1) (at most once in the steps so far; what `sample`
                and `log_prob` use, finite so that the loss stays finite for
                any positive). "zero": the same for slots seen once, but inf
                (expected count 0) for slots never seen; `Mixed` uses it,
                since its other part gives those items a finite q.

        Returns:
            float32 of the shape of `ids`.
        """
        self._check_never_seen(never_seen)
        ids = validate_ids(ids, self.num_items, arg_name="ids")
        return self._period(ids, never_seen)

    def log_expected_count(self, ids, never_seen="once"):
        """Log of the estimated expected count per batch, -log(B).

        Args:
            ids: int ids of any shape, in [0, C).
            never_seen: see `estimated_period`.

        Returns:
            float32 of the shape of `ids`.
        """
        self._check_never_seen(never_seen)
        ids = validate_ids(ids, self.num_items, arg_name="ids")
        return self._log_expected_count(ids, never_seen)

    def log_prob(self, query, ids):
        """-log(B) - log(T) of each id, T = rows of `query`.

        The in-batch "probability of one draw" is defined through the
        expected count among the T candidates of a batch: log(T) + log q =
        -log(B). T is taken from the rows of `query`, so pass the query of
        the batch the candidates came from.

        Args:
            query: [T, D] query rows (required: gives T).
            ids: int ids of any shape, in [0, C).

        Returns:
            float32 of the shape of `ids`.
        """
        return super().log_prob(query, ids)

    def _log_prob(self, query, ids):
        if query is None:
            raise ValueError("InBatch.log_prob needs query [T, D]: its log q "
                             "is -log(B) - log(T) with T the rows of query")
        query = check_query(query, floating=False)
        rows = tf.cast(tf.shape(query)[0], tf.float32)
        return self._log_expected_count(ids) - tf.math.log(rows)
