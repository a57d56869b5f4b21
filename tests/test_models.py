"""Model zoo: parameter counts and feature shapes from the spec (teacher_kd (b)), the
Features contract distillers rely on, and forward/backward in the precisions/layouts we train in."""
from __future__ import annotations

import copy
from functools import lru_cache
from typing import Iterator

import pytest
import torch

from ipsd.models import MODELS, Backbone, Features, build_model

C = 100  # CIFAR-100, the class count the spec's parameter counts are for

# Exact parameter counts for C=100 (spec teacher_kd (b), selfdistill (c)).
EXACT_PARAMS = {
    "resnet18": 11_220_132,
    "resnet34": 21_328_292,
    "resnet50": 23_705_252,
    "resnet101": 42_697_380,
    "vgg13": 9_462_180,
    "vgg16": 14_774_436,
    "shufflenetv1": 949_258,
    "shufflenetv2": 1_355_528,
}
# Only given to two decimals in millions.
ROUNDED_PARAMS_M = {"resnet32x4": 7.43, "resnet8x4": 1.23}

R18 = [(64, 32), (64, 32), (128, 16), (256, 8), (512, 4), 512]
R50 = [(64, 32), (256, 32), (512, 16), (1024, 8), (2048, 4), 2048]
VGG = [(64, 32), (128, 16), (256, 8), (512, 4), (512, 4), 512]
# Feature list [f0..fN] of spec (b): (channels, side) of stem and each stage, then pooled dim.
FEATURE_SHAPES = {
    "resnet18": R18,
    "resnet34": R18,
    "resnet50": R50,
    "resnet101": R50,
    "vgg13": VGG,
    "vgg16": VGG,
    "shufflenetv1": [(24, 32), (240, 16), (480, 8), (960, 4), 960],
    "shufflenetv2": [(24, 32), (116, 16), (232, 8), (464, 4), 1024],
}
# Map that gets pooled, where it is not simply the last stage.
PRE_POOL = {"shufflenetv2": (1024, 4)}

CIFAR_FAMILIES = {"resnet", "vgg", "shufflenet", "cifar_resnet"}
ALL = [n for n in MODELS.names() if MODELS.get(n).family in CIFAR_FAMILIES]  # the CIFAR zoo (ImageNet models: test_imagenet_models)


@pytest.fixture(autouse=True, scope="module")
def single_thread() -> Iterator[None]:
    """Tiny batches gain nothing from intra-op threads, and on a busy shared CPU the OpenMP
    barriers of a 2-thread pool stall for seconds per layer; restore the setting afterwards."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@lru_cache(maxsize=None)
def cached(name: str) -> Backbone:
    """Build each model once per session (ResNet101 init alone takes about a second)."""
    torch.manual_seed(0)
    return build_model(name, C)


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def batch(n: int = 2, side: int = 32) -> torch.Tensor:
    return torch.randn(n, 3, side, side, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- (a) sizes


@pytest.mark.parametrize("name", sorted(EXACT_PARAMS))
def test_exact_param_count(name: str) -> None:
    assert n_params(cached(name)) == EXACT_PARAMS[name]


@pytest.mark.parametrize("name", sorted(ROUNDED_PARAMS_M))
def test_rounded_param_count(name: str) -> None:
    assert round(n_params(cached(name)) / 1e6, 2) == ROUNDED_PARAMS_M[name]


def test_registry_metadata() -> None:
    spec = MODELS.get("resnet18")
    assert (spec.display, spec.family, spec.lr) == ("ResNet18", "resnet", 0.05)
    assert MODELS.get("ShuffleNetV2").lr == 0.01  # lookups are case-insensitive
    assert {MODELS.get(n).family for n in ALL} == CIFAR_FAMILIES
    assert all(MODELS.get(n).lr == (0.01 if MODELS.get(n).family == "shufflenet" else 0.05) for n in ALL)
    assert len(ALL) == 17


# ----------------------------------------------------------------------------- (b) features


@lru_cache(maxsize=None)
def run_features(name: str) -> tuple[Backbone, torch.Tensor, torch.Tensor, Features]:
    """Eval-mode logits without and with features (cached: two tests inspect them)."""
    model = cached(name).eval()
    x = batch()
    with torch.no_grad():
        plain = model(x)
        logits, feats = model(x, features=True)
    return model, plain, logits, feats


@pytest.mark.parametrize("name", sorted(FEATURE_SHAPES))
def test_feature_shapes_match_spec(name: str) -> None:
    _, _, _, f = run_features(name)
    *maps, pooled_dim = FEATURE_SHAPES[name]
    got = [f.stem, *f.stages]
    assert [tuple(t.shape) for t in got] == [(2, c, s, s) for c, s in maps]
    c, s = PRE_POOL.get(name, maps[-1])
    assert tuple(f.pre_pool.shape) == (2, c, s, s)
    assert tuple(f.pooled.shape) == (2, pooled_dim)


@pytest.mark.parametrize("name", ALL)
def test_features_contract(name: str) -> None:
    model, plain, logits, f = run_features(name)
    assert torch.equal(plain, logits)  # tapping features must not change the logits
    assert torch.equal(model.classifier(f.pooled), logits)
    assert isinstance(model.classifier, torch.nn.Linear) and model.classifier.out_features == C
    assert [t.shape[1] for t in f.stages] == model.stage_channels
    assert f.pooled.shape[1] == f.pre_pool.shape[1] == model.num_features
    torch.testing.assert_close(f.pooled, f.pre_pool.mean((2, 3)))
    assert all(t.min() >= 0 for t in [f.stem, *f.stages, f.pre_pool])  # all post-activation
    if MODELS.get(name).family == "cifar_resnet":
        assert [t.shape[-1] for t in [f.stem, *f.stages]] == [32, 32, 16, 8]


def test_vgg_extra_pool_only_at_64px() -> None:
    model = cached("vgg13").eval()
    with torch.no_grad():
        _, f = model(torch.randn(1, 3, 64, 64), features=True)
    # blocks 1-3 at 32/16/8 px as usual, then block 4 at 4 px instead of sharing block 3's side
    assert [t.shape[-1] for t in f.stages] == [32, 16, 8, 4]


# ----------------------------------------------------------------------------- (c) training step


def train_step(model: Backbone, x: torch.Tensor, autocast: bool = False) -> torch.Tensor:
    model.train().zero_grad(set_to_none=True)
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        logits = model(x)
    loss = torch.nn.functional.cross_entropy(logits.float(), torch.tensor([0, 1]))
    loss.backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert torch.isfinite(loss)
    return logits.detach()


@pytest.mark.parametrize("name", ALL)
def test_forward_backward(name: str) -> None:
    model = cached(name)
    x = batch(side=16)  # every net pools adaptively; 16 px keeps CPU cost 4x below 32 px
    ref = train_step(model, x)
    assert ref.shape == (2, C) and ref.dtype == torch.float32

    cl = copy.deepcopy(model).to(memory_format=torch.channels_last)
    out = train_step(cl, x.contiguous(memory_format=torch.channels_last))
    torch.testing.assert_close(out, ref, rtol=1e-3, atol=1e-3)

    out = train_step(model, x, autocast=True)
    assert out.dtype == torch.bfloat16


# ----------------------------------------------------------------------------- (d) registry errors


def test_unknown_model_names_close_matches() -> None:
    with pytest.raises(KeyError) as err:
        build_model("resnet19", C)
    assert "'resnet18'" in str(err.value)
    with pytest.raises(KeyError, match="shufflenetv2"):
        build_model("shufflenet_v2", C)
