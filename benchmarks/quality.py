"""Purification quality on the real backdoored checkpoints: the table of specs/evaluation.md.

Runs every defense on each checkpoint in ``../shared/data/ibau`` with the defender's 2,500 clean images (the
first 2,500 of ``data_batch_1``; BCU without labels), evaluates on the full ``test_batch`` clean and
triggered, and writes ``benchmarks/results/<device>/quality.json`` and ``quality.md`` (defense ×
checkpoint: ACC, ASR, RA, DER, wall time, device). Results are merged into the existing files after every
run, so a long job keeps what it finished.

Usage::

    python benchmarks/quality.py                                   # all defenses, both checkpoints, defaults
    python benchmarks/quality.py --defenses ibau awm --checkpoints badnets
    python benchmarks/quality.py --set sau.epochs=5 --set bcu.epochs=20     # fewer epochs on a CPU (say so)
    python benchmarks/quality.py --fast                            # fastpurify.<defense> instead of the reference
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, when fastpurify is not installed
from _env import ROOT, environment, merge_rows  # noqa: E402

CHECKPOINTS = {
    "badnets": ("badnets_8_02_ckpt.pth", "patch:size=4,row=27,col=27,value=1", 8),
    "trojan_wm": ("trojan_wm_2_02_ckpt.pth", "add:{ibau}/trojan_wm.png", 2),
}
DEFENSES = ("sau", "ibau", "awm", "baerase", "bcu")


def _parse_sets(items):
    from fastpurify.cli import parse_sets

    per = {d: {} for d in DEFENSES}
    for key, value in parse_sets(items).items():
        if "." not in key or key.split(".", 1)[0] not in per:
            raise SystemExit(f"--set {key}=...: expected DEFENSE.key=value with DEFENSE in {DEFENSES}")
        d, k = key.split(".", 1)
        per[d][k] = value
    return per


def merge_row(folder: Path, row: dict, env: dict) -> None:
    """Add ``row`` to quality.json (replacing the same defense/path/checkpoint) under a lock, so that several
    quality jobs can run side by side, then rewrite quality.md."""
    merge_rows(folder, "quality", [row], lambda r: (r["defense"], r["path"], r["checkpoint"]), env,
               lambda rows: write_tables(folder, rows, env), list_key="runs")


def write_tables(folder: Path, rows: list, env: dict) -> None:
    lines = [
        "# Purification quality on the real checkpoints", "",
        f"Device: {env['device']}; torch {env['torch']}. "
        "Clean data: the first `clean` images of `data_batch_1` (BCU: without labels). Evaluation: the full "
        "`test_batch` (10,000 clean; ASR and RA over the 9,000 triggered images whose label is not the target). "
        "Seconds: the defense alone (evaluation excluded). Written by `benchmarks/quality.py`.", "",
        "| defense | path | checkpoint | clean | settings | ACC before | ASR before | ACC | ASR | RA | DER | seconds | "
        "threads | status | commit | works? |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for r in sorted(rows, key=lambda r: (r["defense"], r["path"], r["checkpoint"])):
        ok = r["after"]["asr"] <= 5.0 and r["before"]["acc"] - r["after"]["acc"] <= 3.0
        settings = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or "published defaults"
        lines.append(
            f"| {r['defense']} | {r['path']} | {r['checkpoint']} | {r['clean_count']} | {settings} | "
            f"{r['before']['acc']:.2f} | {r['before']['asr']:.2f} | {r['after']['acc']:.2f} | "
            f"{r['after']['asr']:.2f} | {r['after']['ra']:.2f} | {r['der']:.2f} | {r['defense_seconds']:.0f} | "
            f"{r['threads']} | {r['status']} | {r['commit']} | {'yes' if ok else 'no'} |")
    lines += ["", "works? = ASR ≤ 5 % with an ACC drop ≤ 3 points (specs/evaluation.md)."]
    (folder / "quality.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=DEFENSES)
    ap.add_argument("--checkpoints", nargs="+", default=list(CHECKPOINTS), choices=list(CHECKPOINTS))
    ap.add_argument("--data", default=None, help="data folder (default ../shared/data or $FASTPURIFY_DATA)")
    ap.add_argument("--clean-count", type=int, default=2500)
    ap.add_argument("--fast", action="store_true", help="run fastpurify.<defense> (default: the reference port)")
    ap.add_argument("--set", action="append", metavar="DEFENSE.KEY=VALUE", help="e.g. --set sau.epochs=5")
    ap.add_argument("--eval-every", type=int, default=0, help="also evaluate every N rounds (kept in the history "
                                                               "of quality.json; timed apart); 0: only at the end")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results/<device>")
    args = ap.parse_args(argv)

    import fastpurify
    from fastpurify.data import default_data_dir, load_cifar10
    from fastpurify.metrics import der, evaluate
    from fastpurify.models import load_checkpoint
    from fastpurify.reference import defenses as ref
    from fastpurify.triggers import parse_trigger

    overrides = _parse_sets(args.set)
    data = Path(args.data) if args.data else default_data_dir()
    ibau = data / "ibau"
    device = torch.device("cuda" if args.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if args.device == "auto" else args.device))
    env = environment()
    folder = Path(args.out_dir) if args.out_dir else ROOT / "benchmarks" / "results" / env["device_tag"]
    folder.mkdir(parents=True, exist_ok=True)

    x, y = load_cifar10(data, split="train", count=args.clean_count)
    xt, yt = load_cifar10(data, split="test")
    path = "fast" if args.fast else "reference"
    for ck in args.checkpoints:
        fname, spec, target = CHECKPOINTS[ck]
        trigger = parse_trigger(spec.format(ibau=ibau))
        model = load_checkpoint(ibau / fname, arch="small_vgg").to(device)
        before = evaluate(model, xt, yt, trigger=trigger, target=target, device=device)
        print(f"{ck}: before {before}", flush=True)
        for d in args.defenses:
            fn = getattr(fastpurify if args.fast else ref, d)
            clean = x if d == "bcu" else (x, y)
            t0 = time.perf_counter()
            kw = dict(seed=args.seed, device=device, progress=sys.stderr.isatty(), **overrides[d])
            if args.eval_every:
                kw.update(eval_data=(xt, yt, trigger, target), eval_every=args.eval_every)
            res = fn(model, clean, **kw)
            wall = time.perf_counter() - t0
            after = evaluate(res.model, xt, yt, trigger=trigger, target=target, device=device)
            row = {"defense": d, "path": path, "checkpoint": ck, "clean_count": len(y), "overrides": overrides[d],
                   "seed": args.seed,
                   "before": before.as_dict(), "after": after.as_dict(), "der": der(before, after),
                   "defense_seconds": res.timings["defense"], "wall_seconds": wall, "status": res.status,
                   "rounds": len(res.history), "history": res.history, "device": env["device"],
                   "threads": env["threads"], "commit": env["commit"]}
            merge_row(folder, row, env)
            print(f"  {d:8s} {after}  DER {row['der']:.2f}  {res.timings['defense']:.0f} s ({res.status})", flush=True)
    print(f"wrote {folder / 'quality.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
