"""The Flower ServerApp: send the trained layers, aggregate the valid updates, evaluate, record.

Only the trained layers (the last convs and the head) travel, both ways. Each round the global
model is evaluated on the held-out split (unless the job's ``evaluation`` is ``clients``: then the
server needs no data, and the clients' own evaluations, which come with their updates, are what the
round records) and the round is written to ``OUT-DIR/rounds.jsonl``
(:mod:`odl_fed.federation.recorder`), TensorBoard's event files to ``OUT-DIR/tensorboard/`` as rounds land,
and the final trained layers to ``OUT-DIR/trained_layers.pt``; at the end, the report
``OUT-DIR/report.html`` (:mod:`odl_fed.dashboard.report`).

After each round the run's state goes to ``OUT-DIR/checkpoint.pt`` (:mod:`odl_fed.federation.checkpoint`); with
``resume`` in the run config the server goes on from it, with the same fleet, at the next round.
The server holds ``OUT-DIR/writer.lock`` while it writes there.
"""

from __future__ import annotations

import functools
import json
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict

import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Message, MetricRecord, RecordDict
from flwr.serverapp import Grid, ServerApp

from odl_fed.config.job import job_mapping
from odl_fed.config.run import RunSettings
from odl_fed.dashboard.report import write_report
from odl_fed.dashboard.tensorboard_log import TENSORBOARD_DIR, TensorBoardLog
from odl_fed.federation.backbone import NodeGreeter
from odl_fed.federation.checkpoint import (
    CHECKPOINT,
    WRITER_LOCK,
    Checkpoint,
    RunLock,
    check_run_dir,
    fleet_identity,
    save_checkpoint,
)
from odl_fed.federation.job_assets import global_model, held_out_data, output_classes, train_size, trained_state
from odl_fed.federation.prompt_grid import PromptGrid
from odl_fed.federation.recorder import RoundRecorder
from odl_fed.federation.strategy import load_strategy_state, log, make_strategy, parameter_bytes, strategy_state
from odl_fed.federation.validation import expected_layout
from odl_fed.schema import (
    END_QUERY,
    ROUND_LOG,
    TRAINED_LAYERS_FILE,
    ConfigKey,
    EndKey,
    EndNotice,
    GlobalKey,
    Record,
    RoundKey,
    RunKey,
)
from odl_fed.training.allocator import LARGE_BLOCK, LARGEST_THRESHOLD, mmap_threshold, own_process
from odl_fed.training.task import evaluate

__all__ = ["app", "run_server"]

app = ServerApp()

# A deployed node answers the end notice from a fresh ClientApp process (imports included: tens of
# seconds on a board); a node that does not answer in time only misses the notice.
END_TIMEOUT = 120.0

@app.main()
def main(grid: Grid, context: Context) -> None:
    own_process()  # Flower's ServerApp process is the server's own: its allocator may be set (training.allocator)
    run_server(PromptGrid(grid), context.run_config)  # replies pulled every 0.1 s, not 3 (federation.prompt_grid)


def run_server(grid: Grid, run_config: Mapping, *, listeners: Sequence[Callable[[dict], None]] = ()) -> dict:
    """The whole federated job of the run config's fleet; returns the last round's record.

    ``listeners`` get each line of the round log as it is written (the simulation's console view).
    """
    settings = RunSettings.from_config(run_config)
    # the round's replies (MBs each) go back to the system when freed (training.allocator.mmap_threshold)
    with RunLock(settings.out_dir, WRITER_LOCK), mmap_threshold(LARGE_BLOCK):
        return _run(grid, settings, dict(run_config), listeners=listeners)


def _run(grid: Grid, settings: RunSettings, given: dict, *, listeners: Sequence[Callable[[dict], None]]) -> dict:
    fleet = settings.fleet()
    job = fleet.job
    identity = fleet_identity(fleet)
    checkpoint_path = settings.out_dir / CHECKPOINT
    resumed = check_run_dir(settings.out_dir, fleet, resume=settings.resume, writer_lock=False)
    test = held_out_data(job)  # None when only the clients evaluate (always for dataset: local)
    model, convs = global_model(job, num_classes=output_classes(job))
    greeter = NodeGreeter(job.weights, num_clients=fleet.num_clients)  # the backbone read once
    initial = ArrayRecord(torch_state_dict=trained_state(model))
    expected = expected_layout({name: array.numpy() for name, array in initial.items()})  # what clients send
    if resumed is not None:
        initial = ArrayRecord(torch_state_dict=resumed.arrays)

    recorder = RoundRecorder(settings.out_dir / ROUND_LOG,
                             listeners=[TensorBoardLog(settings.out_dir / TENSORBOARD_DIR), *listeners],
                             resume=None if resumed is None else (resumed.run, resumed.records))
    if resumed is None:
        recorder.start_run(**{RunKey.FLEET: fleet.path, RunKey.JOB: asdict(job), RunKey.CLIENTS: fleet.num_clients,
                              RunKey.DEVICES: {g.profile.name: g.count for g in fleet.groups},
                              RunKey.TRAINED_CONVS: convs, RunKey.TRAINED_BYTES: parameter_bytes(initial),
                              RunKey.MODEL_BYTES: sum(t.numel() * t.element_size()
                                                      for t in model.state_dict().values()),
                              RunKey.SETTINGS: settings.as_config()})
    done = 0 if resumed is None else resumed.round
    log.info("fleet %s: %d clients, %s on %s, %d rounds%s; round log %s", fleet.path, fleet.num_clients, job.method,
             job.model, job.rounds, f", resumed after round {done}" if resumed else "", recorder.path)

    strategy = make_strategy(job, num_clients=fleet.num_clients, recorder=recorder, expected=expected,
                             node_wait=settings.round_timeout,
                             max_examples=None if test is None else train_size(job) * job.local_epochs)
    strategy.round_offset = done
    # the job and the backbone travel to the nodes: a board needs no copy of the fleet file or the weights
    strategy.instruction = {ConfigKey.JOB: json.dumps(job_mapping(job)), ConfigKey.NUM_CLIENTS: fleet.num_clients,
                            **greeter.config()}
    strategy.before_train = functools.partial(greeter.greet, timeout=settings.round_timeout)
    if resumed is not None:
        load_strategy_state(strategy, {name: {k: t.numpy() for k, t in arrays.items()}
                                       for name, arrays in resumed.strategy.items()})
    latest = {"arrays": initial}

    def checkpoint(server_round: int, *, finished: bool = False) -> None:
        save_checkpoint(checkpoint_path, Checkpoint(
            round=server_round, rounds=job.rounds, arrays=latest["arrays"].to_torch_state_dict(),
            strategy={name: {k: torch.from_numpy(v) for k, v in arrays.items()}
                      for name, arrays in strategy_state(strategy).items()},
            run=recorder.run_line, records=recorder.rounds, fleet=identity, run_config=given,
            finished=finished))

    def evaluate_global(flower_round: int, arrays: ArrayRecord) -> MetricRecord | None:
        if resumed is not None and flower_round == 0:
            return None  # the checkpoint's model: evaluated and recorded before the server stopped
        server_round = flower_round + done
        metrics = {}  # evaluation: clients: the round's line holds what the clients measured
        if test is not None:
            model.load_state_dict(arrays.to_torch_state_dict(), strict=False)
            started = time.perf_counter()
            with mmap_threshold(LARGEST_THRESHOLD):  # batches reuse the heap; handed back after
                result = evaluate(model, test, batch_size=256, image_size=job.image_size, in_eval_mode=True)
            metrics = {GlobalKey.ACCURACY: result["accuracy"], GlobalKey.LOSS: result["loss"],
                       GlobalKey.EXAMPLES: result["examples"], GlobalKey.EVAL_TIME: time.perf_counter() - started}
        recorder.end_round(server_round, metrics)
        latest["arrays"] = arrays
        checkpoint(server_round)
        return MetricRecord(metrics)

    strategy.start(grid=grid, initial_arrays=initial, num_rounds=job.rounds - done,
                   timeout=settings.round_timeout, evaluate_fn=evaluate_global)
    torch.save(latest["arrays"].to_torch_state_dict(), settings.out_dir / TRAINED_LAYERS_FILE)
    last = recorder.rounds[-1]
    final_accuracy = last[RoundKey.GLOBAL].get(GlobalKey.ACCURACY)  # None: the server did not evaluate
    recorder.end_run(**{EndKey.FINAL_ACCURACY: final_accuracy, EndKey.ROUNDS: job.rounds})
    checkpoint(job.rounds, finished=True)
    try:
        report = write_report([settings.out_dir])
        log.info("report: %s", report)
    except Exception as error:  # the run is done and recorded; a report can be made again with odl-fed report
        log.warning("the report was not written (%s: %s); make it with: odl-fed report %s", type(error).__name__,
                    error, settings.out_dir)
    told = announce_end(grid, rounds=job.rounds, accuracy=final_accuracy, timeout=END_TIMEOUT)
    log.info("done: %s after %d rounds; round log %s; %d node(s) told the run is over",
             "the clients evaluated" if final_accuracy is None else f"global accuracy {final_accuracy:.3f}",
             job.rounds, recorder.path, told)
    return last


def announce_end(grid: Grid, *, rounds: int, accuracy: float | None, timeout: float) -> int:
    """Tell every connected node that the run is over (``query.end``), so its client can exit 0 instead
    of taking the SuperLink's end for a lost link; returns how many answered within ``timeout``.
    ``accuracy`` is None when the server did not evaluate (the notice then holds none)."""
    nodes = list(grid.get_node_ids())
    notice = ConfigRecord({EndNotice.ROUNDS: rounds} | ({} if accuracy is None else
                                                        {EndNotice.ACCURACY: float(accuracy)}))
    messages = [Message(RecordDict({Record.CONFIG: notice}), dst_node_id=node, message_type=END_QUERY)
                for node in nodes]
    replies = grid.send_and_receive(messages, timeout=timeout) if messages else []
    return sum(1 for reply in replies if not reply.has_error())
