"""SASRec on ML-100k: full-softmax CE vs sampled softmax, ranking quality.

    python benchmarks/sasrec_sampled_quality.py --json out.json --png out.png [--quick]

Runs the main job (examples/sasrec_movielens.py, one fresh process per
configuration, its defaults otherwise: d 64, 2 blocks, max length 200, batch
128, Adam 1e-3, validation every 5 epochs, early stopping with patience 4)
with `--loss full` and with `--loss sampled` for each sampler and K:
uniform, unigram ((count + 1)^0.75 over the training items; `--unigram-alpha`)
K in {64, 256}, and in-batch at the same K (K of the batch's ~10k target
positions drawn uniformly) and with all T of them as candidates. The
encoder is the padded reference by default (`--encoder`), so that the
sampled losses are compared with the reference's full-CE figures.
Records: impl "tfrec_fast.SASRec/full" or
"tfrec_fast.SASRec/sampled-<sampler>", config {sampler, K, epochs, ...},
figures test_HR@10, test_NDCG@10, val_HR@10, val_NDCG@10, best_epoch,
epochs_trained, seconds_per_epoch (median training time of an epoch,
evaluation excluded), wall_seconds (the whole run, export included).

`--quick`: uniform at K = 64 and in-batch (K = 64 and T) only, 1 epoch,
validation every epoch (a smoke run: the figures mean nothing).
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "sasrec_movielens.py")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--json", default=None, help="write records here")
    p.add_argument("--png", default=None, help="write a plot here")
    p.add_argument("--quick", action="store_true",
                   help="uniform and in-batch at K = 64 (and in-batch at "
                        "K = T), 1 epoch (smoke run)")
    p.add_argument("--repeats", type=int, default=1,
                   help="runs per configuration (seeds 0, 1, ...); figures "
                        "are per run")
    p.add_argument("--epochs", type=int, default=None,
                   help="maximum epochs per run (default: the example's "
                        "200, early stopping decides; quick 1)")
    p.add_argument("--ks", type=int, nargs="+", default=None,
                   help="K values (default 64 256, quick 64)")
    p.add_argument("--samplers", nargs="+", default=None,
                   help="default uniform unigram in-batch (quick: uniform "
                        "in-batch)")
    p.add_argument("--unigram-alpha", type=float, default=0.75)
    p.add_argument("--encoder", choices=("padded", "ragged"),
                   default="padded")
    p.add_argument("--work-dir", default=None,
                   help="run outputs (default: a temporary folder, removed)")
    return p.parse_args()


def configurations(args):
    ks = args.ks or ([64] if args.quick else [64, 256])
    configs = [{"loss": "full", "sampler": None, "K": None}]
    for sampler in args.samplers:
        if sampler == "in-batch":  # also: all T positives of the batch
            configs.append({"loss": "sampled", "sampler": sampler,
                            "K": None})
        for k in ks:
            configs.append({"loss": "sampled", "sampler": sampler, "K": k})
    return configs


def run_example(config, args, out, seed):
    """Runs the example once; returns its results.json (None on failure)."""
    command = [sys.executable, EXAMPLE, "--out", out, "--verbose", "0",
               "--seed", str(seed), "--loss", config["loss"],
               "--encoder", args.encoder]
    if args.epochs is not None:
        command += ["--epochs", str(args.epochs)]
    if args.quick:
        command += ["--eval-every", "1"]
    if config["loss"] == "sampled":
        command += ["--sampler", config["sampler"],
                    "--unigram-alpha", str(args.unigram_alpha)]
        if config["K"] is not None:
            command += ["--negatives", str(config["K"])]
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=os.pathsep.join(
                   [ROOT] + [p for p in [os.environ.get("PYTHONPATH")] if p]))
    print("$ " + " ".join(command[1:]), flush=True)
    start = time.perf_counter()
    with open(os.path.join(out + ".log"), "w") as log:
        code = subprocess.run(command, env=env, stdout=log,
                              stderr=subprocess.STDOUT, check=False,
                              cwd=ROOT).returncode
    wall = time.perf_counter() - start
    if code != 0:
        with open(out + ".log") as log:
            tail = log.read()[-2000:]
        print(f"  failed (exit {code}):\n{tail}", flush=True)
        return None, wall
    with open(os.path.join(out, "results.json")) as f:
        return json.load(f), wall


def record(config, results, wall, args, seed):
    if config["loss"] == "full":
        impl = "tfrec_fast.SASRec/full"
    else:
        impl = f"tfrec_fast.SASRec/sampled-{config['sampler']}"
    run_config = results["config"]
    cfg = {"sampler": config["sampler"] or "full", "K": config["K"],
           "epochs": run_config["epochs"], "seed": seed,
           "eval_every": run_config["eval_every"],
           "patience": run_config["patience"],
           "batch_size": run_config["batch_size"],
           "max_len": run_config["max_len"], "dim": run_config["dim"],
           "blocks": run_config["blocks"], "lr": run_config["lr"]}
    if config["sampler"] == "unigram":
        cfg["unigram_alpha"] = args.unigram_alpha
    if config["sampler"] == "in-batch":
        cfg["candidates"] = ("all T target positions of the batch"
                             if config["K"] is None else
                             "K uniform draws from the batch's T targets")
    if config["loss"] == "sampled":
        cfg["loss"] = results.get("loss")
    cfg["model"] = results.get("model")
    return {
        "impl": impl, "config": cfg,
        "test_HR@10": results["test"]["HR@10"],
        "test_NDCG@10": results["test"]["NDCG@10"],
        "val_HR@10": results["validation"]["HR@10"],
        "val_NDCG@10": results["validation"]["NDCG@10"],
        "best_epoch": results["best_epoch"],
        "epochs_trained": results["epochs_trained"],
        "seconds_per_epoch": results["seconds_per_epoch"],
        "wall_seconds": wall,
        "peak_rss_mb": results.get("peak_rss_mb"),
    }


def label(r):
    if r["config"]["sampler"] == "full":
        return "full CE"
    return f"{r['config']['sampler']}\nK={r['config']['K'] or 'T'}"


def plot(records, path):
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    import numpy as np  # pylint: disable=import-outside-toplevel
    labels = list(dict.fromkeys(label(r) for r in records))

    def mean_of(key):
        return [np.mean([r[key] for r in records if label(r) == lab])
                for lab in labels]

    x = np.arange(len(labels))
    fig, axes = plt.subplots(1, 2, figsize=(13, 4.5),
                             gridspec_kw={"width_ratios": [3, 2]})
    width = 0.38
    for offset, key in ((-width / 2, "test_HR@10"),
                        (width / 2, "test_NDCG@10")):
        values = mean_of(key)
        bars = axes[0].bar(x + offset, values, width, label=key)
        axes[0].bar_label(bars, fmt="%.3f", fontsize=7)
    axes[0].set_xticks(x, labels, fontsize=8)
    axes[0].set_ylabel("test metric (full ranking, history excluded)")
    axes[0].legend(fontsize=8)
    axes[0].set_title("SASRec ML-100k: full softmax vs sampled softmax",
                      fontsize=10)
    bars = axes[1].bar(x, mean_of("seconds_per_epoch"), 0.6, color="gray")
    axes[1].bar_label(bars, fmt="%.2f", fontsize=7)
    axes[1].set_xticks(x, labels, fontsize=8)
    axes[1].set_ylabel("seconds per training epoch (median)")
    axes[1].set_title(f"training time, {os.cpu_count()} CPU cores",
                      fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = parse_args()
    if args.quick and args.epochs is None:
        args.epochs = 1
    if args.samplers is None:
        args.samplers = (["uniform", "in-batch"] if args.quick
                         else ["uniform", "unigram", "in-batch"])
    configs = configurations(args)
    work = args.work_dir or tempfile.mkdtemp(prefix="sasrec_sampled_")
    records = []
    begin = time.perf_counter()
    try:
        for config in configs:
            for seed in range(args.repeats):
                name = (config["sampler"] or "full") + (
                    f"_k{config['K']}" if config["K"] else "") + f"_s{seed}"
                out = os.path.join(work, name)
                results, wall = run_example(config, args, out, seed)
                if results is None:
                    continue
                r = record(config, results, wall, args, seed)
                records.append(r)
                print(f"  test HR@10 {r['test_HR@10']:.4f} NDCG@10 "
                      f"{r['test_NDCG@10']:.4f} | val NDCG@10 "
                      f"{r['val_NDCG@10']:.4f} | best epoch "
                      f"{r['best_epoch']} of {r['epochs_trained']} | "
                      f"{r['seconds_per_epoch']:.2f} s/epoch | "
                      f"{wall:.0f} s", flush=True)
    finally:
        if args.work_dir is None:
            shutil.rmtree(work, ignore_errors=True)
    print(f"total {time.perf_counter() - begin:.0f} s", flush=True)
    _common.write(records, args)
    if args.png and records:
        plot(records, args.png)


if __name__ == "__main__":
    main()
