"""Full-catalog ranking metrics computed in item blocks (no [users, C] matrix)."""

from tfrec_fast.metrics.ranking import evaluate_full_ranking
from tfrec_fast.metrics.ranking import rank_of_targets
from tfrec_fast.metrics.ranking import ranking_metrics
from tfrec_fast.metrics.ranking import top_k_excluding

__all__ = [
    "evaluate_full_ranking",
    "rank_of_targets",
    "ranking_metrics",
    "top_k_excluding",
]

from tfrec_fast.metrics.callbacks import FullRankingEvaluation  # noqa: E402

__all__.append("FullRankingEvaluation")
