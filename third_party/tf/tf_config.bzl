"""Offline repository rule exposing a pip-installed TensorFlow to Bazel.

Runs `$TF_PYTHON -c 'import tensorflow'` (default: `python3`) at fetch time,
symlinks the wheel's include/ dir and libtensorflow_framework.so.2 into an
external repository `@local_tf`, and writes a BUILD with:
  @local_tf//:tf_header_lib  -- TF/Eigen/absl/protobuf headers
  @local_tf//:libtensorflow_framework -- the framework shared library
No network access is needed.
"""

_PY = """
import sys, tensorflow as tf
print(tf.sysconfig.get_include())
print(tf.sysconfig.get_lib())
print(tf.__version__)
print(" ".join(tf.sysconfig.get_compile_flags()))
print(" ".join(tf.sysconfig.get_link_flags()))
"""

_BUILD = """
package(default_visibility = ["//visibility:public"])

# TF {version}; compile flags reported by the wheel: {cflags}
# link flags reported by the wheel: {lflags}
cc_library(
    name = "tf_header_lib",
    hdrs = glob(
        ["include/**"],
        exclude = ["include/external/**", "include/**/*.c", "include/**/*.cc", "include/**/*.bin", "include/**/BUILD*", "include/**/*.bazel"],
    ),
    includes = ["include"],
)

cc_import(
    name = "libtensorflow_framework",
    shared_library = "lib/{fwlib}",
)
"""

def _tf_local_config_impl(ctx):
    python = ctx.os.environ.get("TF_PYTHON", "python3")
    if "/" not in python:
        found = ctx.which(python)
        if not found:
            fail("tf_local_config: '%s' not found on PATH; set TF_PYTHON" % python)
        python = str(found)
    res = ctx.execute([python, "-c", _PY], environment = {"TF_CPP_MIN_LOG_LEVEL": "3"}, quiet = True)
    if res.return_code != 0:
        fail("tf_local_config: could not import tensorflow with %s:\n%s" % (python, res.stderr))
    lines = res.stdout.strip().splitlines()[-5:]
    inc, lib, version, cflags, lflags = lines
    fwlib = "libtensorflow_framework.so.2"
    ctx.symlink(inc, "include")
    ctx.symlink(lib + "/" + fwlib, "lib/" + fwlib)
    ctx.file("WORKSPACE", 'workspace(name = "%s")\n' % ctx.name)
    ctx.file("BUILD", _BUILD.format(version = version, cflags = cflags, lflags = lflags, fwlib = fwlib))

tf_local_config = repository_rule(
    implementation = _tf_local_config_impl,
    environ = ["TF_PYTHON"],
    local = True,
)
