"""Benchmark: how a simulated fleet grows on this machine, and the same fleet on a two-node Ray cluster.

1. Scaling: fleets of 10, 50, 100 and 200 clients (the ``mixed`` fleet's device mix, every client
   training each round, 2 rounds) in Flower's simulation engine; for each, wall time, the summed
   client training time and the 2-core floor it allows (that sum / CPUs), and the peak RSS of the
   whole process tree (this process, Ray's services, the client actors), sampled with psutil.
2. Cluster: the 10-client fleet on a Ray cluster of two nodes on this machine (a head and a second
   node, one CPU each, started with ``ray.cluster_utils.Cluster``: two raylets, as two hosts would
   run), through ``simulate(..., ray_address=...)``; which node each client actor ran on is read
   from the process tree (each actor is a child of its node's raylet).

Run: ``python -m bench.scaleout [--sizes 10 50 100 200] [--out bench/results/scaleout.json]``.
"""

from __future__ import annotations

import argparse
import threading
import time
from pathlib import Path

import psutil
import yaml

from bench.process_tree import TreeSampler, write_result
from odl_fed.federation.recorder import read_rounds
from odl_fed.federation.simulation import simulate
from odl_fed.schema import ClientKey, GlobalKey, Metric, RoundKey, Status

MIX = {"rpi4": 0.3, "rpi5": 0.2, "jetson-nano": 0.1, "phone": 0.3, "tiny": 0.1}  # configs/fleets/mixed.yaml
JOB = {"model": "mobilenet_v2", "layers": 2, "method": "asi", "rounds": 2, "local-epochs": 1, "batch-size": 16,
       "lr": 0.001, "image-size": 32, "dataset": "mnist-digits", "partition": "iid", "seed": 0,
       "examples-per-client": 20, "eval-examples": 200}


def fleet_file(directory: Path, clients: int) -> Path:
    counts = {name: max(1, round(share * clients)) for name, share in MIX.items()}
    counts["rpi4"] += clients - sum(counts.values())
    path = directory / f"fleet-{clients}.yaml"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump({"devices": [{"device": d, "count": n} for d, n in counts.items()],
                                    "job": JOB | {"clients-per-round": clients}}))
    return path


def run_fleet(directory: Path, clients: int, **kwargs) -> dict:
    fleet = fleet_file(directory, clients)
    started = time.perf_counter()
    with TreeSampler(interval=0.25) as memory:
        log = simulate({"fleet": str(fleet), "out-dir": str(directory / f"run-{clients}"), "plan-cache": ""},
                       progress=False, **kwargs)
    wall = time.perf_counter() - started
    rounds = read_rounds(log)
    train = sum(c.get(Metric.TRAIN_TIME, 0) for r in rounds for c in r[RoundKey.CLIENTS]
                if c[ClientKey.STATUS] == Status.OK)
    cpus = psutil.cpu_count()
    return {"clients": clients, "wall_seconds": wall, "train_seconds": train, "floor_seconds": train / cpus,
            "wall_over_floor": wall / (train / cpus) if train else None, "peak_rss_bytes": memory.peak,
            "trained": [r[RoundKey.AGGREGATED] for r in rounds[1:]],
            "accuracy": rounds[-1][RoundKey.GLOBAL][GlobalKey.ACCURACY]}


def on_two_nodes(directory: Path, clients: int = 10) -> dict:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1})
    cluster.add_node(num_cpus=1)
    cluster.wait_for_nodes()
    raylets = {p.pid for p in psutil.Process().children(recursive=True) if "raylet" in p.name()}
    actors: dict[int, int] = {}  # client actor pid -> the raylet (node) that started it
    stop = threading.Event()

    def watch() -> None:
        while not stop.wait(0.5):
            for process in psutil.Process().children(recursive=True):
                try:
                    if "ClientAppActor" in " ".join(process.cmdline()):
                        actors[process.pid] = process.ppid()
                except psutil.NoSuchProcess:
                    continue

    watcher = threading.Thread(target=watch, daemon=True)
    watcher.start()
    try:
        result = run_fleet(directory / "cluster", clients, ray_address=cluster.address)
        result |= {"ray_nodes": len(raylets), "actors": len(actors),
                   "actor_nodes": len(set(actors.values()) & raylets)}
    finally:
        stop.set()
        watcher.join()
        if ray.is_initialized():
            ray.shutdown()
        cluster.shutdown()
    return result


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=int, nargs="+", default=[10, 50, 100, 200])
    parser.add_argument("--no-cluster", action="store_true", help="skip the two-node Ray cluster run")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench-scaleout"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/scaleout.json"))
    args = parser.parse_args(argv)
    result = {"job": JOB, "mix": MIX, "cpus": psutil.cpu_count(), "sizes": []}
    for clients in args.sizes:
        row = run_fleet(args.out_dir, clients)
        result["sizes"].append(row)
        print(f"{clients:>4} clients: wall {row['wall_seconds']:7.1f} s, floor {row['floor_seconds']:6.1f} s "
              f"(x{row['wall_over_floor']:.2f}), peak RSS {row['peak_rss_bytes'] / 2**30:5.2f} GiB", flush=True)
    if not args.no_cluster:
        row = on_two_nodes(args.out_dir)
        result["cluster"] = row
        print(f"two-node Ray cluster: {row['ray_nodes']} raylets, {row['actors']} client actors on "
              f"{row['actor_nodes']} node(s); wall {row['wall_seconds']:.1f} s, trained {row['trained']}")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
