"""Interaction logs, per-user item sequences, splits and tf.data pipelines.

Typical use::

    from tfrec_fast import data

    interactions = data.load_movielens_100k()
    seqs = data.to_sequences(interactions)          # item id 0 = most frequent
    split = data.leave_one_out(seqs)
    train_ds = data.next_item_dataset(split.train, batch_size=128, max_len=200)
    test_ds = data.eval_dataset(split.test, batch_size=256, max_len=200)
"""

from tfrec_fast.data.interactions import Interactions
from tfrec_fast.data.loaders import load_movielens_100k
from tfrec_fast.data.loaders import load_movielens_ratings
from tfrec_fast.data.loaders import load_recbole_inter
from tfrec_fast.data.loaders import load_sasrec_txt
from tfrec_fast.data.loaders import movielens_100k_path
from tfrec_fast.data.pipelines import eval_dataset
from tfrec_fast.data.pipelines import next_item_dataset
from tfrec_fast.data.resumable import resumable_epochs
from tfrec_fast.data.sequences import SequenceData
from tfrec_fast.data.sequences import to_sequences
from tfrec_fast.data.sequences import truncate
from tfrec_fast.data.split import EvalSet
from tfrec_fast.data.split import Split
from tfrec_fast.data.split import leave_one_out
from tfrec_fast.data.synthetic import synthetic_zipf

__all__ = [
    "EvalSet",
    "Interactions",
    "SequenceData",
    "Split",
    "eval_dataset",
    "leave_one_out",
    "load_movielens_100k",
    "load_movielens_ratings",
    "load_recbole_inter",
    "load_sasrec_txt",
    "movielens_100k_path",
    "next_item_dataset",
    "resumable_epochs",
    "synthetic_zipf",
    "to_sequences",
    "truncate",
]
