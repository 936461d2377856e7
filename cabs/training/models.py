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

__all__ = [
    "MODELS",
    "Architecture",
    "Conv",
    "Dense",
    "architecture",
    "check_backend",
    "crop_batch",
    "initial_parameters",
]

MODELS = ("mlp", "cnn", "mnist-paper", "cifar10-paper")
# Models whose layers (overlapping pooling) or input cropping only the PyTorch task builds.
_TORCH_ONLY = ("cifar10-paper",)

_MLP_WIDTH = 256
_CNN_CHANNELS = (32, 32)
_CNN_KERNEL = 5
_CNN_HIDDEN = 128


@dataclass(frozen=True)
class Conv:
    """Convolution (stride 1, 'same' padding), ReLU, then max-pooling by ``pool`` (1: none).

    The pooling window is ``pool`` wide and moves by ``pool_stride`` (None: by ``pool``,
    windows that do not overlap), with ``pool_padding`` positions added on each side.
    """

    spatial_dims: int
    in_channels: int
    out_channels: int
    kernel_size: int
    pool: int
    pool_stride: int | None = None
    pool_padding: int = 0


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
        crop: None, or the side of the square crop the network sees of each image: a random
            crop per example in training steps, the center crop in evaluations (see :func:`crop_batch`).
    """

    name: str
    input_shape: tuple[int, ...]
    num_classes: int
    layers: tuple[Conv | Dense, ...]
    crop: int | None = None


def architecture(name: str, input_shape: tuple[int, ...], num_classes: int) -> Architecture:
    """The network ``name`` for examples of ``input_shape`` and ``num_classes`` classes.

    Args:
        name: ``"mlp"`` (two hidden layers of 256) or ``"cnn"`` (two 5-wide
            convolutions of 32 channels with 2x max-pooling, a hidden layer of 128);
            the CNN is 1-D for vector data such as MNIST-1D and 2-D for images.
            ``"mnist-paper"`` and ``"cifar10-paper"`` are the networks of the CABS paper's
            MNIST and CIFAR-10 experiments (see :func:`_paper_network`).
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
    if name in ("mnist-paper", "cifar10-paper"):
        return _paper_network(name, input_shape, num_classes)
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


def _paper_network(name: str, input_shape: tuple[int, ...], num_classes: int) -> Architecture:
    """The CABS paper's networks (Balles et al. 2017, section 5), for 2-D images.

    - ``"mnist-paper"``: two 5x5 convolutions with 32 and 64 channels, each followed by
      2x2 max-pooling, a dense layer of 1024 and the output layer.
    - ``"cifar10-paper"``: a 24x24 crop of each image (random in training, central in
      evaluation), two 5x5 convolutions of 64 channels, each followed by 3x3 max-pooling with
      stride 2 (padded by 1, so 24 -> 12 -> 6), dense layers of 384 and 192 and the output
      layer. The paper's other input distortions (flips, brightness, contrast) are left out.
    """
    if len(input_shape) != 3:
        raise ValueError(
            f"`model`={name!r} needs images of shape (channels, height, width), got input_shape={input_shape}. "
            "Use it with --dataset mnist, fashion-mnist or cifar10."
        )
    channels, height, width = input_shape
    if name == "mnist-paper":
        convs = [Conv(2, channels, 32, 5, pool=2), Conv(2, 32, 64, 5, pool=2)]
        flat = 64 * (height // 4) * (width // 4)
        dense = [Dense(flat, 1024, relu=True), Dense(1024, num_classes, relu=False)]
        return Architecture(name, input_shape, num_classes, (*convs, *dense))
    crop = 24
    if min(height, width) < crop:
        raise ValueError(
            f"`model`='cifar10-paper' crops {crop}x{crop} images, got input_shape={input_shape}. "
            "Use it with --dataset cifar10 (32x32 images)."
        )
    convs = [
        Conv(2, channels, 64, 5, pool=3, pool_stride=2, pool_padding=1),
        Conv(2, 64, 64, 5, pool=3, pool_stride=2, pool_padding=1),
    ]
    side = crop
    for _ in convs:
        side = (side + 2 - 3) // 2 + 1
    dense = [
        Dense(64 * side * side, 384, relu=True),
        Dense(384, 192, relu=True),
        Dense(192, num_classes, relu=False),
    ]
    return Architecture(name, input_shape, num_classes, (*convs, *dense), crop=crop)


def check_backend(model: Architecture, backend: str) -> None:
    """Raise ValueError when ``backend``'s task cannot build ``model``."""
    if model.name in _TORCH_ONLY and backend != "torch":
        raise ValueError(
            f"`model`={model.name!r} (cropped inputs, overlapping pooling) runs on the torch backend only, "
            f"got backend={backend!r}. Use --backend torch."
        )


def crop_batch(images: np.ndarray, size: int, generator: np.random.Generator | None) -> np.ndarray:
    """Square ``size`` x ``size`` crops of a batch of images ``(n, channels, height, width)``.

    Args:
        images: the batch.
        size: the side of the crop.
        generator: draws one random crop position per image (training); None takes the
            center crop of every image (evaluation).

    Returns:
        The crops, shape ``(n, channels, size, size)``, a new array.
    """
    count, _, height, width = images.shape
    if generator is None:
        top = np.full(count, (height - size) // 2)
        left = np.full(count, (width - size) // 2)
    else:
        top = generator.integers(0, height - size + 1, count)
        left = generator.integers(0, width - size + 1, count)
    rows = top[:, None] + np.arange(size)  # (n, size)
    columns = left[:, None] + np.arange(size)
    examples = np.arange(count)[:, None, None, None]
    channels = np.arange(images.shape[1])[None, :, None, None]
    return np.ascontiguousarray(images[examples, channels, rows[:, None, :, None], columns[:, None, None, :]])


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
