"""Data-parallel JAX statistics on 4 host devices against one device and a per-example loop.

tests/conftest.py asks XLA for 4 CPU host devices before JAX is imported; if JAX
was imported earlier with other flags, these tests skip and say why. The
reference is the same StatsFunction without a mesh (one device, one pass) and,
for the statistics, an explicit per-example loop in NumPy float64 with a
hand-derived gradient.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)

import jax.numpy as jnp  # noqa: E402

import cabs  # noqa: E402
from cabs import GradStats  # noqa: E402
from cabs.backends import jax as cabs_jax  # noqa: E402
from cabs.data import BatchSampler  # noqa: E402

DEVICE_COUNT = 4
pytestmark = pytest.mark.skipif(
    len(jax.devices()) != DEVICE_COUNT,
    reason=f"needs {DEVICE_COUNT} JAX devices, found {len(jax.devices())}: run under tests/conftest.py, which sets "
    f"XLA_FLAGS=--xla_force_host_platform_device_count={DEVICE_COUNT} before JAX is imported",
)
RTOL = 1e-12


def assert_close(actual, expected, rtol, what=""):
    """Max-norm comparison: entries are judged against the largest entry of ``expected``."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, what
    assert np.all(np.isfinite(actual)), what
    error = np.max(np.abs(actual - expected), initial=0.0)
    scale = np.max(np.abs(expected), initial=0.0)
    assert error <= rtol * scale + 1e-300, f"{what}: error {error:.3e} > rtol {rtol} * scale {scale:.3e}"


# --- the model: a tanh MLP classifier, its JAX loss and a NumPy gradient derived by hand --------


def loss_fn(params, example):
    hidden = jnp.tanh(example["x"] @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    return jax.nn.logsumexp(logits) - logits[example["y"]]


def numpy_loss_and_grad(params, x, label):
    hidden = np.tanh(x @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"] + params["b2"]
    shifted = logits - logits.max()
    probabilities = np.exp(shifted) / np.sum(np.exp(shifted))
    d_logits = probabilities.copy()
    d_logits[label] -= 1.0
    d_pre = (params["w2"] @ d_logits) * (1.0 - hidden**2)
    loss = float(np.log(np.sum(np.exp(shifted))) - shifted[label])
    return loss, {"w1": np.outer(x, d_pre), "b1": d_pre, "w2": np.outer(hidden, d_logits), "b2": d_logits}


def loop_statistics(params, batch):
    """One example at a time, NumPy float64 (DESIGN.md section 2)."""
    params = {key: np.asarray(value, dtype=np.float64) for key, value in params.items()}
    results = [numpy_loss_and_grad(params, x, int(y)) for x, y in zip(batch["x"], batch["y"], strict=True)]
    flat = np.stack([np.concatenate([grads[key].ravel() for key in params]) for _, grads in results])
    mean_grad = {key: np.mean([grads[key] for _, grads in results], axis=0) for key in params}
    return {
        "count": len(results),
        "loss": float(np.mean([loss for loss, _ in results])),
        "grad_sq_norm": float(np.sum(flat.mean(axis=0) ** 2)),
        "sq_norm_sum": float(np.sum(flat**2)),
        "mean_grad": mean_grad,
    }


def make_data(seed=0, count=384, features=6, hidden=8, classes=3):
    rng = np.random.default_rng(seed)
    params = {
        "w1": rng.normal(size=(features, hidden)) / np.sqrt(features),
        "b1": np.zeros(hidden),
        "w2": rng.normal(size=(hidden, classes)) / np.sqrt(hidden),
        "b2": np.zeros(classes),
    }
    inputs = rng.normal(size=(count, features))
    targets = np.argmax(inputs @ rng.normal(size=(features, classes)) + 0.5 * rng.normal(size=(count, classes)), 1)
    return params, inputs, targets


def assert_same_step(stats, mean_grad, reference_stats, reference_grad, what):
    assert int(stats.count) == int(reference_stats.count), what
    for field in ("loss", "grad_sq_norm", "sq_norm_sum"):
        assert_close(getattr(stats, field), getattr(reference_stats, field), RTOL, f"{what} {field}")
    for key in reference_grad:
        assert_close(mean_grad[key], reference_grad[key], RTOL, f"{what} mean_grad[{key}]")


# --- one step -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("count", "buckets", "max_examples_per_pass"), [(13, "pow2", None), (37, "exact", None), (37, "exact", 3)]
)
def test_sharded_statistics_equal_one_device_and_the_loop(count, buckets, max_examples_per_pass):
    params, inputs, targets = make_data()
    batch = {"x": inputs[:count], "y": targets[:count]}
    mesh = cabs_jax.data_mesh()
    sharded = cabs_jax.StatsFunction(loss_fn, buckets=buckets, mesh=mesh, max_examples_per_pass=max_examples_per_pass)
    # Padded to whole chunks on every device: 37 "exact" rows become 40 = 4 x 10 (or 4 x 4 x 3 = 48 in chunks of 3).
    padded_size = sharded.bucket_size(count)
    assert padded_size % (DEVICE_COUNT * sharded.chunk_size(count)) == 0 and padded_size >= count
    stats, mean_grad = sharded(params, batch)
    reference_stats, reference_grad = cabs_jax.StatsFunction(loss_fn, buckets=buckets)(params, batch)
    assert_same_step(stats, mean_grad, reference_stats, reference_grad, f"count={count}")

    expected = loop_statistics(params, batch)
    assert int(stats.count) == expected["count"]
    for field in ("loss", "grad_sq_norm", "sq_norm_sum"):
        assert_close(getattr(stats, field), expected[field], 1e-9, field)
    for key, value in expected["mean_grad"].items():
        assert_close(mean_grad[key], value, 1e-9, key)
    # The results are replicated: every device holds the statistics of the global batch.
    for value in (*stats, *mean_grad.values()):
        assert value.sharding.is_fully_replicated and len(value.sharding.device_set) == DEVICE_COUNT


def test_masked_batch_already_on_the_mesh_and_inside_a_jit():
    params, inputs, targets = make_data(seed=1)
    mesh = cabs_jax.data_mesh()
    stats_fn = cabs_jax.StatsFunction(loss_fn, mesh=mesh)
    count = 21
    padded, mask = stats_fn.pad({"x": inputs[:count], "y": targets[:count]})
    padded["x"][count:] = np.nan  # garbage in the padding reaches no statistic
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    padded, mask = jax.device_put((padded, mask), data)
    stats, mean_grad = jax.jit(stats_fn.masked)(params, padded, mask)
    reference = cabs_jax.StatsFunction(loss_fn)(params, {"x": inputs[:count], "y": targets[:count]})
    assert_same_step(stats, mean_grad, *reference, "masked")
    # 22 rows do not split over 4 devices: the layout adds two masked rows inside.
    stats_22, grad_22 = stats_fn.masked(params, {"x": inputs[:22], "y": targets[:22]}, np.arange(22) < count)
    assert_same_step(stats_22, grad_22, *reference, "22 rows")


# --- fifty CABS steps ---------------------------------------------------------------------------


def train(stats_fn, steps=50, seed=0):
    """CABS with plain SGD: the controller's batch size drives a BatchSampler; returns the record."""
    params, inputs, targets = make_data(seed=seed)
    learning_rate = 1.0
    # scale=8 lets the batch size grow from 5 to about 70 within the 50 steps.
    controller = cabs.Controller(learning_rate=learning_rate, min_batch_size=5, max_batch_size=96, scale=8.0)
    sampler = BatchSampler(len(inputs), batch_size=lambda: controller.batch_size, seed=seed)
    sgd = jax.jit(lambda params, grad: jax.tree.map(lambda p, g: p - learning_rate * g, params, grad))
    params = jax.tree.map(jnp.asarray, params)
    record = {"batch_sizes": [], "stats": [], "grads": []}
    for _ in range(steps):
        index = sampler.draw(controller.batch_size)
        record["batch_sizes"].append(len(index))
        stats, mean_grad = stats_fn(params, {"x": inputs[index], "y": targets[index]})
        params = sgd(params, mean_grad)
        controller.step(stats)
        record["stats"].append(stats)
        record["grads"].append(mean_grad)
    record["params"] = params
    return record


def test_fifty_cabs_steps_match_one_device():
    reference = train(cabs_jax.StatsFunction(loss_fn, max_batch_size=96))
    sizes = reference["batch_sizes"]
    # The run exercises what it should: moving sizes, several buckets, sizes that do not divide by 4.
    assert len(set(sizes)) >= 5 and any(size % DEVICE_COUNT for size in sizes)
    mesh = cabs_jax.data_mesh()
    for options in ({}, {"max_examples_per_pass": 4}):
        stats_fn = cabs_jax.StatsFunction(loss_fn, max_batch_size=96, mesh=mesh, **options)
        run = train(stats_fn)
        assert run["batch_sizes"] == sizes, options
        for step, (stats, reference_stats) in enumerate(zip(run["stats"], reference["stats"], strict=True)):
            assert_same_step(stats, run["grads"][step], reference_stats, reference["grads"][step], f"step {step}")
        for key, value in reference["params"].items():
            assert_close(run["params"][key], value, RTOL, f"params[{key}] {options}")
            assert run["params"][key].sharding.is_fully_replicated
        buckets = {stats_fn.bucket_size(size) for size in sizes}
        assert stats_fn.compile_count == len(buckets) < len(set(sizes))


def test_one_compiled_step_with_the_pure_rule_matches_one_device():
    """Statistics, rule and update in one jax.jit over a sharded batch, 12 steps."""
    params, inputs, targets = make_data(seed=2)
    learning_rate = 1.0
    rule = cabs.cabs(learning_rate=learning_rate, min_batch_size=5, max_batch_size=64, scale=8.0)
    mesh = cabs_jax.data_mesh()
    data = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
    replicated = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    runs = {}
    for label, stats_fn in (
        ("one device", cabs_jax.StatsFunction(loss_fn, max_batch_size=64)),
        ("mesh", cabs_jax.StatsFunction(loss_fn, max_batch_size=64, mesh=mesh)),
    ):

        @jax.jit
        def train_step(params, state, batch, mask, stats_fn=stats_fn):
            stats, mean_grad = stats_fn.masked(params, batch, mask)
            batch_size, state = rule.update(stats, state)
            params = jax.tree.map(lambda p, g: p - learning_rate * g, params, mean_grad)
            return params, state, batch_size

        current, state = jax.tree.map(jnp.asarray, params), rule.init(jnp.asarray(0.0, dtype=jnp.float64))
        if label == "mesh":
            # Start replicated, as the step's outputs are: otherwise the second call compiles again.
            current, state = jax.device_put((current, state), replicated)
        sampler = BatchSampler(len(inputs), batch_size=lambda: 16, seed=3)
        sizes = [int(state.batch_size)]
        for _ in range(12):
            index = sampler.draw(sizes[-1])
            padded, mask = stats_fn.pad({"x": inputs[index], "y": targets[index]})
            if label == "mesh":
                padded, mask = jax.device_put((padded, mask), data)
            current, state, batch_size = train_step(current, state, padded, mask)
            sizes.append(int(batch_size))
        runs[label] = (sizes, current, train_step._cache_size(), {stats_fn.bucket_size(n) for n in sizes})
    assert runs["mesh"][0] == runs["one device"][0] and len(set(runs["mesh"][0])) >= 3
    for key in params:
        assert_close(runs["mesh"][1][key], runs["one device"][1][key], RTOL, key)
    for label, (_, _, compile_count, buckets) in runs.items():
        assert compile_count <= len(buckets), label


# --- errors --------------------------------------------------------------------------------------


def test_bad_mesh_options_are_clear_errors():
    with pytest.raises(TypeError, match=re.escape("`mesh` must be a jax.sharding.Mesh, got mesh='data'")):
        cabs_jax.StatsFunction(loss_fn, mesh="data")
    with pytest.raises(
        ValueError, match=re.escape("`data_axis` must be an axis of the mesh ('data',), got data_axis='batch'")
    ):
        cabs_jax.StatsFunction(loss_fn, mesh=cabs_jax.data_mesh(), data_axis="batch")
    with pytest.raises(ValueError, match="`devices` must name at least one device"):
        cabs_jax.data_mesh([])


def test_a_two_axis_mesh_splits_the_batch_over_its_data_axis_only():
    mesh = jax.make_mesh((2, 2), ("data", "model"))
    params, inputs, targets = make_data(seed=4)
    batch = {"x": inputs[:19], "y": targets[:19]}
    stats_fn = cabs_jax.StatsFunction(loss_fn, mesh=mesh, buckets="exact")
    assert stats_fn.shard_count == 2 and stats_fn.bucket_size(19) == 20
    stats, mean_grad = stats_fn(params, batch)
    assert_same_step(stats, mean_grad, *cabs_jax.StatsFunction(loss_fn)(params, batch), "2x2 mesh")
    assert isinstance(stats, GradStats)
