"""The reporter: a paper table's finished runs, aggregated over seeds and printed beside the paper's numbers.

Pipeline: ``load_table`` + ``expand`` (benchmarks/grid.py) give the planned runs; ``collect`` reads each
planned run's ``result.json`` (and nothing else, so stray folders in ``out`` never count);
``summarize`` aggregates per cell; ``render`` prints the paper's layout; ``figure`` draws one PNG.

Choices a reader of the numbers should know (they are also printed under every table):
- last-epoch top-1 is the primary metric; the best epoch is only shown on request and labelled as
  selected on the test set (it is an optimistic number).
- the spread is the sample standard deviation (ddof=1) over the finished seeds, the usual
  "mean ± std of 3 runs" of papers; with fewer than 2 finished seeds it is undefined (NaN) rather
  than a misleading 0.
- every cell with finished seeds says how many: ``[k/n]``, k of the protocol's n seeds; with none it is "–";
  a cell the table skips is "n/a".

Usage: ``python -m benchmarks.report benchmarks/table3.yaml --profile smoke [--format md|csv|tex]``.
"""
from __future__ import annotations

import dataclasses
import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pandas as pd

from benchmarks.grid import PlannedRun, Table, expand, load_table, paper_key
from benchmarks.stats import MARK, Diff, Summary, bootstrap_mean_gain, welch
from ipsd.config import ConfigError

PAPER_DIR = Path(__file__).resolve().parents[1] / "results" / "paper"
METRICS = ("last", "best", "train")
METRIC_COLUMN = {"last": "top1_last", "best": "top1_best", "train": "train_top1"}
FORMATS = ("md", "csv", "tex")
DASH = "–"
REFERENCE_ROW = "Hard Label"

RUN_COLUMNS = ["row", "column", "replicate", "seed", "run_id", "done", "top1_last", "top5_last", "top1_best",
               "top5_best", "best_epoch", "train_top1", "images_per_step", "wall_seconds", "world_size", "device_hours",
               "device", "execution", "environment", "folder", "ran"]
SUMMARY_COLUMNS = ["row", "column", "metric", "skipped", "n_done", "n_expected", "mean", "std", "se", "train_top1",
                   "paper_mean",
                   "paper_std", "delta", "images_per_step", "device_hours", "devices", "mixed", "ran", "values"]


def metric_label(metric: str) -> str:
    """How the metric is named in every output; best-epoch always carries its caveat."""
    _check_choice("metric", metric, METRICS)
    return {"last": "last-epoch test top-1 (%)", "best": "best epoch (selected on the test set) test top-1 (%)",
            "train": "train top-1 (%), clean pass over the training set after the last epoch"}[metric]


def _check_choice(what: str, value: str, allowed: Sequence[str]) -> None:
    if value not in allowed:
        raise ValueError(f"{what}={value!r} is not one of {', '.join(allowed)}")


# ----------------------------------------------------------------------------------------------- collect
def collect(table: Table, planned: list[PlannedRun] | None = None) -> pd.DataFrame:
    """One row per planned run of ``table`` (row-major, YAML order), finished or not.

    Only the planned folders are read, so other tables' or stray runs in ``out`` never count. A run
    shared by two cells (identical configs) appears once per cell, as the table has it twice.
    """
    planned = expand(table) if planned is None else planned
    keys = [(p.row, p.column, p.replicate) for p in planned]
    if len(set(keys)) != len(keys):
        raise AssertionError(f"{table.name}: the grid planned some (row, column, replicate) twice")
    cells: dict[tuple[str, str], set[str]] = {}
    for p in planned:
        ids = cells.setdefault((p.row, p.column), set())
        if p.run_id in ids:
            raise AssertionError(f"{table.name} [{p.row} / {p.column}]: two replicates resolve to run {p.run_id}; "
                                 "its seeds would be counted twice")
        ids.add(p.run_id)
    rows = []
    nan = math.nan
    for p in planned:
        rec = p.run.read_result()
        rows.append({
            "row": p.row, "column": p.column, "replicate": p.replicate, "seed": p.cfg.seed, "run_id": p.run_id,
            "done": rec is not None,
            **({"top1_last": rec.top1("last"), "top5_last": rec.top5("last"), "top1_best": rec.top1("best"),
                "top5_best": rec.top5("best"), "best_epoch": rec.best_epoch, "train_top1": rec.train_top1,
                "images_per_step": rec.images_per_step, "wall_seconds": rec.wall_seconds,
                "world_size": rec.world_size, "device_hours": rec.device_hours, "device": rec.device_name,
                "execution": json.dumps(rec.execution, sort_keys=True), "environment": rec.environment}
               if rec is not None else
               {k: nan for k in RUN_COLUMNS[6:-4]} | {"device": None, "execution": None, "environment": None}),
            "folder": str(p.folder), "ran": f"{p.cfg.model}, {p.cfg.dataset}",
        })
    return pd.DataFrame(rows, columns=RUN_COLUMNS).astype({"done": bool})


# -------------------------------------------------------------------------------------------- paper values
def _paper_path(file: str) -> Path:
    """``paper.file`` is absolute, or relative to results/paper (where the papers' CSVs live)."""
    p = Path(file).expanduser()
    return p if p.is_absolute() else PAPER_DIR / p


def _label(values: pd.DataFrame, spec: str | list[str]) -> list[str]:
    """A CSV label column, or several joined with " / " (Table 5's [backbone, dataset])."""
    cols = [spec] if isinstance(spec, str) else list(spec)
    return [" / ".join(str(v).strip() for v in vals) for vals in zip(*(values[c] for c in cols))]


def paper_values(table: Table, metric: str = "last",
                 paper_metric: str | None = None) -> dict[tuple[str, str], tuple[float, float | None]]:
    """(row label, column label) of the table -> the paper's (mean, std); std None when the paper gives none.

    Labels are matched through ``paper_key`` (column or row spec key; defaults to the label). Cells the
    CSV lacks, or whose mean is empty, are absent: a missing paper number is never a zero. A long-format CSV
    (``paper.metric`` names its metric column, Tables 10-12) holds several lines per cell: only the lines of
    ``paper_metric`` are read, and without one there is no paper top-1 to give.
    """
    ref = table.paper
    if ref is None or (metric == "train" and ref.train_mean is None) or (ref.metric and paper_metric is None):
        return {}
    if metric == "train":
        ref = dataclasses.replace(ref, mean=ref.train_mean, std=None)
    path = _paper_path(ref.file)
    if not path.is_file():
        raise ConfigError(f"{table.name}: paper.file {ref.file!r} not found at {path}; "
                          f"give a path relative to {PAPER_DIR} or an absolute one")
    df = pd.read_csv(path, dtype=str, keep_default_na=False)
    df.columns = [c.strip() for c in df.columns]
    needed = [ref.row] if isinstance(ref.row, str) else list(ref.row)
    needed += [ref.column] if isinstance(ref.column, str) else list(ref.column)
    needed += [ref.mean] + ([ref.std] if ref.std else []) + ([ref.metric] if ref.metric else [])
    missing = [c for c in needed if c not in df.columns]
    if missing:
        raise ConfigError(f"{table.name}: {path.name} has no column(s) {missing} named in `paper:`; "
                          f"its columns are {list(df.columns)}")
    if ref.metric:
        df = df[df[ref.metric].str.strip() == paper_metric].reset_index(drop=True)
    rows = _label(df, ref.row)
    cols = _label(df, ref.column)
    # empty (or non-numeric) cells -> NaN -> absent, never 0
    means = pd.to_numeric(df[ref.mean].str.strip(), errors="coerce")
    stds = (pd.to_numeric(df[ref.std].str.strip(), errors="coerce") if ref.std
            else pd.Series(math.nan, index=df.index))
    found: dict[tuple[str, str], list[int]] = {}
    for i, key in enumerate(zip(rows, cols)):
        found.setdefault(key, []).append(i)
    out: dict[tuple[str, str], tuple[float, float | None]] = {}
    for row in table.rows:
        if (table.rows[row] or {}).get("control"):
            continue  # a control row has no published counterpart
        rkey = str((table.rows[row] or {}).get("paper_key", row))
        for column in table.columns:
            key = (rkey, str(paper_key(table, column)))
            idx = found.get(key, [])
            if len(idx) > 1:
                raise ConfigError(f"{table.name}: {path.name} has {len(idx)} lines for {key}; "
                                  "the paper: row/column mapping does not identify one cell")
            if not idx or math.isnan(means.iloc[idx[0]]):
                continue
            s = stds.iloc[idx[0]]
            out[(row, column)] = (float(means.iloc[idx[0]]), None if math.isnan(s) else float(s))
    return out


# ----------------------------------------------------------------------------------------------- summarize
def summarize(table: Table, df: pd.DataFrame, metric: str = "last") -> pd.DataFrame:
    """Per cell (YAML order, skipped cells included): seeds done/expected, mean, sample std, paper, delta.

    std uses ddof=1 (sample std, as papers report "mean ± std of n runs") and is NaN for n < 2.
    delta = ours - paper, NaN when either is missing. device_hours sums the cell's finished runs.
    """
    _check_choice("metric", metric, METRICS)
    col = METRIC_COLUMN[metric]
    paper = paper_values(table, metric)
    out = []
    for row in table.rows:
        for column in table.columns:
            skipped = (row, column) in table.skip
            cell = df[(df["row"] == row) & (df["column"] == column) & df["done"]]
            vals = cell[col].dropna().astype(float)
            n = int(len(vals))
            mean = float(vals.mean()) if n else math.nan
            std = float(vals.std(ddof=1)) if n >= 2 else math.nan
            pm, ps = paper.get((row, column), (math.nan, None))
            ips = cell["images_per_step"].dropna()
            out.append({
                "row": row, "column": column, "metric": metric, "skipped": skipped, "n_done": n,
                "n_expected": 0 if skipped else table.seeds, "mean": mean, "std": std,
                "se": std / math.sqrt(n) if n >= 2 else math.nan,
                "train_top1": float(cell["train_top1"].dropna().mean()) if cell["train_top1"].notna().any() else math.nan,
                "paper_mean": pm, "paper_std": math.nan if ps is None else ps, "delta": mean - pm,
                "images_per_step": float(ips.iloc[0]) if len(ips) and ips.nunique() == 1 else
                (float(ips.mean()) if len(ips) else math.nan),
                "device_hours": float(cell["device_hours"].fillna(0).sum()),
                "devices": ", ".join(sorted(set(cell["device"].dropna()))),
                "mixed": cell["execution"].dropna().nunique() > 1,
                "ran": "; ".join(sorted(set(df[(df["row"] == row) & (df["column"] == column)]["ran"]))),
                "values": tuple(float(v) for v in vals),
            })
    return pd.DataFrame(out, columns=SUMMARY_COLUMNS)


# ---------------------------------------------------------------------------------------------- differences
COMPARISON_COLUMNS = ["column", "row", "against", "diff", "lo", "hi", "p", "holds", "paper_against", "paper_diff",
                      "paper_lo", "paper_hi", "paper_p", "paper_holds"]


def _is_control(table: Table, row: str) -> bool:
    return bool((table.rows[row] or {}).get("control"))


def _ips_rows(table: Table) -> list[str]:
    return [r for r, spec in table.rows.items() if (spec or {}).get("method") == "ips" and not _is_control(table, r)]


def comparisons(table: Table, summary: pd.DataFrame) -> pd.DataFrame:
    """Which differences hold, per column: every row against the reference row (Hard Label), and each IPS row
    against the best other method (controls excluded). Ours use the finished seeds; the paper's use its published
    mean, SD and n (``paper.n``) through the same Welch test, against the paper's own best other method."""
    by = {(s["row"], s["column"]): s for s in summary.to_dict("records")}
    ref, ips = _reference_row(table), _ips_rows(table)
    n_paper = table.paper.n if table.paper else 0

    def ours(row: str, col: str) -> Summary:
        s = by[(row, col)]
        return Summary(int(s["n_done"]), s["mean"], s["std"])

    def paper(row: str, col: str) -> Summary:
        s = by[(row, col)]
        return Summary(n_paper if not math.isnan(s["paper_mean"]) else 0, s["paper_mean"], s["paper_std"])

    def best(col: str, pick, candidates: list[str]) -> str | None:
        scored = [(pick(r, col).mean, r) for r in candidates if not math.isnan(pick(r, col).mean)]
        return max(scored)[1] if scored else None

    out = []
    for col in table.columns:
        live = [r for r in table.rows if (r, col) not in table.skip]
        pairs = [(r, ref, ref) for r in live if ref and r != ref]
        others = [r for r in live if r not in ips and not _is_control(table, r) and r != ref]
        pairs += [(r, best(col, ours, others), best(col, paper, others)) for r in ips if r in live]
        for row, against, paper_against in pairs:
            d = welch(ours(row, col), ours(against, col)) if against else Diff(*[math.nan] * 5)
            pd_ = welch(paper(row, col), paper(paper_against, col)) if paper_against else Diff(*[math.nan] * 5)
            out.append({"column": col, "row": row, "against": against or DASH, "diff": d.diff, "lo": d.lo,
                        "hi": d.hi, "p": d.p, "holds": d.holds, "paper_against": paper_against or DASH,
                        "paper_diff": pd_.diff, "paper_lo": pd_.lo, "paper_hi": pd_.hi, "paper_p": pd_.p,
                        "paper_holds": pd_.holds})
    return pd.DataFrame(out, columns=COMPARISON_COLUMNS)


GAIN_COLUMNS = ["row", "against", "columns", "of", "mean", "lo", "hi", "holds"]
BEST_OTHER = "best other method"


def mean_gains(table: Table, summary: pd.DataFrame, comp: pd.DataFrame) -> pd.DataFrame:
    """Across columns, each comparison of ``comp`` as one mean gain with a bootstrap 95% interval.

    A column counts when both of its cells have at least 2 finished seeds (one seed has no spread to
    resample). IPS rows are compared with each column's best other method, whichever that is. Only
    comparisons with at least 2 such columns are listed: one column is already its Welch line.
    """
    by = {(s["row"], s["column"]): s["values"] for s in summary.to_dict("records")}
    ref = _reference_row(table)
    groups: dict[tuple[str, str], list[tuple[tuple[float, ...], tuple[float, ...]]]] = {}
    for c in comp.to_dict("records"):
        key = (c["row"], c["against"] if c["against"] == ref else BEST_OTHER)
        cells = groups.setdefault(key, [])
        a, b = by[(c["row"], c["column"])], by.get((c["against"], c["column"]), ())
        if len(a) >= 2 and len(b) >= 2:
            cells.append((a, b))
    out = []
    for (row, against), cells in groups.items():
        if len(cells) >= 2:
            g = bootstrap_mean_gain(cells)
            out.append({"row": row, "against": against, "columns": len(cells), "of": len(table.columns),
                        "mean": g.mean, "lo": g.lo, "hi": g.hi, "holds": g.holds})
    return pd.DataFrame(out, columns=GAIN_COLUMNS)


def _gains_md(gains: pd.DataFrame) -> str:
    lines = [["row", "against", "columns", "mean gain [95% CI]"]]
    for g in gains.to_dict("records"):
        lines.append([g["row"], g["against"], f"{g['columns']} of {g['of']}",
                      _diff_text(g["mean"], g["lo"], g["hi"], g["holds"], "-")])
    return _md(lines)


def _diff_text(diff: float, lo: float, hi: float, holds: bool, minus: str) -> str:
    if math.isnan(diff):
        return DASH
    sign = lambda x: f"{round(x, 2) + 0.0:+.2f}".replace("-", minus)  # noqa: E731 -- never "-0.00"
    ci = f" [{sign(lo)}, {sign(hi)}]" if not math.isnan(lo) else " (n < 2: no interval)"
    return sign(diff) + ci + (MARK if holds else "")


def _differences_md(comp: pd.DataFrame) -> str:
    lines = [["column", "row", "ours: against", "ours: diff [95% CI]", "paper: against", "paper: diff [95% CI]"]]
    for c in comp.to_dict("records"):
        lines.append([c["column"], c["row"], c["against"], _diff_text(c["diff"], c["lo"], c["hi"], c["holds"], "-"),
                      c["paper_against"], _diff_text(c["paper_diff"], c["paper_lo"], c["paper_hi"],
                                                     c["paper_holds"], "-")])
    return _md(lines)


# -------------------------------------------------------------------------------------------------- render
def _fmt(x: float) -> str:
    return f"{x:.2f}"


def _cell_text(s: pd.Series, pm_sym: str, minus: str, dash: str, has_paper: bool = True, delta: bool = True) -> str:
    """'80.41 ± 0.12 [2/3] (paper 80.53, -0.12)' (2 of the protocol's 3 seeds finished); '– (paper 80.53)' with
    no runs; 'n/a' when skipped; '(paper –)' for a cell the paper lacks (a control, a new method or model) in a
    table that has a paper."""
    if s["skipped"]:
        return "n/a"
    if s["n_done"] == 0:
        ours = dash
    else:
        ours = _fmt(s["mean"]) + (f" {pm_sym} {_fmt(s['std'])}" if s["n_done"] >= 2 else "")
        ours += MARK if s.get("holds") is True else ""
        ours += " [mixed]" if s.get("mixed") else ""
        ours += f" [{s['n_done']}/{s['n_expected']}]"  # n in every cell: how many seeds stand behind the mean
    if math.isnan(s["paper_mean"]):
        return f"{ours} (paper {dash})" if has_paper else ours
    paper = f"paper {_fmt(s['paper_mean'])}" + (MARK if s.get("paper_holds") is True else "")
    if delta and not math.isnan(s["delta"]):
        d = f"{round(s['delta'], 2) + 0.0:+.2f}"  # never "-0.00"
        paper += ", " + (d.replace("-", minus, 1) if d.startswith("-") else d)
    return f"{ours} ({paper})"


def _row_extras(summary: pd.DataFrame, row: str) -> tuple[str, str]:
    """images/step (distinct values of the row's finished cells) and device-hours (sum of its finished runs)."""
    cells = summary[(summary["row"] == row) & (summary["n_done"] > 0)]
    if cells.empty:
        return DASH, DASH
    ips = sorted({float(v) for v in cells["images_per_step"].dropna()})
    ips_txt = "/".join(f"{v:g}" for v in ips) or DASH
    return ips_txt, f"{cells['device_hours'].sum():.2f}"


def _grid(table: Table, summary: pd.DataFrame, comp: pd.DataFrame, pm_sym: str, minus: str,
          dash: str) -> list[list[str]]:
    """The pretty layout as text cells: header then one line per table row, YAML order. A cell whose difference
    from the reference row holds (Welch 95%, from ``comp``) carries the mark, ours after our mean, the paper's
    after its value."""
    by_cell = {(r, c): s for (r, c), s in zip(zip(summary["row"], summary["column"]), summary.to_dict("records"))}
    ref = _reference_row(table)
    for c in comp.to_dict("records"):
        if c["against"] == ref:
            by_cell[(c["row"], c["column"])] = {**by_cell[(c["row"], c["column"])], "holds": c["holds"],
                                                "paper_holds": c["paper_holds"]}
    def label(col: str) -> str:  # outside the paper's protocol, say what actually ran under the paper's label
        ran = sorted({r for r in summary[summary["column"] == col]["ran"] if r})
        return f"{col} (ran {' / '.join(ran)})" if table.profile != "full" and ran else col

    lines = [["Method", *map(label, table.columns), "train top-1", "images/step", "device-h"]]
    for row in table.rows:
        cells = [_cell_text(pd.Series(by_cell[(row, c)]), pm_sym, minus, dash, table.paper is not None,
                            delta=table.profile == "full")  # another protocol's difference from the paper means nothing
                 for c in table.columns]
        ips, hours = _row_extras(summary, row)
        label = f"{row} (control)" if _is_control(table, row) else row
        train = [_fmt(v) for v in summary[(summary["row"] == row)]["train_top1"] if not math.isnan(v)]
        lines.append([label, *cells, "/".join(train) or dash, ips, hours.replace(DASH, dash)])
    return lines


def _notes(table: Table, summary: pd.DataFrame) -> list[str]:
    devices = sorted({d for ds in summary["devices"] for d in ds.split(", ") if d})
    done = int(summary["n_done"].sum())
    expected = int(summary["n_expected"].sum())
    caveat = ([f"Profile {table.profile!r} is not the paper's protocol: the paper's numbers are shown for orientation "
               "only, without a difference from ours."] if table.profile != "full" else [])
    return [*caveat,
        f"{done}/{expected} runs finished. Cells: mean ± sample std (ddof=1) over finished seeds; "
        f"[k/n] = k of the protocol's n seeds finished; {DASH} = none finished; n/a = not in the table; "
        "(paper mean, ours − paper).",
        "images/step = images per optimizer step (pair/two-view methods see more); device-h = wall time x "
        "world size summed over the row's finished runs." + (f" Devices: {', '.join(devices)}." if devices else ""),
        "[mixed] = the cell's seeds ran under different execution facts (device type or CPU thread count), "
        "which change the last bits of every step: re-run them under one setting to compare like with like. "
        "train top-1 = clean pass over the training set after the last epoch (mean over seeds, per column): "
        "whether the model memorises its data, the paper's regime. (control) = a row the paper lacks, for a "
        "compute-matched comparison.",
        f"Differences: Welch 95% confidence interval of the difference of means; {MARK} = the interval excludes 0. "
        "The paper's own differences use its published mean, SD and n = "
        f"{table.paper.n if table.paper else 0} through the same test.",
    ]


def _title(table: Table, metric: str) -> str:
    return f"{table.title or table.name} [{table.name}, profile {table.profile}; metric: {metric_label(metric)}]"


def _md(lines: list[list[str]]) -> str:
    lines = [[c.replace("|", r"\|") for c in l] for l in lines]
    widths = [max(len(l[i]) for l in lines) for i in range(len(lines[0]))]
    fmt = lambda l: "| " + " | ".join(c.ljust(w) for c, w in zip(l, widths)) + " |"  # noqa: E731
    rule = "|" + "|".join(("-" * (w + 1) + ":") if i else (":" + "-" * (w + 1)) for i, w in enumerate(widths)) + "|"
    return "\n".join([fmt(lines[0]), rule, *(fmt(l) for l in lines[1:])])


_TEX_ESCAPES = {"\\": r"\textbackslash{}", "&": r"\&", "%": r"\%", "$": r"\$", "#": r"\#", "_": r"\_",
                "{": r"\{", "}": r"\}", "~": r"\textasciitilde{}", "^": r"\textasciicircum{}"}


def _tex_escape(s: str) -> str:
    return "".join(_TEX_ESCAPES.get(ch, ch) for ch in s)


def _tex(table: Table, summary: pd.DataFrame, metric: str) -> str:
    """A plain LaTeX tabular (no packages needed), title and notes as comments above it."""
    lines = _grid(table, summary, comparisons(table, summary), "PMSYM", "MINUSSYM", "DASHSYM")
    fix = lambda s: (_tex_escape(s).replace("PMSYM", r"$\pm$").replace("MINUSSYM", "$-$")  # noqa: E731
                     .replace("DASHSYM", "--").replace("±", r"$\pm$").replace("−", "$-$").replace(DASH, "--"))
    body = [" & ".join(fix(c) for c in l) + r" \\" for l in lines]
    spec = "l" + "c" * len(table.columns) + "rrr"
    out = [f"% {_title(table, metric)}", *(f"% {n}" for n in _notes(table, summary)),
           rf"\begin{{tabular}}{{{spec}}}", r"\hline", body[0], r"\hline", *body[1:], r"\hline", r"\end{tabular}"]
    return "\n".join(out)


def _csv(table: Table, summary: pd.DataFrame) -> str:
    """Tidy long format: one line per cell with every number, for plotting or diffing."""
    df = summary.drop(columns="values")  # the per-seed values are in the run records
    df.insert(0, "profile", table.profile)
    df.insert(0, "table", table.name)
    df.insert(df.columns.get_loc("n_done"), "status",
              ["skipped" if s else ("missing" if n == 0 else ("partial" if n < e else "done"))
               for s, n, e in zip(df["skipped"], df["n_done"], df["n_expected"])])
    return df.to_csv(index=False, lineterminator="\n")


def render(table: Table, summary: pd.DataFrame, fmt: str = "md", metric: str | None = None) -> str:
    """The table in the paper's layout (md, tex) or as tidy long CSV.

    ``metric`` defaults to the one ``summary`` was built with; naming a different one is an error, so
    best-epoch numbers can never be printed under a last-epoch title.
    """
    _check_choice("fmt", fmt, FORMATS)
    used = set(summary["metric"]) if len(summary) else {metric or "last"}
    if len(used) != 1:
        raise ValueError(f"summary mixes metrics {sorted(used)}")
    built = used.pop()
    if metric is not None and metric != built:
        raise ValueError(f"summary was built with metric={built!r}, not {metric!r}; re-run summarize")
    metric = built
    if fmt == "csv":
        return _csv(table, summary)
    if fmt == "tex":
        return _tex(table, summary, metric) + "\n"
    comp = comparisons(table, summary)  # once: the cells' marks, the differences and the mean gains read it
    lines = _grid(table, summary, comp, "±", "-", DASH)
    diffs = ["", "#### Differences (Welch 95% CI)", "", _differences_md(comp)] if len(comp) else []
    gains = mean_gains(table, summary, comp)
    if len(gains):
        diffs += ["", "#### Mean gain across columns (percentile bootstrap 95% CI over seeds)", "",
                  "The unweighted mean over columns of each column's difference of means; 10,000 resamples draw "
                  "each cell's seeds with replacement, the columns stay fixed; a column counts when both its cells "
                  "have at least 2 finished seeds.", "", _gains_md(gains)]
    return "\n".join([f"### {_title(table, metric)}", "", _md(lines), *diffs, "", *_notes(table, summary)]) + "\n"


# -------------------------------------------------------------------------------------------------- figure
def _reference_row(table: Table) -> str | None:
    """The baseline row gains are measured against: 'Hard Label', else the first row training with `hard`."""
    if REFERENCE_ROW in table.rows:
        return REFERENCE_ROW
    return next((r for r, spec in table.rows.items() if (spec or {}).get("method") == "hard"), None)


def figure(table: Table, summary: pd.DataFrame, path: str | Path) -> Path:
    """One PNG: gain over the Hard Label row per column for every other row, ours beside the paper's.

    Without a Hard Label row it plots absolute accuracy, ours vs paper. Ours are solid bars, the
    paper's hatched bars of the same colour; missing values leave a gap.
    """
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    metric = str(summary["metric"].iloc[0]) if len(summary) else "last"
    get = {(r, c): (m, p, sd, psd) for r, c, m, p, sd, psd in
           zip(summary["row"], summary["column"], summary["mean"], summary["paper_mean"], summary["std"],
               summary["paper_std"])}
    ref = _reference_row(table)
    rows = [r for r in table.rows if r != ref] if ref else list(table.rows)
    cols = list(table.columns)
    from matplotlib.patches import Patch

    fig, ax = plt.subplots(figsize=(min(16.0, max(6.0, 1.5 * len(cols) + 0.15 * len(cols) * len(rows))), 5.0))
    width = 0.8 / max(1, 2 * len(rows))
    colors = list(plt.rcParams["axes.prop_cycle"].by_key()["color"])
    colors = colors if len(rows) <= len(colors) else list(plt.get_cmap("tab20").colors)
    for i, row in enumerate(rows):
        ours, theirs, err = [], [], []
        for c in cols:
            m, p, sd, _ = get.get((row, c), (math.nan,) * 4)
            if ref:
                rm, rp, rsd, _ = get.get((ref, c), (math.nan,) * 4)
                m, p, sd = m - rm, p - rp, math.hypot(sd, rsd)  # SD of a difference of independent means' seeds
            ours.append(m)
            theirs.append(p)
            err.append(sd)
        color = colors[i % len(colors)]
        for j, (vals, kind) in enumerate(((ours, "ours"), (theirs, "paper"))):
            xs = [k + (2 * i + j) * width - 0.4 + width / 2 for k in range(len(cols))]
            keep = [k for k, v in enumerate(vals) if not math.isnan(v)]
            yerr = None
            if kind == "ours" and any(not math.isnan(err[k]) for k in keep):
                yerr = [0.0 if math.isnan(err[k]) else err[k] for k in keep]
            ax.bar([xs[k] for k in keep], [vals[k] for k in keep], width, yerr=yerr, color=color,
                   alpha=1.0 if kind == "ours" else 0.45, hatch=None if kind == "ours" else "//",
                   edgecolor=color)
    ax.set_xticks(range(len(cols)))
    ax.set_xticklabels(cols, rotation=30 if len(cols) > 4 else 0, ha="right" if len(cols) > 4 else "center")
    if ref:
        ax.axhline(0, color="black", linewidth=0.8)
    else:  # absolute accuracies differ by tenths of a point: zoom in rather than start at 0
        vals = [v for v in list(summary["mean"]) + list(summary["paper_mean"]) if not math.isnan(v)]
        if vals:
            ax.set_ylim(math.floor(min(vals)) - 2, math.ceil(max(vals)) + 1)
    ax.set_ylabel(f"gain over {ref} (points)" if ref else metric_label(metric))
    ax.set_title(f"{table.name} ({table.profile}): {metric_label(metric)}", fontsize=10)
    # one colour per row, solid = ours, hatched = paper
    handles = [Patch(color=colors[i % len(colors)], label=row) for i, row in enumerate(rows)]
    handles += [Patch(facecolor="black", label="ours"),
                Patch(facecolor="white", edgecolor="black", hatch="//", label="paper")]
    ax.legend(handles=handles, fontsize=8, loc="upper left", bbox_to_anchor=(1.01, 1.0), frameon=False)
    fig.tight_layout()
    fig.savefig(path, dpi=120, format="png")
    plt.close(fig)
    return path


# -------------------------------------------------------------------------------------------------- report
def report(path: str | Path, profile: str = "full", overrides: Sequence[str] = (), fmt: str = "md",
           metric: str = "last", figure_dir: str | Path | None = None) -> str:
    """Everything for one table: the rendered text plus its figure (path mentioned in md/tex output).

    The CSV output stays pure CSV (it is for machines), so the figure path is not in it; the figure is
    still written, to ``figure_dir`` (default ``<out>/reports``) as ``<table>-<profile>.png``.
    """
    _check_choice("fmt", fmt, FORMATS)
    _check_choice("metric", metric, METRICS)
    table = load_table(path, profile, list(overrides))
    planned = expand(table)
    runs = collect(table, planned)
    out = Path(planned[0].cfg.out) if planned else Path(str(table.base.get("out", "runs")))
    fig_dir = Path(figure_dir) if figure_dir is not None else out / "reports"
    if table.metrics:  # Tables 10-12: rows x measured metrics (benchmarks/metric_table.py)
        from benchmarks.metric_table import collect_metrics, figure_metrics, render_metrics, summarize_metrics

        if metric != "last":
            raise ConfigError(f"{table.name} reports the metrics of its `metrics:` list; --metric {metric} applies "
                              "to top-1 tables only (drop it)")
        summary = summarize(table, runs, metric)  # for the records line below
        msummary = summarize_metrics(table, collect_metrics(table, planned))
        text = render_metrics(table, msummary, fmt)
        png = figure_metrics(table, msummary, fig_dir / f"{table.name}-{table.profile}-metrics.png")
    else:
        summary = summarize(table, runs, metric)
        text = render(table, summary, fmt, metric)
        png = figure(table, summary, fig_dir / f"{table.name}-{table.profile}-{metric}.png")
    done = int(summary["n_done"].sum())
    finished = runs[runs["done"]].drop_duplicates("run_id")
    envs = "; ".join(f"{e} ({n} run(s))" for e, n in finished["environment"].value_counts().sort_index().items())
    read = (f"Records: {done} finished run(s) of this table read from {out}, {finished['device_hours'].sum():.2f} "
            f"device-hours in all (distinct runs). Ran on: {envs}." if done else
            f"Records: no runs yet in {out} (run `ipsd sweep {path} --profile {table.profile}` first).")
    if fmt == "md":
        text += f"\n{read}\nFigure: {png}\n"
    elif fmt == "tex":
        text += f"% {read}\n% figure: {png}\n"
    return text


# ------------------------------------------------------------------------------------------------- against
AGAINST_LEVEL = 0.99  # two-sided: a cell whose change exceeds its 99% band is flagged (about 1 in 100 by chance)
EXACT_TOLERANCE = 0.005  # points: with no published spread (n < 2 or SD 0) a cell must reproduce to 2 decimals


def moved_cells(table: Table, fresh: pd.DataFrame, published: pd.DataFrame) -> pd.DataFrame:
    """Cells whose mean moved between a fresh sweep and the published records of the same table.

    Rule (the published cell's SD and n decide): the fresh mean m_f of n_f seeds has moved from the published
    m_p (SD s_p of n_p seeds) when |m_f − m_p| > t(0.995, n_p − 1) · s_p · sqrt(1/n_p + 1/n_f), i.e. outside the
    99% band of a difference of two means with the published spread; with no published spread (n_p < 2 or
    s_p = 0) it must match within 0.005 points (a CPU re-run with the same seeds and threads reproduces exactly).
    Cells missing on either side are listed as such, never silently passed."""
    from scipy.stats import t

    pub = {(s["row"], s["column"]): s for s in published.to_dict("records")}
    out = []
    for s in fresh.to_dict("records"):
        p = pub[(s["row"], s["column"])]
        if s["skipped"]:
            continue
        if not (s["n_done"] and p["n_done"]):
            out.append({**_key(s), "fresh": s["mean"], "published": p["mean"], "delta": math.nan, "band": math.nan,
                        "status": "missing " + ("fresh" if not s["n_done"] else "published")})
            continue
        delta = s["mean"] - p["mean"]
        spread = p["std"] if p["n_done"] >= 2 and not math.isnan(p["std"]) and p["std"] > 0 else math.nan
        band = (EXACT_TOLERANCE if math.isnan(spread) else
                t.ppf(0.5 + AGAINST_LEVEL / 2, p["n_done"] - 1) * spread * math.sqrt(1 / p["n_done"] + 1 / s["n_done"]))
        out.append({**_key(s), "fresh": s["mean"], "published": p["mean"], "delta": delta, "band": band,
                    "status": "moved" if abs(delta) > band else "ok"})
    return pd.DataFrame(out, columns=["row", "column", "fresh", "published", "delta", "band", "status"])


def _key(s: dict) -> dict:
    return {"row": s["row"], "column": s["column"]}


def against(path: str | Path, published: str | Path, profile: str = "full", overrides: Sequence[str] = (),
            metric: str = "last") -> tuple[str, bool]:
    """``ipsd report ... --against DIR``: the table's fresh records (``out``) against the published ones in DIR
    (the same run ids); returns the comparison as Markdown and whether every cell held."""
    table = load_table(path, profile, list(overrides))
    planned = expand(table)
    fresh = summarize(table, collect(table, planned), metric)
    pub_table = load_table(path, profile, [*(o for o in overrides if not o.startswith("out=")), f"out={published}"])
    pub = summarize(pub_table, collect(pub_table), metric)
    cells = moved_cells(table, fresh, pub)
    bad = cells[cells["status"] != "ok"]
    lines = [["row", "column", "fresh", "published", "fresh − published", "allowed ±", "status"]]
    for c in cells.to_dict("records"):
        lines.append([c["row"], c["column"], _fmt(c["fresh"]) if not math.isnan(c["fresh"]) else DASH,
                      _fmt(c["published"]) if not math.isnan(c["published"]) else DASH,
                      f"{c['delta']:+.3f}" if not math.isnan(c["delta"]) else DASH,
                      f"{c['band']:.3f}" if not math.isnan(c["band"]) else DASH, c["status"]])
    head = (f"### {table.name} [{profile}; {metric_label(metric)}]: {planned[0].cfg.out if planned else '?'} against "
            f"{published}")
    verdict = (f"{len(bad)} of {len(cells)} cell(s) moved or are missing." if len(bad) else
               f"All {len(cells)} cells hold.")
    rule = (f"Rule: a cell moved when |fresh − published| exceeds t({0.5 + AGAINST_LEVEL / 2:.3f}, n_p − 1) · SD_p · "
            f"sqrt(1/n_p + 1/n_f) (SD_p, n_p: the published cell's); with no published spread, {EXACT_TOLERANCE} points.")
    return "\n".join([head, "", _md(lines), "", verdict, rule]) + "\n", len(bad) == 0
