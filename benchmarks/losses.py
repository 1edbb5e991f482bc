"""Next-item losses, fwd + bwd: fused CutCrossEntropy / CCEMinus vs TF's paths.

    python benchmarks/losses.py --json out.json --png out.png [--quick]
        [--repeats N]

SASRec's loss shape: B = 64 sequences of L = 200 positions (N = 12,800
rows), D = 64, catalogs C = 3,416 (ML-1M) and C = 100,000, K = 256
negatives. Implementations:

  full catalog
    tf.sparse_softmax_cross_entropy   logits = h @ w^T ([N, C]) +
                                      tf.nn.sparse_softmax_cross_entropy_with_logits
    tfrec_fast.CutCrossEntropy        the fused op
    tfrec_fast.CutCrossEntropy/reference  the chunked pure-TF reference
  K negatives per position (uniform, logQ-corrected, hits masked)
    tf.gather_einsum_ce               ids [N, K] -> gather [N, K, D] rows ->
                                      einsum -> corrected CE (SampledSoftmax's
                                      per-row path)
    tfrec_fast.CCEMinus/in_kernel     the fused op, negatives drawn inside
                                      the kernel (no [N, K] ids)
    tfrec_fast.CCEMinus/given_ids     the fused op on the same kind of [N, K]
                                      ids as the TF path
  K negatives shared by the batch
    tf.nn.sampled_softmax_loss        uniform candidate sampler, hits removed
    tfrec_fast.CCEMinus/shared        the fused op on [K] shared ids

One step = loss (mean over rows) and gradients with respect to h and w in
one tf.function; ids are drawn inside the step, as in training. Each
(implementation, config) runs in its own fresh process: 2 warm-up steps, then
step_s = median of `--repeats` steps; peak_rss_mb = the process's peak
resident set (VmHWM, the ~0.55 GB of an imported TensorFlow included) and
step_rss_growth_mb = the peak after the inputs were built (VmHWM reset
there) minus the RSS at that moment. Records also carry load_avg.
`--quick`: C = 3,416 only, 3 repeats.
"""

import json
import os
import subprocess
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

B, L, D, K = 64, 200, 64, 256
FULL = ("tf.sparse_softmax_cross_entropy", "tfrec_fast.CutCrossEntropy",
        "tfrec_fast.CutCrossEntropy/reference")
PER_ROW = ("tf.gather_einsum_ce", "tfrec_fast.CCEMinus/in_kernel",
           "tfrec_fast.CCEMinus/given_ids")
SHARED = ("tf.nn.sampled_softmax_loss", "tfrec_fast.CCEMinus/shared")
BASELINE = {impl: group[0] for group in (FULL, PER_ROW, SHARED)
            for impl in group}
NOTE = ("step = mean loss + gradients w.r.t. h [N, D] and w [C, D], one "
        "tf.function, each (impl, config) in a fresh process; peak_rss_mb = "
        "whole-process VmHWM incl. the TF import")


def build_step(impl, cfg):
    """(step function, inputs) of one implementation; imports TF lazily."""
    import tfrec_fast  # noqa: F401  (selects tf_keras)
    import tensorflow as tf
    from tfrec_fast import ops
    from tfrec_fast.losses import accidental_hits
    from tfrec_fast.losses import corrected_softmax_cross_entropy
    from tfrec_fast.losses import full_softmax_cross_entropy

    n, c, d, k = cfg["N"], cfg["C"], cfg["D"], cfg["K"]
    tf.random.set_seed(0)
    h = tf.random.normal([n, d]) * 0.5
    w = tf.Variable(tf.random.normal([c, d]) * 0.5)
    y = tf.random.uniform([n], 0, c, dtype=tf.int64)
    log_q = -tf.math.log(tf.cast(c, tf.float32))
    step_counter = tf.Variable(0, dtype=tf.int64)

    def loss_fn(h, w):
        if impl == "tf.sparse_softmax_cross_entropy":
            return full_softmax_cross_entropy(h, w, y)
        if impl == "tfrec_fast.CutCrossEntropy":
            return ops.cut_cross_entropy(h, w, y, use_fused=True)
        if impl == "tfrec_fast.CutCrossEntropy/reference":
            return ops.cut_cross_entropy_reference(h, w, y)
        if impl == "tf.gather_einsum_ce":
            ids = tf.random.uniform([n, k], 0, c, dtype=tf.int64)
            negative = tf.einsum("td,tkd->tk", h, tf.gather(w, ids))
            positive = tf.reduce_sum(h * tf.gather(w, y), axis=1)
            return corrected_softmax_cross_entropy(
                positive, negative, tf.fill([n, k], log_q), k,
                hits=accidental_hits(ids, y))
        if impl == "tfrec_fast.CCEMinus/in_kernel":
            negatives = ops.generated_negatives(
                k, 0, step_counter.assign_add(1))
            return ops.cce_minus(h, w, y, negatives, use_fused=True)
        if impl == "tfrec_fast.CCEMinus/given_ids":
            ids = tf.random.uniform([n, k], 0, c, dtype=tf.int64)
            return ops.cce_minus(
                h, w, y, ops.GivenNegatives(ids, tf.fill([n, k], log_q)),
                use_fused=True)
        if impl == "tf.nn.sampled_softmax_loss":
            sampled = tf.random.uniform_candidate_sampler(
                y[:, tf.newaxis], 1, k, unique=False, range_max=c)
            return tf.nn.sampled_softmax_loss(
                w, tf.zeros([c]), y[:, tf.newaxis], h, k, c,
                sampled_values=sampled, remove_accidental_hits=True)
        if impl == "tfrec_fast.CCEMinus/shared":
            ids = tf.random.uniform([k], 0, c, dtype=tf.int64)
            return ops.cce_minus(
                h, w, y, ops.GivenNegatives(ids, tf.fill([k], log_q)),
                use_fused=True)
        raise ValueError(impl)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(h)
            loss = tf.reduce_mean(loss_fn(h, w))
        d_h, d_w = tape.gradient(loss, [h, w])
        # Touch the gradients so that nothing is pruned.
        d_w = tf.convert_to_tensor(d_w)
        return loss + tf.reduce_sum(d_h[:1]) + tf.reduce_sum(d_w[:1])

    return step


def child(spec):
    """Child process entry: times one implementation at one config."""
    impl, cfg, repeats = spec["impl"], spec["config"], spec["repeats"]
    step = build_step(impl, cfg)
    before = _common.proc_status_mb("VmRSS")
    import_peak = _common.proc_status_mb("VmHWM")
    _common.reset_peak_rss()
    seconds = _common.median_seconds(lambda: step().numpy(), repeats,
                                     warmup=2)
    peak = _common.proc_status_mb("VmHWM")
    print(json.dumps({"step_s": seconds,
                      "peak_rss_mb": max(peak, import_peak),
                      "step_rss_growth_mb": peak - before,
                      "load_avg": os.getloadavg()[0]}))


def measure(impl, cfg, repeats):
    spec = json.dumps({"impl": impl, "config": cfg, "repeats": repeats})
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", spec],
        capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{impl} {cfg} failed:\n{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def configs(quick):
    catalogs = (3416,) if quick else (3416, 100_000)
    for c in catalogs:
        cfg = {"B": B, "L": L, "N": B * L, "D": D, "C": c, "K": K,
               "threads": os.cpu_count()}
        for impl in FULL + PER_ROW + SHARED:
            if impl == "tfrec_fast.CutCrossEntropy/reference" and quick:
                continue
            yield impl, cfg


def add_ratios(records):
    """time_vs_tf / rss_vs_tf: ours against the TF path of the same group."""
    by_key = {(r["impl"], r["config"]["C"]): r for r in records}
    for r in records:
        base = by_key.get((BASELINE[r["impl"]], r["config"]["C"]))
        if base is not None and base is not r:
            r["time_vs_tf"] = r["step_s"] / base["step_s"]
            r["rss_vs_tf"] = r["peak_rss_mb"] / base["peak_rss_mb"]


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    catalogs = sorted({r["config"]["C"] for r in records})
    impls = [i for i in FULL + PER_ROW + SHARED
             if any(r["impl"] == i for r in records)]
    fig, axes = plt.subplots(len(catalogs), 2,
                             figsize=(13, 3.8 * len(catalogs)),
                             squeeze=False)
    for row, c in enumerate(catalogs):
        recs = {r["impl"]: r for r in records if r["config"]["C"] == c}
        names = [i for i in impls if i in recs]
        colors = ["tab:gray" if i.startswith("tf.") else "tab:blue"
                  for i in names]
        for col, (key, label) in enumerate(
                [("step_s", "fwd+bwd step (s)"),
                 ("peak_rss_mb", "peak RSS (MB)")]):
            ax = axes[row][col]
            values = [recs[i][key] for i in names]
            ax.barh(range(len(names)), values, color=colors)
            ax.set_yticks(range(len(names)), names, fontsize=8)
            ax.invert_yaxis()
            ax.set_xscale("log")
            ax.set_xlabel(label)
            ax.set_title(f"N={B * L}, D={D}, C={c:,}, K={K}", fontsize=9)
            for i, v in enumerate(values):
                ax.text(v, i, f" {v:.3g}", va="center", fontsize=7)
    fig.suptitle("Next-item losses on CPU (grey: TensorFlow's own paths)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    args = _common.parse_args(__doc__.splitlines()[0])
    repeats = 3 if args.quick else args.repeats
    records = []
    for impl, cfg in configs(args.quick):
        figures = measure(impl, cfg, repeats)
        records.append({"impl": impl, "config": cfg, **figures,
                        "note": NOTE})
        print(f"{impl:40s} C={cfg['C']:>7,} {figures['step_s']:9.4f} s "
              f"{figures['peak_rss_mb']:8.0f} MB", file=sys.stderr,
              flush=True)
    add_ratios(records)
    _common.write(records, args)
    if args.png:
        plot(records, args.png)


if __name__ == "__main__":
    main()
