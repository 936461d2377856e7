"""Bad and extreme statistics: nothing non-finite enters the averages, on every backend."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import cabs
from cabs import GradStats

BOUNDS = {"min_batch_size": 8, "max_batch_size": 512}


def compiled_update(backend, rule):
    """``rule.update`` as users run it on this backend: jitted for JAX, tf.function for TF."""
    if backend.name == "jax":
        import jax

        return jax.jit(rule.update)
    if backend.name == "tensorflow":
        import tensorflow as tf

        return tf.function(rule.update, autograph=False)
    return rule.update


extreme = st.one_of(
    st.floats(allow_nan=True, allow_infinity=True, width=64),
    st.sampled_from([0.0, 1e-300, 1e300, -1e300, 1.7e308, math.nan, math.inf, -math.inf]),
)
steps = st.lists(
    st.tuples(st.integers(1, 4096), extreme, extreme, extreme),
    min_size=1,
    max_size=25,
)


def expected_skip(count, loss, grad_sq_norm, sq_norm_sum, dtype, ddof) -> bool:
    """Whether the rule must skip this step: its xi or loss is not finite in ``dtype``."""
    values = [np.asarray(v, dtype=np.float64).astype(dtype) for v in (count, loss, grad_sq_norm, sq_norm_sum)]
    with np.errstate(all="ignore"):
        xi = GradStats(*values).variance_trace(ddof=ddof)
    return not (np.isfinite(xi) and np.isfinite(values[1]))


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(rows=steps, ddof=st.sampled_from([0, 1]), dtype=st.sampled_from(["float32", "float64"]))
def test_random_and_non_finite_sequences_keep_the_invariants(backend, rows, ddof, dtype):
    rule = cabs.cabs(learning_rate=0.1, ddof=ddof, **BOUNDS)
    update = compiled_update(backend, rule)
    state = rule.init(backend.asarray(0.0, dtype=dtype))
    skipped = 0
    for count, loss, grad_sq_norm, sq_norm_sum in rows:
        stats = GradStats(
            count=backend.asarray(count, dtype="int32"),
            loss=backend.asarray(loss, dtype="float64"),
            grad_sq_norm=backend.asarray(grad_sq_norm, dtype="float64"),
            sq_norm_sum=backend.asarray(sq_norm_sum, dtype="float64"),
        )
        batch_size, state = update(stats, state)
        skipped += expected_skip(count, loss, grad_sq_norm, sq_norm_sum, dtype, ddof)
        size = backend.to_numpy(batch_size)
        assert size.dtype == np.int32 and size.shape == ()
        assert BOUNDS["min_batch_size"] <= int(size) <= BOUNDS["max_batch_size"]
        assert np.isfinite(backend.to_numpy(state.xi_avg)) and np.isfinite(backend.to_numpy(state.loss_avg))
        assert backend.to_numpy(state.xi_avg).dtype == np.dtype(dtype)
    assert int(backend.to_numpy(state.skipped)) == skipped
    assert int(backend.to_numpy(state.step)) == len(rows)


def test_non_finite_step_is_skipped_inside_compiled_update(backend):
    rule = cabs.cabs(learning_rate=0.1, smoothing=0.5)
    update = compiled_update(backend, rule)
    state = rule.init(backend.asarray(0.0))

    def stats(loss, sq_norm_sum):
        return GradStats(*(backend.asarray(v) for v in (10.0, loss, 0.0, sq_norm_sum)))

    _, state = update(stats(0.01, 5000.0), state)
    good = [float(backend.to_numpy(x)) for x in state]
    for bad in (stats(math.nan, 5000.0), stats(0.01, math.inf), stats(-math.inf, 1.0)):
        batch_size, state = update(bad, state)
    after = [float(backend.to_numpy(x)) for x in state]
    assert after[2:] == good[2:]  # averages and batch size unchanged
    assert after[0] == 4 and after[1] == 3  # four steps, three skipped
    assert int(backend.to_numpy(batch_size)) == int(good[4])


def test_single_example_batches():
    one = GradStats(count=1, loss=0.4, grad_sq_norm=9.0, sq_norm_sum=9.0)
    assert float(one.variance_trace(ddof=0)) == 0.0  # documented: no spread, xi = 0
    controller = cabs.Controller(learning_rate=0.1, ddof=1)
    with pytest.warns(RuntimeWarning, match="one example has no variance with ddof=1"):
        controller.step(one)
    assert controller.skipped == 1 and controller.batch_size == 16
    zero = cabs.Controller(learning_rate=0.1, ddof=0)
    zero.step(one)
    assert zero.skipped == 0 and zero.state_dict()["state"]["xi_avg"] == 0.0


def test_zero_variance_gives_the_lower_bound():
    controller = cabs.Controller(learning_rate=0.1, smoothing=0.0)
    assert controller.step(GradStats(count=32, loss=0.01, grad_sq_norm=4.0, sq_norm_sum=128.0)) == 16


def test_negative_loss_needs_a_floor():
    controller = cabs.Controller(learning_rate=0.1)
    with pytest.raises(ValueError, match=r"loss=-0\.5.*loss_floor"):
        controller.step(GradStats(count=8, loss=-0.5, grad_sq_norm=0.0, sq_norm_sum=80.0))
    assert controller.steps == 0
    floored = cabs.Controller(learning_rate=0.1, loss_floor=-1.0, smoothing=0.0)
    # denominator -0.5 - (-1) = 0.5: raw = 0.1 * 10 / 0.5 = 2 -> the lower bound
    assert floored.step(GradStats(count=8, loss=-0.5, grad_sq_norm=0.0, sq_norm_sum=80.0)) == 16


def test_loss_at_or_below_the_floor_hits_the_guard():
    controller = cabs.Controller(learning_rate=0.1, loss_floor=0.2, smoothing=0.0)
    assert controller.step(GradStats(count=8, loss=0.1, grad_sq_norm=0.0, sq_norm_sum=80.0)) == 2048
    assert controller.skipped == 0


def test_count_below_one_is_refused():
    with pytest.raises(ValueError, match="count=0"):
        cabs.Controller(learning_rate=0.1).step(GradStats(count=0, loss=0.1, grad_sq_norm=0.0, sq_norm_sum=0.0))
