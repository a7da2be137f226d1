"""One rank of the data-parallel tests (tests/test_distributed.py), launched by ``torch.distributed.run``.

    python -m torch.distributed.run --nproc-per-node 2 tests/_dist_worker.py DEFENSE SETTINGS_JSON OUT [--die-at N]

Builds the tiny test model and synthetic clean set (seeded: every rank and the test's one-process run build the
same), joins the gloo group from torchrun's environment, runs the fast path and, on rank 0, saves the purified
state dict, the history and the status to OUT (a .pt file). ``--die-at N``: rank 1 exits hard (``os._exit``) at
the N-th reading of the loop's clock, mid-run, as a crashed rank would.
"""

import json
import os
import sys
import time
from datetime import timedelta

import torch
import torch.distributed as dist

sys.path.insert(0, os.path.dirname(__file__))

from _tiny import tiny_cnn  # noqa: E402

import fastpurify  # noqa: E402


def problem(defense: str, n: int):
    """The model and clean data every rank (and the one-process run) uses."""
    from fastpurify.data import synthetic_dataset

    x, y = synthetic_dataset(n=n, seed=3)
    net = tiny_cnn(16, seed=0).eval()
    return net, (x if defense == "bcu" else (x, y))


def main() -> None:
    defense, settings, out = sys.argv[1], json.loads(sys.argv[2]), sys.argv[3]
    die_at = int(sys.argv[sys.argv.index("--die-at") + 1]) if "--die-at" in sys.argv else None
    torch.set_num_threads(1)
    dist.init_process_group("gloo", timeout=timedelta(seconds=float(os.environ.get("TEST_PG_TIMEOUT", "60"))))
    rank = dist.get_rank()
    n = settings.pop("n")
    net, data = problem(defense, n)
    clock = None
    if die_at is not None and rank == 1:
        calls = [0]

        def clock() -> float:
            calls[0] += 1
            if calls[0] >= die_at:
                os._exit(3)
            return time.perf_counter()

    try:
        r = getattr(fastpurify, defense)(net, data, progress=False, seed=0, clock=clock, **settings)
    except Exception as e:  # what a surviving rank reports
        print(f"RANK{rank} ERROR {type(e).__name__}: {e}", flush=True)
        raise SystemExit(7) from e
    if rank == 0:
        torch.save({"state": r.model.state_dict(), "history": r.history, "status": r.status}, out)
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
