#!/usr/bin/env bash
# Offline Bazel build of the op library (CPU kernels only); see docs/bazel.md.
#   custom_ops/bazel_build.sh [OUT_DIR]     (default OUT_DIR: tfrec_fast/ops)
# TF_PYTHON: the python whose pip TensorFlow to build against (default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
export TF_PYTHON="${TF_PYTHON:-$(command -v python3)}"
out="${1:-tfrec_fast/ops}"
bazel build //:_tfrec_fast_ops.so
mkdir -p "$out"
install -m 0755 bazel-bin/_tfrec_fast_ops.so "$out/_tfrec_fast_ops.so"
# The same _build_info.json that custom_ops/build.py writes (loader checks it).
TF_CPP_MIN_LOG_LEVEL=3 "$TF_PYTHON" - "$out" <<'PY'
import json, os, sys
import tensorflow as tf
info = {"tf_version_built": tf.__version__, "gpu_ops": False, "nvcc": None,
        "cuda_version": None, "builder": "bazel"}
with open(os.path.join(sys.argv[1], "_build_info.json"), "w") as f:
    json.dump(info, f, indent=2)
PY
echo "installed $out/_tfrec_fast_ops.so (TF_PYTHON=$TF_PYTHON)"
