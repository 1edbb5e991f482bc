"""Keras config helpers for layers that hold other layers."""

import tf_keras


def config_with_layers(config, keys, custom_objects=None):
    """A copy of a `get_config()` dict with nested layers deserialized.

    Args:
        config: the dict, where `config[key]` is a `tf_keras.layers.
            serialize` result (or None, or an object already).
        keys: the keys holding nested layers.
        custom_objects: passed to `tf_keras.layers.deserialize`.

    Returns:
        dict ready for `cls(**config)`.
    """
    config = dict(config)
    for key in keys:
        if isinstance(config.get(key), dict):
            config[key] = tf_keras.layers.deserialize(
                config[key], custom_objects=custom_objects)
    return config
