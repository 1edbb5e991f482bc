"""Custom ops: lazy loading of the compiled library and dispatch to it.

Every fused op here has a pure-TF reference of identical meaning; when the
library is missing or was built for another TensorFlow, the reference runs
after one `OpLibraryWarning`.
"""

from tfrec_fast.ops._library import build_info
from tfrec_fast.ops._library import OpLibrary
from tfrec_fast.ops._library import OpLibraryWarning
from tfrec_fast.ops.cce_minus import GeneratedNegatives
from tfrec_fast.ops.cce_minus import GivenNegatives
from tfrec_fast.ops.cce_minus import cce_minus
from tfrec_fast.ops.cce_minus import cce_minus_reference
from tfrec_fast.ops.cce_minus import generated_negatives
from tfrec_fast.ops.cut_cross_entropy import cut_cross_entropy
from tfrec_fast.ops.cut_cross_entropy import cut_cross_entropy_reference
from tfrec_fast.ops.kernel_sampler import kernel_log_probabilities
from tfrec_fast.ops.kernel_sampler import kernel_sampler_draw
from tfrec_fast.ops.kernel_sampler import kernel_sampler_draw_reference
from tfrec_fast.ops.layer_norm import layer_norm
from tfrec_fast.ops.layer_norm import layer_norm_reference
from tfrec_fast.ops.ragged_attention import ragged_attention
from tfrec_fast.ops.ragged_attention import ragged_attention_qkvpacked
from tfrec_fast.ops.ragged_attention import ragged_attention_reference
from tfrec_fast.ops.validate_ids import validate_ids
from tfrec_fast.ops.validate_ids import validate_ids_reference
