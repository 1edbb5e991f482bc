"""SavedModels for serving: core TF ops only, dense ids + lengths in.

`export_for_serving` wraps a trained model's variables in a small `tf.Module`
whose one signature takes dense history ids + lengths (ragged signatures
flatten badly in TF Serving) and returns the top-k items with the history
excluded. `verify_servable` loads the result in a fresh Python process that
cannot import tfrec_fast, checks that every op in every function is
registered in stock TensorFlow, and runs the signature.

A model is exportable when it has the serving protocol:
    serving_query(history_ids int64 [B, L], lengths int64 [B]) -> [B, D]
    serving_candidates() -> (item_table [C, D], item_bias [C] or None)

With `scorer=` (a `tfrec_fast.layers.IntegratedScorer`, e.g. CoSam's
integrated prediction) the signature also takes `user_ids` int64 [B] and
adds the scorer's per-user log-probabilities to every score.
"""

import json
import os
import subprocess
import sys

import tensorflow as tf

from tfrec_fast.metrics.ranking import top_k_excluding

SIGNATURE_KEY = "serving_default"


class _ServingModule(tf.Module):
    """The exported object: the model's variables and one serving function."""

    def __init__(self, model, k, scorer=None):
        super().__init__(name="tfrec_fast_serving")
        # Keep the model's methods, not the model: a tracked Keras model
        # would be serialised too. The SavedModel holds only the variables
        # (tracked here) and the serving graph.
        self._serving_query = model.serving_query
        self._serving_candidates = model.serving_candidates
        # One request first: a model that was never called has not created
        # its variables yet, and the SavedModel must track them all.
        model.serving_query(tf.zeros([1, 1], tf.int64),
                            tf.ones([1], tf.int64))
        model.serving_candidates()
        self.model_variables = list(model.variables)
        self.k = k
        self._scorer = scorer
        history_specs = [
            tf.TensorSpec([None, None], tf.int64, name="history_ids"),
            tf.TensorSpec([None], tf.int64, name="history_lengths")]
        if scorer is None:
            self.serve = tf.function(self._serve,
                                     input_signature=history_specs)
        else:
            self.scorer_variables = list(scorer.variables)
            self.serve = tf.function(
                self._serve_with_users, input_signature=history_specs + [
                    tf.TensorSpec([None], tf.int64, name="user_ids")])

    def _serve_with_users(self, history_ids, history_lengths, user_ids):
        return self._serve(history_ids, history_lengths, user_ids)

    def _serve(self, history_ids, history_lengths, user_ids=None):
        queries = self._serving_query(history_ids, history_lengths)
        table, bias = self._serving_candidates()
        if user_ids is not None:
            user_bias = self._scorer.item_bias(user_ids)
            bias = user_bias if bias is None else \
                user_bias + tf.cast(bias, tf.float32)
        valid = tf.sequence_mask(history_lengths,
                                 tf.shape(history_ids, out_type=tf.int64)[1])
        exclude_items = tf.boolean_mask(history_ids, valid)
        exclude_splits = tf.concat(
            [[0], tf.cumsum(history_lengths)], axis=0)
        ids, scores = top_k_excluding(queries, table, self.k,
                                      exclude_splits=exclude_splits,
                                      exclude_items=exclude_items,
                                      item_bias=bias)
        return {"top_ids": ids, "top_scores": scores}


def export_for_serving(model, path, k=10, scorer=None):
    """Writes a SavedModel that returns each history's top-k unseen items.

    Args:
        model: a trained model with the serving protocol (module docstring),
            e.g. `tfrec_fast.models.SASRec`.
        path: output directory.
        k: number of items returned per request.
        scorer: optional `tfrec_fast.layers.IntegratedScorer`: its per-user
            log-probabilities are added to the scores (integrated
            prediction) and the signature takes `user_ids` too.

    Returns:
        `path`. The signature `serving_default` takes `history_ids` int64
        [B, L] (right-padded), `history_lengths` int64 [B] (and `user_ids`
        int64 [B] with a scorer) and returns `top_ids` int64 [B, k] and
        `top_scores` float32 [B, k].
    """
    for method in ("serving_query", "serving_candidates"):
        if not callable(getattr(model, method, None)):
            raise ValueError(f"model {type(model).__name__} has no {method}(); "
                             "see tfrec_fast.export for the serving protocol")
    module = _ServingModule(model, k, scorer)
    tf.saved_model.save(module, path,
                        signatures={SIGNATURE_KEY: module.serve})
    return path


# Runs in a fresh interpreter: no tfrec_fast, stock TensorFlow only.
_VERIFY_SCRIPT = r"""
import json, sys
sys.modules["tfrec_fast"] = None  # `import tfrec_fast` now fails
import numpy as np
import tensorflow as tf
from tensorflow.core.protobuf import saved_model_pb2
from tensorflow.python.framework import op_def_registry

path, request = sys.argv[1], json.loads(sys.argv[2])
proto = saved_model_pb2.SavedModel()
with open(path + "/saved_model.pb", "rb") as f:
    proto.ParseFromString(f.read())
ops = set()
for meta_graph in proto.meta_graphs:
    ops.update(node.op for node in meta_graph.graph_def.node)
    for function in meta_graph.graph_def.library.function:
        ops.update(node.op for node in function.node_def)
unregistered = sorted(op for op in ops if op_def_registry.get(op) is None)
report = {"num_op_types": len(ops), "unregistered_ops": unregistered}
if not unregistered:
    serve = tf.saved_model.load(path).signatures["serving_default"]
    inputs = {"history_ids": tf.constant(request["history_ids"], tf.int64),
              "history_lengths": tf.constant(request["history_lengths"],
                                             tf.int64)}
    if "user_ids" in serve.structured_input_signature[1]:
        inputs["user_ids"] = tf.constant(request["user_ids"], tf.int64)
    out = serve(**inputs)
    report["top_ids"] = out["top_ids"].numpy().tolist()
    report["top_scores"] = out["top_scores"].numpy().tolist()
print("VERIFY_REPORT " + json.dumps(report))
"""


def verify_servable(path, history_ids=None, history_lengths=None,
                    timeout=300, user_ids=None):
    """Checks a SavedModel from `export_for_serving` in a fresh process.

    The child process blocks `import tfrec_fast`, lists every op in the
    SavedModel's graph and function library, fails on any op stock
    TensorFlow does not register, then calls `serving_default`.

    Args:
        path: SavedModel directory.
        history_ids: int [B, L] request ids (default: two short histories).
        history_lengths: int [B] request lengths.
        timeout: seconds to wait for the child process.
        user_ids: int [B] users of the requests, for signatures that take
            them (`export_for_serving(..., scorer=...)`); default 0, 1, ...

    Returns:
        dict with `num_op_types`, `unregistered_ops` (empty), `top_ids`
        [B, k] and `top_scores` [B, k] as lists.

    Raises:
        ValueError: an op is not registered in stock TensorFlow, the served
            top-k contains an item of the request's history, or scores are
            not sorted / finite where items remain.
        RuntimeError: the child process failed (its stderr is included).
    """
    if history_ids is None:
        history_ids, history_lengths = [[0, 1, 2], [3, 0, 0]], [3, 1]
    request = {"history_ids": [list(map(int, r)) for r in history_ids],
               "history_lengths": list(map(int, history_lengths))}
    request["user_ids"] = (list(range(len(request["history_ids"])))
                           if user_ids is None else list(map(int, user_ids)))
    env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="3")
    proc = subprocess.run(
        [sys.executable, "-c", _VERIFY_SCRIPT, os.fspath(path),
         json.dumps(request)],
        capture_output=True, text=True, env=env, timeout=timeout, check=False)
    lines = [l for l in proc.stdout.splitlines()
             if l.startswith("VERIFY_REPORT ")]
    if proc.returncode != 0 or not lines:
        raise RuntimeError(f"verifying {path} failed in a fresh process:\n"
                           + proc.stderr[-4000:])
    report = json.loads(lines[-1][len("VERIFY_REPORT "):])
    if report["unregistered_ops"]:
        raise ValueError(f"{path} uses ops that stock TensorFlow does not "
                         f"register: {report['unregistered_ops']}")
    for row, (ids, scores) in enumerate(zip(report["top_ids"],
                                            report["top_scores"])):
        seen = set(request["history_ids"][row][
            :request["history_lengths"][row]])
        if seen & set(ids):
            raise ValueError(f"row {row}: served items {sorted(seen & set(ids))}"
                             " are in the request's history")
        if any(a < b for a, b in zip(scores, scores[1:])):
            raise ValueError(f"row {row}: scores are not sorted: {scores}")
    return report
