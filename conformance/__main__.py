"""``python -m cabs.conformance --backend NAME``: run the suite, print the table."""

from __future__ import annotations

import argparse
import sys

from cabs.conformance.environment import prepare_environment

EXIT_USAGE = 2


def main(argv: list[str] | None = None) -> int:
    """Run the conformance suite; return 0 when every check passes, 1 otherwise.

    An unknown backend or one whose framework is not installed ends with one line
    ``python -m cabs.conformance: error: ...`` on stderr and exit status 2, before any check runs.
    """
    prepare_environment()
    from cabs.conformance.checks import CHECKS
    from cabs.conformance.problems import problem_names
    from cabs.conformance.suite import DTYPES, format_table, run_suite, selected_backends

    parser = argparse.ArgumentParser(prog="python -m cabs.conformance", description=__doc__)
    parser.add_argument(
        "--backend", action="append", help="backend to check (repeatable); default: CABS_TEST_BACKENDS or all installed"
    )
    parser.add_argument(
        "--problem", action="append", choices=problem_names(), help="problem to run (repeatable); default: all"
    )
    parser.add_argument(
        "--check", action="append", choices=list(CHECKS), help="check to run (repeatable); default: all"
    )
    parser.add_argument(
        "--dtype", action="append", choices=DTYPES, help="dtype (repeatable); default: float64 and float32"
    )
    arguments = parser.parse_args(argv)
    backends = arguments.backend or selected_backends()
    try:
        results = run_suite(
            backends, problems=arguments.problem, dtypes=arguments.dtype or DTYPES, checks=arguments.check
        )
    except (ValueError, TypeError, ImportError) as error:
        # An unknown backend or a framework that is not installed: run_suite checks every backend
        # before it runs any, so nothing has run yet.
        parser.exit(EXIT_USAGE, f"{parser.prog}: error: {' '.join(str(error).split())}\n")
    print(format_table(results))
    failed = sum(result.status == "fail" for result in results)
    passed = sum(result.status == "pass" for result in results)
    print(f"{passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
