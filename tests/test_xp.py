"""The array namespace layer: the TensorFlow shim covers the core, and the rule runs in ``tf.function``."""

from __future__ import annotations

import ast
import pathlib

import numpy as np
import pytest

import cabs
from cabs import _xp

tf = pytest.importorskip("tensorflow")

CORE = pathlib.Path(cabs.__file__).parent
DTYPE_NAMES = {"bool", "float16", "bfloat16", "float32", "float64", "int8", "int16", "int32", "int64", "uint8"}


def names_used_on_xp(path: pathlib.Path) -> set[str]:
    """Every attribute read as ``xp.<name>`` in a core module."""
    tree = ast.parse(path.read_text())
    return {
        node.attr
        for node in ast.walk(tree)
        if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "xp"
    }


def core_names() -> set[str]:
    return names_used_on_xp(CORE / "_rule.py") | names_used_on_xp(CORE / "_stats.py")


def test_core_uses_the_namespace():
    # Guards the parser: if the core stopped using ``xp`` the coverage test below would pass vacuously.
    assert {"where", "clip", "round", "asarray"} <= core_names()


def test_shim_provides_every_name_the_core_uses():
    namespace = _xp.tensorflow_namespace()
    missing = sorted(name for name in core_names() if not hasattr(namespace, name))
    assert missing == []


def test_tensorflow_functions_list_is_exactly_the_functions_the_core_calls():
    functions = core_names() - DTYPE_NAMES
    assert set(_xp.TENSORFLOW_FUNCTIONS) == functions
    namespace = _xp.tensorflow_namespace()
    assert all(callable(getattr(namespace, name)) for name in _xp.TENSORFLOW_FUNCTIONS)


def test_array_namespace_picks_the_shim_for_tensors_and_variables():
    assert _xp.array_namespace(tf.constant(1.0)) is _xp.tensorflow_namespace()
    assert _xp.array_namespace(tf.Variable(1.0)) is _xp.tensorflow_namespace()


def scripted_stats(steps: int = 200) -> list[tuple[float, float, float, float]]:
    """A fixed sequence of float64 statistics: loss falls, spread varies, some steps are not finite."""
    rng = np.random.default_rng(20170811)
    sequence = []
    for step in range(steps):
        count = float(rng.integers(16, 2049))
        loss = 2.3 * np.exp(-step / 60.0) + 0.02 * rng.random()
        grad_sq_norm = rng.uniform(0.0, 5.0)
        xi = rng.uniform(10.0, 400.0)
        sq_norm_sum = count * (xi + grad_sq_norm)
        if step in (37, 38, 150):
            loss = np.nan if step != 150 else np.inf
        sequence.append((count, loss, grad_sq_norm, sq_norm_sum))
    return sequence


CONFIGS = [
    {"learning_rate": 0.1},
    {"learning_rate": 0.05, "ddof": 1, "debias": True, "loss_floor": 0.01, "eps": 1e-3, "max_batch_size": 1000},
]


@pytest.mark.parametrize("options", CONFIGS, ids=["reference", "all-options"])
def test_update_in_tf_function_matches_numpy_and_does_not_retrace(options):
    rule = cabs.cabs(**options)
    numpy_state = rule.init(np.asarray(0.0, dtype=np.float64))
    tf_state = rule.init(tf.constant(0.0, dtype=tf.float64))
    update = tf.function(rule.update)
    numpy_sizes, tf_sizes, tracing_counts = [], [], []
    for values in scripted_stats():
        numpy_size, numpy_state = rule.update(cabs.GradStats(*(np.asarray(v) for v in values)), numpy_state)
        tf_size, tf_state = update(cabs.GradStats(*(tf.constant(v, dtype=tf.float64) for v in values)), tf_state)
        numpy_sizes.append(int(numpy_size))
        tf_sizes.append(int(tf_size))
        tracing_counts.append(update.experimental_get_tracing_count())
    assert tf_sizes == numpy_sizes
    assert len(set(numpy_sizes)) > 5  # the sequence really moves the batch size
    assert tracing_counts == [1] * len(tracing_counts)
    assert int(tf_state.skipped) == int(numpy_state.skipped) == 3
    assert isinstance(tf_state.xi_avg, tf.Tensor) and tf_state.xi_avg.dtype == tf.float64
    np.testing.assert_allclose(tf_state.xi_avg.numpy(), numpy_state.xi_avg, rtol=1e-12)
    np.testing.assert_allclose(tf_state.loss_avg.numpy(), numpy_state.loss_avg, rtol=1e-12)


def test_update_leaves_tensorflow_without_numpy_behaviour():
    rule = cabs.cabs(learning_rate=0.1)
    state = rule.init(tf.constant(0.0, dtype=tf.float32))
    stats = cabs.GradStats(*(tf.constant(v, dtype=tf.float32) for v in (32.0, 0.5, 1.0, 32.0 * 51.0)))
    batch_size, state = tf.function(rule.update)(stats, state)
    assert batch_size.dtype == tf.int32 and int(batch_size) == 16
    # experimental_enable_numpy_behavior would add NumPy methods such as ``reshape`` to every tensor.
    assert not hasattr(tf.constant(1.0), "reshape")


def test_variance_trace_on_tensorflow_tensors():
    per_example = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0], [0.0, -2.0]])
    stats = cabs.GradStats(
        count=tf.constant(4, dtype=tf.int32),
        loss=tf.constant(0.5, dtype=tf.float64),
        grad_sq_norm=tf.constant(np.sum(per_example.mean(axis=0) ** 2)),
        sq_norm_sum=tf.constant(np.sum(per_example**2)),
    )
    for ddof in (0, 1):
        xi = stats.variance_trace(ddof=ddof)
        oracle = sum(np.sum((g - per_example.mean(axis=0)) ** 2) for g in per_example) / (4 - ddof)
        assert isinstance(xi, tf.Tensor) and xi.dtype == tf.float64
        np.testing.assert_allclose(xi.numpy(), oracle, rtol=1e-12)
