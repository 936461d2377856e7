"""The stateful Controller: int batch sizes, exact state_dict round trips, non-finite policy."""

from __future__ import annotations

import json
import math
import warnings

import numpy as np
import pytest

import cabs
from cabs import GradStats

from scripted import scripted_stats


def feed(controller: cabs.Controller, rows) -> list[int]:
    return [controller.step(GradStats(*row)) for row in rows]


def test_controller_matches_the_pure_rule():
    rows = scripted_stats(120)
    rule = cabs.cabs(learning_rate=0.1, ddof=1)
    state = rule.init(np.asarray(0.0))
    expected = []
    for row in rows:
        batch_size, state = rule.update(GradStats(*(np.asarray(v) for v in row)), state)
        expected.append(int(batch_size))
    controller = cabs.Controller(learning_rate=0.1, ddof=1)
    assert controller.batch_size == 16
    sizes = feed(controller, rows)
    assert sizes == expected
    assert all(type(size) is int for size in sizes)
    assert controller.steps == 120 and controller.batch_size == sizes[-1]


def test_state_dict_round_trips_exactly_through_json():
    rows = scripted_stats(150)
    first = cabs.Controller(learning_rate=0.05, max_batch_size=512)
    feed(first, rows[:70])
    saved = json.loads(json.dumps(first.state_dict()))
    second = cabs.Controller(learning_rate=0.05, max_batch_size=512)
    second.load_state_dict(saved)
    assert second.state_dict() == first.state_dict()
    assert feed(second, rows[70:]) == feed(first, rows[70:])
    assert float(second.state.xi_avg) == float(first.state.xi_avg)


def test_load_state_dict_refuses_another_configuration():
    saved = cabs.Controller(learning_rate=0.1).state_dict()
    other = cabs.Controller(learning_rate=0.2, ddof=1)
    with pytest.raises(ValueError, match=r"learning_rate: saved 0\.1, here 0\.2") as info:
        other.load_state_dict(saved)
    assert "ddof" in str(info.value)
    with pytest.raises(ValueError, match="Controller.state_dict"):
        other.load_state_dict({"xi_avg": 1.0})


def test_non_finite_steps_are_skipped_with_one_warning():
    controller = cabs.Controller(learning_rate=0.1)
    feed(controller, scripted_stats(30))
    before = controller.state_dict()["state"]
    with pytest.warns(RuntimeWarning, match="non-finite"):
        size = controller.step(GradStats(10, math.nan, 0.0, 100.0))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        controller.step(GradStats(10, 0.5, 0.0, math.inf))
    after = controller.state_dict()["state"]
    assert size == before["batch_size"] == after["batch_size"]
    assert after["xi_avg"] == before["xi_avg"] and after["loss_avg"] == before["loss_avg"]
    assert controller.skipped == 2


def test_non_finite_raise_policy():
    controller = cabs.Controller(learning_rate=0.1, on_nonfinite="raise")
    with pytest.raises(FloatingPointError, match="loss=nan"):
        controller.step(GradStats(10, math.nan, 0.0, 100.0))
    assert controller.steps == 0


def test_controller_accepts_arrays_of_any_backend(backend):
    rows = scripted_stats(40)
    reference = feed(cabs.Controller(learning_rate=0.1), rows)
    controller = cabs.Controller(learning_rate=0.1)
    sizes = [controller.step(GradStats(*(backend.asarray(v) for v in row))) for row in rows]
    assert sizes == reference


@pytest.mark.parametrize(
    ("stats", "words"),
    [
        ((1, 2, 3, 4), "cabs.GradStats"),
        (GradStats(np.ones(3), 0.1, 0.0, 1.0), "stats.count"),
    ],
)
def test_step_rejects_bad_statistics(stats, words):
    with pytest.raises(TypeError, match=words):
        cabs.Controller(learning_rate=0.1).step(stats)


def test_controller_validates_options():
    with pytest.raises(ValueError, match="on_nonfinite='ignore'"):
        cabs.Controller(learning_rate=0.1, on_nonfinite="ignore")
    with pytest.raises(ValueError, match="min_batch_size=0"):
        cabs.Controller(learning_rate=0.1, min_batch_size=0)


def test_equivalent_configurations_load_and_serialise():
    saved = cabs.Controller(learning_rate=0.1).state_dict()
    explicit = cabs.Controller(learning_rate=np.float64(0.1), min_batch_size=np.int64(16), initial_batch_size=16)
    explicit.load_state_dict(saved)
    assert json.loads(json.dumps(explicit.state_dict())) == explicit.state_dict()


@pytest.mark.parametrize(
    ("field", "value", "words"),
    [
        ("xi_avg", math.nan, "xi_avg.*finite"),
        ("loss_avg", math.inf, "loss_avg.*finite"),
        ("xi_avg", -1.0, "xi_avg.*>= 0"),
        ("batch_size", 5000, r"batch_size.*\[16, 2048\]"),
        ("batch_size", 0, "batch_size"),
        ("batch_size", 16.7, "batch_size.*integer"),
        ("batch_size", "20", "batch_size.*integer"),
        ("batch_size", None, "batch_size.*integer"),
        ("step", -7, "step"),
        ("skipped", 99, "skipped"),
        ("xi_avg", [1.0], "xi_avg.*number"),
    ],
)
def test_load_state_dict_refuses_damaged_values(field, value, words):
    saved = cabs.Controller(learning_rate=0.1).state_dict()
    saved["state"][field] = value
    controller = cabs.Controller(learning_rate=0.1)
    with pytest.raises(ValueError, match=words):
        controller.load_state_dict(saved)
    assert controller.state_dict() == cabs.Controller(learning_rate=0.1).state_dict()


@pytest.mark.parametrize(
    "damage",
    [
        lambda d: d["state"].pop("xi_avg"),
        lambda d: d.__setitem__("state", [1, 2]),
        lambda d: d.__setitem__("config", None),
    ],
)
def test_load_state_dict_refuses_malformed_dicts(damage):
    saved = cabs.Controller(learning_rate=0.1).state_dict()
    damage(saved)
    with pytest.raises(ValueError, match="state_dict"):
        cabs.Controller(learning_rate=0.1).load_state_dict(saved)
