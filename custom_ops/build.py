"""Builds the TensorFlow op library from custom_ops/ with TF's custom-op toolchain.

One way to build the ops, used by `pip install` (setup.py) and runnable by
hand while developing:

    python custom_ops/build.py --out tfrec_fast/ops

Compiles every `custom_ops/tf/*.cc` and `custom_ops/kernels/*.cc` with g++
(C++17, the flags from `tf.sysconfig`) into `_tfrec_fast_ops.so`, and writes
`_build_info.json` beside it (the TensorFlow version built against, whether GPU
kernels are in). When a CUDA 12 nvcc is found (see `find_nvcc`), `*.cu.cc`
files are compiled with nvcc, every C++ file with `-DGOOGLE_CUDA=1` (which
turns on the GPU OpKernels, e.g. `custom_ops/tf/validate_ids_op_gpu.cc`), and
all are linked in; without one, the GPU part is skipped with a message and the
library is CPU-only.

The CUDA runtime: TensorFlow's GPU wheels export the CUDA runtime API from
libtensorflow_framework.so.2 (a stub that loads libcudart.so.12 on first use,
from nvidia-cuda-runtime-cu12), so the GPU kernels link against that and the
library has no libcudart dependency of its own: it loads on machines without
a GPU or a CUDA runtime, and shares TensorFlow's runtime where there is one.
Only if that TensorFlow does not export it is libcudart.so.12 linked directly.

Getting a CUDA 12 nvcc: PyPI's nvidia-cuda-nvcc-cu12 wheels (12.0 to 12.9)
ship ptxas but not the nvcc driver, so they are not enough on their own; use
a CUDA 12 toolkit (NVIDIA's installer or apt repository, Debian's
nvidia-cuda-toolkit) and point TFREC_FAST_NVCC at its nvcc.

Environment:
  TFREC_FAST_NVCC: path of the nvcc to use (must be CUDA 12.x).
  TFREC_FAST_CUDA=0: never build GPU kernels.
  TFREC_FAST_CUDA_ARCHS: e.g. "80;90" (default "80;90").
  TFREC_FAST_CUDART=shared: link libcudart.so.12 directly even when
    TensorFlow exports the runtime.
"""

import argparse
import concurrent.futures
import ctypes
import glob
import importlib.util
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LIBRARY_NAME = "_tfrec_fast_ops.so"
BUILD_INFO_NAME = "_build_info.json"
# TensorFlow 2.21 wheels are built with CUDA 12.5; kernels must match 12.x.
REQUIRED_CUDA_MAJOR = 12


def _log(msg):
    print(f"[tfrec_fast build] {msg}", file=sys.stderr, flush=True)


def _tf_flags():
    # Imported here: this file is also read by setup.py before TF may exist.
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    return (tf.__version__, tf.sysconfig.get_compile_flags(),
            tf.sysconfig.get_link_flags())


def _nvcc_version(nvcc):
    try:
        out = subprocess.run([nvcc, "--version"], capture_output=True,
                             text=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        return None
    match = re.search(r"release (\d+)\.(\d+)", out)
    return (int(match.group(1)), int(match.group(2))) if match else None


def _nvcc_candidates():
    if os.environ.get("TFREC_FAST_NVCC"):
        yield os.environ["TFREC_FAST_NVCC"]
    # PyPI's nvidia-cuda-nvcc-cu12 installs nvcc under nvidia/cuda_nvcc/bin.
    spec = importlib.util.find_spec("nvidia")
    for base in (spec.submodule_search_locations or []) if spec else []:
        yield os.path.join(base, "cuda_nvcc", "bin", "nvcc")
    on_path = shutil.which("nvcc")
    if on_path:
        yield on_path
    yield "/usr/local/cuda/bin/nvcc"


def find_nvcc():
    """Returns (path, (major, minor)) of a CUDA 12 nvcc, or (None, reason)."""
    if os.environ.get("TFREC_FAST_CUDA", "1") == "0":
        return None, "TFREC_FAST_CUDA=0"
    seen = []
    for nvcc in _nvcc_candidates():
        if not os.path.isfile(nvcc):
            continue
        version = _nvcc_version(nvcc)
        if version and version[0] == REQUIRED_CUDA_MAJOR:
            return nvcc, version
        seen.append(f"{nvcc} (CUDA "
                    f"{'.'.join(map(str, version)) if version else '?'})")
    hint = ("install a CUDA 12 toolkit and set TFREC_FAST_NVCC to its nvcc; "
            "PyPI's nvidia-cuda-nvcc-cu12 has no nvcc binary")
    if seen:
        return None, ("no CUDA 12 nvcc; found only " + ", ".join(seen) +
                      f" (TensorFlow 2.21 needs CUDA 12: {hint})")
    return None, f"no nvcc found ({hint})"


def _nvidia_pip_dirs(package):
    """site-packages/nvidia/<package> directories that exist."""
    spec = importlib.util.find_spec("nvidia")
    bases = (spec.submodule_search_locations or []) if spec else []
    return [os.path.join(b, package) for b in bases
            if os.path.isdir(os.path.join(b, package))]


def _cuda_include_dir(nvcc):
    """A directory with cuda_runtime_api.h for the g++-compiled GPU kernels.

    TensorFlow's own copy first (the CUDA version it was built with), then
    the toolkit of `nvcc`, then PyPI's nvidia-cuda-runtime-cu12.
    """
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    candidates = [
        os.path.join(tf.sysconfig.get_include(), "third_party", "gpus",
                     "cuda", "include"),
        os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include"),
    ] + [os.path.join(d, "include") for d in _nvidia_pip_dirs("cuda_runtime")]
    for path in candidates:
        if os.path.isfile(os.path.join(path, "cuda_runtime_api.h")):
            return path
    raise RuntimeError("no cuda_runtime_api.h found in " +
                       ", ".join(candidates))


def _cccl_flags(nvcc):
    """-isystem for CCCL's `nv/target` when nvcc's toolkit lacks it.

    cuda_fp16.h / cuda_bf16.h include <nv/target> (CCCL). Some CUDA 12
    toolkit assemblies (e.g. Debian's nvidia-cuda-toolkit extracted without
    nvidia-cuda-dev) omit it; TensorFlow ships the CCCL headers it was built
    with, which then fill the gap (searched after the toolkit's own).
    """
    toolkit = os.path.join(os.path.dirname(os.path.dirname(nvcc)), "include")
    if os.path.isfile(os.path.join(toolkit, "nv", "target")):
        return []
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    cccl = os.path.join(tf.sysconfig.get_include(), "third_party", "gpus",
                        "cuda", "libcudacxx", "include")
    return ["-isystem", cccl] if os.path.isfile(
        os.path.join(cccl, "nv", "target")) else []


def _tf_exports_cudart(link_flags):
    """Whether libtensorflow_framework exports the CUDA runtime API."""
    lib_dirs = [f[2:] for f in link_flags if f.startswith("-L")]
    names = [f[3:] for f in link_flags if f.startswith("-l:")]
    for lib_dir in lib_dirs:
        for name in names:
            path = os.path.join(lib_dir, name)
            if "tensorflow_framework" not in name or not os.path.isfile(path):
                continue
            try:
                lib = ctypes.CDLL(path)
            except OSError:
                return False
            return all(hasattr(lib, sym) for sym in (
                "__cudaRegisterFatBinary", "__cudaRegisterFatBinaryEnd",
                "__cudaRegisterFunction", "__cudaPushCallConfiguration",
                "__cudaPopCallConfiguration", "cudaLaunchKernel",
                "cudaMemcpyAsync", "cudaMemsetAsync", "cudaStreamSynchronize",
                "cudaGetLastError", "cudaGetErrorString", "cudaGetErrorName",
                "cudaFuncSetAttribute", "cudaSetDevice", "cudaGetDevice",
                "cudaDeviceGetAttribute"))
    return False


def _cudart_link_flags(nvcc, link_flags):
    """Link flags for the CUDA runtime; returns (flags, description)."""
    if (os.environ.get("TFREC_FAST_CUDART") != "shared" and
            _tf_exports_cudart(link_flags)):
        return [], "from libtensorflow_framework.so.2 (TensorFlow's stub)"
    toolkit = os.path.dirname(os.path.dirname(nvcc))
    lib_dirs = ([os.path.join(d, "lib")
                 for d in _nvidia_pip_dirs("cuda_runtime")] +
                [os.path.join(toolkit, "lib64"), os.path.join(toolkit, "lib")])
    for lib_dir in lib_dirs:
        if os.path.isfile(os.path.join(lib_dir, "libcudart.so.12")):
            # Installed beside TensorFlow: site-packages/tfrec_fast/ops/ ->
            # site-packages/nvidia/cuda_runtime/lib; else where it was found.
            rpath = "$ORIGIN/../../nvidia/cuda_runtime/lib:" + lib_dir
            # Before TensorFlow's libraries, and kept even under
            # --as-needed, so its symbols bind to libcudart.
            return (["-L" + lib_dir, "-Wl,--push-state,--no-as-needed",
                     "-l:libcudart.so.12", "-Wl,--pop-state",
                     "-Wl,-rpath," + rpath],
                    os.path.join(lib_dir, "libcudart.so.12"))
    raise RuntimeError("TensorFlow does not export the CUDA runtime and no "
                       "libcudart.so.12 was found in " + ", ".join(lib_dirs) +
                       " (pip install nvidia-cuda-runtime-cu12)")


def _sources(pattern_dir, suffix, exclude_suffix=None):
    files = sorted(glob.glob(os.path.join(ROOT, "custom_ops", pattern_dir,
                                          "*" + suffix)))
    if exclude_suffix:
        files = [f for f in files if not f.endswith(exclude_suffix)]
    return files


def _run(cmd):
    proc = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if proc.returncode != 0:
        raise RuntimeError("command failed:\n  " + " ".join(cmd) + "\n" +
                           proc.stdout + proc.stderr)


def build_op_library(out_dir, jobs=None):
    """Compiles and links the op library into `out_dir`; returns its path."""
    tf_version, compile_flags, link_flags = _tf_flags()
    nvcc, nvcc_info = find_nvcc()
    cxx = os.environ.get("CXX", "g++")
    cc_files = (_sources("tf", ".cc", exclude_suffix=".cu.cc") +
                _sources("kernels", ".cc", exclude_suffix=".cu.cc"))
    cu_files = _sources("tf", ".cu.cc") + _sources("kernels", ".cu.cc")
    if nvcc and not cu_files:
        _log(f"no GPU sources; nvcc: {nvcc}")
        nvcc = None
    common = ["-I" + ROOT] + compile_flags + ["-O3", "-fPIC"]
    if nvcc:
        common.append("-DGOOGLE_CUDA=1")
    cxx_flags = common + ["-Wno-deprecated-declarations",
                          "-Wno-interference-size"]
    if nvcc:
        # Only for g++: nvcc uses its own toolkit's headers.
        cxx_flags.append("-I" + _cuda_include_dir(nvcc))
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        jobs_list = []
        for i, src in enumerate(cc_files):
            obj = os.path.join(tmp, f"{i}.o")
            jobs_list.append(([cxx, "-c", src, "-o", obj] + cxx_flags, obj))
        if nvcc:
            archs = [a.strip() for a in os.environ.get(
                "TFREC_FAST_CUDA_ARCHS", "80;90").split(";") if a.strip()]
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            # PTX of the newest arch too, for the driver to JIT on newer GPUs.
            gencode.append(f"-gencode=arch=compute_{archs[-1]},"
                           f"code=compute_{archs[-1]}")
            for i, src in enumerate(cu_files):
                obj = os.path.join(tmp, f"cu{i}.o")
                cmd = ([nvcc, "-c", "-x", "cu", src, "-o", obj,
                        "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
                        "-std=c++17"] + gencode +
                       [f for f in common if f not in ("-fPIC", "--std=c++17")]
                       + _cccl_flags(nvcc))
                jobs_list.append((cmd, obj))
        elif cu_files:
            _log(f"skipping {len(cu_files)} GPU source(s), building CPU "
                 f"kernels only: {nvcc_info}")
        workers = jobs or os.cpu_count() or 1
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda job: _run(job[0]), jobs_list))
        objects = [obj for _, obj in jobs_list]
        library = os.path.join(out_dir, LIBRARY_NAME)
        cudart_flags, cudart = [], None
        if nvcc:
            cudart_flags, cudart = _cudart_link_flags(nvcc, link_flags)
            _log(f"GPU kernels for sm_{', sm_'.join(archs)}; CUDA runtime "
                 f"{cudart}")
        _run([cxx, "-shared", "-o", library] + objects + cudart_flags +
             link_flags)
    info = {
        "tf_version_built": tf_version,
        "gpu_ops": bool(nvcc),
        "nvcc": nvcc,
        "cuda_version": ".".join(map(str, nvcc_info)) if nvcc else None,
        "cudart": cudart,
        "sources": [os.path.relpath(f, ROOT)
                    for f in cc_files + (cu_files if nvcc else [])],
    }
    with open(os.path.join(out_dir, BUILD_INFO_NAME), "w") as f:
        json.dump(info, f, indent=2)
    _log(f"built {library} against TensorFlow {tf_version} "
         f"({len(cc_files)} CPU, {len(cu_files) if nvcc else 0} GPU sources)")
    return library


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=os.path.join(ROOT, "tfrec_fast",
                                                      "ops"))
    parser.add_argument("--jobs", type=int, default=None)
    args = parser.parse_args()
    build_op_library(args.out, args.jobs)


if __name__ == "__main__":
    main()
