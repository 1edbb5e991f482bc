"""Builds the package; the op library is compiled as the one "extension".

`pip install .` and `pip install -e .` both run `BuildOpLibrary`, which hands
the work to custom_ops/build.py (TF's custom-op toolchain: tf.sysconfig flags,
g++ C++17, nvcc for CUDA 12 when present).

Set TFREC_FAST_SKIP_OPS=1 to install without compiling (the pure-TF
references then run, after one warning).
"""

import importlib.util
import os
import sys

from setuptools import Extension
from setuptools import setup
from setuptools.command.build_ext import build_ext

ROOT = os.path.dirname(os.path.abspath(__file__))
OPS_PACKAGE = "tfrec_fast.ops"


def _load_builder():
    spec = importlib.util.spec_from_file_location(
        "tfrec_fast_custom_ops_build",
        os.path.join(ROOT, "custom_ops", "build.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


class OpLibraryExtension(Extension):

    def __init__(self):
        super().__init__(OPS_PACKAGE + "._tfrec_fast_ops", sources=[])


class BuildOpLibrary(build_ext):
    """Compiles custom_ops/ into tfrec_fast/ops/_tfrec_fast_ops.so."""

    def get_ext_filename(self, fullname):
        # A plain `.so` (no Python ABI tag): it is a TF op library, loaded with
        # tf.load_op_library, not a Python extension module.
        return os.path.join(*fullname.split(".")) + ".so"

    def build_extension(self, ext):
        if os.environ.get("TFREC_FAST_SKIP_OPS") == "1":
            print("TFREC_FAST_SKIP_OPS=1: not building the op library",
                  file=sys.stderr)
            return
        out_dir = os.path.dirname(os.path.abspath(self.get_ext_fullpath(
            ext.name)))
        _load_builder().build_op_library(out_dir, jobs=self.parallel or None)

    def copy_extensions_to_source(self):
        # Editable installs copy the library into the source tree; its build
        # info must travel with it (the loader refuses a library without it).
        super().copy_extensions_to_source()
        build_py = self.get_finalized_command("build_py")
        if self.extensions:
            built = os.path.join(self.build_lib, *OPS_PACKAGE.split("."))
            package_dir = build_py.get_package_dir(OPS_PACKAGE)
            self.copy_file(os.path.join(built, "_build_info.json"),
                           os.path.join(package_dir, "_build_info.json"),
                           level=self.verbose)

    def get_outputs(self):
        outputs = super().get_outputs()
        return outputs + [os.path.join(os.path.dirname(o), "_build_info.json")
                          for o in outputs]


setup(ext_modules=[OpLibraryExtension()],
      cmdclass={"build_ext": BuildOpLibrary})
