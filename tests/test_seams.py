"""The seams between layers: records, resolution and the batch contract each have one owner, and the planner
and reporter work from configs and records alone (no engine, no FFCV, no dataset)."""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.grid import expand, load_table
from ipsd.method import Method
from ipsd.resolve import load_methods
from ipsd.runs import RESULT_FORMAT, RunFolder

ROOT = Path(__file__).resolve().parents[1]


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at any depth of the file (function-level imports included)."""
    tree = ast.parse(path.read_text())
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:  # relative: resolve against the file's package
                pkg = path.relative_to(ROOT).with_suffix("").parts[:-node.level]
                base = ".".join([*pkg, base] if base else pkg)
            out.add(base)
            out |= {f"{base}.{a.name}" for a in node.names}
    return out


def test_data_layer_does_not_import_the_method_contract():
    offenders = [p.name for p in (ROOT / "ipsd" / "data").glob("*.py")
                 if any(m == "ipsd.method" or m.startswith("ipsd.method.") for m in _imports(p))]
    assert not offenders, offenders


def test_method_contract_does_not_import_baselines():
    assert not any(m == "baselines" or m.startswith("baselines.") for m in _imports(ROOT / "ipsd" / "method.py"))


def test_planner_and_reporter_never_import_the_engine_or_a_loader():
    code = ("import sys, benchmarks.grid, benchmarks.report, ipsd.resolve; "
            "bad = sorted(m for m in sys.modules if m == 'ipsd.engine' or m.startswith('ipsd.data.')"
            " and m.split('.')[-1] in ('loader', 'file_loader', 'folder_loader', 'ffcv_loader') or m == 'ffcv'); "
            "print(bad); sys.exit(1 if bad else 0)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_planner_knows_images_per_step_without_building_any_method(monkeypatch):
    """Every registered method's images per step comes from its config; building one would fail this test."""
    def refuse(self, *args, **kwargs):
        raise AssertionError(f"{type(self).__name__} was built by the planner")

    monkeypatch.setattr(Method, "__init__", refuse)
    two = {"ips", "cskd", "ddgsd", "dlb", "vrm", "hard_2view", "swap", "ips_mix"}  # anchor + partner, or two views (VRM: real +
    # virtual view; swap loads the partner as its swap source)
    from ipsd.config import RunConfig, build
    from ipsd.resolve import resolve

    for name in load_methods().names():
        extra = {"teacher": "0123456789ab"} if load_methods().get(name).needs_teacher else {}
        res = resolve(build(RunConfig, {"method": name, "model": "resnet8", "dataset": "cifar10",
                                         "batch_size": 32, **extra}))
        assert res.images_per_step == (64 if name in two else 32), name


def _hand_made_record(run, top1: float) -> None:
    rec = {"format": RESULT_FORMAT, "run_id": run.run_id, "seed": run.cfg.seed, "method": run.cfg.method,
           "model": run.cfg.model, "final": {"top1": top1, "top5": 90.0, "epoch": run.cfg.epochs},
           "best": {"top1": top1 + 0.5, "top5": 91.0, "epoch": 1}, "images_per_step": 64, "wall_seconds": 3600.0,
           "hardware": {"device": "cuda:0", "world_size": 8, "gpu": "Test GPU"}}
    run.folder.mkdir(parents=True)
    (run.folder / "result.json").write_text(json.dumps(rec))


@pytest.mark.parametrize("table", ["table2", "table5"])
def test_report_of_on_disk_tables_needs_neither_ffcv_nor_the_dataset(tmp_path, table):
    """Tables 2 and 5 read ImageNet / CUB / Dogs through FFCV in their full profile; their report must still render
    from finished records on a machine with neither FFCV nor the data (run in a child where `import ffcv` fails)."""
    out = tmp_path / "runs"
    planned = expand(load_table(ROOT / "benchmarks" / f"{table}.yaml", "full", [f"out={out}"]))
    for run in planned:
        _hand_made_record(run, 70.0)
    code = ("import sys; sys.modules['ffcv'] = None\n"  # `import ffcv` now raises ImportError
            "from benchmarks.report import report\n"
            f"print(report({str(ROOT / 'benchmarks' / (table + '.yaml'))!r}, 'full', ['out={out}', 'data_root=/nonexistent']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert f"{len(planned)}/{len(planned)} runs finished" in proc.stdout
    assert "70.00" in proc.stdout


def test_dry_run_plan_needs_neither_ffcv_nor_the_dataset(tmp_path):
    code = ("import sys; sys.modules['ffcv'] = None\n"
            "from benchmarks.sweep import sweep\n"
            f"sweep({str(ROOT / 'benchmarks' / 'table2.yaml')!r}, 'full', 'local', ['out={tmp_path}'], dry_run=True)")
    proc = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stderr
    assert "to start" in proc.stdout


def test_run_folder_reads_old_records_and_refuses_truncated_ones(tmp_path):
    run = RunFolder(tmp_path / "0123456789ab")
    run.path.mkdir()
    run.result_path.write_text(json.dumps({"run_id": run.run_id, "final": {"top1": 51.5}}))  # format 0: no field
    rec = run.read_result()
    assert rec.format == 0 and rec.top1("last") == 51.5 and run.status() == "done"
    run.write_result({"run_id": run.run_id, "final": {"top1": 52.0}})
    assert json.loads(run.result_path.read_text())["format"] == RESULT_FORMAT == 1
    run.result_path.write_text(run.result_path.read_text()[:20])  # truncated
    from ipsd.errors import RecordError

    with pytest.raises(RecordError, match=r"result\.json: unreadable run record.*move it aside"):
        run.status()


def test_light_commands_do_not_import_torch():
    proc = subprocess.run([sys.executable, "-c", "import sys; from ipsd.cli import main; main(['teacher', 'list']); "
                           "sys.exit('torch' in sys.modules)"], cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout + proc.stderr
