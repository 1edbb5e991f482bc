"""Pieces shared by the example scripts: timing, memory, export check."""

import resource
import time

import numpy as np
import tensorflow as tf
import tf_keras

from tfrec_fast import export
from tfrec_fast import metrics
from tfrec_fast import samplers

SAMPLERS = ("uniform", "log-uniform", "unigram", "in-batch", "mixed")


class EpochTimer(tf_keras.callbacks.Callback):
    """Wall time of each epoch's training steps (evaluation excluded)."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def add_sasrec_arguments(parser, verbose=1):
    """The SASRec training flags every ML-100k example shares.

    Model (--dim, --blocks, --heads, --dropout, --max-len), optimisation
    (--epochs, --batch-size, --lr), early stopping (--eval-every,
    --patience, read by `fit_with_early_stopping`), --seed and --verbose.
    """
    parser.add_argument("--epochs", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--max-len", type=int, default=200)
    parser.add_argument("--dim", type=int, default=64)
    parser.add_argument("--blocks", type=int, default=2)
    parser.add_argument("--heads", type=int, default=1)
    parser.add_argument("--dropout", type=float, default=0.2)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--eval-every", type=int, default=5)
    parser.add_argument("--patience", type=int, default=4,
                        help="evaluations without improvement before "
                             "stopping")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--verbose", type=int, default=verbose,
                        help="Keras fit verbosity (1 = progress bar)")


def fit_with_early_stopping(model, train, validation, args):
    """Adam(args.lr) + `model.fit` with validation NDCG@10 over the full
    catalog every `args.eval_every` epochs, early stopping after
    `args.patience` evaluations without improvement, best weights restored.

    Returns:
        (EpochTimer, FullRankingEvaluation) callbacks after training.
    """
    model.compile(optimizer=tf_keras.optimizers.Adam(args.lr))
    timer = EpochTimer()
    evaluation = metrics.FullRankingEvaluation(
        model.query_embeddings, lambda: model.item_table, validation,
        every=args.eval_every, monitor="NDCG@10", patience=args.patience,
        restore_best_weights=True)
    model.fit(train, epochs=args.epochs, callbacks=[timer, evaluation],
              verbose=args.verbose)
    return timer, evaluation


def peak_rss_mb():
    """Peak resident memory of this process so far, MB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def export_and_verify(model, path, eval_set, max_len, k, num_requests=3):
    """Exports `model`, serves a few histories in a fresh process and
    compares the served top-k with the in-process model's.

    Args:
        model: a model with the `tfrec_fast.export` serving protocol and a
            `query_embeddings(ragged histories)` method.
        path: SavedModel directory.
        eval_set: a `tfrec_fast.data.EvalSet` whose first histories are used
            as requests.
        max_len: histories are cut to their last `max_len` items.
        k: items served.

    Returns:
        dict for results.json: path, num_op_types, unregistered_ops,
        served_top_ids_match_model.
    """
    export.export_for_serving(model, path, k=k)
    splits, items = eval_set.history_splits, eval_set.history_items
    histories = [items[splits[u]:splits[u + 1]][-max_len:]
                 for u in range(num_requests)]
    width = max(len(h) for h in histories)
    request_ids = [list(h) + [0] * (width - len(h)) for h in histories]
    report = export.verify_servable(path, request_ids,
                                    [len(h) for h in histories])
    ragged = tf.ragged.stack([tf.constant(h, tf.int64) for h in histories])
    expected, _ = metrics.top_k_excluding(
        model.query_embeddings(ragged), model.serving_candidates()[0], k,
        exclude_splits=ragged.row_splits, exclude_items=ragged.flat_values)
    return {"path": path,
            "num_op_types": report["num_op_types"],
            "unregistered_ops": report["unregistered_ops"],
            "served_top_ids_match_model":
                report["top_ids"] == expected.numpy().tolist()}


def item_counts(train, num_items):
    """int64 [C]: how often each item occurs in the training sequences."""
    return np.bincount(train.items, minlength=num_items).astype(np.int64)


def make_sampler(name, train, num_items, unigram_alpha=0.75, seed=0,
                 dim=None, kernel_alpha=100.0, leaf_size=None, **cosam):
    """A sampler by its command-line name.

    Args:
        name: one of SAMPLERS, or "kernel". log-uniform relies on ids sorted
            by decreasing training frequency (`data.to_sequences` does that);
            unigram is (count + 1)^alpha over `train`'s items (pseudo-count
            1: items seen only in validation / test have count 0); mixed is
            in-batch followed by uniform draws; kernel is the quadratic-kernel
            sampler (per-row negatives only: use it with shared=False).
        train: SequenceData of the training sequences.
        num_items: catalog size C.
        unigram_alpha: exponent of the unigram sampler.
        seed: the sampler's seed.
        dim: D of the hidden states / item embeddings (kernel only).
        kernel_alpha: alpha of the kernel sampler.
        leaf_size: leaf size of the kernel sampler's tree (None: its
            default, 2 D in [32, 256]).
        **cosam: arguments of `CollaborativeSampler` for "cosam" (the walk
            over `train`'s user-item graph; per-row negatives only).
    """
    if name == "uniform":
        return samplers.Uniform(num_items, seed=seed)
    if name == "log-uniform":
        return samplers.LogUniform(num_items, seed=seed)
    if name == "unigram":
        return samplers.Unigram(item_counts(train, num_items),
                                alpha=unigram_alpha, smoothing=1.0, seed=seed)
    if name == "in-batch":
        return samplers.InBatch(num_items, seed=seed)
    if name == "mixed":
        return samplers.Mixed(samplers.InBatch(num_items, seed=seed),
                              samplers.Uniform(num_items, seed=seed + 1))
    if name == "kernel":
        if dim is None:
            raise ValueError("the kernel sampler needs dim, the width D of "
                             "the hidden states and item embeddings")
        return samplers.KernelSampler(num_items, dim, alpha=kernel_alpha,
                                      leaf_size=leaf_size, seed=seed)
    if name == "cosam":
        return samplers.CollaborativeSampler.from_sequences(
            train, num_items, seed=seed, **cosam)
    raise ValueError(f"sampler must be one of "
                     f"{SAMPLERS + ('kernel', 'cosam')}, got {name!r}")
