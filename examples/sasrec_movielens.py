"""Main job: SASRec on MovieLens-100k, evaluated, exported and verified.

    python examples/sasrec_movielens.py --out results/sasrec_ml100k

1. Loads ML-100k from the installed recbole wheel, builds per-user
   sequences, splits leave-one-out (last item test, second-to-last
   validation).
2. Trains SASRec (padding-free ragged transformer blocks with the fused
   attention op by default, `--encoder padded` for the stock tf_keras
   reference on padded input; full-softmax cross-entropy) with `model.fit`, evaluating validation
   HR@10 / NDCG@10 over the full catalog (history excluded) every few
   epochs, early-stopping on validation NDCG@10 and keeping the best weights.
3. Reports validation and test HR@10 / NDCG@10 / MRR@10, seconds per epoch
   and peak RSS; writes them to OUT/results.json.
4. Exports a SavedModel (dense history ids + lengths -> top-k unseen items)
   to OUT/saved_model and checks it in a fresh Python process that cannot
   import tfrec_fast.

`--loss sampled` trains with a sampled softmax instead of the full-catalog
cross-entropy (the default, unchanged):

    python examples/sasrec_movielens.py --loss sampled --sampler unigram \
        --unigram-alpha 0.75 --negatives 256

`--loss cce` is the same full-catalog cross-entropy, fused
(`tfrec_fast.losses.CutCrossEntropy`: no [N, C] logits); `--loss cce-minus`
is the fused sampled softmax (`tfrec_fast.losses.CCEMinus`) with K negatives
per position (uniform and unigram ones drawn inside the kernel):

    python examples/sasrec_movielens.py --loss cce-minus --negatives 64

`--sampler` picks the negatives: uniform, log-uniform (ids are sorted by
decreasing training frequency, so it approximates popularity), unigram
((count + 1)^alpha over the training sequences' items), in-batch (the
batch's target items, log q from a streaming frequency estimate, the
positive corrected by its log q as well) or mixed (in-batch + uniform).
With `--loss sampled` the K = `--negatives` (default 256) drawn negatives
are shared by every position of a batch; with `--loss cce-minus` each
position has its own K. For in-batch, `--negatives K` draws K of the batch's
~10k target positions; without it all of them are candidates.
"""

import argparse
import json
import math
import os
import statistics
import sys

import tfrec_fast  # selects tf_keras; must come before tensorflow
import tf_keras

import _common
from tfrec_fast import data
from tfrec_fast import metrics
from tfrec_fast.losses import CCEMinus
from tfrec_fast.losses import CutCrossEntropy
from tfrec_fast.losses import SampledSoftmax
from tfrec_fast.models import SASRec
from tfrec_fast.tasks import NextItemTask

LOSSES = ("full", "sampled", "cce", "cce-minus")
# Losses that draw negatives.
SAMPLED_LOSSES = ("sampled", "cce-minus")
DEFAULT_NEGATIVES = 256
# Samplers whose candidates include positives drawn with the batch: their
# positive logit is corrected by its log q too.
IN_BATCH = ("in-batch", "mixed")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="results/sasrec_ml100k")
    _common.add_sasrec_arguments(p)
    p.add_argument("--k", type=int, default=10, help="items served")
    p.add_argument("--encoder", choices=("ragged", "padded"),
                   default="ragged",
                   help="padding-free ragged blocks with the fused attention "
                        "op (default) or the padded tf_keras reference")
    p.add_argument("--loss", choices=LOSSES, default="full",
                   help="full-catalog softmax CE (default), sampled softmax, "
                        "fused full CE (cce) or fused sampled softmax with "
                        "per-position negatives (cce-minus)")
    p.add_argument("--sampler", choices=_common.SAMPLERS, default=None,
                   help="negative sampler of --loss sampled (default "
                        "uniform)")
    p.add_argument("--negatives", type=int, default=None,
                   help="K, drawn negatives per batch (shared by all "
                        "positions) of --loss sampled (default 256; with "
                        "--sampler in-batch the default is all T target "
                        "positions of the batch, K draws K of them)")
    p.add_argument("--unigram-alpha", type=float, default=0.75,
                   help="exponent of --sampler unigram: (count + 1)^alpha")
    args = p.parse_args(argv)
    if args.sampler is None and args.loss in SAMPLED_LOSSES:
        args.sampler = "uniform"
    if (args.negatives is None and args.loss in SAMPLED_LOSSES
            and args.sampler != "in-batch"):
        args.negatives = DEFAULT_NEGATIVES
    if args.negatives is not None and args.negatives <= 0:
        p.error(f"--negatives must be a positive integer, got "
                f"{args.negatives}")
    if not (math.isfinite(args.unigram_alpha) and args.unigram_alpha >= 0):
        p.error(f"--unigram-alpha must be a finite number >= 0, got "
                f"{args.unigram_alpha}")
    return args


def build_task(args, train, num_items):
    """The NextItemTask of `--loss` (None: the model's full-softmax default).

    Sampled: `SampledSoftmax(sampler, K)` with per-position losses, the
    positive corrected by its log q only for in-batch candidates (which are
    positives of other positions, drawn with the batch; K is then None: all
    T of them).
    """
    none = tf_keras.losses.Reduction.NONE
    if args.loss == "full":
        return None
    if args.loss == "cce":
        return NextItemTask(CutCrossEntropy(reduction=none))
    sampler = _common.make_sampler(args.sampler, train, num_items,
                                   unigram_alpha=args.unigram_alpha,
                                   seed=args.seed)
    if args.loss == "cce-minus":
        return NextItemTask(CCEMinus(sampler, args.negatives, shared=False,
                                     reduction=none))
    return NextItemTask(SampledSoftmax(
        sampler, args.negatives, shared=True,
        correct_positive=args.sampler in IN_BATCH,
        reduction=none))


def describe_loss(args):
    """The loss part of results.json."""
    if args.loss in ("full", "cce"):
        return {"loss": args.loss}
    described = {"loss": args.loss, "sampler": args.sampler,
                 "negatives": (args.negatives if args.negatives is not None
                               else "all T target positions of the batch"),
                 "shared_negatives": args.loss == "sampled",
                 "correct_positive": (args.loss == "sampled" and
                                      args.sampler in IN_BATCH),
                 "remove_accidental_hits": True}
    if args.sampler == "unigram":
        described.update(unigram_alpha=args.unigram_alpha,
                         unigram_smoothing=1.0,
                         unigram_counts="training sequences' items")
    return described


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
                   dropout=args.dropout, encoder=args.encoder,
                   task=build_task(args, split.train, split.num_items))
    timer, evaluation = _common.fit_with_early_stopping(model, train,
                                                        validation, args)

    results = {
        "dataset": "ml-100k",
        "model": ("SASRec, ragged blocks + fused attention op, "
                  if args.encoder == "ragged" else
                  "SASRec reference (padded tf_keras MultiHeadAttention), ")
                 + {"full": "full softmax CE",
                    "cce": "CutCrossEntropy (fused full softmax CE)",
                    "sampled": f"sampled softmax, {args.sampler}, "
                               f"K={args.negatives or 'T'} shared",
                    "cce-minus": f"CCEMinus, {args.sampler}, "
                                 f"K={args.negatives} per position",
                    }[args.loss],
        "config": vars(args),
        "loss": describe_loss(args),
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

    results["export"] = _common.export_and_verify(
        model, os.path.join(args.out, "saved_model"), split.test,
        args.max_len, args.k)
    served_matches = results["export"]["served_top_ids_match_model"]
    results["peak_rss_mb"] = _common.peak_rss_mb()

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
