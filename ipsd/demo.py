"""``ipsd demo``: IPS against Hard Label on a small real dataset, on whatever device is here.

Uses CIFAR-10 from ``--data`` / $IPSD_DATA when present; otherwise scikit-learn's bundled digits
(real handwritten digits, padded to 32x32) so that a fresh offline machine still runs end to end.
"""
from __future__ import annotations

import os
import sys
from pathlib import Path

from tabulate import tabulate

from .config import load_run_config
from .runs import RunFolder

# Small enough for a 2-core CPU in minutes, big enough that IPS's regulariser shows.
CIFAR_DEMO = ["dataset=cifar10", "model=resnet8", "per_class=200", "test_per_class=200", "epochs=15"]
DIGITS_DEMO = ["dataset=digits", "model=resnet8", "epochs=15"]


def _has_cifar10(root: str | None) -> bool:
    if not root:
        return False
    r = Path(root)
    return (r / "cifar-10-batches-py").is_dir() or (r / "data_batch_1").is_file()


def run_demo(data: str | None, out: str, overrides: list[str]) -> None:
    from .engine import train

    root = data or os.environ.get("IPSD_DATA")
    if _has_cifar10(root):
        base = CIFAR_DEMO + [f"data_root={root}"]
        print(f"demo: CIFAR-10 subset from {root}", file=sys.stderr)
    else:
        base = DIGITS_DEMO
        where = f"in {root!r}" if root else "(no --data / DATA= / IPSD_DATA given)"
        print(f"demo: no CIFAR-10 found {where}; using scikit-learn's digits (real 8x8 handwritten digits, "
              f"upscaled x3 and zero-padded to 32x32). Pass DATA=DIR to use CIFAR-10.", file=sys.stderr)
    given = {o.split("=", 1)[0].strip() for o in overrides}
    base = [b for b in base if b.split("=", 1)[0] not in given]  # the user's keys replace the demo's defaults
    rows = []
    for method in ("hard", "ips"):
        cfg = load_run_config(None, [*base, f"method={method}", f"out={out}", *overrides])
        print(f"demo: training {method} ({cfg.model} on {cfg.dataset}, seed {cfg.seed}, {cfg.epochs} epochs)",
              file=sys.stderr)
        folder = RunFolder(train(cfg))
        r = folder.read_result()
        if r is None:  # stopped early (stop_after)
            print(f"{method}: unfinished run in {folder.path}", file=sys.stderr)
            continue
        rows.append([method, f"{r.top1('last'):.2f}", f"{r.top1('best'):.2f}", f"{r.images_per_step:g}",
                     f"{r.wall_seconds:.0f}", str(folder.path)])
    print(tabulate(rows, headers=["method", "top1 last", "top1 best (test-selected)", "images/step",
                                  "wall s", "run folder"]))
