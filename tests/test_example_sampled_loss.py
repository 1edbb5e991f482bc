"""The main job's --loss / --sampler / --negatives flags (no ML-100k run)."""

import importlib.util
import math
import pathlib
import sys

import pytest

import tfrec_fast  # noqa: F401
import tf_keras

from tfrec_fast import data
from tfrec_fast.models import SASRec

EXAMPLES = pathlib.Path(__file__).resolve().parents[1] / "examples"
EXAMPLE = EXAMPLES / "sasrec_movielens.py"


@pytest.fixture(scope="module")
def example():
    # The example imports its sibling `_common` as a script would.
    sys.path.insert(0, str(EXAMPLES))
    spec = importlib.util.spec_from_file_location("sasrec_movielens_example",
                                                  EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_default_is_the_full_softmax(example):
    args = example.parse_args([])
    assert args.loss == "full"
    assert args.sampler is None and args.negatives is None
    assert example.build_task(args, None, 10) is None
    assert example.describe_loss(args) == {"loss": "full"}


def test_sampled_flags(example):
    args = example.parse_args(["--loss", "sampled", "--sampler", "unigram",
                               "--negatives", "64", "--unigram-alpha", "0.5"])
    assert (args.sampler, args.negatives, args.unigram_alpha) == (
        "unigram", 64, 0.5)
    args = example.parse_args(["--loss", "sampled"])
    assert (args.sampler, args.negatives) == ("uniform", 256)
    assert example.parse_args(["--loss", "sampled", "--sampler",
                               "in-batch"]).negatives is None
    assert example.parse_args(["--loss", "sampled", "--sampler", "in-batch",
                               "--negatives", "64"]).negatives == 64
    assert example.parse_args([]).encoder == "ragged"


@pytest.mark.parametrize("argv", [
    ["--loss", "sampled", "--negatives", "0"],
    ["--loss", "sampled", "--sampler", "popular"],
    ["--loss", "sampled", "--unigram-alpha", "-1"],
    ["--loss", "partial"],
])
def test_bad_flags_are_refused(example, argv):
    with pytest.raises(SystemExit):
        example.parse_args(argv)


def _fit_toy_sasrec(example, toy_split, args, epochs):
    """Fits a tiny SASRec with the main job's task for `args`; its History."""
    tf_keras.utils.set_random_seed(0)
    model = SASRec(toy_split.num_items, max_len=10, dim=8, num_blocks=1,
                   num_heads=1, dropout=0.0,
                   task=example.build_task(args, toy_split.train,
                                           toy_split.num_items))
    model.compile(optimizer=tf_keras.optimizers.Adam(1e-2))
    train = data.next_item_dataset(toy_split.train, batch_size=32,
                                   max_len=10)
    return model.fit(train, epochs=epochs, verbose=0)


@pytest.mark.parametrize("sampler", ["uniform", "log-uniform", "unigram",
                                     "in-batch", "mixed"])
def test_one_sampled_epoch_trains(example, toy_split, sampler):
    argv = ["--loss", "sampled", "--sampler", sampler]
    if sampler != "in-batch":
        argv += ["--negatives", "8"]
    args = example.parse_args(argv)
    history = _fit_toy_sasrec(example, toy_split, args, epochs=1)
    assert math.isfinite(history.history["loss"][-1])
    described = example.describe_loss(args)
    assert described["sampler"] == sampler
    assert described["correct_positive"] == (sampler in ("in-batch",
                                                         "mixed"))


@pytest.mark.parametrize("argv", [
    ["--loss", "cce"],
    ["--loss", "cce-minus", "--negatives", "8"],
    ["--loss", "cce-minus", "--sampler", "unigram", "--negatives", "8"],
])
def test_fused_losses_train_and_learn(example, toy_split, argv):
    """The fused losses through the main job's task: the loss goes down."""
    args = example.parse_args(argv)
    history = _fit_toy_sasrec(example, toy_split, args, epochs=3)
    losses = history.history["loss"]
    assert all(math.isfinite(x) for x in losses)
    assert losses[-1] < losses[0]
    described = example.describe_loss(args)
    assert described["loss"] == args.loss
    if args.loss == "cce-minus":
        assert described["shared_negatives"] is False
        assert args.negatives == 8


def test_cce_minus_defaults(example):
    args = example.parse_args(["--loss", "cce-minus"])
    assert (args.sampler, args.negatives) == ("uniform", 256)
    assert example.parse_args(["--loss", "cce"]).negatives is None
