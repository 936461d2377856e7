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
import gc
import inspect
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable

MODELS = ("mlp", "cnn")
METHODS = ("plain", "layerwise", "vmap", "opacus")
BACKENDS = ("torch", "jax", "tensorflow")
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


def make_steps(model_name: str, batch_size: int, device: str, backend: str = "torch") -> dict[str, Callable[[], None]]:
    """One step function per method of ``backend``; each method has its own copy of the parameters."""
    if backend == "jax":
        return make_jax_steps(model_name, batch_size)
    if backend == "tensorflow":
        return make_tensorflow_steps(model_name, batch_size)
    return make_torch_steps(model_name, batch_size, device)


def make_torch_steps(model_name: str, batch_size: int, device: str) -> dict[str, Callable[[], None]]:
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


def numpy_batch(name: str, batch_size: int):
    """Random inputs (channels last for the CNN, the layout of JAX and Keras convolutions) and labels."""
    import numpy as np

    generator = np.random.default_rng(batch_size)
    shape = (batch_size, 784) if name == "mlp" else (batch_size, 28, 28, 1)
    inputs = generator.standard_normal(shape, dtype=np.float32)
    targets = generator.integers(0, 10, batch_size).astype(np.int32)
    return inputs, targets


def jax_parameters(name: str):
    """He-initialised parameters of the benchmark models as a list of (weight, bias); kernels HWIO."""
    import jax
    import jax.numpy as jnp

    if name == "mlp":
        shapes = [(784, 1024), (1024, 1024), (1024, 10)]
    else:
        shapes = [(5, 5, 1, 32), (5, 5, 32, 64), (64 * 7 * 7, 1024), (1024, 10)]
    keys = jax.random.split(jax.random.PRNGKey(0), len(shapes))
    parameters = []
    for key, shape in zip(keys, shapes, strict=True):
        fan_in = 1
        for size in shape[:-1]:
            fan_in *= size
        weight = jax.random.normal(key, shape, jnp.float32) * (2.0 / fan_in) ** 0.5
        parameters.append((weight, jnp.zeros(shape[-1], jnp.float32)))
    return parameters


def jax_logits(name: str, parameters, inputs):
    """Logits of a batch: the MLP, or the paper's CNN (5x5 'same' convolutions, ReLU, 2x2 max-pooling)."""
    import jax
    import jax.numpy as jnp

    hidden = inputs
    dense = parameters
    if name == "cnn":
        for weight, bias in parameters[:2]:
            hidden = jax.lax.conv_general_dilated(
                hidden, weight, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
            )
            hidden = jax.nn.relu(hidden + bias)
            hidden = jax.lax.reduce_window(hidden, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        hidden = hidden.reshape(hidden.shape[0], -1)
        dense = parameters[2:]
    for index, (weight, bias) in enumerate(dense):
        hidden = hidden @ weight + bias
        if index < len(dense) - 1:
            hidden = jax.nn.relu(hidden)
    return hidden


def make_jax_steps(model_name: str, batch_size: int) -> dict[str, Callable[[], None]]:
    """Plain step: ``jax.value_and_grad`` of the mean loss and the SGD update in one ``jax.jit``.

    CABS step: :class:`cabs.backends.jax.StatsFunction` (``buckets="exact"``, so no padding),
    ``Controller.step`` and the same jitted update.
    """
    import jax
    import jax.numpy as jnp

    import cabs
    from cabs.backends import jax as cabs_jax

    numpy_inputs, numpy_targets = numpy_batch(model_name, batch_size)
    inputs, targets = jnp.asarray(numpy_inputs), jnp.asarray(numpy_targets)

    def cross_entropy(logits, labels):
        log_probabilities = jax.nn.log_softmax(logits, axis=-1)
        return -jnp.take_along_axis(log_probabilities, labels[:, None], axis=-1)[:, 0]

    def mean_loss(parameters, x, y):
        return jnp.mean(cross_entropy(jax_logits(model_name, parameters, x), y))

    def example_loss(parameters, example):
        return cross_entropy(jax_logits(model_name, parameters, example["x"][None]), example["y"][None])[0]

    update = jax.jit(lambda parameters, grads: jax.tree_util.tree_map(lambda p, g: p - 0.01 * g, parameters, grads))

    @jax.jit
    def plain_update(parameters, x, y):
        _, grads = jax.value_and_grad(mean_loss)(parameters, x, y)
        return jax.tree_util.tree_map(lambda p, g: p - 0.01 * g, parameters, grads)

    state = {"plain": jax_parameters(model_name)}

    def plain_step():
        state["plain"] = jax.block_until_ready(plain_update(state["plain"], inputs, targets))

    steps = {"plain": plain_step}
    batch = {"x": inputs, "y": targets}

    def cabs_step_for(method: str):
        stats_function = cabs_jax.StatsFunction(example_loss, buckets="exact", method=method)
        controller = cabs.Controller(learning_rate=0.01)
        state[method] = jax_parameters(model_name)

        def cabs_step():
            stats, grads = stats_function(state[method], batch)
            controller.step(stats)
            state[method] = jax.block_until_ready(update(state[method], grads))

        return cabs_step

    steps["layerwise"] = cabs_step_for("layerwise")
    steps["vmap"] = cabs_step_for("vmap")
    return steps


def keras_model(name: str):
    """The benchmark models in Keras (channels last), He-initialised like the others."""
    import keras

    keras.utils.set_random_seed(0)
    layers = keras.layers
    if name == "mlp":
        stack = [keras.Input((784,)), layers.Dense(1024, activation="relu"), layers.Dense(1024, activation="relu")]
    else:
        stack = [
            keras.Input((28, 28, 1)),
            layers.Conv2D(32, 5, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Conv2D(64, 5, padding="same", activation="relu"),
            layers.MaxPooling2D(2),
            layers.Flatten(),
            layers.Dense(1024, activation="relu"),
        ]
    return keras.Sequential([*stack, layers.Dense(10)])


def make_tensorflow_steps(model_name: str, batch_size: int) -> dict[str, Callable[[], None]]:
    """Plain step: ``tape.gradient`` of the mean loss and the SGD update in one ``tf.function``.

    CABS step: :func:`cabs.backends.tensorflow.stats_function` with the method, ``Controller.step``
    and the same update as a ``tf.function``.
    """
    import keras
    import tensorflow as tf

    import cabs
    from cabs.backends import tensorflow as cabs_tf

    numpy_inputs, numpy_targets = numpy_batch(model_name, batch_size)
    inputs, targets = tf.constant(numpy_inputs), tf.constant(numpy_targets)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)

    def sgd_update(variables, grads):
        for variable, grad in zip(variables, grads, strict=True):
            variable.assign_sub(0.01 * grad)

    plain_model = keras_model(model_name)

    @tf.function
    def plain_step_function(x, y):
        with tf.GradientTape() as tape:
            loss = tf.reduce_mean(loss_fn(y, plain_model(x, training=True)))
        sgd_update(plain_model.trainable_variables, tape.gradient(loss, plain_model.trainable_variables))

    def plain_step():
        plain_step_function(inputs, targets)
        plain_model.trainable_variables[0].numpy()  # wait for the update

    steps = {"plain": plain_step}

    def cabs_step_for(method: str):
        model = keras_model(model_name)
        stats_function = cabs_tf.stats_function(model, loss_fn, method=method)
        update = tf.function(lambda grads: sgd_update(model.trainable_variables, grads))
        controller = cabs.Controller(learning_rate=0.01)

        def cabs_step():
            stats, grads = stats_function(inputs, targets)
            controller.step(stats)
            update(grads)
            model.trainable_variables[0].numpy()

        return cabs_step

    steps["layerwise"] = cabs_step_for("layerwise")
    steps["vmap"] = cabs_step_for("vmap")
    return steps


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        import torch

        torch.cuda.synchronize()


def time_methods(
    model_name: str, batch_size: int, device: str, repeats: int, methods: list[str], backend: str = "torch"
) -> dict:
    """Median seconds per step of each method, the methods interleaved within each repetition."""
    steps = {key: value for key, value in make_steps(model_name, batch_size, device, backend).items() if key in methods}
    for step in steps.values():  # warm-up: first-call allocations, lazy initialisation, compiling or tracing
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


def measure_memory(model_name: str, batch_size: int, device: str, method: str, backend: str = "torch") -> int | None:
    """Peak extra memory of one step (bytes), in a fresh process.

    PyTorch: the first step, over the model and data alone. JAX and TensorFlow: the second
    step, so that compiling or tracing (which the first call does) is not counted.
    """
    steps = make_steps(model_name, batch_size, device, backend)
    if method not in steps:
        return None
    step = steps[method]
    if backend != "torch":
        step()
        gc.collect()
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


def memory_in_fresh_process(
    model_name: str, batch_size: int, device: str, method: str, backend: str = "torch", threads: int | None = None
) -> int | None:
    command = [sys.executable, __file__, "--measure-memory", model_name, str(batch_size), method, "--device", device]
    command += ["--backend", backend] + (["--threads", str(threads)] if threads else [])
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


def machine_description(device: str, backend: str = "torch") -> str:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as cpuinfo:
            cpu = next(line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    parts = [
        f"{platform.system()} {platform.machine()}, CPU {cpu}, {os.cpu_count()} logical cores",
        f"Python {platform.python_version()}, {framework_description(backend)}",
        "load average at start {:.2f} {:.2f} {:.2f}".format(*os.getloadavg()),
    ]
    if backend == "torch":
        import torch

        parts.insert(
            2, f"device {device}" + (f" ({torch.cuda.get_device_name(device)})" if device.startswith("cuda") else "")
        )
    else:
        return "; ".join(parts)
    try:
        import opacus

        parts.append(f"opacus {opacus.__version__}")
    except ImportError:
        parts.append("opacus not installed (no side-by-side row)")
    return "; ".join(parts)


def framework_description(backend: str) -> str:
    """The framework's version and how many threads it computes with."""
    if backend == "jax":
        import jax

        threads = "1 thread (XLA_FLAGS)" if "intra_op_parallelism_threads=1" in os.environ.get("XLA_FLAGS", "") else ""
        return f"jax {jax.__version__}, devices {jax.devices()}" + (f", {threads}" if threads else "")
    if backend == "tensorflow":
        import tensorflow as tf

        threads = tf.config.threading.get_intra_op_parallelism_threads() or "default"
        return f"tensorflow {tf.__version__}, intra-op threads {threads}"
    import torch

    return f"torch {torch.__version__}, {torch.get_num_threads()} intra-op threads"


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
    parser.add_argument(
        "--backend",
        default="torch",
        choices=[*BACKENDS, "all"],
        help="framework to measure; 'all' runs each in its own process, one after another",
    )
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


def set_threads(backend: str, threads: int | None) -> None:
    """Limit the framework to ``threads`` intra-op threads (steadier timings on a shared machine)."""
    if not threads:
        return
    if backend == "jax":
        # Read when the XLA CPU client starts, so it must be set before the first computation.
        flags = (
            f"--xla_cpu_multi_thread_eigen={'true' if threads > 1 else 'false'} intra_op_parallelism_threads={threads}"
        )
        os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {flags}".strip()
    elif backend == "tensorflow":
        import tensorflow as tf  # torch was imported first, by the --device default

        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    else:
        import torch

        torch.set_num_threads(threads)


def run_each_backend(argv: list[str], output: str | None) -> None:
    """``--backend all``: one fresh process per backend (torch must be imported before tensorflow)."""
    parts = []
    for backend in BACKENDS:
        command = [sys.executable, __file__, *replace_option(argv, "--backend", backend)]
        command = replace_option(command, "--output", None)
        result = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
        parts.append(f"### {backend}\n\n{result.stdout.strip()}\n")
    text = "\n".join(parts)
    print(text)
    if output:
        with open(output, "w") as file:
            file.write(text)


def replace_option(argv: list[str], option: str, value: str | None) -> list[str]:
    """``argv`` without ``option`` (and its value), then with ``option value`` if value is not None."""
    kept, skip = [], False
    for item in argv:
        if skip:
            skip = False
        elif item == option:
            skip = True
        elif not item.startswith(option + "="):
            kept.append(item)
    return kept if value is None else [*kept, option, value]


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def main(argv: list[str] | None = None) -> None:
    arguments = parse_arguments(argv)
    if arguments.backend == "all":
        run_each_backend(sys.argv[1:] if argv is None else argv, arguments.output)
        return
    if arguments.backend == "tensorflow":
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
        os.environ.setdefault("KERAS_HOME", tempfile.mkdtemp(prefix="keras-home-"))
    set_threads(arguments.backend, arguments.threads)
    if arguments.measure_memory:
        model_name, batch, method = arguments.measure_memory
        measured = measure_memory(model_name, int(batch), arguments.device, method, arguments.backend)
        print(json.dumps({"bytes": measured}))
        return
    description = machine_description(arguments.device, arguments.backend)
    print(description, file=sys.stderr)
    results = []
    for model_name in arguments.models:
        for batch_size in arguments.batch_sizes:
            methods = ["plain", *[method for method in arguments.methods if method != "plain"]]
            if arguments.backend != "torch":
                methods = [method for method in methods if method != "opacus"]  # a PyTorch library
            if batch_size > arguments.reference_max_batch:
                methods = [method for method in methods if method in ("plain", "layerwise")]
            row = {"model": model_name, "batch": batch_size, "memory": {}}
            row["time"] = time_methods(
                model_name, batch_size, arguments.device, arguments.repeats, methods, arguments.backend
            )
            if not arguments.no_memory:
                for method in row["time"]:
                    row["memory"][method] = memory_in_fresh_process(
                        model_name, batch_size, arguments.device, method, arguments.backend, arguments.threads
                    )
            print(json.dumps(row), file=sys.stderr, flush=True)
            results.append(row)
    memory_note = "peak extra memory of one step in a fresh process: " + (
        "torch.cuda.max_memory_allocated"
        if arguments.device.startswith("cuda") and arguments.backend == "torch"
        else "growth of the peak resident set size (VmHWM reset before the step, minus VmRSS before it)"
    )
    if arguments.backend != "torch":
        memory_note += " of the second step (the first compiles or traces)"
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
    if arguments.profile and arguments.backend == "torch":
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
