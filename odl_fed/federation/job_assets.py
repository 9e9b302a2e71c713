"""The job's shared pieces, used by the server and by every client: the global model, the trained
state that travels, each client's share of the data and the server's held-out split.

Neither side imports the other: the server (:mod:`odl_fed.federation.server_app`) and a client
(:mod:`odl_fed.federation.client_round`) both build what they share from here, from the same :class:`JobSpec`.
"""

from __future__ import annotations

import copy
import functools
import multiprocessing
from pathlib import Path

import torch
from torch import Tensor, nn

from odl_fed.asi import restore_model
from odl_fed.config.job import JobSpec
from odl_fed.training.data import ImageData, load_dataset, partition, partition_file, partitions_dir
from odl_fed.training.models import build_model, prepare_finetune

__all__ = ["global_model", "client_model", "trained_state", "client_data", "prepare_partitions", "held_out_data",
           "train_size", "build_counts"]


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
    """This client's share of the training split (cached per process: simulated clients share actors)."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition-id must be in [0, {num_partitions}), but got {partition_id}")
    indices = _partitions(job.dataset, num_partitions, job.dirichlet_alpha, job.seed)[partition_id]
    if job.examples_per_client is not None:
        indices = indices[:job.examples_per_client]
    return _dataset(job.dataset, "train").subset(torch.as_tensor(indices))


def held_out_data(job: JobSpec) -> ImageData:
    """The server's evaluation set: the test split, capped at ``eval-examples``."""
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


def train_size(job: JobSpec) -> int:
    """How many training examples the job's dataset has (what the clients' shares split)."""
    return len(_dataset(job.dataset, "train"))
