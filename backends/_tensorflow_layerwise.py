"""Exact per-example squared gradient norms of Keras layers from one batched backward pass.

One tape over the whole batch records, for each supported layer call, the layer's input
``a`` and its output ``z`` (watched), and reads the layer's variables through watched
aliases cut from the variables (``tf.stop_gradient``). ``tape.gradient`` of the *summed*
loss then gives:

* the output gradients ``d_i`` (example i's own loss only reaches its own rows, because
  layers that mix examples are refused by the adapter);
* the summed gradient of each use, through its alias;
* the gradient of every *other* use of the variable, through the variable itself. It is
  ``None`` exactly when the layer call is the variable's only use, which is known while
  tracing. A variable with another use (tied) takes the exact per-example path.

The identities of DESIGN.md section 6 turn ``(a_i, d_i)`` into ``||g_i||^2``:

* ``Dense``: ``||a_i||^2 ||d_i||^2`` on ``[batch, features]``; over a time axis either the
  Gram form ``sum_{t,s} (a_it . a_is)(d_it . d_is)`` or the explicit ``||A_i^T D_i||^2``,
  whichever costs fewer multiplications for the layer's static shapes.
* ``Conv1D`` / ``Conv2D`` (``groups=1``, any stride, padding incl. causal, dilation): the same
  with ``A_i`` the input patches and ``t`` the output positions.
* ``Embedding``: rows of ``D_i`` that share a token id add before squaring (a segment sum
  keyed by example and id, so the cost is linear in the sequence length).
* ``LayerNormalization`` / ``GroupNormalization``: the per-example gradients of the
  element-wise scale and shift are formed directly from the normalised input.

Every rule assumes that axis 0 of the layer's input indexes the examples. The adapter
(``backends/tensorflow.py``) sends a call whose leading size is static, while the traced
batch is not, to the exact path (a time-major or fixed reshape), and checks every other
call's leading size against the example count at run time, raising rather than returning a
wrong number (``tf.reshape(x, [2 * b, f])``). A layout that keeps the leading size equal to
the example count but moves examples off axis 0 cannot be detected from shapes.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

__all__ = ["LAYERWISE", "METHODS", "VMAP", "LayerUse", "intercept_layers", "has_rule", "sq_norms"]

METHODS = ("auto", "layerwise", "vmap")
LAYERWISE = "layerwise"
VMAP = "vmap"


def _tf() -> Any:
    return sys.modules["tensorflow"]


class LayerUse(NamedTuple):
    """One call of a supported layer inside the batched pass.

    Attributes:
        layer: the Keras layer.
        norms: ``norms(use, output_gradients, dtype) -> {role: [m] squared norms}``.
        inputs: what ``norms`` needs from the forward (activations, ids, normalised input).
        outputs: the watched output tensor; its gradient is ``d``.
        aliases: ``{role: (variable, watched alias)}`` for the variables the call read.
    """

    layer: Any
    norms: Callable[[Any, Any, Any], dict[str, Any]]
    inputs: Any
    outputs: Any
    aliases: dict[str, tuple[Any, Any]]


def _alias(variable: Any, tape: Any, aliases: dict[str, tuple[Any, Any]], role: str) -> Any:
    """The variable's value, cut from the variable and watched, so this use's gradient is separate."""
    tf = _tf()
    alias = tf.stop_gradient(tf.convert_to_tensor(variable))
    tape.watch(alias)
    aliases[role] = (variable, alias)
    return alias


def _outer_product_sq_norms(activations: Any, output_gradients: Any) -> Any:
    """``||A_i^T D_i||^2`` for ``A`` [m, t, p] and ``D`` [m, t, q], by the cheaper form for the static shapes."""
    tf = _tf()
    steps, inputs_size = activations.shape[1], activations.shape[2]
    outputs_size = output_gradients.shape[2]
    if steps == 1:
        return tf.reduce_sum(tf.square(activations), [1, 2]) * tf.reduce_sum(tf.square(output_gradients), [1, 2])
    if steps is not None and steps * steps * (inputs_size + outputs_size) < steps * inputs_size * outputs_size:
        activation_gram = tf.matmul(activations, activations, transpose_b=True)
        output_gram = tf.matmul(output_gradients, output_gradients, transpose_b=True)
        return tf.reduce_sum(activation_gram * output_gram, [1, 2])
    return tf.reduce_sum(tf.square(tf.matmul(activations, output_gradients, transpose_a=True)), [1, 2])


def _bias_sq_norms(output_gradients: Any) -> Any:
    """``||sum_t d_it||^2`` for ``D`` [m, t, q]: the bias is added at every position."""
    tf = _tf()
    return tf.reduce_sum(tf.square(tf.reduce_sum(output_gradients, 1)), 1)


def _as_steps(tensor: Any, dtype: Any) -> Any:
    """``[m, ..., features] -> [m, t, features]`` in the accumulation dtype.

    ``t`` is static when the middle sizes are; a middle size unknown while tracing (a
    variable-length axis) leaves ``t`` unknown, and the explicit form is used for it.
    """
    tf = _tf()
    middle = tensor.shape[1:-1]
    if all(size is not None for size in middle):
        steps = 1
        for size in middle:
            steps *= size
        return tf.reshape(tf.cast(tensor, dtype), [-1, steps, tensor.shape[-1]])
    return tf.reshape(tf.cast(tensor, dtype), [tf.shape(tensor)[0], -1, tensor.shape[-1]])


# Dense


def _dense_forward(layer: Any, inputs: Any, tape: Any, uses: list[LayerUse]) -> Any:
    tf = _tf()
    aliases: dict[str, tuple[Any, Any]] = {}
    kernel = _alias(layer.kernel, tape, aliases, "kernel")
    outputs = tf.tensordot(inputs, kernel, [[inputs.shape.rank - 1], [0]])
    if layer.bias is not None:
        outputs = outputs + _alias(layer.bias, tape, aliases, "bias")
    tape.watch(outputs)
    uses.append(LayerUse(layer, _dense_norms, inputs, outputs, aliases))
    return outputs if layer.activation is None else layer.activation(outputs)


def _dense_norms(use: LayerUse, output_gradients: Any, dtype: Any) -> dict[str, Any]:
    activations = _as_steps(use.inputs, dtype)
    gradients = _as_steps(output_gradients, dtype)
    return {"kernel": _outer_product_sq_norms(activations, gradients), "bias": _bias_sq_norms(gradients)}


# Conv1D / Conv2D


def _conv_forward(layer: Any, inputs: Any, tape: Any, uses: list[LayerUse]) -> Any:
    tf = _tf()
    keras = sys.modules["keras"]
    aliases: dict[str, tuple[Any, Any]] = {}
    padding = layer.padding
    if padding == "causal":
        # Keras pads the time axis on the left by the receptive field, then convolves without padding.
        left = layer.dilation_rate[0] * (layer.kernel_size[0] - 1)
        time_axis = 1 if layer.data_format == "channels_last" else 2
        pads = [[0, 0], [0, 0], [0, 0]]
        pads[time_axis] = [left, 0]
        inputs = tf.pad(inputs, pads)
        padding = "valid"
    kernel = _alias(layer.kernel, tape, aliases, "kernel")
    outputs = keras.ops.conv(
        inputs,
        kernel,
        strides=list(layer.strides),
        padding=padding,
        dilation_rate=layer.dilation_rate,
        data_format=layer.data_format,
    )
    if layer.use_bias:
        bias = _alias(layer.bias, tape, aliases, "bias")
        if layer.data_format == "channels_last":
            shape = (1,) * (layer.rank + 1) + (layer.filters,)
        else:
            shape = (1, layer.filters) + (1,) * layer.rank
        outputs = outputs + tf.reshape(bias, shape)
    tape.watch(outputs)
    uses.append(LayerUse(layer, _conv_norms, (inputs, padding), outputs, aliases))
    return outputs if layer.activation is None else layer.activation(outputs)


def conv_patches(layer: Any, inputs: Any, padding: str, dtype: Any) -> Any:
    """The unfolded input patches ``[m, positions, kernel elements]`` of a channels-last 1-D/2-D convolution."""
    tf = _tf()
    if layer.rank == 1:
        inputs = inputs[:, None]  # [m, 1, length, channels]: a 2-D convolution over a height of 1
        sizes, strides, rates = (1, *layer.kernel_size), (1, *layer.strides), (1, *layer.dilation_rate)
    else:
        sizes, strides, rates = layer.kernel_size, layer.strides, layer.dilation_rate
    inputs = tf.cast(inputs, dtype)
    if inputs.shape[1] is None or inputs.shape[2] is None:
        patches = tf.image.extract_patches(
            inputs, sizes=[1, *sizes, 1], strides=[1, *strides, 1], rates=[1, *rates, 1], padding=padding.upper()
        )
        return tf.reshape(patches, [-1, patches.shape[1] * patches.shape[2], patches.shape[3]])
    return _sliced_patches(inputs, sizes, strides, rates, padding)


def _sliced_patches(inputs: Any, sizes: Any, strides: Any, rates: Any, padding: str) -> Any:
    """``tf.image.extract_patches`` as one strided slice of the padded input per kernel position.

    The same values in the same order (kernel row, kernel column, channel), but several times
    faster on CPU: for the paper's MNIST network extract_patches took most of the statistics' time.
    """
    tf = _tf()
    spatial = inputs.shape[1:3]
    extents = [(size - 1) * rate + 1 for size, rate in zip(sizes, rates, strict=True)]
    if padding.lower() == "same":
        outputs = [-(-length // stride) for length, stride in zip(spatial, strides, strict=True)]
        totals = [
            max((count - 1) * stride + extent - length, 0)
            for count, stride, extent, length in zip(outputs, strides, extents, spatial, strict=True)
        ]
        inputs = tf.pad(inputs, [[0, 0], *([total // 2, total - total // 2] for total in totals), [0, 0]])
    else:
        outputs = [
            -(-(length - extent + 1) // stride)
            for length, extent, stride in zip(spatial, extents, strides, strict=True)
        ]
    slices = []
    for row in range(sizes[0]):
        for column in range(sizes[1]):
            top, left = row * rates[0], column * rates[1]
            bottom = top + (outputs[0] - 1) * strides[0] + 1
            right = left + (outputs[1] - 1) * strides[1] + 1
            slices.append(inputs[:, top : bottom : strides[0], left : right : strides[1], :])
    stacked = tf.stack(slices, axis=3)  # [m, out rows, out columns, kernel positions, channels]
    return tf.reshape(stacked, [-1, outputs[0] * outputs[1], len(slices) * inputs.shape[3]])


def _channels_last(layer: Any, tensor: Any) -> Any:
    tf = _tf()
    if layer.data_format != "channels_first":
        return tensor
    rank = tensor.shape.rank
    return tf.transpose(tensor, [0, *range(2, rank), 1])


def _conv_norms(use: LayerUse, output_gradients: Any, dtype: Any) -> dict[str, Any]:
    inputs, padding = use.inputs
    patches = conv_patches(use.layer, _channels_last(use.layer, inputs), padding, dtype)
    gradients = _as_steps(_channels_last(use.layer, output_gradients), dtype)
    return {"kernel": _outer_product_sq_norms(patches, gradients), "bias": _bias_sq_norms(gradients)}


# Embedding


def _embedding_forward(layer: Any, inputs: Any, tape: Any, uses: list[LayerUse]) -> Any:
    tf = _tf()
    aliases: dict[str, tuple[Any, Any]] = {}
    if inputs.dtype not in (tf.int32, tf.int64):
        inputs = tf.cast(inputs, tf.int32)
    outputs = tf.gather(_alias(layer.embeddings, tape, aliases, "embeddings"), inputs)
    outputs = tf.cast(outputs, layer.compute_dtype)
    tape.watch(outputs)
    uses.append(LayerUse(layer, _embedding_norms, inputs, outputs, aliases))
    return outputs


def _embedding_norms(use: LayerUse, output_gradients: Any, dtype: Any) -> dict[str, Any]:
    """Rows of ``D_i`` with equal ids add (one segment per example and id), then square."""
    tf = _tf()
    ids = tf.cast(tf.reshape(use.inputs, [tf.shape(use.inputs)[0], -1]), tf.int64)
    count, steps = tf.shape(ids, out_type=tf.int64)[0], tf.shape(ids, out_type=tf.int64)[1]
    examples = tf.repeat(tf.range(count), steps)
    keys = examples * use.layer.input_dim + tf.reshape(ids, [-1])
    unique_keys, segments = tf.unique(keys)
    rows = tf.reshape(tf.cast(output_gradients, dtype), [-1, output_gradients.shape[-1]])
    summed = tf.math.unsorted_segment_sum(rows, segments, tf.shape(unique_keys)[0])
    per_key = tf.reduce_sum(tf.square(summed), 1)
    return {"embeddings": tf.math.unsorted_segment_sum(per_key, unique_keys // use.layer.input_dim, count)}


# LayerNormalization / GroupNormalization


def _affine_forward(layer: Any, normalized: Any, axes: list[int], tape: Any, uses: list[LayerUse]) -> Any:
    """``normalized * scale + shift`` with the parameters broadcast along ``axes``."""
    tf = _tf()
    aliases: dict[str, tuple[Any, Any]] = {}
    rank = normalized.shape.rank
    shape = [normalized.shape[axis] if axis in axes else 1 for axis in range(rank)]
    outputs = normalized
    if getattr(layer, "gamma", None) is not None:
        outputs = outputs * tf.reshape(_alias(layer.gamma, tape, aliases, "gamma"), shape)
    if getattr(layer, "beta", None) is not None:
        outputs = outputs + tf.reshape(_alias(layer.beta, tape, aliases, "beta"), shape)
    outputs = tf.cast(outputs, layer.compute_dtype)
    tape.watch(outputs)
    uses.append(LayerUse(layer, _affine_norms, (normalized, axes), outputs, aliases))
    return outputs


def _affine_norms(use: LayerUse, output_gradients: Any, dtype: Any) -> dict[str, Any]:
    tf = _tf()
    normalized, axes = use.inputs
    other = [axis for axis in range(1, normalized.shape.rank) if axis not in axes]
    gradients = tf.cast(output_gradients, dtype)
    scale = tf.reduce_sum(tf.cast(normalized, dtype) * gradients, other)
    shift = tf.reduce_sum(gradients, other)
    flat = list(range(1, normalized.shape.rank - len(other)))
    return {"gamma": tf.reduce_sum(tf.square(scale), flat), "beta": tf.reduce_sum(tf.square(shift), flat)}


def _layer_norm_forward(layer: Any, inputs: Any, tape: Any, uses: list[LayerUse]) -> Any:
    tf = _tf()
    rank = inputs.shape.rank
    axes = sorted(axis % rank for axis in layer.axis)
    # Keras normalises in at least float32 and casts back.
    work = tf.cast(inputs, tf.float64 if inputs.dtype == tf.float64 else tf.float32)
    mean, variance = tf.nn.moments(work, axes, keepdims=True)
    normalized = (work - mean) * tf.math.rsqrt(variance + layer.epsilon)
    return _affine_forward(layer, normalized, axes, tape, uses)


def _group_norm_forward(layer: Any, inputs: Any, tape: Any, uses: list[LayerUse]) -> Any:
    tf = _tf()
    rank = inputs.shape.rank
    axis = layer.axis % rank
    channels = inputs.shape[axis]
    work = tf.cast(inputs, tf.float64 if inputs.dtype == tf.float64 else tf.float32)
    group_shape = [-1, *inputs.shape[1:axis], layer.groups, channels // layer.groups, *inputs.shape[axis + 1 :]]
    grouped = tf.reshape(work, group_shape)
    reduce_axes = [index for index in range(1, rank + 1) if index != axis]
    mean, variance = tf.nn.moments(grouped, reduce_axes, keepdims=True)
    normalized = tf.reshape((grouped - mean) * tf.math.rsqrt(variance + layer.epsilon), tf.shape(inputs))
    normalized.set_shape(inputs.shape)
    return _affine_forward(layer, normalized, [axis], tape, uses)


def _forward_rule(layer: Any) -> Callable[..., Any] | None:
    """The replacement forward of a layer with a norm rule, or None.

    A rule applies only to the Keras class's own ``call`` and, for convolutions,
    ``convolution_op`` (a subclass that overrides one, or one patched onto the instance,
    computes something else) and not to LoRA or quantised variants.
    """
    keras = sys.modules.get("keras")
    if keras is None or not isinstance(layer, keras.Layer):
        return None
    if "call" in vars(layer):
        return None
    if getattr(layer, "lora_enabled", False) or getattr(layer, "quantization_mode", None):
        return None
    layers = keras.layers
    candidates = [
        (layers.Dense, _dense_forward),
        (layers.Conv1D, _conv_forward),
        (layers.Conv2D, _conv_forward),
        (layers.Embedding, _embedding_forward),
        (layers.LayerNormalization, _layer_norm_forward),
        (layers.GroupNormalization, _group_norm_forward),
    ]
    for kind, forward in candidates:
        if isinstance(layer, kind) and type(layer).call is kind.call:
            if kind in (layers.Conv1D, layers.Conv2D) and layer.groups != 1:
                return None
            # The rule convolves itself; a replaced convolution_op (instance or subclass) would be skipped.
            if hasattr(kind, "convolution_op") and (
                "convolution_op" in vars(layer) or type(layer).convolution_op is not kind.convolution_op
            ):
                return None
            if kind is layers.LayerNormalization and layer.rms_scaling:
                return None
            return forward
    return None


def has_rule(layer: Any) -> bool:
    """Whether the layer's variables can take the layer-wise path (when not tied)."""
    return _forward_rule(layer) is not None


@contextlib.contextmanager
def intercept_layers(layers: list[Any], tape: Any, uses: list[LayerUse]) -> Iterator[None]:
    """Replace each supported layer's ``call`` while tracing, recording a :class:`LayerUse` per call."""
    replaced = []
    for layer in layers:
        forward = _forward_rule(layer)
        if forward is None or "call" in vars(layer):  # never shadow, then delete, a call the user set
            continue

        def call(inputs: Any, *args: Any, layer: Any = layer, forward: Any = forward, **kwargs: Any) -> Any:
            return forward(layer, inputs, tape, uses)

        # object.__setattr__ bypasses Keras attribute tracking; the override lives only while tracing.
        object.__setattr__(layer, "call", call)
        replaced.append(layer)
    try:
        yield
    finally:
        for layer in replaced:
            object.__delattr__(layer, "call")


def sq_norms(use: LayerUse, output_gradients: Any, dtype: Any) -> dict[str, Any]:
    """Per-example squared norms ``[m]`` of the variables this use read, keyed by role."""
    norms = use.norms(use, output_gradients, dtype)
    return {role: norms[role] for role in use.aliases}
