"""Simulate a fleet on this machine with Flower's simulation engine (Ray), one process for the lot.

Each simulated node is a fleet client: its partition id picks its device profile and its share of
the data (for ``dataset: local``, its own image folder: ``odl-fed simulate --data DIR`` once per
client, in order). ``flwr run .`` runs the same apps from ``pyproject.toml``; this entry point adds
the console view of the rounds and needs no Flower home directory.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TextIO

from flwr.app import Context, Message
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from odl_fed.config.run import RunSettings
from odl_fed.dashboard.console import ConsoleDashboard
from odl_fed.federation.checkpoint import SERVER_LOCK, RunLock, check_run_dir
from odl_fed.federation.client_app import handle_end, handle_join, handle_train
from odl_fed.federation.flower_env import FLOWER_LOG, OFFLINE_ENV, flower_log_file, known_notices_hidden, offline
from odl_fed.federation.job_assets import held_out_data, prepare_partitions, train_size
from odl_fed.federation.server_app import run_server
from odl_fed.planning.preflight import check_board_folders, check_fleet
from odl_fed.schema import ROUND_LOG

__all__ = ["simulate", "build_apps", "OFFLINE_ENV"]


TrainHandler = Callable[[Message, Context, Mapping], Message]


def build_apps(run_config: Mapping, *, listeners: Sequence[Callable[[dict], None]] = (),
               train: TrainHandler = handle_train) -> tuple[ServerApp, ClientApp]:
    """A ServerApp and a ClientApp bound to ``run_config`` (the simulation API passes them none)."""
    server, client = ServerApp(), ClientApp()

    @server.main()
    def _server(grid: Grid, context: Context) -> None:
        run_server(grid, run_config, listeners=listeners)

    @client.train()
    def _train(msg: Message, context: Context) -> Message:
        return train(msg, context, run_config)

    @client.query("end")
    def _end(msg: Message, context: Context) -> Message:
        return handle_end(msg, context)

    @client.query("join")
    def _join(msg: Message, context: Context) -> Message:
        return handle_join(msg, context, run_config)

    return server, client


def simulate(run_config: Mapping, *, cpus: int | None = None, cpus_per_client: float = 1.0,
             progress: bool | TextIO = True, verbose: bool = False, train: TrainHandler = handle_train,
             ray_address: str | None = None) -> Path:
    """Run the fleet of ``run_config`` in simulation; returns the round log's path.

    ``progress`` shows the console view (:mod:`odl_fed.dashboard.console`) on standard output, or on the
    stream given; Flower's and Ray's own lines go to ``OUT-DIR/flower.log`` unless ``verbose``.
    ``train`` handles each train message (default: :func:`~odl_fed.federation.client_app.handle_train`); a
    wrapper around it can log, or inject the faults a test needs. ``ray_address`` runs the clients
    on a Ray cluster already started (``ray start --head`` on one host, ``ray start --address`` on
    the others): its actors spread over every node's CPUs, and ``cpus`` is then the cluster's.
    With ``resume`` in the run config it goes on from ``out-dir``'s checkpoint. It holds
    ``out-dir/server.lock`` while it runs.
    """
    with offline():  # this process's environment, and so the Ray workers', for this run only
        return _simulate(run_config, cpus=cpus, cpus_per_client=cpus_per_client, progress=progress,
                         verbose=verbose, train=train, ray_address=ray_address)


def _simulate(run_config: Mapping, *, cpus: int | None, cpus_per_client: float, progress: bool | TextIO,
              verbose: bool, train: TrainHandler, ray_address: str | None) -> Path:
    from flwr.simulation import run_simulation

    settings = RunSettings.from_config(run_config)
    fleet = settings.fleet()  # a bad fleet file or a missing file or dataset fails here, before Ray starts
    cpus = cpus or os.cpu_count() or 1
    held_out_data(fleet.job)
    check_board_folders(fleet, settings.data_dirs)
    # on a cluster, this machine's free memory says nothing of the other hosts'
    check_fleet(fleet, train_examples=train_size(fleet.job),
                simulated_cpus=None if ray_address else max(1, int(cpus / cpus_per_client)))
    prepare_partitions(fleet.job, fleet.num_clients)  # the clients' shares made once: the actors read them
    with RunLock(settings.out_dir, SERVER_LOCK):
        check_run_dir(settings.out_dir, fleet, resume=settings.resume)  # before Ray starts; changes nothing
        config = settings.as_config()
        console = None
        if progress is not False:
            console = ConsoleDashboard(None if progress is True else progress)

        server, client = build_apps(config, listeners=[console] if console else [], train=train)
        init_args = {"include_dashboard": False, "logging_level": logging.WARNING, "log_to_driver": verbose}
        init_args |= {"address": ray_address} if ray_address else {"num_cpus": cpus}
        backend = {"client_resources": {"num_cpus": cpus_per_client, "num_gpus": 0.0}, "init_args": init_args}
        settings.out_dir.mkdir(parents=True, exist_ok=True)
        with contextlib.ExitStack() as stack:
            if not verbose:
                stack.enter_context(known_notices_hidden())
                stack.enter_context(flower_log_file(settings.out_dir / FLOWER_LOG))
            if console is not None:
                stack.callback(console.close)
            run_simulation(server_app=server, client_app=client, num_supernodes=fleet.num_clients,
                           backend_config=backend, verbose_logging=verbose)
    return settings.out_dir / ROUND_LOG
