"""The one tolerance table of the conformance kit (DESIGN.md section 5)."""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

__all__ = ["Tolerance", "TOLERANCES", "tolerance_for", "close"]


class Tolerance(NamedTuple):
    """``|actual - expected| <= rtol * scale + atol``, ``scale`` the size of the expected value.

    Attributes:
        rtol: relative tolerance.
        atol: absolute floor, for values that are exactly or nearly zero.
        boundary_rtol: how close (relative) a raw batch size may be to a ``.5``
            rounding boundary for two backends to round it differently. It is wider
            than ``rtol`` because the running averages carry the rounding of many steps.
    """

    rtol: float
    atol: float
    boundary_rtol: float


TOLERANCES: dict[str, Tolerance] = {
    "float64": Tolerance(rtol=1e-9, atol=1e-12, boundary_rtol=1e-9),
    "float32": Tolerance(rtol=1e-4, atol=1e-6, boundary_rtol=1e-3),
}


def tolerance_for(dtype: str) -> Tolerance:
    """The tolerance of computations carried out in ``dtype`` (``"float64"`` or ``"float32"``)."""
    if dtype not in TOLERANCES:
        raise ValueError(f"`dtype` must be one of {sorted(TOLERANCES)}, got dtype={dtype!r}.")
    return TOLERANCES[dtype]


def close(actual: object, expected: object, tolerance: Tolerance) -> bool:
    """Whether ``actual`` matches ``expected``; arrays compare in the max norm.

    The scale of an array is its largest magnitude, so small entries of a gradient are
    judged against the size of the whole gradient, not their own size.
    """
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    if actual.shape != expected.shape:
        return False
    if not (np.all(np.isfinite(actual)) and np.all(np.isfinite(expected))):
        return False
    if expected.size == 0:
        return True
    error = float(np.max(np.abs(actual - expected)))
    scale = float(np.max(np.abs(expected)))
    return error <= tolerance.rtol * scale + tolerance.atol
