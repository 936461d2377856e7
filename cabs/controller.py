"""A stateful wrapper around the pure rule for eager training loops."""

from __future__ import annotations

import math
import warnings
from typing import Any

import numpy as np

from cabs._rule import CabsState, cabs, validate_options
from cabs._stats import GradStats

__all__ = ["Controller"]

_STATE_DICT_VERSION = 1


def _to_float(name: str, value: Any) -> float:
    try:
        return float(value)
    except (TypeError, ValueError) as error:
        raise TypeError(
            f"`stats.{name}` must be a 0-d array or a number, got {type(value).__name__} "
            f"with shape {getattr(value, 'shape', '?')}. Build GradStats from scalars."
        ) from error


class Controller:
    """CABS for an eager loop: holds the state, gives the batch size as an int.

    The state is kept in NumPy float64 whatever library the statistics come from,
    so the controller works the same for every backend and its ``state_dict`` is
    plain Python numbers.

    Args:
        learning_rate: the SGD step size.
        on_nonfinite: ``"skip"`` (default) leaves averages and batch size unchanged
            on a step whose loss or statistics are not finite, counts it in
            :attr:`skipped` and warns once; ``"raise"`` raises ``FloatingPointError``.
        **options: every other keyword of :func:`cabs.cabs`.

    Example:
        >>> import cabs
        >>> ctl = cabs.Controller(learning_rate=0.1)
        >>> ctl.batch_size
        16
        >>> ctl.step(cabs.GradStats(count=4, loss=0.5, grad_sq_norm=0.0, sq_norm_sum=800.0))
        16
    """

    def __init__(self, learning_rate: float, *, on_nonfinite: str = "skip", **options: Any) -> None:
        if on_nonfinite not in ("skip", "raise"):
            raise ValueError(f"`on_nonfinite` must be 'skip' or 'raise', got on_nonfinite={on_nonfinite!r}.")
        self._rule = cabs(learning_rate, **options)
        # Resolved options (defaults filled in, plain Python numbers): equivalent
        # configurations compare equal in load_state_dict and serialise to JSON.
        self._config = {**validate_options(learning_rate, **options), "on_nonfinite": on_nonfinite}
        self._on_nonfinite = on_nonfinite
        self._state: CabsState = self._rule.init(np.asarray(0.0, dtype=np.float64))
        self._warned = False
        self.xi: float = math.nan
        """The variance trace ``xi`` of the last step (NaN before the first)."""

    @property
    def batch_size(self) -> int:
        """The batch size for the next step."""
        return int(self._state.batch_size)

    @property
    def state(self) -> CabsState:
        """The rule's state (0-d NumPy arrays)."""
        return self._state

    @property
    def skipped(self) -> int:
        """How many steps had non-finite statistics and were skipped."""
        return int(self._state.skipped)

    @property
    def steps(self) -> int:
        """How many steps the controller has seen."""
        return int(self._state.step)

    def step(self, stats: GradStats) -> int:
        """Feed one batch's statistics; return the next batch size.

        Raises:
            TypeError: ``stats`` is not a :class:`GradStats` of scalars.
            ValueError: the count is below 1, or the loss is negative while no
                ``loss_floor`` is set (CABS divides by the loss).
            FloatingPointError: a non-finite step with ``on_nonfinite="raise"``.
        """
        if not isinstance(stats, GradStats):
            raise TypeError(
                f"`stats` must be a cabs.GradStats, got {type(stats).__name__}. Get one from a "
                f"backend's grad_stats(...) or build cabs.GradStats(count=, loss=, grad_sq_norm=, sq_norm_sum=)."
            )
        values = GradStats(
            *(
                np.asarray(_to_float(name, v), dtype=np.float64)
                for name, v in zip(GradStats._fields, stats, strict=True)
            )
        )
        self._check_values(values)
        with np.errstate(all="ignore"):  # 0/0 for one example with ddof=1 is a skipped step, not a warning
            xi = float(values.variance_trace(ddof=self._config["ddof"]))
            self.xi = xi
            if not (math.isfinite(xi) and math.isfinite(float(values.loss))):
                self._non_finite(values, xi)
            _, self._state = self._rule.update(values, self._state)
        return self.batch_size

    def _check_values(self, values: GradStats) -> None:
        count, loss = float(values.count), float(values.loss)
        if not count >= 1:
            raise ValueError(f"`stats.count` must be >= 1 (the number of examples in the batch), got count={count!r}.")
        if loss < 0 and self._config["loss_floor"] == 0.0:
            raise ValueError(
                f"CABS divides by the loss, which must be positive, got loss={loss!r}. For a loss that can "
                f"be negative, pass loss_floor=<a lower bound of the loss> (the denominator is then "
                f"loss - loss_floor)."
            )

    def _non_finite(self, values: GradStats, xi: float) -> None:
        loss, count = float(values.loss), float(values.count)
        if count == 1 and self._config["ddof"] == 1 and math.isfinite(loss):
            reason = "a batch of one example has no variance with ddof=1"
        else:
            reason = f"non-finite CABS statistics: loss={loss!r}, xi={xi!r} (count={count!r})"
        if self._on_nonfinite == "raise":
            raise FloatingPointError(
                f"{reason}. Check the loss for overflow, or pass on_nonfinite='skip' to leave such "
                f"steps out of the averages."
            )
        if not self._warned:
            warnings.warn(
                f"skipping a step: {reason}; the averages and batch size stay unchanged. Further skips "
                f"are counted in Controller.skipped without a warning.",
                RuntimeWarning,
                stacklevel=3,
            )
            self._warned = True

    def state_dict(self) -> dict[str, Any]:
        """The controller's configuration and state as plain Python values."""
        state = {
            "step": int(self._state.step),
            "skipped": int(self._state.skipped),
            "xi_avg": float(self._state.xi_avg),
            "loss_avg": float(self._state.loss_avg),
            "batch_size": int(self._state.batch_size),
        }
        return {"version": _STATE_DICT_VERSION, "config": dict(self._config), "state": state}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        """Restore a ``state_dict``; refuses one from a different configuration."""
        if not isinstance(state_dict, dict) or not {"version", "config", "state"} <= set(state_dict):
            raise ValueError(
                "`state_dict` must be a dict from Controller.state_dict() with keys "
                f"'version', 'config', 'state', got {type(state_dict).__name__} "
                f"with keys {sorted(state_dict) if isinstance(state_dict, dict) else '-'}."
            )
        if state_dict["version"] != _STATE_DICT_VERSION:
            raise ValueError(
                f"unsupported controller state_dict version {state_dict['version']!r}; this cabs writes version {_STATE_DICT_VERSION}."
            )
        config = state_dict["config"]
        if not isinstance(config, dict):
            raise ValueError(f"`state_dict['config']` must be a dict, got {type(config).__name__}.")
        differ = {
            key: (config.get(key), self._config.get(key))
            for key in set(config) | set(self._config)
            if config.get(key) != self._config.get(key)
        }
        if differ:
            text = ", ".join(f"{key}: saved {saved!r}, here {here!r}" for key, (saved, here) in sorted(differ.items()))
            raise ValueError(
                f"the saved controller has a different configuration ({text}). Create the Controller with the saved options."
            )
        self._state = self._checked_state(state_dict["state"])

    def _checked_state(self, saved: Any) -> CabsState:
        """The saved state as arrays, refusing values the rule could never have produced."""
        fields = ("step", "skipped", "xi_avg", "loss_avg", "batch_size")
        if not isinstance(saved, dict) or set(fields) - set(saved):
            keys = sorted(saved) if isinstance(saved, dict) else type(saved).__name__
            raise ValueError(f"`state_dict['state']` must be a dict with keys {list(fields)}, got {keys}.")
        counts = {}
        for name in ("step", "skipped", "batch_size"):
            value = saved[name]
            if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
                raise ValueError(f"saved `{name}` must be an integer, got {name}={value!r}.")
            counts[name] = int(value)
        averages = {}
        for name in ("xi_avg", "loss_avg"):
            value = saved[name]
            if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
                raise ValueError(f"saved `{name}` must be a number, got {name}={value!r}.")
            if not math.isfinite(float(value)):
                raise ValueError(f"saved `{name}` must be finite, got {name}={value!r}; the checkpoint is damaged.")
            averages[name] = float(value)
        low, high = self._config["min_batch_size"], self._config["max_batch_size"]
        if not low <= counts["batch_size"] <= high:
            raise ValueError(
                f"saved `batch_size` must lie in [min_batch_size, max_batch_size] = [{low}, {high}], "
                f"got batch_size={counts['batch_size']}; the checkpoint is damaged."
            )
        if not 0 <= counts["skipped"] <= counts["step"] < 2**31:
            raise ValueError(
                f"saved counters must satisfy 0 <= skipped <= step < 2**31, got step={counts['step']}, "
                f"skipped={counts['skipped']}; the checkpoint is damaged."
            )
        if averages["xi_avg"] < 0:
            raise ValueError(f"saved `xi_avg` must be >= 0 (a variance), got xi_avg={averages['xi_avg']!r}.")
        return CabsState(
            step=np.asarray(counts["step"], dtype=np.int32),
            skipped=np.asarray(counts["skipped"], dtype=np.int32),
            xi_avg=np.asarray(averages["xi_avg"], dtype=np.float64),
            loss_avg=np.asarray(averages["loss_avg"], dtype=np.float64),
            batch_size=np.asarray(counts["batch_size"], dtype=np.int32),
        )
