"""Benchmark: a whole fleet in simulation on this machine, and what the memory guard costs.

One run measures:

- the fleet (default ``configs/fleets/mixed.yaml``, 100 clients) for all its rounds in Flower's
  simulation engine: wall time, and the peak resident memory of the whole run (this process plus
  every process it starts: Ray's services and its actors), sampled with psutil;
- the bytes that travel per round (trained layers down and up) against sending the whole model
  to and from the same clients, as a ratio;
- the guard's overhead per client step: the same client epoch with and without a
  :class:`~odl_fed.training.memory_guard.MemoryGuard`, alternated so both share the machine's noise.

Run: ``python -m bench.fleet [--fleet FILE] [--out bench/results/fleet.json]``.
"""

from __future__ import annotations

import argparse
import json
import platform
import shutil
import statistics
import time
from pathlib import Path

import psutil
import torch

from bench.process_tree import TreeSampler, write_result
from odl_fed.config.fleet import load_fleet
from odl_fed.federation.job_assets import client_data, global_model
from odl_fed.federation.recorder import read_rounds
from odl_fed.federation.simulation import simulate
from odl_fed.schema import ClientKey, GlobalKey, Metric, RoundKey, RunKey, Status
from odl_fed.training.memory_guard import MemoryGuard
from odl_fed.training.task import train_epoch


def guard_overhead(fleet, *, repeats: int = 3) -> dict:
    """Median seconds per step of one client's epoch with and without the guard."""
    job = fleet.job
    data = client_data(job, 0, fleet.num_clients)
    model, _ = global_model(job, num_classes=data.num_classes)
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=job.lr, foreach=False)
    steps = -(-len(data) // job.batch_size)
    timings = {"without": [], "with": []}
    samples = []
    for _ in range(repeats):
        for mode in ("without", "with"):
            if mode == "with":
                with MemoryGuard(2**40, client="bench") as guard:
                    stats = train_epoch(model, data, optimizer=optimizer, batch_size=job.batch_size,
                                        image_size=job.image_size, guard=guard)
                samples.append(guard.samples)
            else:
                stats = train_epoch(model, data, optimizer=optimizer, batch_size=job.batch_size,
                                    image_size=job.image_size)
            timings[mode].append(stats["seconds"] / steps)
    without, with_guard = statistics.median(timings["without"]), statistics.median(timings["with"])
    return {"steps": steps, "step_seconds_without": without, "step_seconds_with": with_guard,
            "overhead_seconds_per_step": with_guard - without, "overhead_ratio": with_guard / without,
            "guard_samples_per_step": statistics.median(samples) / steps}


def where_time_goes(rounds: list[dict], wall: float) -> dict:
    """Wall time against the 2-core floor, and what the clients and the server spent it on."""
    cpus = psutil.cpu_count()
    ok = [c for r in rounds for c in r[RoundKey.CLIENTS] if c[ClientKey.STATUS] == Status.OK]
    done = [c for r in rounds for c in r[RoundKey.CLIENTS]
            if Metric.CLIENT_TIME in c or c[ClientKey.STATUS] == Status.REFUSED]
    train = sum(c.get(Metric.TRAIN_TIME, 0) for c in ok)
    plan = sum(c.get(Metric.PLAN_TIME, 0) for c in done)
    client = sum(c.get(Metric.CLIENT_TIME, 0) for c in done)
    evaluation = sum(r[RoundKey.GLOBAL].get(GlobalKey.EVAL_TIME, 0) for r in rounds)
    return {"cpus": cpus, "train_seconds": train, "floor_seconds": train / cpus,
            "wall_over_floor": wall / (train / cpus),
            "plan_seconds": plan, "setup_seconds": max(client - train - plan, 0), "eval_seconds": evaluation,
            "rest_seconds": wall - client / cpus - evaluation}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleet", type=Path, default=Path("configs/fleets/mixed.yaml"))
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench-fleet"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/fleet.json"))
    args = parser.parse_args(argv)
    fleet = load_fleet(args.fleet)

    plans = args.out_dir / "plans"  # planned afresh, once per device type, as a first run does
    shutil.rmtree(plans, ignore_errors=True)
    started = time.perf_counter()
    with TreeSampler(interval=0.25) as memory:
        log = simulate({"fleet": str(args.fleet), "out-dir": str(args.out_dir), "plan-cache": str(plans)},
                       progress=True)
    wall = time.perf_counter() - started
    overhead = guard_overhead(fleet)  # after the run: its model and epoch are not the server's memory
    rounds = read_rounds(log)
    start = json.loads(log.read_text().splitlines()[0])
    traffic = []
    for r in rounds[1:]:
        sent = r[RoundKey.BYTES_DOWN] + r[RoundKey.BYTES_UP]
        whole = (r[RoundKey.CLIENTS_ASKED] + r[RoundKey.AGGREGATED]) * start[RunKey.MODEL_BYTES]
        traffic.append({"round": r[RoundKey.ROUND], "bytes": sent, "whole_model_bytes": whole, "ratio": sent / whole,
                        "aggregated": r[RoundKey.AGGREGATED], "failed": r[RoundKey.FAILED],
                        "accuracy": r[RoundKey.GLOBAL][GlobalKey.ACCURACY]})
    result = {
        "fleet": str(args.fleet), "clients": fleet.num_clients, "rounds": fleet.job.rounds,
        "clients_per_round": fleet.job.clients_per_round, "model": fleet.job.model, "method": fleet.job.method,
        "wall_seconds": wall, "peak_rss_bytes": memory.peak, "peak_rss_by_role": memory.peak_roles,
        "round_log": str(log),
        "round_0_accuracy": rounds[0][RoundKey.GLOBAL][GlobalKey.ACCURACY], "traffic": traffic, "guard": overhead,
        "machine": {"cpus": psutil.cpu_count(), "python": platform.python_version(), "torch": torch.__version__},
    }
    result["where"] = where_time_goes(rounds, wall)

    print(f"\nfleet {args.fleet}: {fleet.num_clients} clients, {fleet.job.clients_per_round} per round, "
          f"{fleet.job.rounds} rounds, {fleet.job.method} on {fleet.job.model}")
    print(f"  wall time            {wall:8.1f} s")
    print(f"  peak RSS (all procs) {memory.peak / 2**30:8.2f} GiB")
    print(f"  {'round':>5} {'ok':>4} {'failed':>6} {'sent MB':>9} {'whole MB':>9} {'ratio':>7} {'top-1':>6}")
    for t in traffic:
        print(f"  {t['round']:>5} {t['aggregated']:>4} {t['failed']:>6} {t['bytes'] / 1e6:>9.1f} "
              f"{t['whole_model_bytes'] / 1e6:>9.1f} {t['ratio']:>7.3f} {t['accuracy']:>6.3f}")
    print(f"  guard: {overhead['step_seconds_without'] * 1e3:.2f} ms/step without, "
          f"{overhead['step_seconds_with'] * 1e3:.2f} ms/step with "
          f"({overhead['overhead_seconds_per_step'] * 1e6:+.0f} us, x{overhead['overhead_ratio']:.3f}), "
          f"{overhead['guard_samples_per_step']:.1f} psutil samples per step")
    w = result["where"]
    print(f"  2-core floor (summed training / {w['cpus']} CPUs) {w['floor_seconds']:.1f} s: wall is "
          f"x{w['wall_over_floor']:.2f} of it (target x1.3); peak RSS {memory.peak / 2**30:.2f} GiB (target 4 GiB)")
    print(f"  where the wall time goes, in CPU-seconds over {w['cpus']} CPUs: training {w['train_seconds']:.0f}, "
          f"planning {w['plan_seconds']:.0f}, model build + data + warm-up {w['setup_seconds']:.0f}; the server's "
          f"evaluation {w['eval_seconds']:.0f} s (wall); the rest (Ray, Flower, messages, waits) "
          f"{w['rest_seconds']:.0f} s of wall")
    print("  peak RSS by role: " + ", ".join(f"{name} {rss / 2**30:.2f} GiB" for name, rss in
                                           memory.peak_roles.items()))
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
