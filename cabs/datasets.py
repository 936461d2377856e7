"""Data sets for training: an embedded default that works offline, and loaders for standard files.

* ``"mnist1d"`` (default): MNIST-1D generated on this machine with the ``mnist1d``
  package (Greydanus 2020), 4000 train / 1000 test sequences of 40 features, 10 classes.
* ``"digits"``: scikit-learn's bundled 8x8 handwritten digits, split 80/20.
* ``"mnist"``, ``"fashion-mnist"``: the standard IDX files from a local folder.
* ``"cifar10"``: the standard python batches from a local folder.

Every loader returns a :class:`Dataset` of NumPy arrays: inputs float32 with shape
``(N, *input_shape)``, labels int64. Nothing is downloaded. Problems with the files
raise :class:`DatasetError` with a one-line message that names the file.
"""

from __future__ import annotations

import gzip
import importlib.metadata
import os
import pickle
import random
import tempfile
import zipfile
import zlib
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = ["Dataset", "DatasetError", "load", "names", "read_idx"]


class DatasetError(ValueError):
    """A data set cannot be loaded: unknown name, missing folder or file, corrupt content."""


@dataclass(frozen=True, eq=False, repr=False)
class Dataset:
    """A classification data set split into train and test parts.

    Attributes:
        name: the name it was loaded under.
        x_train: float32 inputs, shape ``(num_train, *input_shape)``.
        y_train: int64 class labels in ``[0, num_classes)``, shape ``(num_train,)``.
        x_test: float32 inputs, shape ``(num_test, *input_shape)``.
        y_test: int64 class labels, shape ``(num_test,)``.
        num_classes: the number of classes.
        input_shape: the shape of one example, channels first for images.
    """

    name: str
    x_train: np.ndarray
    y_train: np.ndarray
    x_test: np.ndarray
    y_test: np.ndarray
    num_classes: int
    input_shape: tuple[int, ...]

    def __repr__(self) -> str:
        return (
            f"Dataset(name={self.name!r}, train={len(self.y_train)}, test={len(self.y_test)}, "
            f"num_classes={self.num_classes}, input_shape={self.input_shape})"
        )


# ---------------------------------------------------------------------------
# MNIST-1D, the embedded default

_MNIST1D_CACHE_FORMAT = 1  # bump when the stored arrays change meaning


def _cache_dir() -> Path | None:
    """The disk cache folder: ``$CABS_CACHE``, else ``~/.cache/cabs``; None when CABS_CACHE=off."""
    setting = os.environ.get("CABS_CACHE")
    if setting is not None and setting.strip().lower() in ("", "0", "off", "none", "false"):
        return None
    return Path(setting).expanduser() if setting else Path.home() / ".cache" / "cabs"


def _mnist1d_cache_file(seed: int) -> Path | None:
    folder = _cache_dir()
    if folder is None:
        return None
    try:
        version = importlib.metadata.version("mnist1d")
    except importlib.metadata.PackageNotFoundError:
        return None
    return folder / f"mnist1d-{version}-seed{seed}-format{_MNIST1D_CACHE_FORMAT}.npz"


def _read_mnist1d_cache(path: Path) -> dict[str, np.ndarray] | None:
    """The cached arrays, or None when the file is absent or not what we wrote (then it is regenerated)."""
    try:
        with np.load(path, allow_pickle=False) as stored:
            arrays = {key: stored[key] for key in ("x_train", "y_train", "x_test", "y_test")}
    except (OSError, ValueError, KeyError, EOFError, zlib.error, zipfile.BadZipFile):
        return None
    shapes_fit = (
        arrays["x_train"].ndim == 2
        and arrays["x_train"].shape[0] == arrays["y_train"].shape[0]
        and arrays["x_test"].shape[1:] == arrays["x_train"].shape[1:]
        and arrays["x_test"].shape[0] == arrays["y_test"].shape[0]
    )
    return arrays if shapes_fit else None


def _write_atomically(path: Path, arrays: dict[str, np.ndarray]) -> None:
    """Write an .npz through a temporary file and a rename, so a reader never sees half a file."""
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=path.name, suffix=".tmp")
    except OSError:
        return  # the cache is an optimisation; an unwritable folder only costs regeneration
    try:
        with os.fdopen(handle, "wb") as file:
            np.savez(file, **arrays)  # type: ignore[arg-type]  # numpy stubs read ** as allow_pickle
        os.replace(temporary, path)
    except OSError:
        Path(temporary).unlink(missing_ok=True)


def _generate_mnist1d(seed: int) -> dict[str, np.ndarray]:
    try:
        from mnist1d.data import get_dataset_args, make_dataset
    except ImportError as error:
        raise DatasetError(
            f"data set 'mnist1d' needs the mnist1d package ({error}); pip install 'cabs[cli]'"
        ) from error

    args = get_dataset_args()
    args.seed = seed
    # make_dataset seeds the global `random` and `numpy.random` generators; restore the
    # caller's state so loading data does not change their random streams.
    python_state, numpy_state = random.getstate(), np.random.get_state()
    try:
        generated = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    return {
        "x_train": generated["x"],
        "y_train": generated["y"],
        "x_test": generated["x_test"],
        "y_test": generated["y_test"],
    }


def _load_mnist1d(seed: int) -> Dataset:
    """MNIST-1D from the package's generator (never its downloader), features standardised."""
    cache_file = _mnist1d_cache_file(seed)
    arrays = _read_mnist1d_cache(cache_file) if cache_file is not None else None
    if arrays is None:
        arrays = _generate_mnist1d(seed)
        if cache_file is not None:
            _write_atomically(cache_file, arrays)
    x_train = np.asarray(arrays["x_train"], dtype=np.float64)
    x_test = np.asarray(arrays["x_test"], dtype=np.float64)
    # Per-feature standardisation with train statistics only, so nothing about the test set leaks.
    mean = x_train.mean(axis=0)
    std = x_train.std(axis=0)
    std = np.where(std > 0, std, 1.0)
    return Dataset(
        name="mnist1d",
        x_train=((x_train - mean) / std).astype(np.float32),
        y_train=np.asarray(arrays["y_train"], dtype=np.int64),
        x_test=((x_test - mean) / std).astype(np.float32),
        y_test=np.asarray(arrays["y_test"], dtype=np.int64),
        num_classes=10,
        input_shape=(x_train.shape[1],),
    )


# ---------------------------------------------------------------------------
# scikit-learn's digits


def _stratified_split(labels: np.ndarray, test_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Shuffled train and test indices with each class split in the same proportion."""
    rng = np.random.default_rng(seed)
    train, test = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        num_test = int(round(test_fraction * len(members)))
        test.append(members[:num_test])
        train.append(members[num_test:])
    return rng.permutation(np.concatenate(train)), rng.permutation(np.concatenate(test))


def _load_digits(seed: int) -> Dataset:
    try:
        from sklearn.datasets import load_digits
    except ImportError as error:
        raise DatasetError(f"data set 'digits' needs scikit-learn ({error}); pip install 'cabs[cli]'") from error

    bunch = load_digits()
    images = np.asarray(bunch.images, dtype=np.float64) / 16.0  # pixel values are 0..16
    labels = np.asarray(bunch.target, dtype=np.int64)
    train, test = _stratified_split(labels, 0.2, seed)
    x = images[:, None, :, :].astype(np.float32)
    return Dataset(
        name="digits",
        x_train=x[train],
        y_train=labels[train],
        x_test=x[test],
        y_test=labels[test],
        num_classes=10,
        input_shape=(1, 8, 8),
    )


# ---------------------------------------------------------------------------
# File helpers


def _read_bytes(path: Path) -> bytes:
    """The file's content, gunzipped when it starts with the gzip magic bytes."""
    try:
        raw = path.read_bytes()
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror or error}") from error
    if raw[:2] != b"\x1f\x8b":
        return raw
    try:
        return gzip.decompress(raw)
    except (OSError, EOFError, zlib.error) as error:
        raise DatasetError(f"{path} is a damaged gzip file ({error}); download it again") from error


def _require_folder(data_dir: str | os.PathLike | None, dataset: str) -> Path:
    if data_dir is None:
        raise DatasetError(
            f"data set {dataset!r} is read from local files: pass data_dir (--data-dir) with the folder that holds them"
        )
    folder = Path(data_dir).expanduser()
    if not folder.is_dir():
        raise DatasetError(f"data folder {folder} for {dataset!r} does not exist or is not a folder")
    return folder


# ---------------------------------------------------------------------------
# IDX files (MNIST, Fashion-MNIST)

# IDX type codes (third byte of the magic number) and their big-endian NumPy types.
_IDX_TYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (the MNIST format), gzipped or not.

    The header is a magic number ``0x0000TTDD`` (``TT`` the element type, ``DD`` the
    number of dimensions) and one big-endian uint32 size per dimension; the data
    follow in C order, big-endian.

    Args:
        path: the file.

    Returns:
        The array, in native byte order.

    Raises:
        DatasetError: a bad magic number, or a payload that does not match the header.
    """
    path = Path(path)
    raw = _read_bytes(path)
    if len(raw) < 4:
        raise DatasetError(f"{path} is not an IDX file: {len(raw)} bytes, shorter than the 4-byte magic number")
    magic = int.from_bytes(raw[:4], "big")
    type_code, ndim = raw[2], raw[3]
    if raw[:2] != b"\x00\x00" or type_code not in _IDX_TYPES or ndim == 0:
        raise DatasetError(
            f"{path} has a bad magic number 0x{magic:08X}; an IDX file starts with 0x0000TTDD "
            f"(TT a type code in {sorted(f'0x{code:02X}' for code in _IDX_TYPES)}, DD >= 1 dimensions)"
        )
    header_length = 4 + 4 * ndim
    if len(raw) < header_length:
        raise DatasetError(
            f"{path} is truncated: the header announces {ndim} dimensions but the file has {len(raw)} bytes"
        )
    shape = tuple(int.from_bytes(raw[4 + 4 * axis : 8 + 4 * axis], "big") for axis in range(ndim))
    dtype = np.dtype(_IDX_TYPES[type_code])
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    found = len(raw) - header_length
    if found != expected:
        problem = "truncated" if found < expected else "longer than its header says"
        raise DatasetError(
            f"{path} is {problem}: the header says shape {shape} of {dtype.name} ({expected} bytes of data), "
            f"the file has {found} bytes of data"
        )
    return np.frombuffer(raw, dtype=dtype, offset=header_length).reshape(shape).astype(dtype.newbyteorder("="))


_IDX_FILES = {
    "train_images": "train-images-idx3-ubyte",
    "train_labels": "train-labels-idx1-ubyte",
    "test_images": "t10k-images-idx3-ubyte",
    "test_labels": "t10k-labels-idx1-ubyte",
}
# torchvision keeps the same files under <root>/MNIST/raw and <root>/FashionMNIST/raw.
_TORCHVISION_FOLDERS = {"mnist": "MNIST", "fashion-mnist": "FashionMNIST"}


def _find_idx_files(folder: Path, dataset: str) -> dict[str, Path]:
    candidates = [folder, folder / _TORCHVISION_FOLDERS[dataset] / "raw"]
    for candidate in candidates:
        found = {}
        for role, stem in _IDX_FILES.items():
            for file_name in (stem + ".gz", stem):
                if (candidate / file_name).is_file():
                    found[role] = candidate / file_name
                    break
        if len(found) == len(_IDX_FILES):
            return found
        if found:  # some files here: report what is missing in this folder
            break
    else:
        candidate, found = folder, {}
    missing = [stem for role, stem in _IDX_FILES.items() if role not in found]
    expected = ", ".join(stem + ".gz" for stem in _IDX_FILES.values())
    raise DatasetError(
        f"{candidate} lacks the {dataset} file(s) {', '.join(missing)} (gzipped or not); expected {expected}"
    )


def _idx_split(images_path: Path, labels_path: Path, num_classes: int) -> tuple[np.ndarray, np.ndarray]:
    images, labels = read_idx(images_path), read_idx(labels_path)
    if images.ndim != 3 or images.dtype != np.uint8:
        raise DatasetError(
            f"{images_path} must hold uint8 images of shape (count, rows, columns), got {images.dtype} {images.shape}"
        )
    if labels.ndim != 1 or labels.dtype != np.uint8:
        raise DatasetError(f"{labels_path} must hold uint8 labels of shape (count,), got {labels.dtype} {labels.shape}")
    if len(images) == 0:
        raise DatasetError(f"{images_path} holds no images (its header says 0); the file is damaged, download it again")
    if len(images) != len(labels):
        raise DatasetError(
            f"{images_path.name} has {len(images)} images but {labels_path.name} has {len(labels)} labels "
            f"(in {images_path.parent}); the files belong to different downloads or one is damaged"
        )
    if labels.size and labels.max() >= num_classes:
        raise DatasetError(f"{labels_path} has label {labels.max()}, outside 0..{num_classes - 1}")
    return (images[:, None, :, :].astype(np.float32) / 255.0), labels.astype(np.int64)


def _load_idx_dataset(dataset: str, data_dir: str | os.PathLike | None) -> Dataset:
    files = _find_idx_files(_require_folder(data_dir, dataset), dataset)
    x_train, y_train = _idx_split(files["train_images"], files["train_labels"], 10)
    x_test, y_test = _idx_split(files["test_images"], files["test_labels"], 10)
    if x_train.shape[1:] != x_test.shape[1:]:
        raise DatasetError(
            f"{files['train_images']} has images of {x_train.shape[2:]} pixels but "
            f"{files['test_images']} of {x_test.shape[2:]}; the files belong to different data sets"
        )
    return Dataset(dataset, x_train, y_train, x_test, y_test, num_classes=10, input_shape=x_train.shape[1:])


# ---------------------------------------------------------------------------
# CIFAR-10 python batches

_CIFAR_FOLDER = "cifar-10-batches-py"
_CIFAR_TRAIN = tuple(f"data_batch_{number}" for number in range(1, 6))
_CIFAR_TEST = "test_batch"
_CIFAR_IMAGE_SIZE = 3 * 32 * 32


class _CifarUnpickler(pickle.Unpickler):
    """Unpickles only what a CIFAR batch holds: dicts, lists, bytes, ints and NumPy arrays.

    Any other global (the way a malicious pickle runs code) is refused.
    """

    _ALLOWED = {
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "scalar"),
        ("numpy._core.numeric", "_frombuffer"),  # arrays pickled with protocol 5
        ("_codecs", "encode"),  # bytes pickled by Python 3 with protocol 2
    }
    _NUMPY_2 = int(np.__version__.split(".")[0]) >= 2

    def find_class(self, module: str, name: str):
        # The official files were pickled by NumPy 1 (numpy.core); NumPy 2 renamed it numpy._core.
        if module.startswith("numpy.core."):
            module = "numpy._core." + module.removeprefix("numpy.core.")
        if (module, name) not in self._ALLOWED:
            raise pickle.UnpicklingError(f"global {module}.{name} is not allowed in a CIFAR-10 batch")
        if module.startswith("numpy._core.") and not self._NUMPY_2:
            module = "numpy.core." + module.removeprefix("numpy._core.")
        return super().find_class(module, name)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    try:
        with path.open("rb") as file:
            batch = _CifarUnpickler(file, encoding="bytes").load()
    except OSError as error:
        raise DatasetError(f"cannot read {path}: {error.strerror or error}") from error
    except (
        pickle.UnpicklingError,
        EOFError,
        ValueError,
        TypeError,
        AttributeError,
        ImportError,
        IndexError,
        KeyError,
    ) as error:
        raise DatasetError(f"{path} is not a CIFAR-10 python batch ({type(error).__name__}: {error})") from error
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        found = sorted(batch) if isinstance(batch, dict) else type(batch).__name__
        raise DatasetError(
            f"{path} is not a CIFAR-10 python batch: expected a dict with b'data' and b'labels', got {found}"
        )
    data, labels = batch[b"data"], batch[b"labels"]
    if (
        not isinstance(data, np.ndarray)
        or data.dtype != np.uint8
        or data.ndim != 2
        or data.shape[1] != _CIFAR_IMAGE_SIZE
    ):
        description = f"{data.dtype} {data.shape}" if isinstance(data, np.ndarray) else type(data).__name__
        raise DatasetError(
            f"{path}: b'data' must be a uint8 array of shape (count, {_CIFAR_IMAGE_SIZE}), got {description}"
        )
    if len(data) == 0:
        raise DatasetError(f"{path} is an empty batch: it holds no images; the file is damaged, download it again")
    try:
        labels = np.asarray(labels)
    except (TypeError, ValueError) as error:
        raise DatasetError(f"{path}: b'labels' must be a list of ints ({error})") from error
    if labels.ndim != 1 or labels.dtype.kind not in "iu":
        raise DatasetError(f"{path}: b'labels' must be a list of ints, got {labels.dtype} with shape {labels.shape}")
    if len(labels) != len(data):
        raise DatasetError(f"{path} has {len(data)} images but {len(labels)} labels")
    if labels.size and (labels.min() < 0 or labels.max() > 9):
        raise DatasetError(f"{path} has labels {labels.min()}..{labels.max()}, outside 0..9")
    images = data.reshape(-1, 3, 32, 32).astype(np.float32) / 255.0
    return images, labels.astype(np.int64)


def _load_cifar10(data_dir: str | os.PathLike | None) -> Dataset:
    folder = _require_folder(data_dir, "cifar10")
    if not (folder / _CIFAR_TEST).is_file() and (folder / _CIFAR_FOLDER).is_dir():
        folder = folder / _CIFAR_FOLDER
    expected = (*_CIFAR_TRAIN, _CIFAR_TEST)
    missing = [file_name for file_name in expected if not (folder / file_name).is_file()]
    if missing:
        raise DatasetError(
            f"{folder} lacks the CIFAR-10 file(s) {', '.join(missing)}; expected {', '.join(expected)} "
            f"(the python version, in {_CIFAR_FOLDER}/ or directly in the folder)"
        )
    train = [_read_cifar_batch(folder / file_name) for file_name in _CIFAR_TRAIN]
    x_test, y_test = _read_cifar_batch(folder / _CIFAR_TEST)
    x_train = np.concatenate([images for images, _ in train])
    y_train = np.concatenate([labels for _, labels in train])
    return Dataset("cifar10", x_train, y_train, x_test, y_test, num_classes=10, input_shape=(3, 32, 32))


# ---------------------------------------------------------------------------
# The registry

_LOADERS: dict[str, Callable[[str | os.PathLike | None, int], Dataset]] = {
    "mnist1d": lambda data_dir, seed: _load_mnist1d(seed),
    "digits": lambda data_dir, seed: _load_digits(seed),
    "mnist": lambda data_dir, seed: _load_idx_dataset("mnist", data_dir),
    "fashion-mnist": lambda data_dir, seed: _load_idx_dataset("fashion-mnist", data_dir),
    "cifar10": lambda data_dir, seed: _load_cifar10(data_dir),
}
# Generated data sets are kept per process: the CLI and the tests load them repeatedly.
_GENERATED = ("mnist1d", "digits")
_memory_cache: dict[tuple[str, int], Dataset] = {}


def names() -> list[str]:
    """The names :func:`load` knows, the embedded default first."""
    return list(_LOADERS)


def _canonical_name(name: str) -> str:
    if not isinstance(name, str):
        raise DatasetError(f"`name` must be a data set name, got name={name!r}; known: {', '.join(names())}")
    key = name.strip().lower().replace("_", "-")
    key = {"fashionmnist": "fashion-mnist", "cifar-10": "cifar10", "mnist-1d": "mnist1d"}.get(key, key)
    if key not in _LOADERS:
        raise DatasetError(f"unknown data set {name!r}; known: {', '.join(names())}")
    return key


def _copy(dataset: Dataset) -> Dataset:
    """A copy with its own arrays, so a caller who modifies them cannot change the cached data set."""
    return Dataset(
        dataset.name,
        dataset.x_train.copy(),
        dataset.y_train.copy(),
        dataset.x_test.copy(),
        dataset.y_test.copy(),
        dataset.num_classes,
        dataset.input_shape,
    )


def load(name: str = "mnist1d", *, data_dir: str | os.PathLike | None = None, seed: int = 0) -> Dataset:
    """Load a data set by name.

    ``"mnist1d"`` (default) is generated offline with ``mnist1d.data.make_dataset``
    and the package's default arguments (4000 train / 1000 test, 40 features,
    10 classes) with ``seed`` as the generator's seed; its features are standardised
    with the train set's per-feature mean and standard deviation. ``input_shape`` is
    ``(40,)``; a 1-D CNN reshapes the inputs to ``(N, 1, 40)``. The generated arrays
    (about 2 s of work) are kept in memory per process and on disk in ``$CABS_CACHE``
    (default ``~/.cache/cabs``; ``CABS_CACHE=off`` disables the disk cache), written
    atomically.

    ``"digits"`` is scikit-learn's bundled 8x8 digits (1797 images), a stratified
    80/20 split shuffled with ``seed``, scaled to [0, 1], ``input_shape`` ``(1, 8, 8)``.

    ``"mnist"`` and ``"fashion-mnist"`` read ``train-images-idx3-ubyte.gz``,
    ``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz`` and
    ``t10k-labels-idx1-ubyte.gz`` (gzipped or not) from ``data_dir`` (or its
    torchvision sub-folder ``MNIST/raw`` / ``FashionMNIST/raw``); images scaled to
    [0, 1], ``input_shape`` ``(1, 28, 28)``. ``"cifar10"`` reads the python batches
    ``data_batch_1`` .. ``data_batch_5`` and ``test_batch`` from ``data_dir``, which is
    the ``cifar-10-batches-py`` folder or its parent; ``input_shape`` ``(3, 32, 32)``.
    These use the files' own split; ``seed`` does not affect them, and ``data_dir``
    does not affect the generated ones.

    Args:
        name: one of :func:`names` (case and ``_`` / ``-`` do not matter).
        data_dir: the folder with the files, for the file-based data sets.
        seed: the seed of the generated data sets and of the digits split.

    Returns:
        A :class:`Dataset`; its arrays are the caller's to modify.

    Raises:
        DatasetError: unknown name, missing ``data_dir``, missing or corrupt files.
            The message is one line and names the file.
        TypeError: ``data_dir`` is not a path.

    Example:
        >>> from cabs import datasets
        >>> data = datasets.load("digits", seed=0)
        >>> data.x_train.shape, data.x_test.shape, data.num_classes
        ((1438, 1, 8, 8), (359, 1, 8, 8), 10)
    """
    key = _canonical_name(name)
    if data_dir is not None and not isinstance(data_dir, (str, os.PathLike)):
        raise TypeError(
            f"`data_dir` must be a path (a str or os.PathLike naming a folder), got data_dir={data_dir!r}. "
            "Pass the folder that holds the data set's files."
        )
    if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
        raise DatasetError(f"`seed` must be a non-negative int, got seed={seed!r}")
    seed = int(seed)
    if key not in _GENERATED:
        return _LOADERS[key](data_dir, seed)
    if (key, seed) not in _memory_cache:
        _memory_cache[(key, seed)] = _LOADERS[key](data_dir, seed)
    return _copy(_memory_cache[(key, seed)])
