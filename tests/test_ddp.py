"""DDP: the two-view IPS step gives the single-process gradient, and torchrun trains end to end."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from helpers import free_port, gloo_group, make_setup, make_step, spawn_two
from torch import nn

from ipsd.engine import Task, wrap_ddp
from ipsd.method import Batch
from ipsd.resolve import load_methods


class Probe(nn.Module):
    """BN-free model, so that per-rank batches give exactly the full-batch mean gradient."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.fc = nn.Linear(4, 5)

    def forward(self, x, features=False):
        return self.fc(self.conv(x).relu().mean((2, 3)))


def make_task():
    ips = load_methods().get("ips")
    setup = make_setup(batch_size=8)
    cfg = ips.resolve_config("resnet18", {"pr_schedule": "constant", "p_r": 0.0})
    return Task(Probe(), ips(cfg, setup))


def full_batch():
    g = torch.Generator().manual_seed(3)
    return Batch(x=torch.randn(8, 3, 32, 32, generator=g), y=torch.arange(8) % 5, index=torch.arange(8),
                 partner=torch.randn(8, 3, 32, 32, generator=g), partner_index=torch.arange(8))


def half(b, r):
    s = slice(4 * r, 4 * r + 4)
    return Batch(x=b.x[s], y=b.y[s], index=b.index[s], partner=b.partner[s], partner_index=b.partner_index[s])


def _worker(rank, port, out):
    with gloo_group(rank, port):
        task = wrap_ddp(make_task(), torch.device("cpu"))
        losses = task(half(full_batch(), rank), make_step(seed=rank))
        sum(losses.values()).backward()
        torch.save([p.grad for p in task.module.model.parameters()], f"{out}/grad{rank}.pt")


def test_two_view_step_under_ddp_matches_single_process(tmp_path):
    spawn_two(_worker, str(tmp_path))
    task = make_task()
    losses = task(full_batch(), make_step())
    sum(losses.values()).backward()
    ref = [p.grad for p in task.model.parameters()]
    g0, g1 = (torch.load(tmp_path / f"grad{r}.pt") for r in (0, 1))
    for a, b, r in zip(g0, g1, ref):
        assert torch.equal(a, b)  # DDP averaged the gradients: identical on both ranks
        torch.testing.assert_close(a, r, rtol=1e-4, atol=1e-5)  # ... and the full-batch gradient (fp32 sum order)


def test_torchrun_two_processes_end_to_end(tmp_path):
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, "--standalone", "--nproc_per_node=2", "-m", "ipsd", "train", "dataset=digits", "model=resnet8",
           "method=ips", "epochs=3", "batch_size=32", "device=cpu", "progress=false", f"out={tmp_path}"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    folders = [p for p in tmp_path.iterdir() if p.is_dir() and p.name != ".locks"]
    assert len(folders) == 1
    result = json.loads((folders[0] / "result.json").read_text())
    assert result["hardware"]["world_size"] == 2
    assert result["images_per_step"] == 64  # 32 pairs across both ranks
    assert result["final"]["top1"] > 30  # 10 classes: chance is 10%
    assert len((folders[0] / "log.jsonl").read_text().splitlines()) == 3


def _torchrun(args: list[str], out: Path, extra: list[str] = ()) -> subprocess.Popen:
    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or "torchrun"
    cmd = [torchrun, *args, "-m", "ipsd", "train", "dataset=digits", "model=resnet8", "method=ips", "epochs=1",
           "batch_size=32", "device=cpu", "progress=false", f"out={out}", *extra]
    return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env={**os.environ, "OMP_NUM_THREADS": "1"})


def _two_nodes(outs: tuple[Path, Path], extra: list[str] = ()) -> list[tuple[int, str]]:
    """Two torchrun 'nodes' of one process each, meeting at a c10d rendezvous on localhost."""
    port = free_port()
    procs = [_torchrun(["--nnodes=2", f"--node_rank={n}", "--nproc_per_node=1", "--rdzv-backend=c10d",
                        f"--rdzv-endpoint=127.0.0.1:{port}", "--rdzv-id=multinode-test"], outs[n], extra)
             for n in range(2)]
    errors = [p.communicate(timeout=600)[1] for p in procs]
    return [(p.returncode, err) for p, err in zip(procs, errors)]


def test_two_nodes_train_exactly_like_one_node_with_two_processes(tmp_path):
    shared = tmp_path / "shared"
    for code, err in _two_nodes((shared, shared)):
        assert code == 0, err[-3000:]
    single = _torchrun(["--standalone", "--nproc_per_node=2"], tmp_path / "single")
    err = single.communicate(timeout=600)[1]
    assert single.returncode == 0, err[-3000:]
    (a,), (b,) = ([p for p in (tmp_path / d).iterdir() if p.is_dir() and p.name != ".locks"] for d in ("shared", "single"))
    assert a.name == b.name  # same identity: the launch layout is operational
    ra, rb = (json.loads((f / "result.json").read_text()) for f in (a, b))
    assert ra["hardware"]["world_size"] == rb["hardware"]["world_size"] == 2
    assert [r["top1"] for r in ra["curve"]] == [r["top1"] for r in rb["curve"]]  # same ranks, same batches, same math
    wa, wb = (torch.load(f / "checkpoint.pt", weights_only=False)["model"] for f in (a, b))
    assert all(torch.equal(wa[k], wb[k]) for k in wa)


def test_nodes_that_see_different_run_folders_stop_with_a_clear_error(tmp_path):
    outs = (tmp_path / "node0", tmp_path / "node1")  # as if `out` were a node-local disk
    for code, err in _two_nodes(outs):
        assert code == 0, err[-3000:]  # first launch: both folders empty, the ranks agree
    results = _two_nodes(outs)  # node 0 now holds the finished run, node 1 does not
    for code, err in results:
        assert code != 0 and "must be on a filesystem shared by every node" in err, err[-3000:]
