"""Data sets: the offline ones load with the right shapes; the file loaders read and check the standard formats."""

from __future__ import annotations

import gzip
import os
import pickle
import random
import struct
from pathlib import Path

import numpy as np
import pytest

from cabs import datasets
from cabs.datasets import DatasetError

IDX_TYPE_CODES = {np.uint8: 0x08, np.int8: 0x09, np.int16: 0x0B, np.int32: 0x0C, np.float32: 0x0D, np.float64: 0x0E}


@pytest.fixture(scope="session")
def mnist1d(tmp_path_factory):
    """MNIST-1D generated once per test session (the loader keeps it in memory), disk cache in a temporary folder.

    Also returns the global random states from before and after the generation.
    """
    cache = tmp_path_factory.mktemp("cabs-cache")
    previous = os.environ.get("CABS_CACHE")
    os.environ["CABS_CACHE"] = str(cache)
    # Another test file may have loaded it already; drop that copy so this load generates.
    datasets._memory_cache.pop(("mnist1d", 0), None)
    before = (random.getstate(), np.random.get_state())
    try:
        data = datasets.load("mnist1d")
    finally:
        if previous is None:
            del os.environ["CABS_CACHE"]
        else:
            os.environ["CABS_CACHE"] = previous
    after = (random.getstate(), np.random.get_state())
    return data, cache, (before, after)


def assert_one_line_naming(error: pytest.ExceptionInfo, *fragments: str) -> None:
    message = str(error.value)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message, f"{fragment!r} not in {message!r}"


# ---------------------------------------------------------------------------
# MNIST-1D and digits


def test_names_lists_every_loader_default_first():
    assert datasets.names() == ["mnist1d", "digits", "mnist", "fashion-mnist", "cifar10"]


def test_mnist1d_shapes_types_and_classes(mnist1d):
    data = mnist1d[0]
    assert (data.name, data.num_classes, data.input_shape) == ("mnist1d", 10, (40,))
    assert data.x_train.shape == (4000, 40) and data.x_test.shape == (1000, 40)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    assert data.y_train.shape == (4000,) and data.y_test.shape == (1000,)
    assert set(np.unique(data.y_train)) == set(range(10)) == set(np.unique(data.y_test))


def test_mnist1d_is_the_generators_output_standardised_with_train_statistics(mnist1d):
    from mnist1d.data import get_dataset_args, make_dataset

    data, cache, ((python_before, numpy_before), (python_after, numpy_after)) = mnist1d
    assert list(cache.glob("*.npz")), "the fixture must have generated the data, not read a cache"
    # Loading must not reseed the caller's global generators (make_dataset does).
    assert python_after == python_before
    assert np.array_equal(numpy_after[1], numpy_before[1]) and numpy_after[2:] == numpy_before[2:]

    python_state, numpy_state = python_before, numpy_before
    args = get_dataset_args()
    args.seed = 0
    try:
        reference = make_dataset(args)
    finally:
        random.setstate(python_state)
        np.random.set_state(numpy_state)
    np.testing.assert_array_equal(data.y_train, reference["y"])
    np.testing.assert_array_equal(data.y_test, reference["y_test"])
    x_train = np.asarray(reference["x"], dtype=np.float64)
    mean, std = x_train.mean(axis=0), x_train.std(axis=0)
    np.testing.assert_allclose(data.x_train, (x_train - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data.x_test, (reference["x_test"] - mean) / std, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(data.x_train.astype(np.float64).mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.astype(np.float64).std(axis=0), 1.0, rtol=1e-5)


def test_mnist1d_disk_cache_holds_the_same_data(mnist1d, monkeypatch):
    data, cache, _ = mnist1d
    files = list(cache.glob("mnist1d-*-seed0-*.npz"))
    assert len(files) == 1 and not list(cache.glob("*.tmp"))
    monkeypatch.setenv("CABS_CACHE", str(cache))
    from_disk = datasets._load_mnist1d(0)  # bypasses the memory cache
    for field in ("x_train", "y_train", "x_test", "y_test"):
        np.testing.assert_array_equal(getattr(from_disk, field), getattr(data, field))


def test_a_damaged_cache_file_is_ignored(tmp_path):
    damaged = tmp_path / "mnist1d.npz"
    damaged.write_bytes(b"PK\x03\x04 not really a zip")
    assert datasets._read_mnist1d_cache(damaged) is None
    wrong_shapes = tmp_path / "shapes.npz"
    np.savez(wrong_shapes, x_train=np.zeros((3, 4)), y_train=np.zeros(2), x_test=np.zeros((1, 4)), y_test=np.zeros(1))
    assert datasets._read_mnist1d_cache(wrong_shapes) is None
    assert datasets._read_mnist1d_cache(tmp_path / "absent.npz") is None


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv("CABS_CACHE", str(tmp_path))
    assert datasets._cache_dir() == tmp_path
    monkeypatch.setenv("CABS_CACHE", "off")
    assert datasets._cache_dir() is None
    monkeypatch.delenv("CABS_CACHE")
    assert datasets._cache_dir() == Path.home() / ".cache" / "cabs"


def test_loaded_arrays_are_the_callers_to_modify(mnist1d):
    first = datasets.load("mnist1d")
    first.x_train[:] = 0.0
    first.y_test[:] = -1
    second = datasets.load("MNIST_1D")
    np.testing.assert_array_equal(second.x_train, mnist1d[0].x_train)
    assert second.y_test.min() >= 0


def test_digits_split_covers_the_data_once_stratified():
    from sklearn.datasets import load_digits

    data = datasets.load("digits", seed=3)
    assert (data.num_classes, data.input_shape) == (10, (1, 8, 8))
    assert data.x_train.shape == (1438, 1, 8, 8) and data.x_test.shape == (359, 1, 8, 8)
    assert data.x_train.dtype == np.float32 and data.y_test.dtype == np.int64
    assert data.x_train.min() == 0.0 and data.x_train.max() == 1.0

    bunch = load_digits()
    # Train and test together are exactly the bundled images and labels, each once.
    ours = np.concatenate([data.x_train, data.x_test]).reshape(-1, 64).astype(np.float64) * 16.0
    labels = np.concatenate([data.y_train, data.y_test])
    reference = np.column_stack([bunch.data, bunch.target])
    combined = np.column_stack([np.round(ours), labels])
    np.testing.assert_array_equal(combined[np.lexsort(combined.T)], reference[np.lexsort(reference.T)])
    # Stratified: each class is split 80/20 up to rounding.
    for label in range(10):
        in_class = np.sum(bunch.target == label)
        assert np.sum(data.y_test == label) == round(0.2 * in_class)


def test_digits_split_depends_on_the_seed():
    first, again, other = (
        datasets.load("digits", seed=1),
        datasets.load("digits", seed=1),
        datasets.load("digits", seed=2),
    )
    np.testing.assert_array_equal(first.x_test, again.x_test)
    assert not np.array_equal(first.y_test, other.y_test)


def test_unknown_name_lists_the_known_ones():
    with pytest.raises(DatasetError) as error:
        datasets.load("imagenet")
    assert_one_line_naming(error, "'imagenet'", "mnist1d", "digits", "mnist", "fashion-mnist", "cifar10")
    assert isinstance(error.value, ValueError)


@pytest.mark.parametrize("seed", [-1, 1.5, True])
def test_bad_seed(seed):
    with pytest.raises(DatasetError, match="seed"):
        datasets.load("digits", seed=seed)


# ---------------------------------------------------------------------------
# IDX files


def idx_bytes(array: np.ndarray) -> bytes:
    """The IDX encoding of ``array``, written from the format's definition."""
    code = IDX_TYPE_CODES[array.dtype.type]
    header = bytes([0, 0, code, array.ndim]) + b"".join(struct.pack(">I", size) for size in array.shape)
    return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write(path: Path, content: bytes, gzipped: bool) -> Path:
    path = path.with_name(path.name + ".gz") if gzipped else path
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(gzip.compress(content) if gzipped else content)
    return path


def write_mnist(folder: Path, gzipped: bool, num_train: int = 6, num_test: int = 4, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    arrays = {
        "train-images-idx3-ubyte": rng.integers(0, 256, (num_train, 28, 28), dtype=np.uint8),
        "train-labels-idx1-ubyte": rng.integers(0, 10, num_train, dtype=np.uint8),
        "t10k-images-idx3-ubyte": rng.integers(0, 256, (num_test, 28, 28), dtype=np.uint8),
        "t10k-labels-idx1-ubyte": rng.integers(0, 10, num_test, dtype=np.uint8),
    }
    for stem, array in arrays.items():
        write(folder / stem, idx_bytes(array), gzipped)
    return arrays


@pytest.mark.parametrize("gzipped", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize("dtype", list(IDX_TYPE_CODES), ids=lambda dtype: dtype.__name__)
def test_read_idx_round_trips_every_type(tmp_path, gzipped, dtype):
    array = (np.arange(2 * 3 * 5).reshape(2, 3, 5) * 7 - 40).astype(dtype)
    path = write(tmp_path / "array-idx3", idx_bytes(array), gzipped)
    read = datasets.read_idx(path)
    assert read.dtype == np.dtype(dtype).newbyteorder("=") and read.shape == (2, 3, 5)
    np.testing.assert_array_equal(read, array)


@pytest.mark.parametrize("gzipped", [True, False], ids=["gz", "raw"])
def test_mnist_loads_the_written_files(tmp_path, gzipped):
    arrays = write_mnist(tmp_path, gzipped)
    data = datasets.load("mnist", data_dir=tmp_path)
    assert (data.name, data.num_classes, data.input_shape) == ("mnist", 10, (1, 28, 28))
    assert data.x_train.shape == (6, 1, 28, 28) and data.x_test.shape == (4, 1, 28, 28)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    np.testing.assert_allclose(data.x_train[:, 0], arrays["train-images-idx3-ubyte"] / 255.0, rtol=1e-7)
    np.testing.assert_allclose(data.x_test[:, 0], arrays["t10k-images-idx3-ubyte"] / 255.0, rtol=1e-7)
    np.testing.assert_array_equal(data.y_train, arrays["train-labels-idx1-ubyte"])
    np.testing.assert_array_equal(data.y_test, arrays["t10k-labels-idx1-ubyte"])


def test_fashion_mnist_in_the_torchvision_layout(tmp_path):
    arrays = write_mnist(tmp_path / "FashionMNIST" / "raw", gzipped=False, seed=5)
    data = datasets.load("fashion_mnist", data_dir=tmp_path)
    assert data.name == "fashion-mnist"
    np.testing.assert_array_equal(data.y_test, arrays["t10k-labels-idx1-ubyte"])


def corrupt_train_images(folder: Path, gzipped: bool, change) -> Path:
    write_mnist(folder, gzipped)
    stem = folder / "train-images-idx3-ubyte"
    path = stem.with_name(stem.name + ".gz") if gzipped else stem
    content = gzip.decompress(path.read_bytes()) if gzipped else path.read_bytes()
    return write(stem, change(content), gzipped)


@pytest.mark.parametrize("gzipped", [True, False], ids=["gz", "raw"])
@pytest.mark.parametrize(
    ("change", "problem"),
    [
        (lambda content: b"\x1f\x00" + content[2:], "bad magic number 0x1F000803"),
        (lambda content: content[:2] + b"\x07" + content[3:], "bad magic number 0x00000703"),
        (lambda content: content[:-100], "truncated"),
        (lambda content: content + b"\x00", "longer than its header says"),
        (lambda content: content[:10], "truncated: the header announces 3 dimensions"),
        (lambda content: content[:3], "shorter than the 4-byte magic number"),
    ],
    ids=["magic", "type-code", "payload", "trailing", "header", "tiny"],
)
def test_corrupt_idx_file_names_the_file_and_the_problem(tmp_path, gzipped, change, problem):
    path = corrupt_train_images(tmp_path, gzipped, change)
    with pytest.raises(DatasetError) as error:
        datasets.load("mnist", data_dir=tmp_path)
    assert_one_line_naming(error, str(path), problem)


def test_damaged_gzip_names_the_file(tmp_path):
    write_mnist(tmp_path, gzipped=True)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    path.write_bytes(path.read_bytes()[:-12])
    with pytest.raises(DatasetError) as error:
        datasets.load("mnist", data_dir=tmp_path)
    assert_one_line_naming(error, str(path), "damaged gzip")


def test_image_and_label_counts_must_match(tmp_path):
    write_mnist(tmp_path, gzipped=True)
    write(tmp_path / "train-labels-idx1-ubyte", idx_bytes(np.zeros(5, dtype=np.uint8)), gzipped=True)
    with pytest.raises(DatasetError) as error:
        datasets.load("mnist", data_dir=tmp_path)
    assert_one_line_naming(error, "train-images-idx3-ubyte.gz has 6 images", "train-labels-idx1-ubyte.gz has 5 labels")


@pytest.mark.parametrize(
    ("stem", "array", "problem"),
    [
        ("train-images-idx3-ubyte", np.zeros((6, 784), dtype=np.uint8), "must hold uint8 images"),
        ("t10k-labels-idx1-ubyte", np.zeros(4, dtype=np.int32), "must hold uint8 labels"),
        ("t10k-labels-idx1-ubyte", np.full(4, 10, dtype=np.uint8), "has label 10"),
    ],
    ids=["images-2d", "labels-int32", "label-range"],
)
def test_idx_content_is_checked(tmp_path, stem, array, problem):
    write_mnist(tmp_path, gzipped=False)
    path = write(tmp_path / stem, idx_bytes(array), gzipped=False)
    with pytest.raises(DatasetError) as error:
        datasets.load("mnist", data_dir=tmp_path)
    assert_one_line_naming(error, str(path), problem)


def test_missing_idx_files_are_listed(tmp_path):
    write_mnist(tmp_path, gzipped=True)
    (tmp_path / "t10k-images-idx3-ubyte.gz").unlink()
    (tmp_path / "train-labels-idx1-ubyte.gz").unlink()
    with pytest.raises(DatasetError) as error:
        datasets.load("mnist", data_dir=tmp_path)
    assert_one_line_naming(
        error, str(tmp_path), "train-labels-idx1-ubyte, t10k-images-idx3-ubyte", "expected train-images-idx3-ubyte.gz"
    )


@pytest.mark.parametrize("name", ["mnist", "fashion-mnist", "cifar10"])
def test_missing_folder_and_missing_data_dir(tmp_path, name):
    with pytest.raises(DatasetError) as error:
        datasets.load(name, data_dir=tmp_path / "nowhere")
    assert_one_line_naming(error, str(tmp_path / "nowhere"), "does not exist")
    with pytest.raises(DatasetError) as error:
        datasets.load(name)
    assert_one_line_naming(error, repr(name), "data_dir")


def test_empty_folder_lists_all_expected_files(tmp_path):
    with pytest.raises(DatasetError) as error:
        datasets.load("mnist", data_dir=tmp_path)
    assert_one_line_naming(error, str(tmp_path), "train-images-idx3-ubyte, train-labels-idx1-ubyte, t10k-images")


# ---------------------------------------------------------------------------
# CIFAR-10 python batches


def cifar_batch(rng: np.random.Generator, count: int, label: str) -> dict:
    """A batch in the official layout: rows are 1024 red, then green, then blue values."""
    return {
        b"batch_label": label.encode(),
        b"labels": [int(value) for value in rng.integers(0, 10, count)],
        b"data": rng.integers(0, 256, (count, 3072), dtype=np.uint8),
        b"filenames": [f"image_{index}.png".encode() for index in range(count)],
    }


def write_cifar(folder: Path, seed: int = 0) -> dict:
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    names = [f"data_batch_{number}" for number in range(1, 6)] + ["test_batch"]
    batches = {name: cifar_batch(rng, 3 + index, name) for index, name in enumerate(names)}
    for name, batch in batches.items():
        (folder / name).write_bytes(pickle.dumps(batch, protocol=2))
    return batches


@pytest.mark.parametrize("point_at", ["parent", "folder"])
def test_cifar10_loads_the_written_batches(tmp_path, point_at):
    batches = write_cifar(tmp_path / "cifar-10-batches-py")
    data_dir = tmp_path if point_at == "parent" else tmp_path / "cifar-10-batches-py"
    data = datasets.load("CIFAR-10", data_dir=data_dir)
    assert (data.name, data.num_classes, data.input_shape) == ("cifar10", 10, (3, 32, 32))
    train_names = [f"data_batch_{number}" for number in range(1, 6)]
    assert data.x_train.shape == (3 + 4 + 5 + 6 + 7, 3, 32, 32) and data.x_test.shape == (8, 3, 32, 32)
    assert data.x_train.dtype == np.float32 and data.y_train.dtype == np.int64
    expected_train = np.concatenate([batches[name][b"data"] for name in train_names])
    # Image 0's red channel is its first 1024 values, row by row.
    np.testing.assert_allclose(data.x_train[0, 0, 1, :], expected_train[0, 32:64] / 255.0, rtol=1e-7)
    np.testing.assert_allclose(data.x_train.reshape(-1, 3072), expected_train / 255.0, rtol=1e-7)
    np.testing.assert_array_equal(data.y_train, sum((batches[name][b"labels"] for name in train_names), []))
    np.testing.assert_array_equal(data.y_test, batches["test_batch"][b"labels"])


def test_cifar10_reads_batches_pickled_by_numpy_1(tmp_path):
    batches = write_cifar(tmp_path)
    # The official files name NumPy's module numpy.core.multiarray (NumPy 2 renamed it).
    path = tmp_path / "test_batch"
    content = path.read_bytes()
    assert b"numpy._core.multiarray" in content
    path.write_bytes(content.replace(b"numpy._core.multiarray", b"numpy.core.multiarray"))
    data = datasets.load("cifar10", data_dir=tmp_path)
    np.testing.assert_array_equal(data.y_test, batches["test_batch"][b"labels"])


class RunsCode:
    """Unpickling this would call os.getcwd: a stand-in for a malicious pickle."""

    def __reduce__(self):
        return (os.getcwd, ())


@pytest.mark.parametrize(
    ("content", "problem"),
    [
        (
            lambda batch: {**batch, b"data": batch[b"data"][:, :3000]},
            "b'data' must be a uint8 array of shape (count, 3072)",
        ),
        (lambda batch: {**batch, b"data": batch[b"data"].astype(np.int16)}, "got int16"),
        (lambda batch: {**batch, b"labels": batch[b"labels"][:-1]}, "has 8 images but 7 labels"),
        (lambda batch: {**batch, b"labels": [11] * 8}, "outside 0..9"),
        (lambda batch: {**batch, b"labels": ["cat"] * 8}, "b'labels' must be a list of ints"),
        (lambda batch: [batch[b"data"]], "expected a dict with b'data' and b'labels', got list"),
        (lambda batch: {b"data": batch[b"data"]}, "expected a dict with b'data' and b'labels'"),
        (lambda batch: {**batch, b"extra": RunsCode()}, "posix.getcwd is not allowed"),
    ],
    ids=["shape", "dtype", "count", "label-range", "label-type", "not-dict", "no-labels", "code"],
)
def test_corrupt_cifar_batch_names_the_file_and_the_problem(tmp_path, content, problem):
    batches = write_cifar(tmp_path)
    path = tmp_path / "test_batch"
    path.write_bytes(pickle.dumps(content(batches["test_batch"]), protocol=2))
    with pytest.raises(DatasetError) as error:
        datasets.load("cifar10", data_dir=tmp_path)
    assert_one_line_naming(error, str(path), problem.replace("posix", os.getcwd.__module__))


def test_truncated_cifar_batch(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_3"
    path.write_bytes(path.read_bytes()[:200])
    with pytest.raises(DatasetError) as error:
        datasets.load("cifar10", data_dir=tmp_path)
    assert_one_line_naming(error, str(path), "not a CIFAR-10 python batch")


def test_missing_cifar_batches_are_listed(tmp_path):
    write_cifar(tmp_path / "cifar-10-batches-py")
    (tmp_path / "cifar-10-batches-py" / "data_batch_2").unlink()
    (tmp_path / "cifar-10-batches-py" / "test_batch").unlink()
    with pytest.raises(DatasetError) as error:
        datasets.load("cifar10", data_dir=tmp_path)
    assert_one_line_naming(error, "cifar-10-batches-py", "data_batch_2, test_batch", "expected data_batch_1")


# ---------------------------------------------------------------------------
# Empty files and a data_dir that is not a path


@pytest.mark.parametrize("stem", ["train-images-idx3-ubyte", "t10k-images-idx3-ubyte"])
def test_an_empty_idx_image_file_is_refused_by_name(tmp_path, stem):
    write_mnist(tmp_path, gzipped=False)
    labels_stem = stem.replace("images-idx3", "labels-idx1")
    write(tmp_path / stem, idx_bytes(np.zeros((0, 28, 28), np.uint8)), gzipped=False)
    write(tmp_path / labels_stem, idx_bytes(np.zeros(0, np.uint8)), gzipped=False)
    with pytest.raises(DatasetError) as error:
        datasets.load("mnist", data_dir=tmp_path)
    assert_one_line_naming(error, str(tmp_path / stem), "holds no images")


def test_an_empty_cifar_batch_is_refused_by_name(tmp_path):
    write_cifar(tmp_path)
    path = tmp_path / "data_batch_2"
    path.write_bytes(pickle.dumps(cifar_batch(np.random.default_rng(0), 0, "data_batch_2"), protocol=4))
    with pytest.raises(DatasetError) as error:
        datasets.load("cifar10", data_dir=tmp_path)
    assert_one_line_naming(error, str(path), "empty batch")
    assert "float64" not in str(error.value)


@pytest.mark.parametrize("data_dir", [5, ["folder"], b"folder"])
def test_data_dir_must_be_a_path(data_dir):
    with pytest.raises(TypeError, match=r"`data_dir` must be a path .* got data_dir="):
        datasets.load("mnist", data_dir=data_dir)
