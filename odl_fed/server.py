"""The fleet's server: a Flower SuperLink, and the ServerApp run against it until the job ends.

::

    python -m odl_fed.server --fleet configs/fleets/demo.yaml --out-dir runs/deployed [--listen 0.0.0.0:9092]
    python -m odl_fed.server --resume runs/deployed     # after a crash: go on from the last finished round

It starts the SuperLink (its state in ``OUT-DIR/superlink.db``), waits for it to answer, submits
the run with ``flwr run`` through a Flower home of the run directory's own (``OUT-DIR/flwr-home``),
and writes the same round log as the simulation (``OUT-DIR/rounds.jsonl``), which this entry follows
to show the console view (:mod:`odl_fed.console`); the SuperLink's and ``flwr run``'s own output
goes to ``OUT-DIR/superlink.log`` and ``OUT-DIR/flwr-run.log`` unless ``--verbose``. The ServerApp waits for
every client of the fleet to connect (``python -m odl_fed.client``), so clients may start before or
after it. On exit, on an error and on Ctrl-C / SIGTERM it stops what it started, by PID. It holds
``OUT-DIR/server.lock`` (:mod:`odl_fed.checkpoint`) while it runs, so a second server there is refused.

Clients read the fleet file (the job) and its weights at the same path as given here, relative to
their own working directory: run both from a checkout of the project, or give the same mounts.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import subprocess
import sys
import time
from pathlib import Path

from odl_fed.checkpoint import SERVER_LOCK, CheckpointError, RunDirInUse, RunLock, check_run_dir, resume_config
from odl_fed.console import ConsoleDashboard
from odl_fed.data import DatasetUnavailableError
from odl_fed.deploy import AddressError, Processes, flower_command, flower_env, parse_address, wait_for_port
from odl_fed.fleet import FleetError, load_fleet
from odl_fed.job import held_out_data, train_size
from odl_fed.preflight import check_fleet
from odl_fed.recorder import cut_back
from odl_fed.report import REPORT_NAME
from odl_fed.run_config import DEFAULTS
from odl_fed.run_log import LogFollower

__all__ = ["main", "serve", "DEFAULT_LISTEN", "ServerError"]

PROG = "python -m odl_fed.server"
DEFAULT_LISTEN = "0.0.0.0:9092"
FEDERATION = "deployed"


class ServerError(RuntimeError):
    """The SuperLink did not start, or the run did not finish."""


def _app_dir() -> Path:
    """The Flower app (the directory holding pyproject.toml with ``[tool.flwr.app]``)."""
    for candidate in (Path(__file__).resolve().parent.parent, Path.cwd()):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    raise FileNotFoundError("no pyproject.toml with the Flower app next to odl_fed or in the current directory")


def _flower_home(out_dir: Path, port: int) -> Path:
    home = out_dir / "flwr-home"
    home.mkdir(parents=True, exist_ok=True)
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
                                      f'address = "127.0.0.1:{port}"\ninsecure = true\n')
    return home


def _toml(value) -> str:
    return json.dumps(value) if not isinstance(value, (int, float)) or isinstance(value, bool) else repr(value)


def serve(fleet: Path, *, out_dir: Path, listen: str = DEFAULT_LISTEN, devices_file: Path | None = None,
          plan_cache: str = DEFAULTS["plan-cache"], round_timeout: float = float(DEFAULTS["round-timeout"]),
          start_timeout: float = 60.0, verbose: bool = False, console: ConsoleDashboard | None = None,
          resume: bool = False) -> Path:
    """Run the fleet's job on a SuperLink at ``listen``; returns the round log when the job ended.

    ``console`` gets each line of the round log as it lands (default: a view on standard output).
    With ``resume``, go on with the run in ``out_dir`` from its checkpoint (the fleet must be its own).
    """
    host, port = parse_address(listen, what="--listen")
    spec = load_fleet(fleet, device_files=() if devices_file is None else (devices_file,))
    held_out_data(spec.job)
    check_fleet(spec, train_examples=train_size(spec.job))  # files, layers, image size, data shares
    out_dir = out_dir.absolute()
    with RunLock(out_dir, SERVER_LOCK):
        resumed = check_run_dir(out_dir, spec, resume=resume)  # a refused run changes nothing in out_dir
        log = out_dir / "rounds.jsonl"
        if resumed is None:
            log.unlink(missing_ok=True)
        else:  # as the ServerApp will: the console then shows the rounds done, once
            cut_back(log, resumed.run, resumed.records)
        run_config = {"fleet": str(fleet), "devices-file": str(devices_file or ""), "out-dir": str(out_dir),
                      "plan-cache": plan_cache, "round-timeout": round_timeout, "resume": resume}
        return _serve(spec, log, run_config, host=host, port=port, listen=listen, start_timeout=start_timeout,
                      verbose=verbose, console=console)


def _serve(spec, log: Path, run_config: dict, *, host: str, port: int, listen: str, start_timeout: float,
           verbose: bool, console: ConsoleDashboard | None) -> Path:
    out_dir = log.parent
    home = _flower_home(out_dir, port)
    env = flower_env({"FLWR_HOME": str(home)})
    console = console if console is not None else ConsoleDashboard()
    follower = LogFollower(log)
    with Processes() as processes, contextlib.ExitStack() as files:
        def output(name: str) -> dict:
            if verbose:
                return {}
            return {"stdout": files.enter_context((out_dir / name).open("ab")), "stderr": subprocess.STDOUT}

        files.callback(console.close)
        superlink = processes.start([flower_command("flower-superlink"), "--insecure", "--database",
                                     str(out_dir / "superlink.db"), "--host", host, "--port", str(port),
                                     "--disable-runtime-dependency-installation"], env=env,
                                    **output("superlink.log"))
        if not wait_for_port("127.0.0.1" if host in ("0.0.0.0", "::") else host, port, timeout=start_timeout,
                             process=superlink):
            raise ServerError(f"the SuperLink did not start on {listen} within {start_timeout:g} s "
                              f"(status {superlink.poll()}); is the port taken?")
        print(f"odl-fed server: SuperLink {superlink.pid} on {listen}; waiting for the fleet's "
              f"{spec.num_clients} clients; round log {log}", file=sys.stderr, flush=True)
        submit = processes.start([flower_command("flwr"), "run", str(_app_dir()), FEDERATION, "--stream",
                                  "--run-config", " ".join(f"{k}={_toml(v)}" for k, v in run_config.items())],
                                 env=env, **output("flwr-run.log"))
        while submit.poll() is None:
            for event in follower.poll():
                console(event)
            if superlink.poll() is not None:
                raise ServerError(f"the SuperLink stopped (status {superlink.returncode}) during the run")
            time.sleep(0.5)
        for event in follower.poll():
            console(event)
    lines = [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []
    if not lines or lines[-1].get("event") != "end":
        raise ServerError(f"the run did not finish the job of {spec.path} (round log {log}: "
                          f"{sum(1 for line in lines if line.get('event') == 'round')} round line(s)); "
                          f"flwr run exited with {submit.returncode}"
                          + ("" if verbose else f"; its output is in {out_dir / 'flwr-run.log'}"))
    return log


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleet", type=Path, help="a fleet file, e.g. configs/fleets/demo.yaml (with --resume: "
                                                   "the run's own, read from its checkpoint)")
    parser.add_argument("--out-dir", type=Path,
                        help="the run directory: rounds.jsonl, checkpoint.pt, trained_layers.pt, superlink.db "
                             "(default: runs/deployed)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help="go on with the run in RUN_DIR from its last finished round (its checkpoint.pt)")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help="the SuperLink's address, HOST:PORT")
    parser.add_argument("--devices", type=Path, help="extra device profiles (YAML) the fleet names")
    parser.add_argument("--plan-cache", help=f"where clients keep their plans (default: {DEFAULTS['plan-cache']})")
    parser.add_argument("--round-timeout", type=float,
                        help=f"seconds to wait for a round's replies (default: {DEFAULTS['round-timeout']})")
    parser.add_argument("--verbose", action="store_true",
                        help="show the SuperLink's and flwr run's own output (default: OUT-DIR/*.log)")
    return parser


def _arguments(args) -> dict:
    """serve()'s arguments; with ``--resume RUN_DIR``, what was not given comes from the run's checkpoint."""
    stored = {}
    if args.resume is not None:
        if args.out_dir is not None and args.out_dir.absolute() != args.resume.absolute():
            raise CheckpointError(f"--resume {args.resume} is the run directory; --out-dir {args.out_dir} "
                                  f"names another")
        stored = resume_config(args.resume)
    elif args.fleet is None:
        raise FleetError("--fleet is needed to start a run (or --resume RUN_DIR to go on with one)")

    def given(value, key, default=None):
        return value if value is not None else stored.get(key, DEFAULTS[key] if default is None else default)

    devices = given(args.devices, "devices-file")
    return {"fleet": Path(given(args.fleet, "fleet")), "out_dir": Path(given(args.resume or args.out_dir, "out-dir",
                                                                             "runs/deployed")),
            "devices_file": Path(devices) if devices else None, "plan_cache": str(given(args.plan_cache, "plan-cache")),
            "round_timeout": float(given(args.round_timeout, "round-timeout")), "resume": args.resume is not None}


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        log = serve(listen=args.listen, verbose=args.verbose, **_arguments(args))
    except (AddressError, FleetError, DatasetUnavailableError, FileNotFoundError, CheckpointError,
            RunDirInUse) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except ServerError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: stopped (interrupted); what it started is stopped", file=sys.stderr)
        return 130
    print(f"round log: {log}")
    if (log.parent / REPORT_NAME).exists():
        print(f"report: {log.parent / REPORT_NAME}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
