"""Metric tables (the IPS paper's Tables 10-12): rows (methods) x measured metrics, per model column.

A table YAML with ``metrics:`` reports values of ``ipsd evaluate`` suites, not top-1: each entry
``{label, suite, key, paper}`` names the suite, the metric key in the run's ``eval/<suite>.json`` and the
paper CSV's metric name (``paper: null`` when the paper has none). Per cell and metric: n, mean, sample SD
over the seeds whose evaluation exists, the paper's value from the long-format CSV (``paper.metric`` names
its metric column), and the Welch 95% difference from the reference row (Hard Label), ours and the paper's
(n = ``paper.n``) -- the same statistics as the top-1 tables. Only planned run folders are read.
"""
from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from benchmarks.grid import PlannedRun, Table
from benchmarks.report import (DASH, _diff_text, _fmt, _is_control, _md, _reference_row, _tex_escape, paper_values)
from benchmarks.stats import MARK, Diff, Summary, welch

VALUE_COLUMNS = ["row", "column", "replicate", "run_id", "label", "suite", "key", "value", "train_top1"]
SUMMARY_COLUMNS = ["row", "column", "label", "suite", "key", "skipped", "n_done", "n_expected", "mean", "std", "se",
                   "paper_mean", "paper_std", "diff", "lo", "hi", "holds", "paper_diff", "paper_lo", "paper_hi",
                   "paper_holds", "train_top1", "ran"]


def collect_metrics(table: Table, planned: list[PlannedRun]) -> pd.DataFrame:
    """One line per planned run and metric: the value from the run's evaluation (NaN when not evaluated yet)."""
    out = []
    for p in planned:
        rec = p.run.read_result()
        evals = {s: p.run.read_eval(s) for s in {m["suite"] for m in table.metrics}} if rec is not None else {}
        for m in table.metrics:
            ev = evals.get(m["suite"])
            out.append({"row": p.row, "column": p.column, "replicate": p.replicate, "run_id": p.run_id,
                        "label": m["label"], "suite": m["suite"], "key": m["key"],
                        "value": ev.metric(m["key"]) if ev is not None else math.nan,
                        "train_top1": rec.train_top1 if rec is not None else math.nan,
                        "ran": f"{p.cfg.model}, {p.cfg.dataset}"})
    return pd.DataFrame(out, columns=[*VALUE_COLUMNS, "ran"])


def summarize_metrics(table: Table, values: pd.DataFrame) -> pd.DataFrame:
    """Per (row, column, metric), YAML order: n, mean, sample SD, SE, the paper's value, and the Welch difference
    from the reference row (ours over our seeds; the paper's over its published mean, SD and n)."""
    paper = {m["label"]: paper_values(table, paper_metric=m["paper"]) if m.get("paper") else {} for m in table.metrics}
    n_paper = table.paper.n if table.paper else 0
    ref = _reference_row(table)
    stats: dict[tuple[str, str, str], tuple[Summary, Summary]] = {}
    for row in table.rows:
        for column in table.columns:
            for m in table.metrics:
                cell = values[(values["row"] == row) & (values["column"] == column) & (values["label"] == m["label"])]
                v = cell["value"].dropna().astype(float)
                pm, ps = paper[m["label"]].get((row, column), (math.nan, None))
                stats[(row, column, m["label"])] = (
                    Summary(len(v), float(v.mean()) if len(v) else math.nan,
                            float(v.std(ddof=1)) if len(v) >= 2 else math.nan),
                    Summary(n_paper if not math.isnan(pm) else 0, pm, math.nan if ps is None else ps))
    nan_diff = Diff(*[math.nan] * 5)
    out = []
    for row in table.rows:
        for column in table.columns:
            skipped = (row, column) in table.skip
            cell = values[(values["row"] == row) & (values["column"] == column)]
            train = cell.drop_duplicates("run_id")["train_top1"].dropna()
            for m in table.metrics:
                ours, theirs = stats[(row, column, m["label"])]
                against = stats.get((ref, column, m["label"])) if ref and row != ref and (ref, column) not in table.skip \
                    else None
                d = welch(ours, against[0]) if against else nan_diff
                pd_ = welch(theirs, against[1]) if against else nan_diff
                out.append({"row": row, "column": column, "label": m["label"], "suite": m["suite"], "key": m["key"],
                            "skipped": skipped, "n_done": ours.n, "n_expected": 0 if skipped else table.seeds,
                            "mean": ours.mean, "std": ours.sd, "se": ours.se, "paper_mean": theirs.mean,
                            "paper_std": theirs.sd, "diff": d.diff, "lo": d.lo, "hi": d.hi, "holds": d.holds,
                            "paper_diff": pd_.diff, "paper_lo": pd_.lo, "paper_hi": pd_.hi, "paper_holds": pd_.holds,
                            "train_top1": float(train.mean()) if len(train) else math.nan,
                            "ran": "; ".join(sorted(set(cell["ran"])))})
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


def _cell(s: dict, pm: str, dash: str, has_paper: bool) -> str:
    """'12.30 ± 0.40* (paper 10.60*)': ours (mark: differs from Hard Label), then the paper's value and mark."""
    if s["skipped"]:
        return "n/a"
    ours = dash if not s["n_done"] else _fmt(s["mean"]) + (f" {pm} {_fmt(s['std'])}" if s["n_done"] >= 2 else "")
    if s["n_done"]:
        ours += MARK if s["holds"] is True else ""
        ours += f" [{s['n_done']}/{s['n_expected']}]" if s["n_done"] < s["n_expected"] else ""
    if not has_paper:
        return ours
    if math.isnan(s["paper_mean"]):
        return f"{ours} (paper {dash})"
    return f"{ours} (paper {_fmt(s['paper_mean'])}{MARK if s['paper_holds'] is True else ''})"


def _grids(table: Table, summary: pd.DataFrame, pm: str, dash: str) -> dict[str, list[list[str]]]:
    """Per model column: a header (Method, one label per metric, train top-1) and one line per row."""
    by = {(s["row"], s["column"], s["label"]): s for s in summary.to_dict("records")}
    labels = [m["label"] for m in table.metrics]
    grids = {}
    for column in table.columns:
        ran = sorted({r for r in summary[summary["column"] == column]["ran"] if r})
        title = f"{column} (ran {' / '.join(ran)})" if table.profile != "full" and ran else column
        lines = [[f"Method: {title}", *labels, "train top-1"]]
        for row in table.rows:
            cells = [by[(row, column, lab)] for lab in labels]
            train = cells[0]["train_top1"] if cells else math.nan
            lines.append([f"{row} (control)" if _is_control(table, row) else row,
                          *(_cell(c, pm, dash, table.paper is not None) for c in cells),
                          dash if math.isnan(train) else _fmt(train)])
        grids[column] = lines
    return grids


def _notes(table: Table, summary: pd.DataFrame) -> list[str]:
    suites = sorted({m["suite"] for m in table.metrics})
    per_cell = summary.groupby(["row", "column"], sort=False)[["n_done", "n_expected"]].max()
    caveat = ([f"Profile {table.profile!r} is not the paper's protocol: the paper's numbers are shown for "
               "orientation only."] if table.profile != "full" else [])
    return [*caveat, *table.notes,
            f"Values from `ipsd evaluate --suite {'|'.join(suites)}` on each finished run (eval/<suite>.json). Cells: "
            f"mean ± sample std (ddof=1) over the seeds evaluated; [k/n] = only k of n; {DASH} = none; "
            "(paper value). train top-1 = clean pass over the training set after the last epoch (the regime).",
            f"{MARK} after a value: its Welch 95% interval of the difference from {_reference_row(table)} excludes 0 "
            f"(the paper's from its published mean, SD and n = {table.paper.n if table.paper else 0}); whether that "
            "difference is better depends on the metric (lower is better for AURC, E-AURC, FPR, ECE, Brier, NLL and "
            f"error rates). Runs evaluated: {int(per_cell['n_done'].sum())} of {int(per_cell['n_expected'].sum())}."]


def _differences_md(summary: pd.DataFrame, ref: str | None) -> str:
    lines = [["column", "metric", "row", f"ours − {ref} [95% CI]", f"paper − {ref} [95% CI]"]]
    for s in summary.to_dict("records"):
        if s["row"] == ref or s["skipped"]:
            continue
        lines.append([s["column"], s["label"], s["row"], _diff_text(s["diff"], s["lo"], s["hi"], s["holds"], "-"),
                      _diff_text(s["paper_diff"], s["paper_lo"], s["paper_hi"], s["paper_holds"], "-")])
    return _md(lines)


def render_metrics(table: Table, summary: pd.DataFrame, fmt: str) -> str:
    """The metric table as Markdown (one grid per model column, then the differences), LaTeX or tidy CSV."""
    title = f"{table.title or table.name} [{table.name}, profile {table.profile}; metrics of `ipsd evaluate`]"
    if fmt == "csv":
        df = summary.copy()
        df.insert(0, "profile", table.profile)
        df.insert(0, "table", table.name)
        return df.to_csv(index=False, lineterminator="\n")
    grids = _grids(table, summary, "±" if fmt == "md" else "PMSYM", DASH if fmt == "md" else "DASHSYM")
    if fmt == "tex":
        fix = lambda c: (_tex_escape(c).replace("PMSYM", r"$\pm$").replace("DASHSYM", "--")  # noqa: E731
                         .replace("−", "$-$"))
        out = [f"% {title}", *(f"% {n}" for n in _notes(table, summary))]
        for lines in grids.values():
            body = [" & ".join(fix(c) for c in l) + r" \\" for l in lines]
            out += [rf"\begin{{tabular}}{{l{'c' * (len(lines[0]) - 1)}}}", r"\hline", body[0], r"\hline", *body[1:],
                    r"\hline", r"\end{tabular}", ""]
        return "\n".join(out)
    parts = [f"### {title}", ""]
    for lines in grids.values():
        parts += [_md(lines), ""]
    parts += ["#### Differences from the reference row (Welch 95% CI)", "",
              _differences_md(summary, _reference_row(table)), "", *_notes(table, summary)]
    return "\n".join(parts) + "\n"


def figure_metrics(table: Table, summary: pd.DataFrame, path: str | Path) -> Path:
    """One PNG: a small panel per metric, a bar per row (ours solid with the seeds' SD, the paper's hatched)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    labels = [m["label"] for m in table.metrics]
    rows = list(table.rows)
    ncols = min(4, len(labels))
    nrows = math.ceil(len(labels) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.2 * ncols, 2.6 * nrows + 0.8), squeeze=False)
    colors = list(plt.get_cmap("tab10").colors)
    column = next(iter(table.columns))  # the paper's metric tables have one model column
    by = {(s["row"], s["label"]): s for s in summary[summary["column"] == column].to_dict("records")}
    for k, label in enumerate(labels):
        ax = axes[k // ncols][k % ncols]
        for i, row in enumerate(rows):
            s = by[(row, label)]
            if not math.isnan(s["mean"]):
                ax.bar(i - 0.2, s["mean"], 0.4, yerr=None if math.isnan(s["std"]) else s["std"], color=colors[i % 10])
            if not math.isnan(s["paper_mean"]):
                ax.bar(i + 0.2, s["paper_mean"], 0.4, color=colors[i % 10], alpha=0.45, hatch="//",
                       edgecolor=colors[i % 10])
        ax.set_title(label, fontsize=9)
        ax.set_xticks(range(len(rows)))
        ax.set_xticklabels(rows, rotation=40, ha="right", fontsize=7)
        ax.tick_params(axis="y", labelsize=7)
    for k in range(len(labels), nrows * ncols):
        axes[k // ncols][k % ncols].axis("off")
    fig.suptitle(f"{table.name} ({table.profile}, column {column}): ours solid (± SD over seeds), paper hatched",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110, format="png")
    plt.close(fig)
    return path
