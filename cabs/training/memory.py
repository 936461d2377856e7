"""``cabs train --memory-budget``: how many examples one pass of the statistics may hold.

The adapters split a batch into passes of at most ``max_examples_per_pass`` examples and
add up their sums, so the statistics and the mean gradient are those of the whole batch
(only the floating-point summation order changes); this module chooses that number from
a byte budget with a simple, deliberately generous estimate:

- fixed: the parameters, their gradient and one more parameter-sized buffer (the summed
  gradient of the passes), ``3 * parameter_count * itemsize``;
- per example: the input and every layer's stored values, each twice (the value kept for
  the backward pass and its gradient), where a layer's values are its output before and
  after the ReLU, its pooled output, and for a convolution also the unfolded input patches
  (``in_channels * kernel_size ** spatial_dims`` per output position) that the layer-wise
  norms read; ``2 * (input_size + activation_size) * itemsize``.

``max_examples_per_pass = floor((budget - fixed) / per_example)``, at least 1. The
estimate counts neither the framework's workspace nor its compiled code, so leave some
head-room below the device's memory.
"""

from __future__ import annotations

import math
import re

from cabs.training.models import Architecture, Conv

__all__ = ["examples_per_pass", "parse_bytes", "per_example_bytes", "fixed_bytes"]

_UNITS = {
    "": 1,
    "b": 1,
    "k": 10**3,
    "kb": 10**3,
    "kib": 2**10,
    "m": 10**6,
    "mb": 10**6,
    "mib": 2**20,
    "g": 10**9,
    "gb": 10**9,
    "gib": 2**30,
    "t": 10**12,
    "tb": 10**12,
    "tib": 2**40,
}
_SIZE = re.compile(r"\s*([0-9]+(?:\.[0-9]*)?|\.[0-9]+)\s*([a-zA-Z]*)\s*")


def parse_bytes(text: str) -> int:
    """A byte count from ``"1048576"``, ``"64MB"`` (10^6), ``"64MiB"`` (2^20), ``"1.5GiB"``, ...

    Raises:
        ValueError: not a positive size with a known unit (B, K/KB, KiB, M/MB, MiB, G/GB, GiB, T/TB, TiB).
    """
    match = _SIZE.fullmatch(str(text))
    unit = match.group(2).lower() if match else None
    if match is None or unit not in _UNITS:
        raise ValueError(
            f"`memory_budget` must be a size in bytes such as 512MB or 2GiB, got memory_budget={text!r}. "
            "Use a number with an optional unit B, KB, KiB, MB, MiB, GB, GiB, TB or TiB."
        )
    value = math.floor(float(match.group(1)) * _UNITS[unit])
    if value < 1:
        raise ValueError(f"`memory_budget` must be at least 1 byte, got memory_budget={text!r}. Give a positive size.")
    return value


def _activation_elements(architecture: Architecture) -> int:
    """Per example: the values each layer keeps for the backward pass (and the conv patches)."""
    spatial = architecture.input_shape[1:]
    if architecture.crop is not None:
        spatial = (architecture.crop,) * len(spatial)
    total = 0
    for layer in architecture.layers:
        if isinstance(layer, Conv):
            positions = math.prod(spatial)  # stride 1, 'same' padding
            total += 2 * layer.out_channels * positions  # before and after the ReLU
            total += layer.in_channels * layer.kernel_size**layer.spatial_dims * positions  # patches
            if layer.pool > 1:
                stride = layer.pool_stride or layer.pool
                spatial = tuple((side + 2 * layer.pool_padding - layer.pool) // stride + 1 for side in spatial)
                total += layer.out_channels * math.prod(spatial)
        else:
            total += 2 * layer.out_features
    return total


def _parameter_count(architecture: Architecture) -> int:
    count = 0
    for layer in architecture.layers:
        if isinstance(layer, Conv):
            count += layer.out_channels * (layer.in_channels * layer.kernel_size**layer.spatial_dims + 1)
        else:
            count += layer.out_features * (layer.in_features + 1)
    return count


def per_example_bytes(architecture: Architecture, itemsize: int) -> int:
    """Estimated bytes one example of a pass holds: input and stored values, each with its gradient."""
    return 2 * (math.prod(architecture.input_shape) + _activation_elements(architecture)) * itemsize


def fixed_bytes(architecture: Architecture, itemsize: int) -> int:
    """Estimated bytes of a pass that do not grow with it: parameters, gradient and summed gradient."""
    return 3 * _parameter_count(architecture) * itemsize


def examples_per_pass(architecture: Architecture, itemsize: int, memory_budget: int) -> int:
    """The largest pass size whose estimated memory fits ``memory_budget`` bytes (see the module docstring).

    Raises:
        ValueError: the budget does not hold the parameters and one example.
    """
    available = memory_budget - fixed_bytes(architecture, itemsize)
    one = per_example_bytes(architecture, itemsize)
    if available < one:
        needed = fixed_bytes(architecture, itemsize) + one
        raise ValueError(
            f"`memory_budget` must hold the model and one example (about {needed} bytes for "
            f"model={architecture.name!r}), got memory_budget={memory_budget}. Give a larger --memory-budget."
        )
    return available // one
