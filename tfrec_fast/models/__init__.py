"""Complete recommenders built from tfrec_fast layers and tasks."""

from tfrec_fast.models.loss_scaling import LossScalingModel
from tfrec_fast.models.reinforced import ReinforcedSamplerModel
from tfrec_fast.models.sasrec import last_window
from tfrec_fast.models.sasrec import SASRec
from tfrec_fast.models.two_tower import HistoryTwoTower
