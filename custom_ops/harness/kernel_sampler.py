"""Standalone check + benchmark harness of the kernel sampler's CUDA draws.

No TensorFlow. Drives custom_ops/kernels/kernel_sampler.cu.cc (K exact draws
per query row from the quadratic-kernel proposal q_i(h) = (alpha (h . w_i)^2
+ 1) / sum_j (alpha (h . w_j)^2 + 1), by descending the tree of packed
outer-product sums that tfrec_fast/ops/kernel_sampler.py builds) through
the C ABI of libtfrec_fast_kernels.so (custom_ops/harness/build.sh,
kernel_sampler_capi.cc) with ctypes, on PyTorch CUDA tensors:

    custom_ops/harness/build.sh
    python custom_ops/harness/kernel_sampler.py --check-only
    python custom_ops/harness/kernel_sampler.py --out results/  # + bench
    python custom_ops/harness/kernel_sampler.py --emulated      # no GPU
    python custom_ops/harness/kernel_sampler.py --emulated-torch  # no GPU

The tree is built here (NumPy, or PyTorch on the GPU) exactly as
tfrec_fast/ops/kernel_sampler.py builds it: leaves of L consecutive items
sum their outer products in float64 (rounded once to float32), internal
nodes are the float32 sum of their two children, heap order, packed upper
triangles zero-padded to a multiple of 16 floats.

Checks per case (random; D = 13 / 27 / 100 / 200 with vector tails; leaf
size 1; one leaf; a non-power-of-two number of leaves; K = 1; a zero
query; large and tiny alpha):
  (a) log_q against the brute force log q_i(h) = log K(h, w_i) - log sum_j
      K(h, w_j) of the drawn ids in float64 (error max |x - ref| /
      max(1, max |ref|) <= 1e-4);
  (b) goodness of fit: Pearson's statistic of the draw counts (items
      binned by q into 40 bins per row) against K q, summed over rows,
      below the Wilson-Hilferty chi-square quantile at z = 5 (a correct
      sampler fails with probability < 1e-6; the seeds are fixed);
  (c) ids equal this file's NumPy port of the CPU kernel's descent
      (kernel_sampler.cc: the same counter-based uniforms per (row, draw,
      level), the same float32 sums in the same order, `--lanes` /
      `--unfused` naming the CPU copy mirrored) on the first rows, and
      log_q agrees with it;
  plus: every output written, ids in range, bitwise determinism.

Benchmark (GPU): draws per second of the tree kernel against
torch.multinomial on the brute-force kernel probabilities (h @ W^T, alpha
s^2 + 1, in row chunks that fit), n = 100k and 1M items, D = 32 and 64;
the tree build time (PyTorch) is recorded apart. Writes
kernel_sampler_<device>.json and .png into --out.

--emulated (no GPU, no PyTorch): compiles kernel_sampler.cu.cc itself
with g++ against emulation/cuda_emulation.h (thread blocks as fibers,
barriers, warp shuffles, shared memory that starts as NaN) into
libtfrec_fast_kernel_sampler_emulated.so and runs the checks on NumPy
arrays, under the three thread schedules of the emulation.

--emulated-torch (no GPU, PyTorch CPU): this file's GPU driver code
(TorchKernels, the PyTorch tree build and references, the benchmark code
and plot) on CPU tensors and the emulated library: a self-test.
"""

import argparse
import collections
import ctypes
import json
import math
import os
import re
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # also when loaded by path (tests/)
    sys.path.insert(0, HERE)
# pylint: disable=wrong-import-position
import harness_common  # noqa: E402
from harness_common import (  # noqa: E402
    DEFAULT_LIBRARY, DEFAULT_OUT_DIR, ROOT, CApiLibrary, EmulationControls,
    cuda_torch, emit, emit_summary, normalized_error, stream_handle,
    time_cuda)
# pylint: enable=wrong-import-position

EMULATED_LIBRARY = os.path.join(HERE, "build",
                                "libtfrec_fast_kernel_sampler_emulated.so")
PACK_ALIGN = 16
LEVELS_PER_DRAW = 64
STREAM_SALT = 0x6B65726E656C  # kernel_sampler.cc's kStreamSalt ("kernel")
LOG_Q_TOLERANCE = 1e-4

# ---------------------------------------------------------------------------
# Tree layout and build (NumPy), as tfrec_fast/ops/kernel_sampler.py.

Layout = collections.namedtuple(
    "Layout", ["num_items", "dim", "leaf_size", "num_leaves", "num_rows",
               "stride", "packed"])


def tree_layout(num_items, dim, leaf_size):
    num_leaves = -(-int(num_items) // int(leaf_size))
    packed = dim * (dim + 1) // 2
    stride = -(-packed // PACK_ALIGN) * PACK_ALIGN
    return Layout(int(num_items), int(dim), int(leaf_size), num_leaves,
                  2 * num_leaves, stride, packed)


def tree_counts(layout):
    """int64 [num_rows]: items under each node (row 0: 0)."""
    counts = np.zeros(layout.num_rows, np.int64)
    leaves = np.arange(layout.num_leaves)
    counts[layout.num_leaves:] = np.minimum(
        layout.leaf_size, layout.num_items - leaves * layout.leaf_size)
    for node in range(layout.num_leaves - 1, 0, -1):
        counts[node] = counts[2 * node] + counts[2 * node + 1]
    return counts


def _sum_levels(tree, layout, arange=np.arange):
    """Internal nodes, deepest level first, as float32 sums of children
    (`arange` makes the node index arrays: NumPy's or a torch one)."""
    max_depth = (layout.num_rows - 1).bit_length() - 1
    for depth in range(max_depth, -1, -1):
        lo, hi = 2 ** depth, min(2 ** (depth + 1), layout.num_leaves)
        if hi > lo:
            nodes = arange(lo, hi)
            tree[nodes] = tree[2 * nodes] + tree[2 * nodes + 1]
    return tree


def build_tree_np(table, leaf_size, chunk_leaves=2048):
    """float32 [2 num_leaves, S] of table [C, D] (NumPy)."""
    table = np.asarray(table, np.float32)
    layout = tree_layout(table.shape[0], table.shape[1], leaf_size)
    c, d, el = layout.num_items, layout.dim, layout.leaf_size
    rows, cols = np.triu_indices(d)
    tree = np.zeros((layout.num_rows, layout.stride), np.float32)
    padded = np.zeros((layout.num_leaves * el, d), np.float64)
    padded[:c] = table
    padded = padded.reshape(layout.num_leaves, el, d)
    for b in range(0, layout.num_leaves, chunk_leaves):
        x = padded[b:b + chunk_leaves]
        sums = np.einsum("lad,lae->lde", x, x)
        tree[layout.num_leaves + b:layout.num_leaves + b + len(x),
             :layout.packed] = sums[:, rows, cols].astype(np.float32)
    return _sum_levels(tree, layout)


def build_tree_torch(torch, table, leaf_size, chunk_leaves=1024):
    """The same tree from a float32 [C, D] tensor, on its device."""
    c, d = table.shape
    layout = tree_layout(c, d, leaf_size)
    el = layout.leaf_size
    rows, cols = np.triu_indices(d)
    index = torch.as_tensor(rows * d + cols, device=table.device)
    tree = torch.zeros((layout.num_rows, layout.stride), dtype=torch.float32,
                       device=table.device)
    padded = torch.zeros((layout.num_leaves * el, d), dtype=torch.float64,
                         device=table.device)
    padded[:c] = table.double()
    padded = padded.view(layout.num_leaves, el, d)
    for b in range(0, layout.num_leaves, chunk_leaves):
        x = padded[b:b + chunk_leaves]
        sums = torch.einsum("lad,lae->lde", x, x).reshape(len(x), d * d)
        tree[layout.num_leaves + b:layout.num_leaves + b + len(x),
             :layout.packed] = sums[:, index].float()
    return _sum_levels(tree, layout, lambda lo, hi: torch.arange(
        lo, hi, device=table.device))


# ---------------------------------------------------------------------------
# Brute force (float64): the oracle.

def brute_log_q_np(query, table, alpha):
    """float64 [T, C]: log q_i(h_t)."""
    s = np.asarray(query, np.float64) @ np.asarray(table, np.float64).T
    logits = np.log1p(float(np.float32(alpha)) * s * s)
    top = logits.max(axis=1, keepdims=True)
    return logits - (top + np.log(np.exp(logits - top).sum(axis=1,
                                                             keepdims=True)))


def brute_log_q_torch(torch, query, table, alpha):
    s = query.double() @ table.double().T
    logits = torch.log1p(float(np.float32(alpha)) * s * s)
    return logits - torch.logsumexp(logits, dim=1, keepdim=True)


# ---------------------------------------------------------------------------
# The random stream (counter_rng.h with the sampler's salt), ported twice:
# Python ints (the spec) and NumPy uint64 (vectorised).

_M64 = (1 << 64) - 1
_GOLDEN = 0x9E3779B97F4A7C15


def mix64_int(z):
    z &= _M64
    z ^= z >> 30
    z = (z * 0xBF58476D1CE4E5B9) & _M64
    z ^= z >> 27
    z = (z * 0x94D049BB133111EB) & _M64
    return z ^ (z >> 31)


def uniform_int(seed, row, draw, level):
    call_key = mix64_int(mix64_int(seed & _M64) ^ STREAM_SALT)
    row_key = mix64_int(call_key ^ (row & _M64))
    counter = draw * LEVELS_PER_DRAW + level
    bits = mix64_int(row_key + (counter + 1) * _GOLDEN)
    return (bits >> 11) * 2.0 ** -53


def _mix64_np(z):
    z = z ^ (z >> np.uint64(30))
    z = z * np.uint64(0xBF58476D1CE4E5B9)
    z = z ^ (z >> np.uint64(27))
    z = z * np.uint64(0x94D049BB133111EB)
    return z ^ (z >> np.uint64(31))


def uniforms_np(seed, row, draws, level):
    """float64 uniforms of draws `draws` (int array) of row `row` at tree
    level `level` (kernel_sampler.cc Uniform)."""
    with np.errstate(over="ignore"):
        call_key = _mix64_np(_mix64_np(np.uint64(seed & _M64)) ^
                             np.uint64(STREAM_SALT))
        row_key = _mix64_np(call_key ^ np.uint64(row & _M64))
        counter = np.asarray(draws, np.uint64) * np.uint64(LEVELS_PER_DRAW) \
            + np.uint64(level) + np.uint64(1)
        bits = _mix64_np(row_key + counter * np.uint64(_GOLDEN))
    return (bits >> np.uint64(11)).astype(np.float64) * 2.0 ** -53


# ---------------------------------------------------------------------------
# NumPy port of the CPU kernel's descent (kernel_sampler.cc DrawRowsImpl),
# float32 sums in its order for the CPU copy of width W (fused: products
# fused into the sums, computed as float64 a * b + c rounded once to
# float32, which is the FMA except for double rounding, ~2^-29 of the time).

def _muladd(a, b, acc, fused):
    if fused:
        return (a.astype(np.float64) * b.astype(np.float64) +
                acc.astype(np.float64)).astype(np.float32)
    return (acc + a * b).astype(np.float32)


def packed_dots_np(rows, m, lanes, fused):
    """float32 [R]: <rows[r], m> as DotPacked<W> sums them."""
    w = lanes
    chains = 4 * w
    rows = np.asarray(rows, np.float32)
    s = rows.shape[1]
    nb = s // chains
    acc = np.zeros((rows.shape[0], chains), np.float32)
    for b in range(nb):
        sl = slice(b * chains, (b + 1) * chains)
        acc = _muladd(rows[:, sl], m[sl], acc, fused)
    for p in range(nb * chains, s, w):
        acc[:, :w] = _muladd(rows[:, p:p + w], m[p:p + w], acc[:, :w], fused)
    v = (acc[:, :w] + acc[:, w:2 * w]) + (acc[:, 2 * w:3 * w] +
                                          acc[:, 3 * w:])
    out = np.zeros(rows.shape[0], np.float32)
    for lane in range(w):
        out = out + v[:, lane]
    return out


def leaf_dots_np(x, h, lanes, fused):
    """float32 [R]: x[r] . h as DotAny<W> sums them (GCC 12 -O3 epilogue:
    the first W/2 tail products of the FMA copies rounded, then added)."""
    w = lanes
    x = np.asarray(x, np.float32)
    d = x.shape[1]
    acc = np.zeros((x.shape[0], 2 * w), np.float32)
    i = 0
    while i + 2 * w <= d:
        acc = _muladd(x[:, i:i + 2 * w], h[i:i + 2 * w], acc, fused)
        i += 2 * w
    if i + w <= d:
        acc[:, :w] = _muladd(x[:, i:i + w], h[i:i + w], acc[:, :w], fused)
        i += w
    s = np.zeros(x.shape[0], np.float32)
    for lane in range(w):
        s = s + (acc[:, lane] + acc[:, w + lane])
    if fused and w >= 8 and d - i >= w // 2:
        for lane in range(w // 2):
            s = s + x[:, i + lane] * h[i + lane]
        i += w // 2
    while i < d:
        s = _muladd(x[:, i], h[i], s, fused)
        i += 1
    return s


def pack_query_np(h, alpha, stride):
    """M' = alpha packed(h h^T), off-diagonal doubled, float32 [S]."""
    d = len(h)
    hd = np.asarray(h, np.float32).astype(np.float64)
    a = float(np.float32(alpha))
    m = np.zeros(stride, np.float32)
    p = 0
    for i in range(d):
        hi = hd[i] * a
        m[p] = np.float32(hi * hd[i])
        m[p + 1:p + d - i] = ((2.0 * hi) * hd[i + 1:]).astype(np.float32)
        p += d - i
    return m


def _node_scores(z, counts):
    z = z.astype(np.float64)
    return np.where(z > 0.0, z, 0.0) + counts.astype(np.float64)


def draw_rows_np(query, tree, counts, snapshot, leaf_size, num_draws, alpha,
                 seed, rows, lanes=16, fused=True):
    """(ids int64 [len(rows), K], log_q float32) of the rows `rows` by the
    CPU kernel's descent, one level at a time over the row's draws."""
    snapshot = np.asarray(snapshot, np.float32)
    layout = tree_layout(snapshot.shape[0], snapshot.shape[1], leaf_size)
    alpha_d = float(np.float32(alpha))
    out_ids = np.full((len(rows), num_draws), -1, np.int64)
    out_lq = np.full((len(rows), num_draws), np.nan, np.float32)
    for r, t in enumerate(rows):
        h = np.asarray(query[t], np.float32)
        m = pack_query_np(h, alpha, layout.stride)
        log_root = math.log(_node_scores(
            packed_dots_np(tree[1:2], m, lanes, fused), counts[1:2])[0])
        node = np.ones(num_draws, np.int64)
        active = np.arange(num_draws)
        level = 0
        while active.size:
            u = uniforms_np(seed, t, active, level)
            at = node[active]
            leaf = at >= layout.num_leaves
            for lf in np.unique(at[leaf]):
                first = (lf - layout.num_leaves) * layout.leaf_size
                n = min(layout.leaf_size, layout.num_items - first)
                dots = leaf_dots_np(snapshot[first:first + n], h, lanes,
                                    fused).astype(np.float64)
                ad = alpha_d * dots
                kern = ad * dots + 1.0  # (the FMA copies fuse: 1 ulp)
                cum = np.cumsum(kern)  # sequential, as the CPU's loop
                sel = at == lf
                i = np.searchsorted(cum, u[sel] * cum[-1], side="right")
                i = np.minimum(i, n - 1)
                out_ids[r, active[sel]] = first + i
                out_lq[r, active[sel]] = (np.log(kern[i]) -
                                          log_root).astype(np.float32)
            inner = ~leaf
            if not inner.any():
                break
            nodes, inverse = np.unique(at[inner], return_inverse=True)
            left = 2 * nodes
            s_left = _node_scores(packed_dots_np(tree[left], m, lanes, fused),
                                  counts[left])
            s_total = s_left + _node_scores(
                packed_dots_np(tree[left + 1], m, lanes, fused),
                counts[left + 1])
            go_left = u[inner] * s_total[inverse] < s_left[inverse]
            moving = active[inner]
            node[moving] = 2 * at[inner] + np.where(go_left, 0, 1)
            active = moving
            level += 1
    return out_ids, out_lq


# ---------------------------------------------------------------------------
# The kernel library's C ABI (real or emulated)

_c_int = ctypes.c_int
_c_i64 = ctypes.c_int64
_c_ptr = ctypes.c_void_p
_c_f32 = ctypes.c_float


class KernelLibrary(CApiLibrary):
    """libtfrec_fast_kernels.so (or the emulated build) via
    kernel_sampler_capi.cc."""

    def __init__(self, path=DEFAULT_LIBRARY):
        super().__init__(path, "tfrec_ks_")
        lib = self.lib
        lib.tfrec_ks_workspace_bytes.restype = _c_int
        lib.tfrec_ks_workspace_bytes.argtypes = [_c_ptr, _c_f32,
                                                 ctypes.POINTER(_c_i64)]
        lib.tfrec_ks_draw.restype = _c_int
        lib.tfrec_ks_draw.argtypes = [_c_ptr, _c_f32] + [_c_ptr] * 7 + [
            _c_i64, _c_ptr]
        lib.tfrec_ks_first_non_finite.restype = _c_int
        lib.tfrec_ks_first_non_finite.argtypes = [_c_ptr, _c_i64, _c_ptr,
                                                  _c_ptr]
        lib.tfrec_ks_uniforms.restype = None
        lib.tfrec_ks_uniforms.argtypes = [_c_i64] * 5 + [_c_ptr]

    def workspace_bytes(self, dims, alpha):
        out = _c_i64(0)
        self.check(self.lib.tfrec_ks_workspace_bytes(
            dims.ctypes.data, float(alpha), ctypes.byref(out)), "workspace")
        return out.value

    def uniforms(self, seed, row_begin, rows, draws, levels):
        """The C++ stream on the host: [rows, draws, levels] float64."""
        out = np.zeros((rows, draws, levels), np.float64)
        self.lib.tfrec_ks_uniforms(_signed64(seed), row_begin, rows, draws,
                                   levels, out.ctypes.data)
        return out


def _signed64(x):
    x &= _M64
    return x - (1 << 64) if x >= 1 << 63 else x


def sampler_dims(rows, items, dim, leaf_size, draws, seed, lanes, fused,
                 device=-1):
    return np.array([rows, items, dim, leaf_size, draws, _signed64(seed),
                     lanes, int(fused), device], np.int64)


def emulated_sources():
    kernels = os.path.join(ROOT, "custom_ops", "kernels")
    return [os.path.join(HERE, "emulation", "kernel_sampler_emulated.cc"),
            os.path.join(HERE, "kernel_sampler_capi.cc"),
            os.path.join(kernels, "kernel_sampler.cu.cc"),
            os.path.join(kernels, "kernel_sampler_gpu.h"),
            os.path.join(kernels, "kernel_sampler.h"),
            os.path.join(kernels, "counter_rng.h")]


def build_emulated_library(path=EMULATED_LIBRARY, cxx=None):
    """g++ build of the emulated kernels (if missing or older than sources)."""
    return harness_common.build_emulated_library(path, emulated_sources(),
                                                 cxx)


class NumpyKernels(EmulationControls):
    """The C ABI on host arrays: for the emulated library only. Every
    block's shared memory starts as NaNs, the workspace too."""

    def __init__(self, library):
        super().__init__(library)
        self.set_shared_fill(0xFF)

    def draw(self, query, tree, counts, snapshot, leaf_size, num_draws,
             alpha, seed, lanes=16, fused=True):
        query = np.ascontiguousarray(query, np.float32)
        snapshot = np.ascontiguousarray(snapshot, np.float32)
        tree = np.ascontiguousarray(tree, np.float32)
        counts = np.ascontiguousarray(counts, np.int64)
        t, d = query.shape
        dims = sampler_dims(t, snapshot.shape[0], d, leaf_size, num_draws,
                            seed, lanes, fused)
        nbytes = self.lib.workspace_bytes(dims, alpha)
        ws = np.full(max(nbytes, 16) // 4 + 1, np.nan, np.float32)
        ids = np.full((t, num_draws), -1, np.int64)
        log_q = np.full((t, num_draws), np.nan, np.float32)
        self.lib.check(self.lib.lib.tfrec_ks_draw(
            dims.ctypes.data, float(alpha), query.ctypes.data,
            tree.ctypes.data, counts.ctypes.data, snapshot.ctypes.data,
            ids.ctypes.data, log_q.ctypes.data, ws.ctypes.data, nbytes, None),
            "draw")
        return ids, log_q

    def first_non_finite(self, x):
        x = np.ascontiguousarray(x, np.float32).reshape(-1)
        slot = np.zeros(1, np.uint64)
        self.lib.check(self.lib.lib.tfrec_ks_first_non_finite(
            x.ctypes.data, x.size, slot.ctypes.data, None), "scan")
        return int(slot[0])


# ---------------------------------------------------------------------------
# Cases and checks (NumPy arrays; the GPU mode converts)

# name, C, D, L, K, T, alpha, item scale (x 1/sqrt(D)), query kind
Case = collections.namedtuple(
    "Case", ["name", "items", "dim", "leaf", "draws", "rows", "alpha",
             "scale", "query"])
CASES = [
    Case("random", 2000, 32, 64, 256, 6, 20.0, 1.0, "normal"),
    Case("non_pow2_leaves", 1000, 24, 6, 200, 5, 20.0, 1.0, "normal"),
    Case("d13_tails", 1500, 13, 7, 300, 4, 50.0, 1.0, "normal"),
    Case("d27_leaf5", 900, 27, 5, 150, 4, 20.0, 1.0, "normal"),
    Case("leaf_size_1", 37, 5, 1, 64, 3, 20.0, 1.0, "normal"),
    Case("one_leaf", 100, 33, 200, 80, 3, 20.0, 1.0, "normal"),
    Case("k1", 777, 20, 9, 1, 16, 20.0, 1.0, "normal"),
    Case("zero_query", 300, 16, 8, 100, 2, 20.0, 1.0, "zero"),
    Case("large_alpha", 1200, 16, 16, 200, 3, 1e4, 1.0, "normal"),
    Case("tiny_alpha", 1200, 16, 16, 200, 3, 1e-3, 1.0, "normal"),
    Case("d100", 3000, 100, 200, 128, 3, 20.0, 1.0, "normal"),
    Case("d200_m_in_optin_smem", 1000, 200, 256, 64, 2, 20.0, 1.0,
         "normal"),
    Case("d400_m_in_workspace", 300, 400, 64, 32, 2, 20.0, 1.0, "normal"),
]
QUICK_CASES = ("random", "non_pow2_leaves", "d13_tails", "leaf_size_1",
               "one_leaf", "k1", "zero_query")
# The goodness-of-fit run: few rows, many draws.
FIT_CASE = Case("fit", 3000, 16, 10, 20000, 4, 20.0, 1.0, "normal")
PORT_ROWS = 3  # rows compared with the NumPy port of the descent


def make_inputs(case, seed=0):
    rng = np.random.default_rng([seed, case.items, case.dim, case.leaf])
    scale = case.scale / math.sqrt(case.dim)
    table = (scale * rng.normal(size=(case.items, case.dim))).astype(
        np.float32)
    if case.query == "zero":
        query = np.zeros((case.rows, case.dim), np.float32)
    else:
        query = rng.normal(size=(case.rows, case.dim)).astype(np.float32)
    return {"table": table, "query": query,
            "seed": int(rng.integers(0, 2 ** 63)) - 2 ** 62}


def chi2_critical(dof, z=5.0):
    a = 2.0 / (9.0 * dof)
    return dof * (1.0 - a + z * math.sqrt(a)) ** 3


def binned_pearson(ids, log_q_ref, bins=40):
    """(statistic, dof): items binned by q (equal-count bins of the sorted
    probabilities) per row, Pearson's statistic summed over rows."""
    total, dof = 0.0, 0
    for row, lq in zip(ids, log_q_ref):
        p = np.exp(lq - lq.max())
        p /= p.sum()
        order = np.argsort(p)
        bin_of = np.empty(len(p), np.int64)
        bin_of[order] = np.arange(len(p)) * bins // len(p)
        observed = np.bincount(bin_of[row], minlength=bins)
        expected = len(row) * np.bincount(bin_of, weights=p, minlength=bins)
        keep = expected > 0
        total += float(np.sum((observed[keep] - expected[keep]) ** 2 /
                              expected[keep]))
        dof += int(keep.sum()) - 1
    return total, dof


def _record(records, check, ok, **extra):
    emit(dict({"check": check, "ok": bool(ok)}, **extra), records)
    return bool(ok)


def check_case(draw, case, records, prefix, lanes, fused, port=True,
               repeat=True):
    """Runs `draw(query, tree, counts, table, leaf, K, alpha, seed, lanes,
    fused)` -> (ids, log_q) NumPy arrays on one case and records (a), (c),
    the range / completeness and determinism checks."""
    inp = make_inputs(case)
    layout = tree_layout(case.items, case.dim, case.leaf)
    tree = build_tree_np(inp["table"], case.leaf)
    counts = tree_counts(layout)
    args = (inp["query"], tree, counts, inp["table"], case.leaf, case.draws,
            case.alpha, inp["seed"], lanes, fused)
    ids, log_q = draw(*args)
    name = f"{prefix}/{case.name}"
    in_range = bool(np.all((ids >= 0) & (ids < case.items)) and
                    np.all(np.isfinite(log_q)))
    ok = _record(records, name + "/written_in_range", in_range)
    if not in_range:
        return False
    ref = brute_log_q_np(inp["query"], inp["table"], case.alpha)
    err = normalized_error(log_q, np.take_along_axis(ref, ids, axis=1))
    ok &= _record(records, name + "/log_q", err <= LOG_Q_TOLERANCE,
                  error=err, tol=LOG_Q_TOLERANCE)
    if case.query == "zero":  # q uniform: log q = -log C exactly
        ok &= _record(records, name + "/uniform_when_h_is_0",
                      np.all(log_q == np.float32(-math.log(case.items))))
    if port:
        rows = list(range(min(PORT_ROWS, case.rows)))
        p_ids, p_lq = draw_rows_np(*args[:-2], rows, lanes, fused)
        same = float(np.mean(ids[rows] == p_ids))
        lq_err = float(np.max(np.abs(log_q[rows] - p_lq)))
        ok &= _record(records, name + "/ids_equal_numpy_port", same == 1.0,
                      fraction_equal=same, log_q_max_diff=lq_err)
    if repeat:
        ids2, log_q2 = draw(*args)
        ok &= _record(records, name + "/deterministic",
                      np.array_equal(ids, ids2) and
                      np.array_equal(log_q.view(np.int32),
                                     log_q2.view(np.int32)))
    return ok


def check_fit(draw, records, prefix, lanes, fused, case=FIT_CASE):
    """(b): goodness of fit of many draws."""
    inp = make_inputs(case, seed=1)
    layout = tree_layout(case.items, case.dim, case.leaf)
    tree = build_tree_np(inp["table"], case.leaf)
    ids, _ = draw(inp["query"], tree, tree_counts(layout), inp["table"],
                  case.leaf, case.draws, case.alpha, inp["seed"], lanes,
                  fused)
    ref = brute_log_q_np(inp["query"], inp["table"], case.alpha)
    stat, dof = binned_pearson(ids, ref)
    crit = chi2_critical(dof)
    # The test is not blind: probabilities off by +-10% (the more likely
    # half of each row's items up, the rest down) fail it.
    median = np.median(ref, axis=1, keepdims=True)
    wrong = ref + np.log1p(np.where(ref > median, 0.1, -0.1))
    wrong -= np.log(np.exp(wrong).sum(axis=1, keepdims=True))
    wrong_stat, _ = binned_pearson(ids, wrong)
    return _record(records, f"{prefix}/{case.name}/chi_square",
                   stat < crit < wrong_stat, statistic=stat, dof=dof,
                   critical=crit, statistic_vs_wrong_q=wrong_stat)


def rng_checks(records, library=None):
    """The NumPy stream port against the Python-int spec and the C++."""
    seeds = (0, 1, -5, 2 ** 63 - 1, -(2 ** 63))
    ok = True
    for seed in seeds:
        vec = np.stack([uniforms_np(seed, row, np.arange(5), lvl)
                        for row in (0, 3) for lvl in (0, 7)])
        ints = np.array([[uniform_int(seed, row, j, lvl) for j in range(5)]
                         for row in (0, 3) for lvl in (0, 7)])
        ok &= np.array_equal(vec, ints)
        if library is not None:
            cpp = library.uniforms(seed, 0, 4, 5, 8)
            ok &= np.array_equal(cpp[3, :, 7], uniforms_np(seed, 3,
                                                           np.arange(5), 7))
    return _record(records, "rng_port", ok, cpp=library is not None)


def emulated_checks(kernels, records, quick=False, only=None, lanes=16,
                    fused=True):
    def draw(*args):
        return kernels.draw(*args)

    ok = True
    cases = [c for c in CASES if (only is None and (not quick or c.name in
                                                     QUICK_CASES))
             or (only is not None and c.name in only)]
    schedules = ("round_robin", "lowest_first", "highest_first")
    for i, case in enumerate(cases):
        # Each case under one schedule (rotating), so that warps run ahead
        # of each other in both directions somewhere.
        kernels.set_schedule(schedules[i % 3])
        ok &= check_case(draw, case, records, "emulated", lanes, fused)
    kernels.set_schedule("round_robin")
    if only is None or "fit" in only:
        fit = FIT_CASE._replace(draws=10000) if quick else FIT_CASE
        ok &= check_fit(draw, records, "emulated", lanes, fused, fit)
    if only is None or "non_finite" in only:
        x = np.ones(1000, np.float32)
        x[[700, 300]] = [np.inf, np.nan]
        ok &= _record(records, "emulated/first_non_finite",
                      kernels.first_non_finite(x) == 300 and
                      kernels.first_non_finite(np.ones(5)) == 2 ** 64 - 1)
    return ok


def run_emulated(args):
    records = []
    t0 = time.time()
    path = build_emulated_library(args.emulated_lib)
    library = KernelLibrary(path)
    kernels = NumpyKernels(library)
    ok = rng_checks(records, library)
    ok &= emulated_checks(kernels, records, quick=args.quick,
                          only=args.cases, lanes=args.lanes,
                          fused=not args.unfused)
    emit_summary("emulated", ok, records, library=path,
                 seconds=round(time.time() - t0, 2))
    return 0 if ok else 1


# ---------------------------------------------------------------------------
# PyTorch: the kernels on CUDA tensors (or CPU tensors of the emulation)

def _device_index(t):
    return t.device.index if t.device.index is not None else -1


class TorchKernels:
    """Draws on PyTorch tensors (CUDA, or CPU with the emulated library)."""

    def __init__(self, library):
        import torch  # pylint: disable=import-outside-toplevel
        self.torch = torch
        self.lib = library

    def draw_tensors(self, query, tree, counts, table, leaf_size, num_draws,
                     alpha, seed, lanes=16, fused=True):
        torch = self.torch
        t, d = query.shape
        dims = sampler_dims(t, table.shape[0], d, leaf_size, num_draws, seed,
                            lanes, fused, _device_index(query))
        nbytes = self.lib.workspace_bytes(dims, alpha)
        ws = torch.empty(max(nbytes, 1), dtype=torch.uint8,
                         device=query.device)
        ids = torch.empty((t, num_draws), dtype=torch.int64,
                          device=query.device)
        log_q = torch.empty((t, num_draws), dtype=torch.float32,
                            device=query.device)
        self.lib.check(self.lib.lib.tfrec_ks_draw(
            dims.ctypes.data, float(alpha), query.data_ptr(), tree.data_ptr(),
            counts.data_ptr(), table.data_ptr(), ids.data_ptr(),
            log_q.data_ptr(), ws.data_ptr(), nbytes,
            stream_handle(torch, query.device)), "draw")
        return ids, log_q

    def first_non_finite(self, x):
        """First non-finite position of tensor x (all bits set: none)."""
        torch = self.torch
        slot = torch.zeros(1, dtype=torch.int64, device=x.device)
        self.lib.check(self.lib.lib.tfrec_ks_first_non_finite(
            x.data_ptr(), x.numel(), slot.data_ptr(),
            stream_handle(torch, x.device)), "scan")
        return int(slot.cpu().numpy().view(np.uint64)[0])

    def numpy_draw(self, device):
        """draw(...) on NumPy arrays through tensors on `device`."""
        torch = self.torch

        def draw(query, tree, counts, table, leaf, k, alpha, seed, lanes,
                 fused):
            ts = [torch.as_tensor(np.ascontiguousarray(x), device=device)
                  for x in (query, tree, counts, table)]
            ids, log_q = self.draw_tensors(*ts, leaf, k, alpha, seed, lanes,
                                           fused)
            return ids.cpu().numpy(), log_q.cpu().numpy()
        return draw


def torch_checks(kernels, device, records, quick=False, only=None, lanes=16,
                 fused=True):
    """The checks through TorchKernels, plus the PyTorch tree build and
    brute force against the NumPy ones."""
    torch = kernels.torch
    draw = kernels.numpy_draw(device)
    ok = True
    cases = [c for c in CASES if (only is None and (not quick or c.name in
                                                     QUICK_CASES))
             or (only is not None and c.name in only)]
    for case in cases:
        ok &= check_case(draw, case, records, "gpu", lanes, fused)
    if only is None or "fit" in only:
        fit = FIT_CASE._replace(draws=10000) if quick else FIT_CASE
        ok &= check_fit(draw, records, "gpu", lanes, fused, fit)
    if only is None or "non_finite" in only:
        x = torch.ones(100_000, device=device)
        x[[70_000, 30_001]] = torch.tensor([math.inf, math.nan],
                                           device=device)
        ok &= _record(records, "gpu/first_non_finite",
                      kernels.first_non_finite(x) == 30_001 and
                      kernels.first_non_finite(x[:5]) == 2 ** 64 - 1)
    # The PyTorch tree and brute force (used by the benchmark) = NumPy's.
    case = CASES[1]
    inp = make_inputs(case)
    table = torch.as_tensor(inp["table"], device=device)
    tree_t = build_tree_torch(torch, table, case.leaf).cpu().numpy()
    same_tree = np.array_equal(tree_t, build_tree_np(inp["table"],
                                                     case.leaf))
    lq = brute_log_q_torch(torch, torch.as_tensor(inp["query"],
                                                  device=device),
                           table, case.alpha).cpu().numpy()
    err = float(np.max(np.abs(lq - brute_log_q_np(inp["query"], inp["table"],
                                                   case.alpha))))
    # float64 leaf sums may round differently by summation order (einsum):
    # a float32 ulp at most.
    close = np.allclose(tree_t, build_tree_np(inp["table"], case.leaf),
                        rtol=1e-6, atol=1e-6)
    ok &= _record(records, "torch/tree_and_brute_force", close and err < 1e-9,
                  tree_bitwise_equal=same_tree, brute_force_max_diff=err)
    return ok


# ---------------------------------------------------------------------------
# Benchmark

def run_benchmarks(kernels, device, args):
    """Draws per second, ours vs torch.multinomial on brute-force
    probabilities; on a CPU device (--emulated-torch) the same code runs
    once per configuration, untimed, as a self-test."""
    torch = kernels.torch
    on_gpu = device.type == "cuda"
    name = (torch.cuda.get_device_name(device) if on_gpu
            else "cpu (emulated kernels)")
    records = []

    def measure(fn):
        if not on_gpu:
            t0 = time.perf_counter()
            fn()
            return time.perf_counter() - t0
        return time_cuda(torch, fn, args.warmup, args.repeats)

    for c in args.catalogs:
        for d in args.dims:
            leaf = args.leaf_size or int(min(256, max(32, 2 * d)))
            t, k = args.rows, args.draws
            gen = torch.Generator(device=device).manual_seed(0)
            table = torch.randn(c, d, generator=gen, device=device) / \
                math.sqrt(d)
            query = torch.randn(t, d, generator=gen, device=device)
            config = {"items": c, "dim": d, "leaf_size": leaf, "rows": t,
                      "draws": k, "alpha": args.alpha}
            try:
                t0 = time.perf_counter()
                tree = build_tree_torch(torch, table, leaf)
                if on_gpu:
                    torch.cuda.synchronize()
                build_s = time.perf_counter() - t0
                counts = torch.as_tensor(
                    tree_counts(tree_layout(c, d, leaf)), device=device)
            except (RuntimeError, MemoryError) as e:
                emit({"impl": "tree_build", "config": config,
                      "error": str(e)[:300], "device": name}, records)
                continue
            emit({"impl": "tree_build_torch", "config": config,
                  "step_s": build_s, "device": name}, records)

            def ours():
                kernels.draw_tensors(query, tree, counts, table, leaf, k,
                                     args.alpha, 12345, args.lanes,
                                     not args.unfused)

            # Rows per chunk so that [rows, C] float32 scores stay < 1 GiB.
            chunk = max(1, min(t, (1 << 28) // c))

            def brute():
                for r in range(0, t, chunk):
                    s = query[r:r + chunk] @ table.T
                    p = args.alpha * s * s + 1.0
                    torch.multinomial(p, k, replacement=True, generator=gen)

            for impl, fn in (("tfrec_fast_tree_gpu", ours),
                             ("torch_multinomial_bruteforce", brute)):
                try:
                    step = measure(fn)
                except (RuntimeError, MemoryError) as e:
                    if on_gpu:
                        torch.cuda.empty_cache()
                    emit({"impl": impl, "config": config,
                          "error": str(e)[:300], "device": name}, records)
                    continue
                emit({"impl": impl, "config": config, "step_s": step,
                      "draws_per_s": t * k / step, "device": name}, records)
            del tree, counts, table, query
            if on_gpu:
                torch.cuda.empty_cache()
    return records


def plot(records, path):
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    timed = [r for r in records if r.get("impl") in (
        "tfrec_fast_tree_gpu", "torch_multinomial_bruteforce")]
    if not timed:
        return
    keys = sorted({(r["config"]["items"], r["config"]["dim"])
                   for r in timed})
    impls = ["tfrec_fast_tree_gpu", "torch_multinomial_bruteforce"]
    fig, ax = plt.subplots(figsize=(max(8, 1.8 * len(keys)), 5))
    width = 0.8 / len(impls)
    for i, impl in enumerate(impls):
        xs, vals, failed = [], [], []
        for x, key in enumerate(keys):
            rec = [r for r in timed if r["impl"] == impl and
                   (r["config"]["items"], r["config"]["dim"]) == key]
            if not rec:
                continue
            if "error" in rec[0]:
                failed.append(x + i * width)
                continue
            xs.append(x + i * width)
            vals.append(rec[0]["draws_per_s"])
        ax.bar(xs, vals, width, label=impl, color=f"C{i}")
        ax.plot(failed, [0.03] * len(failed), "x", color=f"C{i}",
                markersize=9, transform=ax.get_xaxis_transform())
    if any(v > 0 for line in ax.containers for v in line.datavalues):
        ax.set_yscale("log")
    ax.set_xticks([x + 0.4 - width / 2 for x in range(len(keys))])
    ax.set_xticklabels([f"n={k[0]:,}\nD={k[1]}" for k in keys], fontsize=8)
    ax.set_ylabel("draws per second (median)")
    ax.legend(fontsize=8)
    c = timed[0]["config"]
    fig.suptitle(f"kernel sampler draws, {timed[0]['device']}, "
                 f"T={c['rows']} queries x K={c['draws']}, "
                 f"alpha={c['alpha']} (x: error)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def _slug(name):
    return re.sub(r"[^A-Za-z0-9]+", "_", name).strip("_").lower()


def run_gpu(args):
    torch = cuda_torch("try --emulated")
    if torch is None:
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        kernels = TorchKernels(KernelLibrary(args.lib))
    except (FileNotFoundError, OSError) as e:
        print(f"cannot load the kernel library: {e}", file=sys.stderr)
        return 2
    name = torch.cuda.get_device_name(device)
    ok, records = True, []
    if not args.skip_checks:
        ok = rng_checks(records, kernels.lib)
        ok &= torch_checks(kernels, device, records, quick=args.quick,
                           only=args.cases, lanes=args.lanes,
                           fused=not args.unfused)
        emit_summary("gpu-checks", ok, records, device=name)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"kernel_sampler_{_slug(name)}")
    results = list(records)
    if not args.check_only:
        bench = run_benchmarks(kernels, device, args)
        results += bench
        plot(bench, stem + ".png")
        emit({"note": "plot written", "png": stem + ".png"})
    with open(stem + ".json", "w") as f:
        json.dump({"device": name, "torch": torch.__version__,
                   "records": results}, f, indent=1)
    emit({"note": "records written", "json": stem + ".json"})
    return 0 if ok else 1


def run_emulated_torch(args):
    """The GPU mode's driver code on PyTorch CPU tensors and the emulated
    library: a self-test where there is no GPU."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        print("--emulated-torch needs PyTorch", file=sys.stderr)
        return 2
    t0 = time.time()
    library = KernelLibrary(build_emulated_library(args.emulated_lib))
    NumpyKernels(library)  # NaN-filled shared memory
    kernels = TorchKernels(library)
    device = torch.device("cpu")
    records = []
    ok = torch_checks(kernels, device, records, quick=True,
                      only=args.cases or ["random", "d13_tails", "fit"],
                      lanes=args.lanes, fused=not args.unfused)
    tiny = parse_args(["--catalogs", "3000", "--dims", "8", "16", "--rows",
                       "4", "--draws", "16"])
    bench = run_benchmarks(kernels, device, tiny)
    failed = [r for r in bench if "error" in r]
    ok &= _record(records, "emulated-torch/benchmark_code", not failed,
                  runs=len(bench), errors=failed[:3])
    os.makedirs(args.out, exist_ok=True)
    png = os.path.join(args.out, "kernel_sampler_emulated_selftest.png")
    plot(bench, png)
    emit({"note": "self-test plot written", "png": png})
    emit_summary("emulated-torch", ok, records,
                 seconds=round(time.time() - t0, 2))
    return 0 if ok else 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lib", default=DEFAULT_LIBRARY,
                   help="path of libtfrec_fast_kernels.so")
    p.add_argument("--check-only", action="store_true",
                   help="GPU correctness checks, no benchmark")
    p.add_argument("--skip-checks", action="store_true",
                   help="GPU mode: benchmark only")
    p.add_argument("--emulated", action="store_true",
                   help="no GPU: build the CUDA source with g++ against "
                        "the CUDA emulation and run the checks on it")
    p.add_argument("--emulated-torch", action="store_true",
                   help="no GPU: the GPU mode's driver on PyTorch CPU "
                        "tensors and the emulated library (self-test)")
    p.add_argument("--emulated-lib", default=EMULATED_LIBRARY)
    p.add_argument("--quick", action="store_true",
                   help="fewer cases, fewer draws in the fit check")
    p.add_argument("--cases", nargs="+", default=None,
                   help="only these case names (CASES, plus 'fit' and "
                        "'non_finite'), e.g. for compute-sanitizer")
    p.add_argument("--lanes", type=int, default=16, choices=(4, 8, 16),
                   help="vector width W of the CPU kernel copy whose "
                        "rounding the draws mirror (16: AVX-512)")
    p.add_argument("--unfused", action="store_true",
                   help="mirror a CPU copy without FMA (with --lanes 4: "
                        "the x86-64 baseline)")
    p.add_argument("--catalogs", type=int, nargs="+",
                   default=[100_000, 1_000_000])
    p.add_argument("--dims", type=int, nargs="+", default=[32, 64])
    p.add_argument("--rows", type=int, default=1024,
                   help="query rows T per call")
    p.add_argument("--draws", type=int, default=256, help="K per row")
    p.add_argument("--leaf-size", type=int, default=None,
                   help="default: 2 D clipped to [32, 256] (the library's)")
    p.add_argument("--alpha", type=float, default=100.0)
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--repeats", type=int, default=10)
    p.add_argument("--out", default=DEFAULT_OUT_DIR,
                   help="folder for kernel_sampler_<device>.json / .png")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.emulated:
        return run_emulated(args)
    if args.emulated_torch:
        return run_emulated_torch(args)
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
