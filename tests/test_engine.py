"""Engine and run records: folder contents, identity, resume exactness (stop_after and kill -9),
non-finite losses, and bad input. Uses the bundled digits data so it runs anywhere."""
import json
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml

from ipsd.cli import main
from ipsd.config import load_run_config
from ipsd.engine import NonFiniteLoss, train
from ipsd.losses import ce
from ipsd.method import METHODS, Method, register_method
from ipsd.resolve import resolve

SMALL = ["dataset=digits", "model=resnet8", "per_class=12", "test_per_class=10", "batch_size=24", "progress=false"]


def run(tmp, *extra, method="ips", epochs=3):
    return train(load_run_config(None, [*SMALL, f"method={method}", f"epochs={epochs}", f"out={tmp}", *extra]))


def weights(folder):
    return torch.load(Path(folder) / "checkpoint.pt", weights_only=False)


def assert_same_state(a, b):
    for k, v in a["model"].items():
        assert torch.equal(v, b["model"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys() and sa
    for i in sa:  # every per-parameter tensor: SGD's momentum buffer, AdamW's step and moments
        assert sa[i].keys() == sb[i].keys()
        for k, v in sa[i].items():
            assert torch.equal(v, sb[i][k]), (i, k)


def test_run_folder_contents(tmp_path, capsys):
    assert main(["train", *SMALL, "method=ips", "epochs=2", f"out={tmp_path}"]) == 0
    folder = Path(capsys.readouterr().out.strip().splitlines()[-1])
    assert folder.parent == tmp_path
    cfg = yaml.safe_load((folder / "config.yaml").read_text())
    assert cfg["method_args"]["T"] == 4.0 and cfg["lr"] == 0.05  # resolved, not as typed
    assert folder.name == resolve(load_run_config(None, [*SMALL, "method=ips", "epochs=2"])).run_id
    log = [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]
    assert [r["epoch"] for r in log] == [1, 2] and set(log[0]["loss"]) == {"ce", "kd"}
    result = json.loads((folder / "result.json").read_text())
    for key in ("final", "best", "curve", "seed", "config", "git_commit", "versions", "hardware", "wall_seconds",
                "images_per_second", "peak_memory_mib", "images_per_step"):
        assert key in result, key
    assert result["final"]["top1"] == log[-1]["top1"]
    assert result["best"]["top1"] == max(r["top1"] for r in log)
    assert result["images_per_step"] == 48  # 24 pairs
    assert not [p for p in folder.iterdir() if p.name.startswith(".")]  # no temp files left behind


def test_finished_run_returns_at_once(tmp_path):
    folder = run(tmp_path, epochs=1)
    stamp = (folder / "result.json").stat().st_mtime_ns
    t = time.perf_counter()
    assert run(tmp_path, epochs=1) == folder
    assert time.perf_counter() - t < 5 and (folder / "result.json").stat().st_mtime_ns == stamp


def test_resume_after_stop_after_is_exact(tmp_path):
    ref = run(tmp_path / "a")
    for _ in range(3):
        part = run(tmp_path / "b", "stop_after=1")
    assert part.name == ref.name
    assert_same_state(weights(ref), weights(part))
    ra, rb = (json.loads((f / "result.json").read_text()) for f in (ref, part))
    assert ra["curve"] == rb["curve"]


def test_adamw_cosine_warmup_resume_is_exact(tmp_path):
    args = ("optimizer=adamw", "lr=0.002", "weight_decay=0.05", "lr_schedule=cosine", "warmup_epochs=2",
            "schedule_ref_epochs=6")
    ref = run(tmp_path / "a", *args)
    for _ in range(3):
        part = run(tmp_path / "b", *args, "stop_after=1")
    assert part.name == ref.name
    a, b = weights(ref), weights(part)
    assert_same_state(a, b)
    group = a["optimizer"]["param_groups"][0]
    assert group["weight_decay"] == 0.05 and group.get("decoupled_weight_decay", True)
    assert all({"exp_avg", "exp_avg_sq"} <= set(st) for st in a["optimizer"]["state"].values())
    ra, rb = (json.loads((f / "result.json").read_text()) for f in (ref, part))
    assert ra["curve"] == rb["curve"]
    # warm-up 2 of 6 epochs -> 1 of 3: epoch 1 at lr; then cosine over 2 epochs: lr, lr * (1 + cos(pi/2)) / 2
    assert [r["lr"] for r in ra["curve"]] == pytest.approx([0.002, 0.002, 0.001])


def test_default_optimizer_is_sgd_with_the_step_schedule(tmp_path):
    folder = run(tmp_path, "lr_milestones=[1]", "schedule_ref_epochs=2", epochs=2)
    group = weights(folder)["optimizer"]["param_groups"][0]
    assert (group["momentum"], group["nesterov"], group["weight_decay"]) == (0.9, False, 5e-4)
    assert all(set(st) == {"momentum_buffer"} for st in weights(folder)["optimizer"]["state"].values())
    curve = json.loads((folder / "result.json").read_text())["curve"]
    assert [r["lr"] for r in curve] == pytest.approx([0.05, 0.005])  # x0.1 after epoch 1


def test_stop_after_leaves_no_result(tmp_path):
    folder = run(tmp_path, "stop_after=1")
    assert not (folder / "result.json").exists()
    assert weights(folder)["state"]["epoch"] == 1


def test_resume_after_kill_9_is_exact(tmp_path):
    small = [a if not a.startswith("per_class=") else "per_class=40" for a in SMALL]  # each key once
    args = [sys.executable, "-m", "ipsd", "train", *small, "method=hard", "epochs=8"]
    ref = subprocess.run([*args, f"out={tmp_path / 'a'}"], capture_output=True, text=True, check=True)
    ref_dir = Path(ref.stdout.strip().splitlines()[-1])
    proc = subprocess.Popen([*args, f"out={tmp_path / 'b'}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    log = tmp_path / "b" / ref_dir.name / "log.jsonl"
    deadline = time.time() + 300
    while not (log.exists() and log.read_text().count("\n") >= 2) and time.time() < deadline:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert not (log.parent / "result.json").exists(), "the run finished before it could be killed"
    again = subprocess.run([*args, f"out={tmp_path / 'b'}"], capture_output=True, text=True, check=True)
    assert "resuming" in again.stderr
    assert_same_state(weights(ref_dir), weights(log.parent))
    assert json.loads((ref_dir / "result.json").read_text())["curve"] == \
        json.loads((log.parent / "result.json").read_text())["curve"]


class ExplodesInEpochTwo(Method):
    """Test-only method: a finite loss in epoch 1, NaN from epoch 2."""

    def forward(self, model, batch, step):
        loss = ce(model(batch.x), batch.y)
        return {"ce": loss * float("nan") if step.epoch == 2 else loss}


@pytest.fixture
def nan_method():
    """Registers the throw-away method for one test and removes it again, so no other code ever sees it."""
    register_method("test_nan")(ExplodesInEpochTwo)
    yield "test_nan"
    METHODS.unregister("test_nan")


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, nan_method):
    with pytest.raises(NonFiniteLoss, match="epoch 2.*last good checkpoint \\(epoch 1\\)"):
        run(tmp_path, method="test_nan")
    folder = next(p for p in tmp_path.iterdir() if not p.name.startswith("."))  # .locks holds the training locks
    assert weights(folder)["state"]["epoch"] == 1
    assert all(torch.isfinite(v).all() for v in weights(folder)["model"].values() if v.is_floating_point())
    assert not (folder / "result.json").exists()
    assert len((folder / "log.jsonl").read_text().splitlines()) == 1


@pytest.mark.parametrize("args,pattern", [
    (["batch_size=500"], r"batch_size=500 is out of range: the training set has 120 images"),
    (["method_args.grid=3"], r"grid=3 must divide the image size 32"),
    (["method_args.grid=1"], r"grid=1 is out of range; allowed \[2, inf\]"),
    (["method_args.p_r=2"], r"p_r=2.0 is out of range; allowed \[0, 1\]"),
    (["classes=[0,42]"], r"class"),
    (["modle=resnet8"], r"unknown key 'modle'; did you mean 'model'"),
])
def test_bad_input_is_refused_before_training(tmp_path, capsys, args, pattern):
    keys = {a.split("=")[0] for a in args}
    base = [a for a in SMALL if a.split("=")[0] not in keys]  # each key once: the case's value replaces SMALL's
    assert main(["train", *base, "method=ips", "epochs=1", f"out={tmp_path}", *args]) == 2
    err = capsys.readouterr().err
    assert re.search(pattern, err), err
    assert not [p for p in tmp_path.iterdir() if p.name != ".locks"], "a refused run must leave no run folder behind"


def test_bf16_autocast_and_channels_last_run_on_cpu(tmp_path):
    folder = run(tmp_path, "precision=bf16", "channels_last=true", epochs=1)
    r = json.loads((folder / "result.json").read_text())
    assert r["settings"]["bf16"] and r["settings"]["channels_last"]
    assert all(torch.isfinite(torch.tensor(v)) for v in r["curve"][0]["loss"].values())


def test_torch_compile_path_trains_and_resumes(tmp_path):
    """The compiled model keeps its state_dict keys, so checkpoints and resume are unchanged (aot_eager: the
    same dynamo tracing as inductor without C++ code generation, to keep the test fast on CPU)."""
    args = ("compile=true", "compile_backend=aot_eager")
    ref = run(tmp_path / "a", *args, epochs=2)
    run(tmp_path / "b", *args, "stop_after=1", epochs=2)
    part = run(tmp_path / "b", *args, epochs=2)
    assert_same_state(weights(ref), weights(part))
    assert not any(k.startswith("_orig_mod") for k in weights(ref)["model"])
