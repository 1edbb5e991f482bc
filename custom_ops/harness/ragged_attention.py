"""Standalone check + benchmark harness for the packed-attention CUDA kernels.

No TensorFlow. Drives custom_ops/kernels/ragged_attention.cu.cc through the
C ABI of libtfrec_fast_kernels.so (custom_ops/harness/build.sh) with ctypes,
on PyTorch CUDA tensors (their data_ptr()s and torch's current stream):

    custom_ops/harness/build.sh
    python custom_ops/harness/ragged_attention.py --check-only
    python custom_ops/harness/ragged_attention.py            # checks + bench
    python custom_ops/harness/ragged_attention.py --cpu-reference  # no GPU
    python custom_ops/harness/ragged_attention.py --emulated       # no GPU

Checks (GPU): forward (out, logsumexp) and backward (dq, dk, dv) against a
float64 PyTorch reference (explicit masked softmax per sequence, gradients
by autograd) computed from the same, already rounded, inputs; on random,
adversarial (huge scores, rows of length 1, empty rows, one very long row,
no rows at all) and ragged cases; causal and bidirectional; float32,
float16 and bfloat16; head dims 1 to 128 with Dh != Dv; block rows 64 and 32;
work lists from the host planner (C++, compared with this file's port) and
from the device planner (int32 and int64 row_splits). Also: the backward is
bitwise deterministic, and invalid row_splits make the device planner report
the bad position and the kernels run nothing. Error measure:
max |x - ref| / max(1, max |ref|) per tensor (out, lse, dq, dk, dv); allowed:
TOLERANCES[dtype] (float32 1e-4; float16 2e-3; bfloat16 1.6e-2, i.e. a few
ulps of the output type: outputs are rounded to it and D = rowsum(dO * O)
is taken from the rounded output), or 4x the error of the same explicit
reference computed in float32 (for float16 / bfloat16: with D from the
output rounded to that type, as any backward that keeps only the stored
output computes it) and rounded to the dtype, where that is larger (the
"huge_scores" case, scores ~4000: float32 itself is off by ~5e-4, and with
near one-hot rows dS = P (dP - D) is a small difference of large terms).

Benchmark (GPU): lengths uniform in [0.2 L, L] for L in {128, 512, 1024},
batch 16 and 64, 8 heads of size 64 (flags change these), bf16, causal:
  tfrec_fast            device planner + our forward (+ backward) on packed
                        [T, H, D] tensors;
  torch_sdpa_padded     F.scaled_dot_product_attention on [B, H, L, D]
                        tensors padded beforehand (padding not timed; causal
                        uses is_causal, which masks right-padding keys for
                        every real query; bidirectional a key-padding mask);
  torch_sdpa_pad_unpad  the same with packed -> padded -> packed copies timed;
  tfrec_fast_mha_packed QKV Linear on packed tokens + our kernel + output
                        Linear (autograd.Function around our kernels);
  torch_mha_padded      torch.nn.MultiheadAttention on padded [B, L, E] with
                        key_padding_mask (+ causal mask).
CUDA events around each call, warm-up, median of repeats. Prints one JSON
record a line ({"impl", "config", "step_s", "device"}), writes them to
--json and a plot to --png.

--cpu-reference (no GPU, no kernels; PyTorch optional): checks the harness's
own logic: the numpy reference against finite differences; the Python port
of the work planners (every (token, head) covered exactly once, costs
sorted) and, where libtfrec_fast_kernels.so is built, the C++ host planner
against the port (it needs no GPU); a float32 numpy simulation of the CUDA
kernels' algorithm (same tiles, work items, online softmax with exp2,
D = rowsum(dO * O), fused s * scale - L, mirrored key blocks, masks)
against the float64 reference on the same cases as the GPU checks, in
float32 and with bf16 rounding; and, when PyTorch is installed, the PyTorch
reference used on the GPU (run on the CPU) against the numpy reference.

--emulated (no GPU, no PyTorch): compiles ragged_attention.cu.cc itself with
g++ against emulation/cuda_emulation.h (thread blocks as fibers, barriers,
warp shuffles, dynamic shared memory; TensorFlow's bundled CUDA headers or
a toolkit's suffice) into libtfrec_fast_kernels_emulated.so and runs the
GPU checks on NumPy arrays through the same C ABI (long row 400 tokens).
Slow (minutes for the full set; --quick, --cases to narrow it).
"""

import argparse
import ctypes
import json
import math
import os
import sys
import time

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # also when loaded by path (tests/)
    sys.path.insert(0, HERE)
# pylint: disable=wrong-import-position
import harness_common  # noqa: E402
# TOLERANCES: normalised max error (see the module docstring) allowed per
# dtype.
from harness_common import (  # noqa: E402
    DEFAULT_LIBRARY, DEFAULT_OUT_DIR, DTYPE_CODES, ROOT, TOLERANCES,
    CApiLibrary, EmulationControls, cuda_torch, decode, emit, emit_summary,
    encode, nan_array, normalized_error, round_to, stream_handle, time_cuda)
# pylint: enable=wrong-import-position

LOG2E = 1.4426950408889634


# ---------------------------------------------------------------------------
# Row splits, work lists (Python port of the planners in ragged_attention.cu.cc)

def row_splits_from_lengths(lengths):
    return np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(
        np.int64)


def check_row_splits(row_splits, num_tokens):
    """None if valid, else the first bad position (as the device planner)."""
    rs = np.asarray(row_splits, np.int64)
    if rs[0] != 0:
        return 0
    for p in range(1, len(rs)):
        if rs[p] < rs[p - 1]:
            return p
    if rs[-1] != num_tokens:
        return len(rs) - 1
    return None


def plan_items(row_splits, block_rows, causal, order="host"):
    """Work items [n, 4] int32 (start, length, block, num_blocks).

    order="host": PlanRaggedAttentionGpu (sorted by decreasing cost, stable);
    order="device": the device planner (sequence order, each sequence's
    blocks from the last to the first).
    """
    rs = np.asarray(row_splits, np.int64)
    entries = []
    for b in range(len(rs) - 1):
        start, length = int(rs[b]), int(rs[b + 1] - rs[b])
        blocks = -(-length // block_rows)
        for i in range(blocks):
            if order == "host":
                cost = i + 1 if causal else blocks
                entries.append((cost, (start, length, i, blocks)))
            else:
                entries.append((0, (start, length, blocks - 1 - i, blocks)))
    if order == "host":
        entries.sort(key=lambda e: -e[0])  # stable, like std::stable_sort
    items = np.array([e[1] for e in entries], np.int32).reshape(-1, 4)
    return items


def max_items(num_rows, num_tokens, block_rows):
    if num_rows <= 0 or num_tokens <= 0:
        return 0
    return (num_tokens + num_rows * (block_rows - 1)) // block_rows


# ---------------------------------------------------------------------------
# NumPy reference (float64, explicit softmax, analytic gradient)

def reference_np(q, k, v, row_splits, causal, scale, d_out=None,
                 dtype=np.float64, stored_out=None):
    """out [T, H, Dv], lse [T, H] and, with d_out, (dq, dk, dv).

    Computed in `dtype`: float64 for the reference itself, float32 for the
    error a plain float32 computation makes (the conditioning baseline).
    With `stored_out` ("float16", "bfloat16"), the backward takes
    D = rowsum(dO * O) from O rounded to that type, as every backward that
    keeps only the stored output does (FlashAttention's and ours), instead
    of rowsum(dP * P): with near one-hot rows, dS = P (dP - D) is a small
    difference of large terms and that rounding dominates.
    """
    q, k, v = (np.asarray(x, dtype) for x in (q, k, v))
    scale = dtype(scale)
    T, H, _ = q.shape
    out = np.zeros(v.shape, dtype)
    lse = np.zeros((T, H), dtype)
    grads = None
    if d_out is not None:
        d_out = np.asarray(d_out, dtype)
        grads = (np.zeros(q.shape, dtype), np.zeros(k.shape, dtype),
                 np.zeros(v.shape, dtype))
    rs = np.asarray(row_splits, np.int64)
    for b in range(len(rs) - 1):
        s0, s1 = int(rs[b]), int(rs[b + 1])
        n = s1 - s0
        if n == 0:
            continue
        Q, K, V = (x[s0:s1].transpose(1, 0, 2) for x in (q, k, v))
        S = scale * Q @ K.transpose(0, 2, 1)  # [H, n, n]
        if causal:
            S = np.where(np.tril(np.ones((n, n), bool)), S,
                         dtype(-np.inf))
        mx = S.max(-1, keepdims=True)
        E = np.exp(S - mx)
        Z = E.sum(-1, keepdims=True)
        P = E / Z
        out[s0:s1] = (P @ V).transpose(1, 0, 2)
        lse[s0:s1] = (mx + np.log(Z))[..., 0].T
        if d_out is not None:
            dO = d_out[s0:s1].transpose(1, 0, 2)
            dV = P.transpose(0, 2, 1) @ dO
            dP = dO @ V.transpose(0, 2, 1)
            if stored_out is None:
                D = (dP * P).sum(-1, keepdims=True)
            else:
                O = round_to(out[s0:s1], stored_out).astype(dtype)
                D = (dO * O.transpose(1, 0, 2)).sum(-1, keepdims=True)
            dS = P * (dP - D)
            grads[0][s0:s1] = (scale * dS @ K).transpose(1, 0, 2)
            grads[1][s0:s1] = (scale * dS.transpose(0, 2, 1) @ Q).transpose(
                1, 0, 2)
            grads[2][s0:s1] = dV.transpose(1, 0, 2)
    return out, lse, grads


# ---------------------------------------------------------------------------
# NumPy simulation of the CUDA kernels (float32, same algorithm and tiling)

def _tile(x, first, rows, block_rows):
    """Rows [first, first + rows) of x [T, d] zero-padded to block_rows."""
    t = np.zeros((block_rows, x.shape[1]), np.float32)
    if rows > 0:
        t[:rows] = x[first:first + rows]
    return t


def simulate_forward(q, k, v, items, block_rows, causal, scale):
    """ForwardKernel in float32; rows not covered stay NaN."""
    T, H, _ = q.shape
    out = np.full(v.shape[:2] + (v.shape[2],), np.nan, np.float32)
    lse = np.full((T, H), np.nan, np.float32)
    scale32 = np.float32(scale)
    log2e = np.float32(LOG2E)
    R = block_rows
    ar = np.arange(R)
    for start, length, block, num_blocks in items.tolist():
        q0 = block * R
        q_rows = min(R, length - q0)
        rows = q0 + ar[:, None]
        for h in range(H):
            Q = _tile(q[:, h], start + q0, q_rows, R)
            m = np.full(R, -np.inf, np.float32)
            l = np.zeros(R, np.float32)
            acc = np.zeros((R, v.shape[2]), np.float32)
            for kb in range((block + 1) if causal else num_blocks):
                k0 = kb * R
                k_rows = min(R, length - k0)
                K = _tile(k[:, h], start + k0, k_rows, R)
                V = _tile(v[:, h], start + k0, k_rows, R)
                keys = k0 + ar[None, :]
                seen = (keys < length) & ((not causal) | (keys <= rows))
                s = np.where(seen, (Q @ K.T) * scale32,
                             -np.inf).astype(np.float32)
                m_new = np.maximum(m, s.max(1))
                ref = np.where(m_new == -np.inf, 0, m_new).astype(np.float32)
                alpha = np.exp2((m - ref) * log2e)
                p = np.exp2((s - ref[:, None]) * log2e)
                l = l * alpha + p.sum(1)
                acc = acc * alpha[:, None] + p @ V
                m = m_new
            sl = slice(start + q0, start + q0 + q_rows)
            if not np.all(np.isnan(lse[sl, h])):
                raise AssertionError("a row was written twice (forward)")
            with np.errstate(divide="ignore"):
                out[sl, h] = (acc / l[:, None])[:q_rows]
                lse[sl, h] = (m + np.log(l))[:q_rows]
    return out, lse


def simulate_backward(q, k, v, out, lse, d_out, items, block_rows, causal,
                      scale):
    """RowDot + BackwardDq + BackwardDkv kernels in float32."""
    T, H, Dh = q.shape
    Dv = v.shape[2]
    dsum = (d_out.astype(np.float32) * out.astype(np.float32)).sum(
        -1, dtype=np.float32)
    dq = np.full(q.shape, np.nan, np.float32)
    dk = np.full(k.shape, np.nan, np.float32)
    dv = np.full(v.shape, np.nan, np.float32)
    log2e = np.float32(LOG2E)
    R = block_rows
    ar = np.arange(R)

    def probs(dots, lse_tile, seen):
        # exp2f(fmaf(dot, scale, -lse) * log2e): float64 emulates the fma.
        t = (dots.astype(np.float64) * np.float64(np.float32(scale)) -
             lse_tile.astype(np.float64)).astype(np.float32)
        with np.errstate(over="ignore"):
            return np.where(seen, np.exp2(t * log2e), 0).astype(np.float32)

    for start, length, block, num_blocks in items.tolist():
        # dQ: query block `block`.
        q0 = block * R
        q_rows = min(R, length - q0)
        rows = q0 + ar[:, None]
        for h in range(H):
            Q = _tile(q[:, h], start + q0, q_rows, R)
            dO = _tile(d_out[:, h], start + q0, q_rows, R)
            L = _tile(lse[:, h:h + 1], start + q0, q_rows, R)[:, 0]
            D = _tile(dsum[:, h:h + 1], start + q0, q_rows, R)[:, 0]
            acc = np.zeros((R, Dh), np.float32)
            for kb in range((block + 1) if causal else num_blocks):
                k0 = kb * R
                k_rows = min(R, length - k0)
                K = _tile(k[:, h], start + k0, k_rows, R)
                V = _tile(v[:, h], start + k0, k_rows, R)
                keys = k0 + ar[None, :]
                seen = ((rows < length) & (keys < length) &
                        ((not causal) | (keys <= rows)))
                p = probs(Q @ K.T, L[:, None], seen)
                ds = p * ((dO @ V.T) - D[:, None])
                acc += ds @ K
            sl = slice(start + q0, start + q0 + q_rows)
            if not np.all(np.isnan(dq[sl, h])):
                raise AssertionError("a row was written twice (dq)")
            dq[sl, h] = (acc * np.float32(scale))[:q_rows]
        # dK, dV: key block num_blocks - 1 - block.
        kblock = num_blocks - 1 - block
        k0 = kblock * R
        k_rows = min(R, length - k0)
        keys = k0 + ar[:, None]
        for h in range(H):
            K = _tile(k[:, h], start + k0, k_rows, R)
            V = _tile(v[:, h], start + k0, k_rows, R)
            adk = np.zeros((R, Dh), np.float32)
            adv = np.zeros((R, Dv), np.float32)
            for qb in range(kblock if causal else 0, num_blocks):
                q0 = qb * R
                q_rows = min(R, length - q0)
                Q = _tile(q[:, h], start + q0, q_rows, R)
                dO = _tile(d_out[:, h], start + q0, q_rows, R)
                L = _tile(lse[:, h:h + 1], start + q0, q_rows, R)[:, 0]
                D = _tile(dsum[:, h:h + 1], start + q0, q_rows, R)[:, 0]
                queries = q0 + ar[None, :]
                seen = ((keys < length) & (queries < length) &
                        ((not causal) | (keys <= queries)))
                # (Q K^T)^T: the kernels' dot products run in the same
                # order in the forward and in both backward kernels, so
                # the recomputed scores are bitwise those of the forward.
                p = probs((Q @ K.T).T, L[None, :], seen)
                ds = p * ((dO @ V.T).T - D[None, :])
                adv += p @ dO
                adk += ds @ Q
            sl = slice(start + k0, start + k0 + k_rows)
            if not np.all(np.isnan(dk[sl, h])):
                raise AssertionError("a row was written twice (dk)")
            dk[sl, h] = (adk * np.float32(scale))[:k_rows]
            dv[sl, h] = adv[:k_rows]
    return dq, dk, dv


# ---------------------------------------------------------------------------
# Cases

def make_case(lengths, heads, head_dim, value_dim=None, seed=0,
              magnitude=1.0):
    """Packed float32 q, k, v, d_out and int64 row_splits (NumPy)."""
    value_dim = head_dim if value_dim is None else value_dim
    rng = np.random.default_rng(seed)
    rs = row_splits_from_lengths(lengths)
    T = int(rs[-1])
    q = (magnitude * rng.standard_normal((T, heads, head_dim))).astype(
        np.float32)
    k = (magnitude * rng.standard_normal((T, heads, head_dim))).astype(
        np.float32)
    v = rng.standard_normal((T, heads, value_dim)).astype(np.float32)
    d_out = rng.standard_normal((T, heads, value_dim)).astype(np.float32)
    return q, k, v, d_out, rs


def check_cases(long_row=3000):
    """(name, lengths, heads, head_dim, value_dim, magnitude) of the checks."""
    rng = np.random.default_rng(1234)
    return [
        ("random", [5, 17, 64, 65, 130, 1], 3, 64, 64, 1.0),
        ("head_dim_32", [33, 7, 96], 2, 32, 32, 1.0),
        ("head_dim_128", [70, 129, 3], 2, 128, 128, 1.0),
        ("dh48_dv80", [40, 100, 1], 2, 48, 80, 1.0),
        ("dh128_dv16", [65, 9], 2, 128, 16, 1.0),
        ("dh1_dv1", [12, 80], 2, 1, 1, 1.0),
        # Scores up to ~500 (exp overflows float32 past 88 without the
        # running max) and ~4000 (where float32 itself loses digits: the
        # tolerance then follows a plain float32 computation's error).
        ("large_scores", [9, 70, 33], 2, 64, 64, 10.0),
        ("huge_scores", [9, 70, 33], 2, 64, 64, 30.0),
        ("length_1_rows", [1, 1, 1, 1, 1], 2, 64, 64, 1.0),
        ("empty_rows", [0, 3, 0, 0, 1, 0, 70, 0], 2, 64, 64, 1.0),
        ("one_long_row", [long_row, 2, 1, 7], 2, 64, 64, 1.0),
        ("no_rows", [], 2, 64, 64, 1.0),
        ("all_rows_empty", [0, 0, 0], 2, 64, 64, 1.0),
        ("ragged", rng.integers(1, 300, size=8).tolist(), 4, 64, 64, 1.0),
    ]


def case_tolerance(dtype, baseline, ref):
    """TOLERANCES[dtype], or 4x the error of a plain computation if larger.

    `baseline`: (out, lse, dq, dk, dv) of the explicit reference computed
    in float32 (reference_np(..., dtype=np.float32, stored_out=dtype) for
    half types) and rounded to `dtype`; `ref` the float64 one. On
    ill-conditioned inputs (huge scores) float32 itself is off by more than
    1e-4; the kernels are held to a small multiple of that.
    """
    errs = [normalized_error(round_to(b, dtype), r)
            for b, r in zip(baseline, ref)]
    worst = max([e for e in errs if math.isfinite(e)], default=0.0)
    return max(TOLERANCES[dtype], 4 * worst), worst


# ---------------------------------------------------------------------------
# ctypes binding

_c_i64 = ctypes.c_int64
_c_int = ctypes.c_int
_c_ptr = ctypes.c_void_p


class KernelLibrary(CApiLibrary):
    """libtfrec_fast_kernels.so through its C ABI (ragged_attention_capi.cc)."""

    def __init__(self, path=DEFAULT_LIBRARY):
        super().__init__(path, "tfrec_ra_")
        lib = self.lib
        lib.tfrec_ra_block_rows.restype = _c_int
        lib.tfrec_ra_block_rows.argtypes = [_c_i64, _c_i64, _c_int,
                                            ctypes.POINTER(_c_int)]
        lib.tfrec_ra_max_items.restype = _c_i64
        lib.tfrec_ra_max_items.argtypes = [_c_i64, _c_i64, _c_int]
        lib.tfrec_ra_plan_host.restype = _c_int
        lib.tfrec_ra_plan_host.argtypes = [
            _c_ptr, _c_i64, _c_i64, _c_int, _c_int, _c_ptr, _c_i64,
            ctypes.POINTER(_c_i64)]
        lib.tfrec_ra_plan_device.restype = _c_int
        lib.tfrec_ra_plan_device.argtypes = [
            _c_ptr, _c_int, _c_i64, _c_i64, _c_int, _c_ptr, _c_i64, _c_ptr,
            _c_int, _c_ptr]
        lib.tfrec_ra_forward.restype = _c_int
        lib.tfrec_ra_forward.argtypes = (
            [_c_int, _c_i64, _c_i64, _c_i64, _c_i64, _c_int, ctypes.c_float,
             _c_int, _c_ptr, _c_ptr, _c_i64, _c_int] + [_c_ptr] * 6)
        lib.tfrec_ra_backward_workspace_bytes.restype = _c_i64
        lib.tfrec_ra_backward_workspace_bytes.argtypes = [_c_i64, _c_i64]
        lib.tfrec_ra_backward.restype = _c_int
        lib.tfrec_ra_backward.argtypes = (
            [_c_int, _c_i64, _c_i64, _c_i64, _c_i64, _c_int, ctypes.c_float,
             _c_int, _c_ptr, _c_ptr, _c_i64, _c_int] + [_c_ptr] * 11)

    def plan_host(self, row_splits, block_rows, causal):
        """C++ host planner -> [n, 4] int32 NumPy array (no GPU needed)."""
        rs = np.ascontiguousarray(row_splits, np.int64)
        num_rows = len(rs) - 1
        capacity = max(1, max_items(num_rows, int(rs[-1]), block_rows))
        buf = np.zeros((capacity, 4), np.int32)
        count = _c_i64(0)
        err = self.lib.tfrec_ra_plan_host(
            rs.ctypes.data, num_rows, int(rs[-1]), block_rows, int(causal),
            buf.ctypes.data, capacity, ctypes.byref(count))
        if err == 1:
            raise ValueError("invalid row_splits")
        if err != 0:
            raise RuntimeError(f"plan_host: capacity {capacity} < "
                               f"{count.value}")
        return buf[:count.value].copy()

    def block_rows(self, head_dim, value_dim, device):
        out = _c_int(0)
        self.check(self.lib.tfrec_ra_block_rows(head_dim, value_dim, device,
                                                 ctypes.byref(out)),
                    "block_rows")
        return out.value


class Work:
    """A device work list: items (+ header for a device-built one)."""

    def __init__(self, items, num_items, block_rows, header=None):
        self.items = items          # torch int32 [n, 4] on the GPU
        self.num_items = num_items
        self.block_rows = block_rows
        self.header = header        # torch int32 [2] or None

    def pointers(self):
        items = self.items.data_ptr() if self.num_items else None
        count = self.header.data_ptr() if self.header is not None else None
        return items, count


class TorchKernels:
    """Forward / backward / planners on PyTorch CUDA tensors."""

    def __init__(self, library):
        import torch  # pylint: disable=import-outside-toplevel
        self.torch = torch
        self.lib = library

    def work_host(self, row_splits, block_rows, causal, device):
        torch = self.torch
        items = self.lib.plan_host(row_splits, block_rows, causal)
        tensor = torch.from_numpy(items).to(device)
        return Work(tensor, len(items), block_rows)

    def work_device(self, row_splits_t, num_tokens, block_rows):
        torch = self.torch
        num_rows = row_splits_t.numel() - 1
        cap = max_items(num_rows, num_tokens, block_rows)
        items = torch.empty((max(cap, 1), 4), dtype=torch.int32,
                            device=row_splits_t.device)
        header = torch.empty(2, dtype=torch.int32, device=row_splits_t.device)
        err = self.lib.lib.tfrec_ra_plan_device(
            row_splits_t.data_ptr(), int(row_splits_t.dtype == torch.int64),
            num_rows, num_tokens, block_rows, items.data_ptr(), cap,
            header.data_ptr(), row_splits_t.device.index,
            stream_handle(self.torch, row_splits_t.device))
        self.lib.check(err, "plan_device")
        return Work(items, cap, block_rows, header)

    def forward(self, q, k, v, work, causal, scale):
        torch = self.torch
        T, H, Dh = q.shape
        Dv = v.shape[2]
        for x in (q, k, v):
            assert x.is_cuda and x.is_contiguous() and x.dtype == q.dtype
        out = torch.empty((T, H, Dv), dtype=q.dtype, device=q.device)
        lse = torch.empty((T, H), dtype=torch.float32, device=q.device)
        items, count = work.pointers()
        err = self.lib.lib.tfrec_ra_forward(
            DTYPE_CODES[str(q.dtype).replace("torch.", "")], T, H, Dh, Dv,
            int(causal), float(scale), q.device.index, items, count,
            work.num_items, work.block_rows, q.data_ptr(), k.data_ptr(),
            v.data_ptr(), out.data_ptr(), lse.data_ptr(),
            stream_handle(self.torch, q.device))
        self.lib.check(err, "forward")
        return out, lse

    def backward(self, q, k, v, out, lse, d_out, work, causal, scale):
        torch = self.torch
        T, H, Dh = q.shape
        Dv = v.shape[2]
        for x in (q, k, v, out, d_out):
            assert x.is_cuda and x.is_contiguous() and x.dtype == q.dtype
        dq = torch.empty_like(q)
        dk = torch.empty_like(k)
        dv = torch.empty_like(v)
        nbytes = self.lib.lib.tfrec_ra_backward_workspace_bytes(T, H)
        workspace = torch.empty(max(nbytes // 4, 1), dtype=torch.float32,
                                device=q.device)
        items, count = work.pointers()
        err = self.lib.lib.tfrec_ra_backward(
            DTYPE_CODES[str(q.dtype).replace("torch.", "")], T, H, Dh, Dv,
            int(causal), float(scale), q.device.index, items, count,
            work.num_items, work.block_rows, q.data_ptr(), k.data_ptr(),
            v.data_ptr(), out.data_ptr(), lse.data_ptr(), d_out.data_ptr(),
            dq.data_ptr(), dk.data_ptr(), dv.data_ptr(), workspace.data_ptr(),
            stream_handle(self.torch, q.device))
        self.lib.check(err, "backward")
        return dq, dk, dv


def make_autograd_function(kernels):
    """torch.autograd.Function over our kernels (q, k, v packed [T, H, D])."""
    torch = kernels.torch

    class RaggedAttention(torch.autograd.Function):
        @staticmethod
        def forward(ctx, q, k, v, work, causal, scale):  # noqa: D102
            q, k, v = q.contiguous(), k.contiguous(), v.contiguous()
            out, lse = kernels.forward(q, k, v, work, causal, scale)
            ctx.save_for_backward(q, k, v, out, lse)
            ctx.work, ctx.causal, ctx.scale = work, causal, scale
            return out

        @staticmethod
        def backward(ctx, d_out):  # noqa: D102
            q, k, v, out, lse = ctx.saved_tensors
            dq, dk, dv = kernels.backward(q, k, v, out, lse,
                                          d_out.contiguous(), ctx.work,
                                          ctx.causal, ctx.scale)
            return dq, dk, dv, None, None, None

    return RaggedAttention


# ---------------------------------------------------------------------------
# PyTorch reference (float64 explicit softmax per sequence, autograd)

def torch_reference(q, k, v, row_splits, causal, scale, d_out,
                    compute=None):
    """out, lse, dq, dk, dv computed in `compute` (default float64)."""
    import torch  # pylint: disable=import-outside-toplevel
    compute = torch.float64 if compute is None else compute
    q, k, v = (x.detach().to(compute).requires_grad_(True)
               for x in (q, k, v))
    d_out = d_out.to(compute)
    outs, lses = [], []
    rs = [int(x) for x in row_splits]
    for b in range(len(rs) - 1):
        s0, s1 = rs[b], rs[b + 1]
        n = s1 - s0
        if n == 0:
            continue
        Q, K, V = (x[s0:s1].transpose(0, 1) for x in (q, k, v))  # [H, n, d]
        S = scale * Q @ K.transpose(1, 2)
        if causal:
            mask = torch.ones(n, n, dtype=torch.bool, device=q.device).tril()
            S = S.masked_fill(~mask, float("-inf"))
        lses.append(torch.logsumexp(S, -1).transpose(0, 1))
        outs.append((torch.softmax(S, -1) @ V).transpose(0, 1))
    T, H = q.shape[:2]
    if outs:
        out = torch.cat(outs)
        lse = torch.cat(lses)
        out.backward(d_out)
        grads = [x.grad if x.grad is not None else torch.zeros_like(x)
                 for x in (q, k, v)]
    else:
        out = torch.zeros((T, H, v.shape[2]), dtype=compute,
                          device=q.device)
        lse = torch.zeros((T, H), dtype=compute, device=q.device)
        grads = [torch.zeros_like(x) for x in (q, k, v)]
    return (out.detach(), lse.detach()) + tuple(g.detach() for g in grads)


def torch_sdpa_reference(q, k, v, row_splits, causal, scale):
    """Forward only, per sequence through F.scaled_dot_product_attention."""
    import torch  # pylint: disable=import-outside-toplevel
    import torch.nn.functional as F  # pylint: disable=import-outside-toplevel
    outs = []
    rs = [int(x) for x in row_splits]
    for b in range(len(rs) - 1):
        s0, s1 = rs[b], rs[b + 1]
        if s1 == s0:
            continue
        Q, K, V = (x[s0:s1].transpose(0, 1)[None] for x in (q, k, v))
        outs.append(F.scaled_dot_product_attention(
            Q, K, V, is_causal=causal, scale=scale)[0].transpose(0, 1))
    if not outs:
        return torch.zeros(q.shape[:2] + (v.shape[2],), dtype=q.dtype)
    return torch.cat(outs)


# ---------------------------------------------------------------------------
# CPU mode: the harness logic without kernels

def _record(records, check, err, tol, **extra):
    ok = bool(err <= tol)
    rec = {"check": check, "max_err": err, "tol": tol, "ok": ok}
    rec.update(extra)
    emit(rec, records)
    return ok


def finite_difference_check(records):
    """The analytic gradient of reference_np against central differences."""
    q, k, v, d_out, rs = make_case([3, 0, 5], 2, 4, 3, seed=7)
    ok = True
    for causal in (True, False):
        _, _, grads = reference_np(q, k, v, rs, causal, 0.5, d_out)
        eps = 1e-6
        for name, idx in (("q", 0), ("k", 1), ("v", 2)):
            base = [q.astype(np.float64), k.astype(np.float64),
                    v.astype(np.float64)]
            numeric = np.zeros_like(base[idx])
            for pos in np.ndindex(base[idx].shape):
                plus = [x.copy() for x in base]
                minus = [x.copy() for x in base]
                plus[idx][pos] += eps
                minus[idx][pos] -= eps
                f_plus = (reference_np(*plus, rs, causal, 0.5)[0] *
                          d_out).sum()
                f_minus = (reference_np(*minus, rs, causal, 0.5)[0] *
                           d_out).sum()
                numeric[pos] = (f_plus - f_minus) / (2 * eps)
            ok &= _record(records, f"reference_fd_grad_{name}",
                          normalized_error(grads[idx], numeric), 1e-7,
                          causal=causal)
    return ok


def planner_checks(records, library=None):
    ok = True
    rng = np.random.default_rng(5)
    for trial in range(20):
        lengths = rng.integers(0, 300, size=rng.integers(0, 12)).tolist()
        if trial == 0:
            lengths = [0, 0, 1000, 1, 0, 64, 65]
        rs = row_splits_from_lengths(lengths)
        T = int(rs[-1])
        for block_rows in (64, 32):
            for causal in (True, False):
                for order in ("host", "device"):
                    items = plan_items(rs, block_rows, causal, order)
                    covered = np.zeros(T, np.int64)
                    for start, length, block, blocks in items.tolist():
                        assert blocks == -(-length // block_rows)
                        # Query rows (forward, dQ) and key rows (dK/dV).
                        q0 = block * block_rows
                        covered[start + q0:start + min(length,
                                                       q0 + block_rows)] += 1
                        k0 = (blocks - 1 - block) * block_rows
                        covered[start + k0:start + min(length,
                                                       k0 + block_rows)] += 10
                    good = bool(np.all(covered == 11))
                    if len(items) > max_items(len(lengths), T, block_rows):
                        good = False
                    if order == "host":
                        costs = [(i[2] + 1) if causal else i[3]
                                 for i in items.tolist()]
                        good &= costs == sorted(costs, reverse=True)
                    if library is not None and order == "host":
                        good &= np.array_equal(
                            library.plan_host(rs, block_rows, causal), items)
                    ok &= good
    emit({"check": "planner_coverage_and_order", "ok": bool(ok),
           "cpp_host_planner_compared": library is not None}, records)
    bad = check_row_splits(np.array([0, 3, 2, 5]), 5)
    ok &= bad == 2
    emit({"check": "row_splits_first_bad", "ok": bad == 2}, records)
    if library is not None:
        try:
            library.plan_host(np.array([0, 3, 2, 5], np.int64), 64, True)
            rejected = False
        except ValueError:
            rejected = True
        ok &= rejected
        emit({"check": "cpp_host_planner_rejects_bad_splits",
               "ok": rejected}, records)
    return ok


def simulation_checks(records, quick=False, only=None):
    ok = True
    cases = check_cases(long_row=300 if quick else 700)
    if only:
        cases = [c for c in cases if c[0] in only]
    if quick:
        keep = {"random", "dh48_dv80", "large_scores", "huge_scores",
                "empty_rows", "one_long_row", "no_rows", "length_1_rows"}
        cases = [c for c in cases if c[0] in keep]
    for name, lengths, heads, dh, dv, mag in cases:
        q, k, v, d_out, rs = make_case(lengths, heads, dh, dv, seed=3,
                                       magnitude=mag)
        scale = 1.0 / math.sqrt(max(dh, 1))
        dtypes = ("float32", "bfloat16")
        if quick and name not in ("random", "huge_scores"):
            dtypes = ("float32",)
        for dtype in dtypes:
            qr, kr, vr, dor = (round_to(x, dtype) for x in (q, k, v, d_out))
            for causal in (True, False):
                for block_rows in (64, 32):
                    if quick and block_rows == 32 and name != "random":
                        continue
                    items = plan_items(rs, block_rows, causal, "host")
                    out, lse = simulate_forward(qr, kr, vr, items, block_rows,
                                                causal, scale)
                    out = round_to(out, dtype)
                    grads = simulate_backward(qr, kr, vr, out, lse, dor,
                                              items, block_rows, causal, scale)
                    grads = [round_to(g, dtype) for g in grads]
                    ref_out, ref_lse, ref_grads = reference_np(
                        qr, kr, vr, rs, causal, scale, dor)
                    base = reference_np(
                        qr, kr, vr, rs, causal, scale, dor, dtype=np.float32,
                        stored_out=None if dtype == "float32" else dtype)
                    tol, base_err = case_tolerance(
                        dtype, base[:2] + tuple(base[2]),
                        (ref_out, ref_lse) + tuple(ref_grads))
                    errs = {"out": normalized_error(out, ref_out),
                            "lse": normalized_error(lse, ref_lse)}
                    for gname, g, r in zip(("dq", "dk", "dv"), grads,
                                           ref_grads):
                        errs[gname] = normalized_error(g, r)
                    ok &= _record(records, f"simulation/{name}",
                                  max(errs.values()), tol, dtype=dtype,
                                  causal=causal, block_rows=block_rows,
                                  errors=errs, float32_baseline=base_err)
    return ok


def torch_cpu_checks(records):
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        emit({"check": "torch_reference_cpu", "skipped": "no torch"},
              records)
        return True
    ok = True
    for name, lengths, heads, dh, dv, mag in check_cases(long_row=200)[:9]:
        q, k, v, d_out, rs = make_case(lengths, heads, dh, dv, seed=4,
                                       magnitude=mag)
        scale = 1.0 / math.sqrt(max(dh, 1))
        for causal in (True, False):
            ref = reference_np(q, k, v, rs, causal, scale, d_out)
            got = torch_reference(*(torch.from_numpy(x) for x in (q, k, v)),
                                  rs, causal, scale, torch.from_numpy(d_out))
            errs = [normalized_error(got[0].numpy(), ref[0]),
                    normalized_error(got[1].numpy(), ref[1])] + [
                        normalized_error(g.numpy(), r)
                        for g, r in zip(got[2:], ref[2])]
            ok &= _record(records, f"torch_reference_cpu/{name}", max(errs),
                          1e-10, causal=causal)
            sdpa = torch_sdpa_reference(
                *(torch.from_numpy(x) for x in (q, k, v)), rs, causal, scale)
            ok &= _record(records, f"torch_sdpa_cpu/{name}",
                          normalized_error(sdpa.numpy(), ref[0]), 1e-4,
                          causal=causal)
    return ok


# ---------------------------------------------------------------------------
# Emulated mode: the CUDA source compiled by g++ (emulation/), on NumPy arrays

EMULATED_LIBRARY = os.path.join(HERE, "build",
                                "libtfrec_fast_kernels_emulated.so")


def emulated_sources():
    return [os.path.join(HERE, "emulation", "ragged_attention_emulated.cc"),
            os.path.join(HERE, "ragged_attention_capi.cc"),
            os.path.join(ROOT, "custom_ops", "kernels",
                         "ragged_attention.cu.cc"),
            os.path.join(ROOT, "custom_ops", "kernels",
                         "ragged_attention_gpu.h")]


def build_emulated_library(path=EMULATED_LIBRARY, cxx=None):
    """g++ build of the emulated kernels (if missing or older than sources)."""
    return harness_common.build_emulated_library(path, emulated_sources(),
                                                 cxx)


class NumpyKernels(EmulationControls):
    """The C ABI on host arrays: for the emulated library only."""

    def work_host(self, row_splits, block_rows, causal):
        items = np.ascontiguousarray(
            self.lib.plan_host(row_splits, block_rows, causal))
        return {"items": items, "count": None, "num_items": len(items),
                "block_rows": block_rows}

    def work_device(self, row_splits, num_tokens, block_rows):
        rs = np.ascontiguousarray(row_splits)
        num_rows = len(rs) - 1
        cap = max_items(num_rows, num_tokens, block_rows)
        items = np.zeros((max(cap, 1), 4), np.int32)
        header = np.full(2, -7, np.int32)
        self.lib.check(self.lib.lib.tfrec_ra_plan_device(
            rs.ctypes.data, int(rs.dtype == np.int64), num_rows, num_tokens,
            block_rows, items.ctypes.data, cap, header.ctypes.data, 0, None),
            "plan_device")
        return {"items": items, "count": header, "num_items": cap,
                "block_rows": block_rows}

    @staticmethod
    def _pointers(work):
        items = work["items"].ctypes.data if work["num_items"] else None
        count = (work["count"].ctypes.data if work["count"] is not None
                 else None)
        return items, count

    def forward(self, q, k, v, work, causal, scale, dtype, out=None,
                lse=None):
        T, H, Dh = q.shape
        Dv = v.shape[2]
        if out is None:
            out = nan_array((T, H, Dv), q.dtype)
        if lse is None:
            lse = np.full((T, H), np.nan, np.float32)
        items, count = self._pointers(work)
        self.lib.check(self.lib.lib.tfrec_ra_forward(
            DTYPE_CODES[dtype], T, H, Dh, Dv, int(causal), float(scale), 0,
            items, count, work["num_items"], work["block_rows"],
            q.ctypes.data, k.ctypes.data, v.ctypes.data, out.ctypes.data,
            lse.ctypes.data, None), "forward")
        return out, lse

    def backward(self, q, k, v, out, lse, d_out, work, causal, scale, dtype):
        T, H, Dh = q.shape
        Dv = v.shape[2]
        grads = [nan_array(x.shape, x.dtype) for x in (q, k, v)]
        nbytes = self.lib.lib.tfrec_ra_backward_workspace_bytes(T, H)
        workspace = np.zeros(max(nbytes // 4, 1), np.float32)
        items, count = self._pointers(work)
        self.lib.check(self.lib.lib.tfrec_ra_backward(
            DTYPE_CODES[dtype], T, H, Dh, Dv, int(causal), float(scale), 0,
            items, count, work["num_items"], work["block_rows"],
            q.ctypes.data, k.ctypes.data, v.ctypes.data, out.ctypes.data,
            lse.ctypes.data, d_out.ctypes.data, grads[0].ctypes.data,
            grads[1].ctypes.data, grads[2].ctypes.data, workspace.ctypes.data,
            None), "backward")
        return grads


EMULATED_QUICK_CASES = ("random", "dh48_dv80", "huge_scores", "empty_rows",
                        "one_long_row", "no_rows")


def emulated_run(kernels, case, dtype, causal, block_rows, planner,
                 schedule="lowest_first"):
    """One configuration on the emulated kernels -> (errors, tol, baseline)."""
    kernels.set_schedule(schedule)
    _, lengths, heads, dh, dv, mag = case
    q, k, v, d_out, rs = make_case(lengths, heads, dh, dv, seed=11,
                                   magnitude=mag)
    T = int(rs[-1])
    scale = 1.0 / math.sqrt(max(dh, 1))
    rounded = [round_to(x, dtype) for x in (q, k, v, d_out)]
    eq, ek, ev, edo = (encode(x, dtype) for x in rounded)
    ref = reference_np(*rounded[:3], rs, causal, scale, rounded[3])
    ref = ref[:2] + tuple(ref[2])
    base = reference_np(*rounded[:3], rs, causal, scale, rounded[3],
                        dtype=np.float32,
                        stored_out=None if dtype == "float32" else dtype)
    tol, base_err = case_tolerance(dtype, base[:2] + tuple(base[2]), ref)
    if planner == "host":
        work = kernels.work_host(rs, block_rows, causal)
    else:
        work = kernels.work_device(
            rs.astype(np.int64 if planner == "device64" else np.int32), T,
            block_rows)
    out, lse = kernels.forward(eq, ek, ev, work, causal, scale, dtype)
    grads = kernels.backward(eq, ek, ev, out, lse, edo, work, causal, scale,
                             dtype)
    got = [decode(out, dtype), lse] + [decode(g, dtype) for g in grads]
    errs = {n: normalized_error(g, r) for n, g, r in zip(
        ("out", "lse", "dq", "dk", "dv"), got, ref)}
    if planner != "host":
        header = work["count"].tolist()
        expect = plan_items(rs, block_rows, causal, "device")
        if header != [len(expect), 0] or not np.array_equal(
                work["items"][:header[0]], expect):
            errs["device_plan"] = float("inf")
    return errs, tol, base_err


def _rejected_check(run, records, name, block_rows):
    """Block rows the device's shared memory cannot hold must be refused
    (cudaErrorInvalidConfiguration = 9) rather than launched."""
    try:
        run()
        refused = False
    except RuntimeError as e:
        refused = "CUDA error 9 " in str(e)
    emit({"check": name + "/shared_memory_guard", "block_rows": block_rows,
           "ok": refused}, records)
    return refused


def emulated_invalid_splits(kernels, records):
    """Invalid row_splits: the device planner reports the first bad
    position and the kernels write nothing (outputs keep their NaNs)."""
    ok = True
    q, k, v, _, _ = make_case([4, 4], 2, 64, seed=3)
    for splits, bad in (([0, 5, 3, 8], 2), ([1, 4, 8], 0), ([0, 4, 7], 2)):
        work = kernels.work_device(np.array(splits, np.int64), 8, 64)
        out, lse = kernels.forward(q, k, v, work, True, 0.125, "float32")
        good = (work["count"].tolist() == [0, bad + 1] and
                bool(np.all(np.isnan(out))) and bool(np.all(np.isnan(lse))))
        ok &= good
        emit({"check": "emulated/invalid_row_splits", "splits": splits,
               "header": work["count"].tolist(), "ok": good}, records)
    return ok


def emulated_checks(kernels, records, quick=False, only=None):
    """The GPU checks, on the emulated kernels (shorter long row)."""
    ok = True
    cases = check_cases(long_row=200 if quick else 400)
    if only:
        cases = [c for c in cases if c[0] in only]
    elif quick:
        cases = [c for c in cases if c[0] in EMULATED_QUICK_CASES]
    schedules = ("lowest_first", "highest_first", "round_robin")
    runs = 0
    for case in cases:
        dtypes = ("float32", "float16", "bfloat16")
        if quick and case[0] not in ("random", "huge_scores"):
            dtypes = ("float32",)
        allowed = kernels.lib.block_rows(case[3], case[4], 0)
        for dtype in dtypes:
            for causal in (True, False):
                for block_rows in (64, 32):
                    if block_rows > allowed:
                        ok &= _rejected_check(
                            lambda: emulated_run(kernels, case, dtype, causal,
                                                 block_rows, "host"),
                            records, f"emulated/{case[0]}", block_rows)
                        continue
                    planners = ("host", "device64", "device32")
                    if quick and (block_rows == 32 or dtype != "float32"):
                        planners = ("host",)
                    for planner in planners:
                        schedule = schedules[runs % len(schedules)]
                        runs += 1
                        errs, tol, base_err = emulated_run(
                            kernels, case, dtype, causal, block_rows, planner,
                            schedule)
                        ok &= _record(records, f"emulated/{case[0]}",
                                      max(errs.values()), tol, dtype=dtype,
                                      causal=causal, block_rows=block_rows,
                                      planner=planner, schedule=schedule,
                                      errors=errs, float32_baseline=base_err)
    ok &= emulated_invalid_splits(kernels, records)
    return ok


def run_emulated(args):
    records = []
    t0 = time.time()
    path = build_emulated_library(args.emulated_lib)
    kernels = NumpyKernels(KernelLibrary(path))
    ok = emulated_checks(kernels, records, quick=args.quick, only=args.cases)
    emit_summary("emulated", ok, records, library=path,
                 seconds=round(time.time() - t0, 2))
    return 0 if ok else 1


def run_cpu_reference(args):
    records = []
    library = None
    if os.path.isfile(args.lib):
        try:
            library = KernelLibrary(args.lib)
        except OSError as e:  # e.g. built for another platform
            emit({"note": f"library not loadable: {e}"})
    t0 = time.time()
    ok = finite_difference_check(records)
    ok &= planner_checks(records, library)
    ok &= simulation_checks(records, quick=args.quick, only=args.cases)
    if not args.quick:
        ok &= torch_cpu_checks(records)
    emit_summary("cpu-reference", ok, records,
                 seconds=round(time.time() - t0, 2))
    return 0 if ok else 1


# ---------------------------------------------------------------------------
# GPU mode: checks

def gpu_checks(kernels, device, quick=False, only=None):
    torch = kernels.torch
    records = []
    ok = True
    torch_dtypes = {"float32": torch.float32, "float16": torch.float16,
                    "bfloat16": torch.bfloat16}
    default_rows = kernels.lib.block_rows(64, 64, device.index)
    emit({"note": "default block rows for Dh = Dv = 64",
           "block_rows": default_rows})
    for name, lengths, heads, dh, dv, mag in check_cases():
        if only and name not in only:
            continue
        q, k, v, d_out, rs = make_case(lengths, heads, dh, dv, seed=11,
                                       magnitude=mag)
        T = int(rs[-1])
        scale = 1.0 / math.sqrt(max(dh, 1))
        dtypes = ("float32", "float16", "bfloat16")
        if quick and name not in ("random", "large_scores", "empty_rows"):
            dtypes = ("float32", "bfloat16")
        for dtype in dtypes:
            tq, tk, tv, tdo = (torch.from_numpy(x).to(device).to(
                torch_dtypes[dtype]).contiguous() for x in (q, k, v, d_out))
            allowed = kernels.lib.block_rows(dh, dv, device.index)
            for causal in (True, False):
                ref = torch_reference(tq, tk, tv, rs, causal, scale, tdo)
                base = reference_np(
                    *(x.float().cpu().numpy() for x in (tq, tk, tv)), rs,
                    causal, scale, tdo.float().cpu().numpy(),
                    dtype=np.float32,
                    stored_out=None if dtype == "float32" else dtype)
                tol, base_err = case_tolerance(
                    dtype, base[:2] + tuple(base[2]),
                    [r.cpu().numpy() for r in ref])
                for block_rows in (64, 32):
                    if block_rows > allowed:
                        def run(block_rows=block_rows, causal=causal):
                            work = kernels.work_host(rs, block_rows, causal,
                                                     device)
                            kernels.forward(tq, tk, tv, work, causal, scale)
                        ok &= _rejected_check(run, records, f"gpu/{name}",
                                              block_rows)
                        continue
                    for planner in ("host", "device64", "device32"):
                        if planner == "host":
                            work = kernels.work_host(rs, block_rows, causal,
                                                     device)
                        else:
                            rs_t = torch.from_numpy(rs).to(device).to(
                                torch.int64 if planner == "device64"
                                else torch.int32)
                            work = kernels.work_device(rs_t, T, block_rows)
                        out, lse = kernels.forward(tq, tk, tv, work, causal,
                                                   scale)
                        grads = kernels.backward(tq, tk, tv, out, lse, tdo,
                                                 work, causal, scale)
                        torch.cuda.synchronize(device)
                        errs = {}
                        for gname, g, r in zip(
                                ("out", "lse", "dq", "dk", "dv"),
                                (out, lse) + tuple(grads), ref):
                            errs[gname] = normalized_error(
                                g.double().cpu().numpy(), r.cpu().numpy())
                        if planner != "host":
                            header = work.header.cpu().tolist()
                            expect = plan_items(rs, block_rows, causal,
                                                "device")
                            got = work.items[:header[0]].cpu().numpy()
                            if header != [len(expect), 0] or \
                                    not np.array_equal(got, expect):
                                errs["device_plan"] = float("inf")
                        ok &= _record(records, f"gpu/{name}",
                                      max(errs.values()), tol,
                                      dtype=dtype, causal=causal,
                                      block_rows=block_rows, planner=planner,
                                      errors=errs, float32_baseline=base_err)
    ok &= _determinism_check(kernels, device, records)
    ok &= _invalid_splits_check(kernels, device, records)
    return ok, records


def _determinism_check(kernels, device, records):
    torch = kernels.torch
    q, k, v, d_out, rs = make_case([700, 5, 130], 4, 64, seed=2)
    tq, tk, tv, tdo = (torch.from_numpy(x).to(device).to(torch.bfloat16)
                       for x in (q, k, v, d_out))
    work = kernels.work_host(rs, 64, True, device)
    out, lse = kernels.forward(tq, tk, tv, work, True, 0.125)
    first = kernels.backward(tq, tk, tv, out, lse, tdo, work, True, 0.125)
    second = kernels.backward(tq, tk, tv, out, lse, tdo, work, True, 0.125)
    out2, lse2 = kernels.forward(tq, tk, tv, work, True, 0.125)
    same = all(torch.equal(a, b) for a, b in zip(first, second))
    same &= torch.equal(out, out2) and torch.equal(lse, lse2)
    emit({"check": "gpu/deterministic", "ok": bool(same)}, records)
    return bool(same)


def _invalid_splits_check(kernels, device, records):
    torch = kernels.torch
    q, k, v, d_out, _ = make_case([4, 4], 2, 64, seed=3)
    tq, tk, tv, tdo = (torch.from_numpy(x).to(device) for x in (q, k, v,
                                                                 d_out))
    ok = True
    for splits, bad in (([0, 5, 3, 8], 2), ([1, 4, 8], 0), ([0, 4, 7], 2)):
        rs_t = torch.tensor(splits, dtype=torch.int64, device=device)
        work = kernels.work_device(rs_t, 8, 64)
        out, lse = kernels.forward(tq, tk, tv, work, True, 0.125)
        torch.cuda.synchronize(device)
        header = work.header.cpu().tolist()
        good = header == [0, bad + 1]
        # Nothing launched ran: outputs keep torch.empty's contents, so
        # only the header is checked here; the kernels' early exit is what
        # keeps them from reading past the tensors (see compute-sanitizer).
        ok &= good
        emit({"check": "gpu/invalid_row_splits", "splits": splits,
               "header": header, "ok": bool(good)}, records)
        del out, lse
    return ok


# ---------------------------------------------------------------------------
# GPU mode: benchmark

def run_benchmarks(kernels, device, args):
    torch = kernels.torch
    F = torch.nn.functional
    dtype = {"float32": torch.float32, "float16": torch.float16,
             "bfloat16": torch.bfloat16}[args.dtype]
    H, D = args.heads, args.head_dim
    E = H * D
    causal = not args.bidirectional
    scale = 1.0 / math.sqrt(D)
    RaggedAttention = make_autograd_function(kernels)
    name = torch.cuda.get_device_name(device)
    records = []
    for L in args.lengths:
        for B in args.batches:
            rng = np.random.default_rng(L * 1000 + B)
            lengths = rng.integers(math.ceil(0.2 * L), L + 1, size=B)
            rs = row_splits_from_lengths(lengths)
            T = int(rs[-1])
            rs_t = torch.from_numpy(rs).to(device)
            lengths_t = torch.from_numpy(lengths).to(device)
            # Packed token t of sequence b at position p -> padded index.
            seq = torch.repeat_interleave(
                torch.arange(B, device=device), lengths_t)
            pos = torch.arange(T, device=device) - rs_t[:-1].repeat_interleave(
                lengths_t)
            flat_index = seq * L + pos
            config = {"L": L, "batch": B, "heads": H, "head_dim": D,
                      "dtype": args.dtype, "causal": causal, "tokens": T,
                      "padding_fraction": round(1 - T / (B * L), 4)}
            gen = torch.Generator(device=device).manual_seed(0)

            def randn(*shape):
                return torch.randn(*shape, generator=gen, device=device,
                                   dtype=dtype)

            q, k, v, g = (randn(T, H, D) for _ in range(4))

            def pad(x):  # [T, H, D] -> [B, H, L, D]
                out = x.new_zeros(B * L, H, D)
                out[flat_index] = x
                return out.view(B, L, H, D).transpose(1, 2)

            def unpad(x):  # [B, H, L, D] -> [T, H, D]
                return x.transpose(1, 2).reshape(B * L, H, D)[flat_index]

            qp, kp, vp, gp = (pad(x).contiguous() for x in (q, k, v, g))
            key_valid = (torch.arange(L, device=device)[None, :] <
                         lengths_t[:, None])
            sdpa_mask = None if causal else key_valid[:, None, None, :]
            block_rows = kernels.lib.block_rows(D, D, device.index)

            def ours_fwd():
                work = kernels.work_device(rs_t, T, block_rows)
                kernels.forward(q, k, v, work, causal, scale)

            def ours_fwd_bwd():
                work = kernels.work_device(rs_t, T, block_rows)
                out, lse = kernels.forward(q, k, v, work, causal, scale)
                kernels.backward(q, k, v, out, lse, g, work, causal, scale)

            qpg, kpg, vpg = (x.clone().requires_grad_(True)
                             for x in (qp, kp, vp))

            def sdpa_fwd():
                with torch.no_grad():
                    F.scaled_dot_product_attention(
                        qp, kp, vp, attn_mask=sdpa_mask,
                        is_causal=causal, scale=scale)

            def sdpa_fwd_bwd():
                out = F.scaled_dot_product_attention(
                    qpg, kpg, vpg, attn_mask=sdpa_mask, is_causal=causal,
                    scale=scale)
                qpg.grad = kpg.grad = vpg.grad = None
                out.backward(gp)

            qg, kg, vg = (x.clone().requires_grad_(True) for x in (q, k, v))

            def sdpa_pad_unpad_fwd():
                with torch.no_grad():
                    out = F.scaled_dot_product_attention(
                        pad(q), pad(k), pad(v), attn_mask=sdpa_mask,
                        is_causal=causal, scale=scale)
                    unpad(out)

            def sdpa_pad_unpad_fwd_bwd():
                out = F.scaled_dot_product_attention(
                    pad(qg), pad(kg), pad(vg), attn_mask=sdpa_mask,
                    is_causal=causal, scale=scale)
                qg.grad = kg.grad = vg.grad = None
                unpad(out).backward(g)

            # Attention blocks with projections.
            x_packed = randn(T, E).requires_grad_(True)
            g_packed = randn(T, E)
            w_qkv = torch.nn.Linear(E, 3 * E, device=device, dtype=dtype)
            w_out = torch.nn.Linear(E, E, device=device, dtype=dtype)

            def ours_mha_fwd_bwd():
                work = kernels.work_device(rs_t, T, block_rows)
                qkv = w_qkv(x_packed).view(T, 3, H, D)
                att = RaggedAttention.apply(qkv[:, 0], qkv[:, 1], qkv[:, 2],
                                            work, causal, scale)
                y = w_out(att.reshape(T, E))
                x_packed.grad = None
                y.backward(g_packed)

            mha = torch.nn.MultiheadAttention(E, H, batch_first=True,
                                              device=device, dtype=dtype)
            x_pad = x_packed.detach().new_zeros(B * L, E)
            x_pad[flat_index] = x_packed.detach()
            x_pad = x_pad.view(B, L, E).requires_grad_(True)
            g_pad = g_packed.new_zeros(B * L, E)
            g_pad[flat_index] = g_packed
            g_pad = g_pad.view(B, L, E)
            key_padding_mask = ~key_valid
            attn_mask = (torch.ones(L, L, dtype=torch.bool, device=device)
                         .triu(1) if causal else None)

            def mha_fwd_bwd():
                y, _ = mha(x_pad, x_pad, x_pad,
                           key_padding_mask=key_padding_mask,
                           attn_mask=attn_mask, need_weights=False,
                           is_causal=causal)
                x_pad.grad = None
                y.backward(g_pad)

            runs = [
                ("tfrec_fast", "fwd", ours_fwd),
                ("tfrec_fast", "fwd_bwd", ours_fwd_bwd),
                ("torch_sdpa_padded", "fwd", sdpa_fwd),
                ("torch_sdpa_padded", "fwd_bwd", sdpa_fwd_bwd),
                ("torch_sdpa_pad_unpad", "fwd", sdpa_pad_unpad_fwd),
                ("torch_sdpa_pad_unpad", "fwd_bwd", sdpa_pad_unpad_fwd_bwd),
                ("tfrec_fast_mha_packed", "fwd_bwd", ours_mha_fwd_bwd),
                ("torch_mha_padded", "fwd_bwd", mha_fwd_bwd),
            ]
            for impl, phase, fn in runs:
                try:
                    step = time_cuda(torch, fn, args.warmup, args.repeats)
                except RuntimeError as e:  # e.g. out of memory
                    emit({"impl": impl, "config": dict(config, phase=phase),
                           "error": str(e)[:300], "device": name}, records)
                    continue
                emit({"impl": impl, "config": dict(config, phase=phase),
                       "step_s": step, "device": name}, records)
            del qp, kp, vp, gp, qpg, kpg, vpg, x_pad, g_pad
            torch.cuda.empty_cache()
    return records


def plot(records, path):
    import matplotlib  # pylint: disable=import-outside-toplevel
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
    panels = [("attention forward", "fwd", ("tfrec_fast", "torch_sdpa_padded",
                                            "torch_sdpa_pad_unpad")),
              ("attention forward + backward", "fwd_bwd",
               ("tfrec_fast", "torch_sdpa_padded", "torch_sdpa_pad_unpad")),
              ("QKV + attention + out proj., fwd + bwd", "fwd_bwd",
               ("tfrec_fast_mha_packed", "torch_mha_padded"))]
    fig, axes = plt.subplots(1, 3, figsize=(16, 4.8))
    timed = [r for r in records if "step_s" in r]
    batches = sorted({r["config"]["batch"] for r in timed})
    styles = ["-", "--", ":", "-."]
    for ax, (title, phase, impls) in zip(axes, panels):
        for i, impl in enumerate(impls):
            for j, batch in enumerate(batches):
                pts = sorted((r["config"]["L"], r["step_s"] * 1e3)
                             for r in timed if r["impl"] == impl and
                             r["config"]["phase"] == phase and
                             r["config"]["batch"] == batch)
                if pts:
                    ax.plot([p[0] for p in pts], [p[1] for p in pts],
                            styles[j % len(styles)], marker="o",
                            color=f"C{i}", label=f"{impl}, B={batch}")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("max length L (lengths uniform in [0.2 L, L])")
        ax.set_ylabel("ms per call (median)")
        ax.set_title(title)
        ax.legend(fontsize=7)
    if timed:
        c = timed[0]["config"]
        fig.suptitle(f"packed attention, {timed[0]['device']}, {c['dtype']}, "
                     f"H={c['heads']}, Dh={c['head_dim']}, "
                     f"{'causal' if c['causal'] else 'bidirectional'}")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def run_gpu(args):
    torch = cuda_torch("try --cpu-reference")
    if torch is None:
        return 2
    device = torch.device("cuda", torch.cuda.current_device())
    # Float32 references and baselines in true float32, not TF32.
    torch.backends.cuda.matmul.allow_tf32 = False
    kernels = TorchKernels(KernelLibrary(args.lib))
    ok, records = True, []
    if not args.skip_checks:
        ok, records = gpu_checks(kernels, device, quick=args.quick,
                                 only=args.cases)
        emit_summary("gpu-checks", ok, records,
                     device=torch.cuda.get_device_name(device))
    os.makedirs(args.out_dir, exist_ok=True)
    results = list(records)
    if not args.check_only:
        bench = run_benchmarks(kernels, device, args)
        results += bench
        png = args.png or os.path.join(args.out_dir, "ragged_attention.png")
        plot(bench, png)
        emit({"note": "plot written", "png": png})
    path = args.json or os.path.join(args.out_dir, "ragged_attention.json")
    with open(path, "w") as f:
        json.dump(results, f, indent=1)
    emit({"note": "records written", "json": path})
    return 0 if ok else 1


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lib", default=DEFAULT_LIBRARY,
                   help="path of libtfrec_fast_kernels.so")
    p.add_argument("--check-only", action="store_true",
                   help="GPU correctness checks, no benchmark")
    p.add_argument("--cpu-reference", action="store_true",
                   help="no GPU: check the references, planners and a NumPy "
                        "simulation of the kernels")
    p.add_argument("--emulated", action="store_true",
                   help="no GPU: build the CUDA source with g++ against a "
                        "thread-based CUDA emulation and run the checks on it")
    p.add_argument("--emulated-lib", default=EMULATED_LIBRARY,
                   help="where --emulated builds its library")
    p.add_argument("--quick", action="store_true",
                   help="fewer cases and dtypes (CPU mode: the test suite's "
                        "subset)")
    p.add_argument("--cases", nargs="+", default=None,
                   help="only these check cases (names as in check_cases, "
                        "e.g. random empty_rows); for compute-sanitizer")
    p.add_argument("--skip-checks", action="store_true",
                   help="GPU mode: benchmark only")
    p.add_argument("--lengths", type=int, nargs="+",
                   default=[128, 512, 1024])
    p.add_argument("--batches", type=int, nargs="+", default=[16, 64])
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--head-dim", type=int, default=64)
    p.add_argument("--dtype", default="bfloat16", choices=sorted(DTYPE_CODES))
    p.add_argument("--bidirectional", action="store_true")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--repeats", type=int, default=20)
    p.add_argument("--out-dir", default=DEFAULT_OUT_DIR)
    p.add_argument("--json", default=None)
    p.add_argument("--png", default=None)
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.cpu_reference:
        return run_cpu_reference(args)
    if args.emulated:
        return run_emulated(args)
    return run_gpu(args)


if __name__ == "__main__":
    sys.exit(main())
