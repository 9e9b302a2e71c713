"""A real board's (or a container's) client: a Flower SuperNode whose node config is its device.

::

    python -m odl_fed.client --device rpi4 --superlink 192.168.1.10:9092 --partition-id 0 --num-partitions 4
    python -m odl_fed.client --device auto --superlink 127.0.0.1:9092     # the nearest profile
    python -m odl_fed.client --device my-board --devices my-devices.yaml --superlink ...

The node config carries the whole device profile and the client's share of the data
(:mod:`odl_fed.node_config`); Flower starts a fresh ClientApp process per message, which reads them.
In a container with a memory limit, each round's ``train-memory`` is cut to what the limit leaves
once the ClientApp is loaded (:func:`odl_fed.device_detect.fit_to_memory_limit`), so the plan and
the MemoryGuard stop training before the kernel would kill it. ``--hard-limit`` also caps the address space of the
SuperNode and each ClientApp (RLIMIT_AS: ``runtime-memory + train-memory`` plus the floor torch
needs to import at all).

Exit status: 0 after Ctrl-C / SIGTERM, 1 when the SuperLink does not answer or is lost, 2 for bad
input (one ``error:`` line). Whatever it started is stopped by PID on the way out.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

from odl_fed.deploy import TORCH_ADDRESS_FLOOR, AddressError, Processes, flower_command, flower_env, free_port, \
    parse_address, port_answers
from odl_fed.device_detect import closest_profile, read_machine
from odl_fed.faults import FAULT_KEY, FAULTS, FaultError, parse_fault
from odl_fed.node_config import NodeConfigError, build_node_config, format_node_config
from odl_fed.profile import DeviceProfile, ProfileError, get_profile, load_profiles

__all__ = ["main", "resolve_profile", "hard_limit"]

PROG = "python -m odl_fed.client"


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


def _say(text: str) -> None:
    print(f"odl-fed client: {text}", file=sys.stderr, flush=True)


def _wait_for_link(host: str, port: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while not port_answers(host, port):
        if time.monotonic() >= deadline:
            raise LinkError(f"the SuperLink at {host}:{port} does not answer (tried for {timeout:g} s); "
                            f"is `python -m odl_fed.server` running there?")
        time.sleep(0.5)


def _supernode_command(args, node_config: str, io_port: int) -> list[str]:
    return [flower_command("flower-supernode"), "--insecure", "--superlink", args.superlink,
            "--node-config", node_config, "--port", str(io_port), "--isolation", "subprocess",
            "--max-wait-time", str(args.reconnect_timeout)]


def run(args) -> int:
    host, port = parse_address(args.superlink)
    profile, origin = resolve_profile(args.device, devices_file=args.devices)
    _say(origin)
    machine = read_machine()
    if machine.cgroup_limit:
        _say(f"memory limit here: {machine.cgroup_limit / 2**20:.0f} MiB (cgroup v{machine.cgroup_version}); each "
             f"round's train-memory is cut to what it leaves")
    fields = build_node_config(profile, partition_id=args.partition_id, num_partitions=args.num_partitions)
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
    _wait_for_link(host, port, args.connect_timeout)

    def cap() -> None:  # runs in the SuperNode before exec; its ClientApp processes inherit it
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))

    # A Flower home of its own (the app Flower installs per run goes there), removed at exit.
    with tempfile.TemporaryDirectory(prefix="odl-fed-client-") as home, Processes() as processes:
        try:
            supernode = processes.start(_supernode_command(args, node_config, args.port or free_port()),
                                        env=flower_env(extra | {"FLWR_HOME": home}),
                                        preexec_fn=cap if limit else None)
            _say(f"SuperNode {supernode.pid} connected to {host}:{port} as partition {args.partition_id} of "
                 f"{args.num_partitions}" + (f", address space capped at {limit / 2**30:.2f} GiB" if limit else ""))
            last_seen = time.monotonic()
            while supernode.poll() is None:
                time.sleep(1.0)
                if port_answers(host, port):
                    last_seen = time.monotonic()
                elif time.monotonic() - last_seen > args.reconnect_timeout:
                    raise LinkError(f"lost the SuperLink at {host}:{port} (no answer for "
                                    f"{args.reconnect_timeout:g} s); stopping the SuperNode")
            if not port_answers(host, port):
                raise LinkError(f"lost the SuperLink at {host}:{port}: the SuperNode exited "
                                f"({supernode.returncode}) after it stopped answering")
            raise LinkError(f"the SuperNode exited with status {supernode.returncode}")
        except KeyboardInterrupt:
            _say("stopping (interrupted)")
            return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", required=True, help="a profile name (configs/devices.yaml or --devices), "
                                                        "or 'auto' for the nearest to this machine")
    parser.add_argument("--superlink", required=True, help="the server's SuperLink, HOST:PORT")
    parser.add_argument("--devices", type=Path, help="extra device profiles (YAML)")
    parser.add_argument("--partition-id", type=int, default=0, help="this client's share of the data")
    parser.add_argument("--num-partitions", type=int, default=1, help="how many shares the data is cut into")
    parser.add_argument("--data-root", type=Path, help="where the datasets' files are (ODL_FED_DATA)")
    parser.add_argument("--hard-limit", action="store_true",
                        help="cap the client's address space (RLIMIT_AS) at runtime + train memory + torch's floor")
    parser.add_argument("--port", type=int, help="the SuperNode's local ClientApp port (default: a free one)")
    parser.add_argument("--connect-timeout", type=float, default=30.0,
                        help="seconds to wait for the SuperLink to answer at start")
    parser.add_argument("--reconnect-timeout", type=float, default=30.0,
                        help="seconds without the SuperLink before the client gives up")
    parser.add_argument("--fault", metavar="KIND[:ARG][@ROUNDS]",
                        help=f"a fault drill: this client misbehaves on purpose ({', '.join(FAULTS)}; "
                             f"see odl_fed/faults.py), e.g. nan@2 or slow:60")
    return parser


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return run(args)
    except (AddressError, ProfileError, NodeConfigError, FaultError, FileNotFoundError) as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 2
    except LinkError as error:
        print(f"{PROG}: error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 0


if __name__ == "__main__":
    raise SystemExit(main())
