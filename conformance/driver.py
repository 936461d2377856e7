"""The backend driver interface: what a backend implements to run the conformance kit.

A driver builds a canonical problem's model in its framework from the NumPy weights,
computes the batch statistics with the backend's adapter, and converts arrays in and
out. The kit does everything else (oracle, checks, the CABS loop), running the rule
itself on the framework's arrays.

A third-party backend gives its backend object (module) a ``conformance_driver``
attribute, a zero-argument callable returning a :class:`BackendDriver`; the built-in
backends' drivers live in this package.
"""

from __future__ import annotations

import abc
import importlib
from typing import Any

import numpy as np

from cabs._stats import GradStats
from cabs.conformance.problems import Problem

__all__ = ["BackendDriver", "BUILTIN_DRIVERS", "get_driver"]


class BackendDriver(abc.ABC):
    """One framework's side of the conformance kit.

    Subclasses set :attr:`name` and :attr:`dtypes` and implement :meth:`build`,
    :meth:`grad_stats` and :meth:`asarray`. ``to_numpy`` and ``update_params`` have
    defaults.

    Attributes:
        name: the backend's name in :mod:`cabs.backends`.
        dtypes: floating dtypes (``"float64"``, ``"float32"``) the backend computes in.
    """

    name: str = ""
    dtypes: tuple[str, ...] = ("float64", "float32")

    @abc.abstractmethod
    def build(self, problem: Problem, params: dict[str, np.ndarray], dtype: str, *, loss_scale: float = 1.0) -> Any:
        """The problem's model in this framework, holding ``params`` cast to ``dtype``.

        Args:
            problem: the canonical problem.
            params: canonical parameters (:meth:`Problem.param_shapes` layout).
            dtype: ``"float64"`` or ``"float32"``.
            loss_scale: multiply every per-example loss by this factor.

        Returns:
            Whatever :meth:`grad_stats` needs (model, loss function, parameters).
        """

    @abc.abstractmethod
    def grad_stats(
        self, model: Any, inputs: np.ndarray, targets: np.ndarray
    ) -> tuple[GradStats, dict[str, np.ndarray]]:
        """The backend's statistics of one batch and its mean gradient.

        Args:
            model: what :meth:`build` returned.
            inputs: the batch inputs as NumPy (floats already in the model's dtype,
                token ids as int64); the driver converts them.
            targets: the batch targets as NumPy, likewise.

        Returns:
            ``(stats, mean_grad)``: the adapter's :class:`cabs.GradStats` of this
            framework's 0-d arrays, and the mean gradient as a dict of NumPy arrays in
            the canonical layout.
        """

    @abc.abstractmethod
    def asarray(self, value: np.ndarray) -> Any:
        """Convert a NumPy array to this framework's array (same dtype)."""

    def to_numpy(self, value: Any) -> np.ndarray:
        """Convert one of this framework's arrays to NumPy."""
        return np.asarray(value)

    def update_params(self, model: Any, problem: Problem, params: dict[str, np.ndarray], dtype: str) -> Any:
        """Give ``model`` new parameter values; returns the model to use from now on.

        The default builds a new model; override it where assigning is cheaper.
        """
        return self.build(problem, params, dtype)


# name -> "module:class" of the kit's drivers for the built-in backends.
BUILTIN_DRIVERS: dict[str, str] = {
    "numpy": "cabs.conformance._numpy:NumpyDriver",
    "torch": "cabs.conformance._torch:TorchDriver",
    "jax": "cabs.conformance._jax:JaxDriver",
    "tensorflow": "cabs.conformance._tensorflow:TensorflowDriver",
}


def get_driver(name: str) -> BackendDriver:
    """The conformance driver of backend ``name``.

    Built-in backends use the kit's drivers; any other backend (registered with
    :func:`cabs.backends.register` or the ``cabs.backends`` entry-point group) must
    expose ``conformance_driver``, a callable returning a :class:`BackendDriver`.
    """
    from cabs import backends

    if name in BUILTIN_DRIVERS:
        backends.load(name)  # a clear error when the framework is missing
        module_path, class_name = BUILTIN_DRIVERS[name].split(":")
        return getattr(importlib.import_module(module_path), class_name)()
    backend = backends.load(name)
    factory = getattr(backend, "conformance_driver", None)
    if not callable(factory):
        raise TypeError(
            f"backend {name!r} has no `conformance_driver`; got {type(backend).__name__} without it. "
            f"Give the backend object a `conformance_driver` attribute returning a "
            f"cabs.conformance.BackendDriver subclass instance (see docs/conformance.md)."
        )
    driver = factory()
    if not isinstance(driver, BackendDriver):
        raise TypeError(
            f"`conformance_driver` of backend {name!r} must return a cabs.conformance.BackendDriver, "
            f"got {type(driver).__name__}. Subclass BackendDriver."
        )
    return driver
