"""Checks of a fleet before anything runs: one clear error naming the file and the field, not a crash
minutes into a run.

- the files the job needs (``job.weights``);
- the model: enough convs for ``job.layers``, and images of ``job.image-size`` go through it;
- the data: every client gets a share of at least :data:`MIN_SHARE` examples;
- in simulation, this machine's memory: the clients that run at once (one per simulated CPU) must
  hold a Ray actor's own baseline plus their device's ``train-memory``.
"""

from __future__ import annotations

import psutil

from odl_fed.fleet import FleetError, FleetSpec

__all__ = ["check_fleet", "MIN_SHARE", "ACTOR_BASELINE"]

MIN_SHARE = 10  # examples per client (flwr-datasets' smallest Dirichlet partition)
ACTOR_BASELINE = int(0.8 * 2**30)  # a Ray actor with torch and Flower loaded (shared/FLOWER.md)


def check_fleet(fleet: FleetSpec, *, train_examples: int, simulated_cpus: int | None = None) -> None:
    """Raise :class:`~odl_fed.fleet.FleetError` for a fleet that cannot run here (see the module doc).

    ``train_examples``: the size of the dataset's training split; ``simulated_cpus``: the CPUs a
    simulation gets (None: not simulated here).
    """
    fleet.check_files()
    fleet.check_model()
    job = fleet.job
    shares = train_examples // fleet.num_clients
    if shares < MIN_SHARE:
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
