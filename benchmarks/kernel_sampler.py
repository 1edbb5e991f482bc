"""KernelSampler speed: draws per second, tree update and rebuild cost.

    python benchmarks/kernel_sampler.py --json out.json --png out.png [--quick]

For every catalog size n (10k, 100k, 1M) and width D (16, 32, 64), with a
random item table (rows N(0, I / D)), queries N(0, I) (so h . w ~ N(0, 1))
and alpha = 100:

- draws_per_s: `KernelSampler.sample(h [T, D], K, shared=False)` in a
  `tf.function` (as in training; so are the updates below) with the
  compiled op (refresh="manual": the draw alone), T = 256 rows of K = 64
  draws (all K draws of a row descend together and share the nodes they
  visit) and T = 4096 rows of K = 1 (every draw its own descent). Per core:
  TensorFlow's intra-op pool is limited to `--threads` (default 1) threads.
- the pure-TF reference (categorical over brute-force probabilities, O(C D)
  per row) for n <= 100k, as a yardstick;
- update_us_per_row: `update(table, ids)` of R changed rows (R = 1, 100,
  10000), seconds / R; refresh_us_per_row: the same through
  `refresh(table)`, which first finds the changed rows by comparing the
  table with the snapshot (O(C D));
- build_s: a full rebuild (O(C D^2)); tree_mb: the tree variable's size.

Records: impl "tfrec_fast.KernelSampler/op" (draws, with the update /
refresh / build figures in the K = 64 record) and
"tfrec_fast.KernelSampler/reference" (draws), config {n, D, leaf_size, T,
K, threads, alpha}. `--quick`: n in (10k, 100k), D = 32, 3 repeats.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tfrec_fast  # noqa: E402  (selects tf_keras)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import _common  # noqa: E402
from tfrec_fast.ops import _library  # noqa: E402
from tfrec_fast.samplers import KernelSampler  # noqa: E402

ALPHA = 100.0
TARGET = 200_000  # draws / s / core at n = 100k, D = 32 (the goal)


def parse_args():
    p = _common.parser(
        __doc__.splitlines()[0], repeats_default=None,
        repeats_help="timed runs per figure (median; default 5, quick 3)")
    p.add_argument("--threads", type=int, default=1,
                   help="TensorFlow intra-op threads (1: per-core figures)")
    p.add_argument("--leaf-size", type=int, default=None,
                   help="default: the sampler's, 2 D in [32, 256]")
    p.add_argument("--sizes", type=int, nargs="+", default=None)
    p.add_argument("--dims", type=int, nargs="+", default=None)
    args = p.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.sizes is None:
        args.sizes = ([10_000, 100_000] if args.quick
                      else [10_000, 100_000, 1_000_000])
    if args.dims is None:
        args.dims = [32] if args.quick else [16, 32, 64]
    return args


def timed(fn, repeats):
    return _common.median_seconds(fn, repeats, warmup=1)


def draw_figures(sampler, query, num, repeats):
    draw = tf.function(lambda q: sampler.sample(q, num, shared=False)[0])
    seconds = timed(lambda: draw(query).numpy(), repeats)
    return int(query.shape[0]) * num / seconds


def update_figures(sampler, table, rng, rows, repeats):
    """(update us / row, refresh us / row) for `rows` changed rows."""
    ids = rng.choice(table.shape[0], size=rows, replace=False)
    moved = table.copy()
    moved[ids] += 0.01
    tables = [tf.constant(moved), tf.constant(table)]
    ids = tf.constant(ids, tf.int64)
    state = {"i": 0}
    update_fn = tf.function(sampler.update)
    refresh_fn = tf.function(sampler.refresh)

    def update():
        # Alternate between the two tables: every call moves `rows` rows.
        state["i"] ^= 1
        update_fn(tables[state["i"]], ids).numpy()

    def refresh():
        state["i"] ^= 1
        changed, rebuilt = refresh_fn(tables[state["i"]])
        assert int(changed) == rows and not bool(rebuilt)

    update_s = timed(update, repeats)
    sampler.rebuild(tables[state["i"]])
    refresh_s = timed(refresh, repeats)
    sampler.rebuild(tf.constant(table))
    return update_s / rows * 1e6, refresh_s / rows * 1e6


def measure(args, n, dim, rng):
    table = (rng.normal(size=(n, dim)) / np.sqrt(dim)).astype(np.float32)
    records = []
    # max_changed_fraction=1: refresh updates rows in place, never rebuilds.
    sampler = KernelSampler(n, dim, alpha=ALPHA, leaf_size=args.leaf_size,
                            refresh="manual", max_changed_fraction=1.0,
                            seed=0, use_fused=True)
    base = {"n": n, "D": dim, "leaf_size": sampler.leaf_size,
            "threads": args.threads, "alpha": ALPHA}
    build_s = timed(lambda: sampler.rebuild(table), max(1, args.repeats // 2))
    tree_mb = sampler.tree.shape.num_elements() * 4 / 2**20
    for rows, num in ((256, 64), (4096, 1)):
        query = tf.constant(rng.normal(size=(rows, dim)).astype(np.float32))
        rate = draw_figures(sampler, query, num, args.repeats)
        record = {"impl": "tfrec_fast.KernelSampler/op",
                  "config": dict(base, T=rows, K=num),
                  "draws_per_s": rate, "draws_per_s_per_thread":
                  rate / args.threads}
        if num == 64:
            record.update(build_s=build_s, tree_mb=tree_mb)
            for changed in (1, 100, 10_000):
                if changed * 10 > n:
                    continue
                update_us, refresh_us = update_figures(
                    sampler, table, rng, changed, args.repeats)
                record[f"update_us_per_row_R{changed}"] = update_us
                record[f"refresh_us_per_row_R{changed}"] = refresh_us
        records.append(record)
        print(f"op   n={n:8d} D={dim:3d} T={rows:5d} K={num:3d} "
              f"{rate:12,.0f} draws/s" + (
                  f"  build {build_s:.3f} s, tree {tree_mb:.0f} MB, update "
                  + ", ".join(f"R={c}: {record[f'update_us_per_row_R{c}']:.2f}"
                              for c in (1, 100, 10_000)
                              if f"update_us_per_row_R{c}" in record)
                  + " us/row" if num == 64 else ""), flush=True)
    if n <= 100_000:
        reference = KernelSampler(n, dim, alpha=ALPHA, refresh="manual",
                                  seed=0, use_fused=False)
        reference.snapshot.assign(table)  # all the reference draw reads
        rows, num = 64, 64
        query = tf.constant(rng.normal(size=(rows, dim)).astype(np.float32))
        rate = draw_figures(reference, query, num, args.repeats)
        records.append({"impl": "tfrec_fast.KernelSampler/reference",
                        "config": dict(base, T=rows, K=num),
                        "draws_per_s": rate,
                        "draws_per_s_per_thread": rate / args.threads})
        print(f"ref  n={n:8d} D={dim:3d} T={rows:5d} K={num:3d} "
              f"{rate:12,.0f} draws/s", flush=True)
    return records


def plot(records, path):
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    dims = sorted({r["config"]["D"] for r in records})
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, dim in enumerate(dims):
        for impl, k, style in (("op", 64, "-o"), ("op", 1, "--o"),
                               ("reference", 64, ":s")):
            rows = sorted((r for r in records
                           if r["impl"].endswith(impl)
                           and r["config"]["D"] == dim
                           and r["config"]["K"] == k),
                          key=lambda r: r["config"]["n"])
            if rows:
                axes[0].plot([r["config"]["n"] for r in rows],
                             [r["draws_per_s_per_thread"] for r in rows],
                             style, color=colors[i % len(colors)],
                             label=f"D={dim} {impl} K={k}")
        rows = sorted((r for r in records if r["config"]["D"] == dim
                       and "update_us_per_row_R100" in r),
                      key=lambda r: r["config"]["n"])
        if rows:
            axes[1].plot([r["config"]["n"] for r in rows],
                         [r["update_us_per_row_R100"] for r in rows], "-o",
                         color=colors[i % len(colors)],
                         label=f"D={dim} update (R=100 rows)")
            axes[1].plot([r["config"]["n"] for r in rows],
                         [r["refresh_us_per_row_R100"] for r in rows], ":o",
                         color=colors[i % len(colors)],
                         label=f"D={dim} refresh (find + update)")
    axes[0].axhline(TARGET, color="black", linewidth=0.8,
                    label="target 200k / s / core")
    threads = records[0]["config"]["threads"]
    leaves = sorted({r["config"]["leaf_size"] for r in records})
    axes[0].set_title(f"draws / s per thread ({threads} thread(s), "
                      f"leaf sizes {leaves})", fontsize=9)
    axes[1].set_title("tree update: microseconds per changed row",
                      fontsize=9)
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("catalog size n")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = parse_args()
    tf.config.threading.set_intra_op_parallelism_threads(args.threads)
    tf.config.threading.set_inter_op_parallelism_threads(1)
    module = _library.DEFAULT_LIBRARY.module()
    if module is None or not hasattr(module,
                                     "tfrec_fast_kernel_sampler_draw"):
        sys.exit("the op library with the kernel sampler ops is not built: "
                 "python custom_ops/build.py")
    begin = time.perf_counter()
    rng = np.random.default_rng(0)
    records = []
    for n in args.sizes:
        for dim in args.dims:
            records += measure(args, n, dim, rng)
    print(f"total {time.perf_counter() - begin:.0f} s, peak RSS "
          f"{_common.peak_rss_mb():.0f} MB", flush=True)
    _common.write(records, args)
    if args.png:
        plot(records, args.png)


if __name__ == "__main__":
    main()
