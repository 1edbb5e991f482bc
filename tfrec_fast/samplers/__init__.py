"""Negative samplers for sampled-softmax losses.

Every sampler is a `CandidateSampler`: `sample(query, num) -> (ids, log_q)`
and `log_prob(query, ids)`, with its state in variables.
"""

from tfrec_fast.samplers.base import CandidateSampler
from tfrec_fast.samplers.collaborative import CollaborativeSampler
from tfrec_fast.samplers.hard_negatives import HardNegatives
from tfrec_fast.samplers.in_batch import InBatch
from tfrec_fast.samplers.kernel import KernelSampler
from tfrec_fast.samplers.mixed import Mixed
from tfrec_fast.samplers.uniform import LogUniform
from tfrec_fast.samplers.uniform import Uniform
from tfrec_fast.samplers.unigram import Unigram
