"""Time budgets on the real checkpoint, on the wall clock: each fast defense given ``--budget`` seconds on the
SmallVGG BadNets checkpoint with 2,500 clean CIFAR-10 images; when it raises TimeBudgetError, the advice it gave
is followed once. Prints one JSON line per call (wall seconds, wall/budget, status, schedule or the error).

    OMP_NUM_THREADS=2 python benchmarks/budget_real.py --defenses sau awm baerase bcu ibau --budget 20
    OMP_NUM_THREADS=2 python benchmarks/budget_real.py --budget 0.01

The budget logic is tested on a deterministic clock (tests/test_time_budget.py); this measures real time.
"""

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the repository, when fastpurify is not installed
import fastpurify  # noqa: E402
from fastpurify.data import load_cifar10  # noqa: E402
from fastpurify.models import load_checkpoint  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def _call(name, model, data, budget, kw):
    t0 = time.perf_counter()
    try:
        r = getattr(fastpurify, name)(model, data, time_budget=budget, progress=False, **kw)
        out = {"status": r.status, "schedule": r.schedule}
    except fastpurify.TimeBudgetError as e:
        out = {"error": str(e), "advice": float(str(e).split("give at least ")[1].split(" s")[0])}
    out["wall_s"] = round(time.perf_counter() - t0, 2)
    out["ratio"] = round(out["wall_s"] / budget, 3)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--defenses", nargs="+", default=list(fastpurify.DEFENSES))
    ap.add_argument("--budget", type=float, default=20.0)
    ap.add_argument("--data", default=str(DATA))
    args = ap.parse_args()
    model = load_checkpoint(Path(args.data) / "ibau" / "badnets_8_02_ckpt.pth", arch="small_vgg")
    x, y = load_cifar10(args.data, split="train", count=2500)
    print(json.dumps({"threads": torch.get_num_threads(), "torch": torch.__version__}))
    for name in args.defenses:
        data = x if name == "bcu" else (x, y)
        kw = {"target": 8} if name == "baerase" else {}
        out = _call(name, model, data, args.budget, kw)
        print(json.dumps({"defense": name, "budget": args.budget, **out}, default=str), flush=True)
        if "advice" in out:
            again = _call(name, model, data, out["advice"], kw)
            print(json.dumps({"defense": name, "budget": out["advice"], "followed_advice": True, **again},
                             default=str), flush=True)


if __name__ == "__main__":
    main()
