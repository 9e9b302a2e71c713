"""A real board's (or a container's) client: a Flower SuperNode whose node config is its device.

::

    python -m odl_fed.client --device rpi4 --superlink 192.168.1.10:9092 --partition-id 0 --num-partitions 4 \
        --root-certificates certs/ca.crt --auth-key certs/node-0.key
    python -m odl_fed.client --device auto --superlink 127.0.0.1:9092 --insecure  # nearest profile, plaintext
    python -m odl_fed.client --device my-board --devices my-devices.yaml --superlink ...
    python -m odl_fed.client --device rpi4 --superlink 192.168.1.10:9092 --data ~/pictures --partition-id 2 ...

``--data DIR``: the board's own images, one sub-folder per class (``DIR/cat/*.jpg``, ...), for a fleet whose
job says ``dataset: local`` and lists the classes; checked here before the SuperNode starts (a folder
that is missing or holds no readable image is one error), decoded once by the first round
(:mod:`odl_fed.training.local_data`), and never sent anywhere: only the trained layers and the metrics
travel. ``--partition-id`` then only names the board (``rpi4-2``): give each board its own.

``--root-certificates CA --auth-key KEY`` (files of ``odl-fed certs``, :mod:`odl_fed.deploy.certs`): TLS,
checking the SuperLink's certificate against the CA, and the node's key for SuperNode
authentication (its ``.pub`` must be registered on the server: ``python -m odl_fed.server --certs``
registers every ``.pub`` in its directory). Before the SuperNode starts, the files are checked
and a TLS handshake with the SuperLink is tried, so an expired certificate or one from another CA
is one error saying which. A node the SuperLink refuses (its key is not registered) is tried
again until ``--connect-timeout`` (the server registers keys just after its SuperLink starts),
then ends in one error. ``--insecure`` (plaintext, no authentication) only when asked for, with a
warning; one of the two is required.

The node config carries the whole device profile and the client's share of the data
(:mod:`odl_fed.config.node`). Flower runs a ClientApp process per message, which reads them. By
default the SuperNode runs with ``--isolation process`` beside a warm launcher
(:mod:`odl_fed.deploy.launcher`): torch, Flower and odl_fed imported once per board start, the
job's model and the client's share of the data built once per run, and a forked child per message.
``--cold`` leaves it to Flower's own SuperExec (a fresh ``flwr-clientapp`` process per message, which
imports and builds everything again), for comparison. ``--state-dir`` keeps the launcher's record
(``launcher.jsonl``: its imports, builds and children).
In a container with a memory limit, each round's ``train-memory`` is cut to what the limit leaves
once the ClientApp is loaded (:func:`odl_fed.config.machine.fit_to_memory_limit`), so the plan and
the MemoryGuard stop training before the kernel would kill it. ``--hard-limit`` also caps the address space of the
SuperNode and each ClientApp (RLIMIT_AS: ``runtime-memory + train-memory`` plus the floor torch
needs to import at all).

Exit status: 0 when the server says the run is over (one line: its rounds and accuracy) and after
Ctrl-C / SIGTERM, 1 when the SuperLink does not answer, refuses the node or is lost mid-run (no end
notice), 2 for bad input (one ``error:`` line), a certificate that does not verify included.
Whatever it started is stopped by PID on the way out.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import json
import math
import os
import re
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from odl_fed.config.machine import closest_profile, read_machine
from odl_fed.config.node import NodeConfigError, build_node_config, format_node_config
from odl_fed.config.profile import DeviceProfile, ProfileError, get_profile, load_profiles
from odl_fed.deploy.certs import CertError, check_ca, check_node_key
from odl_fed.deploy.processes import (
    TORCH_ADDRESS_FLOOR,
    AddressError,
    Processes,
    flower_command,
    flower_env,
    free_port,
    parse_address,
    port_answers,
    speaks_tls,
    tls_problem,
)
from odl_fed.federation.faults import FAULT_KEY, FAULTS, FaultError, parse_fault
from odl_fed.schema import ROUND_NOTES_FILE_ENV, RUN_END_FILE_ENV, ClientKey, EndNotice, Metric
from odl_fed.training.local_data import LocalDataError, check_folder

__all__ = ["main", "resolve_profile", "hard_limit"]

PROG = "python -m odl_fed.client"


# After the server's end notice, how long the client waits for its SuperLink to stop (its reply to the
# notice goes out meanwhile) before it stops on its own.
END_GRACE = 30.0
RUN_END_FILE = "run-ended.json"
ROUND_NOTES_FILE = "rounds.jsonl"  # in the entry's Flower home: the ClientApp's note of each round


class LinkError(RuntimeError):
    """The SuperLink did not answer, or went away."""


def resolve_profile(device: str, *, devices_file: Path | None) -> tuple[DeviceProfile, str]:
    """The profile to run as, and a line saying where it came from (``auto``: which and why)."""
    if devices_file is not None and not devices_file.is_file():
        raise ProfileError(f"--devices: {devices_file} is not a readable file")
    profiles = load_profiles(*(() if devices_file is None else (devices_file,)))
    if device == "auto":
        profile, reason = closest_profile(read_machine(), profiles)
        return profile, f"--device auto: {reason}"
    profile = get_profile(device, profiles)
    return profile, f"device {profile.name}: {profile.description or 'from ' + str(devices_file)}"


def hard_limit(profile: DeviceProfile) -> int:
    """RLIMIT_AS for the client's processes: what the profile lets them hold, plus torch's floor."""
    return profile.runtime_memory + profile.train_memory + TORCH_ADDRESS_FLOOR


def _listing(names: list[str], shown: int = 8) -> str:
    return "[" + ", ".join(names[:shown]) + (f", ... {len(names) - shown} more" if len(names) > shown else "") + "]"


def _say(text: str) -> None:
    print(f"odl-fed client: {text}", file=sys.stderr, flush=True)


def _wait_for_link(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not port_answers(host, port):
        if time.monotonic() >= deadline:
            raise LinkError(f"the SuperLink at {host}:{port} does not answer (tried for {timeout:g} s); "
                            f"is `python -m odl_fed.server` running there?")
        time.sleep(0.5)


# Flower's Fleet API errors when a SuperNode is refused: 2001 (no key while authentication is on),
# 2004 (activation failed: the key is not registered).
_REFUSED = re.compile(r"\[code: 200[14]\]")
INSECURE_WARNING = ("WARNING: --insecure: plaintext, and the SuperLink cannot tell this node from another; use "
                    "--root-certificates CA --auth-key KEY (odl-fed certs) outside a trusted dev network")


class _Output(threading.Thread):
    """Passes the SuperNode's output on to ``sink`` (Flower's log file, or stderr with ``--verbose``), keeps
    its last lines for an error to quote, and notes whether Flower said the node was refused."""

    def __init__(self, stream, sink):
        super().__init__(daemon=True)
        self.stream, self.sink, self.refused = stream, sink, False
        self.last: collections.deque[str] = collections.deque(maxlen=12)

    def run(self) -> None:
        for line in self.stream:
            self.refused = self.refused or bool(_REFUSED.search(line))
            if line.strip():
                self.last.append(line.rstrip())
            self.sink.write(line)
            self.sink.flush()


def flower_log_path(args) -> Path:
    """Where Flower's own lines go unless ``--verbose``: ``--flower-log``, else one file per device and partition
    under ``runs/clients/`` (a compose fleet's run volume)."""
    return args.flower_log or Path("runs") / "clients" / f"{args.device}-{args.partition_id}.flower.log"


def round_line(note: dict) -> str:
    """A round of this client in one plain line (from the ClientApp's note: odl_fed.schema.ROUND_NOTES_FILE_ENV)."""
    status = note.get(ClientKey.STATUS, "?")
    head = f"round {note.get('round', '?')}: {status}"
    if status != "ok":
        reason = str(note.get(ClientKey.ERROR) or "").splitlines()
        return head + (f" ({reason[0][:160]})" if reason else "")
    mib = 2**20
    parts = [f"{note.get(Metric.NUM_EXAMPLES, 0):.0f} examples",
             f"batch {note.get(Metric.BATCH_SIZE, 0):.0f}, {note.get(Metric.LAYERS_TRAINED, 0):.0f} layer(s)",
             f"{note.get(Metric.TRAIN_TIME, 0.0):.1f} s training of {note.get(Metric.CLIENT_TIME, 0.0):.1f} s",
             f"peak {note.get(Metric.PEAK_MEMORY, 0) / mib:.1f} of {note.get(Metric.MEMORY_BUDGET, 0) / mib:.1f} MiB"]
    if Metric.TRAIN_LOSS in note:
        parts.append(f"loss {note[Metric.TRAIN_LOSS]:.3f}")
    if Metric.EVAL_ACC_BEFORE in note and Metric.EVAL_ACC_AFTER in note:  # its own held-out images
        parts.append(f"held-out top-1 {note[Metric.EVAL_ACC_BEFORE]:.3f} -> {note[Metric.EVAL_ACC_AFTER]:.3f} "
                     f"on {note.get(Metric.EVAL_EXAMPLES, 0):.0f}")
    return f"{head}, " + ", ".join(parts)


class _RoundNotes(threading.Thread):
    """Prints each round the ClientApp noted (one JSON line each, appended to ``path``) as one plain line."""

    def __init__(self, path: Path):
        super().__init__(daemon=True)
        self.path, self.done, self.printed = path, threading.Event(), 0

    def run(self) -> None:
        while not self.done.wait(0.5):
            self.flush()
        self.flush()

    def flush(self) -> None:
        try:
            lines = self.path.read_text(encoding="utf-8").splitlines()
        except FileNotFoundError:
            return
        for line in lines[self.printed:]:
            try:
                _say(round_line(json.loads(line)))
            except ValueError:  # a line being written: read it whole next time
                break
            self.printed += 1

    def stop(self) -> None:
        self.done.set()
        self.join(timeout=5)


def _security(args) -> list[str]:
    if args.insecure:
        return ["--insecure"]
    return ["--root-certificates", str(args.root_certificates.absolute()),
            "--auth-supernode-private-key", str(args.auth_key.absolute())]


def _supernode_command(args, node_config: str, io_port: int) -> list[str]:
    return [flower_command("flower-supernode"), *_security(args), "--superlink", args.superlink,
            "--node-config", node_config, "--port", str(io_port),
            "--isolation", "subprocess" if args.cold else "process", "--max-wait-time", str(args.reconnect_timeout)]


def _launcher_command(io_port: int, state_dir: Path) -> list[str]:
    """The warm SuperExec beside a SuperNode in ``process`` isolation (odl_fed.deploy.launcher)."""
    return [sys.executable, "-m", "odl_fed.deploy.launcher", "--runtime-api-address", f"127.0.0.1:{io_port}",
            "--state-dir", str(state_dir.absolute()), "--parent-pid", str(os.getpid())]


def _check_tls(args, host: str, port: int) -> None:
    """A TLS handshake with the SuperLink: a wrong CA or an expired certificate is one error here,
    not a SuperNode that Flower ends with its own words."""
    problem = tls_problem(host, port, ca=args.root_certificates)
    if problem is not None:
        raise CertError(f"the SuperLink at {host}:{port}: {problem}")


def run(args) -> int:
    host, port = parse_address(args.superlink)
    if not args.insecure:  # the files first: a wrong one is an error before anything else
        check_ca(args.root_certificates)
        check_node_key(args.auth_key)
    profile, origin = resolve_profile(args.device, devices_file=args.devices)
    _say(origin)
    machine = read_machine()
    if machine.cgroup_limit:
        _say(f"memory limit here: {machine.cgroup_limit / 2**20:.0f} MiB (cgroup v{machine.cgroup_version}); each "
             f"round's train-memory is cut to what it leaves")
    if args.data is not None:
        try:
            scan, warnings = check_folder(args.data)
        except LocalDataError as error:
            raise LocalDataError(f"--data {error}") from None
        for warning in warnings:
            _say(f"warning: {warning}")
        _say(f"--data {scan.root}: {scan.count} image(s) in {len(scan.images)} class folder(s) "
             f"{_listing(sorted(scan.images))}; they stay on this board")
    if args.num_partitions is None:  # with --data, the partition id only names the board
        args.num_partitions = args.partition_id + 1 if args.data is not None and args.partition_id >= 0 else 1
    fields = build_node_config(profile, partition_id=args.partition_id, num_partitions=args.num_partitions,
                               data_dir=args.data)
    drill = parse_fault(args.fault)
    if drill is not None:
        fields[FAULT_KEY] = str(drill)
        _say(f"fault drill: {drill} (this client misbehaves on purpose)")
    node_config = format_node_config(fields)
    # torch's threads: the cores this client may use (its profile's, at most what it has here),
    # unless the caller chose; several clients on one machine otherwise fight over every core.
    extra = {"OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", str(min(profile.cores, machine.cores)))}
    if args.data_root is not None:
        extra["ODL_FED_DATA"] = str(args.data_root.absolute())
    limit = hard_limit(profile) if args.hard_limit else None
    deadline = time.monotonic() + args.connect_timeout
    _wait_for_link(host, port, args.connect_timeout)
    if not args.insecure:
        _check_tls(args, host, port)
    elif speaks_tls(host, port):
        raise CertError(f"the SuperLink at {host}:{port} speaks TLS: give --root-certificates CA and --auth-key KEY "
                        f"instead of --insecure")

    with contextlib.ExitStack() as stack:
        if args.verbose:
            sink = sys.stderr
        else:
            log_path = flower_log_path(args)
            try:
                log_path.parent.mkdir(parents=True, exist_ok=True)
                sink = stack.enter_context(log_path.open("a", encoding="utf-8"))
            except OSError as error:
                raise FileNotFoundError(f"--flower-log {log_path}: cannot write there ({error.strerror})") from None
            sink.write(f"--- {time.strftime('%Y-%m-%d %H:%M:%S')} {PROG} (pid {os.getpid()}), device {profile.name}, "
                       f"partition {args.partition_id}\n")
            _say(f"Flower's own log: {log_path} (--verbose prints it here)")
        return _serve(args, host, port, deadline, extra, node_config, limit, sink)


def _serve(args, host: str, port: int, deadline: float, extra: dict, node_config: str, limit: int | None,
           sink) -> int:
    def cap() -> None:  # runs in the SuperNode before exec; its ClientApp processes inherit it
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    # A Flower home of its own (the app Flower installs per run goes there), removed at exit; the
    # ClientApp writes the server's end notice in it (odl_fed.schema.END_QUERY).
    io_port = args.port or free_port()  # the same for every SuperNode started: the launcher polls it
    with tempfile.TemporaryDirectory(prefix="odl-fed-client-") as home, Processes() as processes:
        ended = Path(home) / RUN_END_FILE
        extra[RUN_END_FILE_ENV] = str(ended)
        extra[ROUND_NOTES_FILE_ENV] = str(Path(home) / ROUND_NOTES_FILE)
        notes = _RoundNotes(Path(home) / ROUND_NOTES_FILE)
        notes.start()
        launcher = None
        if not args.cold:
            state_dir = args.state_dir or Path(home)
            launcher = processes.start(_launcher_command(io_port, state_dir),
                                       env=flower_env(extra | {"FLWR_HOME": home}), preexec_fn=cap if limit else None,
                                       stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            _Output(launcher.stdout, sink).start()  # its ClientApps' Flower lines go where the SuperNode's do
            _say(f"warm launcher {launcher.pid}: a forked ClientApp per message (record: "
                 f"{state_dir / 'launcher.jsonl'})")

        def start() -> subprocess.Popen:
            supernode = processes.start(_supernode_command(args, node_config, io_port),
                                        env=flower_env(extra | {"FLWR_HOME": home}), preexec_fn=cap if limit else None,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
            share = (f"as board {args.partition_id}, on its own images" if args.data is not None else
                     f"as partition {args.partition_id} of {args.num_partitions}")
            _say(f"SuperNode {supernode.pid} connecting to {host}:{port} {share}"
                 + (", TLS" if not args.insecure else ", plaintext") +
                 (f", address space capped at {limit / 2**30:.2f} GiB" if limit else ""))
            return supernode

        try:
            _run_node(start, args, host, port, deadline, ended=ended, launcher=launcher, sink=sink)
        except KeyboardInterrupt:
            _say("stopping (interrupted)")
            return 0
        finally:
            notes.stop()
        notice = json.loads(ended.read_text())
        accuracy = notice.get(EndNotice.ACCURACY)  # none when only the clients evaluated
        _say(f"the run is over: {notice[EndNotice.ROUNDS]} rounds, "
             + (f"global accuracy {accuracy:.3f}" if isinstance(accuracy, (int, float)) and math.isfinite(accuracy)
                else "no global accuracy (the server did not evaluate; the clients did)") + "; stopping the SuperNode")
        return 0


def _run_node(start, args, host: str, port: int, deadline: float, *, ended: Path,
              launcher: subprocess.Popen | None = None, sink=sys.stderr) -> None:
    """Run SuperNodes (``start()``) until the run is over (the server's notice in ``ended``): return;
    until one ends otherwise: raise why. One the SuperLink refused (its key not registered, or not yet:
    the server registers keys just after its SuperLink starts) is started again until ``deadline``."""
    while True:
        supernode = start()
        output = _Output(supernode.stdout, sink)
        output.start()
        if _watch(supernode, host, port, args.reconnect_timeout, ended=ended, launcher=launcher):
            return
        output.join(timeout=5)  # its last lines (a SuperExec it left may hold the pipe a while)
        if not output.refused:
            said = "" if sink is sys.stderr or not output.last else \
                "; Flower's last lines:\n  " + "\n  ".join(output.last)
            raise LinkError(f"the SuperNode exited with status {supernode.returncode}{said}")
        if time.monotonic() >= deadline:
            raise LinkError(f"the SuperLink at {host}:{port} refused this node: its key {args.auth_key} is not "
                            f"registered there (the server registers the .pub files in its --certs directory; "
                            f"tried for {args.connect_timeout:g} s)")
        _say("the SuperLink refused this node (its key is not registered, or not yet); trying again")
        time.sleep(2.0)


def _watch(supernode: subprocess.Popen, host: str, port: int, reconnect_timeout: float, *, ended: Path,
           launcher: subprocess.Popen | None = None) -> bool:
    """True once the run is over: the server's end notice is in ``ended`` and the SuperLink has gone
    (or :data:`END_GRACE` has passed, its reply sent). False when the SuperNode exits while the SuperLink
    answers; raise when the link is lost with no notice (a server that died mid-run), or when the warm
    ``launcher`` (the SuperNode's SuperExec) has exited: no message would be handled any more."""
    last_seen = time.monotonic()
    noticed = None
    while supernode.poll() is None:
        time.sleep(1.0)
        if launcher is not None and launcher.poll() is not None and not ended.is_file():
            raise LinkError(f"the warm launcher exited with status {launcher.returncode}; no ClientApp would run "
                            f"(python -m odl_fed.client --cold uses Flower's own SuperExec)")
        if noticed is None and ended.is_file():
            noticed = time.monotonic()
        if noticed is not None and (time.monotonic() - noticed > END_GRACE or not port_answers(host, port)):
            return True
        if port_answers(host, port):
            last_seen = time.monotonic()
        elif time.monotonic() - last_seen > reconnect_timeout:
            raise LinkError(f"lost the SuperLink at {host}:{port} (no answer for {reconnect_timeout:g} s); "
                            f"stopping the SuperNode")
    if ended.is_file():
        return True
    if not port_answers(host, port):
        raise LinkError(f"lost the SuperLink at {host}:{port}: the SuperNode exited ({supernode.returncode}) "
                        f"after it stopped answering")
    return False


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", required=True, help="a profile name (odl_fed/config/devices.yaml or --devices), "
                                                        "or 'auto' for the nearest to this machine")
    parser.add_argument("--superlink", required=True, help="the server's SuperLink, HOST:PORT")
    parser.add_argument("--devices", type=Path, help="extra device profiles (YAML)")
    parser.add_argument("--partition-id", type=int, default=0, help="this client's share of the data")
    parser.add_argument("--num-partitions", type=int,
                        help="how many shares the data is cut into (default 1; with --data: unused)")
    parser.add_argument("--data", type=Path, metavar="DIR",
                        help="this board's own images, one sub-folder per class (a job with dataset: local)")
    parser.add_argument("--data-root", type=Path, help="where the datasets' files are, and the decoded --data "
                                                       "images are kept (ODL_FED_DATA)")
    parser.add_argument("--hard-limit", action="store_true",
                        help="cap the client's address space (RLIMIT_AS) at runtime + train memory + torch's floor")
    parser.add_argument("--port", type=int, help="the SuperNode's local ClientApp port (default: a free one)")
    parser.add_argument("--connect-timeout", type=float, default=30.0,
                        help="seconds to wait for the SuperLink to answer at start")
    parser.add_argument("--reconnect-timeout", type=float, default=30.0,
                        help="seconds without the SuperLink before the client gives up")
    parser.add_argument("--verbose", action="store_true",
                        help="print Flower's own log lines here (default: to --flower-log; each round is one line)")
    parser.add_argument("--flower-log", type=Path, metavar="FILE",
                        help="where Flower's own log lines go without --verbose "
                             "(default: runs/clients/DEVICE-PARTITION.flower.log)")
    parser.add_argument("--cold", action="store_true",
                        help="Flower's own SuperExec: a fresh flwr-clientapp process per message (imports and builds "
                             "again each time; default: the warm launcher, odl_fed/deploy/launcher.py)")
    parser.add_argument("--state-dir", type=Path,
                        help="where the warm launcher keeps its record, launcher.jsonl (default: a temporary "
                             "directory removed at exit)")
    parser.add_argument("--fault", metavar="KIND[:ARG][@ROUNDS]",
                        help=f"a fault drill: this client misbehaves on purpose ({', '.join(FAULTS)}; "
                             f"see odl_fed/federation/faults.py), e.g. nan@2 or slow:60")
    parser.add_argument("--root-certificates", type=Path, metavar="CA",
                        help="TLS: the CA certificate that signed the SuperLink's (ca.crt of odl-fed certs)")
    parser.add_argument("--auth-key", type=Path, metavar="KEY",
                        help="this node's private key for SuperNode authentication (node-NAME.key of odl-fed certs)")
    parser.add_argument("--insecure", action="store_true",
                        help="plaintext, no node authentication (a trusted dev network only)")
    return parser


def _check_security_flags(parser: argparse.ArgumentParser, args) -> None:
    tls = args.root_certificates is not None or args.auth_key is not None
    if args.insecure and tls:
        parser.error("--insecure cannot go with --root-certificates / --auth-key")
    if not args.insecure and (args.root_certificates is None or args.auth_key is None):
        parser.error("give --root-certificates CA and --auth-key KEY (TLS and node authentication; "
                     "odl-fed certs makes them), or --insecure")


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    _check_security_flags(parser, args)
    if args.insecure:
        _say(INSECURE_WARNING)
    try:
        return run(args)
    except (AddressError, ProfileError, NodeConfigError, FaultError, FileNotFoundError, CertError,
            LocalDataError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except LinkError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
