"""Mixed precision: loss scaling in the torch and TensorFlow adapters, and float16 statistics kept in float32.

With a loss scale s the adapters differentiate s times the losses and unscale: the mean
gradient by s, the squared norms by s^2. Every statistic is checked against a loop over
examples in NumPy float64. A step whose scaled gradients overflow is skipped by the
scaler (GradScaler / LossScaleOptimizer) and, because its statistics are not finite,
by the controller too. (JAX has no loss-scaling object of its own; its float16 and
bfloat16 accumulation is tested in test_backend_jax.py, torch's bfloat16 in
test_backend_torch.py.)
"""

from __future__ import annotations

import math

import numpy as np
import pytest

import cabs

RTOL = {np.float64: 1e-9, np.float32: 1e-4}


def oracle(per_example_grads: list[list[np.ndarray]], losses: list[float]) -> dict[str, float]:
    """GradStats fields from per-example gradients (lists of arrays per example), in float64."""
    flat = np.stack([np.concatenate([np.ravel(g).astype(np.float64) for g in grads]) for grads in per_example_grads])
    mean = flat.mean(axis=0)
    return {
        "loss": float(np.mean(np.asarray(losses, dtype=np.float64))),
        "grad_sq_norm": float(mean @ mean),
        "sq_norm_sum": float(np.sum(flat**2)),
    }


def assert_stats_close(stats: cabs.GradStats, expected: dict[str, float], rtol: float) -> None:
    for name, value in expected.items():
        np.testing.assert_allclose(float(getattr(stats, name)), value, rtol=rtol, err_msg=name)


# --- PyTorch ----------------------------------------------------------------------------------


@pytest.fixture
def torch_problem():
    torch = pytest.importorskip("torch")

    def make(dtype, input_scale: float = 1.0):
        generator = torch.Generator().manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(5, 4), torch.nn.Tanh(), torch.nn.Linear(4, 3)).to(dtype)
        with torch.no_grad():
            for parameter in model.parameters():
                parameter.copy_(torch.randn(parameter.shape, generator=generator, dtype=dtype))
        inputs = input_scale * torch.randn(12, 5, generator=generator, dtype=dtype)
        targets = torch.randint(0, 3, (12,), generator=generator)
        return model, torch.nn.CrossEntropyLoss(reduction="none"), inputs, targets

    return make


def torch_oracle(model, loss_fn, inputs, targets) -> tuple[dict[str, float], list[np.ndarray]]:
    """Statistics and the mean gradient from one backward per example."""
    grads, losses = [], []
    for index in range(len(inputs)):
        model.zero_grad()
        loss = loss_fn(model(inputs[index : index + 1]), targets[index : index + 1])[0]
        loss.backward()
        losses.append(float(loss.detach()))
        grads.append([parameter.grad.detach().double().numpy().copy() for parameter in model.parameters()])
    mean_grad = [np.mean([example[k] for example in grads], axis=0) for k in range(len(grads[0]))]
    model.zero_grad()
    return oracle(grads, losses), mean_grad


@pytest.mark.parametrize("method", ["vmap", "auto"])
def test_torch_number_loss_scale_unscales_statistics_and_grad(torch_problem, method):
    import torch

    from cabs.backends import torch as cabs_torch

    model, loss_fn, inputs, targets = torch_problem(torch.float64)
    expected, mean_grad = torch_oracle(model, loss_fn, inputs, targets)
    stats = cabs_torch.grad_stats(model, loss_fn, inputs, targets, method=method, loss_scale=1024.0)
    assert_stats_close(stats, expected, RTOL[np.float64])
    for parameter, expected_grad in zip(model.parameters(), mean_grad, strict=True):
        np.testing.assert_allclose(parameter.grad.numpy(), expected_grad, rtol=1e-9)


def test_torch_grad_scaler_keeps_grad_scaled_for_its_step(torch_problem):
    import torch

    from cabs.backends import torch as cabs_torch

    model, loss_fn, inputs, targets = torch_problem(torch.float32)
    expected, mean_grad = torch_oracle(model, loss_fn, inputs, targets)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**12)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    before = [parameter.detach().double().numpy().copy() for parameter in model.parameters()]

    stats = cabs_torch.grad_stats(model, loss_fn, inputs, targets, loss_scale=scaler)
    assert_stats_close(stats, expected, RTOL[np.float32])
    assert stats.sq_norm_sum.dtype == torch.float32
    for parameter, expected_grad in zip(model.parameters(), mean_grad, strict=True):
        np.testing.assert_allclose(parameter.grad.double().numpy(), 2.0**12 * expected_grad, rtol=1e-4)
    scaler.step(optimizer)  # unscales, finds the gradients finite, steps
    scaler.update()
    for parameter, start, expected_grad in zip(model.parameters(), before, mean_grad, strict=True):
        np.testing.assert_allclose(parameter.detach().double().numpy(), start - 0.1 * expected_grad, rtol=1e-4)
    assert scaler.get_scale() == 2.0**12


@pytest.mark.parametrize("method", ["vmap", "auto"])
def test_torch_autocast_float16_overflow_is_skipped_by_scaler_and_controller(torch_problem, method):
    import torch

    from cabs.backends import torch as cabs_torch

    model, loss_fn, inputs, targets = torch_problem(torch.float32)
    expected, _ = torch_oracle(model, loss_fn, inputs, targets)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    controller = cabs.Controller(learning_rate=0.1, initial_batch_size=20)

    # A scale of 2^10 fits float16: the statistics are those of the float32 model, to float16 precision.
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    with torch.autocast("cpu", dtype=torch.float16):
        stats = cabs_torch.grad_stats(model, loss_fn, inputs, targets, method=method, loss_scale=scaler)
    assert stats.sq_norm_sum.dtype == torch.float32
    assert_stats_close(stats, expected, 2e-2)

    # 2^20 times gradients of order one overflow the float16 backward (largest value 65504).
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**20)
    before = [parameter.detach().clone() for parameter in model.parameters()]
    with torch.autocast("cpu", dtype=torch.float16):
        stats = cabs_torch.grad_stats(model, loss_fn, inputs, targets, method=method, loss_scale=scaler)
    assert not (math.isfinite(float(stats.grad_sq_norm)) and math.isfinite(float(stats.sq_norm_sum)))
    with pytest.warns(RuntimeWarning, match="skipping a step"):
        assert controller.step(stats) == 20
    assert controller.skipped == 1
    scaler.step(optimizer)
    scaler.update()
    for parameter, start in zip(model.parameters(), before, strict=True):
        assert torch.equal(parameter, start)  # the scaler skipped the step as well
    assert scaler.get_scale() == 2.0**19


@pytest.mark.parametrize("bad", [0.0, -2.0, math.inf, math.nan, "1024", True])
def test_torch_bad_loss_scale_is_refused(torch_problem, bad):
    import torch

    from cabs.backends import torch as cabs_torch

    model, loss_fn, inputs, targets = torch_problem(torch.float32)
    with pytest.raises(ValueError, match="`loss_scale` must be a finite number > 0"):
        cabs_torch.grad_stats(model, loss_fn, inputs, targets, loss_scale=bad)


# --- TensorFlow / Keras ------------------------------------------------------------------------


@pytest.fixture
def keras_problem():
    pytest.importorskip("tensorflow")
    import keras

    def make(dtype: str, input_scale: float = 1.0, activation: str | None = "tanh"):
        """A small Keras network; ``dtype`` is a dtype policy ("mixed_float16": float32 variables)."""
        generator = np.random.default_rng(0)
        data_dtype = "float32" if dtype == "mixed_float16" else dtype
        model = keras.Sequential(
            [
                keras.Input((5,), dtype=data_dtype),
                keras.layers.Dense(4, activation=activation, dtype=dtype),
                keras.layers.Dense(3, dtype=dtype),
            ]
        )
        model.set_weights([generator.standard_normal(w.shape).astype(w.dtype) for w in model.get_weights()])
        inputs = (input_scale * generator.standard_normal((12, 5))).astype(data_dtype)
        targets = generator.integers(0, 3, 12)
        loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None)
        return model, loss_fn, inputs, targets

    return make


def keras_oracle(model, loss_fn, inputs, targets) -> tuple[dict[str, float], list[np.ndarray]]:
    import tensorflow as tf

    grads, losses = [], []
    for index in range(len(inputs)):
        with tf.GradientTape() as tape:
            loss = loss_fn(targets[index : index + 1], model(inputs[index : index + 1], training=True))[0]
        gradients = tape.gradient(loss, model.trainable_variables)
        losses.append(float(loss))
        grads.append([np.asarray(gradient, dtype=np.float64) for gradient in gradients])
    mean_grad = [np.mean([example[k] for example in grads], axis=0) for k in range(len(grads[0]))]
    return oracle(grads, losses), mean_grad


def test_keras_number_loss_scale_unscales_statistics_and_gradients(keras_problem):
    from cabs.backends import tensorflow as cabs_tf

    model, loss_fn, inputs, targets = keras_problem("float64")
    expected, mean_grad = keras_oracle(model, loss_fn, inputs, targets)
    stats, gradients = cabs_tf.grad_stats(model, loss_fn, inputs, targets, loss_scale=1024.0)
    unscaled, unscaled_gradients = cabs_tf.grad_stats(model, loss_fn, inputs, targets)
    # A power-of-two scale is exact: scaled and plain results agree to rounding.
    assert_stats_close(stats, {name: float(getattr(unscaled, name)) for name in expected}, 1e-12)
    for gradient, plain in zip(gradients, unscaled_gradients, strict=True):
        np.testing.assert_allclose(np.asarray(gradient), np.asarray(plain), rtol=1e-12)
    # Keras' float64 cross-entropy differs from the single-example loop by ~4e-10 absolute
    # (with or without a scale), so the oracle check allows that.
    assert_stats_close(stats, expected, 1e-8)
    for gradient, expected_grad in zip(gradients, mean_grad, strict=True):
        np.testing.assert_allclose(np.asarray(gradient), expected_grad, rtol=1e-8, atol=1e-9)


def test_keras_loss_scale_optimizer_gets_scaled_gradients(keras_problem):
    import keras

    from cabs.backends import tensorflow as cabs_tf

    model, loss_fn, inputs, targets = keras_problem("float32")
    expected, mean_grad = keras_oracle(model, loss_fn, inputs, targets)
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(learning_rate=0.1), initial_scale=2.0**12)
    before = [np.asarray(w, dtype=np.float64) for w in model.get_weights()]

    stats, gradients = cabs_tf.grad_stats(model, loss_fn, inputs, targets, loss_scale=optimizer)
    assert_stats_close(stats, expected, RTOL[np.float32])
    assert stats.sq_norm_sum.dtype.name == "float32"
    for gradient, expected_grad in zip(gradients, mean_grad, strict=True):
        np.testing.assert_allclose(np.asarray(gradient, dtype=np.float64), 2.0**12 * expected_grad, rtol=1e-4)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
    for weight, start, expected_grad in zip(model.get_weights(), before, mean_grad, strict=True):
        np.testing.assert_allclose(weight, start - 0.1 * expected_grad, rtol=1e-4, atol=1e-7)


def test_keras_mixed_float16_overflow_is_skipped_by_optimizer_and_controller(keras_problem):
    import keras

    from cabs.backends import tensorflow as cabs_tf

    model, loss_fn, inputs, targets = keras_problem("mixed_float16")
    expected, _ = keras_oracle(model, loss_fn, inputs, targets)
    optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(learning_rate=0.1), initial_scale=2.0**10)
    stats, _ = cabs_tf.grad_stats(model, loss_fn, inputs, targets, loss_scale=optimizer)
    assert stats.sq_norm_sum.dtype.name == "float32"
    assert_stats_close(stats, expected, 2e-2)  # float16 compute: a few parts in a thousand

    # 2^20 times gradients of order one overflow the float16 backward (largest value 65504).
    optimizer.dynamic_scale.assign(2.0**20)
    after_first = model.get_weights()
    controller = cabs.Controller(learning_rate=0.1, initial_batch_size=20)
    stats, gradients = cabs_tf.grad_stats(model, loss_fn, inputs, targets, loss_scale=optimizer)
    assert not (math.isfinite(float(stats.grad_sq_norm)) and math.isfinite(float(stats.sq_norm_sum)))
    with pytest.warns(RuntimeWarning, match="skipping a step"):
        assert controller.step(stats) == 20
    optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
    for weight, start in zip(model.get_weights(), after_first, strict=True):
        np.testing.assert_array_equal(weight, start)
    assert float(optimizer.dynamic_scale.numpy()) == 2.0**19


def test_keras_float16_statistics_accumulate_in_float32(keras_problem):
    from cabs.backends import tensorflow as cabs_tf

    # Inputs of ~30: the per-example squared norms sum far above float16's largest value, 65504.
    model, loss_fn, inputs, targets = keras_problem("float16", input_scale=30.0, activation=None)
    stats, gradients = cabs_tf.grad_stats(model, loss_fn, inputs, targets)
    assert stats.sq_norm_sum.dtype.name == "float32" and stats.loss.dtype.name == "float32"
    assert gradients[0].dtype.name == "float16"
    expected, _ = keras_oracle(model, loss_fn, inputs, targets)  # float16 per-example gradients, summed in float64
    assert expected["sq_norm_sum"] > 65504
    assert_stats_close(stats, expected, 2e-2)  # float16 keeps 11 bits: a few parts in a thousand per term


@pytest.mark.parametrize("bad", [0.0, -1.0, math.inf, "1024"])
def test_keras_bad_loss_scale_is_refused(keras_problem, bad):
    from cabs.backends import tensorflow as cabs_tf

    model, loss_fn, inputs, targets = keras_problem("float32")
    with pytest.raises(ValueError, match="`loss_scale` must be a finite number > 0"):
        cabs_tf.grad_stats(model, loss_fn, inputs, targets, loss_scale=bad)
