"""The Flower ServerApp: send the trained layers, aggregate the valid updates, evaluate, record.

Only the trained layers (the last convs and the head) travel, both ways. Each round the global
model is evaluated on the held-out split and the round is written to ``OUT-DIR/rounds.jsonl``
(:mod:`odl_fed.recorder`), TensorBoard's event files to ``OUT-DIR/tensorboard/`` as rounds land,
and the final trained layers to ``OUT-DIR/trained_layers.pt``; at the end, the report
``OUT-DIR/report.html`` (:mod:`odl_fed.report`).
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict

import torch
from flwr.app import ArrayRecord, Context, MetricRecord
from flwr.serverapp import Grid, ServerApp

from odl_fed.job import global_model, held_out_data, train_size, trained_state
from odl_fed.recorder import RoundRecorder
from odl_fed.report import write_report
from odl_fed.run_config import RunSettings
from odl_fed.strategy import log, make_strategy, parameter_bytes
from odl_fed.task import evaluate
from odl_fed.tensorboard_log import TENSORBOARD_DIR, TensorBoardLog
from odl_fed.validation import expected_layout

__all__ = ["app", "run_server"]

app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    run_server(grid, context.run_config)


def run_server(grid: Grid, run_config: Mapping, *, listeners: Sequence[Callable[[dict], None]] = ()) -> dict:
    """The whole federated job of the run config's fleet; returns the last round's record.

    ``listeners`` get each line of the round log as it is written (the simulation's console view).
    """
    settings = RunSettings.from_config(run_config)
    fleet = settings.fleet()
    job = fleet.job
    test = held_out_data(job)
    model, convs = global_model(job, num_classes=test.num_classes)
    initial = ArrayRecord(torch_state_dict=trained_state(model))
    expected = expected_layout({name: array.numpy() for name, array in initial.items()})

    recorder = RoundRecorder(settings.out_dir / "rounds.jsonl",
                             listeners=[TensorBoardLog(settings.out_dir / TENSORBOARD_DIR), *listeners])
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

    strategy = make_strategy(job, num_clients=fleet.num_clients, recorder=recorder, expected=expected,
                             node_wait=settings.round_timeout, max_examples=train_size(job) * job.local_epochs)
    result = strategy.start(grid=grid, initial_arrays=initial, num_rounds=job.rounds,
                            timeout=settings.round_timeout, evaluate_fn=evaluate_global)
    torch.save(result.arrays.to_torch_state_dict(), settings.out_dir / "trained_layers.pt")
    last = recorder.rounds[-1]
    recorder.end_run(final_accuracy=last["global"]["accuracy"], rounds=job.rounds)
    try:
        report = write_report([settings.out_dir])
        log.info("report: %s", report)
    except Exception as error:  # the run is done and recorded; a report can be made again with odl-fed report
        log.warning("the report was not written (%s: %s); make it with: odl-fed report %s", type(error).__name__,
                    error, settings.out_dir)
    log.info("done: global accuracy %.3f after %d rounds; round log %s", last["global"]["accuracy"], job.rounds,
             recorder.path)
    return last
