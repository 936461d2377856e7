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
import re
import sys
import weakref
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from cabs._agreement import check_agreement
from cabs._stats import GradStats
from cabs.backends._tensorflow_layerwise import LAYERWISE, METHODS, VMAP, LayerUse, intercept_layers, sq_norms
from cabs.data import shard_bounds

__all__ = [
    "METHODS",
    "BatchSums",
    "StatsFunction",
    "add_batch_sums",
    "agree_batch_size",
    "array_types",
    "devices",
    "grad_stats",
    "name",
    "split_across_replicas",
    "stats_function",
]

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

# The run-time check that a layer-wise call's axis 0 indexes the examples fails with this text.
_LEADING_SIZE_PATTERN = re.compile(r"the layer-wise rule of layer \S* got a leading size of \d+ for \d+ examples")


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
    """A Keras Conv2D whose kernel gradient the patches identity gives exactly.

    A ``convolution_op`` replaced on the instance or a subclass may compute something other
    than the convolution the identity assumes; such a layer keeps pfor's own rule.
    """
    keras = sys.modules["keras"]
    conv2d = keras.layers.Conv2D
    return (
        isinstance(layer, conv2d)
        and getattr(layer, "groups", 1) == 1
        and "convolution_op" not in vars(layer)
        and type(layer).convolution_op is conv2d.convolution_op
    )


@contextlib.contextmanager
def _intercept_convs(layers: list[Any], uses: list[_ConvUse], tape: Any) -> Iterator[None]:
    """Record each Conv2D call's input and output, with the kernel cut from the tape.

    Cutting the kernel keeps pfor's looping filter-gradient rule out of the graph;
    the kernel's per-example gradient is rebuilt from the recorded tensors. The
    output is watched so that the tape gives the gradient with respect to it.
    """
    tf = _tf()
    user_set = {id(layer): vars(layer)["convolution_op"] for layer in layers if "convolution_op" in vars(layer)}
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
            if id(layer) in user_set:  # put back an attribute the user set on the instance, never delete it
                object.__setattr__(layer, "convolution_op", user_set[id(layer)])
            else:
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
    """The compiled statistics function of one ``(model, loss_fn, method)``.

    Get it with :func:`stats_function`; :func:`grad_stats` calls it. One
    ``tf.function`` is traced per input structure (shapes after the batch
    dimension and dtypes) and kind of pass (with or without statistics); the batch
    dimension is ``None``, so changing batch sizes, micro-batches and uneven replica
    shares never retrace.

    Attributes:
        loss_fn: the per-example loss ``loss_fn(targets, outputs) -> [m]``.
        method: ``"auto"``, ``"layerwise"`` or ``"vmap"`` (see :func:`grad_stats`).
    """

    def __init__(self, model: Any, loss_fn: Callable[[Any, Any], Any], method: str = "auto") -> None:
        self._model = weakref.ref(model)
        self.loss_fn = loss_fn
        self.method = method
        self._functions: dict[Any, Any] = {}
        self._plans: dict[Any, dict[str, str]] = {}
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

    def __call__(
        self, inputs: Any, targets: Any, *, max_examples_per_pass: int | None = None
    ) -> tuple[GradStats, list[Any]]:
        """Statistics and mean gradients of one batch; see :func:`grad_stats`."""
        self._check_not_empty(inputs)
        return self.finish(self.batch_sums(inputs, targets, max_examples_per_pass=max_examples_per_pass))

    def gradients(
        self, inputs: Any, targets: Any, *, max_examples_per_pass: int | None = None
    ) -> tuple[Any, list[Any]]:
        """A plain step without statistics: ``(mean loss, mean gradients)``.

        One ordinary batched forward and backward, for the steps of a ``stats_every=k``
        loop on which the controller is not stepped (docs/tensorflow.md).
        """
        self._check_not_empty(inputs)
        sums = self.batch_sums(inputs, targets, max_examples_per_pass=max_examples_per_pass, compute_stats=False)
        stats, gradients = self.finish(sums)
        return stats.loss, gradients

    def plan(self, inputs: Any, targets: Any) -> dict[str, str]:
        """The path each trainable variable takes for inputs of this structure.

        Traces the function if needed (no computation runs).

        Returns:
            ``{variable path: "layerwise" | "vmap"}``; ``"vmap"`` marks the exact
            vectorised per-example path (a layer without a rule, or a variable used more
            than once).
        """
        function, key = self._function(*self._prepare(inputs, targets), compute_stats=True)
        return dict(self._plans[key])

    def batch_sums(
        self,
        inputs: Any,
        targets: Any,
        *,
        max_examples_per_pass: int | None = None,
        compute_stats: bool = True,
    ) -> BatchSums:
        """The additive sums of one batch (combine micro-batches or replicas by adding).

        Args:
            inputs: a tensor or nest of tensors, batch on axis 0 (may be empty).
            targets: a tensor or nest of tensors, batch on axis 0.
            max_examples_per_pass: split the batch into passes of at most this many
                examples whose sums are added: the result is that of the whole batch,
                while memory is that of one pass. Needs a known batch size.
            compute_stats: False skips the per-example norms (one plain backward);
                ``sq_norm_sum`` is then NaN.
        """
        inputs, targets = self._prepare(inputs, targets)
        if max_examples_per_pass is None:
            function, _ = self._function(inputs, targets, compute_stats=compute_stats)
            return self._run(function, inputs, targets)
        count = _known_batch_size(inputs, targets, max_examples_per_pass)
        function, _ = self._function(inputs, targets, compute_stats=compute_stats)
        total = None
        for start in range(0, max(count, 1), max_examples_per_pass):
            sums = self._run(function, *_slice((inputs, targets), start, start + max_examples_per_pass))
            total = sums if total is None else add_batch_sums(total, sums)
        return total

    def distributed_batch_sums(
        self, strategy: Any, inputs: Any, targets: Any, *, compute_stats: bool = True
    ) -> BatchSums:
        """The sums of a global batch spread over a ``tf.distribute`` strategy's replicas.

        Each replica forms the sums of its own share (possibly empty); ``strategy.reduce``
        adds them. Call it in cross-replica context, preferably inside a ``tf.function``.

        Args:
            strategy: e.g. ``tf.distribute.MirroredStrategy()`` whose scope created the model.
            inputs: per-replica values, e.g. from :func:`split_across_replicas`.
            targets: per-replica values.
            compute_stats: as in :meth:`batch_sums`.

        Returns:
            :class:`BatchSums` of the global batch, ready for :meth:`finish`.
        """
        tf = _tf()

        def replica_sums(replica_inputs: Any, replica_targets: Any) -> BatchSums:
            return self.batch_sums(replica_inputs, replica_targets, compute_stats=compute_stats)

        per_replica = strategy.run(replica_sums, args=(inputs, targets))
        total = tf.distribute.ReduceOp.SUM
        return tf.nest.map_structure(lambda value: strategy.reduce(total, value, axis=None), per_replica)

    def _run(self, function: Any, inputs: Any, targets: Any) -> BatchSums:
        """Call the compiled function; a failed leading-size check becomes a ValueError that says what to do."""
        tf = _tf()
        try:
            return function(inputs, targets)
        except tf.errors.InvalidArgumentError as error:
            found = _LEADING_SIZE_PATTERN.search(error.message)
            if found is None:
                raise
            raise ValueError(
                f"`method` must be 'vmap' for this model, got method={self.method!r}: {found.group(0)}, but the "
                f"rule assumes that axis 0 of the layer's input indexes the examples (the model reshapes the batch, "
                f"e.g. tf.reshape(x, [2 * b, f]), or runs the layer time-major). Use method='vmap', or call the "
                f"layer on a batch-first tensor."
            ) from error

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

    def _prepare(self, inputs: Any, targets: Any) -> tuple[Any, Any]:
        tf = _tf()
        inputs = tf.nest.map_structure(tf.convert_to_tensor, inputs)
        targets = tf.nest.map_structure(tf.convert_to_tensor, targets)
        self._check_batch(inputs, targets)
        self._build(self.model, inputs)
        return inputs, targets

    def _function(self, inputs: Any, targets: Any, *, compute_stats: bool) -> tuple[Any, Any]:
        tf = _tf()
        variables = self.model.trainable_variables
        if not variables:
            raise ValueError(
                f"`model` must have trainable variables, got {type(self.model).__name__} with none. "
                f"Build the model (call it once on a batch) and check that its layers are trainable."
            )
        specs = (tf.nest.map_structure(_spec, inputs), tf.nest.map_structure(_spec, targets))
        key = (repr(specs), tuple(id(variable) for variable in variables), compute_stats)
        function = self._functions.get(key)
        if function is None:
            function = self._trace(specs, key, compute_stats)
        return function, key

    def _check_batch(self, inputs: Any, targets: Any) -> None:
        tf = _tf()
        # Inside a caller's tf.function the batch size may be unknown (None); only known sizes are compared.
        sizes = {tensor.shape[0] for tensor in tf.nest.flatten((inputs, targets)) if tensor.shape.rank} - {None}
        if len(sizes) > 1:
            raise ValueError(
                f"`inputs` and `targets` must hold the same number of examples along axis 0, got "
                f"batch sizes {sorted(sizes)}."
            )

    def _check_not_empty(self, inputs: Any) -> None:
        tf = _tf()
        sizes = {getattr(tensor, "shape", (None,))[0] for tensor in tf.nest.flatten(inputs)}
        if 0 in sizes:
            raise ValueError(
                "`inputs` must hold at least one example, got batch size 0. An empty share is fine for "
                "batch_sums (e.g. one replica's), but statistics need the sums of a non-empty batch."
            )

    def _build(self, model: Any, inputs: Any) -> None:
        """Create a lazily built model's variables eagerly, outside the traced function."""
        if self._is_keras and not model.built:
            model(_tf().nest.map_structure(lambda tensor: tensor[:1], inputs), training=False)

    def _trace(self, specs: Any, key: Any, compute_stats: bool) -> Any:
        tf = _tf()
        layers = _keras_layers(self.model)
        _check_layers(layers)

        def sums(inputs: Any, targets: Any) -> BatchSums:
            if not compute_stats:
                return self._plain_sums(inputs, targets)
            return self._statistics_sums(inputs, targets, key)

        function = tf.function(sums, input_signature=specs, autograph=False)
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
                f"Conv1D and Conv2D layers (groups=1) are supported exactly; other convolution layers only "
                f"where they take the layer-wise path (not tied){' (found: ' + ', '.join(convs) + ')' if convs else ''}."
            )
        self._functions[key] = function
        return function

    def _forward(self, model: Any, inputs: Any, targets: Any) -> Any:
        """Per-example losses ``[m]`` of a batch (or of one example expanded to a batch of 1)."""
        outputs = model(inputs, training=True) if self._is_keras else model(inputs)
        return self._per_example_losses(targets, outputs)

    def _plain_sums(self, inputs: Any, targets: Any) -> BatchSums:
        """One ordinary batched backward: gradient sums and loss sum, no per-example norms."""
        tf = _tf()
        model = self.model
        variables = model.trainable_variables
        dtype = _accumulation_dtype(variables)
        with tf.GradientTape() as tape:
            losses = self._forward(model, inputs, targets)
            loss = tf.reduce_sum(losses)
        gradients = _dense_gradients(tape.gradient(loss, variables), variables, dtype)
        return BatchSums(
            count=tf.cast(tf.shape(losses)[0], dtype),
            loss_sum=tf.reduce_sum(tf.cast(losses, dtype)),
            sq_norm_sum=tf.constant(float("nan"), dtype),
            grad_sums=gradients,
        )

    def _statistics_sums(self, inputs: Any, targets: Any, key: Any) -> BatchSums:
        tf = _tf()
        model = self.model
        variables = model.trainable_variables
        dtype = _accumulation_dtype(variables)
        if self.method == VMAP:
            self._plans[key] = {_variable_name(variable): VMAP for variable in variables}
            return self._vmap_sums(inputs, targets, variables, variables, dtype)
        uses: list[LayerUse] = []
        with tf.GradientTape() as tape, intercept_layers(_keras_layers(model), tape, uses):
            losses = self._forward(model, inputs, targets)
            loss = tf.reduce_sum(losses)
        aliases = [(use, role, variable, alias) for use in uses for role, (variable, alias) in use.aliases.items()]
        sources = [*variables, *(alias for *_, alias in aliases), *(use.outputs for use in uses)]
        gradients = tape.gradient(loss, sources)
        other_uses = gradients[: len(variables)]
        alias_gradients = gradients[len(variables) : len(variables) + len(aliases)]
        output_gradients = dict(zip(map(id, uses), gradients[len(variables) + len(aliases) :], strict=True))

        alias_count: dict[int, int] = {}
        sums: dict[int, Any] = {}
        for (_, _, variable, _), gradient in zip(aliases, alias_gradients, strict=True):
            alias_count[id(variable)] = alias_count.get(id(variable), 0) + 1
            if gradient is not None:
                sums[id(variable)] = sums.get(id(variable), 0) + tf.cast(tf.convert_to_tensor(gradient), dtype)
        # A call whose leading size is static while the traced batch size is not (time-major, a fixed
        # reshape) cannot have the examples on axis 0: its variables take the exact path.
        off_batch = {id(variable) for use in uses if _static_leading_size(use) for variable, _ in use.aliases.values()}
        # Layer-wise: read only through one recorded layer call (or not at all, which contributes zero).
        layerwise = {
            id(variable)
            for variable, other in zip(variables, other_uses, strict=True)
            if other is None and alias_count.get(id(variable), 0) <= 1 and id(variable) not in off_batch
        }
        exact = [variable for variable in variables if id(variable) not in layerwise]
        self._plans[key] = {
            _variable_name(variable): LAYERWISE if id(variable) in layerwise else VMAP for variable in variables
        }
        if exact and self.method == LAYERWISE:
            raise ValueError(
                f"`method` must be 'auto' or 'vmap' for this model, got method='layerwise', but these variables "
                f"have no layer-wise rule or are used more than once: "
                f"{', '.join(_variable_name(variable) for variable in exact)}. Use method='auto'."
            )
        grad_sums = []
        for variable, other in zip(variables, other_uses, strict=True):
            total = sums.get(id(variable), tf.zeros(variable.shape, dtype))
            grad_sums.append(total if other is None else total + tf.cast(tf.convert_to_tensor(other), dtype))
        norm_terms = [tf.zeros([], dtype)]
        leading_size_checks = []
        for use in uses:
            if not any(id(variable) in layerwise for variable, _ in use.aliases.values()):
                continue
            leading_size_checks.append(_leading_size_check(use, tf.shape(losses)[0]))
            norms = sq_norms(use, output_gradients[id(use)], dtype)
            norm_terms += [
                tf.reduce_sum(norms[role]) for role, (variable, _) in use.aliases.items() if id(variable) in layerwise
            ]
        if exact:
            norm_terms.append(self._vmap_sums(inputs, targets, variables, exact, dtype).sq_norm_sum)
        with tf.control_dependencies(leading_size_checks):
            sq_norm_sum = tf.identity(tf.add_n(norm_terms))
        return BatchSums(
            count=tf.cast(tf.shape(losses)[0], dtype),
            loss_sum=tf.reduce_sum(tf.cast(losses, dtype)),
            sq_norm_sum=sq_norm_sum,
            grad_sums=grad_sums,
        )

    def _vmap_sums(self, inputs: Any, targets: Any, variables: list[Any], selected: list[Any], dtype: Any) -> BatchSums:
        """Sums from per-example gradients of the ``selected`` variables (one tape per example, vectorised)."""
        tf = _tf()
        model = self.model
        convs = [layer for layer in _keras_layers(model) if _is_patch_conv(layer)]
        conv_layers: list[Any] = []

        def one_example(example: tuple[Any, Any]) -> tuple[Any, list[Any], list[Any], list[Any]]:
            example_inputs, example_targets = example
            uses: list[_ConvUse] = []
            with tf.GradientTape() as tape, _intercept_convs(convs, uses, tape):
                losses = self._forward(model, _expand(example_inputs), _expand(example_targets))
                loss = tf.reduce_sum(losses)
            conv_layers[:] = [use.layer for use in uses]
            sources = [*selected, *(use.outputs for use in uses)]
            gradients = _dense_gradients(tape.gradient(loss, sources), sources, None)
            count = len(selected)
            conv_gradients = [gradient[0] for gradient in gradients[count:]]
            return loss, gradients[:count], [use.inputs[0] for use in uses], conv_gradients

        losses, gradients, conv_inputs, conv_output_gradients = tf.vectorized_map(
            one_example, (inputs, targets), fallback_to_while_loop=False
        )
        gradients = [tf.cast(gradient, dtype) for gradient in gradients]
        positions = {id(variable): index for index, variable in enumerate(selected)}
        for layer, layer_inputs, output_gradients in zip(conv_layers, conv_inputs, conv_output_gradients, strict=True):
            index = positions.get(id(layer.kernel))
            if index is None:  # a frozen kernel or one on the layer-wise path: its per-example gradient is not wanted
                continue
            gradients[index] += _conv_kernel_gradients(layer, layer_inputs, output_gradients, dtype)
        sq_norm_sum = tf.add_n([tf.reduce_sum(tf.square(gradient)) for gradient in gradients])
        return BatchSums(
            count=tf.cast(tf.shape(losses)[0], dtype),
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
                f"{None if shape is None else list(shape)}. Use a per-example loss, e.g. "
                f"keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None), or "
                f"reduce only over the non-batch axes."
            )
        return losses


def _static_leading_size(use: LayerUse) -> bool:
    """Whether the call's leading size is known while tracing (the traced batch size never is)."""
    shape = use.outputs.shape
    return shape.rank == 0 or shape[0] is not None


def _leading_size_check(use: LayerUse, count: Any) -> Any:
    """An op that fails at run time when the call's leading size is not the number of examples.

    A reshape such as ``tf.reshape(x, [2 * b, f])`` leaves the leading size unknown while
    tracing, like the batch's, so only the run can tell; the rule would silently be wrong.
    """
    tf = _tf()
    leading = tf.shape(use.outputs)[0]
    layer_name = re.sub(r"[^\w./-]", "_", use.layer.name)  # no braces or spaces in the formatted message
    message = tf.strings.format(
        f"the layer-wise rule of layer {layer_name} got a leading size of {{}} for {{}} examples", (leading, count)
    )
    return tf.debugging.Assert(tf.equal(leading, count), [message])


def _dense_gradients(gradients: list[Any], sources: list[Any], dtype: Any) -> list[Any]:
    """Gradients as dense tensors (in ``dtype`` unless None); a source the loss does not reach gets zeros."""
    tf = _tf()
    dense = []
    for gradient, source in zip(gradients, sources, strict=True):
        value = tf.zeros(source.shape, source.dtype) if gradient is None else tf.convert_to_tensor(gradient)
        dense.append(value if dtype is None else tf.cast(value, dtype))
    return dense


def _slice(structure: Any, start: int, stop: int) -> Any:
    return _tf().nest.map_structure(lambda tensor: tensor[start:stop], structure)


def _variable_name(variable: Any) -> str:
    return getattr(variable, "path", None) or variable.name


def _known_batch_size(inputs: Any, targets: Any, max_examples_per_pass: int) -> int:
    tf = _tf()
    if (
        isinstance(max_examples_per_pass, bool)
        or not isinstance(max_examples_per_pass, int)
        or max_examples_per_pass < 1
    ):
        raise ValueError(
            f"`max_examples_per_pass` must be a positive int or None, got max_examples_per_pass="
            f"{max_examples_per_pass!r}. Pass e.g. 256, or None for one pass."
        )
    sizes = {tensor.shape[0] for tensor in tf.nest.flatten((inputs, targets))}
    if None in sizes:
        raise ValueError(
            "`max_examples_per_pass` needs a batch of known size, got a batch whose size is unknown while "
            "tracing. Call it eagerly, or give your tf.function an input_signature with a fixed batch size."
        )
    return sizes.pop()


def add_batch_sums(first: BatchSums, second: BatchSums) -> BatchSums:
    """Field-wise sum of the sums of two disjoint (micro-)batches."""
    return BatchSums(
        count=first.count + second.count,
        loss_sum=first.loss_sum + second.loss_sum,
        sq_norm_sum=first.sq_norm_sum + second.sq_norm_sum,
        grad_sums=[a + b for a, b in zip(first.grad_sums, second.grad_sums, strict=True)],
    )


def split_across_replicas(strategy: Any, batch: Any) -> Any:
    """Give each replica of ``strategy`` its contiguous share of a global batch.

    The shares are those of :func:`cabs.data.shard_bounds` (in replica order, sizes
    differing by at most one), so they match :class:`cabs.data.DistributedBatchSampler`.

    Args:
        strategy: a ``tf.distribute`` strategy, e.g. ``MirroredStrategy``.
        batch: a tensor, array or nest of them, global batch on axis 0. Shares may be
            empty when the batch is smaller than the replica count.

    Returns:
        Per-replica values for :meth:`StatsFunction.distributed_batch_sums`.
    """
    tf = _tf()
    batch = tf.nest.map_structure(tf.convert_to_tensor, batch)
    size = tf.nest.flatten(batch)[0].shape[0]
    replicas = strategy.num_replicas_in_sync

    def share(context: Any) -> Any:
        start, stop = shard_bounds(size, context.replica_id_in_sync_group, replicas)
        return tf.nest.map_structure(lambda tensor: tf.identity(tensor[start:stop]), batch)

    return strategy.experimental_distribute_values_from_function(share)


def agree_batch_size(
    batch_size: int, *, strategy: Any = None, gather: Callable[[np.ndarray], Any] | None = None
) -> int:
    """Check that every worker computed the same batch size; a debugging aid for multi-worker runs.

    Each worker of a ``MultiWorkerMirroredStrategy`` job runs its own controller; they
    agree when they are fed the same reduced statistics and start from the same state.
    Every worker calls this with its controller's next batch size: each replica
    contributes its worker's value, ``strategy.gather`` collects them (a few bytes), and
    every worker raises together on a mismatch. Under ``MirroredStrategy`` (one process,
    one controller) all replicas hold the same value and the check passes.

    Args:
        batch_size: this worker's next (global) batch size.
        strategy: the ``tf.distribute`` strategy; ``None`` is the current one.
        gather: replaces the all-gather (for tests): takes this worker's value as a
            ``(1,)`` int array and returns every replica's values, in replica order.

    Returns:
        ``batch_size``, the same on every worker.

    Raises:
        RuntimeError: the replicas disagree; the message names replica 0's value and
            every differing one.
    """
    own = int(batch_size)
    if gather is None:
        tf = _tf()
        strategy = tf.distribute.get_strategy() if strategy is None else strategy

        def gather(value: np.ndarray) -> Any:
            per_replica = strategy.run(lambda: tf.constant(value))
            return strategy.gather(per_replica, axis=0).numpy()

    values = np.asarray(gather(np.asarray([own], dtype=np.int64))).reshape(-1)
    return check_agreement(
        values,
        own,
        unit="replica",
        this=f"this worker has {own}",
        remedy="Feed every controller the statistics of distributed_batch_sums, and start or restore every "
        "controller from the same state.",
    )


_cache: weakref.WeakKeyDictionary[Any, dict[Any, StatsFunction]] = weakref.WeakKeyDictionary()


def stats_function(model: Any, loss_fn: Callable[[Any, Any], Any], *, method: str = "auto") -> StatsFunction:
    """The cached :class:`StatsFunction` of ``(model, loss_fn, method)``, created on first use."""
    tf = _tf()
    if not isinstance(model, tf.Module) and not _keras_layers(model):
        raise TypeError(
            f"`model` must be a Keras model/layer or a tf.Module, got model={type(model).__name__}. "
            f"Wrap your function in a tf.Module that owns its variables."
        )
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable as loss_fn(targets, outputs), got loss_fn={loss_fn!r}.")
    if method not in METHODS:
        raise ValueError(f"`method` must be one of {METHODS}, got method={method!r}. Use 'auto' unless debugging.")
    functions = _cache.setdefault(model, {})
    function = functions.get((loss_fn, method))
    if function is None:
        function = functions[(loss_fn, method)] = StatsFunction(model, loss_fn, method)
    return function


def grad_stats(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    inputs: Any,
    targets: Any,
    *,
    method: str = "auto",
    max_examples_per_pass: int | None = None,
    loss_scale: Any = None,
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
        method: ``"auto"`` (default) gives each variable the layer-wise path where its
            layer has a rule and the variable is used once, and the exact vectorised
            per-example path (``"vmap"``) otherwise; ``"layerwise"`` makes a variable
            without a rule an error; ``"vmap"`` forms every per-example gradient.
            :meth:`StatsFunction.plan` reports the choice per variable.
        max_examples_per_pass: split the batch into passes of at most this many
            examples and add their sums; the result is that of the whole batch.
        loss_scale: mixed precision. A number s, or a Keras ``LossScaleOptimizer``
            (its current ``dynamic_scale``, read inside the traced function, so a
            changing scale does not retrace): the per-example losses are multiplied by
            s before differentiating, so small float16 gradients do not underflow, and
            the statistics are unscaled (the loss and mean gradient divided by s, the
            squared norms by s^2). With a number the returned gradients are unscaled.
            With a LossScaleOptimizer they stay scaled, as from ``scale_loss``: pass them
            to that optimizer's ``apply_gradients``, which unscales them and skips a step
            whose gradients are not finite; such a step's statistics are not finite
            either, so the controller skips it too.

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
    if loss_scale is not None:
        return _scaled_grad_stats(model, loss_fn, inputs, targets, loss_scale, method, max_examples_per_pass)
    return stats_function(model, loss_fn, method=method)(inputs, targets, max_examples_per_pass=max_examples_per_pass)


# Per loss function, its scaled versions by scale source, so the cached StatsFunction is reused.
_scaled_losses: weakref.WeakKeyDictionary[Any, dict[Any, Callable[[Any, Any], Any]]] = weakref.WeakKeyDictionary()


def _scaled_grad_stats(
    model: Any,
    loss_fn: Callable[[Any, Any], Any],
    inputs: Any,
    targets: Any,
    loss_scale: Any,
    method: str,
    max_examples_per_pass: int | None,
) -> tuple[GradStats, list[Any]]:
    """:func:`grad_stats` of the losses times s, with the statistics (and, for a number, the gradients) unscaled."""
    tf = _tf()
    is_optimizer = hasattr(loss_scale, "scale_loss") and hasattr(loss_scale, "inner_optimizer")
    if is_optimizer:
        if not loss_scale.built:  # dynamic_scale is created when the optimizer is built
            loss_scale.build(model.trainable_variables)
        source = loss_scale.dynamic_scale
    elif isinstance(loss_scale, (int, float)) and not isinstance(loss_scale, bool) and 0 < loss_scale < float("inf"):
        source = float(loss_scale)
    else:
        raise ValueError(
            f"`loss_scale` must be a finite number > 0 or a keras.optimizers.LossScaleOptimizer, got "
            f"loss_scale={loss_scale!r}. Pass the factor the loss is multiplied by, or the optimizer itself."
        )
    variants = _scaled_losses.setdefault(loss_fn, {})
    key = id(source) if is_optimizer else source
    if key not in variants:

        def scaled_loss(target: Any, outputs: Any) -> Any:
            losses = loss_fn(target, outputs)
            if losses.dtype in (tf.float16, tf.bfloat16):
                losses = tf.cast(losses, tf.float32)  # float16 overflows at 65504, below the usual scales
            return losses * tf.cast(tf.convert_to_tensor(source), losses.dtype)

        variants[key] = scaled_loss
    function = stats_function(model, variants[key], method=method)
    stats, gradients = function(inputs, targets, max_examples_per_pass=max_examples_per_pass)
    scale = tf.cast(tf.convert_to_tensor(source), stats.loss.dtype)
    if not is_optimizer:
        gradients = [gradient / tf.cast(scale, gradient.dtype) for gradient in gradients]
    unscaled = GradStats(
        count=stats.count,
        loss=stats.loss / scale,
        grad_sq_norm=stats.grad_sq_norm / scale**2,
        sq_norm_sum=stats.sq_norm_sum / scale**2,
    )
    return unscaled, gradients
