"""A deterministic sequence of statistics shared by the cross-backend rule tests."""

from __future__ import annotations

import numpy as np


def scripted_stats(steps: int = 200, seed: int = 0) -> list[tuple[float, float, float, float]]:
    """(count, loss, grad_sq_norm, sq_norm_sum) per step: loss falls, xi wanders.

    The sequence sweeps the raw batch size across the whole clip range so that
    rounding, both bounds and the start-up transient are all exercised.
    """
    rng = np.random.default_rng(seed)
    rows = []
    for step in range(steps):
        count = int(rng.integers(2, 300))
        loss = 2.5 * np.exp(-step / 25.0) + 1e-3 + 0.01 * rng.random()
        xi = float(10.0 ** rng.uniform(0.5, 3.5))
        grad_sq_norm = float(rng.uniform(0.0, 5.0))
        sq_norm_sum = count * (xi + grad_sq_norm)
        rows.append((count, loss, grad_sq_norm, sq_norm_sum))
    return rows
