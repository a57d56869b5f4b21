"""A new method from the user's own code (a plugin), in a table that extends the paper's, reported beside it."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.grid import expand, load_table
from benchmarks.report import report
from benchmarks.sweep import sweep
from ipsd.config import load_run_config
from ipsd.method import METHODS
from ipsd.resolve import resolve

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def forget_pskd():
    """Each test imports its own copy of the plugin; the registry forgets the method afterwards."""
    yield
    if "pskd" in METHODS:
        METHODS.unregister("pskd")
EXAMPLE = ROOT / "benchmarks" / "examples" / "pskd.py"
DIGITS = ["dataset=digits", "model=resnet8", "per_class=12", "test_per_class=10", "batch_size=24", "epochs=1",
          "progress=false"]


def test_plugin_method_joins_an_extended_table3_and_is_reported_beside_the_parent_rows(cifar10_root, tmp_path):
    plugin = tmp_path / "mine" / "pskd.py"  # the user's repository, outside the suite's packages
    plugin.parent.mkdir()
    shutil.copy(EXAMPLE, plugin)
    table = tmp_path / "mine" / "table3_pskd.yaml"
    table.write_text(f"""
extends: {ROOT / 'benchmarks' / 'table3.yaml'}
name: table3_pskd
base: {{plugins: [{plugin}]}}
rows:
  PS-KD: {{method: pskd}}
profiles:
  smoke: {{seeds: 1, rows: [Hard Label, IPS (4x4), PS-KD]}}
""")
    over = [f"data_root={cifar10_root}", f"out={tmp_path / 'runs'}"]
    runs = sweep(str(table), "smoke", "local", over)
    assert [r.row for r in runs] == ["Hard Label", "IPS (4x4)", "PS-KD"] and all(r.run.status() == "done" for r in runs)
    # the parent's rows are the parent's runs: the same identity, trained once
    parent = {r.row: r.run_id for r in expand(load_table(ROOT / "benchmarks" / "table3.yaml", "smoke", over))
              if r.replicate == 0}
    assert {r.row: r.run_id for r in runs if r.row != "PS-KD"} == {k: parent[k] for k in ("Hard Label", "IPS (4x4)")}
    pskd = next(r for r in runs if r.row == "PS-KD")
    assert pskd.cfg.plugin_ids and pskd.cfg.plugin_ids[0].startswith("pskd@sha256:")
    text = report(str(table), "smoke", over)
    rows = {line.split("|")[1].strip(): line for line in text.splitlines() if line.startswith("| ")}
    assert "(paper 77.92" in rows["Hard Label"] and "(paper –)" in rows["PS-KD"]


def test_plugin_identity_follows_its_source(tmp_path):
    plugin = tmp_path / "pskd_copy.py"
    shutil.copy(EXAMPLE, plugin)
    args = [*DIGITS, "method=pskd", f"plugins=[{plugin}]"]
    before = resolve(load_run_config(None, args))
    plugin.write_text(plugin.read_text() + "\n# a change to the method's code\n")
    after = resolve(load_run_config(None, args))
    assert before.run_id != after.run_id and before.cfg.plugin_ids != after.cfg.plugin_ids
    # the plugin's path is operational: the same source elsewhere is the same run
    moved = tmp_path / "elsewhere" / "pskd_copy.py"
    moved.parent.mkdir()
    shutil.copy(plugin, moved)
    assert resolve(load_run_config(None, [*DIGITS, "method=pskd", f"plugins=[{moved}]"])).run_id == after.run_id


def test_a_table_without_paper_renders_and_a_missing_plugin_is_one_error_line(tmp_path):
    table = tmp_path / "own.yaml"
    table.write_text(f"""
name: own
seeds: 1
base: {{{', '.join(a.replace('=', ': ') for a in DIGITS)}, out: {tmp_path / 'runs'}}}
rows: {{Hard Label: {{method: hard}}, Mine: {{method: ls}}}}
columns: {{Tiny: {{model: resnet8}}}}
""")
    text = report(str(table))
    assert "| Hard Label" in text and "paper" not in text.split("#### Differences")[0].split("\n", 2)[2]
    proc = subprocess.run([sys.executable, "-m", "ipsd", "train", *DIGITS, "method=hard", "plugins=[nowhere.py]"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "ipsd: error: plugins: 'nowhere.py' does not exist" in proc.stderr
    broken = tmp_path / "broken.py"
    broken.write_text("raise RuntimeError('my bug')\n")
    proc = subprocess.run([sys.executable, "-m", "ipsd", "train", *DIGITS, "method=hard", f"plugins=[{broken}]"],
                          cwd=ROOT, capture_output=True, text=True)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr and "RuntimeError: my bug" in proc.stderr


def test_plugin_method_gets_its_regression_golden_in_the_users_folder(cifar10_root, tmp_path):
    """`ipsd regress --plugins FILE --goldens DIR --update`, then the gate: no ipsd file is written or edited."""
    from ipsd.errors import ConfigError
    from ipsd.regress import GOLDEN_DIR, GateFailed, main

    plugin = tmp_path / "mine" / "pskd.py"
    plugin.parent.mkdir()
    shutil.copy(EXAMPLE, plugin)
    goldens = tmp_path / "mine" / "regress"
    ours_before = sorted(p.name for p in GOLDEN_DIR.iterdir())
    with pytest.raises(ConfigError, match="give --goldens DIR"):
        main(None, str(cifar10_root), True, (str(plugin),))
    main(["pskd"], str(cifar10_root), True, (str(plugin),), goldens)
    golden = json.loads((goldens / "pskd.json").read_text())
    assert golden["entry"] == "pskd" and golden["plugin_ids"][0].startswith("pskd@sha256:")
    assert sorted(p.name for p in GOLDEN_DIR.iterdir()) == ours_before
    main(None, str(cifar10_root), False, (str(plugin),), goldens)  # the same code: within tolerance
    # a behaviour change in the user's method (alpha_T 0.8 -> 0.5; PS-KD's targets move from step 2 on) fails it
    plugin.write_text(plugin.read_text().replace("param(0.8,", "param(0.5,"))  # the edited file runs, not the old
    with pytest.raises(GateFailed, match=r"pskd \("):
        main(None, str(cifar10_root), False, (str(plugin),), goldens)


def test_plugin_method_has_its_line_in_the_bench(tmp_path, capsys):
    from benchmarks.bench import run_bench
    from ipsd.errors import ConfigError

    plugin = tmp_path / "pskd.py"
    shutil.copy(EXAMPLE, plugin)
    with pytest.raises(ConfigError, match="bench --methods: unknown method 'nosuch'"):
        run_bench(quick=True, plugins=(str(plugin),), methods=["nosuch"])
    out = run_bench(quick=True, plugins=(str(plugin),), methods=["hard", "pskd"])
    assert set(out["methods"]) == {"hard", "pskd"}
    assert out["methods"]["pskd"]["images_per_step"] == 64  # one view per anchor, as declared by its needs
    table = capsys.readouterr().out.split("per method at batch 64")[1]
    assert any(line.startswith("pskd ") for line in table.splitlines())
