"""The op library: loading, fallback, version checks, and validate_ids."""

import json
import os
import shutil
import warnings

import numpy as np
import pytest
import tensorflow as tf

import tfrec_fast  # noqa: F401  (selects tf_keras before anything else)
from tfrec_fast import ops
from tfrec_fast.ops import _library

LIB = _library.DEFAULT_LIBRARY
needs_library = pytest.mark.skipif(
    not os.path.isfile(LIB.library_path),
    reason="op library not built (pip install . builds it)")
PATHS = [pytest.param(True, id="fused", marks=needs_library),
         pytest.param(False, id="reference")]


@needs_library
def test_build_info_reports_loaded_library():
    info = ops.build_info()
    assert info["cpu_ops"] is True
    assert info["gpu_ops"] in (True, False)
    assert info["tf_version_built"] == tf.__version__
    assert info["tf_version_running"] == tf.__version__
    assert info["library_path"] == LIB.library_path
    assert info["problem"] is None


def _copy_library(tmp_path, **build_overrides):
    # Never load such a copy: a second copy of the same kernels in one process
    # is a duplicate kernel registration.
    shutil.copy(LIB.library_path, tmp_path / _library.LIBRARY_NAME)
    info = json.load(open(os.path.join(LIB.directory,
                                       _library.BUILD_INFO_NAME)))
    info.update(build_overrides)
    (tmp_path / _library.BUILD_INFO_NAME).write_text(json.dumps(info))
    return _library.OpLibrary(str(tmp_path))


def test_missing_library_warns_once_and_reports_no_ops(tmp_path):
    library = _library.OpLibrary(str(tmp_path))
    with pytest.warns(ops.OpLibraryWarning, match="missing"):
        assert library.module() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert library.module() is None  # no second warning
        info = library.build_info()
    assert info["cpu_ops"] is False and info["gpu_ops"] is False
    assert info["library_path"] is None
    assert info["tf_version_running"] == tf.__version__


@needs_library
def test_version_mismatch_is_not_loaded_and_says_both_versions(tmp_path):
    library = _copy_library(tmp_path, tf_version_built="2.99.0")
    with pytest.warns(ops.OpLibraryWarning) as record:
        assert library.module() is None
    message = str(record[0].message)
    assert "2.99.0" in message and tf.__version__ in message
    info = library.build_info()
    assert info["cpu_ops"] is False
    assert info["tf_version_built"] == "2.99.0"


def test_unreadable_build_info_falls_back(tmp_path):
    (tmp_path / _library.LIBRARY_NAME).write_bytes(b"not a library")
    (tmp_path / _library.BUILD_INFO_NAME).write_text("{not json")
    with pytest.warns(ops.OpLibraryWarning, match="cannot read"):
        assert _library.OpLibrary(str(tmp_path)).module() is None


@pytest.mark.parametrize("use_fused", PATHS)
@pytest.mark.parametrize("dtype", [tf.int32, tf.int64])
def test_valid_ids_pass_through(use_fused, dtype):
    ids = tf.constant([[0, 4, 2], [1, 1, 3]], dtype)
    out = ops.validate_ids(ids, 5, use_fused=use_fused)
    assert out.dtype == dtype
    np.testing.assert_array_equal(out.numpy(), ids.numpy())


@pytest.mark.parametrize("use_fused", PATHS)
@pytest.mark.parametrize("bad_value, position, index", [
    (7, 4, "1, 1"), (-1, 0, "0, 0"), (5, 5, "1, 2")])
def test_bad_id_names_argument_value_and_position(use_fused, bad_value,
                                                  position, index):
    ids = np.array([[0, 4, 2], [1, 1, 3]], np.int64)
    ids.reshape(-1)[position] = bad_value
    ids.reshape(-1)[-1] = 9 if position != 5 else bad_value  # a later bad id
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        ops.validate_ids(tf.constant(ids), 5, arg_name="targets",
                         use_fused=use_fused)
    message = e.value.message
    assert f"targets[{index}] = {bad_value}" in message
    assert f"flat position {position}" in message
    assert "[0, 5)" in message


@pytest.mark.parametrize("use_fused", PATHS)
def test_bad_id_inside_tf_function(use_fused):
    fn = tf.function(lambda x: ops.validate_ids(x, 3, "targets",
                                                use_fused=use_fused))
    np.testing.assert_array_equal(fn(tf.constant([0, 2])).numpy(), [0, 2])
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"targets[\s\S]*9[\s\S]*position[\s\S]*2"):
        fn(tf.constant([0, 1, 9, 1]))


@pytest.mark.parametrize("use_fused", PATHS)
def test_first_bad_id_is_found_in_a_large_multithreaded_scan(use_fused):
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 1000, size=3_000_000)
    ids[[2_000_001, 2_500_000, 1_234_567]] = [1000, -3, 5000]
    with pytest.raises(tf.errors.InvalidArgumentError) as e:
        ops.validate_ids(tf.constant(ids), 1000, use_fused=use_fused)
    assert "ids[1234567] = 5000" in e.value.message


@pytest.mark.parametrize("use_fused", PATHS)
def test_empty_ids_and_empty_catalog(use_fused):
    empty = tf.zeros([0, 3], tf.int64)
    assert ops.validate_ids(empty, 0, use_fused=use_fused).shape == [0, 3]
    with pytest.raises(tf.errors.InvalidArgumentError, match=r"\[0, 0\)"):
        ops.validate_ids(tf.constant([0]), 0, use_fused=use_fused)


@pytest.mark.parametrize("use_fused", PATHS)
def test_ragged_ids_check_flat_values(use_fused):
    ragged = tf.RaggedTensor.from_row_splits(
        tf.constant([0, 1, 2], tf.int64), tf.constant([0, 1, 3], tf.int64))
    out = ops.validate_ids(ragged, 3, use_fused=use_fused)
    assert isinstance(out, tf.RaggedTensor)
    bad = ragged.with_flat_values(tf.constant([0, 1, 3], tf.int64))
    with pytest.raises(tf.errors.InvalidArgumentError,
                       match=r"ids\[2\] = 3"):
        ops.validate_ids(bad, 3, use_fused=use_fused)


def test_non_integer_ids_raise_value_error():
    with pytest.raises(ValueError, match="item_ids must be int32 or int64"):
        ops.validate_ids(tf.constant([1.0]), 3, arg_name="item_ids")


@needs_library
def test_fused_op_rejects_bad_num_items():
    module = LIB.module()
    with pytest.raises(tf.errors.InvalidArgumentError, match="num_items"):
        module.tfrec_fast_validate_ids(tf.constant([0]),
                                       tf.constant(-1, tf.int64))
