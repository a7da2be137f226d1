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
    python benchmarks/quality.py --fast --recipe robust --seeds 0 1 2   # the robust recipes, three seeds
    python benchmarks/quality.py --auto --seeds 0 1 2              # fastpurify.purify (its measured plan)

quality.md opens with the table at a glance (defense and recipe × checkpoint: ACC / ASR after, mean over the
seeds, ✓ where the bar is met) and quality.png draws ASR against the ACC drop per defense and recipe (needs
matplotlib: ``pip install fastpurify[plot]``); the full rows follow.
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
    merge_rows(folder, "quality", [row], lambda r: (r["defense"], r["path"], r["checkpoint"], _recipe(r),
                                                    r.get("seed", 0)), env,
               lambda rows: write_tables(folder, rows, env), list_key="runs")


def _recipe(r: dict) -> str:
    return r.get("recipe") or "published"


def _works(r: dict) -> bool:
    from fastpurify.metrics import BAR

    return r["after"]["asr"] <= BAR["max_asr"] and r["before"]["acc"] - r["after"]["acc"] <= BAR["max_acc_drop"]


def glance(rows: list) -> list:
    """Defense (recipe and settings, path) × checkpoint: ACC / ASR after, the mean over seeds (± half the range when
    there are several), ✓ where the mean meets the bar."""
    from fastpurify.metrics import BAR

    cks = sorted({r["checkpoint"] for r in rows})
    groups: dict = {}
    for r in rows:
        label = ", ".join([_recipe(r)] + [f"{k}={v}" for k, v in r["overrides"].items()])  # shortened schedules
        groups.setdefault((r["defense"], label, r["path"]), {}).setdefault(r["checkpoint"], []).append(r)
    out = ["| defense | recipe | path | " + " | ".join(cks) + " |",
           "| --- | --- | --- | " + " | ".join("---" for _ in cks) + " |"]
    for (d, rec, path), per in sorted(groups.items()):
        cells = []
        for ck in cks:
            rs = per.get(ck)
            if not rs:
                cells.append("—")
                continue
            acc = [r["after"]["acc"] for r in rs]
            asr = [r["after"]["asr"] for r in rs]
            drop = sum(r["before"]["acc"] for r in rs) / len(rs) - sum(acc) / len(acc)
            mean_asr = sum(asr) / len(asr)
            ok = mean_asr <= BAR["max_asr"] and drop <= BAR["max_acc_drop"]
            spread = (f" (±{(max(asr) - min(asr)) / 2:.1f}, {len(rs)} seeds)" if len(rs) > 1 else "")
            cells.append(f"{sum(acc) / len(acc):.1f} / {mean_asr:.1f}{spread}{' ✓' if ok else ''}")
        out.append(f"| {d} | {rec} | {path} | " + " | ".join(cells) + " |")
    return out


def write_plot(folder: Path, rows: list) -> None:
    """quality.png: ASR after against the ACC drop, per defense and recipe (fastpurify.plot.plot_sweep)."""
    try:
        from fastpurify.plot import plot_sweep

        pts = [{"defense": r["defense"] + ("" if r["path"] == "fast" else " (ref)"), "recipe": _recipe(r),
                "checkpoint": r["checkpoint"], "seed": r.get("seed", 0), "acc_before": r["before"]["acc"],
                "acc_after": r["after"]["acc"], "asr_before": r["before"]["asr"], "asr_after": r["after"]["asr"]}
               for r in rows]
        plot_sweep(pts, folder / "quality.png", title="Purification on the real checkpoints (quality.md)")
    except ImportError as e:  # matplotlib is an optional extra
        print(f"quality.png not drawn: {e}", file=sys.stderr)


def write_tables(folder: Path, rows: list, env: dict) -> None:
    lines = [
        "# Purification quality on the real checkpoints", "",
        f"Device: {env['device']}; torch {env['torch']}. "
        "Clean data: the first `clean` images of `data_batch_1` (BCU: without labels). Evaluation: the full "
        "`test_batch` (10,000 clean; ASR and RA over the 9,000 triggered images whose label is not the target). "
        "Seconds: the defense alone (evaluation excluded). Written by `benchmarks/quality.py`.", "",
        "## At a glance", "",
        "ACC / ASR after (%), mean over the seeds run; ✓: ASR ≤ 5 % with an ACC drop ≤ 3 points "
        "(specs/evaluation.md). Chart: [quality.png](quality.png).", "",
        *glance(rows), "",
        "## Every run", "",
        "| defense | recipe | seed | path | checkpoint | clean | settings | ACC before | ASR before | ACC | ASR | RA | "
        "DER | seconds | threads | status | commit | works? |",
        "|" + " --- |" * 18,
    ]
    for r in sorted(rows, key=lambda r: (r["defense"], _recipe(r), r["path"], r["checkpoint"], r.get("seed", 0))):
        ok = _works(r)
        settings = ", ".join(f"{k}={v}" for k, v in r["overrides"].items()) or (
            "published defaults" if _recipe(r) == "published" else "the recipe's")
        lines.append(
            f"| {r['defense']} | {_recipe(r)} | {r.get('seed', 0)} | {r['path']} | {r['checkpoint']} | "
            f"{r['clean_count']} | {settings} | "
            f"{r['before']['acc']:.2f} | {r['before']['asr']:.2f} | {r['after']['acc']:.2f} | "
            f"{r['after']['asr']:.2f} | {r['after']['ra']:.2f} | {r['der']:.2f} | {r['defense_seconds']:.0f} | "
            f"{r['threads']} | {r['status']} | {r['commit']} | {'yes' if ok else 'no'} |")
    lines += ["", "works? = ASR ≤ 5 % with an ACC drop ≤ 3 points (specs/evaluation.md)."]
    (folder / "quality.md").write_text("\n".join(lines) + "\n")
    write_plot(folder, rows)


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
    ap.add_argument("--recipe", default="published", choices=("published", "robust"),
                    help="the fast path's recipe (fastpurify/recipes.py); robust needs --fast")
    ap.add_argument("--auto", action="store_true", help="run fastpurify.purify (its measured plan) instead of one "
                                                        "defense; the row's defense is 'auto'")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0], help="one row per seed (default 0)")
    ap.add_argument("--device", default="auto")
    ap.add_argument("--out-dir", default=None, help="default benchmarks/results/<device>")
    args = ap.parse_args(argv)

    import fastpurify
    from fastpurify.data import default_data_dir, load_cifar10
    from fastpurify.metrics import der, evaluate
    from fastpurify.models import load_checkpoint
    from fastpurify.reference import defenses as ref
    from fastpurify.triggers import parse_trigger

    if args.recipe != "published" and not args.fast:
        raise SystemExit("--recipe robust exists on the fast path only: add --fast")
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
    path = "fast" if args.fast or args.auto else "reference"
    jobs = ["auto"] if args.auto else args.defenses
    for ck in args.checkpoints:
        fname, spec, target = CHECKPOINTS[ck]
        trigger = parse_trigger(spec.format(ibau=ibau))
        model = load_checkpoint(ibau / fname, arch="small_vgg").to(device)
        before = evaluate(model, xt, yt, trigger=trigger, target=target, device=device)
        print(f"{ck}: before {before}", flush=True)
        for d, seed in ((d, s) for d in jobs for s in args.seeds):
            if d == "auto":
                fn, kw = fastpurify.purify, {}
            else:
                fn = getattr(fastpurify if args.fast else ref, d)
                kw = dict(overrides[d], recipe=args.recipe)
            clean = x if d == "bcu" else (x, y)
            t0 = time.perf_counter()
            kw.update(seed=seed, device=device, progress=sys.stderr.isatty())
            if args.eval_every:
                kw.update(eval_data=(xt, yt, trigger, target), eval_every=args.eval_every)
            res = fn(model, clean, **kw)
            wall = time.perf_counter() - t0
            after = evaluate(res.model, xt, yt, trigger=trigger, target=target, device=device)
            row = {"defense": d, "path": path, "checkpoint": ck, "clean_count": len(y),
                   "overrides": overrides.get(d, {}), "recipe": "auto" if d == "auto" else args.recipe, "seed": seed,
                   "plan": res.info.get("steps") and [(s["defense"], s["recipe"]) for s in res.info["steps"]],
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
