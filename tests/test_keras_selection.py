"""`import tfrec_fast` selects tf_keras, or says how to fix it."""

import subprocess
import sys
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(code):
    env = {k: v for k, v in os.environ.items() if k != "TF_USE_LEGACY_KERAS"}
    env["PYTHONPATH"] = ROOT + os.pathsep + env.get("PYTHONPATH", "")
    env["TF_CPP_MIN_LOG_LEVEL"] = "3"
    return subprocess.run([sys.executable, "-c", code], capture_output=True,
                          text=True, env=env, timeout=300, check=False)


def test_import_before_tensorflow_selects_tf_keras():
    proc = _run("import tfrec_fast, tensorflow as tf, tf_keras\n"
                "assert tf.keras.Model is tf_keras.Model\n"
                "import tensorflow_recommenders\nprint('ok')")
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout


def test_import_after_tensorflow_with_keras3_says_how_to_fix():
    proc = _run("import tensorflow as tf\n_ = tf.keras.layers.Dense\n"
                "import tfrec_fast")
    assert proc.returncode != 0
    assert "ImportError" in proc.stderr
    assert "TF_USE_LEGACY_KERAS=1" in proc.stderr
