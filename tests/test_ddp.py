"""DDP: the two-view IPS step gives the single-process gradient, and torchrun trains end to end."""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import torch
from helpers import gloo_group, make_setup, make_step, spawn_two
from torch import nn

from ipsd.engine import Task, wrap_ddp
from ipsd.method import Batch, load_methods


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
    folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert len(folders) == 1
    result = json.loads((folders[0] / "result.json").read_text())
    assert result["hardware"]["world_size"] == 2
    assert result["images_per_step"] == 64  # 32 pairs across both ranks
    assert result["final"]["top1"] > 30  # 10 classes: chance is 10%
    assert len((folders[0] / "log.jsonl").read_text().splitlines()) == 3
