"""Conformance driver for the NumPy reference adapter (float64 only).

NumPy has no automatic differentiation, so the per-example losses and gradients come
from the oracle's hand-derived formulas and this driver checks the adapter's
aggregation, :func:`cabs.backends.numpy.grad_stats_from_per_example`.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np

from cabs._stats import GradStats
from cabs.conformance.driver import BackendDriver
from cabs.conformance.oracle import example_loss_and_grads
from cabs.conformance.problems import Problem

__all__ = ["NumpyDriver"]


class _Model(NamedTuple):
    problem: Problem
    params: dict[str, np.ndarray]
    loss_scale: float


class NumpyDriver(BackendDriver):
    """Per-example gradients from the oracle, statistics from the NumPy adapter."""

    name = "numpy"
    dtypes = ("float64",)

    def build(self, problem: Problem, params: dict[str, np.ndarray], dtype: str, *, loss_scale: float = 1.0) -> Any:
        return _Model(problem, {name: np.asarray(value, dtype=dtype) for name, value in params.items()}, loss_scale)

    def grad_stats(
        self, model: Any, inputs: np.ndarray, targets: np.ndarray
    ) -> tuple[GradStats, dict[str, np.ndarray]]:
        from cabs.backends import numpy as cabs_numpy

        losses, grads = [], {name: [] for name in model.params}
        for example_input, example_target in zip(inputs, targets, strict=True):
            loss, example_grads = example_loss_and_grads(model.problem, model.params, example_input, example_target)
            losses.append(model.loss_scale * loss)
            for name in grads:
                grads[name].append(model.loss_scale * example_grads[name])
        stacked = {name: np.stack(values) for name, values in grads.items()}
        stats = cabs_numpy.grad_stats_from_per_example(np.asarray(losses), stacked)
        return stats, {name: value.mean(axis=0) for name, value in stacked.items()}

    def asarray(self, value: np.ndarray) -> Any:
        return np.asarray(value)

    def update_params(self, model: Any, problem: Problem, params: dict[str, np.ndarray], dtype: str) -> Any:
        return model._replace(params=params)
