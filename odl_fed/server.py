"""The fleet's server: a Flower SuperLink, and the ServerApp run against it until the job ends.

::

    python -m odl_fed.server --fleet configs/fleets/demo.yaml --certs certs [--listen 0.0.0.0:9092]
    python -m odl_fed.server --fleet configs/fleets/demo.yaml --insecure     # plaintext, any node: dev only

``--certs DIR`` (``odl-fed certs DIR --nodes N``, :mod:`odl_fed.certs`) runs the SuperLink with TLS
(``server.crt``/``server.key``, signed by ``ca.crt``) and SuperNode authentication, and registers
every node public key (``*.pub``) in ``DIR``: only those nodes may join. The files are checked
before anything starts, so an expired, mismatched or foreign certificate is one error naming it.
``--insecure`` is plaintext and lets any SuperNode join; it is only used when asked for, with a
warning. One of the two is required.

It starts the SuperLink (its state in ``OUT-DIR/superlink.db``), waits for it to answer, submits
the run with ``flwr run`` through a Flower home of the run directory's own (``OUT-DIR/flwr-home``),
and writes the same round log as the simulation (``OUT-DIR/rounds.jsonl``), which this entry follows
to show the console view (:mod:`odl_fed.console`); the SuperLink's and ``flwr run``'s own output
goes to ``OUT-DIR/superlink.log`` and ``OUT-DIR/flwr-run.log`` unless ``--verbose``. The ServerApp waits for
every client of the fleet to connect (``python -m odl_fed.client``), so clients may start before or
after it. On exit, on an error and on Ctrl-C / SIGTERM it stops what it started, by PID.

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

from odl_fed.certs import CertError, ServerCerts, server_certs
from odl_fed.console import ConsoleDashboard
from odl_fed.data import DatasetUnavailableError
from odl_fed.deploy import READY, SERVER_HOME, AddressError, Processes, flower_command, flower_env, parse_address, \
    wait_for_port
from odl_fed.fleet import FleetError, load_fleet
from odl_fed.job import held_out_data, train_size
from odl_fed.preflight import check_fleet
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
          console: ConsoleDashboard | None = None) -> Path:
    """Run the fleet's job on a SuperLink at ``listen``, with TLS and node authentication from the
    directory ``certs``, or plaintext when ``insecure``; returns the round log when the job ended.

    ``console`` gets each line of the round log as it lands (default: a view on standard output).
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
    out_dir.mkdir(parents=True, exist_ok=True)
    log = out_dir / "rounds.jsonl"
    log.unlink(missing_ok=True)
    home = _flower_home(out_dir, port, checked)
    ready = home / READY
    ready.unlink(missing_ok=True)
    env = flower_env({"FLWR_HOME": str(home)})
    run_config = {"fleet": str(fleet), "devices-file": str(devices_file or ""), "out-dir": str(out_dir),
                  "plan-cache": plan_cache, "round-timeout": round_timeout}
    console = console if console is not None else ConsoleDashboard()
    follower = LogFollower(log)
    with Processes() as processes, contextlib.ExitStack() as files:
        def output(name: str) -> dict:
            if verbose:
                return {}
            return {"stdout": files.enter_context((out_dir / name).open("ab")), "stderr": subprocess.STDOUT}

        files.callback(console.close)
        superlink = processes.start([flower_command("flower-superlink"), *_superlink_security(checked), "--database",
                                     str(out_dir / "superlink.db"), "--host", host, "--port", str(port),
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
    if not lines or lines[-1].get("event") != "end":
        raise ServerError(f"the run did not finish the job of {fleet} (round log {log}: "
                          f"{sum(1 for line in lines if line.get('event') == 'round')} round line(s)); "
                          f"flwr run exited with {submit.returncode}"
                          + ("" if verbose else f"; its output is in {out_dir / 'flwr-run.log'}"))
    return log


def _say(text: str) -> None:
    print(f"odl-fed server: {text}", file=sys.stderr, flush=True)


INSECURE_WARNING = ("WARNING: --insecure: the SuperLink speaks plaintext and lets any SuperNode join; use it on a "
                    "trusted dev network only (TLS and node keys: odl-fed certs DIR, then --certs DIR)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--fleet", type=Path, required=True, help="a fleet file, e.g. configs/fleets/demo.yaml")
    parser.add_argument("--out-dir", type=Path, default=Path("runs/deployed"),
                        help="the run directory: rounds.jsonl, trained_layers.pt, superlink.db")
    parser.add_argument("--listen", default=DEFAULT_LISTEN, help="the SuperLink's address, HOST:PORT")
    parser.add_argument("--devices", type=Path, help="extra device profiles (YAML) the fleet names")
    security = parser.add_mutually_exclusive_group(required=True)
    security.add_argument("--certs", type=Path, help="TLS and SuperNode authentication with the files of "
                                                     "`odl-fed certs DIR`: ca.crt, server.crt/.key, node *.pub")
    security.add_argument("--insecure", action="store_true",
                          help="plaintext, and any SuperNode may join (a trusted dev network only)")
    parser.add_argument("--plan-cache", default=DEFAULTS["plan-cache"], help="where clients keep their plans")
    parser.add_argument("--round-timeout", type=float, default=float(DEFAULTS["round-timeout"]),
                        help="seconds to wait for a round's replies")
    parser.add_argument("--verbose", action="store_true",
                        help="show the SuperLink's and flwr run's own output (default: OUT-DIR/*.log)")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.insecure:
        _say(INSECURE_WARNING)
    try:
        log = serve(args.fleet, out_dir=args.out_dir, listen=args.listen, devices_file=args.devices,
                    plan_cache=args.plan_cache, round_timeout=args.round_timeout, certs=args.certs,
                    insecure=args.insecure, verbose=args.verbose)
    except (AddressError, FleetError, DatasetUnavailableError, FileNotFoundError, CertError) as error:
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
