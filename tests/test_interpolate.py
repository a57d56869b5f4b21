"""The 1-D weight interpolation: exact BatchNorm statistics, exact ends, and the command end to end."""
from __future__ import annotations

import json

import torch
from torch import nn

from ipsd.cli import main
from ipsd.config import load_run_config
from ipsd.engine import train
from ipsd.evaluation.interpolate import _blend, recompute_batchnorm

SMALL = ["dataset=digits", "model=resnet8", "per_class=12", "test_per_class=10", "batch_size=24", "epochs=1",
         "progress=false", "method=ips", "method_args.pr_schedule=constant"]


def test_recomputed_batchnorm_statistics_are_the_exact_average_over_all_batches():
    torch.manual_seed(0)
    bn = nn.BatchNorm1d(3, momentum=0.1)
    batches = [(torch.randn(5, 3) * 2 + 1, None), (torch.randn(7, 3), None)]
    bn.running_mean.fill_(9.0)  # stale statistics must not survive
    recompute_batchnorm(bn, batches)
    # momentum None: the cumulative average of each batch's mean and unbiased variance, batch by batch
    means = [x.mean(0) for x, _ in batches]
    vars_ = [x.var(0, unbiased=True) for x, _ in batches]
    assert torch.allclose(bn.running_mean, (means[0] + means[1]) / 2, atol=1e-6)
    assert torch.allclose(bn.running_var, (vars_[0] + vars_[1]) / 2, atol=1e-6)
    assert bn.momentum == 0.1 and not bn.training  # restored


def test_blend_ends_are_the_two_runs_and_the_midpoint_is_the_mean():
    a = {"w": torch.tensor([1.0, 3.0]), "n": torch.tensor(5)}
    b = {"w": torch.tensor([3.0, -1.0]), "n": torch.tensor(7)}
    assert torch.equal(_blend(a, b, 0.0)["w"], a["w"]) and torch.equal(_blend(a, b, 1.0)["w"], b["w"])
    assert torch.equal(_blend(a, b, 0.5)["w"], torch.tensor([2.0, 1.0])) and _blend(a, b, 0.5)["n"] == 5


def test_interpolate_command_draws_the_figure_and_a_run_against_itself_is_flat(tmp_path, capsys):
    a = train(load_run_config(None, [*SMALL, "method_args.p_r=0.0", f"out={tmp_path}"]))
    b = train(load_run_config(None, [*SMALL, "method_args.p_r=0.5", f"out={tmp_path}"]))
    png = tmp_path / "fig" / "interp.png"
    assert main(["interpolate", str(a), str(b), "--out", str(png), "--points", "3"]) == 0
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    pts = json.loads(png.with_suffix(".json").read_text())["points"]
    assert [p["t"] for p in pts] == [0.0, 0.5, 1.0]
    assert main(["interpolate", str(a), str(a), "--out", str(tmp_path / "self.png"), "--points", "3"]) == 0
    same = json.loads((tmp_path / "self.json").read_text())["points"]
    assert len({(p["train_top1"], p["test_top1"], round(p["test_loss"], 6)) for p in same}) == 1


def test_interpolate_takes_data_root_as_an_override_and_refuses_others(tmp_path, capsys):
    a = train(load_run_config(None, [*SMALL, "method_args.p_r=0.0", f"out={tmp_path}"]))
    capsys.readouterr()  # the training's own messages
    assert main(["interpolate", str(a), str(a), "--out", str(tmp_path / "x.png"), "seed=2"]) == 2
    assert capsys.readouterr().err.strip() == ("ipsd: error: interpolate: the runs' configs are fixed; only "
                                               "data_root= may be set, not seed")
    assert main(["interpolate", str(a), str(a), "--out", str(tmp_path / "x.png"), "--points", "2",
                 f"data_root={tmp_path / 'nowhere'}"]) == 0  # digits is bundled: the root is given, not needed
    assert (tmp_path / "x.png").is_file()
    capsys.readouterr()  # the run's progress lines
    assert main(["interpolate", str(a), str(a), "--out", str(tmp_path / "y.png"), "--bn-batches", "train"]) == 2
    assert capsys.readouterr().err.strip() == ("ipsd: error: interpolate: bn_batches must be one of augmented, "
                                               "clean, not 'train'")


def test_augmented_batchnorm_pass_sees_every_training_image_once_as_a_crop_flip_of_itself():
    from ipsd.data.batch import Needs
    from ipsd.data.loader import PAD, DeviceLoader
    from ipsd.engine import load_data
    from ipsd.evaluation.interpolate import augmented_train_batches

    cfg = load_run_config(None, SMALL)
    loader = DeviceLoader(load_data(cfg), torch.device("cpu"), cfg.batch_size, Needs(), cfg.seed)
    batches = list(augmented_train_batches(loader, 7, seed=3))
    again = list(augmented_train_batches(loader, 7, seed=3))
    assert all(torch.equal(x, x2) for (x, _), (x2, _) in zip(batches, again))  # seeded: the same at every t
    n = len(loader.train_y)
    assert sum(len(y) for _, y in batches) == n - (1 if n % 7 == 1 else 0)
    whole = [y for _, y in augmented_train_batches(loader, 8, seed=3)]  # 8 divides n: nothing dropped
    assert n % 8 == 0 and torch.equal(torch.cat(whole).sort().values, loader.train_y.sort().values)
    # each augmented image is one of the (2 PAD + 1)^2 crops of its padded original, flipped or not
    s = loader.size
    first = batches[0][0][0]
    padded = loader.normalise(loader.train)
    crops = [(i, dy, dx, fl) for i in range(n) for dy in range(2 * PAD + 1) for dx in range(2 * PAD + 1)
             for fl in (False, True)]
    matches = [c for c in crops if torch.allclose(
        (lambda v: v.flip(-1) if c[3] else v)(padded[c[0], :, c[1]:c[1] + s, c[2]:c[2] + s]), first, atol=1e-5)]
    assert matches, "the first augmented image is no crop/flip of any training image"
    assert {loader.train_y[m[0]].item() for m in matches} == {batches[0][1][0].item()}
