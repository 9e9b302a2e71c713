"""Benchmark: a deployed round against the same round in simulation, and the image's cost.

One run measures, on this machine:

- the same small fleet (``--clients`` clients, MobileNetV2 with its last conv and head trained
  with ASI, 64 examples each, ``--rounds`` rounds) twice: in Flower's simulation engine
  (``odl-fed simulate``) and deployed on loopback (``python -m odl_fed.server`` and one
  ``python -m odl_fed.client`` per client, each its own process tree); per-round wall times from
  the round logs, their ratio, and where a deployed round's extra time goes: a fresh ClientApp
  process per message (Python, torch, Flower and odl_fed imported again, then the fleet read, the
  model built and the client's share of the data loaded again: both measured apart, as many
  processes at once as there are clients), the clients' own work (plan + train, from the round
  log), the server's evaluation, and the rest (Flower's messages and polling, and the FLOPs count
  each round makes);
- with ``--image``: each role's image (server, clients): its size and its build time, cold (``--no-cache``, base image
  present) and warm (nothing changed), and a container's start, with a Docker engine of its own.

Run: ``python -m bench.deploy [--image] [--out bench/results/deploy.json]``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import yaml

from odl_fed.deploy.processes import free_port, stop_tree
from odl_fed.federation.recorder import read_rounds
from odl_fed.schema import ROUND_LOG, GlobalKey, Metric, RoundKey

ROOT = Path(__file__).resolve().parent.parent
JOB = {"model": "mobilenet_v2", "layers": 1, "method": "asi", "local-epochs": 1, "batch-size": 16, "lr": 0.001,
       "image-size": 32, "dataset": "mnist-digits", "partition": "iid", "seed": 0, "examples-per-client": 64,
       "eval-examples": 200}
CLIENTAPP_IMPORTS = "import torch, flwr.clientapp, odl_fed.federation.client_app"
# What each fresh ClientApp does before planning: read the fleet, build the model, load its share.
CLIENTAPP_SETUP = ("import sys, time; {imports}; t = time.perf_counter(); "
                   "from odl_fed.config.run import RunSettings; "
                   "from odl_fed.federation.job_assets import client_data, global_model; "
                   "job = RunSettings.from_config({{'fleet': sys.argv[1]}}).fleet().job; "
                   "data = client_data(job, 0, {clients}); global_model(job, num_classes=data.num_classes); "
                   "print(time.perf_counter() - t)")


def _env() -> dict:
    return os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}


def _round_times(log: Path) -> list[float]:
    rounds = read_rounds(log)
    return [rounds[i]["time"] - rounds[i - 1]["time"] for i in range(1, len(rounds))]


def _client_work(log: Path) -> list[float]:
    """Per round, the slowest client's plan + train time (what the round waits for)."""
    return [max(c.get(Metric.PLAN_TIME, 0) + c.get(Metric.TRAIN_TIME, 0) for c in r[RoundKey.CLIENTS])
            for r in read_rounds(log)[1:]]


def _eval_times(log: Path) -> list[float]:
    return [r[RoundKey.GLOBAL][GlobalKey.EVAL_TIME] for r in read_rounds(log)[1:]]


def simulate_fleet(fleet: Path, out: Path) -> Path:
    done = subprocess.run([sys.executable, "-m", "odl_fed.cli", "simulate", "--fleet", str(fleet), "--out-dir",
                           str(out), "--no-progress", "--plan-cache", str(out / "plans")], cwd=ROOT, env=_env(),
                          capture_output=True, text=True, timeout=3600)
    if done.returncode != 0:
        raise SystemExit(f"error: the simulation failed: {done.stderr[-2000:]}")
    return out / ROUND_LOG


def deploy_fleet(fleet: Path, out: Path, devices: list[str]) -> Path:
    """The server entry and one client entry per device, on loopback; all stopped by PID after."""
    port = free_port()
    out.mkdir(parents=True, exist_ok=True)
    # Plaintext (--insecure), as when the recorded figures were measured: TLS is not what this compares.
    processes = [subprocess.Popen([sys.executable, "-m", "odl_fed.server", "--insecure", "--fleet", str(fleet),
                                   "--out-dir", str(out), "--listen", f"127.0.0.1:{port}", "--plan-cache",
                                   str(out / "plans")],
                                  cwd=ROOT, env=_env(), stdout=(out / "server.log").open("w"),
                                  stderr=subprocess.STDOUT)]
    try:
        for i, device in enumerate(devices):
            processes.append(subprocess.Popen(
                [sys.executable, "-m", "odl_fed.client", "--insecure", "--device", device, "--superlink",
                 f"127.0.0.1:{port}", "--partition-id", str(i), "--num-partitions", str(len(devices)),
                 "--reconnect-timeout", "5"],
                cwd=ROOT, env=_env(), stdout=(out / f"client-{i}.log").open("w"), stderr=subprocess.STDOUT))
        if processes[0].wait(timeout=3600) != 0:
            raise SystemExit(f"error: the deployed run failed; see {out / 'server.log'}")
    finally:
        for process in processes:
            stop_tree(process.pid)
    return out / ROUND_LOG


def clientapp_start(clients: int) -> float:
    """Wall time for ``clients`` fresh processes at once to import what a ClientApp imports."""
    started = time.perf_counter()
    running = [subprocess.Popen([sys.executable, "-c", CLIENTAPP_IMPORTS], cwd=ROOT, env=_env())
               for _ in range(clients)]
    for process in running:
        process.wait()
    return time.perf_counter() - started


def clientapp_setup(clients: int, fleet: Path) -> float:
    """The slowest of ``clients`` fresh processes at once, from imported to model and data ready."""
    code = CLIENTAPP_SETUP.format(imports=CLIENTAPP_IMPORTS, clients=clients)
    running = [subprocess.Popen([sys.executable, "-c", code, str(fleet)], cwd=ROOT, env=_env(),
                                stdout=subprocess.PIPE, text=True) for _ in range(clients)]
    return max(float(process.communicate()[0].strip().splitlines()[-1]) for process in running)


def image_figures() -> dict:
    from odl_fed.deploy.compose import CLIENT_IMAGE, SERVER_IMAGE
    from tools.docker_engine import EngineUnavailable, base_image, start_engine, wheelhouse

    try:
        engine = start_engine()
    except EngineUnavailable as error:
        return {"skipped": str(error)}
    try:
        base = base_image(engine, cache=Path(os.environ.get("ODL_FED_CACHE", "/var/cache/odl-fed")))
        wheelhouse()
        figures = {"base": base}
        for role, dockerfile, image in (("clients", "clients/Dockerfile", CLIENT_IMAGE),
                                        ("server", "server/Dockerfile", SERVER_IMAGE)):
            for name, extra in (("cold", ["--no-cache"]), ("warm", [])):
                started = time.perf_counter()
                engine.docker("build", "-q", *extra, "-f", dockerfile, "--build-arg", f"BASE={base}", "-t", image,
                              str(ROOT), cwd=ROOT, timeout=3600)
                figures[f"{role}-build-{name}-s"] = time.perf_counter() - started
            figures[f"{role}-image-bytes"] = int(engine.docker("image", "inspect", image, "--format",
                                                               "{{.Size}}").stdout.strip())
        for name, code in (("container-start-s", "pass"), ("container-clientapp-imports-s", CLIENTAPP_IMPORTS)):
            started = time.perf_counter()
            engine.docker("run", "--rm", CLIENT_IMAGE, "python", "-c", code)
            figures[name] = time.perf_counter() - started
        return figures
    finally:
        engine.stop()


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.deploy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--image", action="store_true", help="also measure the image (starts a Docker engine)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "deploy.json")
    args = parser.parse_args(argv)
    devices = [("rpi4", "phone")[i % 2] for i in range(args.clients)]
    with tempfile.TemporaryDirectory(prefix="bench-deploy-") as tmp:
        tmp = Path(tmp)
        fleet = tmp / "fleet.yaml"
        groups = {d: devices.count(d) for d in dict.fromkeys(devices)}
        fleet.write_text(yaml.safe_dump({"devices": [{"device": d, "count": n} for d, n in groups.items()],
                                         "job": JOB | {"rounds": args.rounds, "clients-per-round": args.clients}}))
        started = time.perf_counter()
        sim_log = simulate_fleet(fleet, tmp / "sim")
        sim_wall = time.perf_counter() - started
        started = time.perf_counter()
        dep_log = deploy_fleet(fleet, tmp / "deployed", devices)
        dep_wall = time.perf_counter() - started
        imports = statistics.median(clientapp_start(args.clients) for _ in range(3))
        setup = statistics.median(clientapp_setup(args.clients, fleet) for _ in range(3))
        sim_rounds, dep_rounds = _round_times(sim_log), _round_times(dep_log)
        dep_work, dep_eval = _client_work(dep_log), _eval_times(dep_log)
        sim_work, sim_eval = _client_work(sim_log), _eval_times(sim_log)
    steady = slice(1, None)  # round 1 plans each device once (the plans are kept on disk after)
    result = {
        "machine": {"cpus": os.cpu_count(), "python": platform.python_version()},
        "fleet": {"clients": args.clients, "devices": devices, "rounds": args.rounds, **JOB},
        "simulation": {"wall-s": sim_wall, "round-s": sim_rounds, "client-work-s": sim_work, "eval-s": sim_eval},
        "deployed": {"wall-s": dep_wall, "round-s": dep_rounds, "client-work-s": dep_work, "eval-s": dep_eval,
                     "clientapp-start-s": imports, "clientapp-setup-s": setup},
        "ratio-round-1": dep_rounds[0] / sim_rounds[0],
        "ratio-steady-round": statistics.mean(dep_rounds[steady]) / statistics.mean(sim_rounds[steady]),
    }
    steady_dep = statistics.mean(dep_rounds[steady])
    work, evaluation = statistics.mean(dep_work[steady]), statistics.mean(dep_eval[steady])
    result["deployed-steady-breakdown-s"] = {
        "round": steady_dep, "clientapp-process-start-and-imports": imports,
        "clientapp-fleet-model-and-data": setup, "client-work-plan-and-train": work, "server-eval": evaluation,
        "rest-flower-messages-polling-and-flops-count": steady_dep - imports - setup - work - evaluation}
    if args.image:
        result["image"] = image_figures()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ratio-round-1", "ratio-steady-round", "deployed-steady-breakdown-s")},
                     indent=2))
    if "image" in result:
        print(json.dumps(result["image"], indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
