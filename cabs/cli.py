"""The ``cabs`` command line: ``cabs train``, ``cabs compare`` and ``cabs backends``.

User errors (bad options, a missing or damaged data file, a framework that is not
installed) end with one line ``cabs: error: ...`` on stderr and exit status 2;
``--debug`` shows the traceback instead.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import math
import os
import sys
from collections.abc import Sequence
from typing import Any

__all__ = ["build_parser", "main"]

EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
SEED_LIMIT = 2**32 - 1  # NumPy's and PyTorch's seeds are 32-bit on every platform
# More threads than this only oversubscribe the cores; far more have crashed PyTorch.
THREADS_PER_CORE_LIMIT = 4


class HelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: ...)`` only where the help text does not say the default itself.

    Options without a default (None) or flags say nothing, and a help text that already
    names its default (``default: the minimum``) keeps it as written, so no default is
    printed twice.
    """

    def _get_help_string(self, action: argparse.Action) -> str | None:
        text = action.help or ""
        if action.default is None or isinstance(action.default, bool) or "(default" in text:
            return action.help
        return super()._get_help_string(action)


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {value}")
    return value


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number > 0, got {text!r}") from None
    if not (math.isfinite(value) and value > 0):
        raise argparse.ArgumentTypeError(f"must be a finite number > 0, got {text}")
    return value


def _seed(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [0, 2**32-1], got {text!r}") from None
    if not 0 <= value <= SEED_LIMIT:
        raise argparse.ArgumentTypeError(f"must be in [0, 2**32-1], got {value}")
    return value


def _threads(text: str) -> int:
    limit = (os.cpu_count() or 1) * THREADS_PER_CORE_LIMIT
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer in [1, {limit}], got {text!r}") from None
    if not 1 <= value <= limit:
        raise argparse.ArgumentTypeError(
            f"must be in [1, {limit}] ({THREADS_PER_CORE_LIMIT} per CPU core of this machine), got {value}"
        )
    return value


def _memory_size(text: str) -> int:
    from cabs.training.memory import parse_bytes

    try:
        return parse_bytes(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"must be a size such as 512MB or 2GiB, got {text!r}") from error


def _join_dash_values(argv: Sequence[str], parser: argparse.ArgumentParser) -> list[str]:
    """Write ``--option -5MB`` as ``--option=-5MB`` so that argparse reads ``-5MB`` as the value.

    argparse takes a word that starts with ``-`` (and is not a plain negative number) for an
    option, so ``--memory-budget -5MB`` ended in "expected one argument" instead of the
    option's own message. Words that are options of the command stay options.
    """
    takes_value: set[str] = set()
    known: set[str] = set()
    for sub in _all_parsers(parser):
        for action in sub._actions:
            known.update(action.option_strings)
            if action.option_strings and action.nargs is None and not isinstance(action, _FLAG_ACTIONS):
                takes_value.update(action.option_strings)
    joined: list[str] = []
    words = list(argv)
    index = 0
    while index < len(words):
        word = words[index]
        following = words[index + 1] if index + 1 < len(words) else None
        if (
            word in takes_value
            and following is not None
            and following.startswith("-")
            and following.split("=", 1)[0] not in known
        ):
            joined.append(f"{word}={following}")
            index += 2
            continue
        joined.append(word)
        index += 1
    return joined


_FLAG_ACTIONS = (
    argparse._StoreTrueAction,
    argparse._StoreFalseAction,
    argparse._StoreConstAction,
    argparse._CountAction,
    argparse._HelpAction,
    argparse._VersionAction,
    argparse.BooleanOptionalAction,
)


def _all_parsers(parser: argparse.ArgumentParser) -> list[argparse.ArgumentParser]:
    """``parser`` and its subcommands' parsers."""
    found = [parser]
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                found.extend(_all_parsers(sub))
    return found


def _add_train_parser(commands: Any) -> None:
    from cabs.training.loop import BACKENDS, DEFAULT_STEPS, DTYPES, TrainConfig
    from cabs.training.models import MODELS

    defaults = TrainConfig()
    train = commands.add_parser(
        "train",
        help="train a small network with CABS",
        description="Train a small network with CABS (SGD with a coupled adaptive batch size) and write "
        "metrics.jsonl, summary.json, training.png and checkpoint.npz into --out. Without options: a small 1-D CNN "
        "on the embedded MNIST-1D data set with PyTorch.",
        formatter_class=HelpFormatter,
    )
    train.add_argument(
        "--backend", choices=BACKENDS, default=defaults.backend, help="framework that computes the gradients"
    )
    train.add_argument(
        "--dataset",
        default=defaults.dataset,
        help="mnist1d (embedded, offline), digits (scikit-learn), or mnist, fashion-mnist, cifar10 from --data-dir",
    )
    train.add_argument("--data-dir", default=None, help="folder holding the data set's standard files")
    train.add_argument(
        "--model",
        choices=MODELS,
        default=defaults.model,
        help="mlp; cnn (1-D for mnist1d, 2-D for images); mnist-paper or cifar10-paper: the paper's networks "
        "for 28x28 and 32x32 images (cifar10-paper: torch only)",
    )
    train.add_argument("--lr", type=_positive_float, default=defaults.learning_rate, help="constant SGD learning rate")
    train.add_argument(
        "--min-batch-size",
        type=_positive_int,
        default=defaults.min_batch_size,
        help="smallest batch size CABS may choose",
    )
    train.add_argument(
        "--max-batch-size",
        type=_positive_int,
        default=defaults.max_batch_size,
        help="largest batch size CABS may choose",
    )
    train.add_argument(
        "--initial-batch-size", type=_positive_int, default=None, help="first batch size (default: the minimum)"
    )
    budget = train.add_mutually_exclusive_group()
    budget.add_argument("--steps", type=_positive_int, default=None, help=f"training steps (default: {DEFAULT_STEPS})")
    budget.add_argument(
        "--epochs", type=_positive_int, default=None, help="passes over the training set, instead of --steps"
    )
    train.add_argument(
        "--seed",
        type=_seed,
        default=defaults.seed,
        help="in [0, 2**32-1]; fixes weights, data order and generated data",
    )
    train.add_argument(
        "--out", default=defaults.out, help="output folder, writable (created; its output files are replaced)"
    )
    train.add_argument(
        "--eval-every",
        type=_positive_int,
        default=None,
        help="test-set evaluation interval in steps (default: 20 per run)",
    )
    train.add_argument(
        "--threads",
        type=_threads,
        default=defaults.threads,
        help="PyTorch CPU threads, 1 to 4 per core; the small default networks run fastest on one",
    )
    train.add_argument(
        "--devices",
        type=_positive_int,
        default=None,
        help="JAX and TensorFlow: split each batch over this many devices (host or logical CPU devices without "
        "GPUs). PyTorch runs data-parallel under torchrun instead: "
        "torchrun --standalone --nproc_per_node=N -m cabs train --backend torch",
    )
    train.add_argument(
        "--check-agreement",
        action="store_true",
        help="debugging data-parallel runs: after every step, check that all workers chose the same batch size",
    )
    train.add_argument(
        "--dtype", choices=DTYPES, default=defaults.dtype, help="floating-point type of the parameters and data"
    )
    train.add_argument(
        "--checkpoint-every",
        type=_positive_int,
        default=defaults.checkpoint_every,
        help="save checkpoint.npz in --out every N steps, at the end and on Ctrl-C",
    )
    train.add_argument(
        "--resume",
        action="store_true",
        help="continue the run in --out from its checkpoint, with the same options (--steps may grow)",
    )
    train.add_argument(
        "--memory-budget",
        type=_memory_size,
        default=None,
        metavar="BYTES",
        help="memory one pass of the statistics may use, e.g. 512MB or 2GiB: a larger batch runs in several "
        "passes whose sums add up to the whole batch's (the estimate: docs/benchmarks.md)",
    )
    train.add_argument("--quiet", action="store_true", help="no progress bar and no summary table")
    train.add_argument("--debug", action="store_true", help="show the traceback of an error")
    train.set_defaults(handler=_run_train)


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the ``cabs`` command."""
    parser = argparse.ArgumentParser(prog="cabs", description="CABS: SGD with a coupled adaptive batch size.")
    parser.add_argument("--version", action="version", version=f"cabs {_version('cabs')}")
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    _add_train_parser(commands)
    from cabs.compare import add_compare_parser

    add_compare_parser(commands)
    backends = commands.add_parser(
        "backends",
        help="list the installed backends, their versions and devices",
        description="List the installed backends with their framework version and devices (imports each framework).",
    )
    backends.add_argument("--debug", action="store_true", help="show the traceback of an error")
    backends.set_defaults(handler=_run_backends)
    return parser


def _run_train(arguments: argparse.Namespace) -> int:
    from cabs.training import distributed
    from cabs.training.loop import TrainConfig, summary_table, train

    config = TrainConfig(
        backend=arguments.backend,
        dataset=arguments.dataset,
        data_dir=arguments.data_dir,
        model=arguments.model,
        learning_rate=arguments.lr,
        min_batch_size=arguments.min_batch_size,
        max_batch_size=arguments.max_batch_size,
        initial_batch_size=arguments.initial_batch_size,
        steps=arguments.steps,
        epochs=arguments.epochs,
        seed=arguments.seed,
        out=arguments.out,
        eval_every=arguments.eval_every,
        threads=arguments.threads,
        dtype=arguments.dtype,
        checkpoint_every=arguments.checkpoint_every,
        resume=arguments.resume,
        memory_budget=arguments.memory_budget,
    )
    log = None if arguments.quiet else (lambda text: print(text, file=sys.stderr))
    # Host devices must be requested before JAX is first imported, so before the workers' set-up.
    distributed.prepare_process(arguments.backend, arguments.devices)
    workers = distributed.setup(arguments.backend, arguments.devices)
    workers.check_agreement = arguments.check_agreement
    try:
        summary = train(config, progress=not arguments.quiet, log=log, workers=workers)
    finally:
        workers.close()
    if not arguments.quiet and workers.main:
        print(summary_table(summary, config.out))
    return 0


def _version(distribution: str) -> str:
    try:
        return importlib.metadata.version(distribution)
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


# Backend name -> the distributions that may provide its framework, first found wins.
_DISTRIBUTIONS = {
    "numpy": ("numpy",),
    "torch": ("torch",),
    "jax": ("jax",),
    "tensorflow": ("tensorflow", "tensorflow-cpu", "tensorflow-macos"),
}


def _framework_version(name: str, backend: Any) -> str:
    for distribution in _DISTRIBUTIONS.get(name, ()):
        version = _version(distribution)
        if version != "unknown":
            return version
    return str(getattr(backend, "__version__", "unknown"))


def _run_backends(arguments: argparse.Namespace) -> int:
    from cabs import backends

    rows = []
    for name in backends.available():
        try:
            if name in backends.BUILTIN:
                # Adapters never import their framework themselves; listing devices needs it.
                importlib.import_module(backends.BUILTIN[name][1])
            backend = backends.load(name)
            devices = ", ".join(backend.devices())
            version = _framework_version(name, backend)
        except (ImportError, AttributeError) as error:
            if arguments.debug:
                raise
            version, devices = _framework_version(name, None), f"unavailable: {_one_line(error)}"
        rows.append((name, version, devices))
    width_name = max(len("backend"), *(len(row[0]) for row in rows))
    width_version = max(len("version"), *(len(row[1]) for row in rows))
    print(f"{'backend':<{width_name}}  {'version':<{width_version}}  devices")
    for name, version, devices in rows:
        print(f"{name:<{width_name}}  {version:<{width_version}}  {devices}")
    return 0


def _one_line(error: BaseException) -> str:
    return " ".join(str(error).split()) or type(error).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run the ``cabs`` command; returns the exit status.

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    parser = build_parser()
    arguments = parser.parse_args(_join_dash_values(sys.argv[1:] if argv is None else argv, parser))
    try:
        return arguments.handler(arguments)
    except KeyboardInterrupt:
        print("cabs: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    except (ValueError, TypeError, OSError, ImportError) as error:
        # User errors: bad settings, missing or damaged files, a framework that is not installed.
        # DatasetError is a ValueError. --debug shows where it came from.
        if arguments.debug:
            raise
        parser.exit(EXIT_USAGE, f"cabs: error: {_one_line(error)}\n")
    return 0
