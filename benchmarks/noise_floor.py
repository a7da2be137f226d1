"""Rounding noise floor: how far a defense's own result moves when its start moves by float rounding.

The fast paths compute the reference's algorithm with other operation orders (fused kernels, batched passes,
one autograd call instead of two), so in fp32 their results differ from the reference's by rounding at every
step, and a defense of many nonlinear steps can amplify that. A single reference-vs-fast difference of ACC or
ASR says nothing until it is compared with how much the *reference itself* moves under the same size of
perturbation. This script measures that: for each path (reference, fast) it runs the defense ``R`` times on
the same checkpoint, clean data and seed, replicate 0 on the checkpoint as it is and replicate ``r >= 1`` on
the checkpoint with every weight multiplied by ``1 + eps·ξ`` (``ξ`` standard normal from generator seed
``r``; ``eps`` = 2⁻²³ by default, one fp32 unit in the last place), then evaluates each result on the same
images. The spread of the reference's replicates is its noise floor; the fast path's difference from the
reference is a real difference only where it is outside that spread.

Writes ``benchmarks/results/<device>/noise_floor.{json,md}`` (merged: a rerun of the same defense, checkpoint
and settings replaces its rows).

Usage::

    python benchmarks/noise_floor.py --defense ibau --checkpoint trojan_wm            # one round (bench settings)
    python benchmarks/noise_floor.py --defense ibau --checkpoint trojan_wm --published --replicates 3
    python benchmarks/noise_floor.py --defense awm --checkpoint badnets --paths reference --replicates 5
    python benchmarks/noise_floor.py --render --out benchmarks/results/cpu-amd-epyc-2t   # the table from the JSON
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, when fastpurify is not installed
from _env import ROOT, device_tag, merge_rows  # noqa: E402

from fastpurify.bench import (  # noqa: E402
    DEFENSES,
    FROM_WORKLOAD,
    SHARED_CHECKPOINTS,
    environment,
    fmt_settings,
    parse_defense_sets,
    real_workload,
    resolve_checkpoint,
    resolve_settings,
)

DEFAULT_DATA = ROOT.parent / "shared" / "data"
EPS = 2.0 ** -23


def perturb_(model: torch.nn.Module, eps: float, seed: int) -> torch.nn.Module:
    """Multiply every parameter by ``1 + eps·ξ`` (ξ ~ N(0, 1) from a generator seeded with ``seed``), in place."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.mul_(1.0 + eps * torch.randn(p.shape, generator=g, dtype=p.dtype))
    return model


def spread(values):
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def group_key(r: dict) -> tuple:
    return r["defense"], r["checkpoint"], r["settings_text"]


def merge(folder: Path, new_rows: list, env: dict) -> None:
    merge_rows(folder, "noise_floor", new_rows, lambda r: (group_key(r), r["path"], r["replicate"]), env,
               lambda rows: (folder / "noise_floor.md").write_text(render(rows, env, folder)),
               sort_key=lambda r: (DEFENSES.index(r["defense"]), r["checkpoint"], r["settings_text"], r["path"],
                                   r["replicate"]))


def _fmt(values) -> str:
    if not values:
        return "—"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    sp = spread(values)
    return f"{sp['min']:.2f} – {sp['max']:.2f} (mean {sp['mean']:.2f}, sd {sp['std']:.2f})"


def _quality_rows(folder: Path) -> list:
    path = folder / "quality.json"
    return json.loads(path.read_text())["runs"] if path.exists() else []


def render(rows: list, env: dict, folder: Path) -> str:
    """The table; a setting run without its unperturbed replicate takes it from quality.json when that file has
    the same defense, checkpoint, path and settings (marked ``q``)."""
    quality = _quality_rows(folder)
    lines = ["# Rounding noise floor of the defenses on the real checkpoints", "",
             f"Device: {env['device']}; torch {env['torch']}. Written by `benchmarks/noise_floor.py`. Each path ran "
             "on the same checkpoint, clean images and seed; replicate 0 on the checkpoint as it is, replicate r ≥ 1 "
             "with every weight multiplied by 1 + eps·ξ (ξ ~ N(0, 1), generator seed r). fp32 throughout. "
             "ACC/ASR in percent on the evaluation images; the perturbed columns give min – max, mean and standard "
             "deviation over the replicates r ≥ 1. A value marked q is the unperturbed run of `quality.md` (same "
             "defense, checkpoint, path and settings).", "",
             "| defense | checkpoint | settings | eps | path | perturbed runs | ACC unperturbed | ACC perturbed | "
             "ASR unperturbed | ASR perturbed | seconds / run |",
             "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    groups: dict = {}
    for r in rows:
        groups.setdefault((group_key(r), r["path"]), []).append(r)
    for (key, path), rs in groups.items():
        d, ck, st = key
        base = [r["after"] for r in rs if r["replicate"] == 0]
        mark = ""
        if not base:
            filled = FROM_WORKLOAD.get(d, ())  # given or taken from the workload: the same run either way
            same = {k: v for k, v in rs[0]["settings"].items() if k not in filled}
            base = [q["after"] for q in quality if (q["defense"], q["checkpoint"], q["path"]) == (d, ck, path)
                    and {k: v for k, v in q["overrides"].items() if k not in filled} == same
                    and q.get("seed", 0) == rs[0]["seed"] and (q.get("recipe") or "published") == "published"]
            mark = " q" if base else ""
        pert = [r["after"] for r in rs if r["replicate"] > 0]
        secs = statistics.fmean(r["defense_seconds"] for r in rs)
        lines.append(f"| {d} | {ck} | {st} | {rs[-1]['eps']:.2g} | {path} | {len(pert)} | "
                     f"{_fmt([a['acc'] for a in base])}{mark} | {_fmt([a['acc'] for a in pert])} | "
                     f"{_fmt([a['asr'] for a in base])}{mark} | {_fmt([a['asr'] for a in pert])} | {secs:.0f} |")
    runs = sorted({f"commit {r['environment'].get('commit')}, {r['environment']['threads']} threads, "
                   f"`{r['environment']['command']}`" for r in rows})
    lines += ["", "Runs: " + "; ".join(runs), ""]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--defense", choices=DEFENSES, help="required unless --render")
    ap.add_argument("--checkpoint", default="badnets", help=f"one of {', '.join(SHARED_CHECKPOINTS)} or a path")
    ap.add_argument("--trigger", default=None)
    ap.add_argument("--target", type=int, default=None)
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--n-clean", type=int, default=2500)
    ap.add_argument("--n-eval", type=int, default=None)
    ap.add_argument("--paths", nargs="+", default=["reference", "fast"], choices=("reference", "fast"))
    ap.add_argument("--replicates", type=int, default=4, help="runs per path: the unperturbed one + R-1 perturbed")
    ap.add_argument("--first-replicate", type=int, default=0, help="start at this replicate (split a long job)")
    ap.add_argument("--eps", type=float, default=EPS, help="relative size of the weight perturbation (default 2^-23)")
    ap.add_argument("--published", action="store_true", help="the published defaults instead of the bench settings")
    ap.add_argument("--set", action="append", metavar="DEFENSE.KEY=VALUE")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    ap.add_argument("--render", action="store_true", help="only rewrite noise_floor.md from noise_floor.json")
    args = ap.parse_args(argv)
    folder = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / device_tag()
    if args.render:
        saved = json.loads((folder / "noise_floor.json").read_text())
        (folder / "noise_floor.md").write_text(render(saved["rows"], saved["environment"], folder))
        print(f"wrote {folder / 'noise_floor.md'}")
        return 0
    if args.defense is None:
        ap.error("--defense is required (or --render)")
    if args.replicates < 1 or args.first_replicate < 0 or not args.eps > 0:
        raise SystemExit(f"--replicates >= 1, --first-replicate >= 0 and --eps > 0 expected, got "
                         f"{args.replicates}, {args.first_replicate}, {args.eps}")

    import fastpurify
    from fastpurify.metrics import evaluate
    from fastpurify.reference import defenses as ref

    d = args.defense
    path, spec, target = resolve_checkpoint(args.checkpoint, args.data, args.trigger, args.target)
    ck_name = args.checkpoint if args.checkpoint in SHARED_CHECKPOINTS else Path(args.checkpoint).stem
    wl = real_workload(path, args.data, trigger=spec, target=target, n_clean=args.n_clean, n_eval=args.n_eval)
    overrides = parse_defense_sets(args.set).get(d, {})
    if args.published:
        settings = dict(overrides)
        for key in FROM_WORKLOAD.get(d, ()):
            settings.setdefault(key, getattr(wl, key))
    else:
        settings = resolve_settings(d, wl, overrides)
    text = fmt_settings(settings) or "published defaults"
    clean = wl.clean[0] if d == "bcu" else wl.clean
    print(f"{d} on {ck_name} ({text}), eps {args.eps:.3g}, replicates {args.first_replicate}.."
          f"{args.first_replicate + args.replicates - 1}", flush=True)
    for rep in range(args.first_replicate, args.first_replicate + args.replicates):
        for p in args.paths:
            model = wl.model_factory()
            if rep:
                perturb_(model, args.eps, rep)
            fn = getattr(fastpurify if p == "fast" else ref, d)
            t0 = time.perf_counter()
            res = fn(model, clean, seed=args.seed, progress=False, **settings)
            wall = time.perf_counter() - t0
            after = evaluate(res.model, wl.eval_x, wl.eval_y, trigger=wl.trigger, target=wl.target)
            env = environment()
            row = {"defense": d, "checkpoint": ck_name, "settings": settings, "settings_text": text, "path": p,
                   "replicate": rep, "eps": args.eps, "seed": args.seed, "after": after.as_dict(),
                   "defense_seconds": res.timings["defense"], "wall_seconds": wall, "status": res.status,
                   "history": res.history, "environment": env}
            merge(folder, [row], env)
            print(f"  {p:9s} replicate {rep}: ACC {after.acc:.2f} ASR {after.asr:.2f} "
                  f"({res.timings['defense']:.0f} s)", flush=True)
    print(f"wrote {folder / 'noise_floor.md'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
