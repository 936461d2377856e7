"""Gradient moment statistics: the contract between the adapters and the rule."""

from __future__ import annotations

import numbers
from typing import Any, NamedTuple

from cabs._xp import array_namespace

__all__ = ["GradStats"]


class GradStats(NamedTuple):
    """Moment statistics of the per-example gradients of one batch.

    For a batch of ``m`` examples with per-example losses ``l_i`` and per-example
    gradients ``g_i`` (each the gradient of that example's own loss, never scaled
    by ``1/m``):

    Attributes:
        count: ``m``, the number of examples (an integer or floating 0-d array).
        loss: ``mean_i l_i``, the mean loss of the batch.
        grad_sq_norm: ``||mean_i g_i||^2``, the squared norm of the mean gradient.
        sq_norm_sum: ``sum_i ||g_i||^2``, the sum of squared per-example norms.

    All four are 0-d arrays of one array library. A ``GradStats`` is a NamedTuple,
    so it is a pytree for JAX, ``torch.utils._pytree`` and ``tf.nest``.

    Example:
        >>> import numpy as np
        >>> g = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
        >>> stats = GradStats(
        ...     count=np.asarray(4),
        ...     loss=np.asarray(0.5),
        ...     grad_sq_norm=np.sum(g.mean(axis=0) ** 2),
        ...     sq_norm_sum=np.sum(g**2),
        ... )
        >>> float(stats.variance_trace(ddof=0))
        3.5
    """

    count: Any
    loss: Any
    grad_sq_norm: Any
    sq_norm_sum: Any

    def variance_trace(self, ddof: int = 0) -> Any:
        """Trace ``xi`` of the per-example gradient covariance.

        ``xi = (sq_norm_sum - m * grad_sq_norm) / (m - ddof)``, clamped at 0 (the
        difference of two rounded sums can come out slightly negative).

        Args:
            ddof: 0 divides by ``m`` (the authors' reference code), 1 by ``m - 1``
                (the unbiased estimate of the paper).

        Returns:
            A 0-d floating array of the same library as ``sq_norm_sum``. With
            ``m - ddof == 0`` the result is not finite (NaN or inf), which the rule
            treats as a step without statistics.
        """
        if isinstance(ddof, bool) or not isinstance(ddof, numbers.Integral) or ddof not in (0, 1):
            raise ValueError(
                f"`ddof` must be 0 or 1, got ddof={ddof!r}. Use 0 for the reference code's estimate, 1 for the unbiased one."
            )
        xp = array_namespace(*self)
        sq_norm_sum = self.sq_norm_sum
        if isinstance(sq_norm_sum, (int, float)):
            sq_norm_sum = xp.asarray(float(sq_norm_sum), dtype=xp.float64)
        dtype = sq_norm_sum.dtype
        count = xp.asarray(self.count, dtype=dtype)
        grad_sq_norm = xp.asarray(self.grad_sq_norm, dtype=dtype)
        spread = sq_norm_sum - count * grad_sq_norm
        return xp.clip(spread / (count - float(ddof)), min=0.0)
