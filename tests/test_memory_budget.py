"""`cabs train --memory-budget`: the size parses, the estimate gives a pass size, and a run is unchanged by it."""

from __future__ import annotations

import json

import numpy as np
import pytest

from cabs.cli import build_parser, main
from cabs.training import memory, models

MNIST_PAPER = models.architecture("mnist-paper", (1, 28, 28), 10)


@pytest.mark.parametrize(
    ("text", "expected"),
    [("1048576", 1048576), ("64MB", 64 * 10**6), ("64MiB", 64 * 2**20), ("1GiB", 2**30), ("1.5kb", 1500), ("2 g", 2e9)],
)
def test_sizes_parse_with_decimal_and_binary_units(text, expected):
    assert memory.parse_bytes(text) == expected
    assert build_parser().parse_args(["train", "--memory-budget", text]).memory_budget == expected


@pytest.mark.parametrize("text", ["", "MB", "-5MB", "12 parsecs", "0", "0.1"])
def test_bad_sizes_are_refused_with_the_option_named(text, capsys):
    with pytest.raises(ValueError, match="`memory_budget` must be"):
        memory.parse_bytes(text)
    with pytest.raises(SystemExit):
        build_parser().parse_args(["train", "--memory-budget", text])
    assert "--memory-budget" in capsys.readouterr().err


def test_without_the_option_there_is_no_budget():
    assert build_parser().parse_args(["train"]).memory_budget is None


def test_a_small_budget_splits_a_batch_of_2048_into_passes_that_fit():
    budget = memory.parse_bytes("256MB")
    per_pass = memory.examples_per_pass(MNIST_PAPER, 4, budget)
    assert 0 < per_pass < 2048
    fixed, one = memory.fixed_bytes(MNIST_PAPER, 4), memory.per_example_bytes(MNIST_PAPER, 4)
    # The largest pass that fits: one more example would exceed the budget.
    assert fixed + per_pass * one <= budget < fixed + (per_pass + 1) * one
    # float64 halves what fits, a larger budget never gives fewer examples.
    assert memory.examples_per_pass(MNIST_PAPER, 8, budget) < per_pass
    assert memory.examples_per_pass(MNIST_PAPER, 4, 2 * budget) > per_pass


def test_the_estimate_counts_input_activations_patches_and_parameters():
    mlp = models.Architecture("mlp", (784,), 10, (models.Dense(784, 100, relu=True), models.Dense(100, 10, relu=False)))
    # Per example: input 784, each dense layer's output before and after the ReLU; each value and its gradient.
    assert memory.per_example_bytes(mlp, 4) == 2 * (784 + 2 * 100 + 2 * 10) * 4
    assert memory.fixed_bytes(mlp, 4) == 3 * (785 * 100 + 101 * 10) * 4
    conv = models.Architecture("cnn", (1, 8), 2, (models.Conv(1, 1, 3, 5, pool=2), models.Dense(12, 2, relu=False)))
    # conv: 2 * 3 channels * 8 positions, patches 1 * 5 * 8, pooled 3 * 4; dense 2 * 2.
    assert memory.per_example_bytes(conv, 8) == 2 * (8 + 48 + 40 + 12 + 4) * 8


def test_a_budget_too_small_for_the_model_is_refused():
    with pytest.raises(ValueError, match="`memory_budget` must hold the model and one example"):
        memory.examples_per_pass(MNIST_PAPER, 4, memory.parse_bytes("10MB"))


def _run(tmp_path, backend: str, name: str, extra: list[str]) -> list[dict]:
    out = tmp_path / name
    arguments = ["train", "--backend", backend, "--model", "cnn", "--steps", "4", "--out", str(out), "--quiet"]
    arguments += ["--initial-batch-size", "96", "--min-batch-size", "64", "--max-batch-size", "128"]
    arguments += ["--eval-every", "100", *extra]
    assert main(arguments) == 0
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


def test_a_run_with_a_memory_budget_matches_one_without(backend, tmp_path):
    if backend.name == "numpy":
        pytest.skip("cabs train has no NumPy task")
    architecture = models.architecture("cnn", (1, 40), 10)  # the default data set, mnist1d
    # Room for the model and 40 examples: the batches of 64-128 run in 2-4 passes.
    budget = memory.fixed_bytes(architecture, 4) + 40 * memory.per_example_bytes(architecture, 4)
    assert memory.examples_per_pass(architecture, 4, budget) == 40
    whole = _run(tmp_path, backend.name, "whole", [])
    split = _run(tmp_path, backend.name, "split", ["--memory-budget", str(budget)])
    assert [record["batch_size"] for record in split] == [record["batch_size"] for record in whole]
    assert all(record["batch_size"] > 40 for record in whole)  # every step really ran in several passes
    losses = np.array([[record["loss"] for record in run] for run in (whole, split)])
    np.testing.assert_allclose(losses[1], losses[0], rtol=1e-6)
    xis = np.array([[record["xi"] for record in run] for run in (whole, split)])
    np.testing.assert_allclose(xis[1], xis[0], rtol=1e-4)


def test_the_task_gets_the_pass_size_of_the_budget(backend):
    if backend.name == "numpy":
        pytest.skip("cabs train has no NumPy task")
    from types import SimpleNamespace

    from cabs.training.loop import TrainConfig, make_task

    architecture = models.architecture("cnn", (1, 40), 10)
    budget = memory.fixed_bytes(architecture, 4) + 40 * memory.per_example_bytes(architecture, 4)
    data = SimpleNamespace(
        input_shape=(1, 40), num_classes=10, x_train=np.zeros((8, 1, 40), np.float32), y_train=np.zeros(8, np.int64)
    )
    task, _ = make_task(TrainConfig(backend=backend.name, memory_budget=budget), data)
    holder = task.stats_function if backend.name == "jax" else task
    assert holder.max_examples_per_pass == 40
    unlimited, _ = make_task(TrainConfig(backend=backend.name), data)
    assert (unlimited.stats_function if backend.name == "jax" else unlimited).max_examples_per_pass is None
