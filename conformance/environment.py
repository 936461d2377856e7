"""Process set-up for running several frameworks in one process."""

from __future__ import annotations

import importlib.util
import os
import tempfile

__all__ = ["prepare_environment"]


def prepare_environment() -> None:
    """Quiet TensorFlow, keep Keras files in a temp dir, enable JAX float64, import torch first.

    Call it before any framework is imported. torch must be imported before
    TensorFlow in one process, and TF32 is turned off so float32 matmuls are exact
    enough for the tolerance table.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    os.environ.setdefault("KERAS_HOME", os.path.join(tempfile.gettempdir(), "cabs-conformance-keras"))
    os.environ.setdefault("JAX_ENABLE_X64", "1")
    if importlib.util.find_spec("torch") is not None:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
