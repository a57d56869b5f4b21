"""Every registered method trains two epochs on a real CIFAR-10 subset on CPU, deterministically,
and a run stopped after epoch 1 and resumed ends exactly where an uninterrupted run does."""
import json

import pytest
import torch

from ipsd.config import load_run_config
from ipsd.engine import train
from ipsd.resolve import load_methods

METHODS = [m for m in load_methods().names() if not m.startswith("test_")]
BASE = ["model=resnet8", "dataset=cifar10", "per_class=20", "test_per_class=10", "epochs=2", "batch_size=32",
        "progress=false"]


def needs_teacher(name: str) -> bool:
    return load_methods().get(name).needs_teacher


@pytest.fixture(scope="session")
def teacher_run(cifar10_root, tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    return train(load_run_config(None, [*BASE, "method=hard", f"data_root={cifar10_root}", f"out={out}"]))


def assert_same_tensors(a, b, what: str):
    """Equal nested state (tensors compared exactly, other leaves with ==)."""
    if isinstance(a, dict):
        assert a.keys() == b.keys(), what
        for k in a:
            assert_same_tensors(a[k], b[k], f"{what}.{k}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), what
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_tensors(x, y, f"{what}[{i}]")
    elif isinstance(a, torch.Tensor):
        assert torch.equal(a, b), what
    else:
        assert a == b, what


@pytest.mark.parametrize("method", METHODS)
def test_method_trains_and_resumes_exactly(method, cifar10_root, tmp_path, request):
    args = [*BASE, f"method={method}", f"data_root={cifar10_root}"]
    if needs_teacher(method):
        args.append(f"teacher={request.getfixturevalue('teacher_run')}")
    full = train(load_run_config(None, [*args, f"out={tmp_path / 'full'}"]))
    part = train(load_run_config(None, [*args, f"out={tmp_path / 'part'}", "stop_after=1"]))
    assert not (part / "result.json").exists()
    part = train(load_run_config(None, [*args, f"out={tmp_path / 'part'}"]))
    a, b = (torch.load(f / "checkpoint.pt", weights_only=False) for f in (full, part))
    assert_same_tensors(a["model"], b["model"], "model")
    assert_same_tensors(a["method"], b["method"], "method state")
    ra, rb = (json.loads((f / "result.json").read_text()) for f in (full, part))
    assert ra["curve"] == rb["curve"]
    assert all(torch.isfinite(torch.tensor(v)) for r in ra["curve"] for v in r["loss"].values())
    assert ra["final"]["top1"] > 0
