"""Faults a user meets: damaged run files, two trainers of one run, orphaned sweep children, thread-dependent
results and everyday mistakes. Each ends in one ``ipsd: error:`` line (never a traceback) and loses no file."""
from __future__ import annotations

import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from ipsd.cli import main
from ipsd.config import load_run_config
from ipsd.engine import train
from ipsd.runs import RunFolder

ROOT = Path(__file__).resolve().parents[1]
SMALL = ["dataset=digits", "model=resnet8", "per_class=12", "test_per_class=10", "batch_size=24", "progress=false",
         "method=hard", "threads=1"]


def cfg(out, *extra, epochs=3):
    return load_run_config(None, [*SMALL, f"epochs={epochs}", f"out={out}", *extra])


def ipsd(*args, **kw) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "ipsd", *args], cwd=ROOT, capture_output=True, text=True, **kw)


def model_state(folder: Path) -> dict:
    return torch.load(folder / "checkpoint.pt", weights_only=False)["model"]


def assert_one_error_line(proc: subprocess.CompletedProcess, pattern: str, code: int | None = None) -> None:
    assert proc.returncode != 0 and (code is None or proc.returncode == code), (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    errors = [l for l in proc.stderr.splitlines() if l.startswith("ipsd: error:")]
    assert len(errors) == 1 and pattern in errors[0], proc.stderr


# ---------------------------------------------------------------------------------------------- damaged files
@pytest.mark.parametrize("keep", [100_000, 50_000, 0])
def test_truncated_checkpoint_falls_back_to_the_previous_epoch_and_ends_like_an_uninterrupted_run(tmp_path, keep,
                                                                                                      capsys):
    ref = train(cfg(tmp_path / "ref"))
    part = train(cfg(tmp_path / "cut", "stop_after=2"))  # checkpoint = epoch 2, checkpoint.prev.pt = epoch 1
    ckpt = part / "checkpoint.pt"
    ckpt.write_bytes(ckpt.read_bytes()[:keep])  # a copy cut short / a full disk
    again = train(cfg(tmp_path / "cut"))
    err = capsys.readouterr().err
    assert "resuming from the previous checkpoint" in err and "resuming run" in err and "after epoch 1" in err
    assert (part / "checkpoint.pt.damaged").stat().st_size == keep  # kept for inspection, never deleted
    a, b = model_state(ref), model_state(again)
    assert all(torch.equal(a[k], b[k]) for k in a)
    ra, rb = (RunFolder(f).read_result() for f in (ref, again))
    assert ra.data["curve"] == rb.data["curve"]


def test_both_checkpoints_damaged_is_one_error_line_and_keeps_the_files(tmp_path):
    part = train(cfg(tmp_path, "stop_after=2"))
    for name in ("checkpoint.pt", "checkpoint.prev.pt"):
        (part / name).write_bytes(b"\0" * 10)
    proc = ipsd("train", *SMALL, "epochs=3", f"out={tmp_path}")
    assert_one_error_line(proc, "checkpoint.pt: unreadable checkpoint")
    assert "move it aside" in proc.stderr
    assert sorted(p.name for p in part.iterdir()) == ["checkpoint.prev.pt", "checkpoint.pt", "config.yaml", "log.jsonl"]


def _table(tmp_path: Path, seeds: int, epochs: int, keys=SMALL) -> Path:
    table = tmp_path / "t.yaml"
    table.write_text(f"name: t\nseeds: {seeds}\nbase: {{{', '.join(s.replace('=', ': ') for s in keys)}, "
                     f"epochs: {epochs}, out: {tmp_path / 'runs'}}}\nrows: {{Hard Label: {{method: hard}}}}\n"
                     "columns: {ResNet8: {model: resnet8}}\n")
    return table


def test_truncated_result_is_diagnosed_by_train_sweep_and_report(tmp_path):
    from benchmarks.grid import expand, load_table
    from benchmarks.sweep import train_args

    table = _table(tmp_path, 1, 1)
    (run,) = expand(load_table(table))
    train(run.cfg)
    result = run.folder / "result.json"
    result.write_text(result.read_text()[:40])
    for command in (["train", *train_args(run.cfg)], ["sweep", str(table)], ["sweep", str(table), "--dry-run"],
                    ["report", str(table)]):
        assert_one_error_line(ipsd(*command), "result.json: unreadable run record")
    assert len(result.read_text()) == 40  # nothing overwritten


# ------------------------------------------------------------------------------------------- one run, one process
def test_a_second_trainer_of_the_same_run_is_refused_with_the_holders_pid(tmp_path):
    args = [*SMALL, "epochs=200", f"out={tmp_path}"]
    first = subprocess.Popen([sys.executable, "-m", "ipsd", "train", *args], cwd=ROOT, stderr=subprocess.PIPE, text=True)
    try:
        locks = tmp_path / ".locks"
        deadline = time.time() + 120
        while not (locks.is_dir() and any(p.read_text().strip() for p in locks.iterdir())) and time.time() < deadline:
            time.sleep(0.1)
        second = ipsd("train", *args)
        assert_one_error_line(second, f"being trained by another process (pid {first.pid}")
    finally:
        first.kill()
        first.wait()
    # the lock dies with its process (kill -9 above): a new trainer takes it at once
    assert ipsd("train", *SMALL, "epochs=200", "stop_after=1", f"out={tmp_path}").returncode == 0


def test_sweep_children_die_with_their_parent(tmp_path):
    table = _table(tmp_path, 2, 500)
    parent = subprocess.Popen([sys.executable, "-m", "ipsd", "sweep", str(table), "--jobs", "2"], cwd=ROOT,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    locks = tmp_path / "runs" / ".locks"
    deadline = time.time() + 180
    while not (locks.is_dir() and sum(bool(p.read_text().strip()) for p in locks.iterdir()) == 2) \
            and time.time() < deadline:
        time.sleep(0.2)
    children = [int(p.read_text()) for p in locks.iterdir()]
    assert len(children) == 2
    parent.send_signal(signal.SIGKILL)
    parent.wait()
    deadline = time.time() + 30
    while any(Path(f"/proc/{pid}").exists() for pid in children) and time.time() < deadline:
        time.sleep(0.2)
    alive = [pid for pid in children if Path(f"/proc/{pid}").exists()
             and "zombie" not in Path(f"/proc/{pid}/status").read_text().lower()]
    assert not alive, f"orphaned children still training: {alive}"


# ------------------------------------------------------------------------------------ same run id, same numbers
UNTHREADED = [s for s in SMALL if not s.startswith("threads=")]


def test_thread_count_is_recorded_and_a_resume_under_another_is_refused(tmp_path):
    one = RunFolder(train(cfg(tmp_path / "a", epochs=1))).read_result()
    two = RunFolder(train(load_run_config(None, [*UNTHREADED, "threads=2", "epochs=1", f"out={tmp_path / 'b'}"])))
    two = two.read_result()
    assert one.run_id == two.run_id  # the same computation ...
    assert one.execution["torch_threads"] == 1 and two.execution["torch_threads"] == 2  # ... told apart
    train(cfg(tmp_path / "c", "stop_after=1"))
    proc = ipsd("train", *UNTHREADED, "epochs=3", "threads=2", f"out={tmp_path / 'c'}")
    assert_one_error_line(proc, "re-run with threads=1")


def test_a_resume_without_threads_takes_the_count_the_run_started_with(tmp_path, capsys):
    """An unset ``threads`` (an in-process sweep, a bare `ipsd train`) must not dead-end on a run another launcher
    started: it resumes under the recorded count, and the numbers are those of an uninterrupted run."""
    whole = RunFolder(train(load_run_config(None, [*UNTHREADED, "threads=2", "epochs=2", f"out={tmp_path / 'a'}"])))
    train(load_run_config(None, [*UNTHREADED, "threads=2", "epochs=2", "stop_after=1", f"out={tmp_path / 'b'}"]))
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # this process's default now differs from the run's
    try:
        capsys.readouterr()
        resumed = RunFolder(train(load_run_config(None, [*UNTHREADED, "epochs=2", f"out={tmp_path / 'b'}"])))
    finally:
        torch.set_num_threads(before)
    assert "started with threads=2: resuming with the same count" in capsys.readouterr().err
    assert resumed.read_result().execution["torch_threads"] == 2
    assert resumed.read_result().top1() == whole.read_result().top1()
    assert [e["loss"] for e in resumed.read_log()] == [e["loss"] for e in whole.read_log()]


def test_a_report_flags_a_cell_whose_seeds_ran_under_different_thread_counts(tmp_path):
    import dataclasses

    from benchmarks.grid import expand, load_table
    from benchmarks.report import report

    def row(text: str) -> str:
        return next(line for line in text.splitlines() if line.startswith("| Hard Label"))

    table = _table(tmp_path, 2, 1, UNTHREADED)
    runs = expand(load_table(table))
    for run in runs:
        train(dataclasses.replace(run.cfg, threads=1))
    assert "[mixed]" not in row(report(table))
    shutil.rmtree(runs[1].folder)
    train(dataclasses.replace(runs[1].cfg, threads=2))  # as `--jobs 2` and an in-process sweep would differ
    assert "[mixed]" in row(report(table))


# ------------------------------------------------------------------------------------------- everyday mistakes
def test_ctrl_c_exits_130_with_the_epoch_to_resume_from(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "ipsd", "train", *SMALL, "epochs=300", f"out={tmp_path}"],
                            cwd=ROOT, stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 120
    while not list(tmp_path.glob("*/log.jsonl")) and time.time() < deadline:
        time.sleep(0.1)
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=60)
    result = subprocess.CompletedProcess(proc.args, proc.returncode, "", err)
    assert_one_error_line(result, "re-run the same command to resume from epoch", code=130)


@pytest.mark.parametrize("make,args,pattern", [
    (lambda d: (d / "c.yaml").write_text("method: [ips\nepochs: 2\n"), ["{d}/c.yaml"], "line 2, column 7"),
    (lambda d: (d / "c.yaml").write_text("epochs: 2\nepochs: 3\n"), ["{d}/c.yaml"], "'epochs' is given twice"),
    (lambda d: (d / "c.yaml").mkdir(), ["{d}/c.yaml"], "it is a folder"),
    (lambda d: (d / "f").write_text("x"), [*SMALL, "out={d}/f"], "is a file, not a folder"),
    (lambda d: None, [*SMALL, "device=cuda"], "CUDA is not available" if not torch.cuda.is_available() else "—"),
    (lambda d: None, [*SMALL, "device=gpu"], "is not a device"),
    (lambda d: None, [*SMALL, "epochs=1", "epochs=2"], "'epochs' is given twice"),
    (lambda d: None, [*SMALL, "method_args.T=3", "method_args={{p_r: 0.1}}"], "'method_args' is given twice"),
    (lambda d: None, [*SMALL, "classes=[3]"], "needs at least 2"),
])
def test_everyday_mistakes_are_one_error_line(tmp_path, make, args, pattern):
    make(tmp_path)
    proc = ipsd("train", *[a.format(d=tmp_path) for a in args])
    assert_one_error_line(proc, pattern)


def test_empty_teacher_checkpoint_is_one_error_line(tmp_path):
    teacher = train(cfg(tmp_path / "t", epochs=1))
    (teacher / "checkpoint.pt").write_bytes(b"")
    proc = ipsd("train", *[a for a in SMALL if a != "method=hard"], "method=kd", "epochs=1", f"teacher={teacher}",
                f"out={tmp_path / 's'}")
    assert_one_error_line(proc, "is empty (0 bytes)")
