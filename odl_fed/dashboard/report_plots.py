"""The report's plots: matplotlib figures drawn to SVG text, to inline in one self-contained page.

Each function takes round summaries (:mod:`odl_fed.dashboard.round_summary`) and returns the ``<svg>``
element as a string; no file, no network, no pyplot state (so a server thread can draw them).
"""

from __future__ import annotations

import io
from collections.abc import Sequence

from odl_fed.dashboard.round_summary import RoundSummary
from odl_fed.schema import Outcome

__all__ = ["accuracy_plot", "memory_plot", "traffic_plot", "clients_plot", "compare_accuracy_plot",
           "memory_accuracy_plot"]

WIDTH, HEIGHT = 6.4, 3.2  # inches; 100 dpi in the page
STATUS_COLOURS = {Outcome.TRAINED: "#2e7d32", Outcome.REFUSED: "#f9a825", Outcome.FAILED: "#c62828",
                  Outcome.LOST: "#6d4c41"}


def _figure():
    from matplotlib.figure import Figure

    figure = Figure(figsize=(WIDTH, HEIGHT), layout="constrained")
    return figure, figure.add_subplot()


def _svg(figure) -> str:
    import matplotlib

    buffer = io.StringIO()
    with matplotlib.rc_context({"svg.fonttype": "none", "svg.hashsalt": "odl-fed"}):
        figure.savefig(buffer, format="svg", metadata={"Date": None})
    text = buffer.getvalue()
    return text[text.index("<svg"):]


def _rounds_axis(axes, rounds: Sequence[int]) -> None:
    axes.set_xlabel("round")
    axes.set_xticks(list(rounds) if len(rounds) <= 20 else axes.get_xticks())
    axes.grid(alpha=0.3)


def accuracy_plot(summaries: Sequence[RoundSummary]) -> str:
    """The server's accuracy and loss per round, where it evaluates; where clients evaluate, their top-1
    on their held-out data before and after fine-tuning (weighted means)."""
    figure, axes = _figure()
    rounds = [s.round for s in summaries]
    served = [s for s in summaries if s.server_evaluated]
    if served:
        axes.plot([s.round for s in served], [s.accuracy for s in served], marker="o", color="#1565c0",
                  label="accuracy")
    evaluated = [s for s in summaries if s.client_gain is not None]
    if evaluated:
        axes.plot([s.round for s in evaluated], [s.client_before for s in evaluated], marker="v", color="#ef6c00",
                  label="clients, before")
        axes.plot([s.round for s in evaluated], [s.client_after for s in evaluated], marker="^", color="#2e7d32",
                  label="clients, after")
    axes.set_ylabel("accuracy (held out)")
    loss_axes = axes.twinx()
    if served:
        loss_axes.plot([s.round for s in served], [s.loss for s in served], marker=".", linestyle="--",
                       color="#9e9e9e", label="loss")
        loss_axes.set_ylabel("loss")
    else:
        loss_axes.set_yticks([])
    _rounds_axis(axes, rounds)
    axes.legend(handles=[*axes.get_lines(), *loss_axes.get_lines()], loc="center right")
    return _svg(figure)


def memory_plot(summaries: Sequence[RoundSummary]) -> str:
    """Per device type: the mean of peak memory over budget, with its min-max band; 1 is the budget."""
    figure, axes = _figure()
    devices = sorted({d.device for s in summaries for d in s.devices if d.peak_ratio})
    for device in devices:
        points = [(s.round, d.peak_ratio) for s in summaries for d in s.devices if d.device == device and d.peak_ratio]
        rounds = [r for r, _ in points]
        line, = axes.plot(rounds, [p[1] for _, p in points], marker="o", label=device)
        axes.fill_between(rounds, [p[0] for _, p in points], [p[2] for _, p in points], alpha=0.2,
                          color=line.get_color())
    axes.axhline(1.0, color="#c62828", linestyle=":", label="budget")
    axes.set_ylabel("peak memory / budget")
    axes.set_ylim(0, max([1.1, *[d.peak_ratio[2] * 1.05 for s in summaries for d in s.devices if d.peak_ratio]]))
    _rounds_axis(axes, [s.round for s in summaries])
    axes.legend(loc="lower right", fontsize="small", ncols=min(len(devices) + 1, 4))
    return _svg(figure)


def traffic_plot(summaries: Sequence[RoundSummary]) -> str:
    figure, axes = _figure()
    rounds = [s.round for s in summaries]
    mib = 2**20
    axes.bar([r - 0.2 for r in rounds], [s.bytes_down / mib for s in summaries], width=0.4, label="sent down",
             color="#1565c0")
    axes.bar([r + 0.2 for r in rounds], [s.bytes_up / mib for s in summaries], width=0.4, label="sent up",
             color="#43a047")
    axes.plot(rounds, [s.whole_model_bytes / mib for s in summaries], color="#c62828", marker="_", linestyle="--",
              label="the whole model, both ways")
    axes.set_ylabel("MiB per round")
    _rounds_axis(axes, rounds)
    axes.legend(fontsize="small")
    return _svg(figure)


def clients_plot(summaries: Sequence[RoundSummary]) -> str:
    figure, axes = _figure()
    rounds = [s.round for s in summaries]
    bottom = [0] * len(rounds)
    for status, colour in STATUS_COLOURS.items():
        counts = [s.statuses[status] for s in summaries]
        axes.bar(rounds, counts, bottom=bottom, color=colour, label=status)
        bottom = [b + c for b, c in zip(bottom, counts)]
    axes.set_ylabel("clients asked")
    axes.set_ylim(0, max(bottom, default=1) * 1.3 + 0.5)  # room for the legend above the bars
    _rounds_axis(axes, rounds)
    axes.legend(fontsize="small", ncols=4, loc="upper center")
    return _svg(figure)


def compare_accuracy_plot(runs: Sequence[tuple[str, Sequence[RoundSummary]]]) -> str:
    figure, axes = _figure()
    for name, summaries in runs:
        axes.plot([s.round for s in summaries], [s.accuracy for s in summaries], marker="o", label=name)
    axes.set_ylabel("global accuracy (held out)")
    axes.set_xlabel("round")
    axes.grid(alpha=0.3)
    axes.legend(fontsize="small")
    return _svg(figure)


def memory_accuracy_plot(points: Sequence[tuple[str, int, float]]) -> str:
    """One point per run: (label, activation bytes of a training step, final accuracy)."""
    figure, axes = _figure()
    for label, nbytes, accuracy in points:
        axes.scatter([max(nbytes, 1) / 1024], [accuracy], s=40)
        axes.annotate(label, (max(nbytes, 1) / 1024, accuracy), textcoords="offset points", xytext=(5, 4),
                      fontsize="small")
    axes.set_xscale("log")
    axes.set_xlabel("activation memory of a training step (KiB, largest client)")
    axes.set_ylabel("final global accuracy")
    axes.grid(alpha=0.3, which="both")
    return _svg(figure)
