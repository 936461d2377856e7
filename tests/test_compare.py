"""`cabs compare` end to end on a tiny budget, its resume and failure handling, and the paper's networks."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import numpy as np
import pytest

from cabs import compare
from cabs.training import models

pytest.importorskip("torch")

sys.path.insert(0, str(Path(__file__).parent))
from test_cli import PNG_SIGNATURE, write_mnist_folder  # noqa: E402
from test_datasets import write_cifar  # noqa: E402

BUDGET = 256
CURVE_KEYS = {
    "examples_seen",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "batch_examples_seen",
    "batch_size",
    "learning_rate",
}
GOOD_RUNS = [
    compare.RunSpec("cabs", 0.1, 0),
    compare.RunSpec("sgd", 0.1, 0, batch_size=32),
    compare.RunSpec("sgd", 0.1, 0, batch_size=32, decay=True),
]
# A constant batch size of 0 is refused inside the worker: the run fails, the others must not.
BAD_RUN = compare.RunSpec("sgd", 0.1, 0, batch_size=0)


def tiny_config(out: Path) -> compare.CompareConfig:
    return compare.CompareConfig(
        learning_rates=(0.1,), batch_sizes=(32,), seeds=1, budget=BUDGET, evaluations=4, jobs=2, out=str(out)
    )


@pytest.fixture(scope="module")
def tiny_comparison(tmp_path_factory):
    out = tmp_path_factory.mktemp("compare")
    comparison = compare.run_comparison(tiny_config(out), runs=[*GOOD_RUNS, BAD_RUN], progress=False)
    return out, comparison


def test_comparison_json_holds_every_runs_curves_and_settings(tiny_comparison):
    out, returned = tiny_comparison
    comparison = json.loads((out / "comparison.json").read_text())
    assert comparison["settings"]["budget"] == BUDGET and comparison["settings"]["model"] == "cnn"
    assert [run["label"] for run in comparison["runs"]] == [spec.label for spec in GOOD_RUNS]
    assert comparison["runs"] == json.loads(json.dumps(returned["runs"]))
    for run in comparison["runs"]:
        curves = run["curves"]
        assert set(curves) == CURVE_KEYS
        # One evaluation before training, then every BUDGET/4 examples; the last at the budget.
        assert curves["examples_seen"][0] == 0 and len(curves["examples_seen"]) == 5
        assert BUDGET <= curves["examples_seen"][-1] < BUDGET + max(curves["batch_size"])
        assert all(0.0 <= accuracy <= 1.0 for accuracy in curves["test_accuracy"])
        assert run["final_train_loss"] == curves["train_loss"][-1]
        assert run["best_test_accuracy"] == max(curves["test_accuracy"])
    cabs_run, constant, decayed = comparison["runs"]
    # Same seed, same initial weights: the same loss before training.
    assert cabs_run["curves"]["train_loss"][0] == constant["curves"]["train_loss"][0]
    assert set(constant["curves"]["batch_size"]) == {32} and constant["steps"] == BUDGET // 32
    assert min(cabs_run["curves"]["batch_size"]) >= 16
    # The decay: lr/10 from half the budget, lr/100 from three quarters; identical runs before that.
    for seen, rate in zip(decayed["curves"]["batch_examples_seen"], decayed["curves"]["learning_rate"], strict=True):
        expected = 0.1 if seen <= BUDGET / 2 else (0.01 if seen <= 3 * BUDGET / 4 else 0.001)
        assert rate == pytest.approx(expected)
    assert set(constant["curves"]["learning_rate"]) == {0.1}
    assert decayed["curves"]["train_loss"][:3] == constant["curves"]["train_loss"][:3]
    assert decayed["curves"]["train_loss"][3:] != constant["curves"]["train_loss"][3:]


def test_examples_to_target_and_best_constant_follow_the_curves(tiny_comparison):
    _, comparison = tiny_comparison
    target = comparison["target_loss"]
    at_half = {run["label"]: run["curves"]["train_loss"][2] for run in comparison["runs"]}  # 128 examples
    assert target == min(at_half.values())
    rows = {row["label"]: row for row in comparison["configurations"]}
    for run in comparison["runs"]:
        curves = run["curves"]
        reached = [
            seen for seen, loss in zip(curves["examples_seen"], curves["train_loss"], strict=True) if loss <= target
        ]
        row = rows[run["label"]]
        assert row["reached_target"] == (1 if reached else 0)
        if reached:
            assert row["examples_to_target"]["mean"] == reached[0]
    best = [row["label"] for row in comparison["configurations"] if row["best_constant"]]
    constants = [run for run in comparison["runs"] if run["spec"]["method"] == "sgd"]
    assert best == [min(constants, key=lambda run: run["final_train_loss"])["label"]]


def test_markdown_has_one_row_per_configuration_and_lists_the_failure(tiny_comparison):
    out, comparison = tiny_comparison
    table = (out / "comparison.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| ") and not line.startswith("| configuration")]
    assert len(rows) == 4  # three configurations and the failed one
    for spec in GOOD_RUNS:
        (row,) = [line for line in rows if line.startswith(f"| {spec.label} |") or f"**{spec.label}**" in line]
        final = next(r for r in comparison["configurations"] if r["label"] == spec.label)["final_train_loss"]["mean"]
        assert f"{final:.4f}" in row
    assert sum("(best constant)" in row for row in rows) == 1
    assert "## Failures" in table and f"{BAD_RUN.label} seed 0: ValueError" in table and "batch_size" in table
    # One seed: said in the singular, and no "± 0" spread that one value does not have.
    assert "1 seed;" in table and "1 seeds" not in table
    assert not any("±" in row for row in rows)


def test_mean_and_spread_show_the_spread_of_two_or_more_values():
    values = [1.0, 3.0]
    assert compare._mean_spread(compare._spread(values), ".2f") == "2.00 ± 1.00"  # np.std of 1 and 3 is 1
    assert compare._mean_spread(compare._spread([2.5]), ".2f") == "2.50"
    assert compare._mean_spread(compare._spread([]), ".2f") == "-"


ORPHAN_SCRIPT = """
import multiprocessing, os, time
from cabs.compare import exit_with_parent


def sleep_watching(parent):
    exit_with_parent(parent)
    time.sleep(120)


if __name__ == "__main__":
    worker = multiprocessing.get_context("spawn").Process(target=sleep_watching, args=(os.getpid(),))
    worker.start()
    print(worker.pid, flush=True)
    time.sleep(2)  # the worker's watch has started
    os._exit(0)  # die as a killed parent does: no clean-up, the worker is orphaned
"""


def process_is_running(pid: int) -> bool:
    """Whether ``pid`` runs (a zombie, dead but not yet reaped by its adopter, does not count)."""
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return False
    return state != "Z"


@pytest.mark.skipif(not Path("/proc/self/stat").exists(), reason="reads process states from /proc (Linux)")
def test_a_worker_ends_when_its_parent_is_killed(tmp_path):
    import subprocess
    import time

    script = tmp_path / "orphan.py"
    script.write_text(ORPHAN_SCRIPT)
    result = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=120)
    worker = int(result.stdout.split()[0])
    # The watch checks every second; the deadline only bounds a failing test's wait.
    deadline = time.monotonic() + 60
    while process_is_running(worker) and time.monotonic() < deadline:
        time.sleep(0.2)
    running = process_is_running(worker)
    if running:
        import os
        import signal

        os.kill(worker, signal.SIGKILL)
    assert not running, "the orphaned worker kept running"


def test_a_failing_run_is_reported_and_the_others_finish(tiny_comparison):
    out, comparison = tiny_comparison
    assert [failure["label"] for failure in comparison["failures"]] == [BAD_RUN.label]
    assert "`batch_size` must be an int >= 1" in comparison["failures"][0]["error"]
    assert len(comparison["runs"]) == len(GOOD_RUNS)
    assert not (out / "runs" / BAD_RUN.folder_name / compare.RESULT_FILE).exists()


def test_png_is_written(tiny_comparison):
    out, _ = tiny_comparison
    assert (out / "comparison.png").read_bytes().startswith(PNG_SIGNATURE)


def test_rerun_skips_finished_runs_and_repeats_missing_ones(tiny_comparison, tmp_path):
    out, first = tiny_comparison
    kept, removed = (out / "runs" / spec.folder_name / compare.RESULT_FILE for spec in GOOD_RUNS[:2])
    kept_bytes = kept.read_bytes()
    kept.write_text(kept_bytes.decode().replace('"steps"', '"steps_marker": 1, "steps"', 1))
    removed.unlink()
    again = compare.run_comparison(tiny_config(out), runs=GOOD_RUNS[:2], progress=False)
    # The kept result is read back, not recomputed (the marker survives); the removed one runs again.
    assert again["runs"][0]["steps_marker"] == 1
    assert removed.exists() and json.loads(removed.read_text())["curves"] == first["runs"][1]["curves"]
    assert again["failures"] == []
    # Other settings (a larger budget) make the earlier results stale: they run again.
    config = tiny_config(out)
    config.budget = 2 * BUDGET
    bigger = compare.run_comparison(config, runs=GOOD_RUNS[:1], progress=False)
    assert "steps_marker" not in bigger["runs"][0] and bigger["runs"][0]["examples_seen"] >= 2 * BUDGET


def test_decayed_learning_rate_steps_at_half_and_three_quarters():
    rates = [compare.decayed_learning_rate(0.2, seen, 100) for seen in (0, 49, 50, 74, 75, 99)]
    assert rates == pytest.approx([0.2, 0.2, 0.02, 0.02, 0.002, 0.002])


def test_default_runs_cover_every_configuration_and_seed():
    runs = compare.CompareConfig().runs()
    assert len(runs) == 3 * 3 * (1 + 2 * 5) and len(set(runs)) == len(runs)
    assert {run.folder_name for run in runs}.__len__() == len(runs)
    assert not any(run.decay for run in runs if run.method == "cabs")


def test_bad_settings_name_the_option(tmp_path):
    with pytest.raises(ValueError, match="`budget` must be an int >= 1"):
        compare.run_comparison(compare.CompareConfig(budget=0, out=str(tmp_path)), progress=False)
    with pytest.raises(ValueError, match="`batch_size` must be an int >= 1"):
        compare.ConstantBatchSize(0)


# --- the paper's networks -----------------------------------------------------------------------------------


def test_crop_batch_takes_windows_of_each_image():
    images = np.random.default_rng(0).normal(size=(5, 3, 32, 32)).astype(np.float32)
    np.testing.assert_array_equal(models.crop_batch(images, 24, None), images[:, :, 4:28, 4:28])
    crops = models.crop_batch(images, 24, np.random.default_rng(1))
    offsets = set()
    for image, crop in zip(images, crops, strict=True):
        found = [
            (top, left)
            for top in range(9)
            for left in range(9)
            if np.array_equal(image[:, top : top + 24, left : left + 24], crop)
        ]
        assert len(found) == 1
        offsets.add(found[0])
    assert len(offsets) > 1  # each image gets its own position


def test_paper_network_shapes():
    mnist = models.architecture("mnist-paper", (1, 28, 28), 10)
    assert [(layer.in_channels, layer.out_channels, layer.kernel_size, layer.pool) for layer in mnist.layers[:2]] == [
        (1, 32, 5, 2),
        (32, 64, 5, 2),
    ]
    assert [(layer.in_features, layer.out_features) for layer in mnist.layers[2:]] == [(64 * 7 * 7, 1024), (1024, 10)]
    cifar = models.architecture("cifar10-paper", (3, 32, 32), 10)
    assert cifar.crop == 24
    assert [(layer.out_channels, layer.kernel_size, layer.pool, layer.pool_stride) for layer in cifar.layers[:2]] == [
        (64, 5, 3, 2),
        (64, 5, 3, 2),
    ]
    assert [(layer.in_features, layer.out_features) for layer in cifar.layers[2:]] == [
        (64 * 6 * 6, 384),
        (384, 192),
        (192, 10),
    ]
    with pytest.raises(ValueError, match="cifar10-paper"):
        models.architecture("cifar10-paper", (1, 8, 8), 10)
    with pytest.raises(ValueError, match="torch backend only"):
        models.check_backend(cifar, "jax")


def train_a_few_steps(backend: str, model: str, dataset: str, data_dir: Path, tmp_path: Path) -> dict:
    from cabs.training.loop import TrainConfig, train

    config = TrainConfig(
        backend=backend, dataset=dataset, data_dir=str(data_dir), model=model, steps=2, out=str(tmp_path / "run")
    )
    return train(config, progress=False)


@pytest.mark.parametrize("backend", ["torch", "jax", "tensorflow"])
def test_mnist_paper_network_trains_on_idx_files(backend, tmp_path):
    pytest.importorskip(backend)
    write_mnist_folder(tmp_path / "mnist", train=40, test=12)
    summary = train_a_few_steps(backend, "mnist-paper", "mnist", tmp_path / "mnist", tmp_path)
    assert summary["steps"] == 2 and summary["model"] == "mnist-paper"
    assert np.isfinite(summary["train_loss"]) and 0.0 <= summary["test_accuracy"] <= 1.0


def test_cifar10_paper_network_trains_on_crops_and_evaluates_the_center(tmp_path):
    import torch

    write_cifar(tmp_path / "cifar" / "cifar-10-batches-py")
    summary = train_a_few_steps("torch", "cifar10-paper", "cifar10", tmp_path / "cifar", tmp_path)
    assert summary["steps"] == 2 and np.isfinite(summary["train_loss"])

    from cabs.training.torch import TorchTask

    architecture = models.architecture("cifar10-paper", (3, 32, 32), 10)
    parameters = models.initial_parameters(architecture, seed=0)
    x = np.random.default_rng(2).normal(size=(6, 3, 32, 32)).astype(np.float32)
    y = np.arange(6) % 10
    task = TorchTask(architecture, parameters, x, y, 0.1)
    with torch.no_grad():
        logits = task.network(torch.from_numpy(np.ascontiguousarray(x[:, :, 4:28, 4:28]))).double().numpy()
    expected = np.mean(np.log(np.exp(logits).sum(1)) - logits[np.arange(6), y])
    loss, _ = task.evaluate(x, y)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)
    stats, _ = task.step(np.arange(6))
    assert int(stats.count) == 6
