"""The batch-size agreement checks of the JAX and TensorFlow adapters (issue 7, item 5).

A real disagreement needs several processes with their own controllers (JAX multi-host,
TensorFlow multi-worker), which this machine's tests do not start; the comparison is
checked here with a fake gather, and the real gather in one process, where it must pass.
PyTorch's check runs with two gloo processes in tests/test_distributed_torch.py.
"""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

needs_jax = pytest.mark.skipif(importlib.util.find_spec("jax") is None, reason="jax is not installed")
needs_tensorflow = pytest.mark.skipif(
    importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed"
)


def _adapter(name: str):
    if name == "jax":
        from cabs.backends import jax as adapter
    else:
        from cabs.backends import tensorflow as adapter
    return adapter


ADAPTERS = [pytest.param("jax", marks=needs_jax), pytest.param("tensorflow", marks=needs_tensorflow)]


@pytest.mark.parametrize("name", ADAPTERS)
def test_equal_values_pass_and_the_own_value_is_what_is_gathered(name):
    sent = []

    def gather(value):
        sent.append(np.asarray(value).copy())
        return np.stack([value, value, value])

    assert _adapter(name).agree_batch_size(np.int64(37), gather=gather) == 37
    assert [array.tolist() for array in sent] == [[37]]


@pytest.mark.parametrize("name", ADAPTERS)
def test_a_mismatch_fails_loudly_naming_every_differing_worker(name):
    with pytest.raises(RuntimeError, match="disagree on the batch size") as raised:
        _adapter(name).agree_batch_size(40, gather=lambda value: np.array([[40], [41], [40], [39]]))
    message = str(raised.value)
    worker = "process" if name == "jax" else "replica"
    assert f"{worker} 0 has 40" in message
    assert f"{worker} 1 has 41" in message and f"{worker} 3 has 39" in message
    assert f"{worker} 2 has" not in message  # agreeing workers are not listed


@needs_jax
def test_jax_single_process_gathers_its_own_value():
    from cabs.backends import jax as cabs_jax

    assert cabs_jax.agree_batch_size(23) == 23


@needs_tensorflow
def test_tensorflow_default_strategy_gathers_its_own_value():
    import tensorflow  # noqa: F401  (the adapter uses the framework the program imported)

    from cabs.backends import tensorflow as cabs_tf

    assert cabs_tf.agree_batch_size(23) == 23
