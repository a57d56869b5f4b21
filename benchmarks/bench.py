"""``ipsd bench``: what the suite's speed claims rest on, measured on the current device.

1. patch swap: the vectorised operator against a per-sample loop with the paper snippet's semantics;
2. loader: the on-device loader against torchvision's DataLoader (PIL transforms, 2 workers);
3. step cost: an IPS step against a Hard Label step at equal images per step, and every registered
   method against Hard Label at the same batch size.
Figures are printed and optionally written as JSON; nothing here asserts a speed.
"""
from __future__ import annotations

import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any, Callable

import torch
from tabulate import tabulate

from ipsd.data import ImageData, load_dataset, subset
from ipsd.data.batch import Needs
from ipsd.data.loader import DeviceLoader
from ipsd.dist import pick_device
from ipsd.method import Method, Setup, Step
from ipsd.models import build_model
from ipsd.patch_swap import apply_swap, apply_swap_loop, swap_cells
from ipsd.resolve import load_methods
from ipsd.rng import generator

def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timeit(fn: Callable[[], Any], device: torch.device, repeats: int, warmup: int = 2) -> float:
    """Median seconds per call."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        _sync(device)
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return statistics.median(times)


def bench_swap(device: torch.device, repeats: int, pairs: int = 64, grid: int = 4) -> dict[str, float]:
    """128 normalised float images (64 pairs), p=0.5, 4x4 grid: both versions draw the same cells."""
    g = generator(device, "bench-swap")
    xa, xb = (torch.randn(pairs, 3, 32, 32, device=device, generator=g) for _ in range(2))

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
    """Times full training steps (forward, backward, SGD) of a method on real batches."""

    def __init__(self, data: ImageData, model_name: str, device: torch.device):
        self.data, self.model_name, self.device = data, model_name, device

    def measure(self, method_name: str, batch: int, steps: int, args: dict | None = None) -> dict[str, float]:
        cls = load_methods().get(method_name)
        torch.manual_seed(0)
        model = build_model(self.model_name, self.data.num_classes).to(self.device)
        teacher = None
        if cls.needs_teacher:  # cost only: a randomly initialised teacher of the student's architecture
            from ipsd.teacher import FrozenTeacher

            teacher = FrozenTeacher(build_model(self.model_name, self.data.num_classes), {"model": self.model_name})
        setup = Setup.of(self.model_name, model, self.data.train_y, self.data.image_size, 240, batch, teacher)
        method: Method = cls(cls.resolve_config(self.model_name, args or {}), setup).to(self.device)
        loader = DeviceLoader(self.data, self.device, batch, method.needs, seed=0)
        params = [p for p in [*model.parameters(), *method.parameters()] if p.requires_grad]
        opt = torch.optim.SGD(params, lr=0.01, momentum=0.9)
        step = Step(200, 240, generator(self.device, "bench-method"))
        batches = iter(_cycle(loader))

        def loss_of(b):
            return sum(method(model, b, step).values())

        def train_step():
            loss = loss_of(next(batches))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        seconds = timeit(train_step, self.device, steps)
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
            train_step()
            memory = torch.cuda.max_memory_allocated(self.device) / 2**20
        else:
            memory = _activation_bytes(lambda: loss_of(next(batches))) / 2**20
        return {"images_per_step": loader.local_batch * method.needs.images_per_anchor, "step_seconds": seconds,
                "memory_mib": memory}


def _cycle(loader: DeviceLoader):
    epoch = 1
    while True:
        yield from loader.epoch(epoch)
        epoch += 1


def run_bench(json_path: str | None = None, device_pref: str = "auto", quick: bool = False,
              data_root: str | None = None, model: str | None = None) -> dict[str, Any]:
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
    print(tabulate([
        ["patch swap, 64 pairs 4x4 (vectorised / loop)", f"{out['swap_seconds'] * 1e3:.3f} ms",
         f"{out['swap_loop_seconds'] * 1e3:.2f} ms", f"{out['swap_speedup_vs_loop']:.1f}x faster"],
        ["patch swap share of an IPS step", "", "", f"{100 * out['swap_fraction_of_ips_step']:.2f} %"],
        ["loader images/s (ours / torchvision, 2 workers)", f"{out['loader_images_per_second']:.0f}",
         f"{out['torchvision_images_per_second']:.0f}", f"{out['loader_speedup_vs_torchvision']:.1f}x faster"],
        ["step at 128 images (IPS 64 pairs / Hard 128)", f"{ips['step_seconds'] * 1e3:.1f} ms",
         f"{hard['step_seconds'] * 1e3:.1f} ms", f"ratio {out['ips_step_over_hard_step']:.3f}"],
    ], headers=["measure", "ours", "reference", "result"]), flush=True)

    rows, per_method = [], {}
    base = steps.measure("hard", 64, repeats)
    for name in load_methods().names():
        cls = load_methods().get(name)
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
