"""``cabs train`` data-parallel: torchrun with 2 gloo processes, JAX on 4 host devices, TensorFlow on 4 logical CPUs.

Each distributed run is compared with a single-process run of the same seed: the same
batch-size sequence, the same losses and statistics, files written once (by rank 0).
Runs go in subprocesses with ``cwd=tmp_path``, so the checkout's ``cabs/`` folder does
not shadow the installed package and the device set-up happens in a fresh process.
PyTorch and JAX train in float64, where the distributed sums differ from one device's by
rounding only (rtol 1e-10); TensorFlow's task trains in float32 only, so its losses and
gradient-noise estimates are compared with rtol 1e-4 and the short run's batch sizes exactly.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from cabs.cli import main

STEPS = 12
COMMON = ["--model", "mlp", "--steps", str(STEPS), "--min-batch-size", "4", "--lr", "0.2", "--seed", "3"]
COMMON += ["--eval-every", "6", "--check-agreement"]
FILES = {"metrics.jsonl", "summary.json", "training.png", "checkpoint.npz"}


def _environment() -> dict[str, str]:
    environment = dict(os.environ)
    # The test process asks for 4 host devices (conftest); the runs must set up their own.
    environment.pop("XLA_FLAGS", None)
    environment.pop("JAX_ENABLE_X64", None)
    environment.update(TF_CPP_MIN_LOG_LEVEL="2", OMP_NUM_THREADS="1")
    return environment


def _run(arguments: list[str], cwd, prefix: tuple[str, ...] = ("-m", "cabs")) -> subprocess.CompletedProcess:
    result = subprocess.run(
        [sys.executable, *prefix, "train", *arguments],
        cwd=cwd,
        env=_environment(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return result


def _records(folder) -> list[dict]:
    return [json.loads(line) for line in (folder / "metrics.jsonl").read_text().splitlines()]


def _compare(tmp_path, backend: str, launcher: tuple[str, ...], options: list[str], rtol: float, workers: int):
    shared = ["--backend", backend, *COMMON] + (["--dtype", "float64"] if rtol < 1e-6 else [])
    single = _run([*shared, "--out", "single", "--quiet"], tmp_path)
    assert single.stdout == ""
    parallel = _run([*shared, "--out", "parallel", *options], tmp_path, launcher)
    folder = tmp_path / "parallel"
    assert {path.name for path in folder.iterdir()} == FILES
    # One summary table on stdout and one line per step: only rank 0 printed and wrote.
    assert parallel.stdout.count("examples seen") == 1
    reference, records = _records(tmp_path / "single"), _records(folder)
    assert [record["step"] for record in records] == list(range(1, STEPS + 1))
    assert [record["batch_size"] for record in records] == [record["batch_size"] for record in reference]
    assert len({record["batch_size"] for record in records}) > 1  # the batch size moved
    for key in ("loss", "xi", "test_loss"):
        expected = [record[key] for record in reference if key in record]
        np.testing.assert_allclose([record[key] for record in records if key in record], expected, rtol=rtol)
    summary = json.loads((folder / "summary.json").read_text())
    assert summary["workers"]["devices"] == workers
    assert json.loads((tmp_path / "single" / "summary.json").read_text())["workers"]["devices"] == 1
    return summary


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torchrun_two_gloo_workers_match_one_process(tmp_path):
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cabs")
    summary = _compare(tmp_path, "torch", launcher, [], rtol=1e-10, workers=2)
    assert summary["workers"]["processes"] == 2
    assert "gloo" in summary["workers"]["kind"]


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_jax_four_host_devices_match_one_device(tmp_path):
    summary = _compare(tmp_path, "jax", ("-m", "cabs"), ["--devices", "4"], rtol=1e-10, workers=4)
    assert summary["workers"]["processes"] == 1


@pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")
def test_tensorflow_four_logical_devices_match_one_device(tmp_path):
    summary = _compare(tmp_path, "tensorflow", ("-m", "cabs"), ["--devices", "4"], rtol=1e-4, workers=4)
    assert "MirroredStrategy" in summary["workers"]["kind"]


def test_devices_with_torch_points_to_torchrun(tmp_path, capsys):
    with pytest.raises(SystemExit) as raised:
        main(["train", "--backend", "torch", "--devices", "2", "--out", str(tmp_path / "run")])
    assert raised.value.code == 2
    assert "torchrun --standalone --nproc_per_node=N" in capsys.readouterr().err
    assert not (tmp_path / "run").exists()


@pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
def test_more_devices_than_jax_has_is_a_clear_error(tmp_path, capsys):
    import jax

    count = len(jax.devices())
    with pytest.raises(SystemExit) as raised:
        main(["train", "--backend", "jax", "--devices", str(count + 1), "--out", str(tmp_path / "run")])
    assert raised.value.code == 2
    assert f"`devices` must be at most the number of JAX devices ({count} here" in capsys.readouterr().err


@pytest.mark.skipif(importlib.util.find_spec("torch") is None, reason="torch is not installed")
def test_torchrun_resume_keeps_every_step_once(tmp_path):
    # Both workers are killed after step 6 (checkpoint at 4) and the run resumes under torchrun:
    # only rank 0 cuts metrics.jsonl back and appends, so steps 5..12 are written once, after 1..4.
    launcher = ("-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "cabs")
    shared = ["--backend", "torch", *COMMON, "--dtype", "float64", "--out", "run", "--checkpoint-every", "4"]
    reference = _run(["--backend", "torch", *COMMON, "--dtype", "float64", "--out", "single", "--quiet"], tmp_path)
    assert reference.stdout == ""
    killed = subprocess.run(
        [sys.executable, *launcher, "train", *shared],
        cwd=tmp_path,
        env={**_environment(), "CABS_TEST_KILL_AT_STEP": "6"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert killed.returncode != 0
    assert [record["step"] for record in _records(tmp_path / "run")] == list(range(1, 7))
    _run([*shared, "--resume"], tmp_path, launcher)
    records, expected = _records(tmp_path / "run"), _records(tmp_path / "single")
    assert [record["step"] for record in records] == list(range(1, STEPS + 1))
    assert [record["batch_size"] for record in records] == [record["batch_size"] for record in expected]
    np.testing.assert_allclose(
        [record["loss"] for record in records], [record["loss"] for record in expected], rtol=1e-10
    )


def test_restore_on_other_workers_reads_metrics_without_rewriting(tmp_path):
    from cabs.training import checkpoint

    path = tmp_path / "metrics.jsonl"
    content = "".join(json.dumps({"step": step}) + "\n" for step in (1, 2, 3)) + '{"step": 4'  # torn last line
    path.write_text(content)
    inode = path.stat().st_ino
    assert checkpoint.truncate_metrics(path, 2, rewrite=False) == [{"step": 1}, {"step": 2}]
    assert path.read_text() == content and path.stat().st_ino == inode  # neither rewritten nor replaced
    assert checkpoint.truncate_metrics(path, 2) == [{"step": 1}, {"step": 2}]
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
