"""``cabs compare``: CABS against SGD with constant batch sizes, the paper's comparison.

Every *configuration* (CABS at a learning rate; SGD at a constant batch size and a
learning rate, with or without a step decay) trains once per seed for the same
budget of training **examples** (a run stops at the first step where its
``examples_seen`` reaches the budget), on one data set and model. The runs go to
worker processes (``spawn``, one PyTorch thread each), each into its own folder
under ``<out>/runs``; a run that finished wrote ``result.json`` there and is not
repeated when the same comparison is started again, so an interrupted comparison
resumes. A run that fails is listed in the outputs, and the others go on.

The outputs in ``out``:

- ``comparison.json``: the settings, the target loss, every run's curves (training
  loss, test loss and accuracy at about 20 evaluations, batch size and learning rate)
  and the failures;
- ``comparison.md``: one table row per configuration (mean and spread over seeds);
- ``comparison.png``: per learning rate, training loss, test accuracy and CABS's
  batch size against examples seen, shaded between the seeds' minimum and maximum.

The step decay divides the learning rate by 10 once half of the budget is seen and
again at three quarters (:func:`decayed_learning_rate`). CABS runs without a decay, as
in the paper. The training loss is the mean loss over (up to ``train_eval_size``
examples of) the training set with the current weights, not the mini-batch loss.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import contextlib
import dataclasses
import json
import math
import multiprocessing
import os
import signal
import sys
import threading
import time
import traceback
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "DECAY_FACTOR",
    "DECAY_POINTS",
    "CompareConfig",
    "ConstantBatchSize",
    "RunSpec",
    "add_compare_parser",
    "decayed_learning_rate",
    "run_comparison",
    "run_one",
]

DECAY_POINTS = (0.5, 0.75)
DECAY_FACTOR = 10.0
RESULT_FILE = "result.json"
_BATCH_SIZE_POINTS = 200


@dataclasses.dataclass(frozen=True)
class RunSpec:
    """One configuration and seed.

    Attributes:
        method: ``"cabs"`` or ``"sgd"`` (constant batch size).
        learning_rate: the (initial) SGD step size.
        seed: fixes the initial weights, the data order and a generated data set.
        batch_size: the constant batch size of ``"sgd"``; None for ``"cabs"``.
        decay: divide the learning rate by :data:`DECAY_FACTOR` at :data:`DECAY_POINTS` of the budget.
    """

    method: str
    learning_rate: float
    seed: int
    batch_size: int | None = None
    decay: bool = False

    @property
    def label(self) -> str:
        """The configuration's name in tables and legends (the seed left out)."""
        if self.method == "cabs":
            name = "CABS"
        else:
            name = f"SGD m={self.batch_size}"
        return f"{name} lr={self.learning_rate:g}" + (" decay" if self.decay else "")

    @property
    def folder_name(self) -> str:
        """The run's folder under ``<out>/runs``."""
        size = "cabs" if self.method == "cabs" else f"sgd-m{self.batch_size}"
        return f"{size}-lr{self.learning_rate:g}{'-decay' if self.decay else ''}-seed{self.seed}"


@dataclasses.dataclass
class CompareConfig:
    """Settings of one ``cabs compare`` (the command-line options, spelled out).

    Attributes:
        backend, dataset, data_dir, model: as for ``cabs train``.
        learning_rates: the learning rates every method runs at.
        batch_sizes: the constant batch sizes of SGD.
        decay: also run SGD with the step decay (besides without).
        budget: training examples per run.
        seeds: how many seeds (0, 1, ...) per configuration.
        target_loss: the training loss whose examples-to-reach the table reports; None: the
            lowest seed-mean training loss any configuration has at half the budget.
        jobs: worker processes (None: the number of cores).
        out: the output folder.
        min_batch_size, max_batch_size: CABS's bounds.
        evaluations: how many evaluations per run (besides the one before training).
        train_eval_size: at most this many training examples (a fixed subset) give the training loss.
        threads: PyTorch threads per worker.
    """

    backend: str = "torch"
    dataset: str = "mnist1d"
    data_dir: str | None = None
    model: str = "cnn"
    learning_rates: tuple[float, ...] = (0.05, 0.1, 0.2)
    batch_sizes: tuple[int, ...] = (16, 32, 64, 128, 256)
    decay: bool = True
    budget: int = 100_000
    seeds: int = 3
    target_loss: float | None = None
    jobs: int | None = None
    out: str = "cabs-compare"
    min_batch_size: int = 16
    max_batch_size: int = 2048
    evaluations: int = 20
    train_eval_size: int = 10_000
    threads: int = 1

    def runs(self) -> list[RunSpec]:
        """Every configuration and seed, CABS first, in a fixed order."""
        specs = []
        for learning_rate in self.learning_rates:
            for seed in range(self.seeds):
                specs.append(RunSpec("cabs", learning_rate, seed))
                for decay in (False, True) if self.decay else (False,):
                    for batch_size in self.batch_sizes:
                        specs.append(RunSpec("sgd", learning_rate, seed, batch_size, decay))
        return specs

    def shared_settings(self) -> dict[str, Any]:
        """The settings a finished run must share to be reused (not the lists of configurations)."""
        names = ("backend", "dataset", "data_dir", "model", "budget", "min_batch_size", "max_batch_size")
        return {name: getattr(self, name) for name in (*names, "evaluations", "train_eval_size")}


class ConstantBatchSize:
    """Stands in for the controller in plain SGD: the batch size never changes.

    Args:
        batch_size: the batch size (an int >= 1).
    """

    def __init__(self, batch_size: int) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"`batch_size` must be an int >= 1, got batch_size={batch_size!r}. Pass a batch size.")
        self.batch_size = batch_size

    def step(self, stats: Any) -> None:
        """Ignore the statistics: the batch size stays."""


def decayed_learning_rate(learning_rate: float, examples_seen: int, budget: int) -> float:
    """The step decay: ``learning_rate`` divided by :data:`DECAY_FACTOR` at each of :data:`DECAY_POINTS`.

    Args:
        learning_rate: the initial learning rate.
        examples_seen: examples used before the coming step.
        budget: the run's budget of examples.
    """
    passed = sum(examples_seen >= point * budget for point in DECAY_POINTS)
    return learning_rate / DECAY_FACTOR**passed


# --- one run, in a worker process ----------------------------------------------------------

_DATASETS: dict[tuple, Any] = {}


def _dataset(name: str, data_dir: str | None, seed: int) -> Any:
    """The data set, loaded once per worker process and seed (a worker runs many configurations)."""
    from cabs import datasets

    key = (name, data_dir, seed)
    if key not in _DATASETS:
        _DATASETS.clear()  # keep one: the large image sets do not fit many times
        _DATASETS[key] = datasets.load(name, data_dir=data_dir, seed=seed)
    return _DATASETS[key]


def run_one(spec: RunSpec, settings: dict[str, Any], folder: str) -> dict[str, Any]:
    """Train one configuration for the budget; write and return its result (with curves).

    Args:
        spec: the configuration and seed.
        settings: :meth:`CompareConfig.shared_settings` plus ``threads``.
        folder: the run's folder; ``result.json`` is written there last, whole.

    Returns:
        The result: ``spec``, ``settings``, ``curves``, ``final_train_loss``, ``best_test_accuracy``,
        ``wall_time``, ``steps``, ``diverged``.
    """
    from cabs.controller import Controller
    from cabs.data import BatchSampler
    from cabs.training.loop import TrainConfig, make_task

    budget = settings["budget"]
    if spec.method == "cabs":
        source: Any = Controller(
            spec.learning_rate, min_batch_size=settings["min_batch_size"], max_batch_size=settings["max_batch_size"]
        )
    elif spec.method == "sgd":
        source = ConstantBatchSize(spec.batch_size)  # type: ignore[arg-type]
    else:
        raise ValueError(f"`method` must be 'cabs' or 'sgd', got method={spec.method!r}.")
    train_config = TrainConfig(
        backend=settings["backend"],
        dataset=settings["dataset"],
        data_dir=settings["data_dir"],
        model=settings["model"],
        learning_rate=spec.learning_rate,
        max_batch_size=max(settings["max_batch_size"], spec.batch_size or 1),
        seed=spec.seed,
        threads=settings["threads"],
    )
    train_config.validate()
    dataset = _dataset(settings["dataset"], settings["data_dir"], spec.seed)
    task, architecture = make_task(train_config, dataset)
    x_train = _shaped(dataset.x_train, architecture.input_shape)
    subset = np.random.default_rng([spec.seed, 7]).permutation(len(x_train))[: settings["train_eval_size"]]
    x_train_eval, y_train_eval = x_train[np.sort(subset)], dataset.y_train[np.sort(subset)]
    x_test = _shaped(dataset.x_test, architecture.input_shape)
    sampler = BatchSampler(len(x_train), source, seed=spec.seed)
    evaluation_every = budget / settings["evaluations"]
    batch_size_every = budget / _BATCH_SIZE_POINTS
    curves: dict[str, list] = {name: [] for name in ("examples_seen", "train_loss", "test_loss", "test_accuracy")}
    curves.update(batch_examples_seen=[], batch_size=[], learning_rate=[])

    def evaluate() -> None:
        train_loss, _ = task.evaluate(x_train_eval, y_train_eval)
        test_loss, test_accuracy = task.evaluate(x_test, dataset.y_test)
        for name, value in zip(
            ("examples_seen", "train_loss", "test_loss", "test_accuracy"),
            (sampler.examples_seen, train_loss, test_loss, test_accuracy),
            strict=True,
        ):
            curves[name].append(value)

    start = time.perf_counter()
    evaluate()
    steps, diverged = 0, False
    next_evaluation, next_batch_point = evaluation_every, 0.0
    for indices in sampler:
        learning_rate = (
            decayed_learning_rate(spec.learning_rate, sampler.examples_seen - len(indices), budget)
            if spec.decay
            else spec.learning_rate
        )
        stats, loss = task.step(np.asarray(indices, dtype=np.int64), learning_rate=learning_rate)
        source.step(stats)
        steps += 1
        if sampler.examples_seen >= next_batch_point:
            curves["batch_examples_seen"].append(sampler.examples_seen)
            curves["batch_size"].append(len(indices))
            curves["learning_rate"].append(learning_rate)
            next_batch_point = sampler.examples_seen + batch_size_every
        done = sampler.examples_seen >= budget
        # A diverged run (loss inf or nan) stops: its curves end there, and it never reaches the target.
        diverged = not math.isfinite(loss)
        if done or diverged or sampler.examples_seen >= next_evaluation:
            evaluate()
            while next_evaluation <= sampler.examples_seen:
                next_evaluation += evaluation_every
        if done or diverged:
            break
    result = {
        "label": spec.label,
        "spec": dataclasses.asdict(spec),
        "settings": settings,
        "steps": steps,
        "examples_seen": sampler.examples_seen,
        "diverged": diverged,
        "final_train_loss": curves["train_loss"][-1],
        "best_test_accuracy": max(curves["test_accuracy"]),
        "wall_time": time.perf_counter() - start,
        "curves": curves,
    }
    _write_json_atomically(Path(folder) / RESULT_FILE, result)
    return result


def _shaped(x: np.ndarray, input_shape: tuple[int, ...]) -> np.ndarray:
    return np.ascontiguousarray(np.reshape(x, (len(x), *input_shape)), dtype=np.float32)


def _write_json_atomically(path: Path, content: dict[str, Any]) -> None:
    """Write to a temporary name, then rename: an interrupted write never leaves a partial result."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".partial")
    temporary.write_text(json.dumps(content, indent=1, allow_nan=True) + "\n", encoding="utf-8")
    os.replace(temporary, path)


# How often a worker checks that the process that started it is still alive (seconds).
_PARENT_CHECK_INTERVAL = 1.0


def exit_with_parent(parent_pid: int) -> None:
    """Make this worker process end when process ``parent_pid`` (the ``cabs compare`` process) is gone.

    A killed parent cannot stop its pool; its workers would train on for minutes, orphaned.
    A daemon thread notices the new parent (the orphan's adopter) and ends the process.
    """

    def watch() -> None:
        while os.getppid() == parent_pid:
            time.sleep(_PARENT_CHECK_INTERVAL)
        os._exit(EXIT_PARENT_GONE)

    threading.Thread(target=watch, name="exit-with-parent", daemon=True).start()


EXIT_PARENT_GONE = 143  # as if terminated by SIGTERM


def _worker(spec: RunSpec, settings: dict[str, Any], folder: str) -> dict[str, Any]:
    """Run in a worker process; a failure comes back as ``{"error": ...}`` instead of an exception."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    try:
        return run_one(spec, settings, folder)
    except Exception as error:  # noqa: BLE001 - any failure of one run is reported, and the rest go on
        return {
            "label": spec.label,
            "spec": dataclasses.asdict(spec),
            "error": _one_line(error),
            "traceback": traceback.format_exc(),
        }


def _one_line(error: BaseException) -> str:
    return f"{type(error).__name__}: {' '.join(str(error).split())}"


# --- the comparison -------------------------------------------------------------------------


def _finished(folder: Path, settings: dict[str, Any], spec: RunSpec) -> dict[str, Any] | None:
    """The run's earlier result, when it is complete and was made with the same settings."""
    try:
        result = json.loads((folder / RESULT_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    same = result.get("settings") == settings and result.get("spec") == dataclasses.asdict(spec)
    return result if same and "curves" in result else None


def run_comparison(
    config: CompareConfig,
    *,
    runs: Sequence[RunSpec] | None = None,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> dict[str, Any]:
    """Run (or resume) the comparison and write ``comparison.json``, ``.md`` and ``.png`` into ``config.out``.

    Args:
        config: the settings.
        runs: the configurations and seeds to run (default: :meth:`CompareConfig.runs`).
        progress: show one progress bar over the runs (tqdm, on stderr).
        log: called with short status lines; None says nothing.

    Returns:
        The contents of ``comparison.json``.
    """
    _check_config(config)
    say = log or (lambda text: None)
    out = Path(config.out)
    runs = list(runs if runs is not None else config.runs())
    settings = {**config.shared_settings(), "threads": config.threads}
    results: dict[RunSpec, dict[str, Any]] = {}
    for spec in runs:
        earlier = _finished(out / "runs" / spec.folder_name, settings, spec)
        if earlier is not None:
            results[spec] = earlier
    pending = [spec for spec in runs if spec not in results]
    jobs = min(config.jobs or os.cpu_count() or 1, max(1, len(pending)))
    say(f"{len(runs)} runs ({len(results)} finished before), {jobs} worker processes; writing {out}")
    from tqdm.auto import tqdm

    bar = tqdm(total=len(runs), initial=len(results), unit="run", disable=not progress, dynamic_ncols=True)
    start = time.perf_counter()
    try:
        if pending:
            context = multiprocessing.get_context("spawn")  # no forked framework state in the workers
            pool = concurrent.futures.ProcessPoolExecutor(
                max_workers=jobs, mp_context=context, initializer=exit_with_parent, initargs=(os.getpid(),)
            )
            with _stop_on_sigterm(), pool:
                futures = {
                    pool.submit(_worker, spec, settings, str(out / "runs" / spec.folder_name)): spec for spec in pending
                }
                completed = concurrent.futures.as_completed(futures)
                for future in _stopping_pool_on_interrupt(completed, pool):
                    spec = futures[future]
                    try:
                        results[spec] = future.result()
                    except Exception as error:  # noqa: BLE001 - a worker that died takes only its runs
                        results[spec] = {
                            "label": spec.label,
                            "spec": dataclasses.asdict(spec),
                            "error": _one_line(error),
                        }
                    # The postfix first: update() redraws, so the bar names the run it just counted.
                    bar.set_postfix_str(f"last: {spec.label} seed {spec.seed}", refresh=False)
                    bar.update(1)
    finally:
        bar.close()
    ordered = [results[spec] for spec in runs]
    comparison = _comparison(config, ordered, time.perf_counter() - start)
    out.mkdir(parents=True, exist_ok=True)
    _write_json_atomically(out / "comparison.json", comparison)
    (out / "comparison.md").write_text(markdown_table(comparison), encoding="utf-8")
    plot_comparison(comparison, out / "comparison.png")
    if comparison["failures"]:
        say(f"{len(comparison['failures'])} runs failed; see {out / 'comparison.md'}")
    return comparison


class _Terminated(KeyboardInterrupt):
    """SIGTERM, turned into an exception so that the pool is stopped on the way out."""


@contextlib.contextmanager
def _stop_on_sigterm() -> Any:
    """Raise :class:`_Terminated` on SIGTERM while the pool runs (main thread only)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def terminate(signal_number: int, frame: Any) -> None:
        raise _Terminated

    previous = signal.signal(signal.SIGTERM, terminate)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def _stopping_pool_on_interrupt(completed: Any, pool: concurrent.futures.ProcessPoolExecutor) -> Any:
    """Yield from ``completed``; on Ctrl-C or SIGTERM, end the workers before passing the interrupt on.

    The pool's own exit would wait for the running runs (minutes) and then start the queued ones.
    """
    try:
        yield from completed
    except BaseException:
        pool.shutdown(wait=False, cancel_futures=True)
        for process in list((pool._processes or {}).values()):  # the pool offers no public way to stop them
            process.terminate()
        raise


def _check_config(config: CompareConfig) -> None:
    for name in ("budget", "seeds", "evaluations", "train_eval_size", "threads"):
        value = getattr(config, name)
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"`{name}` must be an int >= 1, got {name}={value!r}.")
    if config.jobs is not None and config.jobs < 1:
        raise ValueError(f"`jobs` must be >= 1 (or None: one per core), got jobs={config.jobs}.")
    if not config.learning_rates:
        raise ValueError("`learning_rates` must name at least one learning rate, got none.")
    if config.target_loss is not None and not (math.isfinite(config.target_loss) and config.target_loss > 0):
        raise ValueError(f"`target_loss` must be a finite number > 0, got target_loss={config.target_loss}.")


def _comparison(config: CompareConfig, results: list[dict[str, Any]], wall_time: float) -> dict[str, Any]:
    finished = [result for result in results if "error" not in result]
    failures = [
        {"label": result["label"], "seed": result["spec"]["seed"], "error": result["error"]}
        for result in results
        if "error" in result
    ]
    target = config.target_loss if config.target_loss is not None else _default_target(finished, config.budget)
    return {
        "settings": dataclasses.asdict(config),
        "decay": {"points": list(DECAY_POINTS), "factor": DECAY_FACTOR, "applies_to": "sgd"},
        "target_loss": target,
        "target_loss_rule": "given" if config.target_loss is not None else "best seed-mean loss at half budget",
        "wall_time": wall_time,
        "runs": finished,
        "failures": failures,
        "configurations": _configuration_rows(finished, failures, target),
    }


def _loss_at(result: dict[str, Any], examples: float) -> float:
    """The training loss at the first evaluation at or after ``examples`` (the last one if none)."""
    curves = result["curves"]
    for seen, loss in zip(curves["examples_seen"], curves["train_loss"], strict=True):
        if seen >= examples:
            return loss
    return curves["train_loss"][-1]


def _default_target(results: list[dict[str, Any]], budget: int) -> float | None:
    by_label: dict[str, list[float]] = {}
    for result in results:
        by_label.setdefault(result["label"], []).append(_loss_at(result, budget / 2))
    means = [float(np.mean(losses)) for losses in by_label.values() if all(map(math.isfinite, losses))]
    return min(means) if means else None


def _examples_to_reach(result: dict[str, Any], target: float | None) -> int | None:
    if target is None:
        return None
    curves = result["curves"]
    for seen, loss in zip(curves["examples_seen"], curves["train_loss"], strict=True):
        if loss <= target:
            return seen
    return None


def _spread(values: list[float]) -> dict[str, float | None]:
    finite = [value for value in values if math.isfinite(value)]
    if not finite:
        return {"mean": None, "std": None, "min": None, "max": None, "count": 0}
    return {
        "mean": float(np.mean(finite)),
        "std": float(np.std(finite)),
        "min": min(finite),
        "max": max(finite),
        "count": len(finite),
    }


def _configuration_rows(
    results: list[dict[str, Any]], failures: list[dict[str, Any]], target: float | None
) -> list[dict[str, Any]]:
    """One summary per configuration, in the order of first appearance; the best constant batch marked."""
    groups: dict[str, list[dict[str, Any]]] = {}
    for result in results:
        groups.setdefault(result["label"], []).append(result)
    for failure in failures:
        groups.setdefault(failure["label"], [])
    rows = []
    for label, group in groups.items():
        reached = [_examples_to_reach(result, target) for result in group]
        spec = group[0]["spec"] if group else None
        rows.append(
            {
                "label": label,
                "method": spec["method"] if spec else None,
                "learning_rate": spec["learning_rate"] if spec else None,
                "seeds": len(group),
                "failed": sum(failure["label"] == label for failure in failures),
                "diverged": sum(result["diverged"] for result in group),
                "reached_target": sum(value is not None for value in reached),
                "examples_to_target": _spread([float(value) for value in reached if value is not None]),
                "final_train_loss": _spread([result["final_train_loss"] for result in group]),
                "best_test_accuracy": _spread([result["best_test_accuracy"] for result in group]),
                "wall_time": _spread([result["wall_time"] for result in group]),
                "best_constant": False,
            }
        )
    constant = [row for row in rows if row["method"] == "sgd" and row["final_train_loss"]["mean"] is not None]
    constant = [row for row in constant if row["diverged"] == 0 and row["seeds"] > 0]
    if constant:
        min(constant, key=lambda row: row["final_train_loss"]["mean"])["best_constant"] = True
    return rows


# --- outputs ------------------------------------------------------------------------------------


def _mean_spread(summary: dict[str, float | None], format_spec: str, scale: float = 1.0) -> str:
    if summary["mean"] is None:
        return "-"
    mean = f"{summary['mean'] * scale:{format_spec}}"
    if summary.get("count", 2) == 1:
        return mean  # one value has no spread; "± 0" would claim one
    return f"{mean} ± {(summary['std'] or 0.0) * scale:{format_spec}}"


def _seeds(count: int) -> str:
    return f"{count} seed" if count == 1 else f"{count} seeds"


def markdown_table(comparison: dict[str, Any]) -> str:
    """``comparison.md``: the settings, one row per configuration, and the failures."""
    settings = comparison["settings"]
    target = comparison["target_loss"]
    lines = [
        f"# CABS against constant batch sizes: {settings['model']} on {settings['dataset']} ({settings['backend']})",
        "",
        f"Budget {settings['budget']} training examples per run, {_seeds(settings['seeds'])}; "
        + (
            "values are mean ± standard deviation over the seeds. "
            if settings["seeds"] > 1
            else "values are those of the one seed. "
        )
        + "Training loss: mean over the training set (at most "
        f"{settings['train_eval_size']} examples). Decay: SGD's learning rate divided by {DECAY_FACTOR:g} at "
        f"{' and '.join(f'{point:.0%}' for point in DECAY_POINTS)} of the budget; CABS never decays.",
        "",
        (
            f"Target training loss {target:.4f} ({comparison['target_loss_rule']}); "
            "'examples to target' averages the seeds that reached it (count in brackets)."
            if target is not None
            else "No target training loss: no run finished."
        ),
        "",
        "| configuration | examples to target | final train loss | best test accuracy (%) | wall time (s) |",
        "|---|---|---|---|---|",
    ]
    for row in comparison["configurations"]:
        label = f"**{row['label']}** (best constant)" if row["best_constant"] else row["label"]
        notes = []
        if row["failed"]:
            notes.append(f"{row['failed']} failed")
        if row["diverged"]:
            notes.append(f"{row['diverged']} diverged")
        if notes:
            label += f" ({', '.join(notes)})"
        reached = f"{_mean_spread(row['examples_to_target'], '.0f')} ({row['reached_target']}/{row['seeds']})"
        lines.append(
            f"| {label} | {reached} | {_mean_spread(row['final_train_loss'], '.4f')} | "
            f"{_mean_spread(row['best_test_accuracy'], '.1f', 100.0)} | {_mean_spread(row['wall_time'], '.1f')} |"
        )
    if comparison["failures"]:
        lines += ["", "## Failures", ""]
        lines += [
            f"- {failure['label']} seed {failure['seed']}: {failure['error']}" for failure in comparison["failures"]
        ]
    return "\n".join(lines) + "\n"


def _line_style(spec: dict[str, Any], batch_sizes: list[int]) -> dict[str, Any]:
    if spec["method"] == "cabs":
        return {"color": "black", "linewidth": 2.2, "linestyle": "-", "zorder": 5}
    import matplotlib

    colormap = matplotlib.colormaps["viridis"]
    position = batch_sizes.index(spec["batch_size"]) / max(1, len(batch_sizes) - 1)
    # Viridis ends in a pale yellow that is hard to see on white; stop at its green.
    return {"color": colormap(0.75 * position), "linewidth": 1.2, "linestyle": "--" if spec["decay"] else "-"}


def plot_comparison(comparison: dict[str, Any], path: Path) -> None:
    """``comparison.png``: one row per learning rate; training loss, test accuracy and CABS's batch size.

    Each configuration is one line (the mean over seeds), shaded between the seeds' minimum
    and maximum. The seeds' curves share their evaluation points up to divergence.
    """
    import matplotlib

    matplotlib.use("Agg")  # files only: no display is needed or wanted
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    runs = comparison["runs"]
    learning_rates = sorted({run["spec"]["learning_rate"] for run in runs}) or [None]
    batch_sizes = sorted({run["spec"]["batch_size"] for run in runs if run["spec"]["batch_size"] is not None})
    figure, axes_grid = plt.subplots(
        len(learning_rates), 3, figsize=(15, 3.6 * len(learning_rates) + 0.8), squeeze=False, layout="constrained"
    )
    handles: dict[str, Any] = {}
    for row, learning_rate in enumerate(learning_rates):
        loss_axes, accuracy_axes, batch_axes = axes_grid[row]
        groups: dict[str, list[dict[str, Any]]] = {}
        for run in runs:
            if run["spec"]["learning_rate"] == learning_rate:
                groups.setdefault(run["label"], []).append(run)
        for label, group in groups.items():
            style = _line_style(group[0]["spec"], batch_sizes)
            legend_label = label.replace(f" lr={learning_rate:g}", "")
            line = _shaded(loss_axes, group, "examples_seen", "train_loss", style)
            _shaded(accuracy_axes, group, "examples_seen", "test_accuracy", style, scale=100.0)
            if group[0]["spec"]["method"] == "cabs":
                _shaded(batch_axes, group, "batch_examples_seen", "batch_size", style)
            handles.setdefault(legend_label, line)
        if comparison["target_loss"] is not None:
            target_line = loss_axes.axhline(comparison["target_loss"], color="grey", linewidth=0.8, linestyle=":")
            handles.setdefault(f"target training loss {comparison['target_loss']:.3g}", target_line)
        loss_axes.set(yscale="log", ylabel=f"lr={learning_rate:g}\ntraining loss")
        accuracy_axes.set(ylabel="test accuracy (%)")
        batch_axes.set(ylabel="CABS batch size")
        # Batch sizes are whole numbers: no 15.2 .. 16.8 ticks around a constant one.
        batch_axes.yaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        for axes in (loss_axes, accuracy_axes, batch_axes):
            axes.grid(alpha=0.3)
            axes.set_xlabel("examples seen" if row == len(learning_rates) - 1 else "")
    for axes, title in zip(axes_grid[0], ("training loss", "test accuracy", "CABS batch size"), strict=True):
        axes.set_title(title)
    settings = comparison["settings"]
    figure.suptitle(
        f"CABS vs constant batch sizes: {settings['model']} on {settings['dataset']} ({settings['backend']}), "
        f"{_seeds(settings['seeds'])}{', shaded min-max' if settings['seeds'] > 1 else ''}; dashed: lr / {DECAY_FACTOR:g} at "
        f"{' and '.join(f'{point:.0%}' for point in DECAY_POINTS)} of the budget"
    )
    figure.legend(
        list(handles.values()), list(handles.keys()), loc="outside lower center", ncol=min(6, max(1, len(handles)))
    )
    figure.savefig(path, dpi=100)
    plt.close(figure)


def _shaded(axes: Any, group: list[dict[str, Any]], x_name: str, y_name: str, style: dict, scale: float = 1.0) -> Any:
    """Mean line and min-max band over the seeds.

    The seeds' points fall at slightly different examples (a step ends past a threshold),
    so each curve is interpolated onto the longest one's points; past its end it is missing.
    """
    longest = max(group, key=lambda run: run["curves"][x_name][-1] if run["curves"][x_name] else 0)
    x = np.asarray(longest["curves"][x_name], dtype=float)
    rows = []
    for run in group:
        run_x = np.asarray(run["curves"][x_name], dtype=float)
        run_y = np.asarray(run["curves"][y_name], dtype=float) * scale
        row = np.interp(x, run_x, run_y) if len(run_x) else np.full(len(x), np.nan)
        rows.append(np.where(x <= (run_x[-1] if len(run_x) else -1), row, np.nan))
    values = np.asarray(rows)
    values = np.where(np.isfinite(values), values, np.nan)
    (line,) = axes.plot(x, np.nanmean(values, axis=0), **style)
    if len(group) > 1:
        axes.fill_between(x, np.nanmin(values, axis=0), np.nanmax(values, axis=0), color=style["color"], alpha=0.12)
    return line


# --- the command line ------------------------------------------------------------------------


def add_compare_parser(commands: Any) -> None:
    """Add ``cabs compare`` to the ``cabs`` command's subcommands."""
    from cabs.cli import HelpFormatter, _positive_float, _positive_int
    from cabs.training.loop import BACKENDS
    from cabs.training.models import MODELS

    defaults = CompareConfig()
    parser = commands.add_parser(
        "compare",
        help="compare CABS with SGD at constant batch sizes (the paper's experiment)",
        description="Train CABS at several learning rates and SGD at constant batch sizes at the same learning rates, "
        f"with and without a step decay (learning rate / {DECAY_FACTOR:g} at "
        f"{' and '.join(f'{point:.0%}' for point in DECAY_POINTS)} of the budget), for the same budget of training "
        "examples, over several seeds, in parallel worker processes. Writes comparison.json, comparison.md and "
        "comparison.png into --out; finished runs (under --out/runs) are reused when the command is run again.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument(
        "--backend", choices=BACKENDS, default=defaults.backend, help="framework that computes the gradients"
    )
    parser.add_argument(
        "--dataset", default=defaults.dataset, help="mnist1d (embedded), digits, or mnist, fashion-mnist, cifar10"
    )
    parser.add_argument("--data-dir", default=None, help="folder holding the data set's standard files")
    parser.add_argument(
        "--model",
        choices=MODELS,
        default=defaults.model,
        help="mlp; cnn (1-D for mnist1d, 2-D for images); mnist-paper or cifar10-paper: the paper's networks "
        "(cifar10-paper: torch only)",
    )
    parser.add_argument(
        "--lrs",
        type=_positive_float,
        nargs="+",
        default=list(defaults.learning_rates),
        metavar="LR",
        help="learning rates; each runs CABS and every constant batch size "
        f"(default: {' '.join(f'{rate:g}' for rate in defaults.learning_rates)})",
    )
    parser.add_argument(
        "--batch-sizes",
        type=_positive_int,
        nargs="+",
        default=list(defaults.batch_sizes),
        metavar="SIZE",
        help=f"constant batch sizes of plain SGD (default: {' '.join(str(size) for size in defaults.batch_sizes)})",
    )
    parser.add_argument(
        "--decay",
        action=argparse.BooleanOptionalAction,
        default=defaults.decay,
        help="also run SGD with the step decay (default: on)",
    )
    parser.add_argument("--budget", type=_positive_int, default=defaults.budget, help="training examples per run")
    parser.add_argument("--seeds", type=_positive_int, default=defaults.seeds, help="seeds 0..N-1 per configuration")
    parser.add_argument(
        "--target-loss",
        type=_positive_float,
        default=None,
        help="training loss for 'examples to target' (default: the best seed-mean loss at half the budget)",
    )
    parser.add_argument("--jobs", type=_positive_int, default=None, help="worker processes (default: one per core)")
    parser.add_argument("--out", default=defaults.out, help="output folder (finished runs in it are reused)")
    parser.add_argument("--min-batch-size", type=_positive_int, default=defaults.min_batch_size, help="CABS minimum")
    parser.add_argument("--max-batch-size", type=_positive_int, default=defaults.max_batch_size, help="CABS maximum")
    parser.add_argument("--evaluations", type=_positive_int, default=defaults.evaluations, help="evaluations per run")
    parser.add_argument(
        "--train-eval-size",
        type=_positive_int,
        default=defaults.train_eval_size,
        help="training examples (a fixed subset) that give the training loss",
    )
    parser.add_argument("--threads", type=_positive_int, default=defaults.threads, help="PyTorch threads per worker")
    parser.add_argument("--quiet", action="store_true", help="no progress bar and no table")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    parser.set_defaults(handler=_run_compare)


def _run_compare(arguments: argparse.Namespace) -> int:
    config = CompareConfig(
        backend=arguments.backend,
        dataset=arguments.dataset,
        data_dir=arguments.data_dir,
        model=arguments.model,
        learning_rates=tuple(arguments.lrs),
        batch_sizes=tuple(arguments.batch_sizes),
        decay=arguments.decay,
        budget=arguments.budget,
        seeds=arguments.seeds,
        target_loss=arguments.target_loss,
        jobs=arguments.jobs,
        out=arguments.out,
        min_batch_size=arguments.min_batch_size,
        max_batch_size=arguments.max_batch_size,
        evaluations=arguments.evaluations,
        train_eval_size=arguments.train_eval_size,
        threads=arguments.threads,
    )
    log = None if arguments.quiet else (lambda text: print(text, file=sys.stderr))
    comparison = run_comparison(config, progress=not arguments.quiet, log=log)
    if not arguments.quiet:
        print(markdown_table(comparison))
    # Failed runs are in the outputs; the exit status says some failed.
    return 1 if comparison["failures"] else 0
