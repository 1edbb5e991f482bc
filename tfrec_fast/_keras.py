"""Makes sure TensorFlow resolves `tf.keras` to Keras 2 (tf_keras).

TFRS 0.7.x refuses Keras 3, and Keras 3 has no ragged tensors, so this package
uses tf_keras everywhere. TensorFlow picks the Keras behind `tf.keras` from the
environment variable `TF_USE_LEGACY_KERAS` the first time `tf.keras` is touched,
so the variable must be set before that happens.
"""

import os
import sys

_FIX = (
        "tfrec_fast needs tf.keras to be Keras 2 (the tf_keras package). "
        "Set the environment variable TF_USE_LEGACY_KERAS=1 before TensorFlow is "
        "imported (e.g. `export TF_USE_LEGACY_KERAS=1`, or "
        "`os.environ['TF_USE_LEGACY_KERAS'] = '1'` at the very top of your script), "
        "or import tfrec_fast before tensorflow."
)


def ensure_legacy_keras() -> None:
    """Selects tf_keras for `tf.keras`, or raises ImportError saying how to fix.

    Raises:
        ImportError: TensorFlow was imported earlier and `tf.keras` already
            resolved to Keras 3, or tf_keras is not installed.
    """
    # Before TensorFlow's import, or after it while its lazy `tf.keras` has not
    # resolved yet, setting the variable still takes effect.
    os.environ["TF_USE_LEGACY_KERAS"] = "1"
    try:
        import tf_keras  # pylint: disable=import-outside-toplevel,unused-import
    except ImportError as e:
        raise ImportError(
            "tfrec_fast needs the tf_keras package (Keras 2): "
            "pip install 'tf-keras==2.21.*'") from e
    import tensorflow as tf  # pylint: disable=import-outside-toplevel
    keras_module = tf.keras.layers.Layer.__module__
    if not keras_module.startswith("tf_keras."):
        raise ImportError(
            "TensorFlow was imported with Keras 3 behind tf.keras "
            f"(tf.keras.layers.Layer comes from {keras_module}). " + _FIX)
