"""The accuracy benchmark's Pareto plot: top-1 against the trained convs' saved bytes."""

from __future__ import annotations

from pathlib import Path

from bench.accuracy.settings import ASI_INT8, ASI_ONLY, ASI_PAPER, HEAD_ONLY, PLANNER

__all__ = ["plot_pareto"]

MARKERS = {"vanilla": "o", ASI_ONLY: "^", ASI_INT8: "P", ASI_PAPER: "v", "hosvd": "s", "gradfilt": "D",
           PLANNER: "*"}
COLORS = {"vanilla": "black", ASI_ONLY: "tab:red", ASI_INT8: "tab:brown", ASI_PAPER: "tab:orange",
          "hosvd": "tab:blue", "gradfilt": "tab:green", PLANNER: "tab:purple"}
LEGEND = {ASI_ONLY: "asi-only", ASI_INT8: "asi-int8 (8-bit storage)", ASI_PAPER: "asi-only, paper grid",
          PLANNER: "planner (asi)"}


def plot_pareto(results: list[dict], path: Path) -> None:
    """Top-1 against the trained convs' saved bytes (log x), one panel per case and layer count.

    The planner's rows are large stars, labelled with their budget and the Pareto check's outcome.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = max(len(r["groups"]) for r in results)
    fig, axes = plt.subplots(len(results), cols, figsize=(5.2 * cols, 4.0 * len(results)), squeeze=False)
    for ax in axes.flat:
        ax.set_visible(False)
    for i, result in enumerate(results):
        for j, group in enumerate(result["groups"]):
            ax = axes[i][j]
            ax.set_visible(True)
            for method, marker in MARKERS.items():
                rows = [r for r in group["rows"] if r["method"] == method]
                if rows:
                    planner = method == PLANNER
                    ax.scatter([r["convs_bytes"] for r in rows], [100 * r["top1"] for r in rows], marker=marker,
                               color=COLORS[method], label=LEGEND.get(method, method), s=160 if planner else 50,
                               edgecolors="black" if planner else "none", linewidths=0.6, zorder=4 if planner else 3)
                    if any(r.get("top1_std") for r in rows):  # spread over seeds
                        ax.errorbar([r["convs_bytes"] for r in rows], [100 * r["top1"] for r in rows],
                                    yerr=[100 * r.get("top1_std", 0.0) for r in rows], fmt="none",
                                    ecolor=COLORS[method], elinewidth=0.8, capsize=2, zorder=2)
                    for r in rows:
                        if r["budget_fraction"] and not planner:
                            ax.annotate(r["label"].split()[-1], (r["convs_bytes"], 100 * r["top1"]), fontsize=7,
                                        xytext=(4, -9 if method == "hosvd" else 4), textcoords="offset points")
            for check in group.get("pareto", ()):  # the planner's rows: budget and the Pareto check
                ax.annotate(f"{check['label'].split()[-1]} {'on front' if check['met'] else 'OFF front'}",
                            (check["convs_bytes"], 100 * check["top1"]), fontsize=7, color=COLORS[PLANNER],
                            fontweight="bold", xytext=(-6, 8), textcoords="offset points", ha="right")
            references = {r["method"]: 100 * r["top1"] for r in group["rows"] if r["method"] in ("vanilla", HEAD_ONLY)}
            ax.axhline(references["vanilla"] - 1, color="gray", linestyle="--", linewidth=0.8, label="vanilla - 1 pp")
            if HEAD_ONLY in references:
                ax.axhline(references[HEAD_ONLY], color="gray", linestyle=":", linewidth=0.8,
                           label="head only (convs frozen)")
            ax.set_xscale("log")
            ax.set_xlabel("trained convs' saved activation bytes (measured)")
            ax.set_ylabel("top-1 (%)")
            ax.set_title(f"{group['title'] or group['case']}, last {group['layers']} convs", fontsize=9)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
