"""Data-parallel defenses on torch.distributed (gloo, 2 CPU processes): the same result as one process on the same
global batch, a dead rank fails the others with a clear error instead of a hang, and the CLI under torchrun.

Each case launches ``tests/_dist_worker.py`` as two processes (torchrun, or plain processes with the
``env://`` variables for the rank-failure case) and compares rank 0's purified weights with a one-process run in
this process. Tolerances: measured differences were 5e-7 .. 2.6e-6 relative (the all-reduced sums round
differently from one process's sums); the bound is 1e-4. Adam turns a rounding difference in a near-zero gradient
into a full ±lr step, so the settings keep every batch split evenly for SAU (measured: an uneven split moved
near-zero BatchNorm biases by 0.4 relative after 2 epochs while the loss agreed to 6e-5).
"""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import fastpurify

sys.path.insert(0, str(Path(__file__).parent))
from _dist_worker import problem  # noqa: E402

WORKER = str(Path(__file__).parent / "_dist_worker.py")

# Small runs with a ragged last batch (I-BAU, AWM, BCU: an uneven split across the two ranks as well).
CASES = {
    "ibau": dict(n=93, epochs=2, batch_size=31, outer_portion=0.5),
    "awm": dict(n=64, epochs=2, batch_size=31, inner=1),
    "bcu": dict(n=64, epochs=2, batch_size=31),
    "sau": dict(n=64, epochs=1, batch_size=32, pgd_init="random"),
}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env():
    env = dict(os.environ, OMP_NUM_THREADS="1", TEST_PG_TIMEOUT="60")
    env["PYTHONPATH"] = os.pathsep.join([str(Path(__file__).parent.parent), env.get("PYTHONPATH", "")])
    return env


def _torchrun(args, timeout=600):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
           "--master-port", str(_port())] + args
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=_env())


def _one_process(defense, settings):
    settings = dict(settings)
    net, data = problem(defense, settings.pop("n"))
    return getattr(fastpurify, defense)(net, data, progress=False, seed=0, **settings)


def _worst(a, b):
    """The relative difference of two state dicts over all their floating tensors (‖a − b‖ / ‖a‖)."""
    num = den = 0.0
    for k, v in a.items():
        if v.is_floating_point():
            num += float(((v - b[k]).double() ** 2).sum())
            den += float((v.double() ** 2).sum())
    return (num / max(den, 1e-30)) ** 0.5


@pytest.mark.slow
@pytest.mark.parametrize("defense", sorted(CASES))
def test_two_processes_equal_one(defense, tmp_path):
    out = tmp_path / "rank0.pt"
    p = _torchrun([WORKER, defense, json.dumps(CASES[defense]), str(out)])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    ref = _one_process(defense, CASES[defense])
    assert got["status"] == "completed"
    assert _worst(ref.model.state_dict(), got["state"]) < 1e-4
    # the per-round losses: the ranks' mean (an even split is exact; a ragged one differs by the rows' weights)
    assert len(got["history"]) == len(ref.history)
    assert got["history"][-1]["loss"] == pytest.approx(ref.history[-1]["loss"], rel=1e-3)


@pytest.mark.slow
def test_a_dead_rank_fails_the_others(tmp_path):
    """Rank 1 exits hard mid-run (its 40th clock reading); rank 0 must stop with DistributedError, not hang (the
    test's own timeout is the bound: gloo reports the closed connection at once, the group timeout is 60 s)."""
    port = _port()
    procs = []
    for rank in (0, 1):
        env = dict(_env(), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                   LOCAL_RANK=str(rank))
        procs.append(subprocess.Popen([sys.executable, WORKER, "ibau", json.dumps(dict(n=96, epochs=50, batch_size=32)),
                                       str(tmp_path / "x.pt"), "--die-at", "40"], env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, text=True))
    outs = [p.communicate(timeout=240)[0] for p in procs]
    assert procs[1].returncode == 3, outs[1][-2000:]
    assert procs[0].returncode == 7, outs[0][-2000:]
    assert "RANK0 ERROR DistributedError" in outs[0] and "another rank died" in outs[0]
    assert not (tmp_path / "x.pt").exists()


def test_references_refuse_to_run_distributed(monkeypatch):
    """Inside a process group of 2 (faked: the checks run before any collective), the references say what to do
    before any work, and a bad ``distributed`` value is refused."""
    import torch.distributed as dist

    from fastpurify.reference.defenses.ibau import ibau as ref_ibau

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda group=None: 2)
    monkeypatch.setattr(dist, "get_rank", lambda group=None: 1)
    monkeypatch.setattr(dist, "get_backend", lambda group=None: "gloo")
    net, (x, y) = problem("ibau", 8)
    with pytest.raises(ValueError, match="reference implementation runs in one process"):
        ref_ibau(net, (x, y), progress=False)
    with pytest.raises(TypeError, match="distributed must be"):
        fastpurify.ibau(net, (x, y), progress=False, distributed="yes")
    monkeypatch.setattr(dist, "is_initialized", lambda: False)
    with pytest.raises(RuntimeError, match="distributed=True but"):
        fastpurify.ibau(net, (x, y), progress=False, distributed=True)


@pytest.mark.slow
def test_cli_under_torchrun_equals_one_process(tmp_path):
    """``torchrun --nproc-per-node 2 -m fastpurify purify ibau ...``: rank 0 alone prints and saves, and the saved
    model is the one-process command's (same seed, same global batches)."""
    from test_cli import _fake_cifar

    from fastpurify.models import SmallVGG

    torch.manual_seed(0)
    ckpt = tmp_path / "vgg.pth"
    torch.save({"net": SmallVGG().state_dict()}, ckpt)
    data = _fake_cifar(tmp_path / "data")
    args = ["purify", "ibau", "--checkpoint", str(ckpt), "--data", str(data), "--trigger",
            "patch:size=3,row=29,col=29,value=1", "--target", "0", "--clean-count", "64", "--eval-count", "32",
            "--set", "batch_size=32", "--epochs", "1", "--device", "cpu", "--json"]
    p = _torchrun(["-m", "fastpurify", *args, "--out", str(tmp_path / "dp.pth")])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    lines = [ln for ln in p.stdout.splitlines() if ln.startswith("{")]
    assert len(lines) == 1, p.stdout  # rank 0 alone prints
    out = json.loads(lines[0])
    assert out["status"] == "completed" and out["rounds"] == 1
    one = subprocess.run([sys.executable, "-m", "fastpurify", *args, "--out", str(tmp_path / "one.pth")],
                         capture_output=True, text=True, timeout=600, env=_env())
    assert one.returncode == 0, one.stderr[-3000:]
    a = torch.load(tmp_path / "dp.pth", weights_only=True)["model"]
    b = torch.load(tmp_path / "one.pth", weights_only=True)["model"]
    assert _worst(b, a) < 1e-4
