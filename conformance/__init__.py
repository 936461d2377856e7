"""cabs.conformance: the kit that proves a backend computes CABS correctly.

Canonical problems (NumPy weights and data from a seed), a float64 oracle with
hand-derived per-example gradients, one tolerance table, and checks that compare a
backend's statistics and batch sizes with the oracle. Built-in backends and third
parties run the same suite::

    python -m cabs.conformance --backend torch --backend jax
    pytest --pyargs cabs.conformance          # CABS_TEST_BACKENDS=torch,jax selects

A third-party backend implements one small :class:`BackendDriver` and exposes it as
``conformance_driver`` on its backend object; see docs/conformance.md.
"""

from cabs.conformance.checks import (
    CHECKS,
    ConformanceError,
    check_cabs_loop,
    check_permutation_invariance,
    check_scale_covariance,
    check_split_invariance,
    check_statistics,
    combine_micro_batches,
    oracle_trajectory,
)
from cabs.conformance.driver import BUILTIN_DRIVERS, BackendDriver, get_driver
from cabs.conformance.environment import prepare_environment
from cabs.conformance.oracle import OracleResult, example_loss_and_grads, linear_regression_closed_form, oracle_stats
from cabs.conformance.problems import PROBLEMS, Problem, get_problem, problem_names
from cabs.conformance.suite import CheckResult, format_table, run_check, run_suite, selected_backends
from cabs.conformance.tolerances import TOLERANCES, Tolerance, tolerance_for

__all__ = [
    "BUILTIN_DRIVERS",
    "CHECKS",
    "PROBLEMS",
    "TOLERANCES",
    "BackendDriver",
    "CheckResult",
    "ConformanceError",
    "OracleResult",
    "Problem",
    "Tolerance",
    "check_cabs_loop",
    "check_permutation_invariance",
    "check_scale_covariance",
    "check_split_invariance",
    "check_statistics",
    "combine_micro_batches",
    "example_loss_and_grads",
    "format_table",
    "get_driver",
    "get_problem",
    "linear_regression_closed_form",
    "oracle_stats",
    "oracle_trajectory",
    "prepare_environment",
    "problem_names",
    "run_check",
    "run_suite",
    "selected_backends",
    "tolerance_for",
]
