"""The CABS rule as a pure ``(init, update)`` pair written against the Array API."""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable
from typing import Any, NamedTuple

from cabs._stats import GradStats
from cabs._xp import array_namespace

__all__ = ["CabsState", "Rule", "cabs", "validate_options"]

# Denominator guard used when a loss floor is set (DESIGN.md section 1).
_TINY = 1e-12
# Batch sizes are int32 arrays; float32 state holds integers exactly only up to 2**24.
_MAX_BATCH_SIZE = 2**31 - 1
_MAX_FLOAT32_BATCH_SIZE = 2**24


class CabsState(NamedTuple):
    """State of the rule; every field is a 0-d array.

    Attributes:
        step: number of ``update`` calls so far (int32).
        skipped: how many of them had non-finite statistics and were skipped (int32).
        xi_avg: running average of the gradient variance trace ``xi``.
        loss_avg: running average of the mini-batch loss.
        batch_size: the batch size to use for the next step (int32).
    """

    step: Any
    skipped: Any
    xi_avg: Any
    loss_avg: Any
    batch_size: Any


class Rule(NamedTuple):
    """A pair of pure functions, like an optax ``GradientTransformation``.

    Attributes:
        init: ``init(like) -> CabsState``; the 0-d floating array ``like`` fixes
            the array library, floating dtype and device of the state.
        update: ``update(stats, state) -> (batch_size, new_state)``; pure and
            traceable by ``jax.jit``, ``tf.function`` and ``torch.compile``.
    """

    init: Callable[[Any], CabsState]
    update: Callable[[GradStats, CabsState], tuple[Any, CabsState]]


def _check_number(name: str, value: Any, *, positive: bool = False, low: float | None = None) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a real number, got {name}={value!r}.")
    value = float(value)
    if not math.isfinite(value):
        raise ValueError(f"`{name}` must be finite, got {name}={value!r}.")
    if positive and value <= 0:
        raise ValueError(f"`{name}` must be > 0, got {name}={value!r}.")
    if low is not None and value < low:
        raise ValueError(f"`{name}` must be >= {low}, got {name}={value!r}.")
    return value


def _check_batch_size(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an integer, got {name}={value!r}.")
    value = int(value)
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {name}={value!r}. A batch needs at least one example.")
    if value > _MAX_BATCH_SIZE:
        raise ValueError(f"`{name}` must be <= 2**31 - 1 (batch sizes are int32), got {name}={value!r}.")
    return value


def _check_scalar_stats(stats: Any) -> None:
    """Shapes are static, so this check is safe under jit: broadcasting would corrupt the state."""
    if not isinstance(stats, tuple) or len(stats) != len(GradStats._fields):
        raise TypeError(f"`stats` must be a cabs.GradStats, got {type(stats).__name__}.")
    for name, value in zip(GradStats._fields, stats, strict=True):
        shape = tuple(getattr(value, "shape", ()))
        if shape != ():
            raise ValueError(
                f"`stats.{name}` must be a 0-d array (one value per batch), got shape {shape}. "
                f"Reduce per-example values to the batch statistics of cabs.GradStats first."
            )


def validate_options(
    learning_rate: float,
    *,
    min_batch_size: int = 16,
    max_batch_size: int = 2048,
    initial_batch_size: int | None = None,
    smoothing: float = 0.95,
    eps: float = 0.0,
    scale: float = 1.0,
    ddof: int = 0,
    loss_floor: float = 0.0,
    debias: bool = False,
) -> dict[str, Any]:
    """Check the options of :func:`cabs` and return them resolved, as plain Python values.

    ``initial_batch_size=None`` becomes ``min_batch_size``; NumPy scalars become ``int`` /
    ``float``, so two equivalent configurations compare equal and serialise to JSON.
    """
    learning_rate = _check_number("learning_rate", learning_rate, positive=True)
    min_batch_size = _check_batch_size("min_batch_size", min_batch_size)
    max_batch_size = _check_batch_size("max_batch_size", max_batch_size)
    if min_batch_size > max_batch_size:
        raise ValueError(
            f"`min_batch_size` must be <= `max_batch_size`, got min_batch_size={min_batch_size}, "
            f"max_batch_size={max_batch_size}. Swap them or widen the range."
        )
    if initial_batch_size is None:
        initial_batch_size = min_batch_size
    initial_batch_size = _check_batch_size("initial_batch_size", initial_batch_size)
    if not min_batch_size <= initial_batch_size <= max_batch_size:
        raise ValueError(
            f"`initial_batch_size` must lie in [min_batch_size, max_batch_size] = "
            f"[{min_batch_size}, {max_batch_size}], got initial_batch_size={initial_batch_size}."
        )
    smoothing = _check_number("smoothing", smoothing)
    if not 0.0 <= smoothing < 1.0:
        raise ValueError(
            f"`smoothing` must lie in [0, 1), got smoothing={smoothing!r}. 0 uses only the "
            f"current step; the reference value is 0.95."
        )
    eps = _check_number("eps", eps, low=0.0)
    scale = _check_number("scale", scale, positive=True)
    if isinstance(ddof, bool) or not isinstance(ddof, numbers.Integral) or ddof not in (0, 1):
        raise ValueError(f"`ddof` must be 0 or 1, got ddof={ddof!r}. 0 is the reference code, 1 the unbiased estimate.")
    loss_floor = _check_number("loss_floor", loss_floor)
    if not isinstance(debias, bool):
        raise TypeError(f"`debias` must be True or False, got debias={debias!r}.")

    return {
        "learning_rate": learning_rate,
        "min_batch_size": min_batch_size,
        "max_batch_size": max_batch_size,
        "initial_batch_size": initial_batch_size,
        "smoothing": smoothing,
        "eps": eps,
        "scale": scale,
        "ddof": int(ddof),
        "loss_floor": loss_floor,
        "debias": debias,
    }


def cabs(
    learning_rate: float,
    *,
    min_batch_size: int = 16,
    max_batch_size: int = 2048,
    initial_batch_size: int | None = None,
    smoothing: float = 0.95,
    eps: float = 0.0,
    scale: float = 1.0,
    ddof: int = 0,
    loss_floor: float = 0.0,
    debias: bool = False,
) -> Rule:
    """CABS: SGD with a coupled adaptive batch size (Balles et al., UAI 2017).

    After each step the next batch size is::

        clip(round(scale * learning_rate * xi_avg / (loss_avg - loss_floor + eps)),
             min_batch_size, max_batch_size)

    where ``xi`` is the trace of the per-example gradient covariance
    (:meth:`GradStats.variance_trace`) and both ``xi`` and the loss are smoothed
    with running averages. The defaults reproduce the authors' TensorFlow code.

    Paper symbols: ``learning_rate`` is alpha, ``smoothing`` mu, ``scale`` c,
    ``loss_floor`` L_min, ``xi`` tr(Sigma).

    Args:
        learning_rate: the constant SGD step size alpha (> 0).
        min_batch_size: lower clip bound, applied after rounding.
        max_batch_size: upper clip bound, applied after rounding.
        initial_batch_size: batch size of the first step; defaults to
            ``min_batch_size``.
        smoothing: running-average constant mu in [0, 1) for both xi and loss.
        eps: added to the denominator (>= 0).
        scale: the constant c (> 0).
        ddof: 0 divides the spread of the per-example gradients by m (reference
            code), 1 by m - 1 (unbiased).
        loss_floor: L_min, a lower bound of the loss. When set (not 0) the
            denominator is ``max(loss_avg - loss_floor, 1e-12) + eps``; a negative
            floor serves losses that can be negative.
        debias: correct the running averages for their start values 0 and 1 as
            Adam does (the reference code does not).

    Returns:
        A :class:`Rule` ``(init, update)``. Averages start at ``xi_avg = 0`` and
        ``loss_avg = 1``. A step whose loss or ``xi`` is not finite leaves the
        averages and the batch size unchanged and counts in ``state.skipped``.

    Example:
        >>> import numpy as np
        >>> import cabs
        >>> rule = cabs.cabs(learning_rate=0.1)
        >>> state = rule.init(np.asarray(0.0))
        >>> stats = cabs.GradStats(count=np.asarray(4), loss=np.asarray(2.3),
        ...                        grad_sq_norm=np.asarray(0.0),
        ...                        sq_norm_sum=np.asarray(400.0))
        >>> batch_size, state = rule.update(stats, state)
        >>> int(batch_size), float(state.xi_avg), float(state.loss_avg)
        (16, 5.0, 1.065)
    """
    options = validate_options(
        learning_rate,
        min_batch_size=min_batch_size,
        max_batch_size=max_batch_size,
        initial_batch_size=initial_batch_size,
        smoothing=smoothing,
        eps=eps,
        scale=scale,
        ddof=ddof,
        loss_floor=loss_floor,
        debias=debias,
    )
    learning_rate, smoothing, eps, scale = (options[k] for k in ("learning_rate", "smoothing", "eps", "scale"))
    min_batch_size, max_batch_size = options["min_batch_size"], options["max_batch_size"]
    initial_batch_size, ddof, loss_floor, debias = (
        options[k] for k in ("initial_batch_size", "ddof", "loss_floor", "debias")
    )

    coefficient = scale * learning_rate
    keep = 1.0 - smoothing

    def init(like: Any) -> CabsState:
        if not hasattr(like, "shape") or not hasattr(like, "dtype"):
            raise TypeError(
                f"`init` needs a 0-d floating array that fixes the library, dtype and device, "
                f"got {type(like).__name__}. Pass e.g. numpy.asarray(0.0) or torch.tensor(0.0)."
            )
        xp = array_namespace(like)
        if tuple(like.shape) != ():
            raise ValueError(
                f"`init` needs a 0-d floating array that fixes the library, dtype and device, "
                f"got shape {tuple(like.shape)}. Pass e.g. numpy.asarray(0.0)."
            )
        if like.dtype not in (xp.float32, xp.float64):
            raise TypeError(
                f"`init` needs a float32 or float64 array (state is kept in that dtype), "
                f"got dtype {like.dtype}. Pass e.g. numpy.asarray(0.0, dtype=numpy.float64)."
            )
        if like.dtype == xp.float32 and max_batch_size > _MAX_FLOAT32_BATCH_SIZE:
            raise ValueError(
                f"float32 state rounds batch sizes above 2**24, got max_batch_size={max_batch_size}. "
                f"Initialise the state with a float64 array."
            )
        zero_int = xp.full_like(like, 0, dtype=xp.int32)
        return CabsState(
            step=zero_int,
            skipped=zero_int,
            xi_avg=xp.full_like(like, 0.0),
            loss_avg=xp.full_like(like, 1.0),
            batch_size=xp.full_like(like, initial_batch_size, dtype=xp.int32),
        )

    def update(stats: GradStats, state: CabsState) -> tuple[Any, CabsState]:
        _check_scalar_stats(stats)
        xp = array_namespace(state.xi_avg)
        dtype = state.xi_avg.dtype
        stats = GradStats(*(xp.asarray(value, dtype=dtype) for value in stats))
        xi = stats.variance_trace(ddof=ddof)
        loss = stats.loss
        finite = xp.logical_and(xp.isfinite(xi), xp.isfinite(loss))
        # A non-finite step must not poison the averages: substitute before mixing.
        xi = xp.where(finite, xi, state.xi_avg)
        loss = xp.where(finite, loss, state.loss_avg)
        xi_avg = smoothing * state.xi_avg + keep * xi
        loss_avg = smoothing * state.loss_avg + keep * loss
        step = state.step + 1
        skipped = state.skipped + 1 - xp.astype(finite, xp.int32)
        if debias:
            # Remove the weight mu^t still on the start values (0 for xi, 1 for the loss).
            start_weight = smoothing ** xp.astype(step - skipped, dtype)
            correction = 1.0 - start_weight
            started = correction > 0
            safe = xp.where(started, correction, xp.full_like(correction, 1.0))
            xi_hat = xi_avg / safe
            loss_hat = xp.where(started, (loss_avg - start_weight) / safe, loss_avg)
        else:
            xi_hat, loss_hat = xi_avg, loss_avg
        if loss_floor != 0:
            denominator = xp.clip(loss_hat - loss_floor, min=_TINY) + eps
        else:
            denominator = loss_hat + eps
        raw = coefficient * (xi_hat / denominator)  # the reference code's order
        previous = xp.astype(state.batch_size, dtype)
        raw = xp.where(xp.isnan(raw), previous, raw)
        rounded = xp.clip(xp.round(raw), min=float(min_batch_size), max=float(max_batch_size))
        batch_size = xp.where(finite, xp.astype(rounded, xp.int32), state.batch_size)
        # asarray keeps 0-d arrays 0-d arrays (NumPy arithmetic returns scalars).
        new_state = CabsState(*(xp.asarray(x) for x in (step, skipped, xi_avg, loss_avg, batch_size)))
        batch_size = new_state.batch_size
        return batch_size, new_state

    return Rule(init=init, update=update)
