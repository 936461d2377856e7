"""JAX adapter: gradient moment statistics of a per-example loss, with shape-stable batches.

The user writes the loss of ONE example, ``loss_fn(params, example)``; this module
evaluates it on a whole batch with ``jax.vmap(jax.value_and_grad(loss_fn))`` under
``jax.jit`` and turns the per-example losses and gradients into
:class:`cabs.GradStats` plus the mean gradient (a pytree like ``params``).

Every new batch size is a new static shape for XLA, and CABS changes the batch
size at almost every step. To keep compilation bounded, a batch is padded up to a
*bucket* size and the padding is masked out, so a whole training run compiles at
most once per bucket while the statistics over the real examples stay exact.

Structure: the compiled function first forms *sums* over the real examples
(count, loss sum, gradient sum, sum of squared per-example norms; see
:class:`BatchSums`), and only then the statistics (:func:`finish`). Sums add
across micro-batches and across devices:

- ``max_examples_per_pass`` splits each (padded) batch into equal chunks that a
  ``lax.scan`` evaluates one after another, adding their sums, so only one chunk's
  per-example gradients are held at a time;
- ``mesh`` shards the batch over the ``data`` axis of a :class:`jax.sharding.Mesh`
  (``shard_map``); each device forms the sums of its share and one ``lax.psum``
  adds them, so every device forms the same statistics of the global batch.

A faster per-example norm method replaces only :func:`batch_sums`: ``method="auto"``
(the default) computes the squared norms layer-wise, from each layer's inputs and
output gradients, for every parameter with a rule, and by ``vmap`` for the rest
(see ``backends/_jax_layerwise.py`` and :func:`explain`).

Example:
    >>> import jax.numpy as jnp
    >>> import numpy as np
    >>> from cabs.backends import jax as cabs_jax
    >>> def loss_fn(params, example):
    ...     return 0.5 * (jnp.dot(params["w"], example["x"]) - example["y"]) ** 2
    >>> params = {"w": jnp.zeros(3, dtype=jnp.float32)}
    >>> batch = {"x": np.ones((5, 3), np.float32), "y": np.arange(5, dtype=np.float32)}
    >>> stats, mean_grad = cabs_jax.grad_stats(loss_fn, params, batch)
    >>> int(stats.count), float(stats.loss)
    (5, 3.0)
"""

from __future__ import annotations

import math
import numbers
from collections import OrderedDict
from collections.abc import Callable, Sequence
from typing import Any, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from cabs._agreement import check_agreement
from cabs._stats import GradStats

__all__ = [
    "BatchSums",
    "accumulation_dtype",
    "agree_batch_size",
    "StatsFunction",
    "array_types",
    "batch_sums",
    "bucket_size",
    "data_mesh",
    "devices",
    "explain",
    "finish",
    "grad_stats",
    "pad_batch",
]

name = "jax"

# Smallest bucket of the default power-of-two policy: CABS's default minimum batch size.
_SMALLEST_POWER_OF_TWO_BUCKET = 16
# How per-example squared norms are computed; see batch_sums.
METHODS = ("auto", "layerwise", "vmap")
# grad_stats() keeps this many compiled StatsFunctions (one per loss function and policy).
_CACHE_LIMIT = 16


def array_types() -> tuple[type, ...]:
    """The array types this backend handles."""
    return (jax.Array,)


def devices() -> list[str]:
    """The devices JAX uses, as strings (for example ``['TFRT_CPU_0']``)."""
    return [str(device) for device in jax.devices()]


# --- bucket policy -------------------------------------------------------------------------


def _check_positive_int(label: str, value: Any, hint: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < 1:
        raise ValueError(f"`{label}` must be a positive integer, got {label}={value!r}. {hint}")
    return int(value)


def _normalize_buckets(buckets: Any, max_batch_size: int | None) -> Any:
    """Check a bucket policy and return it as ``"pow2"``, ``"exact"``, an int quantum or a tuple."""
    hint = 'Use "pow2", "exact", a positive integer quantum, or a sorted tuple of positive sizes.'
    if isinstance(buckets, str):
        if buckets not in ("pow2", "exact"):
            raise ValueError(f"`buckets` must be a bucket policy, got buckets={buckets!r}. {hint}")
        return buckets
    if isinstance(buckets, numbers.Integral) and not isinstance(buckets, bool):
        return _check_positive_int("buckets", buckets, hint)
    if isinstance(buckets, Sequence):
        sizes = tuple(_check_positive_int("buckets", size, hint) for size in buckets)
        if not sizes or list(sizes) != sorted(set(sizes)):
            raise ValueError(
                f"`buckets` must be a non-empty, strictly increasing sequence of sizes, got buckets={buckets!r}. {hint}"
            )
        if max_batch_size is not None and sizes[-1] < max_batch_size:
            raise ValueError(
                f"`buckets` must reach max_batch_size={max_batch_size}, got largest bucket {sizes[-1]}. "
                f"Add {max_batch_size} to the sizes."
            )
        return sizes
    raise ValueError(f"`buckets` must be a bucket policy, got buckets={buckets!r}. {hint}")


def bucket_size(count: int, buckets: Any = "pow2", *, max_batch_size: int | None = None) -> int:
    """The padded size that a batch of ``count`` examples is evaluated at.

    Args:
        count: number of real examples (>= 1).
        buckets: ``"pow2"`` (powers of two from 16; with ``max_batch_size``, also
            exactly ``max_batch_size`` as the top bucket), ``"exact"`` (no padding,
            one compilation per distinct size), an integer quantum ``q`` (the next
            multiple of ``q``, capped at ``max_batch_size``), or a strictly
            increasing tuple of sizes (the smallest one >= ``count``).
        max_batch_size: largest batch the run will use (for CABS: the rule's
            ``max_batch_size``). Bounds the number of buckets.

    Returns:
        The bucket size, >= ``count``.

    Raises:
        ValueError: ``count`` exceeds ``max_batch_size`` or the largest bucket.

    Example:
        >>> bucket_size(17), bucket_size(17, 8), bucket_size(1000, max_batch_size=1000)
        (32, 24, 1000)
    """
    count = _check_positive_int("count", count, "A batch needs at least one example.")
    buckets = _normalize_buckets(buckets, max_batch_size)
    if max_batch_size is not None and count > max_batch_size:
        raise ValueError(
            f"`count` must be <= max_batch_size={max_batch_size}, got count={count}. "
            f"Raise max_batch_size to the rule's max_batch_size."
        )
    if buckets == "exact":
        return count
    if buckets == "pow2":
        size = max(_SMALLEST_POWER_OF_TWO_BUCKET, 1 << (count - 1).bit_length())
    elif isinstance(buckets, int):
        size = buckets * math.ceil(count / buckets)
    else:
        larger = [size for size in buckets if size >= count]
        if not larger:
            raise ValueError(
                f"`count` must be <= the largest bucket {buckets[-1]}, got count={count}. Add a larger bucket size."
            )
        size = larger[0]
    return size if max_batch_size is None else min(size, max_batch_size)


# --- batch checks and padding ------------------------------------------------------------


def _leading_size(batch: Any) -> int:
    """The shared size of axis 0 of every leaf of ``batch`` (checked)."""
    leaves, _ = jax.tree_util.tree_flatten_with_path(batch)
    if not leaves:
        raise ValueError(
            "`batch` must hold at least one array, got an empty pytree. Pass e.g. {'x': inputs, 'y': targets}."
        )
    sizes = {}
    for path, leaf in leaves:
        shape = np.shape(leaf)
        if len(shape) == 0:
            raise ValueError(
                f"`batch` leaves must have the batch on axis 0, got a 0-d leaf at {jax.tree_util.keystr(path)}. "
                f"Give every leaf a leading batch axis (constants belong in params or a closure)."
            )
        sizes[jax.tree_util.keystr(path) or "<root>"] = shape[0]
    if len(set(sizes.values())) != 1:
        raise ValueError(
            f"`batch` leaves must share one leading (batch) size, got sizes {sizes}. "
            f"Slice every leaf with the same indices."
        )
    count = next(iter(sizes.values()))
    if count == 0:
        raise ValueError("`batch` must hold at least one example, got batch size 0. Skip empty batches before calling.")
    return count


def _pad_leaf(leaf: Any, size: int) -> Any:
    missing = size - leaf.shape[0]
    if missing == 0:
        return leaf
    if isinstance(leaf, jax.Array):
        # On-device padding compiles a small op per new input size; NumPy batches avoid that.
        filler = jnp.broadcast_to(leaf[-1:], (missing, *leaf.shape[1:]))
        return jnp.concatenate([leaf, filler])
    # Repeat the last example: padding stays a valid input (labels in range, no zeros to log).
    return np.concatenate([leaf, np.repeat(leaf[-1:], missing, axis=0)])


def pad_batch(batch: Any, size: int) -> tuple[Any, np.ndarray]:
    """Pad every leaf of ``batch`` along axis 0 to ``size`` examples.

    Padding repeats the last example, so it is a valid input for the loss; the
    returned mask is what keeps it out of every statistic. NumPy leaves are padded
    on the host (no compilation); ``jax.Array`` leaves on their device.

    Args:
        batch: pytree of arrays with the batch on axis 0.
        size: the padded size (>= the batch size).

    Returns:
        ``(padded_batch, mask)``, ``mask`` a NumPy bool vector of length ``size``
        that is True for the real examples.
    """
    count = _leading_size(batch)
    if isinstance(size, bool) or not isinstance(size, numbers.Integral) or size < count:
        raise ValueError(f"`size` must be an integer >= the batch size {count}, got size={size!r}.")
    leaves = [leaf if isinstance(leaf, jax.Array) else np.asarray(leaf) for leaf in jax.tree_util.tree_leaves(batch)]
    padded = [_pad_leaf(leaf, int(size)) for leaf in leaves]
    mask = np.arange(int(size)) < count
    return jax.tree_util.tree_unflatten(jax.tree_util.tree_structure(batch), padded), mask


# --- the computation: per-example sums, then statistics ------------------------------------


class BatchSums(NamedTuple):
    """Sums over the real examples of one batch; they add across chunks and devices.

    Attributes:
        count: number of real examples (int32).
        loss_sum: ``sum_i l_i``.
        grad_sum: ``sum_i g_i``, a pytree like ``params`` (accumulation dtype).
        sq_norm_sum: ``sum_i ||g_i||^2``.
    """

    count: Any
    loss_sum: Any
    grad_sum: Any
    sq_norm_sum: Any


def accumulation_dtype(params: Any) -> Any:
    """At least float32; float64 when any parameter is float64 (float16/bfloat16 -> float32)."""
    dtypes = [jnp.result_type(leaf) for leaf in jax.tree_util.tree_leaves(params)]
    return jnp.result_type(jnp.float32, *dtypes)


def _check_params(params: Any) -> None:
    leaves, _ = jax.tree_util.tree_flatten_with_path(params)
    if not leaves:
        raise ValueError(
            "`params` must hold at least one array, got an empty pytree. Pass the model's trainable parameters."
        )
    for path, leaf in leaves:
        if not jnp.issubdtype(jnp.result_type(leaf), jnp.floating):
            raise TypeError(
                f"`params` leaves must be floating arrays, got dtype {jnp.result_type(leaf)} at "
                f"{jax.tree_util.keystr(path)}. Pass only the trainable leaves (e.g. eqx.partition / "
                f"a Flax 'params' collection) and close over the rest in loss_fn."
            )


def _scalar_loss(loss_fn: Callable[[Any, Any], Any]) -> Callable[[Any, Any], Any]:
    """Wrap ``loss_fn`` with a trace-time check that it returns one scalar per example."""

    def checked(params: Any, example: Any) -> Any:
        loss = loss_fn(params, example)
        shape = jnp.shape(loss)
        if shape != ():
            raise ValueError(
                f"`loss_fn` must return the scalar loss of ONE example, got shape {shape}. loss_fn(params, example) "
                f"receives one example without the batch axis; reduce its output (e.g. jnp.sum or jnp.mean)."
            )
        if not jnp.issubdtype(jnp.result_type(loss), jnp.floating):
            raise TypeError(
                f"`loss_fn` must return a floating loss, got dtype {jnp.result_type(loss)}. Cast it to float."
            )
        return loss

    return checked


def _check_method(method: Any) -> str:
    if method not in METHODS:
        raise ValueError(
            f"`method` must be one of {METHODS}, got method={method!r}. "
            f'"auto" uses layer-wise norms where a rule applies and vmap for the other parameters.'
        )
    return method


def explain(loss_fn: Callable[[Any, Any], Any], params: Any, example: Any, method: str = "auto") -> dict[str, str]:
    """The method (``"layerwise"`` or ``"vmap"``) each parameter leaf takes, keyed by its pytree path.

    Args:
        loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example.
        params: pytree of floating arrays.
        example: one example (no batch axis), or ``jax.ShapeDtypeStruct`` leaves of its shapes.
        method: as for :class:`StatsFunction`.
    """
    from cabs.backends import _jax_layerwise  # imported late: it imports this module

    return _jax_layerwise.explain(loss_fn, params, example, _check_method(method))


def batch_sums(
    loss_fn: Callable[[Any, Any], Any], params: Any, batch: Any, mask: Any, *, method: str = "vmap"
) -> BatchSums:
    """Sums over the examples where ``mask`` is True, from exact per-example gradients.

    Pure and traceable: call it inside your own ``jax.jit``. Padded examples are
    removed with ``jnp.where`` (not multiplied by 0), so NaN or inf computed on
    padding cannot reach the sums.

    Args:
        loss_fn: ``loss_fn(params, example) -> scalar`` for one example.
        params: pytree of floating arrays.
        batch: pytree of arrays with the (padded) batch on axis 0.
        mask: bool vector, True for real examples.
        method: ``"vmap"`` (default here: ``jax.vmap(jax.value_and_grad(loss_fn))``),
            ``"auto"`` (layer-wise norms where a rule applies, vmap for the other
            leaves) or ``"layerwise"`` (a ``ValueError`` if a leaf has no rule).

    Returns:
        :class:`BatchSums` in the accumulation dtype (:func:`accumulation_dtype`).
    """
    if _check_method(method) != "vmap":
        from cabs.backends import _jax_layerwise  # imported late: it imports this module

        return _jax_layerwise.layerwise_batch_sums(loss_fn, params, batch, mask, method=method)
    dtype = accumulation_dtype(params)
    per_example = jax.vmap(jax.value_and_grad(_scalar_loss(loss_fn)), in_axes=(None, 0))
    losses, grads = per_example(params, batch)

    def keep(values: Any) -> Any:
        # Broadcast the mask over the trailing axes of this leaf.
        wide_mask = jnp.reshape(mask, mask.shape + (1,) * (values.ndim - 1))
        return jnp.where(wide_mask, values.astype(dtype), jnp.zeros((), dtype))

    losses = keep(losses)
    grads = jax.tree_util.tree_map(keep, grads)
    square_norms = sum(
        jnp.sum(jnp.reshape(leaf, (leaf.shape[0], -1)) ** 2, axis=1) for leaf in jax.tree_util.tree_leaves(grads)
    )
    return BatchSums(
        count=jnp.sum(mask, dtype=jnp.int32),
        loss_sum=jnp.sum(losses),
        grad_sum=jax.tree_util.tree_map(lambda leaf: jnp.sum(leaf, axis=0), grads),
        sq_norm_sum=jnp.sum(square_norms),
    )


def finish(sums: BatchSums, params: Any) -> tuple[GradStats, Any]:
    """Statistics and mean gradient from (already combined) sums; DESIGN.md section 2.

    Returns:
        ``(GradStats, mean_grad)``: statistics in the accumulation dtype,
        ``mean_grad`` a pytree like ``params`` in each parameter's own dtype (so an
        SGD step keeps the parameter dtypes and does not trigger recompilation).
    """
    count = sums.count.astype(sums.sq_norm_sum.dtype)
    mean = jax.tree_util.tree_map(lambda leaf: leaf / count, sums.grad_sum)
    grad_sq_norm = sum(jnp.sum(leaf**2) for leaf in jax.tree_util.tree_leaves(mean))
    stats = GradStats(
        count=sums.count, loss=sums.loss_sum / count, grad_sq_norm=grad_sq_norm, sq_norm_sum=sums.sq_norm_sum
    )
    mean_grad = jax.tree_util.tree_map(lambda leaf, param: leaf.astype(jnp.result_type(param)), mean, params)
    return stats, mean_grad


# --- micro-batches and devices: sums of chunks, sums of shards ------------------------------


def _padded_layout(size: int, shard_count: int, max_examples_per_pass: int | None) -> tuple[int, int]:
    """``(padded_size, chunk_size)`` for a batch of ``size`` rows on ``shard_count`` devices.

    Each device gets ``padded_size / shard_count`` rows, evaluated in equal chunks of
    ``chunk_size <= max_examples_per_pass`` rows. The chunks are balanced (as few as
    the limit allows, sizes as equal as possible) so the extra padding is less than
    one row per chunk. A pure function of ``size``: one bucket gives one layout, hence
    one compilation.
    """
    rows_per_shard = -(-size // shard_count)
    if max_examples_per_pass is None:
        return rows_per_shard * shard_count, rows_per_shard
    chunk_count = -(-rows_per_shard // max_examples_per_pass)
    chunk_size = -(-rows_per_shard // chunk_count)
    return chunk_size * chunk_count * shard_count, chunk_size


def _chunked_sums(
    loss_fn: Callable[[Any, Any], Any], params: Any, batch: Any, mask: Any, chunk_size: int, method: str = "vmap"
) -> BatchSums:
    """:func:`batch_sums` over consecutive chunks of ``chunk_size`` rows, added up in a ``lax.scan``.

    The scan body is traced once, so the per-example gradients of only one chunk
    exist at a time; the sums are accumulated in the accumulation dtype, in order.
    """
    chunk_count = mask.shape[0] // chunk_size
    if chunk_count == 1:
        return batch_sums(loss_fn, params, batch, mask, method=method)

    def split(leaf: Any) -> Any:
        return jnp.reshape(leaf, (chunk_count, chunk_size, *leaf.shape[1:]))

    chunks = jax.tree_util.tree_map(split, (batch, mask))

    def add_chunk(total: BatchSums, chunk: Any) -> tuple[BatchSums, None]:
        chunk_batch, chunk_mask = chunk
        sums = batch_sums(loss_fn, params, chunk_batch, chunk_mask, method=method)
        return jax.tree_util.tree_map(jnp.add, total, sums), None

    first = jax.tree_util.tree_map(lambda leaf: leaf[0], chunks)
    shapes = jax.eval_shape(lambda chunk: batch_sums(loss_fn, params, *chunk, method=method), first)
    zeros = jax.tree_util.tree_map(lambda shape: jnp.zeros(shape.shape, shape.dtype), shapes)
    total, _ = jax.lax.scan(add_chunk, zeros, chunks)
    return total


def _pad_rows(leaf: Any, size: int, fill: Any = None) -> Any:
    """Traceable padding of axis 0 to ``size`` rows: copies of the last row, or ``fill``."""
    missing = size - leaf.shape[0]
    if missing == 0:
        return leaf
    filler = jnp.broadcast_to(leaf[-1:] if fill is None else jnp.asarray(fill, leaf.dtype), (missing, *leaf.shape[1:]))
    return jnp.concatenate([leaf, filler])


def data_mesh(devices: Sequence[Any] | None = None, *, axis: str = "data") -> jax.sharding.Mesh:
    """A one-axis mesh over ``devices`` (default: every device of every process) for data parallelism.

    Example:
        >>> mesh = data_mesh()
        >>> mesh.axis_names
        ('data',)
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("`devices` must name at least one device, got an empty list. Pass e.g. jax.devices().")
    return jax.sharding.Mesh(np.asarray(devices), (axis,))


def agree_batch_size(batch_size: int, *, gather: Callable[[np.ndarray], Any] | None = None) -> int:
    """Check that every JAX process computed the same batch size; a debugging aid for multi-host runs.

    Each process of a ``jax.distributed`` job runs its own controller; they agree when
    they are fed the same (replicated) statistics and start from the same state. Every
    process calls this with its controller's next batch size: the values are gathered
    from all processes (``jax.experimental.multihost_utils.process_allgather``, a few
    bytes) and compared, and every process raises together on a mismatch. In a single
    process (one controller for all local devices) it gathers one value and passes.

    Args:
        batch_size: this process's next (global) batch size.
        gather: replaces the all-gather (for tests): takes this process's value as a
            ``(1,)`` int array and returns every process's values, in process order.

    Returns:
        ``batch_size``, the same on every process.

    Raises:
        RuntimeError: the processes disagree; the message names process 0's value and
            every differing one.
    """
    own = int(batch_size)
    if gather is None:
        from jax.experimental import multihost_utils  # only a multi-process check needs it

        gather = multihost_utils.process_allgather
    values = np.asarray(gather(np.asarray([own], dtype=np.int32))).reshape(-1)
    return check_agreement(
        values,
        own,
        unit="process",
        this=f"this is JAX process {jax.process_index()}, with {own}",
        remedy="Feed every controller the statistics of the sharded StatsFunction, and start or restore "
        "every controller from the same state.",
    )


def _check_mesh(mesh: Any, data_axis: Any) -> None:
    if not isinstance(mesh, jax.sharding.Mesh):
        raise TypeError(
            f"`mesh` must be a jax.sharding.Mesh, got mesh={mesh!r}. "
            f"Build one with cabs.backends.jax.data_mesh() or jax.make_mesh((device_count,), ('data',))."
        )
    if data_axis not in mesh.axis_names:
        raise ValueError(
            f"`data_axis` must be an axis of the mesh {mesh.axis_names}, got data_axis={data_axis!r}. "
            f"Name the axis that the batch is split over."
        )


# --- user-facing entry points --------------------------------------------------------------


class StatsFunction:
    """A compiled, reusable ``(params, batch) -> (GradStats, mean_grad)`` with bucketed shapes.

    Create it once per loss function and call it every step: batches are padded to
    a bucket size (:func:`bucket_size`) and the compiled function is cached per
    bucket, so a run compiles at most once per bucket however the batch size moves.

    Args:
        loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example
            (an element of the batch pytree with the batch axis removed).
        buckets: bucket policy, see :func:`bucket_size`. Default ``"pow2"``.
        max_batch_size: largest batch size of the run (the rule's
            ``max_batch_size``); with ``"pow2"`` it is also the top bucket.
        max_examples_per_pass: at most this many examples per device are
            differentiated at once. A larger batch is evaluated in equal chunks, one
            after another inside the compiled function, and their sums added: the
            statistics and mean gradient are those of the whole batch, memory is that
            of one chunk. ``None`` (default): one pass.
        mesh: a :class:`jax.sharding.Mesh` to run data-parallel on (see
            :func:`data_mesh`). The batch is padded to a multiple of the number of
            devices on ``data_axis`` and split over them; ``params`` are replicated.
            Each device forms the sums of its share and one all-reduce (``psum``)
            adds them. ``None`` (default): JAX's default device.
        data_axis: the mesh axis the batch is split over. Default ``"data"``.
        method: how the per-example squared norms are computed. ``"auto"``
            (default): layer-wise, from each layer's input and output gradient in
            one backward pass, for every parameter read once by a dense, conv,
            embedding or element-wise (bias, norm scale) operation, and by vmap for
            the other parameters (tied weights, operations without a rule); exact
            either way. ``"layerwise"``: the same, but a ``ValueError`` names any
            parameter without a rule. ``"vmap"``: per-example gradients of every
            parameter. :func:`explain` reports the choice per parameter.

    Example:
        >>> import jax.numpy as jnp
        >>> import numpy as np
        >>> stats_fn = StatsFunction(lambda p, e: (p["w"] * e["x"] - e["y"]) ** 2, max_batch_size=64)
        >>> params = {"w": jnp.asarray(1.0, dtype=jnp.float32)}
        >>> for size in (20, 25, 30):
        ...     batch = {"x": np.ones(size, np.float32), "y": np.zeros(size, np.float32)}
        ...     stats, grad = stats_fn(params, batch)
        >>> stats_fn.compile_count  # 20, 25 and 30 share the bucket 32
        1
    """

    def __init__(
        self,
        loss_fn: Callable[[Any, Any], Any],
        *,
        buckets: Any = "pow2",
        max_batch_size: int | None = None,
        max_examples_per_pass: int | None = None,
        mesh: jax.sharding.Mesh | None = None,
        data_axis: str = "data",
        method: str = "auto",
    ):
        if not callable(loss_fn):
            raise TypeError(f"`loss_fn` must be callable as loss_fn(params, example), got loss_fn={loss_fn!r}.")
        if max_batch_size is not None:
            max_batch_size = _check_positive_int(
                "max_batch_size", max_batch_size, "Use the rule's max_batch_size, or None."
            )
        if max_examples_per_pass is not None:
            max_examples_per_pass = _check_positive_int(
                "max_examples_per_pass",
                max_examples_per_pass,
                "Use the number of examples whose per-example gradients fit in device memory at once, or None.",
            )
        if mesh is not None:
            _check_mesh(mesh, data_axis)
        self.loss_fn = loss_fn
        self.buckets = _normalize_buckets(buckets, max_batch_size)
        self.max_batch_size = max_batch_size
        self.max_examples_per_pass = max_examples_per_pass
        self.mesh = mesh
        self.data_axis = data_axis
        self.method = _check_method(method)
        self._trace_count = 0
        self._compiled = jax.jit(self._statistics)

    @property
    def shard_count(self) -> int:
        """Number of devices the batch is split over (1 without a mesh)."""
        return 1 if self.mesh is None else int(self.mesh.shape[self.data_axis])

    def _layout(self, size: int) -> tuple[int, int]:
        return _padded_layout(size, self.shard_count, self.max_examples_per_pass)

    def _statistics(self, params: Any, batch: Any, mask: Any) -> tuple[GradStats, Any]:
        self._trace_count += 1  # runs only while JAX traces: a fallback compile count
        padded_size, chunk_size = self._layout(mask.shape[0])
        # A batch from `masked` may need rows for the chunk and device layout; they are masked out.
        batch = jax.tree_util.tree_map(lambda leaf: _pad_rows(leaf, padded_size), batch)
        mask = _pad_rows(mask, padded_size, fill=False)
        if self.mesh is None:
            return finish(_chunked_sums(self.loss_fn, params, batch, mask, chunk_size, self.method), params)
        return self._sharded_statistics(params, batch, mask, chunk_size)

    def _sharded_statistics(self, params: Any, batch: Any, mask: Any, chunk_size: int) -> tuple[GradStats, Any]:
        """Each device: sums of its rows; one psum of the sums; every device forms the statistics."""
        data = jax.sharding.PartitionSpec(self.data_axis)
        replicated = jax.sharding.PartitionSpec()

        def per_device(params: Any, batch: Any, mask: Any) -> tuple[GradStats, Any]:
            local = _chunked_sums(self.loss_fn, params, batch, mask, chunk_size, self.method)
            return finish(jax.lax.psum(local, self.data_axis), params)

        # check_vma=False: with it on, JAX would treat the replicated params as varying
        # inside vmap(grad) and psum each per-example gradient over the devices.
        return jax.shard_map(
            per_device,
            mesh=self.mesh,
            in_specs=(replicated, data, data),
            out_specs=replicated,
            check_vma=False,
        )(params, batch, mask)

    def bucket_size(self, count: int) -> int:
        """The padded size a batch of ``count`` examples runs at: its bucket, rounded up to the layout.

        Without ``max_examples_per_pass`` and ``mesh`` this is :func:`bucket_size`;
        otherwise the bucket is rounded up to a whole number of equal chunks on
        every device. One bucket gives one padded size, so one compilation.
        """
        return self._layout(bucket_size(count, self.buckets, max_batch_size=self.max_batch_size))[0]

    def chunk_size(self, count: int) -> int:
        """Rows per pass (per device) for a batch of ``count`` examples."""
        return self._layout(self.bucket_size(count))[1]

    def pad(self, batch: Any) -> tuple[Any, np.ndarray]:
        """``(padded_batch, mask)`` with the batch padded to its bucket (see :func:`pad_batch`)."""
        return pad_batch(batch, self.bucket_size(_leading_size(batch)))

    def _place(self, params: Any, batch: Any, mask: Any) -> tuple[Any, Any, Any]:
        """Put the batch on the mesh split along axis 0 and the params on every device (no-op if already so)."""
        if self.mesh is None:
            return params, batch, mask
        data = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec(self.data_axis))
        replicated = jax.sharding.NamedSharding(self.mesh, jax.sharding.PartitionSpec())
        return jax.device_put(params, replicated), jax.device_put(batch, data), jax.device_put(mask, data)

    def __call__(self, params: Any, batch: Any) -> tuple[GradStats, Any]:
        """Statistics and mean gradient of ``loss_fn`` over ``batch``.

        Args:
            params: pytree of floating arrays.
            batch: pytree of arrays with the batch on axis 0 (NumPy arrays are
                padded on the host, which compiles nothing).

        Returns:
            ``(GradStats, mean_grad)``; see :func:`finish`. With a mesh, both are
            replicated on every device of the mesh.
        """
        _check_params(params)
        padded, mask = self.pad(batch)
        return self._compiled(*self._place(params, padded, mask))

    def masked(self, params: Any, batch: Any, mask: Any) -> tuple[GradStats, Any]:
        """Statistics over the examples of an already padded ``batch`` where ``mask`` is True.

        For fixed-shape input pipelines and for use inside your own ``jax.jit``
        (the step then compiles once per padded size). Padding may hold any
        values, NaN and inf included. Rows the chunk or device layout needs are
        added inside (pad to :meth:`bucket_size` to avoid that copy). With a
        mesh, arrays are used where they are: place the batch with
        ``NamedSharding(mesh, PartitionSpec(data_axis))`` yourself (for several
        hosts, e.g. ``jax.make_array_from_process_local_data``).
        """
        _check_params(params)
        count = _leading_size(batch)
        if np.shape(mask) != (count,):
            raise ValueError(f"`mask` must be a bool vector of the batch size {count}, got shape {np.shape(mask)}.")
        if jnp.result_type(mask) != jnp.bool_:
            raise TypeError(
                f"`mask` must have dtype bool, got dtype {jnp.result_type(mask)}. Use e.g. numpy.arange(size) < count."
            )
        return self._compiled(params, batch, mask)

    @property
    def compile_count(self) -> int:
        """How many executables JAX holds for this function (one per bucket shape seen)."""
        cache_size = getattr(self._compiled, "_cache_size", None)
        return int(cache_size()) if cache_size is not None else self._trace_count

    def __repr__(self) -> str:
        return (
            f"StatsFunction({self.loss_fn!r}, buckets={self.buckets!r}, max_batch_size={self.max_batch_size!r}, "
            f"max_examples_per_pass={self.max_examples_per_pass!r}, mesh={self.mesh!r}, data_axis={self.data_axis!r}, "
            f"method={self.method!r})"
        )


_cache: OrderedDict[tuple[Any, ...], StatsFunction] = OrderedDict()


def grad_stats(
    loss_fn: Callable[[Any, Any], Any],
    params: Any,
    batch: Any,
    *,
    buckets: Any = "pow2",
    max_batch_size: int | None = None,
    max_examples_per_pass: int | None = None,
    mesh: jax.sharding.Mesh | None = None,
    data_axis: str = "data",
    method: str = "auto",
) -> tuple[GradStats, Any]:
    """Gradient moment statistics and mean gradient of a per-example loss over a batch.

    A convenience over :class:`StatsFunction`: the compiled function is kept in a
    small cache keyed on ``loss_fn`` and the options, so calling this every step
    with the same ``loss_fn`` object compiles once per bucket (a fresh lambda per
    call defeats the cache; hold a :class:`StatsFunction` instead).

    Args:
        loss_fn: ``loss_fn(params, example) -> scalar``, the loss of ONE example.
        params: pytree of floating arrays (dicts, Flax params, Equinox arrays).
        batch: pytree of arrays with the batch on axis 0.
        buckets: bucket policy, see :func:`bucket_size`.
        max_batch_size: largest batch size of the run.
        max_examples_per_pass: chunk limit for micro-batching, see :class:`StatsFunction`.
        mesh: devices to run data-parallel on, see :class:`StatsFunction`.
        data_axis: the mesh axis the batch is split over.
        method: ``"auto"``, ``"layerwise"`` or ``"vmap"``, see :class:`StatsFunction`.

    Returns:
        ``(GradStats, mean_grad)``: ``GradStats(count, loss, grad_sq_norm,
        sq_norm_sum)`` as 0-d JAX arrays (float32, or float64 for float64 params)
        and the mean gradient, a pytree like ``params``.
    """
    key = (loss_fn, repr(buckets), max_batch_size, max_examples_per_pass, mesh, data_axis, method)
    stats_fn = _cache.pop(key, None)
    if stats_fn is None:
        stats_fn = StatsFunction(
            loss_fn,
            buckets=buckets,
            max_batch_size=max_batch_size,
            max_examples_per_pass=max_examples_per_pass,
            mesh=mesh,
            data_axis=data_axis,
            method=method,
        )
    _cache[key] = stats_fn
    while len(_cache) > _CACHE_LIMIT:
        _cache.popitem(last=False)
    return stats_fn(params, batch)
