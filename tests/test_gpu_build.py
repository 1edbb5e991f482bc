"""The GPU build path: nvcc-compiled kernels linked into the op library.

Runs only where `custom_ops/build.py` finds a CUDA 12 nvcc (TFREC_FAST_NVCC,
or one on PATH); skipped elsewhere. Builds into a temporary directory and
checks that the library holds the GPU kernel (SASS for sm_90), registers the
GPU OpKernel, and still loads and runs on the CPU in a machine without a GPU.
Where a GPU is visible, it also runs the op there and checks that the GPU
kernel gives the CPU kernel's answers and error messages.
"""

import importlib.util
import json
import os
import shutil
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _load_build_module():
    spec = importlib.util.spec_from_file_location(
        "tfrec_fast_build", os.path.join(ROOT, "custom_ops", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


build = _load_build_module()
NVCC, NVCC_INFO = build.find_nvcc()
pytestmark = pytest.mark.skipif(
    NVCC is None, reason=f"no CUDA 12 nvcc, GPU kernels not built: {NVCC_INFO}")

# Run in a fresh process: this one may already hold the in-tree library, and
# the same kernels cannot be registered twice in one process.
CHECK = r"""
import json, sys
import tensorflow as tf
from tensorflow.python.framework import kernels
lib = tf.load_op_library(sys.argv[1])
registered = sorted(
    (k.device_type, k.constraint[0].allowed_values.list.type[0],
     tuple(k.host_memory_arg))
    for k in kernels.get_registered_kernels_for_op("TfrecFastValidateIds").kernel)
out = {"kernels": registered,
       "gpus": len(tf.config.list_physical_devices("GPU"))}

def run(device, ids, dtype, num_items):
    with tf.device(device):
        try:
            return lib.tfrec_fast_validate_ids(
                tf.constant(ids, dtype), tf.constant(num_items, tf.int64),
                arg_name="item_ids").numpy().tolist()
        except tf.errors.InvalidArgumentError as e:
            return e.message.split("}} ")[-1].split(" [Op:")[0]

cases = [([[1, 2], [0, 4]], 5), ([[1, 2], [7, 4]], 5), ([[1, -1], [7, 4]], 5),
         (list(range(100000)) + [-3], 100000), ([], 0)]
devices = ["/CPU:0"] + (["/GPU:0"] if out["gpus"] else [])
out["results"] = {d: [run(d, ids, dt, c) for ids, c in cases
                      for dt in (tf.int32, tf.int64)] for d in devices}
print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def gpu_library(tmp_path_factory):
    out = tmp_path_factory.mktemp("gpu_build")
    return build.build_op_library(str(out))


def test_library_holds_the_gpu_kernel(gpu_library):
    info = json.load(open(os.path.join(os.path.dirname(gpu_library),
                                       build.BUILD_INFO_NAME)))
    assert info["gpu_ops"] is True
    assert info["cuda_version"].startswith("12.")
    assert "custom_ops/kernels/validate_ids.cu.cc" in info["sources"]
    nm = subprocess.run(["nm", "-DC", "--defined-only", gpu_library],
                        capture_output=True, text=True, check=True).stdout
    assert "FirstOutOfRangeKernel<int>" in nm
    assert "FirstOutOfRangeKernel<long>" in nm
    cuobjdump = os.path.join(os.path.dirname(NVCC), "cuobjdump")
    if os.path.isfile(cuobjdump):
        elf = subprocess.run([cuobjdump, "--list-elf", gpu_library],
                             capture_output=True, text=True,
                             check=True).stdout
        assert "sm_90" in elf, elf


def test_gpu_library_loads_registers_and_matches_cpu(gpu_library):
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run([sys.executable, "-c", CHECK, gpu_library],
                          cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    kernels = {tuple(k[:2]) + (tuple(k[2]),) for k in out["kernels"]}
    # DataType enum: 3 = int32, 9 = int64.
    for dtype in (3, 9):
        assert ("CPU", dtype, ()) in kernels
        assert ("GPU", dtype, ("num_items",)) in kernels
    cpu = out["results"]["/CPU:0"]
    assert cpu[0] == [[1, 2], [0, 4]]
    assert cpu[2] == ("item_ids[1, 0] = 7 is out of range [0, 5): the first "
                      "bad id is at flat position 2 of item_ids with shape "
                      "[2,2]")
    assert cpu[4].startswith("item_ids[0, 1] = -1 is out of range")
    assert cpu[6].startswith("item_ids[100000] = -3 is out of range")
    if out["gpus"]:
        assert out["results"]["/GPU:0"] == cpu
