"""The framework-free training driver behind ``cabs train``.

One loop serves every backend: it loads the data set, draws the initial weights
with NumPy, asks the chosen framework's *task* for a CABS step on each batch the
sampler draws (the sampler reads its batch size from the controller), writes
``metrics.jsonl``, evaluates on a schedule, and ends with ``summary.json`` and
``training.png``.

A task is the only framework-specific piece. It is built by
``cabs.training.<backend>`` from ``(architecture, parameters, x_train, y_train,
learning_rate)`` and offers:

- ``step(indices) -> (GradStats, loss)``: one SGD step on those training examples;
- ``evaluate(x, y) -> (loss, accuracy)``: mean cross-entropy and accuracy;
- ``summary_extras() -> dict``: backend-specific entries for ``summary.json``.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import math
import os
import signal
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from cabs import backends
from cabs._stats import GradStats
from cabs.controller import Controller
from cabs.training import checkpoint, distributed, memory, models

__all__ = ["BACKENDS", "DEFAULT_STEPS", "Task", "TrainConfig", "make_task", "train"]

BACKENDS = ("torch", "jax", "tensorflow")
# Task classes by backend; each module imports its framework, so it is imported only when chosen.
_TASKS = {"torch": "TorchTask", "jax": "JaxTask", "tensorflow": "TensorFlowTask"}
DEFAULT_STEPS = 1000
DEFAULT_EVALUATIONS = 20
DEFAULT_CHECKPOINT_EVERY = 100
DTYPES = ("float32", "float64")
SEED_LIMIT = 2**32 - 1  # NumPy's and PyTorch's seeds are 32-bit
# More threads than this per core only oversubscribe the machine; far more have crashed PyTorch.
THREADS_PER_CORE_LIMIT = 4
# Testing hook: the loop kills its own process with SIGKILL right after this step is logged
# (and checkpointed, when due), so tests can crash a run at an exact step.
KILL_AT_STEP_VARIABLE = "CABS_TEST_KILL_AT_STEP"


class Task(Protocol):
    """What the loop needs from a framework: one training step and an evaluation."""

    backend: str

    def step(self, indices: np.ndarray, learning_rate: float | None = None) -> tuple[GradStats, float]: ...

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]: ...

    def summary_extras(self) -> dict[str, Any]: ...

    def state_dict(self) -> dict[str, np.ndarray]: ...

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None: ...


@dataclasses.dataclass
class TrainConfig:
    """Settings of one ``cabs train`` run (the command-line options, spelled out).

    Attributes:
        backend: ``"torch"``, ``"jax"`` or ``"tensorflow"``.
        dataset: a name known to :func:`cabs.datasets.load`.
        data_dir: folder with the data set's standard files (not needed for the default).
        model: ``"mlp"`` or ``"cnn"``.
        learning_rate: the constant SGD step size.
        min_batch_size, max_batch_size, initial_batch_size: the controller's bounds and first size.
        steps: how many steps to train (exclusive with ``epochs``; both None means :data:`DEFAULT_STEPS`).
        epochs: how many passes over the training set to train.
        seed: fixes the initial weights, the data order and the generated data set.
        out: folder for the output files (created).
        eval_every: evaluate on the test set every this many steps (None: about 20 times per run).
        threads: PyTorch's CPU threads (None leaves PyTorch's default, one per core). The small
            networks here run fastest on one: their operations are too small to split, and the
            threads' synchronisation costs more than they save, most of all on a busy machine.
        dtype: ``"float32"`` or ``"float64"``: the network's parameters and the training data.
        checkpoint_every: save ``checkpoint.npz`` in ``out`` every this many steps, at the end
            and on Ctrl-C.
        resume: continue from the checkpoint in ``out`` instead of starting over.
        memory_budget: bytes one pass of the statistics may use (None: the whole batch in one
            pass); sets the adapters' ``max_examples_per_pass`` from the estimate of
            :mod:`cabs.training.memory`. The statistics are those of the whole batch.
    """

    backend: str = "torch"
    dataset: str = "mnist1d"
    data_dir: str | None = None
    model: str = "cnn"
    learning_rate: float = 0.1
    min_batch_size: int = 16
    max_batch_size: int = 2048
    initial_batch_size: int | None = None
    steps: int | None = None
    epochs: int | None = None
    seed: int = 0
    out: str = "cabs-run"
    eval_every: int | None = None
    threads: int | None = 1
    dtype: str = "float32"
    checkpoint_every: int = DEFAULT_CHECKPOINT_EVERY
    resume: bool = False
    memory_budget: int | None = None

    def validate(self) -> None:
        """Check the settings that no library call checks; raise ValueError naming the bad one."""
        if self.backend not in BACKENDS:
            raise ValueError(f"`backend` must be one of {', '.join(BACKENDS)}, got backend={self.backend!r}.")
        if self.model not in models.MODELS:
            raise ValueError(f"`model` must be one of {', '.join(models.MODELS)}, got model={self.model!r}.")
        if self.steps is not None and self.epochs is not None:
            raise ValueError(f"give `steps` or `epochs`, not both, got steps={self.steps}, epochs={self.epochs}.")
        for name in ("steps", "epochs", "eval_every", "threads"):
            value = getattr(self, name)
            if value is not None and value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {name}={value}.")
        if not (math.isfinite(self.learning_rate) and self.learning_rate > 0):
            raise ValueError(f"`learning_rate` must be a finite number > 0, got learning_rate={self.learning_rate}.")
        if self.dtype not in DTYPES:
            raise ValueError(f"`dtype` must be one of {', '.join(DTYPES)}, got dtype={self.dtype!r}.")
        # The frameworks multiply the gradients by the learning rate in the parameters' dtype.
        largest = float(np.finfo(self.dtype).max)
        if self.learning_rate > largest:
            raise ValueError(
                f"`learning_rate` must be at most {largest:.3g}, the largest {self.dtype} number, got "
                f"learning_rate={self.learning_rate:g}. Useful learning rates are around 0.01 to 1."
            )
        if (
            isinstance(self.seed, bool)
            or not isinstance(self.seed, (int, np.integer))
            or not 0 <= self.seed <= SEED_LIMIT
        ):
            raise ValueError(f"`seed` must be in [0, 2**32-1], got seed={self.seed!r}.")
        thread_limit = (os.cpu_count() or 1) * THREADS_PER_CORE_LIMIT
        if self.threads is not None and self.threads > thread_limit:
            raise ValueError(
                f"`threads` must be at most {thread_limit} ({THREADS_PER_CORE_LIMIT} per CPU core), got "
                f"threads={self.threads}. The default networks run fastest on one thread."
            )
        if not str(self.out):
            raise ValueError("`out` must name a folder, got out=''. Pass --out FOLDER (created if missing).")
        if self.dtype != "float32" and self.backend == "tensorflow":
            raise ValueError(
                f"`dtype` {self.dtype} is available with the torch and jax backends; the TensorFlow task trains "
                f"in float32, got dtype={self.dtype!r} with backend='tensorflow'. Pass --dtype float32."
            )
        if self.checkpoint_every < 1:
            raise ValueError(f"`checkpoint_every` must be >= 1, got checkpoint_every={self.checkpoint_every}.")
        if self.memory_budget is not None and self.memory_budget < 1:
            raise ValueError(
                f"`memory_budget` must be a number of bytes >= 1, got memory_budget={self.memory_budget}. "
                "Pass e.g. --memory-budget 512MB, or leave it out."
            )


def make_task(
    config: TrainConfig, dataset: Any, task_options: dict[str, Any] | None = None
) -> tuple[Task, models.Architecture]:
    """Build the chosen backend's task with the NumPy initial weights for ``config.seed``.

    ``task_options`` go to the task's constructor as well (the data-parallel set-up of
    :mod:`cabs.training.distributed`: a process group, a mesh or a strategy).
    """
    architecture = models.architecture(config.model, dataset.input_shape, dataset.num_classes)
    models.check_backend(architecture, config.backend)
    parameters = models.initial_parameters(architecture, config.seed)
    backends.load(config.backend)  # a missing framework fails here, with the command that installs it
    module = importlib.import_module(f"cabs.training.{config.backend}")
    x_train = _shaped(dataset.x_train, architecture)
    # JAX pads batches up to size buckets; the largest bucket is the run's largest batch.
    options: dict[str, Any] = {}
    if config.backend == "jax":
        options["max_batch_size"] = config.max_batch_size
    if config.backend == "torch":
        options["threads"] = config.threads
        options["seed"] = config.seed
    if config.dtype != "float32":
        options["dtype"] = config.dtype
    if config.memory_budget is not None:
        itemsize = np.dtype(config.dtype).itemsize
        options["max_examples_per_pass"] = memory.examples_per_pass(architecture, itemsize, config.memory_budget)
    options.update(task_options or {})
    task_class = getattr(module, _TASKS[config.backend])
    task = task_class(architecture, parameters, x_train, dataset.y_train, config.learning_rate, **options)
    return task, architecture


def _shaped(x: np.ndarray, architecture: models.Architecture) -> np.ndarray:
    return np.ascontiguousarray(np.reshape(x, (len(x), *architecture.input_shape)), dtype=np.float32)


class _MetricsWriter:
    """Appends one JSON object per line and flushes it, so a crash leaves whole lines."""

    def __init__(self, path: Path, *, append: bool = False) -> None:
        self._file = path.open("a" if append else "w", encoding="utf-8")

    def write(self, record: dict[str, Any]) -> None:
        self._file.write(json.dumps(record, allow_nan=True) + "\n")
        self._file.flush()

    def sync(self) -> None:
        """Force the written lines to disk."""
        self._file.flush()
        os.fsync(self._file.fileno())

    def close(self) -> None:
        self._file.close()


class _Discard:
    """Stands in for the metrics file on the workers that write no files."""

    def write(self, record: dict[str, Any]) -> None:
        pass

    def sync(self) -> None:
        pass

    def close(self) -> None:
        pass


def _progress_bar(total: int, unit: str, enabled: bool, initial: int = 0) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, unit=unit, disable=not enabled, dynamic_ncols=True, leave=True, initial=initial)


def train(
    config: TrainConfig,
    *,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
    workers: distributed.Workers | None = None,
) -> dict[str, Any]:
    """Train with CABS as ``config`` says; write the output files; return the summary.

    Args:
        config: the run's settings.
        progress: show a progress bar (tqdm, on stderr).
        log: called with short status lines (e.g. ``print``); None says nothing.
        workers: the data-parallel workers (:func:`cabs.training.distributed.setup`); None: one
            device. Every worker trains its share of each global batch; only the first one
            shows progress and writes files, the others return the same summary.

    Returns:
        The contents of ``summary.json``.

    Raises:
        ValueError, TypeError: bad settings (from the checks here, the controller or the sampler).
        cabs.datasets.DatasetError: the data set cannot be loaded.
        ModuleNotFoundError: the backend's framework is not installed.
    """
    from cabs import datasets  # the loaders pull in optional packages; only a run needs them

    config.validate()
    out = _prepare_out(config.out)
    if config.resume:
        # Before the framework loads: a missing checkpoint is the user's error, whatever is installed.
        checkpoint.require(out / checkpoint.CHECKPOINT_NAME)
    workers = workers or distributed.Workers()
    # Only the first worker reports and writes files; the others train their shares silently.
    say = (log if workers.main else None) or (lambda text: None)
    progress = progress and workers.main
    controller = Controller(
        config.learning_rate,
        min_batch_size=config.min_batch_size,
        max_batch_size=config.max_batch_size,
        initial_batch_size=config.initial_batch_size,
    )
    dataset = datasets.load(config.dataset, data_dir=config.data_dir, seed=config.seed)
    task, architecture = make_task(config, dataset, workers.task_options)
    x_test = _shaped(dataset.x_test, architecture)
    sampler = workers.sampler(len(dataset.x_train), controller, seed=config.seed, epochs=config.epochs)
    steps = config.steps if config.steps is not None else (None if config.epochs is not None else DEFAULT_STEPS)
    schedule = _EvaluationSchedule(config, steps, len(dataset.x_train))

    checkpoints = checkpoint.Checkpointer(out, config, dataset.x_train, dataset.y_train, controller, sampler, task)
    start_step, elapsed = 0, 0.0
    records: list[dict[str, Any]] = []
    if config.resume:
        # Every worker loads the state; only the first rewrites the metrics file it then appends to.
        start_step, elapsed, records = checkpoints.restore(out / "metrics.jsonl", steps, rewrite_metrics=workers.main)
        schedule.skip_to(sampler.examples_seen)
        say(f"resuming from {checkpoints.path} at step {start_step}")
    evaluations = [record for record in records if "test_accuracy" in record]
    say(f"training {config.model} on {dataset.name} with {config.backend}; writing {out}")
    writer = _MetricsWriter(out / "metrics.jsonl", append=config.resume) if workers.main else _Discard()
    if steps is not None:
        bar = _progress_bar(steps, "step", progress, initial=start_step)
    else:
        bar = _progress_bar(_epoch_examples(config, len(dataset.x_train)), "ex", progress, sampler.examples_seen)
    # A resumed run that had already finished goes straight to the summary.
    finished = bool(records) and (start_step == steps or sampler.exhausted)
    kill_at_step = int(os.environ.get(KILL_AT_STEP_VARIABLE, "0"))
    start = time.perf_counter() - elapsed
    interrupt = checkpoint.StopOnInterrupt()
    interrupt.start()
    try:
        batches = iter(()) if finished else sampler
        for step, indices in enumerate(batches, start=start_step + 1):
            stats, loss = task.step(np.asarray(indices, dtype=np.int64))
            controller.step(stats)
            workers.check(controller.batch_size)
            batch_size = workers.global_batch_size(sampler, indices)
            record = {
                "step": step,
                "batch_size": batch_size,
                "loss": loss,
                "xi": controller.xi,
                "examples_seen": sampler.examples_seen,
                "epoch": sampler.examples_seen / sampler.num_examples,
                "wall_time": time.perf_counter() - start,
                "skipped": controller.skipped,
                "next_batch_size": controller.batch_size,
            }
            last = step == steps or sampler.exhausted
            if schedule.due(step, sampler.examples_seen) or last:
                record["test_loss"], record["test_accuracy"] = task.evaluate(x_test, dataset.y_test)
                evaluations.append(record)
            writer.write(record)
            records.append(record)
            if workers.main and (checkpoints.due(step) or last or interrupt.requested):
                writer.sync()  # the checkpoint's step must not be ahead of the durable metrics
                checkpoints.save(step, time.perf_counter() - start)
            if step == kill_at_step:
                os.kill(os.getpid(), signal.SIGKILL)
            if interrupt.requested:
                say(f"interrupted after step {step}; saved {checkpoints.path}, continue with --resume")
                raise KeyboardInterrupt
            # The postfix first: update() redraws the bar, so counter and postfix show the same step.
            bar.set_postfix(
                examples=str(sampler.examples_seen), batch=str(batch_size), loss=f"{loss:.4f}", refresh=False
            )
            bar.update(1 if steps is not None else batch_size)
            if last:
                break
    finally:
        interrupt.stop()
        bar.close()
        writer.close()
    training_time = time.perf_counter() - start
    train_loss, train_accuracy = task.evaluate(_shaped(dataset.x_train, architecture), dataset.y_train)
    final = records[-1]
    summary = {
        "backend": config.backend,
        "dataset": dataset.name,
        "model": config.model,
        "steps": final["step"],
        "examples_seen": final["examples_seen"],
        "epochs": final["epoch"],
        "final_batch_size": final["batch_size"],
        "next_batch_size": controller.batch_size,
        "max_batch_size_used": max(record["batch_size"] for record in records),
        "skipped_steps": controller.skipped,
        "train_loss": train_loss,
        "train_accuracy": train_accuracy,
        "test_loss": final["test_loss"],
        "test_accuracy": final["test_accuracy"],
        "wall_time": training_time,
        "seed": config.seed,
        # The effective step budget, also where the run used the default (steps=None).
        "settings": {**dataclasses.asdict(config), "steps": steps},
        "controller": controller.state_dict(),
        "workers": workers.summary(),
        **task.summary_extras(),
    }
    if not workers.main:
        return summary
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n", encoding="utf-8")
    from cabs.training.plot import plot_training

    plot_training(
        records, evaluations, out / "training.png", title=f"CABS: {config.model} on {dataset.name} ({config.backend})"
    )
    return summary


def _prepare_out(out: str | os.PathLike) -> Path:
    """Create the output folder ``out`` if missing; ValueError unless it is a writable folder."""
    folder = Path(out)
    advice = "Pass --out with a folder you may write to (it is created if missing)."
    if folder.exists() and not folder.is_dir():
        raise ValueError(f"`out` must be a writable folder, got out={str(out)!r}, which is a file. {advice}")
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise ValueError(
            f"`out` must be a writable folder, got out={str(out)!r}: cannot create it ({error.strerror or error}). "
            f"{advice}"
        ) from error
    if not os.access(folder, os.W_OK | os.X_OK):
        raise ValueError(
            f"`out` must be a writable folder, got out={str(out)!r}: no permission to write in it. {advice}"
        )
    return folder


def _epoch_examples(config: TrainConfig, num_examples: int) -> int:
    """How many examples an epoch budget covers (0 for a step budget)."""
    return (config.epochs or 0) * num_examples


class _EvaluationSchedule:
    """When to evaluate: every ``eval_every`` steps, else about 20 times over the run.

    With an epoch budget the number of steps is not known in advance (it depends on
    the batch sizes), so the default spaces evaluations by examples seen instead.
    """

    def __init__(self, config: TrainConfig, steps: int | None, num_examples: int) -> None:
        self._every_steps = config.eval_every or (max(1, steps // DEFAULT_EVALUATIONS) if steps else None)
        self._every_examples = _epoch_examples(config, num_examples) / DEFAULT_EVALUATIONS
        self._next_examples = self._every_examples

    def skip_to(self, examples_seen: int) -> None:
        """Continue a resumed run: the evaluations up to ``examples_seen`` are done."""
        if self._every_steps is None:
            while self._next_examples <= examples_seen:
                self._next_examples += self._every_examples

    def due(self, step: int, examples_seen: int) -> bool:
        if self._every_steps is not None:
            return step % self._every_steps == 0
        if examples_seen >= self._next_examples:
            while self._next_examples <= examples_seen:
                self._next_examples += self._every_examples
            return True
        return False


def summary_table(summary: dict[str, Any], out: str | os.PathLike) -> str:
    """The short table ``cabs train`` prints at the end."""
    rows = [
        ("backend", f"{summary['backend']} ({summary['model']} on {summary['dataset']})"),
        ("steps", f"{summary['steps']}"),
        ("examples seen", f"{summary['examples_seen']} ({summary['epochs']:.2f} epochs)"),
        (
            "batch size",
            f"{summary['settings']['initial_batch_size'] or summary['settings']['min_batch_size']} -> {summary['final_batch_size']} (max used {summary['max_batch_size_used']})",
        ),
        ("train loss", f"{summary['train_loss']:.4f}"),
        ("test loss", f"{summary['test_loss']:.4f}"),
        ("test accuracy", f"{summary['test_accuracy']:.2%}"),
        ("wall time", f"{summary['wall_time']:.1f} s"),
        ("output", f"{out}"),
    ]
    width = max(len(name) for name, _ in rows)
    return "\n".join(f"{name:<{width}}  {value}" for name, value in rows)
