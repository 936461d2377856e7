"""The float64 oracle: an explicit loop over examples with hand-derived gradients.

No framework and no automatic differentiation: every gradient below is written out
by the chain rule, and a test checks it against central finite differences. The
statistics are formed from the per-example losses and gradients exactly as
DESIGN.md section 2 defines them.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np

from cabs.conformance.problems import Problem

__all__ = ["OracleResult", "example_loss_and_grads", "oracle_stats", "flatten", "linear_regression_closed_form"]


class OracleResult(NamedTuple):
    """Reference statistics of one batch, all float64.

    Attributes:
        count: number of examples m.
        loss: mean loss.
        mean_grad: canonical parameter name -> mean gradient.
        grad_sq_norm: squared norm of the mean gradient.
        sq_norm_sum: sum over examples of the squared per-example gradient norm.
        per_example_grads: ``[m, P]`` flattened per-example gradients (canonical order).
    """

    count: int
    loss: float
    mean_grad: dict[str, np.ndarray]
    grad_sq_norm: float
    sq_norm_sum: float
    per_example_grads: np.ndarray

    def xi(self, ddof: int) -> float:
        """The variance trace from the explicit deviations, ``sum ||g_i - g||^2 / (m - ddof)``."""
        deviations = self.per_example_grads - self.per_example_grads.mean(axis=0)
        return float(np.sum(deviations * deviations) / (self.count - ddof))


def flatten(grads: dict[str, np.ndarray], problem: Problem) -> np.ndarray:
    """Concatenate a gradient dict into one vector in the problem's canonical order."""
    return np.concatenate([np.asarray(grads[name], dtype=np.float64).ravel() for name in problem.param_shapes()])


def _cross_entropy(logits: np.ndarray, label: int) -> tuple[float, np.ndarray]:
    """Loss ``logsumexp(z) - z[label]`` and its gradient ``softmax(z) - onehot``."""
    shifted = logits - logits.max()
    probabilities = np.exp(shifted) / np.sum(np.exp(shifted))
    loss = float(np.log(np.sum(np.exp(shifted))) - shifted[label])
    d_logits = probabilities.copy()
    d_logits[label] -= 1.0
    return loss, d_logits


def _patches(image: np.ndarray, kernel_size: int, stride: int, padding: int) -> tuple[np.ndarray, int]:
    """Unfold ``[C, H, W]`` into rows ``[positions, C * k * k]`` (cross-correlation order)."""
    padded = np.pad(image, ((0, 0), (padding, padding), (padding, padding)))
    size = (padded.shape[1] - kernel_size) // stride + 1
    rows = [
        padded[:, r * stride : r * stride + kernel_size, c * stride : c * stride + kernel_size].ravel()
        for r in range(size)
        for c in range(size)
    ]
    return np.stack(rows), size


def _fold(
    d_patches: np.ndarray, image_shape: tuple[int, ...], kernel_size: int, stride: int, padding: int
) -> np.ndarray:
    """Adjoint of :func:`_patches`: add patch gradients back into the image."""
    channels, height, width = image_shape
    padded = np.zeros((channels, height + 2 * padding, width + 2 * padding))
    size = (padded.shape[1] - kernel_size) // stride + 1
    for index in range(size * size):
        r, c = divmod(index, size)
        window = d_patches[index].reshape(channels, kernel_size, kernel_size)
        padded[:, r * stride : r * stride + kernel_size, c * stride : c * stride + kernel_size] += window
    return padded[:, padding : padding + height, padding : padding + width]


def _conv_forward(image, kernel, bias, stride, padding):
    patches, size = _patches(image, kernel.shape[2], stride, padding)
    output = patches @ kernel.reshape(kernel.shape[0], -1).T + bias  # [positions, out]
    return output, patches, size


def _conv_backward(d_output, patches, kernel, image_shape, stride, padding):
    """Gradients of kernel, bias and input from ``d_output`` ``[positions, out]``."""
    d_kernel = (d_output.T @ patches).reshape(kernel.shape)
    d_bias = d_output.sum(axis=0)
    d_patches = d_output @ kernel.reshape(kernel.shape[0], -1)
    d_image = _fold(d_patches, image_shape, kernel.shape[2], stride, padding)
    return d_kernel, d_bias, d_image


def _linear_regression(p, x, y):
    residual = float(x @ p["w"] - y)
    return 0.5 * residual**2, {"w": residual * x}


def _softmax_regression(p, x, y):
    loss, d_logits = _cross_entropy(x @ p["dense/kernel"] + p["dense/bias"], int(y))
    return loss, {"dense/kernel": np.outer(x, d_logits), "dense/bias": d_logits}


def _mlp(p, x, y):
    hidden = np.tanh(x @ p["hidden/kernel"] + p["hidden/bias"])
    loss, d_logits = _cross_entropy(hidden @ p["output/kernel"] + p["output/bias"], int(y))
    d_pre = (p["output/kernel"] @ d_logits) * (1.0 - hidden**2)
    return loss, {
        "hidden/kernel": np.outer(x, d_pre),
        "hidden/bias": d_pre,
        "output/kernel": np.outer(hidden, d_logits),
        "output/bias": d_logits,
    }


def _cnn(p, x, y):
    out1, patches1, size1 = _conv_forward(x, p["conv1/kernel"], p["conv1/bias"], stride=1, padding=0)
    act1 = np.tanh(out1)  # [positions, channels]
    image1 = act1.T.reshape(-1, size1, size1)
    out2, patches2, _ = _conv_forward(image1, p["conv2/kernel"], p["conv2/bias"], stride=2, padding=1)
    act2 = np.tanh(out2)
    pooled = act2.mean(axis=0)
    loss, d_logits = _cross_entropy(pooled @ p["output/kernel"] + p["output/bias"], int(y))
    d_act2 = np.broadcast_to(p["output/kernel"] @ d_logits / act2.shape[0], act2.shape)
    d_out2 = d_act2 * (1.0 - act2**2)
    d_kernel2, d_bias2, d_image1 = _conv_backward(d_out2, patches2, p["conv2/kernel"], image1.shape, 2, 1)
    d_out1 = d_image1.reshape(image1.shape[0], -1).T * (1.0 - act1**2)
    d_kernel1, d_bias1, _ = _conv_backward(d_out1, patches1, p["conv1/kernel"], x.shape, 1, 0)
    return loss, {
        "conv1/kernel": d_kernel1,
        "conv1/bias": d_bias1,
        "conv2/kernel": d_kernel2,
        "conv2/bias": d_bias2,
        "output/kernel": np.outer(pooled, d_logits),
        "output/bias": d_logits,
    }


def _tied_embedding(p, tokens, y):
    table = p["embedding/table"]
    hidden = np.tanh(table[tokens].mean(axis=0))
    loss, d_logits = _cross_entropy(table @ hidden + p["output/bias"], int(y))
    # The table is used twice: as the output projection and as the lookup.
    d_table = np.outer(d_logits, hidden)
    d_mean = (d_logits @ table) * (1.0 - hidden**2)
    np.add.at(d_table, tokens, d_mean / len(tokens))
    return loss, {"embedding/table": d_table, "output/bias": d_logits}


def _sequence(p, tokens, y):
    embedded = p["embedding/table"][tokens]  # [time, features]
    hidden = np.tanh(embedded @ p["time_dense/kernel"] + p["time_dense/bias"])  # [time, hidden]
    pooled = hidden.mean(axis=0)
    loss, d_logits = _cross_entropy(pooled @ p["output/kernel"] + p["output/bias"], int(y))
    d_pre = np.broadcast_to(p["output/kernel"] @ d_logits / len(tokens), hidden.shape) * (1.0 - hidden**2)
    d_table = np.zeros_like(p["embedding/table"])
    np.add.at(d_table, tokens, d_pre @ p["time_dense/kernel"].T)
    return loss, {
        "embedding/table": d_table,
        "time_dense/kernel": embedded.T @ d_pre,
        "time_dense/bias": d_pre.sum(axis=0),
        "output/kernel": np.outer(pooled, d_logits),
        "output/bias": d_logits,
    }


_EXAMPLE_FUNCTIONS = {
    "linear_regression": _linear_regression,
    "softmax_regression": _softmax_regression,
    "mlp": _mlp,
    "cnn": _cnn,
    "tied_embedding": _tied_embedding,
    "sequence": _sequence,
}


def example_loss_and_grads(
    problem: Problem, params: dict[str, np.ndarray], example_input: np.ndarray, example_target: np.ndarray
) -> tuple[float, dict[str, np.ndarray]]:
    """Loss and hand-derived gradient of one example, in float64.

    Args:
        problem: the canonical problem.
        params: canonical parameters (converted to float64 here).
        example_input: one example's input (no batch axis).
        example_target: its target (class id or float).

    Returns:
        ``(loss, grads)`` with ``grads`` keyed by canonical parameter name.
    """
    params = {name: np.asarray(value, dtype=np.float64) for name, value in params.items()}
    example_input = np.asarray(example_input)
    if not np.issubdtype(example_input.dtype, np.integer):
        example_input = example_input.astype(np.float64)
    return _EXAMPLE_FUNCTIONS[problem.kind](params, example_input, example_target)


def oracle_stats(
    problem: Problem, params: dict[str, np.ndarray], inputs: np.ndarray, targets: np.ndarray
) -> OracleResult:
    """Reference statistics of a batch from an explicit loop over its examples."""
    count = len(inputs)
    if count < 1:
        raise ValueError(f"`inputs` must hold at least one example, got {count}.")
    losses = np.empty(count)
    rows = []
    for index in range(count):
        losses[index], grads = example_loss_and_grads(problem, params, inputs[index], targets[index])
        rows.append(flatten(grads, problem))
    per_example = np.stack(rows)
    mean_vector = per_example.mean(axis=0)
    mean_grad, offset = {}, 0
    for name, shape in problem.param_shapes().items():
        size = int(np.prod(shape))
        mean_grad[name] = mean_vector[offset : offset + size].reshape(shape)
        offset += size
    return OracleResult(
        count=count,
        loss=float(losses.mean()),
        mean_grad=mean_grad,
        grad_sq_norm=float(mean_vector @ mean_vector),
        sq_norm_sum=float(np.sum(per_example * per_example)),
        per_example_grads=per_example,
    )


def linear_regression_closed_form(
    problem: Problem, params: dict[str, np.ndarray], seed: int = 0
) -> tuple[float, float]:
    """Population ``(loss, xi)`` of linear regression with Gaussian inputs.

    For ``x ~ N(0, I_d)``, noise standard deviation ``sigma`` and ``delta = w - w*``:
    ``L = 0.5 (||delta||^2 + sigma^2)`` and ``tr(Sigma) = (d + 1) ||delta||^2 + d sigma^2``.
    """
    delta = np.asarray(params["w"], dtype=np.float64) - problem.true_weights(seed)
    sigma = problem.sizes["noise"]
    features = problem.sizes["features"]
    norm = float(delta @ delta)
    return 0.5 * (norm + sigma**2), (features + 1) * norm + features * sigma**2
