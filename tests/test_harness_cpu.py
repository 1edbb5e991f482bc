"""The GPU harness's CPU mode: custom_ops/harness/ragged_attention.py.

The CUDA kernels themselves need a GPU (see custom_ops/harness/README.md);
here the harness's own logic runs without one: its float64 reference against
finite differences, the Python port of the GPU work planners (and the C++
host planner where libtfrec_fast_kernels.so has been built), and a float32
NumPy simulation of the kernels' algorithm (tiles, work items, online
softmax, recomputed probabilities, mirrored key blocks) against the
reference on the harness's adversarial cases. A planted bug must fail it.
"""

import numpy as np

from harness_testing import build_emulated_or_skip
from harness_testing import load_harness
from harness_testing import run_mode

ra = load_harness("ragged_attention")


def test_cpu_reference_quick_passes(capsys):
    _, checks = run_mode(ra, "cpu-reference", ["--quick"], capsys)
    assert {"reference_fd_grad_q", "planner_coverage_and_order",
            "simulation/huge_scores", "simulation/empty_rows",
            "simulation/no_rows"} <= checks


def test_planners_cover_every_row_once_and_sort_by_cost():
    splits = ra.row_splits_from_lengths([0, 130, 1, 0, 64, 65])
    items = ra.plan_items(splits, 64, causal=True)
    # start, length, block, num_blocks; sorted by block + 1, stable.
    assert items[:, 2].tolist() == sorted(items[:, 2].tolist(), reverse=True)
    assert len(items) == 3 + 1 + 1 + 2
    device = ra.plan_items(splits, 64, causal=True, order="device")
    assert sorted(map(tuple, device.tolist())) == sorted(
        map(tuple, items.tolist()))
    assert ra.check_row_splits(np.array([0, 4, 3, 7]), 7) == 2
    assert ra.check_row_splits(np.array([0, 4, 7]), 8) == 2
    assert ra.check_row_splits(np.array([1, 4]), 4) == 0


def test_simulation_detects_a_planted_bug():
    q, k, v, d_out, splits = ra.make_case([5, 70, 1], 2, 16, seed=1)
    scale = 0.25
    ref = ra.reference_np(q, k, v, splits, True, scale, d_out)
    items = ra.plan_items(splits, 32, True)
    out, lse = ra.simulate_forward(q, k, v, items, 32, True, scale)
    dq, dk, dv = ra.simulate_backward(q, k, v, out, lse, d_out, items, 32,
                                      True, scale)
    for got, want in zip((out, lse, dq, dk, dv), ref[:2] + tuple(ref[2])):
        assert ra.normalized_error(got, want) < 1e-5
    # Bidirectional inputs checked against the causal reference: must fail.
    items = ra.plan_items(splits, 32, False)
    out, _ = ra.simulate_forward(q, k, v, items, 32, False, scale)
    assert ra.normalized_error(out, ref[0]) > 1e-2


def test_bfloat16_rounding_is_round_to_nearest_even():
    x = np.array([1.0, 1.0 + 2 ** -8, 1.0 + 3 * 2 ** -8, 1.0 + 2 ** -7 +
                  2 ** -9], np.float32)
    got = ra.round_to(x, "bfloat16")
    # bfloat16 keeps 7 fraction bits: ties go to the even neighbour.
    np.testing.assert_array_equal(
        got, np.array([1.0, 1.0, 1.0 + 2 ** -6, 1.0 + 2 ** -7], np.float32))


# The CUDA source itself, compiled by g++ against the harness's fiber-based
# CUDA emulation (custom_ops/harness/emulation/), on a few configurations.
_EMULATED_RUNS = [
    # (case, dtype, causal, block rows, work list, thread schedule)
    ("random", "float32", True, 64, "host", "lowest_first"),
    ("random", "float32", True, 64, "device32", "highest_first"),
    ("random", "bfloat16", False, 32, "device32", "lowest_first"),
    ("random", "float32", False, 64, "host", "highest_first"),
    ("dh48_dv80", "float16", True, 64, "device64", "round_robin"),
    ("empty_rows", "float32", False, 64, "host", "highest_first"),
    ("huge_scores", "float32", True, 32, "host", "lowest_first"),
    ("length_1_rows", "bfloat16", True, 64, "device64", "highest_first"),
    ("no_rows", "float32", True, 64, "device32", "lowest_first"),
]


def test_cuda_source_under_emulation(tmp_path):
    path = build_emulated_or_skip(
        ra, str(tmp_path / "libtfrec_fast_kernels_emulated.so"))
    kernels = ra.NumpyKernels(ra.KernelLibrary(path))
    cases = {c[0]: c for c in ra.check_cases(long_row=200)}
    for name, dtype, causal, block_rows, planner, order in _EMULATED_RUNS:
        errs, tol, _ = ra.emulated_run(kernels, cases[name], dtype, causal,
                                       block_rows, planner, order)
        assert max(errs.values()) <= tol, (name, dtype, causal, block_rows,
                                           planner, order, errs, tol)
    records = []
    assert ra.emulated_invalid_splits(kernels, records), records
