"""NumPy reference adapter: gradient statistics from given per-example gradients, in float64.

This is the plainest statement of the statistics contract (DESIGN.md section 2): the
caller supplies per-example losses and per-example gradients, and the adapter sums
them in float64 with NumPy. Other backends are checked against the same formulas.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from cabs._stats import GradStats

__all__ = ["array_types", "devices", "grad_stats", "grad_stats_from_per_example", "name"]

name = "numpy"


def array_types() -> tuple[type, ...]:
    """The array types this backend handles."""
    return (np.ndarray, np.generic)


def devices() -> list[str]:
    """NumPy computes on the host only."""
    return ["cpu"]


def grad_stats_from_per_example(losses: Any, grads: Any) -> GradStats:
    """Statistics of one batch from its per-example losses and gradients, in float64.

    Args:
        losses: per-example losses, shape ``[m]``.
        grads: per-example gradients: one array ``[m, ...]`` or a (nested) list, tuple
            or dict of such arrays, one per parameter. Row ``i`` is the gradient of
            example ``i``'s own loss, not scaled by ``1/m``.

    Returns:
        :class:`cabs.GradStats` of 0-d NumPy arrays: ``count`` (int64), and ``loss``,
        ``grad_sq_norm``, ``sq_norm_sum`` in float64.

    Example:
        >>> import numpy as np
        >>> grads = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
        >>> stats = grad_stats_from_per_example(np.zeros(4), grads)
        >>> float(stats.variance_trace(ddof=0))
        3.5
    """
    losses = np.asarray(losses, dtype=np.float64)
    if losses.ndim != 1 or losses.shape[0] < 1:
        raise ValueError(
            f"`losses` must be per-example losses of shape [m] with m >= 1, got shape={losses.shape}. "
            f"Return one loss per example (no mean over the batch)."
        )
    count = losses.shape[0]
    leaves = _leaves(grads)
    if not leaves:
        raise ValueError(f"`grads` must hold at least one array of shape [m, ...], got grads={grads!r}.")
    flat = []
    for index, leaf in enumerate(leaves):
        leaf = np.asarray(leaf, dtype=np.float64)
        if leaf.ndim < 1 or leaf.shape[0] != count:
            raise ValueError(
                f"each array in `grads` must have the batch of m={count} examples on dim 0 (as `losses`), "
                f"got shape={leaf.shape} for array {index}. Pass per-example gradients, one row per example."
            )
        flat.append(leaf.reshape(count, -1))
    per_example = np.concatenate(flat, axis=1)
    mean_grad = per_example.mean(axis=0)
    return GradStats(
        count=np.asarray(count, dtype=np.int64),
        loss=np.asarray(losses.mean()),
        grad_sq_norm=np.asarray(np.dot(mean_grad, mean_grad)),
        sq_norm_sum=np.asarray(np.sum(per_example * per_example)),
    )


def grad_stats(
    loss_and_grads_fn: Callable[[Any, Any, Any], tuple[Any, Any]], params: Any, inputs: Any, targets: Any
) -> GradStats:
    """Statistics of one batch from a function that gives per-example losses and gradients.

    Args:
        loss_and_grads_fn: ``loss_and_grads_fn(params, inputs, targets)`` returning
            ``(losses, grads)`` as :func:`grad_stats_from_per_example` takes them.
        params: the model parameters, passed through unchanged.
        inputs: the batch inputs, passed through unchanged.
        targets: the batch targets, passed through unchanged.

    Returns:
        :class:`cabs.GradStats` of 0-d float64 NumPy arrays (``count`` int64).
    """
    if not callable(loss_and_grads_fn):
        raise TypeError(
            f"`loss_and_grads_fn` must be callable as fn(params, inputs, targets), got {loss_and_grads_fn!r}."
        )
    result = loss_and_grads_fn(params, inputs, targets)
    if not isinstance(result, tuple) or len(result) != 2:
        raise ValueError(
            f"`loss_and_grads_fn` must return a pair (per-example losses [m], per-example grads), "
            f"got {type(result).__name__}{f' of length {len(result)}' if isinstance(result, tuple) else ''}."
        )
    losses, grads = result
    return grad_stats_from_per_example(losses, grads)


def _leaves(tree: Any) -> list[Any]:
    """The arrays of a nested list / tuple / dict, in a fixed order."""
    if isinstance(tree, Mapping):
        return [leaf for key in tree for leaf in _leaves(tree[key])]
    if isinstance(tree, (list, tuple)):
        return [leaf for item in tree for leaf in _leaves(item)]
    return [tree]
