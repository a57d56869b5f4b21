"""`ipsd demo` (what `make demo` runs) works on a machine with no dataset at all, and says so."""
from ipsd.cli import main


def test_demo_falls_back_to_bundled_digits(tmp_path, monkeypatch, capsys):
    monkeypatch.delenv("IPSD_DATA", raising=False)
    assert main(["demo", "--out", str(tmp_path), "epochs=1", "per_class=10", "test_per_class=5", "progress=false"]) == 0
    out, err = capsys.readouterr()
    assert "no CIFAR-10 found" in err and "digits" in err
    rows = [line.split()[0] for line in out.splitlines()[2:]]
    assert rows == ["hard", "ips"]
    assert len(list(tmp_path.glob("*/result.json"))) == 2


def test_demo_uses_cifar10_when_given(cifar10_root, tmp_path, capsys):
    assert main(["demo", "--data", str(cifar10_root), "--out", str(tmp_path), "epochs=1", "per_class=10",
                 "test_per_class=5", "progress=false"]) == 0
    out, err = capsys.readouterr()
    assert "CIFAR-10 subset" in err
    assert [line.split()[0] for line in out.splitlines()[2:]] == ["hard", "ips"]
