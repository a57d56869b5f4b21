"""TF-KD_self (Yuan et al. CVPR 2020): distil from a pretrained copy of the student.

Stage 1 is an ordinary ``ipsd train method=hard`` run of the same architecture; stage 2 (this method)
trains a fresh student against that frozen teacher, as the official ``loss_kd_self`` computes it:

    L = (1-a) CE(z, y) + a * m * T^2 * KL_mean(softmax(z_t/T) || softmax(z/T)),   KL_mean = KL_bm / C

(PyTorch's legacy elementwise-mean KLDivLoss divides by B*C; m compensates). The teacher sees the same
augmented batch, runs in eval mode under no_grad, and lives outside the method's modules
(:class:`ipsd.teacher.FrozenTeacher`): it is never optimised, checkpointed or synchronised by DDP.

Per-model settings (TF-KD ``params.json``): ResNet18 T=6, a=0.95, m=50; ShuffleNetV2 T=20, a=0.95, m=1;
ResNet50 T=6, a=0.95 with m not given (assumed 50, the ResNet18 value). Every other model is assumed to
take the ResNet18 setting, except ShuffleNetV1, which takes the ShuffleNetV2 setting (same family and
LR, as for TF-KD_reg).

The teacher is the run's ``teacher=`` (a registered name, a run folder or a checkpoint): the engine
verifies its checksum and test accuracy before training and passes it as ``setup.teacher``; this method
only checks that it has the student's architecture.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

from ipsd.config import ConfigError, param
from ipsd.losses import ce, kl_t2
from ipsd.method import Method, Setup, register_method

SHUFFLE = {"T": 20.0, "alpha": 0.95, "multiplier": 1.0}


@dataclass
class TFKDSelfConfig:
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

    needs_teacher = True

    def __init__(self, cfg: TFKDSelfConfig, setup: Setup):
        super().__init__(cfg, setup)
        if setup.teacher.info.get("model") != setup.model:
            raise ConfigError(f"tfkd_self: the teacher is a {setup.teacher.info.get('model')}, but TF-KD_self needs "
                              f"the student's architecture ({setup.model})")

    def forward(self, model, batch, step):
        c = self.cfg
        z = model(batch.x)
        zt = self.teacher(batch.x)
        kd = c.alpha * c.multiplier * kl_t2(zt, z, c.T) / z.shape[1]  # kl_t2 = T^2 KL_bm; / C -> KL_mean
        return {"ce": (1.0 - c.alpha) * ce(z, batch.y), "kd": kd}
