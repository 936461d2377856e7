"""CABS under ``tf.distribute.MirroredStrategy`` on 4 logical CPU devices against one device.

Logical devices must be configured before TensorFlow's first op, so the body runs in a
fresh Python process (in a temporary folder, so the checkout's ``cabs/`` folder does not
shadow the installed package) and reports its measurements as JSON.
"""

from __future__ import annotations

import importlib.util
import json
import os
import pathlib
import re
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(importlib.util.find_spec("tensorflow") is None, reason="tensorflow is not installed")

REPLICAS = 4
STEPS = 50

SCRIPT = textwrap.dedent(
    """
    import json
    import os
    import sys

    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * REPLICAS)

    import keras
    import numpy as np

    import cabs
    from cabs.backends import tensorflow as cabs_tf

    keras.config.set_floatx("float64")
    LEARNING_RATE = 1.0


    def make_model():
        keras.utils.set_random_seed(0)
        return keras.Sequential(
            [
                keras.Input((6,)),
                keras.layers.Dense(8, activation="tanh"),
                keras.layers.LayerNormalization(),
                keras.layers.Dense(3),
            ]
        )


    rng = np.random.default_rng(0)
    inputs = 2.0 * rng.normal(size=(600, 6))
    labels = (inputs[:, 0] + inputs[:, 1] ** 2 > 1).astype(np.int32) + (inputs[:, 2] > 0.5).astype(np.int32)
    loss_fn = keras.losses.SparseCategoricalCrossentropy(from_logits=True, reduction=None, dtype="float64")

    strategy = tf.distribute.MirroredStrategy([f"/cpu:{index}" for index in range(REPLICAS)])
    with strategy.scope():
        distributed_model = make_model()
        distributed_optimizer = keras.optimizers.SGD(LEARNING_RATE)
    single_model = make_model()
    single_model.set_weights(distributed_model.get_weights())
    single_optimizer = keras.optimizers.SGD(LEARNING_RATE)
    distributed = cabs_tf.stats_function(distributed_model, loss_fn)
    single = cabs_tf.stats_function(single_model, loss_fn)
    # A third model takes the distributed model's weights before each step: statistics at equal parameters.
    probe_model = make_model()
    probe = cabs_tf.stats_function(probe_model, loss_fn)


    @tf.function(reduce_retracing=True)
    def distributed_step(replica_inputs, replica_targets):
        stats, gradients = distributed.finish(distributed.distributed_batch_sums(strategy, replica_inputs, replica_targets))
        distributed_optimizer.apply_gradients(zip(gradients, distributed_model.trainable_variables))
        return stats


    def single_step(batch_inputs, batch_targets):
        stats, gradients = single(batch_inputs, batch_targets)
        single_optimizer.apply_gradients(zip(gradients, single_model.trainable_variables))
        return stats


    def as_floats(stats):
        return [float(value) for value in stats]


    report = {"replicas": strategy.num_replicas_in_sync, "checks": [], "plain": []}
    # Statistics of single batches (no update), including shares of 0 examples (2 < 4 replicas).
    for size in (2, 5, 7, 13):
        batch_inputs, batch_targets = inputs[:size], labels[:size]
        sums = distributed.distributed_batch_sums(
            strategy,
            cabs_tf.split_across_replicas(strategy, batch_inputs),
            cabs_tf.split_across_replicas(strategy, batch_targets),
        )
        report["checks"].append(
            [size, as_floats(distributed.finish(sums)[0]), as_floats(single(batch_inputs, batch_targets)[0])]
        )
        # The plain pass for steps without statistics: the same mean gradient.
        plain = distributed.distributed_batch_sums(
            strategy,
            cabs_tf.split_across_replicas(strategy, batch_inputs),
            cabs_tf.split_across_replicas(strategy, batch_targets),
            compute_stats=False,
        )
        _, plain_gradients = distributed.finish(plain)
        _, single_gradients = single(batch_inputs, batch_targets)
        report["plain"].append(
            max(
                float(np.max(np.abs(np.asarray(a) - np.asarray(b)) / (np.abs(np.asarray(b)) + 1e-300)))
                for a, b in zip(plain_gradients, single_gradients)
            )
        )

    report["trace_count_before_steps"] = distributed.trace_count
    options = dict(learning_rate=LEARNING_RATE, min_batch_size=2, max_batch_size=64, initial_batch_size=3)
    distributed_controller, single_controller = cabs.Controller(**options), cabs.Controller(**options)
    order = rng.permutation(len(inputs))
    position = 0
    for name in ("sizes", "single_sizes", "stats", "single_stats", "probe_stats"):
        report[name] = []
    for step in range(STEPS):
        size = distributed_controller.batch_size
        report["sizes"].append(size)
        report["single_sizes"].append(single_controller.batch_size)
        if position + size > len(order):
            order, position = rng.permutation(len(inputs)), 0
        batch = order[position : position + size]
        position += size
        probe_model.set_weights(distributed_model.get_weights())
        report["probe_stats"].append(as_floats(probe(inputs[batch], labels[batch])[0]))
        stats = distributed_step(
            cabs_tf.split_across_replicas(strategy, inputs[batch]), cabs_tf.split_across_replicas(strategy, labels[batch])
        )
        single_stats = single_step(inputs[batch], labels[batch])
        report["stats"].append(as_floats(stats))
        report["single_stats"].append(as_floats(single_stats))
        distributed_controller.step(stats)
        single_controller.step(single_stats)

    report["parameters"] = [np.asarray(v).tolist() for v in distributed_model.trainable_variables]
    report["single_parameters"] = [np.asarray(v).tolist() for v in single_model.trainable_variables]
    report["trace_count"] = distributed.trace_count
    json.dump(report, sys.stdout)
    """
)


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    folder = tmp_path_factory.mktemp("distributed_tensorflow")
    script = folder / "mirrored.py"
    script.write_text(f"REPLICAS = {REPLICAS}\nSTEPS = {STEPS}\n" + SCRIPT)
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_HOME": str(folder / "keras")}
    completed = subprocess.run(
        [sys.executable, str(script)], cwd=folder, env=environment, capture_output=True, text=True, timeout=600
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    return json.loads(completed.stdout)


def test_four_replicas_were_used(report):
    assert report["replicas"] == REPLICAS


def test_statistics_of_uneven_and_empty_shares_equal_one_device(report):
    sizes = [size for size, _, _ in report["checks"]]
    assert any(size < REPLICAS for size in sizes) and any(size % REPLICAS for size in sizes)
    for size, distributed, single in report["checks"]:
        assert distributed[0] == size
        np.testing.assert_allclose(distributed, single, rtol=1e-12)


def test_plain_pass_gives_the_same_mean_gradient(report):
    assert max(report["plain"]) < 1e-12


def test_fifty_steps_agree_with_one_device(report):
    assert len(report["sizes"]) == STEPS
    assert report["sizes"] == report["single_sizes"]
    # The run must exercise changing sizes that 4 replicas do not divide.
    sizes = report["sizes"]
    assert len(set(sizes)) > 2 and any(size % REPLICAS for size in sizes) and any(size < REPLICAS for size in sizes)
    # At equal parameters every step's statistics agree to rounding.
    np.testing.assert_allclose(report["stats"], report["probe_stats"], rtol=1e-12)
    # The two independent runs differ only by rounding in the order of the sums, which 50 steps of
    # SGD at a large learning rate amplify (to ~5e-12 here): agreement to 1e-10 still leaves the
    # batch sizes identical and would catch any wrong weighting of the shares.
    np.testing.assert_allclose(report["stats"], report["single_stats"], rtol=1e-10)
    for distributed, single in zip(report["parameters"], report["single_parameters"], strict=True):
        np.testing.assert_allclose(distributed, single, rtol=1e-10, atol=1e-12)


def test_statistics_are_not_retraced_per_batch_size(report):
    # TensorFlow traces a function once per replica device: one trace with statistics and one plain each,
    # and none more over 50 steps whose batch and share sizes change (0 to 16 examples per replica).
    assert report["trace_count_before_steps"] <= 2 * REPLICAS
    assert report["trace_count"] == report["trace_count_before_steps"]


def test_the_guide_script_runs(tmp_path):
    guide = (pathlib.Path(__file__).resolve().parent.parent / "docs" / "distributed.md").read_text()
    (script,) = re.findall(r"^```python no-run\n(# train_mirrored\.py.*?)^```", guide, re.S | re.M)
    (tmp_path / "train_mirrored.py").write_text(script)
    environment = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "KERAS_HOME": str(tmp_path / "keras")}
    completed = subprocess.run(
        [sys.executable, "train_mirrored.py"],
        cwd=tmp_path,
        env=environment,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    lines = [line for line in completed.stdout.splitlines() if line.startswith("step ")]
    assert [line.split(":")[0] for line in lines] == ["step 0", "step 10", "step 20", "step 30"]
