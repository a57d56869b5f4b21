"""ImageNet-input models (ipsd.models.imagenet): parameter counts equal the torchvision/timm
references, the wrapped trunk computes the reference's function (same weights -> same logits and
intermediate maps), the Features contract, feature shapes, and a CPU training step."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from functools import cache

import pytest
import timm
import torch
import torchvision
from torch import nn

from ipsd.models import imagenet
from ipsd.models.base import MODELS, Backbone, Features, build_model

C = 10  # small head keeps the tests cheap; parameter counts are checked at 1000 classes

# name -> reference model builder (num_classes -> nn.Module), all randomly initialised, no download
REFERENCES: dict[str, Callable[[int], nn.Module]] = {
    "imagenet_resnet18": lambda n: torchvision.models.resnet18(weights=None, num_classes=n),
    "imagenet_resnet34": lambda n: torchvision.models.resnet34(weights=None, num_classes=n),
    "imagenet_resnet50": lambda n: torchvision.models.resnet50(weights=None, num_classes=n),
    "imagenet_resnet152": lambda n: torchvision.models.resnet152(weights=None, num_classes=n),
    "mobilenetv2": lambda n: timm.create_model("mobilenetv2_100", pretrained=False, num_classes=n),
    "mvitv2": lambda n: timm.create_model("mvitv2_tiny", pretrained=False, num_classes=n),
}
NAMES = sorted(REFERENCES)

# Published ImageNet-1k parameter counts (torchvision docs / timm), as a second anchor.
PARAMS_1000 = {
    "imagenet_resnet18": 11_689_512,
    "imagenet_resnet34": 21_797_672,
    "imagenet_resnet50": 25_557_032,
    "imagenet_resnet152": 60_192_808,
    "mobilenetv2": 3_504_872,
    "mvitv2": 24_173_320,
}

# (channels, reduction) of stem, each stage, then pre_pool; 224 px -> side 224 / reduction.
BASIC = [(64, 4), (64, 4), (128, 8), (256, 16), (512, 32), (512, 32)]
BOTTLENECK = [(64, 4), (256, 4), (512, 8), (1024, 16), (2048, 32), (2048, 32)]
TAPS = {
    "imagenet_resnet18": BASIC,
    "imagenet_resnet34": BASIC,
    "imagenet_resnet50": BOTTLENECK,
    "imagenet_resnet152": BOTTLENECK,
    "mobilenetv2": [(32, 2), (16, 2), (24, 4), (32, 8), (96, 16), (320, 32), (1280, 32)],
    "mvitv2": [(96, 4), (96, 4), (192, 8), (384, 16), (768, 32), (768, 32)],
}
META = {  # display, family, lr
    "imagenet_resnet18": ("ResNet18", "imagenet_resnet", 0.1),
    "imagenet_resnet34": ("ResNet34", "imagenet_resnet", 0.1),
    "imagenet_resnet50": ("ResNet50", "imagenet_resnet", 0.1),
    "imagenet_resnet152": ("ResNet152", "imagenet_resnet", 0.1),
    "mobilenetv2": ("MobileNetV2", "mobilenet", 0.05),
    "mvitv2": ("MViTv2", "mvit", 0.1),
}
SIDE = 64  # small input: every model here accepts sides divisible by 32


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Batch-1 CPU forwards gain nothing from intra-op threads; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def n_params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def image(n: int = 1, side: int = SIDE, seed: int = 1) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(seed))


@cache
def paired(name: str) -> tuple[Backbone, nn.Module]:
    """Our model and its reference (both C classes, eval mode) holding the same weights.

    The reference is initialised from a different seed and its state copied into ours entry by
    entry in registration order, so equal outputs show that the wrapper keeps the reference's
    modules, in the reference's order, and runs them the reference's way.
    """
    torch.manual_seed(0)
    ours = build_model(name, C)
    torch.manual_seed(1)
    ref = REFERENCES[name](C)
    ours_sd, ref_sd = ours.state_dict(), ref.state_dict()
    assert len(ours_sd) == len(ref_sd)
    for (k, v), (rk, rv) in zip(ours_sd.items(), ref_sd.items(), strict=True):
        assert v.shape == rv.shape, (k, rk)
    ours.load_state_dict(dict(zip(ours_sd, ref_sd.values(), strict=True)))
    return ours.eval(), ref.eval()


@cache
def run(name: str) -> tuple[torch.Tensor, torch.Tensor, Features, torch.Tensor]:
    """Eval-mode logits without features, with features, and the reference's logits."""
    ours, ref = paired(name)
    x = image()
    with torch.no_grad():
        plain = ours(x)
        logits, feats = ours(x, features=True)
        ref_logits = ref(x)
    return plain, logits, feats, ref_logits


# ----------------------------------------------------------------------------- registry and sizes


def test_registered() -> None:
    for name in NAMES:
        spec = MODELS.get(name)
        assert (spec.display, spec.family, spec.lr) == META[name]
    assert imagenet.mobilenetv2_stage_ends(REFERENCES["mobilenetv2"](0).feature_info) == [0, 1, 2, 4, 6]


@pytest.mark.parametrize("name", NAMES)
def test_param_count_equals_reference(name: str) -> None:
    with torch.device("meta"):  # sizes only: skip the (seconds-long for ResNet152) random init
        ours, ref = build_model(name, 1000), REFERENCES[name](1000)
    assert n_params(ours) == n_params(ref) == PARAMS_1000[name]
    assert isinstance(ours.classifier, nn.Linear)
    assert (ours.classifier.in_features, ours.classifier.out_features) == (ours.num_features, 1000)


def test_timm_resnets_have_the_same_size() -> None:
    """torchvision and timm ResNets share a layout; the parameter counts agree too."""
    with torch.device("meta"):
        for arch in ("resnet18", "resnet34", "resnet50", "resnet152"):
            assert n_params(timm.create_model(arch, pretrained=False)) == PARAMS_1000[f"imagenet_{arch}"]


# ----------------------------------------------------------------------------- same function as the reference


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_reference(name: str) -> None:
    _, logits, _, ref_logits = run(name)
    if name == "mvitv2":  # timm pools with tokens.mean(1), we with adaptive_avg_pool2d on the map
        torch.testing.assert_close(logits, ref_logits, rtol=1e-5, atol=1e-5)
    else:
        assert torch.equal(logits, ref_logits)


@pytest.mark.parametrize("name", NAMES)
def test_taps_match_reference_intermediates(name: str) -> None:
    _, _, f, _ = run(name)
    ref = paired(name)[1]
    x = image()
    with torch.no_grad():
        if isinstance(ref, torchvision.models.ResNet):
            h = ref.maxpool(ref.relu(ref.bn1(ref.conv1(x))))
            stem, stages = h, []
            for layer in (ref.layer1, ref.layer2, ref.layer3, ref.layer4):
                h = layer(h)
                stages.append(h)
            pre_pool = h
        elif name == "mobilenetv2":
            stem = ref.bn1(ref.conv_stem(x))
            pre_pool, stages = ref.forward_intermediates(x)
        else:
            pre_pool, stages = ref.forward_intermediates(x, norm=False)
            stem = ref.patch_embed.proj(x)
            tokens = ref.forward_features(x)  # final-normed tokens, (B, H*W, C)
            torch.testing.assert_close(f.pooled, tokens.mean(1), rtol=1e-5, atol=1e-6)
            b, c, hh, ww = f.pre_pool.shape
            pre_pool = tokens.reshape(b, hh, ww, c).permute(0, 3, 1, 2)
    assert torch.equal(f.stem, stem)
    assert len(f.stages) == len(stages)
    for ours, theirs in zip(f.stages, stages, strict=True):
        assert torch.equal(ours, theirs)
    assert torch.equal(f.pre_pool, pre_pool)


# ----------------------------------------------------------------------------- Features contract and shapes


@pytest.mark.parametrize("name", NAMES)
def test_features_contract(name: str) -> None:
    plain, logits, f, _ = run(name)
    model = paired(name)[0]
    assert torch.equal(plain, logits)  # tapping features must not change the logits
    assert torch.equal(model.classifier(f.pooled), logits)
    assert model.classifier.out_features == C
    assert [t.shape[1] for t in f.stages] == model.stage_channels
    assert f.pooled.shape[1] == f.pre_pool.shape[1] == model.num_features
    torch.testing.assert_close(f.pooled, f.pre_pool.mean((2, 3)))


@pytest.mark.parametrize("name", NAMES)
def test_feature_shapes(name: str) -> None:
    _, _, f, _ = run(name)
    *maps, (pre_c, pre_r) = TAPS[name]
    assert [tuple(t.shape) for t in [f.stem, *f.stages]] == [(1, c, SIDE // r, SIDE // r) for c, r in maps]
    assert tuple(f.pre_pool.shape) == (1, pre_c, SIDE // pre_r, SIDE // pre_r)
    assert tuple(f.pooled.shape) == (1, pre_c)


def test_full_size_shapes() -> None:
    """At the real 224 px input (MobileNetV2 only: the cheapest net) the sides are 224 / reduction."""
    model = paired("mobilenetv2")[0]
    with torch.no_grad():
        _, f = model(image(side=224), features=True)
    got = [tuple(t.shape[1:]) for t in [f.stem, *f.stages, f.pre_pool]]
    assert got == [(c, 224 // r, 224 // r) for c, r in TAPS["mobilenetv2"]]
    assert [t.shape[-1] for t in f.stages] == [112, 56, 28, 14, 7]


def test_post_activation_taps() -> None:
    """The ResNets' taps are post-ReLU and MobileNetV2's stem and pre_pool post-ReLU6; MobileNetV2's
    linear-bottleneck stage outputs and every MViTv2 tap are not activations (documented)."""
    for name in ("imagenet_resnet18", "imagenet_resnet50"):
        _, _, f, _ = run(name)
        assert all(t.min() >= 0 for t in [f.stem, *f.stages, f.pre_pool])
    _, _, f, _ = run("mobilenetv2")
    assert f.stem.min() >= 0 and f.pre_pool.min() >= 0 and f.pre_pool.max() <= 6
    assert any(t.min() < 0 for t in f.stages)


# ----------------------------------------------------------------------------- training step


@pytest.mark.parametrize("name", NAMES)
def test_forward_backward(name: str) -> None:
    torch.manual_seed(0)
    model = build_model(name, C).train()
    x = image(n=2, side=32)
    logits, f = model(x, features=True)
    assert logits.shape == (2, C) and logits.dtype == torch.float32
    loss = torch.nn.functional.cross_entropy(logits, torch.tensor([0, 1])) + sum(t.mean() for t in f.stages)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())


def test_mvitv2_drop_path_option() -> None:
    model = imagenet.build_mvitv2(C, drop_path_rate=0.1)
    rates = [m.drop_prob for m in model.modules() if type(m).__name__ == "DropPath"]
    assert rates and max(rates) == pytest.approx(0.1)
    assert n_params(model) == n_params(build_model("mvitv2", C))
