"""The Flower ServerApp: send the trained layers, aggregate the valid updates, evaluate, record.

Only the trained layers (the last convs and the head) travel, both ways. Each round the global
model is evaluated on the held-out split and the round is written to ``OUT-DIR/rounds.jsonl``
(:mod:`odl_fed.recorder`); the final trained layers go to ``OUT-DIR/trained_layers.pt``.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping
from dataclasses import asdict

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from odl_fed.job import global_model, held_out_data, trained_state
from odl_fed.recorder import RoundRecorder
from odl_fed.run_config import RunSettings
from odl_fed.strategy import log, make_strategy, parameter_bytes
from odl_fed.task import evaluate
from odl_fed.validation import expected_layout

__all__ = ["app", "run_server"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)


def run_server(grid: Grid, run_config: Mapping, *, on_round: Callable[[dict], None] | None = None) -> dict:
    """The whole federated job of the run config's fleet; returns the last round's record."""
    settings = RunSettings.from_config(run_config)
    fleet = settings.fleet()
    job = fleet.job
    test = held_out_data(job)
    model, convs = global_model(job, num_classes=test.num_classes)
    initial = ArrayRecord(torch_state_dict=trained_state(model))
    expected = expected_layout({name: array.numpy() for name, array in initial.items()})

    recorder = RoundRecorder(settings.out_dir / "rounds.jsonl", on_round=on_round)
    recorder.start_run(fleet=fleet.path, job=asdict(job), clients=fleet.num_clients,
                       devices={g.profile.name: g.count for g in fleet.groups}, trained_convs=convs,
                       trained_bytes=parameter_bytes(initial),
                       model_bytes=sum(t.numel() * t.element_size() for t in model.state_dict().values()),
                       settings=settings.as_config())
    log.info("fleet %s: %d clients, %s on %s, %d rounds; round log %s", fleet.path, fleet.num_clients, job.method,
             job.model, job.rounds, recorder.path)

    def evaluate_global(server_round: int, arrays: ArrayRecord) -> MetricRecord:
        model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
        started = time.perf_counter()
        result = evaluate(model, test, batch_size=256, image_size=job.image_size)
        metrics = {"accuracy": result["accuracy"], "loss": result["loss"], "examples": result["examples"],
                   "eval-time": time.perf_counter() - started}
        recorder.end_round(server_round, metrics)
        return MetricRecord(metrics)

    strategy = make_strategy(job, num_clients=fleet.num_clients, recorder=recorder, expected=expected)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=job.rounds,
                            timeout=settings.round_timeout, evaluate_fn=evaluate_global)
    torch.save(result.arrays.to_torch_state_dict(), settings.out_dir / "trained_layers.pt")
    last = recorder.rounds[-1]
    recorder.end_run(final_accuracy=last["global"]["accuracy"], rounds=job.rounds)
    log.info("done: global accuracy %.3f after %d rounds; round log %s", last["global"]["accuracy"], job.rounds,
             recorder.path)
    return last
