"""Benchmark: a long run (>= 30 rounds) watched for leaks: resident memory and open file
descriptors of the server and of the clients, sampled with psutil while the fleet trains.

The fleet runs in Flower's simulation engine, where the clients live in long-lived Ray actor
processes (a leak there grows round after round); the server is this process (the ServerApp runs
in it). Every second a thread reads each process of the tree: the server, the client actors
(``ray::ClientAppActor``), and Ray's own services. Each round's value is the last sample before
its line was written. Growth = the mean of the last 5 rounds over the mean of the 5 rounds after
warm-up (rounds 3-7), minus 1; above 5% is a bug to find.

Run: ``python -m bench.soak [--rounds 30] [--out bench/results/soak.json]``.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import yaml

from bench.process_tree import TreeSampler, write_result
from odl_fed.federation.recorder import read_rounds
from odl_fed.federation.simulation import simulate
from odl_fed.schema import GlobalKey, RoundKey

JOB = {"model": "resnet18", "layers": 2, "method": "asi", "clients-per-round": 4, "local-epochs": 1,
       "batch-size": 16, "lr": 0.001, "image-size": 32, "dataset": "mnist-digits", "partition": "iid", "seed": 0,
       "examples-per-client": 64, "eval-examples": 200}
DEVICES = [{"device": "rpi4", "count": 2}, {"device": "phone", "count": 1}, {"device": "jetson-nano", "count": 1}]
WARM_UP = 3  # rounds before the baseline (plans made, caches filled, allocator settled)
WINDOW = 5
LIMIT = 0.05


def per_round(samples: list[dict], rounds: list[dict]) -> list[dict]:
    """Each round's reading: the last sample taken before its line was written."""
    found = []
    for line in rounds:
        before = [s for s in samples if s["time"] <= line[RoundKey.TIME]]
        if before:
            found.append({"round": line[RoundKey.ROUND], **{k: v for k, v in before[-1].items() if k != "time"}})
    return found


def growth(values: list[float]) -> float:
    baseline = statistics.fmean(values[WARM_UP:WARM_UP + WINDOW])
    return statistics.fmean(values[-WINDOW:]) / baseline - 1


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out-dir", type=Path, default=Path("runs/bench-soak"))
    parser.add_argument("--out", type=Path, default=Path("bench/results/soak.json"))
    args = parser.parse_args(argv)
    if args.rounds < WARM_UP + 2 * WINDOW:
        parser.error(f"--rounds must be at least {WARM_UP + 2 * WINDOW}")
    args.out_dir.mkdir(parents=True, exist_ok=True)
    fleet = args.out_dir / "fleet.yaml"
    fleet.write_text(yaml.safe_dump({"devices": DEVICES, "job": JOB | {"rounds": args.rounds}}))
    started = time.perf_counter()
    with TreeSampler() as sampler:
        log = simulate({"fleet": str(fleet), "out-dir": str(args.out_dir), "plan-cache": ""}, progress=True)
    wall = time.perf_counter() - started
    rounds = read_rounds(log)
    readings = per_round(sampler.samples, rounds[1:])
    result = {"rounds": args.rounds, "wall_seconds": wall, "warm_up_rounds": WARM_UP, "window": WINDOW,
              "limit": LIMIT, "per_round": readings, "growth": {},
              "final_accuracy": rounds[-1][RoundKey.GLOBAL][GlobalKey.ACCURACY],
              "trained_per_round": [r[RoundKey.AGGREGATED] for r in rounds[1:]]}
    print(f"\nsoak: {args.rounds} rounds of {sum(d['count'] for d in DEVICES)} clients in {wall:.0f} s; "
          f"growth = last {WINDOW} rounds over rounds {WARM_UP + 1}-{WARM_UP + WINDOW}")
    print(f"  {'':8} {'rss first':>10} {'rss last':>10} {'growth':>8}   {'fds first':>9} {'fds last':>8} {'growth':>8}")
    for role in ("server", "clients", "ray"):
        rss = [r[role]["rss"] for r in readings]
        fds = [r[role]["fds"] for r in readings]
        result["growth"][role] = {"rss": growth(rss), "fds": growth(fds)}
        print(f"  {role:8} {rss[WARM_UP] / 2**20:>8.0f} M {rss[-1] / 2**20:>8.0f} M {growth(rss):>+8.1%}   "
              f"{fds[WARM_UP]:>9} {fds[-1]:>8} {growth(fds):>+8.1%}")
    over = {f"{role} {kind}": value for role, kinds in result["growth"].items() for kind, value in kinds.items()
            if value > LIMIT}
    result["over_limit"] = over
    print("  no growth above 5% after warm-up" if not over else f"  ABOVE 5%: {over}")
    write_result(args.out, result)
    return result


if __name__ == "__main__":
    main()
