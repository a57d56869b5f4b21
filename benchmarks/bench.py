"""``ipsd bench``: what the suite's speed claims rest on, measured on the current device.

1. patch swap: the vectorised operator against a per-sample loop with the paper snippet's semantics;
2. loader: the on-device loader against torchvision's DataLoader (PIL transforms, 2 workers);
3. step cost: an IPS step against a Hard Label step at equal images per step, and every registered
   method against Hard Label at the same batch size;
4. engine overhead: the engine's Hard Label step (``ipsd.engine._train_epoch``) against a minimal hand-written
   loop over the same model, on-device batch, optimizer and precision.
Figures are printed and optionally written as JSON; nothing here asserts a speed. On CUDA, times come from CUDA
events; elsewhere from the host clock.
"""
from __future__ import annotations

import itertools
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tabulate import tabulate

import torch.nn.functional as F

from ipsd.config import RunConfig
from ipsd.errors import ConfigError
from ipsd.data import ImageData, load_dataset, subset
from ipsd.data.batch import Needs
from ipsd.data.loader import DeviceLoader
from ipsd.dist import pick_device
from ipsd.engine import (ViewAccuracy, Task, _train_epoch, autocast_for, compile_model, make_optimizer, place_teacher,
                         run_settings)
from ipsd.method import Method, Setup, Step
from ipsd.models import build_model
from ipsd.patch_swap import apply_swap, apply_swap_loop, swap_cells
from ipsd.resolve import load_methods
from ipsd.rng import generator

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call, ``warmup`` calls excluded. On CUDA each call is bracketed by CUDA events (device
    time, including any wait for the host's launches) and the host synchronises once at the end; elsewhere each
    call is timed by the host clock."""
    for _ in range(warmup):
        fn()
    if device.type == "cuda":
        marks = []
        for _ in range(repeats):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            marks.append((start, end))
        torch.cuda.synchronize(device)
        return statistics.median(s.elapsed_time(e) / 1e3 for s, e in marks)
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_swap(device: torch.device, repeats: int, pairs: int = 64, grid: int = 4,
               channels_last: bool = False) -> dict[str, float]:
    """128 normalised float images (64 pairs), p=0.5, 4x4 grid, in the given memory format: both versions draw
    the same cells."""
    g = generator(device, "bench-swap")
    layout = torch.channels_last if channels_last else torch.contiguous_format
    xa, xb = (torch.randn(pairs, 3, 32, 32, device=device, generator=g).contiguous(memory_format=layout)
              for _ in range(2))

    def vectorised():
        return apply_swap(xa, xb, swap_cells(pairs, grid, 0.5, g, device), grid)

    def loop():
        return apply_swap_loop(xa, xb, swap_cells(pairs, grid, 0.5, g, device), grid)

    fast = timeit(vectorised, device, repeats * 10)
    slow = timeit(loop, device, max(repeats, 3))
    return {"swap_seconds": fast, "swap_loop_seconds": slow, "swap_speedup_vs_loop": slow / fast}


class _PILDataset(torch.utils.data.Dataset):
    """The standard torchvision path: uint8 HWC array -> PIL image -> transforms, one sample at a time."""

    def __init__(self, data: ImageData):
        import torchvision.transforms as T

        self.images = data.train_x.permute(0, 2, 3, 1).contiguous().numpy()
        self.labels = data.train_y.tolist()
        self.transform = T.Compose([T.RandomCrop(data.image_size, padding=4), T.RandomHorizontalFlip(), T.ToTensor(),
                                    T.Normalize(data.mean, data.std)])

    def __len__(self) -> int:
        return len(self.labels)

    def __getitem__(self, i: int):
        from PIL import Image

        return self.transform(Image.fromarray(self.images[i])), self.labels[i]


def bench_loader(data: ImageData, device: torch.device, images: int, batch: int = 64) -> dict[str, float]:
    """Images/s through one pass of ``images`` training images (first batch excluded: start-up)."""
    data = _first(data, images)
    ours = DeviceLoader(data, device, batch, Needs(), seed=0)

    def consume(batches) -> float:
        it = iter(batches)
        next(it)
        _sync(device)
        t, n = time.perf_counter(), 0
        for b in it:
            x = b.x if hasattr(b, "x") else b[0].to(device, non_blocking=True)
            n += len(x)
        _sync(device)
        return n / (time.perf_counter() - t)

    ours_ips = statistics.median(consume(ours.epoch(e)) for e in range(1, 4))
    tv = torch.utils.data.DataLoader(_PILDataset(data), batch_size=batch, shuffle=True, num_workers=2,
                                     pin_memory=device.type == "cuda", persistent_workers=False)
    tv_ips = consume(tv)
    return {"loader_images_per_second": ours_ips, "torchvision_images_per_second": tv_ips,
            "loader_speedup_vs_torchvision": ours_ips / tv_ips}


def _first(data: ImageData, n: int) -> ImageData:
    n = min(n, len(data.train_y))
    return ImageData(data.name, data.train_x[:n], data.train_y[:n], data.test_x, data.test_y, data.classes,
                     data.mean, data.std)


def _activation_bytes(fn: Callable[[], torch.Tensor]) -> int:
    """Bytes autograd saves for backward during ``fn`` (a device-independent memory measure)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = fn()
    loss.backward()
    return total


class StepBench:
    """Times full training steps (forward, backward, optimizer step) of a method on real batches, executed as the
    engine executes ``run``: its precision, memory format, compile and optimizer implementation
    (``ipsd.engine.run_settings``); by default fp32, contiguous, eager."""

    def __init__(self, data: ImageData, model_name: str, device: torch.device, run: RunConfig | None = None):
        self.data, self.model_name, self.device = data, model_name, device
        self.run = run or RunConfig(lr=0.05, precision="fp32", channels_last=False)
        self.settings = run_settings(self.run, device)
        self.autocast = autocast_for(self.settings, device)

    def build(self, method_name: str, batch: int, args: dict | None = None):
        """(model, method, loader, optimizer) of ``method_name`` at ``batch`` anchors, placed as the engine does."""
        cls = load_methods().get(method_name)
        torch.manual_seed(0)
        model = build_model(self.model_name, self.data.num_classes)
        teacher = None
        if cls.needs_teacher:  # cost only: a randomly initialised teacher of the student's architecture
            from ipsd.teacher import FrozenTeacher

            teacher = FrozenTeacher(build_model(self.model_name, self.data.num_classes), {"model": self.model_name})
        setup = Setup.of(self.model_name, model, self.data.train_y, self.data.image_size, 240, batch, teacher)
        method: Method = cls(cls.resolve_config(self.model_name, args or {}), setup).to(self.device)
        cl = self.settings["channels_last"]
        model.to(self.device, memory_format=torch.channels_last if cl else torch.contiguous_format)
        place_teacher(teacher, self.settings, self.run.compile_backend, self.run.compile_mode)
        if self.settings["compile"]:
            compile_model(model, self.run.compile_backend, self.run.compile_mode)
        loader = DeviceLoader(self.data, self.device, batch, method.needs, seed=0, channels_last=cl)
        params = [p for p in [*model.parameters(), *method.parameters()] if p.requires_grad]
        return model, method, loader, make_optimizer(self.run, params, self.settings["fused_optimizer"])

    def measure(self, method_name: str, batch: int, steps: int, args: dict | None = None,
                warmup: int = 3) -> dict[str, float]:
        """Median step time over ``steps`` steps after ``warmup`` (compilation, CUDA-graph recording), images/s,
        the time the loader takes to produce one batch (``loader_share`` of a step) and memory."""
        model, method, loader, opt = self.build(method_name, batch, args)
        step = Step(200, 240, generator(self.device, "bench-method"))
        batches = iter(_cycle(loader))
        cudagraphs = self.settings["compile_mode"] == "reduce-overhead" and self.device.type == "cuda"

        def loss_of(b):
            with self.autocast():
                return sum(method(model, b, step).values())

        def train_step():
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            loss = loss_of(next(batches))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        seconds = timeit(train_step, self.device, steps, warmup)
        loader_seconds = timeit(lambda: next(batches), self.device, steps)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            train_step()
            memory = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            memory = _activation_bytes(lambda: loss_of(next(batches))) / 2**20
        images = loader.local_batch * method.needs.images_per_anchor
        return {"images_per_step": images, "step_seconds": seconds, "images_per_second": images / seconds,
                "loader_seconds": loader_seconds, "loader_share": loader_seconds / seconds, "memory_mib": memory}


class _SameBatch:
    """A loader that yields one on-device batch ``steps`` times (the engine-overhead comparison)."""

    def __init__(self, batch, steps: int, device: torch.device):
        self.batch, self.steps, self.device = batch, steps, device

    def __len__(self) -> int:
        return self.steps

    def epoch(self, epoch: int):
        return itertools.repeat(self.batch, self.steps)


def bench_engine_overhead(bench: StepBench, steps: int, rounds: int, batch: int = 64) -> dict[str, float]:
    """Seconds per Hard Label step through the engine's epoch loop (``_train_epoch``: its method call, loss sums,
    non-finite count, ViewAccuracy hook) and through a minimal loop (forward, cross-entropy, backward, optimizer
    step) over the same model, on-device batch, optimizer and precision. Rounds of ``steps`` steps alternate; the
    fastest round of each is kept (``engine_over_minimal``), and the median of the paired ratios is given too."""
    model, method, loader, opt = bench.build("hard", batch)
    for group in opt.param_groups:  # the update costs the same at LR 0, and the weights cannot drift (denormals, NaN)
        group["lr"] = 0.0
    b = next(loader.epoch(1))
    task, same = Task(model, method), _SameBatch(b, steps, bench.device)
    step = Step(1, 240, generator(bench.device, "bench-engine"))
    cudagraphs = bench.settings["compile_mode"] == "reduce-overhead" and bench.device.type == "cuda"

    def engine_round():
        views = ViewAccuracy(model, method.train_views(method.cfg), bench.device)
        _train_epoch(task, opt, same, step, bench.autocast, False, "", views, cudagraphs=cudagraphs)
        views.handle.remove()

    def minimal_round():
        for _ in range(steps):
            if cudagraphs:
                torch.compiler.cudagraph_mark_step_begin()
            with bench.autocast():
                loss = F.cross_entropy(model(b.x).float(), b.y)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

    engine_round(), minimal_round()  # warm-up (and compilation)
    engine, minimal = [], []
    for _ in range(rounds):
        engine.append(timeit(engine_round, bench.device, 1, warmup=0) / steps)
        minimal.append(timeit(minimal_round, bench.device, 1, warmup=0) / steps)
    return {"engine_step_seconds": min(engine), "minimal_step_seconds": min(minimal),
            "engine_over_minimal": min(engine) / min(minimal),
            "engine_over_minimal_median": statistics.median(e / m for e, m in zip(engine, minimal))}


def _cycle(loader: DeviceLoader):
    epoch = 1
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def run_bench(json_path: str | None = None, device_pref: str = "auto", quick: bool = False,
              data_root: str | None = None, model: str | None = None, plugins: tuple[str, ...] = (),
              methods: list[str] | None = None) -> dict[str, Any]:
    """Every figure of ``ipsd bench``; ``plugins`` register the user's methods first (their lines join the
    per-method table), ``methods`` limits that table (Hard Label, the reference, is always measured)."""
    registry = load_methods(plugins)  # first: a bad plugin or method name fails before minutes of timing
    for name in methods or []:
        try:
            registry.get(name)
        except KeyError as e:
            raise ConfigError(f"bench --methods: {e.args[0]}") from None
    device = pick_device(device_pref)
    model = model or ("resnet18" if device.type == "cuda" else "resnet8")
    repeats = 3 if quick else 10
    try:
        data = load_dataset("cifar10", data_root)
    except Exception as e:  # noqa: BLE001 -- any missing data: fall back to the bundled digits and say so
        print(f"bench: no CIFAR-10 ({str(e).splitlines()[0]}); using digits", file=sys.stderr)
        data = load_dataset("digits")
    data = subset(data, per_class=min(500 if quick else 1000, int(torch.bincount(data.train_y).min())))
    out: dict[str, Any] = {"device": str(device), "model": model, "dataset": data.name,
                           "torch": torch.__version__, "threads": torch.get_num_threads()}
    print(f"bench on {device} ({model}, {data.name}, {torch.get_num_threads()} threads)")
    out.update(bench_swap(device, repeats))
    out.update(bench_loader(data, device, images=2000 if quick else 10000))
    steps = StepBench(data, model, device)
    # equal images per step (Hard 128 images, IPS 64 pairs); alternated, best of 3, to cancel drift and noise
    rounds = [(steps.measure("hard", 128, repeats), steps.measure("ips", 64, repeats)) for _ in range(3)]
    hard = min((r[0] for r in rounds), key=lambda r: r["step_seconds"])
    ips = min((r[1] for r in rounds), key=lambda r: r["step_seconds"])
    out.update({"hard_step_seconds_128": hard["step_seconds"], "ips_step_seconds_64_pairs": ips["step_seconds"],
                "ips_step_over_hard_step": ips["step_seconds"] / hard["step_seconds"],
                "swap_fraction_of_ips_step": out["swap_seconds"] / ips["step_seconds"]})
    out.update(bench_engine_overhead(steps, steps=5 if quick else 20, rounds=3 if quick else 7))
    print(tabulate([
        ["patch swap, 64 pairs 4x4 (vectorised / loop)", f"{out['swap_seconds'] * 1e3:.3f} ms",
         f"{out['swap_loop_seconds'] * 1e3:.2f} ms", f"{out['swap_speedup_vs_loop']:.1f}x faster"],
        ["patch swap share of an IPS step", "", "", f"{100 * out['swap_fraction_of_ips_step']:.2f} %"],
        ["loader images/s (ours / torchvision, 2 workers)", f"{out['loader_images_per_second']:.0f}",
         f"{out['torchvision_images_per_second']:.0f}", f"{out['loader_speedup_vs_torchvision']:.1f}x faster"],
        ["step at 128 images (IPS 64 pairs / Hard 128)", f"{ips['step_seconds'] * 1e3:.1f} ms",
         f"{hard['step_seconds'] * 1e3:.1f} ms", f"ratio {out['ips_step_over_hard_step']:.3f}"],
        ["Hard Label step at 64 (engine / minimal loop)", f"{out['engine_step_seconds'] * 1e3:.1f} ms",
         f"{out['minimal_step_seconds'] * 1e3:.1f} ms", f"ratio {out['engine_over_minimal']:.3f}"],
    ], headers=["measure", "ours", "reference", "result"]), flush=True)

    rows, per_method = [], {}
    base = steps.measure("hard", 64, repeats)
    for name in methods or registry.names():
        cls = registry.get(name)
        predicted = cls.predicted_cost(cls.resolve_config(model, {}))
        try:
            r = base if name == "hard" else steps.measure(name, 64, repeats)
        except Exception as e:  # noqa: BLE001 -- e.g. a method that needs a teacher run or a ResNet
            rows.append([name, "-", "-", "-", predicted, f"skipped: {str(e).splitlines()[0][:60]}"])
            continue
        rel = {"step_time_vs_hard": r["step_seconds"] / base["step_seconds"],
               "memory_vs_hard": r["memory_mib"] / base["memory_mib"]}
        per_method[name] = {**r, **rel}
        rows.append([name, r["images_per_step"], f"{rel['step_time_vs_hard']:.2f}", f"{rel['memory_vs_hard']:.2f}",
                     predicted, ""])
    memory_kind = "peak CUDA memory" if device.type == "cuda" else "activations saved for backward"
    print(f"\nper method at batch 64 ({model}; teacher methods use a teacher of the same architecture); "
          f"memory = {memory_kind}")
    print(tabulate(rows, headers=["method", "images/step", "step time / hard", "memory / hard", "predicted cost", ""]))
    out["methods"] = per_method
    if json_path:
        Path(json_path).parent.mkdir(parents=True, exist_ok=True)
        Path(json_path).write_text(json.dumps(out, indent=2) + "\n")
    return out
