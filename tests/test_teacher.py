"""Teachers are verified before any training: checksum, data, recorded accuracy; and recorded in the result."""
import json
import shutil

import pytest
import yaml

from ipsd import teacher_registry as teacher_mod
from ipsd.config import ConfigError, load_run_config
from ipsd.engine import train
from ipsd.resolve import resolve

DATA = ["dataset=digits", "model=resnet8", "per_class=10", "test_per_class=5", "batch_size=20", "progress=false"]


@pytest.fixture(scope="module")
def teacher_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("teachers")
    return train(load_run_config(None, [*DATA, "method=hard", "epochs=1", f"out={out}"]))


def student(tmp_path, teacher, *extra):
    return load_run_config(None, [*DATA, "method=kd", "epochs=1", f"out={tmp_path}", f"teacher={teacher}", *extra])


def test_student_records_its_verified_teacher(tmp_path, teacher_dir):
    folder = train(student(tmp_path, teacher_dir))
    info = json.loads((folder / "result.json").read_text())["teacher"]
    recorded = json.loads((teacher_dir / "result.json").read_text())["final"]["top1"]
    assert info["sha256"] == teacher_mod.sha256_file(teacher_dir / "checkpoint.pt")
    assert abs(info["measured_top1"] - recorded) < 1e-6  # same CPU, same data: the same predictions
    assert resolve(student(tmp_path, teacher_dir)).cfg.teacher_id == f"run:{teacher_dir.name}"


def test_identity_follows_the_teacher_not_its_location(tmp_path, teacher_dir):
    a = resolve(student(tmp_path, teacher_dir)).run_id
    b = resolve(student(tmp_path, teacher_dir / "checkpoint.pt")).run_id
    assert a == b


def test_wrong_recorded_accuracy_stops_before_training(tmp_path, teacher_dir):
    bad = tmp_path / "t" / teacher_dir.name
    shutil.copytree(teacher_dir, bad)
    result = json.loads((bad / "result.json").read_text())
    result["final"]["top1"] += 5
    (bad / "result.json").write_text(json.dumps(result))
    with pytest.raises(ConfigError, match="re-measured test top-1 .* differs from the recorded"):
        train(student(tmp_path / "s", bad))
    assert not list((tmp_path / "s").rglob("checkpoint.pt"))


def test_registered_checksum_mismatch_is_refused(tmp_path, teacher_dir, monkeypatch):
    registry = tmp_path / "teachers.yaml"
    registry.write_text(yaml.safe_dump({"t0": {"run": str(teacher_dir), "sha256": "0" * 64, "top1": 50.0}}))
    monkeypatch.setattr(teacher_mod, "REGISTRY", registry)
    with pytest.raises(ConfigError, match="sha256"):
        train(student(tmp_path / "s", "t0"))
    entry = teacher_mod.register("t1", teacher_dir, registry)
    assert entry["sha256"] == teacher_mod.sha256_file(teacher_dir / "checkpoint.pt")
    folder = train(student(tmp_path / "s", "t1"))
    assert json.loads((folder / "result.json").read_text())["teacher"]["name"] == "t1"


def test_teacher_from_other_data_is_refused(tmp_path, teacher_dir):
    with pytest.raises(ConfigError, match="test_per_class"):
        train(student(tmp_path, teacher_dir, "test_per_class=4"))


def test_teacher_key_must_match_the_method(tmp_path, teacher_dir):
    with pytest.raises(ConfigError, match="needs a teacher"):
        resolve(load_run_config(None, [*DATA, "method=kd"]))
    with pytest.raises(ConfigError, match="takes no teacher"):
        resolve(load_run_config(None, [*DATA, "method=hard", f"teacher={teacher_dir}"]))
    with pytest.raises(ConfigError, match="registered .* but not trained yet"):
        resolve(load_run_config(None, [*DATA, "method=kd", "teacher=resnet50-cifar100-s0"]))
