"""The pure rule: DESIGN.md section 1 worked values, options, and backends agreeing."""

from __future__ import annotations

import math

import numpy as np
import pytest

import cabs
from cabs import GradStats

from scripted import scripted_stats


def stats_from(xi: float, loss: float, count: int = 1) -> GradStats:
    """Statistics whose variance trace (ddof 0) is exactly ``xi``."""
    return GradStats(
        count=np.asarray(count),
        loss=np.asarray(loss, dtype=np.float64),
        grad_sq_norm=np.asarray(0.0),
        sq_norm_sum=np.asarray(count * xi, dtype=np.float64),
    )


def one_step(xi: float, loss: float, **options) -> int:
    """Batch size after one step with no smoothing: the bare rule."""
    rule = cabs.cabs(smoothing=0.0, **options)
    batch_size, _ = rule.update(stats_from(xi, loss), rule.init(np.asarray(0.0)))
    return int(batch_size)


@pytest.mark.parametrize(("loss", "expected"), [(0.5, 16), (0.05, 100), (0.001, 2048)])
def test_worked_values(loss, expected):
    assert one_step(50.0, loss, learning_rate=0.1) == expected


def test_worked_variance_example():
    g = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    stats = GradStats(
        count=np.asarray(4),
        loss=np.asarray(1.0),
        grad_sq_norm=np.sum(g.mean(axis=0) ** 2),
        sq_norm_sum=np.sum(g**2),
    )
    assert float(stats.variance_trace(ddof=0)) == 3.5
    assert float(stats.variance_trace(ddof=1)) == pytest.approx(14.0 / 3.0, rel=1e-15)


def test_worked_first_step_from_initial_state():
    rule = cabs.cabs(learning_rate=0.1)
    state = rule.init(np.asarray(0.0))
    batch_size, state = rule.update(stats_from(100.0, 2.3), state)
    assert float(state.xi_avg) == pytest.approx(5.0, rel=1e-14)
    assert float(state.loss_avg) == pytest.approx(1.065, rel=1e-14)
    raw = 0.1 * float(state.xi_avg) / float(state.loss_avg)
    assert raw == pytest.approx(0.4695, abs=5e-5)
    assert int(batch_size) == 16
    assert int(state.step) == 1 and int(state.skipped) == 0


def test_start_up_transient_from_initial_averages():
    """xi = 200, loss = 0.5, lr = 0.1: step 20 gives 19, step 50 gives 34, limit 40."""
    rule = cabs.cabs(learning_rate=0.1, min_batch_size=1)
    state = rule.init(np.asarray(0.0))
    sizes = []
    for _ in range(400):
        batch_size, state = rule.update(stats_from(200.0, 0.5), state)
        sizes.append(int(batch_size))
    assert sizes[19] == 19
    assert sizes[49] == 34
    assert sizes[-1] == 40
    assert sizes == sorted(sizes)
    with_default_min = cabs.cabs(learning_rate=0.1)
    state = with_default_min.init(np.asarray(0.0))
    first = [int(with_default_min.update(stats_from(200.0, 0.5), state)[0])]
    assert first == [16]


@pytest.mark.parametrize(("raw", "expected"), [(100.5, 100), (101.5, 102), (16.5, 16), (17.5, 18), (2047.5, 2048)])
def test_rounding_half_to_even(raw, expected):
    assert one_step(raw, 1.0, learning_rate=1.0) == expected


@pytest.mark.parametrize(("raw", "expected"), [(3.2, 16), (15.5, 16), (1e9, 2048), (2048.5, 2048), (1e300, 2048)])
def test_clipping_after_rounding(raw, expected):
    assert one_step(raw, 1.0, learning_rate=1.0) == expected


def test_zero_loss_gives_the_upper_bound():
    # xi / 0 is inf in the reference code, which clips to the upper bound.
    assert one_step(5.0, 0.0, learning_rate=1.0) == 2048
    # 0 / 0 is NaN: the batch size stays where it was instead of becoming garbage.
    assert one_step(0.0, 0.0, learning_rate=1.0, initial_batch_size=32) == 32


def test_clip_bounds_are_options():
    assert one_step(3.2, 1.0, learning_rate=1.0, min_batch_size=2, max_batch_size=8) == 3
    assert one_step(7.6, 1.0, learning_rate=1.0, min_batch_size=2, max_batch_size=8) == 8
    assert one_step(8.4, 1.0, learning_rate=1.0, min_batch_size=2, max_batch_size=8) == 8


def test_ddof_changes_xi_and_batch_size():
    g = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    stats = GradStats(np.asarray(4), np.asarray(0.01), np.sum(g.mean(axis=0) ** 2), np.sum(g**2))
    sizes = {}
    for ddof in (0, 1):
        rule = cabs.cabs(learning_rate=1.0, smoothing=0.0, ddof=ddof, min_batch_size=1, max_batch_size=10_000)
        sizes[ddof] = int(rule.update(stats, rule.init(np.asarray(0.0)))[0])
    assert sizes == {0: 350, 1: 467}


def test_loss_floor_moves_the_denominator():
    assert one_step(10.0, 0.6, learning_rate=1.0, loss_floor=0.5, max_batch_size=10_000) == 100
    # At or below the floor the guard keeps the denominator positive: the bound, not a crash.
    assert one_step(10.0, 0.5, learning_rate=1.0, loss_floor=0.5) == 2048
    assert one_step(10.0, 0.4, learning_rate=1.0, loss_floor=0.5) == 2048


def test_eps_and_scale():
    assert one_step(50.0, 0.05, learning_rate=0.1, eps=0.05) == 50
    assert one_step(50.0, 0.05, learning_rate=0.1, scale=2.0) == 200


def test_debias_removes_the_start_up_transient():
    rule = cabs.cabs(learning_rate=0.1, debias=True, min_batch_size=1)
    state = rule.init(np.asarray(0.0))
    batch_size, state = rule.update(stats_from(200.0, 0.5), state)
    assert int(batch_size) == 40  # the limit right away: 0.1 * 200 / 0.5
    assert float(state.xi_avg) == pytest.approx(10.0)  # the stored averages stay raw


def test_initial_batch_size():
    rule = cabs.cabs(learning_rate=0.1, initial_batch_size=64)
    assert int(rule.init(np.asarray(0.0)).batch_size) == 64
    assert int(cabs.cabs(learning_rate=0.1).init(np.asarray(0.0)).batch_size) == 16


def test_integer_and_floating_count_agree():
    rule = cabs.cabs(learning_rate=0.1, smoothing=0.5)
    state = rule.init(np.asarray(0.0))
    a = rule.update(GradStats(np.asarray(7), np.asarray(0.2), np.asarray(1.0), np.asarray(700.0)), state)
    b = rule.update(GradStats(np.asarray(7.0), np.asarray(0.2), np.asarray(1.0), np.asarray(700.0)), state)
    assert int(a[0]) == int(b[0])
    assert float(a[1].xi_avg) == float(b[1].xi_avg)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_step_is_skipped(bad):
    rule = cabs.cabs(learning_rate=0.1, smoothing=0.5)
    state = rule.init(np.asarray(0.0))
    _, state = rule.update(stats_from(400.0, 0.1), state)
    before = state
    batch_size, state = rule.update(stats_from(400.0, bad), state)
    assert int(batch_size) == int(before.batch_size)
    assert float(state.xi_avg) == float(before.xi_avg)
    assert float(state.loss_avg) == float(before.loss_avg)
    assert int(state.skipped) == 1 and int(state.step) == 2
    batch_size, state = rule.update(stats_from(bad, 0.1), state)
    assert int(state.skipped) == 2 and math.isfinite(float(state.xi_avg))


def test_single_example_with_ddof_one_is_skipped():
    rule = cabs.cabs(learning_rate=0.1, ddof=1)
    state = rule.init(np.asarray(0.0))
    _, state = rule.update(stats_from(0.0, 0.3, count=1), state)
    assert int(state.skipped) == 1
    assert float(state.xi_avg) == 0.0 and float(state.loss_avg) == 1.0


def test_state_is_0d_arrays_of_the_init_dtype():
    rule = cabs.cabs(learning_rate=0.1)
    for dtype in (np.float32, np.float64):
        state = rule.init(np.asarray(0.0, dtype=dtype))
        _, state = rule.update(stats_from(50.0, 0.5), state)
        assert all(isinstance(x, np.ndarray) and x.shape == () for x in state)
        assert state.xi_avg.dtype == dtype and state.loss_avg.dtype == dtype
        assert state.batch_size.dtype == np.int32 and state.step.dtype == np.int32


@pytest.mark.parametrize(
    ("options", "error", "words"),
    [
        ({"learning_rate": 0.0}, ValueError, "learning_rate=0.0"),
        ({"learning_rate": -1}, ValueError, "learning_rate"),
        ({"learning_rate": math.nan}, ValueError, "finite"),
        ({"learning_rate": "0.1"}, TypeError, "learning_rate='0.1'"),
        ({"learning_rate": 0.1, "min_batch_size": 0}, ValueError, "min_batch_size=0"),
        ({"learning_rate": 0.1, "min_batch_size": 64, "max_batch_size": 32}, ValueError, "min_batch_size=64"),
        ({"learning_rate": 0.1, "max_batch_size": 16.0}, TypeError, "max_batch_size"),
        ({"learning_rate": 0.1, "initial_batch_size": 4}, ValueError, "initial_batch_size=4"),
        ({"learning_rate": 0.1, "smoothing": 1.0}, ValueError, "smoothing=1.0"),
        ({"learning_rate": 0.1, "smoothing": -0.1}, ValueError, "smoothing"),
        ({"learning_rate": 0.1, "ddof": 2}, ValueError, "ddof=2"),
        ({"learning_rate": 0.1, "ddof": True}, ValueError, "ddof"),
        ({"learning_rate": 0.1, "eps": -1e-8}, ValueError, "eps"),
        ({"learning_rate": 0.1, "scale": 0.0}, ValueError, "scale"),
        ({"learning_rate": 0.1, "loss_floor": math.inf}, ValueError, "loss_floor"),
        ({"learning_rate": 0.1, "debias": 1}, TypeError, "debias"),
    ],
)
def test_factory_validates_options(options, error, words):
    with pytest.raises(error, match=words.replace("(", r"\(").replace(".", r"\.")):
        cabs.cabs(**options)


def test_init_rejects_non_scalar_and_integer_arrays():
    rule = cabs.cabs(learning_rate=0.1)
    with pytest.raises(ValueError, match="0-d"):
        rule.init(np.zeros(3))
    with pytest.raises(TypeError, match="float32 or float64"):
        rule.init(np.asarray(0))


def test_unknown_array_type_names_the_type():
    rule = cabs.cabs(learning_rate=0.1)
    with pytest.raises(TypeError, match="list"):
        rule.init([0.0])


def run_scripted(backend, dtype="float64") -> list[int]:
    rule = cabs.cabs(learning_rate=0.1, smoothing=0.9)
    state = rule.init(backend.asarray(0.0, dtype=dtype))
    sizes = []
    for count, loss, grad_sq_norm, sq_norm_sum in scripted_stats():
        stats = GradStats(
            count=backend.asarray(count, dtype="int64"),
            loss=backend.asarray(loss, dtype=dtype),
            grad_sq_norm=backend.asarray(grad_sq_norm, dtype=dtype),
            sq_norm_sum=backend.asarray(sq_norm_sum, dtype=dtype),
        )
        batch_size, state = rule.update(stats, state)
        sizes.append(int(backend.to_numpy(batch_size)))
    return sizes


def test_scripted_sequence_matches_numpy_on_every_backend(backend):
    numpy_sizes = run_scripted(type(backend)("numpy"))
    sizes = run_scripted(backend)
    assert sizes == numpy_sizes
    assert len(set(sizes)) > 20 and min(sizes) == 16 and max(sizes) == 2048


def test_negative_loss_floor_is_applied():
    # A floor of -2 serves a loss that can be negative: denominator loss - (-2).
    assert one_step(1000.0, -1.0, learning_rate=0.1, loss_floor=-2.0) == 100
    assert one_step(1000.0, 0.0, learning_rate=0.1, loss_floor=-2.0) == 50


def test_batch_size_bounds_fit_the_state():
    with pytest.raises(ValueError, match=r"2\*\*31 - 1"):
        cabs.cabs(learning_rate=0.1, max_batch_size=3 * 10**9)
    huge = cabs.cabs(learning_rate=0.1, min_batch_size=2**24 + 1, max_batch_size=2**24 + 1)
    with pytest.raises(ValueError, match="float64"):
        huge.init(np.asarray(0.0, dtype=np.float32))
    assert int(huge.init(np.asarray(0.0)).batch_size) == 2**24 + 1


def test_update_refuses_statistics_that_are_not_scalars():
    rule = cabs.cabs(learning_rate=0.1)
    state = rule.init(np.asarray(0.0))
    stats = GradStats(np.array([4, 4]), np.array([0.5, 0.5]), np.zeros(2), np.array([800.0, 800.0]))
    with pytest.raises(ValueError, match=r"stats.count.*shape \(2,\)"):
        rule.update(stats, state)


@pytest.mark.parametrize(("like", "error"), [(0.0, TypeError), (np.zeros(3), ValueError)])
def test_init_names_what_it_needs(like, error):
    with pytest.raises(error, match="0-d floating array"):
        cabs.cabs(learning_rate=0.1).init(like)


def test_array_valued_ddof_is_refused():
    with pytest.raises(ValueError, match="ddof"):
        cabs.cabs(learning_rate=0.1, ddof=np.array([0, 1]))
    with pytest.raises(ValueError, match="ddof"):
        GradStats(4, 0.5, 0.0, 10.0).variance_trace(ddof=np.array([1]))
