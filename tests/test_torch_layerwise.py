"""Layer-wise per-example gradient norms (PyTorch) against one ordinary backward per example, in float64."""

from __future__ import annotations

import copy

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from cabs.backends import _torch_layerwise as layerwise  # noqa: E402
from cabs.backends import torch as cabs_torch  # noqa: E402

nn = torch.nn
CROSS_ENTROPY = nn.CrossEntropyLoss(reduction="none")
RTOL = 1e-9


def loop_norms(model, loss_fn, inputs, targets):
    """Per-example squared norms of each parameter's gradient, one backward per example, NumPy float64."""
    names = [key for key, value in model.named_parameters() if value.requires_grad]
    norms = {key: [] for key in names}
    for index in range(targets.shape[0]):
        model.zero_grad(set_to_none=True)
        loss_fn(model(*(tensor[index : index + 1] for tensor in inputs)), targets[index : index + 1]).sum().backward()
        for key, value in model.named_parameters():
            if key in norms:
                grad = np.zeros(1) if value.grad is None else value.grad.detach().double().numpy()
                norms[key].append(float(np.sum(grad * grad)))
    return {key: np.asarray(value) for key, value in norms.items()}


def loop_stats(model, loss_fn, inputs, targets):
    """GradStats fields and mean gradients from one backward per example, NumPy float64."""
    parameters = [value for value in model.parameters() if value.requires_grad]
    losses, flats, grads = [], [], []
    for index in range(targets.shape[0]):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(*(tensor[index : index + 1] for tensor in inputs)), targets[index : index + 1]).sum()
        loss.backward()
        losses.append(float(loss.detach()))
        example = [
            np.zeros(tuple(value.shape)) if value.grad is None else value.grad.double().numpy() for value in parameters
        ]
        grads.append(example)
        flats.append(np.concatenate([grad.ravel() for grad in example]))
    flat = np.stack(flats)
    mean_flat = flat.mean(axis=0)
    return {
        "loss": float(np.mean(losses)),
        "grad_sq_norm": float(mean_flat @ mean_flat),
        "sq_norm_sum": float(np.sum(flat * flat)),
        "mean_grads": [np.mean([example[k] for example in grads], axis=0) for k in range(len(parameters))],
    }


# Models: each exercises one layer kind (and its options) ----------------------------------------


class Sequence(nn.Module):
    """Embedding with repeated ids and a padding id, a Linear on [batch, time, features], LayerNorm."""

    def __init__(self, time_features=6, hidden=5):
        super().__init__()
        self.embedding = nn.Embedding(7, time_features, padding_idx=0)
        self.dense = nn.Linear(time_features, hidden)
        self.norm = nn.LayerNorm(hidden)
        self.head = nn.Linear(hidden, 3)

    def forward(self, token_ids):
        hidden = self.norm(torch.tanh(self.dense(self.embedding(token_ids))))
        return self.head(hidden.mean(1))


class Scale(nn.Module):
    """A custom layer with its own parameter: no layer rule, so it takes the vmap path."""

    def __init__(self, size):
        super().__init__()
        self.scale = nn.Parameter(torch.linspace(0.5, 1.5, size))

    def forward(self, inputs):
        return inputs * self.scale


class LinearTwice(nn.Module):
    """One Linear called twice: its calls have cross terms."""

    def __init__(self):
        super().__init__()
        self.inner = nn.Linear(4, 4)
        self.head = nn.Linear(4, 3)

    def forward(self, inputs):
        return self.head(torch.tanh(self.inner(torch.tanh(self.inner(inputs)))))


class TiedEmbedding(nn.Module):
    """The embedding matrix reused as the output projection (functionally, outside its module)."""

    def __init__(self):
        super().__init__()
        self.embedding = nn.Embedding(5, 4)
        self.dense = nn.Linear(4, 4)

    def forward(self, token_ids):
        hidden = torch.tanh(self.dense(self.embedding(token_ids).mean(1)))
        return nn.functional.linear(hidden, self.embedding.weight)


def shared_module_model():
    """The same Linear registered twice in a Sequential: one parameter under two names."""
    shared = nn.Linear(4, 4)
    return nn.Sequential(shared, nn.Tanh(), shared, nn.Linear(4, 3))


def rms_norm_model():
    if not hasattr(nn, "RMSNorm"):
        pytest.skip("this torch has no nn.RMSNorm")
    return nn.Sequential(nn.Linear(4, 6), nn.RMSNorm(6), nn.Linear(6, 3))


def random_ids(count, time, vocabulary):
    generator = torch.Generator().manual_seed(3)
    ids = torch.randint(0, vocabulary, (count, time), generator=generator)
    ids[:, 1] = ids[:, 0]  # every example repeats an id
    ids[0, 2] = 0  # and one holds the padding id
    return ids


def float_inputs(*shape):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(2), dtype=torch.float64)


CASES = {
    "linear_2d": (lambda: nn.Sequential(nn.Linear(5, 7), nn.ReLU(inplace=True), nn.Linear(7, 3)), (6, 5)),
    # T=3 with p, q >= 6: the Gram form is cheaper; T=20 with p=2, q=2: the explicit form is.
    "linear_3d_gram": (lambda: nn.Sequential(nn.Linear(6, 8), nn.Tanh(), nn.Flatten(), nn.Linear(24, 3)), (6, 3, 6)),
    "linear_3d_explicit": (
        lambda: nn.Sequential(nn.Linear(2, 2), nn.Tanh(), nn.Flatten(), nn.Linear(40, 3)),
        (5, 4, 5, 2),
    ),
    "conv1d": (
        lambda: nn.Sequential(
            nn.Conv1d(2, 4, 3, stride=2, padding=1),
            nn.Tanh(),
            nn.Conv1d(4, 4, 3, padding="same", dilation=2, groups=2, padding_mode="circular"),
            nn.Flatten(),
            nn.Linear(20, 3),
        ),
        (6, 2, 9),
    ),
    "conv2d": (
        lambda: nn.Sequential(
            nn.Conv2d(2, 4, 3, stride=2, padding=1),
            nn.ReLU(),
            nn.Conv2d(4, 6, (3, 2), padding=(2, 1), dilation=(2, 1), groups=2, padding_mode="reflect"),
            nn.MaxPool2d(2),
            nn.Flatten(),
            nn.Linear(24, 3),
        ),
        (6, 2, 7, 7),
    ),
    "group_norm": (
        lambda: nn.Sequential(nn.Conv2d(2, 4, 3), nn.GroupNorm(2, 4), nn.Flatten(), nn.Linear(36, 3)),
        (6, 2, 5, 5),
    ),
    "layer_norm_2d": (
        lambda: nn.Sequential(nn.Conv2d(2, 3, 3), nn.LayerNorm([3, 3, 3]), nn.Flatten(), nn.Linear(27, 3)),
        (6, 2, 5, 5),
    ),
    "rms_norm": (rms_norm_model, (6, 4)),
    "fallback_custom": (lambda: nn.Sequential(nn.Linear(4, 5), Scale(5), nn.PReLU(), nn.Linear(5, 3)), (6, 4)),
    "module_called_twice": (LinearTwice, (6, 4)),
    "shared_module": (shared_module_model, (6, 4)),
}


def build(case):
    make_model, shape = CASES[case]
    torch.manual_seed(0)
    return make_model().double(), (float_inputs(*shape),), torch.arange(shape[0]) % 3


@pytest.mark.parametrize("case", sorted(CASES))
def test_per_example_norms_equal_the_loop(case):
    model, inputs, targets = build(case)
    expected = loop_norms(model, CROSS_ENTROPY, inputs, targets)
    norms = layerwise.per_example_sq_norms(model, CROSS_ENTROPY, inputs, targets)
    assert sorted(norms) == sorted(expected)
    for key, value in expected.items():
        np.testing.assert_allclose(norms[key].numpy(), value, rtol=RTOL, err_msg=key)


@pytest.mark.parametrize("model_class", [Sequence, TiedEmbedding])
def test_embedding_norms_equal_the_loop(model_class):
    torch.manual_seed(0)
    model = model_class().double()
    vocabulary = model.embedding.num_embeddings
    inputs, targets = (random_ids(6, 5, vocabulary),), torch.arange(6) % 3
    expected = loop_norms(model, CROSS_ENTROPY, inputs, targets)
    norms = layerwise.per_example_sq_norms(model, CROSS_ENTROPY, inputs, targets)
    for key, value in expected.items():
        np.testing.assert_allclose(norms[key].numpy(), value, rtol=RTOL, err_msg=key)


def test_both_forms_of_the_outer_product_agree_with_an_explicit_sum():
    generator = torch.Generator().manual_seed(5)
    for steps, inputs_size, outputs_size in [(3, 8, 9), (12, 2, 3), (1, 4, 4)]:
        activations = torch.randn(4, steps, inputs_size, dtype=torch.float64, generator=generator)
        output_grads = torch.randn(4, steps, outputs_size, dtype=torch.float64, generator=generator)
        expected = [float(np.sum((activations[i].numpy().T @ output_grads[i].numpy()) ** 2)) for i in range(4)]
        actual = layerwise._outer_product_sq_norms(activations, output_grads)
        np.testing.assert_allclose(actual.numpy(), expected, rtol=RTOL)


CONVOLUTIONS = {
    "conv1d_strided": (lambda: nn.Conv1d(2, 4, 3, stride=2, padding=1), (3, 2, 9)),
    "conv1d_few_positions": (lambda: nn.Conv1d(4, 8, 3), (3, 4, 4)),
    "conv1d_circular_groups": (
        lambda: nn.Conv1d(4, 6, 3, padding="same", dilation=2, groups=2, padding_mode="circular"),
        (3, 4, 7),
    ),
    "conv2d_strided_padded": (lambda: nn.Conv2d(2, 3, (3, 2), stride=(2, 3), padding=(1, 2)), (3, 2, 7, 8)),
    "conv2d_few_positions": (lambda: nn.Conv2d(3, 8, 3, stride=2), (3, 3, 5, 5)),
    "conv2d_reflect_dilated_groups": (
        lambda: nn.Conv2d(4, 6, 3, padding=2, dilation=2, groups=2, padding_mode="reflect"),
        (3, 4, 5, 6),
    ),
}


@pytest.mark.parametrize("case", sorted(CONVOLUTIONS))
@pytest.mark.parametrize("form", ["gram", "explicit"])
def test_both_forms_of_the_convolution_rule_equal_the_loop(case, form):
    make_layer, shape = CONVOLUTIONS[case]
    torch.manual_seed(0)
    layer = make_layer().double()
    inputs = float_inputs(*shape)
    with torch.no_grad():
        output_grads = torch.randn_like(layer(inputs))
    expected = []
    for index in range(shape[0]):
        layer.zero_grad(set_to_none=True)
        # The loss <conv(x_i), R_i> has R_i as its output gradient.
        (layer(inputs[index : index + 1]) * output_grads[index : index + 1]).sum().backward()
        expected.append(float(layer.weight.grad.pow(2).sum()))
    padded = layerwise._padded_input(layer, inputs)
    compute = layerwise._conv_gram_sq_norms if form == "gram" else layerwise._conv_explicit_sq_norms
    np.testing.assert_allclose(compute(layer, padded, output_grads).numpy(), expected, rtol=RTOL)


def test_frozen_parameters_are_left_out():
    model, inputs, targets = build("conv2d")
    model[0].weight.requires_grad_(False)
    model[5].bias.requires_grad_(False)
    expected = loop_norms(model, CROSS_ENTROPY, inputs, targets)
    norms = layerwise.per_example_sq_norms(model, CROSS_ENTROPY, inputs, targets)
    assert sorted(norms) == sorted(expected) and "0.weight" not in norms
    for key, value in expected.items():
        np.testing.assert_allclose(norms[key].numpy(), value, rtol=RTOL, err_msg=key)


def test_plan_names_the_method_of_each_parameter():
    model, inputs, _ = build("fallback_custom")
    assert layerwise.plan(model) == {
        "0.weight": "layerwise",
        "0.bias": "layerwise",
        "1.scale": "vmap",
        "2.weight": "vmap",
        "3.weight": "layerwise",
        "3.bias": "layerwise",
    }
    twice, twice_inputs, _ = build("module_called_twice")
    # Structure alone cannot see the second call; a forward can.
    assert layerwise.plan(twice)["inner.weight"] == "layerwise"
    found = layerwise.plan(twice, twice_inputs)
    assert found["inner.weight"] == found["inner.bias"] == "vmap"
    assert found["head.weight"] == "layerwise"
    shared, _, _ = build("shared_module")
    assert layerwise.plan(shared)["0.weight"] == "vmap"


def test_tied_weight_used_outside_its_module_takes_the_vmap_path():
    model = TiedEmbedding().double()
    found = layerwise.plan(model, random_ids(2, 5, 5))
    assert found["embedding.weight"] == "vmap"
    assert found["dense.weight"] == "layerwise"


@pytest.mark.parametrize("case", ["conv2d", "fallback_custom", "module_called_twice"])
def test_grad_stats_and_mean_gradient_equal_the_loop(case):
    model, inputs, targets = build(case)
    expected = loop_stats(model, CROSS_ENTROPY, inputs, targets)
    stats = layerwise.layerwise_grad_stats(model, CROSS_ENTROPY, inputs, targets)
    assert int(stats.count) == targets.shape[0]
    assert stats.sq_norm_sum.dtype == torch.float64
    np.testing.assert_allclose(float(stats.loss), expected["loss"], rtol=RTOL)
    np.testing.assert_allclose(float(stats.grad_sq_norm), expected["grad_sq_norm"], rtol=RTOL)
    np.testing.assert_allclose(float(stats.sq_norm_sum), expected["sq_norm_sum"], rtol=RTOL)
    parameters = [value for value in model.parameters() if value.requires_grad]
    for parameter, mean in zip(parameters, expected["mean_grads"], strict=True):
        np.testing.assert_allclose(parameter.grad.numpy(), mean, rtol=RTOL, atol=RTOL * np.abs(mean).max())


@pytest.mark.parametrize("case", ["conv2d", "fallback_custom", "linear_3d_gram"])
@pytest.mark.parametrize("max_examples_per_pass", [1, 4])
def test_micro_batches_give_the_whole_batch_statistics(case, max_examples_per_pass):
    model, inputs, targets = build(case)
    whole = layerwise.layerwise_grad_stats(model, CROSS_ENTROPY, inputs, targets)
    whole_grads = [value.grad.clone() for value in model.parameters()]
    split = layerwise.layerwise_grad_stats(
        model, CROSS_ENTROPY, inputs, targets, max_examples_per_pass=max_examples_per_pass
    )
    assert int(split.count) == int(whole.count)
    for field in ("loss", "grad_sq_norm", "sq_norm_sum"):
        np.testing.assert_allclose(float(getattr(split, field)), float(getattr(whole, field)), rtol=1e-12)
    for parameter, expected in zip(model.parameters(), whole_grads, strict=True):
        np.testing.assert_allclose(parameter.grad.numpy(), expected.numpy(), rtol=1e-12, atol=1e-15)


def test_mean_grad_leaves_the_plain_mean_gradient_and_returns_the_mean_loss():
    model, inputs, targets = build("conv2d")
    expected = loop_stats(model, CROSS_ENTROPY, inputs, targets)
    loss = layerwise.mean_grad(model, CROSS_ENTROPY, inputs, targets, max_examples_per_pass=4)
    np.testing.assert_allclose(float(loss), expected["loss"], rtol=RTOL)
    for parameter, mean in zip(model.parameters(), expected["mean_grads"], strict=True):
        np.testing.assert_allclose(parameter.grad.numpy(), mean, rtol=RTOL, atol=RTOL * np.abs(mean).max())


def test_float32_model_accumulates_in_float32_close_to_float64():
    model, inputs, targets = build("conv2d")
    expected = layerwise.layerwise_grad_stats(model, CROSS_ENTROPY, inputs, targets)
    model = model.float()
    stats = layerwise.layerwise_grad_stats(model, CROSS_ENTROPY, (inputs[0].float(),), targets)
    assert stats.sq_norm_sum.dtype == torch.float32
    np.testing.assert_allclose(float(stats.sq_norm_sum), float(expected.sq_norm_sum), rtol=1e-4)


@pytest.mark.parametrize("max_examples_per_pass", [None, 4])
def test_bfloat16_model_accumulates_in_float32_and_keeps_its_grad_dtype(max_examples_per_pass):
    model, inputs, targets = build("conv2d")
    expected = layerwise.layerwise_grad_stats(model, CROSS_ENTROPY, inputs, targets)
    model = model.bfloat16()
    stats = layerwise.layerwise_grad_stats(
        model, CROSS_ENTROPY, (inputs[0].bfloat16(),), targets, max_examples_per_pass=max_examples_per_pass
    )
    assert stats.sq_norm_sum.dtype == stats.grad_sq_norm.dtype == torch.float32
    assert all(value.grad.dtype == torch.bfloat16 for value in model.parameters())
    # bfloat16 keeps 8 bits of mantissa: a few per cent is what it can give.
    np.testing.assert_allclose(float(stats.sq_norm_sum), float(expected.sq_norm_sum), rtol=5e-2)
    np.testing.assert_allclose(float(stats.grad_sq_norm), float(expected.grad_sq_norm), rtol=5e-2)


def test_strict_layerwise_refuses_parameters_without_a_rule():
    model, inputs, targets = build("fallback_custom")
    with pytest.raises(ValueError, match=r"method.*1\.scale"):
        layerwise.layerwise_grad_stats(model, CROSS_ENTROPY, inputs, targets, method="layerwise")


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"method": "fast"}, "`method` must be one of"),
        ({"max_examples_per_pass": 0}, "`max_examples_per_pass` must be a positive integer"),
        ({"max_examples_per_pass": 2.0}, "`max_examples_per_pass` must be a positive integer"),
    ],
)
def test_bad_options_are_refused(options, message):
    model, inputs, targets = build("linear_2d")
    with pytest.raises(ValueError, match=message):
        layerwise.layerwise_grad_stats(model, CROSS_ENTROPY, inputs, targets, **options)


def test_a_loss_that_is_not_per_example_is_refused():
    model, inputs, targets = build("linear_2d")
    with pytest.raises(ValueError, match="`loss_fn` must return per-example losses"):
        layerwise.layerwise_grad_stats(model, nn.CrossEntropyLoss(), inputs, targets)


# Through the adapter ----------------------------------------------------------------------------


@pytest.mark.parametrize("method", ["auto", "vmap"])
@pytest.mark.parametrize("options", [{}, {"max_examples_per_pass": 4, "chunk_size": 2}])
def test_adapter_methods_equal_the_loop(method, options):
    model, inputs, targets = build("fallback_custom")
    expected = loop_stats(model, CROSS_ENTROPY, inputs, targets)
    stats = cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs[0], targets, method=method, **options)
    np.testing.assert_allclose(float(stats.sq_norm_sum), expected["sq_norm_sum"], rtol=RTOL)
    np.testing.assert_allclose(float(stats.grad_sq_norm), expected["grad_sq_norm"], rtol=RTOL)
    np.testing.assert_allclose(float(stats.loss), expected["loss"], rtol=RTOL)
    for parameter, mean in zip(model.parameters(), expected["mean_grads"], strict=True):
        np.testing.assert_allclose(parameter.grad.numpy(), mean, rtol=RTOL, atol=RTOL * np.abs(mean).max())


def test_adapter_layerwise_runs_one_forward_and_refuses_what_it_cannot_do():
    model, inputs, targets = build("conv2d")
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape[0]))
    cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs[0], targets, method="layerwise")
    assert calls == [targets.shape[0]]  # one ordinary forward of the whole batch, nothing vmapped
    custom, custom_inputs, custom_targets = build("fallback_custom")
    with pytest.raises(ValueError, match="method"):
        cabs_torch.grad_stats(custom, CROSS_ENTROPY, custom_inputs[0], custom_targets, method="layerwise")
    with pytest.raises(ValueError, match="`method` must be one of"):
        cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs[0], targets, method="exact")


def test_adapter_mean_grad_and_plan():
    model, inputs, targets = build("fallback_custom")
    expected = loop_stats(model, CROSS_ENTROPY, inputs, targets)
    loss = cabs_torch.mean_grad(model, CROSS_ENTROPY, inputs[0], targets, max_examples_per_pass=5)
    np.testing.assert_allclose(float(loss), expected["loss"], rtol=RTOL)
    for parameter, mean in zip(model.parameters(), expected["mean_grads"], strict=True):
        np.testing.assert_allclose(parameter.grad.numpy(), mean, rtol=RTOL, atol=RTOL * np.abs(mean).max())
    assert cabs_torch.plan(model)["1.scale"] == "vmap"
    with pytest.raises(TypeError, match="`model` must be a torch.nn.Module"):
        cabs_torch.mean_grad(object(), CROSS_ENTROPY, inputs[0], targets)


# Models the layer rules must not take at face value (adversarial cases) -------------------------


class ReshapedBatch(nn.Module):
    """A Linear on [batch * 2, 3]: each of its input rows is half an example."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(3, 4), nn.Linear(8, 3)

    def forward(self, inputs):
        count = inputs.shape[0]
        return self.head(torch.tanh(self.inner(inputs.reshape(count * 2, 3))).reshape(count, 8))


class TimeMajor(nn.Module):
    """A Linear on [time, batch, features]: dim 0 of its input is time, not the example."""

    def __init__(self):
        super().__init__()
        self.inner, self.head = nn.Linear(3, 4), nn.Linear(8, 3)

    def forward(self, inputs):
        hidden = torch.tanh(self.inner(inputs.transpose(0, 1)))
        return self.head(hidden.transpose(0, 1).reshape(inputs.shape[0], 8))


class Temperature(nn.Module):
    """A learnable 0-d temperature next to a Linear."""

    def __init__(self):
        super().__init__()
        self.dense, self.temperature = nn.Linear(4, 3), nn.Parameter(torch.tensor(1.5))

    def forward(self, inputs):
        return self.dense(inputs) * self.temperature


class MaxNormEmbedding(nn.Module):
    """An Embedding with max_norm (renormalises its table in place) and a PReLU that takes the vmap path."""

    def __init__(self):
        super().__init__()
        self.embedding, self.activation, self.head = nn.Embedding(6, 4, max_norm=0.5), nn.PReLU(), nn.Linear(4, 3)

    def forward(self, ids):
        return self.head(self.activation(self.embedding(ids)).sum(1))


def hooked_output_model():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].register_forward_hook(lambda module, args, output: output * 3)
    return model


def hooked_input_model():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    model[0].register_forward_pre_hook(lambda module, args: (args[0] * 3,))
    return model


def patched_forward_model():
    model = nn.Sequential(nn.Linear(4, 6), nn.Tanh(), nn.Linear(6, 3))
    layer = model[0]
    layer.forward = lambda inputs: nn.functional.linear(2 * inputs, layer.weight, layer.bias)
    return model


def old_weight_norm_model():
    with pytest.warns(FutureWarning):
        normalized = nn.utils.weight_norm(nn.Linear(4, 6))
    return nn.Sequential(normalized, nn.Tanh(), nn.Linear(6, 3))


def parametrized_weight_norm_model():
    return nn.Sequential(nn.utils.parametrizations.weight_norm(nn.Linear(4, 6)), nn.Tanh(), nn.Linear(6, 3))


ADVERSARIAL = {
    "reshaped_batch": (ReshapedBatch, (6, 6)),
    "time_major": (TimeMajor, (6, 2, 3)),
    "forward_hook_changes_output": (hooked_output_model, (6, 4)),
    "forward_pre_hook_changes_input": (hooked_input_model, (6, 4)),
    "instance_forward": (patched_forward_model, (6, 4)),
    "zero_dim_parameter": (Temperature, (6, 4)),
    "old_weight_norm": (old_weight_norm_model, (6, 4)),
    "parametrized_weight_norm": (parametrized_weight_norm_model, (6, 4)),
}


def build_adversarial(case):
    make_model, shape = ADVERSARIAL[case]
    torch.manual_seed(0)
    return make_model().double(), (float_inputs(*shape),), torch.arange(shape[0]) % 3


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
def test_adversarial_models_equal_the_loop(case):
    model, inputs, targets = build_adversarial(case)
    expected_norms = loop_norms(model, CROSS_ENTROPY, inputs, targets)
    expected = loop_stats(model, CROSS_ENTROPY, inputs, targets)
    norms = layerwise.per_example_sq_norms(model, CROSS_ENTROPY, inputs, targets)
    assert sorted(norms) == sorted(expected_norms)
    for key, value in expected_norms.items():
        np.testing.assert_allclose(norms[key].numpy(), value, rtol=RTOL, err_msg=key)
    stats = cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs[0], targets)
    np.testing.assert_allclose(float(stats.sq_norm_sum), expected["sq_norm_sum"], rtol=RTOL)
    np.testing.assert_allclose(float(stats.grad_sq_norm), expected["grad_sq_norm"], rtol=RTOL)
    np.testing.assert_allclose(float(stats.loss), expected["loss"], rtol=RTOL)
    for parameter, mean in zip(model.parameters(), expected["mean_grads"], strict=True):
        np.testing.assert_allclose(parameter.grad.numpy(), mean, rtol=RTOL, atol=RTOL * np.abs(mean).max())


@pytest.mark.parametrize("case", ["reshaped_batch", "time_major", "forward_hook_changes_output", "old_weight_norm"])
def test_strict_layerwise_refuses_layers_the_rules_cannot_trust(case):
    model, inputs, targets = build_adversarial(case)
    with pytest.raises(ValueError, match='method="layerwise" needs a layer rule'):
        layerwise.layerwise_grad_stats(model, CROSS_ENTROPY, inputs, targets, method="layerwise")


def test_plan_sends_a_layer_on_a_reshaped_batch_to_vmap():
    model, inputs, _ = build_adversarial("reshaped_batch")
    found = layerwise.plan(model, inputs)
    assert found["inner.weight"] == found["inner.bias"] == "vmap"
    assert found["head.weight"] == "layerwise"
    assert layerwise.plan(hooked_output_model())["0.weight"] == "vmap"


def test_a_global_forward_hook_sends_the_layers_to_vmap():
    model, inputs, targets = build("linear_3d_gram")
    handle = torch.nn.modules.module.register_module_forward_hook(
        lambda module, args, output: output * 2 if isinstance(module, nn.Linear) else None
    )
    try:
        expected = loop_norms(model, CROSS_ENTROPY, inputs, targets)
        norms = layerwise.per_example_sq_norms(model, CROSS_ENTROPY, inputs, targets)
    finally:
        handle.remove()
    for key, value in expected.items():
        np.testing.assert_allclose(norms[key].numpy(), value, rtol=RTOL, err_msg=key)


def test_max_norm_embedding_is_exact_in_auto_and_refused_clearly_by_vmap():
    torch.manual_seed(0)
    model = MaxNormEmbedding().double()
    with torch.no_grad():
        model.embedding.weight.mul_(3)  # rows well above max_norm, so the renormalisation matters
    inputs, targets = (random_ids(6, 5, 6),), torch.arange(6) % 3
    with pytest.raises(ValueError, match="max_norm"):
        cabs_torch.grad_stats(copy.deepcopy(model), CROSS_ENTROPY, inputs[0], targets, method="vmap")
    # Ours first, on a copy: the loop renormalises the table it runs on in place.
    candidate = copy.deepcopy(model)
    stats = cabs_torch.grad_stats(candidate, CROSS_ENTROPY, inputs[0], targets, max_examples_per_pass=4)
    expected = loop_stats(model, CROSS_ENTROPY, inputs, targets)
    assert candidate.embedding.max_norm == 0.5  # restored after the vmap part
    np.testing.assert_allclose(float(stats.sq_norm_sum), expected["sq_norm_sum"], rtol=RTOL)
    np.testing.assert_allclose(float(stats.grad_sq_norm), expected["grad_sq_norm"], rtol=RTOL)
    np.testing.assert_allclose(float(stats.loss), expected["loss"], rtol=RTOL)
