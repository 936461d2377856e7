"""The PyTorch adapter against an explicit per-example loop (one backward per example, float64)."""

from __future__ import annotations

import copy
import re
from collections import OrderedDict
from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")

import cabs  # noqa: E402
from cabs.backends import torch as cabs_torch  # noqa: E402

nn = torch.nn
CROSS_ENTROPY = nn.CrossEntropyLoss(reduction="none")
DOCS = Path(__file__).resolve().parents[1] / "docs"


def loop_oracle(model, loss_fn, inputs, targets):
    """Statistics from one ordinary backward per example, in NumPy float64.

    ``model.parameters()`` lists a tied parameter once, and its ``.grad`` after a
    backward holds the sum over all its uses, which is the per-example gradient.
    """
    inputs = inputs if isinstance(inputs, tuple) else (inputs,)
    parameters = [value for value in model.parameters() if value.requires_grad]
    losses, per_example = [], []
    for index in range(targets.shape[0]):
        model.zero_grad(set_to_none=True)
        loss = loss_fn(model(*(tensor[index : index + 1] for tensor in inputs)), targets[index : index + 1])
        loss.sum().backward()
        losses.append(float(loss.detach().sum()))
        per_example.append([value.grad.detach().cpu().double().numpy().copy() for value in parameters])
    flat = np.stack([np.concatenate([grad.ravel() for grad in example]) for example in per_example])
    mean_flat = flat.mean(axis=0)
    return {
        "loss": float(np.mean(losses)),
        "mean_grads": [np.mean([example[k] for example in per_example], axis=0) for k in range(len(parameters))],
        "grad_sq_norm": float(mean_flat @ mean_flat),
        "sq_norm_sum": float(np.sum(flat * flat)),
    }


def assert_matches_oracle(model, stats, oracle, rtol):
    parameters = [value for value in model.parameters() if value.requires_grad]
    np.testing.assert_allclose(float(stats.loss), oracle["loss"], rtol=rtol)
    np.testing.assert_allclose(float(stats.grad_sq_norm), oracle["grad_sq_norm"], rtol=rtol)
    np.testing.assert_allclose(float(stats.sq_norm_sum), oracle["sq_norm_sum"], rtol=rtol)
    for parameter, expected in zip(parameters, oracle["mean_grads"], strict=True):
        # Entries near zero carry the rounding of the whole parameter: scale atol by its largest entry.
        actual = parameter.grad.detach().cpu().double().numpy()
        np.testing.assert_allclose(actual, expected, rtol=rtol, atol=rtol * np.abs(expected).max())


# Models ---------------------------------------------------------------------------------------


def make_mlp():
    return nn.Sequential(nn.Linear(5, 8), nn.Tanh(), nn.Linear(8, 3))


def make_cnn():
    return nn.Sequential(
        nn.Conv2d(2, 4, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(4, 3, kernel_size=3),
        nn.AvgPool2d(2),
        nn.Flatten(),
        nn.Linear(3 * 1 * 1, 3),
    )


class LinearTwice(nn.Module):
    """The same Linear applied twice: its per-example gradient is the sum of two uses."""

    def __init__(self):
        super().__init__()
        self.shared = nn.Linear(5, 5)
        self.head = nn.Linear(5, 3)

    def forward(self, x):
        return self.head(torch.tanh(self.shared(torch.tanh(self.shared(x)))))


class TiedEmbedding(nn.Module):
    """A tiny language model whose output layer reuses the input embedding."""

    def __init__(self, vocabulary=7, width=4):
        super().__init__()
        self.embedding = nn.Embedding(vocabulary, width)
        self.mix = nn.Linear(width, width)
        self.output = nn.Linear(width, vocabulary, bias=False)
        self.output.weight = self.embedding.weight

    def forward(self, tokens):
        return self.output(torch.tanh(self.mix(self.embedding(tokens).mean(dim=1))))


class TwoInputs(nn.Module):
    def __init__(self):
        super().__init__()
        self.left = nn.Linear(3, 4)
        self.right = nn.Linear(2, 4)
        self.head = nn.Linear(4, 3)
        self.register_buffer("offset", torch.linspace(-1.0, 1.0, 4))

    def forward(self, left, right):
        return self.head(torch.tanh(self.left(left) + self.right(right) + self.offset))


def make_problem(kind, count=10, dtype=torch.float64, seed=0):
    """A model and a batch; the same seed gives the same numbers for every dtype."""
    torch.manual_seed(seed)
    if kind == "mlp":
        model, inputs = make_mlp(), torch.randn(count, 5)
    elif kind == "cnn":
        model, inputs = make_cnn(), torch.randn(count, 2, 8, 8)
    elif kind == "linear_twice":
        model, inputs = LinearTwice(), torch.randn(count, 5)
    elif kind == "tied_embedding":
        model, inputs = TiedEmbedding(), torch.randint(0, 7, (count, 3))
    elif kind == "two_inputs":
        model, inputs = TwoInputs(), (torch.randn(count, 3), torch.randn(count, 2))
    else:
        raise ValueError(kind)
    classes = 7 if kind == "tied_embedding" else 3
    targets = torch.randint(0, classes, (count,))
    model = model.to(dtype)
    if isinstance(inputs, tuple):
        inputs = tuple(tensor.to(dtype) for tensor in inputs)
    elif inputs.is_floating_point():
        inputs = inputs.to(dtype)
    return model, inputs, targets


KINDS = ["mlp", "cnn", "linear_twice", "tied_embedding", "two_inputs"]


# Agreement with the loop ------------------------------------------------------------------------


@pytest.mark.parametrize("kind", KINDS)
def test_float64_matches_the_per_example_loop(kind):
    model, inputs, targets = make_problem(kind)
    oracle = loop_oracle(model, CROSS_ENTROPY, inputs, targets)
    stats = cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets)
    assert_matches_oracle(model, stats, oracle, rtol=1e-9)
    assert int(stats.count) == 10
    # A constant-free check that the spread is real: the examples' gradients differ.
    assert float(stats.variance_trace(ddof=0)) > 0


def test_tied_weights_are_one_parameter_with_the_summed_gradient():
    model, inputs, targets = make_problem("tied_embedding")
    assert model.output.weight is model.embedding.weight
    stats = cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets)
    # Treating the two uses as separate parameters would give a different sq_norm_sum.
    untied = copy.deepcopy(model)
    untied.output.weight = nn.Parameter(untied.embedding.weight.detach().clone())
    untied_stats = cabs_torch.grad_stats(untied, CROSS_ENTROPY, inputs, targets)
    assert not np.isclose(float(stats.sq_norm_sum), float(untied_stats.sq_norm_sum), rtol=1e-6)
    combined = untied.embedding.weight.grad + untied.output.weight.grad
    torch.testing.assert_close(model.embedding.weight.grad, combined, rtol=1e-12, atol=1e-14)


@pytest.mark.parametrize("kind", ["mlp", "cnn", "tied_embedding"])
def test_float32_matches_the_float64_loop(kind):
    model64, inputs64, targets = make_problem(kind, dtype=torch.float64)
    model32, inputs32, _ = make_problem(kind, dtype=torch.float32)
    oracle = loop_oracle(model64, CROSS_ENTROPY, inputs64, targets)
    stats = cabs_torch.grad_stats(model32, CROSS_ENTROPY, inputs32, targets)
    assert stats.loss.dtype == torch.float32 and stats.sq_norm_sum.dtype == torch.float32
    assert all(value.grad.dtype == torch.float32 for value in model32.parameters())
    assert_matches_oracle(model32, stats, oracle, rtol=1e-4)


@pytest.mark.parametrize("chunk_size", [1, 3, 4, 7, 100])
def test_chunking_does_not_change_the_result(chunk_size):
    model, inputs, targets = make_problem("cnn", count=11)
    whole = cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets, chunk_size=11)
    whole_grads = [value.grad.clone() for value in model.parameters()]
    chunked = cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets, chunk_size=chunk_size)
    for field in cabs.GradStats._fields:
        np.testing.assert_allclose(float(getattr(chunked, field)), float(getattr(whole, field)), rtol=1e-12)
    for value, expected in zip(model.parameters(), whole_grads, strict=True):
        torch.testing.assert_close(value.grad, expected, rtol=1e-12, atol=1e-15)


def test_default_chunk_keeps_per_example_gradients_under_the_budget(monkeypatch):
    model, inputs, targets = make_problem("mlp", count=10)
    parameter_bytes = sum(value.numel() * value.element_size() for value in model.parameters())
    whole = cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets, chunk_size=10, method="vmap")
    monkeypatch.setattr(cabs_torch, "DEFAULT_MEMORY_BUDGET_BYTES", 3 * parameter_bytes)
    calls = []
    model.register_forward_pre_hook(lambda module, args: calls.append(args[0].shape))
    chunked = cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets, method="vmap")
    assert len(calls) == 4  # chunks of 3, 3, 3, 1 examples, one vmapped forward each
    for field in cabs.GradStats._fields:
        np.testing.assert_allclose(float(getattr(chunked, field)), float(getattr(whole, field)), rtol=1e-12)


def test_low_precision_parameters_accumulate_in_float32():
    model64, inputs64, targets = make_problem("mlp", dtype=torch.float64)
    model16, inputs16, _ = make_problem("mlp", dtype=torch.bfloat16)
    oracle = loop_oracle(model64, CROSS_ENTROPY, inputs64, targets)
    stats = cabs_torch.grad_stats(model16, CROSS_ENTROPY, inputs16, targets)
    assert stats.sq_norm_sum.dtype == torch.float32 and stats.loss.dtype == torch.float32
    assert model16[0].weight.grad.dtype == torch.bfloat16
    # bfloat16 keeps 8 bits of mantissa: agreement to a few per cent is what it can give.
    np.testing.assert_allclose(float(stats.sq_norm_sum), oracle["sq_norm_sum"], rtol=5e-2)
    np.testing.assert_allclose(float(stats.loss), oracle["loss"], rtol=5e-2)


def test_single_example_has_zero_spread():
    model, inputs, targets = make_problem("mlp", count=1)
    oracle = loop_oracle(model, CROSS_ENTROPY, inputs, targets)
    stats = cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets)
    assert_matches_oracle(model, stats, oracle, rtol=1e-9)
    np.testing.assert_allclose(float(stats.sq_norm_sum), float(stats.grad_sq_norm), rtol=1e-12)


def test_returned_fields_are_0d_tensors_on_the_model_device():
    model, inputs, targets = make_problem("mlp")
    stats = cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets)
    for value in stats:
        assert isinstance(value, torch.Tensor) and value.shape == () and value.device == inputs.device
    assert stats.count.dtype == torch.int64
    assert stats.grad_sq_norm.dtype == torch.float64


# Model features ---------------------------------------------------------------------------------


def test_frozen_parameters_are_left_out():
    model, inputs, targets = make_problem("mlp")
    model[0].requires_grad_(False)
    oracle = loop_oracle(model, CROSS_ENTROPY, inputs, targets)
    model.zero_grad(set_to_none=True)
    stats = cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets)
    assert_matches_oracle(model, stats, oracle, rtol=1e-9)
    assert model[0].weight.grad is None and model[0].bias.grad is None


def test_batchnorm_in_eval_mode_uses_its_buffers():
    torch.manual_seed(3)
    model = nn.Sequential(nn.Linear(5, 6), nn.BatchNorm1d(6), nn.Tanh(), nn.Linear(6, 3)).double()
    model[1].running_mean.uniform_(-1.0, 1.0)
    model[1].running_var.uniform_(0.5, 2.0)
    model.eval()
    inputs, targets = torch.randn(9, 5, dtype=torch.float64), torch.randint(0, 3, (9,))
    oracle = loop_oracle(model, CROSS_ENTROPY, inputs, targets)
    running_mean = model[1].running_mean.clone()
    stats = cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets)
    assert_matches_oracle(model, stats, oracle, rtol=1e-9)
    torch.testing.assert_close(model[1].running_mean, running_mean, rtol=0, atol=0)


def test_batchnorm_in_training_mode_is_refused_by_name():
    model = nn.Sequential(
        OrderedDict(
            features=nn.Sequential(nn.Conv2d(2, 4, 3), nn.BatchNorm2d(4), nn.ReLU()),
            head=nn.Sequential(nn.Flatten(), nn.Linear(4 * 6 * 6, 3)),
        )
    )
    inputs, targets = torch.randn(4, 2, 8, 8), torch.randint(0, 3, (4,))
    with pytest.raises(ValueError, match=r"BatchNorm2d 'features\.1'.*eval.*GroupNorm"):
        cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets)
    model.features[1].eval()
    stats = cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets)
    assert int(stats.count) == 4


def test_batchnorm_without_running_statistics_is_refused_in_eval_mode():
    model = nn.Sequential(nn.Linear(5, 4), nn.BatchNorm1d(4, track_running_stats=False), nn.Linear(4, 3)).eval()
    with pytest.raises(ValueError, match=r"BatchNorm1d '1'.*track_running_stats=False"):
        cabs_torch.grad_stats(model, CROSS_ENTROPY, torch.randn(4, 5), torch.randint(0, 3, (4,)))


def test_dropout_in_training_mode_runs_with_independent_masks():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(5, 64), nn.Dropout(0.5), nn.Linear(64, 3))
    inputs, targets = torch.randn(1, 5).repeat(6, 1), torch.zeros(6, dtype=torch.int64)
    stats = cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets)
    # Identical examples with one shared mask would have exactly zero spread.
    assert float(stats.variance_trace(ddof=0)) > 1e-6


# The optimizer step -----------------------------------------------------------------------------


def test_sgd_step_after_grad_stats_equals_a_step_on_the_mean_loss():
    model, inputs, targets = make_problem("cnn", count=12)
    reference = copy.deepcopy(model)
    for value in model.parameters():
        value.grad = torch.full_like(value, 7.0)  # stale gradients must be overwritten, not added to
    cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets, chunk_size=5)
    torch.optim.SGD(model.parameters(), lr=0.3).step()

    optimizer = torch.optim.SGD(reference.parameters(), lr=0.3)
    optimizer.zero_grad()
    CROSS_ENTROPY(reference(inputs), targets).mean().backward()
    optimizer.step()
    for value, expected in zip(model.parameters(), reference.parameters(), strict=True):
        torch.testing.assert_close(value, expected, rtol=1e-12, atol=1e-14)


# Bad input ----------------------------------------------------------------------------------------


def test_scalar_loss_is_refused_with_the_fix():
    model, inputs, targets = make_problem("mlp")
    with pytest.raises(ValueError, match=r"per-example losses.*reduction='none'"):
        cabs_torch.grad_stats(model, nn.CrossEntropyLoss(), inputs, targets)


def test_loss_with_extra_dims_is_refused():
    model, inputs, _ = make_problem("mlp")
    # The vmap path sees one example at a time, the layer-wise path the whole batch.
    with pytest.raises(ValueError, match=r"got shape=\((1|10), 3\)"):
        cabs_torch.grad_stats(model, nn.MSELoss(reduction="none"), inputs, torch.zeros(10, 3, dtype=torch.float64))


@pytest.mark.parametrize(
    ("inputs", "targets", "error", "match"),
    [
        (torch.randn(10, 5), torch.zeros(9, dtype=torch.int64), ValueError, r"inputs=\[10\], targets=\[9\]"),
        ((torch.randn(10, 5), torch.randn(8, 5)), torch.zeros(10, dtype=torch.int64), ValueError, "same batch length"),
        (torch.randn(0, 5), torch.zeros(0, dtype=torch.int64), ValueError, "at least one example"),
        (np.zeros((10, 5)), torch.zeros(10, dtype=torch.int64), TypeError, "torch.Tensor"),
        (torch.tensor(1.0), torch.zeros(10, dtype=torch.int64), ValueError, "batch on dim 0"),
    ],
)
def test_bad_batches_are_refused(inputs, targets, error, match):
    model = make_mlp()
    with pytest.raises(error, match=match):
        cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets)


@pytest.mark.parametrize("chunk_size", [0, -2, 2.5, True])
def test_bad_chunk_size_is_refused(chunk_size):
    with pytest.raises(ValueError, match="chunk_size"):
        cabs_torch.grad_stats(
            make_mlp(), CROSS_ENTROPY, torch.randn(4, 5), torch.zeros(4, dtype=torch.int64), chunk_size=chunk_size
        )


def test_bad_model_and_loss_are_refused():
    inputs, targets = torch.randn(4, 5), torch.zeros(4, dtype=torch.int64)
    with pytest.raises(TypeError, match="torch.nn.Module"):
        cabs_torch.grad_stats(lambda x: x, CROSS_ENTROPY, inputs, targets)
    with pytest.raises(TypeError, match="callable"):
        cabs_torch.grad_stats(make_mlp(), "cross_entropy", inputs, targets)
    with pytest.raises(ValueError, match="requires_grad=True"):
        cabs_torch.grad_stats(make_mlp().requires_grad_(False), CROSS_ENTROPY, inputs, targets)


# Module attributes and devices --------------------------------------------------------------------


def test_module_attributes_and_registry():
    from cabs.backends import get_backend

    assert cabs_torch.name == "torch"
    assert cabs_torch.array_types() == (torch.Tensor,)
    assert cabs_torch.devices()[0] == "cpu"
    assert len(cabs_torch.devices()) == 1 + (torch.cuda.device_count() if torch.cuda.is_available() else 0) + (
        1 if torch.backends.mps.is_available() else 0
    )
    assert get_backend(torch.zeros(2)) is cabs_torch


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_matches_the_loop_on_cpu():
    model, inputs, targets = make_problem("cnn", count=9)
    oracle = loop_oracle(model, CROSS_ENTROPY, inputs, targets)
    model, inputs, targets = model.cuda(), inputs.cuda(), targets.cuda()
    stats = cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs, targets, chunk_size=4)
    assert all(value.device.type == "cuda" for value in stats)
    assert_matches_oracle(model, stats, oracle, rtol=1e-9)
    with pytest.raises(ValueError, match="model's device"):
        cabs_torch.grad_stats(model, CROSS_ENTROPY, inputs.cpu(), targets)


# The guide ----------------------------------------------------------------------------------------


def python_blocks(path):
    return re.findall(r"^```python\n(.*?)^```", path.read_text(encoding="utf-8"), flags=re.DOTALL | re.MULTILINE)


@pytest.mark.docs
def test_torch_guide_runs(tmp_path, monkeypatch):
    """Runs every Python block of docs/torch.md in order, in one namespace (a few seconds)."""
    blocks = python_blocks(DOCS / "torch.md")
    assert len(blocks) >= 2
    monkeypatch.chdir(tmp_path)
    namespace: dict = {"__name__": "torch_guide"}
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: extra threads only contend with other test processes
    try:
        for block in blocks:
            exec(compile(block, str(DOCS / "torch.md"), "exec"), namespace)
    finally:
        torch.set_num_threads(threads)
    history = namespace["history"]
    assert len(history) == namespace["num_steps"]
    losses = [row["loss"] for row in history]
    assert np.mean(losses[-20:]) < 0.5 * np.mean(losses[:20])
    sizes = [row["batch_size"] for row in history]
    assert sizes[0] == 16 and max(sizes) > 16  # the batch grows as the loss falls
    assert namespace["test_accuracy"] > 0.8
    assert (tmp_path / "checkpoint.pt").is_file()
