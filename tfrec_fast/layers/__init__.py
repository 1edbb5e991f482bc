"""Sequence encoder layers."""

from tfrec_fast.layers.padded_transformer import PaddedSequenceEncoder
from tfrec_fast.layers.padded_transformer import PaddedTransformerBlock
