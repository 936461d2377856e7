"""JAX task for ``cabs train``: a pure-function network and one CABS step with bucketed shapes."""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from cabs._stats import GradStats
from cabs.backends import jax as cabs_jax
from cabs.training.models import Architecture, Conv

__all__ = ["JaxTask"]

_EVAL_CHUNK = 1024


def _forward(model: Architecture, params: list[dict[str, Any]], inputs: Any) -> Any:
    """Logits of a batch ``inputs`` (channels first), the same network as the PyTorch one."""
    hidden = inputs
    for layer, layer_params in zip(model.layers, params, strict=True):
        if isinstance(layer, Conv):
            spatial = "H" if layer.spatial_dims == 1 else "HW"
            numbers = (f"NC{spatial}", f"OI{spatial}", f"NC{spatial}")
            padding = [(layer.kernel_size // 2, layer.kernel_size // 2)] * layer.spatial_dims
            hidden = jax.lax.conv_general_dilated(
                hidden, layer_params["weight"], (1,) * layer.spatial_dims, padding, dimension_numbers=numbers
            )
            hidden = jax.nn.relu(hidden + layer_params["bias"].reshape(-1, *(1,) * layer.spatial_dims))
            if layer.pool > 1:
                window = (1, 1, *(layer.pool,) * layer.spatial_dims)
                hidden = jax.lax.reduce_window(hidden, -jnp.inf, jax.lax.max, window, window, "VALID")
            continue
        hidden = hidden.reshape(hidden.shape[0], -1) @ layer_params["weight"] + layer_params["bias"]
        if layer.relu:
            hidden = jax.nn.relu(hidden)
    return hidden


def _cross_entropy(logits: Any, labels: Any) -> Any:
    """Per-example cross-entropy of integer ``labels``."""
    log_probabilities = jax.nn.log_softmax(logits, axis=-1)
    return -jnp.take_along_axis(log_probabilities, labels[:, None], axis=-1)[:, 0]


def _evaluation_sums(logits: Any, labels: Any, mask: Any) -> tuple[Any, Any]:
    """Summed loss and number of correct predictions over the examples where ``mask`` is True."""
    losses = jnp.where(mask, _cross_entropy(logits, labels), 0.0)
    hits = jnp.logical_and(mask, logits.argmax(axis=-1) == labels)
    return losses.sum(dtype=jnp.float32), hits.sum()


class JaxTask:
    """The network as a parameter pytree and pure functions, its training data, and plain SGD (float32).

    Args:
        model: the architecture.
        parameters: initial ``(weight, bias)`` per layer (see :mod:`cabs.training.models`).
        x_train: training inputs, shape ``(n, *model.input_shape)``, float32.
        y_train: training labels, shape ``(n,)``, int64.
        learning_rate: the SGD step size.
        max_batch_size: the largest batch of the run; the top bucket of the padded shapes.
        mesh: a data mesh (:func:`cabs.backends.jax.data_mesh`) to split each batch over its
            devices; the statistics are reduced across them inside the compiled step.
        dtype: ``"float32"`` or ``"float64"`` (turns on ``jax_enable_x64`` for the process).
        max_examples_per_pass: at most this many examples differentiated at once (see
            :class:`cabs.backends.jax.StatsFunction`). None: the whole batch.
    """

    backend = "jax"

    def __init__(
        self,
        model,
        parameters,
        x_train,
        y_train,
        learning_rate: float,
        *,
        max_batch_size: int,
        mesh: Any = None,
        dtype: str = "float32",
        max_examples_per_pass: int | None = None,
    ) -> None:
        if dtype == "float64":
            jax.config.update("jax_enable_x64", True)  # JAX otherwise silently makes float64 arrays float32
        self.model = model
        self.numpy_dtype = np.dtype(dtype)
        self.params = [
            {"weight": jnp.asarray(weight, dtype=self.numpy_dtype), "bias": jnp.asarray(bias, dtype=self.numpy_dtype)}
            for weight, bias in parameters
        ]
        self.x_train = np.asarray(x_train, dtype=self.numpy_dtype)
        self.y_train = np.asarray(y_train, dtype=np.int32)

        def example_loss(params: Any, example: Any) -> Any:
            return _cross_entropy(_forward(model, params, example["x"][None]), example["y"][None])[0]

        self.stats_function = cabs_jax.StatsFunction(
            example_loss, max_batch_size=max_batch_size, mesh=mesh, max_examples_per_pass=max_examples_per_pass
        )
        self.learning_rate = learning_rate
        # The step size is an argument, not a constant of the compiled update, so a decay does not recompile.
        self._update = jax.jit(
            lambda params, grads, step_size: jax.tree_util.tree_map(lambda p, g: p - step_size * g, params, grads)
        )
        self._evaluate_sums = jax.jit(lambda params, x, y, mask: _evaluation_sums(_forward(model, params, x), y, mask))

    def step(self, indices: np.ndarray, learning_rate: float | None = None) -> tuple[GradStats, float]:
        """One SGD step on the examples ``indices``; returns their statistics and mean loss.

        ``learning_rate`` replaces the step size from this step on (a decay schedule); None keeps it.
        """
        if learning_rate is not None:
            self.learning_rate = learning_rate
        batch = {"x": self.x_train[indices], "y": self.y_train[indices]}
        stats, mean_grad = self.stats_function(self.params, batch)
        self.params = self._update(self.params, mean_grad, self.numpy_dtype.type(self.learning_rate))
        return stats, float(stats.loss)

    def evaluate(self, x: np.ndarray, y: np.ndarray) -> tuple[float, float]:
        """Mean cross-entropy and accuracy of the current network on ``(x, y)``."""
        loss_sum, correct = 0.0, 0
        for start in range(0, len(x), _EVAL_CHUNK):
            # Pad each chunk to the full chunk size so that evaluation compiles once.
            chunk = {"x": np.asarray(x[start : start + _EVAL_CHUNK], dtype=self.numpy_dtype)}
            chunk["y"] = np.asarray(y[start : start + _EVAL_CHUNK], dtype=np.int32)
            padded, mask = cabs_jax.pad_batch(chunk, _EVAL_CHUNK)
            chunk_loss, chunk_correct = self._evaluate_sums(self.params, padded["x"], padded["y"], mask)
            loss_sum += float(chunk_loss)
            correct += int(chunk_correct)
        return loss_sum / len(x), correct / len(x)

    def summary_extras(self) -> dict[str, Any]:
        """Backend-specific entries for ``summary.json``: the compile count of the statistics."""
        return {"framework_version": jax.__version__, "compile_count": self.stats_function.compile_count}

    def state_dict(self) -> dict[str, np.ndarray]:
        """The parameters as NumPy arrays (for a checkpoint); plain SGD has no other state, nor any randomness."""
        return {
            f"model/{index}/{name}": np.asarray(value)
            for index, layer in enumerate(self.params)
            for name, value in layer.items()
        }

    def load_state_dict(self, arrays: dict[str, np.ndarray]) -> None:
        """Restore :meth:`state_dict`'s arrays; ValueError when they do not fit the network."""
        restored = []
        for index, layer in enumerate(self.params):
            restored_layer = {}
            for name, value in layer.items():
                saved = arrays[f"model/{index}/{name}"]
                if saved.shape != value.shape or saved.dtype != value.dtype:
                    raise ValueError(
                        f"saved parameter model/{index}/{name} is {saved.dtype}{list(saved.shape)}, "
                        f"the network's is {value.dtype}{list(value.shape)}."
                    )
                restored_layer[name] = jnp.asarray(saved)
            restored.append(restored_layer)
        self.params = restored
