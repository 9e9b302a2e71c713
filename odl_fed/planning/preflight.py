"""Checks of a fleet before anything runs: one clear error naming the file and the field, not a crash
minutes into a run.

- the files the job needs (``job.weights``);
- the model: enough convs for ``job.layers``, and images of ``job.image-size`` go through it;
- the data: every client gets a share of at least :data:`MIN_SHARE` examples (a named dataset's);
- in simulation, this machine's memory: the clients that run at once (one per simulated CPU) must
  hold a Ray actor's own baseline plus their device's ``train-memory``.

And one warning (logged, the run goes on): a model with random weights whose frozen part passes
(almost) no signal to the trained layers (:func:`~odl_fed.training.models.frozen_signal`), which then
cannot learn; ``job.weights`` (a checkpoint of ``odl-fed pretrain``) is the fix.
"""

from __future__ import annotations

import logging

import psutil
import torch

from odl_fed.config.fleet import FleetError, FleetSpec
from odl_fed.config.names import LOCAL_DATASET
from odl_fed.training.local_data import LocalDataError, check_folder
from odl_fed.training.models import build_model, check_model_input, frozen_signal

__all__ = ["check_fleet", "check_model", "check_signal", "check_board_folders", "MIN_SHARE", "ACTOR_BASELINE",
           "DEAD_SIGNAL"]

MIN_SHARE = 10  # examples per client (flwr-datasets' smallest Dirichlet partition)
ACTOR_BASELINE = int(0.8 * 2**30)  # a Ray actor with torch and Flower loaded (shared/FLOWER.md)
DEAD_SIGNAL = 1e-4  # below this spread at the first trained conv, the frozen part passes nothing to learn from
log = logging.getLogger("odl_fed.planning.preflight")


def check_model(fleet: FleetSpec) -> None:
    """Raise a clear error when the model cannot train ``layers`` convs on ``image-size`` images
    (checked on a model without storage: nothing is computed)."""
    job = fleet.job
    try:
        check_model_input(job.model, layers=job.layers, image_size=job.image_size)
    except ValueError as error:
        field = "layers" if "layers" in str(error).split(":")[0] else "image-size"
        raise FleetError(f"{fleet.path}: job.{field}: {error}") from None


def check_signal(fleet: FleetSpec) -> str | None:
    """A warning when the job's model has random weights and its frozen part hands the trained layers
    (almost) nothing (None when it has weights, or the signal gets through)."""
    job = fleet.job
    if job.weights is not None:
        return None
    state = torch.random.get_rng_state()
    try:
        torch.manual_seed(job.seed)  # the model the run will build
        spread = frozen_signal(build_model(job.model, num_classes=10), layers=job.layers, image_size=job.image_size)
    finally:
        torch.random.set_rng_state(state)
    if spread >= DEAD_SIGNAL:
        return None
    return (f"{fleet.path}: job.weights: a randomly initialised {job.model} with its BatchNorm frozen hands its "
            f"last {job.layers} conv(s) inputs of spread {spread:.1e} at {job.image_size} px: they cannot learn "
            f"from that (accuracy will stay at chance). Give job.weights a pretrained checkpoint "
            f"(odl-fed pretrain --model {job.model} ...).")


def check_fleet(fleet: FleetSpec, *, train_examples: int | None, simulated_cpus: int | None = None) -> None:
    """Raise :class:`~odl_fed.config.fleet.FleetError` for a fleet that cannot run here (see the module doc).

    ``train_examples``: the size of the dataset's training split (None: the boards' own images, which
    only they know); ``simulated_cpus``: the CPUs a simulation gets (None: not simulated here).
    """
    fleet.check_files()
    check_model(fleet)
    if (warning := check_signal(fleet)) is not None:
        log.warning(warning)
    job = fleet.job
    shares = None if train_examples is None else train_examples // fleet.num_clients
    if shares is not None and shares < MIN_SHARE:
        raise FleetError(f"{fleet.path}: devices: {fleet.num_clients} clients split {train_examples} examples of "
                         f"{job.dataset} into shares of {shares}; this dataset can feed at most "
                         f"{train_examples // MIN_SHARE} clients ({MIN_SHARE} examples each)")
    if simulated_cpus is not None:
        at_once = min(simulated_cpus, fleet.num_clients)
        largest = max(g.profile.train_memory for g in fleet.groups)
        need = at_once * (ACTOR_BASELINE + largest)
        available = psutil.virtual_memory().available
        if need > available:
            fits = max(0, available // (ACTOR_BASELINE + largest))
            raise FleetError(f"{fleet.path}: devices: simulating {at_once} clients at once needs about "
                             f"{need / 2**30:.1f} GiB ({ACTOR_BASELINE / 2**30:.1f} GiB per Ray actor + the largest "
                             f"train-memory, {largest / 2**30:.2f} GiB), but this machine has "
                             f"{available / 2**30:.1f} GiB available: it can simulate {fits} at once "
                             f"(use --cpus {max(fits, 1)})")


def check_board_folders(fleet: FleetSpec, data_dirs) -> None:
    """A simulated ``dataset: local`` fleet: one image folder per client (``odl-fed simulate --data DIR``,
    in partition order), each holding an image that opens; folders for a named dataset are an error."""
    job = fleet.job
    if job.dataset != LOCAL_DATASET:
        if data_dirs:
            raise FleetError(f"--data: {fleet.path} trains on shares of {job.dataset}; --data is for a fleet whose "
                             f"job.dataset is {LOCAL_DATASET!r}")
        return
    if len(data_dirs) != fleet.num_clients:
        raise FleetError(f"{fleet.path}: job.dataset: {LOCAL_DATASET!r} trains each client on its own images: give "
                         f"one --data DIR per client, in order ({fleet.num_clients} clients, {len(data_dirs)} "
                         f"folder(s) given)")
    for folder in data_dirs:
        try:
            check_folder(folder)
        except LocalDataError as error:
            raise FleetError(f"--data {error}") from None
