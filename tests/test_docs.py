"""Every ```python block in README.md and docs/*.md runs as written.

The blocks of one page run in order in one fresh interpreter (a page is one
script), in a temporary folder. A page whose code imports a framework that is
not installed is skipped, unless that framework was requested in
CABS_TEST_BACKENDS. A block fenced as ```python no-run is shown, not run.
"""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
PAGES = sorted([ROOT / "README.md", *(ROOT / "docs").glob("*.md")])
BLOCK = re.compile(r"^```python[ \t]*\n(.*?)^```", re.S | re.M)
FRAMEWORKS = {"torch": "torch", "jax": "jax", "tensorflow": "tensorflow", "keras": "tensorflow"}


def page_code(page: Path) -> str:
    return "\n".join(BLOCK.findall(page.read_text()))


def frameworks_used(code: str) -> set[str]:
    names = re.findall(r"^\s*(?:import|from)\s+([a-z_]+)", code, re.M)
    return {FRAMEWORKS[name] for name in names if name in FRAMEWORKS}


@pytest.mark.parametrize("page", [p for p in PAGES if page_code(p)], ids=lambda p: p.name)
def test_page_examples_run(page, tmp_path):
    code = page_code(page)
    requested = {n for n in os.environ.get("CABS_TEST_BACKENDS", "").split(",") if n}
    missing = [name for name in sorted(frameworks_used(code)) if importlib.util.find_spec(name) is None]
    if missing and not (set(missing) & requested):
        pytest.skip(f"{page.name} needs {missing}, not installed")
    if "torch" in frameworks_used(code) and "tensorflow" in frameworks_used(code):
        code = "import torch\n" + code  # torch must come first in one process
    script = tmp_path / "page.py"
    script.write_text(code)
    env = {**os.environ, "MPLBACKEND": "Agg", "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_HOME": str(tmp_path / "keras")}
    result = subprocess.run(
        [sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, env=env, timeout=600
    )
    assert result.returncode == 0, f"{page.name} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
