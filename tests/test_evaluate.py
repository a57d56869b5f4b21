"""`ipsd evaluate` on a tiny finished run (scikit-learn digits: no data folder needed): each suite's eval/<suite>.json
is written atomically with its settings, a finished evaluation is not redone, the attack at eps = 0 is the run's own
recorded test accuracy, corrupted subsets are the rows of the whole corrupted test set, and sweeps evaluate what a
table's `evaluate:` asks for."""
from __future__ import annotations

import json
import math
import os

import numpy as np
import pytest

import ipsd.evaluation.run as ev
from benchmarks.sweep import sweep
from ipsd.cli import main
from ipsd.config import ConfigError, load_run_config
from ipsd.engine import load_data, train
from ipsd.evaluation.corruptions import corrupt, to_nhwc
from ipsd.evaluation.run import EvalSettings, _corrupted, _test_indices, evaluate_run
from ipsd.runs import RunFolder

TINY = ["method=hard", "model=resnet8", "dataset=digits", "per_class=10", "test_per_class=5", "epochs=1",
        "batch_size=20", "progress=false", "threads=1"]
FAST_ATTACK = EvalSettings(eps=(0.0, 0.01), steps=2)
ONE_CORRUPTION = EvalSettings(corruptions=("brightness", "contrast"), severities=(1, 3))


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    return RunFolder(train(load_run_config(None, [*TINY, f"out={tmp_path_factory.mktemp('eval')}"])))


@pytest.fixture
def run(finished, tmp_path):
    """A private copy of the finished run (tests write eval/ into it)."""
    import shutil

    copy = tmp_path / finished.run_id
    shutil.copytree(finished.path, copy)
    return RunFolder(copy)


def test_attack_at_eps_zero_is_the_recorded_clean_accuracy_and_a_second_evaluate_is_a_no_op(run, monkeypatch):
    rec, computed = evaluate_run(run, "attack", FAST_ATTACK, device="cpu")
    recorded = run.read_result().top1("last")  # the engine's own evaluation at the last epoch
    assert computed and rec.path == run.path / "eval" / "attack.json"
    assert rec.metric("FGSM_eps0_acc_%") == rec.metric("IFGSM_eps0_acc_%") == recorded
    assert set(rec.metrics) == {"FGSM_eps0_acc_%", "FGSM_eps0.01_acc_%", "IFGSM_eps0_acc_%", "IFGSM_eps0.01_acc_%"}
    s = rec.settings
    assert (s["eps"], s["ifgsm_steps"], s["ifgsm_step_size"], s["n"], s["precision"]) == \
        ([0.0, 0.01], 2, "eps/steps", 50, "fp32")
    stamp = rec.path.stat().st_mtime_ns

    def no_model(*args, **kwargs):
        raise AssertionError("a finished evaluation rebuilt the model")

    monkeypatch.setattr(ev, "_model", no_model)
    again, computed = evaluate_run(run, "attack", FAST_ATTACK, device="cpu")
    assert not computed and again.data == rec.data and rec.path.stat().st_mtime_ns == stamp
    monkeypatch.undo()
    redone, computed = evaluate_run(run, "attack", FAST_ATTACK, device="cpu", force=True)
    assert computed and redone.metrics == rec.metrics  # deterministic on CPU


def test_other_settings_are_refused_without_force(run):
    evaluate_run(run, "attack", FAST_ATTACK, device="cpu")
    with pytest.raises(ConfigError, match=r"attack\.json was made with other settings \(eps .*--force"):
        evaluate_run(run, "attack", EvalSettings(eps=(0.0, 0.05), steps=2), device="cpu")


def test_safety_suite_records_its_metrics_and_settings(run):
    rec, _ = evaluate_run(run, "safety", device="cpu")
    assert math.isclose(rec.metric("accuracy_%"), run.read_result().top1("last"), abs_tol=1e-9)
    assert set(rec.metrics) == {"accuracy_%", "AURC_x1e3", "EAURC_x1e3", "FPR_x1e2", "ECE_x1e2", "Brier_x1e2", "NLL"}
    assert rec.settings["ECE_bins"] == 15 and rec.settings["TPR_level"] == 0.95 and rec.settings["dataset"] == "digits"
    assert json.loads(rec.path.read_text())["format"] == 1 and rec.suite == "safety"


def test_corruption_suite_means_and_errors(run):
    rec, _ = evaluate_run(run, "corruption", ONE_CORRUPTION, device="cpu")
    m = rec.metrics
    for name in ("brightness", "contrast"):
        mean = (m[f"acc_{name}_s1_%"] + m[f"acc_{name}_s3_%"]) / 2
        assert math.isclose(m[f"acc_{name}_%"], mean) and math.isclose(m[f"err_{name}_%"], 100 - mean)
    overall = (m["acc_brightness_%"] + m["acc_contrast_%"]) / 2
    assert math.isclose(m["acc_mean_%"], overall) and math.isclose(m["err_mean_%"], 100 - overall)
    assert rec.settings["source"] == "generated" and rec.settings["severities"] == [1, 3]


def test_a_subsets_corrupted_images_are_rows_of_the_whole_corrupted_test_set(run):
    cfg = ev._run_config(run, None)
    data = load_data(cfg)
    full_x, full_y, te = _test_indices(cfg, data)
    assert len(te) == 50 and len(full_x) > 50
    whole = corrupt(full_x, "contrast", 2)  # the whole test set, images seeded by their own index
    assert np.array_equal(_corrupted(cfg, "generated", "contrast", 2, full_x, full_y, te), whole[te])
    assert np.array_equal(full_x[te], to_nhwc(data.test_x))


def test_official_source_without_the_files_is_one_error_line(run, capsys):
    assert main(["evaluate", str(run.path), "--suite", "corruption", "--source", "official"]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("ipsd: error: source=official:"), err


def test_unfinished_runs_and_unknown_suites_are_refused(run, tmp_path):
    with pytest.raises(ConfigError, match="unknown suite 'robustness'"):
        evaluate_run(run, "robustness")
    run.result_path.rename(run.path / "result.moved")
    with pytest.raises(ConfigError, match="is not finished"):
        evaluate_run(run, "safety")
    with pytest.raises(ConfigError, match="not a run folder"):
        evaluate_run(tmp_path / "nothing", "safety")


def test_a_failed_or_interrupted_evaluation_leaves_no_file(run, monkeypatch):
    calls = []

    def interrupted(*args, **kwargs):  # the second attack (I-FGSM) is cut short
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    real = ev.attack_accuracy
    monkeypatch.setattr(ev, "attack_accuracy", interrupted)
    with pytest.raises(KeyboardInterrupt):
        evaluate_run(run, "attack", FAST_ATTACK, device="cpu")
    assert not run.eval_path("attack").exists()
    monkeypatch.undo()

    import ipsd.runs

    def failing_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(ipsd.runs.os, "replace", failing_replace)
    with pytest.raises(OSError):
        evaluate_run(run, "safety", device="cpu")
    monkeypatch.undo()
    assert not run.eval_path("safety").exists() and os.listdir(run.path / "eval") == []  # no temporary file left


def test_cli_prints_the_summary_and_the_path(run, capsys):
    assert main(["evaluate", str(run.path), "--suite", "safety", "--device", "cpu"]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("safety (evaluated): accuracy_% ") and out[1] == str(run.eval_path("safety"))
    assert main(["evaluate", str(run.path), "--suite", "safety", "--device", "cpu"]) == 0
    assert "already evaluated" in capsys.readouterr().out
    assert main(["evaluate", str(run.path), "--suite", "safety", "epochs=3"]) == 2  # the run's config is fixed


def test_sweep_evaluates_finished_runs_a_table_asks_for(tmp_path, capsys):
    path = tmp_path / "t.yaml"
    path.write_text(f"""
name: t
seeds: 1
base: {{dataset: digits, per_class: 10, test_per_class: 5, epochs: 1, batch_size: 20, out: {tmp_path / 'runs'},
        threads: 1, device: cpu}}
rows:
  Hard Label: {{method: hard}}
columns:
  ResNet8: {{model: resnet8}}
evaluate: [safety]
metrics:
  - {{label: ECE, suite: safety, key: ECE_x1e2, paper: ECE_x1e2}}
""")
    (planned,) = sweep(str(path))  # evaluated as soon as it has trained
    rec = planned.run.read_eval("safety")
    assert rec is not None and math.isclose(rec.metric("accuracy_%"), planned.run.read_result().top1("last"), abs_tol=1e-9)
    assert "evaluate [safety]: 1 evaluation(s)" not in capsys.readouterr().out  # nothing left for the passes
    planned.run.eval_path("safety").unlink()  # a run trained already (by another table): evaluated before training
    sweep(str(path))
    assert "evaluate [safety]: 1 evaluation(s) of 1 finished run(s) to do" in capsys.readouterr().out
    assert planned.run.read_eval("safety") is not None
    sweep(str(path))
    assert "evaluate [safety]: 0 evaluation(s)" in capsys.readouterr().out
    path.write_text(path.read_text().replace("evaluate: [safety]", "evaluate: [safty]"))
    with pytest.raises(ConfigError, match="evaluate: unknown suite 'safty'"):
        sweep(str(path))


def test_eval_records_are_read_through_the_run_folder(tmp_path):
    folder = RunFolder(tmp_path / "0123456789ab")
    folder.write_eval("safety", {"metrics": {"ECE_x1e2": 3.5}, "settings": {"ECE_bins": 15}})
    rec = folder.read_eval("safety")
    assert rec.metric("ECE_x1e2") == 3.5 and math.isnan(rec.metric("NLL")) and rec.settings == {"ECE_bins": 15}
    folder.eval_path("safety").write_text("{\"metr")  # truncated
    from ipsd.errors import RecordError

    with pytest.raises(RecordError, match=r"safety\.json: unreadable safety evaluation.*delete it"):
        folder.read_eval("safety")
    with pytest.raises(RecordError, match="not a plain name"):
        folder.eval_path("../x")
    assert folder.read_eval("attack") is None


def test_cli_takes_key_value_after_suite_as_an_override_and_checks_every_suite_first(run, tmp_path, capsys):
    """`--suite safety data_root=DIR` is the suite safety and an override; a typo in a later suite stops before
    the first suite runs (it would otherwise cost the suites before it)."""
    assert main(["evaluate", str(run.path), "--suite", "safety", "robustnes", f"data_root={tmp_path}"]) == 2
    assert capsys.readouterr().err.strip() == ("ipsd: error: unknown suite 'robustnes'; use one of safety, attack, "
                                               "corruption")
    assert not run.eval_path("safety").exists()
    assert main(["evaluate", str(run.path), "--suite", "safety", "seed=3"]) == 2
    assert "only data_root= may be set, not seed" in capsys.readouterr().err


def test_parallel_local_sweep_evaluates_each_run_in_its_slot(tmp_path):
    from benchmarks.sweep import LaunchOptions

    path = tmp_path / "t.yaml"
    path.write_text(f"""
name: t
seeds: 2
base: {{dataset: digits, per_class: 10, test_per_class: 5, epochs: 1, batch_size: 20, out: {tmp_path / 'runs'},
        device: cpu}}
rows:
  Hard Label: {{method: hard}}
columns:
  ResNet8: {{model: resnet8}}
evaluate: [safety]
""")
    planned = sweep(str(path), opts=LaunchOptions(jobs=2))
    for p in planned:
        rec = p.run.read_eval("safety")
        assert rec is not None and math.isclose(rec.metric("accuracy_%"), p.run.read_result().top1("last"),
                                                abs_tol=1e-9)
