"""A warm SuperExec for one SuperNode: imports once, builds the client's model and data once, forks per message.

Flower 1.42 runs a ClientApp for one message: its SuperExec asks the SuperNode's Runtime API for a
task every second and starts a fresh ``flwr-clientapp --token ...`` for each, which pulls the
message, replies and exits. Every message then pays Python's start, the imports of torch, Flower
and odl_fed, and the rebuild of the model and the client's share of the data.

This launcher is that SuperExec for a SuperNode started with ``--isolation process`` (which starts
none of its own): it asks for tasks the way Flower's does (``AcquireTask``, every
``FLWR_SUPEREXEC_TASK_POLL_INTERVAL`` seconds: Flower's default is 1, this one's 0.25) and, per task,
``os.fork()``s a child that runs Flower's own ClientApp process body
(:func:`flwr.supernode.runtime.run_clientapp.run_clientapp`) with the task's token: the child pulls
its one message, replies and exits, as ``flwr-clientapp`` would, but it starts with torch, Flower and
odl_fed imported and, from the second message on, with
the job's model and the client's decoded share of the data in memory (copy-on-write pages of this
process). Which job that is, the launcher learns from the first train message's ClientApp: it writes
its run config and node config to the file named by :data:`odl_fed.schema.WARM_HINT_FILE_ENV`,
and the launcher builds what they name once that child has exited.

The launcher itself never trains: its torch runs with one thread (OpenMP's thread pool does not
survive a fork once used; a child sets the thread count the SuperNode was given). Each child
measures its own round: the MemoryGuard's baseline is read inside the child when training starts,
so what it reports is what that round added, as in a fresh process.

What it did goes to ``launcher.jsonl`` in ``--state-dir`` (one JSON line per event, keys in
:class:`odl_fed.schema.LauncherKey`): its start (the seconds its imports took, what
``sys.modules`` held), each build (model, data: seconds), and each child (its task, seconds,
how many modules it imported itself and whether torch was among them, how many models and data
shares it built, its exit status), and each child that never started (``hung``: killed and forked
again; see :func:`fork_child`).

Run by ``python -m odl_fed.client`` (:mod:`odl_fed.deploy.supernode`) beside its SuperNode::

    python -m odl_fed.deploy.launcher --runtime-api-address 127.0.0.1:9094 --state-dir DIR [--parent-pid PID]

It stops on SIGTERM (its running children are stopped by PID first) or when ``--parent-pid`` is gone.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import select
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path

_STARTED = time.perf_counter()

__all__ = ["main", "Launcher", "LAUNCHER_LOG", "fork_child"]

LAUNCHER_LOG = "launcher.jsonl"
CHILD_START_S = 30.0  # a forked child says it runs within this, or it is killed and forked again
FORK_ATTEMPTS = 3
POLL_INTERVAL_S = 0.25  # between asks for a task (FLWR_SUPEREXEC_TASK_POLL_INTERVAL overrides it)


def _now() -> float:
    return time.perf_counter()


class Launcher:
    """Polls one SuperNode's Runtime API for ClientApp tasks and runs each in a forked child."""

    def __init__(self, runtime_api_address: str, *, state_dir: Path, insecure: bool = True,
                 root_certificates: str | None = None, parent_pid: int | None = None):
        from flwr.proto.runtime_pb2 import AcquireTaskRequest
        from flwr.supercore.constant import TaskType
        from flwr.supercore.interceptors import RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supercore.superexec.run_superexec import _TASK_POLL_INTERVAL_ENV, _get_task_poll_interval
        from flwr.supercore.tls import validate_and_resolve_root_certificates

        self.address, self.insecure, self.parent_pid = runtime_api_address, insecure, parent_pid
        self.root_certificates_path = root_certificates
        self.certificates = validate_and_resolve_root_certificates(root_certificates, insecure)
        self.state_dir = state_dir
        self.log_path = state_dir / LAUNCHER_LOG
        self.hint_path = state_dir / "warm-hint.json"
        # Flower's SuperExec asks every second; a task then waits 0.5 s on average before its fork. This
        # one asks every 0.25 s (a request to the SuperNode on this machine) unless told otherwise.
        self.poll_interval = _get_task_poll_interval() if os.environ.get(_TASK_POLL_INTERVAL_ENV) else POLL_INTERVAL_S
        self._request = AcquireTaskRequest(supported_task_types=[TaskType.CLIENT_APP], agentapp_fab_hashes=[])
        self._client = RuntimeHttpClient.from_server_address(
            server_address=runtime_api_address, insecure=insecure, root_certificates=self.certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="SuperExec")],
            retry_invoker=make_simple_http_retry_invoker())
        self.children: dict[int, dict] = {}  # pid -> what the launcher knows of it
        self.warmed: str | None = None  # the hint the model and data were built for
        self.threads = int(os.environ.get("OMP_NUM_THREADS") or 0) or None

    # -- what it writes ------------------------------------------------------------------------
    def record(self, event: str, **fields) -> None:
        from odl_fed.schema import LauncherKey
        line = {LauncherKey.EVENT: event, LauncherKey.PID: os.getpid(), LauncherKey.TIME: time.time(), **fields}
        with open(self.log_path, "a", encoding="utf-8") as log:
            log.write(json.dumps(line) + "\n")

    # -- the loop ------------------------------------------------------------------------------
    def serve(self) -> None:
        """Poll for tasks until the parent is gone or a signal stops it."""
        while self.parent_pid is None or _alive(self.parent_pid):
            self.reap()
            try:
                response = self._client.AcquireTask(self._request)
            except Exception as error:  # noqa: BLE001 - a SuperNode (re)starting: ask again, as Flower's does
                print(f"odl-fed launcher: the SuperNode at {self.address} did not answer ({type(error).__name__})",
                      file=sys.stderr, flush=True)
            else:
                if response.HasField("task") and response.token:
                    self.launch(response.token, response.task)
            time.sleep(self.poll_interval)

    def launch(self, token: str, task) -> None:
        from odl_fed.schema import LauncherKey
        forked = _now()
        in_hand = self.state_dir / f"in-hand-{task.task_id}.pkl"

        def hung(pid: int, attempt: int) -> None:
            self.record("hung", child=pid, attempt=attempt, **{LauncherKey.TASK_ID: task.task_id})

        # the child: one message, then os._exit (never back into this loop)
        pid = fork_child(lambda: self._child(token, task, forked, in_hand), on_hung=hung)
        if pid is None:  # no ClientApp for this task: the SuperNode reports it as Flower does for a dead one
            print(f"odl-fed launcher: no forked ClientApp started for task {task.task_id} in {FORK_ATTEMPTS} tries",
                  file=sys.stderr, flush=True)
            return
        self.children[pid] = {"task-id": task.task_id, "forked": forked, "token": token, "in-hand": in_hand}

    def reap(self) -> None:
        """Note each child that ended; once the first train message named its job, build it here (while
        that message's child trains: the next message can only come after its reply)."""
        from odl_fed.schema import LauncherKey
        for pid in list(self.children):
            done, status = os.waitpid(pid, os.WNOHANG)
            if done == 0:
                continue
            child = self.children.pop(pid)
            self.record("exit", child=pid, **{LauncherKey.STATUS: os.waitstatus_to_exitcode(status)})
            if os.WIFSIGNALED(status):
                self.answer_for(child, os.WTERMSIG(status))
            child["in-hand"].unlink(missing_ok=True)
        self.warm()

    def answer_for(self, child: dict, signum: int) -> None:
        """A child killed by a signal (an illegal instruction, the kernel's OOM kill) never replied: answer its
        message with an error that names the client, its device and the signal, through the same SuperNode
        Runtime API and token, so the server records why instead of Flower's "stopped responding"."""
        import pickle

        from flwr.app import Error, Message
        from flwr.common.constant import ErrorCode, SubStatus
        from flwr.supercore.interceptors import RuntimeTokenHttpInterceptor, RuntimeVersionHttpInterceptor
        from flwr.supercore.retry import make_simple_http_retry_invoker
        from flwr.supercore.runtime import RuntimeHttpClient
        from flwr.supernode.runtime.run_clientapp import push_message, push_task_output

        name = signal.Signals(signum).name if signum in signal.Signals._value2member_map_ else f"signal {signum}"
        meaning = signal.strsignal(signum) or name
        try:
            noted = pickle.loads(child["in-hand"].read_bytes())
        except (OSError, pickle.UnpicklingError, EOFError):
            self.record("died", child=child["task-id"], signal=name, answered=False,
                        reason="it died before it noted its message")
            return
        who = (f"{noted['client']} (device {noted['device']})" if "client" in noted else "its node")
        reason = (f"the ClientApp of {who} died by {name} ({meaning})"
                  + (": an instruction this CPU lacks (a build of torch for a newer core?)" if name == "SIGILL" else
                     ": killed, the kernel's OOM killer does so when memory runs out" if name == "SIGKILL" else ""))
        client = RuntimeHttpClient.from_server_address(
            server_address=self.address, insecure=self.insecure, root_certificates=self.certificates,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="flwr-clientapp"),
                          RuntimeTokenHttpInterceptor(child["token"])],
            retry_invoker=make_simple_http_retry_invoker())
        try:
            reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=noted["message"])
            push_message(client, reply, noted["context"])
            push_task_output(client=client, context=noted["context"], sub_status=SubStatus.FAILED, details=reason)
            answered = True
        except Exception as error:  # noqa: BLE001 - the token expired, say: Flower's own error reply stands
            answered, reason = False, f"{reason} (not answered: {type(error).__name__}: {error})"
        finally:
            client.close()
        print(f"odl-fed launcher: {reason}", file=sys.stderr, flush=True)
        self.record("died", child=child["task-id"], signal=name, answered=answered, reason=reason)

    def warm(self) -> None:
        """Build the job's model and the client's share of the data, once the hint names them."""
        try:
            hint = self.hint_path.read_text(encoding="utf-8")
        except FileNotFoundError:
            return
        if hint == self.warmed:
            return
        self.warmed = hint
        from odl_fed.federation.client_app import warm_client

        try:
            timings = warm_client(json.loads(hint))
        except Exception as error:  # noqa: BLE001 - a child builds what this could not, and says why
            self.record("warm-failed", error=f"{type(error).__name__}: {error}")
            return
        import psutil

        from odl_fed.schema import LauncherKey
        self.record("warm", **timings, **{LauncherKey.RSS: psutil.Process().memory_info().rss})

    # -- a child -------------------------------------------------------------------------------
    def _child(self, token: str, task, forked: float, in_hand: Path) -> int:
        code = 1
        try:
            started = _now()
            signal.signal(signal.SIGTERM, signal.SIG_DFL)
            from odl_fed.schema import IN_HAND_FILE_ENV
            os.environ[IN_HAND_FILE_ENV] = str(in_hand)
            import torch
            from flwr.supernode.runtime.run_clientapp import run_clientapp

            from odl_fed.federation import job_assets
            from odl_fed.schema import WARM_HINT_FILE_ENV, LauncherKey
            if self.threads:
                torch.set_num_threads(self.threads)
            os.environ[WARM_HINT_FILE_ENV] = str(self.hint_path)
            from flwr.supercore import log as flower_log
            flower_log(logging.INFO, "Start `flwr-clientapp` process (forked by odl-fed's warm launcher)")
            modules_before = set(sys.modules)
            builds_before = job_assets.build_counts()
            spawned: list[str] = []  # processes this child started (none expected: see _answer_disabled_telemetry)

            def note_spawn(event: str, args: tuple) -> None:
                if event in ("subprocess.Popen", "os.posix_spawn", "os.fork", "os.system"):
                    spawned.append(f"{event} {args[0]}")

            sys.addaudithook(note_spawn)  # for this child's life only: it never returns to the loop
            try:
                run_clientapp(runtime_api_address=self.address, token=token, insecure=self.insecure,
                              certificates=self.certificates, parent_pid=os.getppid())
                code = 0
            except SystemExit as done:  # Flower's flwr_exit ends the process body with sys.exit
                code = done.code if isinstance(done.code, int) else (0 if done.code is None else 1)
            imported = sorted(set(sys.modules) - modules_before)
            app_module = sys.modules.get("odl_fed.federation.client_app")
            handled = list(getattr(app_module, "handled", []))
            builds = {what: count - builds_before.get(what, 0) for what, count in job_assets.build_counts().items()}
            self.record("child", **{LauncherKey.TASK_ID: task.task_id, LauncherKey.MESSAGE_TYPE: ",".join(handled),
                                    LauncherKey.LAUNCH_S: started - forked,
                                    LauncherKey.RUN_S: _now() - started,
                                    LauncherKey.MODULES_IMPORTED: len(imported),
                                    LauncherKey.TORCH_IMPORTED: any(m == "torch" or m.startswith("torch.")
                                                                    for m in imported),
                                    LauncherKey.BUILDS: builds, LauncherKey.SPAWNED: spawned,
                                    LauncherKey.STATUS: code})
        except BaseException as error:  # noqa: BLE001 - whatever happens, the child must not return
            try:
                print(f"odl-fed launcher: child {os.getpid()}: {type(error).__name__}: {error}", file=sys.stderr)
            finally:
                code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
        return code

    def stop(self) -> None:
        """Stop the children still running (by PID), then close the connection."""
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGTERM)
            except ProcessLookupError:
                continue
        deadline = time.monotonic() + 10
        while self.children and time.monotonic() < deadline:
            for pid in list(self.children):
                if os.waitpid(pid, os.WNOHANG)[0] != 0:
                    del self.children[pid]
            time.sleep(0.1)
        for pid in list(self.children):
            try:
                os.kill(pid, signal.SIGKILL)
                os.waitpid(pid, 0)
            except ChildProcessError:
                pass
            except ProcessLookupError:
                pass
        self._client.close()


def _answer_disabled_telemetry() -> None:
    """Flower builds its telemetry event even when telemetry is off (``FLWR_TELEMETRY_ENABLED=0``, as
    every odl-fed process runs): on a daemon thread, from every ``event(...)`` call, and building it runs
    ``uname -p`` and ``file -b`` in subprocesses. In a forked ClientApp that thread's fork and exec race
    the child's ``os._exit``; under qemu-user such a fork deadlocked before its exec and outlived the
    child, holding the launcher's memory. With telemetry off, the event is answered here without being
    built, with what Flower's own returns then ("disabled"); with it on, Flower's stays."""
    from flwr.supercore import telemetry

    if telemetry.FLWR_TELEMETRY_ENABLED == "1":
        return

    def create_event(event_type, event_details) -> str:
        return "disabled"

    telemetry.create_event = create_event  # what every module's `event` calls, through the module


def fork_child(body: Callable[[], int], *, start_timeout: float = CHILD_START_S, attempts: int = FORK_ATTEMPTS,
               on_hung: Callable[[int, int], None] = lambda pid, attempt: None,
               before_ready: Callable[[int], None] | None = None) -> int | None:
    """Fork a child that runs ``body`` and ``os._exit``s with what it returns; return its PID once the child
    has said, through a pipe, that it runs. A child that has not said so within ``start_timeout`` seconds
    (a fork that deadlocked before any of its code ran, as a fork made beside other threads can: under
    qemu-user one such, a ClientApp's telemetry subprocess, sat in a futex with no CPU time) is killed by
    PID, ``on_hung(pid, attempt)`` is told, and another is forked, at most ``attempts`` times in all; None
    when none started. ``before_ready(attempt)`` runs in the child before it says so (tests make a child
    hang with it)."""
    for attempt in range(1, attempts + 1):
        read_end, write_end = os.pipe()
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                os.close(read_end)
                if before_ready is not None:
                    before_ready(attempt)
                os.write(write_end, b"+")
                os.close(write_end)
                code = body()
            finally:
                os._exit(code)
        os.close(write_end)
        try:
            ready, _, _ = select.select([read_end], [], [], start_timeout)  # a byte, or EOF if it died first
        finally:
            os.close(read_end)
        if ready:
            return pid
        os.kill(pid, signal.SIGKILL)
        os.waitpid(pid, 0)
        on_hung(pid, attempt)
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _stop(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m odl_fed.deploy.launcher", description=__doc__.split("\n\n")[0])
    parser.add_argument("--runtime-api-address", required=True, help="the SuperNode's Runtime API, HOST:PORT")
    parser.add_argument("--state-dir", type=Path, required=True, help=f"where {LAUNCHER_LOG} and the job's hint go")
    parser.add_argument("--root-certificates", help="the Runtime API's CA certificate (default: plaintext)")
    parser.add_argument("--parent-pid", type=int, help="stop when this process is gone (the client entry)")
    return parser


def _ready(args) -> Launcher:
    """Import what every child needs, once, and connect to the SuperNode's Runtime API."""
    imports = _now()
    import torch

    # The launcher's own torch work (the builds) runs on one thread: OpenMP's pool, once used, does
    # not survive a fork; each child sets the thread count it was given (OMP_NUM_THREADS).
    torch.set_num_threads(1)
    import flwr.supernode.runtime.run_clientapp  # noqa: F401 - imported once, for every child
    _answer_disabled_telemetry()
    import psutil

    import odl_fed.federation.client_app  # noqa: F401
    from odl_fed.schema import LauncherKey

    args.state_dir.mkdir(parents=True, exist_ok=True)
    launcher = Launcher(args.runtime_api_address, state_dir=args.state_dir, insecure=args.root_certificates is None,
                        root_certificates=args.root_certificates, parent_pid=args.parent_pid)
    launcher.record("start", **{LauncherKey.IMPORTS_S: _now() - imports, LauncherKey.START_S: _now() - _STARTED,
                                LauncherKey.MODULES: len(sys.modules),
                                LauncherKey.RSS: psutil.Process().memory_info().rss})
    return launcher


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    signal.signal(signal.SIGTERM, _stop)  # stopped by PID: quietly, during its imports too
    launcher = None
    try:
        launcher = _ready(args)
        launcher.serve()
    except KeyboardInterrupt:
        pass
    finally:
        if launcher is not None:
            launcher.stop()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
