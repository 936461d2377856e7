"""The TensorFlow adapter against explicit per-example loops in NumPy float64."""

from __future__ import annotations

import pathlib
import re

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

import cabs  # noqa: E402
from cabs import backends  # noqa: E402
from cabs.backends import tensorflow as cabs_tf  # noqa: E402

TOLERANCE = {"float64": 1e-9, "float32": 1e-4}
BATCH = 7
DOCS = pathlib.Path(__file__).parent.parent / "docs" / "tensorflow.md"


def cross_entropy(dtype: str):
    # Keras losses compute in float32 unless told otherwise, which would cap float64 accuracy.
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype=dtype)


def make_mlp(dtype: str):
    keras.utils.set_random_seed(1)
    return keras.Sequential(
        [
            keras.Input((6,), dtype=dtype),
            keras.layers.Dense(5, activation="tanh", dtype=dtype),
            keras.layers.Dense(3, dtype=dtype),
        ]
    )


def make_cnn(dtype: str):
    keras.utils.set_random_seed(2)
    return keras.Sequential(
        [
            keras.Input((9, 9, 2), dtype=dtype),
            keras.layers.Conv2D(4, 3, activation="relu", dtype=dtype),
            keras.layers.MaxPooling2D(2, dtype=dtype),
            keras.layers.Conv2D(3, 3, strides=2, padding="same", dilation_rate=1, activation="tanh", dtype=dtype),
            keras.layers.Flatten(dtype=dtype),
            keras.layers.Dense(3, dtype=dtype),
        ]
    )


class TiedModel(tf.Module):
    """A square matrix applied twice, then a readout: the shared weight's uses add before squaring."""

    def __init__(self, dtype: str):
        super().__init__()
        rng = np.random.default_rng(3)
        self.shared = tf.Variable(rng.normal(scale=0.5, size=(4, 4)).astype(dtype))
        self.readout = tf.Variable(rng.normal(scale=0.5, size=(4, 2)).astype(dtype))

    def __call__(self, inputs):
        hidden = tf.tanh(inputs @ self.shared)
        return tf.tanh(hidden @ self.shared) @ self.readout


def squared_error(targets, outputs):
    return tf.reduce_sum(tf.square(outputs - targets), axis=-1)


def make_problem(kind: str, dtype: str):
    rng = np.random.default_rng({"mlp": 10, "cnn": 11, "tied": 12}[kind])
    if kind == "mlp":
        model, loss_fn, shape = make_mlp(dtype), cross_entropy(dtype), (6,)
    elif kind == "cnn":
        model, loss_fn, shape = make_cnn(dtype), cross_entropy(dtype), (9, 9, 2)
    else:
        model, loss_fn, shape = TiedModel(dtype), squared_error, (4,)
    inputs = rng.normal(size=(BATCH, *shape)).astype(dtype)
    if kind == "tied":
        targets = rng.normal(size=(BATCH, 2)).astype(dtype)
    else:
        targets = rng.integers(0, 3, size=BATCH).astype(np.int32)
    return model, loss_fn, inputs, targets


@pytest.fixture(scope="module")
def problems():
    return {(kind, dtype): make_problem(kind, dtype) for kind in ("mlp", "cnn", "tied") for dtype in TOLERANCE}


def per_example_oracle(model, loss_fn, inputs, targets):
    """Losses and gradients from one tape per example, as NumPy float64."""
    losses, gradients = [], []
    for index in range(len(inputs)):
        with tf.GradientTape() as tape:
            outputs = model(inputs[index : index + 1])
            loss = tf.reduce_sum(loss_fn(targets[index : index + 1], outputs))
        gradients.append([np.asarray(g, dtype=np.float64) for g in tape.gradient(loss, model.trainable_variables)])
        losses.append(float(loss))
    return np.asarray(losses), gradients


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("kind", ["mlp", "cnn", "tied"])
def test_statistics_match_per_example_loop(problems, kind, dtype):
    model, loss_fn, inputs, targets = problems[(kind, dtype)]
    stats, gradients = cabs_tf.grad_stats(model, loss_fn, inputs, targets)
    losses, per_example = per_example_oracle(model, loss_fn, inputs, targets)
    mean = [np.mean([g[k] for g in per_example], axis=0) for k in range(len(per_example[0]))]
    rtol = TOLERANCE[dtype]
    assert stats.loss.dtype == tf.as_dtype(dtype) and stats.sq_norm_sum.dtype == tf.as_dtype(dtype)
    assert float(stats.count) == BATCH
    np.testing.assert_allclose(float(stats.loss), losses.mean(), rtol=rtol)
    np.testing.assert_allclose(float(stats.sq_norm_sum), sum(np.sum(g**2) for e in per_example for g in e), rtol=rtol)
    np.testing.assert_allclose(float(stats.grad_sq_norm), sum(np.sum(g**2) for g in mean), rtol=rtol)
    assert len(gradients) == len(model.trainable_variables)
    for gradient, expected, variable in zip(gradients, mean, model.trainable_variables, strict=True):
        assert gradient.dtype == variable.dtype and tuple(gradient.shape) == tuple(variable.shape)
        np.testing.assert_allclose(np.asarray(gradient), expected, rtol=rtol, atol=rtol * np.abs(expected).max())


def test_mlp_matches_hand_derived_numpy_gradients(problems):
    model, loss_fn, inputs, targets = problems[("mlp", "float64")]
    stats, gradients = cabs_tf.grad_stats(model, loss_fn, inputs, targets)
    w1, b1, w2, b2 = (np.asarray(v) for v in model.trainable_variables)
    losses, per_example = [], []
    for x, y in zip(inputs, targets, strict=True):
        hidden = np.tanh(x @ w1 + b1)
        logits = hidden @ w2 + b2
        probabilities = np.exp(logits - logits.max())
        probabilities /= probabilities.sum()
        losses.append(-np.log(probabilities[y]))
        d_logits = probabilities - np.eye(3)[y]
        d_hidden = (w2 @ d_logits) * (1.0 - hidden**2)
        per_example.append([np.outer(x, d_hidden), d_hidden, np.outer(hidden, d_logits), d_logits])
    mean = [np.mean([g[k] for g in per_example], axis=0) for k in range(4)]
    np.testing.assert_allclose(float(stats.loss), np.mean(losses), rtol=1e-12)
    np.testing.assert_allclose(float(stats.sq_norm_sum), sum(np.sum(g**2) for e in per_example for g in e), rtol=1e-12)
    for gradient, expected in zip(gradients, mean, strict=True):
        np.testing.assert_allclose(np.asarray(gradient), expected, rtol=1e-12, atol=1e-14)


def test_variance_trace_is_the_spread_of_per_example_gradients(problems):
    model, loss_fn, inputs, targets = problems[("cnn", "float64")]
    stats, _ = cabs_tf.grad_stats(model, loss_fn, inputs, targets)
    _, per_example = per_example_oracle(model, loss_fn, inputs, targets)
    flat = np.stack([np.concatenate([g.ravel() for g in e]) for e in per_example])
    spread = np.sum((flat - flat.mean(axis=0)) ** 2) / (BATCH - 1)
    np.testing.assert_allclose(float(stats.variance_trace(ddof=1)), spread, rtol=1e-9)


@pytest.mark.parametrize("kind", ["mlp", "cnn"])
def test_changing_batch_sizes_do_not_retrace(problems, kind):
    model, loss_fn, inputs, targets = problems[(kind, "float32")]
    function = cabs_tf.stats_function(model, loss_fn)
    counts = []
    for size in (1, 2, 3, 5, 7, 4):
        stats, _ = cabs_tf.grad_stats(model, loss_fn, inputs[:size], targets[:size])
        assert float(stats.count) == size
        counts.append(function.trace_count)
    assert counts == [counts[0]] * len(counts) and counts[0] >= 1
    assert cabs_tf.stats_function(model, loss_fn) is function


def test_micro_batch_sums_add_up_to_the_whole_batch(problems):
    model, loss_fn, inputs, targets = problems[("tied", "float64")]
    function = cabs_tf.stats_function(model, loss_fn)
    parts = [function.batch_sums(inputs[:3], targets[:3]), function.batch_sums(inputs[3:], targets[3:])]
    combined = cabs_tf.BatchSums(
        count=parts[0].count + parts[1].count,
        loss_sum=parts[0].loss_sum + parts[1].loss_sum,
        sq_norm_sum=parts[0].sq_norm_sum + parts[1].sq_norm_sum,
        grad_sums=[a + b for a, b in zip(parts[0].grad_sums, parts[1].grad_sums, strict=True)],
    )
    split_stats, split_gradients = function.finish(combined)
    whole_stats, whole_gradients = function(inputs, targets)
    for split, whole in zip(split_stats, whole_stats, strict=True):
        np.testing.assert_allclose(float(split), float(whole), rtol=1e-12)
    for split, whole in zip(split_gradients, whole_gradients, strict=True):
        np.testing.assert_allclose(np.asarray(split), np.asarray(whole), rtol=1e-12)


def test_gradients_feed_apply_gradients_and_controller():
    model, loss_fn, inputs, targets = make_problem("mlp", "float32")
    optimizer = keras.optimizers.SGD(learning_rate=0.1)
    controller = cabs.Controller(learning_rate=0.1)
    before = [np.asarray(v) for v in model.trainable_variables]
    stats, gradients = cabs_tf.grad_stats(model, loss_fn, inputs, targets)
    optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
    for old, new, gradient in zip(before, model.trainable_variables, gradients, strict=True):
        np.testing.assert_allclose(np.asarray(new), old - 0.1 * np.asarray(gradient), rtol=1e-5, atol=1e-7)
    assert controller.step(stats) == 16


def test_registry_and_module_attributes():
    assert cabs_tf.name == "tensorflow"
    assert set(cabs_tf.array_types()) == {tf.Tensor, tf.Variable}
    assert backends.get_backend(tf.constant(1.0)) is cabs_tf
    assert any("CPU" in device for device in cabs_tf.devices())


def test_reduced_loss_is_an_error(problems):
    model, _, inputs, targets = problems[("mlp", "float32")]
    mean_loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    with pytest.raises(ValueError, match="reduction=None"):
        cabs_tf.grad_stats(model, mean_loss, inputs, targets)


@pytest.mark.parametrize(
    ("layer", "match"),
    [
        (lambda: keras.layers.BatchNormalization(name="bn"), "'bn'.*BatchNormalization"),
        (lambda: keras.layers.Dropout(0.5, name="drop"), "'drop'.*Dropout"),
    ],
)
def test_layers_without_exact_per_example_gradients_are_errors(layer, match):
    model = keras.Sequential([keras.Input((4,)), keras.layers.Dense(3), layer(), keras.layers.Dense(2)])
    with pytest.raises(ValueError, match=match):
        cabs_tf.grad_stats(model, cross_entropy("float32"), np.ones((3, 4), "float32"), np.zeros(3, "int32"))


def test_convolution_that_would_loop_per_example_is_an_error():
    model = keras.Sequential(
        [
            keras.Input((8, 2)),
            keras.layers.Conv1D(3, 3, name="conv1d_layer"),
            keras.layers.Flatten(),
            keras.layers.Dense(2),
        ]
    )
    # Conv1D takes the layer-wise path under method="auto"; on the vmap path pfor would loop over its kernel.
    with pytest.raises(ValueError, match="per-example loop.*conv1d_layer"):
        cabs_tf.grad_stats(
            model, cross_entropy("float32"), np.ones((3, 8, 2), "float32"), np.zeros(3, "int32"), method="vmap"
        )


def test_bad_arguments_are_errors(problems):
    model, loss_fn, inputs, targets = problems[("mlp", "float32")]
    with pytest.raises(ValueError, match="same number of examples"):
        cabs_tf.grad_stats(model, loss_fn, inputs[:3], targets[:2])
    with pytest.raises(TypeError, match="`model` must be"):
        cabs_tf.grad_stats(lambda x: x, loss_fn, inputs, targets)
    with pytest.raises(TypeError, match="`loss_fn` must be callable"):
        cabs_tf.grad_stats(model, "mse", inputs, targets)
    with pytest.raises(ValueError, match="at least one example"):
        cabs_tf.grad_stats(model, loss_fn, inputs[:0], targets[:0])


def test_docs_training_loop_runs():
    blocks = re.findall(r"```python\n(.*?)```", DOCS.read_text(), flags=re.DOTALL)
    assert blocks, "docs/tensorflow.md has no python code block"
    namespace: dict = {}
    exec(compile("\n".join(blocks), str(DOCS), "exec"), namespace)  # noqa: S102 - the documented example
    assert namespace["controller"].steps >= 5


def test_grad_stats_inside_a_callers_tf_function(problems):
    model, loss_fn, inputs, targets = problems[("mlp", "float64")]
    optimizer = keras.optimizers.SGD(learning_rate=0.0)  # a zero step keeps the shared model unchanged

    @tf.function(reduce_retracing=True)
    def train_step(batch_inputs, batch_targets):
        stats, gradients = cabs_tf.grad_stats(model, loss_fn, batch_inputs, batch_targets)
        optimizer.apply_gradients(zip(gradients, model.trainable_variables, strict=True))
        return stats

    eager = cabs_tf.grad_stats(model, loss_fn, inputs, targets)[0]
    traced = train_step(tf.constant(inputs), tf.constant(targets))
    for inside, outside in zip(traced, eager, strict=True):
        np.testing.assert_allclose(float(inside), float(outside), rtol=1e-12)
