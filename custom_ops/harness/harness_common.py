"""Pieces shared by the GPU harness drivers (ragged_attention.py,
cross_entropy.py): JSON records, dtype storage and rounding, the error
measure, the emulated build (g++ against emulation/cuda_emulation.h), the C
ABI libraries, the emulation's controls and CUDA timing.

No TensorFlow; NumPy only (PyTorch where a function takes it).
"""

import ctypes
import json
import os
import statistics
import subprocess
import sys

import numpy as np

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(HERE))
DEFAULT_LIBRARY = os.path.join(HERE, "build", "libtfrec_fast_kernels.so")
DEFAULT_OUT_DIR = os.path.join(HERE, "build", "results")

# The kernels' element-type codes (their *GpuType enums).
DTYPE_CODES = {"float32": 0, "float16": 1, "bfloat16": 2}
# Normalised max error (see normalized_error) allowed per dtype: a few ulps
# of the output type.
TOLERANCES = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1.6e-2}


# ---------------------------------------------------------------------------
# Records

def emit(record, sink=None):
    """Prints `record` as one JSON line (and appends it to `sink`)."""
    print(json.dumps(record, sort_keys=True), flush=True)
    if sink is not None:
        sink.append(record)


def emit_summary(kind, ok, records, **extra):
    """The closing record of a mode: how many checks ran, which failed."""
    emit(dict({"summary": kind, "ok": bool(ok), "checks": len(records),
               "failed": [r["check"] for r in records
                          if r.get("ok") is False]}, **extra))


# ---------------------------------------------------------------------------
# Element types

def round_to(x, dtype):
    """float32 values rounded to `dtype` (round to nearest even), as float32
    (a copy; NaN stays NaN)."""
    x = np.asarray(x, np.float32)
    if dtype == "float32":
        return x.copy()
    if dtype == "float16":
        return x.astype(np.float16).astype(np.float32)
    bits = x.view(np.uint32).astype(np.uint64)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16 << 16
    out = rounded.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, out).astype(np.float32)


def storage_dtype(dtype):
    """The NumPy dtype the kernels' `dtype` values are stored in (uint16
    holds bfloat16 bits)."""
    return {"float32": np.float32, "float16": np.float16,
            "bfloat16": np.uint16}[dtype]


def encode(x, dtype):
    """float32 values (already rounded to dtype) -> the kernels' storage."""
    x = np.ascontiguousarray(x, np.float32)
    if dtype == "float32":
        return x
    if dtype == "float16":
        return x.astype(np.float16)
    return (round_to(x, "bfloat16").view(np.uint32) >> 16).astype(np.uint16)


def decode(x, dtype):
    """The kernels' storage -> float32."""
    if dtype == "bfloat16":
        return (np.asarray(x).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(x, np.float32)


def nan_array(shape, storage):
    """NaNs in a storage dtype (uint16 holds bfloat16 bits)."""
    if storage == np.uint16:
        return np.full(shape, 0x7FC0, np.uint16)
    return np.full(shape, np.nan, storage)


def normalized_error(x, ref):
    """max |x - ref| / max(1, max |ref|); where ref is not finite, x must
    be the same (else inf); inf for a non-finite x or another shape."""
    x = np.asarray(x, np.float64)
    ref = np.asarray(ref, np.float64)
    if x.shape != ref.shape:
        return float("inf")
    if x.size == 0:
        return 0.0
    bad_ref = ~np.isfinite(ref)
    if np.any(bad_ref):
        same = (np.isnan(x) & np.isnan(ref)) | (x == ref)
        if not np.all(same[bad_ref]):
            return float("inf")
        x, ref = x[~bad_ref], ref[~bad_ref]
        if x.size == 0:
            return 0.0
    if not np.all(np.isfinite(x)):
        return float("inf")
    return float(np.max(np.abs(x - ref)) / max(1.0, np.max(np.abs(ref))))


# ---------------------------------------------------------------------------
# Emulated build: the .cu.cc files compiled by g++ (emulation/)

def cuda_include_dirs():
    """Directories with cuda_runtime.h: TensorFlow's copy, then toolkits."""
    import importlib.util  # pylint: disable=import-outside-toplevel
    dirs = []
    if os.environ.get("CUDA_INCLUDE"):
        dirs.append(os.environ["CUDA_INCLUDE"])
    spec = importlib.util.find_spec("tensorflow")
    for base in (spec.submodule_search_locations or []) if spec else []:
        dirs.append(os.path.join(base, "include", "third_party", "gpus",
                                 "cuda", "include"))
    for home in (os.environ.get("CUDA_HOME"), "/usr/local/cuda"):
        if home:
            dirs.append(os.path.join(home, "include"))
    return [d for d in dirs
            if os.path.isfile(os.path.join(d, "cuda_runtime.h"))]


# Sources every emulated library depends on (besides its own).
EMULATION_SOURCES = [
    os.path.join(HERE, "emulation", "cuda_emulation.h"),
    os.path.join(HERE, "emulation", "cuda_runtime_stubs.h"),
    os.path.join(ROOT, "custom_ops", "kernels", "gpu_kernel_helpers.cu.h"),
]


def build_emulated_library(path, sources, cxx=None):
    """g++ build of sources[0] (an emulation/*_emulated.cc) into the shared
    library `path`, if missing or older than any of `sources` (the files it
    includes) or EMULATION_SOURCES. Returns `path`."""
    if os.path.isfile(path) and all(
            os.path.getmtime(path) >= os.path.getmtime(src)
            for src in list(sources) + EMULATION_SOURCES):
        return path
    includes = cuda_include_dirs()
    if not includes:
        raise RuntimeError("no cuda_runtime.h found (TensorFlow's bundled "
                           "CUDA headers or a CUDA toolkit; set "
                           "CUDA_INCLUDE)")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = path + f".{os.getpid()}.tmp"
    cmd = [cxx or os.environ.get("CXX", "g++"), "-std=c++20", "-O2", "-fPIC",
           "-shared", "-Wl,-Bsymbolic", "-I" + ROOT, "-I" + includes[0],
           "-Wall", "-Wextra", "-Wno-unknown-pragmas", sources[0], "-o", tmp]
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError("emulated build failed:\n" + " ".join(cmd) +
                           "\n" + proc.stderr[-4000:])
    os.replace(tmp, path)
    return path


# ---------------------------------------------------------------------------
# The kernel libraries' C ABI (real or emulated)

class CApiLibrary:
    """A kernel library's C ABI (custom_ops/harness/*_capi.cc): the
    functions `<prefix>abi_version` (must be 1) and `<prefix>error_string`;
    subclasses declare the rest on `self.lib`."""

    def __init__(self, path, prefix):
        if not os.path.isfile(path):
            raise FileNotFoundError(
                f"{path} not found: run custom_ops/harness/build.sh")
        self.path = path
        self.prefix = prefix
        lib = ctypes.CDLL(path)
        getattr(lib, prefix + "abi_version").restype = ctypes.c_int
        if getattr(lib, prefix + "abi_version")() != 1:
            raise RuntimeError(f"{path}: unexpected ABI version")
        error_string = getattr(lib, prefix + "error_string")
        error_string.restype = ctypes.c_char_p
        error_string.argtypes = [ctypes.c_int]
        self.lib = lib

    def check(self, err, what):
        """Raises RuntimeError for a non-zero CUDA error code."""
        if err != 0:
            message = getattr(self.lib, self.prefix + "error_string")(err)
            raise RuntimeError(f"{what} failed: CUDA error {err} "
                               f"({message!r})")


class EmulationControls:
    """The emulation's controls of an emulated library
    (emulation/cuda_runtime_stubs.h)."""

    SCHEDULES = {"round_robin": 0, "lowest_first": 1, "highest_first": 2}

    def __init__(self, library):
        self.lib = library
        self.lib.lib.tfrec_emu_set_schedule.restype = ctypes.c_int
        self.lib.lib.tfrec_emu_set_schedule.argtypes = [ctypes.c_int]
        self.lib.lib.tfrec_emu_set_shared_fill.restype = None
        self.lib.lib.tfrec_emu_set_shared_fill.argtypes = [ctypes.c_int]

    def set_schedule(self, name):
        """Order of the emulated threads: see emulation/cuda_emulation.h."""
        if self.lib.lib.tfrec_emu_set_schedule(self.SCHEDULES[name]) != 0:
            raise ValueError(name)

    def set_shared_fill(self, byte):
        """Byte every block's shared memory starts with (0xFF: NaNs)."""
        self.lib.lib.tfrec_emu_set_shared_fill(byte)


# ---------------------------------------------------------------------------
# PyTorch (GPU mode)

def cuda_torch(hint):
    """PyTorch with a visible CUDA device, or None after saying on stderr
    why not (`hint`: what to try instead, e.g. "try --cpu-reference")."""
    try:
        import torch  # pylint: disable=import-outside-toplevel
    except ImportError:
        print(f"PyTorch is needed for the GPU mode ({hint})",
              file=sys.stderr)
        return None
    if not torch.cuda.is_available():
        print(f"no CUDA device visible to PyTorch ({hint})", file=sys.stderr)
        return None
    return torch


def stream_handle(torch, device):
    """The current CUDA stream of `device` for the C ABI (None for CPU
    tensors, i.e. the emulated library)."""
    if device.type != "cuda":
        return None
    return torch.cuda.current_stream(device).cuda_stream


def time_cuda(torch, fn, warmup, repeats):
    """Median seconds of fn() by CUDA events, after `warmup` calls."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start = torch.cuda.Event(enable_timing=True)
        end = torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    return statistics.median(times)
