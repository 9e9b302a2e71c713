"""The server's dashboard on a real federated run (conftest's ``federated_run``: 3 rounds, a refused
device, a corrupted reply): the console lines, TensorBoard's event files read back with
TensorBoard's own reader, the report's numbers read back from its HTML against the round log, the
page in a real headless Chromium, the console view in a pseudo-terminal, and bad run directories.

Expected values are computed here from ``rounds.jsonl`` itself, not with the dashboard's code.
"""

import html.parser
import json
import os
import pty
import re
import select
import shutil
import subprocess
import sys
import time
from pathlib import Path

import psutil
import pytest
import yaml

from chromium import Chromium, chromium_or_reason
from odl_fed.cli import main as cli
from odl_fed.dashboard.run_log import LogFollower, RunLogError, load_run
from odl_fed.federation.simulation import simulate

ROOT = Path(__file__).resolve().parent.parent
# `ODL_FED_SCREENSHOTS=docs/images make test` refreshes the screenshots in docs/dashboard.md from this run.
SCREENSHOTS = os.environ.get("ODL_FED_SCREENSHOTS")


def _env() -> dict:
    return os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _ok(line):
    return [c for c in line["clients"] if c["status"] == "ok"]


def _ratios(line, device):
    return [c["peak-memory"] / c["memory-budget"] for c in line["clients"]
            if c.get("device") == device and c.get("peak-memory") and c.get("memory-budget")]


class _Tables(html.parser.HTMLParser):
    """Every <table id=...> of a page: rows of (data-value, shown text) per cell."""

    def __init__(self):
        super().__init__()
        self.tables, self._table, self._cell, self.svgs, self.tags = {}, None, None, 0, set()

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.add(tag)
        if tag == "svg":
            self.svgs += 1
        if tag == "table" and "id" in attrs:
            self._table = self.tables.setdefault(attrs["id"], [])
        elif tag == "tr" and self._table is not None:
            self._table.append([])
        elif tag == "td" and self._table is not None:
            self._cell = [attrs.get("data-value"), ""]

    def handle_data(self, data):
        if self._cell is not None:
            self._cell[1] += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._table[-1].append(tuple(self._cell))
            self._cell = None
        elif tag == "table":
            self._table = None


def _tables(path: Path) -> _Tables:
    parser = _Tables()
    parser.feed(path.read_text())
    for rows in parser.tables.values():
        rows[:] = [row for row in rows if row]  # the header row has no <td>
    return parser


def test_the_console_shows_one_plain_line_per_round_off_a_terminal(federated_run):
    text, rounds = federated_run["console"], federated_run["rounds"]
    assert "\x1b[" not in text
    lines = [line for line in text.splitlines() if line.startswith("round ")]
    assert len(lines) == len(rounds) == 4
    for line, r in zip(lines, rounds):
        assert line.startswith(f"round {r['round']}/3 | ")
        assert f"accuracy {r['global']['accuracy']:.3f}" in line
        if r["round"]:
            refused = sum(c["status"] == "refused" for c in r["clients"])
            assert f"trained {len(_ok(r))}/{r['clients-asked']} refused {refused} " \
                   f"failed {len(r['clients']) - len(_ok(r)) - refused}" in line
            for c in r["clients"]:
                if c["status"] != "ok":
                    assert c["client"] in line.split(" | ", 9)[-1], (c, line)  # named with its reason
    assert "rejected x1 (rpi4-1)" in lines[2]  # the corrupted reply of round 2, named with its client
    for line, r in zip(lines[1:], rounds[1:]):  # the clients' evaluation (both evaluate, the default)
        e = r["client-eval"]
        assert f" | clients' top-1 {e['accuracy-before']:.3f} -> {e['accuracy-after']:.3f} ({e['gain']:+.3f}) on " \
               f"{e['examples']} held out [" in line
    assert text.splitlines()[-1].startswith(f"done: accuracy {rounds[-1]['global']['accuracy']:.3f} after 3 rounds")


def test_tensorboard_event_files_hold_every_round(federated_run):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    rounds = federated_run["rounds"]
    events = EventAccumulator(str(federated_run["out"] / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars, tensors = set(events.Tags()["scalars"]), set(events.Tags()["tensors"])

    def values(tag):
        return {e.step: e.value for e in events.Scalars(tag)}

    assert values("global/accuracy") == pytest.approx({r["round"]: r["global"]["accuracy"] for r in rounds})
    assert values("global/loss") == pytest.approx({r["round"]: r["global"]["loss"] for r in rounds})
    assert values("traffic/bytes-up") == pytest.approx({r["round"]: r["bytes-up"] for r in rounds})
    assert values("clients/trained") == {r["round"]: len(_ok(r)) for r in rounds}
    assert values("clients/failed")[2] >= 1  # the rejected reply
    devices = {c["device"] for r in rounds for c in r["clients"] if c["status"] == "ok"}
    for device in devices:
        expected = {r["round"]: max(_ratios(r, device)) for r in rounds if _ratios(r, device)}
        assert values(f"memory/peak-over-budget-max/{device}") == pytest.approx(expected, rel=1e-6)
        assert f"activations/bytes/{device}" in scalars and f"flops/train/{device}" in scalars
        assert f"plan/{device}/text_summary" in tensors
    assert "run/fleet/text_summary" in tensors and "failures/text_summary" in tensors
    assert values("clients-eval/gain") == pytest.approx({r["round"]: r["client-eval"]["gain"] for r in rounds[1:]})
    assert "clients-eval/accuracy-after/rpi4" in scalars


def test_the_reports_numbers_are_the_round_logs(federated_run):
    rounds, report = federated_run["rounds"], federated_run["out"] / "report.html"
    page = _tables(report)  # written by the server at the end of the run
    assert page.svgs == 4 and not {"script", "link", "img", "iframe"} & page.tags  # self-contained, nothing fetched
    assert not re.search(r'(src|href)="(https?:)?//', report.read_text())

    table = page.tables["run0-rounds"]
    assert [int(row[0][0]) for row in table] == [r["round"] for r in rounds]
    previous = 0.0
    for row, r in zip(table, rounds):
        cells = dict(zip(("round", "accuracy", "loss", "trained", "refused", "failed", "lost", "down", "up",
                          "whole", "seconds"), row))
        assert float(cells["accuracy"][0]) == r["global"]["accuracy"]
        assert cells["accuracy"][1] == f"{r['global']['accuracy']:.3f}"
        assert float(cells["loss"][0]) == r["global"]["loss"]
        assert int(cells["trained"][0]) == len(_ok(r)) == r["aggregated"]
        assert int(cells["refused"][0]) + int(cells["failed"][0]) == r["failed"]
        assert int(cells["down"][0]) == r["bytes-down"] and int(cells["up"][0]) == r["bytes-up"]
        assert float(cells["seconds"][0]) == pytest.approx(r["elapsed"] - previous)
        previous = r["elapsed"]
        before, after, gain = row[11:14]
        if r["round"]:
            e = r["client-eval"]
            assert (float(before[0]), float(after[0])) == (e["accuracy-before"], e["accuracy-after"])
            assert gain[1] == f"{e['gain']:+.3f}"
        else:
            assert before == (None, "-")  # the starting model: no client trained

    devices = {(int(row[0][0]), row[1][0]): row for row in page.tables["run0-devices"]}
    for r in rounds[1:]:
        for device in {c["device"] for c in r["clients"]}:
            ratios = _ratios(r, device)
            row = devices[(r["round"], device)]
            assert row[2][1] == f"{sum(c['status'] == 'ok' for c in r['clients'] if c['device'] == device)}/" \
                                f"{sum(c['device'] == device for c in r['clients'])}"
            if ratios:
                assert [float(v) for v, _ in row[3:6]] == pytest.approx([min(ratios), sum(ratios) / len(ratios),
                                                                          max(ratios)])
    failures = {(int(row[0][0]), row[1][1], row[2][1]): row[3][1] for row in page.tables["run0-failures"]}
    expected = {(r["round"], c["status"], c["client"]): c["reason"] for r in rounds for c in r["clients"]
                if c["status"] != "ok"}
    assert failures == expected and any(status == "rejected" for _, status, _ in failures)
    plans = {row[0][1]: row[1][1] for row in page.tables["run0-plans"]}
    for c in _ok(rounds[1]):
        assert f"{len(c['plan']['layers'])} layers, batch {c['plan']['batch_size']}" in plans[c["device"]]


def test_the_report_as_markdown_has_the_same_rounds(federated_run, capsys):
    assert cli(["report", str(federated_run["out"]), "--format", "md"]) == 0
    text = capsys.readouterr().out
    for r in federated_run["rounds"]:
        assert f"| {r['round']} | {r['global']['accuracy']:.3f} | {r['global']['loss']:.4f} | {len(_ok(r))} |" in text


@pytest.mark.process  # a headless Chromium
def test_the_report_in_a_headless_browser_loads_offline_and_draws_every_plot(federated_run, tmp_path):
    executable, reason = chromium_or_reason()
    if executable is None:
        print(f"skipped: {reason}")
        pytest.skip(reason)
    report = federated_run["out"] / "report.html"
    with Chromium(tmp_path / "profile") as browser:
        browser.open(report.as_uri())
        plots = browser.evaluate("""
            [...document.querySelectorAll('figure.plot')].map(figure => {
                const svg = figure.querySelector('svg'), box = svg.getBoundingClientRect();
                const marks = [...svg.querySelectorAll(
                    'g[id^=line2d] path, g[id^=patch] path, g[id^=PathCollection] use, g[id^=FillBetween] path')]
                    .filter(e => { const b = e.getBBox(); return b.width > 0 || b.height > 0; });
                return {name: figure.dataset.plot, width: box.width, height: box.height, marks: marks.length};
            })""")
        assert browser.errors() == []
        assert browser.requests() == [report.as_uri()]  # the page itself, nothing else
        shot = browser.screenshot(tmp_path / "report.png")
        pid = browser.process.pid
    assert [p["name"] for p in plots] == ["accuracy", "memory", "traffic", "clients"]
    for plot in plots:
        assert plot["width"] > 300 and plot["height"] > 150 and plot["marks"] >= 10, plot
    assert shot.stat().st_size > 20_000
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    if SCREENSHOTS:
        _small_png(shot, Path(SCREENSHOTS) / "report.png")


def _read_all(fd: int, process: subprocess.Popen, timeout: float) -> bytes:
    out, deadline = b"", time.monotonic() + timeout
    while time.monotonic() < deadline:
        ready, _, _ = select.select([fd], [], [], 0.2)
        if ready:
            try:
                chunk = os.read(fd, 65536)
            except OSError:  # the other end closed
                break
            if not chunk:
                break
            out += chunk
        elif process.poll() is not None:
            break
    return out


@pytest.mark.process  # `odl-fed watch` in a pseudo-terminal and through a pipe
def test_the_console_view_in_a_terminal_and_through_a_pipe(federated_run, tmp_path):
    out, rounds = federated_run["out"], federated_run["rounds"]
    primary, secondary = pty.openpty()
    watch = subprocess.Popen([sys.executable, "-m", "odl_fed.cli", "watch", str(out)], cwd=ROOT,
                             stdin=secondary, stdout=secondary, stderr=secondary, close_fds=True,
                             env=_env() | {"TERM": "xterm-256color", "COLUMNS": "150", "LINES": "50"})
    os.close(secondary)
    try:
        raw = _read_all(primary, watch, timeout=60)
        assert watch.wait(timeout=30) == 0
    finally:
        os.close(primary)
        if watch.poll() is None:
            watch.kill()
    text = raw.decode("utf-8", errors="replace")
    assert "\x1b[" in text  # a terminal gets the rich view: styles, the live bar redrawn
    assert "┏" in text and "peak/budget" in text and "3/3" in text
    for r in rounds[1:]:
        assert f"round {r['round']}/3: accuracy {r['global']['accuracy']:.3f}" in text
    assert "rejected x1 (rpi4-1)" in text

    piped = subprocess.run([sys.executable, "-m", "odl_fed.cli", "watch", str(out)], cwd=ROOT, env=_env(),
                           capture_output=True, text=True, timeout=60)
    assert piped.returncode == 0 and "\x1b[" not in piped.stdout
    assert [line.split(" |")[0] for line in piped.stdout.splitlines() if line.startswith("round ")] == \
        [f"round {r['round']}/3" for r in rounds]
    assert piped.stdout == federated_run["console"]  # the same lines the simulation printed as it ran

    if SCREENSHOTS:
        _console_screenshot(out, tmp_path, Path(SCREENSHOTS) / "console.png")


def _console_screenshot(run_dir: Path, tmp_path: Path, target: Path) -> None:
    """The README's picture of the console view: the final screen of `odl-fed watch` in a tmux
    terminal (its colours kept), drawn as HTML by rich and photographed by Chromium."""
    from rich.console import Console
    from rich.terminal_theme import MONOKAI
    from rich.text import Text

    executable, reason = chromium_or_reason()
    assert executable and shutil.which("tmux"), reason or "the console screenshot needs tmux"
    session = f"odl-fed-shot-{os.getpid()}"
    command = f"cd {ROOT} && COLUMNS=150 PYTHONPATH={ROOT} {sys.executable} -m odl_fed.cli watch {run_dir}; sleep 60"
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "150", "-y", "52", command], check=True)
    try:
        screen, deadline = "", time.monotonic() + 60
        while "done: accuracy" not in screen and time.monotonic() < deadline:
            time.sleep(1)
            screen = subprocess.run(["tmux", "capture-pane", "-p", "-e", "-t", session], capture_output=True,
                                    text=True).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True)
    console = Console(record=True, width=150, file=open(os.devnull, "w"), force_terminal=True)
    console.print(Text.from_ansi(screen.rstrip()))
    page = tmp_path / "console.html"
    page.write_text(console.export_html(inline_styles=True, theme=MONOKAI))
    with Chromium(tmp_path / "profile", width=1460, height=20 * len(screen.rstrip().splitlines()) + 40) as browser:
        browser.open(page.as_uri())
        _small_png(browser.screenshot(tmp_path / "console.png"), target)


def _small_png(source: Path, target: Path) -> None:
    """A committed screenshot: 128 colours are plenty for plots and a terminal."""
    from PIL import Image

    Image.open(source).convert("RGB").quantize(colors=128).save(target, optimize=True)


def test_a_log_that_grows_is_followed_line_by_line(tmp_path):
    log = tmp_path / "rounds.jsonl"
    follower = LogFollower(log)
    assert follower.poll() == []  # not there yet
    log.write_text('{"event": "run"}\n{"event": "round", "rou')
    assert follower.poll() == [{"event": "run"}]
    with log.open("a") as file:
        file.write('nd": 0}\n')
    assert follower.poll() == [{"event": "round", "round": 0}]
    log.write_text('{"event": "run", "n": 2}\n')  # a new run replaced the log
    assert follower.poll() == [{"event": "run", "n": 2}]


def _report(args, capsys) -> tuple[int, str, str]:
    status = cli(["report", *args])
    captured = capsys.readouterr()
    return status, captured.out, captured.err


@pytest.mark.parametrize("make, expected", [
    (lambda d: None, "does not exist"),
    (lambda d: d.mkdir(), "holds no round log (rounds.jsonl)"),
    (lambda d: (d.mkdir(), (d / "rounds.jsonl").write_text("")), "holds no finished round yet"),
    (lambda d: (d.mkdir(), (d / "rounds.jsonl").write_text('{"event": "run"}\n{"event": "rou')),
     "holds no finished round yet"),
])
def test_a_run_directory_with_nothing_to_report_is_one_clear_error(tmp_path, capsys, make, expected):
    run = tmp_path / "run"
    make(run)
    status, out, err = _report([str(run)], capsys)
    assert status == 2 and out == ""
    assert err.count("error:") == 1 and expected in err and "Traceback" not in err
    assert cli(["watch", "--once", str(tmp_path / "nowhere")]) == 2


def test_a_crashed_runs_cut_log_is_reported_as_far_as_it_goes(federated_run, tmp_path, capsys):
    text = federated_run["log"].read_text()
    cut = tmp_path / "crashed"
    cut.mkdir()
    lines = text.splitlines(keepends=True)
    (cut / "rounds.jsonl").write_text("".join(lines[:3]) + lines[3][: len(lines[3]) // 2])  # died writing round 2
    status, out, err = _report([str(cut)], capsys)
    assert status == 0 and f"wrote {cut / 'report.html'}" in out
    assert "line 4 is cut (the run stopped while writing it)" in err and "has not ended (round 1 of 3)" in err
    page = _tables(cut / "report.html")
    assert [int(row[0][0]) for row in page.tables["run0-rounds"]] == [0, 1]
    assert "line 4 is cut" in (cut / "report.html").read_text()  # the warning is on the page too


def test_a_log_holding_two_fleets_reports_the_last_with_a_warning(federated_run, tmp_path, capsys):
    first = federated_run["log"].read_text()
    other = [json.loads(line) for line in first.splitlines()]
    other[0]["fleet"] = "/elsewhere/other-fleet.yaml"
    other = [line for line in other if line.get("round") in (None, 0, 1)][:3]
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    (mixed / "rounds.jsonl").write_text(first + "".join(json.dumps(line) + "\n" for line in other))
    status, out, err = _report([str(mixed)], capsys)
    assert status == 0 and "holds two runs" in err and "/elsewhere/other-fleet.yaml" in err
    log = load_run(mixed)
    assert log.run["fleet"] == "/elsewhere/other-fleet.yaml" and [r["round"] for r in log.rounds] == [0, 1]
    with pytest.raises(RunLogError, match="does not exist"):
        load_run(tmp_path / "none")


def _compare(first: Path, second: Path, tmp_path: Path, capsys) -> None:
    """`odl-fed report A B`: one row per run with its own method, largest activations and final
    accuracy (read back from the page), the comparison's plots, then each run's own four."""
    status, out, err = _report([str(first), str(second), "--out", str(tmp_path / "both.html")], capsys)
    assert status == 0, err
    page = _tables(tmp_path / "both.html")
    compare = {row[0][1]: row for row in page.tables["compare"]}
    assert set(compare) == {first.name, second.name}
    for run in (first, second):
        log = load_run(run)
        row = compare[run.name]
        largest = max(c["activation-bytes"] for r in log.rounds for c in _ok(r))
        assert int(row[3][0]) == largest and float(row[4][0]) == log.rounds[-1]["global"]["accuracy"]
        assert row[1][1] == log.job["method"]
    assert page.svgs == 2 + 4 * 2  # the comparison's two plots, then each run's four
    text = (tmp_path / "both.html").read_text()
    for run in (first, second):  # the points' labels
        assert f"{run.name} ({load_run(run).job['method']})" in text


def test_runs_of_two_methods_are_compared(federated_run, tmp_path, capsys):
    """The shared ASI run beside a second run made from its log with another method's label and other
    numbers (no second simulation: the real one is the slow test below)."""
    lines = [json.loads(line) for line in federated_run["log"].read_text().splitlines()]
    lines[0]["job"]["method"] = "vanilla"
    for line in lines[1:]:
        if line.get("event") == "round":
            line["global"]["accuracy"] = round(line["global"]["accuracy"] / 2, 4)
            for c in line["clients"]:
                if "activation-bytes" in c:
                    c["activation-bytes"] = 7 * c["activation-bytes"] + 1
    if lines[-1].get("event") == "end":
        lines[-1]["final_accuracy"] = lines[-2]["global"]["accuracy"]
    vanilla = tmp_path / "vanilla"
    vanilla.mkdir()
    (vanilla / "rounds.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines))
    assert load_run(vanilla).job["method"] == "vanilla" != load_run(federated_run["out"]).job["method"]
    _compare(federated_run["out"], vanilla, tmp_path, capsys)
    compare = {row[0][1]: row for row in _tables(tmp_path / "both.html").tables["compare"]}
    assert compare["vanilla"][1][1] == "vanilla" and compare[federated_run["out"].name][1][1] == "asi"
    assert int(compare["vanilla"][3][0]) > 7 * int(compare[federated_run["out"].name][3][0])


# About 25 s here for a second Ray simulation; the comparison itself is checked on two runs' logs above.
@pytest.mark.slow
def test_runs_of_two_methods_are_compared_after_a_second_real_run(federated_run, tmp_path, capsys):
    """A second, real run (vanilla, 1 round) beside the ASI run: `odl-fed report A B`."""
    job = {"model": "resnet18", "layers": 2, "method": "vanilla", "rounds": 1, "clients-per-round": 2,
           "local-epochs": 1, "batch-size": 32, "lr": 0.001, "image-size": 32, "dataset": "mnist-digits",
           "partition": "iid", "seed": 0, "examples-per-client": 64, "eval-examples": 200}
    fleet = tmp_path / "vanilla.yaml"
    fleet.write_text(yaml.safe_dump({"devices": [{"device": "rpi4", "count": 2}], "job": job}))
    vanilla = tmp_path / "vanilla"
    simulate({"fleet": str(fleet), "out-dir": str(vanilla), "plan-cache": str(tmp_path / "plans")}, progress=False)
    _compare(federated_run["out"], vanilla, tmp_path, capsys)
    compare = {row[0][1]: row for row in _tables(tmp_path / "both.html").tables["compare"]}
    assert compare["vanilla"][1][1] == "vanilla" and compare[federated_run["out"].name][1][1] == "asi"


def test_the_clients_score_the_global_model_they_were_sent_on_their_own_held_out_examples(federated_run):
    """In the simulated run (server and clients evaluate), round 1's ``eval-acc-before`` of every client that
    trained is the starting model, scored here on that client's held-out part; the clients' scores rise
    as the global model learns."""
    from odl_fed.config.fleet import load_fleet
    from odl_fed.federation.job_assets import client_data, client_held_out, global_model
    from odl_fed.training.task import evaluate

    fleet = load_fleet(federated_run["fleet"], device_files=(federated_run["devices"],))
    job, rounds = fleet.job, federated_run["rounds"]
    model, _ = global_model(job, num_classes=10)
    for c in _ok(rounds[1]):
        partition = int(c["client"].rsplit("-", 1)[1])
        held = client_held_out(job, partition, fleet.num_clients)
        assert c["eval-examples"] == len(held) == 40 and c["num-examples"] == len(client_data(job, partition, 5))
        scored = evaluate(model, held, batch_size=c["plan"]["batch_size"], image_size=job.image_size,
                          in_eval_mode=True)
        assert c["eval-acc-before"] == pytest.approx(scored["accuracy"], abs=1e-9), c["client"]
        assert c["eval-time"] > 0
    for r in rounds[1:]:
        assert r["client-eval"]["clients"] == len(_ok(r)) and r["client-eval"]["examples"] == 40 * len(_ok(r))
    # the clients' scores of the global model rise as it learns (measured: 0.119 in round 1, 0.369 in round 3),
    # and their fine-tuning helps on average over the run (+0.031, +0.125, -0.006)
    assert rounds[3]["client-eval"]["accuracy-before"] > rounds[1]["client-eval"]["accuracy-before"] + 0.1
    assert sum(r["client-eval"]["gain"] for r in rounds[1:]) > 0.05
