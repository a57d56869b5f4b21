"""The regression gate (``ipsd regress``): a fixed, tiny, deterministic run of every registered method, compared
with its golden trajectory in ``results/regress/<entry>.json``.

The run: resnet8 on real CIFAR-10, the first ``per_class=4`` train images of each class (40) in ONE batch of 40
(test: the first 5 per class), so each of the ``epochs=8`` epochs is one optimizer step (the LR schedule, scaled to
8 epochs, decays after steps 5, 6, 7) and the record's per-epoch loss means are per-step values; LR 0.002, seed 0,
CPU, one torch thread. Teacher methods get a teacher trained the same way: the ``hard`` entry's run, passed as
``teacher=``. An entry is a method with fixed ``method_args``: every method's defaults, plus the options the paper
tables and the flagged code/paper forms use (``ENTRY_OPTIONS``).

A golden holds, per step, every loss term and every logged scalar of the record's ``curve`` (LR, p_r, ...,
test/train accuracies); the final test top-1; each parameter's step-1 gradient norm (the SGD momentum buffer of a
checkpoint taken after step 1); and the final model + method state: its sha256 over the tensors' bytes in sorted
key order, and each tensor's L2 norm. The gate recomputes each entry in a temporary folder and fails when any value
moved by more than its tolerance (below; measured with ``benchmarks/regress_calibration.py``). The LR is 0.002, not
the recipe's 0.05: at 0.05, a rounding difference grew ~10x per step (VRM's ISV term moved 40% by step 5 under 2
threads), where no tolerance separates noise from a change.
"""
from __future__ import annotations

import contextlib
import hashlib
import io
import math
import sys
import tempfile
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from .errors import ConfigError, IpsdError
from .registry import closest
from .runs import RunFolder, atomic_write_json, cpu_model, read_json, versions

GOLDEN_DIR = Path(__file__).resolve().parents[1] / "results" / "regress"
GOLDEN_FORMAT = 2  # 2: with the step-1 gradient norms (grad1)

# The fixed run every entry trains (operational keys device/threads/progress included: they decide the numbers
# bit for bit on CPU, see ipsd.engine.execution).
BASE: dict[str, Any] = {"model": "resnet8", "dataset": "cifar10", "per_class": 4, "test_per_class": 5, "epochs": 8,
                        "batch_size": 40, "lr": 0.002, "seed": 0, "device": "cpu", "threads": 1, "progress": False}

# Tolerances (results/regress_noise.json, written by `python -m benchmarks.regress_calibration`). Each sits between
# the noise floor, the largest move under changes that are not behaviour changes (2 threads instead of 1, a
# mathematically equal KL, the loss terms summed in reverse, this machine's torch limited to AVX2 kernels or to
# scalar ATen kernels with SSE4 oneDNN/MKL, standing in for other CPUs), and the weakest planted behaviour change
# (benchmarks/regress_calibration.PLANTS). Figures: the largest noise move over the entries at factor 1 / the weakest
# plant's largest move. Later steps move more than early ones: a rounding difference grows as training goes on.
LOSS_RTOL = 1e-3  # loss terms and logged scalars, relative: noise 3.9e-4 (SP, 2 threads) / 3.5e-3 (CS-KD's wrong
#                   detach, step 7)
LOSS_FLOOR = 1e-4  # a loss term below this share of the step's summed |terms| is compared relative to that floor:
#                    its own relative change is cancellation noise (DDGSD's MMD term is ~1e-9 here)
NORM_FLOOR = 1e-2  # likewise a tensor norm below this share of the norm over all tensors (a BN bias, its gradient)
GRAD_RTOL = 4e-3  # step-1 gradient norms, relative: noise 1.6e-3 (Hard Label, scalar kernels) / 1.3e-2 (IPS T=3;
#                   DLB's carried batch first acts at step 2)
WEIGHTS_RTOL = 1e-3  # final state norms, relative: noise 7.3e-5; a backstop (the plants move them 1.7e-5 to 6.4e-3)
ACCURACY_ATOL = 2.0  # accuracies in points: one image of the 50-image test set; none moved under noise at factor 1
ABS_FLOOR = 1e-12  # least scale of a relative change (a golden of exactly 0)
# Methods whose tolerances are all multiplied, from their measured noise. VRM keeps the edges under a percentile of
# their joint entropy, so a rounding difference that moves an edge across it changes the loss by a step (VRM's ISV
# term moved 2.8e-3 under AVX2 kernels); RKD and AT weight their feature terms by 25-50 and 1000 and amplify rounding
# the most (RKD's term moved 5.6e-3, AT's paper form 1.8e-3 and one test image, under scalar kernels).
NOISY_METHODS: dict[str, float] = {"vrm": 10.0, "rkd": 10.0, "at": 3.0}


@dataclass(frozen=True)
class Entry:
    """One golden: a registered method under fixed ``method_args``."""

    name: str
    method: str
    method_args: dict[str, Any] = field(default_factory=dict)
    why: str = ""
    plugins: tuple[str, ...] = ()  # the user's modules registering ``method`` (a method outside ``baselines``)

    @property
    def update_command(self) -> str:
        where = f" --plugins {' '.join(self.plugins)} --goldens DIR" if self.plugins else ""
        return f"ipsd regress --methods {self.name}{where} --update"


# Options the paper tables (benchmarks/table*.yaml) and the baselines' flagged code/paper forms use, each its own
# entry beside the method's defaults.
ENTRY_OPTIONS: tuple[Entry, ...] = (
    Entry("ips-constant", "ips", {"pr_schedule": "constant", "p_r": 0.5}, "Tables 1, 2, 15: constant p_r"),
    Entry("ips-noswap", "ips", {"pr_schedule": "constant", "p_r": 0.0}, "Table 1: IPS without swap"),
    Entry("ips-alpha0", "ips", {"alpha": 0.0}, "Tables 1, 3, 15 control: IPS without KD"),
    Entry("ips-grid2", "ips", {"grid": 2, "pr_schedule": "constant", "p_r": 0.5}, "Table 2: 2x2 grid"),
    Entry("cskd-lambda3", "cskd", {"lambda_cls": 3.0}, "Table 5: fine-grained lambda"),
    Entry("dlb-paper", "dlb", {"form": "paper"}, "the paper's one-call form"),
    Entry("tfkd_reg-paper", "tfkd_reg", {"form": "paper"}, "the paper's equation"),
    Entry("ls-others", "ls", {"form": "others"}, "the TF-KD repository's smoothing"),
    Entry("at-paper", "at", {"mode": "paper"}, "the paper's Eq. 2"),
    Entry("byot-official_v1", "byot", {"form": "official_v1"}, "the official code's first version"),
    Entry("byot-reimpl", "byot", {"form": "reimpl"}, "the re-implementation"),
    Entry("crd-relax", "crd", {"mode": "relax"}, "same-class positive"),
    Entry("ips_mix-cutout", "ips_mix", {"pr_schedule": "constant", "mix": "cutout"}, "Table 13: IPS+CutOut"),
    Entry("ips_mix-mixup", "ips_mix", {"pr_schedule": "constant", "mix": "mixup"}, "Table 13: IPS+MixUp"),
)
TEACHER_ENTRY = "hard"  # its run is every teacher method's teacher


class GateFailed(IpsdError):
    """A recomputed trajectory left its golden's tolerance, or an entry has no golden."""


def registered_methods(plugins: tuple[str, ...] = ()) -> list[str]:
    """The methods the gate covers: those the ``baselines`` package registers (tests may register others); with
    ``plugins``, those the plugin modules register instead (a user's methods, whose goldens live in their repo)."""
    from .resolve import import_plugin, load_methods

    reg = load_methods(plugins)
    if plugins:
        modules = {import_plugin(p).split("@")[0] for p in plugins}
        return [n for n in reg.names() if reg.get(n).__module__.removeprefix("ipsd_plugin_") in modules]
    return [n for n in reg.names() if reg.get(n).__module__.startswith("baselines.")]


def entries(plugins: tuple[str, ...] = ()) -> list[Entry]:
    """Every entry: each registered method with its defaults, then the options of ``ENTRY_OPTIONS``; with
    ``plugins``, each method of the plugins with its defaults."""
    methods = registered_methods(plugins)
    if plugins:
        return [Entry(m, m, {}, "defaults", tuple(plugins)) for m in methods]
    return [Entry(m, m, {}, "defaults") for m in methods] + [e for e in ENTRY_OPTIONS if e.method in methods]


def select(names: list[str] | None, exact: bool = False, plugins: tuple[str, ...] = ()) -> list[Entry]:
    """Entries named (an entry name, or a method name for all its entries; ``exact``: entry names only); None: all."""
    every = entries(plugins)
    if not names:
        return every
    picked: list[Entry] = []
    for name in names:
        hits = [e for e in every if name == e.name or (not exact and name == e.method)]
        if not hits:
            raise ConfigError(f"--methods: no entry {name!r}; did you mean {closest(name, [e.name for e in every])}?")
        picked += [e for e in hits if e not in picked]
    return picked


# ------------------------------------------------------------------------------------------------ computing

def run_config(entry: Entry, out: Path, data_root: str | None, teacher: Path | None = None,
               overrides: dict[str, Any] | None = None):
    """The fixed run of ``entry`` (``overrides`` replace BASE keys: the calibration's 2-thread run)."""
    from .config import RunConfig, build

    values = {**BASE, **(overrides or {}), "method": entry.method, "method_args": dict(entry.method_args),
              "data_root": data_root, "out": str(out), "plugins": list(entry.plugins)}
    if teacher is not None:
        values["teacher"] = str(teacher)
    return build(RunConfig, values)


def state_fingerprint(state: dict[str, Any]) -> dict[str, Any]:
    """sha256 over every tensor's key, dtype, shape and bytes in sorted key order (other leaves by repr), and each
    tensor's L2 norm (float64). Nested dicts (a method's extra state) are flattened to dotted keys."""
    import torch

    flat: dict[str, Any] = {}

    def walk(prefix: str, obj: Any) -> None:
        if isinstance(obj, dict):
            for k, v in obj.items():
                walk(f"{prefix}.{k}" if prefix else str(k), v)
        else:
            flat[prefix] = obj

    walk("", state)
    h = hashlib.sha256()
    norms: dict[str, float] = {}
    for key in sorted(flat):
        v = flat[key]
        h.update(key.encode())
        if isinstance(v, torch.Tensor):
            t = v.detach().cpu().contiguous()
            h.update(f"{t.dtype}{tuple(t.shape)}".encode())
            h.update(t.view(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
            norms[key] = float(t.double().norm())
        else:
            h.update(repr(v).encode())
    return {"sha256": h.hexdigest(), "norms": norms}


def series_of(curve: list[dict[str, Any]]) -> dict[str, list[float | None]]:
    """Per-step series from a record's curve (one step per epoch): ``loss.<term>`` and every other numeric field
    but ``epoch``; None where an epoch lacks the field (``train_top1`` exists after the last epoch only)."""
    names: list[str] = []
    rows: list[dict[str, float]] = []
    for rec in curve:
        row = {f"loss.{k}": float(v) for k, v in rec.get("loss", {}).items()}
        row.update({k: float(v) for k, v in rec.items()
                    if k not in ("epoch", "loss") and isinstance(v, (int, float)) and not isinstance(v, bool)})
        rows.append(row)
        names += [k for k in row if k not in names]
    return {n: [r.get(n) for r in rows] for n in sorted(names)}


def first_step_gradients(ckpt: dict[str, Any]) -> dict[str, float]:
    """L2 norm of each parameter's SGD momentum buffer in a checkpoint written after step 1, i.e. of that step's
    gradient plus weight decay; keyed ``<index in the optimizer>:<shape>`` (the optimizer keeps no names)."""
    out = {}
    for i, s in sorted(ckpt["optimizer"]["state"].items()):
        buf = s.get("momentum_buffer")
        if buf is not None:
            out[f"{int(i):03d}:{'x'.join(map(str, buf.shape))}"] = float(buf.double().norm())
    return out


def trajectory(entry: Entry, run: Path, grad1: dict[str, float]) -> dict[str, Any]:
    """What a finished run of ``entry`` computed, in the golden's layout (without the provenance)."""
    folder = RunFolder(run)
    rec = folder.read_result()
    if rec is None:
        raise IpsdError(f"{run}: the run of entry {entry.name} did not finish (no result.json)")
    ckpt = folder.load_checkpoint()
    return {"entry": entry.name, "method": entry.method, "method_args": rec.config.get("method_args", {}),
            "plugin_ids": list(rec.config.get("plugin_ids") or []),
            "series": series_of(rec.curve), "top1": rec.top1(), "grad1": grad1,
            "state": state_fingerprint({"model": ckpt["model"], "method": ckpt.get("method", {})})}


def compute(selected: list[Entry], data_root: str | None, out: Path, overrides: dict[str, Any] | None = None,
            on_done=None) -> dict[str, dict[str, Any]]:
    """Train each entry's fixed run under ``out`` (the teacher first where one is needed) and return the
    trajectories by entry name. Each run stops after step 1 (``stop_after=1``: its checkpoint holds that step's
    gradients) and resumes to the end, exactly as an uninterrupted run on CPU. The engine's per-epoch log is
    swallowed; the process's thread count is restored."""
    import dataclasses

    import torch

    from .engine import train

    def quiet_train(cfg) -> Path:
        with contextlib.redirect_stderr(io.StringIO()):
            return train(cfg)

    threads = torch.get_num_threads()
    teacher_entry = Entry(TEACHER_ENTRY, TEACHER_ENTRY)
    teacher: Path | None = None
    result: dict[str, dict[str, Any]] = {}
    try:
        from .resolve import load_methods

        reg = load_methods(tuple(p for e in selected for p in e.plugins))
        for entry in selected:
            start = time.perf_counter()
            if reg.get(entry.method).needs_teacher and teacher is None:
                teacher = quiet_train(run_config(teacher_entry, out, data_root, overrides=overrides))
            cfg = run_config(entry, out, data_root, teacher if reg.get(entry.method).needs_teacher else None,
                             overrides)
            first = quiet_train(dataclasses.replace(cfg, stop_after=1))
            grad1 = first_step_gradients(RunFolder(first).load_checkpoint())
            result[entry.name] = trajectory(entry, quiet_train(cfg), grad1)
            if on_done is not None:
                on_done(entry, time.perf_counter() - start)
    finally:
        torch.set_num_threads(threads)
    return result


# ----------------------------------------------------------------------------------------------- comparing

def is_accuracy(name: str) -> bool:
    """Accuracy series (points, compared absolutely): the engine's ``top1``, ``top5``, ``train_top1[_view<k>]``."""
    return name in ("top1", "top5") or name.startswith("train_top1")


@dataclass(frozen=True)
class Moved:
    """One quantity of one entry that differs from its golden: its largest change over the steps."""

    entry: str
    quantity: str  # loss.<term>, a logged scalar, an accuracy, top1 (final), grad1.<param> (step-1 gradient norm),
    #                state.<tensor> (final norm), or a structural note
    step: int | None  # 1-based step (= epoch) of the largest change; None for final values
    golden: float | None
    now: float | None
    change: float  # relative, or points for accuracies; inf when a value appeared or vanished
    tolerance: float

    @property
    def failed(self) -> bool:
        return not self.change <= self.tolerance

    @property
    def unit(self) -> str:
        return "pt" if is_accuracy(self.quantity.removesuffix(" (final)")) else "rel"


def _change(golden: float | None, now: float | None, scale: float | None) -> float:
    """|now - golden| / scale (``scale`` None: absolute); inf when a value appeared, vanished or became NaN."""
    if golden is None or now is None:
        return 0.0 if golden is None and now is None else math.inf
    if math.isnan(golden) or math.isnan(now):
        return 0.0 if math.isnan(golden) and math.isnan(now) else math.inf
    diff = abs(now - golden)
    return diff if scale is None else diff / max(scale, ABS_FLOOR)


def _series_scales(gs: dict[str, list[float | None]], q: str) -> list[float | None]:
    """What a step's change of series ``q`` is relative to: the golden value; for a loss term, at least
    LOSS_FLOOR x the step's summed |loss terms|; None (absolute) for accuracies."""
    if is_accuracy(q):
        return [None] * len(gs[q])
    if not q.startswith("loss."):
        return [abs(v) if v is not None else None for v in gs[q]]
    terms = [v for k, v in gs.items() if k.startswith("loss.")]
    return [max(abs(v), LOSS_FLOOR * sum(abs(t[i]) for t in terms if t[i] is not None)) if v is not None else None
            for i, v in enumerate(gs[q])]


def _norms(moved: list[Moved], entry: str, prefix: str, g: dict[str, float], n: dict[str, float], tol: float,
           step: int | None) -> None:
    """Per-tensor norms, each relative to max(its golden norm, NORM_FLOOR x the golden's norm over all tensors)."""
    floor = NORM_FLOOR * math.sqrt(sum(v * v for v in g.values()))
    for key in sorted({*g, *n}):
        c = _change(g.get(key), n.get(key), max(abs(g.get(key) or 0.0), floor))
        if c > 0:
            moved.append(Moved(entry, f"{prefix}.{key}", step, g.get(key), n.get(key), c, tol))


def compare(golden: dict[str, Any], now: dict[str, Any]) -> list[Moved]:
    """Every quantity of ``now`` that moved from ``golden``, with its largest change and its tolerance (passes
    included: ``Moved.failed`` says which break the gate). Bit-identical states with equal series: nothing."""
    name, k = golden["entry"], NOISY_METHODS.get(golden["method"], 1.0)
    moved: list[Moved] = []
    gs, ns = golden["series"], now["series"]
    for q in sorted({*gs, *ns}):
        g, n = gs.get(q, []), ns.get(q, [])
        if len(g) != len(n):
            moved.append(Moved(name, q, None, None, None, math.inf, 0.0))
            continue
        changes = [_change(a, b, sc) for a, b, sc in zip(g, n, _series_scales(gs, q))]
        worst = max(range(len(changes)), key=changes.__getitem__, default=None)
        if worst is not None and changes[worst] > 0:
            moved.append(Moved(name, q, worst + 1, g[worst], n[worst], changes[worst],
                               k * (ACCURACY_ATOL if is_accuracy(q) else LOSS_RTOL)))
    c = _change(golden["top1"], now["top1"], None)
    if c > 0:
        moved.append(Moved(name, "top1 (final)", None, golden["top1"], now["top1"], c, k * ACCURACY_ATOL))
    _norms(moved, name, "grad1", golden["grad1"], now["grad1"], k * GRAD_RTOL, 1)
    gst, nst = golden["state"], now["state"]
    if gst["sha256"] != nst["sha256"]:
        before = len(moved)
        _norms(moved, name, "state", gst["norms"], nst["norms"], k * WEIGHTS_RTOL, None)
        if len(moved) == before:  # other bits (a sign of zero, a permutation) but every norm equal: shown, not failed
            moved.append(Moved(name, "state (sha256 only)", None, None, None, 0.0, 0.0))
    return moved


def config_notes(golden: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """Resolved method_args that differ from the golden's: context for a move (a changed default), not a failure."""
    g, n = golden.get("method_args", {}), now.get("method_args", {})
    notes = [f"{golden['entry']}: method_args.{k} {g.get(k, '(absent)')!r} -> {n.get(k, '(absent)')!r}"
             for k in sorted({*g, *n}) if g.get(k) != n.get(k)]
    if golden.get("plugin_ids", []) != now.get("plugin_ids", []):  # the plugin's source changed since its golden
        notes.append(f"{golden['entry']}: plugin {golden.get('plugin_ids')} -> {now.get('plugin_ids')}")
    return notes


def summarise(moved: list[Moved], per_entry: int = 6) -> list[Moved]:
    """The rows worth printing, per entry: every failure, else its largest passing moves (at most ``per_entry``),
    nearest their tolerance first; the per-tensor rows (grad1., state.) as the worst one of each, with a count."""
    rows: list[Moved] = []
    for entry in dict.fromkeys(m.entry for m in moved):
        mine = sorted((m for m in moved if m.entry == entry),
                      key=lambda m: (not m.failed, -m.change / max(m.tolerance, ABS_FLOOR)))
        mine = [m for m in mine if m.failed] or mine[:per_entry]
        for prefix in ("grad1.", "state."):
            tensors = [m for m in mine if m.quantity.startswith(prefix)]
            if len(tensors) > 1:
                worst = replace(tensors[0], quantity=f"{tensors[0].quantity} (+{len(tensors) - 1} more)")
                mine = [worst if m is tensors[0] else m for m in mine if m is tensors[0] or m not in tensors]
        rows += mine
    return rows


def table(rows: list[Moved]) -> str:
    """Fixed-width table: entry, quantity, step, golden, now, change, tolerance, verdict."""
    def num(v: float | None) -> str:
        return "-" if v is None else f"{v:.7g}"

    head = ("entry", "quantity", "step", "golden", "now", "change", "tolerance", "")
    body = [(m.entry, m.quantity, "-" if m.step is None else str(m.step), num(m.golden), num(m.now),
             f"{m.change:.2e} {m.unit}", f"{m.tolerance:.0e}", "FAIL" if m.failed else "ok") for m in rows]
    widths = [max(len(r[i]) for r in (head, *body)) for i in range(len(head))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in (head, *body))


# ------------------------------------------------------------------------------------------------ goldens

def read_golden(entry: Entry, folder: Path = GOLDEN_DIR) -> dict[str, Any] | None:
    """The golden of ``entry`` in ``folder``: None when there is none, IpsdError when unreadable or another format."""
    path = folder / f"{entry.name}.json"
    if not path.is_file():
        return None
    data = read_json(path, "regression golden", f"recreate it with `{entry.update_command}`")
    if not isinstance(data, dict) or data.get("format") != GOLDEN_FORMAT or data.get("entry") != entry.name:
        raise IpsdError(f"{path}: not a format-{GOLDEN_FORMAT} golden of entry {entry.name}; recreate it with "
                        f"`{entry.update_command}`")
    return data


def golden_record(traj: dict[str, Any], entry: Entry) -> dict[str, Any]:
    """A trajectory with its provenance: what it was made on and the fixed run it comes from."""
    import torch

    return {**traj, "format": GOLDEN_FORMAT, "why": entry.why, "run": {**BASE, "method": entry.method,
            "method_args_given": dict(entry.method_args)},
            "made_on": {"versions": versions(), "cpu": cpu_model(), "torch_threads": BASE["threads"],
                        "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}}


@dataclass
class Outcome:
    """One gate invocation: what moved (all entries), config notes, entries without golden, stale goldens."""

    moved: list[Moved] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    missing: list[Entry] = field(default_factory=list)
    stale: list[Path] = field(default_factory=list)
    checked: list[str] = field(default_factory=list)

    @property
    def failures(self) -> list[Moved]:
        return [m for m in self.moved if m.failed]

    @property
    def ok(self) -> bool:
        return not (self.failures or self.missing or self.stale)

    def failed_terms(self) -> dict[str, set[str]]:
        """entry -> the quantities that broke the gate."""
        out: dict[str, set[str]] = {}
        for m in self.failures:
            out.setdefault(m.entry, set()).add(m.quantity)
        return out

    def render(self, update: bool = False) -> str:
        """The table of what moved, then the notes; ``update``: entries without golden are new ones."""
        lines = []
        rows = summarise(self.moved)
        compared = len(self.checked) - len(self.missing)
        if rows:
            lines.append(table(rows))
        elif compared:
            lines.append(f"nothing moved: {compared} entries bit-identical to their goldens")
        lines += [f"note: {n}" for n in self.notes]
        lines += [f"new golden: {e.name}" if update else f"no golden for {e.name}: create it with `{e.update_command}`"
                  for e in self.missing]
        lines += [f"stale golden {p} (no such entry): remove it, or run `ipsd regress --update` over all entries"
                  for p in self.stale]
        return "\n".join(lines)

    def summary(self) -> str:
        """One line: how many entries failed, each with the quantities that broke it."""
        def terms(qs: set[str]) -> str:
            tensors = {p: sum(q.startswith(f"{p}.") for q in qs) for p in ("grad1", "state")}
            return ", ".join([q for q in sorted(qs) if q.split(".")[0] not in tensors]
                             + [f"{p} of {n} tensors" for p, n in tensors.items() if n])

        parts = [f"{e} ({terms(q)})" for e, q in self.failed_terms().items()]
        parts += [f"{e.name} (no golden)" for e in self.missing] + [f"{p.name} (stale golden)" for p in self.stale]
        return f"regression gate: {len(parts)} of {len(self.checked) + len(self.stale)} failed: " + "; ".join(parts)


def check(names: list[str] | None = None, data_root: str | None = None, update: bool = False,
          folder: Path = GOLDEN_DIR, log=None, exact: bool = False, plugins: tuple[str, ...] = ()) -> Outcome:
    """Recompute the selected entries (``select``) in a temporary folder and compare them with the goldens in
    ``folder``; ``update``: then write the recomputed goldens (the outcome is the diff against the old ones).
    ``plugins``: the gate of the methods these modules register, with goldens in the user's ``folder``."""
    if plugins and Path(folder).resolve() == GOLDEN_DIR.resolve():
        raise ConfigError("regress --plugins: give --goldens DIR, a folder of your repository for your methods' "
                          f"goldens ({GOLDEN_DIR} holds ipsd's own)")
    selected = select(names, exact, tuple(plugins))
    if not selected:
        raise ConfigError(f"regress --plugins: {', '.join(plugins)} register no method")
    folder = Path(folder)
    outcome = Outcome(checked=[e.name for e in selected])
    if names is None and folder.is_dir():
        known = {e.name for e in selected}
        outcome.stale = sorted(p for p in folder.glob("*.json") if p.stem not in known)

    def progress(entry: Entry, seconds: float) -> None:
        if log is not None:
            log(f"{entry.name}: computed in {seconds:.1f} s")

    with tempfile.TemporaryDirectory(prefix="ipsd-regress-") as tmp:
        now = compute(selected, data_root, Path(tmp), on_done=progress)
    for entry in selected:
        try:
            golden = read_golden(entry, folder)
        except IpsdError:
            if not update:
                raise
            golden = None  # an unreadable or older-format golden is rewritten like a missing one
        if golden is None:
            outcome.missing.append(entry)
        else:
            outcome.moved += compare(golden, now[entry.name])
            outcome.notes += config_notes(golden, now[entry.name])
        if update:
            folder.mkdir(parents=True, exist_ok=True)
            atomic_write_json(folder / f"{entry.name}.json", golden_record(now[entry.name], entry))
    if update:
        for path in outcome.stale:
            path.unlink()
    return outcome


def main(names: list[str] | None, data_root: str | None, update: bool, plugins: tuple[str, ...] = (),
         folder: Path | None = None) -> None:
    """``ipsd regress``: print what moved; raise GateFailed (exit 1) on any failure unless updating."""
    folder = GOLDEN_DIR if folder is None else Path(folder)
    outcome = check(names, data_root, update, folder, log=lambda s: print(s, file=sys.stderr, flush=True),
                    plugins=plugins)
    print(outcome.render(update))
    if update:
        made = [e.name for e in outcome.missing]
        print(f"wrote {len(outcome.checked)} goldens to {folder}" + (f" (new: {', '.join(made)})" if made else "")
              + (f"; removed {len(outcome.stale)} stale" if outcome.stale else ""))
        return
    if not outcome.ok:
        raise GateFailed(outcome.summary())
    print(f"regression gate: all {len(outcome.checked)} entries within tolerance")


__all__ = ["ACCURACY_ATOL", "BASE", "ENTRY_OPTIONS", "Entry", "GOLDEN_DIR", "GRAD_RTOL", "GateFailed", "LOSS_FLOOR",
           "LOSS_RTOL", "Moved", "NOISY_METHODS", "NORM_FLOOR", "Outcome", "WEIGHTS_RTOL", "check", "compare",
           "compute", "entries", "select", "state_fingerprint"]
