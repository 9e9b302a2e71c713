"""The fleet's server: a Flower SuperLink, and the ServerApp run against it until the job ends.

::

    python -m odl_fed.server --fleet configs/fleets/demo.yaml --certs certs [--listen 0.0.0.0:9092]
    python -m odl_fed.server --fleet configs/fleets/demo.yaml --insecure     # plaintext, any node: dev only
    python -m odl_fed.server --resume runs/deployed --certs certs   # after a crash: on from the last finished round

``--certs DIR`` (``odl-fed certs DIR --nodes N``, :mod:`odl_fed.deploy.certs`) runs the SuperLink with TLS
(``server.crt``/``server.key``, signed by ``ca.crt``) and SuperNode authentication, and registers
every node public key (``*.pub``) in ``DIR``: only those nodes may join. The files are checked
before anything starts, so an expired, mismatched or foreign certificate is one error naming it.
``--insecure`` is plaintext and lets any SuperNode join; it is only used when asked for, with a
warning. One of the two is required.

It starts the SuperLink (its state in ``OUT-DIR/superlink.db``), waits for it to answer, submits
the run with ``flwr run`` through a Flower home of the run directory's own (``OUT-DIR/flwr-home``),
and writes the same round log as the simulation (``OUT-DIR/rounds.jsonl``), which this entry follows
to show the console view (:mod:`odl_fed.dashboard.console`); the SuperLink's and ``flwr run``'s own output
goes to ``OUT-DIR/superlink.log`` and ``OUT-DIR/flwr-run.log`` unless ``--verbose``. The ServerApp waits for
every client of the fleet to connect (``python -m odl_fed.client``), so clients may start before or
after it. On exit, on an error and on Ctrl-C / SIGTERM it stops what it started, by PID. It holds
``OUT-DIR/server.lock`` (:mod:`odl_fed.federation.checkpoint`) while it runs, so a second server there is refused.

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

from odl_fed.config.fleet import FleetError, load_fleet
from odl_fed.config.run import DEFAULTS
from odl_fed.dashboard.console import ConsoleDashboard
from odl_fed.dashboard.report import REPORT_NAME
from odl_fed.dashboard.run_log import LogFollower
from odl_fed.deploy.certs import CertError, ServerCerts, server_certs
from odl_fed.deploy.processes import (
    READY,
    SERVER_HOME,
    AddressError,
    Processes,
    flower_command,
    flower_env,
    parse_address,
    wait_for_port,
)
from odl_fed.federation.checkpoint import (
    SERVER_LOCK,
    Checkpoint,
    CheckpointError,
    RunDirInUse,
    RunLock,
    check_run_dir,
    resume_config,
)
from odl_fed.federation.job_assets import held_out_data, train_size
from odl_fed.federation.recorder import cut_back
from odl_fed.planning.preflight import check_fleet
from odl_fed.schema import CHECKPOINT_FILE, DEFAULT_PORT, EVENT, ROUND_LOG, TRAINED_LAYERS_FILE, Event
from odl_fed.training.data import DatasetUnavailableError

__all__ = ["main", "serve", "DEFAULT_LISTEN", "ServerError"]

PROG = "python -m odl_fed.server"
DEFAULT_LISTEN = f"0.0.0.0:{DEFAULT_PORT}"
FEDERATION = "deployed"


class ServerError(RuntimeError):
    """The SuperLink did not start, or the run did not finish."""


def _app_dir() -> Path:
    """The Flower app (the directory holding pyproject.toml with ``[tool.flwr.app]``)."""
    for candidate in (Path(__file__).resolve().parents[2], Path.cwd()):
        if (candidate / "pyproject.toml").is_file():
            return candidate
    raise FileNotFoundError("no pyproject.toml with the Flower app next to odl_fed or in the current directory")


def _flower_home(out_dir: Path, port: int, certs: ServerCerts | None) -> Path:
    home = out_dir / SERVER_HOME
    home.mkdir(parents=True, exist_ok=True)
    security = "insecure = true" if certs is None else f"root-certificates = {json.dumps(str(certs.ca.absolute()))}"
    (home / "config.toml").write_text(f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
                                      f'address = "127.0.0.1:{port}"\n{security}\n')
    return home


def _superlink_security(certs: ServerCerts | None) -> list[str]:
    if certs is None:
        return ["--insecure"]
    return ["--ssl-ca-certfile", str(certs.ca.absolute()), "--ssl-certfile", str(certs.cert.absolute()),
            "--ssl-keyfile", str(certs.key.absolute()), "--enable-supernode-auth"]


SUPERLINK_DB = "superlink.db"  # the SuperLink's state in the run directory (kept for --resume)


def _register_nodes(certs: ServerCerts, env: dict) -> None:
    """``flwr supernode register`` for each node public key; a key the SuperLink's database already
    holds (a restart with the same ``--out-dir``) counts as registered."""
    for key in certs.node_keys:
        try:
            done = subprocess.run([flower_command("flwr"), "supernode", "register", str(key.absolute()), FEDERATION,
                                   "--format", "json"], env=env, capture_output=True, text=True, timeout=120)
        except subprocess.TimeoutExpired:
            raise ServerError(f"registering the node key {key} took over 120 s; is the SuperLink stuck?") from None
        try:
            reply = json.loads(done.stdout)
        except json.JSONDecodeError:
            reply = {"success": False, "error-message": (done.stdout + done.stderr).strip()}
        message = str(reply.get("error-message", ""))
        if not reply.get("success") and "already in use" not in message:
            raise ServerError(f"could not register the node key {key} with the SuperLink: "
                              f"{' '.join(message.split()) or f'flwr exited with {done.returncode}'}")


def _toml(value) -> str:
    return json.dumps(value) if not isinstance(value, (int, float)) or isinstance(value, bool) else repr(value)


def serve(fleet: Path, *, out_dir: Path, listen: str = DEFAULT_LISTEN, devices_file: Path | None = None,
          plan_cache: str = DEFAULTS["plan-cache"], round_timeout: float = float(DEFAULTS["round-timeout"]),
          start_timeout: float = 60.0, certs: Path | None = None, insecure: bool = False, verbose: bool = False,
          console: ConsoleDashboard | None = None, resume: bool = False) -> Path:
    """Run the fleet's job on a SuperLink at ``listen``, with TLS and node authentication from the
    directory ``certs``, or plaintext when ``insecure``; returns the round log when the job ended.

    ``console`` gets each line of the round log as it lands (default: a view on standard output).
    With ``resume``, go on with the run in ``out_dir`` from its checkpoint (the fleet must be its own).
    """
    if (certs is None) == (not insecure):
        raise ValueError("give exactly one of certs (TLS and node authentication) or insecure=True")
    host, port = parse_address(listen, what="--listen")
    # The flwr CLI reaches the SuperLink at 127.0.0.1: the certificate must name it.
    checked = None if certs is None else server_certs(certs, host="127.0.0.1")
    spec = load_fleet(fleet, device_files=() if devices_file is None else (devices_file,))
    if checked is not None and len(checked.node_keys) < spec.num_clients:
        raise CertError(f"--certs {certs} holds {len(checked.node_keys)} node public key(s) but the fleet {fleet} has "
                        f"{spec.num_clients} clients, each needing its own (odl-fed certs DIR --nodes "
                        f"{spec.num_clients})")
    held_out_data(spec.job)
    check_fleet(spec, train_examples=train_size(spec.job))  # files, layers, image size, data shares
    out_dir = out_dir.absolute()
    run_config = {"fleet": str(fleet), "devices-file": str(devices_file or ""), "out-dir": str(out_dir),
                  "plan-cache": plan_cache, "round-timeout": round_timeout, "resume": resume}
    with RunLock(out_dir, SERVER_LOCK):
        resumed = check_run_dir(out_dir, spec, resume=resume)  # a refused run changes nothing in out_dir
        return _serve(spec, out_dir, run_config, resumed, checked=checked, certs=certs, host=host, port=port,
                      listen=listen, start_timeout=start_timeout, verbose=verbose, console=console)


def _serve(spec, out_dir: Path, run_config: dict, resumed: Checkpoint | None, *, checked: ServerCerts | None,
           certs: Path | None, host: str, port: int, listen: str, start_timeout: float, verbose: bool,
           console: ConsoleDashboard | None) -> Path:
    log = out_dir / ROUND_LOG
    if resumed is None:
        log.unlink(missing_ok=True)
        # A new run starts on a new SuperLink state: a previous run's nodes may still count as online
        # there (a SuperNode stopped without signing off is online until its heartbeat lapses), so the
        # ServerApp would wait on them and their SuperNodes, back with the same key, could not activate.
        for stale in (SUPERLINK_DB, f"{SUPERLINK_DB}-wal", f"{SUPERLINK_DB}-shm"):
            (out_dir / stale).unlink(missing_ok=True)
    else:  # as the ServerApp will: the console then shows the rounds done, once
        cut_back(log, resumed.run, resumed.records)
    home = _flower_home(out_dir, port, checked)
    ready = home / READY
    ready.unlink(missing_ok=True)
    env = flower_env({"FLWR_HOME": str(home)})
    console = console if console is not None else ConsoleDashboard()
    follower = LogFollower(log)
    with Processes() as processes, contextlib.ExitStack() as files:
        def output(name: str) -> dict:
            if verbose:
                return {}
            return {"stdout": files.enter_context((out_dir / name).open("ab")), "stderr": subprocess.STDOUT}

        files.callback(console.close)
        superlink = processes.start([flower_command("flower-superlink"), *_superlink_security(checked), "--database",
                                     str(out_dir / SUPERLINK_DB), "--host", host, "--port", str(port),
                                     "--disable-runtime-dependency-installation"], env=env,
                                    **output("superlink.log"))
        if not wait_for_port("127.0.0.1" if host in ("0.0.0.0", "::") else host, port, timeout=start_timeout,
                             process=superlink):
            raise ServerError(f"the SuperLink did not start on {listen} within {start_timeout:g} s "
                              f"(status {superlink.poll()}); is the port taken?")
        if checked is not None:
            _register_nodes(checked, env)
            _say(f"TLS on, {len(checked.node_keys)} node key(s) registered from {certs}: only those nodes may join")
        ready.write_text(f"{superlink.pid}\n")  # a compose healthcheck waits for this, not only the port
        _say(f"SuperLink {superlink.pid} on {listen}; waiting for the fleet's {spec.num_clients} clients; "
             f"round log {log}")
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
    if not lines or lines[-1].get(EVENT) != Event.END:
        raise ServerError(f"the run did not finish the job of {spec.path} (round log {log}: "
                          f"{sum(1 for line in lines if line.get(EVENT) == Event.ROUND)} round line(s)); "
                          f"flwr run exited with {submit.returncode}"
                          + ("" if verbose else f"; its output is in {out_dir / 'flwr-run.log'}"))
    return log


def _say(text: str) -> None:
    print(f"odl-fed server: {text}", file=sys.stderr, flush=True)


INSECURE_WARNING = ("WARNING: --insecure: the SuperLink speaks plaintext and lets any SuperNode join; use it on a "
                    "trusted dev network only (TLS and node keys: odl-fed certs DIR, then --certs DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleet", type=Path, help="a fleet file, e.g. configs/fleets/demo.yaml (with --resume: "
                                                   "the run's own, read from its checkpoint)")
    parser.add_argument("--out-dir", type=Path,
                        help=f"the run directory: {ROUND_LOG}, {CHECKPOINT_FILE}, {TRAINED_LAYERS_FILE}, superlink.db "
                             "(default: runs/deployed)")
    parser.add_argument("--resume", type=Path, metavar="RUN_DIR",
                        help=f"go on with the run in RUN_DIR from its last finished round (its {CHECKPOINT_FILE})")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help="the SuperLink's address, HOST:PORT")
    parser.add_argument("--devices", type=Path, help="extra device profiles (YAML) the fleet names")
    security = parser.add_mutually_exclusive_group(required=True)
    security.add_argument("--certs", type=Path, help="TLS and SuperNode authentication with the files of "
                                                     "`odl-fed certs DIR`: ca.crt, server.crt/.key, node *.pub")
    security.add_argument("--insecure", action="store_true",
                          help="plaintext, and any SuperNode may join (a trusted dev network only)")
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
    if args.insecure:
        _say(INSECURE_WARNING)
    try:
        log = serve(listen=args.listen, certs=args.certs, insecure=args.insecure, verbose=args.verbose,
                    **_arguments(args))
    except (AddressError, FleetError, DatasetUnavailableError, FileNotFoundError, CertError, CheckpointError,
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
