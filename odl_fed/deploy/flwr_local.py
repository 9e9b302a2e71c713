"""``flwr run .`` on this machine, done right: a project-local Flower home, offline settings, one
SuperNode per fleet client, a check that the run really finished, and the local SuperLink stopped.

``flwr run . local`` starts a SuperLink in the background and leaves it running, and exits 0 with
``--stream`` even when the run failed; this wrapper handles both. Usage::

    python -m odl_fed.deploy.flwr_local --fleet configs/fleets/demo.yaml [--out-dir runs/flwr]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import psutil

from odl_fed.config.fleet import FleetError, load_fleet
from odl_fed.config.run import DEFAULTS
from odl_fed.federation.flower_env import OFFLINE_ENV
from odl_fed.federation.job_assets import held_out_data, train_size
from odl_fed.planning.preflight import check_fleet
from odl_fed.schema import EVENT, ROUND_LOG, Event
from odl_fed.training.data import DatasetUnavailableError

__all__ = ["flwr_run", "stop_local_superlink"]

PROJECT = Path(__file__).resolve().parents[2]
FLOWER_PROCESSES = ("flower-superlink", "flower-superexec", "flwr-simulation", "flwr-serverapp", "flwr-clientapp")


def stop_local_superlink(flwr_home: Path) -> int:
    """Stop the Flower processes started with this Flower home; returns how many there were."""
    found = []
    for process in psutil.process_iter(["cmdline"]):
        try:
            cmdline = " ".join(process.info["cmdline"] or [])
            if any(name in cmdline for name in FLOWER_PROCESSES) and \
                    process.environ().get("FLWR_HOME") == str(flwr_home):
                found.append(process)
        except (psutil.NoSuchProcess, psutil.AccessDenied):
            continue
    for process in found:
        process.terminate()
    _, alive = psutil.wait_procs(found, timeout=10)
    for process in alive:
        process.kill()
    return len(found)


def flwr_run(fleet: Path, *, out_dir: Path, flwr_home: Path, devices_file: Path | None = None,
             plan_cache: str = DEFAULTS["plan-cache"], timeout: float = 3600) -> Path:
    """Run the fleet with ``flwr run . local`` and return its round log; raise if the run did not finish."""
    spec = load_fleet(fleet, device_files=() if devices_file is None else (devices_file,))
    held_out_data(spec.job)
    check_fleet(spec, train_examples=train_size(spec.job), simulated_cpus=os.cpu_count() or 1)
    flwr = shutil.which("flwr", path=str(Path(sys.executable).parent)) or shutil.which("flwr")
    if flwr is None:
        raise FileNotFoundError("the flwr command is not installed (pip install 'flwr[simulation]')")
    flwr_home.mkdir(parents=True, exist_ok=True)
    env = os.environ | OFFLINE_ENV | {"FLWR_HOME": str(flwr_home),
                                      "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
    run_config = (f'fleet="{fleet.absolute()}" out-dir="{out_dir.absolute()}" plan-cache="{plan_cache}" '
                  f'devices-file="{devices_file.absolute() if devices_file else ""}"')
    log = out_dir.absolute() / ROUND_LOG
    log.unlink(missing_ok=True)
    command = [flwr, "run", str(PROJECT), "local", "--stream", "--run-config", run_config,
               "--federation-config", f"num-supernodes={spec.num_clients}"]
    try:
        subprocess.run(command, cwd=PROJECT, env=env, check=True, timeout=timeout)
    finally:
        stop_local_superlink(flwr_home)
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if not lines or lines[-1].get(EVENT) != Event.END:
        raise RuntimeError(f"flwr run did not finish the job of {fleet} (round log {log}: "
                           f"{len([line for line in lines if line.get(EVENT) == Event.ROUND])} round line(s))")
    return log


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m odl_fed.deploy.flwr_local", description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleet", type=Path, default=Path("configs/fleets/demo.yaml"))
    parser.add_argument("--devices", type=Path, help="extra device profiles (YAML)")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/flwr"))
    parser.add_argument("--flwr-home", type=Path, default=PROJECT / ".flwr", help="Flower's home (project-local)")
    parser.add_argument("--plan-cache", default=DEFAULTS["plan-cache"],
                        help="the clients' plan cache directory ('': in memory only)")
    args = parser.parse_args(argv)
    try:
        log = flwr_run(args.fleet, out_dir=args.out_dir, flwr_home=args.flwr_home.absolute(),
                       devices_file=args.devices, plan_cache=args.plan_cache)
    except (FleetError, DatasetUnavailableError, FileNotFoundError, RuntimeError,
            subprocess.CalledProcessError) as error:
        print(f"flwr run: error: {error}", file=sys.stderr)
        return 2
    print(f"round log: {log}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
