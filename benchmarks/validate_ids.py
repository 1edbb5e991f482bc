"""Id-range validation throughput: fused op vs pure-TF reference vs tf.debugging.

    python benchmarks/validate_ids.py --json out.json --png out.png [--quick]

Records: impl, config {n, num_items, dtype}, step_s, ids_per_s.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import tfrec_fast  # noqa: E402  (selects tf_keras)
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

import _common  # noqa: E402
from tfrec_fast import ops  # noqa: E402


def _debugging_asserts(ids, num_items):
    tf.debugging.assert_non_negative(ids)
    tf.debugging.assert_less(ids, tf.cast(num_items, ids.dtype))
    return ids


def main():
    args = _common.parse_args(__doc__.splitlines()[0])
    sizes = [10**5, 10**6] if args.quick else [10**5, 10**6, 10**7, 10**8]
    num_items = 1_000_000
    impls = {
        "tfrec_fast.validate_ids": lambda x: ops.validate_ids(
            x, num_items, use_fused=True),
        "tfrec_fast.validate_ids_reference": lambda x: ops.validate_ids(
            x, num_items, use_fused=False),
        "tf.debugging.assert_less+assert_non_negative": lambda x:
            _debugging_asserts(x, num_items),
    }
    if not ops.build_info()["cpu_ops"]:
        del impls["tfrec_fast.validate_ids"]
    records = []
    rng = np.random.default_rng(0)
    for n in sizes:
        ids = tf.constant(rng.integers(0, num_items, size=n), tf.int64)
        for name, fn in impls.items():
            graph_fn = tf.function(fn)
            # Reduce to a scalar so the timing excludes a host copy of ids.
            step_s = _common.median_seconds(
                lambda: tf.reduce_max(graph_fn(ids)).numpy(), args.repeats)
            records.append({"impl": name,
                            "config": {"n": n, "num_items": num_items,
                                       "dtype": "int64"},
                            "step_s": step_s, "ids_per_s": n / step_s})
    _common.write(records, args)
    if args.png:
        import matplotlib  # pylint: disable=import-outside-toplevel
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
        fig, ax = plt.subplots(figsize=(6, 4))
        for name in impls:
            rows = [r for r in records if r["impl"] == name]
            ax.loglog([r["config"]["n"] for r in rows],
                      [r["ids_per_s"] for r in rows], "o-", label=name)
        ax.set_xlabel("ids checked")
        ax.set_ylabel("ids per second")
        ax.set_title(f"id validation, {os.cpu_count()} CPU cores")
        ax.legend(fontsize=7)
        fig.tight_layout()
        fig.savefig(args.png, dpi=120)


if __name__ == "__main__":
    main()
