"""Reliability matrix: each public op, layer, loss, sampler and task against
each kind of bad input, and what the user gets.

One source of truth: `CASES` says, for a component (a row of the README's
"Reliability" table) and a kind of bad input (a column), how the component
is called and what must happen: an exception of a given class whose message
contains given fragments (the words the user reads), or a well-defined
result that the case's check verifies. `NOT_APPLICABLE` gives the reason for
every (component, kind) pair without a case. `test_case` runs every case,
eagerly and, where the check happens when the op runs (and may read
differently there), inside `tf.function`; `render_block` turns the same
lists into the README table, and `test_readme_table_is_current` keeps the
README equal to it.

Regenerate the README table after changing a case:

    PYTHONPATH=. python tests/test_reliability.py --write-readme
"""

import argparse
import collections
import dataclasses
import math
import os
import re
import sys
import textwrap

import numpy as np
import pytest

import tfrec_fast  # noqa: F401  (selects tf_keras before TensorFlow loads)
import tensorflow as tf
import tf_keras

from tfrec_fast import layers
from tfrec_fast import losses
from tfrec_fast import ops
from tfrec_fast import samplers
from tfrec_fast import tasks

IAE = tf.errors.InvalidArgumentError
C, D = 8, 4  # catalog size and width of the small cases
LONG = 10_000  # the long history
EAGER, GRAPH = "eager", "tf.function"
BOTH = (EAGER, GRAPH)

README = os.path.join(os.path.dirname(os.path.dirname(
    os.path.abspath(__file__))), "README.md")
BEGIN = "<!-- reliability-table:begin -->"
END = "<!-- reliability-table:end -->"

COLUMNS = collections.OrderedDict([
    ("oor", "id ≥ C"),
    ("neg", "id < 0"),
    ("empty_rows", "empty rows"),
    ("zero_rows", "zero-row batch"),
    ("nan", "NaN / Inf"),
    ("dtype", "wrong dtype"),
    ("rank", "wrong rank"),
    ("k0", "K = 0"),
    ("k_gt_c", "K > C"),
    ("long", "10,000-long history"),
])

COMPONENTS = [
    "ops.validate_ids", "ops.validate_ids_reference",
    "ops.ragged_attention", "ops.ragged_attention_reference",
    "ops.ragged_attention_qkvpacked",
    "ops.cut_cross_entropy", "ops.cut_cross_entropy_reference",
    "ops.cce_minus", "ops.cce_minus_reference",
    "ops.kernel_sampler_draw", "ops.kernel_sampler_draw_reference",
    "ops.kernel_log_probabilities",
    "layers.RaggedMultiHeadAttention", "layers.RaggedTransformerBlock",
    "layers.RaggedPositionalEmbedding", "layers.SequenceEncoder",
    "layers.SequenceEncoder.call_padded", "layers.PaddedTransformerBlock",
    "layers.PaddedSequenceEncoder", "layers.IntegratedScorer",
    "losses.CutCrossEntropy", "losses.CCEMinus", "losses.SampledSoftmax",
    "losses.full_softmax_cross_entropy",
    "losses.corrected_softmax_cross_entropy", "losses.accidental_hits",
    "samplers.Uniform", "samplers.LogUniform", "samplers.Unigram",
    "samplers.InBatch", "samplers.HardNegatives", "samplers.Mixed",
    "samplers.KernelSampler", "samplers.CollaborativeSampler",
    "tasks.NextItemTask", "tasks.SampledRetrieval",
]

# Rows whose documented behaviour is the compiled op's: skipped when the op
# library is not loaded (the pure-TF twins have rows of their own).
FUSED_ROWS = {"ops.validate_ids", "ops.ragged_attention",
              "ops.ragged_attention_qkvpacked",
              "ops.cut_cross_entropy", "ops.cce_minus",
              "ops.kernel_sampler_draw"}


# ---------------------------------------------------------------------------
# Expectations and cases.

@dataclasses.dataclass(frozen=True)
class Raises:
    """The call raises `error`; its message contains every fragment."""
    error: type
    fragments: tuple


@dataclasses.dataclass(frozen=True)
class Ok:
    """The call returns; `check(result, *args)` asserts what it must be."""
    summary: str
    check: object


@dataclasses.dataclass(frozen=True)
class Case:
    """One bad input given to one component.

    Attributes:
        component: README row (an entry of COMPONENTS).
        column: kind of bad input (a key of COLUMNS).
        label: what exactly is bad, when it needs saying ("" otherwise).
        setup: () -> (fn, args); runs at test time, so nothing is built
            while pytest collects.
        expect: Raises or Ok.
        modes: EAGER and / or GRAPH (fn wrapped in tf.function, args passed
            as its arguments).
        needs_ops: the case needs the compiled op library (None: rows in
            FUSED_ROWS and every tf.function case, whose messages are the
            fused ops').
    """
    component: str
    column: str
    label: str
    setup: object
    expect: object
    modes: tuple = (EAGER,)
    needs_ops: object = None


CASES = []


def case(component, column, expect, setup, label="", modes=(EAGER,),
         needs_ops=None):
    """Adds a Case to CASES (see Case for the arguments)."""
    assert component in COMPONENTS and column in COLUMNS, (component, column)
    CASES.append(Case(component, column, label, setup, expect, tuple(modes),
                      needs_ops))


def raises(error, *fragments):
    """Expects `error` whose message contains every fragment."""
    return Raises(error, fragments)


def ok(summary, check):
    """Expects a result; `summary` is its README cell, `check` asserts it."""
    return Ok(summary, check)


# ---------------------------------------------------------------------------
# Inputs and checks shared by the cases.

def normal(shape, seed=0):
    """Deterministic standard-normal float32 values."""
    return tf.random.stateless_normal(shape, [seed, 7])


def with_value(x, index, value=np.nan):
    """`x` with x[index] = value (NaN by default)."""
    return tf.tensor_scatter_nd_update(x, [index], [value])


def ints(values, dtype=tf.int32):
    """An int32 tensor of `values`."""
    return tf.constant(values, dtype)


def ragged(lengths, dim=D, seed=0):
    """float RaggedTensor [B, (L), dim] with the given row lengths."""
    return tf.RaggedTensor.from_row_lengths(
        normal([sum(lengths), dim], seed), tf.constant(lengths, tf.int64))


def ragged_ids(lengths, seed=0):
    """int RaggedTensor [B, (L)] of ids in [0, C)."""
    values = tf.random.stateless_uniform([sum(lengths)], [seed, 3], 0, C,
                                         tf.int32)
    return tf.RaggedTensor.from_row_lengths(values,
                                            tf.constant(lengths, tf.int64))


def hidden(rows=3, seed=0):
    """float32 [rows, D] hidden states (query rows)."""
    return normal([rows, D], seed)


def table(seed=1):
    """float32 [C, D] item table."""
    return normal([C, D], seed)


def targets(rows=3):
    """int32 [rows] valid ids 0, 1, 2, ..."""
    return tf.range(rows, dtype=tf.int32) % C


def close(a, b, atol=1e-5):
    """Asserts float closeness."""
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5,
                               atol=atol)


def equal(a, b):
    """Asserts exact equality."""
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def nan_only_in(result, rows, clean):
    """`rows` of `result` are all NaN, the others equal `clean`'s."""
    result, clean = np.asarray(result), np.asarray(clean)
    bad = np.zeros(len(result), bool)
    bad[list(rows)] = True
    assert np.isnan(result[bad]).all(), result
    close(result[~bad], clean[~bad])


def same_nans_as(result, reference, both=False):
    """NaN exactly where `reference` is, equal elsewhere (`both`: and the
    reference has NaN and finite entries, so that the case tests both)."""
    result, reference = np.asarray(result), np.asarray(reference)
    if both:
        assert np.isnan(reference).any() and np.isfinite(reference).any()
    equal(np.isnan(result), np.isnan(reference))
    close(result[~np.isnan(result)], reference[~np.isnan(reference)])


def in_range(ids, num_items=C):
    """Asserts that every id lies in [0, num_items)."""
    ids = np.asarray(ids)
    assert ids.min() >= 0 and ids.max() < num_items, ids


def exact_causal_attention(q, k, v, positions):
    """float64 causal softmax attention of one row at `positions`.

    Args:
        q, k: [T, H, Dh]; v: [T, H, Dv] (the tokens of one sequence).
        positions: query positions.

    Returns:
        [len(positions), H, Dv]: sum_{j <= t} softmax_j(q_t . k_j /
        sqrt(Dh)) v_j.
    """
    q, k, v = (np.asarray(x, np.float64) for x in (q, k, v))
    out = []
    for t in positions:
        scores = np.einsum("hd,jhd->hj", q[t], k[:t + 1]) / math.sqrt(
            q.shape[-1])
        p = np.exp(scores - scores.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        out.append(np.einsum("hj,jhd->hd", p, v[:t + 1]))
    return np.stack(out)


SAMPLED_POSITIONS = [0, 1, 2, 63, 999, 5000, 9998, LONG - 1]


def check_long_attention(out, q, k, v, splits):
    """`out` of a 10,000-token row equals the float64 oracle."""
    del splits
    assert out.shape == (LONG, 1, D)
    close(tf.gather(out, SAMPLED_POSITIONS),
          exact_causal_attention(q, k, v, SAMPLED_POSITIONS), atol=1e-4)


def check_prefix(layer, prefix=64):
    """Causal layers: a 10,000-long row's first `prefix` outputs equal the
    outputs of its first `prefix` tokens alone (a row's past decides)."""
    def check(out, x):
        assert out.flat_values.shape == (LONG, D)
        assert np.isfinite(out.flat_values.numpy()).all()
        head = tf.RaggedTensor.from_row_lengths(x.flat_values[:prefix],
                                                [prefix])
        close(out.flat_values[:prefix], layer(head).flat_values, atol=1e-4)
    return check


# ---------------------------------------------------------------------------
# ops

# validate_ids and its reference (same eager wording; the reference's graph
# check is a tf.debugging.Assert).
for _name, _fn in (("ops.validate_ids", ops.validate_ids),
                   ("ops.validate_ids_reference",
                    ops.validate_ids_reference)):
    _fused = _name == "ops.validate_ids"
    case(_name, "oor", raises(IAE, "ids[1] = 9 is out of range [0, 8)"),
         lambda fn=_fn: (fn, (ints([1, 9, 3]), C)),
         modes=BOTH if _fused else (EAGER,))
    if not _fused:
        case(_name, "oor",
             raises(IAE, "ids has an id out of range [0, num_items)",
                    "[first bad id =] [9]"),
             lambda fn=_fn: (fn, (ints([1, 9, 3]), C)), modes=(GRAPH,))
    case(_name, "neg", raises(IAE, "ids[0, 1] = -1 is out of range [0, 8)"),
         lambda fn=_fn: (fn, (ints([[1, -1]]), C)))
    case(_name, "empty_rows", ok(
        "ragged ids returned as they are",
        lambda out, ids, num: np.testing.assert_(
            out.to_list() == [[1], [], [2]])),
         lambda fn=_fn: (fn, (tf.ragged.constant([[1], [], [2]]), C)))
    case(_name, "zero_rows", ok(
        "empty ids returned as they are",
        lambda out, ids, num: equal(out.shape, [0])),
         lambda fn=_fn: (fn, (tf.zeros([0], tf.int64), C)))
    case(_name, "dtype",
         raises(ValueError, "ids must be int32 or int64 ids, got float32"
                if _fused else "ids must be integer ids, got float32"),
         lambda fn=_fn: (fn, (tf.constant([1.0, 2.0]), C)))
    case(_name, "long",
         raises(IAE, "ids[9999] = 8 is out of range [0, 8)"),
         lambda fn=_fn: (fn, (tf.concat([tf.zeros([LONG - 1], tf.int32),
                                         [C]], 0), C)),
         label="the last of 10,000 ids bad")


def _attention_inputs(splits, tokens=5, seed=0):
    return (normal([tokens, 1, D], seed), normal([tokens, 1, D], seed + 1),
            normal([tokens, 1, D], seed + 2), ints(splits))


def _attention_nan(out, q, k, v, splits):
    # Token 0 has a NaN query: its output is NaN; every other token (its
    # row's included: they read token 0's key and value, not its query)
    # equals the run with that query entry at 0.
    clean = ops.ragged_attention_reference(with_value(q, [0, 0, 0], 0.0), k,
                                           v, splits)
    nan_only_in(out, [0], clean)


for _name, _fn in (("ops.ragged_attention", ops.ragged_attention),
                   ("ops.ragged_attention_reference",
                    ops.ragged_attention_reference)):
    _fused = _name == "ops.ragged_attention"
    case(_name, "oor", raises(
        IAE, "row_splits[-1] = row_splits[2] = 7 must equal the number of "
             "packed tokens T = 5"),
         lambda fn=_fn: (fn, _attention_inputs([0, 2, 7])),
         label="row_splits past T", modes=BOTH if _fused else (EAGER,))
    if not _fused:
        case(_name, "oor", raises(
            IAE, "row_splits must start at 0, be non-decreasing and end at "
                 "the number of packed tokens T"),
             lambda fn=_fn: (fn, _attention_inputs([0, 2, 7])),
             label="row_splits past T", modes=(GRAPH,))
    case(_name, "neg", raises(IAE, "row_splits[0] must be 0, got -1"),
         lambda fn=_fn: (fn, _attention_inputs([-1, 2, 5])),
         label="row_splits[0] < 0")
    case(_name, "neg", raises(
        IAE, "row_splits must be non-decreasing, but row_splits[2] = 2 < "
             "row_splits[1] = 3"),
         lambda fn=_fn: (fn, _attention_inputs([0, 3, 2, 5])),
         label="a negative row length")
    case(_name, "empty_rows", ok(
        "empty rows skipped; equals the reference on the other rows",
        lambda out, q, k, v, s: close(out, ops.ragged_attention_reference(
            q, k, v, ints([0, 2, 5])))),
         lambda fn=_fn: (fn, _attention_inputs([0, 0, 2, 2, 5, 5])))
    case(_name, "zero_rows", ok(
        "[0, H, Dv] output",
        lambda out, q, k, v, s: equal(out.shape, [0, 1, D])),
         lambda fn=_fn: (fn, _attention_inputs([0], tokens=0)))
    case(_name, "nan", ok(
        "NaN query: NaN output for that token only", _attention_nan),
         lambda fn=_fn: (fn, (with_value(normal([5, 1, D]), [0, 0, 0]),
                              normal([5, 1, D], 1), normal([5, 1, D], 2),
                              ints([0, 2, 5]))))
    case(_name, "dtype", raises(ValueError,
                                "queries must be floating point, got int32"),
         lambda fn=_fn: (fn, (tf.zeros([5, 1, D], tf.int32),) +
                         _attention_inputs([0, 5])[1:]))
    case(_name, "dtype", raises(ValueError,
                                "row_splits must be integer, got float32"),
         lambda fn=_fn: (fn, _attention_inputs([0, 5])[:3] +
                         (tf.constant([0.0, 5.0]),)))
    case(_name, "rank", raises(
        ValueError, "queries must be packed [T, H, Dh], got shape (5, 4)"),
         lambda fn=_fn: (fn, (normal([5, D]),) +
                         _attention_inputs([0, 5])[1:]))
# One 10,000-token row: the fused op tiles it; the reference pads it.
case("ops.ragged_attention", "long", ok(
    "equals a float64 NumPy oracle at 8 positions", check_long_attention),
     lambda: (ops.ragged_attention,
              _attention_inputs([0, LONG], tokens=LONG)))
case("ops.ragged_attention_reference", "long", ok(
    "equals a float64 NumPy oracle at 8 positions; pads to [B, H, L, L] "
    "scores (0.4 GB per head at L = 10,000)", check_long_attention),
     lambda: (ops.ragged_attention_reference,
              _attention_inputs([0, LONG], tokens=LONG)))


# The q/k/v-packed entry point: one [T, 3, H, D] tensor, the same kernel.
def _qkv_inputs(splits, tokens=5, seed=0):
    q, k, v, s = _attention_inputs(splits, tokens, seed)
    return tf.stack([q, k, v], axis=1), s


def _unstacked(check):
    """A check of (out, q, k, v, splits) as one of (out, qkv, splits)."""
    return lambda out, qkv, s: check(out, *tf.unstack(qkv, 3, axis=1), s)


_QKV = "ops.ragged_attention_qkvpacked"
_qkv_fn = ops.ragged_attention_qkvpacked
case(_QKV, "oor", raises(
    IAE, "row_splits[-1] = row_splits[2] = 7 must equal the number of "
         "packed tokens T = 5"),
     lambda: (_qkv_fn, _qkv_inputs([0, 2, 7])), label="row_splits past T",
     modes=BOTH)
case(_QKV, "neg", raises(IAE, "row_splits[0] must be 0, got -1"),
     lambda: (_qkv_fn, _qkv_inputs([-1, 2, 5])), label="row_splits[0] < 0")
case(_QKV, "neg", raises(
    IAE, "row_splits must be non-decreasing, but row_splits[2] = 2 < "
         "row_splits[1] = 3"),
     lambda: (_qkv_fn, _qkv_inputs([0, 3, 2, 5])),
     label="a negative row length")
case(_QKV, "empty_rows", ok(
    "empty rows skipped; equals the reference on the other rows",
    _unstacked(lambda out, q, k, v, s: close(
        out, ops.ragged_attention_reference(q, k, v, ints([0, 2, 5]))))),
     lambda: (_qkv_fn, _qkv_inputs([0, 0, 2, 2, 5, 5])))
case(_QKV, "zero_rows", ok(
    "[0, H, D] output", lambda out, qkv, s: equal(out.shape, [0, 1, D])),
     lambda: (_qkv_fn, _qkv_inputs([0], tokens=0)))
case(_QKV, "nan", ok(
    "NaN query: NaN output for that token only", _unstacked(_attention_nan)),
     lambda: (_qkv_fn, (tf.stack([with_value(normal([5, 1, D]), [0, 0, 0]),
                                  normal([5, 1, D], 1),
                                  normal([5, 1, D], 2)], axis=1),
                        ints([0, 2, 5]))))
case(_QKV, "dtype", raises(ValueError, "qkv must be floating point, got int32"),
     lambda: (_qkv_fn, (tf.zeros([5, 3, 1, D], tf.int32), ints([0, 5]))))
case(_QKV, "dtype", raises(ValueError,
                           "row_splits must be integer, got float32"),
     lambda: (_qkv_fn, (_qkv_inputs([0, 5])[0], tf.constant([0.0, 5.0]))))
case(_QKV, "rank", raises(
    ValueError, "qkv must be packed [T, 3, H, D] (queries, keys, values), "
                "got shape (5, 1, 4)"),
     lambda: (_qkv_fn, (normal([5, 1, D]), ints([0, 5]))))
case(_QKV, "long", ok(
    "equals a float64 NumPy oracle at 8 positions",
    _unstacked(check_long_attention)),
     lambda: (_qkv_fn, _qkv_inputs([0, LONG], tokens=LONG)))


for _name, _fn in (("ops.cut_cross_entropy", ops.cut_cross_entropy),
                   ("ops.cut_cross_entropy_reference",
                    ops.cut_cross_entropy_reference)):
    _fused = _name == "ops.cut_cross_entropy"
    case(_name, "oor", raises(IAE, "targets[1] = 9 is out of range [0, 8)"),
         lambda fn=_fn: (fn, (hidden(), table(), ints([1, 9, 3]))),
         modes=BOTH if _fused else (EAGER,))
    if not _fused:
        case(_name, "oor", raises(
            IAE, "targets has an id out of range [0, num_items)",
            "[first bad id =] [9]"),
             lambda fn=_fn: (fn, (hidden(), table(), ints([1, 9, 3]))),
             modes=(GRAPH,))
    case(_name, "neg", raises(IAE, "targets[1] = -1 is out of range [0, 8)"),
         lambda fn=_fn: (fn, (hidden(), table(), ints([1, -1, 3]))))
    case(_name, "zero_rows", ok(
        "[0] losses", lambda out, h, w, y: equal(out.shape, [0])),
         lambda fn=_fn: (fn, (hidden(0), table(), targets(0))))
    case(_name, "nan", ok(
        "NaN loss in that row only",
        lambda out, h, w, y: nan_only_in(out, [0], losses.
                                         full_softmax_cross_entropy(
                                             hidden(), w, y))),
         lambda fn=_fn: (fn, (with_value(hidden(), [0, 0]), table(),
                              targets())), label="hidden NaN")
    case(_name, "nan", ok(
        "NaN where a logit is +inf, probability 0 where it is -inf (as "
        "full_softmax_cross_entropy)",
        lambda out, h, w, y: same_nans_as(
            out, losses.full_softmax_cross_entropy(h, w, y), both=True)),
         lambda fn=_fn: (fn, (hidden(4), with_value(table(), [5, 0], np.inf),
                              targets(4))), label="item_table +Inf")
    case(_name, "dtype", raises(ValueError,
                                "targets must be integer, got float32"),
         lambda fn=_fn: (fn, (hidden(), table(), tf.constant([1., 2., 3.]))))
    case(_name, "dtype", raises(
        ValueError, "hidden (float32) and item_table (float16) must share a "
                    "dtype"),
         lambda fn=_fn: (fn, (hidden(), tf.cast(table(), tf.float16),
                              targets())))
    case(_name, "rank", raises(ValueError,
                               "hidden must be [N, D], got shape (3,)"),
         lambda fn=_fn: (fn, (tf.zeros([3]), table(), targets())))
    case(_name, "long", ok(
        "N = 10,000 rows: equals full_softmax_cross_entropy",
        lambda out, h, w, y: close(out, losses.full_softmax_cross_entropy(
            h, w, y), atol=1e-4)),
         lambda fn=_fn: (fn, (hidden(LONG), table(), targets(LONG))))


def _negatives(ids, log_q=None):
    ids = ints(ids)
    return ops.GivenNegatives(ids, tf.zeros(ids.shape) if log_q is None
                              else tf.constant(log_q, tf.float32))


def _generated(num):
    return ops.generated_negatives(num, seed=1, step=0)


for _name, _fn in (("ops.cce_minus", ops.cce_minus),
                   ("ops.cce_minus_reference", ops.cce_minus_reference)):
    _fused = _name == "ops.cce_minus"
    _modes = BOTH if _fused else (EAGER,)
    case(_name, "oor", raises(IAE, "targets[1] = 9 is out of range [0, 8)"),
         lambda fn=_fn: (fn, (hidden(), table(), ints([1, 9, 3]),
                              _generated(4))), label="targets", modes=_modes)
    case(_name, "oor", raises(
        IAE, "negative_ids[1, 1] = 8 is out of range [0, 8)"),
         lambda fn=_fn: (fn, (hidden(), table(), targets(),
                              _negatives([[4, 2], [3, 8], [0, 5]]))),
         label="negative ids", modes=_modes)
    if not _fused:
        case(_name, "oor", raises(
            IAE, "negative_ids has an id out of range [0, num_items)"),
             lambda fn=_fn: (fn, (hidden(), table(), targets(),
                                  _negatives([[4, 2], [3, 8], [0, 5]]))),
             label="negative ids", modes=(GRAPH,))
    case(_name, "neg", raises(
        IAE, "negative_ids[1] = -2 is out of range [0, 8)"),
         lambda fn=_fn: (fn, (hidden(), table(), targets(),
                              _negatives([4, -2]))), label="shared negatives")
    case(_name, "zero_rows", ok(
        "[0] losses", lambda out, *args: equal(out.shape, [0])),
         lambda fn=_fn: (fn, (hidden(0), table(), targets(0),
                              _generated(4))))
    case(_name, "nan", ok(
        "NaN loss in that row only",
        lambda out, h, w, y, n: nan_only_in(out, [0], ops.cce_minus_reference(
            hidden(), w, y, n))),
         lambda fn=_fn: (fn, (with_value(hidden(), [0, 0]), table(),
                              targets(), _generated(4))), label="hidden NaN")
    case(_name, "nan", ok(
        "NaN loss in that row only",
        lambda out, h, w, y, n: nan_only_in(out, [0], ops.cce_minus_reference(
            h, w, y, _negatives([[4, 2], [3, 4], [0, 5]])))),
         lambda fn=_fn: (fn, (hidden(), table(), targets(), _negatives(
             [[4, 2], [3, 4], [0, 5]], [[np.nan, 0], [0, 0], [0, 0]]))),
         label="log_q NaN")
    case(_name, "dtype", raises(
        ValueError, "negative ids must be int32 or int64, got float32"),
         lambda fn=_fn: (fn, (hidden(), table(), targets(), ops.GivenNegatives(
             tf.zeros([3, 2]), tf.zeros([3, 2])))))
    case(_name, "dtype", raises(ValueError,
                                "hidden must be floating point, got int32"),
         lambda fn=_fn: (fn, (tf.zeros([3, D], tf.int32), table(),
                              targets(), _generated(4))))
    case(_name, "rank", raises(
        ValueError, "negative ids must be [K] (shared) or [N, K] (per row), "
                    "got shape (3, 2, 1)"),
         lambda fn=_fn: (fn, (hidden(), table(), targets(), ops.GivenNegatives(
             tf.zeros([3, 2, 1], tf.int32), tf.zeros([3, 2, 1])))))
    case(_name, "rank", raises(
        ValueError, "per-row negative ids (2, 2) must have the N rows of "
                    "hidden (3, 4)"),
         lambda fn=_fn: (fn, (hidden(), table(), targets(),
                              _negatives([[1, 2], [3, 4]]))))
    case(_name, "k0", ok(
        "loss 0 (the positive alone)",
        lambda out, *args: equal(out, [0.0, 0.0, 0.0])),
         lambda fn=_fn: (fn, (hidden(), table(), targets(), _generated(0))),
         label="generated")
    case(_name, "k0", ok(
        "loss 0 (the positive alone)",
        lambda out, *args: equal(out, [0.0, 0.0, 0.0])),
         lambda fn=_fn: (fn, (hidden(), table(), targets(), ops.GivenNegatives(
             tf.zeros([3, 0], tf.int32), tf.zeros([3, 0])))),
         label="given [N, 0]")
    case(_name, "k0", raises(ValueError,
                             "num negatives must be an int >= 0, got -1"),
         lambda fn=_fn: ((lambda h, w, y: fn(h, w, y, _generated(-1))),
                         (hidden(), table(), targets())), label="K = -1")
    case(_name, "k_gt_c", ok(
        "K = 20 draws with replacement; equals cce_minus_reference",
        lambda out, h, w, y, n: close(out, ops.cce_minus_reference(
            h, w, y, n))),
         lambda fn=_fn: (fn, (hidden(), table(), targets(), _generated(20))))
    case(_name, "long", ok(
        "N = 10,000 rows: finite, equals cce_minus_reference",
        lambda out, h, w, y, n: close(out, ops.cce_minus_reference(
            h, w, y, n), atol=1e-4)),
         lambda fn=_fn: (fn, (hidden(LONG), table(), targets(LONG),
                              _generated(4))))


def _kernel_sampler():
    return samplers.KernelSampler(C, D, item_table=table(), seed=1)


def _draw_fused(query, num=4):
    """ops.kernel_sampler_draw over a fresh sampler's tree."""
    sampler = _kernel_sampler()
    def draw(query, num):
        return ops.kernel_sampler_draw(
            query, sampler.tree, sampler.tree_counts, sampler.snapshot,
            tf.constant([1, 2], tf.int32), num, 100.0, sampler.layout)
    return draw, (query, num)


def _draw_reference(query, num=4):
    return (lambda query, num: ops.kernel_sampler_draw_reference(
        query, table(), tf.constant([1, 2], tf.int32), num, 100.0)), (query,
                                                                       num)


def _check_draws(rows, num):
    def check(out, query, *args):
        ids, log_q = out
        equal(ids.shape, [rows, num])
        if rows:
            in_range(ids)
            exact = ops.kernel_log_probabilities(query, table(), 100.0)
            close(log_q, tf.gather(exact, ids, batch_dims=1), atol=1e-4)
    return check


for _name, _setup in (("ops.kernel_sampler_draw", _draw_fused),
                      ("ops.kernel_sampler_draw_reference",
                       _draw_reference)):
    _fused = _name == "ops.kernel_sampler_draw"
    case(_name, "zero_rows", ok("[0, K] ids and log q", _check_draws(0, 4)),
         lambda s=_setup: s(hidden(0)))
    case(_name, "nan", raises(IAE, "query[1, 2] = nan is not finite"
                              if _fused else "query has NaN/Inf entries"),
         lambda s=_setup: s(with_value(hidden(), [1, 2])), modes=BOTH)
    case(_name, "dtype", ok("int query cast to float32; exact log q",
                            _check_draws(3, 4)),
         lambda s=_setup: s(tf.constant([[1, 0, 2, 0], [0, 1, 0, 0],
                                         [3, 1, 1, 2]])))
    case(_name, "rank", raises(ValueError,
                               "query must be [T, D], got shape (4,)"),
         lambda s=_setup: s(normal([D])))
    case(_name, "k0", raises(ValueError, "num (K) must be >= 1, got 0"),
         lambda s=_setup: s(hidden(), 0))
    case(_name, "k_gt_c", ok("K = 20 draws per row with replacement; exact "
                             "log q", _check_draws(3, 20)),
         lambda s=_setup: s(hidden(), 20))
    case(_name, "long", ok("T = 10,000 query rows; exact log q",
                           _check_draws(LONG, 4)),
         lambda s=_setup: s(hidden(LONG)))
# A K known only when the op runs: the op's own check.
case("ops.kernel_sampler_draw", "k0", raises(IAE, "num must be > 0, got 0"),
     lambda: _draw_fused(hidden(), tf.constant(0)), label="K a tensor",
     modes=(GRAPH,))

_klp = ops.kernel_log_probabilities
case("ops.kernel_log_probabilities", "zero_rows", ok(
    "[0, C] log q", lambda out, *args: equal(out.shape, [0, C])),
     lambda: (_klp, (hidden(0), table(), 100.0)))
case("ops.kernel_log_probabilities", "nan", ok(
    "NaN row of log q for a NaN query row (no check: the draws check)",
    lambda out, q, w, a: nan_only_in(out, [1], _klp(hidden(), w, a))),
     lambda: (_klp, (with_value(hidden(), [1, 2]), table(), 100.0)))
case("ops.kernel_log_probabilities", "dtype", ok(
    "int query cast to float64",
    lambda out, q, w, a: close(out, _klp(tf.cast(q, tf.float32), w, a))),
     lambda: (_klp, (tf.constant([[1, 0, 2, 0]]), table(), 100.0)))
case("ops.kernel_log_probabilities", "rank", raises(
    ValueError, "query must be [T, D], got shape (4,)"),
     lambda: (_klp, (normal([D]), table(), 100.0)))
case("ops.kernel_log_probabilities", "long", ok(
    "[10000, C]; every row sums to 1",
    lambda out, *args: close(tf.reduce_sum(tf.exp(out), 1), np.ones(LONG))),
     lambda: (_klp, (hidden(LONG), table(), 100.0)))


# ---------------------------------------------------------------------------
# layers

def _isolated_rows(layer):
    """Check: the output's rows equal the layer on the same tokens with the
    empty rows left out."""
    def check(out, x):
        equal(out.row_lengths(), x.row_lengths())
        dense = tf.RaggedTensor.from_row_lengths(
            x.flat_values, [n for n in x.row_lengths().numpy() if n])
        close(out.flat_values, layer(dense).flat_values)
    return check


def _nan_stays_in_row(layer):
    """Check: a NaN token makes its own row NaN and no other."""
    def check(out, x):
        values = out.flat_values.numpy()
        assert np.isnan(values[:2]).any(), values  # row 0: tokens 0-1
        clean = layer(tf.RaggedTensor.from_row_lengths(x.flat_values[2:],
                                                       [3]))
        close(values[2:], clean.flat_values)
    return check


def _ragged_layer_cases(name, make, arg, no_width, long_summary, long_check,
                        make_long=None, too_long=None):
    """Cases shared by the ragged [B, (L), D] -> [B, (L), D] layers.

    Args:
        name: the row.
        make: () -> a fresh layer.
        arg: the name of the layer's input argument (in its messages).
        no_width: the message fragment for a [B, (L)] input (no D; Keras
            asks the layer's build about it first).
        long_summary, long_check: the 10,000-token case: its summary and
            check(layer) -> check(out, x).
        make_long: () -> the layer for that case (default: make).
        too_long: (make, message fragment) of a layer whose max_len is
            exceeded, or None.
    """
    built = {}  # the layer of the running case, for its check

    def setup(x, make_layer=make):
        built["layer"] = make_layer()
        return built["layer"], (x,)

    case(name, "empty_rows", ok(
        "empty rows stay empty; the other rows as without them",
        lambda out, x: _isolated_rows(built["layer"])(out, x)),
         lambda: setup(ragged([2, 0, 3, 0])))
    case(name, "zero_rows", ok(
        "B = 0: an empty [0, (L), D] result",
        lambda out, x: equal(out.flat_values.shape, [0, D])),
         lambda: setup(ragged([])))
    case(name, "nan", ok(
        "NaN stays in its row",
        lambda out, x: _nan_stays_in_row(built["layer"])(out, x)),
         lambda: setup(ragged([2, 3]).with_flat_values(
             with_value(ragged([2, 3]).flat_values, [0, 0]))))
    case(name, "dtype", raises(ValueError,
                               f"`{arg}` must be floating point"),
         lambda: setup(tf.RaggedTensor.from_row_lengths(
             tf.zeros([5, D], tf.int32), [2, 3])))
    case(name, "rank", raises(
        ValueError, f"`{arg}` must be a tf.RaggedTensor [B, (L), D]"),
         lambda: setup(tf.zeros([2, 3, D])), label="dense [B, L, D]")
    case(name, "rank", raises(ValueError, no_width),
         lambda: setup(tf.ragged.constant([[1.0, 2.0], [3.0]])),
         label="ragged [B, (L)]")
    if too_long is not None:
        case(name, "long", raises(IAE, too_long[1]),
             lambda: setup(ragged([LONG]), too_long[0]), modes=BOTH,
             label="max_len = 200")
    # The fused op: the reference would pad to [1, H, L, L] (0.4 GB).
    case(name, "long", ok(long_summary, lambda out, x: long_check(
        built["layer"])(out, x)),
         lambda: setup(ragged([LONG]), make_long or make),
         label="max_len = 10,000" if too_long else "", needs_ops=True)


def _mha_long_check(layer):
    def check(out, x):
        flat = x.flat_values
        q = layer.query_dense(flat)
        k = layer.key_dense(flat)
        v = layer.value_dense(flat)
        context = exact_causal_attention(q, k, v, SAMPLED_POSITIONS)
        expected = layer.output_dense(tf.constant(context, tf.float32))
        close(tf.gather(out.flat_values, SAMPLED_POSITIONS), expected,
              atol=1e-4)
    return check


_ragged_layer_cases(
    "layers.RaggedMultiHeadAttention",
    lambda: layers.RaggedMultiHeadAttention(1, D), "query",
    "query must be a RaggedTensor [B, (L), D] with known D",
    "equals a float64 NumPy attention (the layer's projections) at 8 "
    "positions", _mha_long_check)
_ragged_layer_cases(
    "layers.RaggedTransformerBlock",
    lambda: layers.RaggedTransformerBlock(1, D), "inputs",
    "inputs must be [B, (L), D] with D = 4",
    "finite; its first 64 outputs equal the 64-token prefix's (causal)",
    check_prefix)
_ragged_layer_cases(
    "layers.SequenceEncoder",
    lambda: layers.SequenceEncoder(8, D, num_blocks=1, dropout=0.0),
    "embeddings", "inputs must be [B, (L), D] with D = 4",
    "finite; its first 64 outputs equal the 64-token prefix's (causal)",
    check_prefix,
    make_long=lambda: layers.SequenceEncoder(LONG, D, num_blocks=1,
                                             dropout=0.0),
    too_long=(lambda: layers.SequenceEncoder(200, D, num_blocks=1),
              "a row is longer than max_len = 200; cut histories to their "
              "last max_len items first"))

_pos = layers.RaggedPositionalEmbedding
case("layers.RaggedPositionalEmbedding", "empty_rows", ok(
    "empty rows get no positions",
    lambda out, x: equal(out.row_lengths(), [2, 0, 3])),
     lambda: (_pos(8, D), (ragged([2, 0, 3]),)))
case("layers.RaggedPositionalEmbedding", "zero_rows", ok(
    "B = 0: an empty result", lambda out, x: equal(out.flat_values.shape,
                                                  [0, D])),
     lambda: (_pos(8, D), (ragged([]),)))
case("layers.RaggedPositionalEmbedding", "nan", ok(
    "values are never read (row splits only)",
    lambda out, x: np.testing.assert_(np.isfinite(
        out.flat_values.numpy()).all())),
     lambda: (_pos(8, D), (ragged([2, 3]).with_flat_values(
         tf.fill([5, D], np.nan)),)))
case("layers.RaggedPositionalEmbedding", "rank", raises(
    ValueError, "`inputs` must be a tf.RaggedTensor [B, (L), ...]"),
     lambda: (_pos(8, D), (tf.zeros([2, 3], tf.int64),)),
     label="dense [B, L]")
case("layers.RaggedPositionalEmbedding", "long", raises(
    IAE, "a row is longer than max_len = 200"),
     lambda: (_pos(200, D), (ragged_ids([LONG]),)), modes=BOTH,
     label="max_len = 200")
case("layers.RaggedPositionalEmbedding", "long", ok(
    "positions 0 .. 9,999",
    lambda out, x: equal(out.flat_values.shape, [LONG, D])),
     lambda: (_pos(LONG, D), (ragged_ids([LONG]),)),
     label="max_len = 10,000")


def _encoder():
    return layers.SequenceEncoder(8, D, num_blocks=1, dropout=0.0)


def _call_padded(embeddings, lengths):
    encoder = _encoder()
    return encoder.call_padded, (embeddings, lengths)


def _call_padded_rows(zero_row):
    """Check: finite, input-shaped, row `zero_row` (length 0) all zeros."""
    def check(out, embeddings, lengths):
        out = out.numpy()
        assert out.shape == tuple(embeddings.shape)
        assert np.isfinite(out).all()
        equal(out[zero_row], np.zeros_like(out[zero_row]))
    return check


case("layers.SequenceEncoder.call_padded", "oor", raises(
    IAE, "lengths exceed the padded width L of embeddings"),
     lambda: _call_padded(normal([2, 3, D]), ints([4, 1])),
     label="lengths > L", modes=BOTH)
case("layers.SequenceEncoder.call_padded", "neg", raises(
    IAE, "negative lengths"),
     lambda: _call_padded(normal([2, 3, D]), ints([-1, 1])),
     label="lengths < 0", modes=BOTH)
case("layers.SequenceEncoder.call_padded", "empty_rows", ok(
    "a row of length 0 comes back all zeros",
    _call_padded_rows(0)),
     lambda: _call_padded(normal([2, 3, D]), ints([0, 2])))
case("layers.SequenceEncoder.call_padded", "zero_rows", ok(
    "[0, L, D]", lambda out, e, n: equal(out.shape, [0, 3, D])),
     lambda: _call_padded(normal([0, 3, D]), ints([])))
case("layers.SequenceEncoder.call_padded", "nan", ok(
    "NaN in the padding is never read",
    lambda out, e, n: np.testing.assert_(np.isfinite(out.numpy()).all())),
     lambda: _call_padded(with_value(normal([2, 3, D]), [1, 2, 0]),
                          ints([3, 2])), label="padding NaN")
case("layers.SequenceEncoder.call_padded", "dtype", raises(
    ValueError, "lengths must be int [B], got float32"),
     lambda: _call_padded(normal([2, 3, D]), tf.constant([3.0, 2.0])))
case("layers.SequenceEncoder.call_padded", "rank", raises(
    ValueError, "embeddings must be [B, L, 4], got shape (3, 4)"),
     lambda: _call_padded(normal([3, D]), ints([3, 2])))
case("layers.SequenceEncoder.call_padded", "long", raises(
    IAE, "a row is longer than max_len = 8"),
     lambda: _call_padded(normal([1, LONG, D]), ints([LONG])),
     label="max_len = 8")


def _padded_block(x, mask=None):
    """PaddedTransformerBlock on x with an all-True [B, 3, 3] mask."""
    if mask is None:
        rows = x.shape[0] if x.shape.rank == 3 and x.shape[0] == 0 else 2
        mask = tf.ones([rows, 3, 3], tf.bool)
    return layers.PaddedTransformerBlock(1, D), (x, mask)


case("layers.PaddedTransformerBlock", "empty_rows", ok(
    "finite; a query with no allowed key attends uniformly (as tf_keras "
    "MultiHeadAttention)",
    lambda out, x, m: np.testing.assert_(np.isfinite(out.numpy()).all())),
     lambda: _padded_block(normal([2, 3, D]), tf.concat(
         [tf.ones([1, 3, 3], tf.bool), tf.zeros([1, 3, 3], tf.bool)], 0)),
     label="an all-False mask row")
case("layers.PaddedTransformerBlock", "zero_rows", ok(
    "[0, L, D]", lambda out, x, m: equal(out.shape, [0, 3, D])),
     lambda: _padded_block(normal([0, 3, D])))
case("layers.PaddedTransformerBlock", "nan", ok(
    "NaN stays in its row",
    lambda out, x, m: (np.testing.assert_(np.isnan(out[0].numpy()).all()),
                       np.testing.assert_(np.isfinite(out[1].numpy()).all()))),
     lambda: _padded_block(with_value(normal([2, 3, D]), [0, 0, 0])))
def _padded_prefix(out, x, mask, block, prefix=64):
    """Check: finite, and (causal mask) the first `prefix` outputs equal
    the block on the first `prefix` positions alone."""
    assert np.isfinite(out.numpy()).all()
    close(out[:, :prefix], block(x[:, :prefix], mask[:, :prefix, :prefix]),
          atol=1e-4)


def _padded_long():
    mask = tf.linalg.band_part(tf.ones([LONG, LONG], tf.bool), -1, 0)
    return ((lambda x, m, block: block(x, m)),
            (normal([1, LONG, D]), mask[tf.newaxis],
             layers.PaddedTransformerBlock(1, D)))


case("layers.PaddedTransformerBlock", "long", ok(
    "works; [B, H, L, L] attention scores (0.4 GB per head at "
    "L = 10,000); the first 64 outputs equal the 64-position prefix's",
    _padded_prefix), _padded_long)
case("layers.PaddedTransformerBlock", "dtype", raises(
    ValueError, "`x` must be floating point, got int32"),
     lambda: _padded_block(tf.zeros([2, 3, D], tf.int32)))
case("layers.PaddedTransformerBlock", "rank", raises(
    ValueError, "`x` must be [B, L, 4], got shape (3, 4)"),
     lambda: _padded_block(normal([3, D])))
case("layers.PaddedTransformerBlock", "rank", raises(
    ValueError, "`x` must be a dense right-padded tensor"),
     lambda: _padded_block(ragged([2, 3])), label="ragged")


def _padded_encoder(embeddings, lengths, max_len=8):
    return (layers.PaddedSequenceEncoder(max_len, D, num_blocks=1,
                                         dropout=0.0), (embeddings, lengths))


def _padding_never_read(out, embeddings, lengths):
    out = out.numpy()
    assert np.isfinite(out).all(), out


case("layers.PaddedSequenceEncoder", "oor", raises(
    IAE, "lengths exceed the padded width L of embeddings"),
     lambda: _padded_encoder(normal([2, 3, D]), ints([4, 1])),
     label="lengths > L", modes=BOTH)
case("layers.PaddedSequenceEncoder", "neg", raises(IAE, "negative lengths"),
     lambda: _padded_encoder(normal([2, 3, D]), ints([-1, 1])),
     label="lengths < 0")
case("layers.PaddedSequenceEncoder", "empty_rows", ok(
    "a row of length 0 comes back all zeros",
    lambda out, e, n: equal(out[0], np.zeros([3, D]))),
     lambda: _padded_encoder(normal([2, 3, D]), ints([0, 2])))
case("layers.PaddedSequenceEncoder", "zero_rows", ok(
    "[0, L, D]", lambda out, e, n: equal(out.shape, [0, 3, D])),
     lambda: _padded_encoder(normal([0, 3, D]), ints([])))
case("layers.PaddedSequenceEncoder", "nan", ok(
    "NaN stays in its row",
    lambda out, e, n: (np.testing.assert_(np.isnan(out[0].numpy()).all()),
                       np.testing.assert_(np.isfinite(out[1].numpy()).all()))),
     lambda: _padded_encoder(with_value(normal([2, 3, D]), [0, 0, 0]),
                             ints([3, 3])), label="a real position NaN")
case("layers.PaddedSequenceEncoder", "nan", ok(
    "NaN in the padding is never read", _padding_never_read),
     lambda: _padded_encoder(with_value(normal([2, 3, D]), [1, 2, 0]),
                             ints([3, 2])), label="padding NaN")
case("layers.PaddedSequenceEncoder", "dtype", raises(
    ValueError, "`embeddings` must be floating point, got int32"),
     lambda: _padded_encoder(tf.zeros([2, 3, D], tf.int32), ints([3, 1])))
case("layers.PaddedSequenceEncoder", "dtype", raises(
    ValueError, "lengths must be int [B], got float32"),
     lambda: _padded_encoder(normal([2, 3, D]), tf.constant([3.0, 1.0])))
case("layers.PaddedSequenceEncoder", "rank", raises(
    ValueError, "`embeddings` must be [B, L, 4], got shape (3, 4)"),
     lambda: _padded_encoder(normal([3, D]), ints([3, 1])))
case("layers.PaddedSequenceEncoder", "long", raises(
    IAE, "embeddings have more positions L than max_len = 200"),
     lambda: _padded_encoder(normal([1, LONG, D]), ints([LONG]), 200),
     label="max_len = 200", modes=BOTH)


def _collaborative(num_items=C):
    """Users 0-2 with items; user 3 without any interaction."""
    return samplers.CollaborativeSampler.from_interactions(
        np.array([0, 0, 1, 1, 2]), np.array([1, 2, 3, 4, 5]), 4, num_items,
        seed=1)


def _scorer(scores, users):
    return layers.IntegratedScorer(_collaborative()), (scores, users)


case("layers.IntegratedScorer", "oor", raises(
    IAE, "user_ids[1] = 4 is out of range [0, 4)"),
     lambda: _scorer(tf.zeros([2, C]), ints([0, 4])), label="user ids")
# (Core ops only, for serving: its graph check is the pure-TF assertion.)
case("layers.IntegratedScorer", "oor", raises(
    IAE, "user_ids has an id out of range", "[first bad id =] [4]"),
     lambda: _scorer(tf.zeros([2, C]), ints([0, 4])), label="user ids",
     modes=(GRAPH,))
case("layers.IntegratedScorer", "neg", raises(
    IAE, "user_ids[1] = -1 is out of range [0, 4)"),
     lambda: _scorer(tf.zeros([2, C]), ints([0, -1])), label="user ids")
case("layers.IntegratedScorer", "empty_rows", ok(
    "the walk starts with its uniform jump; finite scores",
    lambda out, s, u: np.testing.assert_(np.isfinite(out.numpy()).all())),
     lambda: _scorer(tf.zeros([1, C]), ints([3])),
     label="user without interactions")
case("layers.IntegratedScorer", "zero_rows", ok(
    "[0, C]", lambda out, s, u: equal(out.shape, [0, C])),
     lambda: _scorer(tf.zeros([0, C]), ints([])))
case("layers.IntegratedScorer", "nan", ok(
    "a NaN score stays NaN; the others finite",
    lambda out, s, u: (equal(np.isnan(out.numpy()), np.isnan(s.numpy())))),
     lambda: _scorer(with_value(tf.zeros([2, C]), [0, 3]), ints([0, 1])))
case("layers.IntegratedScorer", "dtype", raises(
    ValueError, "the query must be int user ids [T]"),
     lambda: _scorer(tf.zeros([2, C]), tf.constant([0.0, 1.0])))
case("layers.IntegratedScorer", "rank", raises(
    ValueError, "scores must be [B, C] with C = sampler.num_items = 8, got "
                "shape (8,)"),
     lambda: _scorer(tf.zeros([C]), ints([0])))


# ---------------------------------------------------------------------------
# losses

def _cce_layer(**kwargs):
    return losses.CutCrossEntropy(**kwargs)


def _ccem_layer(num=4, **kwargs):
    return losses.CCEMinus(samplers.Uniform(C, seed=1), num, **kwargs)


def _sampled_layer(num=4, **kwargs):
    return losses.SampledSoftmax(samplers.Uniform(C, seed=1), num, **kwargs)


def _ragged_loss_inputs(lengths, seed=0):
    return ragged(lengths, seed=seed), table(), ragged_ids(lengths, seed)


def _flat_equivalent(make):
    """Check: the ragged call equals a fresh, identically seeded layer on
    the flat tokens (empty rows add nothing)."""
    def check(out, h, w, y):
        close(out, make()(h.flat_values, w, y.flat_values))
    return check


_LOSS_LAYERS = (("losses.CutCrossEntropy", _cce_layer, "targets"),
                ("losses.CCEMinus", _ccem_layer, "targets"),
                ("losses.SampledSoftmax", _sampled_layer, "positives"))
for _name, _make, _ids in _LOSS_LAYERS:
    case(_name, "oor", raises(IAE, f"{_ids}[1] = 9 is out of range [0, 8)"),
         lambda m=_make: (m(), (hidden(), table(), ints([1, 9, 3]))),
         modes=BOTH)
    case(_name, "neg", raises(IAE, f"{_ids}[1] = -1 is out of range [0, 8)"),
         lambda m=_make: (m(), (hidden(), table(), ints([1, -1, 3]))))
    case(_name, "empty_rows", ok(
        "ragged input: empty rows add nothing", _flat_equivalent(_make)),
         lambda m=_make: (m(), _ragged_loss_inputs([2, 0, 3, 0])))
    case(_name, "zero_rows", ok(
        "loss 0", lambda out, *args: equal(out, 0.0)),
         lambda m=_make: (m(), (hidden(0), table(), targets(0))))
    case(_name, "nan", ok(
        "loss NaN (propagates; see tf_keras.callbacks.TerminateOnNaN)",
        lambda out, *args: np.testing.assert_(np.isnan(out.numpy()))),
         lambda m=_make: (m(), (with_value(hidden(), [0, 0]), table(),
                                targets())), label="hidden NaN")
    case(_name, "dtype", raises(
        ValueError, f"{_ids} must be integer ids, got float32"),
         lambda m=_make: (m(), (hidden(), table(), tf.constant([1., 2., 3.]))))
    case(_name, "rank", raises(
        ValueError, "hidden must be [T, D] or ragged [B, (L), D], got shape "
                    "(1, 3, 4)"),
         lambda m=_make: (m(), (hidden()[tf.newaxis], table(), targets())))

case("losses.CutCrossEntropy", "long", ok(
    "equals the mean of full_softmax_cross_entropy",
    lambda out, h, w, y: close(out, tf.reduce_mean(
        losses.full_softmax_cross_entropy(h, w, y)), atol=1e-4)),
     lambda: (_cce_layer(), _ragged_loss_inputs([LONG])))
for _name, _make in (("losses.CCEMinus", _ccem_layer),
                     ("losses.SampledSoftmax", _sampled_layer)):
    case(_name, "k0", raises(
        ValueError, "num_negatives must be a positive integer, got 0"),
         lambda m=_make: (m, (0,)))
case("losses.CCEMinus", "k_gt_c", ok(
    "K = 20 draws with replacement; equals use_fused=False",
    lambda out, h, w, y: close(out, _ccem_layer(20, use_fused=False)(
        h, w, y))),
     lambda: (_ccem_layer(20), (hidden(), table(), targets())))
case("losses.CCEMinus", "long", ok(
    "equals use_fused=False (the pure-TF reference)",
    lambda out, h, w, y: close(out, _ccem_layer(use_fused=False)(h, w, y),
                               atol=1e-4)),
     lambda: (_ccem_layer(), _ragged_loss_inputs([LONG])))


def _sampled_by_hand(num):
    """Check: the loss equals corrected_softmax_cross_entropy over the
    draws of an identically seeded sampler."""
    def check(out, h, w, y):
        h, y = (h.flat_values, y.flat_values) if isinstance(
            h, tf.RaggedTensor) else (h, y)
        ids, log_q = samplers.Uniform(C, seed=1).sample(h, num)
        positive = tf.reduce_sum(h * tf.gather(w, y), 1)
        negative = tf.matmul(h, tf.gather(w, ids), transpose_b=True)
        expected = losses.corrected_softmax_cross_entropy(
            positive, negative, log_q, num,
            hits=losses.accidental_hits(ids, y))
        close(out, tf.reduce_mean(expected), atol=1e-4)
    return check


case("losses.SampledSoftmax", "k_gt_c", ok(
    "K = 20 draws with replacement; equals the loss computed by hand",
    _sampled_by_hand(20)),
     lambda: (_sampled_layer(20), (hidden(), table(), targets())))
case("losses.SampledSoftmax", "long", ok(
    "equals the loss computed by hand", _sampled_by_hand(4)),
     lambda: (_sampled_layer(), _ragged_loss_inputs([LONG])))

_full = losses.full_softmax_cross_entropy
case("losses.full_softmax_cross_entropy", "oor", raises(
    IAE, "targets[1] = 9 is out of range [0, 8)"),
     lambda: (_full, (hidden(), table(), ints([1, 9, 3]))))
case("losses.full_softmax_cross_entropy", "oor", raises(
    IAE, "targets has an id out of range [0, num_items)",
    "[first bad id =] [9]"),
     lambda: (_full, (hidden(), table(), ints([1, 9, 3]))), modes=(GRAPH,))
case("losses.full_softmax_cross_entropy", "neg", raises(
    IAE, "targets[1] = -1 is out of range [0, 8)"),
     lambda: (_full, (hidden(), table(), ints([1, -1, 3]))))
case("losses.full_softmax_cross_entropy", "empty_rows", ok(
    "ragged input: one loss per token, empty rows add nothing",
    lambda out, h, w, y: close(out, _full(h.flat_values, w, y.flat_values))),
     lambda: (_full, _ragged_loss_inputs([2, 0, 3, 0])))
case("losses.full_softmax_cross_entropy", "zero_rows", ok(
    "[0] losses", lambda out, *args: equal(out.shape, [0])),
     lambda: (_full, (hidden(0), table(), targets(0))))
case("losses.full_softmax_cross_entropy", "nan", ok(
    "NaN loss in that row only",
    lambda out, h, w, y: nan_only_in(out, [0], _full(hidden(), w, y))),
     lambda: (_full, (with_value(hidden(), [0, 0]), table(), targets())),
     label="hidden NaN")
case("losses.full_softmax_cross_entropy", "dtype", raises(
    ValueError, "targets must be integer ids, got float32"),
     lambda: (_full, (hidden(), table(), tf.constant([1., 2., 3.]))))
case("losses.full_softmax_cross_entropy", "dtype", raises(
    ValueError, "hidden must be floating point, got int32"),
     lambda: (_full, (tf.zeros([3, D], tf.int32), table(), targets())))
case("losses.full_softmax_cross_entropy", "rank", raises(
    ValueError, "hidden must be [T, D] or ragged [B, (L), D], got shape "
                "(1, 3, 4)"),
     lambda: (_full, (hidden()[tf.newaxis], table(), targets())))
case("losses.full_softmax_cross_entropy", "long", ok(
    "[10000] losses, equal to cut_cross_entropy_reference",
    lambda out, h, w, y: close(out, ops.cut_cross_entropy_reference(
        h, w, y), atol=1e-4)),
     lambda: (_full, (hidden(LONG), table(), targets(LONG))))

_csc = losses.corrected_softmax_cross_entropy
case("losses.corrected_softmax_cross_entropy", "zero_rows", ok(
    "[0] losses", lambda out, *args: equal(out.shape, [0])),
     lambda: (_csc, (tf.zeros([0]), tf.zeros([0, 3]), tf.zeros([3]), 3)))
case("losses.corrected_softmax_cross_entropy", "nan", ok(
    "NaN loss in that row only",
    lambda out, *args: nan_only_in(out, [0], [math.log(4.0)] * 2)),
     lambda: (_csc, (tf.constant([np.nan, 0.0]), tf.zeros([2, 3]),
                     tf.fill([3], -math.log(3.0)), 3)))
case("losses.corrected_softmax_cross_entropy", "dtype", ok(
    "int logits cast to float32",
    lambda out, *args: close(out, [math.log(4.0)] * 2)),
     lambda: (_csc, (tf.zeros([2], tf.int32), tf.zeros([2, 3], tf.int32),
                     tf.fill([3], -math.log(3.0)), 3)), label="int logits")
case("losses.corrected_softmax_cross_entropy", "dtype", raises(
    ValueError, "hits must be bool [T, K], got float32"),
     lambda: (lambda *a: _csc(*a[:4], hits=a[4]),
              (tf.zeros([2]), tf.zeros([2, 3]), tf.zeros([3]), 3,
               tf.zeros([2, 3]))), label="float hits")
case("losses.corrected_softmax_cross_entropy", "rank", raises(
    ValueError, "positive_logits must be [T], got shape (2, 1)"),
     lambda: (_csc, (tf.zeros([2, 1]), tf.zeros([2, 3]), tf.zeros([3]), 3)))
case("losses.corrected_softmax_cross_entropy", "rank", raises(
    ValueError, "negative_logits (3, 3) and positive_logits (2,) must have "
                "the same T"),
     lambda: (_csc, (tf.zeros([2]), tf.zeros([3, 3]), tf.zeros([3]), 3)),
     label="rows differ")
case("losses.corrected_softmax_cross_entropy", "k0", ok(
    "loss 0 (the positive alone)", lambda out, *args: equal(out, [0., 0.])),
     lambda: (_csc, (tf.zeros([2]), tf.zeros([2, 0]), tf.zeros([0]), 0)))
case("losses.corrected_softmax_cross_entropy", "k0", raises(
    ValueError, "num_draws must be >= 1 when there are negatives, got 0"),
     lambda: (_csc, (tf.zeros([2]), tf.zeros([2, 3]), tf.zeros([3]), 0)),
     label="num_draws = 0, 3 negatives")

_hits = losses.accidental_hits
case("losses.accidental_hits", "oor", ok(
    "ids are compared, never looked up: no range to break",
    lambda out, n, p: equal(out, [[True, False, False],
                                  [False, False, True]])),
     lambda: (_hits, (ints([9, 1, 2]), ints([9, 2]))))
case("losses.accidental_hits", "neg", ok(
    "ids are compared, never looked up: no range to break",
    lambda out, n, p: equal(out, [[True, False], [False, True]])),
     lambda: (_hits, (ints([-1, 2]), ints([-1, 2]))))
case("losses.accidental_hits", "empty_rows", ok(
    "an empty row of listed_positives adds no hit",
    lambda out, *args: equal(out, [[True, False, False],
                                   [False, True, False]])),
     lambda: (_hits, (ints([1, 2, 3]), ints([1, 2]),
                      tf.ragged.constant([[1], []], tf.int64))),
     label="listed_positives")
case("losses.accidental_hits", "zero_rows", ok(
    "[0, K]", lambda out, *args: equal(out.shape, [0, 3])),
     lambda: (_hits, (ints([1, 2, 3]), ints([]))))
case("losses.accidental_hits", "dtype", raises(
    ValueError, "negative_ids must be integer ids, got float32"),
     lambda: (_hits, (tf.constant([1.0, 2.0]), ints([1, 2]))))
case("losses.accidental_hits", "rank", raises(
    ValueError, "negative_ids must be [K] (shared) or [T, K] (per row), got "
                "shape (2, 2, 2)"),
     lambda: (_hits, (tf.zeros([2, 2, 2], tf.int32), ints([1, 2]))))
case("losses.accidental_hits", "rank", raises(
    ValueError, "per-row negative_ids (3, 2) must have the T rows of "
                "positives (2,)"),
     lambda: (_hits, (tf.zeros([3, 2], tf.int32), ints([1, 2]))),
     label="rows differ")
case("losses.accidental_hits", "k0", ok(
    "[T, 0]: no hits", lambda out, *args: equal(out.shape, [2, 0])),
     lambda: (_hits, (ints([]), ints([1, 2]))))
case("losses.accidental_hits", "k_gt_c", ok(
    "every repeat of the positive is a hit",
    lambda out, n, p: equal(out.numpy().sum(1), [3, 2])),
     lambda: (_hits, (tf.range(20) % C, ints([1, 7]))), label="K = 20")
case("losses.accidental_hits", "long", ok(
    "hits against all 10,000 listed items",
    lambda out, *args: equal(out, [[True, True, False]])),
     lambda: (_hits, (ints([3, 9_999, LONG]), ints([0]),
                      tf.RaggedTensor.from_row_lengths(
                          tf.range(LONG, dtype=tf.int64), [LONG]))),
     label="listed_positives of 10,000")


# ---------------------------------------------------------------------------
# samplers

def _check_shape(shape, num_items=C):
    def check(out, *args):
        ids, log_q = out
        equal(ids.shape, shape)
        equal(log_q.shape, shape)
        if ids.shape.num_elements():
            in_range(ids, num_items)
            assert np.isfinite(log_q.numpy()).all()
    return check


def _sample(sampler, query, num, shared=True, positives=None):
    item_table = table()
    return (lambda q, p: sampler.sample(q, num, shared=shared, positives=p,
                                        item_table=item_table)), (query,
                                                                  positives)


for _name, _make in (("samplers.Uniform", lambda: samplers.Uniform(
                         C, seed=1)),
                     ("samplers.LogUniform", lambda: samplers.LogUniform(
                         C, seed=1)),
                     ("samplers.Unigram", lambda: samplers.Unigram(
                         np.arange(1, C + 1), seed=1))):
    # log_prob reads only the shape of its ids for Uniform: the check must
    # still run inside tf.function.
    case(_name, "oor", raises(IAE, "ids[1] = 8 is out of range [0, 8)"),
         lambda m=_make: (m().log_prob, (None, ints([1, 8]))),
         label="log_prob ids", modes=BOTH)
    case(_name, "neg", raises(IAE, "positives[1] = -1 is out of range [0, 8)"),
         lambda m=_make: _sample(m(), hidden(), 4, positives=ints([1, -1, 3])),
         label="positives (unused, still checked)", modes=BOTH)
    case(_name, "zero_rows", ok("[0, K] draws", _check_shape([0, 4])),
         lambda m=_make: _sample(m(), hidden(0), 4, shared=False))
    case(_name, "nan", ok("the query is not read: valid draws",
                          _check_shape([4])),
         lambda m=_make: _sample(m(), with_value(hidden(), [0, 0]), 4),
         label="query NaN")
    case(_name, "dtype", raises(
        ValueError, "ids must be int32 or int64 ids, got float32"),
         lambda m=_make: (m().log_prob, (None, tf.constant([1.0, 2.0]))),
         label="log_prob ids")
    case(_name, "rank", raises(
        ValueError, "query must have rank 2 ([T, D]), got shape (4,)"),
         lambda m=_make: _sample(m(), normal([D]), 4))
    case(_name, "k0", raises(ValueError,
                             "num must be a positive integer, got 0"),
         lambda m=_make: _sample(m(), hidden(), 0))
    case(_name, "k_gt_c", ok("K = 20 draws with replacement",
                             _check_shape([20])),
         lambda m=_make: _sample(m(), hidden(), 20))
    case(_name, "long", ok("per-row draws for 10,000 positions",
                           _check_shape([LONG, 4])),
         lambda m=_make: _sample(m(), hidden(LONG), 4, shared=False))
case("samplers.Unigram", "nan", raises(ValueError,
                                       "counts[1] = nan is not finite"),
     lambda: (samplers.Unigram, ([1.0, np.nan, 2.0],)), label="counts NaN")

_in_batch = samplers.InBatch
case("samplers.InBatch", "oor", raises(
    IAE, "positives[1] = 8 is out of range [0, 8)"),
     lambda: _sample(_in_batch(C), None, None, positives=ints([1, 8])),
     modes=BOTH)
case("samplers.InBatch", "neg", raises(
    IAE, "positives[1] = -1 is out of range [0, 8)"),
     lambda: _sample(_in_batch(C), None, None, positives=ints([1, -1])))
case("samplers.InBatch", "zero_rows", ok(
    "no positives, no candidates: [0]", _check_shape([0])),
     lambda: _sample(_in_batch(C), None, None, positives=ints([])))
case("samplers.InBatch", "zero_rows", raises(
    IAE, "InBatch: num draws from the positives of the batch need at "
         "least one positive (T = 0)"),
     lambda: _sample(_in_batch(C), None, 4, positives=ints([])),
     label="num = 4 draws", modes=BOTH)
case("samplers.InBatch", "nan", ok(
    "the query only gives T: valid candidates", _check_shape([3])),
     lambda: _sample(_in_batch(C), with_value(hidden(), [0, 0]), None,
                     positives=targets()), label="query NaN")
case("samplers.InBatch", "dtype", raises(
    ValueError, "positives must be integer ids, got float32"),
     lambda: _sample(_in_batch(C), None, None,
                     positives=tf.constant([1.0, 2.0])))
case("samplers.InBatch", "rank", raises(
    ValueError, "positives must have rank 1 ([T]), got shape (1, 2)"),
     lambda: _sample(_in_batch(C), None, None, positives=ints([[1, 2]])))
case("samplers.InBatch", "k0", raises(
    ValueError, "num must be a positive integer, got 0"),
     lambda: _sample(_in_batch(C), None, 0, positives=targets()))
case("samplers.InBatch", "k_gt_c", ok(
    "K = 20 draws with replacement from the batch's positives",
    lambda out, q, p: (_check_shape([20])(out), np.testing.assert_(
        set(out[0].numpy()) <= {0, 1, 2}))),
     lambda: _sample(_in_batch(C), None, 20, positives=targets()))
case("samplers.InBatch", "long", ok(
    "10,000 positions: all of them as shared candidates",
    _check_shape([LONG])),
     lambda: _sample(_in_batch(C), None, None, positives=targets(LONG)))


def _hard(pool=6):
    return samplers.HardNegatives(samplers.Uniform(C, seed=1), pool)


def _log_prob_setup(sampler):
    """(log_prob with num = 4, (query, ids with 8 = C out of range))."""
    return ((lambda q, i: sampler.log_prob(q, i, num=4)),
            (hidden(), ints([1, 8])))


case("samplers.HardNegatives", "oor", raises(
    IAE, "ids[1] = 8 is out of range [0, 8)"),
     lambda: _log_prob_setup(_hard()), label="log_prob ids", modes=BOTH)


case("samplers.HardNegatives", "neg", raises(
    IAE, "positives[1] = -1 is out of range [0, 8)"),
     lambda: _sample(_hard(), hidden(), 4, False, ints([1, -1, 3])))
case("samplers.HardNegatives", "zero_rows", ok(
    "[0, K] draws", _check_shape([0, 4])),
     lambda: _sample(_hard(), hidden(0), 4, False))
case("samplers.HardNegatives", "nan", ok(
    "valid ids; a NaN row's top-K is arbitrary (its loss is NaN)",
    _check_shape([3, 4])),
     lambda: _sample(_hard(), with_value(hidden(), [0, 0]), 4, False,
                     targets()), label="query NaN")
# The query samplers' shared argument checks (samplers.base).
for _name, _make in (("samplers.HardNegatives", _hard),
                     ("samplers.KernelSampler", _kernel_sampler)):
    case(_name, "dtype", raises(
        ValueError,
        "query must be a floating-point [T, D] tensor, got int32"),
         lambda make=_make: _sample(make(), tf.zeros([3, D], tf.int32), 4,
                                    False))
    case(_name, "rank", raises(
        ValueError, "query must have rank 2 ([T, D]), got shape (4,)"),
         lambda make=_make: _sample(make(), normal([D]), 4, False))
    case(_name, "k0", raises(
        ValueError, "num must be a positive integer, got 0"),
         lambda make=_make: _sample(make(), hidden(), 0, False))
case("samplers.HardNegatives", "k0", raises(
    ValueError, "pool_size must be a positive integer, got 0"),
     lambda: (_hard, (0,)), label="pool_size = 0")
case("samplers.HardNegatives", "k_gt_c", raises(
    ValueError, "num must be <= pool_size, got num=20"),
     lambda: _sample(_hard(), hidden(), 20, False), label="K > pool_size")
case("samplers.HardNegatives", "k_gt_c", ok(
    "a pool of 20 > C drawn with replacement; K = 4 kept",
    _check_shape([3, 4])),
     lambda: _sample(_hard(20), hidden(), 4, False, targets()),
     label="pool_size = 20")
case("samplers.HardNegatives", "long", ok(
    "per-row draws for 10,000 positions", _check_shape([LONG, 4])),
     lambda: _sample(_hard(), hidden(LONG), 4, False))


def _mixed():
    return samplers.Mixed(samplers.InBatch(C), samplers.Uniform(C, seed=1))


case("samplers.Mixed", "oor", raises(IAE, "ids[1] = 8 is out of range [0, 8)"),
     lambda: _log_prob_setup(_mixed()), label="log_prob ids", modes=BOTH)
case("samplers.Mixed", "neg", raises(
    IAE, "positives[1] = -1 is out of range [0, 8)"),
     lambda: _sample(_mixed(), hidden(), 4, positives=ints([1, -1, 3])))
case("samplers.Mixed", "zero_rows", ok(
    "per row: [0, K]", _check_shape([0, 4])),
     lambda: _sample(_mixed(), hidden(0), 4, False, ints([])))
case("samplers.Mixed", "zero_rows", ok(
    "the K draws alone", _check_shape([4])),
     lambda: _sample(_mixed(), hidden(0), 4, True, ints([])),
     label="shared")
case("samplers.Mixed", "nan", ok(
    "the query is not read (Uniform other): valid candidates",
    _check_shape([7])),
     lambda: _sample(_mixed(), with_value(hidden(), [0, 0]), 4,
                     positives=targets()), label="query NaN")
case("samplers.Mixed", "dtype", raises(
    ValueError, "positives must be integer ids, got float32"),
     lambda: _sample(_mixed(), hidden(), 4,
                     positives=tf.constant([1.0, 2.0, 3.0])))
case("samplers.Mixed", "rank", raises(
    ValueError, "query must have rank 2 ([T, D]), got shape (4,)"),
     lambda: _sample(_mixed(), normal([D]), 4, positives=targets()))
case("samplers.Mixed", "k0", raises(
    ValueError, "num must be a positive integer, got 0"),
     lambda: _sample(_mixed(), hidden(), 0, positives=targets()))
case("samplers.Mixed", "k_gt_c", ok(
    "T positives + K = 20 draws with replacement", _check_shape([23])),
     lambda: _sample(_mixed(), hidden(), 20, positives=targets()))
case("samplers.Mixed", "long", ok(
    "10,000 positives + K draws, shared", _check_shape([LONG + 4])),
     lambda: _sample(_mixed(), hidden(LONG), 4, positives=targets(LONG)))


def _kernel_exact(rows, num):
    """Check: draws in range, log q equal to the sampler's log_prob."""
    def check(out, query, positives):
        ids, log_q = out
        equal(ids.shape, [rows, num])
        if rows:
            in_range(ids)
            sampler = _kernel_sampler()
            close(log_q, sampler.log_prob(query, ids), atol=1e-4)
    return check


case("samplers.KernelSampler", "oor", raises(
    IAE, "ids[1] = 8 is out of range [0, 8)"),
     lambda: (_kernel_sampler().log_prob, (hidden(), ints([1, 8]))),
     label="log_prob ids", modes=BOTH)
case("samplers.KernelSampler", "neg", raises(
    IAE, "positives[1] = -1 is out of range [0, 8)"),
     lambda: _sample(_kernel_sampler(), hidden(), 4, False, ints([1, -1, 3])))
case("samplers.KernelSampler", "zero_rows", ok(
    "[0, K] draws", _kernel_exact(0, 4)),
     lambda: _sample(_kernel_sampler(), hidden(0), 4, False))
case("samplers.KernelSampler", "nan", raises(
    IAE, "query[0, 0] = nan is not finite"),
     lambda: _sample(_kernel_sampler(), with_value(hidden(), [0, 0]), 4,
                     False), label="query NaN", modes=BOTH, needs_ops=True)
case("samplers.KernelSampler", "nan", raises(
    IAE, "item_table[2, 1] = nan is not finite; the kernel sampler cannot "
         "build its tree"),
     lambda: (_kernel_sampler().refresh, (with_value(table(), [2, 1]),)),
     label="item_table NaN", needs_ops=True)
case("samplers.KernelSampler", "k_gt_c", ok(
    "K = 20 draws per row with replacement; exact log q",
    _kernel_exact(3, 20)),
     lambda: _sample(_kernel_sampler(), hidden(), 20, False))
case("samplers.KernelSampler", "long", ok(
    "per-row draws for 10,000 positions; exact log q",
    _kernel_exact(LONG, 4)),
     lambda: _sample(_kernel_sampler(), hidden(LONG), 4, False))


def _collab_sample(users, num=3, sampler=None):
    sampler = sampler or _collaborative()
    return (lambda u: sampler.sample(u, num, shared=False)), (users,)


def _never_observed(observed, num_items=C):
    """Check: draws in range, none of them an observed item of the row."""
    def check(out, users):
        ids, log_q = out
        in_range(ids, num_items)
        assert np.isfinite(log_q.numpy()).all()
        for row, user in zip(ids.numpy(), users.numpy()):
            assert not set(row) & set(observed.get(int(user), ())), row
    return check


_OBSERVED = {0: (1, 2), 1: (3, 4), 2: (5,)}
case("samplers.CollaborativeSampler", "oor", raises(
    IAE, "user_ids[1] = 4 is out of range [0, 4)"),
     lambda: _collab_sample(ints([0, 4])), label="user ids", modes=BOTH)
case("samplers.CollaborativeSampler", "oor", raises(
    IAE, "ids[1] = 8 is out of range [0, 8)"),
     lambda: (_collaborative().log_prob, (ints([0, 1]), ints([1, 8]))),
     label="log_prob item ids")
case("samplers.CollaborativeSampler", "neg", raises(
    IAE, "user_ids[1] = -1 is out of range [0, 4)"),
     lambda: _collab_sample(ints([0, -1])), label="user ids")
case("samplers.CollaborativeSampler", "empty_rows", ok(
    "draws from a walk that starts with its uniform jump",
    _never_observed(_OBSERVED)),
     lambda: _collab_sample(ints([3, 3])), label="user without interactions")
case("samplers.CollaborativeSampler", "zero_rows", ok(
    "[0, K] draws", lambda out, u: equal(out[0].shape, [0, 3])),
     lambda: _collab_sample(ints([])))


def _nan_walk():
    sampler = _collaborative()
    sampler.jump_logits.assign([np.nan, 0.0, 0.0, 0.0])
    return _collab_sample(ints([0, 1]), sampler=sampler)


case("samplers.CollaborativeSampler", "nan", raises(
    IAE, "CollaborativeSampler: walk logits must be finite"),
     _nan_walk, label="walk logits NaN", modes=BOTH)
case("samplers.CollaborativeSampler", "dtype", raises(
    ValueError, "the query must be int user ids [T] (pass them as "
                "sampler_query), got float32"),
     lambda: _collab_sample(tf.constant([0.0, 1.0])))
case("samplers.CollaborativeSampler", "rank", raises(
    ValueError, "the query must be int user ids [T] (pass them as "
                "sampler_query), got int32 with shape (1, 2)"),
     lambda: _collab_sample(ints([[0, 1]])))
case("samplers.CollaborativeSampler", "k0", raises(
    ValueError, "num must be a positive integer, got 0"),
     lambda: _collab_sample(ints([0]), 0))
case("samplers.CollaborativeSampler", "k_gt_c", ok(
    "K = 20 draws with replacement, never an observed item",
    _never_observed(_OBSERVED)),
     lambda: _collab_sample(ints([0, 1]), 20))


def _long_history():
    """User 0 observed items 0..9,999 of 20,000; user 1 one item."""
    users = np.r_[np.zeros(LONG, np.int64), [1]]
    items = np.r_[np.arange(LONG), [5]]
    sampler = samplers.CollaborativeSampler.from_interactions(
        users, items, 2, 2 * LONG, seed=1)
    return _collab_sample(ints([0, 0]), 16, sampler)


case("samplers.CollaborativeSampler", "long", ok(
    "never draws one of the 10,000 observed items",
    _never_observed({0: range(LONG)}, 2 * LONG)),
     _long_history, label="10,000 of C = 20,000 observed")
case("samplers.CollaborativeSampler", "long", raises(
    IAE, "a user observed every item; there is no negative to emit"),
     lambda: _collab_sample(ints([0]), sampler=samplers.CollaborativeSampler.
                            from_interactions(np.zeros(C, np.int64),
                                              np.arange(C), 1, C, seed=1)),
     label="every item observed")


# ---------------------------------------------------------------------------
# tasks

def _task(loss=None):
    return tasks.NextItemTask(loss)


case("tasks.NextItemTask", "oor", raises(
    IAE, "targets[1] = 8 is out of range [0, 8)"),
     lambda: (_task(), (hidden(), table(), ints([1, 8, 2]))), modes=BOTH)
case("tasks.NextItemTask", "neg", raises(
    IAE, "targets[1] = -1 is out of range [0, 8)"),
     lambda: (_task(), (hidden(), table(), ints([1, -1, 2]))))
case("tasks.NextItemTask", "empty_rows", ok(
    "ragged input: empty rows add nothing",
    lambda out, h, w, y: close(out, _task()(h.flat_values, w,
                                            y.flat_values))),
     lambda: (_task(), _ragged_loss_inputs([2, 0, 3, 0])))
case("tasks.NextItemTask", "zero_rows", ok(
    "loss 0", lambda out, *args: equal(out, 0.0)),
     lambda: (_task(), (hidden(0), table(), targets(0))))
case("tasks.NextItemTask", "nan", ok(
    "loss NaN (propagates)",
    lambda out, *args: np.testing.assert_(np.isnan(out.numpy()))),
     lambda: (_task(), (with_value(hidden(), [0, 0]), table(), targets())),
     label="hidden NaN")
case("tasks.NextItemTask", "dtype", raises(
    ValueError, "targets must be int32 or int64 ids, got float32"),
     lambda: (_task(), (hidden(), table(), tf.constant([1., 2., 3.]))))
case("tasks.NextItemTask", "rank", raises(
    ValueError, "hidden must be [T, D] or ragged [B, (L), D], got shape "
                "(1, 3, 4)"),
     lambda: (_task(), (hidden()[tf.newaxis], table(), targets())))
case("tasks.NextItemTask", "long", ok(
    "equals the mean of full_softmax_cross_entropy",
    lambda out, h, w, y: close(out, tf.reduce_mean(_full(h, w, y)),
                               atol=1e-4)),
     lambda: (_task(), (hidden(LONG), table(), targets(LONG))))


def _retrieval(sampler=True, num=4):
    if not sampler:
        return tasks.SampledRetrieval()
    return tasks.SampledRetrieval(samplers.Uniform(C, seed=1), num,
                                  tf_keras.layers.Embedding(C, D))


def _cands():
    """float32 [3, D] embeddings of the rows' positive candidates."""
    return hidden(seed=1)


def _retrieve(task, query, candidates, ids):
    return (lambda q, c, i: task(q, c, candidate_ids=i)), (query, candidates,
                                                           ids)


case("tasks.SampledRetrieval", "oor", raises(
    IAE, "candidate_ids[1] = 8 is out of range [0, 8)"),
     lambda: _retrieve(_retrieval(), hidden(), _cands(), ints([1, 8, 2])),
     label="with a sampler", modes=BOTH)
case("tasks.SampledRetrieval", "oor", ok(
    "ids are only compared (any values, even strings)",
    lambda out, q, c, i: close(out, _retrieval(False)(
        q, c, candidate_ids=ints([1, 0, 2])))),
     lambda: _retrieve(_retrieval(False), hidden(), _cands(),
                       ints([1, 8, 2])), label="sampler=None")
case("tasks.SampledRetrieval", "neg", raises(
    IAE, "candidate_ids[1] = -1 is out of range [0, 8)"),
     lambda: _retrieve(_retrieval(), hidden(), _cands(), ints([1, -1, 2])),
     label="with a sampler")
case("tasks.SampledRetrieval", "zero_rows", ok(
    "loss 0", lambda out, *args: equal(out, 0.0)),
     lambda: _retrieve(_retrieval(), hidden(0), hidden(0), targets(0)))
case("tasks.SampledRetrieval", "nan", ok(
    "loss NaN (propagates)",
    lambda out, *args: np.testing.assert_(np.isnan(out.numpy()))),
     lambda: _retrieve(_retrieval(), with_value(hidden(), [0, 0]), _cands(),
                       targets()), label="query NaN")
case("tasks.SampledRetrieval", "dtype", raises(
    ValueError, "candidate_ids must be int32 or int64 ids with a sampler"),
     lambda: _retrieve(_retrieval(), hidden(), _cands(),
                       tf.constant([1.0, 2.0, 3.0])))
case("tasks.SampledRetrieval", "dtype", raises(
    ValueError, "query_embeddings must be floating point, got int32"),
     lambda: _retrieve(_retrieval(), tf.zeros([3, D], tf.int32), _cands(),
                       targets()))
case("tasks.SampledRetrieval", "rank", raises(
    ValueError, "query_embeddings must be [B, D] (rank 2), got shape "
                "(1, 3, 4)"),
     lambda: _retrieve(_retrieval(), hidden()[tf.newaxis], _cands(),
                       targets()))
case("tasks.SampledRetrieval", "k0", raises(
    ValueError, "num_negatives must be a positive integer, got 0"),
     lambda: (_retrieval, (True, 0)))
case("tasks.SampledRetrieval", "k_gt_c", ok(
    "K = 20 draws with replacement; finite loss",
    lambda out, *args: np.testing.assert_(np.isfinite(out.numpy()))),
     lambda: _retrieve(_retrieval(num=20), hidden(), _cands(), targets()))


# Every (component, kind) without a case, and why.
_NO_K = "no K"
NOT_APPLICABLE = {}


def not_applicable(components, columns, reason):
    for component in components:
        for column in columns:
            NOT_APPLICABLE[(component, column)] = reason


not_applicable(["ops.validate_ids", "ops.validate_ids_reference"],
               ["nan"], "int ids have no NaN (float ids: wrong dtype)")
not_applicable(["ops.validate_ids", "ops.validate_ids_reference"],
               ["rank"], "any shape is valid")
not_applicable(["ops.validate_ids", "ops.validate_ids_reference"],
               ["k0", "k_gt_c"], _NO_K)
not_applicable(["ops.ragged_attention", "ops.ragged_attention_reference",
                "ops.ragged_attention_qkvpacked"],
               ["k0", "k_gt_c"], "no K (each row attends to itself)")
not_applicable(["ops.cut_cross_entropy", "ops.cut_cross_entropy_reference",
                "ops.cce_minus", "ops.cce_minus_reference"],
               ["empty_rows"],
               "flat [N, D] rows (ragged input: the loss layers' row)")
not_applicable(["ops.cut_cross_entropy", "ops.cut_cross_entropy_reference"],
               ["k0", "k_gt_c"], "no K: the full catalog")
not_applicable(["ops.kernel_sampler_draw",
                "ops.kernel_sampler_draw_reference"],
               ["oor", "neg"], "no ids in its inputs (it draws them)")
not_applicable(["ops.kernel_log_probabilities"], ["oor", "neg"],
               "no ids in its inputs (all C items)")
not_applicable(["ops.kernel_sampler_draw",
                "ops.kernel_sampler_draw_reference",
                "ops.kernel_log_probabilities"],
               ["empty_rows"], "flat [T, D] query rows")
not_applicable(["ops.kernel_log_probabilities"], ["k0", "k_gt_c"],
               "no K: all C items")
_RAGGED = ["layers.RaggedMultiHeadAttention", "layers.RaggedTransformerBlock",
           "layers.RaggedPositionalEmbedding", "layers.SequenceEncoder"]
not_applicable(["layers.RaggedMultiHeadAttention",
                "layers.RaggedTransformerBlock", "layers.SequenceEncoder",
                "layers.PaddedTransformerBlock"], ["oor", "neg"],
               "takes embeddings, not ids")
not_applicable(["layers.RaggedPositionalEmbedding"], ["oor", "neg"],
               "reads the row splits only, never the values")
not_applicable(_RAGGED + ["layers.SequenceEncoder.call_padded",
                          "layers.PaddedTransformerBlock",
                          "layers.PaddedSequenceEncoder"],
               ["k0", "k_gt_c"], _NO_K)
not_applicable(["layers.RaggedPositionalEmbedding"], ["dtype"],
               "any dtype: only row splits are read")
not_applicable(["layers.IntegratedScorer"], ["k0", "k_gt_c"],
               "no K: all C items scored")
not_applicable(["layers.IntegratedScorer"], ["long"],
               "the history lives in the sampler (CollaborativeSampler row)")
not_applicable(["losses.CutCrossEntropy", "losses.full_softmax_cross_entropy"],
               ["k0", "k_gt_c"], "no K: the full catalog")
not_applicable(["losses.corrected_softmax_cross_entropy"], ["oor", "neg"],
               "takes logits, not ids")
not_applicable(["losses.corrected_softmax_cross_entropy"], ["empty_rows"],
               "flat [T] rows")
not_applicable(["losses.corrected_softmax_cross_entropy"], ["k_gt_c"],
               "no catalog: K is a count")
not_applicable(["losses.corrected_softmax_cross_entropy"], ["long"],
               "row-wise arithmetic, no history")
not_applicable(["losses.accidental_hits"], ["nan"], "int ids have no NaN")
not_applicable(["samplers.Uniform", "samplers.LogUniform", "samplers.Unigram",
                "samplers.InBatch", "samplers.HardNegatives",
                "samplers.Mixed", "samplers.KernelSampler"], ["empty_rows"],
               "flat [T, D] query rows")
not_applicable(["tasks.NextItemTask"], ["k0", "k_gt_c"],
               "K is the loss's (losses rows)")
not_applicable(["tasks.SampledRetrieval"], ["empty_rows", "long"],
               "a query is one row, no history")


# ---------------------------------------------------------------------------
# The README table.

_ABBREVIATIONS = {IAE: "IAE", ValueError: "VE"}
LEGEND = (
    "IAE: `tf.errors.InvalidArgumentError` (raised when the op runs), VE: "
    "`ValueError` (raised as the call is made, eagerly or while tracing); "
    "quoted: words of the message the user reads. † = checked inside "
    "`tf.function` too, with the same outcome; \"in tf.function:\" gives "
    "the outcome there where it differs. C = 8 items, D = 4, K = negatives "
    "(draws) per call or row; ok: what happens instead of an error.")


def _code(text):
    """A Markdown code span (double backticks around text with one)."""
    return f"`` {text} ``" if "`" in text else f"`{text}`"


def outcome_text(expect):
    if isinstance(expect, Raises):
        return (_ABBREVIATIONS[expect.error] + " " +
                " … ".join(_code(f) for f in expect.fragments))
    return f"ok: {expect.summary}"


def cell_text(component, column):
    cases = [c for c in CASES
             if c.component == component and c.column == column]
    if not cases:
        return f"n/a: {NOT_APPLICABLE[(component, column)]}"
    lines = []
    for item in cases:
        text = outcome_text(item.expect)
        if item.label:
            text = f"{item.label}: {text}"
        if item.modes == (GRAPH,):
            text = f"in tf.function: {text}"
        elif GRAPH in item.modes:
            text += " †"
        lines.append(text)
    return "<br>".join(lines).replace("|", "\\|")


def render_block():
    """The legend and the Markdown table of CASES (between the markers)."""
    rows = [textwrap.fill(LEGEND, 78), "",
            "| component | " + " | ".join(COLUMNS.values()) + " |",
            "|---" * (len(COLUMNS) + 1) + "|"]
    for component in COMPONENTS:
        cells = [cell_text(component, column) for column in COLUMNS]
        rows.append(f"| `{component}` | " + " | ".join(cells) + " |")
    return "\n".join([BEGIN] + rows + [END])


def readme_block(text):
    """The block between the markers in README text (markers included)."""
    match = re.search(re.escape(BEGIN) + ".*?" + re.escape(END), text,
                      re.DOTALL)
    return match.group(0) if match else None


# ---------------------------------------------------------------------------
# Tests.

def _case_id(item, mode):
    parts = [item.component.split(".", 1)[1], item.column, item.label, mode]
    return re.sub(r"[^A-Za-z0-9_.=<>-]+", "_", "-".join(p for p in parts if p))


def _params():
    params, seen = [], collections.Counter()
    for item in CASES:
        for mode in item.modes:
            case_id = _case_id(item, mode)
            seen[case_id] += 1
            if seen[case_id] > 1:
                case_id += f"-{seen[case_id]}"
            params.append(pytest.param(item, mode, id=case_id))
    return params


def _ops_loaded():
    return bool(ops.build_info()["cpu_ops"])


@pytest.mark.parametrize("item,mode", _params())
def test_case(item, mode):
    """The component does what its README cell says."""
    needs_ops = item.needs_ops
    if needs_ops is None:
        needs_ops = item.component in FUSED_ROWS or mode == GRAPH
    if needs_ops and not _ops_loaded():
        pytest.skip("documents the compiled op library, which is not loaded")
    fn, args = item.setup()
    if mode == GRAPH:
        fn = tf.function(fn, autograph=False)
    if isinstance(item.expect, Raises):
        with pytest.raises(item.expect.error) as info:
            fn(*args)
        message = str(info.value)
        for fragment in item.expect.fragments:
            assert fragment in message, (fragment, message)
    else:
        item.expect.check(fn(*args), *args)


def test_every_cell_has_cases_or_a_reason():
    """No (component, kind) pair is forgotten, and none is both tested and
    called not applicable."""
    tested = {(c.component, c.column) for c in CASES}
    every = {(component, column) for component in COMPONENTS
             for column in COLUMNS}
    assert not tested & set(NOT_APPLICABLE), tested & set(NOT_APPLICABLE)
    assert every == tested | set(NOT_APPLICABLE), every - tested - set(
        NOT_APPLICABLE)


def test_readme_table_is_current():
    """README's table is the rendering of CASES (regenerate: see the module
    docstring)."""
    with open(README, encoding="utf-8") as f:
        block = readme_block(f.read())
    assert block is not None, f"README has no {BEGIN} ... {END} block"
    assert block == render_block(), (
        "README's Reliability table is stale: run PYTHONPATH=. python "
        "tests/test_reliability.py --write-readme")


def main(argv=None):
    parser = argparse.ArgumentParser(description="Prints (or writes into "
                                     "README.md) the Reliability table.")
    parser.add_argument("--write-readme", action="store_true",
                        help="replace the table between the markers in "
                             "README.md")
    args = parser.parse_args(argv)
    block = render_block()
    if not args.write_readme:
        print(block)
        return
    with open(README, encoding="utf-8") as f:
        text = f.read()
    old = readme_block(text)
    if old is None:
        sys.exit(f"README.md has no {BEGIN} ... {END} block; add the "
                 "Reliability section first")
    with open(README, "w", encoding="utf-8") as f:
        f.write(text.replace(old, block))


if __name__ == "__main__":
    main()
