"""Shared by the tests of the GPU harness (test_harness_cpu.py,
test_harness_cross_entropy_cpu.py): loading a harness driver from
custom_ops/harness/, running its main() and reading its JSON records, and
building its emulated kernel library (g++ against the harness's CUDA
emulation), or skipping where that cannot be built."""

import importlib.util
import json
import os
import shutil

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def load_harness(name):
    """custom_ops/harness/<name>.py as a module (the harness is not a
    package)."""
    path = os.path.join(ROOT, "custom_ops", "harness", name + ".py")
    spec = importlib.util.spec_from_file_location(name + "_harness", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def run_mode(harness, mode, args, capsys):
    """harness.main(["--" + mode] + args), which must succeed: (its JSON
    records, the set of their check names). The last record is the mode's
    summary, which must say ok."""
    assert harness.main(["--" + mode] + list(args)) == 0
    records = [json.loads(line)
               for line in capsys.readouterr().out.splitlines()
               if line.startswith("{")]
    assert records[-1]["summary"] == mode and records[-1]["ok"], records[-1]
    return records, {r["check"] for r in records if "check" in r}


def emulation_unavailable(harness):
    """Why the emulated library cannot be built here, or None."""
    if shutil.which(os.environ.get("CXX", "g++")) is None:
        return "no C++ compiler"
    if not harness.harness_common.cuda_include_dirs():
        return "no cuda_runtime.h (TensorFlow's bundled CUDA headers)"
    return None


def build_emulated_or_skip(harness, path):
    """harness.build_emulated_library(path), or pytest.skip where the
    emulation cannot be built (no compiler, no CUDA headers, no _Float16)."""
    reason = emulation_unavailable(harness)
    if reason:
        pytest.skip(reason)
    try:
        return harness.build_emulated_library(path)
    except RuntimeError as e:
        if "_Float16" in str(e):
            pytest.skip("compiler without _Float16")
        raise
