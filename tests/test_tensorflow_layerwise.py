"""Layer-wise per-example norms, micro-batching and plain steps of the TensorFlow adapter.

Every statistic is checked against an explicit per-example loop (one eager tape per
example) in float64.
"""

from __future__ import annotations

import contextlib

import numpy as np
import pytest

tf = pytest.importorskip("tensorflow")
keras = pytest.importorskip("keras")

from cabs.backends import tensorflow as cabs_tf  # noqa: E402

BATCH = 6
LAYERWISE_RTOL = 1e-9
SPLIT_RTOL = 1e-12


@contextlib.contextmanager
def float64_layers():
    # Layers created inside take float64 variables and compute in float64. Keras caches a global dtype
    # policy from floatx on first use, so both are set and restored.
    previous_floatx, previous_policy = keras.config.floatx(), keras.config.dtype_policy()
    keras.config.set_floatx("float64")
    keras.config.set_dtype_policy("float64")
    try:
        yield
    finally:
        keras.config.set_floatx(previous_floatx)
        keras.config.set_dtype_policy(previous_policy)


def cross_entropy():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")


class SharedReadout(keras.layers.Layer):
    """Uses an embedding matrix a second time as the output projection (tied weights)."""

    def __init__(self, embedding, **kwargs):
        super().__init__(**kwargs)
        self.embedding = embedding

    def call(self, inputs):
        return tf.matmul(inputs, self.embedding.embeddings, transpose_b=True)


def dense_2d():
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(3)]
    ), np.random.default_rng(0).normal(size=(BATCH, 5))


def dense_3d():
    # (time 6, 5 -> 4): the explicit A^T D is cheaper; (time 2, 12 -> 9): the Gram form is.
    return keras.Sequential(
        [
            keras.Input((6, 5)),
            keras.layers.Dense(4, activation="tanh"),
            keras.layers.Reshape((2, 12)),
            keras.layers.Dense(9, activation="tanh", name="gram_dense"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    ), np.random.default_rng(1).normal(size=(BATCH, 6, 5))


def conv1d():
    return keras.Sequential(
        [
            keras.Input((11, 3)),
            keras.layers.Conv1D(4, 3, strides=2, padding="causal", activation="tanh"),
            keras.layers.Conv1D(2, 3, padding="same", dilation_rate=2),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    ), np.random.default_rng(2).normal(size=(BATCH, 11, 3))


def conv2d():
    return keras.Sequential(
        [
            keras.Input((7, 7, 2)),
            keras.layers.Conv2D(4, 3, strides=2, padding="same", activation="tanh"),
            # 3 output positions, 24 patch elements, 8 filters: the Gram form is cheaper here.
            keras.layers.Conv2D(8, (2, 3), strides=(1, 2), padding="valid"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    ), np.random.default_rng(3).normal(size=(BATCH, 7, 7, 2))


def embedding():
    # 8 tokens from a vocabulary of 4: every example repeats ids.
    return keras.Sequential(
        [
            keras.Input((8,), dtype="int32"),
            keras.layers.Embedding(4, 5),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    ), np.random.default_rng(4).integers(0, 4, size=(BATCH, 8)).astype(np.int32)


def normalization():
    return keras.Sequential(
        [
            keras.Input((4, 4, 2)),
            keras.layers.Conv2D(6, 3, padding="same"),
            keras.layers.GroupNormalization(groups=3),
            keras.layers.Reshape((16, 6)),
            keras.layers.LayerNormalization(),
            keras.layers.LayerNormalization(axis=[1, 2], name="two_axis_norm"),
            keras.layers.Flatten(),
            keras.layers.Dense(3),
        ]
    ), np.random.default_rng(5).normal(size=(BATCH, 4, 4, 2))


def tied():
    # One Dense called twice, and an embedding matrix reused as the readout.
    tokens = keras.Input((5,), dtype="int32")
    table = keras.layers.Embedding(3, 4, name="table")
    shared = keras.layers.Dense(4, activation="tanh", name="shared")
    hidden = keras.layers.GlobalAveragePooling1D()(table(tokens))
    logits = SharedReadout(table)(shared(shared(hidden)))
    return keras.Model(tokens, logits), np.random.default_rng(6).integers(0, 3, size=(BATCH, 5)).astype(np.int32)


def fallback():
    # PReLU has no rule: its alpha takes the exact vectorised path, the Dense layers stay layer-wise.
    return keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4), keras.layers.PReLU(name="prelu"), keras.layers.Dense(3)]
    ), np.random.default_rng(7).normal(size=(BATCH, 5))


BUILDERS = {
    "dense_2d": dense_2d,
    "dense_3d": dense_3d,
    "conv1d": conv1d,
    "conv2d": conv2d,
    "embedding": embedding,
    "normalization": normalization,
    "tied": tied,
    "fallback": fallback,
}
# Variables whose path name contains one of these must take the exact path; all others the layer-wise one.
EXACT_VARIABLES = {"tied": ("table", "shared"), "fallback": ("prelu",)}


def make_problem(kind: str):
    keras.utils.set_random_seed(10)
    with float64_layers():
        model, inputs = BUILDERS[kind]()
    if inputs.dtype != np.int32:
        inputs = inputs.astype(np.float64)
    targets = np.random.default_rng(20).integers(0, 3, size=BATCH).astype(np.int32)
    return model, cross_entropy(), inputs, targets


@pytest.fixture(scope="module")
def problems():
    return {kind: make_problem(kind) for kind in BUILDERS}


def per_example_oracle(model, loss_fn, inputs, targets):
    """Losses and flattened gradients of each example from its own eager tape, as NumPy float64."""
    losses, gradients = [], []
    for index in range(len(inputs)):
        with tf.GradientTape() as tape:
            outputs = model(inputs[index : index + 1], training=True)
            loss = tf.reduce_sum(loss_fn(targets[index : index + 1], outputs))
        example = tape.gradient(loss, model.trainable_variables)
        gradients.append([np.asarray(tf.convert_to_tensor(g), dtype=np.float64) for g in example])
        losses.append(float(loss))
    return np.asarray(losses), gradients


def assert_matches_oracle(stats, gradients, model, loss_fn, inputs, targets, rtol):
    losses, per_example = per_example_oracle(model, loss_fn, inputs, targets)
    mean = [np.mean([g[k] for g in per_example], axis=0) for k in range(len(per_example[0]))]
    assert float(stats.count) == len(inputs)
    np.testing.assert_allclose(float(stats.loss), losses.mean(), rtol=rtol)
    np.testing.assert_allclose(float(stats.sq_norm_sum), sum(np.sum(g**2) for e in per_example for g in e), rtol=rtol)
    np.testing.assert_allclose(float(stats.grad_sq_norm), sum(np.sum(g**2) for g in mean), rtol=rtol)
    for gradient, expected in zip(gradients, mean, strict=True):
        np.testing.assert_allclose(np.asarray(gradient), expected, rtol=rtol, atol=rtol * np.abs(expected).max())


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_layerwise_norms_match_per_example_loop(problems, kind):
    model, loss_fn, inputs, targets = problems[kind]
    function = cabs_tf.stats_function(model, loss_fn)
    stats, gradients = function(inputs, targets)
    assert stats.sq_norm_sum.dtype == tf.float64
    assert_matches_oracle(stats, gradients, model, loss_fn, inputs, targets, LAYERWISE_RTOL)
    exact_markers = EXACT_VARIABLES.get(kind, ())
    expected_plan = {
        variable.path: "vmap" if any(marker in variable.path for marker in exact_markers) else "layerwise"
        for variable in model.trainable_variables
    }
    assert function.plan(inputs, targets) == expected_plan


@pytest.mark.parametrize("kind", ["dense_3d", "tied"])
def test_vmap_method_agrees_with_auto(problems, kind):
    model, loss_fn, inputs, targets = problems[kind]
    auto_stats, _ = cabs_tf.grad_stats(model, loss_fn, inputs, targets)
    vmap_function = cabs_tf.stats_function(model, loss_fn, method="vmap")
    vmap_stats, _ = vmap_function(inputs, targets)
    assert set(vmap_function.plan(inputs, targets).values()) == {"vmap"}
    for auto, vmap in zip(auto_stats, vmap_stats, strict=True):
        np.testing.assert_allclose(float(auto), float(vmap), rtol=LAYERWISE_RTOL)


def test_layerwise_method_refuses_variables_without_a_rule(problems):
    model, loss_fn, inputs, targets = problems["fallback"]
    with pytest.raises(ValueError, match="method='layerwise'.*prelu"):
        cabs_tf.grad_stats(model, loss_fn, inputs, targets, method="layerwise")
    with pytest.raises(ValueError, match="`method` must be one of"):
        cabs_tf.grad_stats(model, loss_fn, inputs, targets, method="fast")


def test_changing_batch_sizes_do_not_retrace_the_layerwise_path(problems):
    model, loss_fn, inputs, targets = problems["normalization"]
    function = cabs_tf.stats_function(model, loss_fn)
    counts = []
    for size in (1, 2, 5, 3, 6):
        stats, _ = function(inputs[:size], targets[:size])
        assert float(stats.count) == size
        counts.append(function.trace_count)
    assert counts == [counts[0]] * len(counts) and counts[0] >= 1


@pytest.mark.parametrize("kind", ["conv2d", "embedding", "tied", "fallback"])
@pytest.mark.parametrize("max_examples_per_pass", [1, 4])
def test_micro_batches_give_the_whole_batch(problems, kind, max_examples_per_pass):
    model, loss_fn, inputs, targets = problems[kind]
    function = cabs_tf.stats_function(model, loss_fn)
    whole_stats, whole_gradients = function(inputs, targets)
    traces = function.trace_count
    split_stats, split_gradients = function(inputs, targets, max_examples_per_pass=max_examples_per_pass)
    assert function.trace_count == traces
    for split, whole in zip(split_stats, whole_stats, strict=True):
        np.testing.assert_allclose(float(split), float(whole), rtol=SPLIT_RTOL)
    for split, whole in zip(split_gradients, whole_gradients, strict=True):
        np.testing.assert_allclose(np.asarray(split), np.asarray(whole), rtol=SPLIT_RTOL, atol=1e-15)
    assert_matches_oracle(split_stats, split_gradients, model, loss_fn, inputs, targets, LAYERWISE_RTOL)


def test_bad_max_examples_per_pass_is_an_error(problems):
    model, loss_fn, inputs, targets = problems["dense_2d"]
    for bad in (0, 2.5, True):
        with pytest.raises(ValueError, match="`max_examples_per_pass` must be a positive int"):
            cabs_tf.grad_stats(model, loss_fn, inputs, targets, max_examples_per_pass=bad)


@pytest.mark.parametrize("kind", ["conv2d", "tied"])
def test_plain_gradients_for_steps_without_statistics(problems, kind):
    model, loss_fn, inputs, targets = problems[kind]
    function = cabs_tf.stats_function(model, loss_fn)
    loss, gradients = function.gradients(inputs, targets)
    losses, per_example = per_example_oracle(model, loss_fn, inputs, targets)
    np.testing.assert_allclose(float(loss), losses.mean(), rtol=LAYERWISE_RTOL)
    for gradient, variable, index in zip(gradients, model.trainable_variables, range(len(gradients)), strict=True):
        expected = np.mean([example[index] for example in per_example], axis=0)
        assert gradient.dtype == variable.dtype
        np.testing.assert_allclose(np.asarray(gradient), expected, rtol=LAYERWISE_RTOL, atol=1e-15)
    split_loss, _ = function.gradients(inputs, targets, max_examples_per_pass=4)
    np.testing.assert_allclose(float(split_loss), float(loss), rtol=SPLIT_RTOL)
    sums = function.batch_sums(inputs, targets, compute_stats=False)
    assert np.isnan(float(sums.sq_norm_sum)) and float(sums.count) == BATCH


@pytest.mark.parametrize(("steps", "inputs_size", "outputs_size"), [(1, 3, 4), (2, 12, 9), (6, 5, 4)])
def test_gram_and_explicit_forms_equal_the_outer_product_norm(steps, inputs_size, outputs_size):
    from cabs.backends import _tensorflow_layerwise as layerwise

    rng = np.random.default_rng(30)
    activations = rng.normal(size=(3, steps, inputs_size))
    output_gradients = rng.normal(size=(3, steps, outputs_size))
    expected = [np.sum((a.T @ d) ** 2) for a, d in zip(activations, output_gradients, strict=True)]
    norms = layerwise._outer_product_sq_norms(tf.constant(activations), tf.constant(output_gradients))
    np.testing.assert_allclose(np.asarray(norms), expected, rtol=1e-12)


# Layers whose axis 0 is not the example axis, and layers the user patched: the rules must not be trusted.


class ReshapedBatch(keras.layers.Layer):
    """Calls a Dense on the batch reshaped to two rows per example: [b, 6] -> [2b, 3] -> [b, 8]."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(4, name="reshaped_dense")

    def call(self, inputs):
        count = tf.shape(inputs)[0]
        return tf.reshape(tf.tanh(self.inner(tf.reshape(inputs, [count * 2, 3]))), [count, 8])


class TimeMajor(keras.layers.Layer):
    """Calls a Dense on the batch transposed to [time 2, b, 3]."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(4, name="time_major_dense")

    def call(self, inputs):
        hidden = tf.tanh(self.inner(tf.transpose(inputs, [1, 0, 2])))
        return tf.reshape(tf.transpose(hidden, [1, 0, 2]), [-1, 8])


class UnknownSteps(keras.layers.Layer):
    """Makes the time axis unknown while tracing, as a variable-length sequence would be."""

    def call(self, inputs):
        return tf.reshape(inputs, [tf.shape(inputs)[0], -1, 3])


def layout_problem(kind: str, batch: int = BATCH):
    keras.utils.set_random_seed(11)
    with float64_layers():
        if kind == "reshaped_batch":
            model = keras.Sequential([keras.Input((6,)), ReshapedBatch(), keras.layers.Dense(3, name="head")])
            inputs = np.random.default_rng(8).normal(size=(batch, 6))
        elif kind == "time_major":
            model = keras.Sequential([keras.Input((2, 3)), TimeMajor(), keras.layers.Dense(3, name="head")])
            inputs = np.random.default_rng(9).normal(size=(batch, 2, 3))
        else:
            model = keras.Sequential(
                [
                    keras.Input((4, 3)),
                    UnknownSteps(),
                    keras.layers.Dense(5, activation="tanh"),
                    keras.layers.GlobalAveragePooling1D(),
                    keras.layers.Dense(3),
                ]
            )
            inputs = np.random.default_rng(12).normal(size=(batch, 4, 3))
    targets = np.random.default_rng(21).integers(0, 3, size=batch).astype(np.int32)
    return model, cross_entropy(), inputs, targets


def routes(plan, layer):
    """The paths ("layerwise" / "vmap") the plan gives the layer's variables."""
    assert layer.trainable_variables
    return {plan[variable.path] for variable in layer.trainable_variables}


def test_a_layer_on_a_reshaped_batch_is_a_clear_error_not_a_wrong_number():
    model, loss_fn, inputs, targets = layout_problem("reshaped_batch")
    with pytest.raises(
        ValueError, match=r"`method` must be 'vmap'.*layer reshaped_dense got a leading size of 12 for 6 examples"
    ):
        cabs_tf.grad_stats(model, loss_fn, inputs, targets)
    with pytest.raises(ValueError, match="leading size of 4 for 2 examples"):
        cabs_tf.grad_stats(model, loss_fn, inputs, targets, max_examples_per_pass=2)
    stats, gradients = cabs_tf.grad_stats(model, loss_fn, inputs, targets, method="vmap")
    assert_matches_oracle(stats, gradients, model, loss_fn, inputs, targets, LAYERWISE_RTOL)


@pytest.mark.parametrize("batch", [BATCH, 2])  # 2: as many examples as time steps, so the sizes agree
def test_a_time_major_layer_takes_the_exact_path(batch):
    model, loss_fn, inputs, targets = layout_problem("time_major", batch)
    function = cabs_tf.stats_function(model, loss_fn)
    stats, gradients = function(inputs, targets)
    assert_matches_oracle(stats, gradients, model, loss_fn, inputs, targets, LAYERWISE_RTOL)
    plan = function.plan(inputs, targets)
    assert routes(plan, model.layers[0].inner) == {"vmap"}
    assert routes(plan, model.layers[-1]) == {"layerwise"}


def test_a_time_major_layer_does_not_retrace_for_new_batch_sizes():
    model, loss_fn, inputs, targets = layout_problem("time_major")
    function = cabs_tf.stats_function(model, loss_fn)
    counts = []
    for size in (1, 2, 5, 6):
        stats, gradients = function(inputs[:size], targets[:size])
        assert_matches_oracle(stats, gradients, model, loss_fn, inputs[:size], targets[:size], LAYERWISE_RTOL)
        counts.append(function.trace_count)
    assert counts == [counts[0]] * len(counts) and counts[0] >= 1


def test_a_time_axis_unknown_while_tracing_stays_layerwise_and_exact():
    model, loss_fn, inputs, targets = layout_problem("unknown_steps")
    function = cabs_tf.stats_function(model, loss_fn)
    stats, gradients = function(inputs, targets)
    assert_matches_oracle(stats, gradients, model, loss_fn, inputs, targets, LAYERWISE_RTOL)
    assert set(function.plan(inputs, targets).values()) == {"layerwise"}


def test_a_call_patched_on_the_instance_takes_the_exact_path_and_survives():
    keras.utils.set_random_seed(12)
    with float64_layers():
        patched = keras.layers.Dense(4, name="patched")
        model = keras.Sequential([keras.Input((5,)), patched, keras.layers.Dense(3, name="head")])
    original_call = patched.call

    def doubled_call(inputs, *args, **kwargs):  # not the Dense identity: the rule would miss the square
        return tf.square(original_call(inputs, *args, **kwargs))

    patched.call = doubled_call
    loss_fn = cross_entropy()
    inputs = np.random.default_rng(13).normal(size=(BATCH, 5))
    targets = np.random.default_rng(22).integers(0, 3, size=BATCH).astype(np.int32)
    function = cabs_tf.stats_function(model, loss_fn)
    stats, gradients = function(inputs, targets)
    assert_matches_oracle(stats, gradients, model, loss_fn, inputs, targets, LAYERWISE_RTOL)
    plan = function.plan(inputs, targets)
    assert routes(plan, patched) == {"vmap"}
    assert routes(plan, model.layers[-1]) == {"layerwise"}
    assert vars(patched)["call"] is doubled_call


def test_a_patched_convolution_op_is_never_replaced_by_the_rules():
    keras.utils.set_random_seed(14)
    with float64_layers():
        conv = keras.layers.Conv2D(2, 3, name="patched_conv")
        model = keras.Sequential([keras.Input((5, 5, 1)), conv, keras.layers.Flatten(), keras.layers.Dense(3)])
    original_op = conv.convolution_op

    def scaled_op(inputs, kernel):
        return 2.0 * original_op(inputs, kernel)

    conv.convolution_op = scaled_op
    loss_fn = cross_entropy()
    inputs = np.random.default_rng(15).normal(size=(BATCH, 5, 5, 1))
    targets = np.random.default_rng(23).integers(0, 3, size=BATCH).astype(np.int32)
    # Neither the layer-wise rule nor the patches identity may stand in for the user's op; pfor's own
    # filter-gradient rule loops, which the adapter reports instead of looping.
    with pytest.raises(ValueError, match="per-example loop"):
        cabs_tf.grad_stats(model, loss_fn, inputs, targets)
    assert vars(conv)["convolution_op"] is scaled_op
