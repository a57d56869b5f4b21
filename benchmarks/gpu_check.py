"""GPU readiness check: one command, under 8 minutes on one H100/H200, from a stock PyTorch GPU image.

    PYTHONPATH=. python benchmarks/gpu_check.py --out runs/gpu-check [--data DIR] [--tiny]

It installs nothing (torch, torchvision, timm, numpy, pandas, pyyaml, tabulate, tqdm are all it imports) and
writes ``summary.json`` and ``summary.md`` into ``--out`` after every section, so a run cut short keeps what
finished. Sections, in order:

1. ``environment``: torch, CUDA, cuDNN and NCCL versions, the device, bf16 support;
2. ``correctness``: a few epochs of Hard Label and IPS through the real engine (``ipsd.engine.train``) on a real
   CIFAR-10 subset (``--data``) or on synthetic CIFAR-shaped uint8 data made on the device (each class a colour
   plus noise): the CE term of the last epoch is below the first's and the last top-1 is above 1.5x chance;
3. ``steps``: images/s, step time, peak memory and the loader's share of a step of hard, ips, cskd, dlb and kd on
   ResNet-18 (CIFAR) at batch 64 (64 pairs for pair methods; kd with a random same-architecture teacher) under
   fp32, bf16 autocast, bf16 + channels_last and bf16 + channels_last + torch.compile; warm-up excluded, timed
   with CUDA events (``benchmarks.bench.StepBench``, which executes a run as the engine does);
4. ``patch_swap``: the patch swap's share of an IPS step in each configuration;
5. ``engine_overhead``: the engine's Hard Label step against a minimal loop (``bench_engine_overhead``);
6. ``nccl``: a one-process process group (NCCL; gloo on CPU) and one all-reduce;
7. ``cudagraphs``: compile_mode=reduce-overhead for hard and ips steps and one engine run, if time remains.

Compiled rows and CUDA graphs are skipped (and say so) when the ``--budget-minutes`` would be exceeded.
``--tiny`` runs the same code on the CPU in seconds: resnet8, batch 8, a few steps, the ``eager`` compile backend,
one torch thread.
Nothing here asserts a speed; the exit status is 1 when a correctness check or the all-reduce fails.
"""
from __future__ import annotations

import argparse
import json
import platform
import shutil
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

import torch
import torch.distributed as tdist
from tabulate import tabulate

from benchmarks.bench import StepBench, bench_engine_overhead, bench_swap
from ipsd.config import RunConfig, load_run_config
from ipsd.data import DATASETS, ImageData, load_dataset, subset
from ipsd.dist import pick_device
from ipsd.engine import train
from ipsd.errors import ConfigError, IpsdError

METHODS = ("hard", "ips", "cskd", "dlb", "kd")
CONFIGS = {  # name -> RunConfig fields of the execution (everything else: the paper's recipe)
    "fp32": {"precision": "fp32", "channels_last": False},
    "bf16": {"precision": "bf16", "channels_last": False},
    "bf16+channels_last": {"precision": "bf16", "channels_last": True},
    "bf16+channels_last+compile": {"precision": "bf16", "channels_last": True, "compile": True},
}
CUDAGRAPHS = {"precision": "bf16", "channels_last": True, "compile": True, "compile_mode": "reduce-overhead"}
SYNTHETIC = "gpu_check_synthetic"


class Plan:
    """Sizes of one check: the full GPU check or ``--tiny`` (same code, CPU-sized)."""

    def __init__(self, tiny: bool):
        self.tiny = tiny
        self.model = "resnet8" if tiny else "resnet18"
        self.batch = 8 if tiny else 64
        self.steps, self.warmup = (2, 2) if tiny else (30, 5)
        self.backend = "eager" if tiny else "inductor"  # eager: dynamo tracing without code generation
        self.per_class, self.test_per_class = (8, 4) if tiny else (500, 100)
        self.epochs = 3 if tiny else 4
        self.train_batch = 16 if tiny else 64
        self.overhead = (3, 2) if tiny else (50, 5)  # (steps, rounds)
        self.compile_seconds = 5 if tiny else 60  # assumed cost of one compiled measurement, for the budget


class Clock:
    """Time left of the budget."""

    def __init__(self, minutes: float):
        self.start, self.budget = time.perf_counter(), 60 * minutes

    def elapsed(self) -> float:
        return time.perf_counter() - self.start

    def allows(self, seconds: float) -> bool:
        return self.elapsed() + seconds <= self.budget


def synthetic_cifar(device: torch.device, per_class: int, test_per_class: int, classes: int = 10,
                    seed: int = 0) -> ImageData:
    """CIFAR-shaped uint8 images made on ``device``: class c is a fixed random colour plus per-pixel Gaussian noise
    (std 40), learnable in an epoch; the test split is drawn the same way."""
    g = torch.Generator(device=device).manual_seed(seed)
    palette = torch.randint(40, 216, (classes, 3, 1, 1), generator=g, device=device).float()

    def split(n: int) -> tuple[torch.Tensor, torch.Tensor]:
        y = torch.arange(classes, device=device).repeat_interleave(n)
        noise = torch.randn(len(y), 3, 32, 32, generator=g, device=device) * 40
        return (palette[y] + noise).clamp(0, 255).to(torch.uint8).contiguous(), y

    (x, y), (tx, ty) = split(per_class), split(test_per_class)
    return ImageData(SYNTHETIC, x, y, tx, ty, [f"colour{c}" for c in range(classes)], mean=(0.5,) * 3,
                     std=(0.25,) * 3, note="gpu_check: synthetic CIFAR-shaped data (class = colour + noise)")


def bench_data(args, plan: Plan, device: torch.device) -> ImageData:
    """The step-bench images: a real CIFAR-10 subset (``--data``) or synthetic ones made on the device."""
    if args.data:
        data = load_dataset("cifar10", args.data)
        return subset(data, per_class=plan.per_class, test_per_class=plan.test_per_class)
    return synthetic_cifar(device, plan.per_class, plan.test_per_class)


def environment(device: torch.device, plan: Plan) -> dict[str, Any]:
    env: dict[str, Any] = {"python": platform.python_version(), "torch": torch.__version__, "device": str(device),
                           "tiny": plan.tiny, "model": plan.model, "cuda": torch.version.cuda,
                           "cudnn": torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None}
    for name in ("torchvision", "timm"):
        try:
            env[name] = __import__(name).__version__
        except ImportError:
            env[name] = None
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        env.update(gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=props.total_memory / 2**30,
                   bf16_supported=torch.cuda.is_bf16_supported(),
                   nccl=str(torch.cuda.nccl.version()) if tdist.is_nccl_available() else None)
    else:
        env.update(threads=torch.get_num_threads(), cpu=platform.processor() or platform.machine())
    return env


def correctness(args, plan: Plan, device: torch.device, out: Path, extra: tuple[str, ...] = (),
                methods: tuple[str, ...] = ("hard", "ips")) -> dict[str, Any]:
    """Train ``methods`` for a few epochs through ``ipsd.engine.train``; per method: CE by epoch, last top-1, the
    two checks and the run's recorded settings and images/s (steady: first epoch excluded)."""
    if args.data:
        data_args = ["dataset=cifar10", f"data_root={args.data}", f"per_class={plan.per_class}",
                     f"test_per_class={plan.test_per_class}"]
        classes = 10
    else:
        data = synthetic_cifar(device, plan.per_class, plan.test_per_class)
        if SYNTHETIC in DATASETS:
            DATASETS.unregister(SYNTHETIC)
        DATASETS.register(SYNTHETIC)(lambda root=None, download=False: data)
        data_args, classes = [f"dataset={SYNTHETIC}"], data.num_classes
    results = {}
    for method in methods:
        cfg = load_run_config(None, [*data_args, f"method={method}", f"model={plan.model}", f"epochs={plan.epochs}",
                                     f"batch_size={plan.train_batch}", f"device={device}", "progress=false",
                                     *([f"threads={torch.get_num_threads()}"] if device.type == "cpu" else []),
                                     f"out={out}", *extra])
        record = json.loads((train(cfg) / "result.json").read_text())
        ce = [r["loss"]["ce"] for r in record["curve"]]
        chance = 100 / classes
        results[method] = {"ce_by_epoch": ce, "top1": record["final"]["top1"], "chance": chance,
                           "loss_fell": ce[-1] < ce[0], "above_chance": record["final"]["top1"] > 1.5 * chance,
                           "images_per_second": record["images_per_second"],
                           "images_per_second_raw": record["images_per_second_raw"],
                           "peak_memory_mib": record["peak_memory_mib"], "settings": record["settings"]}
    return results


def step_rows(data: ImageData, plan: Plan, device: torch.device, clock: Clock,
              configs: dict[str, dict[str, Any]], methods: tuple[str, ...]) -> dict[str, dict[str, Any]]:
    """StepBench figures per configuration and method; compiled configurations are skipped past the budget."""
    rows: dict[str, dict[str, Any]] = {}
    for name, fields in configs.items():
        run = RunConfig(lr=0.05, compile_backend=plan.backend, **fields)
        bench = StepBench(data, plan.model, device, run)
        rows[name] = {}
        for method in methods:
            if run.compile and not clock.allows(plan.compile_seconds):
                rows[name][method] = {"skipped": f"time budget ({clock.elapsed():.0f} s used)"}
                continue
            rows[name][method] = guarded(lambda: bench.measure(method, plan.batch, plan.steps, warmup=plan.warmup))
            if run.compile:
                torch._dynamo.reset()  # each measurement builds a new model: start from an empty compile cache
        rows[name]["settings"] = bench.settings
    return rows


def swap_shares(steps: dict[str, dict[str, Any]], plan: Plan, device: torch.device) -> dict[str, Any]:
    """Patch swap seconds (the batch of pairs, 4x4 grid, in the configuration's memory format) over the IPS step."""
    shares = {}
    for name, fields in CONFIGS.items():
        ips = steps.get(name, {}).get("ips", {})
        swap = bench_swap(device, 3, pairs=plan.batch, channels_last=fields["channels_last"])["swap_seconds"]
        shares[name] = {"swap_seconds": swap, "ips_step_seconds": ips.get("step_seconds"),
                        "share": swap / ips["step_seconds"] if "step_seconds" in ips else None}
    return shares


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def nccl(device: torch.device) -> dict[str, Any]:
    """A one-process group (NCCL on CUDA, gloo on CPU), one all-reduce of a known tensor, then torn down."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    t0 = time.perf_counter()
    tdist.init_process_group(backend, init_method=f"tcp://127.0.0.1:{free_port()}", rank=0, world_size=1)
    try:
        init = time.perf_counter() - t0
        x = torch.full((4,), 3.0, device=device)
        tdist.all_reduce(x)
        ok = x.tolist() == [3.0] * 4
    finally:
        tdist.destroy_process_group()
    return {"backend": backend, "init_seconds": init, "all_reduce_ok": ok}


def guarded(fn: Callable[[], Any]) -> Any:
    """``fn()``, or {"error": ...} with the exception's last line (one failing measurement must not end the check)."""
    try:
        return fn()
    except Exception as e:  # noqa: BLE001 -- reported in the summary, the check goes on
        traceback.print_exc(file=sys.stderr)
        return {"error": f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"}


def _engine_runs(summary: dict[str, Any]) -> dict[str, Any]:
    """Every engine run of the check, by "section method"; a section that raised appears as its error."""
    graphs = summary.get("cudagraphs", {})
    runs = {}
    for section, per in (("correctness", summary.get("correctness", {})), ("cudagraphs", graphs.get("engine", {}))):
        if "error" in per:
            runs[section] = per
        else:
            runs.update({f"{section} {m}": r for m, r in per.items()})
    return runs


def failures(summary: dict[str, Any]) -> list[str]:
    """What failed: a section that raised, an engine run whose CE did not fall or whose top-1 is not above
    chance, a wrong all-reduce."""
    bad = [f"{name}: {v['error']}" for name, v in summary.items() if isinstance(v, dict) and "error" in v]
    for name, r in _engine_runs(summary).items():
        if "error" in r:
            bad.append(f"{name}: {r['error']}")
        elif not (r["loss_fell"] and r["above_chance"]):
            bad.append(f"{name}: CE {r['ce_by_epoch']}, top-1 {r['top1']:.1f} (chance {r['chance']:.0f})")
    if summary.get("nccl", {}).get("all_reduce_ok") is False:
        bad.append("nccl: the all-reduce gave a wrong value")
    return bad


def _fmt(v: Any, scale: float = 1.0, digits: int = 1) -> str:
    return f"{v * scale:.{digits}f}" if isinstance(v, (int, float)) and not isinstance(v, bool) else "-"


def _table(rows: list[list[Any]], headers: list[str]) -> str:
    return tabulate(rows, headers=headers, tablefmt="github")


def _step_table(per_config: dict[str, Any]) -> str:
    rows = []
    for config, per in per_config.items():
        for method, r in ({"": per} if "error" in per else per).items():
            if method != "settings":
                rows.append([config, method, _fmt(r.get("images_per_second"), digits=0),
                             _fmt(r.get("step_seconds"), 1e3, 2), _fmt(r.get("memory_mib"), digits=0),
                             _fmt(r.get("loader_share"), 100), r.get("error") or r.get("skipped") or ""])
    return _table(rows, ["config", "method", "images/s", "step ms", "memory MiB", "loader %", ""])


def _runs_table(runs: dict[str, Any]) -> str:
    rows = [[name, "", "", "", "", False, "", r["error"]] if "error" in r else
            [name, _fmt(r["ce_by_epoch"][0], digits=3), _fmt(r["ce_by_epoch"][-1], digits=3), _fmt(r["top1"]),
             _fmt(r["chance"], digits=0), r["loss_fell"] and r["above_chance"], _fmt(r["images_per_second"], digits=0),
             ""] for name, r in runs.items()]
    return _table(rows, ["run", "CE first", "CE last", "top-1", "chance", "ok", "images/s (steady)", ""])


def markdown(summary: dict[str, Any]) -> str:
    """The summary as Markdown: one heading per section."""
    def section(name: str, intro: str, body: Callable[[Any], str]) -> list[str]:
        v = summary.get(name)
        if v is None:
            text = "(not run)"
        elif "error" in v or "skipped" in v:
            text = v.get("error") or v["skipped"]
        else:
            text = body(v)
        return [f"## {name}", "", *([intro, ""] if intro else []), text, ""]

    lines = ["# GPU check", ""]
    lines += section("environment", "", lambda v: _table(sorted(v.items()), ["", ""]))
    lines += section("correctness", "engine runs (`ipsd.engine.train`): CE of the first and last epoch, last top-1",
                     _runs_table)
    lines += section("steps", "per step at the paper's batch (pairs for pair methods), warm-up excluded; memory: peak "
                     "CUDA memory (on CPU: activations saved for backward)", _step_table)
    lines += section("patch_swap", "the patch swap's share of an IPS step", lambda v: _table(
        [[c, _fmt(r["swap_seconds"], 1e3, 3), _fmt(r["share"], 100, 2)] for c, r in v.items()],
        ["config", "swap ms", "share %"]))
    lines += section("engine_overhead", "Hard Label step through the engine's loop against a minimal loop (same "
                     "model, batch, optimizer, precision); fastest round of each, and the median paired ratio",
                     lambda v: _table([[_fmt(v["engine_step_seconds"], 1e3, 2), _fmt(v["minimal_step_seconds"], 1e3, 2),
                                        _fmt(v["engine_over_minimal"], digits=3),
                                        _fmt(v["engine_over_minimal_median"], digits=3)]],
                                      ["engine ms", "minimal ms", "ratio", "median ratio"]))
    lines += section("nccl", "", lambda v: _table(sorted(v.items()), ["", ""]))
    lines += section("cudagraphs", "compile_mode=reduce-overhead: steps, and an engine run",
                     lambda v: _step_table({"reduce-overhead": v["steps"]}) + "\n\n" + _runs_table(
                         {"engine": v["engine"]} if "error" in v["engine"] else v["engine"]))
    bad = summary.get("failures")
    verdict = "(unfinished)" if bad is None else "all checks passed" if not bad else "FAILED: " + "; ".join(bad)
    return "\n".join([*lines, "## result", "", f"{verdict} ({summary.get('seconds', 0):.0f} s)", ""])


def write(summary: dict[str, Any], out: Path) -> None:
    (out / "summary.json").write_text(json.dumps(summary, indent=2, default=str) + "\n")
    (out / "summary.md").write_text(markdown(summary))


def check(args) -> int:
    if args.data and not (Path(args.data).expanduser() / "cifar-10-batches-py").is_dir():
        raise ConfigError(f"--data {args.data}: no cifar-10-batches-py folder there; give the folder that holds it, "
                          f"or leave --data out to use synthetic images")
    plan = Plan(args.tiny)
    device = pick_device("cpu" if args.tiny else args.device)
    if args.tiny:
        torch.set_num_threads(1)  # a small model on a busy CPU: more threads only wait on each other
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    runs = out / "runs"
    shutil.rmtree(runs, ignore_errors=True)  # this check's own engine runs: always trained afresh
    clock = Clock(args.budget_minutes)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True
    summary: dict[str, Any] = {"environment": guarded(lambda: environment(device, plan))}
    write(summary, out)
    data = bench_data(args, plan, device)
    sections: list[tuple[str, Callable[[], Any]]] = [
        ("correctness", lambda: correctness(args, plan, device, runs / "eager")),
        ("steps", lambda: step_rows(data, plan, device, clock, CONFIGS, METHODS)),
        ("patch_swap", lambda: swap_shares(summary.get("steps", {}), plan, device)),
        ("engine_overhead", lambda: bench_engine_overhead(StepBench(data, plan.model, device, RunConfig(lr=0.05)),
                                                          *plan.overhead, batch=plan.batch)),
        ("nccl", lambda: nccl(device)),
        ("cudagraphs", lambda: cudagraphs(args, plan, device, clock, data, runs / "cudagraphs")),
    ]
    for name, fn in sections:
        t0 = time.perf_counter()
        print(f"gpu_check: {name} ...", file=sys.stderr, flush=True)
        summary[name] = guarded(fn)
        summary.setdefault("section_seconds", {})[name] = time.perf_counter() - t0
        summary["seconds"] = clock.elapsed()
        write(summary, out)
    summary["failures"] = failures(summary)
    write(summary, out)
    print(markdown(summary))
    return 1 if summary["failures"] else 0


def cudagraphs(args, plan: Plan, device: torch.device, clock: Clock, data: ImageData, runs: Path) -> dict[str, Any]:
    """reduce-overhead steps (hard, ips) and one engine run under it; CUDA only, and only if time remains."""
    if device.type != "cuda":
        return {"skipped": "CUDA graphs need a CUDA device"}
    if not clock.allows(3 * plan.compile_seconds):
        return {"skipped": f"time budget ({clock.elapsed():.0f} s used)"}
    steps = step_rows(data, plan, device, clock, {"cudagraphs": CUDAGRAPHS}, ("hard", "ips"))["cudagraphs"]
    extra = ("compile=true", "compile_mode=reduce-overhead")
    engine = guarded(lambda: correctness(args, plan, device, runs, extra, methods=("ips",)))
    return {"steps": steps, "engine": engine}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", required=True, help="folder for summary.json, summary.md and the check's engine runs")
    p.add_argument("--data", default=None, help="folder holding cifar-10-batches-py (default: synthetic images)")
    p.add_argument("--tiny", action="store_true", help="the same code on the CPU in seconds (resnet8, few steps)")
    p.add_argument("--device", default="auto", help="auto | cuda | cuda:N | cpu (--tiny: cpu)")
    p.add_argument("--budget-minutes", type=float, default=7.5, help="compiled rows are skipped past this")
    args = p.parse_args(argv)
    try:
        return check(args)
    except IpsdError as e:
        print(f"ipsd: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
