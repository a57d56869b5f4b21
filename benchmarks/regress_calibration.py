"""Calibration of the regression gate's tolerances (``ipsd/regress.py``).

Two families of changes to the code, each applied in-process (a context manager) or in a subprocess (environment
variables read when torch starts):

* ``NOISE``: changes that are not behaviour changes (the thread count, a mathematically equal KL, the loss
  terms summed in another order, another CPU's kernel set). How far they move the trajectories is the noise floor
  the tolerances must clear.
* ``PLANTS``: behaviour changes the gate must catch; ``tests/test_regress.py`` asserts that each one fails the
  gate on its entries and names the entry and ``term``.

``python -m benchmarks.regress_calibration [data_root=DIR]`` measures both against a baseline computed under the
gate's own settings and writes ``results/regress_noise.json`` (15 minutes on the 2-core CPU here, beside a
background sweep); ``--summary`` prints a written report again. This machine has one CPU model: other CPUs are
stood in for by limiting this one's kernels (``AVX2_ENV``, ``SCALAR_ENV``).
"""
from __future__ import annotations

import builtins
import contextlib
import dataclasses
import json
import math
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from unittest import mock

import torch
import torch.nn.functional as F

import ipsd.losses
from ipsd import regress
from ipsd.config import param
from ipsd.runs import atomic_write_json, cpu_model, versions

REPORT = Path(__file__).resolve().parents[1] / "results" / "regress_noise.json"
# Environment of a CPU without AVX-512: ATen's vectorised kernels, oneDNN (convolutions) and MKL (matmuls) limited to
# AVX2. It stands in for another CPU: this machine has only one.
AVX2_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "DNNL_MAX_CPU_ISA": "AVX2", "MKL_ENABLE_INSTRUCTIONS": "AVX2"}
SCALAR_ENV = {"ATEN_CPU_CAPABILITY": "default", "DNNL_MAX_CPU_ISA": "SSE41", "MKL_ENABLE_INSTRUCTIONS": "SSE4_2"}


@contextlib.contextmanager
def rebound(original: Any, replacement: Any) -> Iterator[None]:
    """Replace every module-level name bound to ``original`` in ``ipsd.*`` and ``baselines.*``: where the methods
    look a shared helper up (``from ipsd.losses import kl_t2`` binds it in each importing module). Every method module
    is imported first: one imported inside the block would bind the replacement for good."""
    regress.registered_methods()  # imports the baselines package
    targets = [(mod, name) for mod in list(sys.modules.values()) if mod is not None
               and mod.__name__.split(".")[0] in ("ipsd", "baselines")
               for name, value in list(vars(mod).items()) if value is original]
    with contextlib.ExitStack() as stack:
        for mod, name in targets:
            stack.enter_context(mock.patch.object(mod, name, replacement))
        yield


# ------------------------------------------------------------------------------------ non-behaviour changes

def kl_t2_explicit(target_logits, student_logits, T):
    """``ipsd.losses.kl_t2`` written out: sum_k p (log p - log q), batch mean, times T^2 (equal in exact arithmetic,
    other floating-point operations in both passes)."""
    log_p = F.log_softmax(target_logits.float() / T, dim=1)
    log_q = F.log_softmax(student_logits.float() / T, dim=1)
    return (log_p.exp() * (log_p - log_q)).sum(1).mean() * T ** 2


def reversed_sum(values, start=0):
    """``sum`` over the items in reverse order (the engine's total of a step's loss terms)."""
    return builtins.sum(list(values)[::-1], start)


def _engine_sum_reversed():
    import ipsd.engine

    return mock.patch.object(ipsd.engine, "sum", reversed_sum, create=True)


@dataclass(frozen=True)
class Change:
    """A change to the code or its environment, and the entries it is measured on (None: every entry)."""

    name: str
    patch: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext
    entries: tuple[str, ...] | None = None
    overrides: dict[str, Any] = field(default_factory=dict)  # BASE keys (threads)
    env: dict[str, str] = field(default_factory=dict)  # set in a subprocess
    term: str = ""  # plants: the quantity the gate must name


NOISE: tuple[Change, ...] = (
    Change("2 torch threads instead of 1", overrides={"threads": 2}),
    Change("KL written out (sum p (log p - log q), then T^2)", lambda: rebound(ipsd.losses.kl_t2, kl_t2_explicit)),
    Change("loss terms summed in reverse order", _engine_sum_reversed),
    Change("AVX2-only kernels (ATen, oneDNN, MKL): another CPU", env=AVX2_ENV),
    Change("scalar ATen kernels, SSE4 oneDNN/MKL: an older CPU", env=SCALAR_ENV),
)


# --------------------------------------------------------------------------------------- behaviour changes

def _kl_without_t2():
    original = ipsd.losses.kl_t2
    return rebound(original, lambda t, s, T: original(t, s, T) / (T * T))


def _cskd_detach_wrong_side():
    from baselines.cskd import CSKD
    from ipsd.losses import ce, kl_t2

    def forward(self, model, batch, step):
        z = model(batch.x)
        z_partner = model(batch.partner)  # the partner is trained through the KL, the anchor's side is detached
        return {"ce": ce(z, batch.y), "kd": self.cfg.lambda_cls * kl_t2(z_partner, z.detach(), self.cfg.T)}

    return mock.patch.object(CSKD, "forward", forward)


def _ips_four_pixel_patches():
    import baselines.ips

    original = baselines.ips.patch_swap

    def four_px(xa, xb, grid, p, generator, k_mode="uniform"):
        return original(xa, xb, xa.shape[-1] // 4, p, generator, k_mode)  # cells of 4 px (8x8) instead of 4x4 cells

    return mock.patch.object(baselines.ips, "patch_swap", four_px)


def _ips_default_t3():
    from baselines.ips import IPS, IPSConfig

    @dataclass
    class T3(IPSConfig):
        T: float = param(3.0, lo=0, lo_open=True)

    return mock.patch.object(IPS, "Config", T3)


def _dlb_carries_view0():
    from baselines.dlb import DLB

    original = DLB.forward

    def forward(self, model, batch, step):
        losses = original(self, model, batch, step)
        self.last = dataclasses.replace(self.last, x=batch.x)  # re-feeds the view the batch was trained on
        return losses

    return mock.patch.object(DLB, "forward", forward)


PLANTS: tuple[Change, ...] = (
    Change("kl_t2 without T^2", _kl_without_t2, ("ips", "cskd", "dlb"), term="loss.kd"),
    Change("CS-KD detaches the anchor, not the partner", _cskd_detach_wrong_side, ("cskd",), term="loss.kd"),
    Change("IPS swaps 4-pixel patches (8x8 grid), not 4x4 cells", _ips_four_pixel_patches, ("ips",),
           term="loss.kd"),
    Change("IPS default T 4 -> 3", _ips_default_t3, ("ips",), term="loss.kd"),
    Change("DLB carries view 0 instead of view 1", _dlb_carries_view0, ("dlb",), term="loss.kd"),
)


# ---------------------------------------------------------------------------------------------- measuring

def trajectories(change: Change, names: list[str] | None, data_root: str | None) -> dict[str, dict[str, Any]]:
    """The selected entries' trajectories under ``change`` (a subprocess when it sets environment variables)."""
    selected = regress.select(names, exact=True)
    if change.env:
        with tempfile.TemporaryDirectory() as tmp:
            dump = Path(tmp) / "trajectories.json"
            cmd = [sys.executable, "-m", "benchmarks.regress_calibration", "--worker", str(dump),
                   *(f"--entry={e.name}" for e in selected)] + ([f"data_root={data_root}"] if data_root else [])
            subprocess.run(cmd, check=True, env={**os.environ, **change.env}, cwd=Path(__file__).resolve().parents[1])
            return json.loads(dump.read_text())
    with tempfile.TemporaryDirectory() as tmp, change.patch():
        return regress.compute(selected, data_root, Path(tmp), change.overrides)


def largest(moved: list[regress.Moved]) -> dict[str, Any]:
    """The largest move of each kind: loss terms, logged scalars, step-1 gradient norms and final state norms
    (relative), accuracies (points)."""
    method_of = {e.name: e.method for e in regress.entries()}
    kinds: dict[str, Callable[[regress.Moved], bool]] = {
        "loss": lambda m: m.quantity.startswith("loss."),
        "scalar": lambda m: not (m.quantity.startswith(("loss.", "state", "grad1")) or m.unit == "pt"),
        "accuracy": lambda m: m.unit == "pt",
        "grad1": lambda m: m.quantity.startswith("grad1."),
        "state": lambda m: m.quantity.startswith("state."),
    }
    out = {}
    for kind, pick in kinds.items():
        for label, pool in ((kind, moved), (f"{kind} (not {', '.join(regress.NOISY_METHODS)})",
                                           [m for m in moved if method_of[m.entry] not in regress.NOISY_METHODS])):
            top = max((m for m in pool if pick(m)), key=lambda m: m.change, default=None)
            out[label] = None if top is None else {"change": top.change, "entry": top.entry, "quantity": top.quantity,
                                                   "step": top.step, "tolerance": top.tolerance}
    return out


def worst_ratio(moved: list[regress.Moved]) -> dict[str, Any] | None:
    """The move closest to (or furthest past) its tolerance: change / tolerance, with where it happened."""
    top = max((m for m in moved if m.tolerance > 0), key=lambda m: m.change / m.tolerance, default=None)
    return None if top is None else {"ratio": top.change / top.tolerance, "entry": top.entry,
                                     "quantity": top.quantity, "step": top.step}


def measure(change: Change, baseline: dict[str, dict[str, Any]], data_root: str | None) -> dict[str, Any]:
    names = list(change.entries) if change.entries else None
    now = trajectories(change, names, data_root)
    moved = [m for name, traj in now.items() for m in regress.compare(baseline[name], traj)]
    fails = sorted({(m.entry, m.quantity) for m in moved if m.failed})
    per_entry = {name: {k: (v or {}).get("change", 0.0)
                        for k, v in largest([m for m in moved if m.entry == name]).items() if "(" not in k}
                 for name in sorted(now)}
    return {"change": change.name, "entries": sorted(now), "largest": largest(moved), "worst_ratio": worst_ratio(moved),
            "per_entry": per_entry, "gate_failures": fails}


def _fmt(x: dict[str, Any] | None) -> str:
    if x is None:
        return "0"
    return f"{x['change']:.2e} ({x['entry']} {x['quantity']}" + (f" step {x['step']})" if x["step"] else ")")


def calibrate(data_root: str | None) -> dict[str, Any]:
    """Baseline (the gate's settings), then every NOISE and PLANTS change against it; printed and returned."""
    print("baseline ...", file=sys.stderr, flush=True)
    baseline = trajectories(Change("baseline"), None, data_root)
    golden_moves = [m for e in regress.entries() for g in [regress.read_golden(e)] if g
                    for m in regress.compare(g, baseline[e.name])]
    tolerances = {"loss_rtol": regress.LOSS_RTOL, "loss_floor": regress.LOSS_FLOOR, "norm_floor": regress.NORM_FLOOR,
                  "grad_rtol": regress.GRAD_RTOL, "weights_rtol": regress.WEIGHTS_RTOL,
                  "accuracy_atol": regress.ACCURACY_ATOL, "noisy_methods": regress.NOISY_METHODS}
    report: dict[str, Any] = {"tolerances": tolerances,
                              "baseline_matches_goldens": not golden_moves, "noise": [], "plants": [],
                              "made_on": {"versions": versions(), "cpu": cpu_model(),
                                          "torch_cpu_capability": torch.backends.cpu.get_cpu_capability()}}
    for group, changes in (("noise", NOISE), ("plants", PLANTS)):
        for change in changes:
            print(f"{group}: {change.name} ...", file=sys.stderr, flush=True)
            report[group].append(measure(change, baseline, data_root))
            atomic_write_json(REPORT.with_suffix(".partial.json"), report)
    summarise(report)
    return report


KINDS = (("loss", "LOSS_RTOL"), ("grad1", "GRAD_RTOL"), ("state", "WEIGHTS_RTOL"), ("accuracy", "ACCURACY_ATOL"))


def summarise(report: dict[str, Any]) -> None:
    """Print a report's figures (per change, per entry, per kind) and add the per-kind ones to it."""
    for group in ("noise", "plants"):
        print(f"\n{group}: largest move (loss terms, scalars, step-1 gradient and final state norms relative; "
              "accuracies in points), and the move nearest its tolerance")
        for r in report[group]:
            big, w = r["largest"], r["worst_ratio"]
            print(f"- {r['change']}: " + "; ".join(f"{k} {_fmt(big[k])}" for k in big)
                  + (f"; nearest tolerance: {w['ratio']:.2f} x ({w['entry']} {w['quantity']})" if w else "")
                  + f"; gate failures {len(r['gate_failures'])}")
    print("\nnoise, per entry, over every NOISE change: largest move / its tolerance (loss, grad1, state, accuracy)")
    method_of = {e.name: e.method for e in regress.entries()}
    for name in sorted(report["noise"][0]["per_entry"]):
        k = regress.NOISY_METHODS.get(method_of[name], 1.0)
        ratios = [max(r["per_entry"].get(name, {}).get(kind, 0.0) for r in report["noise"])
                  / (k * getattr(regress, tol)) for kind, tol in KINDS]
        print(f"  {name:18s} " + " ".join(f"{x:6.2f}" for x in ratios) + ("  <-- over" if max(ratios) > 1 else ""))
    noisy = f" (not {', '.join(regress.NOISY_METHODS)})"
    factors = ", ".join(f"x{v:g} {m}" for m, v in regress.NOISY_METHODS.items())
    print()
    for kind, tol in KINDS:
        floor = max((r["largest"][kind + noisy] or {"change": 0.0})["change"] for r in report["noise"])
        floor_all = max((r["largest"][kind] or {"change": 0.0})["change"] for r in report["noise"])
        moved = {r["change"]: r["largest"][kind]["change"] for r in report["plants"] if r["largest"][kind]}
        weakest = min(moved.items(), key=lambda kv: kv[1], default=("none", 0.0))
        report[f"noise_floor_{kind}"], report[f"noise_floor_{kind}_all"] = floor, floor_all
        report[f"weakest_plant_{kind}"] = weakest[1]
        still = [r["change"] for r in report["plants"] if not r["largest"][kind]]
        print(f"{kind}: noise floor {floor:.2e}{noisy}, {floor_all:.2e} all; tolerance {getattr(regress, tol):.0e} "
              f"({factors}); weakest plant {weakest[1]:.2e} ({weakest[0]})"
              + (f"; not moved by: {', '.join(still)}" if still else ""))


def _worker(argv: list[str]) -> None:
    """Subprocess side: compute the entries named by --entry=NAME and dump their trajectories to a JSON file."""
    dump = Path(argv[argv.index("--worker") + 1])
    names = [a.split("=", 1)[1] for a in argv if a.startswith("--entry=")]
    root = next((a.split("=", 1)[1] for a in argv if a.startswith("data_root=")), None)
    with tempfile.TemporaryDirectory() as tmp:
        dump.write_text(json.dumps(regress.compute(regress.select(names, exact=True), root, Path(tmp))))


if __name__ == "__main__":
    if "--worker" in sys.argv:
        _worker(sys.argv)
    elif "--summary" in sys.argv:  # re-print the saved report's figures without measuring again
        summarise(json.loads(REPORT.read_text()))
    else:
        root = next((a.split("=", 1)[1] for a in sys.argv[1:] if a.startswith("data_root=")), None)
        result = calibrate(root)
        atomic_write_json(REPORT, result)
        REPORT.with_suffix(".partial.json").unlink(missing_ok=True)
        print(f"wrote {REPORT}")
        if not math.isfinite(result["noise_floor_loss"]):
            sys.exit(1)
