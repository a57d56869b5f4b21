"""No host-device synchronisation per training step, for every registered method.

A ``TorchFunctionMode`` sees every torch call a small CPU engine run makes (``ipsd.engine.train``: engine loop,
``ViewAccuracy``, loader, method forward and hooks, optimizer) and records those that wait for the device on a
GPU: reading a value on the host (``item``, ``tolist``, ``__bool__``/``if``, ``__float__``, ``__int__``,
``__index__``, ``__format__``, ``cpu``, ``numpy``) or an op whose output shape depends on the values
(``nonzero``, boolean-mask indexing, ``unique``, ``bincount``, ``masked_select``, ...). Each is attributed to the
phase it happens in (set-up, step k of epoch e, end of epoch) by wrapping the loader's ``epoch``.

Budget: no sync in any step, except the engine's non-finite check (``CHECK_EVERY`` steps and the last step of an
epoch) and, at the first step of a fresh run only, CRD's normalisation constants Z. Per epoch (evaluation,
logging, checkpoint) at most ``EPOCH_BUDGET``. The VRM strong view is run through RandAugment's device branch
(``subset=False``), the one a GPU takes (the CPU branch indexes by mask on purpose: same results, less work).
"""
from __future__ import annotations

import functools
import traceback
from pathlib import Path

import pytest
import torch
from torch.overrides import TorchFunctionMode

import ipsd.engine as engine
from ipsd.config import load_run_config
from ipsd.data import randaugment
from ipsd.losses import ce
from ipsd.method import METHODS, Method, register_method
from ipsd.resolve import load_methods

ROOT = Path(__file__).resolve().parents[1]
METHOD_NAMES = [m for m in load_methods().names() if not m.startswith("test_")]
# digits: 6 train images per class x 10 classes = 60, batch 20 -> 3 steps per epoch (the first, a plain one, the
# last); 2 epochs reach every branch (FER and OLS use their memory from epoch 2, DLB carries a batch across epochs)
SMALL = ["dataset=digits", "model=resnet8", "per_class=6", "test_per_class=2", "batch_size=20", "progress=false",
         "device=cpu", "threads=1"]
STEPS = 3
EPOCH_BUDGET = 8  # evaluate, loss means, images count, view accuracy, clean train top-1, the method's log values
HOST_READS = {"item", "tolist", "__bool__", "__float__", "__int__", "__index__", "__complex__", "__format__",
              "cpu", "numpy", "__array__"}
VALUE_SHAPED = {"nonzero", "argwhere", "unique", "unique_consecutive", "masked_select", "bincount",
                "repeat_interleave", "nonzero_static"}
ONE_TIME_FIRST_STEP = {"baselines/crd.py"}  # Z = N * mean(exp(score / tau)), fixed once at the first step


def _bool_index(index) -> bool:
    items = index if isinstance(index, tuple) else (index,)
    return any(isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in items)


def sync_reason(func, args, kwargs) -> str | None:
    """Why this torch call would wait for a GPU, or None."""
    name = getattr(func, "__name__", "")
    if name in HOST_READS:
        return name
    if name in VALUE_SHAPED:
        if name == "repeat_interleave" and kwargs.get("output_size") is not None:
            return None
        return name
    if name == "where" and len(args) + len(kwargs) == 1:
        return "where(condition)"
    if name in ("__getitem__", "__setitem__", "index_put", "index_put_") and len(args) > 1 and _bool_index(args[1]):
        return f"{name} with a boolean mask"
    return None


HARNESS = {"__torch_function__", "call_site", "epoch", "counted_run"}
PROJECT = ("ipsd", "baselines", "benchmarks", "tests")


def call_site() -> str:
    """The project frames of the current stack, innermost first, as file:line in function (harness left out)."""
    frames = []
    for f in traceback.extract_stack():
        path = Path(f.filename)
        if not path.is_relative_to(ROOT) or path.relative_to(ROOT).parts[0] not in PROJECT:
            continue
        if path == Path(__file__).resolve() and (f.name in HARNESS or f.name.startswith("test_")):
            continue
        frames.append(f)
    return " <- ".join(f"{Path(f.filename).relative_to(ROOT)}:{f.lineno} in {f.name}" for f in reversed(frames))


class SyncCounter(TorchFunctionMode):
    """Records (phase, reason, call site) of every synchronising torch call while active."""

    def __init__(self):
        super().__init__()
        self.phase: tuple = ("setup",)
        self.events: list[tuple[tuple, str, str]] = []
        self.steps: list[tuple] = []  # every ("step", epoch, k) the loader produced a batch for

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        why = sync_reason(func, args, kwargs)
        if why is not None:
            self.events.append((self.phase, why, call_site()))
        return func(*args, **kwargs)


class MarkedLoader:
    """The engine's loader, with the counter's phase set to ("step", epoch, k) while step k is produced and run."""

    def __init__(self, loader, counter: SyncCounter):
        self._loader, self._counter = loader, counter

    def __getattr__(self, name):
        return getattr(self._loader, name)

    def __len__(self) -> int:
        return len(self._loader)

    def epoch(self, epoch: int):
        batches = self._loader.epoch(epoch)
        for k in range(1, len(self._loader) + 2):
            self._counter.phase = ("step", epoch, k)
            try:
                batch = next(batches)
            except StopIteration:
                break
            self._counter.steps.append(self._counter.phase)
            yield batch
        self._counter.phase = ("epoch", epoch)


def counted_run(tmp_path: Path, monkeypatch, method: str, *extra: str) -> SyncCounter:
    """Train ``method`` (two small epochs) under a SyncCounter; returns it."""
    counter = SyncCounter()
    make_loader = engine.make_loader
    monkeypatch.setattr(engine, "make_loader", lambda *a, **k: MarkedLoader(make_loader(*a, **k), counter))
    monkeypatch.setattr(randaugment, "apply_ops", functools.partial(randaugment.apply_ops, subset=False))
    cfg = load_run_config(None, [*SMALL, "epochs=2", f"method={method}", f"out={tmp_path / method}", *extra])
    with counter:
        engine.train(cfg)
    return counter


def is_check(site: str) -> bool:
    """The engine's non-finite-loss check (the innermost project frame is the check in _train_epoch)."""
    return site.startswith("ipsd/engine.py:") and " in _train_epoch" in site.split(" <- ")[0]


def per_step_violations(counter: SyncCounter) -> list[str]:
    bad = []
    for phase, why, site in counter.events:
        if phase[0] != "step":
            continue
        _, epoch, k = phase
        if k > STEPS:  # the generator's exhaustion: end of epoch
            continue
        allowed_check = is_check(site) and (k % engine.CHECK_EVERY == 0 or k == STEPS)
        one_time = epoch == 1 and k == 1 and site.split(":")[0] in ONE_TIME_FIRST_STEP
        if not (allowed_check or one_time):
            bad.append(f"epoch {epoch} step {k}: {why} at {site}")
    return bad


@pytest.fixture(scope="module")
def teacher_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("sync-teacher")
    return engine.train(load_run_config(None, [*SMALL, "method=hard", "epochs=1", f"out={out}"]))


@pytest.mark.parametrize("method", METHOD_NAMES)
def test_no_host_sync_per_step(method, tmp_path, monkeypatch, request):
    extra = [f"teacher={request.getfixturevalue('teacher_run')}"] if METHODS.get(method).needs_teacher else []
    counter = counted_run(tmp_path, monkeypatch, method, *extra)
    assert counter.steps == [("step", e, k) for e in (1, 2) for k in range(1, STEPS + 1)]  # the window
    bad = per_step_violations(counter)
    assert not bad, f"{method}: host syncs per step:\n" + "\n".join(bad)
    for epoch in (1, 2):
        at_end = [(why, site) for p, why, site in counter.events if p == ("epoch", epoch)]
        assert len(at_end) <= EPOCH_BUDGET, f"{method}: {len(at_end)} syncs at the end of epoch {epoch}: {at_end}"


def test_counter_names_a_method_that_syncs_and_its_call_site(tmp_path, monkeypatch):
    """The counter can fail: a method that reads its loss on the host every step is caught, with its line."""

    @register_method("test_sync_probe")
    class Probe(Method):
        def forward(self, model, batch, step):
            loss = ce(model(batch.x), batch.y)
            if loss > 100:  # a Python `if` on a tensor: __bool__, a sync
                raise RuntimeError
            return {"ce": loss}

    try:
        counter = counted_run(tmp_path, monkeypatch, "test_sync_probe")
    finally:
        METHODS.unregister("test_sync_probe")
    bad = per_step_violations(counter)
    assert len(bad) == 2 * STEPS, bad  # every step of both epochs, nothing else
    assert all(": __bool__ at tests/test_sync.py:" in b and " in forward <- " in b for b in bad), bad
