"""Data-parallel scaling: each defense's fast path in 1, 2, ... processes on the same global batch (torchrun),
time per round and agreement with the one-process run (issue 16, item 6).

    python benchmarks/scaling.py                                  # CPU: 1 and 2 gloo processes, 1 thread each
    python benchmarks/scaling.py --device cuda --procs 1 2 4 8    # GPUs: NCCL, one GPU per process (gpu_suite.py)

Every cell launches ``python -m torch.distributed.run --nproc-per-node P benchmarks/scaling.py --child ...``; each
rank builds the same seeded model (PreActResNet18, 10 classes, random weights) and the same synthetic clean set,
runs the defense, and rank 0 writes its seconds per round (the defense's own time, ``result.timings["defense"]``
over the rounds; the first round is included) and the purified weights. Agreement: ‖θ_P − θ_1‖ / ‖θ_1‖ over all
floating tensors, against the one-process run of the same cell. On a CPU with 2 cores, 2 processes of 1 thread
each use the two cores one process with 1 thread leaves idle: that is the comparison (``--threads``). BAERASE
joins the table once its fast path runs data-parallel (``_run.NOT_DATA_PARALLEL``).

Writes ``scaling.json`` and ``scaling.md`` to ``--out`` (default ``benchmarks/results/<device tag>/``).
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).parent))
from _env import ROOT, environment  # noqa: E402

#: A few rounds of each defense on the synthetic clean set (global batch = the published batch size or less).
SETTINGS = {
    "ibau": dict(epochs=2, batch_size=128, K=3),
    "awm": dict(epochs=2, batch_size=128, inner=2),
    "bcu": dict(epochs=2, batch_size=128),
    "sau": dict(epochs=2, batch_size=128, pgd_steps=3),
    "baerase": dict(epochs=2, batch_size=128, recovery_epochs=1, hidden_size=256, target=0),
}


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def child(a) -> None:
    """One rank: the defense on this rank's share; rank 0 writes the result."""
    import fastpurify
    from fastpurify.data import synthetic_dataset
    from fastpurify.models import PreActResNet18

    torch.set_num_threads(a.threads)
    rank = 0
    dev = torch.device(a.device)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        import datetime

        import torch.distributed as dist

        if dev.type == "cuda":
            dev = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
            torch.cuda.set_device(dev)
        dist.init_process_group("nccl" if dev.type == "cuda" else "gloo", timeout=datetime.timedelta(seconds=300))
        rank = dist.get_rank()
    x, y = synthetic_dataset(n=a.images, seed=0)
    torch.manual_seed(0)
    net = PreActResNet18(num_classes=10).eval()
    settings = json.loads(a.settings)
    r = getattr(fastpurify, a.defense)(net, x if a.defense == "bcu" else (x, y), progress=False, seed=0,
                                       device=dev, **settings)
    if rank == 0:
        torch.save({k: v.cpu() for k, v in r.model.state_dict().items()}, a.child_out + ".pt")
        Path(a.child_out + ".json").write_text(json.dumps({
            "seconds_per_round": r.timings["defense"] / max(1, len(r.history)), "rounds": len(r.history),
            "status": r.status}))


def _difference(a: dict, b: dict) -> float:
    num = den = 0.0
    for k, v in a.items():
        if v.is_floating_point():
            num += float(((v.double() - b[k].double()) ** 2).sum())
            den += float((v.double() ** 2).sum())
    return (num / max(den, 1e-30)) ** 0.5


def run_cell(defense: str, procs: int, a, tmp: Path) -> dict:
    out = str(tmp / f"{defense}_{procs}")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", str(procs), "--master-addr",
           "127.0.0.1", "--master-port", str(_port()), __file__, "--child", "--defense", defense, "--settings",
           json.dumps(SETTINGS[defense]), "--child-out", out, "--device", a.device, "--threads", str(a.threads),
           "--images", str(a.images)]
    env = dict(os.environ, OMP_NUM_THREADS=str(a.threads))
    p = subprocess.run(cmd, capture_output=True, text=True, env=env, cwd=ROOT, timeout=a.cell_timeout)
    if p.returncode != 0:  # the child's exception line, not torchrun's summary
        lines = [ln for ln in (p.stderr + p.stdout).splitlines() if "Error" in ln and "torch.distributed" not in ln]
        return {"defense": defense, "procs": procs, "error": lines[-1:] or [f"exit status {p.returncode}"]}
    rec = json.loads(Path(out + ".json").read_text())
    return {"defense": defense, "procs": procs, **rec, "state": out + ".pt"}


def render(rows: list, env: dict, a) -> str:
    lines = [f"# Data-parallel scaling ({env.get('device', a.device)})", "",
             f"Command: `python benchmarks/scaling.py --device {a.device} --procs {' '.join(map(str, a.procs))} "
             f"--threads {a.threads} --images {a.images}`. PreActResNet18 (random weights), {a.images} synthetic "
             f"images, the same global batches in every column; {a.threads} thread(s) per process. Seconds per round "
             "= the defense's own time over its rounds (first round included); agreement = ‖θ_P − θ_1‖/‖θ_1‖.", "",
             "| defense | settings | " + " | ".join(f"{p} proc s/round" for p in a.procs) + " | speed-up (max) | "
             "agreement (max) |", "|" + "---|" * (len(a.procs) + 4)]
    for d in sorted({r["defense"] for r in rows}):
        cells = {r["procs"]: r for r in rows if r["defense"] == d}
        base = cells.get(a.procs[0], {})
        secs = [f"{cells[p]['seconds_per_round']:.2f}" if "seconds_per_round" in cells.get(p, {}) else
                f"error: {' '.join(cells.get(p, {}).get('error', ['not run']))[:60]}" for p in a.procs]
        top = cells.get(a.procs[-1], {})
        speed = (f"{base['seconds_per_round'] / top['seconds_per_round']:.2f}×"
                 if "seconds_per_round" in base and "seconds_per_round" in top else "—")
        agree = max((r.get("agreement", 0.0) for r in cells.values()), default=0.0)
        lines.append(f"| {d} | {', '.join(f'{k}={v}' for k, v in SETTINGS[d].items())} | " + " | ".join(secs)
                     + f" | {speed} | {agree:.1e} |")
    lines += ["", f"Environment: {env.get('device')}, torch {env.get('torch')}, commit {env.get('commit')}."
              + (f" {a.note}" if a.note else "")]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--procs", type=int, nargs="+", default=[1, 2])
    ap.add_argument("--threads", type=int, default=1, help="threads per process (default 1)")
    ap.add_argument("--images", type=int, default=512, help="clean images (at least one global batch: 128)")
    ap.add_argument("--defenses", nargs="+", default=["ibau", "awm", "bcu", "sau"], choices=sorted(SETTINGS))
    ap.add_argument("--out", default=None)
    ap.add_argument("--note", default="", help="a sentence for the table's footer (e.g. what else ran)")
    ap.add_argument("--cell-timeout", type=float, default=1800.0)
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--defense", help=argparse.SUPPRESS)
    ap.add_argument("--settings", help=argparse.SUPPRESS)
    ap.add_argument("--child-out", help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.child:
        child(a)
        return 0
    env = environment()
    out = Path(a.out) if a.out else ROOT / "benchmarks" / "results" / env["device_tag"]
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for d in a.defenses:
            cells = [run_cell(d, p, a, Path(tmp)) for p in a.procs]
            first = cells[0]
            if "state" in first:
                ref = torch.load(first["state"], weights_only=True)
                for c in cells:
                    if "state" in c:
                        c["agreement"] = _difference(ref, torch.load(c["state"], weights_only=True))
            for c in cells:
                c.pop("state", None)
                print(json.dumps(c), flush=True)
            rows += cells
    (out / "scaling.json").write_text(json.dumps({"environment": env, "rows": rows}, indent=1))
    (out / "scaling.md").write_text(render(rows, env, a))
    print((out / "scaling.md").read_text())
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
