"""TF-KD_self (Yuan et al. CVPR 2020), spec selfdistill b.4: distil from a pretrained copy of the student.

Stage 1 is an ordinary ``ipsd train method=hard`` run of the same architecture; stage 2 (this method)
trains a fresh student against that frozen teacher, as the official ``loss_kd_self`` computes it:

    L = (1-a) CE(z, y) + a * m * T^2 * KL_mean(softmax(z_t/T) || softmax(z/T)),   KL_mean = KL_bm / C

(PyTorch's legacy elementwise-mean KLDivLoss divides by B*C; m compensates). The teacher sees the same
augmented batch, runs in eval mode under no_grad, and lives outside the method's modules
(:class:`ipsd.teacher.FrozenTeacher`): it is never optimised, checkpointed or synchronised by DDP.

Per-model settings (TF-KD ``params.json``): ResNet18 T=6, a=0.95, m=50; ShuffleNetV2 T=20, a=0.95, m=1;
ResNet50 T=6, a=0.95 with m not given (assumed 50, the ResNet18 value). Every other model is assumed to
take the ResNet18 setting, except ShuffleNetV1, which takes the ShuffleNetV2 setting (same family and
LR, as the spec recommends for TF-KD_reg).

The teacher comes from ``method_args.teacher`` (a run folder or checkpoint, optionally pinned by
``teacher_sha256``); if the engine passes a run-level teacher as ``setup.teacher`` it is used instead (its
architecture is checked the same way), and giving both is refused.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ipsd.config import ConfigError, param
from ipsd.losses import ce, kl_t2
from ipsd.method import Method, Setup, register_method
from ipsd.teacher import FrozenTeacher

SHUFFLE = {"T": 20.0, "alpha": 0.95, "multiplier": 1.0}


@dataclass
class TFKDSelfConfig:
    teacher: str | None = param(None, doc="run folder (config.yaml + checkpoint.pt) of a finished `method=hard` "
                                          "run of the same model and data, or its checkpoint.pt (required)")
    teacher_sha256: str | None = param(None, doc="optional pin: refuse a teacher checkpoint with another sha256")
    T: float = param(6.0, lo=0, lo_open=True, doc="temperature on both sides (ResNet18/50 6, ShuffleNetV2 20)")
    alpha: float = param(0.95, lo=0, hi=1, doc="weight of the KD term; CE gets 1-alpha")
    multiplier: float = param(50.0, lo=0, doc="m, scales the elementwise-mean KL (ResNet18 50, ShuffleNetV2 1; "
                                              "ResNet50 not given, assumed 50)")


@register_method("tfkd_self")
class TFKDSelf(Method):
    Config = TFKDSelfConfig
    model_defaults: ClassVar[dict[str, dict[str, Any]]] = {
        "shufflenetv2": dict(SHUFFLE), "shufflenetv1": dict(SHUFFLE),
        "resnet50": {"T": 6.0, "alpha": 0.95, "multiplier": 50.0},
    }

    def __init__(self, cfg: TFKDSelfConfig, setup: Setup):
        super().__init__(cfg, setup)
        run_teacher = getattr(setup, "teacher", None)  # the engine's run-level teacher, if it passes one
        if run_teacher is not None and cfg.teacher is not None:
            raise ConfigError("tfkd_self got two teachers (the run's `teacher` and method_args.teacher); pass one")
        if run_teacher is None and cfg.teacher is None:
            raise ConfigError(
                f"tfkd_self needs a pretrained teacher of the same architecture: first run "
                f"`ipsd train method=hard model={setup.model} ...` (same dataset), then pass its run folder "
                f"as method_args.teacher=<folder> (or its checkpoint.pt)")
        if run_teacher is not None:
            if run_teacher.info.get("model") != setup.model:
                raise ConfigError(f"tfkd_self: the teacher is a {run_teacher.info.get('model')}, but TF-KD_self needs "
                                  f"the student's architecture ({setup.model})")
            self.teacher = run_teacher
        else:
            # A plain attribute, not a submodule: see FrozenTeacher.
            self.teacher = FrozenTeacher.load(cfg.teacher, model=setup.model, num_classes=setup.num_classes,
                                              sha256=cfg.teacher_sha256)

    def forward(self, model, batch, step):
        c = self.cfg
        z = model(batch.x)
        zt = self.teacher(batch.x)
        kd = c.alpha * c.multiplier * kl_t2(zt, z, c.T) / z.shape[1]  # kl_t2 = T^2 KL_bm; / C -> KL_mean
        return {"ce": (1.0 - c.alpha) * ce(z, batch.y), "kd": kd}
