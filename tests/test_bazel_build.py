"""The Bazel BUILD really builds the op library (when Bazel is installed).

CI installs Debian's bazel-bootstrap + bazel-rules-java (.ci/run); elsewhere
this test is skipped. See docs/bazel.md.
"""

import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.skipif(shutil.which("bazel") is None,
                    reason="bazel not installed (apt-get install "
                           "bazel-bootstrap bazel-rules-java)")
def test_bazel_builds_a_loadable_op_library(tmp_path):
    env = dict(os.environ, TF_PYTHON=sys.executable)
    build = subprocess.run(
        ["bash", os.path.join(ROOT, "custom_ops", "bazel_build.sh"),
         str(tmp_path)], cwd=ROOT, env=env, capture_output=True, text=True,
        timeout=900, check=False)
    assert build.returncode == 0, build.stderr[-3000:]
    # Load it in a fresh process (this one already has the pip-built copy,
    # and two copies of the same kernels cannot be registered together).
    check = subprocess.run(
        [sys.executable, "-c",
         "import sys, tfrec_fast\n"
         "from tfrec_fast.ops import _library\n"
         "lib = _library.OpLibrary(sys.argv[1])\n"
         "assert lib.build_info()['cpu_ops'], lib.build_info()\n"
         "import tensorflow as tf\n"
         "out = lib.module().tfrec_fast_validate_ids(tf.constant([1, 2]),\n"
         "    tf.constant(3, tf.int64))\n"
         "print(out.numpy().tolist())", str(tmp_path)],
        cwd=ROOT, env=dict(env, TF_CPP_MIN_LOG_LEVEL="3"),
        capture_output=True, text=True, timeout=300, check=False)
    assert check.returncode == 0, check.stderr[-3000:]
    assert "[1, 2]" in check.stdout
