"""End to end on real data: IPS and Hard Label train on a CIFAR-10 subset on CPU and learn."""
import json

import pytest

from ipsd.config import load_run_config
from ipsd.engine import train


@pytest.mark.parametrize("method", ["hard", "ips"])
def test_trains_well_above_chance_on_cifar10_subset(cifar10_root, tmp_path, method):
    cfg = load_run_config(None, [f"method={method}", "model=resnet8", "dataset=cifar10", f"data_root={cifar10_root}",
                                 "per_class=100", "test_per_class=100", "epochs=6", "batch_size=32",
                                 f"out={tmp_path}", "progress=false"])
    result = json.loads((train(cfg) / "result.json").read_text())
    assert result["final"]["top1"] > 22, result["curve"]  # 10 classes: chance is 10% (+-1% at 1000 test images)
    assert result["final"]["top5"] > result["final"]["top1"]
    losses = [r["loss"]["ce"] for r in result["curve"]]
    assert losses[-1] < losses[0]
