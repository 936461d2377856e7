"""PyTorch task for ``cabs train``: builds the network and runs one CABS step."""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from cabs._stats import GradStats
from cabs.backends import torch as cabs_torch
from cabs.training.checkpoint import generator_state_array, load_generator_state
from cabs.training.models import Architecture, Conv, crop_batch

__all__ = ["TorchTask"]

_EVAL_CHUNK = 1024


def _network(model: Architecture, parameters: list[tuple[np.ndarray, np.ndarray]]) -> torch.nn.Sequential:
    layers: list[torch.nn.Module] = []
    flattened = False
    for layer, (weight, bias) in zip(model.layers, parameters, strict=True):
        if isinstance(layer, Conv):
            conv_class = torch.nn.Conv1d if layer.spatial_dims == 1 else torch.nn.Conv2d
            pool_class = torch.nn.MaxPool1d if layer.spatial_dims == 1 else torch.nn.MaxPool2d
            conv = conv_class(layer.in_channels, layer.out_channels, layer.kernel_size, padding=layer.kernel_size // 2)
            _load(conv, weight, bias)
            layers += [conv, torch.nn.ReLU()]
            if layer.pool > 1:
                layers.append(
                    pool_class(layer.pool, stride=layer.pool_stride or layer.pool, padding=layer.pool_padding)
                )
            continue
        if not flattened:
            layers.append(torch.nn.Flatten())
            flattened = True
        linear = torch.nn.Linear(layer.in_features, layer.out_features)
        _load(linear, weight.T, bias)  # torch stores dense weights as (out, in)
        layers.append(linear)
        if layer.relu:
            layers.append(torch.nn.ReLU())
    return torch.nn.Sequential(*layers)


def _load(module: torch.nn.Conv1d | torch.nn.Conv2d | torch.nn.Linear, weight: np.ndarray, bias: np.ndarray) -> None:
    with torch.no_grad():
        module.weight.copy_(torch.from_numpy(np.ascontiguousarray(weight)))
        assert module.bias is not None  # every layer here is built with a bias
        module.bias.copy_(torch.from_numpy(bias))


class TorchTask:
    """The network, its training data and a plain SGD optimizer, in PyTorch (float32, CPU).

    Args:
        model: the architecture.
        parameters: initial ``(weight, bias)`` per layer (see :mod:`cabs.training.models`).
        x_train: training inputs, shape ``(n, *model.input_shape)``, float32.
        y_train: training labels, shape ``(n,)``, int64.
        learning_rate: the SGD step size.
        threads: sets ``torch.set_num_threads`` (process-wide); None leaves it.
        seed: fixes the random crops of a model with ``crop`` (see :func:`cabs.training.models.crop_batch`).
        dtype: ``"float32"`` or ``"float64"``, of the parameters and the data.
        process_group: a ``torch.distributed`` group (torchrun's workers): each step's indices are
            this worker's share of the global batch and the statistics and mean gradient are
            reduced over the group. None: one process.
        max_examples_per_pass: at most this many examples per forward and backward pass (and
            per vmap chunk); the sums of the passes add up to the whole batch's. None: one pass.
    """

    backend = "torch"

    def __init__(
        self,
        model,
        parameters,
        x_train,
        y_train,
        learning_rate: float,
        *,
        threads: int | None = None,
        seed: int = 0,
        dtype: str = "float32",
        process_group: Any = None,
        max_examples_per_pass: int | None = None,
    ) -> None:
        self.process_group = process_group
        self.max_examples_per_pass = max_examples_per_pass
        if threads is not None:
            torch.set_num_threads(threads)
        self.numpy_dtype = np.dtype(dtype)
        self.network = _network(model, parameters).to(getattr(torch, dtype))
        # Random layers (dropout) would draw from the global generator: seed it so runs repeat,
        # and it is saved in state_dict so a resumed run continues its sequence.
        torch.manual_seed(seed)
        self.crop = model.crop
        self._crop_generator = np.random.default_rng([seed, 0xC809])
        self.x_train = torch.from_numpy(np.ascontiguousarray(x_train, dtype=self.numpy_dtype))
        self.y_train = torch.from_numpy(np.ascontiguousarray(y_train, dtype=np.int64))
        self.loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
        self.optimizer = torch.optim.SGD(self.network.parameters(), lr=learning_rate)

    def step(self, indices: np.ndarray, learning_rate: float | None = None) -> tuple[GradStats, float]:
        """One SGD step on the examples ``indices``; returns their statistics and mean loss.

        ``learning_rate`` replaces the step size from this step on (a decay schedule); None keeps it.
        """
        if learning_rate is not None:
            for group in self.optimizer.param_groups:
                group["lr"] = learning_rate
        index = torch.from_numpy(np.asarray(indices, dtype=np.int64))
        inputs = self.x_train[index]
        if self.crop is not None:
            inputs = torch.from_numpy(crop_batch(inputs.numpy(), self.crop, self._crop_generator))
        stats = cabs_torch.grad_stats(
            self.network,
            self.loss_fn,
            inputs,
            self.y_train[index],
            process_group=self.process_group,
            max_examples_per_pass=self.max_examples_per_pass,
            chunk_size=self.max_examples_per_pass,
        )
        self.optimizer.step()
        return stats, float(stats.loss)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Mean cross-entropy and accuracy of the current network on ``(x, y)``."""
        loss_sum, correct = 0.0, 0
        with torch.no_grad():
            for start in range(0, len(x), _EVAL_CHUNK):
                chunk = np.ascontiguousarray(x[start : start + _EVAL_CHUNK], dtype=self.numpy_dtype)
                inputs = torch.from_numpy(chunk if self.crop is None else crop_batch(chunk, self.crop, None))
                targets = torch.from_numpy(np.asarray(y[start : start + _EVAL_CHUNK], dtype=np.int64))
                outputs = self.network(inputs)
                loss_sum += float(self.loss_fn(outputs, targets).double().sum())
                correct += int((outputs.argmax(dim=1) == targets).sum())
        return loss_sum / len(x), correct / len(x)

    def summary_extras(self) -> dict:
        """Backend-specific entries for ``summary.json``."""
        return {"framework_version": torch.__version__}

    def state_dict(self) -> dict[str, np.ndarray]:
        """Parameters, optimizer state and random-number states as NumPy arrays (for a checkpoint)."""
        arrays = {
            f"model/{key}": value.detach().cpu().numpy().copy() for key, value in self.network.state_dict().items()
        }
        for index, state in self.optimizer.state_dict()["state"].items():
            arrays.update(
                {f"optimizer/{index}/{key}": torch.as_tensor(value).cpu().numpy() for key, value in state.items()}
            )
        arrays["rng/torch"] = torch.random.get_rng_state().numpy().copy()
        arrays["rng/crop"] = generator_state_array(self._crop_generator)
        return arrays

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`'s arrays; raises ValueError or RuntimeError when they do not fit."""
        self.network.load_state_dict(
            {
                key.removeprefix("model/"): torch.from_numpy(value)
                for key, value in arrays.items()
                if key.startswith("model/")
            }
        )
        optimizer_state = self.optimizer.state_dict()
        optimizer_state["state"] = {}
        for key, value in arrays.items():
            if key.startswith("optimizer/"):
                _, index, name = key.split("/", 2)
                optimizer_state["state"].setdefault(int(index), {})[name] = torch.from_numpy(value)
        self.optimizer.load_state_dict(optimizer_state)
        torch.random.set_rng_state(torch.from_numpy(arrays["rng/torch"]))
        load_generator_state(self._crop_generator, arrays["rng/crop"])
