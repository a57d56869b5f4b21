"""Config parsing and the refusal of bad input, with the key and the allowed range named."""
import pytest

from ipsd.config import ConfigError, RunConfig, apply_overrides, build, load_run_config
from ipsd.resolve import resolve
from ipsd.runs import run_hash


def test_yaml_then_overrides(tmp_path):
    f = tmp_path / "c.yaml"
    f.write_text("method: hard\nmodel: resnet8\nepochs: 3\nmethod_args: {}\n")
    cfg = load_run_config(f, ["epochs=5", "lr=0.1", "lr_milestones=[2,4]"])
    assert (cfg.method, cfg.model, cfg.epochs, cfg.lr, cfg.lr_milestones) == ("hard", "resnet8", 5, 0.1, [2, 4])


def test_nested_method_args():
    values = apply_overrides({"method_args": {"T": 4}}, ["method_args.grid=2"])
    assert values["method_args"] == {"T": 4, "grid": 2}


@pytest.mark.parametrize("override,pattern", [
    (["epoch=3"], r"unknown key 'epoch'; did you mean 'epochs'"),
    (["lr=-0.1"], r"lr=-0.1 is out of range; allowed \(0, inf\]"),
    (["batch_size=0"], r"batch_size=0 is out of range"),
    (["precision=fp16"], r"precision='fp16' is not allowed; use one of 'auto', 'fp32', 'bf16'"),
    (["epochs=two"], r"epochs must be int"),
    (["nesterov=3"], r"nesterov must be true or false"),
    (["epochs"], r"must look like key=value"),
    (["optimizer=adam"], r"optimizer='adam' is not allowed; use one of 'sgd', 'adamw'"),
    (["lr_schedule=linear"], r"lr_schedule='linear' is not allowed; use one of 'step', 'cosine'"),
    (["warmup_epochs=-1"], r"warmup_epochs=-1 is out of range; allowed \[0, inf\]"),
    (["warmup_epochs=240"], r"warmup_epochs=240 is out of range: the warm-up must end .* allowed \[0, 239\]"),
    (["optimizer=adamw", "nesterov=true"], r"nesterov=true needs optimizer=sgd"),
])
def test_bad_values_are_refused(override, pattern):
    with pytest.raises(ConfigError, match=pattern):
        load_run_config(None, override)


def test_unknown_names_suggest_nearest():
    with pytest.raises(ConfigError, match=r"method: unknown method 'isp'; did you mean .*'ips'"):
        resolve(load_run_config(None, ["method=isp"]))
    with pytest.raises(ConfigError, match=r"unknown model 'resnet19'; did you mean .*'resnet18'"):
        resolve(load_run_config(None, ["model=resnet19"]))
    with pytest.raises(ConfigError, match=r"unknown key 'method_args.Temp'; did you mean 'T'"):
        resolve(load_run_config(None, ["method_args.Temp=3"]))


def test_resolution_fills_model_defaults():
    r = resolve(load_run_config(None, ["model=shufflenetv2", "method=ips"]))
    assert r.cfg.lr == 0.01 and r.cfg.method_args["T"] == 4.0
    assert resolve(load_run_config(None, ["model=vgg16"])).cfg.method_args["gamma"] == 0.5
    assert resolve(load_run_config(None, ["model=ResNet18"])).cfg.model == "resnet18"


def test_identity_ignores_operational_keys_only():
    a = resolve(load_run_config(None, ["epochs=3"]))
    b = resolve(load_run_config(None, ["epochs=3", "out=/elsewhere", "device=cpu", "stop_after=1",
                                       "data_root=/x", "progress=false"]))
    c = resolve(load_run_config(None, ["epochs=4"]))
    d = resolve(load_run_config(None, ["epochs=3", "method_args.T=4"]))  # explicit default = same run
    assert a.run_id == b.run_id == d.run_id != c.run_id
    assert a.run_id == run_hash(a.cfg.identity()) and len(a.run_id) == 12


def test_optimizer_and_schedule_keys_default_to_sgd_step_and_are_part_of_the_identity():
    cfg = load_run_config(None, [])
    assert (cfg.optimizer, cfg.lr_schedule, cfg.warmup_epochs) == ("sgd", "step", 0)
    assert load_run_config(None, ["optimizer=adamw", "warmup_epochs=5"]).optimizer == "adamw"
    ids = {resolve(load_run_config(None, args)).run_id
           for args in ([], ["optimizer=adamw"], ["lr_schedule=cosine"], ["warmup_epochs=1"])}
    assert len(ids) == 4


def test_build_refuses_type_mismatch_in_lists():
    with pytest.raises(ConfigError, match=r"lr_milestones\[1\] must be int"):
        build(RunConfig, {"lr_milestones": [1, "x"]})
