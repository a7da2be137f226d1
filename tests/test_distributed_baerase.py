"""BAERASE data-parallel (gloo, 2 CPU processes): the same result as one process on the same global batch.

Each case launches ``tests/_dist_worker.py`` as two processes (torchrun) and compares rank 0's purified weights, the
per-round history (losses, flip rate) with a one-process run in this process. What had to become global
(fastpurify/defenses/baerase.py): the per-image draws (z, z', noise: drawn for the global batch on every rank, then
sliced), the generators' BatchNorm statistics (the loop's class-level BatchNorm sync: G's K×H channels over the
global batch), the hinge and MINE's Donsker-Varadhan bound and moving average (global means through one
differentiable all-reduce, each rank's loss 1/world of the global loss), the flip counts, and the unlearning loss
(rows' sums over the global count, the L1 anchor once, on rank 0).
"""

import json
import sys
from pathlib import Path

import pytest
import torch

sys.path.insert(0, str(Path(__file__).parent))
from test_distributed import WORKER, _one_process, _torchrun, _worst  # noqa: E402

SMALL = dict(n=64, epochs=2, recovery_epochs=1, hidden_size=32, noise_dim=8)
CASES = {
    # a target given, both rounds run (no early stop), every batch split evenly over the 2 ranks
    "target_even": dict(SMALL, batch_size=32, target=0, stop_rate=None),
    # batches of 31, 31 and 2: split 16/15 and 1/1
    "target_uneven": dict(SMALL, batch_size=31, target=0, stop_rate=None),
    # detection (K = 10 generators, the target chosen from the global flip rates), the published early stop
    "detect": dict(SMALL, batch_size=32, target=None),
}

pytestmark = pytest.mark.skipif(not torch.distributed.is_available() or not torch.distributed.is_gloo_available(),
                                reason="torch.distributed with gloo is not available in this build")


@pytest.mark.slow
@pytest.mark.parametrize("case", sorted(CASES))
def test_two_processes_equal_one(case, tmp_path):
    settings = CASES[case]
    out = tmp_path / "rank0.pt"
    p = _torchrun([WORKER, "baerase", json.dumps(settings), str(out)])
    assert p.returncode == 0, p.stdout[-3000:] + p.stderr[-3000:]
    got = torch.load(out, weights_only=True)
    ref = _one_process("baerase", settings)
    assert got["status"] == "completed"
    assert _worst(ref.model.state_dict(), got["state"]) < 1e-4
    assert len(got["history"]) == len(ref.history)
    for a, b in zip(got["history"], ref.history):
        for k in ("loss", "clean_ce", "patch_ce", "patch_flip_rate"):
            assert a[k] == pytest.approx(b[k], rel=1e-4, abs=1e-6), (k, a, b)
