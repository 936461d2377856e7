"""Tests of the conformance kit itself: oracle, closed form, plug-in backends, broken backends, CLI."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest

import cabs
from cabs import backends
from cabs.conformance import (
    BackendDriver,
    ConformanceError,
    check_statistics,
    example_loss_and_grads,
    get_driver,
    get_problem,
    linear_regression_closed_form,
    oracle_stats,
    problem_names,
    run_suite,
)
from cabs.conformance.__main__ import main


def _central_differences(problem, params, example_input, example_target, step=1e-6):
    grads = {}
    for name, value in params.items():
        grad = np.zeros_like(value)
        for index in np.ndindex(value.shape):
            shifted_up = {key: array.copy() for key, array in params.items()}
            shifted_down = {key: array.copy() for key, array in params.items()}
            shifted_up[name][index] += step
            shifted_down[name][index] -= step
            up, _ = example_loss_and_grads(problem, shifted_up, example_input, example_target)
            down, _ = example_loss_and_grads(problem, shifted_down, example_input, example_target)
            grad[index] = (up - down) / (2 * step)
        grads[name] = grad
    return grads


@pytest.mark.parametrize("problem_name", problem_names())
def test_oracle_gradients_match_central_finite_differences(problem_name):
    problem = get_problem(problem_name)
    params = problem.init_params(seed=3)
    inputs, targets = problem.make_data(2, seed=3)
    for example_input, example_target in zip(inputs, targets, strict=True):
        _, grads = example_loss_and_grads(problem, params, example_input, example_target)
        numeric = _central_differences(problem, params, example_input, example_target)
        for name in problem.param_shapes():
            np.testing.assert_allclose(
                grads[name], numeric[name], rtol=1e-6, atol=1e-8, err_msg=f"{problem_name} {name}"
            )


def test_oracle_statistics_follow_their_definition_on_a_hand_example():
    # Softmax regression with zero weights: softmax is uniform, so every gradient is known.
    problem = get_problem("softmax_regression")
    params = {name: np.zeros(shape) for name, shape in problem.param_shapes().items()}
    inputs = np.array([[1.0, 0.0, 0.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    targets = np.array([0, 2])
    result = oracle_stats(problem, params, inputs, targets)
    first = np.concatenate([np.outer(inputs[0], [-2 / 3, 1 / 3, 1 / 3]).ravel(), [-2 / 3, 1 / 3, 1 / 3]])
    second = np.concatenate([np.outer(inputs[1], [1 / 3, 1 / 3, -2 / 3]).ravel(), [1 / 3, 1 / 3, -2 / 3]])
    assert result.loss == pytest.approx(np.log(3.0))
    assert result.sq_norm_sum == pytest.approx(first @ first + second @ second)
    mean = (first + second) / 2
    assert result.grad_sq_norm == pytest.approx(mean @ mean)
    assert result.xi(1) == pytest.approx(((first - mean) @ (first - mean) + (second - mean) @ (second - mean)) / 1)


def test_linear_regression_xi_converges_to_the_closed_form():
    problem = get_problem("linear_regression")
    params = problem.init_params(seed=0)
    inputs, targets = problem.make_data(40_000, seed=0)
    result = oracle_stats(problem, params, inputs, targets)
    loss, xi = linear_regression_closed_form(problem, params, seed=0)
    # Monte Carlo error of a mean of 40k fourth-moment terms is well under 3 %.
    assert result.loss == pytest.approx(loss, rel=0.03)
    assert result.xi(0) == pytest.approx(xi, rel=0.03)
    # A wrong formula (e.g. d instead of d + 1) is further off than that.
    delta = params["w"] - problem.true_weights(0)
    wrong = problem.sizes["features"] * (delta @ delta) + problem.sizes["features"] * problem.sizes["noise"] ** 2
    assert abs(result.xi(0) - wrong) > 0.03 * xi


class ToyDriver(BackendDriver):
    """A third-party NumPy backend: per-example gradients from the oracle, its own aggregation."""

    name = "toy"
    dtypes = ("float64", "float32")
    forget_mean = False

    def build(self, problem, params, dtype, *, loss_scale=1.0):
        return SimpleNamespace(problem=problem, params=params, dtype=dtype, loss_scale=loss_scale)

    def per_example(self, model, inputs, targets):
        losses, rows = [], {name: [] for name in model.params}
        for example_input, example_target in zip(inputs, targets, strict=True):
            loss, grads = example_loss_and_grads(model.problem, model.params, example_input, example_target)
            losses.append(model.loss_scale * loss)
            for name in rows:
                rows[name].append(model.loss_scale * grads[name])
        return np.asarray(losses, dtype=model.dtype), {
            name: np.asarray(value, dtype=model.dtype) for name, value in rows.items()
        }

    def grad_stats(self, model, inputs, targets):
        losses, grads = self.per_example(model, inputs, targets)
        count = len(losses)
        divisor = 1 if self.forget_mean else count
        mean_grad = {name: value.sum(axis=0) / divisor for name, value in grads.items()}
        stats = cabs.GradStats(
            count=np.asarray(count),
            loss=np.asarray(losses.mean()),
            grad_sq_norm=np.asarray(sum(np.sum(value * value) for value in mean_grad.values())),
            sq_norm_sum=np.asarray(sum(np.sum(value * value) for value in grads.values())),
        )
        return self.wrap(stats), mean_grad

    def wrap(self, stats):
        return stats

    def asarray(self, value):
        return np.asarray(value)

    def update_params(self, model, problem, params, dtype):
        model.params = params
        return model


class ForgetsMeanDriver(ToyDriver):
    """Broken: sums the gradients instead of averaging them (forgets the 1/m)."""

    name = "toy_forgets_mean"
    forget_mean = True


class AlwaysUnbiasedStats(cabs.GradStats):
    """Broken statistics: divide by m - 1 even when ddof 0 is asked for."""

    def variance_trace(self, ddof=0):
        return super().variance_trace(ddof=1)


class WrongDdofDriver(ToyDriver):
    """Broken: xi with ddof 1 where 0 is asked."""

    name = "toy_wrong_ddof"

    def wrap(self, stats):
        return AlwaysUnbiasedStats(*stats)


@pytest.fixture
def registered_toys():
    names = []
    for driver_class in (ToyDriver, ForgetsMeanDriver, WrongDdofDriver):
        backend = SimpleNamespace(
            name=driver_class.name,
            array_types=lambda: (),
            devices=lambda: ["cpu"],
            grad_stats=None,
            conformance_driver=driver_class,
        )
        backends.register(driver_class.name, backend)
        names.append(driver_class.name)
    yield names
    for name in names:
        backends.unregister(name)


def test_a_registered_third_party_backend_passes_the_whole_suite(registered_toys):
    assert "toy" in backends.available()
    results = run_suite(["toy"], problems=["softmax_regression", "tied_embedding"])
    assert len(results) == 2 * 2 * 5
    failures = [result.message for result in results if result.status != "pass"]
    assert not failures


@pytest.mark.parametrize(
    ("backend", "statistic"),
    [("toy_forgets_mean", "mean gradient mismatch"), ("toy_wrong_ddof", "xi (ddof=0) mismatch")],
)
def test_broken_backends_are_caught_with_a_message_naming_statistic_problem_backend_and_values(
    registered_toys, backend, statistic
):
    driver = get_driver(backend)
    problem = get_problem("mlp")
    with pytest.raises(ConformanceError) as caught:
        check_statistics(driver, problem, "float64")
    message = str(caught.value)
    assert statistic in message
    assert "'mlp'" in message and f"'{backend}'" in message
    assert message.count(" gives ") == 2  # both the backend's and the oracle's value


def test_wrong_ddof_message_shows_the_two_estimates(registered_toys):
    problem = get_problem("softmax_regression")
    params = problem.init_params(0)
    inputs, targets = problem.make_data(7, 0)
    expected = oracle_stats(problem, params, inputs, targets)
    with pytest.raises(ConformanceError) as caught:
        check_statistics(get_driver("toy_wrong_ddof"), problem, "float64")
    assert repr(expected.xi(1)) in str(caught.value)
    assert repr(expected.xi(0)) in str(caught.value)


def test_command_line_prints_the_table_and_fails_on_a_broken_backend(registered_toys, capsys):
    assert main(["--backend", "toy", "--problem", "mlp", "--check", "statistics"]) == 0
    output = capsys.readouterr().out
    assert "backend toy" in output and "| mlp" in output and "pass / pass" in output
    assert main(["--backend", "toy_forgets_mean", "--problem", "mlp", "--check", "statistics"]) == 1
    assert "FAIL mlp float64 statistics: mean gradient mismatch" in capsys.readouterr().out


def test_a_backend_without_a_driver_gets_a_clear_error():
    backends.register("driverless", SimpleNamespace(name="driverless", array_types=lambda: (), devices=lambda: []))
    try:
        with pytest.raises(TypeError, match="conformance_driver"):
            get_driver("driverless")
    finally:
        backends.unregister("driverless")


def test_builtin_backends_pass_statistics_on_every_problem(backend):
    results = run_suite([backend.name], checks=["statistics"])
    failures = [result.message for result in results if result.status == "fail"]
    assert not failures
    assert any(result.status == "pass" for result in results)


# --- the command line refuses a backend it cannot run before running any --------------------------


MISSING_FRAMEWORK = (
    "import sys; sys.modules['jax'] = None; from cabs.conformance.__main__ import main; sys.exit(main(sys.argv[1:]))"
)


@pytest.mark.parametrize(
    ("arguments", "named"),
    [
        (["--backend", "numpy", "--backend", "jax"], "jax"),
        (["--backend", "numpy", "--backend", "mxnet"], "mxnet"),
    ],
    ids=["framework-not-installed", "unknown-backend"],
)
def test_a_backend_that_cannot_run_is_one_line_error_before_any_check(arguments, named, tmp_path):
    import subprocess
    import sys

    # None in sys.modules makes `import jax` fail as if JAX were not installed.
    result = subprocess.run(
        [sys.executable, "-c", MISSING_FRAMEWORK, *arguments, "--problem", "linear_regression"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        timeout=300,
    )
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("python -m cabs.conformance: error:"), result.stderr
    assert named in lines[0]
    assert result.stdout == ""  # no table: the numpy backend did not run first
