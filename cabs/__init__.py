"""cabs: SGD with a Coupled Adaptive Batch Size (Balles, Romero, Hennig, UAI 2017).

The core is framework-free: it imports numpy and array-api-compat only. Backends
for PyTorch, JAX and TensorFlow live in :mod:`cabs.backends`.
"""

from cabs._rule import CabsState, Rule, cabs
from cabs._stats import GradStats
from cabs.controller import Controller

__version__ = "0.1.0"

__all__ = ["CabsState", "Controller", "GradStats", "Rule", "cabs", "__version__"]
