"""Datasets for training: Fashion-MNIST (IDX files), sklearn digits (smoke set) and ImageNet-style folders.

A data spec is `fashion_mnist`, `digits` or `imagefolder:PATH`. Every dataset yields 3-channel float images
normalized like ImageNet, so any timm model (and pretrained weights) takes them unchanged.
"""
from __future__ import annotations

import gzip
import math
import os
from pathlib import Path
from typing import NamedTuple, Optional, Sequence

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, ImageDataset, create_transform
from torch.utils.data import Dataset, Subset

from evit.cli import UserError

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_FILES = {
    True: ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    False: ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
FASHION_MNIST_CLASSES = ("T-shirt/top", "Trouser", "Pullover", "Dress", "Coat",
                         "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot")
NATIVE_SIZE = {"fashion_mnist": 28, "digits": 8, "imagefolder": 224}
DATA_SPECS = "fashion_mnist, digits or imagefolder:PATH"
# IDX type codes (http://yann.lecun.com/exdb/mnist/): values are big-endian.
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


class DataError(UserError, RuntimeError):
    """Data that is missing, empty or unreadable; the message names the path and how to fix it."""


class InputMismatchError(UserError, ValueError):
    """A model (a student, a teacher) that cannot take the data's inputs or predict its classes."""


class Datasets(NamedTuple):
    train: Dataset
    val: Dataset
    num_classes: int


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """Read an IDX file (optionally gzipped): 2 zero bytes, a type code, the number of dims, dims, data."""
    opener = gzip.open if str(path).endswith(".gz") else open
    try:
        with opener(path, "rb") as f:
            raw = f.read()
        zero, code, ndim = int.from_bytes(raw[:2], "big"), raw[2], raw[3]
        if zero != 0 or code not in _IDX_DTYPES:
            raise ValueError("bad magic number")
        shape = tuple(int.from_bytes(raw[4 + 4 * i: 8 + 4 * i], "big") for i in range(ndim))
        data = np.frombuffer(raw, dtype=_IDX_DTYPES[code], offset=4 + 4 * ndim)
        return data.reshape(shape).astype(data.dtype.newbyteorder("="))
    except (OSError, EOFError, ValueError, IndexError) as e:
        raise DataError(f"cannot read IDX file {path} ({e}); re-download it or point --data-dir elsewhere") from e


def fashion_mnist_paths(root: str | os.PathLike | None = None, train: bool = True) -> tuple[Path, Path]:
    """The (images, labels) IDX files of a split in `root`; a DataError naming the missing ones and the fix."""
    root = Path(root or FASHION_MNIST_DIR)
    paths = tuple(root / name for name in FASHION_MNIST_FILES[train])
    missing = [p.name for p in paths if not p.is_file()]
    if missing:
        raise DataError(
            f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}): install it with "
            f"'sudo apt-get install dataset-fashion-mnist' or pass --data-dir DIR holding the four IDX .gz files")
    return paths


def load_fashion_mnist(root: str | os.PathLike | None = None, train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """Fashion-MNIST images (N, 28, 28) uint8 and labels (N,) from the four IDX .gz files in `root`."""
    images, labels = (read_idx(p) for p in fashion_mnist_paths(root, train))
    if len(images) == 0 or len(images) != len(labels):
        raise DataError(f"Fashion-MNIST files in {root or FASHION_MNIST_DIR} are empty or inconsistent; "
                        f"re-download them")
    return images, labels.astype(np.int64)


def load_digits_split(train: bool = True) -> tuple[np.ndarray, np.ndarray]:
    """sklearn's 8x8 digits as uint8 images, split 80/20 by a fixed permutation (independent of any run seed)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = (digits.images * (255 / 16)).round().astype(np.uint8)
    order = np.random.default_rng(0).permutation(len(images))
    cut = int(0.8 * len(images))
    keep = order[:cut] if train else order[cut:]
    return images[keep], digits.target[keep].astype(np.int64)


class ArrayDataset(Dataset):
    """Grayscale uint8 images (N, H, W) served as normalized 3-channel float tensors at `img_size`.

    The images stay at their native size and each one is resized when served: resizing a whole split up front
    (60k Fashion-MNIST images to 224 px) took ~12 GB of float32 on the way and kept 3 GB, against 47 MB now.
    Served values are those of that up-front resize (antialiased bilinear, rounded to uint8 levels), so results
    computed before do not shift. One image is resized per call (~0.5 ms at 224 px on one thread): resizing a
    DataLoader batch in one call was faster at 64 px but slower at 224 px, where a batch's float32 tensors are too
    large for the allocator to reuse and every one costs fresh pages.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, img_size: int):
        self.images = torch.from_numpy(np.ascontiguousarray(images))
        self.labels = torch.from_numpy(labels)
        self.img_size = img_size
        self.mean = torch.tensor(IMAGENET_DEFAULT_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_DEFAULT_STD).view(3, 1, 1)

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, int]:
        x = self.images[index][None, None].float()
        if x.shape[-2:] != (self.img_size, self.img_size):
            x = F.interpolate(x, size=(self.img_size, self.img_size), mode="bilinear", antialias=True,
                              align_corners=False).clamp_(0, 255).round_()
        gray = x[0].div_(255)
        return (gray.expand(3, -1, -1) - self.mean) / self.std, int(self.labels[index])


def image_split_dir(root: str | os.PathLike, train: bool) -> Path:
    """`root/train`, or `root/val` (or `root/validation`); a DataError saying the expected layout."""
    names = ("train",) if train else ("val", "validation")
    split_dir = next((Path(root) / n for n in names if (Path(root) / n).is_dir()), None)
    if split_dir is None:
        raise DataError(f"no {names[0]}/ folder in {root}: pass --data imagefolder:PATH with PATH/train and "
                        f"PATH/val each holding one sub-folder of images per class")
    return split_dir


def image_folder(root: str | os.PathLike, img_size: int, train: bool, augment: dict | None = None,
                 class_map: dict[str, int] | None = None) -> ImageDataset:
    """ImageNet-style `root/{train,val}/<class>/<image>` folder with timm's train or eval transforms."""
    split_dir = image_split_dir(root, train)
    # Eval shares only the resize settings with training (e.g. bicubic, resize 256 -> crop 224).
    kwargs = dict(augment or {}) if train else {k: v for k, v in (augment or {}).items()
                                                if k in ("interpolation", "crop_pct")}
    transform = create_transform(img_size, is_training=train, **kwargs)
    try:
        return ImageDataset(str(split_dir), class_map=class_map, transform=transform)
    except RuntimeError as e:  # timm's folder reader raises RuntimeError when it finds no images
        raise DataError(f"no images in {split_dir}: expected one sub-folder of images per class") from e


def data_kind(spec: str) -> str:
    kind = spec.partition(":")[0]
    if kind not in NATIVE_SIZE:
        raise DataError(f"unknown data '{spec}': use {DATA_SPECS}")
    return kind


def default_img_size(spec: str) -> int:
    return NATIVE_SIZE[data_kind(spec)]


def parse_spec(spec: str, data_dir: str | None = None) -> tuple[str, str | None]:
    """Split a data spec into (kind, root): `imagefolder:PATH` carries its root; `--data-dir` overrides any."""
    kind, root = data_kind(spec), data_dir or spec.partition(":")[2] or None
    if kind == "imagefolder" and not root:
        raise DataError("imagefolder needs a path: --data imagefolder:PATH (or --data-dir PATH)")
    return kind, root


def check_data(spec: str, data_dir: str | None = None) -> None:
    """Fail at once on an unknown spec or missing files or folders, reading nothing: the CLIs call this first, so
    that bad input is reported before a proxy is trained, a model built or weights fetched."""
    kind, root = parse_spec(spec, data_dir)
    for train in (True, False):
        if kind == "fashion_mnist":
            fashion_mnist_paths(root, train)
        elif kind == "imagefolder":
            image_split_dir(root, train)


def build_datasets(spec: str, img_size: int, data_dir: str | None = None, augment: dict | None = None) -> Datasets:
    """Train and validation sets for a data spec; `augment` holds timm create_transform kwargs (folders only)."""
    kind, root = parse_spec(spec, data_dir)
    if kind == "imagefolder":
        train = image_folder(root, img_size, True, augment)
        # The validation labels must use the training folder's class indices.
        val = image_folder(root, img_size, False, augment, class_map=train.reader.class_to_idx)
        return Datasets(train, val, len(train.reader.class_to_idx))
    if kind == "fashion_mnist":
        splits = [load_fashion_mnist(root, is_train) for is_train in (True, False)]
    else:
        splits = [load_digits_split(is_train) for is_train in (True, False)]
    num_classes = int(max(labels.max() for _, labels in splits)) + 1
    train, val = (ArrayDataset(images, labels, img_size) for images, labels in splits)
    return Datasets(train, val, num_classes)


def subset(dataset: Dataset, limit: int | None) -> Dataset:
    """A fixed random subset of `limit` items (the same for every seed, so runs stay comparable)."""
    if not limit or limit >= len(dataset):
        return dataset
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(0))
    return Subset(dataset, order[:limit].tolist())


class ServedBatches(Sequence):
    """Batches of chosen dataset items, served (resized, normalized) each time they are read, so that one batch at
    the model's resolution is in memory at a time: 2000 validation images at 224 px are 1.2 GB of float32."""

    def __init__(self, dataset: Dataset, picks: list[int], batch: int):
        self.dataset, self.picks, self.batch = dataset, picks, batch

    def __len__(self) -> int:
        return math.ceil(len(self.picks) / self.batch)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(i)
        items = [self.dataset[j] for j in self.picks[i * self.batch:(i + 1) * self.batch]]
        return torch.stack([x for x, _ in items]), torch.tensor([int(y) for _, y in items])


def load_batches(spec: str, img_size: int, batches: int, batch: int, val_images: int,
                 data_dir: Optional[str] = None) -> tuple[list, ServedBatches, int]:
    """(`batches` gradient batches from the train split, validation batches holding `val_images` images, number
    of classes); fixed random choices. The gradient batches are read every step, so they are served once and
    kept; the validation batches, read twice, are served when read."""
    data = build_datasets(spec, img_size, data_dir)

    def picks(dataset: Dataset, count: int, seed: int) -> list[int]:
        return torch.randperm(len(dataset), generator=torch.Generator().manual_seed(seed))[:count].tolist()

    train = list(ServedBatches(data.train, picks(data.train, batches * batch, 0), batch))
    return train, ServedBatches(data.val, picks(data.val, val_images, 1), batch), data.num_classes


def check_fits(model: nn.Module, label: str, data: Datasets) -> None:
    """A one-line InputMismatchError naming `label` unless `model` (put in eval mode) takes the data's inputs and
    predicts its classes: a model whose size or classes are fixed by its weights (a teacher, a loaded checkpoint)."""
    example = data.train[0][0][None]
    try:
        with torch.no_grad():
            logits = model.eval()(example)
    except (RuntimeError, AssertionError, ValueError) as e:  # timm asserts the input size; shapes raise RuntimeError
        raise InputMismatchError(f"{label} cannot take this run's {tuple(example.shape[1:])} inputs: "
                                 f"{' '.join(str(e).split())}") from e
    if logits.shape[-1] != data.num_classes:
        raise InputMismatchError(f"{label} predicts {logits.shape[-1]} classes; {data.num_classes} in the data")
