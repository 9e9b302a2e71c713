"""Checkpoint and resume: a server killed mid-run goes on from its last finished round, and ends
with the model an uninterrupted run ends with; a bad checkpoint, another fleet's run directory or
a second server is one clear error that changes nothing."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
import yaml

import odl_fed.federation.checkpoint as checkpoint_module
from odl_fed.cli import main
from odl_fed.config.fleet import load_fleet
from odl_fed.dashboard.run_log import load_run
from odl_fed.federation.checkpoint import (
    CHECKPOINT,
    SERVER_LOCK,
    Checkpoint,
    CheckpointError,
    RunDirInUse,
    RunLock,
    check_fleet_matches,
    check_run_dir,
    fleet_identity,
    load_checkpoint,
    save_checkpoint,
)
from odl_fed.federation.recorder import RoundRecorder
from odl_fed.federation.strategy import load_strategy_state, strategy_state

ROOT = Path(__file__).resolve().parent.parent
# Small enough for a few seconds a round on 2 cores; FedAdam, so the moments must survive the restart.
JOB = {"model": "resnet18", "layers": 2, "method": "asi", "rounds": 4, "clients-per-round": 2, "local-epochs": 1,
       "batch-size": 16, "lr": 0.001, "image-size": 32, "dataset": "digits", "strategy": "fedadam",
       "server-lr": 0.01, "seed": 0, "examples-per-client": 64, "eval-examples": 100}


def _fleet(path: Path, **job) -> Path:
    path.write_text(yaml.safe_dump({"devices": [{"device": "rpi4", "count": 2}], "job": JOB | job}))
    return path


def _round(r: int) -> dict:
    return {"event": "round", "round": r, "global": {"accuracy": 0.1 * r, "loss": 1.0}, "clients": []}


def _checkpoint(fleet_file: Path, done: int = 2, **changes) -> Checkpoint:
    fleet = load_fleet(fleet_file)
    fields = dict(round=done, rounds=fleet.job.rounds, arrays={"fc.weight": torch.arange(6.0).view(2, 3)},
                  strategy={"m_t": {"fc.weight": torch.ones(2, 3, dtype=torch.float64)}},
                  run={"event": "run", "fleet": str(fleet_file)}, records=[_round(r) for r in range(done + 1)],
                  fleet=fleet_identity(fleet), run_config={"fleet": str(fleet_file), "out-dir": "x"})
    return Checkpoint(**(fields | changes))


def test_a_checkpoint_reads_back_as_written(tmp_path):
    fleet = _fleet(tmp_path / "fleet.yaml")
    save_checkpoint(tmp_path / CHECKPOINT, _checkpoint(fleet))
    back = load_checkpoint(tmp_path / CHECKPOINT)
    assert back.round == 2 and back.rounds == 4 and not back.finished
    assert torch.equal(back.arrays["fc.weight"], torch.arange(6.0).view(2, 3))
    assert back.strategy["m_t"]["fc.weight"].dtype == torch.float64
    assert [r["round"] for r in back.records] == [0, 1, 2] and back.run["event"] == "run"
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, "fleet.yaml"]  # no temporary file left


def test_a_write_that_fails_midway_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    fleet = _fleet(tmp_path / "fleet.yaml")
    save_checkpoint(tmp_path / CHECKPOINT, _checkpoint(fleet, done=1))

    def dies_halfway(obj, file):
        file.write(b"PK\x03\x04 half a zip")
        raise OSError("No space left on device")

    monkeypatch.setattr(checkpoint_module.torch, "save", dies_halfway)
    with pytest.raises(OSError, match="No space left"):
        save_checkpoint(tmp_path / CHECKPOINT, _checkpoint(fleet, done=2))
    assert load_checkpoint(tmp_path / CHECKPOINT).round == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == [CHECKPOINT, "fleet.yaml"]


def test_a_truncated_or_missing_checkpoint_is_one_error_naming_the_file(tmp_path):
    path = tmp_path / CHECKPOINT
    with pytest.raises(CheckpointError, match=f"checkpoint {path} does not exist: {tmp_path} holds no run"):
        load_checkpoint(path)
    save_checkpoint(path, _checkpoint(_fleet(tmp_path / "fleet.yaml")))
    path.write_bytes(path.read_bytes()[:300])
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is damaged and cannot be read"):
        load_checkpoint(path)
    path.write_bytes(b"")
    with pytest.raises(CheckpointError, match=f"checkpoint {path} is damaged"):
        load_checkpoint(path)


def test_a_run_of_another_fleet_is_refused_naming_what_differs(tmp_path):
    mine = _fleet(tmp_path / "mine.yaml")
    other = _fleet(tmp_path / "other.yaml", lr=0.01, seed=1)
    saved = _checkpoint(mine)
    check_fleet_matches(saved, fleet_identity(load_fleet(mine)), path="c.pt", fleet=mine)  # its own: no error
    with pytest.raises(CheckpointError, match=r"checkpoint c.pt belongs to another fleet than .*other.yaml "
                                              r"\(they differ in job.lr, job.seed\)"):
        check_fleet_matches(saved, fleet_identity(load_fleet(other)), path="c.pt", fleet=other)


def test_a_checkpoint_from_before_a_job_field_existed_resumes_with_its_default(tmp_path):
    mine = _fleet(tmp_path / "mine.yaml")
    saved = _checkpoint(mine)
    del saved.fleet["job"]["rank_weighting"]  # written before fleets had rank-weighting
    check_fleet_matches(saved, fleet_identity(load_fleet(mine)), path="c.pt", fleet=mine)  # the default: no error
    relative = _fleet(tmp_path / "relative.yaml", **{"rank-weighting": "relative"})
    with pytest.raises(CheckpointError, match=r"\(they differ in job.rank_weighting\)"):
        check_fleet_matches(saved, fleet_identity(load_fleet(relative)), path="c.pt", fleet=relative)


def test_a_new_run_never_overwrites_an_unfinished_one(tmp_path):
    fleet_file = _fleet(tmp_path / "fleet.yaml")
    fleet = load_fleet(fleet_file)
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    assert check_run_dir(run_dir, fleet, resume=False) is None  # nothing there yet
    save_checkpoint(run_dir / CHECKPOINT, _checkpoint(fleet_file))
    with pytest.raises(CheckpointError, match=rf"{run_dir} holds an unfinished run \(checkpoint .*: round 2 of 4\): "
                                              rf"resume it with --resume {run_dir}"):
        check_run_dir(run_dir, fleet, resume=False)
    assert check_run_dir(run_dir, fleet, resume=True).round == 2
    save_checkpoint(run_dir / CHECKPOINT, _checkpoint(fleet_file, done=4, finished=True))
    assert check_run_dir(run_dir, fleet, resume=False) is None  # a finished run may be replaced
    with pytest.raises(CheckpointError, match="the run finished all its 4 rounds; there is nothing to resume"):
        check_run_dir(run_dir, fleet, resume=True)


@pytest.mark.process  # a second python holds the lock
def test_a_second_server_is_refused_and_a_killed_one_leaves_no_lock(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; "
                               "from odl_fed.federation.checkpoint import RunLock; "
                               f"RunLock({str(tmp_path)!r}).acquire(); print('held', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True, env=os.environ | {"PYTHONPATH": str(ROOT)})
    try:
        assert holder.stdout.readline().strip() == "held"
        with pytest.raises(RunDirInUse, match=rf"run directory {tmp_path} is in use by another server "
                                              rf"\(PID {holder.pid}, lock {tmp_path / SERVER_LOCK}\)"):
            RunLock(tmp_path).acquire()
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    with RunLock(tmp_path):  # the kernel dropped the dead server's lock
        pass


def test_the_round_log_is_cut_back_to_the_checkpoint_and_goes_on(tmp_path):
    log = tmp_path / "rounds.jsonl"
    recorder = RoundRecorder(log)
    recorder.start_run(fleet="f.yaml")
    for r in range(4):  # rounds 0-3 logged; the server was killed before round 3's checkpoint
        recorder.end_round(r, {"accuracy": 0.1 * r})
    with log.open("a") as file:
        file.write('{"event": "round", "round": 4, "glo')  # and while writing round 4's line
    seen = []  # a view (the console, TensorBoard) of the resumed server
    resumed = RoundRecorder(log, listeners=[seen.append], resume=(recorder.run_line, recorder.rounds[:3]))
    resumed.end_round(3, {"accuracy": 0.5})
    resumed.end_run(final_accuracy=0.5)
    lines = [json.loads(line) for line in log.read_text().splitlines()]
    expected = [("run", None), ("round", 0), ("round", 1), ("round", 2), ("resume", 2), ("round", 3), ("end", None)]
    assert [(line["event"], line.get("round", line.get("from-round"))) for line in lines] == expected
    assert lines[5]["global"]["accuracy"] == 0.5
    assert lines[3]["elapsed"] <= lines[5]["elapsed"] < lines[3]["elapsed"] + 60  # the run's time, not the resume's
    assert seen == lines  # the rounds done before the resume too
    run = load_run(tmp_path)  # what the dashboard and the report read
    assert [r["round"] for r in run.rounds] == [0, 1, 2, 3] and run.finished and not run.warnings


def test_a_lost_round_log_is_rebuilt_from_the_checkpoint(tmp_path):
    log = tmp_path / "rounds.jsonl"
    RoundRecorder(log, resume=({"event": "run", "fleet": "f.yaml"}, [_round(0), _round(1)])).end_run()
    assert [json.loads(line)["event"] for line in log.read_text().splitlines()] == [
        "run", "round", "round", "resume", "end"]


def test_fedadam_moments_survive_a_checkpoint():
    from flwr.serverapp.strategy import FedAdam, FedAvg

    adam = FedAdam()
    adam.m_t, adam.v_t = {"w": np.full(3, 0.5)}, {"w": np.full(3, 0.25)}
    state = strategy_state(adam)
    fresh = FedAdam()
    load_strategy_state(fresh, state)
    assert np.array_equal(fresh.m_t["w"], adam.m_t["w"]) and np.array_equal(fresh.v_t["w"], adam.v_t["w"])
    assert strategy_state(FedAvg()) == {} and strategy_state(FedAdam()) == {}  # nothing kept before round 1
    with pytest.raises(ValueError, match="FedAvg keeps no 'm_t'"):
        load_strategy_state(FedAvg(), state)


@pytest.mark.parametrize("damage", ["truncated", "missing", "other-fleet", "locked"])
def test_a_bad_resume_is_one_error_line_and_changes_nothing(tmp_path, capsys, damage):
    fleet = _fleet(tmp_path / "fleet.yaml")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    log = run_dir / "rounds.jsonl"
    log.write_text(json.dumps({"event": "run"}) + "\n" + "".join(json.dumps(_round(r)) + "\n" for r in range(3)))
    if damage != "missing":
        save_checkpoint(run_dir / CHECKPOINT, _checkpoint(fleet))
    args = ["simulate", "--resume", str(run_dir), "--no-progress"]
    if damage == "truncated":
        (run_dir / CHECKPOINT).write_bytes((run_dir / CHECKPOINT).read_bytes()[:-100])
        expected = f"checkpoint {run_dir / CHECKPOINT} is damaged"
    elif damage == "missing":
        expected = f"checkpoint {run_dir / CHECKPOINT} does not exist"
    elif damage == "other-fleet":
        args += ["--fleet", str(_fleet(tmp_path / "other.yaml", **{"examples-per-client": 32}))]
        expected = "belongs to another fleet than"
    else:
        lock = RunLock(run_dir).acquire()
        expected = f"run directory {run_dir} is in use by another server (PID {os.getpid()}"
    before = _contents(run_dir)
    try:
        assert main(args) == 2
    finally:
        if damage == "locked":
            lock.release()
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("odl-fed simulate: error: ") and expected in err, err
    assert _contents(run_dir) == before


def _contents(run_dir: Path) -> dict:
    """A run directory's files but its (empty or PID-only) lock files."""
    return {p.name: p.read_bytes() for p in run_dir.iterdir() if p.suffix != ".lock"}


def test_a_real_runs_checkpoint_is_its_end_and_resuming_it_is_refused(federated_run, capsys):
    """The checkpoint conftest's shared simulated run left: its last round, its trained layers to the
    bit, its round lines; `--resume` of a finished run is one error line and changes nothing there."""
    out = federated_run["out"]
    saved = load_checkpoint(out / CHECKPOINT)
    assert saved.finished and saved.round == saved.rounds == 3
    trained = torch.load(out / "trained_layers.pt")
    assert sorted(saved.arrays) == sorted(trained) and all(torch.equal(saved.arrays[k], trained[k]) for k in trained)
    assert [(r["round"], r["global"]) for r in saved.records] == \
        [(r["round"], r["global"]) for r in federated_run["rounds"]]
    files = {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix != ".lock"}
    assert main(["simulate", "--resume", str(out), "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == (f"odl-fed simulate: error: checkpoint {out / CHECKPOINT}: the run "
                                               "finished all its 3 rounds; there is nothing to resume")
    assert {p.name: p.read_bytes() for p in out.iterdir() if p.is_file() and p.suffix != ".lock"} == files


def test_simulate_needs_a_fleet_or_a_run_to_resume(capsys):
    assert main(["simulate", "--no-progress"]) == 2
    assert capsys.readouterr().err.strip() == ("odl-fed simulate: error: --fleet is needed to start a run "
                                               "(or --resume RUN_DIR to go on with one)")


@pytest.mark.process  # the server entry, python -m odl_fed.server
@pytest.mark.parametrize("damage", ["missing", "other-fleet"])
def test_the_deployed_server_refuses_a_bad_resume_before_starting_anything(tmp_path, damage):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    args = [sys.executable, "-m", "odl_fed.server", "--resume", str(run_dir), "--listen", "127.0.0.1:1", "--insecure"]
    if damage == "other-fleet":
        save_checkpoint(run_dir / CHECKPOINT, _checkpoint(_fleet(tmp_path / "fleet.yaml")))
        args += ["--fleet", str(_fleet(tmp_path / "other.yaml", rounds=5))]
    before = _contents(run_dir)
    done = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=120,
                          env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert done.returncode == 2
    (error,) = [line for line in done.stderr.splitlines() if "error:" in line]
    assert error.startswith("python -m odl_fed.server: error: checkpoint ") and "Traceback" not in done.stderr
    assert ("does not exist" if damage == "missing" else "(they differ in job.rounds)") in error
    assert _contents(run_dir) == before and not (run_dir / "superlink.db").exists()


# --- a real run, killed and resumed --------------------------------------------------------------


def _simulate(args: list[str], *, log: Path) -> subprocess.Popen:
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "odl_fed.cli", "simulate", "--cpus", "1", "--no-progress", *args],
                            cwd=ROOT, env=env, stdout=log.open("w"), stderr=subprocess.STDOUT, start_new_session=True)


def _wait(process: subprocess.Popen, log: Path, timeout: float = 600) -> None:
    assert process.wait(timeout=timeout) == 0, log.read_text()[-3000:]


def _events(run_dir: Path) -> list[tuple]:
    lines = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return [(line["event"], line.get("round", line.get("from-round"))) for line in lines]


@pytest.mark.slow  # minutes of real processes: make test-slow (its own CI stage)
def test_a_killed_server_resumes_and_ends_with_the_uninterrupted_model(tmp_path):
    fleet = str(_fleet(tmp_path / "fleet.yaml"))
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    common = ["--fleet", fleet, "--round-timeout", "300"]
    # Both start at once (the 2 cores take turns); each run plans its own clients.
    reference = _simulate([*common, "--out-dir", str(whole), "--plan-cache", str(tmp_path / "plans-whole")],
                          log=tmp_path / "whole.log")
    victim = _simulate([*common, "--out-dir", str(cut), "--plan-cache", str(tmp_path / "plans-cut")],
                       log=tmp_path / "cut.log")
    started = time.monotonic()
    killed_at = None
    while time.monotonic() - started < 500:
        assert victim.poll() is None, (tmp_path / "cut.log").read_text()[-3000:]
        if (cut / CHECKPOINT).exists() and load_checkpoint(cut / CHECKPOINT).round >= 2:
            family = {p: p.name() for p in psutil.Process(victim.pid).children(recursive=True)}
            os.killpg(victim.pid, signal.SIGKILL)
            killed_at = load_checkpoint(cut / CHECKPOINT).round
            break
        time.sleep(0.2)
    assert killed_at is not None and killed_at < JOB["rounds"], "the run ended before it could be killed"
    victim.wait(timeout=30)
    assert {"raylet", "gcs_server"} <= set(family.values()), family  # Ray's processes were among its children
    gone, alive = psutil.wait_procs(list(family), timeout=30)
    for process in alive:  # what left the process group (none expected): stop it, then fail
        process.kill()
    assert not alive, f"left running after SIGKILL: {[(p.pid, p.name()) for p in alive]}"
    assert ("end", None) not in _events(cut)

    resumed = _simulate(["--resume", str(cut)], log=tmp_path / "resumed.log")
    _wait(resumed, tmp_path / "resumed.log")
    _wait(reference, tmp_path / "whole.log")

    events = _events(cut)
    assert [e for e in events if e[0] == "round"] == [("round", r) for r in range(JOB["rounds"] + 1)]
    assert events[0] == ("run", None) and events[-1] == ("end", None)
    assert events[killed_at + 2] == ("resume", killed_at)
    assert load_checkpoint(cut / CHECKPOINT).finished
    ours = torch.load(cut / "trained_layers.pt")
    theirs = torch.load(whole / "trained_layers.pt")
    # Every client trained every round, with the same layers, batch and ranks in both runs, and kept no
    # ASI bases (a roomy device keeps its layers exact): the same updates, so the same model to the bit.
    for run_dir in (whole, cut):
        assert [r["aggregated"] for r in _rounds(run_dir)] == [0] + [2] * JOB["rounds"]
        assert all(c["warm-bases"] == 0 for r in _rounds(run_dir) for c in r["clients"])
    assert _decisions(whole) == _decisions(cut)
    assert sorted(ours) == sorted(theirs)
    assert all(torch.equal(ours[k], theirs[k]) for k in ours), {k: (ours[k] - theirs[k]).abs().max() for k in ours}
    assert [r["global"]["loss"] for r in _rounds(cut)] == [r["global"]["loss"] for r in _rounds(whole)]


def _decisions(run_dir: Path) -> list:
    """What each client's plan made it train: layers, batch, ranks (its measured bytes vary from run to run)."""
    return [[(c["client"], c["plan"]["layers"], c["plan"]["batch_size"], c["plan"]["ranks"]) for c in r["clients"]]
            for r in _rounds(run_dir)]


def _rounds(run_dir: Path) -> list[dict]:
    lines = [json.loads(line) for line in (run_dir / "rounds.jsonl").read_text().splitlines()]
    return [line for line in lines if line["event"] == "round"]

