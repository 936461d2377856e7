"""The conformance checks: each compares one backend on one problem with the oracle.

Every check takes ``(driver, problem, dtype)``, returns a short note on success and
raises :class:`ConformanceError` (an ``AssertionError``) on failure, with a message
that names the statistic, the problem, the backend and both values.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any, NamedTuple

import numpy as np

import cabs
from cabs._stats import GradStats
from cabs.conformance.driver import BackendDriver
from cabs.conformance.oracle import flatten, oracle_stats
from cabs.conformance.problems import Problem, get_problem
from cabs.conformance.tolerances import Tolerance, close, tolerance_for
from cabs.data import BatchSampler

__all__ = [
    "CHECKS",
    "ConformanceError",
    "check_cabs_loop",
    "check_permutation_invariance",
    "check_scale_covariance",
    "check_split_invariance",
    "check_statistics",
    "combine_micro_batches",
    "oracle_trajectory",
]

# The CABS loop: SGD learning rate, rule options and data-set size. The rule's
# `scale` is calibrated per problem (see `_loop_scale`) so batch sizes move inside
# the bounds instead of sitting at a clip.
LOOP_LEARNING_RATE = 0.05
LOOP_OPTIONS = {"min_batch_size": 4, "max_batch_size": 32, "smoothing": 0.9}
LOOP_DATASET_SIZE = 64
LOOP_TARGET_RAW = 20.0
STATISTICS_BATCH_SIZE = 7
SPLIT_SIZES = (5, 4, 3)
SCALE_FACTOR = 8.0


class ConformanceError(AssertionError):
    """A backend disagrees with the oracle (or with itself under an invariance)."""


class NumpyStats(NamedTuple):
    """A backend's statistics converted to NumPy float64, plus its xi for both ddof."""

    count: float
    loss: float
    grad_sq_norm: float
    sq_norm_sum: float
    xi0: float
    xi1: float
    dtype: np.dtype


def _describe(problem: Problem, driver: BackendDriver, dtype: str) -> str:
    return f"on problem {problem.name!r}, backend {driver.name!r} ({dtype})"


def _expect_close(
    statistic: str,
    actual: Any,
    expected: Any,
    tolerance: Tolerance,
    where: str,
    labels: tuple[str, str] = ("backend", "oracle"),
) -> None:
    if not close(actual, expected, tolerance):
        raise ConformanceError(
            f"{statistic} mismatch {where}: {labels[0]} gives {_show(actual)}, {labels[1]} gives {_show(expected)} "
            f"(rtol={tolerance.rtol:g}, atol={tolerance.atol:g})"
        )


def _show(value: Any) -> str:
    value = np.asarray(value, dtype=np.float64)
    if value.ndim == 0:
        return repr(float(value))
    with np.printoptions(precision=12, threshold=8, edgeitems=3):
        return f"{value} (max |value| {np.max(np.abs(value)):.12g})"


def cast_params(params: dict[str, np.ndarray], dtype: str) -> dict[str, np.ndarray]:
    """Parameters in ``dtype`` (the oracle then sees exactly the rounded values)."""
    return {name: np.asarray(value, dtype=dtype) for name, value in params.items()}


def cast_batch(problem: Problem, inputs: np.ndarray, targets: np.ndarray, dtype: str) -> tuple[np.ndarray, np.ndarray]:
    """Float inputs and regression targets in ``dtype``; token ids and class ids stay int64."""
    if np.issubdtype(inputs.dtype, np.floating):
        inputs = inputs.astype(dtype)
    if not problem.classification:
        targets = targets.astype(dtype)
    return inputs, targets


def backend_stats(
    driver: BackendDriver, model: Any, inputs: np.ndarray, targets: np.ndarray
) -> tuple[NumpyStats, np.ndarray, dict]:
    """Run the driver; return its statistics in NumPy, its flattened mean gradient and the raw mean gradient."""
    stats, mean_grad = driver.grad_stats(model, inputs, targets)
    if not isinstance(stats, GradStats):
        raise ConformanceError(f"backend {driver.name!r} returned {type(stats).__name__}, not cabs.GradStats")
    values = [np.asarray(driver.to_numpy(value)) for value in stats]
    xi0, xi1 = (np.asarray(driver.to_numpy(stats.variance_trace(ddof=ddof))) for ddof in (0, 1))
    converted = NumpyStats(*(float(v) for v in (*values, xi0, xi1)), dtype=np.asarray(values[3]).dtype)
    return converted, mean_grad


def _flat(mean_grad: dict[str, np.ndarray], problem: Problem, where: str) -> np.ndarray:
    missing = [name for name in problem.param_shapes() if name not in mean_grad]
    if missing:
        raise ConformanceError(f"mean gradient {where} lacks parameters {missing}; got {sorted(mean_grad)}")
    for name, shape in problem.param_shapes().items():
        if tuple(np.shape(mean_grad[name])) != shape:
            raise ConformanceError(
                f"mean gradient of {name} {where} has shape {np.shape(mean_grad[name])}, expected {shape}"
            )
    return flatten(mean_grad, problem)


def _data(problem: Problem, count: int, dtype: str, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray, np.ndarray]:
    params = cast_params(problem.init_params(seed), dtype)
    inputs, targets = cast_batch(problem, *problem.make_data(count, seed), dtype)
    return params, inputs, targets


def check_statistics(
    driver: BackendDriver, problem: Problem, dtype: str, *, seed: int = 0, batch_size: int = STATISTICS_BATCH_SIZE
) -> str:
    """Loss, mean gradient, grad_sq_norm, sq_norm_sum and xi (ddof 0 and 1) against the oracle."""
    tolerance = tolerance_for(dtype)
    where = _describe(problem, driver, dtype)
    params, inputs, targets = _data(problem, batch_size, dtype, seed)
    expected = oracle_stats(problem, params, inputs, targets)
    actual, mean_grad = backend_stats(driver, driver.build(problem, params, dtype), inputs, targets)
    if actual.count != expected.count:
        raise ConformanceError(f"count mismatch {where}: backend gives {actual.count}, oracle gives {expected.count}")
    if dtype == "float64" and actual.dtype != np.float64:
        raise ConformanceError(
            f"sq_norm_sum dtype mismatch {where}: backend gives {actual.dtype}, oracle gives float64"
        )
    _expect_close("loss", actual.loss, expected.loss, tolerance, where)
    _expect_close(
        "mean gradient", _flat(mean_grad, problem, where), flatten(expected.mean_grad, problem), tolerance, where
    )
    _expect_close("grad_sq_norm", actual.grad_sq_norm, expected.grad_sq_norm, tolerance, where)
    _expect_close("sq_norm_sum", actual.sq_norm_sum, expected.sq_norm_sum, tolerance, where)
    _expect_close("xi (ddof=0)", actual.xi0, expected.xi(0), tolerance, where)
    _expect_close("xi (ddof=1)", actual.xi1, expected.xi(1), tolerance, where)
    return f"m={batch_size}: loss, mean gradient, grad_sq_norm, sq_norm_sum, xi ddof 0/1 match"


def combine_micro_batches(parts: list[tuple[NumpyStats, np.ndarray]]) -> tuple[NumpyStats, np.ndarray]:
    """Combine micro-batch results as DESIGN.md section 6 says.

    Count, loss sum and sq_norm_sum add; the gradient sums add; grad_sq_norm is formed
    once from the combined mean gradient.
    """
    count = sum(stats.count for stats, _ in parts)
    loss = sum(stats.loss * stats.count for stats, _ in parts) / count
    mean_grad = sum(grad * stats.count for stats, grad in parts) / count
    sq_norm_sum = sum(stats.sq_norm_sum for stats, _ in parts)
    grad_sq_norm = float(mean_grad @ mean_grad)
    combined = GradStats(*(np.asarray(v) for v in (count, loss, grad_sq_norm, sq_norm_sum)))
    xi0, xi1 = (float(combined.variance_trace(ddof=ddof)) for ddof in (0, 1))
    return NumpyStats(count, loss, grad_sq_norm, sq_norm_sum, xi0, xi1, np.dtype(np.float64)), mean_grad


def _compare_batches(
    statistics: NumpyStats,
    grad: np.ndarray,
    reference: NumpyStats,
    reference_grad: np.ndarray,
    tolerance,
    where,
    labels,
):
    if statistics.count != reference.count:
        raise ConformanceError(
            f"count mismatch {where}: {labels[0]} gives {statistics.count}, {labels[1]} gives {reference.count}"
        )
    for field in ("loss", "grad_sq_norm", "sq_norm_sum"):
        _expect_close(field, getattr(statistics, field), getattr(reference, field), tolerance, where, labels)
    _expect_close("xi (ddof=0)", statistics.xi0, reference.xi0, tolerance, where, labels)
    _expect_close("xi (ddof=1)", statistics.xi1, reference.xi1, tolerance, where, labels)
    _expect_close("mean gradient", grad, reference_grad, tolerance, where, labels)


def check_split_invariance(
    driver: BackendDriver, problem: Problem, dtype: str, *, seed: int = 0, split_sizes: tuple[int, ...] = SPLIT_SIZES
) -> str:
    """One batch vs the same batch in uneven micro-batches, combined per DESIGN.md section 6."""
    tolerance = tolerance_for(dtype)
    where = _describe(problem, driver, dtype)
    params, inputs, targets = _data(problem, sum(split_sizes), dtype, seed)
    model = driver.build(problem, params, dtype)
    whole, whole_grad = backend_stats(driver, model, inputs, targets)
    parts, start = [], 0
    for size in split_sizes:
        stats, grad = backend_stats(driver, model, inputs[start : start + size], targets[start : start + size])
        parts.append((stats, _flat(grad, problem, where)))
        start += size
    combined, combined_grad = combine_micro_batches(parts)
    labels = (f"{len(split_sizes)} micro-batches {split_sizes}", "the whole batch")
    _compare_batches(combined, combined_grad, whole, _flat(whole_grad, problem, where), tolerance, where, labels)
    return f"micro-batches {split_sizes} combine to the whole batch's statistics"


def check_permutation_invariance(
    driver: BackendDriver, problem: Problem, dtype: str, *, seed: int = 0, batch_size: int = 9
) -> str:
    """Reordering the examples of a batch leaves every statistic unchanged."""
    tolerance = tolerance_for(dtype)
    where = _describe(problem, driver, dtype)
    params, inputs, targets = _data(problem, batch_size, dtype, seed)
    model = driver.build(problem, params, dtype)
    order = np.random.default_rng([seed, 7]).permutation(batch_size)
    original, original_grad = backend_stats(driver, model, inputs, targets)
    permuted, permuted_grad = backend_stats(driver, model, inputs[order], targets[order])
    labels = ("the permuted batch", "the original order")
    _compare_batches(
        permuted,
        _flat(permuted_grad, problem, where),
        original,
        _flat(original_grad, problem, where),
        tolerance,
        where,
        labels,
    )
    return f"a permutation of {batch_size} examples changes nothing"


def _rounds_differently(raw: float, first: int, second: int, tolerance: Tolerance) -> bool:
    """Whether two batch sizes may differ because ``raw`` sits within tolerance of a .5 boundary."""
    if abs(first - second) != 1:
        return False
    boundary = math.floor(raw) + 0.5
    return abs(raw - boundary) <= tolerance.boundary_rtol * max(abs(raw), 1.0)


def check_scale_covariance(
    driver: BackendDriver, problem: Problem, dtype: str, *, seed: int = 0, factor: float = SCALE_FACTOR
) -> str:
    """Loss times k with learning rate / k gives the same batch size (smoothing 0, no clipping)."""
    tolerance = tolerance_for(dtype)
    where = _describe(problem, driver, dtype)
    params, inputs, targets = _data(problem, 27, dtype, seed)
    plain = driver.build(problem, params, dtype)
    scaled = driver.build(problem, params, dtype, loss_scale=factor)
    options = {"smoothing": 0.0, "min_batch_size": 1, "max_batch_size": 10**6}
    start = 0
    for size in (5, 9, 13):
        batch = slice(start, start + size)
        start += size
        reference = oracle_stats(problem, params, inputs[batch], targets[batch])
        # Put the raw batch size at 37.3, away from a rounding boundary.
        coefficient = 37.3 * reference.loss / (LOOP_LEARNING_RATE * reference.xi(0))
        sizes = []
        for model, learning_rate, multiplier in (
            (plain, LOOP_LEARNING_RATE, 1.0),
            (scaled, LOOP_LEARNING_RATE / factor, factor),
        ):
            stats, _ = driver.grad_stats(model, inputs[batch], targets[batch])
            loss = float(driver.to_numpy(stats.loss))
            _expect_close(f"loss with loss scale {multiplier:g}", loss, multiplier * reference.loss, tolerance, where)
            sq_norm_sum = float(driver.to_numpy(stats.sq_norm_sum))
            _expect_close(
                f"sq_norm_sum with loss scale {multiplier:g}",
                sq_norm_sum,
                multiplier**2 * reference.sq_norm_sum,
                tolerance,
                where,
            )
            rule = cabs.cabs(learning_rate, scale=coefficient, **options)
            state = rule.init(driver.asarray(np.asarray(0.0, dtype=dtype)))
            batch_size, _ = rule.update(stats, state)
            sizes.append(int(driver.to_numpy(batch_size)))
        if sizes[0] != sizes[1]:
            raise ConformanceError(
                f"batch size mismatch under loss scale {factor:g} with learning rate / {factor:g} {where}: "
                f"scaled gives {sizes[1]}, unscaled gives {sizes[0]} (raw about 37.3)"
            )
    return f"loss x {factor:g} with lr / {factor:g}: same batch sizes, loss x {factor:g}, sq_norm_sum x {factor**2:g}"


def _sampler(seed: int) -> BatchSampler:
    """The loop's sampler: seeded permutations per epoch, batches cut from one index stream."""
    # The batch size is passed to `draw` at every step; the constructor's is unused.
    return BatchSampler(LOOP_DATASET_SIZE, batch_size=1, seed=seed)


class Trajectory(NamedTuple):
    """The oracle's CABS run: what each step used and what the rule answered."""

    rule_options: dict[str, Any]
    used_batch_sizes: tuple[int, ...]
    next_batch_sizes: tuple[int, ...]
    raw_batch_sizes: tuple[float, ...]


def _loop_scale(problem: Problem, seed: int) -> float:
    """The rule's constant c that puts the raw batch size near the target at the start."""
    params = problem.init_params(seed)
    inputs, targets = problem.make_data(LOOP_DATASET_SIZE, seed)
    reference = oracle_stats(problem, params, inputs, targets)
    return float(f"{LOOP_TARGET_RAW * reference.loss / (LOOP_LEARNING_RATE * reference.xi(0)):.3g}")


@functools.cache
def oracle_trajectory(problem_name: str, steps: int = 100, seed: int = 0) -> Trajectory:
    """Run CABS for ``steps`` steps on the oracle in float64 (cached)."""
    problem = get_problem(problem_name)
    options = {**LOOP_OPTIONS, "scale": _loop_scale(problem, seed)}
    rule = cabs.cabs(LOOP_LEARNING_RATE, **options)
    state = rule.init(np.asarray(0.0))
    params = problem.init_params(seed)
    inputs, targets = problem.make_data(LOOP_DATASET_SIZE, seed)
    sampler = _sampler(seed)
    used, answered, raw = [], [], []
    batch_size = int(state.batch_size)
    for _ in range(steps):
        indices = sampler.draw(batch_size)
        result = oracle_stats(problem, params, inputs[indices], targets[indices])
        stats = GradStats(
            *(np.asarray(v) for v in (result.count, result.loss, result.grad_sq_norm, result.sq_norm_sum))
        )
        next_size, state = rule.update(stats, state)
        used.append(batch_size)
        answered.append(int(next_size))
        raw.append(float(options["scale"] * LOOP_LEARNING_RATE * (state.xi_avg / state.loss_avg)))
        params = {name: params[name] - LOOP_LEARNING_RATE * result.mean_grad[name] for name in params}
        batch_size = int(next_size)
    return Trajectory(options, tuple(used), tuple(answered), tuple(raw))


def check_cabs_loop(driver: BackendDriver, problem: Problem, dtype: str, *, steps: int = 100, seed: int = 0) -> str:
    """The whole CABS loop for ``steps`` SGD steps gives the oracle's integer batch sizes.

    The backend computes the statistics, runs the rule on its own arrays and updates its
    own parameters; the batches follow the oracle's batch sizes, so one rounding
    difference (allowed in float32 at a .5 boundary) does not change later batches.
    """
    tolerance = tolerance_for(dtype)
    where = _describe(problem, driver, dtype)
    trajectory = oracle_trajectory(problem.name, steps, seed)
    rule = cabs.cabs(LOOP_LEARNING_RATE, **trajectory.rule_options)
    state = rule.init(driver.asarray(np.asarray(0.0, dtype=dtype)))
    params = cast_params(problem.init_params(seed), dtype)
    inputs, targets = cast_batch(problem, *problem.make_data(LOOP_DATASET_SIZE, seed), dtype)
    sampler = _sampler(seed)
    model = driver.build(problem, params, dtype)
    boundary_steps = []
    for step, (used, expected, raw) in enumerate(
        zip(trajectory.used_batch_sizes, trajectory.next_batch_sizes, trajectory.raw_batch_sizes, strict=True)
    ):
        indices = sampler.draw(used)
        model = driver.update_params(model, problem, params, dtype)
        stats, mean_grad = driver.grad_stats(model, inputs[indices], targets[indices])
        batch_size, state = rule.update(stats, state)
        actual = int(driver.to_numpy(batch_size))
        if actual != expected:
            if dtype == "float64" or not _rounds_differently(raw, actual, expected, tolerance):
                raise ConformanceError(
                    f"batch size mismatch at CABS step {step} {where}: backend gives {actual}, oracle gives "
                    f"{expected} (oracle raw value {raw!r})"
                )
            boundary_steps.append(step)
        state_dtype = np.asarray(driver.to_numpy(state.xi_avg)).dtype
        if state_dtype != np.dtype(dtype):
            raise ConformanceError(
                f"state dtype mismatch at CABS step {step} {where}: backend gives {state_dtype}, expected {dtype}"
            )
        params = {
            name: (params[name] - LOOP_LEARNING_RATE * np.asarray(mean_grad[name])).astype(dtype) for name in params
        }
    low, high = min(trajectory.used_batch_sizes), max(trajectory.used_batch_sizes)
    note = f"{steps} steps, batch sizes {low}..{high} identical"
    if boundary_steps:
        note += f" except at .5 rounding boundaries (steps {boundary_steps}, allowed in {dtype})"
    return note


CHECKS: dict[str, Callable[..., str]] = {
    "statistics": check_statistics,
    "split": check_split_invariance,
    "permutation": check_permutation_invariance,
    "scale": check_scale_covariance,
    "cabs_loop": check_cabs_loop,
}
"""The checks in the order the suite runs them."""
