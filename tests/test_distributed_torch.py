"""Data-parallel torch statistics: 2 gloo processes against one process on the same global batches.

One spawn of two workers runs every distributed scenario and saves what it saw; the
tests compare it with a single-process run here. Float64 throughout, so the only
differences are the order of the sums (rtol 1e-12).
"""

from __future__ import annotations

import datetime
import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as torch_multiprocessing  # noqa: E402

import cabs  # noqa: E402
from cabs.backends import torch as cabs_torch  # noqa: E402
from cabs.data import BatchSampler, DistributedBatchSampler  # noqa: E402

WORLD_SIZE = 2
NUM_EXAMPLES = 37
STEPS = 50
LEARNING_RATE = 0.2
# A small scale and quick smoothing make the batch size move (odd and even, 3 to about 30) within 50 steps.
CONTROLLER_OPTIONS = {
    "min_batch_size": 1,
    "max_batch_size": 40,
    "initial_batch_size": 3,
    "scale": 20.0,
    "smoothing": 0.5,
}
SEED = 4
RTOL = 1e-12
# Global batches of the one-shot checks: smaller than the world (one worker holds nothing),
# odd (uneven shares) and even.
ONE_SHOT_SIZES = (1, 7, 12)


def make_data() -> tuple[torch.Tensor, torch.Tensor]:
    rng = np.random.default_rng(0)
    return torch.tensor(rng.normal(size=(NUM_EXAMPLES, 3))), torch.tensor(rng.normal(size=(NUM_EXAMPLES, 2)))


def make_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.Tanh(), torch.nn.Linear(5, 2)).double()


def squared_error(outputs: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    return (outputs - targets).pow(2).mean(1)


def as_numbers(stats: cabs.GradStats) -> list[float]:
    return [float(stats.count), float(stats.loss), float(stats.grad_sq_norm), float(stats.sq_norm_sum)]


def gradients(model: torch.nn.Module) -> list[np.ndarray]:
    return [parameter.grad.detach().numpy().copy() for parameter in model.parameters()]


def parameters(model: torch.nn.Module) -> list[np.ndarray]:
    return [parameter.detach().numpy().copy() for parameter in model.parameters()]


def train(model: torch.nn.Module, make_sampler, process_group=None) -> dict:
    """50 CABS steps; ``make_sampler(controller)`` gives this process's batches."""
    inputs, targets = make_data()
    controller = cabs.Controller(learning_rate=LEARNING_RATE, **CONTROLLER_OPTIONS)
    sampler = make_sampler(controller)
    optimizer = torch.optim.SGD(model.parameters(), lr=LEARNING_RATE)
    record = {"stats": [], "batch_sizes": [], "local_sizes": []}
    for _ in range(STEPS):
        record["batch_sizes"].append(controller.batch_size)
        if process_group is not None:
            cabs_torch.agree_batch_size(controller.batch_size, process_group=process_group)
        indices = torch.tensor(next(sampler), dtype=torch.long)
        record["local_sizes"].append(len(indices))
        stats = cabs_torch.grad_stats(model, squared_error, inputs[indices], targets[indices])
        record["stats"].append(as_numbers(stats))
        controller.step(stats)
        optimizer.step()
    record["parameters"] = parameters(model)
    record["sampler_state"] = sampler.state_dict()
    return record


def one_shot_batch(size: int) -> np.ndarray:
    """The global batch of ``size`` examples used by the one-shot checks."""
    return BatchSampler(NUM_EXAMPLES, size, seed=SEED + size).draw(size)


def worker_share(size: int, rank: int) -> torch.Tensor:
    sampler = DistributedBatchSampler(NUM_EXAMPLES, size, rank=rank, world_size=WORLD_SIZE, seed=SEED + size)
    return torch.tensor(next(sampler), dtype=torch.long)


def run_worker(rank: int, init_file: str, out_dir: str) -> None:
    """One data-parallel process: every scenario, results pickled to ``out_dir``."""
    torch.set_num_threads(1)
    dist.init_process_group(
        "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=WORLD_SIZE,
        timeout=datetime.timedelta(seconds=120),
    )
    try:
        inputs, targets = make_data()
        result = {}
        # A plain module reduced over the default group, for global batches of every kind.
        for size in ONE_SHOT_SIZES:
            model = make_model()
            share = worker_share(size, rank)
            stats = cabs_torch.grad_stats(
                model, squared_error, inputs[share], targets[share], process_group=dist.group.WORLD
            )
            result[f"plain_{size}"] = {"stats": as_numbers(stats), "grads": gradients(model), "local": len(share)}
        # Micro-batches inside DDP's no_sync, reduced once.
        ddp_model = torch.nn.parallel.DistributedDataParallel(make_model())
        share = worker_share(ONE_SHOT_SIZES[-1], rank)
        accumulator = cabs_torch.StatsAccumulator(ddp_model)
        with ddp_model.no_sync():
            for piece in (share[:1], share[1:4], share[4:4], share[4:]):
                accumulator.add(squared_error, inputs[piece], targets[piece], chunk_size=2)
        stats = accumulator.reduce()
        result["accumulated"] = {"stats": as_numbers(stats), "grads": gradients(ddp_model.module)}
        # CABS training with a DDP model and the distributed sampler.
        result["train"] = train(
            torch.nn.parallel.DistributedDataParallel(make_model()),
            lambda controller: DistributedBatchSampler(
                NUM_EXAMPLES, controller, rank=rank, world_size=WORLD_SIZE, seed=SEED
            ),
            process_group=dist.group.WORLD,
        )
        # The agreement check: first agreeing ranks, then a deliberate mismatch on every rank.
        result["agreed"] = cabs_torch.agree_batch_size(9)
        try:
            cabs_torch.agree_batch_size(10 + rank)
            result["disagreement"] = None
        except RuntimeError as error:
            result["disagreement"] = str(error)
        with open(os.path.join(out_dir, f"rank{rank}.pkl"), "wb") as file:
            pickle.dump(result, file)
    finally:
        dist.destroy_process_group()


@pytest.fixture(scope="module")
def workers(tmp_path_factory) -> list[dict]:
    folder = tmp_path_factory.mktemp("distributed")
    torch_multiprocessing.spawn(run_worker, args=(str(folder / "init"), str(folder)), nprocs=WORLD_SIZE, join=True)
    results = []
    for rank in range(WORLD_SIZE):
        with open(folder / f"rank{rank}.pkl", "rb") as file:
            results.append(pickle.load(file))
    return results


def single_process_stats(size: int) -> tuple[list[float], list[np.ndarray]]:
    inputs, targets = make_data()
    model = make_model()
    batch = torch.tensor(one_shot_batch(size), dtype=torch.long)
    stats = cabs_torch.grad_stats(model, squared_error, inputs[batch], targets[batch])
    return as_numbers(stats), gradients(model)


def per_example_loop_stats(size: int) -> list[float]:
    """The oracle: a backward pass per example, summed in NumPy float64."""
    inputs, targets = make_data()
    model = make_model()
    losses, example_grads = [], []
    for index in one_shot_batch(size):
        model.zero_grad()
        loss = squared_error(model(inputs[index : index + 1]), targets[index : index + 1]).sum()
        loss.backward()
        losses.append(loss.item())
        example_grads.append(np.concatenate([parameter.grad.numpy().ravel() for parameter in model.parameters()]))
    example_grads = np.array(example_grads)
    mean_grad = example_grads.mean(0)
    return [size, float(np.mean(losses)), float(mean_grad @ mean_grad), float((example_grads**2).sum())]


@pytest.mark.parametrize("size", ONE_SHOT_SIZES)
def test_plain_module_in_a_group_gives_the_global_batch_statistics(workers, size):
    expected_stats, expected_grads = single_process_stats(size)
    np.testing.assert_allclose(expected_stats, per_example_loop_stats(size), rtol=1e-10)
    shares = [worker[f"plain_{size}"]["local"] for worker in workers]
    assert sum(shares) == size and max(shares) - min(shares) <= 1
    for worker in workers:
        np.testing.assert_allclose(worker[f"plain_{size}"]["stats"], expected_stats, rtol=RTOL)
        for actual, expected in zip(worker[f"plain_{size}"]["grads"], expected_grads, strict=True):
            np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=1e-15)


def test_a_global_batch_smaller_than_the_world_leaves_a_worker_empty(workers):
    assert sorted(worker["plain_1"]["local"] for worker in workers) == [0, 1]


def test_micro_batches_under_no_sync_reduce_to_the_whole_batch(workers):
    expected_stats, expected_grads = single_process_stats(ONE_SHOT_SIZES[-1])
    for worker in workers:
        np.testing.assert_allclose(worker["accumulated"]["stats"], expected_stats, rtol=RTOL)
        for actual, expected in zip(worker["accumulated"]["grads"], expected_grads, strict=True):
            np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=1e-15)


@pytest.fixture(scope="module")
def single_process_training() -> dict:
    return train(make_model(), lambda controller: BatchSampler(NUM_EXAMPLES, controller, seed=SEED))


def test_ddp_training_matches_one_process_step_for_step(workers, single_process_training):
    expected = single_process_training
    sizes = expected["batch_sizes"]
    # The run must cover uneven splits and a changing batch size to test anything.
    assert any(size % WORLD_SIZE for size in sizes) and len(set(sizes)) > 5
    for worker in workers:
        assert worker["train"]["batch_sizes"] == sizes
        np.testing.assert_allclose(worker["train"]["stats"], expected["stats"], rtol=RTOL)
        for actual, reference in zip(worker["train"]["parameters"], expected["parameters"], strict=True):
            np.testing.assert_allclose(actual, reference, rtol=RTOL)
        assert worker["train"]["sampler_state"] == expected["sampler_state"]
    local_sizes = np.array([worker["train"]["local_sizes"] for worker in workers])
    assert list(local_sizes.sum(0)) == [int(stats[0]) for stats in expected["stats"]]
    assert np.abs(local_sizes[0] - local_sizes[1]).max() <= 1


def test_agreement_check_passes_when_equal_and_fails_loudly_on_every_rank(workers):
    assert [worker["agreed"] for worker in workers] == [9, 9]
    for rank, worker in enumerate(workers):
        message = worker["disagreement"]
        assert message is not None, f"rank {rank} did not raise"
        assert "rank 0 has 10" in message and "rank 1 has 11" in message
        assert f"this is rank {rank}, with {10 + rank}" in message


def test_single_process_errors_are_clear():
    with pytest.raises(RuntimeError, match="not initialised"):
        cabs_torch.agree_batch_size(4)
    with pytest.raises(RuntimeError, match="torch.distributed is not initialised"):
        cabs_torch.grad_stats(make_model(), squared_error, *make_data(), process_group=object())


def test_accumulator_without_a_group_sums_micro_batches_and_refuses_an_empty_batch():
    inputs, targets = make_data()
    model = make_model()
    accumulator = cabs_torch.StatsAccumulator(model)
    accumulator.add(squared_error, inputs[:10], targets[:10])
    accumulator.add(squared_error, inputs[10:], targets[10:])
    combined = as_numbers(accumulator.reduce())
    whole_model = make_model()
    whole = as_numbers(cabs_torch.grad_stats(whole_model, squared_error, inputs, targets))
    np.testing.assert_allclose(combined, whole, rtol=RTOL)
    for actual, expected in zip(gradients(model), gradients(whole_model), strict=True):
        np.testing.assert_allclose(actual, expected, rtol=RTOL, atol=1e-15)
    accumulator.add(squared_error, inputs[:0], targets[:0])
    with pytest.raises(ValueError, match="at least one example, got m=0 on every worker"):
        accumulator.reduce()


def test_the_guide_script_runs_under_torchrun(tmp_path):
    guide = (Path(__file__).resolve().parent.parent / "docs" / "distributed.md").read_text()
    (script,) = re.findall(r"^```python no-run\n(# train_ddp\.py.*?)^```", guide, re.S | re.M)
    (tmp_path / "train_ddp.py").write_text(script)
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "train_ddp.py"]
    finished = subprocess.run(command, cwd=tmp_path, env=environment, capture_output=True, text=True, timeout=300)
    assert finished.returncode == 0, finished.stderr[-4000:]
    lines = [line for line in finished.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 0", "step 20", "step 40", "step 60", "step 80"]
    checkpoint = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    assert set(checkpoint) == {"model", "optimizer", "controller", "sampler"}
    assert checkpoint["sampler"]["examples_seen"] >= 100 * 16  # 100 steps of at least the minimum batch size
