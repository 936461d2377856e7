"""Conformance driver for the JAX adapter: the canonical problems as pure functions of a dict.

The parameters are a plain dict keyed by the canonical names in the canonical layout,
so no conversion is needed in either direction. Float32 matmuls and convolutions use
``Precision.HIGHEST`` so an accelerator's reduced-precision default does not blur the
float32 tolerance.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from cabs._stats import GradStats
from cabs.conformance.driver import BackendDriver
from cabs.conformance.problems import Problem

__all__ = ["JaxDriver", "example_loss_function"]

jax.config.update("jax_enable_x64", True)
_HIGHEST = lax.Precision.HIGHEST


def _dense(inputs, kernel, bias):
    return jnp.matmul(inputs, kernel, precision=_HIGHEST) + bias


def _conv(image, kernel, bias, stride, padding):
    output = lax.conv_general_dilated(
        image[None],
        kernel,
        window_strides=(stride, stride),
        padding=[(padding, padding), (padding, padding)],
        dimension_numbers=("NCHW", "OIHW", "NCHW"),
        precision=_HIGHEST,
    )[0]
    return output + bias[:, None, None]


def _cross_entropy(logits, label):
    return jax.nn.logsumexp(logits) - logits[label]


def _outputs(problem: Problem, params: dict, inputs):
    """The model's output (logits or prediction) for ONE example."""
    if problem.kind == "linear_regression":
        return jnp.dot(inputs, params["w"], precision=_HIGHEST)
    if problem.kind == "softmax_regression":
        return _dense(inputs, params["dense/kernel"], params["dense/bias"])
    if problem.kind == "mlp":
        hidden = jnp.tanh(_dense(inputs, params["hidden/kernel"], params["hidden/bias"]))
        return _dense(hidden, params["output/kernel"], params["output/bias"])
    if problem.kind == "cnn":
        hidden = jnp.tanh(_conv(inputs, params["conv1/kernel"], params["conv1/bias"], 1, 0))
        hidden = jnp.tanh(_conv(hidden, params["conv2/kernel"], params["conv2/bias"], 2, 1))
        return _dense(hidden.mean(axis=(1, 2)), params["output/kernel"], params["output/bias"])
    if problem.kind == "tied_embedding":
        table = params["embedding/table"]
        hidden = jnp.tanh(table[inputs].mean(axis=0))
        return jnp.matmul(table, hidden, precision=_HIGHEST) + params["output/bias"]
    if problem.kind == "sequence":
        embedded = params["embedding/table"][inputs]
        hidden = jnp.tanh(_dense(embedded, params["time_dense/kernel"], params["time_dense/bias"]))
        return _dense(hidden.mean(axis=0), params["output/kernel"], params["output/bias"])
    raise ValueError(f"unknown problem kind {problem.kind!r}")


_loss_functions: dict[tuple, Any] = {}


def example_loss_function(problem: Problem, loss_scale: float = 1.0):
    """``loss_fn(params, (input, target))`` of one example.

    One function object per problem architecture and loss scale, so the adapter's
    compile cache (keyed on the function) is reused across calls.
    """
    key = (problem.kind, repr(sorted(problem.sizes.items())), float(loss_scale))
    if key not in _loss_functions:

        def loss_fn(params, example):
            inputs, target = example
            outputs = _outputs(problem, params, inputs)
            loss = _cross_entropy(outputs, target) if problem.classification else 0.5 * (outputs - target) ** 2
            return loss_scale * loss

        _loss_functions[key] = loss_fn
    return _loss_functions[key]


class _Model(NamedTuple):
    problem: Problem
    params: dict
    loss_fn: Any


class JaxDriver(BackendDriver):
    """Runs :func:`cabs.backends.jax.grad_stats` on pure-function versions of the problems."""

    name = "jax"

    def build(self, problem: Problem, params: dict[str, np.ndarray], dtype: str, *, loss_scale: float = 1.0) -> Any:
        arrays = {name: jnp.asarray(np.asarray(value, dtype=dtype)) for name, value in params.items()}
        return _Model(problem, arrays, example_loss_function(problem, float(loss_scale)))

    def update_params(self, model: Any, problem: Problem, params: dict[str, np.ndarray], dtype: str) -> Any:
        return model._replace(
            params={name: jnp.asarray(np.asarray(value, dtype=dtype)) for name, value in params.items()}
        )

    def grad_stats(
        self, model: Any, inputs: np.ndarray, targets: np.ndarray
    ) -> tuple[GradStats, dict[str, np.ndarray]]:
        from cabs.backends import jax as cabs_jax

        stats, mean_grad = cabs_jax.grad_stats(model.loss_fn, model.params, (jnp.asarray(inputs), jnp.asarray(targets)))
        return stats, {name: np.asarray(value) for name, value in mean_grad.items()}

    def asarray(self, value: np.ndarray) -> Any:
        return jnp.asarray(value)
