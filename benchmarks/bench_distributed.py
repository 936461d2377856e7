"""Step time with CABS statistics vs a plain gradient step, data-parallel, per framework.

One run measures all three frameworks, each in a fresh process (the device set-up must
precede the framework's start): PyTorch with 2 gloo processes (the statistics of a
``DistributedDataParallel`` model vs DDP's own backward), JAX on 4 host devices (the
sharded ``StatsFunction`` vs a jitted sharded gradient of the mean loss) and TensorFlow
on 4 logical CPU devices (``distributed_batch_sums`` with and without statistics). The
model is the same small MLP (40 -> 256 -> 256 -> 10) on random data, the global batch
256. Both variants of a framework run interleaved in the same process, so a busy
machine slows them alike; the ratio is the figure to read. Prints a Markdown table.

Usage: ``python benchmarks/bench_distributed.py [--steps 40] [--batch 256]``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

FEATURES, HIDDEN, CLASSES = 40, 256, 10
DEVICES = {"torch": 2, "jax": 4, "tensorflow": 4}


def _data(batch: int):
    import numpy as np

    generator = np.random.default_rng(0)
    inputs = generator.normal(size=(batch, FEATURES)).astype(np.float32)
    return inputs, generator.integers(0, CLASSES, size=batch)


def _timed(functions: dict, steps: int) -> dict[str, float]:
    """Median seconds per call of each function, the functions alternating step by step."""
    times: dict[str, list[float]] = {name: [] for name in functions}
    for step in range(steps + 5):
        for name, function in functions.items():
            start = time.perf_counter()
            function()
            if step >= 5:  # the first calls compile or warm caches
                times[name].append(time.perf_counter() - start)
    return {name: statistics.median(values) for name, values in times.items()}


def _torch_worker(rank: int, world_size: int, port: int, steps: int, batch: int, queue) -> None:
    import torch
    import torch.distributed as dist

    from cabs.backends import torch as cabs_torch
    from cabs.data import shard_bounds

    torch.set_num_threads(1)  # 2 processes on 2 cores: more threads would oversubscribe them, in both steps
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size)
    torch.manual_seed(0)
    layers = [torch.nn.Linear(FEATURES, HIDDEN), torch.nn.ReLU(), torch.nn.Linear(HIDDEN, HIDDEN), torch.nn.ReLU()]
    model = torch.nn.parallel.DistributedDataParallel(torch.nn.Sequential(*layers, torch.nn.Linear(HIDDEN, CLASSES)))
    inputs, labels = _data(batch)
    start, stop = shard_bounds(batch, rank, world_size)
    x, y = torch.from_numpy(inputs[start:stop]), torch.from_numpy(labels[start:stop])
    loss_fn = torch.nn.CrossEntropyLoss(reduction="none")

    def plain() -> None:
        model.zero_grad()
        loss_fn(model(x), y).mean().backward()  # DDP all-reduces the gradient

    def with_statistics() -> None:
        cabs_torch.grad_stats(model, loss_fn, x, y, method="auto")  # layer-wise norms for Linear

    result = _timed({"plain": plain, "stats": with_statistics}, steps)
    dist.destroy_process_group()
    if rank == 0:
        queue.put(result)


def measure_torch(steps: int, batch: int) -> dict[str, float]:
    import socket

    import torch.multiprocessing as multiprocessing

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    context = multiprocessing.get_context("spawn")
    queue = context.Queue()
    workers = [
        context.Process(target=_torch_worker, args=(rank, DEVICES["torch"], port, steps, batch, queue))
        for rank in range(DEVICES["torch"])
    ]
    for worker in workers:
        worker.start()
    result = queue.get(timeout=600)
    for worker in workers:
        worker.join()
    return result


def measure_jax(steps: int, batch: int) -> dict[str, float]:
    os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={DEVICES['jax']}"
    import jax
    import jax.numpy as jnp
    import numpy as np
    from jax.sharding import NamedSharding, PartitionSpec

    from cabs.backends import jax as cabs_jax

    mesh = cabs_jax.data_mesh(jax.devices()[: DEVICES["jax"]])
    generator = np.random.default_rng(0)
    sizes = [(FEATURES, HIDDEN), (HIDDEN, HIDDEN), (HIDDEN, CLASSES)]
    params = [
        {"w": jnp.asarray(generator.normal(size=size).astype(np.float32) / np.sqrt(size[0])), "b": jnp.zeros(size[1])}
        for size in sizes
    ]
    params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))

    def logits(params, x):
        for layer in params[:-1]:
            x = jax.nn.relu(x @ layer["w"] + layer["b"])
        return x @ params[-1]["w"] + params[-1]["b"]

    def example_loss(params, example):
        return -jax.nn.log_softmax(logits(params, example["x"][None]))[0, example["y"]]

    inputs, labels = _data(batch)
    batch_arrays = {"x": inputs, "y": labels.astype(np.int32)}
    sharded = jax.device_put(batch_arrays, NamedSharding(mesh, PartitionSpec("data")))
    stats_function = cabs_jax.StatsFunction(example_loss, max_batch_size=batch, mesh=mesh)
    mean_loss = jax.jit(jax.grad(lambda params, b: jax.vmap(example_loss, (None, 0))(params, b).mean()))

    def plain() -> None:
        jax.block_until_ready(mean_loss(params, sharded))

    def with_statistics() -> None:
        jax.block_until_ready(stats_function(params, batch_arrays))

    return _timed({"plain": plain, "stats": with_statistics}, steps)


def measure_tensorflow(steps: int, batch: int) -> dict[str, float]:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * DEVICES["tensorflow"])
    import keras

    from cabs.backends import tensorflow as cabs_tf

    strategy = tf.distribute.MirroredStrategy()
    with strategy.scope():
        keras.utils.set_random_seed(0)
        model = keras.Sequential(
            [
                keras.Input((FEATURES,)),
                keras.layers.Dense(HIDDEN, activation="relu"),
                keras.layers.Dense(HIDDEN, activation="relu"),
                keras.layers.Dense(CLASSES),
            ]
        )
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
    function = cabs_tf.stats_function(model, loss_fn)
    inputs, labels = _data(batch)
    x = cabs_tf.split_across_replicas(strategy, inputs)
    y = cabs_tf.split_across_replicas(strategy, labels)

    @tf.function
    def plain_step(x, y):
        return function.finish(function.distributed_batch_sums(strategy, x, y, compute_stats=False))

    @tf.function
    def stats_step(x, y):
        return function.finish(function.distributed_batch_sums(strategy, x, y))

    return _timed(
        {"plain": lambda: plain_step(x, y)[1][0].numpy(), "stats": lambda: stats_step(x, y)[1][0].numpy()}, steps
    )


MEASURE = {"torch": measure_torch, "jax": measure_jax, "tensorflow": measure_tensorflow}
SETUP = {
    "torch": "2 gloo processes (DDP)",
    "jax": "4 host devices (data mesh)",
    "tensorflow": "4 logical CPUs (MirroredStrategy)",
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--framework", choices=MEASURE, help=argparse.SUPPRESS)  # one measurement, as a child
    arguments = parser.parse_args()
    if arguments.framework:
        print(json.dumps(MEASURE[arguments.framework](arguments.steps, arguments.batch)))
        return
    print(
        f"Global batch {arguments.batch}, MLP {FEATURES}-{HIDDEN}-{HIDDEN}-{CLASSES}, median of {arguments.steps} steps.\n"
    )
    print("| framework | workers | plain step (ms) | with statistics (ms) | ratio |")
    print("|---|---|---:|---:|---:|")
    for framework in MEASURE:
        command = [sys.executable, __file__, "--framework", framework, "--steps", str(arguments.steps)]
        command += ["--batch", str(arguments.batch)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        result = json.loads(output.strip().splitlines()[-1])
        plain, stats = result["plain"] * 1e3, result["stats"] * 1e3
        print(f"| {framework} | {SETUP[framework]} | {plain:.2f} | {stats:.2f} | {stats / plain:.2f} |", flush=True)


if __name__ == "__main__":
    main()
