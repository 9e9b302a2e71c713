"""A run's report: one self-contained HTML page (plots inlined as SVG, no script, no network) or
Markdown, from the round log alone.

::

    odl-fed report runs/demo                 # -> runs/demo/report.html
    odl-fed report runs/asi runs/vanilla     # compares runs -> report.html here (or --out)
    odl-fed report runs/                     # every run directory under runs/
    odl-fed report runs/demo --format md     # for a terminal or an issue comment

A run writes its own report when it ends. A log that is cut, unfinished or holds two fleets is
reported as far as it goes, with the warning at the top of the page.
"""

from __future__ import annotations

import html
import json
import math
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

from odl_fed.dashboard.round_summary import RoundSummary, format_bytes, summarise_rounds
from odl_fed.dashboard.run_log import RunLog, find_runs, load_run
from odl_fed.schema import REPORT_FILE, EndKey, JobKey, Outcome, RoundKey, RunKey

__all__ = ["RunReport", "html_report", "markdown_report", "render", "save", "default_path", "write_report",
           "load_reports", "REPORT_NAME", "FORMATS"]

REPORT_NAME = REPORT_FILE
FORMATS = ("html", "md")

STYLE = """
body{font-family:system-ui,sans-serif;max-width:72rem;margin:1.5rem auto;padding:0 1rem;color:#222}
h1{font-size:1.5rem}h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}h3{font-size:1.05rem}
table{border-collapse:collapse;margin:.5rem 0;font-size:.9rem}
th,td{border:1px solid #ddd;padding:.25rem .5rem;text-align:right}th{background:#f5f5f5}
td.text,th.text{text-align:left}
.warning{background:#fff3e0;border-left:4px solid #ef6c00;padding:.5rem 1rem;margin:.5rem 0}
figure{margin:1rem 0}figure svg{max-width:100%;height:auto}figcaption{font-size:.9rem;color:#555}
pre{background:#f7f7f7;padding:.75rem;overflow:auto;font-size:.85rem}
.plots{display:grid;grid-template-columns:repeat(auto-fit,minmax(30rem,1fr));gap:1rem}
"""


class RunReport:
    """A run's log with its rounds summarised."""

    def __init__(self, log: RunLog):
        self.log = log
        self.summaries: list[RoundSummary] = summarise_rounds(log.rounds, log.run)

    @property
    def name(self) -> str:
        return self.log.name

    @property
    def label(self) -> str:
        job = self.log.job
        return f"{self.name} ({job.get(JobKey.METHOD, '?')})"

    @property
    def final(self) -> RoundSummary:
        return self.summaries[-1]

    @property
    def activation_bytes(self) -> int:
        """The largest activation bytes of a training step, over every client of every round."""
        return max((s.activation_bytes for s in self.summaries), default=0)

    def plans(self) -> list[tuple[str, str, list[int]]]:
        """(device, plan, rounds it was used in), in order of device and first round."""
        used: dict[tuple[str, str], list[int]] = {}
        for summary in self.summaries:
            for device in summary.devices:
                if device.plan:
                    used.setdefault((device.device, device.plan), []).append(summary.round)
        return [(device, plan, rounds) for (device, plan), rounds in sorted(used.items())]


def load_reports(paths: Sequence[str | Path]) -> list[RunReport]:
    """The runs at ``paths`` (run directories, round logs, or directories holding run directories)."""
    return [RunReport(load_run(run)) for path in paths for run in find_runs(path)]


def _rounds_text(rounds: list[int]) -> str:
    if len(rounds) > 1 and rounds == list(range(rounds[0], rounds[-1] + 1)):
        return f"{rounds[0]}-{rounds[-1]}"
    return ", ".join(str(r) for r in rounds)


def _given(log: RunLog) -> str:
    """The fleet file as given, when it is still readable; else the job the run recorded."""
    fleet = log.run.get(RunKey.FLEET)
    if fleet and Path(fleet).is_file():
        return f"# {fleet}\n" + Path(fleet).read_text()
    return json.dumps({k: log.run.get(k) for k in (RunKey.FLEET, RunKey.DEVICES, RunKey.JOB)}, indent=2, default=str)


def _evaluation(job: dict) -> str:
    """Who evaluated (a log from before the job had ``evaluation``: the server)."""
    return {"server": "the server, on its held-out split",
            "clients": "the clients, each on the part of its data it holds out",
            "both": "the server, on its held-out split, and the clients, each on the part of its data it holds out"
            }.get(job.get(JobKey.EVALUATION, "server"), str(job.get(JobKey.EVALUATION)))


def _final(report: RunReport) -> str:
    """The server's final accuracy; where it did not evaluate, the clients' last evaluation."""
    final = report.final
    if final.server_evaluated:
        return f"{final.accuracy:.3f}"
    last = next((s for s in reversed(report.summaries) if s.client_gain is not None), None)
    if last is None:
        return "- (no evaluation)"
    return (f"- (the server did not evaluate); the clients' held-out top-1 in round {last.round}: "
            f"{last.client_before:.3f} before fine-tuning, {last.client_after:.3f} after")


# -- tables as rows, shared by the HTML and the Markdown -------------------------------------
ROUND_COLUMNS = ("round", "accuracy", "loss", Outcome.TRAINED, Outcome.REFUSED, Outcome.FAILED, Outcome.LOST,
                 "bytes down", "bytes up", "whole model", "seconds", "clients' top-1 before", "after", "gain")


def _score(value: float | None, digits: int = 3, sign: bool = False) -> tuple[object, str]:
    """(exact value, shown text) of an accuracy, ``-`` where there is none (NaN: the server did not evaluate)."""
    if value is None or math.isnan(value):
        return None, "-"
    return value, f"{value:+.{digits}f}" if sign else f"{value:.{digits}f}"


def _round_row(s: RoundSummary) -> list[tuple[object, str]]:
    """(exact value, shown text) per column of :data:`ROUND_COLUMNS`."""
    return [(s.round, str(s.round)), _score(s.accuracy), _score(s.loss, 4),
            (s.trained, str(s.trained)), (s.refused, str(s.refused)), (s.failed, str(s.failed)),
            (s.lost, str(s.lost)), (s.bytes_down, format_bytes(s.bytes_down)), (s.bytes_up, format_bytes(s.bytes_up)),
            (s.whole_model_bytes, format_bytes(s.whole_model_bytes)), (s.seconds, f"{s.seconds:.1f}"),
            _score(s.client_before), _score(s.client_after), _score(s.client_gain, sign=True)]


DEVICE_COLUMNS = ("round", "device", "trained", "peak/budget min", "mean", "max", "peak", "budget", "activations",
                  "GFLOP", "held-out top-1 before", "after", "gain")


def _device_rows(summaries: Sequence[RoundSummary]) -> list[list[tuple[object, str]]]:
    rows = []
    for s in summaries:
        for d in s.devices:
            ratio = d.peak_ratio or (None, None, None)
            rows.append([(s.round, str(s.round)), (d.device, d.device), (d.trained, f"{d.trained}/{d.asked}"),
                         *[(v, "-" if v is None else f"{v:.3f}") for v in ratio],
                         *[(v, format_bytes(v) if v else "-") for v in (d.peak_bytes, d.budget_bytes)],
                         (d.activation_bytes, format_bytes(d.activation_bytes) if d.trained else "-"),
                         (d.train_flops, f"{d.train_flops / 1e9:.1f}" if d.trained else "-"),
                         _score(d.eval_before), _score(d.eval_after), _score(d.eval_gain, sign=True)])
    return rows


def _failure_rows(summaries: Sequence[RoundSummary]) -> list[tuple[int, str, list[str], str]]:
    return [row for s in summaries
            for row in ([(s.round, RoundKey.SKIPPED, [], s.skipped)] if s.skipped else [])
            + [(s.round, status, clients, reason) for (status, reason), clients in sorted(s.reasons.items())]]


# -- HTML --------------------------------------------------------------------------------------
def _e(value) -> str:
    return html.escape(str(value))


def _table(columns: Sequence[str], rows: Sequence[Sequence[tuple[object, str]]], *, table_id: str,
           text_columns: Sequence[int] = ()) -> str:
    head = "".join(f'<th class="{"text" if i in text_columns else ""}">{_e(c)}</th>' for i, c in enumerate(columns))
    body = []
    for row in rows:
        cells = []
        for i, (value, shown) in enumerate(row):
            exact = "" if value is None else f' data-value="{_e(repr(value) if isinstance(value, float) else value)}"'
            cells.append(f'<td class="{"text" if i in text_columns else ""}"{exact}>{_e(shown)}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="{table_id}"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _figure(name: str, svg: str, caption: str) -> str:
    return f'<figure class="plot" data-plot="{name}">{svg}<figcaption>{_e(caption)}</figcaption></figure>'


def _run_section(report: RunReport, *, prefix: str) -> str:
    from odl_fed.dashboard import report_plots as plots

    log, s = report.log, report.summaries
    job = log.job
    end = log.end or {}
    facts = [("fleet", log.run.get(RunKey.FLEET, "?")), ("clients", log.run.get(RunKey.CLIENTS, "?")),
             ("devices", ", ".join(f"{k} x{v}" for k, v in (log.run.get(RunKey.DEVICES) or {}).items())),
             ("method / model", f"{job.get(JobKey.METHOD, '?')} on {job.get(JobKey.MODEL, '?')}, trained: "
                                f"{', '.join(log.run.get(RunKey.TRAINED_CONVS) or [])} + head"),
             ("rounds", f"{report.final.round} of {job.get(JobKey.ROUNDS, '?')}"
              + ("" if log.finished else " (not ended)")),
             ("evaluation", _evaluation(job)),
             ("final accuracy", _final(report)),
             ("wall time", f"{end[EndKey.ELAPSED]:.1f} s" if EndKey.ELAPSED in end else "-"),
             ("trained layers", format_bytes(log.run.get(RunKey.TRAINED_BYTES, 0)) + " per transfer, of a "
              + format_bytes(log.run.get(RunKey.MODEL_BYTES, 0)) + " model")]
    parts = [f'<section class="run" id="{prefix}">',
             "".join(f'<div class="warning">{_e(w)}</div>' for w in log.warnings),
             '<table class="facts">' + "".join(f'<tr><th class="text">{_e(k)}</th><td class="text">{_e(v)}</td></tr>'
                                                for k, v in facts) + "</table>",
             '<div class="plots">',
             _figure("accuracy", plots.accuracy_plot(s), "Global accuracy (and loss) of the server's held-out split "
                                                         "per round, round 0 the starting model; where clients "
                                                         "evaluate, their top-1 on their own held-out data before "
                                                         "and after their fine-tuning (weighted by examples)."),
             _figure("memory", plots.memory_plot(s[1:] or s), "Peak memory over budget per device type (line: mean, "
                                                              "band: min to max); above 1 is a breach."),
             _figure("traffic", plots.traffic_plot(s[1:] or s),
                     "Bytes sent per round, against sending the whole model down "
                     "to every client asked and back from every one that trained."),
             _figure("clients", plots.clients_plot(s[1:] or s), "Clients asked per round, by what became of them."),
             "</div>",
             "<h3>The plan each device type got</h3>",
             _table(("device", "plan", "rounds"),
                    [[(d, d), (p, p), (None, _rounds_text(r))] for d, p, r in report.plans()],
                    table_id=f"{prefix}-plans", text_columns=(0, 1, 2)),
             "<h3>Rounds</h3>",
             _table(ROUND_COLUMNS, [_round_row(x) for x in s], table_id=f"{prefix}-rounds"),
             "<h3>Memory per device type</h3>",
             _table(DEVICE_COLUMNS, _device_rows(s), table_id=f"{prefix}-devices", text_columns=(1,)),
             "<h3>Clients that did not count</h3>"]
    failures = _failure_rows(s)
    parts.append(_table(("round", "status", "clients", "reason"),
                        [[(r, str(r)), (st, st), (None, ", ".join(c)), (None, why)] for r, st, c, why in failures],
                        table_id=f"{prefix}-failures", text_columns=(1, 2, 3))
                 if failures else "<p>Every client asked trained and was aggregated.</p>")
    parts += ["<h3>The fleet and job as given</h3>", f"<pre>{_e(_given(log))}</pre>", "</section>"]
    return "\n".join(parts)


def _compare_rows(reports: Sequence[RunReport]) -> list[list[tuple[object, str]]]:
    return [[(r.name, r.name), (r.log.job.get(JobKey.METHOD), str(r.log.job.get(JobKey.METHOD))),
             (r.log.job.get(JobKey.MODEL), str(r.log.job.get(JobKey.MODEL))),
             (r.activation_bytes, format_bytes(r.activation_bytes)), _score(r.final.accuracy),
             (r.final.round, str(r.final.round)),
             (sum(x.bytes_up + x.bytes_down for x in r.summaries), format_bytes(sum(x.bytes_up + x.bytes_down
                                                                                   for x in r.summaries)))]
            for r in reports]


def html_report(reports: Sequence[RunReport]) -> str:
    """The page for one run, or a comparison of several followed by each one's section."""
    from odl_fed.dashboard import report_plots as plots

    fleet = Path(str(reports[0].log.run.get(RunKey.FLEET, ""))).name
    title = (f"odl-fed run {reports[0].name}" + (f" (fleet {fleet})" if fleet else "") if len(reports) == 1
             else f"odl-fed: {len(reports)} runs compared")
    body = [f"<h1>{_e(title)}</h1>"]
    if len(reports) > 1:
        body += ["<h2>Comparison</h2>",
                 _table(("run", "method", "model", "activations", "final accuracy", "rounds", "bytes moved"),
                        _compare_rows(reports), table_id="compare", text_columns=(0, 1, 2)),
                 '<div class="plots">',
                 _figure("memory-accuracy", plots.memory_accuracy_plot(
                     [(r.label, r.activation_bytes, r.final.accuracy) for r in reports]),
                     "Final accuracy against the activation memory of a training step (largest client), per run."),
                 _figure("compare-accuracy", plots.compare_accuracy_plot([(r.label, r.summaries) for r in reports]),
                         "Global accuracy per round, per run."),
                 "</div>"]
    for index, report in enumerate(reports):
        if len(reports) > 1:
            body.append(f"<h2>{_e(report.label)}</h2>")
        body.append(_run_section(report, prefix=f"run{index}"))
    return ("<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
            f"<title>{_e(title)}</title><style>{STYLE}</style></head><body>\n" + "\n".join(body) + "\n</body></html>\n")


# -- Markdown ----------------------------------------------------------------------------------
def _md_table(columns: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    def clean(text) -> str:
        return str(text).replace("|", "\\|").replace("\n", " ")

    lines = ["| " + " | ".join(clean(c) for c in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(clean(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def markdown_report(reports: Sequence[RunReport]) -> str:
    out = []
    if len(reports) > 1:
        out += [f"# odl-fed: {len(reports)} runs compared", "",
                _md_table(("run", "method", "model", "activations", "final accuracy", "rounds", "bytes moved"),
                          [[shown for _, shown in row] for row in _compare_rows(reports)]), ""]
    for report in reports:
        log, s = report.log, report.summaries
        job = log.job
        out += [f"{'##' if len(reports) > 1 else '#'} odl-fed run {report.name}", ""]
        out += [f"> **warning:** {w}" for w in log.warnings] + ([""] if log.warnings else [])
        out += [f"{job.get(JobKey.METHOD, '?')} on {job.get(JobKey.MODEL, '?')}, "
                f"fleet `{log.run.get(RunKey.FLEET, '?')}` ({log.run.get(RunKey.CLIENTS, '?')} clients); "
                f"round {report.final.round} of {job.get(JobKey.ROUNDS, '?')}"
                f"{'' if log.finished else ' (not ended)'}; evaluation: {_evaluation(job)}; "
                f"final accuracy {_final(report)}", "",
                "**Rounds**", "", _md_table(ROUND_COLUMNS, [[shown for _, shown in _round_row(x)] for x in s]), "",
                "**Plans**", "", _md_table(("device", "plan", "rounds"),
                                           [[d, p, _rounds_text(r)] for d, p, r in report.plans()]), "",
                "**Memory per device type**", "",
                _md_table(DEVICE_COLUMNS, [[shown for _, shown in row] for row in _device_rows(s)]), ""]
        failures = _failure_rows(s)
        if failures:
            out += ["**Clients that did not count**", "",
                    _md_table(("round", "status", "clients", "reason"),
                              [[r, st, ", ".join(c), why] for r, st, c, why in failures]), ""]
    return "\n".join(out)


def render(reports: Sequence[RunReport], fmt: str = "html") -> str:
    """The report's text: ``html`` (a page) or ``md`` (Markdown)."""
    if fmt not in FORMATS:
        raise ValueError(f"--format must be one of {', '.join(FORMATS)}, not {fmt!r}")
    return html_report(reports) if fmt == "html" else markdown_report(reports)


def default_path(paths: Sequence[str | Path], fmt: str = "html") -> Path:
    """One run directory (or a directory of runs): inside it; several: the current directory."""
    name = f"report.{fmt}"
    return Path(paths[0]) / name if len(paths) == 1 and Path(paths[0]).is_dir() else Path(name)


def save(text: str, path: str | Path) -> Path:
    """Write ``text`` whole (a temporary file renamed over ``path``): a reader never sees half a page."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.NamedTemporaryFile("w", dir=path.parent, prefix=f".{path.name}.", delete=False,
                                     encoding="utf-8") as file:
        file.write(text)
    os.chmod(file.name, 0o644)
    os.replace(file.name, path)
    return path


def write_report(paths: Sequence[str | Path], *, out: str | Path | None = None, fmt: str = "html") -> Path:
    """Write the report of the runs at ``paths`` (to ``out``, or :func:`default_path`); returns its path."""
    return save(render(load_reports(paths), fmt), out or default_path(paths, fmt))
