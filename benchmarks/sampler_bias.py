"""Bias and variance of sampled-softmax gradients, per sampler and K.

    python benchmarks/sampler_bias.py --json out.json --png out.png [--quick]

One fixed model state: SASRec (d 64, 2 blocks, max length 200) trained on
ML-100k with the full-softmax cross-entropy for `--train-epochs` epochs
(seeded; `--cache` keeps the weights). From it a fixed batch of T training
positions (drawn uniformly from all training positions with a fixed seed)
gives hidden states H [T, D] and targets; the item table is W [C, D]. For
every sampler and K, R = `--repeats` independent draws of the sampled-softmax
loss (mean over rows) give gradients g_r = (dL/dH, dL/dW), flattened and
concatenated, compared with the full-softmax gradient g:

    grad_cosine_mean    cos(mean_r g_r, g)       (bias; with finite R it
                                                  also holds variance / R)
    grad_cosine_single  mean_r cos(g_r, g)       (bias and variance)
    loss_rel_error      (mean_r L_r - L) / L     (signed)

plus grad_cosine_expected_est, an estimate of cos(E[g_r], g) with the
variance / R removed (|E g_r|^2 estimated as |mean|^2 - tr(Cov) / R, tr(Cov)
from the sample variance of the R draws; NaN where that comes out <= 0;
a ratio of noisy estimates, so it can exceed 1 when R is small),
the same cosines for the H and W parts alone, the loss spread and the
seconds per draw. Records: impl "tfrec_fast.SampledSoftmax/<sampler>" (and
"tf.nn.sampled_softmax_loss/<sampler>" for TensorFlow's own log-uniform
sampled softmax), config {sampler, K, T, C, D, repeats, ...}, the figures.

Samplers (shared negatives, accidental hits removed, positive uncorrected
unless said):

- uniform, log-uniform (ids are frequency-ordered), unigram-1.0 and
  unigram-0.75: (count + 1)^alpha over the training positions' targets;
- in-batch: the T positives of the batch themselves, positive corrected.
  `InBatch` takes no K (it does not subsample the batch), so it has one
  point, K = T. Its frequency estimate first sees `--warmup-steps` batches
  of T random training positions and is put back to that state before every
  draw; the candidates are then fixed by the batch, so all draws are equal
  (grad_cosine_single = grad_cosine_mean: pure bias);
- mixed-in-batch+uniform: the T positives + K uniform draws (T + K
  candidates, the mixture's log q), positive corrected;
- hard-negatives-uniform: per row the top K of a uniform pool of 4 K
  (`--pool-size`) draws shared by a 256-row chunk. Its log q is a heuristic
  (see `HardNegatives`), so its loss is not an estimate of the full loss;
- kernel-<alpha>: `KernelSampler`, q ∝ alpha (h . w)^2 + 1 over the fixed
  item table (`--kernel-alpha`, default 100), K draws *per row* (its
  proposal depends on the row), exact log q; uniform-per-row is uniform
  with per-row draws, its apples-to-apples baseline (same bias as shared
  uniform, different variance).

`--samplers` restricts the run to some of the names above (and "tf" for
TensorFlow's own sampled softmax).

TensorFlow: `tf.nn.sampled_softmax_loss` with sampled_values from
`tf.random.log_uniform_candidate_sampler(unique=True)` (TF's default:
K distinct ids) and with unique=False (K draws with replacement, as ours);
remove_accidental_hits=True. TF always corrects the true logit too
(- log of its expected count), so its loss is a different function from
ours with correct_positive=False, and its loss_rel_error is not comparable.

Samplers that this version of tfrec_fast does not have are skipped with a
printed note.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tfrec_fast  # noqa: E402  (selects tf_keras)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
import tf_keras  # noqa: E402

import _common  # noqa: E402
from tfrec_fast import data  # noqa: E402
from tfrec_fast import samplers  # noqa: E402
from tfrec_fast.losses import SampledSoftmax  # noqa: E402
from tfrec_fast.losses import full_softmax_cross_entropy  # noqa: E402
from tfrec_fast.models import SASRec  # noqa: E402

MAX_LEN = 200


def parse_args():
    p = _common.parser(
        __doc__.splitlines()[0], repeats_default=None,
        repeats_help="draws per (sampler, K) (default 200, quick 8)")
    p.add_argument("--ks", type=int, nargs="+", default=None,
                   help="K values (default 16 64 256 1024, quick 16 256)")
    p.add_argument("--rows", type=int, default=None,
                   help="T, positions in the fixed batch (default 2048, "
                        "quick 1024)")
    p.add_argument("--train-epochs", type=int, default=None,
                   help="full-CE epochs of the fixed model (default 20, "
                        "quick 3)")
    p.add_argument("--pool-size", type=int, default=None,
                   help="hard-negatives pool per row (default 4 K)")
    p.add_argument("--warmup-steps", type=int, default=1000,
                   help="batches the in-batch frequency estimate sees first")
    p.add_argument("--cache", default=None,
                   help="weights file: loaded if present, else written")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--samplers", nargs="+", default=None,
                   help="only these samplers (names as in the records, "
                        "'tf' for tf.nn.sampled_softmax_loss); default all")
    p.add_argument("--kernel-alpha", type=float, default=100.0,
                   help="alpha of the kernel sampler")
    args = p.parse_args()
    quick = args.quick
    if args.repeats is None:
        args.repeats = 8 if quick else 200
    if args.ks is None:
        args.ks = [16, 256] if quick else [16, 64, 256, 1024]
    if args.rows is None:
        args.rows = 1024 if quick else 2048
    if args.train_epochs is None:
        args.train_epochs = 3 if quick else 20
    return args


# ---------------------------------------------------------------------------
# The fixed model state and batch.

def fixed_state(args):
    """(H [T, D], targets [T], W [C, D], target counts [C], all targets).

    Counts and all targets are over every training position.
    """
    tf_keras.utils.set_random_seed(args.seed)
    split = data.leave_one_out(data.to_sequences(data.load_movielens_100k()))
    model = SASRec(split.num_items, max_len=MAX_LEN, dim=64, num_blocks=2,
                   num_heads=1, dropout=0.2)
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-3))
    train = data.next_item_dataset(split.train, batch_size=128,
                                   max_len=MAX_LEN, seed=args.seed)
    cache = args.cache
    if cache and os.path.exists(cache):
        model.compute_loss(next(iter(train)))  # builds the variables
        model.load_weights(cache)
        print(f"loaded the model from {cache}", flush=True)
    else:
        start = time.perf_counter()
        model.fit(train, epochs=args.train_epochs, verbose=0)
        print(f"trained SASRec (full CE) for {args.train_epochs} epochs in "
              f"{time.perf_counter() - start:.0f} s", flush=True)
        if cache:
            model.save_weights(cache)
    hidden, targets = [], []
    ordered = data.next_item_dataset(split.train, batch_size=128,
                                     max_len=MAX_LEN, shuffle=False)
    for batch in ordered:
        hidden.append(model(batch["item_ids"], training=False).flat_values)
        targets.append(batch["targets"].flat_values)
    hidden = tf.concat(hidden, 0).numpy()
    targets = tf.concat(targets, 0).numpy()
    rng = np.random.default_rng(args.seed)
    rows = rng.choice(len(targets), size=args.rows, replace=False)
    table = model.item_table.numpy()
    # Counts of the training positions' targets (what the loss sees).
    counts = np.bincount(targets, minlength=split.num_items)
    print(f"fixed batch: T={args.rows} of {len(targets)} training positions, "
          f"C={table.shape[0]}, D={table.shape[1]}", flush=True)
    return (tf.constant(hidden[rows]), tf.constant(targets[rows], tf.int64),
            tf.constant(table), counts, targets)


# ---------------------------------------------------------------------------
# Samplers. Each spec: {"ks": K values or None for args.ks, "build":
# K -> Built}, or a string saying why the sampler is skipped.

class Built:
    """A sampler ready to measure: how the loss uses it, and a reset hook."""

    def __init__(self, sampler, shared=True, correct_positive=False,
                 chunk_rows=None, reset=None, num_negatives="K", **notes):
        self.sampler = sampler
        self.shared = shared
        self.correct_positive = correct_positive
        self.chunk_rows = chunk_rows
        self.reset = reset or (lambda: None)
        self.num_negatives = num_negatives
        self.notes = notes


def _needs(*names):
    missing = [n for n in names if not hasattr(samplers, n)]
    return (f"tfrec_fast.samplers has no {', '.join(missing)}"
            if missing else None)


def warmed_in_batch(num_items, all_targets, rows, steps, seed):
    """InBatch whose frequency estimate has seen `steps` batches.

    Each warm-up batch is `rows` positions drawn uniformly from all training
    positions (as the fixed batch is). Returns (sampler, reset): reset()
    puts the estimator back to its warmed state, so that every measured draw
    sees the same estimate (the fixed batch, repeated, would otherwise pull
    it towards its own items).
    """
    sampler = samplers.InBatch(num_items, seed=seed)
    rng = np.random.default_rng(seed + 1)
    observe = tf.function(
        lambda p: sampler.sample(None, None, positives=p)[1])
    for _ in range(steps):
        batch = all_targets[rng.integers(0, len(all_targets), size=rows)]
        observe(tf.constant(batch, tf.int64))
    state = [(v, v.numpy()) for v in sampler.weights]

    def reset():
        for variable, value in state:
            variable.assign(value)

    return sampler, reset


def sampler_specs(args, num_items, counts, all_targets, table=None):
    seed = args.seed
    rows = args.rows
    specs = {}
    specs["uniform"] = {"build": lambda k: Built(
        samplers.Uniform(num_items, seed=seed))}
    specs["log-uniform"] = {"build": lambda k: Built(
        samplers.LogUniform(num_items, seed=seed))}
    specs["unigram-1.0"] = {"build": lambda k: Built(samplers.Unigram(
        counts, alpha=1.0, smoothing=1.0, seed=seed), smoothing=1.0)}
    specs["unigram-0.75"] = {"build": lambda k: Built(samplers.Unigram(
        counts, alpha=0.75, smoothing=1.0, seed=seed), smoothing=1.0)}

    def in_batch(k):
        del k
        sampler, reset = warmed_in_batch(num_items, all_targets, rows,
                                         args.warmup_steps, seed)
        return Built(sampler, correct_positive=True, reset=reset,
                     num_negatives=None, candidates=f"the T={rows} "
                     "positives of the batch", warmup_steps=args.warmup_steps)

    specs["in-batch"] = _needs("InBatch") or {"ks": [rows],
                                              "build": in_batch}

    def mixed(k):
        in_batch_sampler, reset = warmed_in_batch(
            num_items, all_targets, rows, args.warmup_steps, seed)
        return Built(samplers.Mixed(in_batch_sampler,
                                    samplers.Uniform(num_items, seed=seed)),
                     correct_positive=True, reset=reset,
                     candidates=f"the T={rows} positives + K uniform draws",
                     warmup_steps=args.warmup_steps)

    specs["mixed-in-batch+uniform"] = _needs("InBatch", "Mixed") or {
        "build": mixed}

    def hard(k):
        pool = args.pool_size or 4 * k
        return Built(samplers.HardNegatives(
            samplers.Uniform(num_items, seed=seed), pool_size=pool),
            shared=True, chunk_rows=256, pool_size=pool,
            pool="one uniform pool per 256-row chunk, top-K per row")

    specs["hard-negatives-uniform"] = _needs("HardNegatives") or {
        "build": hard}

    specs["uniform-per-row"] = {"build": lambda k: Built(
        samplers.Uniform(num_items, seed=seed), shared=False, chunk_rows=256,
        draws="K per row")}

    def kernel(k):
        del k
        # The table is fixed here, so the tree is built once ("manual").
        sampler = samplers.KernelSampler(
            num_items, int(table.shape[1]), alpha=args.kernel_alpha,
            refresh="manual", item_table=table, seed=seed)
        return Built(sampler, shared=False, chunk_rows=256,
                     alpha=args.kernel_alpha, leaf_size=sampler.leaf_size,
                     draws="K per row, exact tree draws")

    specs[f"kernel-{args.kernel_alpha:g}"] = (
        _needs("KernelSampler") or {"build": kernel})
    if args.samplers:
        specs = {name: spec for name, spec in specs.items()
                 if name in args.samplers}
    return specs


# ---------------------------------------------------------------------------
# Gradients.

def full_gradient(hidden, table, targets):
    with tf.GradientTape() as tape:
        tape.watch([hidden, table])
        loss = tf.reduce_mean(full_softmax_cross_entropy(hidden, table,
                                                         targets))
    d_hidden, d_table = tape.gradient(loss, [hidden, table])
    return float(loss), d_hidden.numpy(), tf.convert_to_tensor(d_table).numpy()


def make_step(loss_fn):
    """tf.function (H, W, y) -> (sum of row losses, d sum / dH, d sum / dW)."""

    @tf.function
    def step(hidden, table, targets):
        with tf.GradientTape() as tape:
            tape.watch([hidden, table])
            loss = tf.reduce_sum(loss_fn(hidden, table, targets))
        d_hidden, d_table = tape.gradient(loss, [hidden, table])
        return loss, d_hidden, tf.convert_to_tensor(d_table)

    return step


def sampled_draw(step, hidden, table, targets, chunk_rows, reset=None):
    """One draw: (mean loss, dH, dW) of the mean-over-rows loss.

    Per-row samplers may go in row chunks (independent rows, so the same
    distribution) to bound the [rows, K, D] gather.
    """
    if reset is not None:
        reset()
    total = hidden.shape[0]
    if not chunk_rows or chunk_rows >= total:
        loss, d_hidden, d_table = step(hidden, table, targets)
        return (float(loss) / total, d_hidden.numpy() / total,
                d_table.numpy() / total)
    loss, d_hidden, d_table = 0.0, [], 0.0
    for start in range(0, total, chunk_rows):
        part = slice(start, start + chunk_rows)
        l, dh, dw = step(hidden[part], table, targets[part])
        loss += float(l)
        d_hidden.append(dh.numpy())
        d_table = d_table + dw.numpy()
    return (loss / total, np.concatenate(d_hidden) / total, d_table / total)


def cosine(a, b):
    a, b = np.ravel(a).astype(np.float64), np.ravel(b).astype(np.float64)
    denominator = np.linalg.norm(a) * np.linalg.norm(b)
    return float(a @ b / denominator) if denominator > 0 else float("nan")


def measure(draw, repeats, full):
    """Figures of `repeats` draws against the full (loss, dH, dW)."""
    full_loss, full_h, full_w = full
    full_g = np.concatenate([full_h.ravel(), full_w.ravel()])
    losses, single, single_h, single_w = [], [], [], []
    sum_h, sum_w, sum_squares = 0.0, 0.0, 0.0
    for i in range(repeats):
        if i == 1:  # the first draw traces the tf.function: not timed
            start = time.perf_counter()
        loss, d_h, d_w = draw()
        losses.append(loss)
        single.append(cosine(np.concatenate([d_h.ravel(), d_w.ravel()]),
                             full_g))
        single_h.append(cosine(d_h, full_h))
        single_w.append(cosine(d_w, full_w))
        sum_h, sum_w = sum_h + d_h.astype(np.float64), sum_w + d_w
        sum_squares += (np.sum(np.square(d_h, dtype=np.float64))
                        + np.sum(np.square(d_w, dtype=np.float64)))
    seconds = ((time.perf_counter() - start) / (repeats - 1)
               if repeats > 1 else float("nan"))
    mean_h, mean_w = sum_h / repeats, sum_w / repeats
    mean_loss = float(np.mean(losses))
    mean_g = np.concatenate([mean_h.ravel(), mean_w.ravel()])
    # cos(E[g_r], g) without the variance / R left in the mean of R draws:
    # |E g_r|^2 ~ |mean|^2 - tr(Cov) / R, tr(Cov) from the sample variance.
    squared_mean = float(mean_g @ mean_g)
    expected_cos = float("nan")
    if repeats > 1:
        trace = (sum_squares - repeats * squared_mean) / (repeats - 1)
        squared_expected = squared_mean - trace / repeats
        if squared_expected > 0:
            expected_cos = float(mean_g @ full_g / np.sqrt(
                squared_expected * (full_g @ full_g)))
    return {
        "grad_cosine_mean": cosine(np.concatenate([mean_h.ravel(),
                                                   mean_w.ravel()]), full_g),
        "grad_cosine_single": float(np.mean(single)),
        "grad_cosine_expected_est": expected_cos,
        "loss_rel_error": (mean_loss - full_loss) / full_loss,
        "grad_cosine_mean_H": cosine(mean_h, full_h),
        "grad_cosine_single_H": float(np.mean(single_h)),
        "grad_cosine_mean_W": cosine(mean_w, full_w),
        "grad_cosine_single_W": float(np.mean(single_w)),
        "loss_full": full_loss,
        "loss_sampled_mean": mean_loss,
        "loss_sampled_std": float(np.std(losses)),
        "seconds_per_draw": seconds,
    }


def tf_sampled_softmax(num_items, k, unique, seed):
    """Per-row loss fn of tf.nn.sampled_softmax_loss (log-uniform)."""
    biases = tf.zeros([num_items], tf.float32)

    def loss_fn(hidden, table, targets):
        labels = targets[:, tf.newaxis]
        sampled = tf.random.log_uniform_candidate_sampler(
            true_classes=labels, num_true=1, num_sampled=k, unique=unique,
            range_max=num_items, seed=seed)
        return tf.nn.sampled_softmax_loss(
            weights=table, biases=biases, labels=labels, inputs=hidden,
            num_sampled=k, num_classes=num_items, num_true=1,
            sampled_values=sampled, remove_accidental_hits=True)

    return loss_fn


# ---------------------------------------------------------------------------

def plot(records, path):
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    impls = list(dict.fromkeys(r["impl"] for r in records))
    fig, axes = plt.subplots(1, 4, figsize=(20, 5))
    colors = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    for i, impl in enumerate(impls):
        rows = sorted((r for r in records if r["impl"] == impl),
                      key=lambda r: r["config"]["K"])
        ks = [r["config"]["K"] for r in rows]
        style = dict(color=colors[i % len(colors)],
                     marker="o" if impl.startswith("tfrec_fast.") else "s",
                     linestyle="-" if impl.startswith("tfrec_fast.") else ":")
        label = impl.replace("tfrec_fast.SampledSoftmax/", "")
        axes[0].plot(ks, [r["grad_cosine_mean"] for r in rows], label=label,
                     **style)
        axes[1].plot(ks, [r["grad_cosine_expected_est"] for r in rows],
                     label=label, **style)
        axes[2].plot(ks, [r["grad_cosine_single"] for r in rows],
                     label=label, **style)
        axes[3].plot(ks, [r["loss_rel_error"] for r in rows], label=label,
                     **style)
    cfg = records[0]["config"]
    titles = [f"cos(mean of {cfg['repeats']} sampled grads, full grad)",
              "cos(E[sampled grad], full grad), variance removed (est.)",
              "mean cos(single-draw grad, full grad)",
              "(mean sampled loss - full loss) / full loss"]
    for ax, title in zip(axes, titles):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("K (negatives)")
        ax.set_title(title, fontsize=9)
        ax.grid(alpha=0.3)
    axes[3].axhline(0.0, color="black", linewidth=0.8)
    axes[3].set_yscale("symlog", linthresh=1e-3)
    axes[0].legend(fontsize=7)
    fig.suptitle(f"sampled softmax vs full softmax on a trained SASRec "
                 f"(ML-100k): T={cfg['T']}, C={cfg['C']}, D={cfg['D']}, "
                 f"{cfg['repeats']} draws", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main():
    args = parse_args()
    begin = time.perf_counter()
    hidden, targets, table, counts, all_targets = fixed_state(args)
    num_items, dim = table.shape
    full = full_gradient(hidden, table, targets)
    print(f"full softmax loss {full[0]:.4f}", flush=True)
    base_config = {"T": int(hidden.shape[0]), "C": int(num_items),
                   "D": int(dim), "repeats": args.repeats,
                   "model": f"SASRec ML-100k, full CE, "
                            f"{args.train_epochs} epochs, seed {args.seed}"}
    reduction = tf_keras.losses.Reduction.NONE
    records = []
    specs = sampler_specs(args, num_items, counts, all_targets, table)
    for name, spec in specs.items():
        if isinstance(spec, str):
            print(f"skipping {name}: {spec}", flush=True)
            continue
        for k in spec.get("ks") or args.ks:
            try:
                built = spec["build"](k)
                num = k if built.num_negatives == "K" else \
                    built.num_negatives
                loss = SampledSoftmax(built.sampler, num,
                                      shared=built.shared,
                                      correct_positive=built.correct_positive,
                                      reduction=reduction)
                step = make_step(loss)
                figures = measure(
                    lambda: sampled_draw(step, hidden, table, targets,
                                         built.chunk_rows, built.reset),
                    args.repeats, full)
            except Exception as error:  # pylint: disable=broad-except
                lines = [l for l in str(error).splitlines() if l.strip()]
                print(f"skipping {name} K={k}: {type(error).__name__}: "
                      f"{lines[-1].strip()[:300] if lines else ''}",
                      flush=True)
                continue
            config = dict(base_config, sampler=name, K=k,
                          shared=built.shared,
                          correct_positive=built.correct_positive,
                          remove_accidental_hits=True, **built.notes)
            records.append({"impl": f"tfrec_fast.SampledSoftmax/{name}",
                            "config": config, **figures})
            print(f"{name:26s} K={k:5d} "
                  f"cos_mean={figures['grad_cosine_mean']:.4f} "
                  f"cos_E_est={figures['grad_cosine_expected_est']:.4f} "
                  f"cos_single={figures['grad_cosine_single']:.4f} "
                  f"loss_rel_err={figures['loss_rel_error']:+.4f} "
                  f"({figures['seconds_per_draw']:.3f} s/draw)", flush=True)
    for unique in ((True, False) if not args.samplers
                   or "tf" in args.samplers else ()):
        name = "log-uniform-unique" if unique else "log-uniform"
        for k in args.ks:
            step = make_step(tf_sampled_softmax(num_items, k, unique,
                                                args.seed))
            figures = measure(
                lambda: sampled_draw(step, hidden, table, targets, None),
                args.repeats, full)
            config = dict(
                base_config, sampler=name, K=k, shared=True,
                correct_positive=True, remove_accidental_hits=True,
                sampled_values=(
                    f"tf.random.log_uniform_candidate_sampler(unique="
                    f"{unique}, range_max=C)"
                    + (" (TF's default)" if unique else "")))
            records.append({"impl": f"tf.nn.sampled_softmax_loss/{name}",
                            "config": config, **figures})
            print(f"tf/{name:23s} K={k:5d} "
                  f"cos_mean={figures['grad_cosine_mean']:.4f} "
                  f"cos_E_est={figures['grad_cosine_expected_est']:.4f} "
                  f"cos_single={figures['grad_cosine_single']:.4f} "
                  f"loss_rel_err={figures['loss_rel_error']:+.4f}",
                  flush=True)
    print(f"total {time.perf_counter() - begin:.0f} s, peak RSS "
          f"{_common.peak_rss_mb():.0f} MB", flush=True)
    _common.write(records, args)
    if args.png:
        plot(records, args.png)


if __name__ == "__main__":
    main()
