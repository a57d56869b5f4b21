"""Shared test scaffolding: synthetic data, tiny probe models, batch/step/setup builders, plain-tensor
reference formulas (written out by hand, independent of ipsd.losses) and two-process gloo helpers.
Real-data tests use the `cifar10_root` fixture."""
from __future__ import annotations

import math
import os
import socket
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn

from ipsd.data import ImageData
from ipsd.engine import Task, wrap_ddp
from ipsd.method import Batch, Method, Setup, Step
from ipsd.resolve import load_methods
from ipsd.models import Features, build_model
from ipsd.teacher import FrozenTeacher


def toy_data(n_per_class: int = 10, classes: int = 4, size: int = 32, seed: int = 0) -> ImageData:
    """Random uint8 images, ``n_per_class`` per class; the first 8 double as the test split."""
    g = torch.Generator().manual_seed(seed)
    y = torch.arange(classes).repeat_interleave(n_per_class)
    x = torch.randint(0, 256, (len(y), 3, size, size), generator=g, dtype=torch.uint8)
    return ImageData(name="toy", train_x=x, train_y=y, test_x=x[:8].clone(), test_y=y[:8].clone(),
                     classes=[str(c) for c in range(classes)], mean=(0.5, 0.4, 0.3), std=(0.2, 0.25, 0.3))


# --------------------------------------------------------------------------------------- builders

def make_setup(model: str = "resnet18", classes: int = 5, image_size: int = 32, train_size: int = 100,
               epochs: int = 240, batch_size: int = 4, **fields) -> Setup:
    """A method's ``Setup`` with the small defaults the unit tests use."""
    return Setup(model, num_classes=classes, image_size=image_size, train_size=train_size, epochs=epochs,
                 batch_size=batch_size, **fields)


def teacher_setup(teacher, model: str = "resnet8", classes: int = 5, batch: int = 4, image_size: int = 32) -> Setup:
    """``Setup`` for a teacher-student method (cifar_resnet family, 2 epochs) around ``teacher``."""
    return make_setup(model, classes, image_size, epochs=2, batch_size=batch, family="cifar_resnet", teacher=teacher)


def make_step(epoch: int = 1, epochs: int = 240, seed: int = 0) -> Step:
    """A ``Step`` of ``epoch``/``epochs`` with a fresh generator seeded ``seed``."""
    return Step(epoch, epochs, torch.Generator().manual_seed(seed))


def random_batch(b: int = 6, classes: int = 5, size: int = 32, seed: int = 1,
                 generator: torch.Generator | None = None) -> Batch:
    """Gaussian images and uniform labels drawn (x, then y) from ``generator`` or a fresh one seeded ``seed``."""
    g = generator if generator is not None else torch.Generator().manual_seed(seed)
    return Batch(x=torch.randn(b, 3, size, size, generator=g), y=torch.randint(0, classes, (b,), generator=g),
                 index=torch.arange(b))


def random_batches(n: int, b: int, classes: int, size: int, seed: int = 1) -> list[Batch]:
    """``n`` consecutive ``random_batch``es drawn from one generator seeded ``seed``."""
    g = torch.Generator().manual_seed(seed)
    return [random_batch(b, classes, size, generator=g) for _ in range(n)]


def pair_batch(b: int = 4, seed: int = 1) -> Batch:
    """32x32 anchors labelled 0, 1, 2, ... (mod 5) with a random partner view each."""
    g = torch.Generator().manual_seed(seed)
    return Batch(x=torch.randn(b, 3, 32, 32, generator=g), y=torch.arange(b) % 5,
                 index=torch.arange(b), partner=torch.randn(b, 3, 32, 32, generator=g), partner_index=torch.arange(b))


# ------------------------------------------------------------------------------------ probe models

class LinearProbe(nn.Module):
    """Images -> logits through one fixed random matrix; records inputs and outputs (retaining their grads).

    ``always_grad``: every forward must track gradients (``retain_grad`` raises otherwise)."""

    def __init__(self, classes: int = 5, seed: int = 0, scale: float = 0.05, size: int = 32,
                 always_grad: bool = False):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(3 * size * size, classes, generator=g) * scale)
        self.always_grad = always_grad
        self.inputs, self.outputs = [], []

    def forward(self, x, features=False):
        self.inputs.append(x)
        z = x.flatten(1) @ self.w
        if self.always_grad or z.requires_grad:
            z.retain_grad()
        self.outputs.append(z)
        return z


class Logits(nn.Module):
    """A "model" that returns the logits it was given (as a leaf, so its gradient can be read)."""

    def __init__(self, z):
        super().__init__()
        self.z = torch.tensor(z, dtype=torch.float32, requires_grad=True)

    def forward(self, x, features=False):
        return self.z


class ReluLinear(nn.Module):
    """BN-free 'model' on (B, 12) inputs: h = relu(x W) is the pooled embedding and, reshaped to
    (B, 8 / side^2, side, side), every feature map; logits h C."""

    def __init__(self, seed: int, side: int = 1):
        super().__init__()
        g = torch.Generator().manual_seed(seed)
        self.w = nn.Parameter(torch.randn(12, 8, generator=g))
        self.c = nn.Parameter(torch.randn(8, 4, generator=g))
        self.side = side

    def forward(self, x, features=False):
        h = (x @ self.w).relu()
        z = h @ self.c
        if not features:
            return z
        m = h.reshape(len(h), -1, self.side, self.side)
        return z, Features(stem=m, stages=[m], pre_pool=m, pooled=h)


# ------------------------------------------------------------------ plain-tensor reference formulas

def ref_softmax(z):
    """Row softmax, exp(z - max) / sum."""
    e = torch.exp(z - z.max(1, keepdim=True).values)
    return e / e.sum(1, keepdim=True)


def ref_log_softmax(z):
    """Row log-softmax, z - log sum exp(z)."""
    return z - torch.log(torch.exp(z).sum(1, keepdim=True))


def ref_ce(z, y):
    """Mean cross-entropy -log softmax(z)[i, y_i]."""
    return -ref_log_softmax(z)[torch.arange(len(y)), y].mean()


def ref_kl(t, s, T):
    """T^2 KL(softmax(t/T) || softmax(s/T)), summed over classes, batch mean."""
    q = torch.exp(t / T) / torch.exp(t / T).sum(1, keepdim=True)
    p = torch.exp(s / T) / torch.exp(s / T).sum(1, keepdim=True)
    return T * T * (q * torch.log(q / p)).sum(1).mean()


def softmax_list(row, T: float = 1.0):
    """Softmax of a list of Python floats at temperature T."""
    e = [math.exp(v / T) for v in row]
    return [v / sum(e) for v in e]


# ------------------------------------------------------------------------------- frozen teachers

def snapshot(module: nn.Module) -> dict:
    """A detached copy of ``module.state_dict()``."""
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


def assert_teacher_untouched(teacher: nn.Module, before: dict) -> None:
    """The teacher is in eval mode, has no gradients, and its weights and BN stats equal ``before``."""
    assert not teacher.training
    assert all(p.grad is None and not p.requires_grad for p in teacher.parameters())
    for k, v in teacher.state_dict().items():  # weights, running_mean/var, num_batches_tracked
        assert torch.equal(v, before[k]), k


def assert_teacher_stays_frozen(method_cls: type[Method], setup: Callable[..., Setup], batches: Iterable[Batch],
                                step: Callable[[], Step], key: str | None = None) -> None:
    """Real BN resnet8s (10 classes, default config, ``setup(teacher, classes=10)``): SGD steps of the student on
    ``batches`` leave the frozen teacher unchanged and move the student; the method holds no parameters or state."""
    torch.manual_seed(0)
    teacher, student = build_model("resnet8", 10), build_model("resnet8", 10)
    before = snapshot(teacher)
    frozen = FrozenTeacher(teacher)
    method = method_cls(method_cls.resolve_config("resnet8", {}), setup(frozen, classes=10))
    assert list(method.parameters()) == [] and method.state_dict() == {}  # no teacher in optimizer/checkpoint
    student.train(), method.train()
    opt = torch.optim.SGD([*student.parameters(), *method.parameters()], lr=0.1, momentum=0.9, weight_decay=5e-4)
    student_before = [p.clone() for p in student.parameters()]
    for batch in batches:
        losses = method(student, batch, step())
        if key is not None:
            assert losses[key] > 0
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
    assert_teacher_untouched(teacher, before)
    assert any(not torch.equal(a, b) for a, b in zip(student_before, student.parameters()))
    fresh = method_cls(method_cls.resolve_config("resnet8", {}), setup(frozen, classes=10))
    fresh.load_state_dict(method.state_dict())  # stateless: the round trip is trivially exact


# ---------------------------------------------------------------------------- two gloo processes

def free_port() -> int:
    """A TCP port on 127.0.0.1 that is free right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def spawn_two(worker: Callable, *args) -> None:
    """Run ``worker(rank, port, *args)`` in two spawned processes (ranks 0 and 1) and wait for both."""
    mp.spawn(worker, args=(free_port(), *args), nprocs=2, join=True)


@contextmanager
def gloo_group(rank: int, port: int, world_size: int = 2) -> Iterator[None]:
    """Join a CPU (gloo) process group on 127.0.0.1:``port`` for the duration of the block."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        yield
    finally:
        dist.destroy_process_group()


# ---------------------------------------------------- relational methods (SP, RKD) over two ranks

def relations_batch() -> Batch:
    """8 samples of 12 features (labels 0-3) for ``ReluLinear``."""
    g = torch.Generator().manual_seed(3)
    return Batch(x=torch.randn(8, 12, generator=g), y=torch.arange(8) % 4, index=torch.arange(8))


def relations_task(name: str, relations: str, side: int) -> Task:
    """Student ReluLinear(0) under method ``name`` (gamma 0) with a frozen ReluLinear(1) teacher."""
    cls = load_methods().get(name)
    method = cls(cls.resolve_config("resnet8", {"gamma": 0.0, "relations": relations}),
                 teacher_setup(FrozenTeacher(ReluLinear(1, side)), classes=4, batch=8))
    return Task(ReluLinear(0, side), method)


def _relations_worker(rank, port, out, name, side):
    with gloo_group(rank, port):
        b = relations_batch()
        s = slice(4 * rank, 4 * rank + 4)
        for relations in ("global", "local"):
            task = wrap_ddp(relations_task(name, relations, side), torch.device("cpu"))
            losses = task(Batch(x=b.x[s], y=b.y[s], index=b.index[s]), make_step(epochs=2))
            sum(losses.values()).backward()
            torch.save([losses[name].detach(), task.module.model.w.grad], f"{out}/{relations}{rank}.pt")


def assert_global_relations_match_single_process(tmp_path, name: str, side: int) -> None:
    """Two ranks with 4 samples each: relations='global' gives the 8-sample loss ``name`` and gradient exactly;
    'local' gives per-rank losses that differ."""
    spawn_two(_relations_worker, str(tmp_path), name, side)
    task = relations_task(name, "global", side)
    losses = task(relations_batch(), make_step(epochs=2))
    losses[name].backward()
    (l0, g0), (l1, g1) = (torch.load(tmp_path / f"global{r}.pt") for r in (0, 1))
    torch.testing.assert_close(l0, losses[name].detach())
    torch.testing.assert_close(l1, l0)
    torch.testing.assert_close(g0, task.model.w.grad, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g1, g0)
    (m0, _), (m1, _) = (torch.load(tmp_path / f"local{r}.pt") for r in (0, 1))
    assert not math.isclose(m0.item(), losses[name].item(), rel_tol=1e-3) and not math.isclose(m0.item(), m1.item())
