"""Session setup: four logical CPU devices for the tf.distribute tests.

TensorFlow fixes its device list the first time it initialises its runtime,
so the split has to happen here, before any test module runs an op. Tests
that do not ask for a strategy keep running on /CPU:0 as before.
"""

import tfrec_fast  # noqa: F401  (selects tf_keras before TensorFlow loads)
import tensorflow as tf

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
