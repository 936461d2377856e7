"""The JAX adapter against explicit per-example loops in NumPy float64.

Three models (an MLP, a small CNN with max-pooling, a tied-weight autoencoder) are
checked in float64 and float32 against a loop that takes one example at a time; the
MLP and the autoencoder also against gradients derived by hand in NumPy, so at least
one check involves no automatic differentiation. Compile counts come from JAX itself:
the jitted function's cache and JAX's backend-compile monitoring events.
"""

from __future__ import annotations

import contextlib
import re
from pathlib import Path

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # conftest asks for it too; the float64 checks need it

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

import cabs  # noqa: E402
from cabs import GradStats  # noqa: E402
from cabs.backends import get_backend  # noqa: E402
from cabs.backends import jax as cabs_jax  # noqa: E402

from scripted import scripted_stats  # noqa: E402

RTOL = {"float64": 1e-9, "float32": 1e-4}
DOCS_PAGE = Path(__file__).resolve().parents[1] / "docs" / "jax.md"
BACKEND_COMPILE_EVENT = "/jax/core/compile/backend_compile_duration"


# --- helpers ---------------------------------------------------------------------------------


def assert_close(actual, expected, rtol, what=""):
    """Max-norm comparison: entries are judged against the largest entry of ``expected``."""
    actual = np.asarray(actual, dtype=np.float64)
    expected = np.asarray(expected, dtype=np.float64)
    assert actual.shape == expected.shape, what
    assert np.all(np.isfinite(actual)), what
    error = np.max(np.abs(actual - expected), initial=0.0)
    scale = np.max(np.abs(expected), initial=0.0)
    assert error <= rtol * scale + 1e-300, f"{what}: error {error:.3e} > rtol {rtol} * scale {scale:.3e}"


@contextlib.contextmanager
def count_backend_compiles():
    """Count XLA compilations (of anything) inside the block, from JAX's monitoring events."""
    events = []

    def listener(event, duration, **kwargs):
        if event == BACKEND_COMPILE_EVENT:
            events.append(duration)

    jax.monitoring.register_event_duration_secs_listener(listener)
    try:
        yield events
    finally:
        jax.monitoring.unregister_event_duration_listener(listener)


def cast(tree, dtype):
    return {key: np.asarray(value, dtype=dtype) for key, value in tree.items()}


def cross_entropy(logits, label):
    return jax.nn.logsumexp(logits) - logits[label]


def numpy_cross_entropy(logits, label):
    """Loss and its gradient ``softmax - onehot`` in NumPy."""
    shifted = logits - logits.max()
    probabilities = np.exp(shifted) / np.sum(np.exp(shifted))
    d_logits = probabilities.copy()
    d_logits[label] -= 1.0
    return float(np.log(np.sum(np.exp(shifted))) - shifted[label]), d_logits


# --- the three models: JAX loss of one example, initial parameters, data -------------------


def mlp_loss(params, example):
    hidden = jnp.tanh(example["x"] @ params["w1"] + params["b1"])
    return cross_entropy(hidden @ params["w2"] + params["b2"], example["y"])


def mlp_numpy_loss_and_grad(params, example):
    """Hand-derived gradient of :func:`mlp_loss`, NumPy float64."""
    x, label = example["x"], int(example["y"])
    hidden = np.tanh(x @ params["w1"] + params["b1"])
    loss, d_logits = numpy_cross_entropy(hidden @ params["w2"] + params["b2"], label)
    d_pre = (params["w2"] @ d_logits) * (1.0 - hidden**2)
    return loss, {"w1": np.outer(x, d_pre), "b1": d_pre, "w2": np.outer(hidden, d_logits), "b2": d_logits}


def mlp_setup(rng, count):
    params = {
        "w1": rng.normal(size=(5, 7)),
        "b1": 0.1 * rng.normal(size=7),
        "w2": rng.normal(size=(7, 3)),
        "b2": 0.1 * rng.normal(size=3),
    }
    batch = {"x": rng.normal(size=(count, 5)), "y": rng.integers(0, 3, size=count)}
    return params, batch


def cnn_loss(params, example):
    image = example["x"][None]  # [1, channels, height, width]
    features = lax.conv_general_dilated(image, params["kernel"], window_strides=(1, 1), padding="SAME")
    features = jnp.tanh(features + params["conv_bias"][None, :, None, None])
    pooled = lax.reduce_window(features, -jnp.inf, lax.max, (1, 1, 2, 2), (1, 1, 2, 2), "VALID")
    return cross_entropy(pooled.reshape(-1) @ params["dense"] + params["dense_bias"], example["y"])


def cnn_setup(rng, count):
    params = {
        "kernel": 0.5 * rng.normal(size=(3, 2, 3, 3)),  # OIHW
        "conv_bias": 0.1 * rng.normal(size=3),
        "dense": 0.3 * rng.normal(size=(3 * 3 * 3, 4)),
        "dense_bias": 0.1 * rng.normal(size=4),
    }
    batch = {"x": rng.normal(size=(count, 2, 6, 6)), "y": rng.integers(0, 4, size=count)}
    return params, batch


def tied_loss(params, example):
    """Autoencoder whose decoder is the transposed encoder: the matrix is used twice."""
    hidden = jnp.tanh(params["w"] @ example["x"] + params["b"])
    return 0.5 * jnp.sum((params["w"].T @ hidden - example["x"]) ** 2)


def tied_numpy_loss_and_grad(params, example):
    """Hand-derived gradient of :func:`tied_loss`: the two uses of ``w`` add."""
    w, x = params["w"], example["x"]
    hidden = np.tanh(w @ x + params["b"])
    residual = w.T @ hidden - x
    d_pre = (w @ residual) * (1.0 - hidden**2)
    return 0.5 * float(residual @ residual), {"w": np.outer(hidden, residual) + np.outer(d_pre, x), "b": d_pre}


def tied_setup(rng, count):
    params = {"w": 0.5 * rng.normal(size=(4, 6)), "b": 0.1 * rng.normal(size=4)}
    return params, {"x": rng.normal(size=(count, 6))}


MODELS = {
    "mlp": (mlp_loss, mlp_setup, mlp_numpy_loss_and_grad),
    "cnn": (cnn_loss, cnn_setup, None),
    "tied": (tied_loss, tied_setup, tied_numpy_loss_and_grad),
}


def make_problem(model, dtype, count=11, seed=0):
    """Parameters and batch rounded to ``dtype`` (labels stay integers)."""
    loss_fn, setup, numpy_loss_and_grad = MODELS[model]
    params, batch = setup(np.random.default_rng(seed), count)
    params = cast(params, dtype)
    batch = {key: value if key == "y" else np.asarray(value, dtype=dtype) for key, value in batch.items()}
    return loss_fn, params, batch, numpy_loss_and_grad


# --- the float64 oracle: one example at a time ----------------------------------------------


def loop_statistics(loss_and_grad, params, batch):
    """Explicit per-example loop; all sums in NumPy float64 (DESIGN.md section 2)."""
    params = cast(params, np.float64)
    count = len(next(iter(batch.values())))
    losses, flat_grads, grad_sums = [], [], {key: 0.0 for key in params}
    for index in range(count):
        example = {key: np.asarray(value[index]) for key, value in batch.items()}
        example = {key: value if key == "y" else value.astype(np.float64) for key, value in example.items()}
        loss, grads = loss_and_grad(params, example)
        grads = {key: np.asarray(value, dtype=np.float64) for key, value in grads.items()}
        losses.append(float(loss))
        flat_grads.append(np.concatenate([grads[key].ravel() for key in params]))
        for key in params:
            grad_sums[key] = grad_sums[key] + grads[key]
    mean_grad = {key: grad_sums[key] / count for key in params}
    flat_grads = np.stack(flat_grads)
    return {
        "count": count,
        "loss": float(np.mean(losses)),
        "grad_sq_norm": float(np.sum(flat_grads.mean(axis=0) ** 2)),
        "sq_norm_sum": float(np.sum(flat_grads**2)),
        "mean_grad": mean_grad,
    }


def jax_grad_per_example(loss_fn):
    """One example at a time with jax.grad in float64: no vmap, no padding, no mask."""
    value_and_grad = jax.jit(jax.value_and_grad(loss_fn))

    def loss_and_grad(params, example):
        loss, grads = value_and_grad(params, example)
        return float(loss), {key: np.asarray(value) for key, value in grads.items()}

    return loss_and_grad


def assert_matches(stats, mean_grad, expected, rtol):
    assert int(stats.count) == expected["count"]
    for field in ("loss", "grad_sq_norm", "sq_norm_sum"):
        assert_close(getattr(stats, field), expected[field], rtol, field)
    assert set(mean_grad) == set(expected["mean_grad"])
    for key, value in expected["mean_grad"].items():
        assert_close(mean_grad[key], value, rtol, f"mean_grad[{key}]")


# --- correctness ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("model", sorted(MODELS))
def test_matches_per_example_jax_grad_loop(model, dtype):
    loss_fn, params, batch, _ = make_problem(model, dtype)
    stats, mean_grad = cabs_jax.grad_stats(loss_fn, params, batch)
    expected = loop_statistics(jax_grad_per_example(loss_fn), params, batch)
    assert_matches(stats, mean_grad, expected, RTOL[dtype])
    assert stats.sq_norm_sum.dtype == np.dtype(dtype)
    assert all(mean_grad[key].dtype == np.dtype(dtype) for key in params)


@pytest.mark.parametrize("dtype", ["float64", "float32"])
@pytest.mark.parametrize("model", ["mlp", "tied"])
def test_matches_hand_derived_numpy_gradients(model, dtype):
    loss_fn, params, batch, numpy_loss_and_grad = make_problem(model, dtype, count=13, seed=1)
    stats, mean_grad = cabs_jax.StatsFunction(loss_fn)(params, batch)
    expected = loop_statistics(numpy_loss_and_grad, params, batch)
    assert_matches(stats, mean_grad, expected, RTOL[dtype])


def test_statistics_give_the_explicit_variance_trace():
    loss_fn, params, batch, numpy_loss_and_grad = make_problem("mlp", "float64", count=9, seed=2)
    stats, _ = cabs_jax.grad_stats(loss_fn, params, batch)
    per_example = np.stack(
        [
            np.concatenate([g.ravel() for g in numpy_loss_and_grad(params, {"x": x, "y": y})[1].values()])
            for x, y in zip(batch["x"], batch["y"], strict=True)
        ]
    )
    deviations = per_example - per_example.mean(axis=0)
    for ddof in (0, 1):
        expected = np.sum(deviations**2) / (len(per_example) - ddof)
        assert_close(stats.variance_trace(ddof=ddof), expected, 1e-9, f"xi ddof={ddof}")


def test_low_precision_gradients_accumulate_in_float32():
    # Per-example squared norms of ~1.8e3 over 64 examples sum to ~1.2e5 > float16's max 65504.
    rng = np.random.default_rng(3)
    params = {"w": np.full(2, 0.0, dtype=np.float16)}
    batch = {"x": np.asarray(30.0 + rng.random((64, 2)), dtype=np.float16)}

    def loss_fn(params, example):
        return -jnp.dot(params["w"], example["x"])  # gradient -x: per-example norm ~ 1.8e3

    stats, mean_grad = cabs_jax.grad_stats(loss_fn, params, batch)
    assert stats.sq_norm_sum.dtype == np.float32 and stats.loss.dtype == np.float32
    assert mean_grad["w"].dtype == np.float16
    x = batch["x"].astype(np.float64)
    assert_close(stats.sq_norm_sum, np.sum(x**2), 1e-4, "sq_norm_sum")
    assert_close(stats.grad_sq_norm, np.sum(x.mean(axis=0) ** 2), 1e-4, "grad_sq_norm")

    stats_bf16, grad_bf16 = cabs_jax.grad_stats(loss_fn, cast(params, jnp.bfloat16), cast(batch, jnp.bfloat16))
    assert stats_bf16.sq_norm_sum.dtype == np.float32 and grad_bf16["w"].dtype == jnp.bfloat16
    x_bf16 = cast(batch, jnp.bfloat16)["x"].astype(np.float64)
    assert_close(stats_bf16.sq_norm_sum, np.sum(x_bf16**2), 1e-4, "bfloat16 sq_norm_sum")


# --- padding and buckets -----------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "fill"), [("float64", 1e30), ("float64", np.nan), ("float32", 1e30)])
@pytest.mark.parametrize("model", ["mlp", "tied"])
def test_padding_changes_no_statistic(model, dtype, fill):
    # In float32, 1e30 squared overflows to inf, and inf * 0 is NaN: masking must not multiply.
    loss_fn, params, batch, _ = make_problem(model, dtype, count=10, seed=4)
    rtol = {"float64": 1e-12, "float32": 1e-6}[dtype]
    stats_fn = cabs_jax.StatsFunction(loss_fn)
    exact_stats, exact_grad = cabs_jax.StatsFunction(loss_fn, buckets="exact")(params, batch)
    padded = {"x": np.concatenate([batch["x"], np.full((6, *batch["x"].shape[1:]), fill, batch["x"].dtype)])}
    if "y" in batch:
        padded["y"] = np.concatenate([batch["y"], np.full(6, 10**9)])  # labels far out of range
    mask = np.arange(16) < 10
    stats, mean_grad = stats_fn.masked(params, padded, mask)
    for field in GradStats._fields:
        assert_close(getattr(stats, field), getattr(exact_stats, field), rtol, field)
    for key in params:
        assert_close(mean_grad[key], exact_grad[key], rtol, key)
    # The garbage really reaches the loss: unmasked, the statistics change (or are not finite).
    unmasked, _ = stats_fn.masked(params, padded, np.ones(16, dtype=bool))
    assert not np.isclose(float(unmasked.sq_norm_sum), float(exact_stats.sq_norm_sum), rtol=1e-3)


def test_automatic_padding_matches_the_unpadded_batch():
    loss_fn, params, batch, numpy_loss_and_grad = make_problem("mlp", "float64", count=21, seed=5)
    stats_fn = cabs_jax.StatsFunction(loss_fn, buckets=(8, 40, 64))
    padded, mask = stats_fn.pad(batch)
    assert padded["x"].shape[0] == 40 and int(mask.sum()) == 21
    stats, mean_grad = stats_fn(params, batch)
    assert_matches(stats, mean_grad, loop_statistics(numpy_loss_and_grad, params, batch), 1e-9)


def test_thirty_batch_sizes_compile_once_per_bucket():
    loss_fn, params, _, _ = make_problem("mlp", "float64", count=1)
    stats_fn = cabs_jax.StatsFunction(loss_fn, max_batch_size=300)
    rng = np.random.default_rng(6)
    sizes = [int(n) for n in rng.choice(np.arange(1, 301), size=30, replace=False)]
    buckets_used = {stats_fn.bucket_size(n) for n in sizes}
    all_buckets = {16, 32, 64, 128, 256, 300}
    assert buckets_used <= all_buckets and len(buckets_used) >= 4
    with count_backend_compiles() as compiles:
        for size in sizes:
            _, batch = mlp_setup(rng, size)
            stats, _ = stats_fn(params, batch)
            assert int(stats.count) == size
    assert stats_fn.compile_count == len(buckets_used)
    # Nothing else compiles per batch size either (host-side padding, no per-shape ops).
    assert len(compiles) == len(buckets_used)


def test_grad_stats_reuses_its_compiled_function():
    loss_fn, params, batch, _ = make_problem("tied", "float64", count=20, seed=7)
    cabs_jax.grad_stats(loss_fn, params, batch)
    with count_backend_compiles() as compiles:
        for size in (17, 25, 32):  # the same bucket as 20
            cabs_jax.grad_stats(loss_fn, params, {"x": np.resize(batch["x"], (size, 6))})
    assert len(compiles) == 0


@pytest.mark.parametrize(
    ("count", "buckets", "max_batch_size", "expected"),
    [
        (1, "pow2", None, 16),
        (16, "pow2", None, 16),
        (17, "pow2", None, 32),
        (1500, "pow2", 2048, 2048),
        (600, "pow2", 1000, 1000),
        (513, "pow2", 1000, 1000),
        (37, "exact", None, 37),
        (37, 10, None, 40),
        (95, 10, 95, 95),
        (9, (8, 12, 50), None, 12),
        (50, (8, 12, 50), None, 50),
    ],
)
def test_bucket_policies(count, buckets, max_batch_size, expected):
    assert cabs_jax.bucket_size(count, buckets, max_batch_size=max_batch_size) == expected


@pytest.mark.parametrize(
    ("count", "buckets", "max_batch_size", "match"),
    [
        (0, "pow2", None, "`count` must be a positive integer"),
        (3000, "pow2", 2048, "`count` must be <= max_batch_size=2048"),
        (60, (8, 12, 50), None, "largest bucket 50"),
        (5, "powers", None, "`buckets` must be a bucket policy"),
        (5, (16, 8), None, "strictly increasing"),
        (5, (8, 16), 32, "must reach max_batch_size=32"),
        (5, 0, None, "`buckets` must be a positive integer"),
    ],
)
def test_bucket_policy_errors(count, buckets, max_batch_size, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        cabs_jax.bucket_size(count, buckets, max_batch_size=max_batch_size)


# --- micro-batching ---------------------------------------------------------------------------


def scan_lengths(function, *args):
    """Lengths of the ``scan`` equations anywhere in the jaxpr of ``function(*args)``."""
    lengths = []

    def visit(jaxpr):
        for equation in jaxpr.eqns:
            if equation.primitive.name == "scan":
                lengths.append(equation.params["length"])
            for value in equation.params.values():
                for inner in value if isinstance(value, (tuple, list)) else (value,):
                    inner = getattr(inner, "jaxpr", inner)  # a ClosedJaxpr holds its Jaxpr
                    if hasattr(inner, "eqns"):
                        visit(inner)

    visit(jax.make_jaxpr(function)(*args).jaxpr)
    return lengths


@pytest.mark.parametrize("model", sorted(MODELS))
def test_micro_batches_give_the_whole_batch_statistics(model):
    # 23 examples in passes of at most 8: three chunks of 8, one masked row pads the last.
    loss_fn, params, batch, _ = make_problem(model, "float64", count=23, seed=8)
    chunked = cabs_jax.StatsFunction(loss_fn, buckets="exact", max_examples_per_pass=8)
    assert chunked.bucket_size(23) == 24 and chunked.chunk_size(23) == 8
    stats, mean_grad = chunked(params, batch)
    whole_stats, whole_grad = cabs_jax.StatsFunction(loss_fn, buckets="exact")(params, batch)
    for field in GradStats._fields:
        assert_close(getattr(stats, field), getattr(whole_stats, field), 1e-12, field)
    for key in params:
        assert_close(mean_grad[key], whole_grad[key], 1e-12, key)
    assert_matches(stats, mean_grad, loop_statistics(jax_grad_per_example(loss_fn), params, batch), 1e-9)
    # The chunks run one after another: a scan over 3 chunks, whose vmapped gradients have 8 rows.
    assert scan_lengths(chunked.masked, params, *chunked.pad(batch)) == [3]


def test_micro_batches_keep_one_compile_per_bucket_and_mask_garbage():
    loss_fn, params, _, _ = make_problem("mlp", "float64", count=1)
    stats_fn = cabs_jax.StatsFunction(loss_fn, max_batch_size=100, max_examples_per_pass=24)
    rng = np.random.default_rng(9)
    sizes = [3, 30, 33, 64, 65, 100]
    # Buckets 16, 32, 64, 100 run in balanced chunks: 16, 2 x 16, 3 x 22 (66), 5 x 20.
    assert [stats_fn.bucket_size(n) for n in (16, 32, 64, 100)] == [16, 32, 66, 100]
    assert [stats_fn.chunk_size(n) for n in (16, 32, 64, 100)] == [16, 16, 22, 20]
    for size in sizes:
        _, batch = mlp_setup(rng, size)
        stats, mean_grad = stats_fn(params, batch)
        assert_matches(stats, mean_grad, loop_statistics(mlp_numpy_loss_and_grad, params, batch), 1e-9)
    assert stats_fn.compile_count == 4
    # A masked batch whose size is no whole number of chunks gets masked rows inside; NaN padding stays out.
    _, batch = mlp_setup(rng, 21)
    padded = {"x": np.concatenate([batch["x"], np.full((6, 5), np.nan)]), "y": np.concatenate([batch["y"], [0] * 6])}
    stats, mean_grad = cabs_jax.StatsFunction(loss_fn, max_examples_per_pass=10).masked(
        params, padded, np.arange(27) < 21
    )
    assert_matches(stats, mean_grad, loop_statistics(mlp_numpy_loss_and_grad, params, batch), 1e-9)


@pytest.mark.parametrize("value", [0, -3, 2.5, True])
def test_bad_max_examples_per_pass_is_a_clear_error(value):
    with pytest.raises(
        ValueError,
        match=re.escape(f"`max_examples_per_pass` must be a positive integer, got max_examples_per_pass={value!r}"),
    ):
        cabs_jax.StatsFunction(tied_loss, max_examples_per_pass=value)


# --- the rule under jax.jit ---------------------------------------------------------------


def test_rule_update_under_jit_matches_numpy_and_compiles_once():
    rule = cabs.cabs(learning_rate=0.1, smoothing=0.9)
    update = jax.jit(rule.update)
    state = rule.init(jnp.asarray(0.0, dtype=jnp.float64))
    numpy_state = rule.init(np.asarray(0.0, dtype=np.float64))
    sizes, numpy_sizes = [], []
    with count_backend_compiles() as compiles:
        for count, loss, grad_sq_norm, sq_norm_sum in scripted_stats():
            values = (count, loss, grad_sq_norm, sq_norm_sum)
            dtypes = (np.int32, np.float64, np.float64, np.float64)
            stats = GradStats(*(jnp.asarray(v, dtype=d) for v, d in zip(values, dtypes, strict=True)))
            batch_size, state = update(stats, state)
            sizes.append(int(batch_size))
            numpy_size, numpy_state = rule.update(
                GradStats(*(np.asarray(v, dtype=d) for v, d in zip(values, dtypes, strict=True))), numpy_state
            )
            numpy_sizes.append(int(numpy_size))
            if len(sizes) == 1:
                compiles_after_first_call = len(compiles)
    assert sizes == numpy_sizes
    assert len(set(sizes)) > 20
    assert update._cache_size() == 1
    assert len(compiles) == compiles_after_first_call >= 1


# --- errors ------------------------------------------------------------------------------


def test_non_scalar_loss_is_a_clear_error():
    _, params, batch, _ = make_problem("tied", "float64")
    with pytest.raises(ValueError, match="scalar loss of ONE example, got shape \\(6,\\)"):
        cabs_jax.grad_stats(lambda p, e: p["w"].T @ p["w"] @ e["x"], params, batch)


@pytest.mark.parametrize(
    ("batch", "match"),
    [
        ({"x": np.zeros((0, 6))}, "at least one example, got batch size 0"),
        ({"x": np.zeros((4, 6)), "z": np.zeros((5, 6))}, "share one leading (batch) size"),
        ({"x": np.zeros((4, 6)), "z": np.float64(1.0)}, "0-d leaf at ['z']"),
        ({}, "at least one array, got an empty pytree"),
    ],
)
def test_bad_batches_are_clear_errors(batch, match):
    _, params, _, _ = make_problem("tied", "float64")
    with pytest.raises(ValueError, match=re.escape(match)):
        cabs_jax.grad_stats(tied_loss, params, batch)


def test_bad_params_and_mask_are_clear_errors():
    _, params, batch, _ = make_problem("tied", "float64")
    with pytest.raises(TypeError, match=re.escape("`params` leaves must be floating arrays, got dtype int64 at ['b']")):
        cabs_jax.grad_stats(tied_loss, {**params, "b": np.zeros(4, dtype=np.int64)}, batch)
    stats_fn = cabs_jax.StatsFunction(tied_loss)
    with pytest.raises(ValueError, match=re.escape("`mask` must be a bool vector of the batch size 11")):
        stats_fn.masked(params, batch, np.ones(12, dtype=bool))
    with pytest.raises(TypeError, match="`mask` must have dtype bool"):
        stats_fn.masked(params, batch, np.ones(11))
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        cabs_jax.StatsFunction("loss")


# --- registry and docs ---------------------------------------------------------------------


def test_registry_finds_the_jax_backend():
    backend = get_backend(jnp.zeros(2))
    assert backend is cabs_jax and backend.name == "jax"
    assert jax.Array in backend.array_types()
    assert backend.devices() and all(isinstance(device, str) for device in backend.devices())


def test_docs_page_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOCS_PAGE.read_text(), flags=re.DOTALL)
    assert blocks, f"no python code block in {DOCS_PAGE}"
    namespace: dict = {"__name__": "docs_jax"}
    exec(compile("\n".join(blocks), str(DOCS_PAGE), "exec"), namespace)
    # The page's loop trains: the loss falls and the batch size comes from the rule.
    assert namespace["losses"][-1] < 0.7 * namespace["losses"][0]
    batch_sizes = namespace["batch_sizes"]
    buckets = {namespace["stats_fn"].bucket_size(size) for size in batch_sizes}
    assert namespace["stats_fn"].compile_count <= len(buckets) < len(set(batch_sizes))
    assert namespace["train_step"]._cache_size() <= len(buckets)
