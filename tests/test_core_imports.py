"""The core imports no framework: a fresh interpreter proves it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

FRAMEWORKS = ("torch", "jax", "jaxlib", "tensorflow", "keras")


@pytest.mark.parametrize("module", ["cabs", "cabs.backends", "cabs.data", "cabs.datasets", "cabs.cli"])
def test_importing_leaves_frameworks_out(module, tmp_path):
    code = (
        "import importlib, sys\n"
        f"importlib.import_module({module!r})\n"
        "import cabs.backends\n"
        "cabs.backends.available()\n"
        f"print(sorted(m for m in {FRAMEWORKS!r} if m in sys.modules))\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "[]"


def test_public_names():
    import cabs

    assert set(cabs.__all__) >= {"cabs", "GradStats", "Controller", "CabsState", "Rule"}
    rule = cabs.cabs(learning_rate=0.1)
    assert callable(rule.init) and callable(rule.update)


def test_subpackages_import_from_the_repository_root():
    """A script run in the checkout imports the checkout's cabs; its backends must resolve too."""
    root = Path(__file__).resolve().parent.parent
    code = "import cabs.backends, cabs.conformance, cabs.cli; print(cabs.backends.__file__)"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, cwd=root)
    assert result.returncode == 0, result.stderr
    assert Path(result.stdout.strip()).parent == root / "backends"
