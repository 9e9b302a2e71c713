"""Benchmark: a deployed round against the same round in simulation, where its time goes, and the image's cost.

One run measures, on this machine:

- the same small fleet (``--clients`` clients, MobileNetV2 with its last conv and head trained
  with ASI, 64 examples each, ``--rounds`` rounds) in Flower's simulation engine (``odl-fed
  simulate``) and deployed on loopback (``python -m odl_fed.server`` and one ``python -m
  odl_fed.client`` per client, each its own process tree, with its warm launcher: a forked
  ClientApp per message, :mod:`odl_fed.deploy.launcher`); per-round wall times from the round logs
  and their ratio;
- each deployed round's phases, from the launchers' records (``launcher.jsonl``) and the round log:
  launch (fork to the ClientApp's start), imports (paid once per client at its start; what a
  message's child imported itself), model and data (built once per run, by the launcher), planning
  and training (the slowest client's), the server's evaluation, and the rest: Flower's messages and
  polling (the round less the slowest ClientApp and the evaluation);
- Flower's polling floor: the rounds of a deployed app that does nothing (:mod:`bench.deploy_floor`),
  and the target it sets: a steady deployed round at most twice the simulated one plus that floor;
- with ``--cold``: the same fleet deployed with Flower's own SuperExec (``python -m odl_fed.client
  --cold``: a fresh ``flwr-clientapp`` per message), and what such a process pays before it plans:
  Python, torch, Flower and odl_fed imported, then the fleet read, the model built and the client's
  share loaded (measured apart, as many processes at once as there are clients);
- with ``--image``: each role's image (server, clients): its size and its build time, cold (``--no-cache``, base image
  present) and warm (nothing changed), and a container's start, with a Docker engine of its own.

Run: ``python -m bench.deploy [--cold] [--image] [--out bench/results/deploy.json]``.
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

from bench.deploy_floor import polling_floor
from odl_fed.deploy.launcher import LAUNCHER_LOG
from odl_fed.deploy.processes import free_port, stop_tree
from odl_fed.federation.recorder import read_rounds
from odl_fed.schema import JOIN_QUERY, ROUND_LOG, TRAIN_MESSAGE, GlobalKey, LauncherKey, Metric, RoundKey

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


def deploy_fleet(fleet: Path, out: Path, devices: list[str], *, cold: bool = False) -> Path:
    """The server entry and one client entry per device, on loopback; all stopped by PID after. Each
    client's launcher keeps its record in ``out/state-<i>/`` (:func:`launcher_records`)."""
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
                 "--reconnect-timeout", "5", "--connect-timeout", "600",
                 *(["--cold"] if cold else ["--state-dir", str(out / f"state-{i}")])],
                cwd=ROOT, env=_env(), stdout=(out / f"client-{i}.log").open("w"), stderr=subprocess.STDOUT))
        if processes[0].wait(timeout=3600) != 0:
            raise SystemExit(f"error: the deployed run failed; see {out / 'server.log'}")
    finally:
        for process in processes:
            stop_tree(process.pid)
    return out / ROUND_LOG


def launcher_records(out: Path, clients: int) -> list[list[dict]]:
    """Each client's launcher record (odl_fed.schema.LauncherKey), one list of events per client."""
    return [[json.loads(line) for line in (out / f"state-{i}" / LAUNCHER_LOG).read_text().splitlines()]
            for i in range(clients)]


def warm_phases(records: list[list[dict]], log: Path, rounds: int) -> dict:
    """Where each warm deployed round's time goes (lists: one value per round; ``once``: per client start)."""
    children = [[e for e in events
                 if e[LauncherKey.EVENT] == "child" and e.get(LauncherKey.MESSAGE_TYPE) == TRAIN_MESSAGE]
                for events in records]
    greetings = [e for events in records for e in events
                 if e[LauncherKey.EVENT] == "child" and e.get(LauncherKey.MESSAGE_TYPE) == JOIN_QUERY]
    starts = [next(e for e in events if e[LauncherKey.EVENT] == "start") for events in records]
    warms = [next((e for e in events if e[LauncherKey.EVENT] == "warm"), {}) for events in records]
    # a client's train messages in order, one per round (its greeting and the end notice are apart)
    per_round = [[kids[r] for kids in children if len(kids) > r] for r in range(rounds)]
    launch = [max(c[LauncherKey.LAUNCH_S] for c in kids) for kids in per_round]
    clientapp = [max(c[LauncherKey.LAUNCH_S] + c[LauncherKey.RUN_S] for c in kids) for kids in per_round]
    rounds_log = read_rounds(log)[1:]
    client_round = [max(c.get(Metric.CLIENT_TIME, 0) for c in r[RoundKey.CLIENTS]) for r in rounds_log]
    planning = [max(c.get(Metric.PLAN_TIME, 0) for c in r[RoundKey.CLIENTS]) for r in rounds_log]
    training = [max(c.get(Metric.TRAIN_TIME, 0) for c in r[RoundKey.CLIENTS]) for r in rounds_log]
    evaluation = _eval_times(log)
    round_s = _round_times(log)
    return {
        "once": {"launcher-start-s": max(e[LauncherKey.START_S] for e in starts),
                 "imports-s": max(e[LauncherKey.IMPORTS_S] for e in starts),
                 "model-s": max(w.get(LauncherKey.MODEL_S, 0.0) for w in warms),
                 "data-s": max(w.get(LauncherKey.DATA_S, 0.0) for w in warms),
                 "launcher-rss-mib": max(w.get(LauncherKey.RSS, 0) for w in warms) / 2**20,
                 # the server's greeting before round 1 (who the node is; the backbone, were it lacking)
                 "greeting-clientapp-s": max((c[LauncherKey.LAUNCH_S] + c[LauncherKey.RUN_S] for c in greetings),
                                             default=0.0)},
        "launch-s": launch,
        "modules-imported-per-message": [max(c[LauncherKey.MODULES_IMPORTED] for c in kids) for kids in per_round],
        "model-builds-per-round": [sum(c[LauncherKey.BUILDS].get("model", 0) for c in kids) for kids in per_round],
        "data-loads-per-round": [sum(c[LauncherKey.BUILDS].get("data", 0) for c in kids) for kids in per_round],
        # clientapp-s: the slowest child, fork to exit; client-round-s: the slowest odl-fed round inside one
        # (plan, train, FLOPs count, reply built); the difference is Flower's part in the child (the message
        # pulled and inflated, the FAB installed, the reply pushed)
        "clientapp-s": clientapp, "client-round-s": client_round, "planning-s": planning, "training-s": training,
        "evaluation-s": evaluation,
        "flower-messages-and-polling-s": [r - c - e for r, c, e in zip(round_s, clientapp, evaluation)],
    }


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
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--cold", action="store_true",
                        help="also deploy with Flower's own SuperExec (a fresh ClientApp process per message)")
    parser.add_argument("--image", action="store_true", help="also measure the image (starts a Docker engine)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "deploy.json")
    args = parser.parse_args(argv)
    devices = [("rpi4", "phone")[i % 2] for i in range(args.clients)]
    steady = slice(1, None)  # round 1: each device plans once, and the launchers build the model and data
    load_before = os.getloadavg()
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
        phases = warm_phases(launcher_records(tmp / "deployed", args.clients), dep_log, args.rounds)
        floor = polling_floor(args.clients, rounds=5)
        sim_rounds, dep_rounds = _round_times(sim_log), _round_times(dep_log)
        sim_work, sim_eval = _client_work(sim_log), _eval_times(sim_log)
        result = {
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(),
                        "load-average-1-5-15-before": load_before, "load-average-1-5-15-after": os.getloadavg()},
            "fleet": {"clients": args.clients, "devices": devices, "rounds": args.rounds, **JOB},
            "simulation": {"wall-s": sim_wall, "round-s": sim_rounds, "client-work-s": sim_work, "eval-s": sim_eval},
            "deployed": {"wall-s": dep_wall, "round-s": dep_rounds, "phases": phases},
            "flower-polling-floor": floor,
            "ratio-round-1": dep_rounds[0] / sim_rounds[0],
            "ratio-steady-round": statistics.mean(dep_rounds[steady]) / statistics.mean(sim_rounds[steady]),
        }
        sim_steady, dep_steady = statistics.mean(sim_rounds[steady]), statistics.mean(dep_rounds[steady])
        target = 2 * sim_steady + floor["floor-s"]
        result["target"] = {"simulated-steady-round-s": sim_steady, "deployed-steady-round-s": dep_steady,
                            "floor-s": floor["floor-s"], "target-s (2x simulated + floor)": target,
                            "met": dep_steady <= target}
        if args.cold:
            started = time.perf_counter()
            cold_log = deploy_fleet(fleet, tmp / "deployed-cold", devices, cold=True)
            cold_rounds = _round_times(cold_log)
            imports = statistics.median(clientapp_start(args.clients) for _ in range(3))
            setup = statistics.median(clientapp_setup(args.clients, fleet) for _ in range(3))
            result["deployed-cold"] = {
                "wall-s": time.perf_counter() - started, "round-s": cold_rounds,
                "client-work-s": _client_work(cold_log), "eval-s": _eval_times(cold_log),
                "clientapp-start-and-imports-s": imports, "clientapp-fleet-model-and-data-s": setup,
                "ratio-steady-round": statistics.mean(cold_rounds[steady]) / sim_steady}
    if args.image:
        result["image"] = image_figures()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=2) + "\n")
    print(json.dumps({k: result[k] for k in ("ratio-round-1", "ratio-steady-round", "target")}, indent=2))
    print(json.dumps({"simulation.round-s": sim_rounds, "deployed.round-s": dep_rounds,
                      "deployed.phases": phases, "floor.round-s": floor["round-s"]}, indent=2))
    for extra in ("deployed-cold", "image"):
        if extra in result:
            print(json.dumps({extra: result[extra]}, indent=2))
    print(f"wrote {args.out}")
    return result


if __name__ == "__main__":
    main()
