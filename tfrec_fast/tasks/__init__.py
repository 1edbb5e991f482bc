"""tfrs.tasks-style loss layers."""

from tfrec_fast.tasks.next_item import NextItemTask
from tfrec_fast.tasks.sampled_retrieval import SampledRetrieval
