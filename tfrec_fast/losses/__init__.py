"""Losses over hidden states and an item table."""

from tfrec_fast.losses.cce_minus import CCEMinus
from tfrec_fast.losses.cut_cross_entropy import CutCrossEntropy
from tfrec_fast.losses.full_softmax import full_softmax_cross_entropy
from tfrec_fast.losses.sampled_softmax import SampledSoftmax
from tfrec_fast.losses.sampled_softmax import accidental_hits
from tfrec_fast.losses.sampled_softmax import corrected_softmax_cross_entropy
