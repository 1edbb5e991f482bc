"""Runs a check under each capped instruction set of the CPU kernels.

The kernels' vector code is compiled for AVX-512, AVX2 and the baseline
target and picked once per process (custom_ops/kernels/cpu_isa.h);
TFREC_FAST_CPU_ISA caps the pick, so fresh processes check every path this
CPU can run. Shared by the op tests (test_ragged_attention_op.py,
test_cut_cross_entropy_op.py)."""

import os
import subprocess
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def assert_passes_on_every_isa(script, isas=("generic", "avx2"),
                               timeout=300):
    """Runs the Python `script` (cwd: the repository root) once per
    TFREC_FAST_CPU_ISA in `isas`, in parallel fresh processes; each must
    exit 0 and print "ok"."""
    procs = []
    for isa in isas:
        env = dict(os.environ, TFREC_FAST_CPU_ISA=isa, TF_CPP_MIN_LOG_LEVEL="3",
                   PYTHONPATH=ROOT + os.pathsep + os.environ.get(
                       "PYTHONPATH", ""))
        procs.append((isa, subprocess.Popen(
            [sys.executable, "-c", script], cwd=ROOT, env=env,
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)))
    for isa, proc in procs:
        stdout, stderr = proc.communicate(timeout=timeout)
        assert proc.returncode == 0 and "ok" in stdout, (isa, stderr[-3000:])
