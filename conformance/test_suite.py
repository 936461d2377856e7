"""The conformance suite as pytest tests: one test per backend, problem, dtype and check.

``CABS_TEST_BACKENDS=torch,jax`` selects backends (a requested backend that cannot be
loaded is an error); by default every installed backend runs.
"""

from __future__ import annotations

import pytest

from cabs.conformance.checks import CHECKS, ConformanceError
from cabs.conformance.driver import get_driver
from cabs.conformance.problems import problem_names
from cabs.conformance.suite import DTYPES, SESSION_RESULTS, run_check, selected_backends

_drivers: dict = {}


def _driver(name: str):
    if name not in _drivers:
        _drivers[name] = get_driver(name)
    return _drivers[name]


@pytest.mark.parametrize("check", list(CHECKS))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("problem", problem_names())
@pytest.mark.parametrize("backend", selected_backends())
def test_conformance(backend: str, problem: str, dtype: str, check: str) -> None:
    driver = _driver(backend)
    result = run_check(driver, problem, dtype, check)
    SESSION_RESULTS.append(result)
    if result.status == "n/a":
        pytest.skip(result.message)
    if result.status == "fail":
        raise ConformanceError(result.message)
