"""Two-tower retrieval on MovieLens-100k with a sampled softmax.

    python examples/two_tower_sampled.py --sampler unigram --negatives 256

A `tfrs.Model` (`tfrec_fast.models.HistoryTwoTower`: history -> query tower,
item id -> candidate tower) trained with `tfrec_fast.tasks.SampledRetrieval`
and a chosen sampler on every prefix of the leave-one-out training
sequences; validation HR@10 / NDCG@10 over the full catalog (history
excluded) every few epochs with early stopping; test metrics; a SavedModel
checked in a fresh process that cannot import tfrec_fast. Writes
OUT/results.json.
"""

import argparse
import json
import os
import statistics
import sys

import tfrec_fast  # selects tf_keras; must come before tensorflow
import tf_keras

import _common
from tfrec_fast import data
from tfrec_fast import metrics
from tfrec_fast.models import HistoryTwoTower
from tfrec_fast.tasks import SampledRetrieval

def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/two_tower_ml100k")
    p.add_argument("--sampler", choices=_common.SAMPLERS, default="unigram")
    p.add_argument("--negatives", type=int, default=256,
                   help="K sampled negatives per batch (shared by its rows); "
                        "for in-batch, the batch's positives are the "
                        "candidates and K is ignored; for mixed, K extra "
                        "uniform negatives")
    p.add_argument("--unigram-alpha", type=float, default=0.75)
    p.add_argument("--epochs", type=int, default=100)
    p.add_argument("--batch-size", type=int, default=64,
                   help="users per batch (every prefix of each is a query)")
    p.add_argument("--max-len", type=int, default=200)
    p.add_argument("--dim", type=int, default=64)
    p.add_argument("--temperature", type=float, default=0.1)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--eval-every", type=int, default=2)
    p.add_argument("--patience", type=int, default=3)
    p.add_argument("--k", type=int, default=10, help="items served")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--verbose", type=int, default=2)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    tf_keras.utils.set_random_seed(args.seed)
    os.makedirs(args.out, exist_ok=True)

    split = data.leave_one_out(data.to_sequences(data.load_movielens_100k()))
    train = data.next_item_dataset(split.train, batch_size=args.batch_size,
                                   max_len=args.max_len, seed=args.seed)
    validation = data.eval_dataset(split.validation, batch_size=512,
                                   max_len=args.max_len)
    test = data.eval_dataset(split.test, batch_size=512, max_len=args.max_len)
    sampler = _common.make_sampler(args.sampler, split.train,
                                   split.num_items, args.unigram_alpha,
                                   args.seed)
    in_batch = args.sampler in ("in-batch", "mixed")
    model = HistoryTwoTower(split.num_items, task=None, dim=args.dim,
                            max_len=args.max_len)
    model.task = SampledRetrieval(
        sampler, num_negatives=None if args.sampler == "in-batch"
        else args.negatives,
        candidate_tower=model.candidate_embedding,
        correct_positive=in_batch, temperature=args.temperature)
    timer, evaluation = _common.fit_with_early_stopping(model, train,
                                                        validation, args)

    results = {
        "dataset": "ml-100k",
        "model": "HistoryTwoTower + SampledRetrieval",
        "config": vars(args),
        "epochs_trained": len(timer.seconds),
        "best_epoch": evaluation.best_epoch,
        "seconds_per_epoch": statistics.median(timer.seconds),
        "validation": metrics.evaluate_full_ranking(
            model.query_embeddings, model.item_table, validation),
        "test": metrics.evaluate_full_ranking(
            model.query_embeddings, model.item_table, test),
    }
    results["export"] = _common.export_and_verify(
        model, os.path.join(args.out, "saved_model"), split.test,
        args.max_len, args.k)
    results["peak_rss_mb"] = _common.peak_rss_mb()
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump(results, f, indent=2, default=str)
    v, t = results["validation"], results["test"]
    print(json.dumps({
        "sampler": args.sampler, "negatives": args.negatives,
        "validation": {"HR@10": v["HR@10"], "NDCG@10": v["NDCG@10"]},
        "test": {"HR@10": t["HR@10"], "NDCG@10": t["NDCG@10"]},
        "epochs_trained": results["epochs_trained"],
        "best_epoch": results["best_epoch"],
        "seconds_per_epoch": round(results["seconds_per_epoch"], 3),
        "export_verified":
            results["export"]["served_top_ids_match_model"]}, indent=2))
    return 0 if results["export"]["served_top_ids_match_model"] else 1


if __name__ == "__main__":
    sys.exit(main())
