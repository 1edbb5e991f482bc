"""Finds, checks and lazily loads the compiled op library.

The library is built by `pip install` (custom_ops/build.py) next to this file,
with `_build_info.json` recording the TensorFlow version it was compiled
against. A library built for another TensorFlow version is never loaded (its
C++ ABI may not match, which crashes rather than fails); every fused op then
runs its pure-TF reference, after one warning.
"""

import json
import os
import threading
import warnings

import tensorflow as tf

LIBRARY_NAME = "_tfrec_fast_ops.so"
BUILD_INFO_NAME = "_build_info.json"
_DEFAULT_DIR = os.path.dirname(os.path.abspath(__file__))


class OpLibraryWarning(RuntimeWarning):
    """The fused ops are unavailable; the pure-TF references run instead."""


class OpLibrary:
    """The op library in one directory, loaded on first use.

    Args:
        directory: Folder holding `_tfrec_fast_ops.so` and `_build_info.json`.
    """

    def __init__(self, directory):
        self.directory = directory
        self._lock = threading.Lock()
        self._loaded = False
        self._module = None
        self._problem = None
        self._build = {}

    @property
    def library_path(self):
        return os.path.join(self.directory, LIBRARY_NAME)

    # Plain Python file checks: keep AutoGraph from trying to convert them
    # when the first op call happens inside a tf.function.
    @tf.autograph.experimental.do_not_convert
    def module(self):
        """Returns the loaded op module, or None (after one warning)."""
        with self._lock:
            if not self._loaded:
                self._loaded = True
                self._module, self._problem = self._load()
                if self._problem:
                    warnings.warn(
                        f"tfrec_fast: {self._problem} Using the pure-TF "
                        "reference implementations (same results, slower). "
                        "Rebuild with `pip install --force-reinstall "
                        "--no-deps .` in the tfrec_fast source tree.",
                        OpLibraryWarning, stacklevel=3)
        return self._module

    def _load(self):
        if os.environ.get("TFREC_FAST_DISABLE_OPS", "") == "1":
            return None, "TFREC_FAST_DISABLE_OPS=1 disables the op library."
        if not os.path.isfile(self.library_path):
            return None, f"the op library {self.library_path} is missing."
        info_path = os.path.join(self.directory, BUILD_INFO_NAME)
        try:
            with open(info_path) as f:
                self._build = json.load(f)
        except (OSError, ValueError) as e:
            return None, f"cannot read {info_path} ({e})."
        built = self._build.get("tf_version_built")
        if built != tf.__version__:
            return None, (f"the op library was built against TensorFlow "
                          f"{built} but TensorFlow {tf.__version__} is "
                          "running.")
        try:
            return tf.load_op_library(self.library_path), None
        except (tf.errors.NotFoundError, OSError) as e:
            return None, f"loading {self.library_path} failed: {e}."

    def build_info(self):
        """Describes the library; loads it if that has not happened yet."""
        module = self.module()
        return {
            "cpu_ops": module is not None,
            "gpu_ops": module is not None and bool(
                self._build.get("gpu_ops")),
            "tf_version_built": self._build.get("tf_version_built"),
            "tf_version_running": tf.__version__,
            "library_path": self.library_path if module is not None else None,
            "problem": self._problem,
            "cuda_version": self._build.get("cuda_version"),
        }


DEFAULT_LIBRARY = OpLibrary(os.environ.get("TFREC_FAST_OPS_DIR", _DEFAULT_DIR))


_stale_library_warned = set()


@tf.autograph.experimental.do_not_convert
def fused_module(op_function, op_name, use_fused):
    """The loaded op module if it has `op_function`, else None.

    Args:
        op_function: the Python name of the op in the module, e.g.
            "tfrec_fast_ragged_attention".
        op_name: the op's registered name, for messages.
        use_fused: True to require the op (raise if missing), None to take it
            when present (one warning per op when an older library lacks it).

    Raises:
        RuntimeError: `use_fused` is True and the op is not available.
    """
    module = DEFAULT_LIBRARY.module()
    if module is not None and not hasattr(module, op_function):
        problem = (f"the op library {DEFAULT_LIBRARY.library_path} was built "
                   f"without {op_name} (an older build).")
        if use_fused:
            raise RuntimeError(f"use_fused=True but {problem}")
        if op_name not in _stale_library_warned:
            _stale_library_warned.add(op_name)
            warnings.warn(f"tfrec_fast: {problem} Using the pure-TF "
                          "reference; rebuild the library.",
                          OpLibraryWarning, stacklevel=3)
        return None
    if module is None and use_fused:
        raise RuntimeError("use_fused=True but the op library is not "
                           "loaded: " + str(build_info()))
    return module


def build_info():
    """Reports what the installed op library provides.

    Returns:
        A dict with `cpu_ops` (bool: the fused CPU ops are loaded), `gpu_ops`
        (bool: GPU kernels are in the library), `tf_version_built`,
        `tf_version_running`, `library_path` (None when not loaded),
        `problem` (why it is not loaded, or None) and `cuda_version`.
    """
    return DEFAULT_LIBRARY.build_info()
