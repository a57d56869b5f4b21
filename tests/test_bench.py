"""`ipsd bench` runs end to end and reports every figure it promises (values are measured, not asserted)."""
import json
import math

from ipsd.cli import main
from ipsd.resolve import load_methods


def test_bench_json_has_every_figure(tmp_path, capsys):
    path = tmp_path / "bench.json"
    assert main(["bench", "--quick", "--json", str(path), "--device", "cpu"]) == 0
    out = json.loads(path.read_text())
    for key in ("swap_speedup_vs_loop", "loader_speedup_vs_torchvision", "ips_step_over_hard_step",
                "swap_fraction_of_ips_step", "engine_over_minimal", "engine_over_minimal_median"):
        assert math.isfinite(out[key]) and out[key] > 0, key
    methods = set(load_methods().names())
    printed = capsys.readouterr().out
    for m in methods:
        assert f"\n{m} " in printed, m
    assert out["methods"]["hard"]["step_time_vs_hard"] == 1.0
    assert "engine / minimal loop" in printed
    assert out["methods"]["ips"]["images_per_step"] == 2 * out["methods"]["hard"]["images_per_step"]


def test_predicted_cost_comes_from_each_methods_needs_and_teacher():
    """The bench's predicted-cost column is derived from what a method declares, not from a table of names."""
    methods = load_methods()
    cost = {name: methods.get(name).predicted_cost(methods.get(name).resolve_config("resnet8", {}))
            for name in ("hard", "ips", "dlb", "kd", "vrm", "cskd")}
    assert cost["hard"] == "B fwd+bwd"
    assert cost["ips"] == cost["dlb"] == "2B fwd+bwd"
    assert cost["kd"] == "B fwd+bwd + B teacher fwd"
    assert cost["vrm"] == "2B fwd+bwd + 2B teacher fwd"
    assert cost["cskd"].startswith("2B fwd+bwd + ") and "without grad" in cost["cskd"]


def test_file_loader_bench_reports_both_loaders(ffcv_installed, tmp_path, capsys):
    path = tmp_path / "loaders.json"
    assert main(["bench", "--file-loaders", "--images", "20", "--workers", "1", "--json", str(path)]) == 0
    out = json.loads(path.read_text())
    for kind in ("plain", "pairs (IPS)"):
        for key in ("folder_decode", "ffcv_decode", "folder_batches", "ffcv_batches", "ffcv_over_folder_decode",
                    "ffcv_over_folder_batches"):
            assert math.isfinite(out[kind][key]) and out[kind][key] > 0, (kind, key)
    assert out["images"] == 20 and out["train_beton_mb"] > 0
    assert "ffcv img/s" in capsys.readouterr().out
