"""Framework-free model descriptions and their initial weights, drawn by NumPy from a seed.

Every backend builds its network from the same :class:`Architecture` and loads the
same NumPy arrays, so runs with one seed start from identical weights whatever the
framework, and their curves can be compared.

Array layouts (channels first throughout, as in PyTorch):

- :class:`Dense`: weight ``(in_features, out_features)``, bias ``(out_features,)``;
- :class:`Conv`: weight ``(out_channels, in_channels, *kernel)``, bias ``(out_channels,)``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

__all__ = ["MODELS", "Architecture", "Conv", "Dense", "architecture", "initial_parameters"]

MODELS = ("mlp", "cnn")

_MLP_WIDTH = 256
_CNN_CHANNELS = (32, 32)
_CNN_KERNEL = 5
_CNN_HIDDEN = 128


@dataclass(frozen=True)
class Conv:
    """Convolution (stride 1, 'same' padding), ReLU, then max-pooling by ``pool`` (1: none)."""

    spatial_dims: int
    in_channels: int
    out_channels: int
    kernel_size: int
    pool: int


@dataclass(frozen=True)
class Dense:
    """Fully connected layer on the flattened input; ReLU unless it is the output layer."""

    in_features: int
    out_features: int
    relu: bool


@dataclass(frozen=True)
class Architecture:
    """A network as a sequence of layers.

    Attributes:
        name: the model name (``"mlp"`` or ``"cnn"``).
        input_shape: shape of one example as the network takes it, channels first
            (``(features,)`` for an MLP, ``(channels, *spatial)`` for a CNN).
        num_classes: number of outputs.
        layers: the layers in order; the input of the first :class:`Dense` is flattened.
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    layers: tuple[Conv | Dense, ...]


def architecture(name: str, input_shape: tuple[int, ...], num_classes: int) -> Architecture:
    """The network ``name`` for examples of ``input_shape`` and ``num_classes`` classes.

    Args:
        name: ``"mlp"`` (two hidden layers of 256) or ``"cnn"`` (two 5-wide
            convolutions of 32 channels with 2x max-pooling, a hidden layer of 128);
            the CNN is 1-D for vector data such as MNIST-1D and 2-D for images.
        input_shape: the data set's shape of one example: ``(features,)`` or
            ``(channels, height, width)``.
        num_classes: number of classes.

    Returns:
        The :class:`Architecture`.

    Raises:
        ValueError: an unknown model name or an input shape the model cannot take.
    """
    if name not in MODELS:
        raise ValueError(f"`model` must be one of {', '.join(MODELS)}, got model={name!r}.")
    input_shape = tuple(int(size) for size in input_shape)
    if name == "mlp":
        features = math.prod(input_shape)
        dense_layers = (
            Dense(features, _MLP_WIDTH, relu=True),
            Dense(_MLP_WIDTH, _MLP_WIDTH, relu=True),
            Dense(_MLP_WIDTH, num_classes, relu=False),
        )
        return Architecture(name, (features,), num_classes, dense_layers)
    if len(input_shape) == 1:
        input_shape = (1, *input_shape)  # a vector is a 1-channel signal
    if len(input_shape) not in (2, 3):
        raise ValueError(
            f"`model`='cnn' needs examples of shape (features,), (channels, length) or (channels, height, width), "
            f"got input_shape={input_shape}. Use --model mlp for other data."
        )
    spatial_dims = len(input_shape) - 1
    channels, spatial = input_shape[0], list(input_shape[1:])
    layers: list[Conv | Dense] = []
    for out_channels in _CNN_CHANNELS:
        # Pool only while every spatial axis still has two positions to pool over.
        pool = 2 if min(spatial) >= 2 else 1
        layers.append(Conv(spatial_dims, channels, out_channels, _CNN_KERNEL, pool))
        channels, spatial = out_channels, [size // pool for size in spatial]
    flat = channels * math.prod(spatial)
    layers += [Dense(flat, _CNN_HIDDEN, relu=True), Dense(_CNN_HIDDEN, num_classes, relu=False)]
    return Architecture(name, input_shape, num_classes, tuple(layers))


def initial_parameters(model: Architecture, seed: int) -> list[tuple[np.ndarray, np.ndarray]]:
    """Initial ``(weight, bias)`` per layer, float32, drawn from ``seed`` by NumPy.

    Hidden layers use He-uniform weights (they feed a ReLU), the output layer
    Glorot-uniform; biases start at zero.
    """
    generator = np.random.default_rng([seed, 0xCAB5])
    parameters = []
    for layer in model.layers:
        if isinstance(layer, Conv):
            kernel = (layer.kernel_size,) * layer.spatial_dims
            shape = (layer.out_channels, layer.in_channels, *kernel)
            fan_in, fan_out, relu = layer.in_channels * math.prod(kernel), layer.out_channels, True
        else:
            shape = (layer.in_features, layer.out_features)
            fan_in, fan_out, relu = layer.in_features, layer.out_features, layer.relu
        bound = math.sqrt(6.0 / fan_in) if relu else math.sqrt(6.0 / (fan_in + fan_out))
        weight = generator.uniform(-bound, bound, size=shape).astype(np.float32)
        parameters.append((weight, np.zeros(shape[-1] if isinstance(layer, Dense) else shape[0], dtype=np.float32)))
    return parameters
