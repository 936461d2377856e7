"""Property-based tests: random shapes, batches, data and weights on every installed backend.

Profiles: ``HYPOTHESIS_PROFILE=dev`` (default, few examples) or ``ci`` (more).
"""

from __future__ import annotations

import os

import hypothesis.extra.numpy as hnp
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cabs
from cabs.conformance import Problem, get_driver, oracle_stats, tolerance_for
from cabs.conformance.checks import backend_stats
from cabs.conformance.oracle import flatten
from cabs.conformance.tolerances import close

settings.register_profile("dev", max_examples=8, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.register_profile("ci", max_examples=40, deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "dev"))

# Batch sizes: 2 (the smallest with a ddof-1 variance) and sizes that are not a
# multiple of any power-of-two bucket, next to arbitrary ones.
BATCH_SIZES = st.sampled_from([2, 3, 5, 7, 11, 13]) | st.integers(2, 24)
VALUES = st.floats(-1.5, 1.5, allow_nan=False, allow_infinity=False, width=64)


@st.composite
def random_problems(draw):
    """A problem of random kind and sizes, with weights, inputs and targets drawn as NumPy arrays."""
    kind = draw(
        st.sampled_from(["linear_regression", "softmax_regression", "mlp", "cnn", "tied_embedding", "sequence"])
    )
    small = st.integers(1, 5)
    if kind == "linear_regression":
        sizes = {"features": draw(small)}
    elif kind == "softmax_regression":
        sizes = {"features": draw(small), "classes": draw(st.integers(2, 4))}
    elif kind == "mlp":
        sizes = {"features": draw(small), "hidden": draw(small), "classes": draw(st.integers(2, 4))}
    elif kind == "cnn":
        # Odd image sizes keep "same" padding with stride 2 symmetric (one pixel each side).
        channels = (draw(st.integers(1, 2)), draw(st.integers(1, 3)), draw(st.integers(1, 3)))
        sizes = {"channels": channels, "image_size": draw(st.sampled_from([5, 7])), "classes": draw(st.integers(2, 3))}
    elif kind == "tied_embedding":
        sizes = {"vocabulary": draw(st.integers(2, 6)), "features": draw(small), "time": draw(st.integers(1, 4))}
    else:
        sizes = {
            "vocabulary": draw(st.integers(2, 6)),
            "features": draw(small),
            "hidden": draw(small),
            "time": draw(st.integers(1, 4)),
            "classes": draw(st.integers(2, 3)),
        }
    problem = Problem(f"random_{kind}", kind, sizes)
    params = {
        name: draw(hnp.arrays(np.float64, shape, elements=VALUES)) for name, shape in problem.param_shapes().items()
    }
    count = draw(BATCH_SIZES)
    if kind in ("tied_embedding", "sequence"):
        inputs = draw(hnp.arrays(np.int64, (count, sizes["time"]), elements=st.integers(0, sizes["vocabulary"] - 1)))
    else:
        inputs = draw(hnp.arrays(np.float64, (count, *problem.input_shape()), elements=VALUES))
    if problem.classification:
        classes = sizes.get("classes", sizes.get("vocabulary"))
        targets = draw(hnp.arrays(np.int64, (count,), elements=st.integers(0, classes - 1)))
    else:
        targets = draw(hnp.arrays(np.float64, (count,), elements=VALUES))
    return problem, params, inputs, targets


@given(case=random_problems())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_statistics_match_the_oracle_for_random_problems(backend, case):
    problem, params, inputs, targets = case
    driver = get_driver(backend.name)
    expected = oracle_stats(problem, params, inputs, targets)
    actual, mean_grad = backend_stats(driver, driver.build(problem, params, "float64"), inputs, targets)
    tolerance = tolerance_for("float64")
    assert actual.count == expected.count
    for name, value, reference in [
        ("loss", actual.loss, expected.loss),
        ("grad_sq_norm", actual.grad_sq_norm, expected.grad_sq_norm),
        ("sq_norm_sum", actual.sq_norm_sum, expected.sq_norm_sum),
        ("xi0", actual.xi0, expected.xi(0)),
        ("xi1", actual.xi1, expected.xi(1)),
        ("mean gradient", flatten(mean_grad, problem), flatten(expected.mean_grad, problem)),
    ]:
        assert close(value, reference, tolerance), (
            f"{name} on {problem} with m={len(inputs)}: {backend.name} {value}, oracle {reference}"
        )


@given(case=random_problems())
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_float32_statistics_agree_with_float64(backend, case):
    problem, params, inputs, targets = case
    driver = get_driver(backend.name)
    if "float32" not in driver.dtypes:
        pytest.skip(f"{backend.name} computes in float64 only")
    params32 = {name: value.astype(np.float32) for name, value in params.items()}
    inputs32 = inputs.astype(np.float32) if inputs.dtype == np.float64 else inputs
    targets32 = targets.astype(np.float32) if targets.dtype == np.float64 else targets
    expected = oracle_stats(problem, params32, inputs32, targets32)
    actual, _ = backend_stats(driver, driver.build(problem, params32, "float32"), inputs32, targets32)
    # Cancellation in xi = (S - m |g|^2) / m is judged against S, the size of its terms.
    tolerance = tolerance_for("float32")
    assert close(actual.loss, expected.loss, tolerance)
    assert close(actual.sq_norm_sum, expected.sq_norm_sum, tolerance)
    scale = tolerance.rtol * expected.sq_norm_sum / expected.count + tolerance.atol
    assert abs(actual.xi0 - expected.xi(0)) <= 4 * scale, (actual.xi0, expected.xi(0))


def _batch_size(driver, dtype, *, xi, loss, learning_rate, count=8, **options):
    rule = cabs.cabs(learning_rate, **options)
    state = rule.init(driver.asarray(np.asarray(0.0, dtype=dtype)))
    stats = cabs.GradStats(
        count=driver.asarray(np.asarray(count, dtype=np.int64)),
        loss=driver.asarray(np.asarray(loss, dtype=dtype)),
        grad_sq_norm=driver.asarray(np.asarray(0.0, dtype=dtype)),
        sq_norm_sum=driver.asarray(np.asarray(count * xi, dtype=dtype)),
    )
    batch_size, state = rule.update(stats, state)
    return int(driver.to_numpy(batch_size)), state


POSITIVE = st.floats(1e-3, 1e3, allow_nan=False)


@given(
    xi=st.tuples(POSITIVE, POSITIVE).map(sorted),
    loss=st.tuples(POSITIVE, POSITIVE).map(sorted),
    learning_rate=st.tuples(st.floats(1e-3, 1.0), st.floats(1e-3, 1.0)).map(sorted),
    smoothing=st.sampled_from([0.0, 0.5, 0.95]),
    bounds=st.tuples(st.integers(1, 64), st.integers(1, 4096)).map(sorted),
    dtype=st.sampled_from(["float32", "float64"]),
)
@settings(suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
def test_controller_invariants(backend, xi, loss, learning_rate, smoothing, bounds, dtype):
    driver = get_driver(backend.name)
    options = {"smoothing": smoothing, "min_batch_size": bounds[0], "max_batch_size": bounds[1]}
    low_xi, high_xi = xi
    low_loss, high_loss = loss
    low_lr, high_lr = learning_rate
    base, state = _batch_size(driver, dtype, xi=low_xi, loss=low_loss, learning_rate=low_lr, **options)
    assert bounds[0] <= base <= bounds[1]
    # More variance or a larger step size never shrinks the batch; a larger loss never grows it.
    assert _batch_size(driver, dtype, xi=high_xi, loss=low_loss, learning_rate=low_lr, **options)[0] >= base
    assert _batch_size(driver, dtype, xi=low_xi, loss=low_loss, learning_rate=high_lr, **options)[0] >= base
    assert _batch_size(driver, dtype, xi=low_xi, loss=high_loss, learning_rate=low_lr, **options)[0] <= base
    assert np.asarray(driver.to_numpy(state.xi_avg)).dtype == np.dtype(dtype)
    assert np.asarray(driver.to_numpy(state.loss_avg)).dtype == np.dtype(dtype)
    assert np.asarray(driver.to_numpy(state.batch_size)).dtype == np.int32
    assert np.asarray(driver.to_numpy(state.step)).dtype == np.int32
