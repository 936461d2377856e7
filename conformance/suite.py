"""Run the conformance checks over backends and problems; format the result table."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable
from typing import NamedTuple

from cabs.conformance.checks import CHECKS, ConformanceError
from cabs.conformance.driver import BackendDriver, get_driver
from cabs.conformance.problems import get_problem, problem_names

__all__ = ["CheckResult", "run_check", "run_suite", "format_table", "selected_backends"]

DTYPES = ("float64", "float32")

SESSION_RESULTS: list = []
"""Results collected by the pytest module, printed as a table at the end of the session."""


class CheckResult(NamedTuple):
    """The outcome of one check of one backend on one problem in one dtype.

    Attributes:
        backend: backend name.
        problem: problem name.
        dtype: ``"float64"`` or ``"float32"``.
        check: check name (a key of :data:`cabs.conformance.CHECKS`).
        status: ``"pass"``, ``"fail"`` or ``"n/a"`` (dtype not supported by the backend).
        message: the check's note, or the failure message.
        seconds: wall time of the check.
    """

    backend: str
    problem: str
    dtype: str
    check: str
    status: str
    message: str
    seconds: float


def run_check(driver: BackendDriver, problem_name: str, dtype: str, check: str) -> CheckResult:
    """Run one check; failures are caught and reported as ``status="fail"``."""
    if dtype not in driver.dtypes:
        return CheckResult(
            driver.name, problem_name, dtype, check, "n/a", f"{driver.name} does not compute in {dtype}", 0.0
        )
    start = time.perf_counter()
    try:
        message = CHECKS[check](driver, get_problem(problem_name), dtype)
        status = "pass"
    except ConformanceError as error:
        message, status = str(error), "fail"
    return CheckResult(driver.name, problem_name, dtype, check, status, message, time.perf_counter() - start)


def run_suite(
    backends: Iterable[str],
    *,
    problems: Iterable[str] | None = None,
    dtypes: Iterable[str] = DTYPES,
    checks: Iterable[str] | None = None,
) -> list[CheckResult]:
    """Run every selected check for every backend, problem and dtype.

    Args:
        backends: backend names (built-in, registered, or from the ``cabs.backends``
            entry-point group).
        problems: problem names; all canonical problems by default.
        dtypes: ``"float64"`` and/or ``"float32"``.
        checks: check names; all of :data:`cabs.conformance.CHECKS` by default.

    Returns:
        One :class:`CheckResult` per combination, in a fixed order.

    Raises:
        ModuleNotFoundError: a backend's framework is not installed (before any check runs).
        ValueError: an unknown backend, problem or check name.
    """
    problems = list(problem_names() if problems is None else problems)
    checks = list(CHECKS if checks is None else checks)
    unknown = [name for name in checks if name not in CHECKS]
    if unknown:
        raise ValueError(f"`checks` must name checks from {list(CHECKS)}, got checks={unknown}.")
    unknown_problems = [name for name in problems if name not in problem_names()]
    if unknown_problems:
        raise ValueError(f"`problems` must name problems from {problem_names()}, got problems={unknown_problems}.")
    # Every backend is loaded before any runs: a missing framework must fail at once, not after
    # minutes of checks of the backends before it.
    drivers = {backend: get_driver(backend) for backend in dict.fromkeys(backends)}
    results = []
    for driver in drivers.values():
        for problem in problems:
            for dtype in dtypes:
                for check in checks:
                    results.append(run_check(driver, problem, dtype, check))
    return results


def format_table(results: list[CheckResult]) -> str:
    """One table per backend: problem rows, check columns, ``float64/float32`` cells."""
    lines = []
    for backend in dict.fromkeys(result.backend for result in results):
        rows = [result for result in results if result.backend == backend]
        checks = list(dict.fromkeys(result.check for result in rows))
        dtypes = list(dict.fromkeys(result.dtype for result in rows))
        seconds = sum(result.seconds for result in rows)
        lines.append(f"backend {backend}  (cells: {' / '.join(dtypes)}; {seconds:.1f} s)")
        header = ["problem", *checks]
        table = [header]
        for problem in dict.fromkeys(result.problem for result in rows):
            cells = [problem]
            for check in checks:
                statuses = {r.dtype: r.status for r in rows if r.problem == problem and r.check == check}
                cells.append(" / ".join(statuses.get(dtype, "-") for dtype in dtypes))
            table.append(cells)
        widths = [max(len(row[column]) for row in table) for column in range(len(header))]
        for index, row in enumerate(table):
            lines.append("| " + " | ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)) + " |")
            if index == 0:
                lines.append("|" + "|".join("-" * (width + 2) for width in widths) + "|")
        failures = [result for result in rows if result.status == "fail"]
        for result in failures:
            lines.append(f"FAIL {result.problem} {result.dtype} {result.check}: {result.message}")
        notes = [result for result in rows if result.status == "pass" and "boundar" in result.message]
        for result in notes:
            lines.append(f"note {result.problem} {result.dtype} {result.check}: {result.message}")
        lines.append("")
    return "\n".join(lines)


def selected_backends() -> list[str]:
    """Backends named in ``CABS_TEST_BACKENDS`` (comma-separated), else every available one."""
    from cabs import backends

    text = os.environ.get("CABS_TEST_BACKENDS", "").strip()
    if text:
        return [name.strip() for name in text.split(",") if name.strip()]
    return backends.available()
