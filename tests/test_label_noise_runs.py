"""The `label_noise` run key (Table 14): the engine flips exactly round(rate * N) training labels after subsetting,
evenly per class, leaves the test split alone, pairs by the noisy labels, records the noise; runs without it keep
the run ids they had before the key existed."""
from __future__ import annotations

import json

import pytest
import torch

from ipsd.config import ConfigError, RunConfig, build, load_run_config
from ipsd.data.batch import Needs
from ipsd.data.loader import DeviceLoader
from ipsd.engine import load_data, train
from ipsd.resolve import resolve

DIGITS = {"dataset": "digits", "per_class": 10, "test_per_class": 5, "batch_size": 20}


def test_noise_flips_the_expected_count_per_class_and_leaves_the_test_split_alone():
    clean = load_data(build(RunConfig, DIGITS))
    noisy = load_data(build(RunConfig, {**DIGITS, "label_noise": 0.2}))
    flipped = clean.train_y != noisy.train_y
    assert len(clean.train_y) == 100 and int(flipped.sum()) == 20  # round(0.2 * 100)
    assert torch.bincount(clean.train_y[flipped], minlength=10).tolist() == [2] * 10  # 20 flips / 10 classes
    assert torch.equal(noisy.test_y, clean.test_y) and torch.equal(noisy.test_x, clean.test_x)
    assert torch.equal(noisy.train_x, clean.train_x)
    rec = noisy.label_noise
    assert (rec["rate"], rec["seed"], rec["n"], rec["num_flipped"]) == (0.2, 0, 100, 20)
    other = load_data(build(RunConfig, {**DIGITS, "label_noise": 0.2, "label_noise_seed": 1}))
    assert not torch.equal(other.train_y, noisy.train_y)  # the seed picks the flips


def test_pairs_are_drawn_from_the_noisy_labels():
    data = load_data(build(RunConfig, {**DIGITS, "label_noise": 0.4}))
    loader = DeviceLoader(data, torch.device("cpu"), 20, Needs(pairs=True), seed=0)
    for batch in loader.epoch(1):
        assert torch.equal(batch.y, data.train_y[batch.index])
        assert torch.equal(data.train_y[batch.partner_index], batch.y)


def test_runs_without_noise_keep_their_run_ids():
    """The ids below were computed before `label_noise` existed (identity without the key)."""
    before = {"2d098c52d2f9": {"method": "hard", "model": "resnet8", "dataset": "cifar10", "per_class": 100,
                               "test_per_class": 100, "epochs": 100, "batch_size": 64},
              "ed5c70ffdb16": {"method": "ips", "model": "resnet18", "dataset": "cifar100",
                               "method_args": {"pr_schedule": "constant", "p_r": 0.5}},
              "9d799487baac": {"method": "ls", "model": "resnet18", "dataset": "cifar100"}}
    for run_id, values in before.items():
        assert resolve(build(RunConfig, values)).run_id == run_id
        assert resolve(build(RunConfig, {**values, "label_noise": 0.0, "label_noise_seed": 7})).run_id == run_id
        noisy = resolve(build(RunConfig, {**values, "label_noise": 0.2}))
        assert noisy.run_id != run_id
        assert (noisy.cfg.identity()["label_noise"], noisy.cfg.identity()["label_noise_seed"]) == (0.2, 0)
        assert "label_noise" not in resolve(build(RunConfig, values)).cfg.identity()


@pytest.mark.parametrize("rate", [1.0, -0.1, 1.5])
def test_out_of_range_noise_is_refused(rate):
    with pytest.raises(ConfigError, match=r"label_noise=.* is out of range; allowed \[0, 1\)"):
        build(RunConfig, {"label_noise": rate})


def test_a_noisy_run_records_its_noise(tmp_path):
    folder = train(load_run_config(None, ["method=ips", "model=resnet8", "dataset=digits", "per_class=10",
                                          "test_per_class=5", "epochs=1", "batch_size=20", "progress=false",
                                          "label_noise=0.3", f"out={tmp_path}"]))
    rec = json.loads((folder / "result.json").read_text())
    noise = rec["label_noise"]
    assert (noise["kind"], noise["num_flipped"], noise["n"]) == ("symmetric", 30, 100)
    assert noise["flipped_per_class"] == [3] * 10
    assert rec["identity"]["label_noise"] == 0.3
    clean = train(load_run_config(None, ["method=hard", "model=resnet8", "dataset=digits", "per_class=10",
                                         "test_per_class=5", "epochs=1", "batch_size=20", "progress=false",
                                         f"out={tmp_path}"]))
    assert "label_noise" not in json.loads((clean / "result.json").read_text())
