"""The kernel sampler's CUDA draws and their harness, without a GPU.

custom_ops/kernels/kernel_sampler.cu.cc draws from the quadratic-kernel
tree on the GPU and promises the CPU kernel's draws, not just its
distribution. Here the CUDA source itself, compiled by g++ against the
harness's CUDA emulation (thread blocks as fibers, warp shuffles, barriers,
shared memory that starts as NaN), is run on random trees (several C, D,
leaf sizes, a non-power-of-two number of leaves, one leaf, leaf size 1,
K = 1 .. 500, D with vector tails) and compared with the TF CPU op
(tfrec_fast.ops.kernel_sampler.kernel_sampler_draw, use_fused=True) on the
same arrays: ids identical, and log_q identical bit for bit (the emulation
takes the log from the same libm as the CPU op; on a GPU log_q agrees within
float rounding). The GPU kernel mirrors the rounding of one CPU copy
(AVX-512, AVX2 + FMA, or the SSE baseline); each copy this machine runs is
compared (TFREC_FAST_CPU_ISA in fresh processes). Also: the harness's NumPy
tree matches the TF module's, the harness's checks (--emulated, and
--emulated-torch with PyTorch) pass, the draws do not depend on the
emulation's thread schedule or on where M' lives.
"""

import json
import os
import platform
import subprocess
import sys

import numpy as np
import pytest

from harness_testing import build_emulated_or_skip
from harness_testing import load_harness
from harness_testing import run_mode

ks = load_harness("kernel_sampler")
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# C, D, L, K, T, alpha
CASES = [
    (1000, 24, 6, 64, 8, 20.0),      # 167 leaves
    (1500, 13, 7, 300, 4, 50.0),     # D tail 13: fused + unfused tail parts
    (900, 27, 5, 150, 4, 20.0),      # D tail 11 (AVX-512), 3 (AVX2)
    (3000, 64, 32, 200, 4, 100.0),   # no tails, 94 leaves
    (37, 5, 1, 50, 3, 20.0),         # leaf size 1
    (100, 33, 200, 40, 3, 20.0),     # one leaf (the root)
    (777, 20, 9, 1, 16, 20.0),       # K = 1
    (2000, 40, 50, 500, 2, 10.0),    # 40 leaves, many draws per row
    (513, 8, 2, 100, 3, 1e3),        # 257 leaves, large alpha
]


def _cpu_flags():
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def cpu_isas():
    """The CPU kernel copies this machine runs (cpu_isa.cc's detection):
    names for TFREC_FAST_CPU_ISA, best first."""
    flags = _cpu_flags()
    isas = ["generic"]
    if {"avx2", "fma", "bmi2"} <= flags:
        isas.insert(0, "avx2")
        if {"avx512f", "avx512vl", "avx512dq", "avx512bw"} <= flags:
            isas.insert(0, "avx512")
    return isas


# The rounding profile (sum lanes W, fused) of each copy (GCC, x86-64).
PROFILES = {"avx512": (16, True), "avx2": (8, True), "generic": (4, False)}


def _this_process_isa():
    """The copy the TF op runs in this process (TFREC_FAST_CPU_ISA caps)."""
    isas = cpu_isas()
    cap = os.environ.get("TFREC_FAST_CPU_ISA")
    if cap in PROFILES and isas.index(cap) > 0:
        return cap
    return isas[0]


pytestmark = pytest.mark.skipif(
    platform.machine() not in ("x86_64", "AMD64"),
    reason="the rounding profiles mirrored are those of GCC on x86-64")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """(KernelLibrary, NumpyKernels) of the emulated build (built once)."""
    path = build_emulated_or_skip(
        ks, str(tmp_path_factory.mktemp("ks_emu") /
                "libtfrec_fast_kernel_sampler_emulated.so"))
    library = ks.KernelLibrary(path)
    return library, ks.NumpyKernels(library)


def _inputs(case, seed=0):
    c, d, el, k, t, alpha = case
    rng = np.random.default_rng([seed, c, d, el])
    table = (rng.normal(size=(c, d)) / np.sqrt(d)).astype(np.float32)
    query = rng.normal(size=(t, d)).astype(np.float32)
    tree = ks.build_tree_np(table, el)
    counts = ks.tree_counts(ks.tree_layout(c, d, el))
    key = rng.integers(-2 ** 31, 2 ** 31, size=2).astype(np.int32)
    return table, query, tree, counts, key


def _seed(key):
    """DrawArgs::seed of an int32 [2] key, as the op forms it."""
    return (int(np.uint32(key[0])) << 32) | int(np.uint32(key[1]))


def _emulated_draws(kernels, case, isa, seed=0):
    table, query, tree, counts, key = _inputs(case, seed)
    lanes, fused = PROFILES[isa]
    return kernels.draw(query, tree, counts, table, case[2], case[3],
                        case[5], _seed(key), lanes, fused)


# Draws of the TF CPU op for every case, as JSON on stdout (run in this
# process or, under another TFREC_FAST_CPU_ISA, in a fresh one).
TF_DRAWS = r"""
import json, sys
import numpy as np
sys.path.insert(0, sys.argv[1])
import tfrec_fast  # noqa: F401
from tfrec_fast.ops import kernel_sampler as kernel_ops
from harness_testing import load_harness
ks = load_harness("kernel_sampler")
cases = json.loads(sys.argv[2])
out = []
for case in cases:
    c, d, el, k, t, alpha = case
    rng = np.random.default_rng([0, c, d, el])
    table = (rng.normal(size=(c, d)) / np.sqrt(d)).astype(np.float32)
    query = rng.normal(size=(t, d)).astype(np.float32)
    tree = ks.build_tree_np(table, el)
    layout = kernel_ops.tree_layout(c, d, el)
    key = rng.integers(-2 ** 31, 2 ** 31, size=2).astype(np.int32)
    ids, log_q = kernel_ops.kernel_sampler_draw(
        query, tree, kernel_ops.tree_counts(layout), table, key, k, alpha,
        layout, use_fused=True)
    out.append([ids.numpy().tolist(),
                log_q.numpy().view(np.int32).tolist()])
print("DRAWS" + json.dumps(out))
"""


def _tf_draws(cases, isa=None):
    """[(ids, log_q)] of the TF CPU op per case, in a fresh process with
    TFREC_FAST_CPU_ISA=isa (None: the environment's)."""
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3",
               PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH",
                                                             ""))
    if isa is not None:
        env["TFREC_FAST_CPU_ISA"] = isa
    proc = subprocess.run(
        [sys.executable, "-c", TF_DRAWS, os.path.join(ROOT, "tests"),
         json.dumps(cases)], cwd=ROOT, env=env, capture_output=True,
        text=True, timeout=300, check=False)
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("DRAWS")]
    if proc.returncode != 0 or not lines:
        if "use_fused=True but" in proc.stderr:
            pytest.skip("op library without the kernel sampler ops")
        raise AssertionError(proc.stderr[-3000:])
    return [(np.array(ids, np.int64),
             np.array(lq, np.int32).view(np.float32))
            for ids, lq in json.loads(lines[0][len("DRAWS"):])]


def _fused_op_or_skip():
    kernel_ops = pytest.importorskip("tfrec_fast.ops.kernel_sampler")
    library = pytest.importorskip("tfrec_fast.ops._library")
    module = library.DEFAULT_LIBRARY.module()
    if module is None or not hasattr(module,
                                     "tfrec_fast_kernel_sampler_draw"):
        pytest.skip("op library without the kernel sampler ops")
    return kernel_ops


def _assert_same(got, want, what):
    ids, log_q = got
    want_ids, want_log_q = want
    np.testing.assert_array_equal(ids, want_ids, err_msg=what)
    np.testing.assert_allclose(log_q, want_log_q, rtol=0, atol=1e-5,
                               err_msg=what)
    # The emulation's log is the CPU op's libm log: every bit agrees (a
    # copy with another summation order changes thousands of these bits
    # while the ids stay put; see test_the_comparison_is_sensitive).
    np.testing.assert_array_equal(log_q.view(np.int32),
                                  want_log_q.view(np.int32), err_msg=what)


# ---------------------------------------------------------------------------
# Layout and references (no compiler needed)

def test_numpy_tree_is_the_tf_modules_tree():
    tf = pytest.importorskip("tensorflow")
    kernel_ops = pytest.importorskip("tfrec_fast.ops.kernel_sampler")
    for c, d, el, *_ in CASES[:6]:
        table, _, tree, counts, _ = _inputs((c, d, el, 1, 1, 1.0))
        layout = kernel_ops.tree_layout(c, d, el)
        assert tuple(ks.tree_layout(c, d, el))[:6] == tuple(layout)
        np.testing.assert_array_equal(counts, kernel_ops.tree_counts(layout))
        ref = kernel_ops.build_tree_reference(tf.constant(table), el).numpy()
        # float64 leaf sums in another order round to the same float32
        # almost always; internal nodes are the same float32 sums.
        np.testing.assert_allclose(tree, ref, rtol=1e-6, atol=1e-7)


def test_stream_port_matches_the_cpp_and_the_spec(emulated):
    library, _ = emulated
    records = []
    assert ks.rng_checks(records, library)


# ---------------------------------------------------------------------------
# The CUDA source under emulation against the TF CPU op

def test_emulated_draws_equal_the_tf_cpu_op(emulated):
    """This process's CPU copy (the widest one, unless TFREC_FAST_CPU_ISA
    caps it): identical ids and log_q on every case."""
    kernel_ops = _fused_op_or_skip()
    _, kernels = emulated
    isa = _this_process_isa()
    for case in CASES:
        table, query, tree, counts, key = _inputs(case)
        c, d, el, k, t, alpha = case
        layout = kernel_ops.tree_layout(c, d, el)
        ids, log_q = kernel_ops.kernel_sampler_draw(
            query, tree, counts, table, key, k, alpha, layout,
            use_fused=True)
        got = _emulated_draws(kernels, case, isa)
        _assert_same(got, (ids.numpy(), log_q.numpy()), f"{isa} {case}")
        assert got[0].min() >= 0 and got[0].max() < c


def test_emulated_draws_equal_the_cpu_op_on_other_isas(emulated):
    """The other CPU copies this machine runs, each in a fresh process with
    TFREC_FAST_CPU_ISA capping the op's pick."""
    _fused_op_or_skip()
    _, kernels = emulated
    others = [isa for isa in cpu_isas() if isa != _this_process_isa()]
    if not others:
        pytest.skip("this CPU runs one copy only")
    cases = CASES[:4]
    for isa in others:
        for case, want in zip(cases, _tf_draws(cases, isa)):
            _assert_same(_emulated_draws(kernels, case, isa), want,
                         f"{isa} {case}")


def test_the_comparison_is_sensitive(emulated):
    """Mirroring another copy's summation changes log_q bits (the sums
    differ) though ids rarely move: the bitwise log_q comparison above is
    what pins the rounding down."""
    kernel_ops = _fused_op_or_skip()
    _, kernels = emulated
    isa = _this_process_isa()
    wrong = "generic" if isa != "generic" else "avx2"
    case = CASES[1]
    table, query, tree, counts, key = _inputs(case)
    c, d, el, k, _, alpha = case
    layout = kernel_ops.tree_layout(c, d, el)
    _, log_q = kernel_ops.kernel_sampler_draw(
        query, tree, counts, table, key, k, alpha, layout, use_fused=True)
    _, got = _emulated_draws(kernels, case, wrong)
    assert np.sum(got.view(np.int32) != log_q.numpy().view(np.int32)) > 10


def test_emulated_draws_do_not_depend_on_schedule_or_smem(emulated,
                                                          monkeypatch):
    """Every thread schedule of the emulation, and M' in the workspace
    instead of shared memory (an sm_86-sized budget with D = 200), give
    the same draws."""
    _, kernels = emulated
    case = (1000, 200, 64, 120, 3, 20.0)  # M' = 80 KiB
    isa = _this_process_isa()
    base = _emulated_draws(kernels, case, isa)
    try:
        for schedule in ("lowest_first", "highest_first"):
            kernels.set_schedule(schedule)
            _assert_same(_emulated_draws(kernels, case, isa), base, schedule)
        kernels.set_schedule("round_robin")
        monkeypatch.setenv("TFREC_EMU_SHARED_BYTES", str(48 * 1024))
        _assert_same(_emulated_draws(kernels, case, isa), base,
                     "M' in the workspace")
    finally:
        kernels.set_schedule("round_robin")
    # And they are the NumPy port's (the harness's check (c)).
    table, query, tree, counts, key = _inputs(case)
    lanes, fused = PROFILES[isa]
    port = ks.draw_rows_np(query, tree, counts, table, case[2], case[3],
                           case[5], _seed(key), [0, 2], lanes, fused)
    np.testing.assert_array_equal(base[0][[0, 2]], port[0])


def test_first_non_finite_scan(emulated):
    _, kernels = emulated
    x = np.zeros(5000, np.float32)
    assert kernels.first_non_finite(x) == 2 ** 64 - 1
    x[[4000, 1234, 4999]] = [np.nan, -np.inf, np.inf]
    assert kernels.first_non_finite(x) == 1234


# ---------------------------------------------------------------------------
# The harness's own modes

def test_harness_emulated_quick_passes(capsys, emulated):
    library, _ = emulated
    lanes, fused = PROFILES[_this_process_isa()]
    args = ["--quick", "--emulated-lib", library.path, "--lanes", str(lanes)]
    _, checks = run_mode(ks, "emulated",
                         args + ([] if fused else ["--unfused"]), capsys)
    assert {"rng_port", "emulated/fit/chi_square",
            "emulated/first_non_finite",
            "emulated/non_pow2_leaves/ids_equal_numpy_port",
            "emulated/d13_tails/log_q"} <= checks


def test_harness_emulated_torch_self_test(emulated, tmp_path):
    """The GPU mode's driver (TorchKernels, PyTorch tree build and brute
    force, benchmark code, plot) on CPU tensors and the emulated kernels."""
    pytest.importorskip("torch")
    pytest.importorskip("matplotlib")
    library, _ = emulated
    assert ks.main(["--emulated-torch", "--emulated-lib", library.path,
                    "--out", str(tmp_path)]) == 0


def test_gpu_mode_without_a_gpu_exits_cleanly(capsys):
    assert ks.main(["--check-only", "--lib", "/nonexistent.so"]) == 2
    err = capsys.readouterr().err
    assert ("PyTorch" in err or "no CUDA device" in err or
            "cannot load" in err), err
