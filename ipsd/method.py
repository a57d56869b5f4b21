"""The method contract: the one interface a distillation method implements.

A method is an ``nn.Module`` (so its heads, buffers and state are checkpointed and moved with
everything else). It declares from its config alone what its batches must hold (:meth:`Method.needs_for`,
a :class:`Needs`), owns its hyper-parameters as a dataclass (``Config``) with per-model defaults, and maps
(model, batch, step) to named loss terms that the engine sums and logs. Discovery of the registered
methods lives with resolution (``ipsd.resolve``).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from .config import build
from .data.batch import Batch, Needs
from .models import MODELS
from .registry import Registry

__all__ = ["Batch", "FeatureKD", "METHODS", "Method", "Needs", "NoConfig", "Setup", "Step", "forward_views",
           "register_method"]


@dataclass
class Step:
    """Where training is: 1-indexed epoch, total epochs, and the method's random generator."""

    epoch: int
    epochs: int
    generator: torch.Generator
    schedule_ref_epochs: int = 240


@dataclass(frozen=True)
class Setup:
    """Facts about the run a method may need at construction."""

    model: str
    num_classes: int
    image_size: int
    train_size: int
    epochs: int
    batch_size: int
    family: str = ""  # model family, as registered with the model (see ``ipsd list``)
    stage_channels: tuple[int, ...] = ()  # channels of the model's Features.stages
    num_features: int = 0  # width of Features.pooled
    teacher: Any = None  # a FrozenTeacher (ipsd.teacher) for methods with needs_teacher, else None
    train_labels: Any = None  # (N,) int64 CPU tensor of the training labels, by dataset index

    @classmethod
    def of(cls, model_name: str, net: nn.Module, train_labels: Tensor, image_size: int, epochs: int,
           batch_size: int, teacher: Any = None) -> "Setup":
        """The one way to describe a run to a method: facts about the model are read off the built model."""
        labels = train_labels.detach().cpu().clone()
        return cls(model_name, int(net.classifier.out_features), image_size, len(labels), epochs, batch_size,
                   MODELS.get(model_name).family, tuple(net.stage_channels), net.num_features, teacher, labels)


@dataclass
class NoConfig:
    """Hyper-parameters of a method that has none."""


class Method(nn.Module):
    """Base class. Subclasses set ``Config`` and implement ``forward(model, batch, step) -> {name: loss}``."""

    Config: ClassVar[type] = NoConfig
    needs_teacher: ClassVar[bool] = False  # True: the run must name a `teacher`; it arrives as setup.teacher
    # True: the state differs between ranks (e.g. DLB's previous batch); checkpoints keep every rank's copy.
    per_rank_state: ClassVar[bool] = False
    # Per-model hyper-parameter overrides from the paper: {model name: {field: value}}.
    model_defaults: ClassVar[dict[str, dict[str, Any]]] = {}

    # What the method costs beyond its images and teacher forwards, for ``ipsd bench``'s predicted-cost column.
    cost_note: ClassVar[str] = ""

    def __init__(self, cfg: Any, setup: Setup):
        super().__init__()
        self.cfg = cfg
        self.setup = setup
        self.needs = self.needs_for(cfg)
        if self.needs_teacher:  # a FrozenTeacher: a plain attribute, never a submodule (not optimised/saved/synced)
            from .teacher import require_teacher

            self.teacher = require_teacher(setup, self.name)

    @classmethod
    def needs_for(cls, cfg: Any) -> Needs:
        """What each batch must hold under hyper-parameters ``cfg``: known before the method is built, so the
        planner counts images per step without building a method or its teacher."""
        return Needs()

    @classmethod
    def train_views(cls, cfg: Any) -> int:
        """How many B-row blocks at the start of a step's model calls are views of the batch's anchors, labelled
        with the batch's labels (the engine's running train accuracy reads them); 0 = none can be read."""
        return 1

    @classmethod
    def predicted_cost(cls, cfg: Any) -> str:
        """Per-step work implied by the method's needs and teacher, e.g. ``2B fwd+bwd + 2B teacher fwd``."""
        k = cls.needs_for(cfg).images_per_anchor
        b = "B" if k == 1 else f"{k}B"
        parts = [f"{b} fwd+bwd"] + ([f"{b} teacher fwd"] if cls.needs_teacher else []) + ([cls.cost_note] if cls.cost_note else [])
        return " + ".join(parts)

    @classmethod
    def resolve_config(cls, model: str, args: dict[str, Any], where: str = "method_args.") -> Any:
        """Dataclass defaults < the paper's per-model overrides < user arguments, validated."""
        values = {**cls.model_defaults.get(model.lower(), {}), **args}
        return build(cls.Config, values, where)

    def forward(self, model: nn.Module, batch: Batch, step: Step) -> dict[str, Tensor]:  # pragma: no cover
        raise NotImplementedError

    def epoch_start(self, step: Step) -> None:
        """Hook before an epoch's first step."""

    def epoch_end(self, step: Step) -> None:
        """Hook after an epoch's last step (before evaluation); synchronise state across ranks here."""

    def ddp_ignored(self) -> list[str]:
        """Names (relative to the method) of parameters/buffers DDP must neither sync nor broadcast.

        By default all of the method's buffers: they are per-rank state the method synchronises itself.
        """
        return [name for name, _ in self.named_buffers()]

    def log_values(self, step: Step) -> dict[str, float]:
        """Extra scalars for the epoch log (e.g. the current p_r)."""
        return {}


class FeatureKD(Method):
    """Teacher methods of the form ``gamma * CE + alpha * KD + beta * <feature term>`` over one student and one
    teacher forward with features (AT, SP, RKD). Subclasses name the term (``term``) and compute it from the two
    ``Features`` in :meth:`feature_loss`, which runs with autocast off; their Config has gamma, alpha, beta, T."""

    needs_teacher = True
    term: ClassVar[str] = ""

    def feature_loss(self, feat_s: Any, feat_t: Any) -> Tensor:  # pragma: no cover
        raise NotImplementedError

    def forward(self, model: nn.Module, batch: Batch, step: Step) -> dict[str, Tensor]:
        from .losses import ce_and_kd, fp32

        c = self.cfg
        z_s, feat_s = model(batch.x, features=True)
        z_t, feat_t = self.teacher(batch.x, features=True)
        with fp32(z_s):
            loss = self.feature_loss(feat_s, feat_t)
        return {**ce_and_kd(z_s, z_t, batch.y, c.gamma, c.alpha, c.T), self.term: c.beta * loss}


METHODS: Registry[type[Method]] = Registry("method")


def register_method(name: str):
    """Class decorator: ``@register_method("ips")``; stores the name on the class."""

    def add(cls: type[Method]) -> type[Method]:
        cls.name = name
        return METHODS.register(name)(cls)

    return add


def forward_views(model: nn.Module, *views: Tensor, joint: bool = False, features: bool = False) -> list[Any]:
    """Run ``model`` on several batches: separate calls (BatchNorm statistics per view) or one
    concatenated call (``joint``), returning one output per view either way."""
    if not joint:
        return [model(v, features=features) for v in views]
    out = model(torch.cat(views), features=features)
    sizes = [len(v) for v in views]
    if not features:
        return list(out.split(sizes))
    logits, feats = out
    split = {f.name: ([t.split(sizes) for t in v] if isinstance(v, list) else v.split(sizes))
             for f in dataclasses.fields(feats) for v in [getattr(feats, f.name)]}  # each field split once
    return [(chunk, type(feats)(**{k: ([parts[i] for parts in v] if isinstance(v, list) else v[i])
                                   for k, v in split.items()}))
            for i, chunk in enumerate(logits.split(sizes))]
