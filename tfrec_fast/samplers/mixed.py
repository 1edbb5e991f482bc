"""Mixed negative sampling: in-batch candidates plus draws from a sampler."""

import tensorflow as tf
import tf_keras

from tfrec_fast._serialization import config_with_layers

from tfrec_fast.ops.validate_ids import validate_ids
from tfrec_fast.samplers.base import CandidateSampler
from tfrec_fast.samplers.base import check_num
from tfrec_fast.samplers.base import check_sampler
from tfrec_fast.samplers.base import check_query
from tfrec_fast.samplers.in_batch import InBatch


def resolve_num(num, last_num, owner):
    """The `num` a log_prob refers to: given, else the latest sample's."""
    if num is None:
        if last_num is None:
            raise ValueError(
                f"{owner}.log_prob depends on num, the number of draws of "
                "the candidate set; pass num=... (it defaults to the num of "
                "the latest sample() call, which was never made or was a "
                "tensor)")
        return last_num
    return check_num(num)


def sampler_log_prob(sampler, query, ids, num):
    """`sampler.log_prob`, passing num to samplers whose q depends on it."""
    if getattr(sampler, "log_prob_needs_num", False):
        return sampler.log_prob(query, ids, num=num)
    return sampler.log_prob(query, ids)


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class Mixed(CandidateSampler):
    """The batch's T positives followed by `num` draws from another sampler.

    Mixed negative sampling (Yang et al., "Mixed negative sampling for
    learning two-tower neural networks in recommendations", WWW 2020): the
    in-batch part brings popular items (at their in-batch frequency), the
    other part reaches the tail of the catalog that batches rarely contain.

    Candidates:

    - shared (`shared=True`, context-free `other`): ids [T + num] =
      positives [T] then `other`'s shared draws [num];
    - per row (`shared=False`, or a query-dependent `other` such as
      `HardNegatives`, which always draws per row): ids [T, T + num] = the
      positives broadcast to every row ([T, T]) then the row's draws
      [T, num]. The broadcast costs T^2 ids; prefer shared when `other`
      allows it.

    **log q** is the mixture's true one, through the expected count: with
    K = T + num candidates, item j is expected 1 / B_j times among the
    in-batch ones (`InBatch`'s estimate) and num q_other(j) times among the
    drawn ones, so

        log(K) + log_q(j) = logaddexp(-log B_j, log(num) + log q_other(j))

    for every candidate, whichever part it came from (and for any id given
    to `log_prob`). For a query-dependent `other` log q_other is per row.
    Items the estimator has never seen get in-batch count 0 (B = inf, see
    `InBatch.estimated_period(never_seen="zero")`) rather than InBatch's
    finite "at most once so far", which would overstate the in-batch part
    of the catalog's long tail by 1 / t; log q stays finite since
    q_other > 0. Under a strategy the estimate is replica 0's (see
    `InBatch`).

    `sample` advances `in_batch`'s estimator one step and `other`'s draw
    counter; the draws use `other`'s seed.

    Args:
        in_batch: an `InBatch` sampler (its estimator gives 1 / B).
        other: a `CandidateSampler` over the same catalog (not InBatch or
            Mixed), e.g. `Uniform`, `Unigram` or `HardNegatives`.
        seed: unused (the draws come from `other`'s stream); kept for the
            `CandidateSampler` interface.
    """

    # log_prob needs the num of the candidate set (K = T + num).
    log_prob_needs_num = True

    def __init__(self, in_batch, other, seed=None, **kwargs):
        kwargs.pop("num_items", None)  # from get_config; the parts rule
        in_batch = check_sampler(in_batch, "in_batch")
        other = check_sampler(other, "other")
        if not isinstance(in_batch, InBatch):
            raise ValueError(f"in_batch must be an InBatch sampler, got "
                             f"{type(in_batch).__name__}")
        if isinstance(other, (InBatch, Mixed)):
            raise ValueError(f"other must draw `num` candidates on its own "
                             f"(e.g. Uniform, Unigram, HardNegatives), got "
                             f"{type(other).__name__}")
        if other.num_items != in_batch.num_items:
            raise ValueError(
                f"in_batch and other must cover the same catalog: "
                f"in_batch.num_items = {in_batch.num_items}, "
                f"other.num_items = {other.num_items}")
        super().__init__(in_batch.num_items, seed=seed, **kwargs)
        self.in_batch = in_batch
        self.other = other
        self.query_dependent = bool(other.query_dependent)
        self._last_num = None

    def get_config(self):
        config = super().get_config()
        config.update(in_batch=tf_keras.layers.serialize(self.in_batch),
                      other=tf_keras.layers.serialize(self.other))
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config_with_layers(config, ("in_batch", "other"),
                                        custom_objects))

    def sample(self, query, num, shared=True, positives=None,
               item_table=None):
        """The T positives, then `num` draws from `other`.

        Args:
            query: [T, D] query rows; required for per-row draws and for a
                query-dependent `other`, optional otherwise.
            num: draws from `other`, a positive int (or int scalar tensor).
            shared: `other`'s draws shared by every row ([num]) or per row.
            positives: int [T] positive ids of the batch (required).
            item_table: float [C, D], passed to `other`.

        Returns:
            (ids int64, log_q float32), both [T + num] (shared) or
            [T, T + num] (per row), log_q as in the class docstring.
        """
        num = check_num(num)
        if positives is None:
            raise ValueError("Mixed needs positives: int [T] positive ids of "
                             "the batch (its in-batch candidates)")
        in_ids, _ = self.in_batch.sample(query, None, positives=positives)
        if query is not None:
            query = tf.convert_to_tensor(query)
        other_ids, _ = self.other.sample(query, num, shared=shared,
                                         positives=positives,
                                         item_table=item_table)
        rows = tf.shape(in_ids)[0]
        if other_ids.shape.rank == 1 and self.query_dependent:
            other_ids = tf.broadcast_to(other_ids[tf.newaxis],
                                        [rows, tf.shape(other_ids)[0]])
        if other_ids.shape.rank == 1:
            ids = tf.concat([in_ids, other_ids], axis=0)
        else:
            ids = tf.concat([tf.broadcast_to(in_ids[tf.newaxis],
                                             [rows, rows]), other_ids], 1)
        self._last_num = num if isinstance(num, int) else None
        return ids, self._mixture_log_q(query, ids, rows, num)

    def _mixture_log_q(self, query, ids, rows, num):
        num_f = tf.cast(num, tf.float32)
        in_batch = self.in_batch._log_expected_count(  # pylint: disable=protected-access
            ids, never_seen="zero")
        drawn = tf.math.log(num_f) + sampler_log_prob(self.other, query, ids,
                                                      num)
        in_batch = tf.broadcast_to(in_batch, tf.shape(drawn))
        expected = tf.reduce_logsumexp(tf.stack([in_batch, drawn]), axis=0)
        return expected - tf.math.log(tf.cast(rows, tf.float32) + num_f)

    def log_prob(self, query, ids, num=None):
        """The mixture's log q of each id, for candidate sets of T + num.

        Args:
            query: [T, D] query rows (required: gives T).
            ids: int ids of any shape in [0, C); for a query-dependent
                `other`, [K] (scored for every row) or [T, K].
            num: the number of draws from `other` in the candidate set;
                None for the num of the latest `sample` call.

        Returns:
            float32 with the shape of `ids` ([T, K] for a query-dependent
            `other` given [K] ids).
        """
        num = resolve_num(num, self._last_num, "Mixed")
        ids = tf.cast(validate_ids(ids, self.num_items, arg_name="ids"),
                      tf.int64)
        if query is None:
            raise ValueError("Mixed.log_prob needs query [T, D]: the "
                             "candidate set holds the T positives of its "
                             "batch")
        query = check_query(query, floating=False)
        return self._mixture_log_q(query, ids, tf.shape(query)[0], num)

    def _log_prob(self, query, ids):
        return self.log_prob(query, ids)
