"""Main job: SASRec on MovieLens-100k, evaluated, exported and verified.

    python examples/sasrec_movielens.py --out results/sasrec_ml100k

1. Loads ML-100k from the installed recbole wheel, builds per-user
   sequences, splits leave-one-out (last item test, second-to-last
   validation).
2. Trains the SASRec reference (stock tf_keras attention on padded input,
   full-softmax cross-entropy) with `model.fit`, evaluating validation
   HR@10 / NDCG@10 over the full catalog (history excluded) every few
   epochs, early-stopping on validation NDCG@10 and keeping the best weights.
3. Reports validation and test HR@10 / NDCG@10 / MRR@10, seconds per epoch
   and peak RSS; writes them to OUT/results.json.
4. Exports a SavedModel (dense history ids + lengths -> top-k unseen items)
   to OUT/saved_model and checks it in a fresh Python process that cannot
   import tfrec_fast.
"""

import argparse
import json
import os
import resource
import statistics
import sys
import time

import tfrec_fast  # selects tf_keras; must come before tensorflow
import tensorflow as tf
import tf_keras

from tfrec_fast import data
from tfrec_fast import export
from tfrec_fast import metrics
from tfrec_fast.models import SASRec


class EpochTimer(tf_keras.callbacks.Callback):
    """Wall time of each epoch's training steps (evaluation excluded)."""

    def __init__(self):
        super().__init__()
        self.seconds = []

    def on_epoch_begin(self, epoch, logs=None):
        self._start = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self._start)


def peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/sasrec_ml100k")
    p.add_argument("--epochs", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=128)
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--blocks", type=int, default=2)
    p.add_argument("--heads", type=int, default=1)
    p.add_argument("--dropout", type=float, default=0.2)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=5)
    p.add_argument("--patience", type=int, default=4,
                   help="evaluations without improvement before stopping")
    p.add_argument("--k", type=int, default=10, help="items served")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=1,
                   help="Keras fit verbosity (1 = progress bar)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tf_keras.utils.set_random_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    sequences = data.to_sequences(data.load_movielens_100k())
    split = data.leave_one_out(sequences)
    train = data.next_item_dataset(split.train, batch_size=args.batch_size,
                                   max_len=args.max_len, seed=args.seed)
    validation = data.eval_dataset(split.validation, batch_size=512,
                                   max_len=args.max_len)
    test = data.eval_dataset(split.test, batch_size=512, max_len=args.max_len)
    print(f"ML-100k: {sequences.num_users} users, {split.num_items} items, "
          f"{len(sequences.items)} interactions", flush=True)

    model = SASRec(split.num_items, max_len=args.max_len, dim=args.dim,
                   num_blocks=args.blocks, num_heads=args.heads,
                   dropout=args.dropout)
    model.compile(optimizer=tf_keras.optimizers.Adam(args.lr))
    timer = EpochTimer()
    evaluation = metrics.FullRankingEvaluation(
        model.query_embeddings, lambda: model.item_table, validation,
        every=args.eval_every, monitor="NDCG@10", patience=args.patience,
        restore_best_weights=True)
    model.fit(train, epochs=args.epochs, callbacks=[timer, evaluation],
              verbose=args.verbose)

    results = {
        "dataset": "ml-100k",
        "model": "SASRec reference (padded tf_keras MultiHeadAttention, "
                 "full softmax CE)",
        "config": vars(args),
        "epochs_trained": len(timer.seconds),
        "best_epoch": evaluation.best_epoch,
        "seconds_per_epoch": statistics.median(timer.seconds),
        "validation_history": [{"epoch": e, **r}
                               for e, r in evaluation.history],
        "validation": metrics.evaluate_full_ranking(
            model.query_embeddings, model.item_table, validation),
        "test": metrics.evaluate_full_ranking(
            model.query_embeddings, model.item_table, test),
        "op_library": tfrec_fast.ops.build_info(),
    }

    saved_model = os.path.join(args.out, "saved_model")
    export.export_for_serving(model, saved_model, k=args.k)
    # Ask the exported model for the test users' top-k and compare with the
    # in-process model on the same histories.
    sample = split.test.history_splits, split.test.history_items
    histories = [sample[1][sample[0][u]:sample[0][u + 1]][-args.max_len:]
                 for u in range(3)]
    width = max(len(h) for h in histories)
    request_ids = [list(h) + [0] * (width - len(h)) for h in histories]
    report = export.verify_servable(saved_model, request_ids,
                                    [len(h) for h in histories])
    ragged = tf.ragged.stack([tf.constant(h, tf.int64) for h in histories])
    expected, _ = metrics.top_k_excluding(
        model.query_embeddings(ragged), model.item_table, args.k,
        exclude_splits=ragged.row_splits, exclude_items=ragged.flat_values)
    served_matches = report["top_ids"] == expected.numpy().tolist()
    results["export"] = {"path": saved_model,
                         "num_op_types": report["num_op_types"],
                         "unregistered_ops": report["unregistered_ops"],
                         "served_top_ids_match_model": served_matches}
    results["peak_rss_mb"] = peak_rss_mb()

    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    v, t = results["validation"], results["test"]
    print(json.dumps({
        "validation": {"HR@10": v["HR@10"], "NDCG@10": v["NDCG@10"]},
        "test": {"HR@10": t["HR@10"], "NDCG@10": t["NDCG@10"]},
        "epochs_trained": results["epochs_trained"],
        "best_epoch": results["best_epoch"],
        "seconds_per_epoch": round(results["seconds_per_epoch"], 3),
        "peak_rss_mb": round(results["peak_rss_mb"], 1),
        "export_verified": served_matches}, indent=2))
    if not served_matches:
        print("the exported model's top-k differs from the trained model's",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
