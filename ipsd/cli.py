"""Command line: ``ipsd train | demo | bench | sweep | report | teacher | data | regress | list``.

Each command imports what it needs when it runs, so commands that only read records or configs
(``teacher list``) start without loading torch.
"""
from __future__ import annotations

import argparse
import sys

from .errors import ConfigError, IpsdError


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
    if args.file_loaders:
        from benchmarks.bench_loaders import bench_file_loaders

        bench_file_loaders(args.images, args.workers, json_path=args.json)
        return
    from benchmarks.bench import run_bench

    run_bench(args.json, args.device, args.quick, args.data, args.model, tuple(args.plugins), args.methods)


def _sweep(args: argparse.Namespace) -> None:
    from benchmarks.sweep import LaunchOptions, sweep

    from .config import apply_overrides

    if args.jobs is not None and args.jobs < 1:
        raise ConfigError(f"--jobs {args.jobs} is out of range; give 1 or more, or leave it out (one per core on CPU)")
    opts = LaunchOptions(jobs=args.jobs, nproc=args.nproc, nnodes=args.nnodes, rdzv_endpoint=args.rdzv_endpoint,
                         slurm=apply_overrides({}, args.slurm) if args.slurm else None, cluster=args.cluster)
    sweep(args.config, args.profile, args.launcher, args.overrides, opts, args.tflops, args.dry_run)


def _report(args: argparse.Namespace) -> int:
    if args.against:
        from benchmarks.report import against

        text, held = against(args.config, args.against, args.profile, args.overrides, args.metric)
        print(text)
        return 0 if held else 1
    from benchmarks.report import report

    print(report(args.config, args.profile, args.overrides, args.format, args.metric))
    return 0


def _teacher(args: argparse.Namespace) -> None:
    from .teacher_registry import REGISTRY, read_registry, register

    if args.action == "register":
        if not (args.name and args.run):
            raise ConfigError("usage: ipsd teacher register NAME RUN_FOLDER")
        entry = register(args.name, args.run)
        print(f"registered {args.name}: {entry['model']} on {entry['dataset']}, top-1 {entry['top1']:.2f}, "
              f"sha256 {entry['sha256'][:12]} in {REGISTRY}")
    else:
        for name, e in sorted(read_registry().items()):
            print(f"{name}: {e.get('model', '?')} top-1 {e.get('top1')} run {e.get('run') or '(not trained yet)'}")


def _data(args: argparse.Namespace) -> None:
    import time

    from .config import load_run_config
    from .data import resolve_root
    from .data.beton import write_betons
    from .data.folders import FILE_DATASETS
    from .engine import ffcv_folder

    cfg = load_run_config(None, args.overrides)
    if cfg.dataset not in FILE_DATASETS:
        raise ConfigError(f"to-ffcv converts on-disk datasets ({', '.join(FILE_DATASETS.names())}); "
                          f"dataset={cfg.dataset} is held in memory and needs no conversion")
    root = resolve_root(cfg.data_root)
    if root is None:
        raise ConfigError(f"to-ffcv needs data_root=<folder of {cfg.dataset}> (or $IPSD_DATA)")
    data = FILE_DATASETS.get(cfg.dataset)(root)
    start = time.perf_counter()
    folder = write_betons(data, ffcv_folder(cfg), args.max_resolution, args.jpeg_quality, args.write_mode, args.workers)
    sizes = {split: (folder / f"{split}.beton").stat().st_size / 2**20 for split in ("train", "test")}
    print(f"{cfg.dataset}: {len(data.train_paths)} train ({sizes['train']:.1f} MiB) and {len(data.test_paths)} test "
          f"({sizes['test']:.1f} MiB) images written to {folder} in {time.perf_counter() - start:.1f} s")


def _regress(args: argparse.Namespace) -> None:
    from .config import apply_overrides
    from .regress import main

    names = [m for m in args.methods or [] if "=" not in m]  # key=value after --methods belongs to the overrides
    values = apply_overrides({}, [*args.overrides, *(m for m in args.methods or [] if "=" in m)])
    unknown = sorted(set(values) - {"data_root"})
    if unknown:
        raise ConfigError(f"regress: the gate's runs are fixed; only data_root= may be set, not {', '.join(unknown)}")
    main(names or None, values.get("data_root"), args.update, tuple(args.plugins), args.goldens)


def _interpolate(args: argparse.Namespace) -> None:
    from .evaluation.interpolate import draw, interpolate

    from .config import apply_overrides

    values = apply_overrides({}, args.overrides)
    if set(values) - {"data_root"}:
        raise ConfigError(f"interpolate: the runs' configs are fixed; only data_root= may be set, not "
                          f"{', '.join(sorted(set(values) - {'data_root'}))}")
    result = interpolate(args.run_a, args.run_b, args.points, args.lo, args.hi, values.get("data_root"), args.bn_batches)
    print(draw(result, args.out, args.label_a, args.label_b))


def _evaluate(args: argparse.Namespace) -> None:
    from .config import apply_overrides
    from .evaluation.run import EvalSettings, evaluate_run, summary

    from .evaluation import SUITES

    # key=value after --suite or --corruptions (nargs='+') belongs to the overrides
    trailing = [a for a in [*args.suite, *(args.corruptions or [])] if "=" in a]
    args.suite = [a for a in args.suite if "=" not in a]
    args.corruptions = [a for a in args.corruptions or [] if "=" not in a] or None
    values = apply_overrides({}, [*args.overrides, *trailing])
    unknown = sorted(set(values) - {"data_root"})
    if unknown:
        raise ConfigError(f"evaluate: the run's config is fixed; only data_root= may be set, not {', '.join(unknown)}")
    bad = [s for s in args.suite if s not in SUITES]
    if bad or not args.suite:  # before any suite runs: a typo must not cost the suites before it
        raise ConfigError(f"unknown suite {bad[0] if bad else '(none given)'!r}; use one of {', '.join(SUITES)}")
    given = {"bins": args.bins, "eps": tuple(args.eps) if args.eps else None, "steps": args.steps,
             "corruptions": tuple(args.corruptions) if args.corruptions else None,
             "severities": tuple(args.severities) if args.severities else None, "source": args.source}
    settings = EvalSettings(**{k: v for k, v in given.items() if v is not None})
    for suite in dict.fromkeys(args.suite):
        rec, computed = evaluate_run(args.run, suite, settings, values.get("data_root"), args.device, args.batch_size,
                                     args.force)
        print(f"{suite} ({'evaluated' if computed else 'already evaluated; --force redoes it'}): {summary(rec)}")
        print(rec.path)


def _list(args: argparse.Namespace) -> None:
    from .data import DATASETS
    from .data.folders import FILE_DATASETS
    from .models import MODELS
    from .resolve import load_methods

    if args.what:
        if args.what != "method" or not args.name:
            raise ConfigError("usage: ipsd list [method NAME]")
        from .config import describe

        try:
            cls = load_methods().get(args.name)
        except KeyError as e:
            raise ConfigError(e.args[0]) from None
        doc = (cls.__doc__ or sys.modules[cls.__module__].__doc__ or "").strip()
        print(f"method {cls.name} ({cls.__module__}): {doc.splitlines()[0] if doc else ''}")
        print(f"method_args (method_args.KEY=VALUE):\n{describe(cls.Config, cls.model_defaults) or '  (none)'}")
        return

    print("methods: ", ", ".join(load_methods().names()))
    print("models:  ", ", ".join(MODELS.names()))
    print("datasets:", ", ".join(DATASETS.names()), "(in memory);", ", ".join(FILE_DATASETS.names()), "(on disk)")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="ipsd", description="IPS and self-distillation baselines under one engine")
    sub = parser.add_subparsers(dest="command", required=True)

    from .config import RunConfig, describe

    p = sub.add_parser("train", help="train one run (resumes if unfinished; prints the run folder last)",
                       formatter_class=argparse.RawDescriptionHelpFormatter,
                       epilog="config keys (YAML or key=value; `ipsd list method NAME` for a method's method_args):\n"
                              + describe(RunConfig))
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
    p.add_argument("--file-loaders", action="store_true",
                   help="instead: images/s of the folder and FFCV loaders on generated ImageNet-like JPEGs")
    p.add_argument("--images", type=int, default=2000, help="--file-loaders: train images to generate")
    p.add_argument("--workers", type=int, default=2, help="--file-loaders: decoding workers of both loaders")
    p.add_argument("--plugins", nargs="+", default=(), metavar="MODULE",
                   help="also time the methods these modules (.py paths or dotted names) register")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help="the per-method table for these methods only (default: every registered method)")
    p.set_defaults(func=_bench)

    p = sub.add_parser("sweep", help="run a paper table's grid (skips finished runs, resumes unfinished ones)")
    p.add_argument("config", help="table YAML, e.g. benchmarks/table3.yaml")
    p.add_argument("--profile", default="full", help="full (the paper's protocol) or smoke (CPU, minutes)")
    p.add_argument("--launcher", default="local", help="local | gpus | torchrun | slurm")
    p.add_argument("--jobs", type=int, default=None,
                   help="local: runs at once (default: on CPU one one-thread run per core, the faster way on small "
                        "models; with CUDA 1)")
    p.add_argument("--nproc", type=int, default=1, help="torchrun: processes per node")
    p.add_argument("--nnodes", type=int, default=1, help="torchrun: nodes")
    p.add_argument("--rdzv-endpoint", default=None, help="torchrun: host:port of the rendezvous (multi-node)")
    p.add_argument("--slurm", nargs="*", default=None, metavar="KEY=VALUE",
                   help="submitit parameters, e.g. slurm_partition=gpu timeout_min=600")
    p.add_argument("--cluster", default=None, help="submitit cluster (default: auto; 'local' runs jobs locally)")
    p.add_argument("--tflops", type=float, default=25.0, help="sustained TFLOP/s assumed for the GPU-hour estimate")
    p.add_argument("--dry-run", action="store_true", help="print the plan only")
    p.add_argument("overrides", nargs="*", help="key=value overrides for every run, e.g. data_root=/data")
    p.set_defaults(func=_sweep)

    p = sub.add_parser("report", help="print a paper table from the run records, with the paper's numbers")
    p.add_argument("config", help="table YAML")
    p.add_argument("--profile", default="full")
    p.add_argument("--format", default="md", choices=("md", "csv", "tex"))
    p.add_argument("--metric", default="last", choices=("last", "best", "train"),
                   help="last-epoch test top-1 (default) | best epoch, selected on the test set | train top-1 (a clean "
                        "pass over the training set after the last epoch)")
    p.add_argument("--against", default=None, metavar="DIR",
                   help="compare this table's records (out=) with the published ones in DIR, e.g. results/cpu/runs; "
                        "exit 1 if any cell moved beyond its published spread")
    p.add_argument("overrides", nargs="*", help="the same key=value overrides the sweep used (e.g. out=...)")
    p.set_defaults(func=_report)

    p = sub.add_parser("teacher", help="teacher registry (results/teachers.yaml): list | register NAME RUN_FOLDER")
    p.add_argument("action", choices=("list", "register"))
    p.add_argument("name", nargs="?")
    p.add_argument("run", nargs="?")
    p.set_defaults(func=_teacher)

    p = sub.add_parser("data", help="to-ffcv: write the FFCV copy (.beton) of an on-disk dataset, read by loader=ffcv")
    p.add_argument("action", choices=("to-ffcv",))
    p.add_argument("--max-resolution", type=int, default=512, help="cap on the longer side of stored images")
    p.add_argument("--jpeg-quality", type=int, default=90)
    p.add_argument("--write-mode", default="jpg", choices=("jpg", "smart", "proportion", "raw"),
                   help="FFCV's image storage mode")
    p.add_argument("--workers", type=int, default=-1, help="writer processes (-1 = all cores)")
    p.add_argument("overrides", nargs="*", help="dataset=imagenet|cub200|dogs|folders data_root=DIR [ffcv_dir=DIR]")
    p.set_defaults(func=_data)

    p = sub.add_parser("regress", help="CI regression gate: recompute every method's tiny fixed run and compare it "
                                       "with its golden in results/regress/ (exit 1 on any move beyond tolerance)")
    p.add_argument("--methods", nargs="+", default=None, metavar="NAME",
                   help="entries (e.g. ips-constant) or methods (all their entries); default: all")
    p.add_argument("--update", action="store_true", help="rewrite the goldens and print what changed")
    p.add_argument("--plugins", nargs="+", default=(), metavar="MODULE",
                   help="gate the methods these modules (.py paths or dotted names) register, instead of ipsd's")
    p.add_argument("--goldens", default=None, metavar="DIR",
                   help="the goldens' folder (default: ipsd's results/regress; required with --plugins)")
    p.add_argument("overrides", nargs="*", help="data_root=DIR (default: $IPSD_DATA)")
    p.set_defaults(func=_regress)

    p = sub.add_parser("interpolate", help="loss and top-1 along the line between two finished runs' weights "
                                           "(BatchNorm recomputed at each point); draws a PNG")
    p.add_argument("run_a", help="run folder at t = 0 (e.g. IPS without swap)")
    p.add_argument("run_b", help="run folder at t = 1 (e.g. IPS with swap)")
    p.add_argument("--out", required=True, help="PNG to write (the numbers go beside it as .json)")
    p.add_argument("--points", type=int, default=11)
    p.add_argument("--lo", type=float, default=0.0, help="first t (negative: extrapolate beyond A)")
    p.add_argument("--hi", type=float, default=1.0, help="last t (above 1: beyond B)")
    p.add_argument("--label-a", default="A")
    p.add_argument("--label-b", default="B")
    p.add_argument("--bn-batches", default="augmented",  # checked by interpolate(), the owner of the choices
                   help="images for the BatchNorm recomputation: augmented = one pass as trained (crop + flip, "
                        "shuffled, the run's batch size); clean = the stored images")
    p.add_argument("overrides", nargs="*", help="data_root=DIR, where the runs' dataset is (default: as recorded, "
                                                "or $IPSD_DATA)")
    p.set_defaults(func=_interpolate)

    p = sub.add_parser("evaluate", help="robustness and calibration suites (Tables 10-12) on a finished run's model; "
                                        "writes eval/<suite>.json into the run folder")
    p.add_argument("run", help="the run folder `ipsd train` printed")
    p.add_argument("--suite", nargs="+", required=True, metavar="SUITE",
                   help="safety (AURC, E-AURC, FPR@95, ECE, Brier, NLL) | attack (FGSM, I-FGSM) | corruption (CIFAR-C)")
    p.add_argument("--force", action="store_true", help="redo an evaluation that exists")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:N")
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--bins", type=int, default=None, help="safety: ECE bins (default 15)")
    p.add_argument("--eps", type=float, nargs="+", default=None,
                   help="attack: L-inf radii in [0, 1] pixels (default 0 0.001 0.003 0.005 0.01 0.05)")
    p.add_argument("--steps", type=int, default=None, help="attack: I-FGSM steps of eps/steps each (default 10)")
    p.add_argument("--corruptions", nargs="+", default=None, help="corruption: names (default: the ten)")
    p.add_argument("--severities", type=int, nargs="+", default=None, help="corruption: severities (default 1-5)")
    p.add_argument("--source", default="auto", choices=("auto", "official", "generated"),
                   help="corruption: official CIFAR-10-C/100-C files under the data root, generated, or official when "
                        "present (auto)")
    p.add_argument("overrides", nargs="*", help="data_root=DIR (default: as recorded, else $IPSD_DATA)")
    p.set_defaults(func=_evaluate)

    p = sub.add_parser("list", help="registered methods, models and datasets; `list method NAME`: its method_args")
    p.add_argument("what", nargs="?", choices=("method",))
    p.add_argument("name", nargs="?")
    p.set_defaults(func=_list)

    args, extra = parser.parse_known_args(argv)
    for item in extra:  # key=value overrides may follow options: collect them wherever they are
        if "=" in item and not item.startswith("-") and hasattr(args, "overrides"):
            args.overrides.append(item)
        else:
            parser.error(f"unrecognized argument {item!r}")
    try:
        return args.func(args) or 0
    except IpsdError as e:
        print(f"ipsd: error: {e}", file=sys.stderr)
        return e.exit_code


if __name__ == "__main__":
    sys.exit(main())
