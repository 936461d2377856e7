"""`cabs train --resume`: a run killed with SIGKILL and resumed continues exactly; bad checkpoints are refused.

The killed runs start the command line in a subprocess (in `tmp_path`, so the checkout
does not shadow the installed package). Two testing hooks make them deterministic:

- the environment variable ``CABS_TEST_KILL_AT_STEP=N`` makes the training loop kill
  its own process with SIGKILL right after step N is logged (and checkpointed, when due);
- the process is started through a small wrapper that records every batch of example
  indices the sampler hands out (one JSON line per step) before calling `cabs.cli.main`,
  so the example order is observed, not reconstructed.

The uninterrupted reference run and the refusal checks call `cabs.cli.main` in this
process, which is faster than starting one per case.

The data set is a tiny MNIST folder (48 training examples) so that epochs end every few
steps and batches straddle epoch boundaries.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from test_cli import write_mnist_folder

pytest.importorskip("torch")

TRAIN_EXAMPLES = 48
STEPS = 40
CHECKPOINT_EVERY = 7
KILL_VARIABLE = "CABS_TEST_KILL_AT_STEP"

# Runs the real command line with the sampler's batches logged to the file in argv[1].
RECORDING_WRAPPER = """
import json, sys
from cabs import data

log_path = sys.argv.pop(1)
draw = data.BatchSampler.__next__

def recorded(self):
    batch = draw(self)
    with open(log_path, "a") as log:
        log.write(json.dumps(batch) + "\\n")
    return batch

data.BatchSampler.__next__ = recorded
from cabs.cli import main
sys.exit(main(sys.argv[1:]))
"""


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    environment = dict(os.environ)
    environment["CABS_CACHE"] = str(tmp_path_factory.mktemp("cabs-cache"))
    environment["TF_CPP_MIN_LOG_LEVEL"] = "2"
    for name in ("PYTHONPATH", "JAX_ENABLE_X64", "XLA_FLAGS", KILL_VARIABLE):
        environment.pop(name, None)
    return environment


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("data") / "mnist"
    write_mnist_folder(folder, train=TRAIN_EXAMPLES, test=16)
    return folder


def train_arguments(data_dir: Path, out: Path, *extra: str) -> list[str]:
    arguments = ["train", "--backend", "torch", "--dtype", "float64", "--dataset", "mnist", "--data-dir", str(data_dir)]
    arguments += ["--model", "mlp", "--steps", str(STEPS), "--checkpoint-every", str(CHECKPOINT_EVERY), "--seed", "5"]
    # A minimum of 2 lets the batch size move from the first steps on; 64 > 48 examples spans epochs.
    arguments += ["--min-batch-size", "2", "--initial-batch-size", "3", "--max-batch-size", "64", "--eval-every", "10"]
    return [*arguments, "--out", str(out), "--quiet", *extra]


def run(arguments: list[str], env: dict[str, str], cwd: Path, index_log: Path | None = None, kill_at: int = 0):
    environment = dict(env)
    if kill_at:
        environment[KILL_VARIABLE] = str(kill_at)
    if index_log is None:
        command = [sys.executable, "-m", "cabs", *arguments]
    else:
        command = [sys.executable, "-c", RECORDING_WRAPPER, str(index_log), *arguments]
    return subprocess.run(command, env=environment, cwd=cwd, capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module", autouse=True)
def torch_global_state():
    """The in-process runs set PyTorch's thread count and seed its generator; put both back afterwards."""
    import torch

    threads, generator_state = torch.get_num_threads(), torch.random.get_rng_state()
    yield
    torch.set_num_threads(threads)
    torch.random.set_rng_state(generator_state)


def run_here(arguments: list[str], batches: list | None = None, monkeypatch=None) -> subprocess.CompletedProcess:
    """Run the command line in this process (faster than a subprocess); optionally record the batches."""
    from cabs import data
    from cabs.cli import main

    if batches is not None:
        draw = data.BatchSampler.__next__

        def recorded(self):
            batch = draw(self)
            batches.append(batch)
            return batch

        monkeypatch.setattr(data.BatchSampler, "__next__", recorded)
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        try:
            code = main(arguments)
        except SystemExit as exit_:
            code = exit_.code
    return subprocess.CompletedProcess(arguments, code, stdout.getvalue(), stderr.getvalue())


def read_lines(path: Path) -> list:
    return [json.loads(line) for line in path.read_text().splitlines()]


def without_wall_time(records: list[dict]) -> list[dict]:
    return [{key: value for key, value in record.items() if key != "wall_time"} for record in records]


def checkpoint_arrays(out: Path) -> dict[str, np.ndarray]:
    with np.load(out / "checkpoint.npz") as archive:
        return {name: archive[name] for name in archive.files if name != "__meta__"}


def test_killed_and_resumed_run_equals_an_uninterrupted_one(tmp_path, env, data_dir, monkeypatch):
    reference_out = tmp_path / "reference"
    reference_batches: list[list[int]] = []
    reference = run_here(train_arguments(data_dir, reference_out), reference_batches, monkeypatch)
    assert reference.returncode == 0, reference.stderr
    assert len(reference_batches) == STEPS

    # Kill steps drawn at random, past the first checkpoint, none on the last step.
    generator = random.Random(os.environ.get("PYTEST_XDIST_WORKER", "resume"))
    kill_steps = sorted(generator.sample(range(CHECKPOINT_EVERY + 1, STEPS), 3))
    out = tmp_path / "killed"
    batches: list[list[int]] = []
    resumed_from = 0
    for attempt, kill_at in enumerate(kill_steps):
        log = tmp_path / f"indices-{attempt}.jsonl"
        extra = ("--resume",) if attempt else ()
        result = run(train_arguments(data_dir, out, *extra), env, tmp_path, log, kill_at=kill_at)
        assert result.returncode == -signal.SIGKILL, (kill_at, result.returncode, result.stderr)
        attempt_batches = read_lines(log)
        assert len(attempt_batches) == kill_at - resumed_from  # the attempt drew the steps up to the kill
        assert len(read_lines(out / "metrics.jsonl")) == kill_at  # every step was logged, none twice
        checkpoint_step = kill_at // CHECKPOINT_EVERY * CHECKPOINT_EVERY
        # Only the steps up to the last checkpoint count; the resumed run repeats the others.
        batches += attempt_batches[: checkpoint_step - resumed_from]
        resumed_from = checkpoint_step
        if attempt == 1:
            with (out / "metrics.jsonl").open("a") as metrics:
                metrics.write('{"step": 99, "batch_si')  # a line torn by a crash in the middle of a write
    final = run(train_arguments(data_dir, out, "--resume"), env, tmp_path, tmp_path / "indices-final.jsonl")
    assert final.returncode == 0, final.stderr
    batches += read_lines(tmp_path / "indices-final.jsonl")

    # The same examples in the same order, so the same batch sizes.
    assert batches == reference_batches, kill_steps
    stream = np.concatenate(batches)
    for epoch in range(len(stream) // TRAIN_EXAMPLES):
        # Each full epoch uses every example exactly once, across the interruptions.
        assert sorted(stream[epoch * TRAIN_EXAMPLES : (epoch + 1) * TRAIN_EXAMPLES]) == list(range(TRAIN_EXAMPLES))
    assert len(stream) > 2 * TRAIN_EXAMPLES  # the run crossed epoch boundaries
    assert len({len(batch) for batch in batches}) > 2  # the batch size moved

    # metrics.jsonl: the same lines but the wall time, no torn or repeated one.
    records = read_lines(out / "metrics.jsonl")
    assert [record["step"] for record in records] == list(range(1, STEPS + 1))
    assert without_wall_time(records) == without_wall_time(read_lines(reference_out / "metrics.jsonl"))
    assert [record["batch_size"] for record in records] == [len(batch) for batch in reference_batches]

    # The final parameters and random-number state, bitwise (float64 on the CPU).
    expected, resumed = checkpoint_arrays(reference_out), checkpoint_arrays(out)
    assert sorted(expected) == sorted(resumed)
    assert any(name.startswith("model/") for name in expected)
    for name in expected:
        assert expected[name].dtype == resumed[name].dtype, name
        assert np.array_equal(expected[name], resumed[name]), name
    assert expected["model/1.weight"].dtype == np.float64

    summary, reference_summary = (json.loads((folder / "summary.json").read_text()) for folder in (out, reference_out))
    for key in ("steps", "examples_seen", "final_batch_size", "train_loss", "test_loss", "test_accuracy", "controller"):
        assert summary[key] == reference_summary[key], key


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, data_dir) -> Path:
    """A short run that saved its checkpoint at the end."""
    out = tmp_path_factory.mktemp("finished") / "run"
    result = run_here(train_arguments(data_dir, out, "--steps", "9"))
    assert result.returncode == 0, result.stderr
    return out


def test_resuming_a_finished_run_changes_nothing(finished_run, data_dir):
    before = (finished_run / "metrics.jsonl").read_bytes()
    result = run_here(train_arguments(data_dir, finished_run, "--steps", "9", "--resume"))
    assert result.returncode == 0, result.stderr
    assert (finished_run / "metrics.jsonl").read_bytes() == before


REFUSED = {
    "other learning rate": (["--lr", "0.2"], "--lr: saved 0.1, here 0.2"),
    "other seed": (["--seed", "6"], "--seed: saved 5, here 6"),
    "other model": (["--model", "cnn"], "--model: saved 'mlp', here 'cnn'"),
    "other batch bounds": (["--max-batch-size", "32"], "--max-batch-size: saved 64, here 32"),
    "other dtype": (["--dtype", "float32"], "--dtype: saved 'float64', here 'float32'"),
    "fewer steps": (["--steps", "5"], "past --steps 5"),
}


def copy_run(source: Path, destination: Path) -> Path:
    destination.mkdir(parents=True)
    for name in ("checkpoint.npz", "metrics.jsonl"):
        (destination / name).write_bytes((source / name).read_bytes())
    return destination


def assert_one_line_error(result: subprocess.CompletedProcess, *named: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and result.stdout == ""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cabs: error:"), result.stderr
    for text in named:
        assert text in lines[0], lines[0]


@pytest.mark.parametrize("case", list(REFUSED))
def test_resume_with_another_configuration_is_refused(case, finished_run, data_dir, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    changed, named = REFUSED[case]
    result = run_here(train_arguments(data_dir, out, "--steps", "9", "--resume", *changed))
    assert_one_line_error(result, named, "checkpoint")


def test_resume_with_other_data_is_refused(finished_run, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    other = tmp_path / "other-data"
    write_mnist_folder(other, train=TRAIN_EXAMPLES + 1, test=16)
    result = run_here(train_arguments(other, out, "--steps", "9", "--resume"))
    assert_one_line_error(result, "other data", "SHA-256")


def test_resume_without_a_checkpoint_is_refused(data_dir, tmp_path):
    result = run_here(train_arguments(data_dir, tmp_path / "empty", "--resume"))
    assert_one_line_error(result, "no checkpoint", "checkpoint.npz", "without --resume")


def truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])


def flip_a_byte(path: Path) -> None:
    content = bytearray(path.read_bytes())
    content[len(content) // 2] ^= 0xFF  # inside an array's data: the zip CRC-32 no longer matches
    path.write_bytes(bytes(content))


def not_a_checkpoint(path: Path) -> None:
    path.write_bytes(b"this is not a checkpoint\n")


def drop_metrics(path: Path) -> None:
    (path.parent / "metrics.jsonl").write_text("")


DAMAGE = {
    "truncated": (truncate, "damaged"),
    "flipped byte": (flip_a_byte, "damaged"),
    "other file": (not_a_checkpoint, "damaged"),
    "metrics lost": (drop_metrics, "metrics.jsonl"),
}


@pytest.mark.parametrize("case", list(DAMAGE))
def test_damaged_checkpoint_is_refused(case, finished_run, data_dir, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    damage, named = DAMAGE[case]
    damage(out / "checkpoint.npz")
    result = run_here(train_arguments(data_dir, out, "--steps", "12", "--resume"))
    assert_one_line_error(result, named)


def test_ctrl_c_saves_a_checkpoint_and_exits_130(env, data_dir, tmp_path):
    """SIGINT is honoured at the end of a step: the checkpoint is that step's, the metrics match it."""
    out = tmp_path / "run"
    arguments = train_arguments(data_dir, out, "--steps", "100000", "--checkpoint-every", "1000")
    process = subprocess.Popen(
        [sys.executable, "-m", "cabs", *arguments], env=env, cwd=tmp_path, stderr=subprocess.PIPE, text=True
    )
    metrics = out / "metrics.jsonl"
    try:
        # Wait for the training loop (its handler is installed before the first step).
        deadline = time.monotonic() + 120
        while not (metrics.exists() and metrics.stat().st_size > 0) and process.poll() is None:
            assert time.monotonic() < deadline, "the run did not start training"
            time.sleep(0.05)
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        if process.poll() is None:
            process.kill()
    assert process.returncode == 130, stderr
    assert "interrupted" in stderr and "Traceback" not in stderr
    with np.load(out / "checkpoint.npz") as archive:
        meta = json.loads(archive["__meta__"].tobytes())
    assert meta["step"] == len(read_lines(metrics)) >= 1


# --- a tampered checkpoint: wrong types in its JSON, wrong or non-finite arrays ------------------


def rewrite_checkpoint(path: Path, change_meta=None, change_arrays=None) -> None:
    """Rewrite the checkpoint with its JSON document and arrays changed (a valid zip, a bad content)."""
    with np.load(path) as archive:
        arrays = {name: archive[name] for name in archive.files}
    meta = json.loads(arrays.pop("__meta__").tobytes().decode())
    if change_meta is not None:
        change_meta(meta)
    if change_arrays is not None:
        change_arrays(arrays)
    arrays["__meta__"] = np.frombuffer(json.dumps(meta).encode(), dtype=np.uint8)
    np.savez(path, **arrays)


def first_parameter(arrays: dict[str, np.ndarray]) -> str:
    return sorted(name for name in arrays if name.startswith("model/"))[0]


def replace_first_parameter(make):
    def change(arrays: dict[str, np.ndarray]) -> None:
        name = first_parameter(arrays)
        arrays[name] = make(arrays[name])

    return change


TAMPERED = {
    "integer parameters": (None, replace_first_parameter(lambda array: array.astype(np.int64)), "int64"),
    "float32 parameters": (None, replace_first_parameter(lambda array: array.astype(np.float32)), "float32"),
    "NaN parameters": (None, replace_first_parameter(lambda array: np.full_like(array, np.nan)), "non-finite"),
    "wrong shape": (None, replace_first_parameter(lambda array: array[:1]), "the network's is float64"),
    "missing parameter": (None, lambda arrays: arrays.pop(first_parameter(arrays)), "lacks the parameter array"),
    "extra parameter": (None, lambda arrays: arrays.__setitem__("model/99.weight", np.zeros(3)), "model/99.weight"),
    "step as text": (lambda meta: meta.update(step="9"), None, "'step' must be int, got step='9' (str)"),
    "negative step": (lambda meta: meta.update(step=-1), None, "'step' must be a finite number >= 0"),
    "wall time as list": (lambda meta: meta.update(wall_time=[1]), None, "'wall_time' must be int or float"),
    "no settings": (lambda meta: meta.pop("settings"), None, "lacks the field 'settings'"),
    "sampler as text": (lambda meta: meta.update(sampler="x"), None, "'sampler' must be dict"),
}


@pytest.mark.parametrize("case", list(TAMPERED))
def test_tampered_checkpoint_is_refused_naming_the_field_or_array(case, finished_run, data_dir, tmp_path):
    out = copy_run(finished_run, tmp_path / "run")
    change_meta, change_arrays, named = TAMPERED[case]
    rewrite_checkpoint(out / "checkpoint.npz", change_meta, change_arrays)
    result = run_here(train_arguments(data_dir, out, "--steps", "12", "--resume"))
    assert_one_line_error(result, named, "checkpoint.npz")
    if change_arrays is not None and case != "extra parameter" and case != "missing parameter":
        with np.load(finished_run / "checkpoint.npz") as archive:
            assert repr(first_parameter(dict(archive))) in result.stderr


def test_resume_without_a_checkpoint_is_refused_before_the_framework_loads(data_dir, tmp_path):
    # None in sys.modules makes `import torch` fail as if PyTorch were not installed: the
    # missing checkpoint is still what the user hears about.
    code = "import sys; sys.modules['torch'] = None; from cabs.cli import main; sys.exit(main(sys.argv[1:]))"
    arguments = train_arguments(data_dir, tmp_path / "empty", "--resume")
    result = subprocess.run([sys.executable, "-c", code, *arguments], capture_output=True, text=True, cwd=tmp_path)
    assert_one_line_error(result, "no checkpoint", "checkpoint.npz")
