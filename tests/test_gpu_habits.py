"""The engine's GPU habits (fused optimizer, teacher run like the student, compile with eager hooks, CUDA-graph
steps) are decided by the device, recorded in the run's settings, and leave CPU runs as they were."""
import json

import pytest
import torch

from ipsd.config import ConfigError, load_run_config
from ipsd.engine import (Task, ViewAccuracy, _train_epoch, compile_model, load_optimizer, place_teacher, run_settings,
                         train)
from ipsd.models import build_model
from ipsd.resolve import load_methods, resolve
from ipsd.teacher import FrozenTeacher
from helpers import LinearProbe, make_setup, make_step, random_batch

SMALL = ["dataset=digits", "model=resnet8", "per_class=6", "test_per_class=2", "batch_size=20", "epochs=1",
         "progress=false", "device=cpu", "threads=1"]


def test_settings_follow_the_device():
    cfg = load_run_config(None, ["method=hard"])
    cpu, cuda = run_settings(cfg, torch.device("cpu")), run_settings(cfg, torch.device("cuda"))
    assert (cpu["bf16"], cpu["channels_last"], cpu["fused_optimizer"], cpu["teacher_like_student"]) == (False,) * 4
    assert (cuda["bf16"], cuda["channels_last"], cuda["fused_optimizer"], cuda["teacher_like_student"]) == (True,) * 4
    assert cpu["compile_mode"] is None
    graphs = load_run_config(None, ["method=hard", "compile=true", "compile_mode=reduce-overhead"])
    assert run_settings(graphs, torch.device("cuda"))["compile_mode"] == "reduce-overhead"


def test_compile_mode_is_operational_and_needs_inductor():
    plain = resolve(load_run_config(None, ["method=hard", "compile=true"]))
    graphs = resolve(load_run_config(None, ["method=hard", "compile=true", "compile_mode=reduce-overhead"]))
    assert plain.run_id == graphs.run_id  # the same computation, launched differently
    with pytest.raises(ConfigError, match=r"compile_mode='reduce-overhead' needs compile_backend=inductor"):
        load_run_config(None, ["method=hard", "compile=true", "compile_backend=aot_eager",
                               "compile_mode=reduce-overhead"])


def test_a_cpu_run_records_its_settings(tmp_path):
    folder = train(load_run_config(None, [*SMALL, "method=hard", f"out={tmp_path}"]))
    settings = json.loads((folder / "result.json").read_text())["settings"]
    assert settings["fused_optimizer"] is False and settings["teacher_like_student"] is False
    assert settings["compile_mode"] is None and "first epoch" in settings["images_per_second"]
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=False)
    assert {g["fused"] for g in ckpt["optimizer"]["param_groups"]} == {None}  # torch's default implementation


def test_a_checkpoint_restores_into_the_optimizer_implementation_in_use():
    p = torch.nn.Parameter(torch.ones(3))
    plain = torch.optim.SGD([p], lr=0.1, momentum=0.9)
    p.grad = torch.full((3,), 2.0)
    plain.step()
    fused = torch.optim.SGD([p], lr=0.1, momentum=0.9, fused=True)
    load_optimizer(fused, plain.state_dict())
    assert fused.param_groups[0]["fused"] is True  # not the saved group's None
    assert torch.equal(fused.state[p]["momentum_buffer"], torch.full((3,), 2.0))  # the state itself is restored


def test_compiled_forward_keeps_hooks_eager_and_state_dict_keys():
    torch.manual_seed(0)
    model = build_model("resnet8", 5).eval()
    x = torch.randn(2, 3, 32, 32)
    expected, keys = model(x), list(model.state_dict())
    calls = []
    model.register_forward_hook(lambda m, i, o: calls.append(len(o)))  # a Python side effect, as ViewAccuracy's
    compile_model(model, "eager")
    torch.testing.assert_close(model(x), expected)
    model(x)
    assert calls == [2, 2] and list(model.state_dict()) == keys


def test_teacher_runs_like_the_student_only_where_the_settings_say():
    torch.manual_seed(0)
    teacher = FrozenTeacher(build_model("resnet8", 5))
    x = torch.randn(2, 3, 32, 32)
    expected = teacher(x)
    place_teacher(teacher, {"teacher_like_student": False, "channels_last": True, "compile": True}, "eager")
    conv = next(p for p in teacher.model.parameters() if p.dim() == 4)
    assert "forward" not in vars(teacher.model) and conv.is_contiguous()
    place_teacher(teacher, {"teacher_like_student": True, "channels_last": True, "compile": True}, "eager")
    assert "forward" in vars(teacher.model)  # compiled
    assert conv.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(teacher(x.contiguous(memory_format=torch.channels_last)), expected)


class _Batches:
    def __init__(self, batches):
        self.batches, self.device = batches, torch.device("cpu")

    def __len__(self):
        return len(self.batches)

    def epoch(self, epoch):
        return iter(self.batches)


def test_cudagraph_steps_are_marked_once_per_step(monkeypatch):
    marks = []
    monkeypatch.setattr(torch.compiler, "cudagraph_mark_step_begin", lambda: marks.append(1))
    cls = load_methods().get("hard")
    method, model = cls(cls.resolve_config("resnet8", {}), make_setup()), LinearProbe()
    views = ViewAccuracy(model, 1, torch.device("cpu"))
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = _Batches([random_batch(seed=s) for s in range(3)])
    no_autocast = lambda: torch.autocast("cpu", enabled=False)  # noqa: E731
    _train_epoch(Task(model, method), opt, loader, make_step(), no_autocast, False, "", views, cudagraphs=True)
    assert len(marks) == 3
    _train_epoch(Task(model, method), opt, loader, make_step(), no_autocast, False, "", views)
    assert len(marks) == 3  # off by default


def test_dlb_keeps_a_copy_of_the_logits_not_the_model_output():
    """Under CUDA graphs a model output's memory is reused at the next step: the carried logits must own theirs."""
    cls = load_methods().get("dlb")
    method = cls(cls.resolve_config("resnet8", {}), make_setup(classes=5))
    probe = LinearProbe()
    batch = random_batch(seed=3)
    batch.view2 = batch.x.clone()
    method(probe, batch, make_step())
    z = probe.outputs[0]
    assert torch.equal(method.last.z, z.detach()) and method.last.z.data_ptr() != z.data_ptr()
