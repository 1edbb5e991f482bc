"""Builds the TensorFlow op library from custom_ops/ with TF's custom-op toolchain.

One way to build the ops, used by `pip install` (setup.py) and runnable by
hand while developing:

    python custom_ops/build.py --out tfrec_fast/ops

Compiles every `custom_ops/tf/*.cc` and `custom_ops/kernels/*.cc` with g++
(C++17, the flags from `tf.sysconfig`) into `_tfrec_fast_ops.so`, and writes
`_build_info.json` beside it (the TensorFlow version built against, whether GPU
kernels are in). When a CUDA 12 nvcc is found (see `find_nvcc`), `*.cu.cc`
files are compiled with `-DGOOGLE_CUDA=1` and linked in; without one, the GPU
part is skipped with a message and the library is CPU-only.

Environment:
  TFREC_FAST_NVCC: path of the nvcc to use (must be CUDA 12.x).
  TFREC_FAST_CUDA=0: never build GPU kernels.
  TFREC_FAST_CUDA_ARCHS: e.g. "80;90" (default "80;90").
"""

import argparse
import concurrent.futures
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
        seen.append(f"{nvcc} (CUDA {version})")
    if seen:
        return None, ("no CUDA 12 nvcc; found only " + ", ".join(seen) +
                      " (TensorFlow 2.21 needs CUDA 12: "
                      "pip install nvidia-cuda-nvcc-cu12)")
    return None, "no nvcc found (pip install nvidia-cuda-nvcc-cu12)"


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
    common = ["-I" + ROOT] + compile_flags + ["-O3", "-fPIC"]
    if nvcc:
        common.append("-DGOOGLE_CUDA=1")
    cxx_flags = common + ["-Wno-deprecated-declarations",
                          "-Wno-interference-size"]
    cc_files = (_sources("tf", ".cc", exclude_suffix=".cu.cc") +
                _sources("kernels", ".cc", exclude_suffix=".cu.cc"))
    cu_files = _sources("tf", ".cu.cc") + _sources("kernels", ".cu.cc")
    os.makedirs(out_dir, exist_ok=True)
    with tempfile.TemporaryDirectory() as tmp:
        jobs_list = []
        for i, src in enumerate(cc_files):
            obj = os.path.join(tmp, f"{i}.o")
            jobs_list.append(([cxx, "-c", src, "-o", obj] + cxx_flags, obj))
        if nvcc:
            archs = os.environ.get("TFREC_FAST_CUDA_ARCHS", "80;90").split(";")
            gencode = [f"-gencode=arch=compute_{a},code=sm_{a}" for a in archs]
            for i, src in enumerate(cu_files):
                obj = os.path.join(tmp, f"cu{i}.o")
                cmd = ([nvcc, "-c", "-x", "cu", src, "-o", obj,
                        "--expt-relaxed-constexpr", "-Xcompiler", "-fPIC",
                        "-std=c++17"] + gencode +
                       [f for f in common if f not in ("-fPIC", "--std=c++17")])
                jobs_list.append((cmd, obj))
        elif cu_files:
            _log(f"skipping {len(cu_files)} GPU source(s): {nvcc_info}")
        else:
            _log(f"no GPU sources yet; nvcc: "
                 f"{nvcc if nvcc else nvcc_info}")
        workers = jobs or os.cpu_count() or 1
        with concurrent.futures.ThreadPoolExecutor(workers) as pool:
            list(pool.map(lambda job: _run(job[0]), jobs_list))
        objects = [obj for _, obj in jobs_list]
        library = os.path.join(out_dir, LIBRARY_NAME)
        link = [cxx, "-shared", "-o", library] + objects + link_flags
        if nvcc and cu_files:
            cudart = os.path.join(os.path.dirname(os.path.dirname(nvcc)),
                                  "lib")
            link += ["-L" + cudart, "-lcudart"]
        _run(link)
    info = {
        "tf_version_built": tf_version,
        "gpu_ops": bool(nvcc and cu_files),
        "nvcc": nvcc,
        "cuda_version": ".".join(map(str, nvcc_info)) if nvcc else None,
        "sources": [os.path.relpath(f, ROOT) for f in cc_files + cu_files],
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
