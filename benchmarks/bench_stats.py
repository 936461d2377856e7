"""Overhead of CABS statistics: time and peak memory of a CABS step as ratios to a plain SGD step.

Run ``python benchmarks/bench_stats.py --backend torch`` (``--help`` for the options). For
each model and batch size it times, in one run and interleaved so background load hits all
alike, a plain SGD step (forward, backward, update) and a CABS step with each statistics
method (statistics, controller update, SGD update), and reports the median of several
repetitions as a ratio to the plain step. Peak memory is measured for each method in a
fresh process (CPU: growth of the peak resident set size during one step, from
/proc/self/status VmHWM after resetting it; CUDA: ``torch.cuda.max_memory_allocated`` above what was allocated
before the step), also as a ratio to the plain step. The markdown table goes to stdout and,
with ``--output``, to a file.
"""

from __future__ import annotations

import argparse
import functools
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from collections.abc import Callable

MODELS = ("mlp", "cnn")
METHODS = ("plain", "layerwise", "vmap", "opacus")
STATS_EVERY = 16


def build_model(name: str):
    """The benchmark models: an MLP 784-1024-1024-10 and the paper's MNIST network."""
    import torch

    nn = torch.nn
    if name == "mlp":
        return nn.Sequential(nn.Linear(784, 1024), nn.ReLU(), nn.Linear(1024, 1024), nn.ReLU(), nn.Linear(1024, 10))
    if name == "cnn":
        return nn.Sequential(
            nn.Conv2d(1, 32, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2),
            nn.ReLU(),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(64 * 7 * 7, 1024),
            nn.ReLU(),
            nn.Linear(1024, 10),
        )
    raise ValueError(f"`model` must be one of {MODELS}, got model={name!r}.")


def random_batch(name: str, batch_size: int, device: str):
    import torch

    generator = torch.Generator().manual_seed(batch_size)
    shape = (batch_size, 784) if name == "mlp" else (batch_size, 1, 28, 28)
    inputs = torch.randn(*shape, generator=generator).to(device)
    targets = torch.randint(0, 10, (batch_size,), generator=generator).to(device)
    return inputs, targets


def make_steps(model_name: str, batch_size: int, device: str) -> dict[str, Callable[[], None]]:
    """One step function per method, each on its own copy of the model (methods must not share ``.grad``)."""
    import torch

    import cabs
    from cabs.backends import torch as cabs_torch
    from cabs.backends._torch_layerwise import layerwise_grad_stats

    inputs, targets = random_batch(model_name, batch_size, device)
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")
    steps = {}

    def new_model():
        torch.manual_seed(0)
        return build_model(model_name).to(device)

    plain_model = new_model()
    plain_optimizer = torch.optim.SGD(plain_model.parameters(), lr=0.01)

    def plain_step():
        plain_optimizer.zero_grad(set_to_none=True)
        loss_fn(plain_model(inputs), targets).mean().backward()
        plain_optimizer.step()

    steps["plain"] = plain_step

    def cabs_step_for(compute_stats: Callable):
        model = new_model()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
        controller = cabs.Controller(learning_rate=0.01)

        def cabs_step():
            controller.step(compute_stats(model, loss_fn, inputs, targets))
            optimizer.step()

        return cabs_step

    # What grad_stats(method="layerwise") runs; called directly so the benchmark does not depend on the adapter's options.
    steps["layerwise"] = cabs_step_for(functools.partial(layerwise_grad_stats, method="layerwise"))
    vmap_options = {"method": "vmap"} if "method" in inspect.signature(cabs_torch.grad_stats).parameters else {}
    steps["vmap"] = cabs_step_for(functools.partial(cabs_torch.grad_stats, **vmap_options))
    opacus_step = _opacus_step(new_model(), loss_fn, inputs, targets)
    if opacus_step is not None:
        steps["opacus"] = opacus_step
    return steps


def _opacus_step(model, loss_fn, inputs, targets) -> Callable[[], None] | None:
    """Opacus's hooks form every per-example gradient (``grad_sample``); the step sums their squared norms."""
    try:
        from opacus.grad_sample import GradSampleModule
    except ImportError:
        return None
    import torch

    wrapped = GradSampleModule(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)

    def step():
        optimizer.zero_grad(set_to_none=True)
        for parameter in model.parameters():
            parameter.grad_sample = None
        loss_fn(wrapped(inputs), targets).mean().backward()
        with torch.no_grad():
            # grad_sample holds the gradients of the mean loss: scale by m to get each example's own.
            count = inputs.shape[0]
            sq_norm_sum = sum((parameter.grad_sample * count).pow(2).sum() for parameter in model.parameters())
        float(sq_norm_sum)
        optimizer.step()

    return step


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_methods(model_name: str, batch_size: int, device: str, repeats: int, methods: list[str]) -> dict:
    """Median seconds per step of each method, the methods interleaved within each repetition."""
    steps = {key: value for key, value in make_steps(model_name, batch_size, device).items() if key in methods}
    for step in steps.values():  # warm-up: first-call allocations, lazy initialisation
        step()
    times: dict[str, list[float]] = {key: [] for key in steps}
    for _ in range(repeats):
        for key, step in steps.items():
            synchronize(device)
            start = time.perf_counter()
            step()
            synchronize(device)
            times[key].append(time.perf_counter() - start)
    return {key: statistics.median(value) for key, value in times.items()}


def _status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (``VmRSS``: resident now, ``VmHWM``: peak resident), in bytes."""
    with open("/proc/self/status") as status:
        line = next(line for line in status if line.startswith(field + ":"))
    return int(line.split()[1]) * 1024


def _reset_peak_resident() -> None:
    """Reset VmHWM to the current resident size (Linux >= 4.0), so the peak seen is that of what follows."""
    with open("/proc/self/clear_refs", "w") as clear_refs:
        clear_refs.write("5")


def measure_memory(model_name: str, batch_size: int, device: str, method: str) -> int | None:
    """Peak extra memory of the first step (bytes): over the model and data alone, in a fresh process."""
    steps = make_steps(model_name, batch_size, device)
    if method not in steps:
        return None
    step = steps[method]
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        step()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    # ru_maxrss would carry the parent's peak across fork and exec; VmHWM can be reset right before the step.
    _reset_peak_resident()
    before = _status_bytes("VmRSS")
    step()
    return max(0, _status_bytes("VmHWM") - before)


def memory_in_fresh_process(model_name: str, batch_size: int, device: str, method: str) -> int | None:
    command = [sys.executable, __file__, "--measure-memory", model_name, str(batch_size), method, "--device", device]
    command += ["--threads", str(torch_threads())]
    # A fixed mmap threshold returns every large block to the system on free, so the resident size
    # follows what is live; glibc's sliding threshold otherwise keeps freed blocks and makes RSS noise.
    environment = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    result = subprocess.run(command, capture_output=True, text=True, check=True, env=environment)
    return json.loads(result.stdout.strip().splitlines()[-1])["bytes"]


def profile_layerwise(model_name: str, batch_size: int, device: str, rows: int = 12) -> str:
    """The torch profiler's table of the most expensive operators in one layer-wise CABS step."""
    import torch

    step = make_steps(model_name, batch_size, device)["layerwise"]
    step()
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as profiler:
        step()
    sort_by = "cuda_time_total" if device.startswith("cuda") else "cpu_time_total"
    return profiler.key_averages().table(sort_by=sort_by, row_limit=rows)


def machine_description(device: str) -> str:
    import torch

    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [
        f"{platform.system()} {platform.machine()}, CPU {cpu}, {os.cpu_count()} logical cores",
        f"Python {platform.python_version()}, torch {torch.__version__}, {torch.get_num_threads()} intra-op threads",
        f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else ""),
        "load average at start {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    ]
    try:
        import opacus

        parts.append(f"opacus {opacus.__version__}")
    except ImportError:
        parts.append("opacus not installed (no side-by-side row)")
    return "; ".join(parts)


def results_table(results: list[dict]) -> str:
    lines = [
        "| model | batch | plain step (s) | layerwise time | vmap time | opacus time "
        f"| layerwise, stats_every={STATS_EVERY} | layerwise memory | vmap memory | opacus memory |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]

    def ratio(row: dict, kind: str, method: str) -> str:
        value, base = row[kind].get(method), row[kind].get("plain")
        if value is None or not base:
            return "n/a"
        return f"{value / base:.2f}x"

    for row in results:
        plain = row["time"]["plain"]
        layerwise = row["time"].get("layerwise")
        every = "n/a" if layerwise is None else f"{((STATS_EVERY - 1) * plain + layerwise) / STATS_EVERY / plain:.2f}x"
        lines.append(
            f"| {row['model']} | {row['batch']} | {plain:.4f} | {ratio(row, 'time', 'layerwise')} "
            f"| {ratio(row, 'time', 'vmap')} | {ratio(row, 'time', 'opacus')} | {every} "
            f"| {ratio(row, 'memory', 'layerwise')} | {ratio(row, 'memory', 'vmap')} "
            f"| {ratio(row, 'memory', 'opacus')} |"
        )
    return "\n".join(lines)


def parse_arguments(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backend", default="torch", choices=["torch"], help="only torch has this benchmark so far")
    parser.add_argument("--device", default="cuda" if _cuda_available() else "cpu")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=MODELS)
    parser.add_argument("--batch-sizes", nargs="+", type=int, default=[16, 128, 1024, 2048])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=METHODS)
    parser.add_argument("--repeats", type=int, default=5, help="timed repetitions per method (median reported)")
    parser.add_argument(
        "--reference-max-batch",
        type=int,
        default=1024,
        help="run vmap and opacus only up to this batch size (they form every per-example gradient)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the fresh-process memory measurements")
    parser.add_argument("--profile", action="store_true", help="append a profile of one layer-wise step per model")
    parser.add_argument("--output", help="also write the markdown to this file")
    parser.add_argument(
        "--threads", type=int, help="torch intra-op threads (default: torch's); 1 steadies timings on a shared machine"
    )
    parser.add_argument("--measure-memory", nargs=3, metavar=("MODEL", "BATCH", "METHOD"), help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def torch_threads() -> int:
    import torch

    return torch.get_num_threads()


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    if arguments.threads:
        import torch

        torch.set_num_threads(arguments.threads)
    if arguments.measure_memory:
        model_name, batch, method = arguments.measure_memory
        print(json.dumps({"bytes": measure_memory(model_name, int(batch), arguments.device, method)}))
        return
    description = machine_description(arguments.device)
    print(description, file=sys.stderr)
    results = []
    for model_name in arguments.models:
        for batch_size in arguments.batch_sizes:
            methods = ["plain", *[method for method in arguments.methods if method != "plain"]]
            if batch_size > arguments.reference_max_batch:
                methods = [method for method in methods if method in ("plain", "layerwise")]
            row = {"model": model_name, "batch": batch_size, "memory": {}}
            row["time"] = time_methods(model_name, batch_size, arguments.device, arguments.repeats, methods)
            if not arguments.no_memory:
                for method in row["time"]:
                    row["memory"][method] = memory_in_fresh_process(model_name, batch_size, arguments.device, method)
            print(json.dumps(row), file=sys.stderr, flush=True)
            results.append(row)
    memory_note = "peak extra memory of one step in a fresh process: " + (
        "torch.cuda.max_memory_allocated"
        if arguments.device.startswith("cuda")
        else "growth of the peak resident set size (VmHWM reset before the step, minus VmRSS before it)"
    )
    markdown = [
        f"Machine: {description}; load average at end {os.getloadavg()[0]:.2f}.",
        "",
        f"Times are medians of {arguments.repeats} interleaved repetitions after one warm-up, as ratios to the "
        f"plain step of the same run; memory is the {memory_note}, as a ratio to the plain step's. "
        f"The stats_every={STATS_EVERY} column is derived from the medians: "
        f"({STATS_EVERY - 1} plain steps + 1 layer-wise step) / {STATS_EVERY} plain steps.",
        "",
        results_table(results),
    ]
    if arguments.profile:
        for model_name in arguments.models:
            batch = 128
            markdown += [
                "",
                f"Profile of one layer-wise CABS step, {model_name}, batch {batch}:",
                "",
                "```",
                profile_layerwise(model_name, batch, arguments.device),
                "```",
            ]
    text = "\n".join(markdown) + "\n"
    print(text)
    if arguments.output:
        with open(arguments.output, "w") as output:
            output.write(text)


if __name__ == "__main__":
    main()
