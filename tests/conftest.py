"""Session setup: four logical CPU devices for the tf.distribute tests.

TensorFlow fixes its device list the first time it initialises its runtime,
so the split has to happen here, before any test module runs an op. Tests
that do not ask for a strategy keep running on /CPU:0 as before.
"""

import numpy as np
import pytest

import tfrec_fast  # noqa: F401  (selects tf_keras before TensorFlow loads)
import tensorflow as tf

from tfrec_fast import data

NUM_LOGICAL_CPUS = 4


def _split_cpu(num):
    cpus = tf.config.list_physical_devices("CPU")
    # (list_logical_devices would initialise the runtime: do not call it.)
    if not cpus or len(tf.config.get_logical_device_configuration(
            cpus[0]) or []) >= num:
        return
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration()] * num)
    except RuntimeError:
        # Already initialised: tests that need more devices skip.
        pass


_split_cpu(NUM_LOGICAL_CPUS)


@pytest.fixture(scope="module")
def toy_split():
    """ML-like split where every user walks a cycle of 30 items."""
    # Shared toy data of the model tests. Users walk a cycle of items, so the next item is predictable.
    rng = np.random.default_rng(0)
    num_items, users, items, times = 30, [], [], []
    for user in range(120):
        start, length = rng.integers(num_items), rng.integers(4, 14)
        users += [user] * length
        items += [(start + 3 * step) % num_items for step in range(length)]
        times += list(range(length))
    interactions = data.Interactions(np.array(users), np.array(items),
                                     np.array(times, np.float64))
    return data.leave_one_out(data.to_sequences(interactions,
                                                item_order="raw"))
