"""The command line: `cabs train` output files, one-line errors, `cabs backends`, and the shared models.

The end-to-end runs start `python -m cabs` in a subprocess with a budget of a few
steps, so the exit status, stdout and stderr are the ones a user sees.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import importlib.util
import json
import math
import os
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

from cabs.training import models

FRAMEWORK_BACKENDS = ("torch", "jax", "tensorflow")
METRIC_KEYS = {"step", "batch_size", "loss", "xi", "examples_seen", "wall_time", "epoch", "skipped"}
SUMMARY_KEYS = {
    "backend",
    "dataset",
    "model",
    "steps",
    "examples_seen",
    "final_batch_size",
    "train_loss",
    "test_loss",
    "test_accuracy",
    "wall_time",
    "seed",
    "settings",
}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def installed(name: str) -> bool:
    return importlib.util.find_spec(name) is not None


def backend_param(name: str):
    return pytest.param(name, marks=pytest.mark.skipif(not installed(name), reason=f"{name} is not installed"), id=name)


@pytest.fixture(scope="session")
def cli_env(tmp_path_factory) -> dict[str, str]:
    """The subprocess environment: a shared data-set cache (MNIST-1D is generated once) and quiet frameworks."""
    env = dict(os.environ)
    env["CABS_CACHE"] = str(tmp_path_factory.mktemp("cabs-cache"))
    env["TF_CPP_MIN_LOG_LEVEL"] = "2"
    env.pop("JAX_ENABLE_X64", None)  # the command trains in float32, as a user's run does
    env.pop("XLA_FLAGS", None)
    return env


def run_cabs(arguments: list[str], env: dict[str, str], timeout: float = 300) -> subprocess.CompletedProcess:
    # Run outside the checkout: `-m` puts the working folder on sys.path, and the checkout's
    # cabs/ folder (without cabs.backends) would shadow the installed package.
    return subprocess.run(
        [sys.executable, "-m", "cabs", *arguments],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=tempfile.gettempdir(),
    )


def read_metrics(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]


# --- `cabs train` end to end ------------------------------------------------------------------


@pytest.mark.parametrize("backend", [backend_param(name) for name in FRAMEWORK_BACKENDS])
def test_train_writes_metrics_summary_and_figure(backend, tmp_path, cli_env):
    out = tmp_path / "run"
    arguments = ["train", "--backend", backend, "--steps", "8", "--eval-every", "4", "--seed", "3"]
    # A minimum of 2 lets the batch size move within the first few steps.
    arguments += ["--min-batch-size", "2", "--initial-batch-size", "4", "--max-batch-size", "64", "--out", str(out)]
    result = run_cabs(arguments, cli_env)
    assert result.returncode == 0, result.stderr

    records = read_metrics(out)
    assert [record["step"] for record in records] == list(range(1, 9))
    for record in records:
        assert METRIC_KEYS <= set(record), record
        assert 2 <= record["batch_size"] <= 64
        assert math.isfinite(record["loss"]) and record["loss"] > 0
        assert math.isfinite(record["xi"]) and record["xi"] >= 0
        assert record["skipped"] == 0
    batch_sizes = [record["batch_size"] for record in records]
    assert [record["examples_seen"] for record in records] == np.cumsum(batch_sizes).tolist()
    assert batch_sizes[0] == 4  # the first step uses the initial batch size
    assert len(set(batch_sizes)) > 1
    # The sampler follows the controller: each batch has the size the previous step asked for.
    assert batch_sizes[1:] == [record["next_batch_size"] for record in records[:-1]]
    assert [record["step"] for record in records if "test_accuracy" in record] == [4, 8]
    assert all(0.0 <= record["test_accuracy"] <= 1.0 for record in records if "test_accuracy" in record)

    summary = json.loads((out / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    assert (summary["backend"], summary["dataset"], summary["model"], summary["seed"]) == (backend, "mnist1d", "cnn", 3)
    assert summary["steps"] == 8
    assert summary["examples_seen"] == records[-1]["examples_seen"]
    assert summary["final_batch_size"] == batch_sizes[-1]
    assert summary["test_accuracy"] == records[-1]["test_accuracy"]
    assert math.isfinite(summary["train_loss"]) and math.isfinite(summary["test_loss"])
    assert summary["settings"]["initial_batch_size"] == 4
    if backend == "jax":
        # Batch sizes 2..64 pad to power-of-two buckets: at most one compilation per bucket.
        buckets = {1 << (size - 1).bit_length() for size in batch_sizes}
        assert 1 <= summary["compile_count"] <= len(buckets)

    assert (out / "training.png").read_bytes()[:8] == PNG_SIGNATURE
    assert "test accuracy" in result.stdout and str(out) in result.stdout


def test_train_by_epochs_sees_every_example_once_per_epoch(tmp_path, cli_env):
    pytest.importorskip("torch")
    out = tmp_path / "epochs"
    result = run_cabs(["train", "--epochs", "1", "--min-batch-size", "512", "--quiet", "--out", str(out)], cli_env)
    assert result.returncode == 0, result.stderr
    assert result.stdout == ""  # --quiet prints nothing
    records = read_metrics(out)
    assert records[-1]["examples_seen"] == 4000  # MNIST-1D's training set, exactly once
    assert records[-1]["epoch"] == 1.0
    assert "test_accuracy" in records[-1]
    summary = json.loads((out / "summary.json").read_text())
    assert summary["settings"]["steps"] is None and summary["settings"]["epochs"] == 1


class RecordingBar:
    """Stands in for the tqdm bar: records what the bar shows each time update() redraws it."""

    def __init__(self) -> None:
        self.count, self.postfix, self.shown = 0, {}, []

    def update(self, amount: int) -> None:
        self.count += amount
        self.shown.append((self.count, dict(self.postfix)))

    def set_postfix(self, refresh: bool = True, **values: str) -> None:
        self.postfix = values

    def close(self) -> None:
        pass


def test_default_step_budget_is_recorded_and_the_bar_shows_each_steps_own_values(tmp_path, monkeypatch):
    pytest.importorskip("torch")
    from cabs.training import loop

    # The default budget, made small: summary.json must record the steps the run took, not None.
    monkeypatch.setattr(loop, "DEFAULT_STEPS", 5)
    bar = RecordingBar()
    monkeypatch.setattr(loop, "_progress_bar", lambda *arguments, **options: bar)
    config = loop.TrainConfig(model="mlp", min_batch_size=2, initial_batch_size=3, max_batch_size=64, out=str(tmp_path))
    summary = loop.train(config, progress=True)
    assert config.steps is None and summary["settings"]["steps"] == 5 == summary["steps"]
    assert json.loads((tmp_path / "summary.json").read_text())["settings"]["steps"] == 5
    records = read_metrics(tmp_path)
    # At every redraw the counter and the postfix describe the same step.
    assert [count for count, _ in bar.shown] == [record["step"] for record in records]
    assert [postfix["batch"] for _, postfix in bar.shown] == [str(record["batch_size"]) for record in records]


def write_idx(path: Path, array: np.ndarray) -> None:
    """Write ``array`` (uint8) as a gzipped IDX file: magic 0x0000 08 ndim, big-endian sizes, data."""
    header = struct.pack(">HBB", 0, 0x08, array.ndim) + struct.pack(f">{array.ndim}I", *array.shape)
    with gzip.open(path, "wb") as file:
        file.write(header + array.astype(np.uint8).tobytes())


def write_mnist_folder(folder: Path, train: int = 48, test: int = 16) -> None:
    generator = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    write_idx(folder / "train-images-idx3-ubyte.gz", generator.integers(0, 256, (train, 28, 28)))
    write_idx(folder / "train-labels-idx1-ubyte.gz", generator.integers(0, 10, train))
    write_idx(folder / "t10k-images-idx3-ubyte.gz", generator.integers(0, 256, (test, 28, 28)))
    write_idx(folder / "t10k-labels-idx1-ubyte.gz", generator.integers(0, 10, test))


def test_train_cnn_on_idx_image_files(tmp_path, cli_env):
    pytest.importorskip("torch")
    write_mnist_folder(tmp_path / "mnist")
    out = tmp_path / "run"
    arguments = ["train", "--dataset", "mnist", "--data-dir", str(tmp_path / "mnist"), "--model", "cnn"]
    result = run_cabs([*arguments, "--steps", "3", "--min-batch-size", "8", "--quiet", "--out", str(out)], cli_env)
    assert result.returncode == 0, result.stderr
    summary = json.loads((out / "summary.json").read_text())
    assert (summary["dataset"], summary["model"], summary["steps"]) == ("mnist", "cnn", 3)
    assert summary["examples_seen"] == sum(record["batch_size"] for record in read_metrics(out))


def test_backends_agree_on_the_default_run(tmp_path, cli_env):
    """Same seed, same NumPy weights, same batches: the runs differ only by float32 rounding.

    400 steps of the default run is where the batch size first leaves 16 (about
    step 315). Rounding makes the runs drift apart slowly, so the batch-size curves
    are compared with a tolerance, not for equality.
    """
    backends = [name for name in FRAMEWORK_BACKENDS if installed(name)]
    if len(backends) < 2:
        pytest.skip("needs at least two installed frameworks")
    runs = {}
    for backend in backends:
        out = tmp_path / backend
        result = run_cabs(["train", "--backend", backend, "--steps", "400", "--quiet", "--out", str(out)], cli_env)
        assert result.returncode == 0, result.stderr
        runs[backend] = (
            np.array([record["batch_size"] for record in read_metrics(out)]),
            json.loads((out / "summary.json").read_text()),
        )
    reference_sizes, reference_summary = runs[backends[0]]
    for backend, (sizes, summary) in runs.items():
        assert sizes[0] == 16 and sizes.max() > 16, backend  # the batch size grows within the run
        assert np.max(np.abs(sizes - reference_sizes) / reference_sizes) <= 0.35, backend
        assert abs(summary["test_accuracy"] - reference_summary["test_accuracy"]) <= 0.08, backend


# --- bad input: one line on stderr, exit status 2, no traceback --------------------------------


def corrupt_mnist_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "corrupt"
    write_mnist_folder(folder)
    # A truncated image file: the header announces 48 images, the data stop after 100 bytes.
    header = struct.pack(">HBB", 0, 0x08, 3) + struct.pack(">3I", 48, 28, 28)
    with gzip.open(folder / "train-images-idx3-ubyte.gz", "wb") as file:
        file.write(header + bytes(100))
    return folder


BAD_INPUTS = {
    "unknown backend": (["--backend", "mxnet"], "--backend"),
    "min batch size 0": (["--min-batch-size", "0"], "--min-batch-size"),
    "negative lr": (["--lr", "-0.1"], "--lr"),
    "nan lr": (["--lr", "nan"], "--lr"),
    "min above max": (["--min-batch-size", "64", "--max-batch-size", "32"], "min_batch_size"),
    "initial outside bounds": (["--initial-batch-size", "4000"], "initial_batch_size"),
    "zero steps": (["--steps", "0"], "--steps"),
    "steps and epochs": (["--steps", "5", "--epochs", "1"], "--epochs"),
    "unknown data set": (["--dataset", "imagenet"], "imagenet"),
    "no data folder": (["--dataset", "mnist"], "data_dir"),
    "missing data folder": (["--dataset", "mnist", "--data-dir", "{tmp}/does-not-exist"], "does-not-exist"),
    "missing files": (["--dataset", "fashion-mnist", "--data-dir", "{tmp}"], "t10k"),
    "corrupt idx file": (["--dataset", "mnist", "--data-dir", "{corrupt}"], "train-images-idx3-ubyte"),
    "checkpoint every 0": (["--checkpoint-every", "0"], "--checkpoint-every"),
    "unknown dtype": (["--dtype", "float16"], "--dtype"),
    "float64 with tensorflow": (["--backend", "tensorflow", "--dtype", "float64"], "dtype"),
    "resume without checkpoint": (["--resume"], "no checkpoint to resume from"),
    "seed above 32 bits": (["--seed", "5000000000"], "--seed: must be in [0, 2**32-1], got 5000000000"),
    "too many threads": (["--threads", "100000"], "--threads: must be in [1, "),
    "lr overflows float32": (["--lr", "1e308"], "learning_rate"),
    "batch sizes above int32": (
        ["--min-batch-size", "10000000000", "--max-batch-size", "10000000000", "--initial-batch-size", "10000000000"],
        "min_batch_size",
    ),
    "negative memory budget": (["--memory-budget", "-5MB"], "--memory-budget: must be a size"),
}


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_line_error_with_exit_status_2(case, tmp_path, cli_env):
    arguments, named = BAD_INPUTS[case]
    corrupt = corrupt_mnist_folder(tmp_path) if "{corrupt}" in " ".join(arguments) else None
    arguments = [argument.format(tmp=tmp_path, corrupt=corrupt) for argument in arguments]
    budget = [] if {"--steps", "--epochs"} & set(arguments) else ["--steps", "2"]  # in case it does not fail
    result = run_cabs(["train", *arguments, *budget, "--out", str(tmp_path / "out")], cli_env)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr
    error_lines = [line for line in result.stderr.splitlines() if "error:" in line]
    assert len(error_lines) == 1 and error_lines[0].startswith("cabs"), result.stderr
    assert named in error_lines[0]
    assert result.stdout == ""


def out_is_a_file(tmp_path: Path) -> str:
    (tmp_path / "a-file").write_text("not a folder\n")
    return str(tmp_path / "a-file")


def out_below_a_file(tmp_path: Path) -> str:
    return os.path.join(out_is_a_file(tmp_path), "run")


BAD_OUT = {
    "empty": (lambda tmp_path: "", "`out` must name a folder"),
    "a file": (out_is_a_file, "`out` must be a writable folder"),
    "below a file": (out_below_a_file, "`out` must be a writable folder"),
}


@pytest.mark.parametrize("case", list(BAD_OUT))
def test_out_must_be_a_writable_folder(case, tmp_path, cli_env):
    make_out, named = BAD_OUT[case]
    out = make_out(tmp_path)
    before = sorted(os.listdir(tempfile.gettempdir()))  # an empty --out must not write into the working folder
    result = run_cabs(["train", "--steps", "2", "--quiet", "--out", out], cli_env)
    assert result.returncode == 2, (result.returncode, result.stderr)
    assert "Traceback" not in result.stderr and "Errno" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("cabs: error:") and named in lines[0], result.stderr
    if case == "empty":
        assert not {"metrics.jsonl", "summary.json"} & (set(os.listdir(tempfile.gettempdir())) - set(before))


@pytest.mark.skipif(hasattr(os, "geteuid") and os.geteuid() == 0, reason="root reads files whatever their mode")
def test_unreadable_data_file_is_named(tmp_path, cli_env):
    folder = tmp_path / "mnist"
    write_mnist_folder(folder)
    (folder / "train-images-idx3-ubyte.gz").chmod(0)
    result = run_cabs(["train", "--dataset", "mnist", "--data-dir", str(folder), "--out", str(tmp_path / "o")], cli_env)
    assert result.returncode == 2 and "Traceback" not in result.stderr
    assert result.stderr.startswith("cabs: error:") and "train-images-idx3-ubyte" in result.stderr


def test_missing_framework_is_one_line_error(tmp_path, cli_env):
    # None in sys.modules makes `import torch` fail as if torch were not installed.
    code = "import sys; sys.modules['torch'] = None; from cabs.cli import main; sys.exit(main(sys.argv[1:]))"
    arguments = ["train", "--backend", "torch", "--steps", "2", "--out", str(tmp_path / "out")]
    result = subprocess.run(
        [sys.executable, "-c", code, *arguments], env=cli_env, capture_output=True, text=True, cwd=tmp_path
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "Traceback" not in result.stderr
    assert result.stderr.startswith("cabs: error:") and "pip install" in result.stderr


def test_debug_shows_the_traceback(tmp_path, cli_env):
    folder = corrupt_mnist_folder(tmp_path)
    result = run_cabs(
        ["train", "--dataset", "mnist", "--data-dir", str(folder), "--debug", "--out", str(tmp_path / "o")], cli_env
    )
    assert result.returncode != 0
    assert "Traceback" in result.stderr and "DatasetError" in result.stderr


# --- `cabs backends` ----------------------------------------------------------------------------


def test_backends_lists_installed_frameworks_with_version_and_devices(cli_env):
    result = run_cabs(["backends"], cli_env)
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[1:]}
    import numpy

    assert numpy.__version__ in rows["numpy"]
    for name in FRAMEWORK_BACKENDS:
        if not installed(name):
            assert name not in rows
            continue
        version = importlib.metadata.version(
            "tensorflow-cpu" if name == "tensorflow" and not _has_distribution("tensorflow") else name
        )
        assert version in rows[name] and "cpu" in rows[name].lower(), rows[name]


def _has_distribution(name: str) -> bool:
    try:
        importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return False
    return True


def test_help_names_the_options(cli_env):
    result = run_cabs(["train", "--help"], cli_env)
    assert result.returncode == 0
    assert_each_default_said_once(result.stdout)
    assert all(model in result.stdout for model in models.MODELS)
    for option in ("--backend", "--dataset", "--data-dir", "--model", "--lr", "--min-batch-size", "--max-batch-size"):
        assert option in result.stdout
    for option in (
        "--initial-batch-size",
        "--steps",
        "--epochs",
        "--seed",
        "--out",
        "--eval-every",
        "--threads",
        "--quiet",
    ):
        assert option in result.stdout


# --- the shared models: one set of NumPy weights, the same function in every framework ----------


def reference_logits(architecture: models.Architecture, parameters, x: np.ndarray) -> np.ndarray:
    """The network's logits in NumPy float64, convolutions as explicit sums over kernel offsets."""
    hidden = x.astype(np.float64)
    for layer, (weight, bias) in zip(architecture.layers, parameters, strict=True):
        weight, bias = weight.astype(np.float64), bias.astype(np.float64)
        if isinstance(layer, models.Conv):
            hidden = conv_same(hidden, weight) + bias.reshape(-1, *(1,) * layer.spatial_dims)
            hidden = np.maximum(hidden, 0.0)
            if layer.pool > 1:
                hidden = max_pool(hidden, layer.pool)
            continue
        hidden = hidden.reshape(len(hidden), -1) @ weight + bias
        if layer.relu:
            hidden = np.maximum(hidden, 0.0)
    return hidden


def conv_same(x: np.ndarray, weight: np.ndarray) -> np.ndarray:
    """Cross-correlation with zero 'same' padding; x (n, c, *spatial), weight (out, c, *kernel)."""
    kernel = weight.shape[2:]
    pad = [(0, 0), (0, 0)] + [(size // 2, size // 2) for size in kernel]
    padded = np.pad(x, pad)
    out = np.zeros((x.shape[0], weight.shape[0], *x.shape[2:]))
    for offset in np.ndindex(*kernel):
        window = padded[
            (slice(None), slice(None), *(slice(o, o + n) for o, n in zip(offset, x.shape[2:], strict=True)))
        ]
        out += np.einsum("nc...,oc->no...", window, weight[(slice(None), slice(None), *offset)])
    return out


def max_pool(x: np.ndarray, pool: int) -> np.ndarray:
    spatial = x.shape[2:]
    trimmed = x[(slice(None), slice(None), *(slice(0, n // pool * pool) for n in spatial))]
    shape = [x.shape[0], x.shape[1]]
    for n in spatial:
        shape += [n // pool, pool]
    return trimmed.reshape(shape).max(axis=tuple(range(3, 2 + 2 * len(spatial), 2)))


def make_framework_task(backend: str, architecture, parameters, x, y):
    if backend == "torch":
        from cabs.training.torch import TorchTask

        return TorchTask(architecture, parameters, x, y, 0.1)
    if backend == "jax":
        from cabs.training.jax import JaxTask

        return JaxTask(architecture, parameters, x, y, 0.1, max_batch_size=64)
    from cabs.training.tensorflow import TensorFlowTask

    return TensorFlowTask(architecture, parameters, x, y, 0.1)


@pytest.mark.parametrize("backend", [backend_param(name) for name in FRAMEWORK_BACKENDS])
@pytest.mark.parametrize(
    ("model", "input_shape"), [("mlp", (40,)), ("cnn", (40,)), ("cnn", (1, 8, 8)), ("cnn", (3, 6, 5))], ids=str
)
def test_every_backend_computes_the_same_network_from_the_numpy_weights(backend, model, input_shape):
    architecture = models.architecture(model, input_shape, 10)
    parameters = models.initial_parameters(architecture, seed=5)
    generator = np.random.default_rng(1)
    x = generator.normal(size=(24, *architecture.input_shape)).astype(np.float32)
    y = generator.integers(0, 10, 24)
    logits = reference_logits(architecture, parameters, x)
    log_probabilities = (
        logits
        - np.log(np.exp(logits - logits.max(1, keepdims=True)).sum(1, keepdims=True))
        - logits.max(1, keepdims=True)
    )
    expected_loss = -log_probabilities[np.arange(24), y].mean()
    expected_accuracy = np.mean(logits.argmax(1) == y)

    task = make_framework_task(backend, architecture, parameters, x, y)
    loss, accuracy = task.evaluate(x, y)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-4)
    assert accuracy == expected_accuracy
    stats, step_loss = task.step(np.arange(10))
    np.testing.assert_allclose(step_loss, -log_probabilities[:10][np.arange(10), y[:10]].mean(), rtol=1e-4)
    assert int(stats.count) == 10


def test_initial_parameters_depend_only_on_the_seed():
    architecture = models.architecture("cnn", (1, 8, 8), 10)
    first, again, other = (models.initial_parameters(architecture, seed) for seed in (0, 0, 1))
    for (weight, bias), (weight_again, bias_again), (weight_other, _) in zip(first, again, other, strict=True):
        assert weight.dtype == np.float32 and bias.dtype == np.float32
        np.testing.assert_array_equal(weight, weight_again)
        np.testing.assert_array_equal(bias, bias_again)
        assert not np.array_equal(weight, weight_other)


def test_architecture_shapes():
    mlp = models.architecture("mlp", (1, 28, 28), 10)
    assert [(layer.in_features, layer.out_features) for layer in mlp.layers] == [(784, 256), (256, 256), (256, 10)]
    cnn_1d = models.architecture("cnn", (40,), 10)
    assert cnn_1d.input_shape == (1, 40) and cnn_1d.layers[2].in_features == 32 * 10
    with pytest.raises(ValueError, match="model"):
        models.architecture("resnet", (40,), 10)


def help_entries(text: str) -> dict[str, str]:
    """Each option's help entry of an argparse help text, whitespace collapsed, by its first option string."""
    entries: dict[str, str] = {}
    current = None
    for line in text.split("options:", 1)[1].splitlines():
        stripped = line.strip()
        if line.startswith("  -"):
            current = stripped.split()[0].rstrip(",")
            entries[current] = stripped
        elif current is not None and stripped:
            entries[current] += " " + stripped
    return entries


def assert_each_default_said_once(text: str) -> None:
    assert "(default: None)" not in text
    for entry in help_entries(text).values():
        assert entry.count("(default") <= 1, entry


def test_compare_help_says_each_default_once_and_shows_the_lists(cli_env):
    result = run_cabs(["compare", "--help"], cli_env)
    assert result.returncode == 0, result.stderr
    assert_each_default_said_once(result.stdout)
    entries = help_entries(result.stdout)
    from cabs.compare import CompareConfig

    defaults = CompareConfig()
    assert " ".join(f"{rate:g}" for rate in defaults.learning_rates) in entries["--lrs"]
    assert " ".join(str(size) for size in defaults.batch_sizes) in entries["--batch-sizes"]
    assert "framework" in entries["--backend"]
