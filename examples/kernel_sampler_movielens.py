"""SASRec on ML-100k with the quadratic-kernel sampler next to uniform.

    python examples/kernel_sampler_movielens.py --negatives 64
    python examples/kernel_sampler_movielens.py --negatives 16 64 256 --full

For every K in `--negatives` and every sampler in `--samplers` (default:
kernel and uniform) this trains the same SASRec (same seed, same data
order) with a sampled softmax whose K negatives are drawn per position,
early-stops on validation NDCG@10 over the full catalog, and reports test
HR@10 / NDCG@10; `--full` adds the full-softmax cross-entropy reference.
The table at the end puts each run next to uniform at the same K and next
to full CE.

- kernel: `tfrec_fast.samplers.KernelSampler(C, D, alpha=--kernel-alpha,
  leaf_size=--leaf-size)`, q ∝ alpha (h . w)^2 + 1 with h the position's
  hidden state and w the (tied) item embeddings (the leaf size changes the
  speed and the random stream, not q); its tree follows the item
  table after every step (`refresh="auto"`: Adam moves every row, so it is
  rebuilt, O(C D^2), about 3.5 M multiply-adds here);
- uniform: `tfrec_fast.samplers.Uniform(C)`.

Loss (`--loss`): `cce-minus` (default) is the fused sampled softmax
`CCEMinus(sampler, K, shared=False)` (no [T, K, D] gather; uniform draws
are generated inside its kernel, kernel-sampler ids and log q are handed to
it); `sampled` is `SampledSoftmax(sampler, K, shared=False)`. Both subtract
log(K q) from each negative's logit and give accidental hits probability 0.
Results go to OUT/results.json.
"""

import argparse
import json
import os
import statistics
import sys
import time

import tfrec_fast  # selects tf_keras; must come before tensorflow
import tf_keras

import _common
from tfrec_fast import data
from tfrec_fast import metrics
from tfrec_fast.losses import CCEMinus
from tfrec_fast.losses import SampledSoftmax
from tfrec_fast.models import SASRec
from tfrec_fast.tasks import NextItemTask

SAMPLERS = ("kernel", "uniform", "unigram")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/kernel_sampler_ml100k")
    p.add_argument("--negatives", type=int, nargs="+", default=[64],
                   help="K values, negatives per position")
    p.add_argument("--samplers", nargs="+", choices=SAMPLERS,
                   default=["kernel", "uniform"])
    p.add_argument("--full", action="store_true",
                   help="also train the full-softmax CE reference")
    p.add_argument("--loss", choices=("cce-minus", "sampled"),
                   default="cce-minus")
    p.add_argument("--kernel-alpha", type=float, default=100.0)
    p.add_argument("--leaf-size", type=int, default=None,
                   help="kernel sampler leaf size (default 2 D, in "
                        "[32, 256])")
    _common.add_sasrec_arguments(p, verbose=0)
    args = p.parse_args(argv)
    if any(k <= 0 for k in args.negatives):
        p.error("--negatives must be positive integers")
    return args


def build_task(args, sampler_name, num_negatives, train, num_items):
    """NextItemTask with per-position negatives (None: full softmax CE)."""
    if sampler_name == "full":
        return None
    sampler = _common.make_sampler(
        sampler_name, train, num_items, seed=args.seed, dim=args.dim,
        kernel_alpha=args.kernel_alpha, leaf_size=args.leaf_size)
    none = tf_keras.losses.Reduction.NONE
    if args.loss == "cce-minus":
        return NextItemTask(CCEMinus(sampler, num_negatives, shared=False,
                                     reduction=none))
    return NextItemTask(SampledSoftmax(sampler, num_negatives, shared=False,
                                       reduction=none))


def train_one(args, split, sampler_name, num_negatives):
    """Trains one SASRec; returns its record for results.json."""
    tf_keras.utils.set_random_seed(args.seed)
    train = data.next_item_dataset(split.train, batch_size=args.batch_size,
                                   max_len=args.max_len, seed=args.seed)
    validation = data.eval_dataset(split.validation, batch_size=512,
                                   max_len=args.max_len)
    test = data.eval_dataset(split.test, batch_size=512, max_len=args.max_len)
    model = SASRec(split.num_items, max_len=args.max_len, dim=args.dim,
                   num_blocks=args.blocks, num_heads=args.heads,
                   dropout=args.dropout,
                   task=build_task(args, sampler_name, num_negatives,
                                   split.train, split.num_items))
    start = time.perf_counter()
    timer, evaluation = _common.fit_with_early_stopping(model, train,
                                                        validation, args)
    result = metrics.evaluate_full_ranking(model.query_embeddings,
                                           model.item_table, test)
    return {
        "sampler": sampler_name,
        "K": None if sampler_name == "full" else num_negatives,
        "loss": "full softmax CE" if sampler_name == "full" else args.loss,
        "test": result,
        "validation_best_ndcg@10": evaluation.best,
        "best_epoch": evaluation.best_epoch,
        "epochs_trained": len(timer.seconds),
        "seconds_per_epoch": statistics.median(timer.seconds),
        "seconds_total": time.perf_counter() - start,
    }


def table(records):
    """Plain-text table: each run next to uniform at its K and full CE."""
    full = next((r for r in records if r["sampler"] == "full"), None)
    uniform = {r["K"]: r for r in records if r["sampler"] == "uniform"}
    lines = [f"{'sampler':10s} {'K':>5s} {'HR@10':>7s} {'NDCG@10':>8s} "
             f"{'vs uniform':>11s} {'vs full':>8s} {'s/epoch':>8s} "
             f"{'epochs':>6s}"]
    for r in records:
        ndcg = r["test"]["NDCG@10"]
        base = uniform.get(r["K"])
        vs_uniform = (f"{100 * (ndcg / base['test']['NDCG@10'] - 1):+.1f}%"
                      if base and r["sampler"] != "uniform" else "")
        vs_full = (f"{100 * (ndcg / full['test']['NDCG@10'] - 1):+.1f}%"
                   if full and r is not full else "")
        lines.append(f"{r['sampler']:10s} {str(r['K'] or '-'):>5s} "
                     f"{r['test']['HR@10']:7.4f} {ndcg:8.4f} "
                     f"{vs_uniform:>11s} {vs_full:>8s} "
                     f"{r['seconds_per_epoch']:8.2f} "
                     f"{r['epochs_trained']:6d}")
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(argv)
    os.makedirs(args.out, exist_ok=True)
    split = data.leave_one_out(data.to_sequences(data.load_movielens_100k()))
    print(f"ML-100k: {split.num_items} items", flush=True)
    runs = [("full", None)] if args.full else []
    runs += [(name, k) for k in args.negatives for name in args.samplers]
    records = []
    for name, k in runs:
        record = train_one(args, split, name, k)
        records.append(record)
        print(f"{name} K={k}: test HR@10 {record['test']['HR@10']:.4f} "
              f"NDCG@10 {record['test']['NDCG@10']:.4f} "
              f"({record['epochs_trained']} epochs, "
              f"{record['seconds_per_epoch']:.1f} s/epoch)", flush=True)
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"config": vars(args),
                       "op_library": tfrec_fast.ops.build_info(),
                       "runs": records}, f, indent=2, default=str)
    print(table(records))
    return 0


if __name__ == "__main__":
    sys.exit(main())
