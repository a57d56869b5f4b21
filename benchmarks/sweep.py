"""``ipsd sweep``: run a table's grid with an existing engine, skipping finished runs.

Every run is an ordinary ``ipsd train`` of its resolved config; because a run's folder is named by
its identity and resumes from its checkpoint, re-running a sweep after any crash completes only
what is missing. Launchers:
  local    sequential, or ``--jobs N`` subprocesses at once
  gpus     one run per visible GPU, queued
  torchrun each run across ``--nproc`` GPUs (multi-node: start the same sweep on every node with
           ``--nnodes``/``--rdzv-endpoint``; runs rendezvous by run id on a shared filesystem)
  slurm    submitit job array; jobs requeue themselves on preemption/timeout and resume
"""
from __future__ import annotations

import dataclasses
import functools
import os
import queue
import signal
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import yaml
from tqdm import tqdm

from ipsd.config import ConfigError, RunConfig, to_dict
from ipsd.errors import IpsdError
from ipsd.registry import Registry
from ipsd.resolve import is_file_dataset

from .grid import PlannedRun, Table, expand, load_table, teachers

class SweepError(IpsdError):
    """Some runs of a sweep failed; the message lists each run's folder and reason."""


LAUNCHERS: Registry[Callable[..., None]] = Registry("launcher")
# (train images, classes) of the standard splits, for the estimate only
KNOWN_TRAIN_SIZES = {"cifar10": (50000, 10), "cifar100": (50000, 100), "digits": (1442, 10),
                     "imagenet": (1281167, 1000), "cub200": (5994, 200), "dogs": (12000, 120)}


@dataclass
class LaunchOptions:
    jobs: int | None = None  # local: runs at once; None = local_jobs() (one one-thread job per core on CPU)
    nproc: int = 1  # torchrun: processes (GPUs) per node
    nnodes: int = 1
    rdzv_endpoint: str | None = None
    slurm: dict[str, Any] | None = None  # submitit parameters (partition, timeout_min, ...)
    cluster: str | None = None  # submitit cluster override ("local" for tests)
    evaluate: tuple[str, ...] = ()  # local: `ipsd evaluate` suites run on each run as soon as it has trained


def train_args(cfg: RunConfig) -> list[str]:
    """``key=value`` arguments that make ``ipsd train`` reproduce exactly this config."""
    return [f"{k}={yaml.safe_dump(v, default_flow_style=True, width=10**6).strip().removesuffix('...').strip()}"
            for k, v in to_dict(cfg).items()]


def status(run: PlannedRun) -> str:
    """done | partial | todo (the run folder's own status, ``missing`` shown as the plan's ``todo``)."""
    state = run.run.status()
    return "todo" if state == "missing" else state


@functools.lru_cache(maxsize=None)
def forward_flops(model: str, image_size: int = 32) -> float:
    """Forward FLOPs of one image (counted once per model with torch's flop counter)."""
    from torch.utils.flop_counter import FlopCounterMode

    from ipsd.models import build_model

    net = build_model(model, 100).eval()
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        net(torch.zeros(1, 3, image_size, image_size))
    return float(counter.get_total_flops())


def gpu_hours(run: PlannedRun, tflops: float) -> float:
    """Training compute / an assumed sustained rate: 3x forward FLOPs per image (forward + backward)."""
    n, classes = KNOWN_TRAIN_SIZES.get(run.cfg.dataset, (50000, 100))
    if run.cfg.per_class:
        n = min(n, run.cfg.per_class * len(run.cfg.classes or range(classes)))
    size = run.cfg.image_size if is_file_dataset(run.cfg.dataset) else 32  # on-disk data trains at image_size
    flops = 3 * forward_flops(run.cfg.model, size) * n * run.cfg.epochs * run.resolved.needs.images_per_anchor
    return flops / (tflops * 1e12) / 3600


def print_plan(table: Table, runs: list[PlannedRun], tflops: float, what: str = "runs") -> list[PlannedRun]:
    states = [status(r) for r in runs]
    todo = [r for r, s in zip(runs, states) if s != "done"]
    hours = sum(gpu_hours(r, tflops) for r in todo)
    print(f"{table.name} [{table.profile}]: {len(runs)} {what} ({states.count('done')} done, "
          f"{states.count('partial')} partial, {states.count('todo')} to start); estimated {hours:.2f} GPU-hours "
          f"for the remaining {len(todo)} (at an assumed {tflops:g} TFLOP/s sustained; adjust with --tflops)",
          flush=True)
    return todo


def _command(cfg: RunConfig) -> list[str]:
    return [sys.executable, "-m", "ipsd", "train", *train_args(dataclasses.replace(cfg, progress=False))]


def _die_with_parent() -> None:
    """In a launched child (Linux): receive SIGTERM when the sweep process dies, even by kill -9, so no orphan keeps
    training a run that a re-launched sweep would start again (the run's lock would refuse it anyway)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGTERM)  # 1 = PR_SET_PDEATHSIG
    except (OSError, AttributeError):  # not Linux: children are not tied to the parent
        pass


def _evaluate_command(run: PlannedRun, suites: tuple[str, ...]) -> list[str]:
    root = [f"data_root={run.cfg.data_root}"] if run.cfg.data_root else []
    return [sys.executable, "-m", "ipsd", "evaluate", str(run.folder), "--suite", *suites, "--device", run.cfg.device,
            *root]


def _run_queue(runs: list[PlannedRun], slots: list[dict[str, str]], make_cmd: Callable[[PlannedRun], list[str]],
               then: Callable[[PlannedRun], list[str]] | None = None) -> None:
    """Run commands with one worker per slot (each slot = extra environment variables); ``then``: a second command
    for each run once its first succeeded, in the same slot (a sweep's evaluation of the run it just trained)."""
    failures: list[str] = []
    pending: queue.SimpleQueue[PlannedRun] = queue.SimpleQueue()
    for run in runs:
        pending.put(run)

    def worker(slot: dict[str, str]) -> None:
        while True:
            try:
                run = pending.get_nowait()
            except queue.Empty:
                return
            print(f"start {run.row} / {run.column} seed {run.cfg.seed} -> {run.folder}", flush=True)
            for command in [make_cmd(run), *([then(run)] if then else [])]:
                proc = subprocess.run(command, env={**os.environ, **slot}, capture_output=True, text=True,
                                      preexec_fn=_die_with_parent)
                if proc.returncode:
                    failures.append(_failure(run, _last_error(proc.stderr)))
                    break
            else:
                print(f"done  {run.row} / {run.column} seed {run.cfg.seed}", flush=True)

    with ThreadPoolExecutor(len(slots)) as pool:
        list(pool.map(worker, slots))
    _raise_failures(failures)


def _failure(run: PlannedRun, reason: str) -> str:
    return f"  {run.row} / {run.column} seed {run.cfg.seed} in {run.folder}: {reason}"


def _last_error(stderr: str) -> str:
    """The ``ipsd: error:`` line of a failed child, else the last line it printed."""
    lines = [line for line in stderr.strip().splitlines() if line.strip()]
    errors = [line.removeprefix("ipsd: error: ") for line in lines if line.startswith("ipsd: error:")]
    return (errors or lines or ["(no output)"])[-1][-500:]


def _raise_failures(failures: list[str]) -> None:
    if failures:
        raise SweepError(f"{len(failures)} run(s) failed; fix each reason below, then re-run the sweep (finished runs "
                         "are kept and skipped):\n" + "\n".join(failures))


def usable_cores() -> int:
    """CPU cores this process may run on (its affinity, as a container or taskset limits it)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def local_jobs(runs: list[PlannedRun]) -> int:
    """The default number of local runs at once. On CPU, one one-thread run per core: measured on a quiet 2-core
    Xeon (resnet8, CIFAR-10 batch 64), two one-thread jobs trained 1345 images/s together against 888 for one
    two-thread job (1.5x), since small convolutions use a second thread poorly. With CUDA, one run (it takes the
    GPU; `--launcher gpus` spreads runs over several)."""
    on_gpu = any(r.cfg.device == "cuda" or (r.cfg.device == "auto" and torch.cuda.is_available()) for r in runs)
    return 1 if on_gpu else max(1, min(usable_cores(), len(runs)))


@LAUNCHERS.register("local")
def launch_local(runs: list[PlannedRun], opts: LaunchOptions) -> None:
    jobs = opts.jobs or local_jobs(runs)
    if jobs == 1:  # in this process: no interpreter start-up per run
        from ipsd.engine import train

        failures = []
        for run in tqdm(runs, desc="runs", file=sys.stderr):
            tqdm.write(f"start {run.row} / {run.column}: {run.cfg.method} on {run.cfg.model}, {run.cfg.dataset}, seed "
                       f"{run.cfg.seed} -> {run.folder}", file=sys.stderr)
            try:
                train(dataclasses.replace(run.cfg, progress=False))
                if opts.evaluate:
                    from ipsd.evaluation.run import evaluate_run

                    for suite in opts.evaluate:
                        evaluate_run(run.run, suite, data_root=run.cfg.data_root, device=run.cfg.device)
            except Exception as e:  # noqa: BLE001 -- report every failed run, keep going with the others
                failures.append(_failure(run, f"{type(e).__name__}: {e}" if not isinstance(e, IpsdError) else str(e)))
        _raise_failures(failures)
        return
    threads = max(1, usable_cores() // jobs)  # the cores shared out; recorded in each run's record
    # a partial run keeps `threads` unset: it resumes under the count it started with (the engine's rule)
    _run_queue(runs, [{"OMP_NUM_THREADS": str(threads)}] * jobs,
               lambda r: _command(r.cfg if r.cfg.threads or status(r) == "partial"
                                  else dataclasses.replace(r.cfg, threads=threads)),
               (lambda r: _evaluate_command(r, opts.evaluate)) if opts.evaluate else None)


@LAUNCHERS.register("gpus")
def launch_gpus(runs: list[PlannedRun], opts: LaunchOptions) -> None:
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    if not gpus:
        raise ConfigError("launcher 'gpus' found no visible GPU; use --launcher local")
    _run_queue(runs, [{"CUDA_VISIBLE_DEVICES": g} for g in gpus], lambda r: _command(r.cfg))


@LAUNCHERS.register("torchrun")
def launch_torchrun(runs: list[PlannedRun], opts: LaunchOptions) -> None:
    def cmd(run: PlannedRun) -> list[str]:
        rdzv = (["--rdzv-backend=c10d", f"--rdzv-endpoint={opts.rdzv_endpoint}", f"--rdzv-id={run.run_id}"]
                if opts.rdzv_endpoint else ["--standalone"])
        return [sys.executable, "-m", "torch.distributed.run", f"--nnodes={opts.nnodes}",
                f"--nproc-per-node={opts.nproc}", *rdzv, *_command(run.cfg)[2:]]

    _run_queue(runs, [{}], cmd)


class SlurmRun:
    """A submitit job: train one run; on preemption or timeout, requeue the same call (it resumes)."""

    def __init__(self, values: dict[str, Any]):
        self.values = values

    def __call__(self) -> str:
        from ipsd.config import build
        from ipsd.engine import train

        return str(train(build(RunConfig, {**self.values, "progress": False})))

    def checkpoint(self, *args, **kwargs):
        import submitit

        return submitit.helpers.DelayedSubmission(SlurmRun(self.values))


@LAUNCHERS.register("slurm")
def launch_slurm(runs: list[PlannedRun], opts: LaunchOptions) -> None:
    try:
        import submitit
    except ImportError:
        raise ConfigError("launcher 'slurm' needs submitit: pip install 'ipsd[slurm]'") from None
    folder = Path(runs[0].cfg.out) / "slurm" if runs else Path("runs/slurm")
    executor = submitit.AutoExecutor(folder=folder, cluster=opts.cluster)
    params = {"timeout_min": 24 * 60, "gpus_per_node": 1, "tasks_per_node": 1, "cpus_per_task": 8,
              "slurm_array_parallelism": 64, **(opts.slurm or {})}
    if executor.cluster != "slurm":
        params = {k: v for k, v in params.items() if not k.startswith("slurm_")}
    executor.update_parameters(**params)
    jobs = executor.submit_array([SlurmRun(to_dict(r.cfg)) for r in runs]) if runs else []
    print(f"submitted {len(jobs)} job(s) to {executor.cluster}; logs in {folder}", flush=True)
    for job in jobs:
        job.result()  # waits; raises if a run failed


def sweep(path: str, profile: str = "full", launcher: str = "local", overrides: list[str] = (),
          opts: LaunchOptions | None = None, tflops: float = 25.0, dry_run: bool = False) -> list[PlannedRun]:
    table = load_table(path, profile, overrides)
    runs = expand(table)
    launch = LAUNCHERS.get(launcher)
    needed = teachers(table) if any(r.resolved.method_cls.needs_teacher for r in runs) else []
    if needed:  # a teacher that does not exist yet is trained first
        todo = print_plan(table, needed, tflops, "teachers")
        if todo and not dry_run:
            launch(todo, opts or LaunchOptions())
    # replicate-major: every cell's first seed lands before any cell's second, so a sweep cut short leaves
    # comparable cells (a stable sort keeps the table's row order within a replicate)
    todo = sorted(print_plan(table, runs, tflops), key=lambda r: r.replicate)

    def evaluate_finished() -> None:  # the table's `evaluate:` suites, on every finished run lacking them (in this process)
        from ipsd.evaluation.run import evaluate_runs

        _raise_failures(evaluate_runs([(f"{r.row} / {r.column} seed {r.cfg.seed}", r.run, r.cfg.data_root, r.cfg.device)
                                       for r in runs], table.evaluate, dry_run))

    if table.evaluate:  # first the runs already trained (another table's), so a sweep cut short has them measured
        evaluate_finished()
    if todo and not dry_run:  # the local launcher evaluates each new run as it lands; the others are caught below
        launch(todo, dataclasses.replace(opts or LaunchOptions(), evaluate=tuple(table.evaluate)))
        if table.evaluate:
            evaluate_finished()
    return runs
