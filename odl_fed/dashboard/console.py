"""The server's live console view of a run: fed the round log's events as they are written.

In a terminal it is a ``rich`` view: a progress bar over the rounds that stays at the bottom, and
above it, as each round lands, a table per device type (plan, peak memory against budget,
activation bytes, FLOPs, bytes down and up, and where clients evaluate, their top-1 on their
held-out data before and after fine-tuning) with the round's totals and the reasons of every
client that did not count. Anywhere else (a container's log, CI, a pipe) it writes one plain line
per round and no escape codes.

The view only reads events (:mod:`odl_fed.dashboard.run_log`); it never measures anything itself.
"""

from __future__ import annotations

import sys
from typing import TextIO

from odl_fed.dashboard.round_summary import RoundSummary, format_bytes, summarise_round
from odl_fed.schema import EVENT, EndKey, Event, JobKey, RunKey

__all__ = ["ConsoleDashboard", "plain_round_line", "client_eval_text"]

REASON_WIDTH = 160  # a reason is cut to this many characters in the plain line


def _change(summary: RoundSummary) -> str:
    return "" if summary.accuracy_change is None else f" ({summary.accuracy_change:+.3f})"


def _accuracy(summary: RoundSummary) -> str:
    """The server's evaluation of the global model, or that it made none (evaluation: clients)."""
    if not summary.server_evaluated:
        return "no server evaluation"
    return f"accuracy {summary.accuracy:.3f}{_change(summary)} loss {summary.loss:.3f}"


def _scores(before: float | None, after: float | None) -> str:
    return f"{before:.3f} -> {after:.3f} ({after - before:+.3f})"


def client_eval_text(summary: RoundSummary) -> str:
    """The clients' evaluations of a round: ``clients' top-1 0.412 -> 0.634 (+0.222) on 240 held out
    [phone 0.400 -> 0.650 (+0.250), ...]``; empty when none evaluated."""
    if summary.client_before is None or summary.client_after is None:
        return ""
    devices = ", ".join(f"{d.device} {_scores(d.eval_before, d.eval_after)}" for d in summary.devices
                        if d.eval_before is not None and d.eval_after is not None)
    return (f"clients' top-1 {_scores(summary.client_before, summary.client_after)} on "
            f"{summary.client_eval_examples} held out [{devices}]")


def _ratio_range(summary: RoundSummary) -> str:
    ratios = [d.peak_ratio for d in summary.devices if d.peak_ratio]
    if not ratios:
        return "-"
    return f"{min(r[0] for r in ratios):.2f}-{max(r[2] for r in ratios):.2f}"


def _reasons(summary: RoundSummary, width: int | None = REASON_WIDTH) -> list[str]:
    lines = []
    for (status, reason), clients in sorted(summary.reasons.items()):
        text = reason if width is None or len(reason) <= width else reason[: width - 3] + "..."
        lines.append(f"{status} x{len(clients)} ({', '.join(clients)}): {text}")
    return lines


def plain_round_line(summary: RoundSummary, total: int | None) -> str:
    """One round in one line (what a non-terminal gets)."""
    of = f"/{total}" if total is not None else ""
    if summary.round == 0:
        starting = "not evaluated on the server (the clients evaluate)" if not summary.server_evaluated else \
            f"accuracy {summary.accuracy:.3f} loss {summary.loss:.3f}"
        return f"round 0{of} | starting model: {starting} | {summary.seconds:.1f} s"
    if summary.skipped:
        return (f"round {summary.round}{of} | SKIPPED: {summary.skipped} | {_accuracy(summary)} | "
                f"{summary.seconds:.1f} s")
    devices = " ".join(f"{d.device} {d.trained}/{d.asked}" for d in summary.devices)
    evaluated = client_eval_text(summary)
    line = (f"round {summary.round}{of} | {_accuracy(summary)}" + (f" | {evaluated}" if evaluated else "") +
            f" | trained {summary.trained}/{summary.asked} refused {summary.refused} failed {summary.failed}"
            f" lost {summary.lost} | peak/budget {_ratio_range(summary)}"
            f" | activations {format_bytes(summary.activation_bytes)} | {summary.train_flops / 1e9:.1f} GFLOP"
            f" | down {format_bytes(summary.bytes_down)} up {format_bytes(summary.bytes_up)}"
            f" (whole model {format_bytes(summary.whole_model_bytes)}) | {summary.seconds:.1f} s | {devices}")
    reasons = _reasons(summary)
    return line + (" | " + "; ".join(reasons) if reasons else "")


def _run_line(run: dict) -> str:
    job = run.get(RunKey.JOB, {})
    devices = ", ".join(f"{name} x{count}" for name, count in (run.get(RunKey.DEVICES) or {}).items())
    return (f"odl-fed: fleet {run.get(RunKey.FLEET)}: {run.get(RunKey.CLIENTS)} clients ({devices}); "
            f"{job.get(JobKey.METHOD)} on {job.get(JobKey.MODEL)}, {len(run.get(RunKey.TRAINED_CONVS) or [])} convs "
            f"+ head, {job.get(JobKey.ROUNDS)} rounds")


def _end_line(end: dict, last: RoundSummary | None) -> str:
    accuracy = f"accuracy {last.accuracy:.3f} " if last and last.server_evaluated else ""
    if last and not last.server_evaluated and last.client_after is not None:
        accuracy = f"clients' top-1 {_scores(last.client_before, last.client_after)} in the last round, "
    return (f"done: {accuracy}after {end.get(EndKey.ROUNDS, last.round if last else '?')} rounds in "
            f"{end.get(EndKey.ELAPSED, 0):.1f} s")


class ConsoleDashboard:
    """Call it with each event of the round log; :meth:`close` when the run is over.

    Parameters
    ----------
    stream:
        Where to write (standard output by default).
    live:
        The ``rich`` view (True) or plain lines (False); by default, the view when ``stream`` is a terminal.
    """

    def __init__(self, stream: TextIO | None = None, *, live: bool | None = None):
        self.stream = stream if stream is not None else sys.stdout
        self.live = bool(self.stream.isatty()) if live is None else live
        self.run: dict = {}
        self.rounds: list[dict] = []
        self.last: RoundSummary | None = None
        self._view = None

    @property
    def total(self) -> int | None:
        rounds = self.run.get(RunKey.JOB, {}).get(JobKey.ROUNDS)
        return int(rounds) if isinstance(rounds, (int, float)) else None

    def __call__(self, event: dict) -> None:
        kind = event.get(EVENT)
        if kind == Event.RUN:
            self.run, self.rounds = event, []
            self._start()
        elif kind == Event.ROUND:
            summary = summarise_round(event, previous=self.rounds[-1] if self.rounds else None, run=self.run)
            self.rounds.append(event)
            self.last = summary
            self._round(summary)
        elif kind == Event.END:
            self._end(event)

    # -- plain lines -------------------------------------------------------------------------
    def _write(self, text: str) -> None:
        self.stream.write(text + "\n")
        self.stream.flush()

    def _start(self) -> None:
        if not self.live:
            self._write(_run_line(self.run))
            return
        self._view = _LiveView(self.stream, total=self.total or 0)
        self._view.console.print(_run_line(self.run), style="bold", highlight=False)

    def _round(self, summary: RoundSummary) -> None:
        if self._view is None:
            self._write(plain_round_line(summary, self.total))
        else:
            self._view.show(summary, self.total)

    def _end(self, end: dict) -> None:
        if self._view is None:
            self._write(_end_line(end, self.last))
        else:
            self._view.console.print(_end_line(end, self.last), style="bold green", highlight=False)
            self.close()

    def close(self) -> None:
        if self._view is not None:
            self._view.stop()
            self._view = None


class _LiveView:
    """The terminal view: tables printed above a live progress bar (``rich`` Live and Progress)."""

    def __init__(self, stream: TextIO, *, total: int):
        from rich.console import Console
        from rich.live import Live
        from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

        self.console = Console(file=stream, force_terminal=True, highlight=False)
        self.progress = Progress(TextColumn("[bold]rounds"), BarColumn(), MofNCompleteColumn(), TimeElapsedColumn(),
                                 TextColumn("{task.fields[status]}"), console=self.console)
        self.task = self.progress.add_task("rounds", total=total, status="evaluating the starting model")
        self.live = Live(self.progress, console=self.console, refresh_per_second=4, transient=False)
        self.live.start()

    def show(self, summary: RoundSummary, total: int | None) -> None:
        from rich.markup import escape
        from rich.table import Table
        from rich.text import Text

        of = f"/{total}" if total is not None else ""
        title = f"round {summary.round}{of}: {_accuracy(summary)}, {summary.seconds:.1f} s"
        evaluated = client_eval_text(summary)
        if evaluated:
            title += f"; clients' top-1 {_scores(summary.client_before, summary.client_after)}"
        if summary.round == 0:
            self.console.print(f"[bold]{title}[/] (the starting model)")
        elif summary.skipped:
            self.console.print(Text(f"{title}: skipped: {summary.skipped}", style="bold yellow"))
        else:
            table = Table(title=title, title_justify="left", title_style="bold", expand=False)
            for column, justify in (("device", "left"), ("trained", "right"), ("plan", "left"),
                                    ("peak/budget min mean max", "right"), ("budget", "right"),
                                    ("activations", "right"), ("GFLOP", "right"), ("down / up", "right"),
                                    ("held-out top-1 before -> after", "right")):
                table.add_column(column, justify=justify)
            for d in summary.devices:
                ratio = " ".join(f"{v:.2f}" for v in d.peak_ratio) if d.peak_ratio else "-"
                style = "red" if d.peak_ratio and d.peak_ratio[2] > 1 else ("yellow" if d.trained < d.asked else "")
                table.add_row(escape(d.device), f"{d.trained}/{d.asked}", escape(d.plan or "-"), ratio,
                              format_bytes(d.budget_bytes) if d.budget_bytes else "-",
                              format_bytes(d.activation_bytes) if d.trained else "-",
                              f"{d.train_flops / 1e9:.1f}" if d.trained else "-",
                              f"{format_bytes(d.bytes_down)} / {format_bytes(d.bytes_up)}",
                              "-" if d.eval_before is None else _scores(d.eval_before, d.eval_after), style=style)
            table.caption = (f"trained {summary.trained}/{summary.asked}, refused {summary.refused}, failed "
                             f"{summary.failed}, lost {summary.lost}; down {format_bytes(summary.bytes_down)}, up "
                             f"{format_bytes(summary.bytes_up)} (the whole model: "
                             f"{format_bytes(summary.whole_model_bytes)})")
            table.caption_justify = "left"
            self.console.print(table)
            for reason in _reasons(summary, width=None):
                self.console.print(Text("  " + reason, style="yellow"))
        shown = f"accuracy {summary.accuracy:.3f}" if summary.server_evaluated else (
            f"clients' top-1 {summary.client_after:.3f}" if summary.client_after is not None else "trained")
        self.progress.update(self.task, completed=summary.round,
                             status=f"{shown}, waiting for round {summary.round + 1}"
                             if total is None or summary.round < total else shown)

    def stop(self) -> None:
        self.live.stop()
