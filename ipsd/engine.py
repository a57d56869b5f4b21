"""The training engine: one loop for every method, model and scale (CPU smoke to multi-node DDP).

``train(cfg)`` resolves the config (``ipsd.resolve``), checks what the environment must provide, creates
(or resumes) the run folder named by the hash of the run's identity (``ipsd.runs``), trains with SGD or
AdamW under a per-epoch LR schedule (``schedules.lr_at``), evaluates every epoch, checkpoints atomically
every epoch and writes ``result.json`` on completion.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

from . import dist, runs
from .config import ConfigError, RunConfig, to_dict
from .data import DataError, load_dataset, resolve_root, subset
from .data.beton import BetonDataset, default_folder, load_betons, require_ffcv
from .data.datasets import subset_items
from .data.folder_loader import FolderLoader
from .data.folders import FILE_DATASETS
from .data.label_noise import with_label_noise
from .data.loader import DeviceLoader, LoaderBase
from .errors import Interrupted, NonFiniteLoss
from .losses import accuracy_counts
from .method import Method, Setup, Step
from .models import build_model
from .resolve import Resolved, is_file_dataset, resolve
from .rng import derive_seed, generator
from .runs import RunFolder
from .schedules import lr_at
from .teacher import load_run_teacher, verify_teacher

__all__ = ["NonFiniteLoss", "Resolved", "Task", "evaluate", "resolve", "train", "wrap_ddp"]

CHECK_EVERY = 50  # steps between non-finite-loss checks (each check synchronises the device)
# Per-epoch log fields that measure the machine, not the run: in log.jsonl, left out of the record's curve (which
# holds every computed value, loss terms, accuracies and the method's logged scalars such as IPS's p_r).
TIMING_KEYS = ("train_seconds", "images", "images_per_second", "warmup")


def check_environment(cfg: RunConfig) -> None:
    """What training needs from this machine beyond the config: FFCV for loader=ffcv (the device and the
    data are checked when they are opened, with their own messages)."""
    if cfg.loader == "ffcv":
        try:
            require_ffcv()
        except DataError as e:
            raise ConfigError(f"loader=ffcv: {e}") from None


def _log(msg: str) -> None:
    tqdm.write(msg, file=sys.stderr)


class Task(nn.Module):
    """What DDP wraps: the model plus the method's trainable extras; forward returns named losses."""

    def __init__(self, model: nn.Module, method: Method):
        super().__init__()
        self.model, self.method = model, method

    def forward(self, batch, step):
        return self.method(self.model, batch, step)


def _to_cpu(obj: Any) -> Any:
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):
        return {k: _to_cpu(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to_cpu(v) for v in obj)
    return obj


def method_checkpoint(method: Method, info: dist.DistInfo) -> dict[str, Any]:
    """The method's part of a checkpoint; a method with per-rank state also gets every rank's copy."""
    part = {"method": method.state_dict()}
    if method.per_rank_state and info.enabled:
        part["method_per_rank"] = dist.gather_objects(_to_cpu(method.state_dict()))
    return part


def restore_method(method: Method, ckpt: dict[str, Any], rank: int) -> None:
    """Load this rank's method state (its own copy when the checkpoint holds one per rank)."""
    per_rank = ckpt.get("method_per_rank")
    method.load_state_dict(per_rank[rank] if per_rank and rank < len(per_rank) else ckpt["method"])


def wrap_ddp(task: Task, device: torch.device) -> DDP:
    """DDP over model + method extras; the method's own state (``ddp_ignored``) is neither synced nor broadcast."""
    DDP._set_params_and_buffers_to_ignore_for_model(task, [f"method.{n}" for n in task.method.ddp_ignored()])
    return DDP(task, device_ids=[device.index] if device.type == "cuda" else None)


@functools.lru_cache(maxsize=2)
def _dataset(name: str, root: str | None, download: bool):
    """Datasets read and verified once per process (sweeps train many runs in one process)."""
    if name in FILE_DATASETS:  # file lists only: images are decoded per batch by the loader
        return FILE_DATASETS.get(name)(root)
    return load_dataset(name, root, download)


@functools.lru_cache(maxsize=2)
def _betons(folder: str, dataset: str) -> BetonDataset:
    return load_betons(folder, dataset)


def ffcv_folder(cfg: RunConfig) -> Path:
    """Where a run's FFCV copy lives: ``ffcv_dir``, else ``<data_root>/ffcv/<dataset>``."""
    folder = Path(cfg.ffcv_dir).expanduser() if cfg.ffcv_dir else default_folder(resolve_root(cfg.data_root), cfg.dataset)
    if folder is None:
        raise ConfigError(f"loader=ffcv needs ffcv_dir=<folder of the .beton files> or data_root "
                          f"(or $IPSD_DATA) holding ffcv/{cfg.dataset}/")
    return folder


def load_data(cfg: RunConfig):
    if cfg.loader == "ffcv":
        data = _betons(str(ffcv_folder(cfg)), cfg.dataset)
    else:
        root = resolve_root(cfg.data_root)
        data = _dataset(cfg.dataset, str(root) if root else None, cfg.download)
    if cfg.per_class or cfg.classes or cfg.test_per_class:
        try:
            pick = subset_items if is_file_dataset(cfg.dataset) else subset
            data = pick(data, cfg.per_class, cfg.classes, cfg.test_per_class)
        except ValueError as e:
            raise ConfigError(str(e)) from None
    if cfg.label_noise:  # after subsetting, before anything reads the labels (the sampler pairs by noisy class)
        try:
            data = with_label_noise(data, cfg.label_noise, cfg.label_noise_seed)
        except ValueError as e:
            raise ConfigError(f"label_noise={cfg.label_noise}: {e}") from None
    present = int(data.train_y.unique().numel())
    if present < 2:
        raise ConfigError(f"the training set holds {present} class(es) (dataset={cfg.dataset}, classes={cfg.classes}); "
                          "a classifier needs at least 2: widen classes=")
    if cfg.batch_size > len(data.train_y):
        raise ConfigError(f"batch_size={cfg.batch_size} is out of range: the training set has "
                          f"{len(data.train_y)} images; allowed [1, {len(data.train_y)}]")
    return data


def make_loader(cfg: RunConfig, data, device: torch.device, needs, info: dist.DistInfo, channels_last: bool):
    """The resolved ``cfg.loader`` over ``data``: this rank's batches (memory, folder or ffcv)."""
    args = (data, device, cfg.batch_size, needs, cfg.seed, info.rank, info.world, channels_last)
    if cfg.loader == "memory":
        return DeviceLoader(*args)
    if cfg.loader == "ffcv":
        from .data.ffcv_loader import FfcvLoader  # imports FFCV: checked by check_environment

        return FfcvLoader(*args, image_size=cfg.image_size, workers=decoding_workers(cfg))
    return FolderLoader(*args, image_size=cfg.image_size, workers=decoding_workers(cfg))


def usable_cpus() -> int:
    """CPUs this process may run on (its affinity mask, which containers and taskset narrow), else the count."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        return os.cpu_count() or 1


def decoding_workers(cfg: RunConfig) -> int:
    """``workers`` as given, else what the machine offers (at most 8); FFCV refuses more threads than CPUs, so a
    too-large value for it is a config error naming the key."""
    cpus = usable_cpus()
    if cfg.workers is None:
        return min(8, cpus)
    if cfg.loader == "ffcv" and not 1 <= cfg.workers <= cpus:
        raise ConfigError(f"workers={cfg.workers} is out of range for loader=ffcv on this machine: FFCV runs between 1 "
                          f"and {cpus} decoding threads here (the CPUs this process may use); set workers=1..{cpus}")
    return cfg.workers


@torch.no_grad()
def evaluate(model: nn.Module, batches, autocast) -> tuple[float, float]:
    """Top-1/top-5 (%) over ``(x, y)`` batches (this rank's share), shards summed across ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, device=next(model.parameters()).device)
    for x, y in batches:
        with autocast():
            logits = model(x)
        counts[:2] += accuracy_counts(logits.float(), y)
        counts[2] += len(y)
    dist.all_reduce_sum(counts)
    model.train(was_training)
    top1, top5, n = counts.tolist()
    return 100 * top1 / n, 100 * top5 / n


def autocast_for(settings: dict[str, Any], device: torch.device):
    """A factory of the run's autocast context (bf16 when ``settings["bf16"]``, else a no-op)."""
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings["bf16"])


def _has_fused(optimizer: str) -> bool:
    """Whether this torch's ``optimizer`` class takes ``fused=`` (one kernel over all parameters)."""
    cls = torch.optim.AdamW if optimizer == "adamw" else torch.optim.SGD
    return "fused" in inspect.signature(cls).parameters


def run_settings(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """How the run executes (recorded in result.json). The GPU habits (fused optimizer, teacher in the student's
    memory format and compiled with it) apply on CUDA only, so CPU runs compute what they always did."""
    cuda = device.type == "cuda"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    cl = cuda if cfg.channels_last is None else cfg.channels_last
    return {"bf16": bf16, "channels_last": cl, "compile": cfg.compile, "sync_bn": cfg.sync_bn,
            "compile_mode": cfg.compile_mode if cfg.compile else None,
            "fused_optimizer": cuda and _has_fused(cfg.optimizer),
            "teacher_like_student": cuda,
            "evaluation": "autocast and memory format of training",
            "images_per_second": "first epoch of each invocation excluded (start-up, compile warm-up)"}


def compile_model(model: nn.Module, backend: str, mode: str = "default") -> None:
    """torch.compile ``model``'s forward in place. Its hooks (ViewAccuracy's) stay eager, outside the graph, so
    CUDA graphs (compile_mode=reduce-overhead) see no mutated inputs; state_dict keys are unchanged."""
    model.forward = torch.compile(model.forward, backend=backend, **({} if mode == "default" else {"mode": mode}))


def place_teacher(teacher: Any, settings: dict[str, Any], backend: str, mode: str = "default") -> None:
    """With ``settings["teacher_like_student"]`` (CUDA) a FrozenTeacher runs like the student: in its memory
    format, and compiled when the student is."""
    if teacher is None or not settings["teacher_like_student"]:
        return
    teacher.model.to(memory_format=torch.channels_last if settings["channels_last"] else torch.contiguous_format)
    if settings["compile"]:
        compile_model(teacher.model, backend, mode)


def execution(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    """What, besides the identity, decides a run's numbers bit for bit: the device type and, on CPU, the torch
    thread count (reductions split differently across threads). Recorded; a resume under other values is refused."""
    facts: dict[str, Any] = {"device_type": device.type, "deterministic": cfg.deterministic}
    if device.type == "cpu":
        facts["torch_threads"] = torch.get_num_threads()
    return facts


class ViewAccuracy:
    """Running top-1 on the inputs as trained. A forward hook on the model reads the rows of each training call
    in B-row blocks; block k of a step (k < the method's ``train_views``) is view k+1 of the batch, judged
    against the batch's labels. Counts stay on the device: no synchronisation per step."""

    def __init__(self, model: nn.Module, views: int, device: torch.device):
        self.views, self.y, self.block = views, None, 0
        self.correct = torch.zeros(max(views, 1), device=device)
        self.anchors = 0
        self.handle = model.register_forward_hook(self._hook) if views else None

    def step(self, y: torch.Tensor | None) -> None:
        """Judge the next calls against labels ``y`` (None: stop judging)."""
        self.y, self.block = y, 0
        if y is not None:
            self.anchors += len(y)

    def _hook(self, module: nn.Module, inputs: Any, output: Any) -> None:
        if self.y is None or not module.training:
            return
        logits = (output[0] if isinstance(output, tuple) else output).detach()
        b = len(self.y)
        if len(logits) % b:
            return
        for j in range(len(logits) // b):
            if self.block < self.views:
                self.correct[self.block] += (logits[j * b:(j + 1) * b].argmax(1) == self.y).sum()
            self.block += 1

    def epoch_values(self) -> dict[str, float]:
        """``train_top1_view<k>`` (%) over this epoch on all ranks; resets the counts."""
        if not self.views or not self.anchors:
            return {}
        counts = dist.all_reduce_sum(torch.cat([self.correct, self.correct.new_tensor([self.anchors])]))
        *correct, n = counts.tolist()
        self.correct.zero_()
        self.anchors = 0
        return {f"train_top1_view{k + 1}": 100 * c / n for k, c in enumerate(correct)}


def _train_epoch(task: nn.Module, optimizer: torch.optim.Optimizer, loader: LoaderBase, step: Step, autocast,
                 progress: bool, kept: str, views: ViewAccuracy,
                 cudagraphs: bool = False) -> tuple[dict[str, torch.Tensor], int]:
    """One pass over this rank's batches: summed loss terms and the number of anchors seen.

    Non-finite losses are counted on the device and checked every CHECK_EVERY steps (on all ranks together),
    so the hot loop does not synchronise on every step. ``cudagraphs``: each step starts a new CUDA-graph
    iteration (compile_mode=reduce-overhead; nothing may hold a graph output across steps).
    """
    sums: dict[str, torch.Tensor] = {}
    bad = torch.zeros((), device=loader.device)
    anchors = 0
    bar = tqdm(loader.epoch(step.epoch), total=len(loader), desc=f"epoch {step.epoch}/{step.epochs}", leave=False,
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for i, batch in enumerate(bar, 1):
        if cudagraphs:
            torch.compiler.cudagraph_mark_step_begin()
        views.step(batch.y)
        with autocast():
            losses = task(batch, step)
        views.step(None)
        loss = sum(losses.values())
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        for k, v in losses.items():
            sums[k] = sums.get(k, 0.0) + v.detach().float()
        bad += ~torch.isfinite(loss.detach())
        anchors += len(batch.y)
        if (i % CHECK_EVERY == 0 or i == len(loader)) and dist.all_reduce_sum(bad.clone()).item() > 0:
            terms = {k: float(v.detach()) for k, v in losses.items()}
            raise NonFiniteLoss(f"non-finite loss at epoch {step.epoch}, step {i} (last terms {terms}); training "
                                f"stopped. {kept}. Lower the LR or check the method's hyper-parameters.")
    return sums, anchors


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter], fused: bool = False) -> torch.optim.Optimizer:
    """The run's optimizer at ``cfg.lr`` (the schedule overwrites the LR every epoch); one weight decay for all.
    ``fused``: torch's fused kernels (CUDA); else torch's default implementation."""
    impl = {"fused": True} if fused else {}
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, **impl)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay, **impl)


def load_optimizer(optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    """Restore ``saved`` into ``optimizer``, keeping its own implementation (fused/foreach): a saved group's flags
    would otherwise replace them (e.g. a checkpoint written before fused kernels were used)."""
    groups = [{**g, **{k: now[k] for k in ("fused", "foreach") if k in now}}
              for g, now in zip(saved["param_groups"], optimizer.param_groups)]
    optimizer.load_state_dict({**saved, "param_groups": groups})


def _check_same_run_folder(run: RunFolder, info: dist.DistInfo, device: torch.device) -> None:
    """Every rank must see the same run folder (multi-node: ``out`` on a filesystem all nodes share), or
    ranks would disagree on whether to resume, and from what."""
    if not info.enabled:
        return
    seen = torch.tensor([[p.exists() for p in (run.result_path, run.checkpoint_path)]], device=device).long()
    every = dist.all_gather_cat(seen)
    if not (every == every[0]).all():
        raise ConfigError(f"the ranks do not see the same run folder {run.path} (result.json/checkpoint.pt present "
                          f"on some ranks only): out={run.path.parent} must be on a filesystem shared by every node")


def _check_execution(run: RunFolder, recorded: dict[str, Any] | None, now: dict[str, Any]) -> None:
    """A resume must run under the facts the run started with, or its numbers would silently change."""
    if recorded is None or recorded == now:
        return
    diff = ", ".join(f"{k} {recorded.get(k)!r} then, {now.get(k)!r} now" for k in sorted({*recorded, *now})
                     if recorded.get(k) != now.get(k))
    fix = (f"re-run with threads={recorded['torch_threads']}" if recorded.get("torch_threads") != now.get("torch_threads")
           and "torch_threads" in recorded else "re-run on the device it started on")
    raise ConfigError(f"run {run.run_id} was trained so far under other settings ({diff}); resuming would mix them: "
                      f"{fix}, or move {run.path} aside to start it afresh")


def _set_threads(cfg: RunConfig, ckpt: dict[str, Any] | None, run_id: str, main: bool) -> None:
    """CPU threads: ``threads`` when set; else, for a resume, the count the run started with (so an interrupted run
    finishes with the numbers it would have had, whatever launched it first); else torch's default."""
    started = ((ckpt or {}).get("state", {}).get("execution") or {}).get("torch_threads")
    threads = cfg.threads or started
    if threads and threads != torch.get_num_threads():
        if not cfg.threads and main:
            _log(f"run {run_id} started with threads={started}: resuming with the same count")
        torch.set_num_threads(threads)


def _check_out(out: str) -> None:
    """``out`` must be a folder this process can write (it is created if missing)."""
    path = Path(out).expanduser()
    if path.exists() and not path.is_dir():
        raise ConfigError(f"out={out!r} is a file, not a folder; give out= a folder for the run folders")
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ConfigError(f"out={out!r} cannot be created ({e.strerror}); give out= a writable folder") from None
    if not os.access(path, os.W_OK | os.X_OK):
        raise ConfigError(f"out={out!r} is not writable by this user; give out= a writable folder")


def train(cfg: RunConfig) -> Path:
    """Run (or resume, or return) the run ``cfg`` describes; returns its folder. Rank 0 holds the run's training
    lock for the whole call, so two trainers never write one run folder."""
    info, device = dist.init(cfg.device)
    res = resolve(cfg)
    check_environment(res.cfg)
    _check_out(res.cfg.out)
    try:
        with res.folder.training_lock() if info.main else contextlib.nullcontext():
            return _train(res, info, device)
    except KeyboardInterrupt:
        done = len(res.folder.read_log())  # one line per checkpointed epoch
        raise Interrupted(f"interrupted; {res.folder.path} keeps the checkpoint of epoch {done}: re-run the same "
                          f"command to resume from epoch {done + 1}") from None


def _train(res: Resolved, info: dist.DistInfo, device: torch.device) -> Path:
    cfg, run = res.cfg, res.folder
    _check_same_run_folder(run, info, device)
    if run.read_result() is not None:
        if info.main:
            _log(f"run {res.run_id} is already complete")
        return run.path
    ckpt = run.load_checkpoint(map_location=device) if run.checkpoint_path.exists() else None
    if device.type == "cpu":
        _set_threads(cfg, ckpt, res.run_id, info.main)

    data = load_data(cfg)
    if getattr(data, "note", "") and info.main:
        _log(data.note)
    settings = run_settings(cfg, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic

    torch.manual_seed(derive_seed("init", cfg.seed))  # identical initial weights on every rank
    model = build_model(cfg.model, data.num_classes)
    teacher = load_run_teacher(cfg, data, device) if cfg.teacher else None
    image_size = cfg.image_size if is_file_dataset(cfg.dataset) else data.image_size
    setup = Setup.of(cfg.model, model, data.train_y, image_size, cfg.epochs, cfg.batch_size, teacher)
    method = res.method_cls(res.method_cfg, setup)
    if settings["sync_bn"] and info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    place_teacher(teacher, settings, cfg.compile_backend, cfg.compile_mode)
    method.to(device)
    try:
        loader = make_loader(cfg, data, device, method.needs, info, settings["channels_last"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    autocast = autocast_for(settings, device)
    if teacher is not None:  # before any training: the teacher must be the one recorded
        verify_teacher(teacher, evaluate(teacher.model, loader.test_batches(cfg.eval_batch_size), autocast)[0],
                       cfg.teacher_tolerance)
        if info.main:
            _log(f"teacher {cfg.teacher}: {teacher.info['model']}, top-1 {teacher.info['measured_top1']:.2f} "
                 f"(recorded {teacher.info['top1']}), sha256 {teacher.info['sha256'][:12]}")
    params = [p for p in [*model.parameters(), *method.parameters()] if p.requires_grad]
    optimizer = make_optimizer(cfg, params, settings["fused_optimizer"])

    facts = execution(cfg, device)
    state = {"epoch": 0, "history": [], "train_seconds": 0.0, "wall_seconds": 0.0, "train_images": 0,
             "execution": facts}
    if ckpt is not None:
        _check_execution(run, ckpt["state"].get("execution"), facts)
        model.load_state_dict(ckpt["model"])
        restore_method(method, ckpt, info.rank)
        load_optimizer(optimizer, ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = {**ckpt["state"], "execution": facts}
        if info.main:
            _log(f"resuming run {res.run_id} after epoch {state['epoch']}")
    dist.barrier()

    if settings["compile"]:
        compile_model(model, cfg.compile_backend, cfg.compile_mode)
    views = ViewAccuracy(model, res.method_cls.train_views(res.method_cfg), device)
    task = Task(model, method)
    if info.enabled:
        task = wrap_ddp(task, device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    done_here = 0
    wall_start = time.perf_counter()
    for epoch in range(state["epoch"] + 1, cfg.epochs + 1):
        if cfg.stop_after is not None and done_here >= cfg.stop_after:
            break
        lr = lr_at(epoch, base=cfg.lr, epochs=cfg.epochs, ref=cfg.schedule_ref_epochs, schedule=cfg.lr_schedule,
                   milestones=cfg.lr_milestones, decay=cfg.lr_decay, warmup=cfg.warmup_epochs)
        for group in optimizer.param_groups:
            group["lr"] = lr
        step = Step(epoch, cfg.epochs, generator(device, "method", cfg.seed, epoch, info.rank), cfg.schedule_ref_epochs)
        method.epoch_start(step)
        t0 = time.perf_counter()
        sums, anchors = _train_epoch(task, optimizer, loader, step, autocast, cfg.progress and info.main,
                                     f"{run.path} keeps the last good checkpoint (epoch {state['epoch']})", views,
                                     cudagraphs=settings["compile_mode"] == "reduce-overhead" and device.type == "cuda")
        method.epoch_end(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - t0
        if info.enabled:
            dist.broadcast_buffers(model)
        top1, top5 = evaluate(model, loader.test_batches(cfg.eval_batch_size), autocast)
        steps = len(loader)
        loss_means = torch.stack([sums[k] for k in sorted(sums)]) / steps
        loss_means = (dist.all_reduce_sum(loss_means) / info.world).tolist()
        images = int(dist.all_reduce_sum(torch.tensor(float(anchors), device=device)).item()) * method.needs.images_per_anchor
        record = {"epoch": epoch, "lr": lr, "loss": dict(zip(sorted(sums), loss_means)), "top1": top1, "top5": top5,
                  "train_seconds": train_seconds, "images": images, "images_per_second": images / train_seconds,
                  "warmup": done_here == 0, **views.epoch_values(), **method.log_values(step)}
        if epoch == cfg.epochs:
            clean = loader.clean_train_batches(cfg.eval_batch_size)
            if clean is not None:
                record["train_top1"] = evaluate(model, clean, autocast)[0]
        state["history"].append(record)
        state["epoch"] = epoch
        state["train_seconds"] += train_seconds
        state["train_images"] += images
        state["wall_seconds"] += time.perf_counter() - wall_start
        wall_start = time.perf_counter()
        done_here += 1
        method_part = method_checkpoint(method, info)  # collective under DDP: every rank takes part
        if info.main:
            ckpt = {"model": model.state_dict(), **method_part, "optimizer": optimizer.state_dict(),
                    "torch_rng": torch.get_rng_state(), "state": state}
            if not run.config_path.exists():  # the folder appears with the first checkpoint, never half-made
                run.write_config(to_dict(cfg))
            run.save_checkpoint(ckpt)
            run.write_log(state["history"])
            loss_txt = " ".join(f"{k}={v:.4f}" for k, v in record["loss"].items())
            _log(f"epoch {epoch}/{cfg.epochs} lr={lr:.3g} {loss_txt} top1={top1:.2f} top5={top5:.2f} "
                 f"({train_seconds:.1f}s, {record['images_per_second']:.0f} img/s)")
        dist.barrier()

    if state["epoch"] == cfg.epochs and info.main:
        noise = {"label_noise": data.label_noise} if cfg.label_noise else {}  # with_label_noise's record
        run.write_result({**_result(res, state, device, info, loader, settings, teacher.info if teacher else None),
                          **noise})
    dist.barrier()
    return run.path


def steady_rate(history: list[dict[str, Any]]) -> float | None:
    """Training images/s over the epochs that are not the first of an invocation (start-up, compile warm-up);
    None when every epoch was a first one."""
    steady = [r for r in history if not r.get("warmup") and r.get("images")]
    seconds = sum(r["train_seconds"] for r in steady)
    return sum(r["images"] for r in steady) / seconds if steady and seconds > 0 else None


def _result(res: Resolved, state: dict, device, info, loader, settings,
            teacher_info: dict[str, Any] | None) -> dict[str, Any]:
    """The run record every table cell traces back to."""
    cfg, hist = res.cfg, state["history"]
    best = max(hist, key=lambda r: r["top1"])
    last = hist[-1]
    return {
        "run_id": res.run_id,
        "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset, "seed": cfg.seed,
        "final": {"top1": last["top1"], "top5": last["top5"], "epoch": last["epoch"],
                  "train_top1": last.get("train_top1"), "train_top1_note": "clean pass over the training set "
                  "(no augmentation) after the last epoch"},
        "best": {"top1": best["top1"], "top5": best["top5"], "epoch": best["epoch"],
                 "note": "selected on the test set"},
        "curve": [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in hist],
        "config": to_dict(cfg),
        "identity": cfg.identity(),
        "git_commit": runs.git_commit(),
        "versions": runs.versions(),
        "hardware": runs.hardware(device, info.world),
        "settings": settings,
        "execution": state["execution"],
        "wall_seconds": state["wall_seconds"],
        "train_seconds": state["train_seconds"],
        "images_per_second": steady_rate(hist),
        "images_per_second_raw": state["train_images"] / max(state["train_seconds"], 1e-9),
        "images_per_second_note": "steady state: epochs after the first of each invocation (start-up and compile "
                                  "warm-up excluded); _raw counts every epoch",
        "images_per_step": loader.images_per_step,
        "peak_memory_mib": runs.peak_memory_mib(device),
        "teacher": teacher_info,
        "ffcv_copy": loader.data.provenance() if cfg.loader == "ffcv" else None,
    }
