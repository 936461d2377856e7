"""The test matrix: one session per backend, conformance, lint, typecheck and docs.

`nox` runs the default sessions (the README's test command); `nox -s "tests(torch)"`
runs one. Every session installs the package (not editable) from this checkout with
the constraints in constraints/test.txt.
"""

from __future__ import annotations

import os
import subprocess

import nox

nox.options.default_venv_backend = "uv|virtualenv"
nox.options.reuse_existing_virtualenvs = True
nox.options.error_on_missing_interpreters = True
nox.options.sessions = ["tests", "conformance", "lint", "typecheck", "docs"]

PYTHON = "3.11"
CONSTRAINTS = ("-c", "constraints/test.txt")
BACKENDS = ("numpy", "torch", "jax", "tensorflow")
ENV = {
    "TF_CPP_MIN_LOG_LEVEL": "2",
    "HYPOTHESIS_PROFILE": "ci",
    "PYTHONHASHSEED": "0",
}


def _pip_find_links() -> str:
    """pip's find-links folder (where the CPU build of torch lies); uv ignores pip's config."""
    try:
        out = subprocess.run(
            ["pip", "config", "get", "global.find-links"], capture_output=True, text=True, timeout=30
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or os.environ.get("PIP_FIND_LINKS", "") or "/opt/wheels"


os.environ.setdefault("UV_FIND_LINKS", _pip_find_links())


def _install(session: nox.Session, extras: str) -> None:
    session.install(*CONSTRAINTS, f".[{extras}]")


def _pytest(session: nox.Session, *args: str, backends: str) -> None:
    keras_home = session.create_tmp()
    env = {**ENV, "CABS_TEST_BACKENDS": backends, "KERAS_HOME": keras_home}
    # The `pytest` script (not `python -m pytest`) keeps the checkout off sys.path, so the
    # tests import the installed package, not the source folders.
    session.run("pytest", *args, *session.posargs, env=env)


@nox.session(python=PYTHON)
@nox.parametrize("backend", BACKENDS, ids=list(BACKENDS))
def tests(session: nox.Session, backend: str) -> None:
    """Unit and property tests with only one framework installed."""
    extras = "test,cli" if backend == "numpy" else f"{backend},test,cli"
    _install(session, extras)
    _pytest(session, "tests", backends=backend)


@nox.session(python=PYTHON)
def conformance(session: nox.Session) -> None:
    """The conformance kit with every backend in one environment."""
    _install(session, "all")
    # --pyargs runs the installed kit (the same suite as `python -m cabs.conformance`) and prints its table.
    _pytest(
        session,
        "--pyargs",
        "cabs.conformance",
        "tests/test_conformance.py",
        "tests/test_properties.py",
        backends=",".join(BACKENDS),
    )


@nox.session(python=PYTHON)
def lint(session: nox.Session) -> None:
    """ruff: lint and formatting."""
    session.install(*CONSTRAINTS, "ruff")
    session.run("ruff", "check", ".")
    session.run("ruff", "format", "--check", ".")


@nox.session(python=PYTHON)
def typecheck(session: nox.Session) -> None:
    """mypy on the cabs package (core, data, command line)."""
    session.install(*CONSTRAINTS, ".", "mypy")
    session.run("mypy", "cabs")


@nox.session(python=PYTHON)
def docs(session: nox.Session) -> None:
    """Run every code example in README.md and docs/."""
    _install(session, "all")
    _pytest(session, "tests/test_docs.py", backends=",".join(BACKENDS))


@nox.session(python=PYTHON)
def bench(session: nox.Session) -> None:
    """Overhead of the statistics as ratios to a plain SGD step, every backend (not a default session; takes minutes)."""
    _install(session, "all")
    # The last --backend wins: `nox -s bench -- --backend jax` measures one framework.
    session.run("python", "benchmarks/bench_stats.py", "--backend", "all", *session.posargs)
