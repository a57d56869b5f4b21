"""A paper table as a grid of runs: rows (methods) x columns (models) x seeds, from one YAML.

Every cell's runs are ordinary ``ipsd train`` configs. Each replicate's seed is derived from the
run's identity (everything but the seed), so the same method/model/recipe gets the same seeds in
every table: Hard Label ResNet18 in Tables 3, 4 and 15 is one set of runs, trained once.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ipsd.config import ConfigError, RunConfig, apply_overrides, build, load_yaml
from ipsd.registry import closest
from ipsd.resolve import Resolved, load_methods, resolve
from ipsd.rng import derive_seed
from ipsd.runs import RunFolder

# Cell keys that describe the table, not the run: `paper_key` (the paper CSV's label), `teacher_run` (a column's
# teacher recipe), `control` (a row the paper lacks, shown as a control with paper value "–").
ROW_ONLY_KEYS = ("paper_key", "teacher_run", "control")
TABLE_KEYS = {"name", "title", "paper", "seeds", "base", "rows", "columns", "skip", "profiles", "metric", "extends",
              "evaluate", "metrics", "notes"}
PROFILE_KEYS = {"seeds", "base", "rows", "columns", "skip"}


@dataclass(frozen=True)
class PaperRef:
    """Where the paper's numbers for this table are and how its CSV columns map onto the grid."""

    file: str
    row: str = "method"
    column: str | list[str] = "model"
    mean: str = "top1_mean"
    std: str | None = "top1_std"
    train_mean: str | None = None  # the CSV column of the paper's train accuracy (metric "train"), if it has one
    n: int = 3  # runs behind each published mean (the IPS paper: mean ± std of 3 runs), for the Welch test
    metric: str | None = None  # long-format CSVs (Tables 10-12): the column naming each line's metric


@dataclass
class Table:
    name: str
    title: str
    paper: PaperRef | None  # None: a table with no published counterpart (rendered without paper values)
    seeds: int
    base: dict[str, Any]
    rows: dict[str, dict[str, Any]]
    columns: dict[str, dict[str, Any]]
    skip: set[tuple[str, str]] = field(default_factory=set)
    profile: str = "full"
    evaluate: list[str] = field(default_factory=list)  # suites of `ipsd evaluate` the sweep runs on finished runs
    metrics: list[dict[str, Any]] = field(default_factory=list)  # {label, suite, key, paper}: eval metrics reported
    notes: list[str] = field(default_factory=list)  # printed under the rendered table (facts about the paper's numbers)


@dataclass
class PlannedRun:
    row: str
    column: str
    replicate: int
    resolved: Resolved

    @property
    def cfg(self) -> RunConfig:
        return self.resolved.cfg

    @property
    def run_id(self) -> str:
        return self.resolved.run_id

    @property
    def run(self) -> RunFolder:
        return self.resolved.folder

    @property
    def folder(self) -> Path:
        return self.run.path


def _select(full: dict[str, dict], given: Any, what: str) -> dict[str, dict]:
    """A profile's rows/columns: a list of labels selects; a mapping selects and overrides specs."""
    labels = list(given) if isinstance(given, (list, dict)) else None
    if labels is None:
        raise ConfigError(f"profile {what} must be a list of labels or a mapping")
    out = {}
    for label in labels:
        if label not in full and not isinstance(given, dict):
            raise ConfigError(f"profile selects unknown {what[:-1]} {label!r}; did you mean {closest(label, list(full))}?")
        extra = given[label] if isinstance(given, dict) else {}
        out[label] = _merge(full.get(label, {}), extra or {})
    return out


def _merge(a: dict, b: dict) -> dict:
    """Deep-merge mapping b into a copy of a (method_args merge key by key)."""
    out = copy.deepcopy(a)
    for k, v in b.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def _extend(raw: dict[str, Any], path: Path, seen: tuple[Path, ...] = ()) -> dict[str, Any]:
    """A table YAML with its ``extends:`` parent (a path relative to this file, the working directory or the repo)
    merged in: the child's keys win; ``rows``, ``columns``, ``profiles`` and ``base`` merge label by label, and a
    label given as ``null`` removes the parent's entry. Runs shared with the parent are the same runs."""
    parent_ref = raw.get("extends")
    if parent_ref is None:
        return raw
    here = path.resolve()
    candidates = [here.parent / parent_ref, Path(parent_ref), Path(__file__).resolve().parents[1] / parent_ref]
    parent_path = next((p.resolve() for p in candidates if p.is_file()), None)
    if parent_path is None:
        raise ConfigError(f"{path}: extends {parent_ref!r}, which does not exist (looked beside {path.name}, in the "
                          "working directory and in the repository)")
    if parent_path in seen or parent_path == here:
        raise ConfigError(f"{path}: extends {parent_ref!r}, which extends it back (a cycle)")
    parent = _extend(load_yaml(parent_path), parent_path, (*seen, here))
    merged = {k: v for k, v in parent.items() if k not in ("extends", "name", "title")}
    for key, value in raw.items():
        if key == "extends":
            continue
        if key in ("rows", "columns", "profiles", "base") and isinstance(value, dict):
            both = _merge(merged.get(key) or {}, {k: v for k, v in value.items() if v is not None})
            merged[key] = {k: v for k, v in both.items() if value.get(k, "keep") is not None}
        else:
            merged[key] = value
    return merged


def load_table(path: str | Path, profile: str = "full", overrides: list[str] = ()) -> Table:
    """Read a table YAML (and its ``extends:`` parent), apply a profile and ``key=value`` overrides (these go into
    every run)."""
    raw = _extend(load_yaml(path), Path(path))
    unknown = set(raw) - TABLE_KEYS
    if unknown:
        k = sorted(unknown)[0]
        raise ConfigError(f"{path}: unknown key {k!r}; did you mean {closest(k, sorted(TABLE_KEYS))}?")
    profiles = raw.get("profiles") or {}
    if profile != "full" and profile not in profiles:
        raise ConfigError(f"{path}: no profile {profile!r}; available: full, {', '.join(profiles)}")
    prof = profiles.get(profile) or {}
    if set(prof) - PROFILE_KEYS:
        k = sorted(set(prof) - PROFILE_KEYS)[0]
        raise ConfigError(f"{path}: profile {profile!r} has unknown key {k!r}; allowed {sorted(PROFILE_KEYS)}")
    rows = _select(raw["rows"], prof["rows"], "rows") if "rows" in prof else dict(raw["rows"])
    columns = _select(raw["columns"], prof["columns"], "columns") if "columns" in prof else dict(raw["columns"])
    base = apply_overrides(_merge(raw.get("base") or {}, prof.get("base") or {}), list(overrides))
    skip = {tuple(s) for s in prof.get("skip", raw.get("skip") or [])}
    seeds = int(prof.get("seeds", raw.get("seeds", 3)))
    if seeds < 1:
        raise ConfigError(f"{path}: seeds must be >= 1")
    evaluate, metrics = _evaluations(raw, path)
    notes = raw.get("notes") or []
    if not (isinstance(notes, list) and all(isinstance(n, str) for n in notes)):
        raise ConfigError(f"{path}: notes must be a list of strings")
    return Table(name=raw.get("name", Path(path).stem), title=raw.get("title", ""),
                 paper=build(PaperRef, raw["paper"], "paper.") if raw.get("paper") else None, seeds=seeds, base=base, rows=rows,
                 columns=columns, skip=skip, profile=profile, evaluate=evaluate, metrics=metrics,
                 notes=list(notes))


def _evaluations(raw: dict[str, Any], path: str | Path) -> tuple[list[str], list[dict[str, Any]]]:
    """``evaluate:`` (suite names) and ``metrics:`` (each {label, suite, key, paper}, its suite among ``evaluate``)."""
    from ipsd.evaluation import SUITES

    evaluate = list(raw.get("evaluate") or [])
    bad = [s for s in evaluate if s not in SUITES]
    if bad:
        raise ConfigError(f"{path}: evaluate: unknown suite {bad[0]!r}; use {', '.join(SUITES)}")
    metrics = list(raw.get("metrics") or [])
    for m in metrics:
        if not isinstance(m, dict) or set(m) - {"label", "suite", "key", "paper"} or m.get("suite") not in evaluate \
                or not isinstance(m.get("key"), str):
            raise ConfigError(f"{path}: metrics: {m!r} must be {{label, suite, key, paper}} with key a metric name "
                              f"and suite one of evaluate: {evaluate}")
    return evaluate, metrics


def replicate_seed(identity: dict[str, Any], replicate: int) -> int:
    """Seed of replicate r of a run: a function of what the run computes, never of the table it is in."""
    ident = {k: v for k, v in identity.items() if k != "seed"}
    return derive_seed("replicate", sorted(ident.items(), key=lambda kv: kv[0]).__repr__(), replicate) % 2**31


def cell_config(table: Table, row: str, column: str) -> dict[str, Any]:
    """RunConfig values of a cell: base < column < row (a row's method_args merge with the column's)."""
    spec = _merge(_merge(table.base, table.columns[column]), table.rows[row])
    for key in ROW_ONLY_KEYS:
        spec.pop(key, None)
    return spec


def _replicates(values: dict[str, Any], seeds: int) -> list[Resolved]:
    probe = resolve(build(RunConfig, {**values, "seed": 0}))
    return [resolve(build(RunConfig, {**values, "seed": replicate_seed(probe.cfg.identity(), r)}))
            for r in range(seeds)]


def teacher_run(table: Table, column: str) -> PlannedRun | None:
    """The column's teacher (``teacher_run:`` = a Hard Label recipe over the table's base), first replicate."""
    recipe = table.columns[column].get("teacher_run")
    if recipe is None:
        return None
    values = _merge(_merge(table.base, {"method": "hard"}), recipe)
    return PlannedRun("teacher", column, 0, _replicates(values, 1)[0])


def expand(table: Table) -> list[PlannedRun]:
    """Every run of the table, in row-major order, with derived seeds (teachers excluded: see teachers())."""
    planned = []
    for row in table.rows:
        for column in table.columns:
            if (row, column) in table.skip:
                continue
            values = cell_config(table, row, column)
            where = f"{table.name} [{row} / {column}]: "
            try:
                method = load_methods().get(values.get("method", "ips"))
                teacher = teacher_run(table, column) if method.needs_teacher else None
                if teacher is not None:
                    values["teacher"] = str(teacher.folder)
                planned += [PlannedRun(row, column, r, res) for r, res in enumerate(_replicates(values, table.seeds))]
            except (ConfigError, KeyError) as e:
                raise ConfigError(where + str(e.args[0] if isinstance(e, KeyError) else e)) from None
    return planned


def teachers(table: Table) -> list[PlannedRun]:
    """The teacher runs the table's teacher-based rows need (trained before the students)."""
    needed = {}
    for column in table.columns:
        t = teacher_run(table, column)
        if t is not None:
            needed.setdefault(t.run_id, t)
    return list(needed.values())


def paper_key(table: Table, column: str) -> str:
    """The label the paper's CSV uses for a column (defaults to the column label)."""
    return table.columns[column].get("paper_key", column)
