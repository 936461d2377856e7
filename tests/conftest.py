"""Shared test set-up: environment for the frameworks and the ``backend`` fixture.

``CABS_TEST_BACKENDS=torch,jax`` selects backends; a requested backend that is not
installed is an error, an unrequested missing one is skipped.
"""

from __future__ import annotations

import importlib.util
import os
import tempfile

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("KERAS_HOME", os.path.join(tempfile.gettempdir(), "cabs-test-keras"))
os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=4")
os.environ.setdefault("JAX_ENABLE_X64", "1")
# Data-set caches of the tests go to a temporary folder, never the user's ~/.cache.
os.environ.setdefault("CABS_CACHE", tempfile.mkdtemp(prefix="cabs-test-cache-"))

import numpy as np  # noqa: E402
import pytest  # noqa: E402

FRAMEWORKS = ("numpy", "torch", "jax", "tensorflow")
# torch must be imported before tensorflow in one process.
if importlib.util.find_spec("torch") is not None:
    import torch

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False


def requested_backends() -> list[str]:
    text = os.environ.get("CABS_TEST_BACKENDS", "").strip()
    if not text:
        return []
    names = [name.strip() for name in text.split(",") if name.strip()]
    unknown = [name for name in names if name not in FRAMEWORKS]
    if unknown:
        raise pytest.UsageError(f"CABS_TEST_BACKENDS names unknown backends {unknown}; known: {FRAMEWORKS}")
    return names


def backend_params() -> list:
    requested = requested_backends()
    params = []
    for name in FRAMEWORKS:
        installed = importlib.util.find_spec(name) is not None
        if requested and name not in requested:
            marks = [pytest.mark.skip(reason=f"backend {name} not requested in CABS_TEST_BACKENDS")]
        elif not installed and (name in requested):
            marks = []  # fails in the fixture with a clear message
        elif not installed:
            marks = [pytest.mark.skip(reason=f"backend {name} is not installed")]
        else:
            marks = []
        params.append(pytest.param(name, marks=marks, id=name))
    return params


class Backend:
    """A framework under test: converts NumPy arrays in and out."""

    def __init__(self, name: str):
        self.name = name
        if name == "numpy":
            self.xp = np
        elif name == "torch":
            import torch

            self.torch = torch
        elif name == "jax":
            import jax

            jax.config.update("jax_enable_x64", True)
            import jax.numpy as jnp

            self.jnp = jnp
        elif name == "tensorflow":
            import tensorflow as tf

            self.tf = tf

    def asarray(self, value, dtype="float64"):
        value = np.asarray(value, dtype=dtype)
        if self.name == "numpy":
            return value
        if self.name == "torch":
            return self.torch.asarray(value)
        if self.name == "jax":
            return self.jnp.asarray(value)
        return self.tf.convert_to_tensor(value)

    @staticmethod
    def to_numpy(value):
        if hasattr(value, "detach"):
            value = value.detach().cpu()
        return np.asarray(value)

    def __repr__(self) -> str:
        return f"Backend({self.name})"


@pytest.fixture(params=backend_params(), scope="session")
def backend(request) -> Backend:
    name = request.param
    if importlib.util.find_spec(name) is None:
        pytest.fail(f"backend {name!r} was requested in CABS_TEST_BACKENDS but is not installed; install cabs[{name}]")
    return Backend(name)
