"""TF-KD: the virtual-teacher regulariser (code and paper forms) and TF-KD_self with a frozen teacher
loaded from a real `method=hard` run folder (isolation from optimizer, checkpoint, DDP and BN updates)."""
import hashlib
import json
import math
import shutil

import pytest
import torch
from helpers import (
    LinearProbe,
    assert_teacher_untouched,
    make_setup,
    make_step,
    random_batch,
    ref_ce,
    ref_softmax,
    snapshot,
)

from ipsd.config import ConfigError, load_run_config
from ipsd.engine import Task, train
from ipsd.method import Batch
from ipsd.resolve import load_methods
from ipsd.models import build_model
from ipsd.teacher import FrozenTeacher, load_teacher

METHODS = load_methods()
REG, SELF = METHODS.get("tfkd_reg"), METHODS.get("tfkd_self")


def setup(model="resnet18", classes=5, teacher=None):
    return make_setup(model, classes, batch_size=6, teacher=teacher)


def self_method(teacher_dir, model="resnet8", classes=10, **args):
    """TF-KD_self as the engine builds it: the run-level teacher arrives in setup.teacher."""
    return SELF(SELF.resolve_config(model, args), setup(model, classes, FrozenTeacher.load(teacher_dir)))


def peaked(y, classes, p=0.99):
    """The 0.99-peaked virtual teacher, written as a loop."""
    q = torch.empty(len(y), classes, dtype=torch.float64)
    for i, yi in enumerate(y.tolist()):
        for k in range(classes):
            q[i, k] = p if k == yi else (1 - p) / (classes - 1)
    return q


# ----------------------------------------------------------------------------------------- TF-KD_reg

@pytest.mark.parametrize("T,u_y", [(20.0, 0.01050), (10.0, 0.01103), (40.0, 0.01025)])
def test_virtual_teacher_matches_the_spec_numbers(T, u_y):
    from baselines.tfkd_reg import teacher_distribution

    u = teacher_distribution(torch.tensor([3]), 100, 0.99, T)[0]
    assert abs(u[3].item() - u_y) < 5e-6
    assert math.isclose(u.sum().item(), 1.0, rel_tol=1e-6)
    if T == 20.0:
        assert abs(u[0].item() - 0.009995) < 5e-7  # "others 0.009995"


@pytest.mark.parametrize("T,alpha,m", [(20.0, 0.1, 100.0), (10.0, 0.95, 1.0), (3.0, 0.5, 7.0)])
def test_code_form_equals_reference(T, alpha, m):
    method = REG(REG.resolve_config("resnet18", {"T": T, "alpha": alpha, "multiplier": m}), setup())
    model, batch = LinearProbe(), random_batch()
    losses = method(model, batch, make_step())
    z = model.outputs[0].detach().double()
    u = ref_softmax(peaked(batch.y, 5) / T)  # softmax of the probability vector / T
    kl_elementwise_mean = (u * torch.log(u / ref_softmax(z))).mean()  # legacy nn.KLDivLoss() reduction
    assert math.isclose(losses["ce"].item(), ((1 - alpha) * ref_ce(z, batch.y)).item(), rel_tol=1e-5)
    assert math.isclose(losses["kd"].item(), (alpha * m * kl_elementwise_mean).item(), rel_tol=1e-4, abs_tol=1e-9)
    assert losses["kd"] > 0


def test_resnet18_code_form_is_point9_ce_plus_point1_batchmean_kl_at_100_classes():
    """P15: m=100 with C=100 turns the elementwise mean back into the batchmean KL."""
    method = REG(REG.resolve_config("resnet18", {}), setup(classes=100))
    model, batch = LinearProbe(classes=100), random_batch(classes=100)
    kd = method(model, batch, make_step())["kd"]
    z = model.outputs[0].detach().double()
    u = ref_softmax(peaked(batch.y, 100) / 20)
    assert math.isclose(kd.item(), (0.1 * (u * torch.log(u / ref_softmax(z))).sum(1).mean()).item(), rel_tol=1e-4)


def test_paper_form_equals_reference():
    T, alpha = 4.0, 0.3
    method = REG(REG.resolve_config("resnet18", {"T": T, "alpha": alpha, "form": "paper", "multiplier": 9.0}), setup())
    model, batch = LinearProbe(), random_batch()
    losses = method(model, batch, make_step())
    z = model.outputs[0].detach().double()
    q = peaked(batch.y, 5) ** (1 / T)
    pd = q / q.sum(1, keepdim=True)  # the peaked teacher softened at T
    ref = alpha * T * T * (pd * torch.log(pd / ref_softmax(z / T))).sum(1).mean()  # multiplier unused
    assert math.isclose(losses["kd"].item(), ref.item(), rel_tol=1e-4)
    assert math.isclose(losses["ce"].item(), ((1 - alpha) * ref_ce(z, batch.y)).item(), rel_tol=1e-5)


@pytest.mark.parametrize("form", ["code", "paper"])
def test_reg_gradient(form):
    T, alpha, m = 5.0, 0.4, 20.0
    method = REG(REG.resolve_config("resnet18", {"T": T, "alpha": alpha, "multiplier": m, "form": form}), setup())
    model, batch = LinearProbe(), random_batch()
    sum(method(model, batch, make_step()).values()).backward()
    z = model.outputs[0]
    zd, b, onehot = z.detach().double(), len(batch.y), torch.eye(5, dtype=torch.float64)[batch.y]
    g_ce = (1 - alpha) * (ref_softmax(zd) - onehot) / b
    if form == "code":  # student at T=1, target u constant, KL scaled by m/(B*C)
        g_kd = alpha * m / 5 * (ref_softmax(zd) - ref_softmax(peaked(batch.y, 5) / T)) / b
    else:  # d/dz T^2 KL(p_d || softmax(z/T)) = T (softmax(z/T) - p_d)
        q = peaked(batch.y, 5) ** (1 / T)
        g_kd = alpha * T * (ref_softmax(zd / T) - q / q.sum(1, keepdim=True)) / b
    torch.testing.assert_close(z.grad.double(), g_ce + g_kd, rtol=1e-4, atol=1e-7)


def test_reg_per_model_defaults_and_refusals():
    def key(model):
        c = REG.resolve_config(model, {})
        return c.T, c.alpha, c.multiplier, c.correct_prob, c.form

    resnet18 = (20.0, 0.1, 100.0, 0.99, "code")
    assert key("resnet18") == resnet18
    for m in ("resnet34", "resnet50", "resnet101", "vgg13", "vgg16", "resnet8", "resnet20", "resnet32x4"):
        assert key(m) == resnet18, m  # assumed: the ResNet18 setting
    assert key("shufflenetv2") == key("shufflenetv1") == (10.0, 0.95, 1.0, 0.99, "code")
    assert REG.resolve_config("shufflenetv2", {"alpha": 0.2}).alpha == 0.2
    with pytest.raises(ConfigError, match=r"alpha=1.5"):
        REG.resolve_config("resnet18", {"alpha": 1.5})
    with pytest.raises(ConfigError, match=r"T=0"):
        REG.resolve_config("resnet18", {"T": 0})
    with pytest.raises(ConfigError, match="form"):
        REG.resolve_config("resnet18", {"form": "blog"})
    with pytest.raises(ConfigError, match="correct_prob"):
        REG(REG.resolve_config("resnet18", {"form": "paper", "correct_prob": 1.0}), setup())


# ---------------------------------------------------------------------------------------- TF-KD_self

@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teacher")
    return train(load_run_config(None, ["method=hard", "model=resnet8", "dataset=digits", "per_class=10",
                                        "test_per_class=5", "epochs=1", f"out={out}", "progress=false"]))


def test_load_teacher_record_and_frozen_state(teacher_dir):
    net, info = load_teacher(teacher_dir)
    ckpt_file = teacher_dir / "checkpoint.pt"
    assert info["sha256"] == hashlib.sha256(ckpt_file.read_bytes()).hexdigest()
    result = json.loads((teacher_dir / "result.json").read_text())
    assert (info["model"], info["num_classes"], info["dataset"]) == ("resnet8", 10, "digits")
    assert info["top1"] == result["final"]["top1"] and info["complete"] and info["epoch"] == 1
    assert not net.training and not any(p.requires_grad for p in net.parameters())
    saved = torch.load(ckpt_file, weights_only=False)["model"]
    assert all(torch.equal(saved[k], v) for k, v in net.state_dict().items())
    _, info2 = load_teacher(ckpt_file)  # a checkpoint path works too
    assert info2 == info


def test_teacher_refusals(teacher_dir, tmp_path):
    with pytest.raises(ConfigError, match=r"is a resnet8.*student's architecture \(resnet20\)"):
        self_method(teacher_dir, model="resnet20")
    with pytest.raises(ConfigError, match="does not exist"):
        FrozenTeacher.load(tmp_path / "nope")
    with pytest.raises(ConfigError, match="config.yaml is missing"):
        FrozenTeacher.load(tmp_path)
    with pytest.raises(ConfigError, match="predicts 10 classes but the student's data has 100"):
        FrozenTeacher.load(teacher_dir, num_classes=100)
    with pytest.raises(ConfigError, match="not the pinned"):
        FrozenTeacher.load(teacher_dir, sha256="0" * 64)
    with pytest.raises(ConfigError, match="needs a teacher"):
        train(load_run_config(None, ["method=tfkd_self", "model=resnet8", "dataset=digits", f"out={tmp_path}"]))


def test_unfinished_teacher_warns(teacher_dir, tmp_path):
    copy = tmp_path / "unfinished"
    shutil.copytree(teacher_dir, copy)
    (copy / "result.json").unlink()
    with pytest.warns(UserWarning, match="unfinished"):
        _, info = load_teacher(copy)
    assert info["top1"] is None and not info["complete"]


def test_teacher_is_outside_optimizer_checkpoint_ddp_and_never_changes(teacher_dir):
    torch.manual_seed(0)
    method = self_method(teacher_dir)
    teacher = method.teacher.model
    student = build_model("resnet8", 10)
    method.to("cpu")
    method.train()
    student.train()
    params = [p for p in [*student.parameters(), *method.parameters()] if p.requires_grad]  # as the engine builds it
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    before = snapshot(teacher)
    task = Task(student, method)  # what DDP wraps and broadcasts
    teacher_ids = {id(t) for t in [*teacher.parameters(), *teacher.buffers()]}
    assert not teacher_ids & {id(t) for t in [*task.parameters(), *task.buffers()]}
    assert not teacher_ids & {id(p) for group in opt.param_groups for p in group["params"]}
    assert method.state_dict() == {} and list(method.parameters()) == [] and method.ddp_ignored() == []
    student_before = snapshot(student)
    g = torch.Generator().manual_seed(0)
    for _ in range(3):
        x, y = torch.randn(8, 3, 32, 32, generator=g), torch.randint(0, 10, (8,), generator=g)
        losses = task(Batch(x=x, y=y, index=torch.arange(8)), make_step())
        opt.zero_grad()
        sum(losses.values()).backward()
        opt.step()
        assert losses["kd"] > 0
    assert_teacher_untouched(teacher, before)  # weights and BN running stats/counters
    assert any(not torch.equal(student_before[k], v) for k, v in snapshot(student).items())


def test_self_loss_equals_reference_and_gradient_reaches_only_the_student(teacher_dir):
    T, alpha, m = 3.0, 0.7, 5.0
    method = self_method(teacher_dir, T=T, alpha=alpha, multiplier=m)
    teacher_probe = LinearProbe(classes=10, seed=1)
    method.teacher = FrozenTeacher(teacher_probe)  # a teacher whose logits the test can read
    model, batch = LinearProbe(classes=10), random_batch(classes=10)
    losses = method(model, batch, make_step())
    sum(losses.values()).backward()
    z, zt = model.outputs[0], teacher_probe.outputs[0]
    assert not zt.requires_grad and teacher_probe.w.grad is None
    assert z.grad is not None and z.grad.abs().sum() > 0
    zd, ztd = z.detach().double(), zt.double()
    pt, ps = ref_softmax(ztd / T), ref_softmax(zd / T)
    kl_mean = (pt * torch.log(pt / ps)).mean()  # elementwise mean over B*C
    assert math.isclose(losses["kd"].item(), (alpha * m * T * T * kl_mean).item(), rel_tol=1e-4)
    assert math.isclose(losses["ce"].item(), ((1 - alpha) * ref_ce(zd, batch.y)).item(), rel_tol=1e-5)


def test_self_per_model_defaults():
    def key(model):
        c = SELF.resolve_config(model, {})
        return c.T, c.alpha, c.multiplier

    assert key("resnet18") == key("resnet50") == key("vgg13") == key("resnet8") == (6.0, 0.95, 50.0)
    assert key("shufflenetv2") == key("shufflenetv1") == (20.0, 0.95, 1.0)
    with pytest.raises(ConfigError, match="unknown key 'method_args.teacher'"):
        SELF.resolve_config("resnet18", {"teacher": "x"})  # the teacher is a run-level key, not a method argument


def test_engine_run_keeps_teacher_out_of_the_checkpoint(teacher_dir, tmp_path):
    digest = hashlib.sha256((teacher_dir / "checkpoint.pt").read_bytes()).hexdigest()
    folder = train(load_run_config(None, ["method=tfkd_self", "model=resnet8", "dataset=digits", "per_class=10",
                                          "test_per_class=5", "epochs=1", f"out={tmp_path}", "progress=false",
                                          f"teacher={teacher_dir}"]))
    ckpt = torch.load(folder / "checkpoint.pt", weights_only=False)
    assert len(ckpt["method"]) == 0
    assert hashlib.sha256((teacher_dir / "checkpoint.pt").read_bytes()).hexdigest() == digest
    loss = json.loads((folder / "result.json").read_text())["curve"][0]["loss"]
    assert set(loss) == {"ce", "kd"} and loss["kd"] > 0
    recorded = json.loads((folder / "result.json").read_text())["teacher"]
    assert recorded["sha256"] == digest and recorded["model"] == "resnet8"
