"""The accuracy benchmark's report: tables, the Pareto check, the targets, the JSON; and joining parts (``--merge``)."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from bench.accuracy.plot import plot_pareto
from bench.accuracy.settings import ASI_INT8, ASI_ONLY, ASI_PAPER, HEAD_ONLY, PLANNER

__all__ = ["render_group", "render_epochs", "render_compression", "pareto_check", "render_pareto", "targets",
           "report", "merge_runs"]

PARETO_TOLERANCE_PP = 0.5  # the planner's row may trail a row with no more bytes by this much


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


def _fmt_ratio(ratio: float | None) -> str:
    if not ratio:
        return "-"
    if ratio < 0.1:
        return f"1/{1 / ratio:.0f}"
    return f"{ratio:.2f}x"


def _fmt_top1(row: dict) -> str:
    """Top-1, with its spread over seeds when there are several."""
    return f"{row['top1']:.4f}" if len(row.get("seeds", ())) < 2 else f"{row['top1']:.4f} ± {row['top1_std']:.4f}"


def render_group(group: dict) -> str:
    seeds = group.get("seeds", [])
    several = len(seeds) > 1
    top1_head = f"top-1 (mean ± std, seeds {seeds})" if several else "top-1"
    delta_head = "vs vanilla (mean, SE over seeds)" if several else "vs vanilla (paired SE)"
    lines = [
        f"{group['title'] or group['case']}: last {group['layers']} convs {group['trained']} + head, "
        f"{group['image_size']}px, batch {group['batch']}, train {group['train']} / test {group['test']}, "
        f"{group['epochs']} epochs",
        "",
        f"| method | {top1_head} | {delta_head} | convs' saved bytes | tail's saved bytes | train FLOPs/step (tail) "
        "| full step FLOPs | step time (tail) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in group["rows"]:
        r = row["ratios"]

        def both(key, fmt):
            return fmt(row[key]) if row["method"] == "vanilla" else f"{fmt(row[key])} ({_fmt_ratio(r.get(key))})"

        lines.append(
            f"| {row['label']} | {_fmt_top1(row)} | {row['delta_pp']:+.1f} pp (±{row['delta_se_pp']:.1f}) "
            f"| {both('convs_bytes', _fmt_bytes)} | {both('tail_bytes', _fmt_bytes)} "
            f"| {both('tail_flops', lambda v: f'{v / 1e9:.3f} G')} "
            f"| {both('full_flops', lambda v: f'{v / 1e9:.2f} G')} "
            f"| {both('step_s', lambda v: f'{v * 1e3:.0f} ms')} |"
        )
    return "\n".join(lines)


def render_epochs(group: dict) -> str:
    """Test top-1 after each epoch, per method (mean over seeds): where does each stop rising?"""
    rows = [r for r in group["rows"] if "epoch_top1" in r and "same_run_as" not in r]
    if not rows:
        return ""
    epochs = len(rows[0]["epoch_top1"])
    several = len(group.get("seeds", [])) > 1
    spread = " (mean ± std over seeds)" if several else ""
    lines = [f"Test top-1 after each epoch{spread}, last {group['layers']} convs:",
             "", "| method | lr | " + " | ".join(f"epoch {e + 1}" for e in range(epochs)) + " |",
             "|---|---|" + "---|" * epochs]
    for row in rows:
        cells = [f"{m:.4f}" + (f" ± {s:.4f}" if several else "")
                 for m, s in zip(row["epoch_top1"], row.get("epoch_top1_std", [0.0] * epochs))]
        lines.append(f"| {row['label']} | {row.get('lr', '-'):g} | " + " | ".join(cells) + " |")
    checks = [(r["label"], r["lr_check"]) for r in rows if r.get("lr_check")]
    if checks:
        lines += ["", f"Learning rates chosen on a validation split of the training set "
                      f"({checks[0][1]['validation_examples']} examples held out, first seed):"]
        listed = set()
        for label, check in checks:
            if "budget_fraction" in check:  # one check at that budget, used at every budget of the method
                label = f"{label.rsplit(' 1/', 1)[0]} (checked at 1/{1 / check['budget_fraction']:.0f}, every budget)"
            if label not in listed:
                listed.add(label)
                lines.append(f"- {label}: "
                             + ", ".join(f"{c['lr']:g} -> {c['val_top1']:.4f}" for c in check["candidates"]))
    return "\n".join(lines)


def render_compression(results: list[dict]) -> str:
    lines = ["ASI's compression against HOSVD's at the same planned ranks (per training step, summed over "
             "the trained convs), and the time to plan the ranks:", "",
             "| case | convs | budget | ranks (per conv) | ASI | HOSVD | HOSVD/ASI time | ASI FLOPs | HOSVD FLOPs "
             "| HOSVD/ASI FLOPs | planning |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for result in results:
        for group in result["groups"]:
            for entry in group["compression"]:
                t = entry["total"]
                ranks = "; ".join("x".join(map(str, layer["ranks"])) for layer in entry["layers"])
                lines.append(
                    f"| {result['case']} | {group['layers']} | 1/{1 / entry['budget_fraction']:.0f} | {ranks} "
                    f"| {t['asi_s'] * 1e3:.2f} ms | {t['hosvd_s'] * 1e3:.1f} ms | {t['time_ratio']:.0f}x "
                    f"| {t['asi_flops'] / 1e6:.1f} M | {t['hosvd_flops'] / 1e6:.0f} M | {t['flop_ratio']:.0f}x "
                    f"| {entry['planning_seconds']:.1f} s |")
    return "\n".join(lines)


def pareto_check(group: dict, *, tolerance_pp: float = PARETO_TOLERANCE_PP) -> list[dict]:
    """For each planner row of ``group``: is it on the Pareto front of all the group's rows?

    Top-1 against the trained convs' saved bytes: the row is on the front (within ``tolerance_pp``)
    when no other row with no more bytes has a top-1 more than ``tolerance_pp`` higher. The best
    such row is named either way.
    """
    checks = []
    for row in group["rows"]:
        if row["method"] != PLANNER:
            continue
        cheaper = [r for r in group["rows"] if r is not row and r["convs_bytes"] <= row["convs_bytes"]]
        best = max(cheaper, key=lambda r: r["top1"], default=None)
        gap_pp = 0.0 if best is None else round(100 * (best["top1"] - row["top1"]), 6)  # top-1 is k/n: no float fuzz
        checks.append({"label": row["label"], "budget_fraction": row["budget_fraction"], "top1": row["top1"],
                       "convs_bytes": row["convs_bytes"], "exact": row["plan"]["exact"],
                       "best_other": None if best is None else {
                           "label": best["label"], "top1": best["top1"], "convs_bytes": best["convs_bytes"]},
                       "gap_pp": gap_pp, "tolerance_pp": tolerance_pp, "met": gap_pp <= tolerance_pp})
    return checks


def render_pareto(results: list[dict]) -> list[str]:
    """The Pareto check's lines, one per case, convs and budget."""
    lines = []
    for result in results:
        for group in result["groups"]:
            for c in group["pareto"]:
                best = c["best_other"]
                other = ("no other row has as few bytes" if best is None else
                         f"best other row with <= its bytes: {best['label']}, top-1 {best['top1']:.4f} at "
                         f"{_fmt_bytes(best['convs_bytes'])} ({c['gap_pp']:+.1f} pp)")
                exact = f"exact: {', '.join(c['exact'])}" if c["exact"] else "no layer exact"
                lines.append(f"- {result['case']}, last {group['layers']}, {c['label']} ({exact}): top-1 "
                             f"{c['top1']:.4f} at {_fmt_bytes(c['convs_bytes'])}; {other}: "
                             f"{'met' if c['met'] else 'not met'}")
    return lines


def targets(results: list[dict]) -> list[str]:
    """The stated targets, checked against what was measured (no judgement beyond the numbers)."""
    lines = []
    for result in results:
        for group in result["groups"]:
            reference = {r["method"]: r["top1"] for r in group["rows"]}
            if HEAD_ONLY in reference and reference["vanilla"] <= reference[HEAD_ONLY]:
                lines.append(f"- {result['case']}, last {group['layers']}: parity not measurable: vanilla "
                             f"({reference['vanilla']:.3f}) did not beat head only ({reference[HEAD_ONLY]:.3f})")
                continue
            asi_rows = [r for r in group["rows"] if r["method"] in (ASI_ONLY, ASI_INT8, ASI_PAPER, PLANNER)]
            hits = [r for r in asi_rows if r["ratios"]["convs_bytes"] <= 0.01 and r["delta_pp"] >= -1.0]
            best = max(asi_rows, key=lambda r: r["delta_pp"], default=None)
            what = (f"met by {', '.join(r['label'] for r in hits)}" if hits else "not met")
            detail = "" if best is None else (f" (closest ASI: {best['label']}, {best['delta_pp']:+.1f} pp at "
                                              f"{_fmt_ratio(best['ratios']['convs_bytes'])} of vanilla's bytes)")
            lines.append(f"- {result['case']}, last {group['layers']}: ASI within 1 pp of vanilla at >= 100x less "
                         f"activation memory: {what}{detail}")
    compression = [e["total"] for r in results for g in r["groups"] for e in g["compression"]]
    if compression:
        lines.append(f"- ASI's compression >= 50x cheaper than HOSVD's: time ratio "
                     f"{min(c['time_ratio'] for c in compression):.0f}x.."
                     f"{max(c['time_ratio'] for c in compression):.0f}x,"
                     f" FLOP ratio {min(c['flop_ratio'] for c in compression):.0f}x.."
                     f"{max(c['flop_ratio'] for c in compression):.0f}x")
    planning = [(r["case"], g["layers"], e["planning_seconds"]) for r in results for g in r["groups"]
                for e in g["compression"] if g["layers"] == 4]
    if planning:
        lines.append(f"- planning ranks for 4 convs: {min(p[2] for p in planning):.1f}.."
                     f"{max(p[2] for p in planning):.1f} s")
    return lines


def report(meta: dict, results: list[dict], *, out: Path, plot: Path) -> None:
    """Print the summary tables and checks; write the JSON (first: nothing measured is lost) and the plot."""
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({"meta": meta, "results": results, "targets": targets(results),
                               "pareto": render_pareto(results)}, indent=2, default=str) + "\n")
    if any(g["compression"] for r in results for g in r["groups"]):  # HOSVD ran at a reference budget
        print(render_compression(results) + "\n")
    print(f"The planner's row on the Pareto front of every method's rows (top-1 vs convs' bytes, within "
          f"{PARETO_TOLERANCE_PP} pp):")
    print("\n".join(render_pareto(results)) + "\n")
    print("Targets:")
    print("\n".join(targets(results)))
    walls = [part["wall_seconds"] for part in meta.get("parts", [meta])]
    print(f"\nwall time: {' + '.join(f'{w / 60:.1f}' for w in walls)} min ({meta['threads']} threads)")
    plot_pareto(results, plot)
    print(f"wrote {out} and {plot}")


def merge_runs(paths: Sequence[Path], *, out: Path, plot: Path) -> None:
    """One report of several runs' JSON (each made with ``--cases`` and/or ``--layers``);
    their metadata kept as ``parts``."""
    parts = [json.loads(Path(p).read_text()) for p in paths]
    by_case: dict[str, dict] = {}
    for result in (result for part in parts for result in part["results"]):
        if result["case"] not in by_case:
            by_case[result["case"]] = result
            continue
        joined = by_case[result["case"]]  # the same case run for other layer counts (--layers)
        groups = joined["groups"] + result["groups"]
        if len({g["layers"] for g in groups}) < len(groups):
            raise SystemExit(f"error: --merge: case {result['case']} has a layer count in more than one file")
        joined["groups"] = sorted(groups, key=lambda g: g["layers"])
    results = list(by_case.values())
    first = parts[0]["meta"]
    meta = {k: first[k] for k in ("torch", "torchvision", "machine", "python", "threads", "quick")}
    meta["parts"] = [part["meta"] | {"file": str(p)} for part, p in zip(parts, paths)]
    meta["wall_seconds"] = max(part["meta"]["wall_seconds"] for part in parts)  # the parts ran side by side
    for result in results:
        for group in result["groups"]:
            group["pareto"] = pareto_check(group)
    report(meta, results, out=out, plot=plot)
