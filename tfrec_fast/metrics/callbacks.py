"""Keras callback that runs full-ranking evaluation during `model.fit`."""

import time

import tf_keras

from tfrec_fast.metrics.ranking import evaluate_full_ranking


class FullRankingEvaluation(tf_keras.callbacks.Callback):
    """Evaluates HR/NDCG/MRR@K every few epochs; optional early stopping.

    Adds `val_HR@10`-style entries to the epoch logs (so the Keras progress
    bar, History and other callbacks see them) on the epochs it evaluates.

    Args:
        query_fn: RaggedTensor histories [B, (L)] -> float [B, D] queries.
        item_table_fn: () -> float [C, D] item embeddings (read at every
            evaluation, since training changes them).
        dataset: tf.data of {"item_ids": Ragged [B, (L)], "targets": [B]}.
        ks: cut-offs.
        every: evaluate after every `every` epochs (and never in between).
        monitor: metric that early stopping and best-weight restoring follow,
            e.g. "NDCG@10" (higher is better).
        patience: stop after this many evaluations without improvement of
            `monitor`; None never stops.
        restore_best_weights: at the end of training, put back the weights of
            the best evaluation.
        prefix: prefix of the log keys.
    """

    def __init__(self, query_fn, item_table_fn, dataset, ks=(10,), every=1,
                 monitor="NDCG@10", patience=None, restore_best_weights=False,
                 prefix="val_"):
        super().__init__()
        self.query_fn = query_fn
        self.item_table_fn = item_table_fn
        self.dataset = dataset
        self.ks = ks
        self.every = every
        self.monitor = monitor
        self.patience = patience
        self.restore_best_weights = restore_best_weights
        self.prefix = prefix
        self.history = []  # [(epoch, metrics dict)]
        self.best = None
        self.best_epoch = None
        self._best_weights = None
        self._evaluations_since_best = 0

    def on_epoch_end(self, epoch, logs=None):
        if (epoch + 1) % self.every:
            return
        start = time.perf_counter()
        result = evaluate_full_ranking(self.query_fn, self.item_table_fn(),
                                       self.dataset, ks=self.ks)
        result["eval_seconds"] = time.perf_counter() - start
        self.history.append((epoch + 1, result))
        if logs is not None:
            logs.update({self.prefix + key: value
                         for key, value in result.items()
                         if "@" in key})
        value = result[self.monitor]
        if self.best is None or value > self.best:
            self.best, self.best_epoch = value, epoch + 1
            self._evaluations_since_best = 0
            if self.restore_best_weights:
                self._best_weights = self.model.get_weights()
        else:
            self._evaluations_since_best += 1
            if (self.patience is not None
                    and self._evaluations_since_best >= self.patience):
                self.model.stop_training = True

    def on_train_end(self, logs=None):
        if self.restore_best_weights and self._best_weights is not None:
            self.model.set_weights(self._best_weights)
