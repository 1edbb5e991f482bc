"""One transformer block / attention layer, fwd + bwd: ragged vs padded tf_keras.

    python benchmarks/attention.py --json out.json --png out.png [--quick]
        [--repeats N]

ByteTransformer's setup: B sequences with lengths uniform in [0.2 L, L]
(seeded per (B, L), so every implementation and head count of a (B, L) sees
the same lengths), model width D = 64, dropout 0. Causal (SASRec) for
L in {50, 200, 512}, B in {64, 128}, heads in {1, 2, 4}; bidirectional too
at L = 200. `--quick`: B = 64, L in {50, 200}, 2 heads (causal, and
bidirectional at L = 200).

Implementations (same weights within a config, copied with set_weights):
  one block (pre-LN, gelu FFN of width D, LayerNorm epsilon 1e-6):
    tfrec_fast.RaggedTransformerBlock            use_fused=True, packed tokens
    tfrec_fast.RaggedTransformerBlock/reference  use_fused=False: the pure-TF
                                 reference attention (pads to the longest row
                                 in memory) inside the same packed block
    tf.PaddedTransformerBlock    tfrec_fast.layers.PaddedTransformerBlock:
                                 stock tf_keras MultiHeadAttention etc. on
                                 padded [B, L, D] with a causal + padding mask
  attention layer only (Q/K/V/output projections + attention):
    tfrec_fast.RaggedMultiHeadAttention          use_fused=True
    tf.keras.MultiHeadAttention  tf_keras MultiHeadAttention on padded
                                 [B, L, D] with the same mask

One step = forward, loss = sum(output * fixed random cotangent) (the
cotangent is zero on padding), and gradients with respect to the input and
all trainable weights, inside one tf.function (the padding mask is built
inside the step from the lengths, as a padded model does per batch: [B, L, L]
causal + valid keys, or, bidirectional, [B, 1, L] valid keys broadcast over
the queries, the cheaper choice for the padded baseline). Each
step is called twice to warm up, then the implementations of a config are
timed in rounds, one call of each per round in a rotating order, so that load
from other processes hits all alike; step_s is the median over the rounds.

Peak RSS: one fresh child process per (implementation, config) that imports
TensorFlow, builds the inputs, then builds and runs only that implementation
(3 steps); peak_rss_mb is the child's peak resident set (VmHWM; whole
process, the ~0.55 GB of an imported TensorFlow included),
step_rss_growth_mb is the peak from the moment before it built the layer
(VmHWM reset there through /proc/self/clear_refs) minus the RSS at that
moment: weights, tracing, and the steps' activations and gradients.
(ru_maxrss is not used: on Linux it survives exec, so a child reports its
parent's peak.)

Records: impl, scope ("block" / "attention"), config {B, L, D, heads,
causal, tokens, padded_tokens, threads}, step_s, peak_rss_mb,
step_rss_growth_mb, rss_method, load_avg (os.getloadavg() after the config's
timing; the benchmark's own threads count in it), other_cpu_cores (CPU time
of all other processes / wall time during the config's timing, from
/proc/stat), max_abs_diff_vs_padded (ours: forward output against the padded
layer on the valid positions), speedup_vs_padded (ours: padded step_s /
step_s).
"""

import concurrent.futures
import json
import os
import resource
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tfrec_fast  # noqa: E402,F401  (selects tf_keras)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import _common  # noqa: E402
from tfrec_fast import layers  # noqa: E402
from tfrec_fast import ops  # noqa: E402

D = 64
BLOCK = "block"
ATTENTION = "attention"
# impl -> (scope, padded baseline of that scope or None for a baseline)
IMPLS = {
    "tfrec_fast.RaggedTransformerBlock": (BLOCK, "tf.PaddedTransformerBlock"),
    "tfrec_fast.RaggedTransformerBlock/reference": (
        BLOCK, "tf.PaddedTransformerBlock"),
    "tf.PaddedTransformerBlock": (BLOCK, None),
    "tfrec_fast.RaggedMultiHeadAttention": (
        ATTENTION, "tf.keras.MultiHeadAttention"),
    "tf.keras.MultiHeadAttention": (ATTENTION, None),
}
RSS_METHOD = (
    "VmHWM of a fresh child process running only this implementation and "
    "config (import TF, build inputs, build layer, 3 fwd+bwd steps); "
    "peak_rss_mb = whole-process peak incl. the TF import; "
    "step_rss_growth_mb = peak VmHWM after a reset (clear_refs 5) just "
    "before building the layer - VmRSS at that point")


def configs(quick):
    if quick:
        grid = [(64, L, 2) for L in (50, 200)]
    else:
        grid = [(B, L, h) for B in (64, 128) for h in (1, 2, 4)
                for L in (50, 200, 512)]
    out = [dict(B=B, L=L, heads=h, causal=True) for B, L, h in grid]
    out += [dict(B=B, L=L, heads=h, causal=False) for B, L, h in grid
            if L == 200]
    return out


class Case:
    """Inputs of one config: packed and padded, with the same values."""

    def __init__(self, cfg):
        B, L = cfg["B"], cfg["L"]
        self.L = L
        rng = np.random.default_rng([B, L])
        self.lengths = rng.integers(max(1, int(0.2 * L)), L + 1, size=B)
        self.splits = tf.constant(
            np.concatenate([[0], np.cumsum(self.lengths)]), tf.int64)
        tokens = int(self.lengths.sum())
        self.x = tf.constant(rng.standard_normal((tokens, D)), tf.float32)
        self.w = tf.constant(rng.standard_normal((tokens, D)), tf.float32)
        self.x_pad, self.w_pad = (self.pad(v) for v in (self.x, self.w))
        self.lengths_t = tf.constant(self.lengths, tf.int64)
        self.causal = cfg["causal"]
        self.config = {"B": B, "L": L, "D": D, "heads": cfg["heads"],
                       "causal": cfg["causal"], "tokens": tokens,
                       "padded_tokens": B * L, "threads": os.cpu_count()}

    def pad(self, flat):  # [T, D] -> [B, L, D], zeros past each length
        return tf.RaggedTensor.from_row_splits(flat, self.splits).to_tensor(
            shape=[len(self.lengths), self.L, D])

    def ragged(self, flat):
        return tf.RaggedTensor.from_row_splits(flat, self.splits,
                                               validate=False)

    def mask(self):
        """Valid keys: [B, L, L] with j <= i when causal, else [B, 1, L]
        (broadcast over the queries, the cheaper padded baseline)."""
        mask = tf.sequence_mask(self.lengths_t, self.L)[:, tf.newaxis, :]
        if self.causal:
            mask &= tf.linalg.band_part(
                tf.ones((self.L, self.L), tf.bool), -1, 0)[tf.newaxis]
        return mask


def build(impl, cfg, case, source=None):
    """(forward(x) -> output laid out as x, x, cotangent, variables, layer)."""
    heads, causal = cfg["heads"], cfg["causal"]
    tf_keras.utils.set_random_seed(0)
    if impl.startswith("tfrec_fast.RaggedTransformerBlock"):
        fused = not impl.endswith("/reference")
        layer = layers.RaggedTransformerBlock(heads, D, dropout=0.0,
                                              causal=causal, use_fused=fused)
        layer(case.ragged(case.x))
        fwd = lambda x: layer(case.ragged(x), training=True).flat_values
        x, w = case.x, case.w
    elif impl == "tfrec_fast.RaggedMultiHeadAttention":
        layer = layers.RaggedMultiHeadAttention(
            heads, D // heads, causal=causal, dropout=0.0, use_fused=True)
        layer(case.ragged(case.x))
        fwd = lambda x: layer(case.ragged(x), training=True).flat_values
        x, w = case.x, case.w
    elif impl == "tf.PaddedTransformerBlock":
        layer = layers.PaddedTransformerBlock(heads, D, dropout=0.0)
        layer(case.x_pad[:1], tf.ones([1, case.L, case.L], tf.bool))
        fwd = lambda x: layer(x, case.mask(), training=True)
        x, w = case.x_pad, case.w_pad
    elif impl == "tf.keras.MultiHeadAttention":
        layer = tf_keras.layers.MultiHeadAttention(heads, D // heads,
                                                   dropout=0.0)
        layer(case.x_pad[:1], case.x_pad[:1])
        fwd = lambda x: layer(x, x, attention_mask=case.mask(),
                              training=True)
        x, w = case.x_pad, case.w_pad
    else:
        raise ValueError(impl)
    if source is not None:
        layer.set_weights(source.get_weights())
    return fwd, x, w, layer.trainable_variables, layer


def make_step(fwd, x, w, variables):
    @tf.function
    def step():
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(fwd(x) * w)
        grads = tape.gradient(loss, [x] + variables)
        return loss + tf.add_n([tf.reduce_sum(g) for g in grads])
    return lambda: step().numpy()


def _busy_jiffies():
    with open("/proc/stat") as f:
        fields = [int(v) for v in f.readline().split()[1:]]
    return sum(fields) - fields[3] - fields[4]  # all but idle and iowait


def time_config(cfg, repeats):
    case = Case(cfg)
    impls = list(IMPLS)
    if not ops.build_info()["cpu_ops"]:
        impls = [i for i in impls if IMPLS[i][1] is None
                 or i.endswith("/reference")]
    built = {}
    # Padded layers get the weights of the ragged ones (same math).
    sources = {BLOCK: None, ATTENTION: None}
    for impl in impls:
        scope = IMPLS[impl][0]
        fwd, x, w, variables, layer = build(impl, cfg, case, sources[scope])
        sources[scope] = sources[scope] or layer
        built[impl] = (fwd, x, w, variables)
    outputs = {i: f(x) for i, (f, x, _, _) in built.items()}
    diffs = {}
    for impl in impls:
        base = IMPLS[impl][1]
        if base in outputs:  # padded output on the valid positions only
            valid = tf.RaggedTensor.from_tensor(
                outputs[base], lengths=case.lengths_t).flat_values
            diffs[impl] = float(tf.reduce_max(tf.abs(outputs[impl] - valid)))
    del outputs
    steps = {i: make_step(*b) for i, b in built.items()}
    for step in steps.values():
        step()
        step()
    times = {i: [] for i in steps}
    names = list(steps)
    jiffies0, wall0 = _busy_jiffies(), time.perf_counter()
    own0 = resource.getrusage(resource.RUSAGE_SELF)
    for r in range(repeats):
        for impl in names[r % len(names):] + names[:r % len(names)]:
            start = time.perf_counter()
            steps[impl]()
            times[impl].append(time.perf_counter() - start)
    wall = time.perf_counter() - wall0
    own1 = resource.getrusage(resource.RUSAGE_SELF)
    own = (own1.ru_utime + own1.ru_stime) - (own0.ru_utime + own0.ru_stime)
    busy = (_busy_jiffies() - jiffies0) / os.sysconf("SC_CLK_TCK")
    other = max(0.0, busy - own) / wall
    load = [round(v, 2) for v in os.getloadavg()]
    records = []
    for impl in names:
        rec = {"impl": impl, "scope": IMPLS[impl][0], "config": case.config,
               "step_s": float(np.median(times[impl])),
               "load_avg": load, "other_cpu_cores": round(other, 2)}
        if impl in diffs:
            rec["max_abs_diff_vs_padded"] = diffs[impl]
        records.append(rec)
    for rec in records:
        base = IMPLS[rec["impl"]][1]
        base_rec = [r for r in records if r["impl"] == base]
        if base_rec:
            rec["speedup_vs_padded"] = base_rec[0]["step_s"] / rec["step_s"]
        print(f"{rec['impl']:45s} B={cfg['B']:3d} L={cfg['L']:3d} "
              f"H={cfg['heads']} causal={cfg['causal']!s:5s} "
              f"{rec['step_s'] * 1e3:9.2f} ms"
              + (f"  x{rec['speedup_vs_padded']:.2f}"
                 if "speedup_vs_padded" in rec else "")
              + f"  (others {other:.2f} cores)", file=sys.stderr, flush=True)
    return records


def rss_child(spec):
    """Child process entry: peak RSS of one implementation at one config.

    Reads VmHWM / VmRSS of /proc/self/status rather than ru_maxrss: on Linux
    ru_maxrss survives exec, so a child would report its parent's peak."""
    impl, cfg = spec["impl"], spec["config"]
    case = Case(cfg)
    import_peak = _common.proc_status_mb("VmHWM")
    before = _common.proc_status_mb("VmRSS")
    _common.reset_peak_rss()
    step = make_step(*build(impl, cfg, case)[:4])
    for _ in range(3):
        step()
    peak = _common.proc_status_mb("VmHWM")
    print(json.dumps({"peak_rss_mb": max(peak, import_peak),
                      "step_rss_growth_mb": peak - before}))


def measure_rss(impl, cfg):
    spec = json.dumps({"impl": impl, "config": cfg})
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, os.path.abspath(__file__), "--rss-child", spec],
        capture_output=True, text=True, env=env, check=False)
    if proc.returncode:
        raise RuntimeError(f"RSS child {impl} {cfg} failed:\n{proc.stderr}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def _l_ticks(ax, records):
    """Ticks at the measured L on a log x axis."""
    from matplotlib import ticker  # pylint: disable=import-outside-toplevel
    lengths = sorted({r["config"]["L"] for r in records})
    ax.xaxis.set_major_locator(ticker.FixedLocator(lengths))
    ax.xaxis.set_major_formatter(ticker.FixedFormatter(
        [str(v) for v in lengths]))
    ax.xaxis.set_minor_locator(ticker.NullLocator())


def plot(records, path):
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    causal = [r for r in records if r["config"]["causal"]]
    batches = sorted({r["config"]["B"] for r in causal})
    heads = sorted({r["config"]["heads"] for r in causal})
    fig, axes = plt.subplots(len(batches), len(heads) + 1,
                             figsize=(4 * (len(heads) + 1),
                                      3.4 * len(batches)), squeeze=False)
    styles = {"tfrec_fast.RaggedTransformerBlock": "C0o-",
              "tfrec_fast.RaggedTransformerBlock/reference": "C2^:",
              "tf.PaddedTransformerBlock": "C3s-",
              "tfrec_fast.RaggedMultiHeadAttention": "C0o--",
              "tf.keras.MultiHeadAttention": "C3s--"}
    for row, B in enumerate(batches):
        for col, h in enumerate(heads):
            ax = axes[row][col]
            for impl, style in styles.items():
                rows = sorted((r for r in causal if r["impl"] == impl
                               and r["config"]["B"] == B
                               and r["config"]["heads"] == h),
                              key=lambda r: r["config"]["L"])
                if rows:
                    ax.loglog([r["config"]["L"] for r in rows],
                              [r["step_s"] for r in rows], style,
                              label=impl, ms=4)
            _l_ticks(ax, causal)
            ax.set_title(f"causal, B={B}, D={D}, heads={h}", fontsize=9)
            ax.set_xlabel("L (lengths ~ U[0.2 L, L])")
            ax.set_ylabel("fwd+bwd step (s)")
            if row == 0 and col == 0:
                ax.legend(fontsize=6)
        ax = axes[row][-1]
        for i, h in enumerate(heads):
            for impl, style in (("tfrec_fast.RaggedTransformerBlock", "-"),
                                ("tfrec_fast.RaggedMultiHeadAttention",
                                 "--")):
                for is_causal, marker in ((True, "o"),
                                          (False, "x" if "Block" in impl
                                           else "+")):
                    rows = sorted((r for r in records if r["impl"] == impl
                                   and r["config"]["B"] == B
                                   and r["config"]["heads"] == h
                                   and r["config"]["causal"] == is_causal),
                                  key=lambda r: r["config"]["L"])
                    if rows:
                        ax.semilogx(
                            [r["config"]["L"] for r in rows],
                            [r["speedup_vs_padded"] for r in rows],
                            f"C{i}{marker}{style if is_causal else ''}",
                            label=(f"{'block' if 'Block' in impl else 'MHA'}"
                                   f" h={h}"
                                   f"{'' if is_causal else ' bidir'}"),
                            ms=5)
        _l_ticks(ax, records)
        ax.axhline(1.0, color="k", lw=0.8)
        ax.axhline(2.5, color="gray", lw=0.8, ls=":")
        ax.set_title(f"speedup vs padded tf_keras, B={B}", fontsize=9)
        ax.set_xlabel("L")
        ax.set_ylabel("padded step / ragged step")
        ax.legend(fontsize=6)
    fig.suptitle(f"fwd+bwd, {os.cpu_count()} CPU cores", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "--rss-child":
        rss_child(json.loads(sys.argv[2]))
        return
    args = _common.parse_args(__doc__.splitlines()[0])
    tf.get_logger().setLevel("ERROR")  # one tf.function per impl: retracing
    repeats = args.repeats if "--repeats" in " ".join(sys.argv) else (
        7 if args.quick else 9)
    load_at_start = [round(v, 2) for v in os.getloadavg()]
    records = []
    for cfg in configs(args.quick):
        records += time_config(cfg, repeats)
    # RSS children after all timing (never concurrent with it), two at once.
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        jobs = {id(r): pool.submit(measure_rss, r["impl"],
                                   {k: r["config"][k] for k in
                                    ("B", "L", "heads", "causal")})
                for r in records}
        for rec in records:
            rec.update(jobs[id(rec)].result())
            rec["rss_method"] = RSS_METHOD
            rec["repeats"] = repeats
            rec["load_avg_at_start"] = load_at_start
    _common.write(records, args)
    if args.png:
        plot(records, args.png)


if __name__ == "__main__":
    main()
