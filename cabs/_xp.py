"""Array namespace lookup: array-api-compat, plus a small shim for TensorFlow.

Detection never imports a framework: TensorFlow is recognised only when the
caller has already imported it (it is in ``sys.modules``).
"""

from __future__ import annotations

import sys
from types import SimpleNamespace
from typing import Any

import array_api_compat
import numpy as np

__all__ = ["array_namespace", "tensorflow_namespace", "TENSORFLOW_FUNCTIONS"]

# Every function of the namespace the core uses; the TensorFlow shim provides
# exactly these (a test checks the core calls nothing else).
TENSORFLOW_FUNCTIONS = (
    "asarray",
    "astype",
    "clip",
    "full_like",
    "isfinite",
    "isnan",
    "logical_and",
    "round",
    "where",
)


def _is_tensorflow(x: Any) -> bool:
    tf = sys.modules.get("tensorflow")
    return tf is not None and isinstance(x, (tf.Tensor, tf.Variable))


def array_namespace(*arrays: Any) -> Any:
    """Return the Array API namespace of ``arrays`` (a shim for TensorFlow).

    Python numbers take the namespace of the arrays beside them; numbers alone are NumPy.
    """
    arrays = tuple(x for x in arrays if not isinstance(x, (bool, int, float)))
    if not arrays:
        return array_api_compat.array_namespace(np.asarray(0.0))
    if any(_is_tensorflow(x) for x in arrays):
        return tensorflow_namespace()
    try:
        return array_api_compat.array_namespace(*arrays)
    except TypeError as error:
        kinds = sorted({type(x).__module__ + "." + type(x).__qualname__ for x in arrays})
        raise TypeError(
            f"cabs needs arrays of one supported library (numpy, torch, jax, tensorflow "
            f"or another Array API library), got types {kinds}. Convert the values with "
            f"your framework's asarray / tensor function first."
        ) from error


_TF_NAMESPACE: SimpleNamespace | None = None


def tensorflow_namespace() -> SimpleNamespace:
    """The subset of the Array API the core uses, written with TensorFlow ops.

    Pure functions of TensorFlow ops only, so it works inside ``tf.function`` and
    needs no global switch such as ``experimental_enable_numpy_behavior``.
    """
    global _TF_NAMESPACE
    if _TF_NAMESPACE is None:
        tf = sys.modules["tensorflow"]

        def asarray(x, dtype=None):
            x = tf.convert_to_tensor(x)
            return x if dtype is None else tf.cast(x, dtype)

        def full_like(x, fill_value, dtype=None):
            dtype = x.dtype if dtype is None else dtype
            return tf.fill(tf.shape(x), tf.cast(fill_value, dtype))

        def clip(x, min=None, max=None):
            if min is not None:
                x = tf.maximum(x, tf.cast(min, x.dtype))
            if max is not None:
                x = tf.minimum(x, tf.cast(max, x.dtype))
            return x

        _TF_NAMESPACE = SimpleNamespace(
            __name__="cabs._xp.tensorflow",
            float16=tf.float16,
            bfloat16=tf.bfloat16,
            float32=tf.float32,
            float64=tf.float64,
            int32=tf.int32,
            int64=tf.int64,
            asarray=asarray,
            astype=lambda x, dtype: tf.cast(x, dtype),
            clip=clip,
            full_like=full_like,
            isfinite=tf.math.is_finite,
            isnan=tf.math.is_nan,
            logical_and=tf.logical_and,
            round=tf.round,  # half to even, like the Array API's round
            where=tf.where,
        )
    return _TF_NAMESPACE
