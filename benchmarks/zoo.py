"""Backdoored models trained here, for tuning and checking the robust recipes beyond the two shared checkpoints
(issue 15 item 3).

The list is fixed in :data:`ZOO` before any recipe was tuned; ``split`` says which models tuning may look at
(``tune``) and which are held out (``heldout``: their results are reported, never used to choose a setting).

Data, all from ``data_batch_1`` (the only training batch in ../shared/data): the models train on its first
8,000 images (poisoned), the defender gets its first 2,500 clean (as for the shared checkpoints), tuning
evaluates on its last 2,000 (:data:`VAL`, never trained on), and the reported numbers come from ``test_batch``.

Usage::

    python benchmarks/zoo.py train [--out DIR] [--only NAME ...]    # train the models (skips those present)
    python benchmarks/zoo.py list                                  # the list, with what is trained
    python benchmarks/zoo.py purify --defense ibau --recipe robust --seeds 0 1 2   # -> results/<device>/zoo.md
    python benchmarks/zoo.py purify --auto                         # fastpurify.purify's plan

Models go to ``--out`` (default ``$FASTPURIFY_ZOO`` or ``~/.cache/fastpurify/zoo``), never into the repository.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch

sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, when fastpurify is not installed

TRAIN = slice(0, 8000)  # what the models are trained on (data_batch_1)
CLEAN = slice(0, 2500)  # the defender's clean images (as for the shared checkpoints)
VAL = slice(8000, 10000)  # tuning's validation images: never trained on, never the test set

# name: architecture, trigger (a parse_trigger spec, or a seeded image made by _image), target, poisoning rate,
# split. Fixed before tuning (2026-12-03); do not move a model between tune and heldout.
ZOO = {
    "blend_noise": dict(arch="small_vgg", trigger="blend:<noise>,alpha=0.15", target=0, rate=0.1, split="tune"),
    # first trained at rate 0.01 (80 poisoned images): the backdoor did not implant (test ASR 6.60 %, ACC 60.52),
    # so the model measured nothing; retrained at 0.03 before any defense had run on it: still not implanted
    # (ASR 8.32 %, ACC 59.32) with 8,000 images and 15 epochs. Models whose ASR before is under BACKDOORED are
    # reported as such and not counted for or against a recipe.
    "patch_low_rate": dict(arch="small_vgg", trigger="patch:size=3,row=1,col=1,value=1", target=3, rate=0.03,
                           split="heldout"),
    "add_noise": dict(arch="small_vgg", trigger="add:<sign0.05>", target=5, rate=0.1, split="heldout"),
    "patch_random_location": dict(arch="small_vgg", trigger="randpatch:size=3,value=1,seed=0", target=1, rate=0.1,
                                  split="heldout"),
}
TRAINING = dict(epochs=15, lr=0.01, batch_size=128)
BACKDOORED = 50.0  # test ASR (%) before purification below which a model does not count as backdoored


def default_dir() -> Path:
    return Path(os.environ.get("FASTPURIFY_ZOO", Path.home() / ".cache" / "fastpurify" / "zoo"))


def trigger(name: str):
    """The trigger of model ``name``: its spec parsed, with the seeded images of ``<noise>`` (uniform, seed 11)
    and ``<sign0.05>`` (±0.05 per pixel, seed 12) built in memory."""
    from fastpurify.triggers import AddTrigger, BlendTrigger, parse_trigger

    spec = ZOO[name]["trigger"]
    if "<noise>" in spec:
        img = torch.rand(3, 32, 32, generator=torch.Generator().manual_seed(11))
        return BlendTrigger(img, alpha=float(spec.split("alpha=")[1]))
    if "<sign0.05>" in spec:
        g = torch.Generator().manual_seed(12)
        return AddTrigger(0.05 * (torch.randint(0, 2, (3, 32, 32), generator=g).float() * 2 - 1))
    return parse_trigger(spec)


def load(name: str, folder: Path = None):
    """``(model in eval mode, trigger, target)`` of a trained zoo model."""
    from fastpurify.models import build_model

    folder = Path(folder) if folder else default_dir()
    f = folder / f"{name}.pt"
    if not f.is_file():
        raise FileNotFoundError(f"{f}: not trained yet; run python benchmarks/zoo.py train --only {name}")
    state = torch.load(f, weights_only=True)
    model = build_model(ZOO[name]["arch"], 10)
    model.load_state_dict(state["model"])
    return model.eval(), trigger(name), ZOO[name]["target"]


def train_one(name: str, folder: Path, data_dir=None) -> dict:
    from fastpurify.data import load_cifar10
    from fastpurify.metrics import evaluate
    from fastpurify.train import train_backdoored

    spec = ZOO[name]
    x, y = load_cifar10(data_dir, split="train", batches=[1])
    xt, yt = load_cifar10(data_dir, split="test")
    trig = trigger(name)
    t0 = time.perf_counter()
    model, info = train_backdoored(spec["arch"], x[TRAIN], y[TRAIN], trigger=trig, target=spec["target"],
                                   poison_rate=spec["rate"], seed=0, progress=True, **TRAINING)
    ev = evaluate(model, xt, yt, trigger=trig, target=spec["target"])
    meta = {"name": name, **{k: v for k, v in spec.items()}, **TRAINING, "n_poisoned": info["n_poisoned"],
            "train_seconds": time.perf_counter() - t0, "test": ev.as_dict()}
    folder.mkdir(parents=True, exist_ok=True)
    torch.save({"model": model.state_dict(), "meta": json.dumps(meta)}, folder / f"{name}.pt")
    (folder / f"{name}.json").write_text(json.dumps(meta, indent=1))
    return meta


def purify_one(name: str, folder: Path, defense: str, recipe: str, seed: int, data_dir=None) -> dict:
    """One purification of zoo model ``name`` on the defender's clean images: ACC/ASR before and after on the
    validation images (what tuning reads) and on the test set (what is reported)."""
    import fastpurify
    from fastpurify.data import load_cifar10
    from fastpurify.metrics import evaluate

    model, trig, target = load(name, folder)
    x, y = load_cifar10(data_dir, split="train", batches=[1])
    xt, yt = load_cifar10(data_dir, split="test")
    clean = x[CLEAN] if defense == "bcu" else (x[CLEAN], y[CLEAN])
    t0 = time.perf_counter()
    if defense == "auto":
        res = fastpurify.purify(model, clean, seed=seed, progress=False)
    else:
        res = getattr(fastpurify, defense)(model, clean, recipe=recipe, seed=seed, progress=False)
    seconds = time.perf_counter() - t0
    ev = {}
    for split, (xe, ye) in (("val", (x[VAL], y[VAL])), ("test", (xt, yt))):
        ev[split] = {k: evaluate(m, xe, ye, trigger=trig, target=target).as_dict() for k, m in
                     (("before", model), ("after", res.model))}
    return {"model": name, "split": ZOO[name]["split"], "defense": defense,
            "recipe": "auto" if defense == "auto" else recipe, "seed": seed, "seconds": seconds,
            "status": res.status, "eval": ev,
            "plan": [(s["defense"], s["recipe"]) for s in res.info.get("steps", [])] or None}


def folder_meta(out: Path) -> list:
    """'name: ACC / ASR' of every trained model in the zoo folder, including those no defense ran on."""
    folder = default_dir()
    return [f"{m['name']} {m['test']['acc']:.2f} / {m['test']['asr']:.2f} (rate {m['rate']})"
            for m in (json.loads(f.read_text()) for f in folder.glob("*.json")) if "test" in m]


def write_results(out: Path, rows: list, env: dict) -> None:
    from fastpurify.metrics import BAR

    groups: dict = {}
    for r in rows:
        groups.setdefault((r["split"] != "tune", r["model"]), {}).setdefault((r["defense"], r["recipe"]), []).append(r)
    methods = sorted({(r["defense"], r["recipe"]) for r in rows})
    lines = ["# Trained backdoored models (benchmarks/zoo.py)", "",
             f"Device: {env['device']}; torch {env['torch']}. Models: SmallVGG trained here on the first 8,000 images "
             "of data_batch_1 (`python benchmarks/zoo.py train`); clean set: its first 2,500; ACC / ASR after on the "
             "full test_batch (before in the first column), mean over seeds (± half the range), ✓ where the mean "
             "meets the bar (ASR ≤ 5 %, ACC drop ≤ 3 points). `tune`: tuning looked at this model (on its "
             "validation images, data_batch_1[8000:]); `heldout`: fixed before tuning, never looked at while "
             "tuning.", "",
             "| model | split | before | " + " | ".join(f"{d} {r}" for d, r in methods) + " |",
             "| --- | --- | --- | " + " | ".join("---" for _ in methods) + " |"]
    for (_, name), per in sorted(groups.items()):
        first = next(iter(per.values()))[0]["eval"]["test"]["before"]
        cells = []
        for m in methods:
            rs = per.get(m)
            if not rs:
                cells.append("—")
                continue
            acc = [r["eval"]["test"]["after"]["acc"] for r in rs]
            asr = [r["eval"]["test"]["after"]["asr"] for r in rs]
            a, s = sum(acc) / len(acc), sum(asr) / len(asr)
            ok = s <= BAR["max_asr"] and first["acc"] - a <= BAR["max_acc_drop"] and first["asr"] >= BACKDOORED
            spread = f" ±{(max(asr) - min(asr)) / 2:.1f} ({len(rs)} seeds)" if len(rs) > 1 else " (1 seed)"
            cells.append(f"{a:.1f} / {s:.1f}{spread}{' ✓' if ok else ''}")
        weak = " (not backdoored: ASR before < 50 %)" if first["asr"] < BACKDOORED else ""
        lines.append(f"| {name} | {ZOO[name]['split']}{weak} | {first['acc']:.1f} / {first['asr']:.1f} | "
                     + " | ".join(cells) + " |")
    trained = sorted(folder_meta(out))
    if trained:
        lines += ["", "Trained models (test ACC / ASR before any defense): " + "; ".join(trained)]
    lines += ["", "Seconds per run (fast path, this machine, contended by other jobs: not a speed measurement): "
              + ", ".join(f"{r['model']} {r['defense']} {r['recipe']} s{r['seed']}: {r['seconds']:.0f}"
                          for r in sorted(rows, key=lambda r: (r["model"], r["defense"], r["recipe"], r["seed"])))]
    (out / "zoo.md").write_text("\n".join(lines) + "\n")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("command", choices=("train", "list", "purify"))
    ap.add_argument("--defense", default="ibau", help="the defense to run (purify)")
    ap.add_argument("--recipe", default="published", help="its recipe (purify)")
    ap.add_argument("--auto", action="store_true", help="run fastpurify.purify (purify)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    ap.add_argument("--results", default=None, help="results folder (default benchmarks/results/<device>)")
    ap.add_argument("--out", default=None, help="folder of the models (default $FASTPURIFY_ZOO or "
                                                "~/.cache/fastpurify/zoo)")
    ap.add_argument("--only", nargs="+", default=None, choices=list(ZOO))
    ap.add_argument("--data", default=None, help="data folder (default ../shared/data)")
    args = ap.parse_args(argv)
    folder = Path(args.out) if args.out else default_dir()
    if args.command == "purify":
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from _env import ROOT, environment, merge_rows

        env = environment()
        out = Path(args.results) if args.results else ROOT / "benchmarks" / "results" / env["device_tag"]
        defense = "auto" if args.auto else args.defense
        for name in args.only or list(ZOO):
            for seed in args.seeds:
                row = purify_one(name, folder, defense, args.recipe, seed, args.data)
                merge_rows(out, "zoo", [row], lambda r: (r["model"], r["defense"], r["recipe"], r["seed"]), env,
                           lambda rows: write_results(out, rows, env))
                te = row["eval"]["test"]
                print(f"{name} {defense} {row['recipe']} seed {seed}: ACC {te['before']['acc']:.2f} -> "
                      f"{te['after']['acc']:.2f}, ASR {te['before']['asr']:.2f} -> {te['after']['asr']:.2f} "
                      f"({row['seconds']:.0f} s)", flush=True)
        return 0
    for name in args.only or list(ZOO):
        f = folder / f"{name}.json"
        if args.command == "list" or f.is_file():
            meta = json.loads(f.read_text()) if f.is_file() else None
            test = meta and meta["test"]
            print(f"{name:22s} {ZOO[name]['split']:8s} " + (f"ACC {test['acc']:.2f}  ASR {test['asr']:.2f}"
                                                            if test else "not trained"))
            continue
        meta = train_one(name, folder, args.data)
        print(f"{name:22s} trained in {meta['train_seconds']:.0f} s: ACC {meta['test']['acc']:.2f}  "
              f"ASR {meta['test']['asr']:.2f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
