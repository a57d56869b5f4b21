"""A PNG of the ten CIFAR-C corruptions x five severities on a few real CIFAR-10 test images.

Rows are corruptions; each image gets a block of six columns, clean then severities 1-5. With ``--time``
it also prints the seconds to corrupt the first 10,000 test images per corruption at one severity.

Usage: ``python -m benchmarks.corruption_grid OUT.png [--data-root DIR] [--images 0 1 2] [--time]``
(the data root defaults to env IPSD_DATA and must hold ``cifar-10-batches-py``).
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from ipsd.data import load_dataset, resolve_root
from ipsd.evaluation.corruptions import CORRUPTIONS, SEVERITIES, corrupt, to_nhwc


def draw_grid(images: np.ndarray, indices: list[int], out: Path) -> None:
    """Write the grid for uint8 NHWC ``images`` (their test-set ``indices`` seed the corruptions) to ``out``."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cols = len(images) * (1 + len(SEVERITIES))
    fig, axes = plt.subplots(len(CORRUPTIONS), cols, figsize=(cols * 0.9, len(CORRUPTIONS) * 0.95 + 0.4))
    for r, name in enumerate(CORRUPTIONS):
        by_sev = [corrupt(images, name, s, indices) for s in SEVERITIES]
        for i in range(len(images)):
            tiles = [images[i]] + [b[i] for b in by_sev]
            for j, tile in enumerate(tiles):
                ax = axes[r, i * len(tiles) + j]
                ax.imshow(tile, interpolation="nearest")
                ax.set_xticks([])
                ax.set_yticks([])
                if r == 0:
                    ax.set_title("clean" if j == 0 else f"s{j}", fontsize=8)
                if i == 0 and j == 0:
                    ax.set_ylabel(name, fontsize=7, rotation=0, ha="right", va="center")
    fig.subplots_adjust(left=0.09, right=0.995, top=0.97, bottom=0.005, wspace=0.05, hspace=0.08)
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)


def time_all(images: np.ndarray, severity: int) -> dict[str, float]:
    """Seconds to corrupt ``images`` with each corruption at ``severity``."""
    seconds = {}
    for name in CORRUPTIONS:
        start = time.perf_counter()
        corrupt(images, name, severity)
        seconds[name] = time.perf_counter() - start
    return seconds


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="PNG to write")
    p.add_argument("--data-root", default=None, help="folder with cifar-10-batches-py (default: env IPSD_DATA)")
    p.add_argument("--images", type=int, nargs="+", default=[0, 1, 2], help="test-set indices to show")
    p.add_argument("--time", action="store_true", help="also time 10,000 images per corruption")
    p.add_argument("--severity", type=int, default=3, help="severity for --time")
    args = p.parse_args(argv)
    root = resolve_root(args.data_root)
    data = load_dataset("cifar10", str(root) if root else None, False)
    test = to_nhwc(data.test_x)
    draw_grid(test[args.images], list(args.images), args.out)
    print(f"wrote {args.out}")
    if args.time:
        for name, s in time_all(test[:10_000], args.severity).items():
            print(f"{name:18s} severity {args.severity}: {s:6.2f} s for {min(len(test), 10_000)} images")


if __name__ == "__main__":
    main()
