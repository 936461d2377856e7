"""TensorFlow adapter: per-example gradient statistics for Keras 3 models and ``tf.Module``\\ s.

``grad_stats(model, loss_fn, inputs, targets)`` returns the batch's
:class:`cabs.GradStats` and the mean gradients, aligned with
``model.trainable_variables`` and ready for ``optimizer.apply_gradients``.

How the per-example gradients are computed, and why:

* One compiled ``tf.function`` per ``(model, loss_fn)`` and per input structure,
  with a ``None`` batch dimension, so a new batch size never retraces
  (:attr:`StatsFunction.trace_count` shows it).
* Inside it, ``tf.vectorized_map(..., fallback_to_while_loop=False)`` runs one
  ``GradientTape`` per example, vectorised by pfor. An op pfor cannot vectorise
  is an error, never a silent per-example loop.
* pfor's own rule for a convolution's filter gradient is a per-example
  while-loop. For Keras ``Conv2D`` layers the adapter therefore stops the
  gradient at the kernel and forms each example's kernel gradient from the
  layer's input patches and output gradient (``g_i = patches(a_i)^T d_i``,
  DESIGN.md section 6), which is exact and loop-free. Any other op whose pfor rule
  would loop (other convolution kinds written without ``Conv2D``) is detected while
  tracing and reported as an error naming it.

The mean gradient is formed from the per-example ones, so it is exactly the
gradient of the mean loss.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

from cabs._stats import GradStats

__all__ = ["BatchSums", "StatsFunction", "array_types", "devices", "grad_stats", "name", "stats_function"]

name = "tensorflow"

# Keras layers whose training-mode behaviour couples examples (batch statistics)
# or draws randomness that pfor would share across examples.
_UNSUPPORTED_LAYERS = {
    "BatchNormalization": "it normalises with statistics of the whole batch, so one example's "
    "gradient depends on the others. Replace it with LayerNormalization or GroupNormalization",
    "Dropout": "its random mask would be drawn once and shared by every example of the vectorised "
    "per-example pass. Remove it while training with CABS",
    "SpatialDropout1D": "its random mask would be shared by every example. Remove it",
    "SpatialDropout2D": "its random mask would be shared by every example. Remove it",
    "SpatialDropout3D": "its random mask would be shared by every example. Remove it",
    "GaussianDropout": "its random noise would be shared by every example. Remove it",
    "GaussianNoise": "its random noise would be shared by every example. Remove it",
    "AlphaDropout": "its random mask would be shared by every example. Remove it",
}

# pfor logs this when one of its conversion rules falls back to a while-loop.
_WHILE_LOOP_MESSAGE = "uses a while_loop"


def _tf() -> Any:
    return sys.modules["tensorflow"]


def array_types() -> tuple[type, ...]:
    """The tensor types this backend handles; empty when TensorFlow is not imported."""
    tf = sys.modules.get("tensorflow")
    if tf is None:
        return ()
    return (tf.Tensor, tf.Variable)


def devices() -> list[str]:
    """Names of TensorFlow's logical devices, e.g. ``['/device:CPU:0']``."""
    return [device.name for device in _tf().config.list_logical_devices()]


class BatchSums(NamedTuple):
    """Additive sums over the examples of one (micro-)batch.

    Micro-batches and replicas combine by adding every field; only then are
    :class:`cabs.GradStats` and the mean gradients formed (:meth:`StatsFunction.finish`).

    Attributes:
        count: number of examples (0-d, accumulation dtype).
        loss_sum: ``sum_i l_i``.
        sq_norm_sum: ``sum_i ||g_i||^2``.
        grad_sums: ``sum_i g_i`` per trainable variable, in the accumulation dtype.
    """

    count: Any
    loss_sum: Any
    sq_norm_sum: Any
    grad_sums: list[Any]


class _ConvUse(NamedTuple):
    layer: Any
    inputs: Any
    outputs: Any


def _keras_layers(model: Any) -> list[Any]:
    """Every Keras layer inside ``model`` (itself included), found without importing Keras."""
    keras = sys.modules.get("keras")
    if keras is None:
        return []
    if isinstance(model, keras.Layer):
        return list(model._flatten_layers(include_self=True, recursive=True))
    found: list[Any] = []
    tf = _tf()
    if isinstance(model, tf.Module):
        for layer in model._flatten(predicate=lambda value: isinstance(value, keras.Layer)):
            found.extend(layer._flatten_layers(include_self=True, recursive=True))
    return found


def _check_layers(layers: list[Any]) -> None:
    for layer in layers:
        for kind in type(layer).__mro__:
            reason = _UNSUPPORTED_LAYERS.get(kind.__name__)
            if reason is not None and kind.__module__.startswith("keras"):
                raise ValueError(
                    f"the model contains the layer {layer.name!r} ({type(layer).__name__}), which the "
                    f"TensorFlow adapter cannot give exact per-example gradients for: {reason}."
                )


def _is_patch_conv(layer: Any) -> bool:
    """A Keras Conv2D whose kernel gradient the patches identity gives exactly."""
    keras = sys.modules["keras"]
    return isinstance(layer, keras.layers.Conv2D) and getattr(layer, "groups", 1) == 1


@contextlib.contextmanager
def _intercept_convs(layers: list[Any], uses: list[_ConvUse], tape: Any) -> Iterator[None]:
    """Record each Conv2D call's input and output, with the kernel cut from the tape.

    Cutting the kernel keeps pfor's looping filter-gradient rule out of the graph;
    the kernel's per-example gradient is rebuilt from the recorded tensors. The
    output is watched so that the tape gives the gradient with respect to it.
    """
    tf = _tf()
    for layer in layers:
        original = layer.convolution_op

        def convolution_op(inputs: Any, kernel: Any, layer: Any = layer, original: Any = original) -> Any:
            outputs = original(inputs, tf.stop_gradient(kernel))
            tape.watch(outputs)
            uses.append(_ConvUse(layer, inputs, outputs))
            return outputs

        # object.__setattr__ bypasses Keras attribute tracking; the override lives only while tracing.
        object.__setattr__(layer, "convolution_op", convolution_op)
    try:
        yield
    finally:
        for layer in layers:
            object.__delattr__(layer, "convolution_op")


def _conv_kernel_gradients(layer: Any, inputs: Any, output_gradients: Any, dtype: Any) -> Any:
    """Per-example Conv2D kernel gradients ``[m, kh, kw, c_in, c_out]`` from patches."""
    tf = _tf()
    if layer.data_format == "channels_first":
        inputs = tf.transpose(inputs, [0, 2, 3, 1])
        output_gradients = tf.transpose(output_gradients, [0, 2, 3, 1])
    kernel_height, kernel_width, in_channels, out_channels = layer.kernel.shape
    patches = tf.image.extract_patches(
        tf.cast(inputs, dtype),
        sizes=[1, kernel_height, kernel_width, 1],
        strides=[1, *layer.strides, 1],
        rates=[1, *layer.dilation_rate, 1],
        padding=layer.padding.upper(),
    )
    gradients = tf.einsum("nhwk,nhwc->nkc", patches, tf.cast(output_gradients, dtype))
    return tf.reshape(gradients, [-1, kernel_height, kernel_width, in_channels, out_channels])


def _accumulation_dtype(variables: list[Any]) -> Any:
    tf = _tf()
    return tf.float64 if any(variable.dtype == tf.float64 for variable in variables) else tf.float32


def _expand(structure: Any) -> Any:
    tf = _tf()
    return tf.nest.map_structure(lambda tensor: tensor[None], structure)


def _spec(tensor: Any) -> Any:
    tf = _tf()
    tensor = tf.convert_to_tensor(tensor)
    if tensor.shape.rank == 0:
        raise ValueError(
            f"`inputs` and `targets` must have a leading batch dimension, got a 0-d tensor of dtype "
            f"{tensor.dtype.name}. Stack the examples along axis 0."
        )
    return tf.TensorSpec([None, *tensor.shape[1:]], tensor.dtype)


class _WhileLoopWatch(logging.Handler):
    """Collects pfor's messages that a conversion rule fell back to a while-loop."""

    def __init__(self) -> None:
        super().__init__(level=logging.WARNING)
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        message = record.getMessage()
        if _WHILE_LOOP_MESSAGE in message:
            self.messages.append(message)


class StatsFunction:
    """The compiled statistics function of one ``(model, loss_fn)`` pair.

    Get it with :func:`stats_function`; :func:`grad_stats` calls it. One
    ``tf.function`` is traced per input structure (shapes after the batch
    dimension and dtypes); the batch dimension is ``None``, so changing batch
    sizes never retrace.

    Attributes:
        loss_fn: the per-example loss ``loss_fn(targets, outputs) -> [m]``.
    """

    def __init__(self, model: Any, loss_fn: Callable[[Any, Any], Any]) -> None:
        self._model = weakref.ref(model)
        self.loss_fn = loss_fn
        self._functions: dict[Any, Any] = {}
        keras = sys.modules.get("keras")
        self._is_keras = keras is not None and isinstance(model, keras.Layer)

    @property
    def model(self) -> Any:
        model = self._model()
        if model is None:
            raise ReferenceError("the model of this StatsFunction no longer exists.")
        return model

    @property
    def trace_count(self) -> int:
        """How many times the statistics were traced, over all input structures."""
        return sum(function.experimental_get_tracing_count() for function in self._functions.values())

    def __call__(self, inputs: Any, targets: Any) -> tuple[GradStats, list[Any]]:
        """Statistics and mean gradients of one batch; see :func:`grad_stats`."""
        return self.finish(self.batch_sums(inputs, targets))

    def batch_sums(self, inputs: Any, targets: Any) -> BatchSums:
        """The additive sums of one batch (combine micro-batches or replicas by adding)."""
        tf = _tf()
        inputs = tf.nest.map_structure(tf.convert_to_tensor, inputs)
        targets = tf.nest.map_structure(tf.convert_to_tensor, targets)
        self._check_batch(inputs, targets)
        model = self.model
        self._build(model, inputs)
        variables = model.trainable_variables
        if not variables:
            raise ValueError(
                f"`model` must have trainable variables, got {type(model).__name__} with none. "
                f"Build the model (call it once on a batch) and check that its layers are trainable."
            )
        specs = (tf.nest.map_structure(_spec, inputs), tf.nest.map_structure(_spec, targets))
        key = (repr(specs), tuple(id(variable) for variable in variables))
        function = self._functions.get(key)
        if function is None:
            function = self._trace(specs, key)
        return function(inputs, targets)

    def finish(self, sums: BatchSums) -> tuple[GradStats, list[Any]]:
        """Form :class:`cabs.GradStats` and the mean gradients from (combined) sums."""
        tf = _tf()
        mean_gradients = [gradient_sum / sums.count for gradient_sum in sums.grad_sums]
        grad_sq_norm = tf.add_n([tf.reduce_sum(tf.square(gradient)) for gradient in mean_gradients])
        stats = GradStats(
            count=sums.count, loss=sums.loss_sum / sums.count, grad_sq_norm=grad_sq_norm, sq_norm_sum=sums.sq_norm_sum
        )
        variables = self.model.trainable_variables
        gradients = [
            tf.cast(gradient, variable.dtype) for gradient, variable in zip(mean_gradients, variables, strict=True)
        ]
        return stats, gradients

    def _check_batch(self, inputs: Any, targets: Any) -> None:
        tf = _tf()
        # Inside a caller's tf.function the batch size may be unknown (None); only known sizes are compared.
        sizes = {tensor.shape[0] for tensor in tf.nest.flatten((inputs, targets)) if tensor.shape.rank} - {None}
        if len(sizes) > 1:
            raise ValueError(
                f"`inputs` and `targets` must hold the same number of examples along axis 0, got "
                f"batch sizes {sorted(sizes)}."
            )
        if sizes == {0}:
            raise ValueError("`inputs` must hold at least one example, got batch size 0.")

    def _build(self, model: Any, inputs: Any) -> None:
        """Create a lazily built model's variables eagerly, outside the traced function."""
        if self._is_keras and not model.built:
            model(_tf().nest.map_structure(lambda tensor: tensor[:1], inputs), training=False)

    def _trace(self, specs: Any, key: Any) -> Any:
        tf = _tf()
        layers = _keras_layers(self.model)
        _check_layers(layers)
        function = tf.function(self._sums, input_signature=specs, autograph=False)
        watch = _WhileLoopWatch()
        logger = logging.getLogger("tensorflow")
        logger.addHandler(watch)
        try:
            function.get_concrete_function()
        except ValueError as error:
            if "pfor" not in str(error).lower() and "vectoriz" not in str(error).lower():
                raise
            raise ValueError(
                f"an op of the model cannot be vectorised across examples ({error}). The TensorFlow "
                f"adapter never falls back to a per-example loop; replace the layer that uses this op."
            ) from error
        finally:
            logger.removeHandler(watch)
        if watch.messages:
            convs = [layer.name for layer in layers if "Conv" in type(layer).__name__ and not _is_patch_conv(layer)]
            raise ValueError(
                f"per-example gradients of this model would need a per-example loop: {watch.messages[0]}. "
                f"Conv2D layers (groups=1) are supported exactly; other convolution layers are not yet"
                f"{' (found: ' + ', '.join(convs) + ')' if convs else ''}. Use Conv2D."
            )
        self._functions[key] = function
        return function

    def _sums(self, inputs: Any, targets: Any) -> BatchSums:
        tf = _tf()
        model = self.model
        variables = model.trainable_variables
        dtype = _accumulation_dtype(variables)
        convs = [layer for layer in _keras_layers(model) if _is_patch_conv(layer)]
        conv_layers: list[Any] = []

        def one_example(example: tuple[Any, Any]) -> tuple[Any, list[Any], list[Any], list[Any]]:
            example_inputs, example_targets = example
            uses: list[_ConvUse] = []
            with tf.GradientTape() as tape, _intercept_convs(convs, uses, tape):
                outputs = (
                    model(_expand(example_inputs), training=True) if self._is_keras else model(_expand(example_inputs))
                )
                losses = self._per_example_losses(_expand(example_targets), outputs)
                loss = tf.reduce_sum(losses)
            conv_layers[:] = [use.layer for use in uses]
            sources = [*variables, *(use.outputs for use in uses)]
            gradients = tape.gradient(loss, sources)
            # A source the loss does not reach (a kernel seen only through Conv2D) gets zeros.
            gradients = [
                tf.zeros(source.shape, source.dtype) if gradient is None else tf.convert_to_tensor(gradient)
                for gradient, source in zip(gradients, sources, strict=True)
            ]
            count = len(variables)
            conv_gradients = [gradient[0] for gradient in gradients[count:]]
            return loss, gradients[:count], [use.inputs[0] for use in uses], conv_gradients

        losses, gradients, conv_inputs, conv_output_gradients = tf.vectorized_map(
            one_example, (inputs, targets), fallback_to_while_loop=False
        )
        gradients = [tf.cast(gradient, dtype) for gradient in gradients]
        positions = {id(variable): index for index, variable in enumerate(variables)}
        for layer, layer_inputs, output_gradients in zip(conv_layers, conv_inputs, conv_output_gradients, strict=True):
            index = positions.get(id(layer.kernel))
            if index is None:  # a frozen kernel: its gradient is not wanted
                continue
            gradients[index] += _conv_kernel_gradients(layer, layer_inputs, output_gradients, dtype)
        count = tf.cast(tf.shape(losses)[0], dtype)
        sq_norm_sum = tf.add_n([tf.reduce_sum(tf.square(gradient)) for gradient in gradients])
        return BatchSums(
            count=count,
            loss_sum=tf.reduce_sum(tf.cast(losses, dtype)),
            sq_norm_sum=sq_norm_sum,
            grad_sums=[tf.reduce_sum(gradient, axis=0) for gradient in gradients],
        )

    def _per_example_losses(self, targets: Any, outputs: Any) -> Any:
        losses = self.loss_fn(targets, outputs)
        shape = getattr(losses, "shape", None)
        if shape is None or shape.rank != 1:
            raise ValueError(
                f"`loss_fn(targets, outputs)` must return one loss per example (shape [batch]), got shape "
                f"{None if shape is None else list(shape)} for a batch of 1. Use a per-example loss, e.g. "
                f"keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None), or "
                f"reduce only over the non-batch axes."
            )
        return losses


_cache: weakref.WeakKeyDictionary[Any, dict[Any, StatsFunction]] = weakref.WeakKeyDictionary()


def stats_function(model: Any, loss_fn: Callable[[Any, Any], Any]) -> StatsFunction:
    """The cached :class:`StatsFunction` of ``(model, loss_fn)``, created on first use."""
    tf = _tf()
    if not isinstance(model, tf.Module) and not _keras_layers(model):
        raise TypeError(
            f"`model` must be a Keras model/layer or a tf.Module, got model={type(model).__name__}. "
            f"Wrap your function in a tf.Module that owns its variables."
        )
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable as loss_fn(targets, outputs), got loss_fn={loss_fn!r}.")
    functions = _cache.setdefault(model, {})
    function = functions.get(loss_fn)
    if function is None:
        function = functions[loss_fn] = StatsFunction(model, loss_fn)
    return function


def grad_stats(
    model: Any, loss_fn: Callable[[Any, Any], Any], inputs: Any, targets: Any
) -> tuple[GradStats, list[Any]]:
    """Per-example gradient statistics and the mean gradients of one batch.

    Args:
        model: a Keras 3 model or layer (called with ``training=True``) or a
            ``tf.Module`` (called as ``model(inputs)``). Its
            ``trainable_variables`` are the parameters.
        loss_fn: ``loss_fn(targets, outputs)`` in the Keras order
            ``(y_true, y_pred)``, returning one loss per example (shape
            ``[batch]``), e.g. ``keras.losses.SparseCategoricalCrossentropy(
            from_logits=True, reduction=None)``.
        inputs: a tensor or nest of tensors with the batch on axis 0.
        targets: a tensor or nest of tensors with the batch on axis 0.

    Returns:
        ``(stats, gradients)``: :class:`cabs.GradStats` of 0-d tensors in float32
        (float64 when a variable is float64), and the mean gradients, one per
        variable of ``model.trainable_variables`` in their dtypes, ready for
        ``optimizer.apply_gradients(zip(gradients, model.trainable_variables))``.

    Raises:
        ValueError: for a loss that is not per-example, a layer that couples
            examples or draws random masks (BatchNormalization, Dropout), or an
            op that would need a per-example loop.

    Example:
        >>> import keras
        >>> import numpy as np
        >>> from cabs.backends import tensorflow as cabs_tf
        >>> model = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
        >>> loss_fn = keras.losses.MeanSquaredError(reduction=None)
        >>> stats, gradients = cabs_tf.grad_stats(model, loss_fn, np.ones((4, 3), "float32"), np.zeros((4, 2), "float32"))
        >>> int(stats.count), len(gradients)
        (4, 2)
    """
    return stats_function(model, loss_fn)(inputs, targets)
