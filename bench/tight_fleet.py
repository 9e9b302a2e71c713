"""A fleet of tight devices: do plans hold, and is the budget used well?

The need of the job's full setting (its trained layers at its batch) is measured on this machine
first, as a client plans it (weights + the measured trial's need + margin). Then a fleet is made of
devices with ``train-memory`` at 1.1x, 1.2x and 1.3x of that need and one that holds the weights and a
quarter of the rest (far below the need), and run in
Flower's simulation engine. Every client-round must either train without a breach (one attempt)
or be refused at plan time; per device, the guard's peak over its budget says how well the budget
was used.

    python -m bench.tight_fleet [--rounds 3] [--out bench/results/tight_fleet.json]
    python -m bench.tight_fleet --method asi-int8 --rank-weighting relative --out bench/results/tight_fleet_int8.json
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

import torch
import yaml

from odl_fed.config.fleet import load_fleet
from odl_fed.config.profile import get_profile
from odl_fed.federation.job_assets import client_data, global_model
from odl_fed.federation.recorder import read_rounds
from odl_fed.federation.simulation import simulate
from odl_fed.planning.device_plan import plan_client
from odl_fed.planning.ranks import WEIGHTINGS
from odl_fed.schema import ClientKey, GlobalKey, Metric, RoundKey, Status

MiB = 2**20
FACTORS = (1.1, 1.1, 1.2, 1.3, 1.3)
STARVED = 0.25  # the starved device holds the weights and this share of the rest of the need


def measured_need(fleet_file: Path, devices_file: Path) -> tuple[int, int]:
    """weights + the trial's need + margin of the job's full setting, planned on a roomy device here,
    and the weights alone."""
    fleet = load_fleet(fleet_file, device_files=(devices_file,))
    job = fleet.job
    data = client_data(job, 0, fleet.num_clients)
    model, _ = global_model(job, num_classes=data.num_classes)
    plan = plan_client(model, model_name=job.model, profile=get_profile("rpi5"), method=job.method,
                       layers=job.layers, batch_size=job.batch_size, data=data, image_size=job.image_size, lr=job.lr,
                       relative=job.rank_weighting == "relative")
    return plan.weights_bytes + plan.measured_need + plan.margin, plan.weights_bytes


def _write(root: Path, job: dict, need: int | None, weights: int = 0) -> tuple[Path, Path]:
    devices = {f"tight-{i}": {"ram": "2GiB", "train-memory": int(factor * (need or 2**30)), "runtime-memory": 0,
                              "cores": 1, "relative-speed": 1.0, "description": f"{factor}x the measured need"}
               for i, factor in enumerate(FACTORS)}
    starved = weights + int(STARVED * ((need or 2**30) - weights))  # past the weights: planning tries settings
    devices["starved"] = {"ram": "2GiB", "train-memory": starved, "runtime-memory": 0, "cores": 1,
                          "relative-speed": 1.0, "description": f"the weights + {STARVED} of the rest of the need"}
    devices_file, fleet_file = root / "devices.yaml", root / "fleet.yaml"
    devices_file.write_text(yaml.safe_dump(devices))
    fleet_file.write_text(yaml.safe_dump({"devices": [{"device": name, "count": 1} for name in devices],
                                          "job": job | {"clients-per-round": len(devices)}}))
    return fleet_file, devices_file


def run(root: Path, *, rounds: int = 2, model: str = "mobilenet_v2", layers: int = 2, batch: int = 16,
        examples: int = 96, image_size: int = 32, dataset: str = "digits", method: str = "asi",
        rank_weighting: str = "absolute") -> dict:
    """Measure the need, run the tight fleet, and summarise its round log per client."""
    root.mkdir(parents=True, exist_ok=True)
    job = {"model": model, "layers": layers, "method": method, "rounds": rounds, "local-epochs": 1,
           "batch-size": batch, "lr": 0.001, "image-size": image_size, "dataset": dataset, "partition": "iid",
           "seed": 0, "examples-per-client": examples, "eval-examples": 200, "rank-weighting": rank_weighting}
    fleet_file, devices_file = _write(root, job, None)
    need, weights = measured_need(fleet_file, devices_file)
    fleet_file, devices_file = _write(root, job, need, weights)
    log = simulate({"fleet": str(fleet_file), "devices-file": str(devices_file), "out-dir": str(root / "out"),
                    "plan-cache": str(root / "plans")}, progress=False)
    rounds_ = read_rounds(log)[1:]
    clients = [c | {RoundKey.ROUND: r[RoundKey.ROUND]} for r in rounds_ for c in r[RoundKey.CLIENTS]]
    trained = [c for c in clients if c[ClientKey.STATUS] == Status.OK]
    per_device = {}
    for c in trained:
        per_device.setdefault(c[ClientKey.DEVICE], []).append(c[Metric.PEAK_MEMORY] / c[Metric.MEMORY_BUDGET])
    return {
        "need_bytes": need, "rounds": rounds, "job": job,
        "clients": [{k: c.get(k) for k in (RoundKey.ROUND, ClientKey.CLIENT, ClientKey.DEVICE, ClientKey.STATUS,
                                           Metric.ATTEMPTS, Metric.PEAK_MEMORY, Metric.MEMORY_BUDGET,
                                           Metric.TRAIN_MEMORY, Metric.BATCH_SIZE, Metric.LAYERS_TRAINED,
                                           Metric.EXACT_LAYERS, Metric.GUARD_RECLAIMS, ClientKey.REASON)}
                    for c in clients],
        "peak_over_budget": {device: statistics.mean(v) for device, v in sorted(per_device.items())},
        "mean_peak_over_budget": statistics.mean(c[Metric.PEAK_MEMORY] / c[Metric.MEMORY_BUDGET] for c in trained)
        if trained else 0.0,
        "breaches_after_plan": sum(1 for c in clients if c[ClientKey.STATUS] == Status.MEMORY_EXCEEDED
                                   or c.get(Metric.ATTEMPTS, 1) > 1),
        "accuracy": [r[RoundKey.GLOBAL][GlobalKey.ACCURACY] for r in read_rounds(log)],
    }


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.tight_fleet", description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--model", default="mobilenet_v2")
    parser.add_argument("--examples", type=int, default=160)
    parser.add_argument("--method", default="asi", help="the job's method (odl_fed.training.methods), e.g. asi-int8")
    parser.add_argument("--rank-weighting", choices=WEIGHTINGS, default="absolute")
    parser.add_argument("--out", type=Path, default=Path("bench/results/tight_fleet.json"))
    parser.add_argument("--work", type=Path, default=Path("runs/tight_fleet"))
    args = parser.parse_args(argv)
    torch.manual_seed(0)
    result = run(args.work, rounds=args.rounds, model=args.model, examples=args.examples, method=args.method,
                 rank_weighting=args.rank_weighting)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"need of the full setting here: {result['need_bytes'] / MiB:.1f} MiB (weights + trial + margin)")
    print("| round | client | status | attempts | batch | layers | peak / budget (MiB) | reason |")
    print("|---|---|---|---|---|---|---|---|")
    for c in result["clients"]:
        peak, budget = c.get(Metric.PEAK_MEMORY), c.get(Metric.MEMORY_BUDGET)
        ratio = f"{peak / MiB:.1f} / {budget / MiB:.1f}" if peak else "-"
        print(f"| {c[RoundKey.ROUND]} | {c[ClientKey.CLIENT]} | {c[ClientKey.STATUS]} | "
              f"{c.get(Metric.ATTEMPTS) or '-'} | {c.get(Metric.BATCH_SIZE) or '-'} | "
              f"{c.get(Metric.LAYERS_TRAINED) or '-'} | {ratio} | {(c.get(ClientKey.REASON) or '')[:90]} |")
    print(f"peak over budget, mean of trained client-rounds: {result['mean_peak_over_budget']:.2f}; "
          f"breaches after a plan: {result['breaches_after_plan']}")
    return result


if __name__ == "__main__":
    main()
