"""Datasets: IDX parsing, Fashion-MNIST, digits, image folders, and the errors for missing or empty data."""
import gzip
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD
from torch.utils.data import DataLoader

from evit.data import (
    FASHION_MNIST_DIR,
    FASHION_MNIST_FILES,
    ArrayDataset,
    DataError,
    build_datasets,
    check_data,
    load_digits_split,
    load_fashion_mnist,
    read_idx,
    subset,
)

HAS_FASHION_MNIST = (Path(FASHION_MNIST_DIR) / "train-images-idx3-ubyte.gz").is_file()


def write_idx(path: Path, array: np.ndarray, code: int = 0x08) -> None:
    header = bytes([0, 0, code, array.ndim]) + b"".join(d.to_bytes(4, "big") for d in array.shape)
    with gzip.open(path, "wb") as f:
        f.write(header + array.astype(array.dtype.newbyteorder(">")).tobytes())


def test_read_idx_round_trip(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (5, 3, 4), dtype=np.uint8)
    ints = np.array([1, -2, 70000], dtype=np.int32)
    write_idx(tmp_path / "u8.gz", images)
    write_idx(tmp_path / "i32.gz", ints, code=0x0C)  # big-endian ints: byte order must be handled
    np.testing.assert_array_equal(read_idx(tmp_path / "u8.gz"), images)
    np.testing.assert_array_equal(read_idx(tmp_path / "i32.gz"), ints)


def test_read_idx_rejects_garbage(tmp_path):
    path = tmp_path / "bad.gz"
    with gzip.open(path, "wb") as f:
        f.write(b"\x01\x02\x03\x04not an idx file")
    with pytest.raises(DataError, match="bad.gz"):
        read_idx(path)


@pytest.mark.skipif(not HAS_FASHION_MNIST, reason="Fashion-MNIST IDX files not installed")
def test_fashion_mnist_is_parsed_correctly():
    images, labels = load_fashion_mnist(train=False)
    assert images.shape == (10000, 28, 28) and images.dtype == np.uint8
    assert np.bincount(labels).tolist() == [1000] * 10  # the test split is exactly balanced
    assert images.max() == 255 and images.min() == 0


def test_missing_fashion_mnist_names_path_and_fix(tmp_path):
    with pytest.raises(DataError) as err:
        build_datasets("fashion_mnist", 28, data_dir=str(tmp_path))
    message = str(err.value)
    assert str(tmp_path) in message and "--data-dir" in message and "apt-get" in message
    assert "\n" not in message


def test_digits_split_is_fixed_and_disjoint():
    (train_x, train_y), (val_x, val_y) = load_digits_split(True), load_digits_split(False)
    assert len(train_x) + len(val_x) == 1797 and len(val_x) == 360
    seen = {x.tobytes() for x in train_x}
    assert sum(x.tobytes() in seen for x in val_x) < 5  # only exact duplicate images in the raw data may repeat
    assert set(train_y) == set(val_y) == set(range(10))
    np.testing.assert_array_equal(load_digits_split(True)[0], train_x)


def test_array_dataset_gray_to_normalized_rgb():
    images = np.zeros((2, 4, 4), dtype=np.uint8)
    images[1] = 255
    ds = ArrayDataset(images, np.array([3, 7]), img_size=8)
    x, y = ds[1]
    assert x.shape == (3, 8, 8) and y == 7
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN), torch.tensor(IMAGENET_DEFAULT_STD)
    torch.testing.assert_close(x[:, 0, 0], (1 - mean) / std)
    torch.testing.assert_close(ds[0][0][:, 5, 5], (0 - mean) / std)


def upfront_resize(images: np.ndarray, img_size: int) -> torch.Tensor:
    """What ArrayDataset served before it resized lazily: the whole array resized at once (antialiased bilinear),
    rounded to uint8, then scaled and normalized per image."""
    x = F.interpolate(torch.from_numpy(images).unsqueeze(1).float(), size=(img_size, img_size), mode="bilinear",
                      antialias=True, align_corners=False)
    gray = x.clamp_(0, 255).round_().to(torch.uint8).float().div_(255)
    mean, std = (torch.tensor(v).view(1, 3, 1, 1) for v in (IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD))
    return (gray.expand(-1, 3, -1, -1) - mean) / std


def sample_images() -> np.ndarray:
    """A few Fashion-MNIST test images when installed (else random 28x28 ones), with pure black and white."""
    if HAS_FASHION_MNIST:
        images = load_fashion_mnist(train=False)[0][:6]
    else:
        images = np.random.default_rng(0).integers(0, 256, (6, 28, 28), dtype=np.uint8)
    return np.concatenate([images, np.zeros((1, 28, 28), np.uint8), np.full((1, 28, 28), 255, np.uint8)])


@pytest.mark.parametrize("img_size", [224, 64, 32, 16, 28])
def test_served_images_equal_the_upfront_resize(img_size):
    images = sample_images()
    expected = upfront_resize(images, img_size)
    ds = ArrayDataset(images, np.arange(len(images)), img_size)
    assert ds.images.shape == images.shape and ds.images.dtype == torch.uint8  # kept at native size
    for i in range(len(images)):
        x, y = ds[i]
        assert y == i and torch.equal(x, expected[i])
    x, y = next(iter(DataLoader(subset(ds, 5), batch_size=5)))
    assert torch.equal(x, expected[y])


def test_check_data_reads_nothing_and_names_what_is_missing(tmp_path):
    check_data("digits")
    for name in FASHION_MNIST_FILES[True] + FASHION_MNIST_FILES[False]:
        (tmp_path / name).write_bytes(b"not read")  # garbage passes: the files are not opened
    check_data("fashion_mnist", str(tmp_path))
    (tmp_path / FASHION_MNIST_FILES[False][0]).unlink()
    with pytest.raises(DataError, match=f"{tmp_path}.*missing {FASHION_MNIST_FILES[False][0]}"):
        check_data("fashion_mnist", str(tmp_path))
    (tmp_path / "train").mkdir()
    with pytest.raises(DataError, match="no val/ folder"):
        check_data(f"imagefolder:{tmp_path}")
    (tmp_path / "validation").mkdir()
    check_data(f"imagefolder:{tmp_path}")
    with pytest.raises(DataError, match="fashion_mnist, digits or imagefolder:PATH"):
        check_data("cifar10")


def make_image_folder(root: Path, classes=("cat", "dog"), per_class: int = 3) -> None:
    for split in ("train", "val"):
        for i, name in enumerate(classes):
            (root / split / name).mkdir(parents=True)
            for j in range(per_class):
                pixels = np.full((10, 12), 40 * i + j, dtype=np.uint8)
                Image.fromarray(pixels, mode="L").save(root / split / name / f"{j}.png")  # grayscale files


def test_image_folder(tmp_path):
    make_image_folder(tmp_path)
    data = build_datasets(f"imagefolder:{tmp_path}", 16)
    assert data.num_classes == 2 and len(data.train) == len(data.val) == 6
    x, y = data.val[5]
    assert x.shape == (3, 16, 16) and y == 1


@pytest.mark.parametrize("layout", ["missing", "no_val", "empty"])
def test_bad_image_folder_names_path(tmp_path, layout):
    root = tmp_path / "imagenet"
    if layout == "no_val":
        (root / "train" / "a").mkdir(parents=True)
    if layout == "empty":
        (root / "train" / "a").mkdir(parents=True)
        (root / "val" / "a").mkdir(parents=True)
    with pytest.raises(DataError, match=str(root)):
        build_datasets(f"imagefolder:{root}", 16)


def test_unknown_data_spec_lists_choices():
    with pytest.raises(DataError, match="fashion_mnist, digits or imagefolder:PATH"):
        build_datasets("cifar10", 32)


def test_subset_is_fixed_and_seed_independent():
    data = list(range(100))
    torch.manual_seed(1)
    first = list(subset(data, 10))
    torch.manual_seed(2)
    assert list(subset(data, 10)) == first and len(set(first)) == 10 and first != list(range(10))
    assert subset(data, None) is data
