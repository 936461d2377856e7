"""Checkpoints of ``cabs train``: one framework-neutral file, written atomically, and the resume checks.

A checkpoint is a single NumPy ``.npz`` file: the task's arrays (model parameters,
optimizer state, the framework's random-number state, all as plain NumPy arrays) and
one JSON document stored as a byte array under ``__meta__`` with the step, the
controller's and the sampler's ``state_dict()``, the settings that fix the run's
trajectory and a fingerprint of the training data. It is written to a temporary file
in the same folder, flushed to disk and renamed over the old one, so a crash at any
moment leaves either the old or the new checkpoint, never a mixture. The zip format
checks every member's CRC-32 on reading, so a damaged file is detected.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import signal
import tempfile
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np

__all__ = [
    "CHECKPOINT_NAME",
    "RESUMABLE_SETTINGS",
    "CheckpointError",
    "Checkpointer",
    "StopOnInterrupt",
    "data_fingerprint",
    "generator_state_array",
    "load_generator_state",
    "load",
    "require",
    "save",
    "settings_difference",
    "trajectory_settings",
    "truncate_metrics",
]

CHECKPOINT_NAME = "checkpoint.npz"
_FORMAT = "cabs-train-checkpoint"
_VERSION = 1
_META_KEY = "__meta__"
# The mode an ordinary open() would give a new file: 0666 less the umask (read once, at import).
_UMASK = os.umask(0o022)
os.umask(_UMASK)
_FILE_MODE = 0o666 & ~_UMASK

# Settings that may change between a run and its resumption: they say how long to train,
# where to write, how often to evaluate or save, and how fast to compute, but not which
# examples, weights or batch sizes the steps see. Every other setting (also one added
# later) must match, so a new option is refused on resume until it is listed here.
RESUMABLE_SETTINGS = frozenset(
    # memory_budget only splits a batch into passes whose sums add: the run is the same.
    {"steps", "epochs", "out", "eval_every", "threads", "data_dir", "checkpoint_every", "resume", "memory_budget"}
)


class CheckpointError(ValueError):
    """A checkpoint that is missing, damaged, or from another configuration."""


def trajectory_settings(config: Any) -> dict[str, Any]:
    """The settings of a ``TrainConfig`` that a resumed run must share with the saved one."""
    return {key: value for key, value in dataclasses.asdict(config).items() if key not in RESUMABLE_SETTINGS}


def data_fingerprint(x_train: np.ndarray, y_train: np.ndarray) -> str:
    """SHA-256 of the training inputs and labels (their shapes, dtypes and bytes)."""
    digest = hashlib.sha256()
    for array in (x_train, y_train):
        contiguous = np.ascontiguousarray(array)
        digest.update(f"{contiguous.dtype.str}{contiguous.shape}".encode())
        digest.update(contiguous.tobytes())
    return digest.hexdigest()


def generator_state_array(generator: np.random.Generator) -> np.ndarray:
    """A NumPy ``Generator``'s state as a byte array (its JSON), for a checkpoint."""
    return np.frombuffer(json.dumps(generator.bit_generator.state).encode(), dtype=np.uint8).copy()


def load_generator_state(generator: np.random.Generator, array: np.ndarray) -> None:
    """Put back a state saved by :func:`generator_state_array`; ValueError if it is of another kind."""
    state = json.loads(np.asarray(array, dtype=np.uint8).tobytes().decode())
    if not isinstance(state, dict) or state.get("bit_generator") != type(generator.bit_generator).__name__:
        raise ValueError(f"the saved random-number state is not a {type(generator.bit_generator).__name__} state.")
    generator.bit_generator.state = state


def save(path: Path, meta: dict[str, Any], arrays: dict[str, np.ndarray]) -> None:
    """Write ``meta`` (JSON-able) and ``arrays`` to ``path`` atomically.

    The file is first written in full to a temporary file in the same folder and
    forced to disk, then renamed over ``path``: readers see the old or the new file.
    """
    if _META_KEY in arrays:
        raise ValueError(f"an array may not be named {_META_KEY!r}; it holds the checkpoint's description.")
    document = json.dumps({"format": _FORMAT, "version": _VERSION, **meta}, allow_nan=True).encode()
    members = {_META_KEY: np.frombuffer(document, dtype=np.uint8), **arrays}
    folder = path.parent
    descriptor, temporary = tempfile.mkstemp(dir=folder, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, _FILE_MODE)  # mkstemp's 0600 would hide the checkpoint from the user's group
        with os.fdopen(descriptor, "wb") as file:
            np.savez(file, **members)  # type: ignore[arg-type]  # numpy's stub types allow_pickle only
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    _sync_folder(folder)


def _sync_folder(folder: Path) -> None:
    """Make the rename itself durable (POSIX); a no-op where folders cannot be opened."""
    try:
        descriptor = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(descriptor)
    except OSError:
        pass
    finally:
        os.close(descriptor)


def require(path: Path) -> None:
    """Raise CheckpointError unless the checkpoint file ``path`` exists."""
    if not path.is_file():
        raise CheckpointError(
            f"no checkpoint to resume from: {path} does not exist. Run without --resume to start the run, "
            f"or pass the --out folder of the interrupted run."
        )


def load(path: Path) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Read a checkpoint written by :func:`save`.

    Returns:
        ``(meta, arrays)``.

    Raises:
        CheckpointError: the file is missing, unreadable, damaged, or not a ``cabs train`` checkpoint.
    """
    require(path)
    try:
        with np.load(path, allow_pickle=False) as archive:
            arrays = {name: archive[name] for name in archive.files}
        meta = json.loads(arrays.pop(_META_KEY).tobytes().decode())
    except PermissionError as error:
        raise CheckpointError(f"cannot read the checkpoint {path}: {error.strerror}.") from error
    except Exception as error:  # zipfile, npy and JSON errors all mean the same to the user
        raise CheckpointError(
            f"the checkpoint {path} is damaged ({type(error).__name__}: {error}). Delete it to start over."
        ) from error
    if not isinstance(meta, dict) or meta.get("format") != _FORMAT:
        raise CheckpointError(f"{path} is not a cabs train checkpoint. Delete it or choose another --out.")
    if meta.get("version") != _VERSION:
        raise CheckpointError(
            f"the checkpoint {path} has format version {meta.get('version')!r}; this cabs reads version {_VERSION}."
        )
    return meta, arrays


def settings_difference(saved: dict[str, Any], here: dict[str, Any], name: Callable[[str], str] = str) -> str | None:
    """A text naming the settings that differ between a checkpoint and this run (as ``name(key)``), or None."""
    differ = sorted(key for key in set(saved) | set(here) if saved.get(key) != here.get(key))
    if not differ:
        return None
    return ", ".join(f"{name(key)}: saved {saved.get(key)!r}, here {here.get(key)!r}" for key in differ)


def truncate_metrics(path: Path, step: int, *, rewrite: bool = True) -> list[dict[str, Any]]:
    """Cut ``metrics.jsonl`` back to the records of steps ``1..step``; return them.

    Lines after the checkpoint's step were written by steps that the resumed run
    repeats, and a last line without its newline is torn by the crash; both go. The
    shortened file replaces the old one atomically. With ``rewrite=False`` the file is
    only read: a data-parallel worker other than the first must not replace the file
    the first one is appending to.

    Raises:
        CheckpointError: the file lacks some of the steps up to ``step``.
    """
    try:
        content = path.read_bytes()
    except FileNotFoundError:
        content = b""
    records: list[dict[str, Any]] = []
    kept: list[bytes] = []
    for line in content.split(b"\n")[:-1]:  # the part after the last newline is torn or empty
        try:
            record = json.loads(line)
        except ValueError:
            break
        if not isinstance(record, dict) or record.get("step") != len(records) + 1 or len(records) == step:
            break
        records.append(record)
        kept.append(line + b"\n")
    if len(records) != step:
        raise CheckpointError(
            f"{path} holds {len(records)} whole records in step order but the checkpoint is at step {step}; "
            f"the metrics file does not belong to this checkpoint. Delete the checkpoint to start over."
        )
    if not rewrite:
        return records
    descriptor, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.chmod(temporary, _FILE_MODE)
        with os.fdopen(descriptor, "wb") as file:
            file.write(b"".join(kept))
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    return records


def _option(setting: str) -> str:
    """The command-line option of a ``TrainConfig`` field (``learning_rate`` -> ``--lr``)."""
    return "--lr" if setting == "learning_rate" else "--" + setting.replace("_", "-")


class Checkpointer:
    """Saves and restores one ``cabs train`` run: controller, sampler, task arrays, step and clock.

    Args:
        out: the run's output folder; the checkpoint is ``out / checkpoint.npz``.
        config: the run's ``TrainConfig``.
        x_train, y_train: the training data (fingerprinted, so other data are refused).
        controller: the :class:`cabs.Controller`.
        sampler: the :class:`cabs.data.BatchSampler`.
        task: the framework task, with ``state_dict()`` and ``load_state_dict(arrays)``.
    """

    def __init__(
        self,
        out: Path,
        config: Any,
        x_train: np.ndarray,
        y_train: np.ndarray,
        controller: Any,
        sampler: Any,
        task: Any,
    ) -> None:
        self.path = out / CHECKPOINT_NAME
        self._every = config.checkpoint_every
        self._settings = trajectory_settings(config)
        self._data = data_fingerprint(x_train, y_train)
        self._controller, self._sampler, self._task = controller, sampler, task

    def due(self, step: int) -> bool:
        """Whether the regular schedule saves after ``step``."""
        return step % self._every == 0

    def save(self, step: int, wall_time: float) -> None:
        """Write the state after ``step`` (atomically); ``wall_time`` is the training time so far."""
        meta = {
            "step": step,
            "wall_time": wall_time,
            "settings": self._settings,
            "data_sha256": self._data,
            "controller": self._controller.state_dict(),
            "sampler": self._sampler.state_dict(),
        }
        save(self.path, meta, self._task.state_dict())

    def restore(
        self, metrics_path: Path, steps: int | None, *, rewrite_metrics: bool = True
    ) -> tuple[int, float, list[dict[str, Any]]]:
        """Load the checkpoint into the controller, sampler and task; cut the metrics file to match.

        Args:
            metrics_path: the run's ``metrics.jsonl``.
            steps: the step budget of this run (None: an epoch budget).
            rewrite_metrics: cut the file (the first worker); False only reads it (the others).

        Returns:
            ``(step, wall_time, records)``: the last saved step, the training time until
            then, and the metrics records of steps ``1..step``.

        Raises:
            CheckpointError: no checkpoint, a damaged one, or one from another configuration.
        """
        meta, arrays = load(self.path)
        _check_meta(self.path, meta)
        difference = settings_difference(meta["settings"], self._settings, _option)
        if difference is not None:
            raise CheckpointError(
                f"the checkpoint {self.path} is from a different configuration ({difference}). "
                f"Resume with the saved options, or choose another --out to start a new run."
            )
        if meta.get("data_sha256") != self._data:
            raise CheckpointError(
                f"the checkpoint {self.path} was trained on other data (the training set's SHA-256 differs). "
                f"Resume with the saved data set, or choose another --out."
            )
        # After the settings: another model or dtype is named as such, not as arrays that do not fit.
        _check_arrays(self.path, arrays, self._task.state_dict())
        step = meta["step"]
        if steps is not None and step > steps:
            raise CheckpointError(
                f"the checkpoint {self.path} is at step {step}, past --steps {steps}. Pass --steps {step} or more."
            )
        try:
            self._controller.load_state_dict(meta["controller"])
            self._sampler.load_state_dict(meta["sampler"])
            self._task.load_state_dict(arrays)
        except (KeyError, ValueError, TypeError, RuntimeError) as error:
            raise CheckpointError(
                f"the checkpoint {self.path} does not fit this run ({type(error).__name__}: "
                f"{' '.join(str(error).split())}). Delete it to start over."
            ) from error
        return step, float(meta["wall_time"]), truncate_metrics(metrics_path, step, rewrite=rewrite_metrics)


# The checkpoint's JSON fields that restore() reads, with the types they must have.
_META_FIELDS: dict[str, tuple[type, ...]] = {
    "step": (int,),
    "wall_time": (int, float),
    "settings": (dict,),
    "data_sha256": (str,),
    "controller": (dict,),
    "sampler": (dict,),
}


def _check_meta(path: Path, meta: dict[str, Any]) -> None:
    """CheckpointError unless the JSON fields that restore() reads have their types and ranges."""
    for field, types in _META_FIELDS.items():
        if field not in meta:
            raise CheckpointError(
                f"the checkpoint {path} is damaged: it lacks the field {field!r}. Delete it to start over."
            )
        value = meta[field]
        wanted = " or ".join(kind.__name__ for kind in types)
        if isinstance(value, bool) or not isinstance(value, types):
            raise CheckpointError(
                f"the checkpoint {path} is damaged: its field {field!r} must be {wanted}, got {field}={value!r} "
                f"({type(value).__name__}). Delete it to start over."
            )
    for field in ("step", "wall_time"):
        value = meta[field]
        if not (np.isfinite(value) and value >= 0):
            raise CheckpointError(
                f"the checkpoint {path} is damaged: its field {field!r} must be a finite number >= 0, "
                f"got {field}={value!r}. Delete it to start over."
            )


def _describe(array: np.ndarray) -> str:
    return f"{array.dtype}{list(array.shape)}"


def _check_arrays(path: Path, arrays: dict[str, np.ndarray], expected: dict[str, np.ndarray]) -> None:
    """CheckpointError unless the saved arrays fit the task's own ``state_dict()`` ``expected``.

    Every parameter array (``model/...``) must be there, with the network's dtype and shape;
    the optimizer's arrays saved must match theirs; no floating-point array may hold NaN or inf
    (a run resumed from those would train on garbage without a word).
    """
    advice = "Delete it to start over."
    for name in sorted(set(expected) | set(arrays)):
        if not name.startswith(("model/", "optimizer/")):
            continue
        if name not in arrays:
            if name.startswith("model/"):
                raise CheckpointError(f"the checkpoint {path} lacks the parameter array {name!r}. {advice}")
            continue
        if name not in expected:
            if name.startswith("model/"):
                raise CheckpointError(
                    f"the checkpoint {path} holds the array {name!r}, which the network does not have. {advice}"
                )
            continue
        saved, own = arrays[name], expected[name]
        if saved.dtype != own.dtype or saved.shape != own.shape:
            raise CheckpointError(
                f"the checkpoint {path} is damaged: the array {name!r} is {_describe(saved)}, "
                f"the network's is {_describe(own)}. {advice}"
            )
    for name, saved in arrays.items():
        if saved.dtype.kind in "fc" and not np.all(np.isfinite(saved)):
            raise CheckpointError(
                f"the checkpoint {path} is damaged: the array {name!r} holds non-finite values (NaN or inf). {advice}"
            )


class StopOnInterrupt:
    """Turns Ctrl-C (SIGINT) into a request that the loop honours after the current step.

    A step interrupted half way (the parameters updated but the controller not yet)
    cannot be checkpointed, so the first SIGINT only sets :attr:`requested`; the loop
    saves and stops at the end of the step. A second SIGINT raises at once. Outside
    the main thread, where Python cannot install signal handlers, Ctrl-C works as usual.
    """

    def __init__(self) -> None:
        self.requested = False
        self._previous: Any = None

    def start(self) -> None:
        """Install the handler (main thread only)."""
        if threading.current_thread() is threading.main_thread():
            self._previous = signal.signal(signal.SIGINT, self._handle)

    def _handle(self, signal_number: int, frame: Any) -> None:
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True

    def stop(self) -> None:
        """Put back the previous handler."""
        if self._previous is not None:
            signal.signal(signal.SIGINT, self._previous)
            self._previous = None
