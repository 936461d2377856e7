"""Conformance driver for the TensorFlow adapter: the canonical problems as Keras 3 models.

Canonical layouts differ from Keras in two places: convolution inputs are NCHW here and
NHWC in Keras (inputs are transposed, kernels go ``[out, in, kh, kw]`` <->
``[kh, kw, in, out]``), and the linear-regression weight is a vector here and a
``[features, 1]`` kernel there. The second convolution uses ``padding="same"`` with
stride 2 on a 5x5 input, which pads one pixel on each side as the canonical model does.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import keras
import numpy as np
import tensorflow as tf

from cabs._stats import GradStats
from cabs.conformance.driver import BackendDriver
from cabs.conformance.problems import Problem

__all__ = ["TensorflowDriver", "build_keras_model"]


class TiedOutput(keras.layers.Layer):
    """Logits ``h . E^T + b`` with ``E`` the table of an existing ``Embedding`` layer (the tie)."""

    def __init__(self, embedding: keras.layers.Embedding, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.embedding = embedding

    def build(self, input_shape: Any) -> None:
        self.bias = self.add_weight(shape=(self.embedding.input_dim,), initializer="zeros", name="bias")

    def call(self, hidden: Any) -> Any:
        return keras.ops.matmul(hidden, keras.ops.transpose(self.embedding.embeddings)) + self.bias


def build_keras_model(problem: Problem, dtype: str) -> tuple[keras.Model, dict[str, tuple[Any, str]]]:
    """The problem's Keras model and ``canonical name -> (variable, layout)``."""
    s = problem.sizes
    layers = keras.layers
    token_input = problem.kind in ("tied_embedding", "sequence")
    shape = problem.input_shape()
    if problem.kind == "cnn":
        shape = (shape[1], shape[2], shape[0])
    inputs = keras.Input(shape=shape, dtype="int64" if token_input else dtype)
    if problem.kind == "linear_regression":
        dense = layers.Dense(1, use_bias=False, dtype=dtype)
        outputs = dense(inputs)
        variables = {"w": (dense.kernel, "column")}
    elif problem.kind == "softmax_regression":
        dense = layers.Dense(s["classes"], dtype=dtype)
        outputs = dense(inputs)
        variables = {"dense/kernel": (dense.kernel, "same"), "dense/bias": (dense.bias, "same")}
    elif problem.kind == "mlp":
        hidden, output = (
            layers.Dense(s["hidden"], activation="tanh", dtype=dtype),
            layers.Dense(s["classes"], dtype=dtype),
        )
        outputs = output(hidden(inputs))
        variables = _dense_variables(hidden, "hidden") | _dense_variables(output, "output")
    elif problem.kind == "cnn":
        channels = s["channels"]
        conv1 = layers.Conv2D(channels[1], 3, activation="tanh", dtype=dtype)
        conv2 = layers.Conv2D(channels[2], 3, strides=2, padding="same", activation="tanh", dtype=dtype)
        output = layers.Dense(s["classes"], dtype=dtype)
        outputs = output(layers.GlobalAveragePooling2D(dtype=dtype)(conv2(conv1(inputs))))
        variables = {
            "conv1/kernel": (conv1.kernel, "conv"),
            "conv1/bias": (conv1.bias, "same"),
            "conv2/kernel": (conv2.kernel, "conv"),
            "conv2/bias": (conv2.bias, "same"),
        } | _dense_variables(output, "output")
    elif problem.kind == "tied_embedding":
        embedding = layers.Embedding(s["vocabulary"], s["features"], dtype=dtype)
        pooled = layers.GlobalAveragePooling1D(dtype=dtype)(embedding(inputs))
        tied = TiedOutput(embedding, dtype=dtype)
        outputs = tied(layers.Activation("tanh", dtype=dtype)(pooled))
        variables = {"embedding/table": (embedding.embeddings, "same"), "output/bias": (tied.bias, "same")}
    elif problem.kind == "sequence":
        embedding = layers.Embedding(s["vocabulary"], s["features"], dtype=dtype)
        time_dense = layers.Dense(s["hidden"], activation="tanh", dtype=dtype)
        output = layers.Dense(s["classes"], dtype=dtype)
        outputs = output(layers.GlobalAveragePooling1D(dtype=dtype)(time_dense(embedding(inputs))))
        variables = {"embedding/table": (embedding.embeddings, "same")}
        variables |= _dense_variables(time_dense, "time_dense") | _dense_variables(output, "output")
    else:
        raise ValueError(f"unknown problem kind {problem.kind!r}")
    return keras.Model(inputs, outputs), variables


def _dense_variables(layer: Any, prefix: str) -> dict[str, tuple[Any, str]]:
    return {f"{prefix}/kernel": (layer.kernel, "same"), f"{prefix}/bias": (layer.bias, "same")}


def _to_keras_layout(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return np.transpose(value, (2, 3, 1, 0))
    if layout == "column":
        return value[:, None]
    return value


def _to_canonical_layout(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "conv":
        return np.transpose(value, (3, 2, 0, 1))
    if layout == "column":
        return value[:, 0]
    return value


def _loss_function(problem: Problem, loss_scale: float):
    if problem.classification:
        return lambda y_true, y_pred: (
            loss_scale * keras.losses.sparse_categorical_crossentropy(y_true, y_pred, from_logits=True)
        )
    return lambda y_true, y_pred: loss_scale * 0.5 * (y_pred[:, 0] - y_true) ** 2


class _Model(NamedTuple):
    problem: Problem
    model: keras.Model
    variables: dict[str, tuple[Any, str]]
    loss_fn: Any


class TensorflowDriver(BackendDriver):
    """Runs :func:`cabs.backends.tensorflow.grad_stats` on Keras 3 versions of the problems."""

    name = "tensorflow"

    def build(self, problem: Problem, params: dict[str, np.ndarray], dtype: str, *, loss_scale: float = 1.0) -> Any:
        model, variables = build_keras_model(problem, dtype)
        built = _Model(problem, model, variables, _loss_function(problem, loss_scale))
        return self.update_params(built, problem, params, dtype)

    def update_params(self, model: Any, problem: Problem, params: dict[str, np.ndarray], dtype: str) -> Any:
        for name, value in params.items():
            variable, layout = model.variables[name]
            variable.assign(np.asarray(_to_keras_layout(value, layout), dtype=dtype))
        return model

    def grad_stats(
        self, model: Any, inputs: np.ndarray, targets: np.ndarray
    ) -> tuple[GradStats, dict[str, np.ndarray]]:
        from cabs.backends import tensorflow as cabs_tf

        if model.problem.kind == "cnn":
            inputs = np.transpose(inputs, (0, 2, 3, 1))
        stats, gradients = cabs_tf.grad_stats(model.model, model.loss_fn, tf.constant(inputs), tf.constant(targets))
        by_variable = {
            id(variable): gradient
            for variable, gradient in zip(model.model.trainable_variables, gradients, strict=True)
        }
        mean_grad = {}
        for name, (variable, layout) in model.variables.items():
            mean_grad[name] = _to_canonical_layout(np.asarray(by_variable[id(variable)]), layout)
        return stats, mean_grad

    def asarray(self, value: np.ndarray) -> Any:
        return tf.constant(value)

    def to_numpy(self, value: Any) -> np.ndarray:
        return np.asarray(value)
