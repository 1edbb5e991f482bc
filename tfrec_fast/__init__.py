"""tfrec_fast: large-catalog losses, samplers and padding-free transformer
blocks for TensorFlow recommenders (tf_keras + TFRS)."""

from tfrec_fast._keras import ensure_legacy_keras as _ensure_legacy_keras

_ensure_legacy_keras()

# pylint: disable=g-import-not-at-top,wrong-import-position
from tfrec_fast import data
from tfrec_fast import distribute
from tfrec_fast import losses
from tfrec_fast import metrics
from tfrec_fast import ops
from tfrec_fast import samplers

__version__ = "0.1.0"
