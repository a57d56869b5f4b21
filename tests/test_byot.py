"""BYOT: the three loss forms against independent references, the feature term by hand, the teacher receives
no distillation gradient, the heads leave the evaluated model untouched, head shapes and sizes (against the
official model's layer shapes), defaults and refusals."""
import copy
import math

import pytest
import torch
from helpers import make_step, ref_log_softmax

from baselines.byot import BYOT, adapted_distance
from ipsd.config import ConfigError
from ipsd.method import Batch, Setup
from ipsd.models import MODELS, build_model

C = 5
FORMS = ("official", "official_v1", "reimpl")


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
RESNET18 = Setup("resnet18", 100, 32, 100, 240, 4, "resnet", (64, 128, 256, 512), 512)


def ce_ref(z, y):
    z = z.double()
    return sum(math.log(torch.exp(z[i]).sum().item()) - z[i, y[i]].item() for i in range(len(y))) / len(y)


def soft_ce_ref(teacher_logits, student_logits, T):
    """H(softmax(t/T), softmax(s/T)) = -sum_k p_k log q_k, mean over the batch."""
    t, s = teacher_logits.double() / T, student_logits.double() / T
    p = torch.exp(t) / torch.exp(t).sum(1, keepdim=True)
    log_q = ref_log_softmax(s)
    return -(p * log_q).sum(1).mean().item()


def dist_ref(linear, h, deep):
    """torch.dist(W h + b, deep) written out: sqrt of the squared differences summed over batch and features."""
    w, b = linear.weight.detach().double().tolist(), linear.bias.detach().double().tolist()
    total = 0.0
    for row, target in zip(h.detach().double().tolist(), deep.detach().double().tolist()):
        for k, t in enumerate(target):
            total += (sum(wk * x for wk, x in zip(w[k], row)) + b[k] - t) ** 2
    return math.sqrt(total)


def test_official_v1_form_equals_reference():
    model, method, heads_out = make(form="official_v1")
    b = batch()
    losses = method(model, b, STEP)
    z_deep = model.calls[0][0].detach()
    aux = [o[0].detach() for o in heads_out]
    assert len(aux) == 2  # resnet8 has 3 stages: heads after stages 1 and 2
    y = b.y.tolist()
    ref_ce = ce_ref(z_deep, y) + sum(0.7 * ce_ref(z, y) for z in aux)
    ref_kd = sum(0.3 * soft_ce_ref(z_deep, z, 3.0) for z in aux)  # no T^2
    assert set(losses) == {"ce", "kd"} and len(method.adaptation) == 0
    assert math.isclose(losses["ce"].item(), ref_ce, rel_tol=1e-5)
    assert math.isclose(losses["kd"].item(), ref_kd, rel_tol=1e-5)


@pytest.mark.parametrize("name,n_heads", [("resnet8", 2), ("resnet18", 3)])
def test_official_form_equals_reference(name, n_heads):
    model, method, heads_out = make(name, form="official")
    b = batch()
    losses = method(model, b, STEP)
    z_deep, feats = model.calls[0]
    z_deep = z_deep.detach()
    aux = [o[0].detach() for o in heads_out]
    assert len(aux) == n_heads and len(method.adaptation) == n_heads - 1
    y = b.y.tolist()
    ref_ce = ce_ref(z_deep, y) + sum(0.7 * ce_ref(z, y) for z in aux)
    ref_kd = sum(0.3 * soft_ce_ref(z_deep, z, 3.0) for z in aux)
    # every shallow head but the deepest (for ResNet18: stages 1 and 2, not 3) against the pooled deepest feature
    ref_feat = 0.03 * sum(dist_ref(method.adaptation[s], heads_out[s][2], feats.pooled) for s in range(n_heads - 1))
    assert set(losses) == {"ce", "kd", "feat"}
    assert math.isclose(losses["ce"].item(), ref_ce, rel_tol=1e-5)
    assert math.isclose(losses["kd"].item(), ref_kd, rel_tol=1e-5)
    assert math.isclose(losses["feat"].item(), ref_feat, rel_tol=1e-5) and ref_feat > 0


def test_adapted_distance_by_hand_and_its_gradient():
    adapt = torch.nn.Linear(2, 2)
    with torch.no_grad():
        adapt.weight.copy_(torch.tensor([[1.0, 0.0], [0.0, 2.0]]))
        adapt.bias.copy_(torch.tensor([0.0, 1.0]))
    h = torch.tensor([[1.0, 2.0], [3.0, 0.0]], requires_grad=True)
    deep = torch.tensor([[1.0, 1.0], [0.0, 1.0]], requires_grad=True)
    # W h + b = [[1, 5], [3, 1]]; minus deep = [[0, 4], [3, 0]]; norm over all four entries = sqrt(0+16+9+0) = 5
    # (not squared: 25; not a batch mean: 2.5 or sqrt(12.5))
    d = adapted_distance(adapt, h, deep)
    assert d.item() == pytest.approx(5.0)
    d.backward()
    assert deep.grad is None  # the deepest feature is detached
    r = torch.tensor([[0.0, 0.8], [0.6, 0.0]])  # d||D|| / dD = D / ||D||
    assert torch.allclose(adapt.bias.grad, torch.tensor([0.6, 0.8]))  # column sums of r
    assert torch.allclose(adapt.weight.grad, torch.tensor([[1.8, 0.0], [0.8, 1.6]]))  # r^T h
    assert torch.allclose(h.grad, torch.tensor([[0.0, 1.6], [0.6, 0.0]]))  # r W
    assert torch.allclose(r @ adapt.weight.detach(), h.grad)


def test_feature_term_reaches_the_adaptation_layers_and_shallow_heads_only():
    model, method, _ = make("resnet18", form="official")
    losses = method(model, batch(), STEP)
    losses["feat"].backward()
    assert all(p.grad is None for p in model.inner.stages[-1].parameters())  # deepest feature detached
    assert model.inner.classifier.weight.grad is None
    assert all(a.weight.grad.abs().sum() > 0 and a.bias.grad.abs().sum() > 0 for a in method.adaptation)
    # it acts on the pooled vectors (before fc) of the stage-1 and stage-2 heads; the stage-3 head has none
    assert all(h.fc.weight.grad is None for h in method.heads)
    assert [any(p.grad is not None for p in h.parameters()) for h in method.heads] == [True, True, False]
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for h in method.heads[:2] for p in h.branch.parameters())


@pytest.mark.parametrize("form", FORMS)
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


@pytest.mark.parametrize("form", ["official", "official_v1"])
def test_heads_leave_the_evaluated_model_untouched(form):
    model, method, _ = make(form=form)
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


def test_adaptation_layers_are_trained_checkpointed_children_sized_from_the_model():
    method = BYOT(BYOT.resolve_config("resnet18", {}), RESNET18)
    keys = set(method.state_dict())
    assert {"adaptation.0.weight", "adaptation.0.bias", "adaptation.1.weight", "adaptation.1.bias"} <= keys
    assert not any(k.startswith("adaptation.2") for k in keys)  # the unused stage-3 layer is not built
    params = {id(p) for p in method.parameters()}
    assert all(id(p) in params and p.requires_grad for a in method.adaptation for p in a.parameters())
    assert [(a.in_features, a.out_features) for a in method.adaptation] == [(512, 512)] * 2
    wide = Setup("resnet50", 100, 32, 100, 240, 4, "resnet", (256, 512, 1024, 2048), 2048)
    assert [a.weight.shape for a in BYOT(BYOT.resolve_config("resnet50", {}), wide).adaptation] == \
        [torch.Size([2048, 2048])] * 2


def test_heads_reach_the_deepest_shape_and_their_sizes_for_resnet18():
    # ResNet18 stage outputs at 32x32 input: (64, 32), (128, 16), (256, 8), (512, 4)
    stages = [torch.randn(2, c, s, s) for c, s in [(64, 32), (128, 16), (256, 8)]]
    sizes = {}
    with torch.no_grad():
        for form in FORMS:
            method = BYOT(BYOT.resolve_config("resnet18", {"form": form}), RESNET18)
            assert len(method.heads) == 3
            for s, head in enumerate(method.heads):
                logits, fmap, pooled = head(stages[s])
                assert logits.shape == (2, 100) and fmap.shape == (2, 512, 4, 4) and pooled.shape == (2, 512)
            sizes[form] = [sum(p.numel() for p in h.parameters()) for h in method.heads]
    # official code: attention (SepConv [+ BN] ) + SepConv chain + fc (e.g. v1 head 1 = 9600 + 268800 + 51300)
    assert sizes["official"] == [329_828, 342_116, 391_268]
    assert sizes["official_v1"] == [329_700, 341_860, 390_756]  # no BN(64/128/256) after the gate: -128/-256/-512
    assert sizes["reimpl"] == [1_175_908, 397_668, 217_444]


def test_official_parameter_count_for_resnet18_cifar100_by_hand():
    """The official ``resnet18(num_classes=100)`` and ``train.py`` adaptation layers, layer by layer."""
    def sep_conv(cin, cout):  # dw3x3 (no bias), pw1x1 (no bias), BN(cin), dw3x3, pw1x1, BN(cout)
        return cin * 9 + cin * cin + 2 * cin + cin * 9 + cin * cout + 2 * cout

    assert sep_conv(64, 64) == 576 + 4096 + 128 + 576 + 4096 + 128 == 9_600
    assert sep_conv(128, 128) == 1152 + 16384 + 256 + 1152 + 16384 + 256 == 35_584
    assert sep_conv(256, 256) == 2304 + 65536 + 512 + 2304 + 65536 + 512 == 136_704
    assert sep_conv(64, 128) == 576 + 4096 + 128 + 576 + 8192 + 256 == 13_824
    assert sep_conv(128, 256) == 1152 + 16384 + 256 + 1152 + 32768 + 512 == 52_224
    assert sep_conv(256, 512) == 2304 + 65536 + 512 + 2304 + 131072 + 1024 == 202_752
    attention = [9_600 + 128, 35_584 + 256, 136_704 + 512]  # attention1-3: SepConv(C, C) + BatchNorm2d(C)
    scala = [13_824 + 52_224 + 202_752, 52_224 + 202_752, 202_752]  # scala1-3 (their AvgPool2d has none)
    fc = 512 * 100 + 100  # fc1-3: Linear(512, 100)
    heads = [attention[i] + scala[i] + fc for i in range(3)]
    assert heads == [329_828, 342_116, 391_268]
    adaptation = 512 * 512 + 512  # Linear(512, 512), for the stage-1 and stage-2 heads only
    expected = sum(heads) + 2 * adaptation
    assert expected == 1_063_212 + 525_312 == 1_588_524

    method = BYOT(BYOT.resolve_config("resnet18", {"form": "official"}), RESNET18)
    assert sum(p.numel() for p in method.parameters()) == expected
    # the whole official net: backbone + fc4 (conv1 + BN, layer1-4 with their 1x1 downsamples), the three
    # heads, and the three Linear(512, 512) train.py builds (the stage-3 one unused): 13,071,312
    def block(c):  # BasicBlock(c, c): two conv3x3 (no bias), each + BN(c)
        return 2 * (c * c * 9 + 2 * c)

    def first_block(c):  # stride-2 BasicBlock(c/2, c): conv3x3 + BN, conv3x3 + BN, downsample conv1x1 + BN
        return (c // 2) * c * 9 + 2 * c + c * c * 9 + 2 * c + (c // 2) * c + 2 * c

    stem = 3 * 64 * 9 + 2 * 64  # conv1 3x3 (no bias) + bn1
    backbone = stem + 2 * block(64) + sum(first_block(c) + block(c) for c in (128, 256, 512)) + fc  # + fc4
    assert backbone == 11_220_132 == sum(p.numel() for p in build_model("resnet18", 100).parameters())
    assert backbone + sum(heads) + 3 * adaptation == 13_071_312
    assert backbone + expected + adaptation == 13_071_312


def test_defaults_and_form_dependent_values():
    default = BYOT.resolve_config("resnet18", {})
    assert (default.form, default.T, default.alpha, default.head, default.attention) == ("official", 3.0, 0.3,
                                                                                         "sepconv", True)
    assert (default.beta, default.attention_bn) == (0.03, True)
    v1 = BYOT.resolve_config("resnet18", {"form": "official_v1"})
    assert (v1.alpha, v1.beta, v1.head, v1.attention, v1.attention_bn) == (0.3, 0.0, "sepconv", True, False)
    reimpl = BYOT.resolve_config("resnet18", {"form": "reimpl"})
    assert (reimpl.alpha, reimpl.beta, reimpl.head, reimpl.attention, reimpl.feature) == (0.1, 1e-6, "bottleneck",
                                                                                          False, "pooled")
    mixed = BYOT.resolve_config("resnet34", {"form": "reimpl", "alpha": 0.5, "head": "sepconv"})
    assert (mixed.alpha, mixed.head, mixed.attention) == (0.5, "sepconv", False)
    assert BYOT.resolve_config("resnet8", {}).alpha == 0.3
    assert BYOT.resolve_config("resnet18", {"form": "official", "beta": 0.0}).beta == 0.0
    assert len(BYOT(BYOT.resolve_config("resnet18", {"beta": 0.0}), RESNET18).adaptation) == 0


@pytest.mark.parametrize("form,feature", [("official", "pooled"), ("reimpl", "map")])
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
    for old in ("final", "paper"):  # one spelling per choice; the message lists them
        with pytest.raises(ConfigError, match=r"form='%s' .*'official', 'official_v1', 'reimpl'" % old):
            BYOT.resolve_config("resnet18", {"form": old})
    with pytest.raises(ConfigError, match=r"alpha=1.5 .*\[0, 1\]"):
        BYOT.resolve_config("resnet18", {"alpha": 1.5})
    with pytest.raises(ConfigError, match=r"T=0.0 .*\(0, inf\]"):
        BYOT.resolve_config("resnet18", {"T": 0.0})
    with pytest.raises(ConfigError, match=r"feature='map' applies to form=reimpl only"):
        BYOT.resolve_config("resnet18", {"feature": "map"})
