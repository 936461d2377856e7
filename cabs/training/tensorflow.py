"""TensorFlow task for ``cabs train``: a Keras network and one CABS step."""

from __future__ import annotations

import contextlib
import os
from typing import Any

# Quiet TensorFlow's start-up banner; set before the import, and only if the user has not chosen.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from cabs._stats import GradStats  # noqa: E402
from cabs.backends import tensorflow as cabs_tf  # noqa: E402
from cabs.training.models import Architecture, Conv  # noqa: E402

__all__ = ["TensorFlowTask"]

_EVAL_CHUNK = 1024


def _network(model: Architecture, parameters: list[tuple[np.ndarray, np.ndarray]]) -> keras.Model:
    """The Keras network with the NumPy weights; the same function as the PyTorch network.

    Keras convolutions are channels-last on the CPU, so the input is transposed
    once at the start and back before flattening (the flattening order, and with
    it the dense weights, then match PyTorch's). A 1-D convolution runs as a
    Conv2D over a height of 1: the adapter computes exact per-example kernel
    gradients for Conv2D without a per-example loop.
    """
    layers: list[Any] = [keras.Input(model.input_shape)]
    weights: list[np.ndarray] = []
    convs = [layer for layer in model.layers if isinstance(layer, Conv)]
    if convs:
        if convs[0].spatial_dims == 1:
            channels, length = model.input_shape
            layers += [keras.layers.Permute((2, 1)), keras.layers.Reshape((1, length, channels))]
        else:
            layers.append(keras.layers.Permute((2, 3, 1)))
    flattened = False
    for layer, (weight, bias) in zip(model.layers, parameters, strict=True):
        if isinstance(layer, Conv):
            kernel = (1, layer.kernel_size) if layer.spatial_dims == 1 else (layer.kernel_size,) * 2
            pool = (1, layer.pool) if layer.spatial_dims == 1 else (layer.pool,) * 2
            layers.append(keras.layers.Conv2D(layer.out_channels, kernel, padding="same", activation="relu"))
            # (out, in, *kernel) -> Keras' (kernel_h, kernel_w, in, out)
            kernel_weight = weight[:, :, None, :] if layer.spatial_dims == 1 else weight
            weights += [np.transpose(kernel_weight, (2, 3, 1, 0)), bias]
            if layer.pool > 1:
                layers.append(keras.layers.MaxPooling2D(pool))
            continue
        if not flattened:
            if convs:
                # Back to channels first so the flattened order is PyTorch's.
                layers.append(keras.layers.Permute((3, 1, 2)))
            layers.append(keras.layers.Flatten())
            flattened = True
        layers.append(keras.layers.Dense(layer.out_features, activation="relu" if layer.relu else None))
        weights += [weight, bias]
    network = keras.Sequential(layers)
    network.set_weights(weights)
    return network


class TensorFlowTask:
    """The Keras network, its training data and plain SGD, in TensorFlow (float32).

    Args:
        model: the architecture.
        parameters: initial ``(weight, bias)`` per layer (see :mod:`cabs.training.models`).
        x_train: training inputs, shape ``(n, *model.input_shape)``, float32.
        y_train: training labels, shape ``(n,)``, int64.
        learning_rate: the SGD step size.
        strategy: a ``tf.distribute`` strategy (e.g. ``MirroredStrategy``) to split each batch over
            its replicas; their statistics are summed with the strategy's reduce. None: one device.
        max_examples_per_pass: at most this many examples per forward and backward pass of the
            statistics (one device); the passes' sums add up to the whole batch's. None: one pass.
    """

    backend = "tensorflow"

    def __init__(
        self,
        model,
        parameters,
        x_train,
        y_train,
        learning_rate: float,
        *,
        strategy: Any = None,
        max_examples_per_pass: int | None = None,
    ) -> None:
        self.strategy = strategy
        self.max_examples_per_pass = max_examples_per_pass
        # Under a strategy the variables and the optimizer's state are mirrored on every replica.
        with contextlib.nullcontext() if strategy is None else strategy.scope():
            self.network = _network(model, parameters)
            self.optimizer = keras.optimizers.SGD(learning_rate=learning_rate)
        self.x_train = np.asarray(x_train, dtype=np.float32)
        self.y_train = np.asarray(y_train, dtype=np.int64)
        self.loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        self.stats_function = cabs_tf.stats_function(self.network, self.loss_fn)

    def step(self, indices: np.ndarray, learning_rate: float | None = None) -> tuple[GradStats, float]:
        """One SGD step on the examples ``indices``; returns their statistics and mean loss.

        ``learning_rate`` replaces the step size from this step on (a decay schedule); None keeps it.
        """
        if learning_rate is not None:
            self.optimizer.learning_rate.assign(learning_rate)
        inputs = tf.constant(self.x_train[indices])
        targets = tf.constant(self.y_train[indices])
        if self.strategy is not None:
            split = cabs_tf.split_across_replicas
            stats = self._distributed_step(split(self.strategy, inputs), split(self.strategy, targets))
            return stats, float(stats.loss)
        stats, gradients = self.stats_function(inputs, targets, max_examples_per_pass=self.max_examples_per_pass)
        self.optimizer.apply_gradients(zip(gradients, self.network.trainable_variables, strict=True))
        return stats, float(stats.loss)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Mean cross-entropy and accuracy of the current network on ``(x, y)``."""
        loss_sum, correct = 0.0, 0
        for start in range(0, len(x), _EVAL_CHUNK):
            inputs = tf.constant(np.asarray(x[start : start + _EVAL_CHUNK], dtype=np.float32))
            targets = tf.constant(np.asarray(y[start : start + _EVAL_CHUNK], dtype=np.int64))
            chunk_loss, chunk_correct = self._evaluation_sums(inputs, targets)
            loss_sum += float(chunk_loss)
            correct += int(chunk_correct)
        return loss_sum / len(x), correct / len(x)

    @tf.function(reduce_retracing=True)  # replica shares change size: one trace with an unknown size
    def _distributed_step(self, replica_inputs: Any, replica_targets: Any) -> GradStats:
        sums = self.stats_function.distributed_batch_sums(self.strategy, replica_inputs, replica_targets)
        stats, gradients = self.stats_function.finish(sums)
        # Cross-replica context: one update of the mirrored variables with the global mean gradient.
        self.optimizer.apply_gradients(zip(gradients, self.network.trainable_variables, strict=True))
        return stats

    @tf.function(reduce_retracing=True)
    def _evaluation_sums(self, inputs: Any, targets: Any) -> tuple[Any, Any]:
        logits = self.network(inputs, training=False)
        losses = self.loss_fn(targets, logits)
        hits = tf.cast(tf.equal(tf.argmax(logits, axis=-1), targets), tf.int64)
        return tf.reduce_sum(tf.cast(losses, tf.float64)), tf.reduce_sum(hits)

    def summary_extras(self) -> dict[str, Any]:
        """Backend-specific entries for ``summary.json``: the tracing count of the statistics."""
        return {"framework_version": tf.__version__, "trace_count": self.stats_function.trace_count}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Weights and optimizer variables as NumPy arrays (for a checkpoint); the task draws no random numbers."""
        arrays = {f"model/{index}": np.asarray(value) for index, value in enumerate(self.network.get_weights())}
        arrays.update({f"optimizer/{index}": np.asarray(v.numpy()) for index, v in enumerate(self.optimizer.variables)})
        return arrays

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`'s arrays; ValueError when they do not fit the network."""
        weights = [arrays[f"model/{index}"] for index in range(len(self.network.get_weights()))]
        self.network.set_weights(weights)
        if not self.optimizer.built:
            with contextlib.nullcontext() if self.strategy is None else self.strategy.scope():
                self.optimizer.build(self.network.trainable_variables)
        for index, variable in enumerate(self.optimizer.variables):
            saved = arrays[f"optimizer/{index}"]
            if tuple(saved.shape) != tuple(variable.shape):
                raise ValueError(f"saved optimizer/{index} has shape {saved.shape}, the optimizer's {variable.shape}.")
            variable.assign(saved)
