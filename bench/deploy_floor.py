"""Flower's polling floor on loopback: the rounds of a deployed app that does nothing.

A Flower app of a few lines (a ServerApp that sends every node an empty ``query`` message each round and
waits for the replies; a ClientApp that replies at once) runs on a real SuperLink with real SuperNodes
started as users start them (``python -m odl_fed.client``, the warm launcher as their SuperExec), so a
round of it costs only what Flower's messages and polling cost: the SuperNode's pull of its messages,
the SuperExec's task poll (1 s), the ClientApp's pull and push, and the ServerApp grid's wait for
replies. That is the floor under any deployed round; :mod:`bench.deploy` reports it.

Run alone: ``python -m bench.deploy_floor [--nodes 3] [--rounds 5]``.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from odl_fed.deploy.processes import flower_command, flower_env, free_port, stop_tree, wait_for_port

ROOT = Path(__file__).resolve().parent.parent
FEDERATION = "floor"

PYPROJECT = """[project]
name = "noop-app"
version = "1.0.0"
dependencies = []

[tool.flwr.app]
publisher = "odl-fed-bench"

[tool.flwr.app.components]
serverapp = "noop_app:server"
clientapp = "noop_app:client"

[tool.flwr.app.config]
nodes = 1
rounds = 1
out = ""
"""

APP = '''"""A Flower app that does nothing: each round, an empty message to every node and its empty reply."""

import json
import time

from flwr.app import ConfigRecord, Context, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

client = ClientApp()
server = ServerApp()


@client.query()
def reply(msg: Message, context: Context) -> Message:
    return Message(RecordDict(), reply_to=msg)


@server.main()
def main(grid: Grid, context: Context) -> None:
    nodes, rounds = int(context.run_config["nodes"]), int(context.run_config["rounds"])
    while len(list(grid.get_node_ids())) < nodes:
        time.sleep(0.5)
    seconds = []
    for number in range(rounds):
        started = time.monotonic()
        messages = [Message(RecordDict({"config": ConfigRecord({"round": number})}), dst_node_id=node,
                            message_type="query") for node in grid.get_node_ids()]
        replies = list(grid.send_and_receive(messages, timeout=300))
        seconds.append(time.monotonic() - started)
        assert len(replies) == nodes and not any(r.has_error() for r in replies)
    with open(context.run_config["out"], "w") as out:
        json.dump(seconds, out)
'''


def polling_floor(nodes: int = 3, rounds: int = 5, *, cold: bool = False) -> dict:
    """Each round's seconds of the app that does nothing on ``nodes`` SuperNodes (client entries, the
    warm launcher unless ``cold``); every process started is stopped by PID."""
    with tempfile.TemporaryDirectory(prefix="bench-floor-") as tmp:
        tmp = Path(tmp)
        app, home, out = tmp / "app", tmp / "home", tmp / "rounds.json"
        app.mkdir()
        home.mkdir()
        (app / "pyproject.toml").write_text(PYPROJECT)
        (app / "noop_app.py").write_text(APP)
        port = free_port()
        (home / "config.toml").write_text(f'[superlink]\ndefault = "{FEDERATION}"\n\n[superlink.{FEDERATION}]\n'
                                          f'address = "127.0.0.1:{port}"\ninsecure = true\n')
        env = flower_env({"FLWR_HOME": str(home), "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)})
        logs = tmp / "logs"
        logs.mkdir()
        processes = [subprocess.Popen([flower_command("flower-superlink"), "--insecure", "--database",
                                       str(tmp / "superlink.db"), "--host", "127.0.0.1", "--port", str(port),
                                       "--disable-runtime-dependency-installation"], env=env,
                                      stdout=(logs / "superlink.log").open("w"), stderr=subprocess.STDOUT)]
        try:
            if not wait_for_port("127.0.0.1", port, timeout=120, process=processes[0]):
                raise SystemExit("error: the floor's SuperLink did not start")
            for i in range(nodes):
                processes.append(subprocess.Popen(
                    [sys.executable, "-m", "odl_fed.client", "--insecure", "--device", "rpi4", "--superlink",
                     f"127.0.0.1:{port}", "--partition-id", str(i), "--num-partitions", str(nodes),
                     "--connect-timeout", "300", *(["--cold"] if cold else [])], cwd=ROOT, env=env,
                    stdout=(logs / f"client-{i}.log").open("w"), stderr=subprocess.STDOUT))
            submit = subprocess.run([flower_command("flwr"), "run", str(app), FEDERATION, "--stream", "--run-config",
                                     f'nodes={nodes} rounds={rounds} out="{out}"'], env=env, cwd=tmp,
                                    capture_output=True, text=True, timeout=1800)
            if not out.is_file():
                raise SystemExit(f"error: the app that does nothing did not finish: {submit.stdout[-2000:]}"
                                 f"{submit.stderr[-2000:]}")
            seconds = json.loads(out.read_text())
        finally:
            for process in reversed(processes):
                stop_tree(process.pid)
    steady = seconds[1:] or seconds
    return {"nodes": nodes, "cold": cold, "round-s": seconds, "floor-s": statistics.median(steady)}


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(prog="python -m bench.deploy_floor", description=__doc__.split("\n\n")[0])
    parser.add_argument("--nodes", type=int, default=3)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--cold", action="store_true", help="Flower's own SuperExec instead of the warm launcher")
    args = parser.parse_args(argv)
    started = time.perf_counter()
    result = polling_floor(args.nodes, args.rounds, cold=args.cold)
    result["wall-s"] = time.perf_counter() - started
    print(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    main()
