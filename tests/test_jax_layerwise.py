"""Layer-wise per-example squared gradient norms for JAX equal the exact per-example loop (float64)."""

from __future__ import annotations

import numpy as np
import pytest

jax = pytest.importorskip("jax")
jax.config.update("jax_enable_x64", True)  # conftest asks for it too; the float64 checks need it

import jax.numpy as jnp  # noqa: E402
from jax import lax  # noqa: E402

from cabs.backends import _jax_layerwise as layerwise  # noqa: E402
from cabs.backends import jax as cabs_jax  # noqa: E402

RTOL = 1e-9


def reference_sums(loss_fn, params, batch, count):
    """Loss sum, gradient sum and sum of squared norms from a per-example loop in NumPy float64."""
    loss_sum, square_norm_sum, grad_sum = 0.0, 0.0, None
    for index in range(count):
        example = jax.tree_util.tree_map(lambda leaf, index=index: leaf[index], batch)
        loss, grads = jax.value_and_grad(loss_fn)(params, example)
        leaves = [np.asarray(leaf, dtype=np.float64) for leaf in jax.tree_util.tree_leaves(grads)]
        loss_sum += float(loss)
        square_norm_sum += sum(float(np.sum(leaf**2)) for leaf in leaves)
        grad_sum = leaves if grad_sum is None else [total + leaf for total, leaf in zip(grad_sum, leaves, strict=True)]
    return loss_sum, grad_sum, square_norm_sum


def layerwise_sums(loss_fn, params, batch, mask, method="auto"):
    compute = jax.jit(lambda p, b, m: layerwise.layerwise_batch_sums(loss_fn, p, b, m, method=method))
    return compute(params, batch, mask)


def assert_exact(loss_fn, params, batch, mask=None):
    """Layer-wise sums equal the per-example loop over the real examples."""
    size = jax.tree_util.tree_leaves(batch)[0].shape[0]
    mask = np.ones(size, bool) if mask is None else mask
    count = int(np.sum(mask))
    sums = layerwise_sums(loss_fn, params, batch, mask)
    loss_sum, grad_sum, square_norm_sum = reference_sums(loss_fn, params, batch, count)
    assert int(sums.count) == count
    np.testing.assert_allclose(float(sums.loss_sum), loss_sum, rtol=RTOL)
    np.testing.assert_allclose(float(sums.sq_norm_sum), square_norm_sum, rtol=RTOL)
    for got, expected in zip(jax.tree_util.tree_leaves(sums.grad_sum), grad_sum, strict=True):
        np.testing.assert_allclose(np.asarray(got), expected, rtol=RTOL, atol=1e-12)
    return sums


def methods(loss_fn, params, batch):
    example = jax.tree_util.tree_map(lambda leaf: leaf[0], batch)
    return layerwise.explain(loss_fn, params, example)


@pytest.fixture
def rng():
    return np.random.default_rng(7)


def mlp_loss(params, example):
    hidden = jnp.tanh(example["x"] @ params["w1"] + params["b1"])
    output = hidden @ params["w2"] + params["b2"]
    return 0.5 * jnp.sum((output - example["y"]) ** 2)


def mlp_params(rng, inputs, hidden, outputs):
    return {
        "w1": jnp.asarray(rng.normal(size=(inputs, hidden))),
        "b1": jnp.asarray(rng.normal(size=hidden)),
        "w2": jnp.asarray(rng.normal(size=(hidden, outputs))),
        "b2": jnp.asarray(rng.normal(size=outputs)),
    }


def test_mlp_with_biases(rng):
    params = mlp_params(rng, 5, 7, 3)
    batch = {"x": rng.normal(size=(6, 5)), "y": rng.normal(size=(6, 3))}
    assert set(methods(mlp_loss, params, batch).values()) == {"layerwise"}
    assert_exact(mlp_loss, params, batch)


@pytest.mark.parametrize(
    ("steps", "inputs", "hidden"),
    [(2, 20, 20), (9, 3, 4)],  # the first takes the Gram form, the second the explicit A^T D
    ids=["gram", "explicit"],
)
def test_dense_over_time_axis(rng, steps, inputs, hidden):
    params = mlp_params(rng, inputs, hidden, 3)
    batch = {"x": rng.normal(size=(5, steps, inputs)), "y": rng.normal(size=(5, steps, 3))}
    assert set(methods(mlp_loss, params, batch).values()) == {"layerwise"}
    assert_exact(mlp_loss, params, batch)


def test_dense_parameter_on_the_left_and_with_contraction_batch_axes(rng):
    def loss_fn(params, example):
        # The weight is the left operand, and a per-head weight contracts with a batch (head) axis.
        projected = jnp.einsum("qp,tp->qt", params["w"], example["x"])  # [q, t]
        heads = jnp.reshape(projected, (2, 2, -1))  # [h, 2, t]
        mixed = jnp.einsum("hit,hij->hjt", heads, params["per_head"])
        return jnp.sum(jnp.sin(mixed))

    params = {"w": jnp.asarray(rng.normal(size=(4, 3))), "per_head": jnp.asarray(rng.normal(size=(2, 2, 5)))}
    batch = {"x": rng.normal(size=(5, 6, 3))}
    assert set(methods(loss_fn, params, batch).values()) == {"layerwise"}
    assert_exact(loss_fn, params, batch)


def test_conv_1d_with_padding_stride_and_bias(rng):
    def loss_fn(params, example):
        out = lax.conv_general_dilated(example["x"][None], params["kernel"], (2,), [(1, 2)], rhs_dilation=(2,))
        out = out + params["bias"][None, :, None]
        return jnp.sum(jnp.tanh(out) ** 2)

    params = {"kernel": jnp.asarray(rng.normal(size=(4, 3, 3))), "bias": jnp.asarray(rng.normal(size=4))}
    batch = {"x": rng.normal(size=(5, 3, 13))}
    assert set(methods(loss_fn, params, batch).values()) == {"layerwise"}
    assert_exact(loss_fn, params, batch)


def test_conv_2d_channels_last_with_padding_stride_and_bias(rng):
    def loss_fn(params, example):
        # Flax's layout: NHWC input, HWIO kernel.
        out = lax.conv_general_dilated(
            example["x"][None], params["kernel"], (2, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
        out = jax.nn.relu(out + params["bias"])
        return jnp.sum(out @ params["dense"])

    params = {
        "kernel": jnp.asarray(rng.normal(size=(3, 2, 2, 4))),
        "bias": jnp.asarray(rng.normal(size=4)),
        "dense": jnp.asarray(rng.normal(size=(4, 2))),
    }
    batch = {"x": rng.normal(size=(4, 7, 6, 2))}
    assert set(methods(loss_fn, params, batch).values()) == {"layerwise"}
    assert_exact(loss_fn, params, batch)


def test_grouped_conv_kernel_falls_back_and_stays_exact(rng):
    def loss_fn(params, example):
        out = lax.conv_general_dilated(example["x"][None], params["kernel"], (1,), "VALID", feature_group_count=2)
        return jnp.sum(out**2)

    params = {"kernel": jnp.asarray(rng.normal(size=(4, 1, 3)))}
    batch = {"x": rng.normal(size=(3, 2, 8))}
    assert methods(loss_fn, params, batch) == {"['kernel']": "vmap"}
    assert_exact(loss_fn, params, batch)


def test_embedding_with_repeated_ids(rng):
    def loss_fn(params, example):
        taken = jnp.take(params["table"], example["ids"], axis=0)  # out-of-range ids are dropped ("fill")
        indexed = params["other"][example["ids"]]  # clipped
        clipped = jnp.take(params["clipped"], example["ids"] + 2, axis=0, mode="clip")
        return jnp.sum(jnp.tanh(taken @ params["w"]) * indexed) + jnp.sum(clipped**2)

    params = {name: jnp.asarray(rng.normal(size=(5, 3))) for name in ("table", "other", "clipped")}
    params["w"] = jnp.asarray(rng.normal(size=(3, 3)))
    ids = rng.integers(0, 5, size=(6, 2, 4))
    ids[:, 0, :2] = ids[:, 1, :2]  # every example repeats ids
    assert methods(loss_fn, params, {"ids": ids}) == {
        "['clipped']": "layerwise",
        "['other']": "layerwise",
        "['table']": "layerwise",
        "['w']": "layerwise",
    }
    assert_exact(loss_fn, params, {"ids": ids})


def test_layer_norm_scale_and_shift(rng):
    def loss_fn(params, example):
        hidden = example["x"] @ params["w"]
        centred = hidden - jnp.mean(hidden, axis=-1, keepdims=True)
        normalised = centred / jnp.sqrt(jnp.mean(centred**2, axis=-1, keepdims=True) + 1e-5)
        return jnp.sum(jnp.sin(normalised * params["scale"] + params["shift"]))

    params = {
        "w": jnp.asarray(rng.normal(size=(3, 6))),
        "scale": jnp.asarray(rng.normal(size=6)),
        "shift": jnp.asarray(rng.normal(size=6)),
    }
    batch = {"x": rng.normal(size=(5, 4, 3))}
    assert set(methods(loss_fn, params, batch).values()) == {"layerwise"}
    assert_exact(loss_fn, params, batch)


def tied_loss(params, example):
    # The embedding table is also the output projection: its two uses have cross terms.
    hidden = jnp.tanh(jnp.sum(params["table"][example["ids"]], axis=0) @ params["w"])
    logits = params["table"] @ hidden
    return jax.nn.logsumexp(logits) - logits[example["target"]]


def tied_setup(rng):
    params = {"table": jnp.asarray(rng.normal(size=(6, 3))), "w": jnp.asarray(rng.normal(size=(3, 3)))}
    batch = {"ids": rng.integers(0, 6, size=(5, 4)), "target": rng.integers(0, 6, size=5)}
    return params, batch


def test_tied_weight_falls_back_and_stays_exact(rng):
    params, batch = tied_setup(rng)
    assert methods(tied_loss, params, batch) == {"['table']": "vmap", "['w']": "layerwise"}
    assert_exact(tied_loss, params, batch)


def test_layerwise_method_refuses_a_leaf_without_a_rule(rng):
    params, batch = tied_setup(rng)
    with pytest.raises(ValueError, match=r"method=\"layerwise\".*\['table'\]"):
        layerwise_sums(tied_loss, params, batch, np.ones(5, bool), method="layerwise")


def test_vmap_method_and_bad_method(rng):
    params = mlp_params(rng, 3, 4, 2)
    batch = {"x": rng.normal(size=(4, 3)), "y": rng.normal(size=(4, 2))}
    example = jax.tree_util.tree_map(lambda leaf: leaf[0], batch)
    assert set(layerwise.explain(mlp_loss, params, example, method="vmap").values()) == {"vmap"}
    vmap_sums = layerwise_sums(mlp_loss, params, batch, np.ones(4, bool), method="vmap")
    auto_sums = layerwise_sums(mlp_loss, params, batch, np.ones(4, bool))
    np.testing.assert_allclose(float(vmap_sums.sq_norm_sum), float(auto_sums.sq_norm_sum), rtol=RTOL)
    with pytest.raises(ValueError, match="`method` must be one of"):
        layerwise.explain(mlp_loss, params, example, method="fast")


def test_parameter_in_a_jitted_helper_is_seen_and_one_in_a_custom_derivative_falls_back(rng):
    @jax.jit
    def dense(weight, inputs):
        return inputs @ weight

    def loss_fn(params, example):
        # relu is a custom_jvp call: a parameter read inside it has no rule.
        return jnp.sum(jax.nn.relu(dense(params["w"], example["x"]) + jax.nn.relu(params["offset"])) ** 2)

    params = {"w": jnp.asarray(rng.normal(size=(3, 4))), "offset": jnp.asarray(rng.normal(size=4))}
    batch = {"x": rng.normal(size=(5, 3))}
    assert methods(loss_fn, params, batch) == {"['offset']": "vmap", "['w']": "layerwise"}
    assert_exact(loss_fn, params, batch)


def test_padding_is_masked_even_when_it_is_nan(rng):
    params = mlp_params(rng, 5, 7, 3)
    batch = {"x": rng.normal(size=(8, 4, 5)), "y": rng.normal(size=(8, 4, 3))}
    batch["x"][5:] = np.nan
    batch["y"][6:] = np.inf
    mask = np.arange(8) < 5
    sums = assert_exact(mlp_loss, params, batch, mask)
    assert all(np.all(np.isfinite(leaf)) for leaf in jax.tree_util.tree_leaves(sums.grad_sum))


def test_float32_parameters_accumulate_in_float32(rng):
    params = jax.tree_util.tree_map(lambda leaf: leaf.astype(jnp.float32), mlp_params(rng, 5, 7, 3))
    batch = {"x": rng.normal(size=(6, 5)).astype(np.float32), "y": rng.normal(size=(6, 3)).astype(np.float32)}
    sums = layerwise_sums(mlp_loss, params, batch, np.ones(6, bool))
    _, _, square_norm_sum = reference_sums(mlp_loss, params, batch, 6)
    assert sums.sq_norm_sum.dtype == jnp.float32
    np.testing.assert_allclose(float(sums.sq_norm_sum), square_norm_sum, rtol=1e-4)


def test_equals_the_vmap_batch_sums_of_the_adapter(rng):
    params = mlp_params(rng, 5, 7, 3)
    batch = {"x": rng.normal(size=(6, 3, 5)), "y": rng.normal(size=(6, 3, 3))}
    mask = np.arange(6) < 4
    expected = cabs_jax.batch_sums(mlp_loss, params, batch, mask)
    got = layerwise_sums(mlp_loss, params, batch, mask)
    np.testing.assert_allclose(float(got.sq_norm_sum), float(expected.sq_norm_sum), rtol=RTOL)
    np.testing.assert_allclose(float(got.loss_sum), float(expected.loss_sum), rtol=RTOL)


# --- through the adapter: StatsFunction / grad_stats with method= ---------------------------


def conv_model_loss(params, example):
    out = lax.conv_general_dilated(example["x"][None], params["kernel"], (2,), [(1, 1)])[0]
    hidden = jnp.tanh(out + params["bias"][:, None])
    logits = jnp.reshape(hidden, (-1,)) @ params["dense"]
    return jax.nn.logsumexp(logits) - logits[example["label"]]


def conv_model_setup(rng, size):
    params = {
        "kernel": jnp.asarray(rng.normal(size=(3, 2, 3))),
        "bias": jnp.asarray(rng.normal(size=3)),
        "dense": jnp.asarray(rng.normal(size=(12, 4))),
    }
    batch = {"x": rng.normal(size=(size, 2, 8)), "label": rng.integers(0, 4, size=size)}
    return params, batch


def test_stats_function_compiles_once_per_bucket_with_layerwise(rng):
    params, batch = conv_model_setup(rng, 30)
    stats_fn = cabs_jax.StatsFunction(conv_model_loss, method="layerwise", max_batch_size=64)
    for size in (20, 25, 30):
        part = jax.tree_util.tree_map(lambda leaf, size=size: leaf[:size], batch)
        stats, mean_grad = stats_fn(params, part)
        loss_sum, grad_sum, square_norm_sum = reference_sums(conv_model_loss, params, part, size)
        np.testing.assert_allclose(float(stats.sq_norm_sum), square_norm_sum, rtol=RTOL)
        np.testing.assert_allclose(float(stats.loss), loss_sum / size, rtol=RTOL)
        for got, expected in zip(jax.tree_util.tree_leaves(mean_grad), grad_sum, strict=True):
            np.testing.assert_allclose(np.asarray(got), expected / size, rtol=RTOL, atol=1e-12)
    assert stats_fn.compile_count == 1


@pytest.mark.parametrize("method", ["auto", "layerwise", "vmap"])
def test_grad_stats_methods_agree_with_chunks_and_on_a_mesh(rng, method):
    params, batch = conv_model_setup(rng, 11)
    reference, reference_grad = cabs_jax.grad_stats(conv_model_loss, params, batch, method="vmap", buckets="exact")
    options = [{"max_examples_per_pass": 4}, {"mesh": cabs_jax.data_mesh(jax.devices()[:2])}]
    for option in options:
        stats, mean_grad = cabs_jax.grad_stats(conv_model_loss, params, batch, method=method, **option)
        assert int(stats.count) == 11
        for name in ("loss", "grad_sq_norm", "sq_norm_sum"):
            np.testing.assert_allclose(float(getattr(stats, name)), float(getattr(reference, name)), rtol=RTOL)
        for got, expected in zip(
            jax.tree_util.tree_leaves(mean_grad), jax.tree_util.tree_leaves(reference_grad), strict=True
        ):
            np.testing.assert_allclose(np.asarray(got), np.asarray(expected), rtol=RTOL, atol=1e-12)


def test_adapter_explain_and_bad_method(rng):
    params, batch = tied_setup(rng)
    example = jax.tree_util.tree_map(lambda leaf: leaf[0], batch)
    assert cabs_jax.explain(tied_loss, params, example) == {"['table']": "vmap", "['w']": "layerwise"}
    with pytest.raises(ValueError, match="`method` must be one of"):
        cabs_jax.StatsFunction(tied_loss, method="fast")
    with pytest.raises(ValueError, match=r"\['table'\]"):
        cabs_jax.grad_stats(tied_loss, params, batch, method="layerwise")


def test_parameter_reshaped_and_expanded_before_use(rng):
    def loss_fn(params, example):
        # A vector weight made a column (an added axis of size 1), and a flat weight reshaped to a matrix.
        column = example["x"] @ params["vector"][:, None]
        matrix = jnp.reshape(params["flat"], (3, 2)).T
        return jnp.sum(jnp.cos(column * (example["x"] @ matrix.T)))

    params = {"vector": jnp.asarray(rng.normal(size=3)), "flat": jnp.asarray(rng.normal(size=6))}
    batch = {"x": rng.normal(size=(4, 5, 3))}
    assert set(methods(loss_fn, params, batch).values()) == {"layerwise"}
    assert_exact(loss_fn, params, batch)
