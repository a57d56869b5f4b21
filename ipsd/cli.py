"""Command line: ``ipsd train | demo | bench | list``."""
from __future__ import annotations

import argparse
import sys

from .config import ConfigError


def _train(args: argparse.Namespace) -> None:
    from .config import load_run_config
    from .engine import train

    overrides = list(args.overrides)
    path = None
    if args.config and "=" not in args.config:
        path = args.config
    elif args.config:
        overrides.insert(0, args.config)
    print(train(load_run_config(path, overrides)))


def _demo(args: argparse.Namespace) -> None:
    from .demo import run_demo

    run_demo(args.data, args.out, args.overrides)


def _bench(args: argparse.Namespace) -> None:
    from .bench import run_bench

    run_bench(args.json, args.device, args.quick, args.data, args.model)


def _list(args: argparse.Namespace) -> None:
    from .data import DATASETS
    from .method import load_methods
    from .models import MODELS

    print("methods: ", ", ".join(load_methods().names()))
    print("models:  ", ", ".join(MODELS.names()))
    print("datasets:", ", ".join(DATASETS.names()))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipsd", description="IPS and self-distillation baselines under one engine")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train one run (resumes if unfinished; prints the run folder last)")
    p.add_argument("config", nargs="?", help="YAML config file (optional)")
    p.add_argument("overrides", nargs="*", help="key=value overrides, e.g. method=ips model=resnet18 epochs=2")
    p.set_defaults(func=_train)

    p = sub.add_parser("demo", help="train IPS and Hard Label on a small real subset and compare")
    p.add_argument("--data", default=None, help="folder holding cifar-10-batches-py (default: $IPSD_DATA, else digits)")
    p.add_argument("--out", default="runs/demo")
    p.add_argument("overrides", nargs="*", help="key=value overrides for both runs")
    p.set_defaults(func=_demo)

    p = sub.add_parser("bench", help="measure patch swap, loader and step cost on this device")
    p.add_argument("--json", default=None, help="also write the figures to this JSON file")
    p.add_argument("--device", default="auto")
    p.add_argument("--quick", action="store_true", help="fewer repeats and images (for tests)")
    p.add_argument("--data", default=None, help="CIFAR-10 root (default: $IPSD_DATA; digits if none)")
    p.add_argument("--model", default=None, help="model for the step timings (default: resnet18 on GPU, resnet8 on CPU)")
    p.set_defaults(func=_bench)

    p = sub.add_parser("list", help="registered methods, models and datasets")
    p.set_defaults(func=_list)

    args = parser.parse_args(argv)
    from .data import DataError
    from .engine import NonFiniteLoss

    try:
        args.func(args)
    except (ConfigError, DataError, NonFiniteLoss) as e:
        print(f"ipsd: error: {e}", file=sys.stderr)
        return 2 if isinstance(e, ConfigError) else 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
