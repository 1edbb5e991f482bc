"""SampledRetrieval: `tfrs.tasks.Retrieval` with negatives from a sampler.

A two-tower model scores a query q_b against candidates c_j by q_b . c_j.
`tfrs.tasks.Retrieval` takes the other positives of the batch as negatives;
this task takes them from a `tfrec_fast.samplers.CandidateSampler` instead
(or as well), with the logQ correction and exact accidental-hit removal of
`tfrec_fast.losses.SampledSoftmax`:

    loss_b = logsumexp([s_b+, s_b1 - log(K q_1), ..., s_bK - log(K q_K)])
             - s_b+,       s_bj = q_b . c_j / temperature

where s_b+ is the score of the row's own positive (corrected by
`- log(K q_b+)` too when the positive is itself one of the drawn
candidates, as with in-batch negatives) and candidates equal to the row's
positive get probability exactly 0.

Where the candidates come from:

- `sampler=None`: the batch's positives, as in `tfrs.tasks.Retrieval`; no
  correction unless `candidate_sampling_probability` is passed to `call`
  (then `- log p` on every score, the positive's included, as TFRS does).
- an in-batch sampler (`tfrec_fast.samplers.InBatch`): the batch's
  positives, corrected by the sampler's streaming frequency estimate.
- any other sampler: K sampled ids, embedded by `candidate_tower` (one set
  for the batch, or one per query with `shared=False` and for samplers that
  always draw per query, such as `HardNegatives`);
- a `Mixed` sampler: the batch's positives followed by K drawn ids, all
  with the mixture's log q.
"""

import numpy as np
import tensorflow as tf
import tensorflow_recommenders as tfrs
import tf_keras

from tfrec_fast._serialization import config_with_layers
from tfrec_fast import distribute
from tfrec_fast.losses.sampled_softmax import accidental_hits
from tfrec_fast.losses.sampled_softmax import check_reduction
from tfrec_fast.losses.sampled_softmax import check_temperature
from tfrec_fast.losses.sampled_softmax import corrected_softmax_cross_entropy
from tfrec_fast.losses.sampled_softmax import reduce_losses
from tfrec_fast.ops.validate_ids import validate_ids
from tfrec_fast.samplers.base import CandidateSampler
from tfrec_fast.samplers.base import check_num
from tfrec_fast.samplers.base import check_positive_correction
from tfrec_fast.samplers.base import sampler_query_for
from tfrec_fast.samplers.in_batch import InBatch
from tfrec_fast.samplers.mixed import Mixed
from tfrec_fast.samplers.mixed import sampler_log_prob

Reduction = tf_keras.losses.Reduction

# The score batch metrics see for a removed candidate (as in TFRS): finite,
# so that metrics that sort or threshold scores stay well defined.
_MIN_SCORE = float(np.finfo(np.float32).min / 100.0)


def _in_batch_part(sampler):
    """How a sampler uses the batch's positives as candidates.

    A custom sampler declares it with a class attribute
    `in_batch_candidates` ("all" or "mixed").

    Returns:
        "all" when every candidate is a positive of the batch (in-batch
        samplers), "mixed" when the candidates are the batch's positives
        followed by drawn ids (mixed samplers), None when every candidate
        is drawn.
    """
    if sampler is None or isinstance(sampler, InBatch):
        return "all"
    if isinstance(sampler, Mixed):
        return "mixed"
    return getattr(sampler, "in_batch_candidates", None)


def _as_list(metrics):
    if metrics is None:
        return []
    if isinstance(metrics, (list, tuple)):
        return list(metrics)
    return [metrics]


@tf_keras.saving.register_keras_serializable(package="tfrec_fast")
class SampledRetrieval(tf_keras.layers.Layer, tfrs.tasks.base.Task):
    """Retrieval task with pluggable negatives, logQ correction, exact hits.

    A drop-in alternative to `tfrs.tasks.Retrieval`: a `tfrs.Model` calls it
    from `compute_loss` with the query and positive-candidate embeddings of
    a batch; it returns the loss and updates the metrics.

    With `sampler=None` it computes what `tfrs.tasks.Retrieval(
    remove_accidental_hits=True)` computes (same default reduction, SUM),
    except that removed candidates get probability exactly 0 rather than a
    very small one.

    Distributed training: under a `tf.distribute` strategy each replica
    scores its own queries. By default the candidates are the replica's own
    (in-batch negatives are per replica). With `global_negatives=True` the
    candidate embeddings, ids and log q of every replica are all-gathered
    (embeddings differentiably: each replica's candidates receive the
    gradient of every replica's loss), so every query is scored against
    the candidates of the whole global batch, as one device would score the
    concatenated batch. Scaling: with SUM, each replica returns the sum of
    its rows' losses; with SUM_OVER_BATCH_SIZE (or AUTO) each replica divides
    by the *global* number of rows. Either way the sum over replicas (what
    `tf_keras` `fit` reports and what the summed gradient all-reduce
    optimises) equals the single-device loss on the global batch, and with
    `global_negatives=True` the summed gradients equal its gradients too.
    The correction count K is the number of gathered candidates.

    Args:
        sampler: None for in-batch negatives (TFRS behaviour), or a
            `tfrec_fast.samplers.CandidateSampler`.
        num_negatives: K, the number of drawn negatives per step; required
            for samplers that draw ids, unused with in-batch candidates.
        candidate_tower: callable (a Keras layer, e.g. the model's candidate
            `Embedding`) mapping int64 ids [N] to float embeddings [N, D];
            required for samplers that draw ids.
        shared: one set of K drawn negatives for the whole batch ([K] ids,
            one matmul) or K per query ([B, K] ids, a [B, K, D] gather).
            Query-dependent samplers (`HardNegatives`) always draw per
            query.
        correct_positive: subtract `log(K q)` from the positive's score too.
            None (default) does so exactly when the positive is one of the
            candidates (in-batch and mixed samplers; `sampler=None` with
            `candidate_sampling_probability`).
        remove_accidental_hits: give candidates equal to the row's positive
            probability 0 (needs `candidate_ids`). The row's own positive
            is never counted twice, whatever this says.
        temperature: scores are divided by it before the correction.
        global_negatives: see "Distributed training" above. Needs shared
            negatives.
        metrics: `tfrs.metrics.Factorized` metric(s), e.g.
            `tfrs.metrics.FactorizedTopK`, updated as in TFRS (id-based when
            `candidate_ids` is passed: index the candidates with ids).
        batch_metrics: Keras metrics updated with (labels [B, 1 + N],
            scores [B, 1 + N]) where column 0 is the positive and the other
            columns are the candidates (removed ones at a very low score).
            Scores are the model's (temperature-scaled, uncorrected).
        loss_metrics: Keras metrics updated with the loss.
        reduction: a `tf_keras.losses.Reduction`; SUM (TFRS' default) sums
            over queries, SUM_OVER_BATCH_SIZE / AUTO average, NONE returns
            [B] per-query losses.
        name: optional layer name.
    """

    def __init__(self, sampler=None, num_negatives=None, candidate_tower=None,
                 shared=True, correct_positive=None,
                 remove_accidental_hits=True, temperature=1.0,
                 global_negatives=False, metrics=None, batch_metrics=None,
                 loss_metrics=None, reduction=Reduction.SUM, name=None,
                 **kwargs):
        super().__init__(name=name, **kwargs)
        if sampler is not None and not isinstance(sampler, CandidateSampler):
            raise ValueError(f"sampler must be None or a tfrec_fast "
                             f"CandidateSampler, got {sampler!r}")
        self.sampler = sampler
        self._in_batch = _in_batch_part(sampler)
        if self._in_batch == "all":
            if num_negatives is not None:
                raise ValueError(
                    "num_negatives is not used with in-batch candidates "
                    f"(sampler={type(sampler).__name__}): the candidates "
                    "are the batch's positives; leave it None")
            if not shared:
                raise ValueError("shared=False needs a sampler that draws "
                                 "ids; in-batch candidates are shared")
        else:
            if num_negatives is None:
                raise ValueError(
                    f"num_negatives is required with sampler="
                    f"{type(sampler).__name__}: the number of ids to draw")
            if candidate_tower is None or not callable(candidate_tower):
                raise ValueError(
                    f"candidate_tower is required with sampler="
                    f"{type(sampler).__name__}: a callable mapping int64 ids "
                    f"[K] to candidate embeddings [K, D], got "
                    f"{candidate_tower!r}")
        self.num_negatives = (None if num_negatives is None
                              else check_num(num_negatives, "num_negatives"))
        self.candidate_tower = candidate_tower
        self.shared = bool(shared)
        if correct_positive is None:
            correct_positive = self._in_batch is not None
        self.correct_positive = bool(correct_positive)
        check_positive_correction(sampler, self.correct_positive)
        self.remove_accidental_hits = bool(remove_accidental_hits)
        self.temperature = check_temperature(temperature)
        if global_negatives and not shared:
            raise ValueError("global_negatives needs shared negatives "
                             "(shared=True): per-query negatives belong to "
                             "their queries")
        self.global_negatives = bool(global_negatives)
        self.reduction = check_reduction(reduction)
        # Attributes, so Keras tracks them (their variables, their results).
        self._factorized_metrics = _as_list(metrics)
        self._batch_metrics = _as_list(batch_metrics)
        self._loss_metrics = _as_list(loss_metrics)

    @property
    def factorized_metrics(self):
        """The `tfrs.metrics.Factorized` metrics (list)."""
        return self._factorized_metrics

    @factorized_metrics.setter
    def factorized_metrics(self, value):
        self._factorized_metrics = _as_list(value)

    def get_config(self):
        """Config of the loss options; metrics are not part of it (as TFRS).

        Raises:
            NotImplementedError: `candidate_tower` is a plain callable, not a
                serialisable Keras layer.
        """
        config = super().get_config()
        tower = self.candidate_tower
        if tower is not None and not isinstance(tower,
                                                tf_keras.layers.Layer):
            raise NotImplementedError(
                "get_config needs candidate_tower to be a Keras layer, got "
                f"{type(tower).__name__}")
        config.update(
            sampler=(None if self.sampler is None
                     else tf_keras.layers.serialize(self.sampler)),
            num_negatives=self.num_negatives,
            candidate_tower=(None if tower is None
                             else tf_keras.layers.serialize(tower)),
            shared=self.shared, correct_positive=self.correct_positive,
            remove_accidental_hits=self.remove_accidental_hits,
            temperature=self.temperature,
            global_negatives=self.global_negatives,
            reduction=self.reduction)
        return config

    @classmethod
    def from_config(cls, config, custom_objects=None):
        return cls(**config_with_layers(
            config, ("sampler", "candidate_tower"), custom_objects))

    # ------------------------------------------------------------------ call

    def call(self, query_embeddings, candidate_embeddings, sample_weight=None,
             candidate_sampling_probability=None, candidate_ids=None,
             compute_metrics=True, compute_batch_metrics=True,
             item_table=None, sampler_query=None):
        """Computes the loss and updates the metrics.

        The argument order is that of `tfrs.tasks.Retrieval.call`.

        Args:
            query_embeddings: float [B, D]; row b is a query whose positive
                candidate is row b of `candidate_embeddings`.
            candidate_embeddings: float [B, D] embeddings of the positives.
            sample_weight: optional float [B] (or scalar) query weights.
            candidate_sampling_probability: optional float [B], only with
                `sampler=None`: the probability with which each positive was
                sampled as a candidate; every score gets `- log p` (p clipped
                to [1e-6, 1], as TFRS does).
            candidate_ids: int [B] ids of the positives. Required to remove
                accidental hits and by samplers (whose ids must lie in
                [0, sampler.num_items)); with `sampler=None` and no
                `global_negatives` any dtype with equality (e.g. strings)
                works. Passed to the factorized metrics.
            compute_metrics: update the factorized metrics (slow: they
                score the whole corpus; TFRS models pass `not training`).
            compute_batch_metrics: update the batch metrics.
            item_table: optional float [C, D], for samplers that score items
                (e.g. hard-negative mining). Defaults to the embeddings of
                `candidate_tower` when it is a Keras `Embedding`.
            sampler_query: int [B] user ids, for samplers that condition on
                the user (`takes_user_ids`, e.g. `CollaborativeSampler`);
                other samplers ignore it.

        Returns:
            Scalar float32 loss, or [B] with Reduction.NONE.
        """
        query, positive, ids, weight, probability = self._check_inputs(
            query_embeddings, candidate_embeddings, candidate_ids,
            sample_weight, candidate_sampling_probability)
        logits_dtype = query.dtype
        positive = tf.cast(positive, logits_dtype)

        positive_scores = tf.cast(tf.reduce_sum(query * positive, axis=1),
                                  tf.float32) / self.temperature  # [B]
        shared, per_row, cand_ids, log_q, positive_log_q, num_draws, \
            offset = self._candidates(query, positive, ids, probability,
                                      item_table, sampler_query)
        scores = []
        if shared is not None:  # [N, D]
            scores.append(tf.matmul(query, tf.cast(shared, logits_dtype),
                                    transpose_b=True))
        if per_row is not None:  # [B, K, D]
            scores.append(tf.einsum("bd,bkd->bk", query,
                                    tf.cast(per_row, logits_dtype)))
        scores = tf.concat([tf.cast(x, tf.float32) for x in scores], 1)
        scores /= self.temperature  # [B, N + K]

        hits = self._removed(ids, cand_ids, tf.shape(query)[0],
                             tf.shape(scores)[1], offset)
        if getattr(self.sampler, "learns_from_rewards", False) and \
                self._in_batch is None and cand_ids.shape.rank == 2:
            # The sampler learns from the loss on its own negatives.
            self.sampler.add_reward_loss(
                sampler_query_for(self.sampler, query, sampler_query),
                cand_ids, scores, positive_scores, observed=hits)
        if log_q is None:
            log_q = tf.zeros(tf.shape(scores)[1:], tf.float32)
        losses = corrected_softmax_cross_entropy(
            positive_scores, scores, log_q, num_draws,
            positive_log_q=positive_log_q if self.correct_positive else None,
            hits=hits)
        loss = reduce_losses(losses, weight, self.reduction)

        update_ops = [metric.update_state(loss)
                      for metric in self._loss_metrics]
        if compute_metrics:
            for metric in self._factorized_metrics:
                update_ops.append(metric.update_state(
                    query, positive, true_candidate_ids=ids,
                    sample_weight=weight))
        if compute_batch_metrics and self._batch_metrics:
            if hits is not None:
                scores = tf.where(hits, tf.constant(_MIN_SCORE, tf.float32),
                                  scores)
            batch_scores = tf.concat([positive_scores[:, tf.newaxis], scores],
                                     axis=1)
            labels = tf.one_hot(tf.zeros_like(positive_scores, tf.int32),
                                tf.shape(batch_scores)[1])
            for metric in self._batch_metrics:
                update_ops.append(metric.update_state(
                    labels, batch_scores, sample_weight=weight))
        with tf.control_dependencies([op for op in update_ops
                                      if op is not None]):
            return tf.identity(loss)

    # --------------------------------------------------------------- helpers

    def _check_inputs(self, query, positive, ids, weight, probability):
        """Validates ranks, dtypes and batch sizes; returns tensors."""
        query = tf.convert_to_tensor(query)
        positive = tf.convert_to_tensor(positive)
        for name, value in (("query_embeddings", query),
                            ("candidate_embeddings", positive)):
            if value.shape.rank != 2:
                raise ValueError(f"{name} must be [B, D] (rank 2), got shape "
                                 f"{value.shape}")
            if not value.dtype.is_floating:
                raise ValueError(f"{name} must be floating point, got "
                                 f"{value.dtype.name}")
        if not query.shape[:1].is_compatible_with(positive.shape[:1]):
            raise ValueError(
                f"query_embeddings and candidate_embeddings must have the "
                f"same batch size B (one positive per query), got shapes "
                f"{query.shape} and {positive.shape}")
        if not query.shape[1:].is_compatible_with(positive.shape[1:]):
            raise ValueError(
                f"query_embeddings and candidate_embeddings must have the "
                f"same width D, got shapes {query.shape} and {positive.shape}")
        batch = tf.shape(query)[0]
        checks = [tf.debugging.assert_equal(
            tf.shape(positive), tf.shape(query),
            message="query_embeddings and candidate_embeddings must have "
                    "the same shape [B, D]")]

        needs_ids = (self.remove_accidental_hits or self.sampler is not None)
        if ids is None:
            if needs_ids:
                why = ("remove_accidental_hits=True"
                       if self.sampler is None else
                       f"sampler={type(self.sampler).__name__}")
                raise ValueError(f"candidate_ids [B] is required with {why}")
        else:
            ids = tf.convert_to_tensor(ids)
            if ids.shape.rank != 1:
                raise ValueError(f"candidate_ids must be [B] (rank 1), got "
                                 f"shape {ids.shape}")
            if not ids.shape.is_compatible_with(query.shape[:1]):
                raise ValueError(
                    f"candidate_ids must have one id per query: shape "
                    f"{ids.shape} vs query_embeddings {query.shape}")
            integer = ids.dtype in (tf.int32, tf.int64)
            if (self.sampler is not None or self.global_negatives) and \
                    not integer:
                raise ValueError(
                    f"candidate_ids must be int32 or int64 ids with a sampler "
                    f"or global_negatives, got {ids.dtype.name}")
            if self.sampler is not None:
                ids = validate_ids(ids, self.sampler.num_items,
                                   arg_name="candidate_ids")
            checks.append(tf.debugging.assert_equal(
                tf.shape(ids)[0], batch,
                message="candidate_ids must have one id per query"))

        if probability is not None:
            if self.sampler is not None:
                raise ValueError(
                    "candidate_sampling_probability is only used with "
                    "sampler=None; the sampler supplies log q")
            probability = tf.convert_to_tensor(probability)
            if not probability.dtype.is_floating or \
                    probability.shape.rank != 1:
                raise ValueError(
                    f"candidate_sampling_probability must be float [B], got "
                    f"{probability.dtype.name} with shape {probability.shape}")
            checks.append(tf.debugging.assert_equal(
                tf.shape(probability)[0], batch,
                message="candidate_sampling_probability must be [B]"))

        if weight is not None:
            weight = tf.convert_to_tensor(weight)
            if weight.shape.rank not in (0, 1):
                raise ValueError(f"sample_weight must be [B] or a scalar, got "
                                 f"shape {weight.shape}")
            if weight.shape.rank == 1:
                if not weight.shape.is_compatible_with(query.shape[:1]):
                    raise ValueError(
                        f"sample_weight must be [B]: shape {weight.shape} vs "
                        f"query_embeddings {query.shape}")
                checks.append(tf.debugging.assert_equal(
                    tf.shape(weight)[0], batch,
                    message="sample_weight must be [B]"))
        with tf.control_dependencies(checks):
            query = tf.identity(query)
        return query, positive, ids, weight, probability

    def _candidates(self, query, positive, ids, probability, item_table,
                    sampler_query):
        """Candidate embeddings, ids and log q (gathered when global).

        The candidates are the columns of `shared` (one set for every
        query) followed by those of `per_row` (a set per query).

        Returns:
            (shared float [N, D] or None, per_row float [B, K, D] or None,
             ids int [N] / [B, N + K] or None, log q float [N] / [B, N + K]
             or None, positive log q [B] or None, num_draws for the
             correction, offset: the column of this replica's first
             candidate among the gathered ones).
        """
        sampler = self.sampler
        positive_log_q = None
        shared, per_row = None, None
        if sampler is None:
            shared, cand_ids, log_q = positive, ids, None
            if probability is not None:
                log_q = tf.math.log(tf.clip_by_value(
                    tf.cast(probability, tf.float32), 1e-6, 1.0))
                positive_log_q = log_q
            num_draws = 1  # TFRS: - log p, no count
        else:
            query_for_sampler = sampler_query_for(sampler, query,
                                                  sampler_query)
            tower = self.candidate_tower
            if item_table is None and isinstance(
                    tower, tf_keras.layers.Embedding):
                if not tower.built:  # a call builds (and sets `weights=`)
                    tower(tf.zeros([0], tf.int64))
                item_table = tower.embeddings
            num = self.num_negatives if self._in_batch != "all" else None
            cand_ids, log_q = sampler.sample(
                query_for_sampler, num, shared=self.shared, positives=ids,
                item_table=item_table)
            cand_ids = tf.cast(cand_ids, tf.int64)
            if cand_ids.shape.rank == 2 and self.global_negatives:
                raise ValueError(
                    f"global_negatives needs shared candidates, but "
                    f"sampler={type(sampler).__name__} drew a set per query "
                    f"(ids of shape {cand_ids.shape})")
            batch = tf.shape(query)[0]
            if self._in_batch == "all":
                shared = positive
            elif self._in_batch == "mixed":
                # The batch's positives, then the drawn ids.
                shared = positive
                if cand_ids.shape.rank == 1:
                    drawn = tf.cast(self._embed(cand_ids[batch:]),
                                    positive.dtype)
                    shared = tf.concat([positive, drawn], 0)
                else:
                    per_row = self._embed(cand_ids[:, batch:])
            elif cand_ids.shape.rank == 1:
                shared = self._embed(cand_ids)
            else:
                per_row = self._embed(cand_ids)
            if self.correct_positive:
                if self._in_batch is None:
                    positive_log_q = sampler_log_prob(
                        sampler, query_for_sampler, ids[:, tf.newaxis],
                        num)[:, 0]
                elif log_q.shape.rank == 1:
                    positive_log_q = log_q[:batch]
                else:  # row b's own positive is its column b
                    positive_log_q = tf.linalg.diag_part(
                        log_q[:, :batch])
        offset = 0
        if self.global_negatives:
            offset = distribute.replica_row_offset(tf.shape(shared)[0])
            parts = {"emb": shared}
            if cand_ids is not None:
                parts["ids"] = cand_ids
            if log_q is not None:
                parts["log_q"] = log_q
            gathered = distribute.gather_across_replicas(parts,
                                                         differentiable=True)
            shared = gathered["emb"]
            cand_ids = gathered.get("ids")
            log_q = gathered.get("log_q")
            if log_q is not None:
                log_q = tf.stop_gradient(log_q)
        if sampler is not None:
            num_draws = tf.shape(cand_ids)[-1]
        return (shared, per_row, cand_ids, log_q, positive_log_q, num_draws,
                offset)

    def _embed(self, ids):
        """Candidate tower on int64 ids [K] or [B, K] -> [K, D] / [B, K, D]."""
        flat = tf.reshape(ids, [-1])
        emb = tf.convert_to_tensor(self.candidate_tower(flat))
        if emb.shape.rank != 2:
            raise ValueError(f"candidate_tower must map ids [N] to embeddings "
                             f"[N, D], got shape {emb.shape}")
        if ids.shape.rank == 1:
            return emb
        return tf.reshape(emb, tf.concat([tf.shape(ids), tf.shape(emb)[1:]],
                                         0))

    def _removed(self, ids, cand_ids, batch, num_candidates, offset):
        """bool [B, N]: candidates that must get probability 0, or None."""
        own = None
        if self._in_batch is not None:
            # Candidate (offset + b) is row b's own positive: it is the
            # positive column already and must not count again.
            rows = tf.range(batch) + offset
            own = tf.equal(rows[:, tf.newaxis],
                           tf.range(num_candidates)[tf.newaxis, :])
        if not self.remove_accidental_hits:
            return own
        if cand_ids.dtype not in (tf.int32, tf.int64):
            # Any comparable ids (e.g. strings): number them within the
            # batch; equal ids get equal numbers.
            _, index = tf.unique(tf.concat([cand_ids, ids], 0))
            cand_ids = index[:num_candidates]
            ids = index[num_candidates:]
        hits = accidental_hits(cand_ids, ids)
        return hits if own is None else hits | own
