"""BYOT: both loss forms against independent references, the teacher receives no distillation
gradient, the heads leave the evaluated model untouched, head shapes/sizes, defaults and refusals."""
import copy
import math

import pytest
import torch
from helpers import make_step, ref_log_softmax

from ipsd.config import ConfigError
from ipsd.method import Batch, Setup, load_methods
from ipsd.models import MODELS, build_model

BYOT = load_methods().get("byot")
C = 5


def setup_for(model, name):
    return Setup(name, C, 32, 100, 240, 4, MODELS.get(name).family, tuple(model.stage_channels), model.num_features)


class Recorder(torch.nn.Module):
    """Wraps a zoo model; keeps the deepest logits (retaining their gradient) and the features."""

    def __init__(self, inner):
        super().__init__()
        self.inner, self.calls = inner, []

    def forward(self, x, features=False):
        out = self.inner(x, features=features)
        z = out[0] if features else out
        z.retain_grad()
        self.calls.append(out)
        return out


def make(name="resnet8", seed=0, **args):
    torch.manual_seed(seed)
    inner = build_model(name, C)
    method = BYOT(BYOT.resolve_config(name, args), setup_for(inner, name))
    heads_out = []
    for h in method.heads:
        h.register_forward_hook(lambda mod, inp, out: heads_out.append(out))
    return Recorder(inner), method, heads_out


def batch(b=4, seed=1):
    g = torch.Generator().manual_seed(seed)
    return Batch(x=torch.randn(b, 3, 16, 16, generator=g), y=torch.tensor([0, 1, 2, 3, 4, 0, 1, 2][:b]),
                 index=torch.arange(b))


STEP = make_step()


def ce_ref(z, y):
    z = z.double()
    return sum(math.log(torch.exp(z[i]).sum().item()) - z[i, y[i]].item() for i in range(len(y))) / len(y)


def soft_ce_ref(teacher_logits, student_logits, T):
    """H(softmax(t/T), softmax(s/T)) = -sum_k p_k log q_k, mean over the batch."""
    t, s = teacher_logits.double() / T, student_logits.double() / T
    p = torch.exp(t) / torch.exp(t).sum(1, keepdim=True)
    log_q = ref_log_softmax(s)
    return -(p * log_q).sum(1).mean().item()


def test_final_form_equals_reference():
    model, method, heads_out = make()
    b = batch()
    losses = method(model, b, STEP)
    z_deep = model.calls[0][0].detach()
    aux = [o[0].detach() for o in heads_out]
    assert len(aux) == 2  # resnet8 has 3 stages: heads after stages 1 and 2
    y = b.y.tolist()
    ref_ce = ce_ref(z_deep, y) + sum(0.7 * ce_ref(z, y) for z in aux)
    ref_kd = sum(0.3 * soft_ce_ref(z_deep, z, 3.0) for z in aux)  # no T^2
    assert set(losses) == {"ce", "kd"}
    assert math.isclose(losses["ce"].item(), ref_ce, rel_tol=1e-5)
    assert math.isclose(losses["kd"].item(), ref_kd, rel_tol=1e-5)


@pytest.mark.parametrize("feature", ["pooled", "map"])
def test_paper_form_equals_reference(feature):
    model, method, heads_out = make(form="paper", feature=feature, beta=1e-2)
    b = batch()
    losses = method(model, b, STEP)
    z_deep, feats = model.calls[0]
    z_deep = z_deep.detach()
    y = b.y.tolist()
    ref_ce = 0.9 * (ce_ref(z_deep, y) + sum(ce_ref(o[0].detach(), y) for o in heads_out))
    ref_kd = 0.1 * 9.0 * sum(soft_ce_ref(z_deep, o[0].detach(), 3.0) for o in heads_out)
    deep = (feats.pooled if feature == "pooled" else feats.pre_pool).detach().double()
    ref_feat = 0.0
    for _, fmap, pooled in heads_out:
        h = (pooled if feature == "pooled" else fmap).detach().double()
        assert h.shape == deep.shape
        ref_feat += sum(float((a - d) ** 2) for a, d in zip(h.flatten().tolist(), deep.flatten().tolist())
                        if a > 0 or d > 0)
    assert math.isclose(losses["ce"].item(), ref_ce, rel_tol=1e-5)
    assert math.isclose(losses["kd"].item(), ref_kd, rel_tol=1e-5)
    assert math.isclose(losses["feat"].item(), 1e-2 * ref_feat, rel_tol=1e-4)
    assert ref_feat > 0


@pytest.mark.parametrize("form", ["final", "paper"])
def test_teacher_gets_no_gradient_from_distillation_terms(form):
    model, method, _ = make(form=form)
    losses = method(model, batch(), STEP)
    (losses["kd"] + losses.get("feat", 0)).backward(retain_graph=True)
    z_deep = model.calls[0][0]
    assert z_deep.grad is None or z_deep.grad.abs().sum() == 0
    assert model.inner.classifier.weight.grad is None  # the deepest head only learns from CE
    # nor does the last stage, which only the (detached) deepest logits and features depend on
    assert all(p.grad is None for p in model.inner.stages[-1].parameters())
    assert all(h.fc.weight.grad.abs().sum() > 0 for h in method.heads)  # the students do learn
    assert any(p.grad is not None and p.grad.abs().sum() > 0 for p in model.inner.stages[0].parameters())
    losses["ce"].backward()  # sanity: CE does reach the teacher
    assert z_deep.grad.abs().sum() > 0


def test_heads_leave_the_evaluated_model_untouched():
    model, method, _ = make()
    keys = set(model.inner.state_dict())
    twin = copy.deepcopy(model.inner)
    b = batch()
    method(model, b, STEP)
    twin(b.x)  # the same single train-mode forward (same BatchNorm statistics update)
    assert len(model.calls) == 1 and set(model.inner.state_dict()) == keys
    assert not any(m._forward_hooks or m._forward_pre_hooks for m in model.inner.modules())
    head_params = {id(p) for p in method.parameters()}
    assert head_params and not head_params & {id(p) for p in model.inner.parameters()}
    model.inner.eval()
    twin.eval()
    assert torch.equal(model.inner(b.x), twin(b.x))


def test_heads_reach_the_deepest_shape_and_their_sizes_for_resnet18():
    # ResNet18 stage outputs at 32x32 input: (64, 32), (128, 16), (256, 8), (512, 4)
    setup = Setup("resnet18", 100, 32, 100, 240, 4, "resnet", (64, 128, 256, 512), 512)
    stages = [torch.randn(2, c, s, s) for c, s in [(64, 32), (128, 16), (256, 8)]]
    sizes = {}
    with torch.no_grad():
        for form in ("final", "paper"):
            method = BYOT(BYOT.resolve_config("resnet18", {"form": form}), setup)
            assert len(method.heads) == 3
            for s, head in enumerate(method.heads):
                logits, fmap, pooled = head(stages[s])
                assert logits.shape == (2, 100) and fmap.shape == (2, 512, 4, 4) and pooled.shape == (2, 512)
            sizes[form] = [sum(p.numel() for p in h.parameters()) for h in method.heads]
    # official final code: attention SepConv + SepConv chain + fc (e.g. head 1 = 9600 + 268800 + 51300)
    assert sizes["final"] == [329_700, 341_860, 390_756]
    assert sizes["paper"] == [1_175_908, 397_668, 217_444]


def test_defaults_and_form_dependent_values():
    final = BYOT.resolve_config("resnet18", {})
    assert (final.form, final.T, final.alpha, final.head, final.attention) == ("final", 3.0, 0.3, "sepconv", True)
    paper = BYOT.resolve_config("resnet18", {"form": "paper"})
    assert (paper.alpha, paper.beta, paper.head, paper.attention, paper.feature) == (0.1, 1e-6, "bottleneck",
                                                                                     False, "pooled")
    mixed = BYOT.resolve_config("resnet34", {"form": "paper", "alpha": 0.5, "head": "sepconv"})
    assert (mixed.alpha, mixed.head, mixed.attention) == (0.5, "sepconv", False)
    assert BYOT.resolve_config("resnet8", {}).alpha == 0.3


@pytest.mark.parametrize("form,feature", [("final", "pooled"), ("paper", "map")])
def test_imagenet_resnet18_trains_one_step_with_a_head_after_every_stage_but_the_last(form, feature):
    # torchvision ResNet18 at 64 px: stages 64/128/256/512 at 16/8/4/2, so 3 heads, each reaching 512@2
    torch.manual_seed(0)
    model = build_model("imagenet_resnet18", C)
    setup = Setup("imagenet_resnet18", C, 64, 100, 240, 4, MODELS.get("imagenet_resnet18").family,
                  tuple(model.stage_channels), model.num_features)
    method = BYOT(BYOT.resolve_config("imagenet_resnet18", {"form": form, "feature": feature}), setup)
    assert len(method.heads) == 3
    g = torch.Generator().manual_seed(1)
    b = Batch(x=torch.randn(4, 3, 64, 64, generator=g), y=torch.tensor([0, 1, 2, 3]), index=torch.arange(4))
    fmaps = []
    for h in method.heads:
        h.register_forward_hook(lambda mod, inp, out: fmaps.append(out[1].shape))
    losses = method(model, b, STEP)
    assert fmaps == [torch.Size([4, 512, 2, 2])] * 3
    loss = sum(losses.values())
    assert torch.isfinite(loss)
    loss.backward()
    assert all(h.fc.weight.grad is not None and h.fc.weight.grad.abs().sum() > 0 for h in method.heads)
    assert model.stages[0][0].conv1.weight.grad.abs().sum() > 0


@pytest.mark.parametrize("name", ["vgg13", "shufflenetv2", "mobilenetv2", "mvitv2"])
def test_non_resnets_are_refused(name):
    with pytest.raises(ConfigError, match=rf"byot supports ResNets only .*model={name}"):
        BYOT.resolve_config(name, {})
    cfg = BYOT.resolve_config("resnet18", {})
    family = MODELS.get(name).family
    with pytest.raises(ConfigError, match="ResNets only"):
        BYOT(cfg, Setup(name, C, 32, 100, 240, 4, family, (64, 128, 256, 512), 512))


def test_bad_values_are_refused():
    with pytest.raises(ConfigError, match="form"):
        BYOT.resolve_config("resnet18", {"form": "journal"})
    with pytest.raises(ConfigError, match=r"alpha=1.5 .*\[0, 1\]"):
        BYOT.resolve_config("resnet18", {"alpha": 1.5})
    with pytest.raises(ConfigError, match=r"T=0.0 .*\(0, inf\]"):
        BYOT.resolve_config("resnet18", {"T": 0.0})
