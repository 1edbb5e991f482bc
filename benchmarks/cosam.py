"""CoSam sampler speed and memory: CollaborativeSampler on Zipf graphs.

    python benchmarks/cosam.py --json out.json --png out.png [--quick]
        [--repeats N] [--sizes C ...] [--users-per-call B ...]

From the repository root (as run for benchmarks/results):

    TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH=. python benchmarks/cosam.py \\
        --json cosam.json --png cosam.png
    TF_CPP_MIN_LOG_LEVEL=3 PYTHONPATH=. python benchmarks/cosam.py --quick \\
        --json /tmp/cosam_quick.json --png /tmp/cosam_quick.png

Graphs: for every catalog size C (10k, 100k, 1M items), U = C / 10 users
with `tfrec_fast.data.synthetic_zipf` interaction sequences (item
popularity Zipf with exponent 1.0, geometric lengths, seed 0), turned into
(user, item) interactions, one per sequence position. The mean length is
calibrated on a pilot of U / 10 users (same generator, seed 1) so that the
deduplicated graph has about 10 edges per item (E ~ 10 C: 1M items -> ~10M
edges); `num_edges` in the config is the exact E. With exponent 1.0 a part
of the tail items has no edge at all.

Measured, per (C, users_per_call B):

- impl "tfrec_fast.CollaborativeSampler": `sample(users [B], K,
  shared=False)` with B distinct users (one row per user, drawn uniformly
  without replacement, fixed for the config) and K = 256 draws per user,
  called through a `tf.function` (as inside `model.fit`) with the sampler's
  defaults (max_length 3, stop_probability 0.5, exclude_observed=True):
  2 warm-up calls, then step_s = median of `--repeats` calls (the ids are
  fetched with .numpy()); draws_per_s = B K / step_s.
- impl "tfrec_fast.CollaborativeSampler/item_probabilities":
  `item_probabilities(users [B])` ([B, C] float32, the exact walk
  distributions that a draw starts from), timed the same way;
  draws_per_s is absent.

Each (impl, config) runs in its own fresh process, which generates the
graph, builds the sampler (graph_build_s: `CollaborativeSampler.
from_interactions`, deduplication and variable assignment included;
data_s: the synthetic generation), then times the calls. peak_rss_mb is
that process's peak resident set (VmHWM; whole process: the ~0.55 GB of an
imported TensorFlow, the generated interactions and the graph build
included), step_rss_growth_mb the peak from just before the first call
(VmHWM reset there through /proc/self/clear_refs) minus the RSS at that
moment: tracing and the calls' temporaries. (ru_maxrss is not used: on
Linux it survives exec, so a child reports its parent's peak.) state_mb is
the bytes of the sampler's variables / 2^20 (24 B per edge: the int64
(user, item) pair and two float32 logits; 12 per user, 8 per item);
first_call_s the first call, tracing included; load_avg the
1-minute load average after the timing (the benchmark's own threads count
in it).

Records: {"impl", "config": {num_items, num_users, num_edges,
users_per_call, num_draws_per_user, max_length, threads}, "draws_per_s",
"step_s", "peak_rss_mb", "step_rss_growth_mb", "graph_build_s", "state_mb",
"data_s", "first_call_s", "load_avg", "note"}. TensorFlow's default thread
pools (threads = all cores).

`--quick`: C in (10k, 100k), B = 64 only, 3 repeats (under two minutes on
2 cores; ~20 s). The full run: C in (10k, 100k, 1M), B in (16, 64), 5
repeats (~5 min on 2 idle cores; at C = 1M, B = 64 one process peaks at
~3.5 GB and a call takes ~7 s).
"""

import json
import os
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import _common  # noqa: E402

SAMPLE = "tfrec_fast.CollaborativeSampler"
PROBS = "tfrec_fast.CollaborativeSampler/item_probabilities"
IMPLS = (SAMPLE, PROBS)
K = 256
EDGES_PER_ITEM = 10
ITEMS_PER_USER = 10  # U = C / 10
ZIPF_EXPONENT = 1.0
NOTE = ("Zipf(1.0) synthetic graph, U = C / 10, ~10 distinct edges per item; "
        "sampler defaults (max_length 3, stop_probability 0.5, "
        "exclude_observed=True); B distinct users per call, one row each, "
        "K draws per row, through tf.function; each (impl, config) in a "
        "fresh process; peak_rss_mb = whole-process VmHWM incl. the TF "
        "import, data generation and graph build")


def parse_args():
    p = _common.parser(
        __doc__.splitlines()[0], repeats_default=None,
        repeats_help="timed calls per figure (median; default 5, quick 3)")
    p.add_argument("--sizes", type=int, nargs="+", default=None,
                   help="catalog sizes C (default 10k 100k 1M; quick: "
                   "10k 100k)")
    p.add_argument("--users-per-call", type=int, nargs="+", default=None,
                   help="distinct users per call B (default 16 64; quick 64)")
    p.add_argument("--impls", nargs="+", default=list(IMPLS),
                   choices=IMPLS, help="what to measure (default both)")
    args = p.parse_args()
    if args.repeats is None:
        args.repeats = 3 if args.quick else 5
    if args.sizes is None:
        args.sizes = ([10_000, 100_000] if args.quick
                      else [10_000, 100_000, 1_000_000])
    if args.users_per_call is None:
        args.users_per_call = [64] if args.quick else [16, 64]
    return args


# ------------------------------------------------------------ child process


def interactions(num_users, num_items):
    """(users [N], items [N]) with ~EDGES_PER_ITEM distinct edges per item."""
    import numpy as np
    from tfrec_fast.data import synthetic_zipf
    from tfrec_fast.samplers.collaborative import graph_edges

    target = EDGES_PER_ITEM * num_items / num_users  # distinct items / user
    # Repeated items of a user collapse into one edge; the fraction that
    # survives is measured on a pilot of U / 10 users (dedup is per user).
    pilot_users = max(100, num_users // 10)
    mean_length = target
    for _ in range(2):
        pilot = synthetic_zipf(pilot_users, num_items, mean_length=mean_length,
                               zipf_exponent=ZIPF_EXPONENT, seed=1)
        edges = graph_edges(np.repeat(np.arange(pilot_users), pilot.lengths),
                            pilot.items, pilot_users, num_items)[0].size
        mean_length *= target / (edges / pilot_users)
    data = synthetic_zipf(num_users, num_items, mean_length=mean_length,
                          zipf_exponent=ZIPF_EXPONENT, seed=0)
    users = np.repeat(np.arange(num_users, dtype=np.int64), data.lengths)
    return users, data.items


def child(spec):
    """Child process entry: times one implementation at one config."""
    impl, cfg, repeats = spec["impl"], spec["config"], spec["repeats"]
    import tfrec_fast  # noqa: F401  (selects tf_keras)
    import numpy as np
    import tensorflow as tf
    from tfrec_fast.samplers import CollaborativeSampler

    num_items, num_users = cfg["num_items"], cfg["num_users"]
    start = time.perf_counter()
    users, items = interactions(num_users, num_items)
    data_s = time.perf_counter() - start
    start = time.perf_counter()
    sampler = CollaborativeSampler.from_interactions(
        users, items, num_users, num_items, max_length=cfg["max_length"],
        seed=0)
    graph_build_s = time.perf_counter() - start
    del users, items
    state_mb = sum(v.shape.num_elements() * v.dtype.size
                   for v in sampler.variables) / 2**20
    batch = cfg["users_per_call"]
    rng = np.random.default_rng(batch)
    query = tf.constant(rng.choice(num_users, size=batch, replace=False),
                        tf.int64)
    if impl == SAMPLE:
        num = cfg["num_draws_per_user"]
        call = tf.function(
            lambda q: sampler.sample(q, num, shared=False)[0])
    elif impl == PROBS:
        call = tf.function(sampler.item_probabilities)
    else:
        raise ValueError(impl)

    before = _common.proc_status_mb("VmRSS")
    setup_peak = _common.proc_status_mb("VmHWM")
    _common.reset_peak_rss()
    start = time.perf_counter()
    first = call(query).numpy()
    first_call_s = time.perf_counter() - start
    if impl == SAMPLE:
        assert first.shape == (batch, cfg["num_draws_per_user"])
        assert first.min() >= 0 and first.max() < num_items
    else:
        assert first.shape == (batch, num_items)
        assert np.allclose(first.sum(axis=1), 1.0, atol=1e-3)
    del first
    seconds = _common.median_seconds(lambda: call(query).numpy(), repeats,
                                     warmup=1)  # + the first call above
    peak = _common.proc_status_mb("VmHWM")
    figures = {"num_edges": sampler.num_edges, "step_s": seconds,
               "peak_rss_mb": max(peak, setup_peak),
               "step_rss_growth_mb": peak - before,
               "graph_build_s": graph_build_s, "state_mb": state_mb,
               "data_s": data_s, "first_call_s": first_call_s,
               "load_avg": os.getloadavg()[0]}
    print(json.dumps(figures))


# ----------------------------------------------------------- parent process


def measure(impl, cfg, repeats):
    spec = json.dumps({"impl": impl, "config": cfg, "repeats": repeats})
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--child", spec],
        capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"{impl} {cfg} failed (exit {proc.returncode}):\n"
                           f"{proc.stderr[-3000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def configs(args):
    for num_items in sorted(args.sizes):
        for batch in args.users_per_call:
            yield {"num_items": num_items,
                   "num_users": max(1, num_items // ITEMS_PER_USER),
                   "users_per_call": batch, "num_draws_per_user": K,
                   "max_length": 3, "threads": os.cpu_count()}


def plot(records, path):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(1, 3, figsize=(15, 4.5))
    batches = sorted({r["config"]["users_per_call"] for r in records})
    for i, batch in enumerate(batches):
        for impl, style, label in ((SAMPLE, "-o", "sample"),
                                   (PROBS, "--s", "item_probabilities")):
            rows = sorted((r for r in records if r["impl"] == impl
                           and r["config"]["users_per_call"] == batch),
                          key=lambda r: r["config"]["num_items"])
            if not rows:
                continue
            sizes = [r["config"]["num_items"] for r in rows]
            color = f"C{i}"
            if impl == SAMPLE:
                axes[0].plot(sizes, [r["draws_per_s"] for r in rows], style,
                             color=color, label=f"B={batch} users / call")
                for r in rows:
                    axes[0].annotate(
                        f"E={r['config']['num_edges'] / 1e6:.2g}M",
                        (r["config"]["num_items"], r["draws_per_s"]),
                        fontsize=6, textcoords="offset points",
                        xytext=(3, 3))
            axes[1].plot(sizes, [r["step_s"] for r in rows], style,
                         color=color, label=f"{label}, B={batch}")
            axes[2].plot(sizes, [r["peak_rss_mb"] for r in rows], style,
                         color=color, label=f"{label}, B={batch}")
    rows = sorted({(r["config"]["num_items"], r["state_mb"])
                   for r in records})
    axes[2].plot([c for c, _ in rows], [s for _, s in rows], ":",
                 color="black", label="sampler variables (state_mb)")
    axes[0].set_title(f"sample(users [B], K={K}, shared=False): draws / s",
                      fontsize=9)
    axes[0].set_ylabel("draws / s")
    axes[1].set_title("seconds per call", fontsize=9)
    axes[1].set_ylabel("s")
    axes[2].set_title("peak RSS of the process (VmHWM, TF import incl.)",
                      fontsize=9)
    axes[2].set_ylabel("MB")
    for ax in axes:
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.set_xlabel("num_items C (U = C / 10, E ~ 10 C)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    threads = records[0]["config"]["threads"]
    fig.suptitle(f"CollaborativeSampler (CoSam), Zipf graphs, max_length 3, "
                 f"{threads} CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--child":
        child(json.loads(sys.argv[2]))
        return
    args = parse_args()
    begin = time.perf_counter()
    records = []
    for cfg in configs(args):
        for impl in args.impls:
            try:
                figures = measure(impl, cfg, args.repeats)
            except RuntimeError:
                _common.write(records, args)  # keep what was measured
                raise
            record = {"impl": impl,
                      "config": dict(cfg, num_edges=figures.pop("num_edges"))}
            if impl == SAMPLE:
                record["draws_per_s"] = (cfg["users_per_call"] * K
                                         / figures["step_s"])
            record.update(figures, note=NOTE)
            records.append(record)
            print(f"{impl:52s} C={cfg['num_items']:>9,} "
                  f"E={record['config']['num_edges']:>11,} "
                  f"B={cfg['users_per_call']:3d} "
                  f"{figures['step_s']:9.4f} s/call"
                  + (f" {record['draws_per_s']:11,.0f} draws/s"
                     if "draws_per_s" in record else " " * 20)
                  + f" {figures['peak_rss_mb']:7.0f} MB peak "
                  f"(build {figures['graph_build_s']:.1f} s, state "
                  f"{figures['state_mb']:.0f} MB)",
                  file=sys.stderr, flush=True)
    print(f"total {time.perf_counter() - begin:.0f} s", file=sys.stderr,
          flush=True)
    _common.write(records, args)
    if args.png:
        plot(records, args.png)


if __name__ == "__main__":
    main()
