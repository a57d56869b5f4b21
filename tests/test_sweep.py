"""Sweeps: grid expansion, derived seeds, resuming only what is missing, launchers (local, slurm via
submitit's local executor), and the table3 smoke profile end to end (sweep -> report) on CIFAR-10."""
import dataclasses
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from benchmarks.grid import expand, load_table, replicate_seed
from benchmarks.sweep import LaunchOptions, SlurmRun, launch_slurm, sweep, train_args
from ipsd.config import ConfigError, load_run_config
from ipsd.resolve import resolve

ROOT = Path(__file__).resolve().parents[1]


def tiny_table(tmp_path, seeds=2, epochs=1):
    path = tmp_path / "tiny.yaml"
    path.write_text(f"""
name: tiny
paper: {{file: table3_cifar100_selfdistill.csv}}
seeds: {seeds}
base: {{dataset: digits, per_class: 10, test_per_class: 5, epochs: {epochs}, batch_size: 20, out: {tmp_path / 'runs'}}}
rows:
  Hard Label: {{method: hard}}
  IPS (4x4): {{method: ips}}
columns:
  ResNet18: {{model: resnet8}}
  ResNet34: {{model: resnet20}}
skip: [[IPS (4x4), ResNet34]]
profiles:
  fast: {{seeds: 1, columns: [ResNet18]}}
""")
    return path


def test_expansion_seeds_and_skips(tmp_path):
    runs = expand(load_table(tiny_table(tmp_path)))
    assert [(r.row, r.column, r.replicate) for r in runs] == [
        ("Hard Label", "ResNet18", 0), ("Hard Label", "ResNet18", 1), ("Hard Label", "ResNet34", 0),
        ("Hard Label", "ResNet34", 1), ("IPS (4x4)", "ResNet18", 0), ("IPS (4x4)", "ResNet18", 1)]
    assert len({r.run_id for r in runs}) == 6
    # seeds are a function of the run's identity (not of the table): recompute one independently
    probe = resolve(load_run_config(None, ["method=hard", "model=resnet8", "dataset=digits", "per_class=10",
                                           "test_per_class=5", "epochs=1", "batch_size=20", "seed=0"]))
    assert runs[1].cfg.seed == replicate_seed(probe.cfg.identity(), 1)
    assert runs[0].cfg.seed != runs[1].cfg.seed
    fast = expand(load_table(tiny_table(tmp_path), "fast", ["epochs=3"]))
    assert [(r.row, r.column) for r in fast] == [("Hard Label", "ResNet18"), ("IPS (4x4)", "ResNet18")]
    assert all(r.cfg.epochs == 3 for r in fast)


def test_table_errors_name_the_problem(tmp_path):
    with pytest.raises(ConfigError, match="no profile 'smok'"):
        load_table(tiny_table(tmp_path), "smok")
    with pytest.raises(ConfigError, match=r"tiny \[Hard Label / ResNet18\]: unknown key 'epoch'"):
        expand(load_table(tiny_table(tmp_path), "full", ["epoch=3"]))


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "benchmarks").glob("table*.yaml")))
def test_every_table_plans_in_every_profile(name):
    path = ROOT / "benchmarks" / name
    for profile in dict.fromkeys(["full", *(yaml.safe_load(path.read_text()).get("profiles") or {})]):
        assert expand(load_table(path, profile)), profile


def test_table2_mvitv2_column_uses_the_scaled_adamw_recipe():
    runs = [r for r in expand(load_table(ROOT / "benchmarks" / "table2.yaml")) if r.column == "MViTv2"]
    assert {r.row for r in runs} == {"Hard Label", "IPS (2x2)"}
    for r in runs:
        c = r.cfg
        assert (c.optimizer, c.lr_schedule, c.batch_size, c.epochs, c.weight_decay) == ("adamw", "cosine", 192, 200, 0.05)
        assert c.lr == pytest.approx(5e-4 * 192 / 512)  # DeiT/MViTv2 linear scaling of 5e-4 per 512 images
        assert c.warmup_epochs == round(70 * 200 / 300) and c.schedule_ref_epochs == 200  # MViTv2's 70 of 300


def test_train_args_reproduce_the_config(tmp_path):
    run = expand(load_table(tiny_table(tmp_path)))[4]
    again = resolve(load_run_config(None, train_args(run.cfg)))
    assert again.run_id == run.run_id and again.cfg == run.cfg


def test_killed_sweep_reruns_only_missing_runs(tmp_path):
    table = tiny_table(tmp_path, epochs=2)
    runs = expand(load_table(table))
    cmd = [sys.executable, "-m", "ipsd", "sweep", str(table)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while sum((r.folder / "result.json").exists() for r in runs) < 2 and time.time() < deadline:
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    finished = {r.run_id: (r.folder / "result.json").stat().st_mtime_ns for r in runs
                if (r.folder / "result.json").exists()}
    assert 2 <= len(finished) < len(runs)
    out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert f"{len(finished)} done" in out
    for r in runs:
        assert (r.folder / "result.json").exists()
        if r.run_id in finished:  # untouched: not re-trained
            assert (r.folder / "result.json").stat().st_mtime_ns == finished[r.run_id]
    folders = [p for p in (tmp_path / "runs").iterdir() if (p / "result.json").exists()]
    assert len(folders) == len(runs)
    again = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
    assert f"{len(runs)} done" in again


def test_slurm_launcher_through_submitit_local_executor(tmp_path):
    pytest.importorskip("submitit")
    runs = expand(load_table(tiny_table(tmp_path), "fast"))
    launch_slurm(runs, LaunchOptions(cluster="local", slurm={"timeout_min": 10}))
    for r in runs:
        assert json.loads((r.folder / "result.json").read_text())["run_id"] == r.run_id
    # on preemption submitit calls checkpoint(): the job requeues the identical run, which resumes
    job = SlurmRun({"method": "hard"})
    again = job.checkpoint()
    assert isinstance(again.function, SlurmRun) and again.function.values == job.values


def test_table3_smoke_sweep_then_report(cifar10_root, tmp_path):
    table = ROOT / "benchmarks" / "table3.yaml"
    over = [f"data_root={cifar10_root}", f"out={tmp_path}"]
    runs = sweep(str(table), "smoke", "local", over)
    assert all((r.folder / "result.json").exists() for r in runs)
    from benchmarks.report import report

    text = report(str(table), "smoke", over)
    for row in ("Hard Label", "LS", "Disturb Label", "DDGSD", "TF-KD", "CS-KD", "OLS", "FER", "DLB", "IPS (4x4)",
                "Hard Label (2 views) (control)", "IPS without KD (alpha=0) (control)"):
        assert row in text
    main_table = text.split("#### Differences")[0]  # the differences below it are a table of their own
    body = [line for line in main_table.splitlines() if line.startswith("| ")][1:]  # the rows, header dropped
    assert len(body) == 12 and not any("[1/2]" in line or "| –" in line for line in body), text
    assert (tmp_path / "reports" / "table3-smoke-last.png").exists()


def test_sweep_trains_a_missing_teacher_first(tmp_path, capsys):
    path = tmp_path / "kd.yaml"
    path.write_text(f"""
name: kd
paper: {{file: table4_teacher_student.csv, column: student}}
seeds: 1
base: {{dataset: digits, per_class: 10, test_per_class: 5, epochs: 1, batch_size: 20, out: {tmp_path / 'runs'}}}
rows:
  Hard Label: {{method: hard}}
  KD: {{method: kd}}
columns:
  ResNet20->ResNet8: {{model: resnet8, teacher_run: {{model: resnet20}}, paper_key: ResNet18}}
""")
    runs = sweep(str(path))
    out = capsys.readouterr().out
    assert out.index("1 teachers") < out.index("2 runs")
    kd = next(r for r in runs if r.row == "KD")
    teacher_folder = Path(kd.cfg.teacher)
    assert json.loads((teacher_folder / "result.json").read_text())["model"] == "resnet20"
    recorded = json.loads((kd.folder / "result.json").read_text())["teacher"]
    assert recorded["run_dir"] == str(teacher_folder.resolve())
    assert kd.cfg.teacher_id == f"run:{teacher_folder.name}"


def test_local_sweeps_default_to_one_one_thread_job_per_core_on_cpu(tmp_path, monkeypatch):
    from benchmarks import sweep as sweep_module

    runs = expand(load_table(tiny_table(tmp_path)))
    cpu = [dataclasses.replace(r, resolved=dataclasses.replace(r.resolved, cfg=dataclasses.replace(r.cfg, device="cpu")))
           for r in runs]
    monkeypatch.setattr(sweep_module, "usable_cores", lambda: 2)
    assert sweep_module.local_jobs(cpu) == 2 and sweep_module.local_jobs(cpu[:1]) == 1
    monkeypatch.setattr(sweep_module, "usable_cores", lambda: 64)
    assert sweep_module.local_jobs(cpu) == len(cpu)  # never more jobs than runs
    gpu = [dataclasses.replace(r, resolved=dataclasses.replace(r.resolved, cfg=dataclasses.replace(r.cfg, device="cuda")))
           for r in runs]
    assert sweep_module.local_jobs(gpu) == 1
    seen = []
    monkeypatch.setattr(sweep_module, "_run_queue", lambda todo, envs, command, then=None: seen.append(envs))
    monkeypatch.setattr(sweep_module, "usable_cores", lambda: 2)
    sweep_module.launch_local(cpu, LaunchOptions())
    assert seen == [[{"OMP_NUM_THREADS": "1"}] * 2]  # two jobs, one thread each


def test_jobs_below_one_is_a_one_line_error(tmp_path):
    out = subprocess.run([sys.executable, "-m", "ipsd", "sweep", str(tiny_table(tmp_path)), "--jobs", "0"],
                         capture_output=True, text=True)
    assert out.returncode == 2 and out.stderr.strip().startswith("ipsd: error: --jobs 0 is out of range")
