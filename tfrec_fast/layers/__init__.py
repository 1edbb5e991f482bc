"""Sequence encoder layers.

Padding-free (ragged) layers take `tf.RaggedTensor` [B, (L), D] and run on
the packed tokens; the padded ones are the stock-tf_keras reference.
"""

from tfrec_fast.layers.dropout import ResumableDropout
from tfrec_fast.layers.integrated_scorer import IntegratedScorer
from tfrec_fast.layers.padded_transformer import PaddedSequenceEncoder
from tfrec_fast.layers.padded_transformer import PaddedTransformerBlock
from tfrec_fast.layers.positional import RaggedPositionalEmbedding
from tfrec_fast.layers.positional import ragged_positions
from tfrec_fast.layers.ragged_attention import packed_attention
from tfrec_fast.layers.ragged_attention import RaggedMultiHeadAttention
from tfrec_fast.layers.ragged_transformer import RaggedTransformerBlock
from tfrec_fast.layers.sequence_encoder import SequenceEncoder
