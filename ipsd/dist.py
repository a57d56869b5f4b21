"""torch.distributed set-up for torchrun (NCCL on GPU, gloo on CPU) and a few collectives."""
from __future__ import annotations

import os
import re
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .errors import ConfigError


@dataclass(frozen=True)
class DistInfo:
    rank: int = 0
    world: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1


def pick_device(pref: str, local_rank: int = 0) -> torch.device:
    """``auto`` -> this rank's GPU if CUDA is available, else CPU."""
    if pref == "auto":
        pref = "cuda" if torch.cuda.is_available() else "cpu"
    if pref == "cuda":
        pref = f"cuda:{local_rank}"
    if not re.fullmatch(r"cpu|cuda:\d+", pref):
        raise ConfigError(f"device={pref!r} is not a device; use auto, cpu, cuda or cuda:N")
    device = torch.device(pref)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"device={pref!r} was asked for but CUDA is not available on this machine; use device=cpu "
                          "(or device=auto)")
    return device


def init(device_pref: str) -> tuple[DistInfo, torch.device]:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world == 1:
        return DistInfo(), pick_device(device_pref)
    rank, local = int(os.environ["RANK"]), int(os.environ.get("LOCAL_RANK", "0"))
    device = pick_device(device_pref, local)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo")
    return DistInfo(rank, world, local), device


def active() -> bool:
    """A process group is up (torchrun with WORLD_SIZE > 1, or a test's own group)."""
    return dist.is_available() and dist.is_initialized()


def all_reduce_sum(t: torch.Tensor) -> torch.Tensor:
    if active():
        dist.all_reduce(t)
    return t


def all_gather_cat(t: torch.Tensor) -> torch.Tensor:
    """Concatenate equal-shaped tensors from all ranks along dim 0 (identity without DDP)."""
    if not active():
        return t
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t.contiguous())
    return torch.cat(parts)


def broadcast_buffers(module: torch.nn.Module) -> None:
    """Make every rank's buffers (BatchNorm statistics) equal to rank 0's."""
    if active():
        for b in module.buffers():
            dist.broadcast(b, 0)


def gather_objects(obj):
    """Every rank's picklable ``obj`` as a list indexed by rank (``[obj]`` without a process group)."""
    if not active():
        return [obj]
    out = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def barrier() -> None:
    if active():
        dist.barrier()


def broadcast_object(obj):
    if not active():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, 0)
    return box[0]


class _ContiguousGrad(torch.autograd.Function):
    """Identity whose backward makes the incoming gradient contiguous: the autograd all_gather's backward
    on gloo reads a non-contiguous gradient in the wrong element order (silently wrong gradients, e.g. when
    the gathered matrix is used transposed)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return g.contiguous()


def gather_rows(t: torch.Tensor) -> torch.Tensor:
    """Every rank's rows concatenated along dim 0, with gradient to each rank's own rows.

    For relational losses over the global batch, so DDP builds the relations a single GPU would: the autograd
    all-gather's backward sums the gradients all ranks computed for this rank's rows; every rank evaluates the
    same global loss, so that is world * dL/d(own rows), and DDP's averaging yields exactly the single-process
    gradient. Shard sizes are equal (the loader's contract). Identity without a process group.
    """
    if not active() or dist.get_world_size() == 1:
        return t
    if not t.requires_grad:
        return all_gather_cat(t)
    from torch.distributed.nn.functional import all_gather

    return _ContiguousGrad.apply(torch.cat(all_gather(t.contiguous())))


def relation_rows(relations: str, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """The rows a relational loss (SP, RKD, VRM) is built over: the global batch (``relations="global"``,
    :func:`gather_rows`) or this rank's own (``"local"``, DataParallel-like)."""
    return tuple(gather_rows(t) for t in tensors) if relations == "global" else tensors
