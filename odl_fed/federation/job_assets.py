"""The job's shared pieces, used by the server and by every client: the global model, the trained
state that travels, each client's share of the data (or a board's own images: ``dataset: local``)
and the server's held-out split (none for ``dataset: local``: the images stay on the boards).

Neither side imports the other: the server (:mod:`odl_fed.federation.server_app`) and a client
(:mod:`odl_fed.federation.client_round`) both build what they share from here, from the same :class:`JobSpec`.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import multiprocessing
from pathlib import Path

import numpy as np
import torch
from torch import Tensor, nn

from odl_fed.asi import restore_model
from odl_fed.config.job import JobSpec
from odl_fed.config.names import LOCAL_DATASET
from odl_fed.training.data import ImageData, load_dataset, partition, partition_file, partitions_dir
from odl_fed.training.local_data import LocalData, LocalDataError, load_local
from odl_fed.training.models import build_model, prepare_finetune

__all__ = ["global_model", "client_model", "trained_state", "client_data", "client_held_out", "split_held_out",
           "held_out_positions", "board_data", "prepare_partitions", "held_out_data", "train_size", "output_classes",
           "build_counts"]


def trained_state(model: nn.Module) -> dict[str, Tensor]:
    """The parameters that train (and travel): the last convs and the head."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def global_model(job: JobSpec, *, num_classes: int) -> tuple[nn.Module, list[str]]:
    """The job's model with its trained layers marked, and the names of the trained convs.

    Built once per process (per job, class count and weights file) and copied for each call: a
    simulated actor runs many clients, and a copy costs a tenth of a build. The global random
    state is left as the build left it, so what a client draws afterwards (dropout) does not
    depend on whether its model was built or copied.
    """
    template, after_build = _model_template(job, num_classes, _file_stamp(job.weights))
    torch.random.set_rng_state(after_build)
    model = copy.deepcopy(template)
    return model, prepare_finetune(model, layers=job.layers)


def client_model(job: JobSpec, *, num_classes: int) -> tuple[nn.Module, list[str]]:
    """The job's model for one client round, in a process that runs many (a simulated actor).

    One working copy per process, every parameter and buffer reset to the freshly built model's
    values at each call (a 14 MB copy: 2 ms, where a deep copy of MobileNetV2 takes 58). A caller
    takes its method's layers out again (:func:`~odl_fed.asi.restore_model`) before the next call,
    as :func:`~odl_fed.federation.client_round.run_client_round` does; a copy left wrapped is restored here.
    """
    stamp = _file_stamp(job.weights)
    template, after_build = _model_template(job, num_classes, stamp)
    model = _working_model(job, num_classes, stamp)
    restore_model(model)
    with torch.no_grad():
        for (name, value), (_, fresh) in zip(model.state_dict(keep_vars=True).items(),
                                             template.state_dict(keep_vars=True).items(), strict=True):
            value.copy_(fresh)
    for p in model.parameters():
        p.grad = None
    torch.random.set_rng_state(after_build)
    return model, prepare_finetune(model, layers=job.layers)


@functools.lru_cache(maxsize=2)
def _working_model(job: JobSpec, num_classes: int, stamp: tuple | None) -> nn.Module:
    return copy.deepcopy(_model_template(job, num_classes, stamp)[0])


def _file_stamp(weights: str | None) -> tuple | None:
    """What says a weights file changed (a template built from its older version is not reused)."""
    if weights is None or not Path(weights).is_file():
        return None
    stat = Path(weights).stat()
    return stat.st_size, stat.st_mtime_ns


@functools.lru_cache(maxsize=2)
def _model_template(job: JobSpec, num_classes: int, stamp: tuple | None) -> tuple[nn.Module, Tensor]:
    """The job's model as built, and the global random state the build left behind."""
    torch.manual_seed(job.seed)  # the same new head on the server and in every client
    model = build_model(job.model, weights=job.weights, num_classes=num_classes)
    return model, torch.random.get_rng_state()


@functools.lru_cache(maxsize=4)
def _dataset(name: str, split: str) -> ImageData:
    return load_dataset(name, split=split)


@functools.lru_cache(maxsize=4)
def _partitions(name: str, num_partitions: int, alpha: float | None, seed: int) -> tuple:
    return tuple(partition(_dataset(name, "train").labels, num_partitions, alpha=alpha, seed=seed,
                           cache=partitions_dir()))


def prepare_partitions(job: JobSpec, num_partitions: int) -> None:
    """Make the clients' shares once, in a short-lived child process, when they are not cached yet.

    The simulation's clients then read them (:func:`~odl_fed.training.data.partitions_dir`) without loading
    flwr-datasets' HuggingFace stack, and neither does this process (a server that runs for hours
    keeps what it imports: about 180 MB).
    """
    if job.dataset == LOCAL_DATASET:
        return  # each board has its own images: nothing to split
    labels = _dataset(job.dataset, "train").labels
    if len(labels) < num_partitions:  # said here, not in a child process's traceback
        raise ValueError(f"cannot split {len(labels)} examples of {job.dataset} into {num_partitions} partitions")
    if partition_file(labels, num_partitions, alpha=job.dirichlet_alpha, seed=job.seed,
                      cache=partitions_dir()).is_file():
        return
    child = multiprocessing.get_context("spawn").Process(
        target=_partitions, args=(job.dataset, num_partitions, job.dirichlet_alpha, job.seed))
    child.start()
    child.join()
    if child.exitcode != 0:  # (a cache it could not write, say): made here instead
        _partitions(job.dataset, num_partitions, job.dirichlet_alpha, job.seed)


def client_data(job: JobSpec, partition_id: int, num_partitions: int) -> ImageData:
    """What this client trains on: its share of the training split, less the part it holds out when
    clients evaluate (:func:`held_out_positions`), capped at ``examples-per-client``."""
    if job.dataset == LOCAL_DATASET:
        raise ValueError("dataset 'local': each board's own images (board_data), not a share of a named dataset")
    indices = _share(job, partition_id, num_partitions)
    train, _ = held_out_positions(len(indices), job, salt=partition_id)
    return _dataset(job.dataset, "train").subset(torch.as_tensor(indices[train]))


def client_held_out(job: JobSpec, partition_id: int, num_partitions: int) -> ImageData | None:
    """The part of this client's share it holds out to evaluate on (None when clients do not evaluate)."""
    if not job.clients_evaluate:
        return None
    indices = _share(job, partition_id, num_partitions)
    _, held = held_out_positions(len(indices), job, salt=partition_id)
    return _dataset(job.dataset, "train").subset(torch.as_tensor(indices[held])) if len(held) else None


def _share(job: JobSpec, partition_id: int, num_partitions: int) -> np.ndarray:
    """This client's share of the training split, as indices (cached per process: simulated clients share actors)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), but got {partition_id}")
    return np.asarray(_partitions(job.dataset, num_partitions, job.dirichlet_alpha, job.seed)[partition_id])


def board_data(job: JobSpec, data_dir: Path | None) -> LocalData:
    """A board's own images for a ``dataset: local`` job (its ``--data`` folder), labelled by the job's
    ``classes``, in a fixed random order (:func:`split_held_out` then holds part out and caps what trains at
    ``examples-per-client``); decoded once per folder
    (:mod:`odl_fed.training.local_data`). :class:`LocalDataError` when nothing there can train."""
    if data_dir is None:
        raise LocalDataError("the job trains on each board's own images (dataset: local), but this client has no "
                             "image folder: start it with --data DIR (one sub-folder of images per class)")
    local = load_local(data_dir, classes=job.classes, image_size=job.image_size)
    # in a fixed random order (the folder's is by class), which split_held_out then cuts
    order = torch.randperm(len(local.data), generator=torch.Generator().manual_seed(job.seed))
    return dataclasses.replace(local, data=local.data.subset(order))


def output_classes(job: JobSpec) -> int:
    """How many outputs the job's model has: its dataset's classes, or the job's ``classes``."""
    if job.dataset == LOCAL_DATASET:
        return len(job.classes)
    return _dataset(job.dataset, "train").num_classes  # the split a server that does not evaluate has too


def held_out_positions(n: int, job: JobSpec, *, salt: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Which of a client's ``n`` examples it trains on and which it holds out, by position.

    When clients evaluate, ``eval-fraction`` of the ``n`` (at least one, and at least one left to train
    on) is held out, drawn with the job's seed and ``salt`` (the client's partition): the same split
    every round. The client trains on the others in order, up to ``examples-per-client``; where that
    cap leaves enough unused, the part held out is drawn from the unused ones only, so the client
    trains on the very examples it would with no evaluation. ``eval-examples`` caps the part held out.
    """
    held_count = 0
    if job.clients_evaluate and n > 1:
        held_count = min(max(1, round(job.eval_fraction * n)), n - 1)
    cap = n if job.examples_per_client is None else job.examples_per_client
    start = min(cap, n - held_count) if cap < n else 0  # the draw keeps clear of the first `cap` when it can
    drawn = np.random.default_rng([job.seed, salt]).permutation(np.arange(start, n))[:held_count]
    held = drawn if job.eval_examples is None else drawn[:job.eval_examples]
    return np.setdiff1d(np.arange(n), drawn)[:cap], np.sort(held)


def split_held_out(data: ImageData, job: JobSpec, *, salt: int = 0) -> tuple[ImageData, ImageData | None]:
    """A client's own data (a board's image folder, say) split as :func:`held_out_positions` says: what it
    trains on, and what it holds out (None when clients do not evaluate)."""
    train, held = held_out_positions(len(data), job, salt=salt)
    return data.subset(train), data.subset(held) if len(held) else None


def held_out_data(job: JobSpec) -> ImageData | None:
    """The server's evaluation set: the test split, capped at ``eval-examples``; None when the server
    does not evaluate (``evaluation: clients``, and always for ``dataset: local``, whose images are the
    boards' own and stay there), which then needs no data of its own."""
    if job.dataset == LOCAL_DATASET or not job.server_evaluates:
        return None
    data = _dataset(job.dataset, "test")
    if job.eval_examples is not None and job.eval_examples < len(data):
        order = torch.randperm(len(data), generator=torch.Generator().manual_seed(job.seed))
        data = data.subset(order[:job.eval_examples])
    return data


def build_counts() -> dict[str, int]:
    """How many times this process built a model, copied one to work on, loaded a dataset and split one
    (the caches' misses). A forked child starts with its parent's counts: what it built is the difference."""
    return {"model": _model_template.cache_info().misses, "model-copy": _working_model.cache_info().misses,
            "data": _dataset.cache_info().misses, "partitions": _partitions.cache_info().misses}


def train_size(job: JobSpec) -> int | None:
    """How many training examples the job's dataset has (what the clients' shares split); None for
    ``dataset: local`` (only each board knows its own)."""
    if job.dataset == LOCAL_DATASET:
        return None
    return len(_dataset(job.dataset, "train"))
