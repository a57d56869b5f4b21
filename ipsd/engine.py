"""The training engine: one loop for every method, model and scale (CPU smoke to multi-node DDP).

``train(cfg)`` resolves the config, creates (or resumes) the run folder named by the hash of the
run's identity, trains with SGD or AdamW under a per-epoch LR schedule (``schedules.lr_at``),
evaluates every epoch, checkpoints atomically every epoch and writes ``result.json`` on completion.
"""
from __future__ import annotations

import dataclasses
import functools
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
from .data import DATASETS, DataError, load_dataset, resolve_root, subset
from .data.beton import BetonDataset, default_folder, load_betons, require_ffcv
from .data.datasets import subset_items
from .data.folder_loader import FolderLoader
from .data.folders import FILE_DATASETS
from .data.loader import DeviceLoader, LoaderBase
from .losses import accuracy_counts
from .method import METHODS, Method, Setup, Step, load_methods
from .models import MODELS, build_model
from .rng import derive_seed, generator
from .schedules import lr_at
from .teacher import load_run_teacher, teacher_identity, verify_teacher

CHECK_EVERY = 50  # steps between non-finite-loss checks (each check synchronises the device)


class NonFiniteLoss(RuntimeError):
    """Training diverged; the run folder keeps the last good checkpoint."""


@dataclasses.dataclass
class Resolved:
    """A config with every default filled in, plus the classes it names."""

    cfg: RunConfig
    method_cls: type[Method]
    method_cfg: Any

    @property
    def run_id(self) -> str:
        return runs.run_hash(self.cfg.identity())


def _lookup(registry, name: str, key: str):
    try:
        return registry.get(name)
    except KeyError as e:
        raise ConfigError(f"{key}: {e.args[0]}") from None


def resolve(cfg: RunConfig) -> Resolved:
    """Fill model-dependent defaults (LR, the method's per-model hyper-parameters) and validate names."""
    load_methods()
    method_cls = _lookup(METHODS, cfg.method, "method")
    spec = _lookup(MODELS, cfg.model, "model")
    if cfg.dataset not in FILE_DATASETS:
        try:
            DATASETS.get(cfg.dataset)
        except KeyError as e:
            raise ConfigError(f"dataset: {e.args[0]}; on-disk datasets: {', '.join(FILE_DATASETS.names())}") from None
    loader = _resolve_loader(cfg)
    method_cfg = method_cls.resolve_config(spec.name, cfg.method_args)
    if method_cls.needs_teacher and not cfg.teacher:
        raise ConfigError(f"method {method_cls.name!r} needs a teacher: pass teacher=<name in results/teachers.yaml "
                          f"| run folder of a finished `ipsd train method=hard ...` | its checkpoint.pt>")
    if cfg.teacher and not method_cls.needs_teacher:
        raise ConfigError(f"method {method_cls.name!r} takes no teacher; remove teacher={cfg.teacher!r}")
    teacher_id = teacher_identity(cfg.teacher) if cfg.teacher else None
    cfg = dataclasses.replace(cfg, method=method_cls.name, model=spec.name, dataset=cfg.dataset.lower(),
                              lr=cfg.lr if cfg.lr is not None else spec.lr, method_args=to_dict(method_cfg),
                              teacher_id=teacher_id, loader=loader)
    return Resolved(cfg, method_cls, method_cfg)


def _resolve_loader(cfg: RunConfig) -> str:
    """The loader a run uses: memory for in-memory datasets, folder or ffcv for on-disk ones (never a silent
    fallback: asking for ffcv without FFCV installed is an error with the install hint)."""
    on_disk = is_file_dataset(cfg.dataset.lower())
    loader = cfg.loader or ("folder" if on_disk else "memory")
    if on_disk == (loader == "memory"):
        kinds = "folder | ffcv" if on_disk else "memory"
        raise ConfigError(f"loader={loader} does not fit dataset={cfg.dataset}, which is "
                          f"{'read from disk' if on_disk else 'held in memory'}; use loader={kinds} (or leave it unset)")
    if loader == "ffcv":
        try:
            require_ffcv()
        except DataError as e:
            raise ConfigError(f"loader=ffcv: {e}") from None
    return loader


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


def is_file_dataset(name: str) -> bool:
    """Read from disk per batch (folder or ffcv loader) rather than held in memory (DeviceLoader)."""
    return name in FILE_DATASETS


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
        from .data.ffcv_loader import FfcvLoader  # noqa: I001 -- imports FFCV, checked present by resolve()

        return FfcvLoader(*args, image_size=cfg.image_size, workers=cfg.workers)
    return FolderLoader(*args, image_size=cfg.image_size, workers=cfg.workers)


@torch.no_grad()
def evaluate(model: nn.Module, loader: LoaderBase, batch_size: int, autocast) -> tuple[float, float]:
    """Top-1/top-5 (%) on the full test set, shards summed across ranks."""
    was_training = model.training
    model.eval()
    counts = torch.zeros(3, device=loader.device)
    for x, y in loader.test_batches(batch_size):
        with autocast():
            logits = model(x)
        counts[:2] += accuracy_counts(logits.float(), y)
        counts[2] += len(y)
    dist.all_reduce_sum(counts)
    model.train(was_training)
    top1, top5, n = counts.tolist()
    return 100 * top1 / n, 100 * top5 / n


def _autocast(settings: dict[str, Any], device: torch.device):
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16, enabled=settings["bf16"])


def _settings(cfg: RunConfig, device: torch.device) -> dict[str, Any]:
    cuda = device.type == "cuda"
    bf16 = cfg.precision == "bf16" or (cfg.precision == "auto" and cuda)
    cl = cuda if cfg.channels_last is None else cfg.channels_last
    return {"bf16": bf16, "channels_last": cl, "compile": cfg.compile, "sync_bn": cfg.sync_bn}


def _train_epoch(task: nn.Module, optimizer: torch.optim.Optimizer, loader: LoaderBase, step: Step, autocast,
                 progress: bool, kept: str) -> tuple[dict[str, torch.Tensor], int]:
    """One pass over this rank's batches: summed loss terms and the number of anchors seen.

    Non-finite losses are counted on the device and checked every CHECK_EVERY steps (on all ranks together),
    so the hot loop does not synchronise on every step.
    """
    sums: dict[str, torch.Tensor] = {}
    bad = torch.zeros((), device=loader.device)
    anchors = 0
    bar = tqdm(loader.epoch(step.epoch), total=len(loader), desc=f"epoch {step.epoch}/{step.epochs}", leave=False,
               disable=not progress, file=sys.stderr, dynamic_ncols=True)
    for i, batch in enumerate(bar, 1):
        with autocast():
            losses = task(batch, step)
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


def make_optimizer(cfg: RunConfig, params: list[nn.Parameter]) -> torch.optim.Optimizer:
    """The run's optimizer at ``cfg.lr`` (the schedule overwrites the LR every epoch); one weight decay for all."""
    if cfg.optimizer == "adamw":
        return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                           weight_decay=cfg.weight_decay)


def _check_same_run_folder(folder: Path, info: dist.DistInfo, device: torch.device) -> None:
    """Every rank must see the same run folder (multi-node: ``out`` on a filesystem all nodes share), or
    ranks would disagree on whether to resume, and from what."""
    if not info.enabled:
        return
    seen = torch.tensor([[(folder / f).exists() for f in ("result.json", "checkpoint.pt")]], device=device).long()
    every = dist.all_gather_cat(seen)
    if not (every == every[0]).all():
        raise ConfigError(f"the ranks do not see the same run folder {folder} (result.json/checkpoint.pt present on "
                          f"some ranks only): out={folder.parent} must be on a filesystem shared by every node")


def train(cfg: RunConfig) -> Path:
    """Run (or resume, or return) the run ``cfg`` describes; returns its folder."""
    info, device = dist.init(cfg.device)
    res = resolve(cfg)
    cfg = res.cfg
    folder = Path(cfg.out) / res.run_id
    _check_same_run_folder(folder, info, device)
    if (folder / "result.json").exists():
        if info.main:
            _log(f"run {res.run_id} is already complete")
        return folder

    data = load_data(cfg)
    if getattr(data, "note", "") and info.main:
        _log(data.note)
    settings = _settings(cfg, device)
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = not cfg.deterministic
        torch.backends.cudnn.deterministic = cfg.deterministic

    torch.manual_seed(derive_seed("init", cfg.seed))  # identical initial weights on every rank
    model = build_model(cfg.model, data.num_classes)
    teacher = load_run_teacher(cfg, data, device) if cfg.teacher else None
    on_disk = is_file_dataset(cfg.dataset)
    image_size = cfg.image_size if on_disk else data.image_size
    setup = Setup(cfg.model, data.num_classes, image_size, len(data.train_y), cfg.epochs, cfg.batch_size,
                  MODELS.get(cfg.model).family, tuple(model.stage_channels), model.num_features, teacher,
                  data.train_y.clone())
    method = res.method_cls(res.method_cfg, setup)
    if settings["sync_bn"] and info.enabled:
        model = nn.SyncBatchNorm.convert_sync_batchnorm(model)
    memory_format = torch.channels_last if settings["channels_last"] else torch.contiguous_format
    model.to(device, memory_format=memory_format)
    method.to(device)
    try:
        loader = make_loader(cfg, data, device, method.needs, info, settings["channels_last"])
    except ValueError as e:
        raise ConfigError(str(e)) from None
    if teacher is not None:  # before any training: the teacher must be the one recorded
        verify_teacher(teacher, evaluate(teacher.model, loader, cfg.eval_batch_size, _autocast(settings, device))[0],
                       cfg.teacher_tolerance)
        if info.main:
            _log(f"teacher {cfg.teacher}: {teacher.info['model']}, top-1 {teacher.info['measured_top1']:.2f} "
                 f"(recorded {teacher.info['top1']}), sha256 {teacher.info['sha256'][:12]}")
    params = [p for p in [*model.parameters(), *method.parameters()] if p.requires_grad]
    optimizer = make_optimizer(cfg, params)

    state = {"epoch": 0, "history": [], "train_seconds": 0.0, "wall_seconds": 0.0, "train_images": 0}
    ckpt_path = folder / "checkpoint.pt"
    if ckpt_path.exists():
        ckpt = torch.load(ckpt_path, map_location=device, weights_only=False)
        model.load_state_dict(ckpt["model"])
        restore_method(method, ckpt, info.rank)
        optimizer.load_state_dict(ckpt["optimizer"])
        torch.set_rng_state(ckpt["torch_rng"])
        state = ckpt["state"]
        if info.main:
            _log(f"resuming run {res.run_id} after epoch {state['epoch']}")
    elif info.main:
        runs.atomic_write_yaml(folder / "config.yaml", to_dict(cfg))
    dist.barrier()

    if settings["compile"]:
        model.compile(backend=cfg.compile_backend)
    task = Task(model, method)
    if info.enabled:
        task = wrap_ddp(task, device)
    autocast = _autocast(settings, device)
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
                                     f"{folder} keeps the last good checkpoint (epoch {state['epoch']})")
        method.epoch_end(step)
        if device.type == "cuda":
            torch.cuda.synchronize(device)
        train_seconds = time.perf_counter() - t0
        if info.enabled:
            dist.broadcast_buffers(model)
        top1, top5 = evaluate(model, loader, cfg.eval_batch_size, autocast)
        steps = len(loader)
        loss_means = torch.stack([sums[k] for k in sorted(sums)]) / steps
        loss_means = (dist.all_reduce_sum(loss_means) / info.world).tolist()
        images = int(dist.all_reduce_sum(torch.tensor(float(anchors), device=device)).item()) * method.needs.images_per_anchor
        record = {"epoch": epoch, "lr": lr, "loss": dict(zip(sorted(sums), loss_means)), "top1": top1, "top5": top5,
                  "train_seconds": train_seconds, "images_per_second": images / train_seconds,
                  **method.log_values(step)}
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
            runs.atomic_torch_save(ckpt_path, ckpt)
            runs.atomic_write_text(folder / "log.jsonl", "".join(runs.json_line(r) for r in state["history"]))
            loss_txt = " ".join(f"{k}={v:.4f}" for k, v in record["loss"].items())
            _log(f"epoch {epoch}/{cfg.epochs} lr={lr:.3g} {loss_txt} top1={top1:.2f} top5={top5:.2f} "
                 f"({train_seconds:.1f}s, {record['images_per_second']:.0f} img/s)")
        dist.barrier()

    if state["epoch"] == cfg.epochs and info.main:
        runs.atomic_write_json(folder / "result.json", _result(res, state, device, info, loader, settings,
                                                                    teacher.info if teacher else None))
    dist.barrier()
    return folder


def _result(res: Resolved, state: dict, device, info, loader, settings,
            teacher_info: dict[str, Any] | None) -> dict[str, Any]:
    """The run record every table cell traces back to."""
    cfg, hist = res.cfg, state["history"]
    best = max(hist, key=lambda r: r["top1"])
    return {
        "run_id": res.run_id,
        "method": cfg.method, "model": cfg.model, "dataset": cfg.dataset, "seed": cfg.seed,
        "final": {"top1": hist[-1]["top1"], "top5": hist[-1]["top5"], "epoch": hist[-1]["epoch"]},
        "best": {"top1": best["top1"], "top5": best["top5"], "epoch": best["epoch"],
                 "note": "selected on the test set"},
        "curve": [{k: r[k] for k in ("epoch", "top1", "top5", "loss", "lr")} for r in hist],
        "config": to_dict(cfg),
        "identity": cfg.identity(),
        "git_commit": runs.git_commit(),
        "versions": runs.versions(),
        "hardware": runs.hardware(device, info.world),
        "settings": settings,
        "wall_seconds": state["wall_seconds"],
        "train_seconds": state["train_seconds"],
        "images_per_second": state["train_images"] / max(state["train_seconds"], 1e-9),
        "images_per_step": loader.images_per_step,
        "peak_memory_mib": runs.peak_memory_mib(device),
        "teacher": teacher_info,
        "ffcv_copy": loader.data.provenance() if cfg.loader == "ffcv" else None,
    }


