"""The NumPy reference adapter against DESIGN.md's worked example and an explicit loop."""

from __future__ import annotations

import numpy as np
import pytest

import cabs
from cabs.backends import numpy as cabs_numpy

WORKED_GRADS = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, -2.0]])


def loop_statistics(losses, per_parameter_grads):
    """The oracle: an explicit loop over examples in float64."""
    count = len(losses)
    total = None
    sq_norm_sum = 0.0
    for index in range(count):
        example = np.concatenate([np.asarray(g[index], dtype=np.float64).ravel() for g in per_parameter_grads])
        sq_norm_sum += float(example @ example)
        total = example if total is None else total + example
    mean = total / count
    return float(np.mean(losses)), float(mean @ mean), sq_norm_sum


def test_module_attributes():
    assert cabs_numpy.name == "numpy"
    assert cabs_numpy.devices() == ["cpu"]
    assert isinstance(np.zeros(2), cabs_numpy.array_types())
    assert isinstance(np.float64(1.0), cabs_numpy.array_types())


def test_worked_example_of_the_design():
    stats = cabs_numpy.grad_stats_from_per_example(np.array([0.1, 0.2, 0.3, 0.4]), WORKED_GRADS)
    assert isinstance(stats, cabs.GradStats)
    assert int(stats.count) == 4
    assert stats.loss.dtype == np.float64 and stats.sq_norm_sum.dtype == np.float64
    np.testing.assert_allclose(stats.loss, 0.25, rtol=1e-15)
    np.testing.assert_allclose(stats.grad_sq_norm, 1.0, rtol=1e-15)  # mean gradient (1, 0)
    np.testing.assert_allclose(stats.sq_norm_sum, 18.0, rtol=1e-15)
    np.testing.assert_allclose(stats.variance_trace(ddof=0), 3.5, rtol=1e-15)
    np.testing.assert_allclose(stats.variance_trace(ddof=1), 14.0 / 3.0, rtol=1e-15)


@pytest.mark.parametrize("container", ["list", "tuple", "dict", "nested"])
def test_parameter_containers_match_the_loop(container):
    rng = np.random.default_rng(0)
    count = 7
    weight = rng.normal(size=(count, 3, 2))
    bias = rng.normal(size=(count, 2)).astype(np.float32)  # float32 input, float64 result
    losses = rng.uniform(size=count)
    grads = {
        "list": [weight, bias],
        "tuple": (weight, bias),
        "dict": {"weight": weight, "bias": bias},
        "nested": {"layer": {"weight": weight, "bias": [bias]}},
    }[container]
    stats = cabs_numpy.grad_stats_from_per_example(losses, grads)
    loss, grad_sq_norm, sq_norm_sum = loop_statistics(losses, [weight, bias])
    np.testing.assert_allclose(float(stats.loss), loss, rtol=1e-12)
    np.testing.assert_allclose(float(stats.grad_sq_norm), grad_sq_norm, rtol=1e-12)
    np.testing.assert_allclose(float(stats.sq_norm_sum), sq_norm_sum, rtol=1e-12)
    assert stats.grad_sq_norm.dtype == np.float64


def test_grad_stats_wraps_a_loss_and_grads_function():
    """Linear least squares: l_i = (w.x_i - y_i)^2 / 2, g_i = (w.x_i - y_i) x_i."""
    rng = np.random.default_rng(1)
    inputs, targets, weight = rng.normal(size=(9, 4)), rng.normal(size=9), rng.normal(size=4)

    def loss_and_grads(params, x, y):
        residual = x @ params["w"] - y
        return 0.5 * residual**2, {"w": residual[:, None] * x}

    stats = cabs_numpy.grad_stats(loss_and_grads, {"w": weight}, inputs, targets)
    per_example_losses = [0.5 * (weight @ x - y) ** 2 for x, y in zip(inputs, targets, strict=True)]
    per_example_grads = [np.stack([(weight @ x - y) * x for x, y in zip(inputs, targets, strict=True)])]
    loss, grad_sq_norm, sq_norm_sum = loop_statistics(per_example_losses, per_example_grads)
    np.testing.assert_allclose(float(stats.loss), loss, rtol=1e-12)
    np.testing.assert_allclose(float(stats.grad_sq_norm), grad_sq_norm, rtol=1e-12)
    np.testing.assert_allclose(float(stats.sq_norm_sum), sq_norm_sum, rtol=1e-12)


def test_single_example_has_zero_spread():
    stats = cabs_numpy.grad_stats_from_per_example(np.array([0.3]), np.array([[2.0, -1.0]]))
    assert int(stats.count) == 1
    np.testing.assert_allclose(stats.variance_trace(ddof=0), 0.0, atol=1e-15)
    with np.errstate(invalid="ignore", divide="ignore"):  # 0/0 is the documented outcome
        assert not np.isfinite(stats.variance_trace(ddof=1))


@pytest.mark.parametrize(
    ("losses", "grads", "match"),
    [
        (np.float64(0.5), WORKED_GRADS, "per-example losses"),
        (np.zeros((4, 1)), WORKED_GRADS, "per-example losses"),
        (np.zeros(0), np.zeros((0, 2)), "m >= 1"),
        (np.zeros(3), WORKED_GRADS, "m=3"),
        (np.zeros(4), [WORKED_GRADS, np.zeros(5)], "array 1"),
        (np.zeros(4), {}, "at least one array"),
    ],
)
def test_bad_input_is_refused(losses, grads, match):
    with pytest.raises(ValueError, match=match):
        cabs_numpy.grad_stats_from_per_example(losses, grads)


def test_bad_loss_and_grads_function_is_refused():
    with pytest.raises(TypeError, match="callable"):
        cabs_numpy.grad_stats(None, {}, None, None)
    with pytest.raises(ValueError, match="pair"):
        cabs_numpy.grad_stats(lambda params, x, y: np.zeros(3), {}, None, None)


def test_registry_finds_the_numpy_backend():
    from cabs.backends import get_backend

    assert get_backend(np.zeros(3)) is cabs_numpy
