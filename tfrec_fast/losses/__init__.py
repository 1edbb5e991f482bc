"""Losses over hidden states and an item table."""

from tfrec_fast.losses.full_softmax import full_softmax_cross_entropy
