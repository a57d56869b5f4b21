"""benchmarks/gpu_check.py: the --tiny check runs end to end on the CPU and reports every section; its verdict
follows the correctness checks; bad input is one ``ipsd: error:`` line. Speeds are reported, never asserted."""
import json
import os
import subprocess
import sys
from pathlib import Path

from benchmarks import gpu_check

ROOT = Path(__file__).resolve().parents[1]
SECTIONS = ("environment", "correctness", "steps", "patch_swap", "engine_overhead", "nccl", "cudagraphs")


def test_tiny_check_writes_every_section_and_the_loss_falls(tmp_path):
    out = tmp_path / "check"
    env = {**os.environ, "PYTHONPATH": "."}
    done = subprocess.run([sys.executable, "benchmarks/gpu_check.py", "--tiny", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    summary = json.loads((out / "summary.json").read_text())
    md = (out / "summary.md").read_text()
    for section in SECTIONS:
        assert section in summary, section
        assert f"\n## {section}\n" in md, section
    assert summary["failures"] == [] and "all checks passed" in md
    for method in ("hard", "ips"):
        run = summary["correctness"][method]
        assert run["ce_by_epoch"][-1] < run["ce_by_epoch"][0], run  # the loss fell
        assert run["loss_fell"] and run["top1"] > run["chance"]
    assert set(summary["steps"]) == set(gpu_check.CONFIGS)
    for config, per in summary["steps"].items():
        for method in gpu_check.METHODS:
            row = per[method]
            assert "error" not in row and "skipped" not in row, (config, method, row)
            assert row["images_per_second"] > 0 and 0 < row["loader_share"] < 1, (config, method, row)
        assert per["settings"]["compile"] == ("compile" in config)
        assert per["settings"]["bf16"] == ("bf16" in config) and per["settings"]["channels_last"] == ("channels_last" in config)
    assert summary["steps"]["fp32"]["ips"]["images_per_step"] == 2 * summary["steps"]["fp32"]["hard"]["images_per_step"]
    assert all(0 < v["share"] < 1 for v in summary["patch_swap"].values())
    assert summary["engine_overhead"]["engine_over_minimal"] > 0
    assert summary["nccl"] == {**summary["nccl"], "backend": "gloo", "all_reduce_ok": True}
    assert "CUDA" in summary["cudagraphs"]["skipped"]


def correct_run(**change):
    return {"ce_by_epoch": [2.0, 1.0], "top1": 50.0, "chance": 10.0, "loss_fell": True, "above_chance": True,
            "images_per_second": 1.0, **change}


def test_a_loss_that_does_not_fall_fails_the_check():
    summary = {"correctness": {"hard": correct_run(), "ips": correct_run(ce_by_epoch=[2.0, 2.1], loss_fell=False)},
               "nccl": {"all_reduce_ok": True}, "steps": {"error": "RuntimeError: boom"}}
    bad = gpu_check.failures(summary)
    assert len(bad) == 2 and bad[0] == "steps: RuntimeError: boom" and bad[1].startswith("correctness ips: CE [2.0, 2.1]")
    summary["failures"] = bad
    md = gpu_check.markdown(summary)
    assert "FAILED: steps: RuntimeError: boom; correctness ips" in md and "(not run)" in md  # e.g. engine_overhead
    assert gpu_check.failures({"correctness": {"hard": correct_run()}, "nccl": {"all_reduce_ok": False}}) == [
        "nccl: the all-reduce gave a wrong value"]


def test_missing_data_is_one_error_line(tmp_path, capsys):
    code = gpu_check.main(["--tiny", "--out", str(tmp_path), "--data", str(tmp_path / "nowhere")])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and err[0].startswith("ipsd: error: --data "), err
    assert not (tmp_path / "summary.json").exists()  # refused before any work
