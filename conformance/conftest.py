"""pytest set-up for ``pytest --pyargs cabs.conformance``: environment and the result table."""

from __future__ import annotations

from cabs.conformance.environment import prepare_environment

prepare_environment()

from cabs.conformance.suite import SESSION_RESULTS, format_table  # noqa: E402


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """Print the per-backend table (problem x check) after the run."""
    # pytest may import this file under another module name; the list lives in suite.
    if SESSION_RESULTS:
        terminalreporter.section("cabs conformance")
        terminalreporter.write_line(format_table(SESSION_RESULTS))
