"""Conformance driver for the PyTorch adapter: the canonical problems as ``torch.nn`` modules.

Standard layers (``Linear``, ``Conv2d``, ``Embedding``) are used wherever they fit, so a
layer-wise adapter meets the layer kinds it must support. Canonical dense kernels are
``[in, out]``; ``torch.nn.Linear`` stores ``[out, in]``, so they are transposed on the way
in and the gradients on the way out.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn

from cabs._stats import GradStats
from cabs.conformance.driver import BackendDriver
from cabs.conformance.problems import Problem

__all__ = ["TorchDriver", "build_module"]

_DTYPES = {"float64": torch.float64, "float32": torch.float32}


class _LinearRegression(nn.Module):
    def __init__(self, problem: Problem) -> None:
        super().__init__()
        self.linear = nn.Linear(problem.sizes["features"], 1, bias=False)

    def forward(self, inputs):
        return self.linear(inputs)[:, 0]


class _Dense(nn.Module):
    def __init__(self, problem: Problem) -> None:
        super().__init__()
        self.dense = nn.Linear(problem.sizes["features"], problem.sizes["classes"])

    def forward(self, inputs):
        return self.dense(inputs)


class _MLP(nn.Module):
    def __init__(self, problem: Problem) -> None:
        super().__init__()
        self.hidden = nn.Linear(problem.sizes["features"], problem.sizes["hidden"])
        self.output = nn.Linear(problem.sizes["hidden"], problem.sizes["classes"])

    def forward(self, inputs):
        return self.output(torch.tanh(self.hidden(inputs)))


class _CNN(nn.Module):
    def __init__(self, problem: Problem) -> None:
        super().__init__()
        channels = problem.sizes["channels"]
        self.conv1 = nn.Conv2d(channels[0], channels[1], 3)
        self.conv2 = nn.Conv2d(channels[1], channels[2], 3, stride=2, padding=1)
        self.output = nn.Linear(channels[2], problem.sizes["classes"])

    def forward(self, inputs):
        hidden = torch.tanh(self.conv2(torch.tanh(self.conv1(inputs))))
        return self.output(hidden.mean(dim=(2, 3)))


class _TiedEmbedding(nn.Module):
    def __init__(self, problem: Problem) -> None:
        super().__init__()
        self.embedding = nn.Embedding(problem.sizes["vocabulary"], problem.sizes["features"])
        self.output = nn.Linear(problem.sizes["features"], problem.sizes["vocabulary"])
        self.output.weight = self.embedding.weight  # the tie: one parameter, two uses

    def forward(self, tokens):
        return self.output(torch.tanh(self.embedding(tokens).mean(dim=1)))


class _Sequence(nn.Module):
    def __init__(self, problem: Problem) -> None:
        super().__init__()
        s = problem.sizes
        self.embedding = nn.Embedding(s["vocabulary"], s["features"])
        self.time_dense = nn.Linear(s["features"], s["hidden"])
        self.output = nn.Linear(s["hidden"], s["classes"])

    def forward(self, tokens):
        hidden = torch.tanh(self.time_dense(self.embedding(tokens)))  # [batch, time, hidden]
        return self.output(hidden.mean(dim=1))


_MODULES = {
    "linear_regression": _LinearRegression,
    "softmax_regression": _Dense,
    "mlp": _MLP,
    "cnn": _CNN,
    "tied_embedding": _TiedEmbedding,
    "sequence": _Sequence,
}

# canonical name -> (module parameter name, whether the canonical array is its transpose)
_PARAMETER_NAMES = {
    "w": ("linear.weight", "row"),
    "dense/kernel": ("dense.weight", "transpose"),
    "dense/bias": ("dense.bias", "same"),
    "hidden/kernel": ("hidden.weight", "transpose"),
    "hidden/bias": ("hidden.bias", "same"),
    "output/kernel": ("output.weight", "transpose"),
    "output/bias": ("output.bias", "same"),
    "conv1/kernel": ("conv1.weight", "same"),
    "conv1/bias": ("conv1.bias", "same"),
    "conv2/kernel": ("conv2.weight", "same"),
    "conv2/bias": ("conv2.bias", "same"),
    "embedding/table": ("embedding.weight", "same"),
    "time_dense/kernel": ("time_dense.weight", "transpose"),
    "time_dense/bias": ("time_dense.bias", "same"),
}


def _to_torch_layout(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "transpose":
        return value.T
    if layout == "row":
        return value[None, :]
    return value


def _to_canonical_layout(value: np.ndarray, layout: str) -> np.ndarray:
    if layout == "transpose":
        return value.T
    if layout == "row":
        return value[0]
    return value


class _Model(NamedTuple):
    problem: Problem
    module: nn.Module
    loss_fn: Any
    dtype: torch.dtype


def build_module(problem: Problem, params: dict[str, np.ndarray], dtype: str) -> nn.Module:
    """The problem's ``torch.nn.Module`` holding ``params`` in ``dtype``."""
    module = _MODULES[problem.kind](problem).to(_DTYPES[dtype])
    _assign(module, params)
    return module


def _assign(module: nn.Module, params: dict[str, np.ndarray]) -> None:
    named = dict(module.named_parameters())
    with torch.no_grad():
        for name, value in params.items():
            target, layout = _PARAMETER_NAMES[name]
            named[target].copy_(torch.from_numpy(np.ascontiguousarray(_to_torch_layout(value, layout))))


def _loss_function(problem: Problem, loss_scale: float):
    if problem.classification:
        cross_entropy = nn.CrossEntropyLoss(reduction="none")
        return lambda outputs, targets: loss_scale * cross_entropy(outputs, targets)
    return lambda outputs, targets: loss_scale * 0.5 * (outputs - targets) ** 2


class TorchDriver(BackendDriver):
    """Runs :func:`cabs.backends.torch.grad_stats` on ``torch.nn`` versions of the problems."""

    name = "torch"

    def build(self, problem: Problem, params: dict[str, np.ndarray], dtype: str, *, loss_scale: float = 1.0) -> Any:
        return _Model(
            problem, build_module(problem, params, dtype), _loss_function(problem, loss_scale), _DTYPES[dtype]
        )

    def update_params(self, model: Any, problem: Problem, params: dict[str, np.ndarray], dtype: str) -> Any:
        _assign(model.module, params)
        return model

    def grad_stats(
        self, model: Any, inputs: np.ndarray, targets: np.ndarray
    ) -> tuple[GradStats, dict[str, np.ndarray]]:
        from cabs.backends import torch as cabs_torch

        stats = cabs_torch.grad_stats(model.module, model.loss_fn, torch.from_numpy(inputs), torch.from_numpy(targets))
        named = dict(model.module.named_parameters())
        mean_grad = {}
        for name in model.problem.param_shapes():
            target, layout = _PARAMETER_NAMES[name]
            mean_grad[name] = _to_canonical_layout(named[target].grad.detach().numpy().copy(), layout)
        return stats, mean_grad

    def asarray(self, value: np.ndarray) -> Any:
        return torch.from_numpy(np.array(value))

    def to_numpy(self, value: Any) -> np.ndarray:
        return value.detach().cpu().numpy()
