"""PyTorch adapter: per-example gradient statistics of a ``torch.nn.Module`` with ``torch.func``.

:func:`grad_stats` turns a model, a per-example loss and a batch into
:class:`cabs.GradStats` and leaves the batch's mean gradient in each parameter's
``.grad``, so any ``torch.optim`` step can follow. The per-example gradients come
from ``torch.func.vmap`` over ``torch.func.grad`` of a ``functional_call`` and are
formed a chunk of examples at a time, so memory stays bounded.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.func import functional_call, grad, vmap

from cabs._stats import GradStats
from cabs.backends import _torch_layerwise
from cabs.backends._torch_distributed import StatsAccumulator, agree_batch_size, is_data_parallel, reduced_grad_stats

__all__ = [
    "DEFAULT_MEMORY_BUDGET_BYTES",
    "MAX_DEFAULT_CHUNK_SIZE",
    "StatsAccumulator",
    "agree_batch_size",
    "array_types",
    "devices",
    "grad_stats",
    "mean_grad",
    "name",
    "plan",
]

name = "torch"

# The default chunk keeps one chunk's per-example gradients under this many bytes.
DEFAULT_MEMORY_BUDGET_BYTES = 256 * 2**20
# Activations also grow with the chunk, and the budget above does not see them: cap it.
MAX_DEFAULT_CHUNK_SIZE = 1024


def array_types() -> tuple[type, ...]:
    """The array types this backend handles."""
    return (torch.Tensor,)


def devices() -> list[str]:
    """The devices PyTorch can compute on here, e.g. ``["cpu", "cuda:0"]``."""
    found = ["cpu"]
    if torch.cuda.is_available():
        found += [f"cuda:{index}" for index in range(torch.cuda.device_count())]
    mps = getattr(torch.backends, "mps", None)
    if mps is not None and mps.is_available():
        found.append("mps")
    return found


def grad_stats(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    targets: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    chunk_size: int | None = None,
    process_group: Any = None,
    method: str = "auto",
    max_examples_per_pass: int | None = None,
    loss_scale: Any = None,
) -> GradStats:
    """Per-example gradient statistics of one batch; leaves the mean gradient in ``.grad``.

    Args:
        model: the network. Parameters with ``requires_grad=False`` are left out of
            the statistics and their ``.grad`` is not touched. Tied (shared)
            parameters count once, with the sum of the gradients of all their uses.
            BatchNorm in training mode mixes the examples of a batch, so per-example
            gradients are undefined: such a model is refused.
        loss_fn: ``loss_fn(outputs, targets)`` returning one loss per example, shape
            ``[m]``, e.g. ``torch.nn.CrossEntropyLoss(reduction="none")``.
        inputs: the model's input, batch on dim 0; a tuple of tensors is passed to
            the model as positional arguments.
        targets: the targets, batch on dim 0 (a tensor or a tuple of tensors).
        chunk_size: how many examples' gradients are formed at once. The default
            keeps one chunk's per-example gradients under
            :data:`DEFAULT_MEMORY_BUDGET_BYTES` (and at most
            :data:`MAX_DEFAULT_CHUNK_SIZE` examples). The result does not depend on it
            beyond rounding.
        process_group: data parallelism (docs/distributed.md). A
            ``DistributedDataParallel`` model reduces over its own group when this is
            None; a plain module reduces only when a group is given (e.g.
            ``torch.distributed.group.WORLD``). The inputs are then this worker's share
            (possibly empty) and the result and ``.grad`` are those of the global batch.
        method: how the per-example norms are computed. ``"auto"`` (default, the fast one): exact
            layer-wise identities from hooks on one ordinary forward and backward for
            ``Linear``, ``Conv1d``/``Conv2d``, ``Embedding``, ``LayerNorm``,
            ``GroupNorm`` and ``RMSNorm`` parameters, never forming per-example
            gradients; every other parameter, and any parameter used more than once
            (tied weights, a module called twice), takes the vmap path on its own
            (:func:`plan` tells which). ``"layerwise"``: the same, but a parameter
            without a layer rule is an error. ``"vmap"``: per-example
            gradients of every parameter with ``torch.func``. In ``"auto"`` the vmap part
            draws its own dropout masks, apart from those of the ordinary pass.
        max_examples_per_pass: at most this many examples in one forward and backward;
            a larger batch is split and the sums (count, losses, gradients, squared
            norms) are added, so the statistics and ``.grad`` are those of the whole
            batch. None: one pass (``"vmap"``: passes of ``chunk_size``).
        loss_scale: mixed precision. A number s, or a ``torch.amp.GradScaler`` (its
            current scale): the per-example losses are multiplied by s before
            differentiating, so small float16 gradients do not underflow, and the
            statistics are unscaled (the loss and mean gradient divided by s, the
            squared norms by s^2). With a number, ``.grad`` holds the unscaled mean
            gradient. With a GradScaler, ``.grad`` stays scaled, as after
            ``scaler.scale(loss).backward()``: call ``scaler.step(optimizer)`` and
            ``scaler.update()`` as usual. Gradients that overflow make the statistics
            non-finite, so the step the scaler skips is skipped by the controller too.

    Returns:
        :class:`cabs.GradStats` of 0-d tensors on the model's device: ``count`` (int64),
        ``loss`` (mean loss), ``grad_sq_norm`` (squared norm of the mean gradient) and
        ``sq_norm_sum`` (sum of squared per-example gradient norms), in float64 when a
        parameter is float64 and float32 otherwise (also for float16 / bfloat16).
        Each trainable parameter's ``.grad`` is overwritten with the mean gradient, as
        ``zero_grad()`` followed by ``loss.mean().backward()`` would.

    Raises:
        TypeError: ``model`` is not a module, ``loss_fn`` not callable, or the batch not tensors.
        ValueError: the batch is empty or inputs and targets differ in length, the loss
            is not per-example, a BatchNorm is in training mode, or no parameter is trainable.

    Example:
        >>> import torch
        >>> from cabs.backends import torch as cabs_torch
        >>> model = torch.nn.Linear(3, 2)
        >>> stats = cabs_torch.grad_stats(model, torch.nn.CrossEntropyLoss(reduction="none"),
        ...                               torch.randn(8, 3), torch.randint(0, 2, (8,)))
        >>> int(stats.count), model.weight.grad.shape
        (8, torch.Size([2, 3]))
    """
    if loss_scale is not None:
        options = {"chunk_size": chunk_size, "process_group": process_group, "method": method}
        return _scaled_grad_stats(
            model, loss_fn, inputs, targets, loss_scale, max_examples_per_pass=max_examples_per_pass, **options
        )
    if process_group is not None or is_data_parallel(model):
        return reduced_grad_stats(
            model,
            loss_fn,
            inputs,
            targets,
            process_group=process_group,
            chunk_size=chunk_size,
            method=method,
            max_examples_per_pass=max_examples_per_pass,
        )
    _check_model(model)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable as loss_fn(outputs, targets), got loss_fn={loss_fn!r}.")
    input_tuple = _as_tensor_tuple("inputs", inputs)
    target_tuple = _as_tensor_tuple("targets", targets)
    count = _batch_length(input_tuple, target_tuple)
    trainable = {key: value for key, value in model.named_parameters() if value.requires_grad}
    if not trainable:
        raise ValueError(
            "`model` must have at least one parameter with requires_grad=True, got none. Unfreeze the parameters to train."
        )
    _check_devices(trainable, input_tuple + target_tuple)
    _torch_layerwise.check_options(method, max_examples_per_pass)
    if method != "vmap":
        _resolve_chunk_size(chunk_size, trainable, count)  # validates it; it bounds only the vmap fallback
        return _torch_layerwise.layerwise_grad_stats(
            model,
            loss_fn,
            input_tuple,
            target_tuple,
            method=method,
            max_examples_per_pass=max_examples_per_pass,
            vmap_chunk_size=chunk_size,
        )
    _torch_layerwise.check_vmap_supported(model)
    chunk_size = _resolve_chunk_size(chunk_size, trainable, count)
    if max_examples_per_pass is not None:
        chunk_size = min(chunk_size, max_examples_per_pass)

    accumulate_dtype = _accumulate_dtype(trainable.values())
    device = next(iter(trainable.values())).device
    # Frozen parameters and buffers enter the call unchanged; they are not differentiated.
    trainable_names = set(trainable)
    fixed = {key: value.detach() for key, value in model.named_parameters() if key not in trainable_names}
    fixed.update({key: value.detach() for key, value in model.named_buffers()})
    differentiable = {key: value.detach() for key, value in trainable.items()}

    per_example_grads = vmap(
        grad(_example_loss_function(model, loss_fn), has_aux=True),
        in_dims=(None, None, 0, 0),
        randomness="different",
    )
    loss_sum = torch.zeros((), dtype=accumulate_dtype, device=device)
    sq_norm_sum = torch.zeros((), dtype=accumulate_dtype, device=device)
    grad_sums = {key: torch.zeros_like(value, dtype=accumulate_dtype) for key, value in differentiable.items()}
    with torch.no_grad():
        for start in range(0, count, chunk_size):
            stop = min(start + chunk_size, count)
            chunk_inputs = tuple(tensor[start:stop] for tensor in input_tuple)
            chunk_targets = tuple(tensor[start:stop] for tensor in target_tuple)
            grads, losses = per_example_grads(differentiable, fixed, chunk_inputs, chunk_targets)
            loss_sum += losses.to(accumulate_dtype).sum()
            for key, value in grads.items():
                value = value.to(accumulate_dtype)
                sq_norm_sum += value.pow(2).sum()
                grad_sums[key] += value.sum(dim=0)

        grad_sq_norm = torch.zeros((), dtype=accumulate_dtype, device=device)
        for key, parameter in trainable.items():
            mean_grad = grad_sums[key] / count
            grad_sq_norm += mean_grad.pow(2).sum()
            parameter.grad = mean_grad.to(parameter.dtype)
    return GradStats(
        count=torch.tensor(count, dtype=torch.int64, device=device),
        loss=loss_sum / count,
        grad_sq_norm=grad_sq_norm,
        sq_norm_sum=sq_norm_sum,
    )


def mean_grad(
    model: torch.nn.Module,
    loss_fn: Callable[[Any, Any], torch.Tensor],
    inputs: torch.Tensor | tuple[torch.Tensor, ...],
    targets: torch.Tensor | tuple[torch.Tensor, ...],
    *,
    max_examples_per_pass: int | None = None,
) -> torch.Tensor:
    """A plain step's gradient, without statistics: the mean gradient in ``.grad``; returns the mean loss.

    For computing statistics only every k-th step (``stats_every=k``, a choice of the
    training loop): on the other steps call this instead of :func:`grad_stats` and do
    not call ``Controller.step``, so the batch size stays as it is. It is one ordinary
    forward and backward of the summed loss (split into passes of at most
    ``max_examples_per_pass`` examples), so its cost is that of a plain SGD step.

    Example:
        >>> import torch, cabs
        >>> from cabs.backends import torch as cabs_torch
        >>> model, loss_fn = torch.nn.Linear(3, 2), torch.nn.CrossEntropyLoss(reduction="none")
        >>> optimizer, controller = torch.optim.SGD(model.parameters(), lr=0.1), cabs.Controller(learning_rate=0.1)
        >>> for step in range(4):
        ...     inputs, targets = torch.randn(controller.batch_size, 3), torch.randint(0, 2, (controller.batch_size,))
        ...     if step % 2 == 0:  # stats_every=2; the first step always has statistics
        ...         stats = cabs_torch.grad_stats(model, loss_fn, inputs, targets, method="auto")
        ...         batch_size = controller.step(stats)
        ...     else:
        ...         loss = cabs_torch.mean_grad(model, loss_fn, inputs, targets)
        ...     optimizer.step()
        >>> controller.batch_size >= 16
        True
    """
    _check_model(model)
    if not callable(loss_fn):
        raise TypeError(f"`loss_fn` must be callable as loss_fn(outputs, targets), got loss_fn={loss_fn!r}.")
    input_tuple = _as_tensor_tuple("inputs", inputs)
    target_tuple = _as_tensor_tuple("targets", targets)
    _batch_length(input_tuple, target_tuple)
    return _torch_layerwise.mean_grad(
        model, loss_fn, input_tuple, target_tuple, max_examples_per_pass=max_examples_per_pass
    )


plan = _torch_layerwise.plan


def _example_loss_function(model: torch.nn.Module, loss_fn: Callable) -> Callable:
    """The loss of one example (vmap strips the batch dim) as a function of the parameters."""

    def example_loss(differentiable: dict, fixed: dict, example_inputs: tuple, example_targets: tuple):
        # The model and loss see a batch of one, as they would in an ordinary loop.
        batch_inputs = tuple(tensor.unsqueeze(0) for tensor in example_inputs)
        batch_targets = tuple(tensor.unsqueeze(0) for tensor in example_targets)
        outputs = functional_call(model, (differentiable, fixed), batch_inputs)
        losses = loss_fn(outputs, batch_targets[0] if len(batch_targets) == 1 else batch_targets)
        _check_losses(losses)
        loss = losses.reshape(())
        return loss, loss.detach()

    return example_loss


def _scaled_grad_stats(
    model: torch.nn.Module, loss_fn: Callable, inputs: Any, targets: Any, loss_scale: Any, **options: Any
) -> GradStats:
    """:func:`grad_stats` of the losses times s, with the statistics (and, for a number, ``.grad``) unscaled."""
    is_scaler = callable(getattr(loss_scale, "get_scale", None)) and callable(getattr(loss_scale, "unscale_", None))
    if is_scaler:
        # A GradScaler creates its scale on the first scale() call; its step() needs it.
        parameter = next(model.parameters(), None)
        loss_scale.scale(torch.zeros((), device=parameter.device if parameter is not None else "cpu"))
    scale = loss_scale.get_scale() if is_scaler else loss_scale
    if isinstance(scale, torch.Tensor) and scale.numel() == 1:
        scale = scale.item()
    if isinstance(scale, bool) or not isinstance(scale, (int, float)) or not (math.isfinite(scale) and scale > 0):
        raise ValueError(
            f"`loss_scale` must be a finite number > 0 or a torch.amp.GradScaler, got loss_scale={loss_scale!r}. "
            f"Pass the factor the loss is multiplied by, or the GradScaler itself."
        )

    def scaled_loss(outputs: Any, target: Any) -> torch.Tensor:
        losses = loss_fn(outputs, target)
        # Scale in float32 at least: float16 overflows at 65504, below the usual scales.
        return (losses.float() if losses.dtype in (torch.float16, torch.bfloat16) else losses) * scale

    stats = grad_stats(model, scaled_loss, inputs, targets, **options)
    if not is_scaler:
        with torch.no_grad():
            for parameter in model.parameters():
                if parameter.requires_grad and parameter.grad is not None:
                    parameter.grad.div_(scale)
    return GradStats(
        count=stats.count,
        loss=stats.loss / scale,
        grad_sq_norm=stats.grad_sq_norm / scale**2,
        sq_norm_sum=stats.sq_norm_sum / scale**2,
    )


def _check_losses(losses: Any) -> None:
    if not isinstance(losses, torch.Tensor) or tuple(losses.shape) != (1,) or not losses.is_floating_point():
        shape = tuple(losses.shape) if isinstance(losses, torch.Tensor) else type(losses).__name__
        raise ValueError(
            f"`loss_fn` must return per-example losses, a floating tensor of shape [m] for a batch of m, "
            f"got shape={shape} for a batch of 1. Use reduction='none', e.g. "
            f"torch.nn.CrossEntropyLoss(reduction='none'); for losses with more dims per example, reduce "
            f"all but the batch dim, e.g. lambda out, y: torch.nn.functional.mse_loss(out, y, reduction='none')"
            f".flatten(1).mean(1)."
        )


def _check_model(model: Any) -> None:
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"`model` must be a torch.nn.Module, got model={type(model).__name__}.")
    for qualified_name, module in model.named_modules():
        if not isinstance(module, torch.nn.modules.batchnorm._BatchNorm):
            continue
        # Without running statistics BatchNorm normalises with batch statistics even in eval mode.
        if module.training or module.running_mean is None:
            raise ValueError(
                f"`model` must not normalise with batch statistics: {type(module).__name__} "
                f"'{qualified_name or '<model>'}' is in training mode (or has track_running_stats=False), "
                f"so each example's gradient depends on the rest of the batch and per-example gradients are "
                f"undefined. Put the BatchNorm modules in eval mode (module.eval(), with running statistics) "
                f"or replace them with GroupNorm / LayerNorm."
            )


def _as_tensor_tuple(argument: str, value: Any) -> tuple[torch.Tensor, ...]:
    tensors = tuple(value) if isinstance(value, (tuple, list)) else (value,)
    if not tensors or not all(isinstance(tensor, torch.Tensor) for tensor in tensors):
        raise TypeError(
            f"`{argument}` must be a torch.Tensor or a tuple of tensors with the batch on dim 0, "
            f"got {argument}={type(value).__name__}. Convert with torch.as_tensor(...)."
        )
    for tensor in tensors:
        if tensor.dim() == 0:
            raise ValueError(
                f"`{argument}` must have the batch on dim 0, got a 0-d tensor. Add a batch dim with .unsqueeze(0)."
            )
    return tensors


def _batch_length(inputs: tuple[torch.Tensor, ...], targets: tuple[torch.Tensor, ...]) -> int:
    lengths = [tensor.shape[0] for tensor in inputs + targets]
    if len(set(lengths)) != 1:
        raise ValueError(
            f"`inputs` and `targets` must have the same batch length on dim 0, got lengths "
            f"inputs={lengths[: len(inputs)]}, targets={lengths[len(inputs) :]}. Index them with the same batch indices."
        )
    if lengths[0] < 1:
        raise ValueError("the batch must hold at least one example, got m=0 (empty inputs and targets).")
    return int(lengths[0])


def _check_devices(trainable: dict[str, torch.Tensor], tensors: tuple[torch.Tensor, ...]) -> None:
    parameter_devices = {value.device for value in trainable.values()}
    if len(parameter_devices) != 1:
        return  # a model split over devices moves its activations itself
    (device,) = parameter_devices
    for tensor in tensors:
        if tensor.device != device:
            raise ValueError(
                f"the batch must be on the model's device {device}, got a tensor on {tensor.device}. "
                f"Move it with .to({str(device)!r})."
            )


def _accumulate_dtype(parameters: Any) -> torch.dtype:
    """float64 when any parameter is float64, else float32 (also for float16 / bfloat16)."""
    return torch.float64 if any(value.dtype == torch.float64 for value in parameters) else torch.float32


def _resolve_chunk_size(chunk_size: int | None, trainable: dict[str, torch.Tensor], count: int) -> int:
    if chunk_size is None:
        bytes_per_example = sum(value.numel() * max(value.element_size(), 4) for value in trainable.values())
        chunk_size = max(1, min(MAX_DEFAULT_CHUNK_SIZE, DEFAULT_MEMORY_BUDGET_BYTES // max(bytes_per_example, 1)))
    elif isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"`chunk_size` must be a positive integer or None, got chunk_size={chunk_size!r}.")
    return min(chunk_size, count)
