"""Data-parallel statistics for PyTorch: each worker's sums, all-reduced over a process group.

Every worker computes the statistics of its own share of the global batch with the
single-process :func:`cabs.backends.torch.grad_stats` on the *unwrapped* module (so
``DistributedDataParallel``'s hooks never fire inside ``torch.func.vmap``), turns them
back into sums (example count, loss sum, sum of squared per-example norms, gradient
sum) and all-reduces all of them in **one** flat tensor. The global mean gradient is
the summed gradient divided by the global count, so workers holding different numbers
of examples (even none) are weighted by their share, not averaged equally as DDP would.
``grad_sq_norm`` is formed once, from that global mean gradient, as DESIGN.md section 2 asks.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist

from cabs._agreement import check_agreement
from cabs._stats import GradStats

__all__ = ["StatsAccumulator", "agree_batch_size", "is_data_parallel", "reduced_grad_stats"]

# The flat all-reduce buffer starts with these sums; the gradient sums follow.
_COUNT, _LOSS_SUM, _SQ_NORM_SUM, _HEADER = 0, 1, 2, 3


def is_data_parallel(model: Any) -> bool:
    """True for a ``torch.nn.parallel.DistributedDataParallel`` wrapper."""
    return isinstance(model, torch.nn.parallel.DistributedDataParallel)


def _unwrap(model: Any, process_group: Any) -> tuple[torch.nn.Module, Any]:
    """The module whose parameters are differentiated and the group its statistics are reduced over."""
    if is_data_parallel(model):
        return model.module, model.process_group if process_group is None else process_group
    return model, process_group


def _check_group(process_group: Any) -> None:
    if process_group is not None and not dist.is_initialized():
        raise RuntimeError(
            f"a process group was given (process_group={process_group!r}) but torch.distributed is not "
            f"initialised. Call torch.distributed.init_process_group(...) first (torchrun sets the environment), "
            f"or pass process_group=None for single-process statistics."
        )


def _accumulate_dtype(module: torch.nn.Module) -> torch.dtype:
    """float64 when any parameter is float64, else float32 (as the single-process adapter accumulates)."""
    return torch.float64 if any(value.dtype == torch.float64 for value in module.parameters()) else torch.float32


def _is_empty_batch(inputs: Any) -> bool:
    """True when the batch is tensors with zero examples on dim 0 (a worker's empty share)."""
    tensors = tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
    return bool(tensors) and all(
        isinstance(tensor, torch.Tensor) and tensor.dim() > 0 and tensor.shape[0] == 0 for tensor in tensors
    )


class StatsAccumulator:
    """Sums per-example statistics over micro-batches and workers, then reduces once.

    Gradient accumulation for CABS: call :meth:`add` for each micro-batch of this
    worker's share (no communication), then :meth:`reduce` once per step, which
    all-reduces the sums over ``process_group`` in a single collective, writes the
    global mean gradient into ``.grad`` on every worker and returns the statistics
    of the whole global batch. The result equals one :func:`grad_stats` call on the
    concatenated global batch. ``DistributedDataParallel.no_sync`` is not needed
    (the micro-batches never run DDP's backward), and harmless if used.

    Args:
        model: a module or a ``DistributedDataParallel`` wrapper.
        process_group: the group to reduce over. ``None`` means the wrapper's group
            for a DDP model and no communication (one process) for a plain module;
            pass ``torch.distributed.group.WORLD`` to reduce a plain module's
            statistics over all processes.

    Example:
        >>> import torch
        >>> from cabs.backends.torch import StatsAccumulator
        >>> model = torch.nn.Linear(3, 1)
        >>> loss_fn = lambda outputs, targets: (outputs - targets).pow(2).flatten(1).mean(1)
        >>> accumulator = StatsAccumulator(model)
        >>> for _ in range(2):
        ...     accumulator.add(loss_fn, torch.randn(4, 3), torch.randn(4, 1))
        >>> int(accumulator.reduce().count)
        8
    """

    def __init__(self, model: torch.nn.Module, *, process_group: Any = None) -> None:
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"`model` must be a torch.nn.Module, got model={type(model).__name__}.")
        self._module, self._group = _unwrap(model, process_group)
        _check_group(self._group)
        self._trainable = {key: value for key, value in self._module.named_parameters() if value.requires_grad}
        if not self._trainable:
            raise ValueError(
                "`model` must have at least one parameter with requires_grad=True, got none. "
                "Unfreeze the parameters to train."
            )
        self._dtype = _accumulate_dtype(self._module)
        self._device = next(iter(self._trainable.values())).device
        self._sums: torch.Tensor | None = None

    def _zero_sums(self) -> torch.Tensor:
        size = _HEADER + sum(value.numel() for value in self._trainable.values())
        return torch.zeros(size, dtype=self._dtype, device=self._device)

    def add(self, loss_fn: Callable[[Any, Any], torch.Tensor], inputs: Any, targets: Any, **options: Any) -> None:
        """Add one micro-batch of this worker; an empty one (zero examples) adds nothing.

        ``options`` go to the single-process ``grad_stats`` (e.g. ``chunk_size``).
        This overwrites ``.grad`` with the micro-batch's mean gradient; :meth:`reduce`
        replaces it with the global one.
        """
        if self._sums is None:
            self._sums = self._zero_sums()
        if _is_empty_batch(inputs) and _is_empty_batch(targets):
            return
        from cabs.backends.torch import grad_stats  # the single-process adapter imports this module

        stats = grad_stats(self._module, loss_fn, inputs, targets, **options)
        count = stats.count.to(self._dtype)
        self._sums[_COUNT] += count
        self._sums[_LOSS_SUM] += stats.loss.to(self._dtype) * count
        self._sums[_SQ_NORM_SUM] += stats.sq_norm_sum.to(self._dtype)
        # The adapter leaves the micro-batch's mean gradient in every trainable .grad; sums add.
        # One concatenation and one multiply-add, not a slice update per parameter.
        with torch.no_grad():
            mean_grads = [parameter.grad.reshape(-1) for parameter in self._trainable.values()]  # type: ignore[union-attr]
            self._sums[_HEADER:] += torch.cat(mean_grads).to(self._dtype) * count

    def reduce(self) -> GradStats:
        """All-reduce the sums once, leave the global mean gradient in ``.grad``, return the statistics.

        Every worker of the group must call it at the same step, also one whose
        share was empty. The accumulator is empty again afterwards.

        Raises:
            ValueError: no worker added an example.
        """
        sums = self._zero_sums() if self._sums is None else self._sums
        self._sums = None
        if self._group is not None:
            dist.all_reduce(sums, op=dist.ReduceOp.SUM, group=self._group)
        count = sums[_COUNT]
        if not bool(count > 0):
            raise ValueError(
                "the global batch must hold at least one example, got m=0 on every worker. "
                "Give the sampler a batch size >= 1."
            )
        with torch.no_grad():
            # The whole mean gradient in one division and one norm; each .grad gets its own copy
            # (not a view of the flat buffer), as after an ordinary backward.
            mean_grad = sums[_HEADER:] / count
            grad_sq_norm = mean_grad.pow(2).sum()
            sizes = [parameter.numel() for parameter in self._trainable.values()]
            for parameter, flat in zip(self._trainable.values(), mean_grad.split(sizes), strict=True):
                parameter.grad = flat.to(parameter.dtype, copy=True).reshape(parameter.shape)
        return GradStats(
            count=torch.round(count).to(torch.int64),
            loss=sums[_LOSS_SUM] / count,
            grad_sq_norm=grad_sq_norm,
            sq_norm_sum=sums[_SQ_NORM_SUM].clone(),
        )


def reduced_grad_stats(
    model: torch.nn.Module, loss_fn: Callable, inputs: Any, targets: Any, *, process_group: Any = None, **options: Any
) -> GradStats:
    """:func:`grad_stats` of a data-parallel step: this worker's share, reduced over the group."""
    accumulator = StatsAccumulator(model, process_group=process_group)
    accumulator.add(loss_fn, inputs, targets, **options)
    return accumulator.reduce()


def agree_batch_size(batch_size: int, *, process_group: Any = None) -> int:
    """Check that every worker computed the same batch size; a debugging aid (one tiny all-gather).

    Every worker calls it with its controller's next batch size. All of them raise
    together on a mismatch, so none is left waiting in the next collective.

    Args:
        batch_size: this worker's next (global) batch size.
        process_group: the group of the workers; ``None`` is the default group.

    Returns:
        ``batch_size``, the same on every worker.

    Raises:
        RuntimeError: torch.distributed is not initialised, or the workers disagree;
            the message names rank 0's value and every differing one.
    """
    if not dist.is_initialized():
        raise RuntimeError(
            "agree_batch_size needs torch.distributed, which is not initialised. "
            "Call torch.distributed.init_process_group(...) first."
        )
    own = int(batch_size)
    # NCCL only moves CUDA tensors; every other backend here takes CPU ones.
    device = (
        torch.device("cuda", torch.cuda.current_device())
        if dist.get_backend(process_group) == dist.Backend.NCCL
        else torch.device("cpu")
    )
    gathered = [torch.zeros(1, dtype=torch.int64, device=device) for _ in range(dist.get_world_size(process_group))]
    dist.all_gather(gathered, torch.tensor([own], dtype=torch.int64, device=device), group=process_group)
    return check_agreement(
        [int(value.item()) for value in gathered],
        own,
        unit="rank",
        this=f"this is rank {dist.get_rank(process_group)}, with {own}",
        remedy="Feed every controller the statistics returned by the distributed grad_stats, and start or "
        "restore every controller from the same state.",
    )
