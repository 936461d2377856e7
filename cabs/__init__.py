"""cabs: SGD with a Coupled Adaptive Batch Size (Balles, Romero, Hennig, UAI 2017).

The core is framework-free: it imports numpy and array-api-compat only. Backends
for PyTorch, JAX and TensorFlow live in :mod:`cabs.backends`.
"""

from pathlib import Path as _Path

from cabs._rule import CabsState, Rule, cabs
from cabs._stats import GradStats
from cabs.controller import Controller

__version__ = "0.1.0"


def _add_checkout_subpackages() -> None:
    """Make ``cabs.backends`` and ``cabs.conformance`` importable from a source checkout.

    They live in the top-level ``backends/`` and ``conformance/`` folders, which the
    installed package maps into ``cabs`` (pyproject.toml). When ``cabs`` is imported from
    the checkout itself (a script or ``python -m`` run in the repository root puts it
    first on ``sys.path``), the checkout root joins this package's search path so the same
    folders are found there too.
    """
    root = _Path(__file__).resolve().parent.parent
    if (root / "pyproject.toml").is_file() and (root / "backends" / "__init__.py").is_file():
        if str(root) not in __path__:
            __path__.append(str(root))


_add_checkout_subpackages()

__all__ = ["CabsState", "Controller", "GradStats", "Rule", "cabs", "__version__"]
