"""The check that every data-parallel worker chose the same batch size (framework-free)."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check_agreement"]


def check_agreement(values: Sequence[int], own: int, *, unit: str, this: str, remedy: str) -> int:
    """Return ``own`` when all gathered ``values`` are equal; otherwise raise on every worker.

    Args:
        values: every worker's batch size, in worker order (from an all-gather).
        own: this worker's batch size.
        unit: what a worker is called in the message ("rank", "process", "replica").
        this: names this worker, e.g. "this is rank 1, with 41".
        remedy: how to bring the workers back in step.

    Raises:
        RuntimeError: naming worker 0's value and every differing one.
    """
    values = [int(value) for value in values]
    differing = [f"{unit} {index} has {value}" for index, value in enumerate(values) if value != values[0]]
    if differing:
        raise RuntimeError(
            f"the workers disagree on the batch size: {unit} 0 has {values[0]}, {', '.join(differing)} "
            f"({this}). {remedy}"
        )
    return own
