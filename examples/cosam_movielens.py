"""CoSam on ML-100k: sampler and recommender trained in one `model.fit`.

    python examples/cosam_movielens.py --model sasrec --samplers cosam
    python examples/cosam_movielens.py --model two-tower --samplers cosam uniform popularity

For every sampler in `--samplers` this trains the same model (same seed,
same data order) with K negatives per position (`--negatives`), early-stops
on validation NDCG@10 over the full catalog, and reports test HR@10 /
NDCG@10 twice: from the model's scores alone and with integrated
prediction, score + log p_s(item | user) (`tfrec_fast.layers.
IntegratedScorer`; for uniform that is a constant, so the same ranking).

- cosam: `tfrec_fast.samplers.CollaborativeSampler` over the training
  user-item graph (`--stop-probability`, `--max-length`, observed items
  never emitted); its walk weights are trained by REINFORCE with their own
  Adam (`--sampler-lr`) inside the same `model.fit`
  (`tfrec_fast.models.ReinforcedSamplerModel`);
- uniform: `tfrec_fast.samplers.Uniform`;
- popularity: `tfrec_fast.samplers.Unigram` over training counts
  (`--popularity-alpha`, +1 smoothing).

Models (`--model`): `sasrec` (ragged SASRec, `SampledSoftmax(sampler, K,
shared=False)` per position) or `two-tower` (`HistoryTwoTower`: history
bag + latest item -> query, item id -> candidate, every prefix a query,
`SampledRetrieval(..., shared=False)`). The last run is exported with
`tfrec_fast.export.export_for_serving(..., scorer=...)` (integrated score
inside the serving signature, which then takes `user_ids`) and verified in
a fresh process that cannot import tfrec_fast. Results: OUT/results.json.
"""

import argparse
import json
import os
import statistics
import sys
import time

import tfrec_fast  # selects tf_keras; must come before tensorflow
import tensorflow as tf
import tf_keras

import _common
from tfrec_fast import data
from tfrec_fast import export
from tfrec_fast import metrics
from tfrec_fast.layers import IntegratedScorer
from tfrec_fast.losses import SampledSoftmax
from tfrec_fast.models import HistoryTwoTower
from tfrec_fast.models import ReinforcedSamplerModel
from tfrec_fast.models import SASRec
from tfrec_fast.tasks import NextItemTask
from tfrec_fast.tasks import SampledRetrieval

SAMPLERS = ("cosam", "uniform", "popularity")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/cosam_ml100k")
    p.add_argument("--model", choices=("sasrec", "two-tower"),
                   default="sasrec")
    p.add_argument("--samplers", nargs="+", choices=SAMPLERS,
                   default=["cosam"])
    p.add_argument("--negatives", type=int, default=64,
                   help="K negatives per position")
    p.add_argument("--stop-probability", type=float, default=0.5)
    p.add_argument("--max-length", type=int, default=3,
                   help="CoSam: user -> item moves before a uniform item")
    p.add_argument("--sampler-lr", type=float, default=0.01,
                   help="CoSam: Adam learning rate of the walk weights "
                        "(0 keeps the walk fixed)")
    p.add_argument("--popularity-alpha", type=float, default=0.75)
    p.add_argument("--temperature", type=float, default=0.1,
                   help="two-tower: logits are divided by it (integrated "
                        "prediction then adds temperature * log p_s to the "
                        "unscaled score, the same ranking as logit + "
                        "log p_s)")
    p.add_argument("--k", type=int, default=10, help="items served")
    _common.add_sasrec_arguments(p, verbose=0)
    args = p.parse_args(argv)
    if args.negatives <= 0:
        p.error("--negatives must be a positive integer")
    return args


class CoSamSASRec(ReinforcedSamplerModel, SASRec):
    """SASRec whose reward-learning sampler has its own optimizer."""


class CoSamTwoTower(ReinforcedSamplerModel, HistoryTwoTower):
    """HistoryTwoTower whose reward-learning sampler has its own optimizer."""


def make_sampler(args, name, split):
    if name == "cosam":
        return _common.make_sampler(
            "cosam", split.train, split.num_items, seed=args.seed,
            stop_probability=args.stop_probability,
            max_length=args.max_length)
    if name == "popularity":
        return _common.make_sampler("unigram", split.train, split.num_items,
                                    unigram_alpha=args.popularity_alpha,
                                    seed=args.seed)
    return _common.make_sampler(name, split.train, split.num_items,
                                seed=args.seed)


def build_model(args, sampler, num_items):
    sampler_optimizer = None
    if getattr(sampler, "learns_from_rewards", False):
        sampler_optimizer = tf_keras.optimizers.Adam(args.sampler_lr)
        if args.sampler_lr == 0:
            sampler.trainable = False
    if args.model == "sasrec":
        task = NextItemTask(SampledSoftmax(
            sampler, args.negatives, shared=False,
            reduction=tf_keras.losses.Reduction.NONE))
        return CoSamSASRec(
            sampler_optimizer=sampler_optimizer, num_items=num_items,
            max_len=args.max_len, dim=args.dim, num_blocks=args.blocks,
            num_heads=args.heads, dropout=args.dropout, task=task)
    model = CoSamTwoTower(sampler_optimizer=sampler_optimizer,
                          num_items=num_items, task=None, dim=args.dim,
                          max_len=args.max_len)
    model.task = SampledRetrieval(
        sampler, args.negatives, candidate_tower=model.candidate_embedding,
        shared=False, temperature=args.temperature,
        reduction=tf_keras.losses.Reduction.SUM_OVER_BATCH_SIZE)
    return model


def train_one(args, split, sampler_name):
    """Trains one model; returns (record, model, scorer)."""
    tf_keras.utils.set_random_seed(args.seed)
    train = data.next_item_dataset(split.train, batch_size=args.batch_size,
                                   max_len=args.max_len, seed=args.seed,
                                   with_users=True)
    validation = data.eval_dataset(split.validation, batch_size=512,
                                   max_len=args.max_len)
    test = data.eval_dataset(split.test, batch_size=512, max_len=args.max_len)
    sampler = make_sampler(args, sampler_name, split)
    model = build_model(args, sampler, split.num_items)
    start = time.perf_counter()
    timer, evaluation = _common.fit_with_early_stopping(model, train,
                                                        validation, args)
    # Integrated prediction is logit + log p_s; the evaluated scores are
    # logits * temperature for the two-tower model.
    scorer = IntegratedScorer(sampler, weight=args.temperature
                              if args.model == "two-tower" else 1.0)
    plain = metrics.evaluate_full_ranking(model.query_embeddings,
                                          model.item_table, test)
    integrated = metrics.evaluate_full_ranking(
        model.query_embeddings, model.item_table, test,
        item_bias=lambda batch: scorer.item_bias(batch["users"]))
    record = {
        "model": args.model, "sampler": sampler_name, "K": args.negatives,
        "test": plain, "test_integrated": integrated,
        "validation_best_ndcg@10": evaluation.best,
        "best_epoch": evaluation.best_epoch,
        "epochs_trained": len(timer.seconds),
        "seconds_per_epoch": statistics.median(timer.seconds),
        "seconds_total": time.perf_counter() - start,
    }
    return record, model, scorer


def export_and_verify(args, split, model, scorer, path, num_requests=3):
    """Exports with the integrated score; compares served and in-process
    top-k for a few test users."""
    export.export_for_serving(model, path, k=args.k, scorer=scorer)
    eval_set = split.test
    splits, items = eval_set.history_splits, eval_set.history_items
    histories = [items[splits[e]:splits[e + 1]][-args.max_len:]
                 for e in range(num_requests)]
    users = [int(u) for u in eval_set.users[:num_requests]]
    width = max(len(h) for h in histories)
    report = export.verify_servable(
        path, [list(h) + [0] * (width - len(h)) for h in histories],
        [len(h) for h in histories], user_ids=users)
    ragged = tf.ragged.stack([tf.constant(h, tf.int64) for h in histories])
    expected, _ = metrics.top_k_excluding(
        model.query_embeddings(ragged), model.item_table, args.k,
        exclude_splits=ragged.row_splits, exclude_items=ragged.flat_values,
        item_bias=scorer.item_bias(tf.constant(users, tf.int64)))
    return {"path": path, "num_op_types": report["num_op_types"],
            "unregistered_ops": report["unregistered_ops"],
            "served_top_ids_match_model":
                report["top_ids"] == expected.numpy().tolist()}


def table(records):
    lines = [f"{'model':9s} {'sampler':10s} {'K':>4s} {'HR@10':>7s} "
             f"{'NDCG@10':>8s} {'HR@10 int':>9s} {'NDCG int':>9s} "
             f"{'s/epoch':>8s} {'epochs':>6s}"]
    for r in records:
        t, i = r["test"], r["test_integrated"]
        lines.append(f"{r['model']:9s} {r['sampler']:10s} {r['K']:4d} "
                     f"{t['HR@10']:7.4f} {t['NDCG@10']:8.4f} "
                     f"{i['HR@10']:9.4f} {i['NDCG@10']:9.4f} "
                     f"{r['seconds_per_epoch']:8.2f} "
                     f"{r['epochs_trained']:6d}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    split = data.leave_one_out(data.to_sequences(data.load_movielens_100k()))
    print(f"ML-100k: {split.train.num_users} users, {split.num_items} items",
          flush=True)
    records = []
    model = scorer = None
    for name in args.samplers:
        record, model, scorer = train_one(args, split, name)
        records.append(record)
        print(f"{args.model} {name} K={args.negatives}: test HR@10 "
              f"{record['test']['HR@10']:.4f} NDCG@10 "
              f"{record['test']['NDCG@10']:.4f}; integrated HR@10 "
              f"{record['test_integrated']['HR@10']:.4f} NDCG@10 "
              f"{record['test_integrated']['NDCG@10']:.4f} "
              f"({record['epochs_trained']} epochs, "
              f"{record['seconds_per_epoch']:.2f} s/epoch)", flush=True)
    export_report = export_and_verify(
        args, split, model, scorer, os.path.join(args.out, "saved_model"))
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"config": vars(args), "runs": records,
                   "export": export_report,
                   "peak_rss_mb": _common.peak_rss_mb()},
                  f, indent=2, default=str)
    print(table(records))
    print(json.dumps({"export": export_report}))
    return 0 if export_report["served_top_ids_match_model"] else 1


if __name__ == "__main__":
    sys.exit(main())
