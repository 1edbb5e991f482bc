"""The fused cross-entropy GPU kernels and their harness, without a GPU.

custom_ops/harness/cross_entropy.py checks the CUDA kernels of
cut_cross_entropy.cu.cc and cce_minus.cu.cc against PyTorch on a GPU. Here:
the CUDA sources themselves, compiled by g++ against the harness's CUDA
emulation (fibers as threads, emulated wmma, shared memory that starts as
NaN), against a float64 NumPy brute force (every mode: full catalog, given
per-row / shared, uniform and unigram negatives generated in the kernel;
float32 / float16 / bfloat16; tensor-core and SIMT paths; adversarial
sizes); the kernels' generated negatives against a NumPy and a Python-int
port of counter_rng.h (and TensorFlow's, where importable); the harness's
CPU mode; a planted bug must fail. PyTorch parts skip without PyTorch.
"""

import numpy as np
import pytest

from harness_testing import build_emulated_or_skip
from harness_testing import load_harness
from harness_testing import run_mode

ce = load_harness("cross_entropy")


@pytest.fixture(scope="module")
def emulated(tmp_path_factory):
    """(KernelLibrary, NumpyKernels) of the emulated build (built once)."""
    path = build_emulated_or_skip(
        ce, str(tmp_path_factory.mktemp("ce_emu") /
                "libtfrec_fast_cross_entropy_emulated.so"))
    library = ce.KernelLibrary(path)
    return library, ce.NumpyKernels(library)


def _torch_or_skip():
    return pytest.importorskip("torch")


# ---------------------------------------------------------------------------
# counter_rng.h ports (no compiler needed)

def test_rng_numpy_port_matches_python_int_port():
    rng = np.random.default_rng(0)
    accept, alias = ce.alias_table(rng.gamma(0.4, size=23) + 1e-3)
    for seed, step, offset, num_items in ((0, 0, 0, 23), (-5, 3, 7, 23),
                                          (2 ** 63 - 1, -2 ** 63, -4, 23),
                                          (11, 12, 2 ** 40, 1)):
        for acc, ali in ((None, None), (accept, alias)) if num_items == 23 \
                else ((None, None),):
            vec = ce.draws_np(seed, step, offset, 3, 6, num_items, acc, ali)
            ints = [[ce.draw_int(seed, step, offset + r, j, num_items, acc,
                                 ali) for j in range(6)] for r in range(3)]
            np.testing.assert_array_equal(vec, np.array(ints))
            assert vec.min() >= 0 and vec.max() < num_items


def test_rng_port_matches_tensorflow_counter_rng():
    tf = pytest.importorskip("tensorflow")
    counter_rng = pytest.importorskip("tfrec_fast.ops.counter_rng")
    rng = np.random.default_rng(1)
    accept, alias = ce.alias_table(rng.gamma(0.4, size=31) + 1e-3)
    rows = tf.constant([5, 6, 7], tf.int64)
    uni = counter_rng.uniform_draws(9, 4, rows, 8, 31).numpy()
    np.testing.assert_array_equal(uni, ce.draws_np(9, 4, 5, 3, 8, 31))
    big = counter_rng.uniform_draws(-3, 2 ** 40, rows, 5, 10 ** 9).numpy()
    np.testing.assert_array_equal(big, ce.draws_np(-3, 2 ** 40, 5, 3, 5,
                                                   10 ** 9))
    gram = counter_rng.unigram_draws(9, 4, rows, 8, tf.constant(accept),
                                     tf.constant(alias)).numpy()
    np.testing.assert_array_equal(gram, ce.draws_np(9, 4, 5, 3, 8, 31,
                                                    accept, alias))


def test_rng_port_matches_the_cpp_header(emulated):
    library, _ = emulated
    rng = np.random.default_rng(2)
    accept, alias = ce.alias_table(rng.gamma(0.4, size=40) + 1e-3)
    for args in ((1, 2, 3, 4, 9, 40, None, None),
                 (1, 2, 3, 4, 9, 40, accept, alias),
                 (-7, 2 ** 50, -2, 3, 5, 1_000_003, None, None)):
        np.testing.assert_array_equal(library.rng_draws(*args),
                                      ce.draws_np(*args))


# ---------------------------------------------------------------------------
# The harness's CPU mode and its references

def test_cpu_reference_quick_passes(capsys, emulated):
    library, _ = emulated
    lines, checks = run_mode(ce, "cpu-reference",
                             ["--quick", "--emulated-lib", library.path],
                             capsys)
    assert {"reference_fd/cce/random", "reference_fd/ccem/given_shared",
            "rng_port", "rng_unigram_frequencies",
            "planted_bug_detected"} <= checks
    assert all(r["cpp"] for r in lines if r.get("check") == "rng_port")


def test_gpu_mode_without_a_gpu_exits_cleanly(capsys):
    # No PyTorch, no CUDA device or no library: a message and exit code 2.
    assert ce.main(["--check-only", "--lib", "/nonexistent.so"]) == 2
    err = capsys.readouterr().err
    assert ("PyTorch" in err or "no CUDA device" in err or
            "cannot load" in err), err


def test_torch_reference_matches_numpy():
    torch = _torch_or_skip()
    records = []
    assert ce.torch_cpu_checks(records), [r for r in records
                                          if not r.get("ok", True)]
    del torch


# ---------------------------------------------------------------------------
# The CUDA sources under emulation

def test_emulated_kernels_quick_set(emulated):
    _, kernels = emulated
    records = []
    ok = ce.emulated_checks(kernels, records, quick=True)
    failed = [r for r in records if r.get("ok") is False]
    assert ok and not failed, failed
    names = {r["check"] for r in records}
    # Every mode and the adversarial cases ran.
    for name in ("cce/random", "cce/huge_logits", "cce/no_rows", "cce/c1",
                 "cce/d_loss_zeros_nan", "ccem/given_random",
                 "ccem/given_shared", "ccem/uniform", "ccem/unigram",
                 "ccem/all_hits", "ccem/k_gt_c", "ccem/k0_shared",
                 "cce/d300/dch64", "cce/invalid_target"):
        assert "emulated/" + name in names, name


@pytest.mark.parametrize("dtype,simt", [("float16", False),
                                        ("bfloat16", True)])
def test_emulated_cce_other_paths(emulated, dtype, simt):
    _, kernels = emulated
    case = [c for c in ce.CCE_CASES if c[0] == "ragged"][0]
    errs, tol, _ = ce.emulated_cce_run(kernels, case, dtype, simt,
                                       targets64=False,
                                       schedule="highest_first")
    assert max(errs.values()) <= tol, errs


def test_emulated_generated_negatives_are_the_ports(emulated):
    """dW of the per-row generated modes is non-zero exactly on the items
    the port draws (and the targets), and the losses match the brute force
    over those draws."""
    _, kernels = emulated
    for name in ("uniform", "unigram"):
        case = [c for c in ce.CCEM_CASES if c[0] == name][0]
        inp = ce.make_ccem_inputs(case, "float32")
        got = kernels.ccem(inp, "float32")
        ids, _ = ce.resolved_negatives(inp)
        live = inp["g"] != 0
        expect = np.zeros(inp["w"].shape[0], bool)
        expect[np.asarray(ids)[live].reshape(-1)] = True
        expect[inp["y"][live]] = True
        np.testing.assert_array_equal(np.any(got[3] != 0, axis=1), expect)
        ref = ce.ccem_reference(inp)
        assert ce.normalized_error(got[0], ref[0]) < 1e-5


def test_emulated_kernels_keep_hits_when_asked(emulated):
    """remove_accidental_hits=False against the reference that keeps them,
    and a planted bug (the reference that removes them) must fail."""
    _, kernels = emulated
    for name in ("all_hits", "all_hits_shared"):
        case = [c for c in ce.CCEM_CASES if c[0] == name][0]
        inp = ce.make_ccem_inputs(case, "float32")
        got = kernels.ccem(inp, "float32", remove_hits=False)
        kept = ce.compare(got, ce.ccem_reference(inp, remove_hits=False))
        assert max(kept.values()) < 1e-5, kept
        removed = ce.compare(got, ce.ccem_reference(inp, remove_hits=True))
        assert max(removed.values()) > 1e-2, removed


def test_emulated_driver_code_with_torch(emulated, tmp_path):
    """The GPU mode's driver (TorchKernels, torch references, benchmark
    code) on CPU tensors and the emulated kernels."""
    _torch_or_skip()
    library, _ = emulated
    assert ce.main(["--emulated-torch", "--emulated-lib", library.path,
                    "--cases", "random", "given_shared", "unigram",
                    "--out", str(tmp_path)]) == 0
