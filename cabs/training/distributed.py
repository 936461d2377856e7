"""Data-parallel set-up of ``cabs train``: which workers run, what the task needs, who writes.

Three ways to run one training step on several devices, one per framework:

- **PyTorch**: one process per worker, started by ``torchrun`` (detected from the
  ``RANK``/``WORLD_SIZE``/``LOCAL_RANK`` variables it sets). Each process joins the default
  process group (gloo: the PyTorch task runs on the CPU), draws its share of every global
  batch (:class:`cabs.data.DistributedBatchSampler`) and reduces the statistics over the
  group. Rank 0 writes the files.
- **JAX** (``--devices N``): one process, the global batch sharded over a data mesh of the
  first N devices. On a CPU the N devices are host devices, which XLA creates only when
  ``XLA_FLAGS`` asks for them before JAX is imported (:func:`prepare_process`).
- **TensorFlow** (``--devices N``): one process, a ``MirroredStrategy`` over the first N
  GPUs or, without GPUs, over N logical CPU devices configured before TensorFlow's first op.

Every worker runs its own controller on the same reduced statistics, so all of them choose
the same batch size; ``--check-agreement`` verifies it after each step with the
framework's ``agree_batch_size`` (a tiny all-gather), which fails loudly on a mismatch.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from collections.abc import Callable
from typing import Any

from cabs.data import BatchSampler, DistributedBatchSampler

__all__ = ["TORCHRUN_VARIABLES", "Workers", "prepare_process", "setup"]

# torchrun (torch.distributed.run) sets these in every worker process.
TORCHRUN_VARIABLES = ("RANK", "WORLD_SIZE", "LOCAL_RANK")
_HOST_DEVICE_FLAG = "--xla_force_host_platform_device_count"


@dataclasses.dataclass
class Workers:
    """Who takes part in a run and how; one worker and no communication by default.

    Attributes:
        rank: this process's index among the processes (0 writes the files).
        world_size: the number of processes that each draw a share of the global batch.
        devices: the number of devices the global batch is split over (processes or devices).
        kind: what splits the batch, in words (for the summary).
        task_options: keyword arguments for the task's constructor (process group, mesh, strategy).
        agree: checks that every worker computed the same batch size; returns it.
        close: releases the workers' resources (the process group) at the end of the run.
        check_agreement: call ``agree`` after every step (``--check-agreement``, for debugging).
    """

    rank: int = 0
    world_size: int = 1
    devices: int = 1
    kind: str = "one device"
    task_options: dict[str, Any] = dataclasses.field(default_factory=dict)
    agree: Callable[[int], int] = int
    close: Callable[[], None] = lambda: None
    check_agreement: bool = False

    @property
    def main(self) -> bool:
        """True on the worker that shows progress and writes the files."""
        return self.rank == 0

    def sampler(self, num_examples: int, controller: Any, *, seed: int, epochs: int | None) -> BatchSampler:
        """The batch sampler of this worker: the whole global batches, or its share of them."""
        if self.world_size == 1:
            return BatchSampler(num_examples, controller, seed=seed, epochs=epochs)
        return DistributedBatchSampler(
            num_examples, controller, rank=self.rank, world_size=self.world_size, seed=seed, epochs=epochs
        )

    def global_batch_size(self, sampler: BatchSampler, indices: Any) -> int:
        """The size of the global batch whose share ``indices`` the sampler just drew."""
        if isinstance(sampler, DistributedBatchSampler):
            return sampler.last_global_batch_size
        return len(indices)

    def check(self, batch_size: int) -> None:
        """With ``check_agreement``: raise RuntimeError unless every worker has this next batch size."""
        if self.check_agreement:
            self.agree(batch_size)

    def summary(self) -> dict[str, Any]:
        """The entries of ``summary.json`` that describe the workers."""
        return {"kind": self.kind, "devices": self.devices, "processes": self.world_size}


def launched_by_torchrun() -> bool:
    """True in a process started by ``torchrun`` with more than one worker."""
    return all(name in os.environ for name in TORCHRUN_VARIABLES) and int(os.environ["WORLD_SIZE"]) > 1


def prepare_process(backend: str, devices: int | None) -> None:
    """Ask XLA for ``devices`` host devices before JAX is imported (a no-op otherwise).

    XLA reads ``XLA_FLAGS`` once, when JAX starts; the CLI calls this before anything
    imports JAX. A program that has imported JAX already keeps its devices, and
    :func:`setup` says so if they are too few. A device count already in ``XLA_FLAGS`` is kept.
    """
    if backend != "jax" or devices is None or "jax" in sys.modules:
        return
    flags = os.environ.get("XLA_FLAGS", "")
    if _HOST_DEVICE_FLAG not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} {_HOST_DEVICE_FLAG}={devices}".strip()


def setup(backend: str, devices: int | None) -> Workers:
    """Start the workers of a run: join torchrun's process group, or build a JAX mesh or TF strategy.

    Args:
        backend: ``"torch"``, ``"jax"`` or ``"tensorflow"``.
        devices: ``--devices``: split each batch over this many devices (JAX, TensorFlow);
            None runs on one device, or on torchrun's processes for PyTorch.

    Raises:
        ValueError: a device count with PyTorch, torchrun with another backend, or more
            devices than there are.
    """
    if launched_by_torchrun():
        if backend != "torch":
            raise ValueError(
                f"torchrun starts PyTorch workers, got backend={backend!r} under torchrun "
                f"(WORLD_SIZE={os.environ['WORLD_SIZE']}). Start JAX and TensorFlow runs with plain "
                f"`cabs train --devices N` instead."
            )
        if devices is not None:
            raise ValueError(
                f"`devices` is for JAX and TensorFlow, got devices={devices} under torchrun. "
                f"torchrun's --nproc_per_node sets the number of PyTorch workers; leave --devices out."
            )
        return _torch_workers()
    if devices is None:
        return Workers()
    if backend == "torch":
        raise ValueError(
            f"`devices` is for JAX and TensorFlow, got devices={devices} with backend='torch'. "
            f"Run PyTorch on N processes with `torchrun --standalone --nproc_per_node=N -m cabs train`."
        )
    if backend == "jax":
        return _jax_workers(devices)
    return _tensorflow_workers(devices)


def _torch_workers() -> Workers:
    import torch.distributed as dist

    from cabs.backends import torch as cabs_torch

    started_here = not dist.is_initialized()
    if started_here:
        # The PyTorch task keeps the network on the CPU, so gloo moves its tensors
        # (NCCL would need them on the GPU). torchrun's variables name the rendezvous.
        dist.init_process_group(backend="gloo")
    world_size = dist.get_world_size()

    def close() -> None:
        if started_here and dist.is_initialized():
            dist.destroy_process_group()

    return Workers(
        rank=dist.get_rank(),
        world_size=world_size,
        devices=world_size,
        kind=f"torch.distributed ({dist.get_backend()}), {world_size} processes",
        task_options={"process_group": dist.group.WORLD},
        agree=cabs_torch.agree_batch_size,
        close=close,
    )


def _jax_workers(devices: int) -> Workers:
    import jax

    from cabs.backends import jax as cabs_jax

    available = jax.devices()
    if len(available) < devices:
        raise ValueError(
            f"`devices` must be at most the number of JAX devices ({len(available)} here: "
            f"{', '.join(str(device) for device in available)}), got devices={devices}. On a CPU, cabs train "
            f"asks for host devices through XLA_FLAGS={_HOST_DEVICE_FLAG}=N before JAX starts; that fails when "
            f"XLA_FLAGS already sets a smaller count or JAX was imported before."
        )
    chosen = available[:devices]
    return Workers(
        devices=devices,
        kind=f"JAX data mesh over {devices} {chosen[0].platform} devices",
        task_options={"mesh": cabs_jax.data_mesh(chosen)},
        agree=cabs_jax.agree_batch_size,
    )


def _tensorflow_workers(devices: int) -> Workers:
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    import tensorflow as tf

    from cabs.backends import tensorflow as cabs_tf

    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        if len(gpus) < devices:
            raise ValueError(
                f"`devices` must be at most the number of GPUs ({len(gpus)} here), got devices={devices}. "
                f"Pass --devices {len(gpus)} or fewer."
            )
        names = [f"/gpu:{index}" for index in range(devices)]
    else:
        names = [device.name for device in _logical_cpus(tf, devices)[:devices]]
    strategy = tf.distribute.MirroredStrategy(names)
    return Workers(
        devices=devices,
        kind=f"tf.distribute.MirroredStrategy over {devices} {'GPUs' if gpus else 'logical CPU devices'}",
        task_options={"strategy": strategy},
        agree=lambda batch_size: cabs_tf.agree_batch_size(batch_size, strategy=strategy),
    )


def _logical_cpus(tf: Any, count: int) -> list[Any]:
    """At least ``count`` logical CPU devices: split the CPU unless TensorFlow has started already."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    try:
        tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * count)
    except RuntimeError:
        pass  # TensorFlow ran an op already: its devices are fixed, use them if there are enough
    logical = tf.config.list_logical_devices("CPU")
    if len(logical) < count:
        raise ValueError(
            f"`devices` must be at most the number of logical CPU devices ({len(logical)} here), got "
            f"devices={count}. TensorFlow splits the CPU only before its first operation; start a fresh process."
        )
    return logical
