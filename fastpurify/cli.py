"""The ``fastpurify`` command line: ``info``, ``evaluate``, ``purify``, ``demo``, ``bench``.

Errors in what the user gave (an unknown arch, a checkpoint that does not fit, a folder without CIFAR files,
a malformed trigger spec, a label out of range) print one line ``fastpurify: error: ...`` and exit with
status 2; ``FASTPURIFY_DEBUG=1`` shows the traceback too.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
from typing import List, Optional, Sequence

from . import sweep
from .backend import BackendUnavailableError
from .defenses import PurificationError, TimeBudgetError
from .options import ListOptionsAction

# What the user gave was wrong or cannot run here: one line, no traceback. PurificationError (and its
# DivergenceError): the run ended without a usable model, and the message says what to change.
USER_ERRORS = (ValueError, TypeError, FileNotFoundError, NotADirectoryError, BackendUnavailableError,
               TimeBudgetError, PurificationError)
# Exit status after Ctrl-C, as a shell reports a process ended by SIGINT (128 + 2).
EXIT_INTERRUPTED = 130
# Classes of the data the command line loads (CIFAR-10, and the demo's synthetic set).
NUM_CLASSES = 10

# The demo's synthetic workload (fastpurify.data.synthetic_dataset): sized so that a backdoored SmallVGG
# trains to >= 90 % ACC and >= 95 % ASR in under 2 minutes on 2 CPU cores (tests/test_train.py checks it).
# No augmentation on the synthetic data: random crops and flips move the corner patch (3 seeds: ASR 99.9/88.5/95.0
# with it, >= 99.6 without); lr 0.01 (0.03-0.05 stall without warm-up, measured).
DEMO = {"n_train": 5000, "n_test": 2000, "epochs": 8, "lr": 0.01, "batch_size": 128}

# Each defense's demo settings: the published defaults shortened so that all five finish in a few minutes on
# 2 CPU cores; every other hyper-parameter is the published default. Measured on the demo model (1 thread,
# loaded machine): see the README's demo section.
DEMO_DEFENSES = {
    "sau": {"epochs": 2},  # 1 thread: ASR 100 -> 78, ACC 98.6 -> 96.7 (lr 5e-4: ASR 5.4 but ACC 69)
    "ibau": {"epochs": 1},  # ASR 100 -> 12.5, ACC 96.6
    "awm": {"epochs": 1},  # ASR 100 -> 20.3, ACC 97.7
    "baerase": {"target": 0, "epochs": 5, "recovery_epochs": 5, "hidden_size": 256, "patch_size": 4,
                "position": "corner"},  # target given; random positions with detection left ASR at 99.9
    "bcu": {"epochs": 5, "batch_size": 64, "augment": False},  # ASR 100 -> 4.0, ACC 97.7 (crops move the patch)
}


# --------------------------------------------------------------------------------------------------------
# info
# --------------------------------------------------------------------------------------------------------


def _cmd_info(args) -> int:
    from . import backend

    data = backend.info()
    if args.json:
        print(json.dumps(data, indent=2, default=str))
        return 0
    ext = data["extension"]
    print(f"fastpurify {data['fastpurify']}  python {data['python']}  torch {data['torch']} "
          f"(CUDA {data['torch_cuda'] or 'none'})  {data['platform']}")
    print(f"extension fastpurify._C: {'built' if ext['built'] else 'NOT built'}"
          f"{' with CUDA' if ext['with_cuda'] else (' (CPU only)' if ext['built'] else '')}"
          f"{'' if ext['built'] else ' - ' + str(ext['error'])}")
    tri = f"triton {data['triton']}" if data["triton"] else f"triton: not available - {data['triton_error']}"
    print(tri + ("  (TRITON_INTERPRET=1: kernels run in the interpreter)" if data["triton_interpret"] else ""))
    gpu = data["gpu"]
    print(f"gpu: {gpu['name']} x{gpu['count']} ({gpu['memory_gib']} GiB, sm_{gpu['capability']})" if gpu
          else "gpu: none (CUDA not available to torch)")
    if data["backend_env"]:
        print(f"FASTPURIFY_BACKEND={data['backend_env']}")
    print("defenses: " + "; ".join(f"{k}: {v}" for k, v in data["defenses"].items()))
    for op, per in data["ops"].items():
        print(f"\nop {op}: {per['doc']}")
        for dev in ("cpu", "cuda"):
            if dev not in per:
                continue
            print(f"  {dev} tensors (auto -> {per[dev + '_auto']}):")
            for b, st in per[dev].items():
                print(f"    {b:7s} {'yes' if st['available'] else 'no '}  {'' if st['available'] else st['reason']}")
    return 0


# --------------------------------------------------------------------------------------------------------
# evaluate
# --------------------------------------------------------------------------------------------------------


def _device(name: Optional[str]):
    import torch

    if name in (None, "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dev = torch.device(name)
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"--device {name!r}: CUDA is not available to torch {torch.__version__}; use --device cpu")
    return dev


def _print_eval(title: str, r) -> None:
    line = f"{title}: ACC {r.acc:6.2f} %  ({r.n_correct}/{r.n_clean})"
    if r.asr is not None:
        line += f"   ASR {r.asr:6.2f} %  ({r.n_attack_success}/{r.n_triggered})   RA {r.ra:6.2f} %"
    print(line)


def _cmd_evaluate(args) -> int:
    from .data import load_cifar10
    from .metrics import evaluate
    from .models.factory import load_model, model_from_args
    from .triggers import parse_trigger

    if args.record is not None:  # a BackdoorBench attack record: fastpurify/cli_record.py
        from .cli_record import cmd_evaluate_record

        return cmd_evaluate_record(args)
    spec, model_kwargs = model_from_args(args)  # cheap checks first
    if args.checkpoint is None:
        raise ValueError("evaluate needs --checkpoint FILE (or --record PATH, a BackdoorBench attack record)")
    trigger = parse_trigger(args.trigger) if args.trigger else None
    if trigger is not None and args.target is None:
        raise ValueError("--trigger needs --target T (the attack's target label)")
    device = _device(args.device)
    model = load_model(args.checkpoint, spec, model_kwargs).to(device)
    x, y = load_cifar10(args.data, split="test", count=args.count)
    t0 = time.perf_counter()
    r = evaluate(model, x, y, trigger=trigger, target=args.target, batch_size=args.batch_size, device=device)
    seconds = time.perf_counter() - t0
    if args.json:
        out = r.as_dict()
        out.update({"arch": args.arch, "checkpoint": str(args.checkpoint), "trigger": args.trigger,
                    "target": args.target, "device": str(device), "seconds": round(seconds, 3)})
        print(json.dumps(out))
    else:
        _print_eval(f"{os.path.basename(str(args.checkpoint))} on {len(y)} test images", r)
        print(f"({seconds:.1f} s on {device}; ASR and RA over the test images whose label is not {args.target})"
              if trigger is not None else f"({seconds:.1f} s on {device})")
    return 0


# --------------------------------------------------------------------------------------------------------
# purify
# --------------------------------------------------------------------------------------------------------


def _parse_value(text: str):
    """``--set`` values: JSON where it parses (numbers, true/false/null, lists, dicts), else the string."""
    low = text.strip().lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return text


def parse_sets(items: Optional[List[str]]) -> dict:
    out = {}
    for item in items or []:
        if "=" not in item or not item.split("=", 1)[0].strip():
            raise ValueError(f"--set {item!r}: expected key=value, e.g. --set lr=1e-4")
        k, v = item.split("=", 1)
        out[k.strip()] = _parse_value(v)
    return out


def _cmd_purify(args) -> int:
    from .cli_purify import cmd_purify  # the command and its checks: fastpurify/cli_purify.py

    return cmd_purify(args)


# --------------------------------------------------------------------------------------------------------
# demo
# --------------------------------------------------------------------------------------------------------


def _demo_defense_rows(args, model, trigger, xt, yt, before, device, names) -> list:
    """Run each defense on the demo model with DEMO_DEFENSES' settings; one result row per defense."""
    from . import defenses as fast_defenses
    from .data import synthetic_dataset
    from .metrics import der, evaluate, verdict
    from .reference import defenses as ref_defenses

    xc, yc = synthetic_dataset(n=args.clean_count, seed=args.seed + 1000, split="train")  # the defender's set
    rows = []
    for name in names:
        fn = getattr(ref_defenses if args.reference else fast_defenses, name)
        clean = xc if name == "bcu" else (xc, yc)  # BCU uses no labels
        result = fn(model, clean, seed=args.seed, device=device, progress=True,  # on stderr: fastpurify/_progress.py
                    **DEMO_DEFENSES[name])
        after = evaluate(result.model, xt, yt, trigger=trigger, target=args.target, device=device)
        row = {"defense": name, "path": "reference" if args.reference else fast_defenses.status()[name],
               "seconds": result.timings.get("defense"), "rounds": len(result.history), "status": result.status,
               "settings": DEMO_DEFENSES[name], "acc": after.acc, "asr": after.asr, "ra": after.ra,
               "der": der(before, after), "verdict": verdict(before, after)}
        rows.append(row)
        if not args.json:
            print(f"  {name}: done in {row['seconds']:.1f} s ({row['path']}, {row['rounds']} rounds)", flush=True)
    return rows


def _print_demo_table(before, rows) -> None:
    print()
    from .metrics import BAR

    print("| defense | path      | seconds | ACC before | ACC after | ASR before | ASR after | RA after | DER   "
          "| bar |")
    print("| ------- | --------- | ------- | ---------- | --------- | ---------- | --------- | -------- | ----- "
          "| --- |")
    for r in rows:
        path = "fast" if r["path"] == "fast path" else "reference"
        print(f"| {r['defense']:<7} | {path:<9} | {r['seconds']:7.1f} | {before.acc:10.2f} | {r['acc']:9.2f} | "
              f"{before.asr:10.2f} | {r['asr']:9.2f} | {r['ra']:8.2f} | {r['der']:5.1f} | "
              f"{'yes' if r['verdict']['met'] else 'no ':<3} |")
    print("\nACC: clean accuracy; ASR: attack success on triggered non-target images; RA: their recovered accuracy; "
          "DER: defense effectiveness rating (percent)")
    print(f"bar: the backdoor counts as removed when ASR <= {BAR['max_asr']:g} % and ACC drops by at most "
          f"{BAR['max_acc_drop']:g} points")
    for r in rows:
        print(f"  {r['defense']}: {r['verdict']['text']}")


def _cmd_demo(args) -> int:
    import torch

    from .data import load_cifar10, synthetic_dataset
    from .defenses import DEFENSES
    from .metrics import evaluate
    from .train import train_backdoored
    from .triggers import PatchTrigger

    names = [d.strip().lower() for d in _split_names(args.defenses)] or list(DEFENSES)  # spaces or commas
    for d in names:
        if d not in DEFENSES and d != "none":
            raise ValueError(f"--defenses: unknown defense {d!r}; valid: {', '.join(DEFENSES)} (or none)")
    names = [d for d in names if d != "none"]
    from .cli_purify import SMALL_CLEAN_OK, check_counts, defense_config

    check_counts(clean_count=args.clean_count, epochs=args.epochs)
    if not 0 <= args.target < NUM_CLASSES:  # a label outside the data's classes trained an 11-class model (issue 13)
        raise ValueError(f"--target {args.target}: the demo's data has {NUM_CLASSES} classes; give a label in "
                         f"[0, {NUM_CLASSES})")
    if not (math.isfinite(args.poison_rate) and 0 < args.poison_rate <= 1):
        raise ValueError(f"--poison-rate must lie in (0, 1] (the share of training images poisoned), got "
                         f"{args.poison_rate:g}")
    for name in names:  # a clean set smaller than a defense's batch would fail only after the training
        bs = getattr(defense_config(name, args.reference, None, DEMO_DEFENSES[name], "the demo"), "batch_size", None)
        if bs is not None and args.clean_count < bs and name not in SMALL_CLEAN_OK:
            raise ValueError(f"--clean-count {args.clean_count} is fewer than one batch of {name} ({bs} images in the "
                             f"demo's settings); give --clean-count {bs} or more, or leave {name} out (--defenses)")
    device = _device(args.device)
    torch.manual_seed(args.seed)
    trigger = PatchTrigger(size=4, row=27, col=27, value=1.0)
    if args.data:
        x, y = load_cifar10(args.data, split="train")
        xt, yt = load_cifar10(args.data, split="test")
        source = f"CIFAR-10 ({len(y)} training images from {args.data})"
        epochs, augment = args.epochs or 30, True
    else:
        x, y = synthetic_dataset(n=DEMO["n_train"], seed=args.seed, split="train")
        xt, yt = synthetic_dataset(n=DEMO["n_test"], seed=args.seed, split="test")
        source = f"synthetic 10-class 32x32 data ({len(y)} train / {len(yt)} test images)"
        epochs, augment = args.epochs or DEMO["epochs"], False
    if not args.json:
        print(f"fastpurify demo: backdoor a SmallVGG on {source}")
        print(f"  attack: BadNets {trigger.spec}, target {args.target}, {args.poison_rate:.0%} poisoned, "
              f"{epochs} epochs on {device}")
    t0 = time.perf_counter()
    model, _ = train_backdoored(
        "small_vgg", x, y, trigger=trigger, target=args.target, poison_rate=args.poison_rate, epochs=epochs,
        lr=DEMO["lr"], batch_size=DEMO["batch_size"], augment=augment, device=device, seed=args.seed,
        progress=True,  # on stderr: a bar on a terminal, a line per epoch in a log
    )
    train_s = time.perf_counter() - t0
    r = evaluate(model, xt, yt, trigger=trigger, target=args.target, device=device)
    if not args.json:
        _print_eval(f"backdoored model ({train_s:.0f} s training)", r)
        if names:
            print(f"purify it with {len(names)} defense(s), each on {args.clean_count} clean images "
                  f"(short demo settings: {', '.join(f'{n} ' + _fmt_settings(DEMO_DEFENSES[n]) for n in names)}):")
    rows = _demo_defense_rows(args, model, trigger, xt, yt, r, device, names) if names else []
    if rows and not args.json:
        _print_demo_table(r, rows)
        print(f"total {time.perf_counter() - t0:.0f} s")
    if args.json:
        print(json.dumps({"source": source, "epochs": epochs, "train_seconds": round(train_s, 2), **r.as_dict(),
                          "clean_count": args.clean_count, "defenses": rows}, default=str))
    return 0


def _fmt_settings(d: dict) -> str:
    return "(" + ", ".join(f"{k}={v}" for k, v in d.items()) + ")"


# --------------------------------------------------------------------------------------------------------
# bench (the comparison itself is in fastpurify/bench.py)
# --------------------------------------------------------------------------------------------------------


def _split_names(items: Optional[Sequence[str]]) -> List[str]:
    return [n for item in items or [] for n in str(item).split(",") if n.strip()]


def _cmd_bench(args) -> int:
    """``fastpurify bench``: build the workload the options name, run the comparison, print a table (or one
    JSON object with ``--json``). Raises ValueError (one line, exit 2) for bad input before any work."""
    from .bench import (
        BENCH_SETTINGS,
        SHARED_CHECKPOINTS,
        SYNTHETIC,
        _check_arch,
        check_defenses,
        check_settings,
        environment,
        parse_defense_sets,
        real_workload,
        render_markdown,
        resolve_checkpoint,
        run_comparison,
        synthetic_workload,
    )
    from .defenses import DEFENSES

    device = _device(args.device)
    names = check_defenses(_split_names(args.defenses) or list(DEFENSES))
    from .bench_compile import parse_providers

    providers = parse_providers(args.providers)
    from .models.factory import bench_model

    build_model = bench_model(args)  # --arch / --model / --model-kwargs, checked before any work
    if build_model is None:
        _check_arch(args.arch)
    for opt in ("epochs", "batch_size", "n_clean", "n_eval", "n_train", "train_epochs", "repeats"):
        v = getattr(args, opt, None)
        if v is not None and v < 1:
            raise ValueError(f"--{opt.replace('_', '-')} must be >= 1, got {v}")
    overrides = parse_defense_sets(args.set)
    for d in names:
        per = overrides.setdefault(d, {})
        if args.epochs is not None:
            per["epochs"] = args.epochs
        if args.batch_size is not None:
            per["batch_size"] = args.batch_size
    real = [o for o in ("data", "trigger", "target") if getattr(args, o) is not None]
    if args.checkpoint is None and real:
        raise ValueError(f"--{', --'.join(real)}: only with --checkpoint CKPT (they describe a checkpoint's "
                         "workload; without one the bench trains a backdoored model on synthetic data)")
    if args.checkpoint is not None:
        needed = ("data",) if str(args.checkpoint) in SHARED_CHECKPOINTS else ("data", "trigger", "target")
        missing = [o for o in needed if getattr(args, o) is None]
        if missing:
            raise ValueError(f"--checkpoint {args.checkpoint} needs " + ", ".join(
                {"data": "--data DIR (the folder holding cifar-10-batches-py)", "trigger": "--trigger SPEC",
                 "target": "--target T"}[m] for m in missing))
        if args.n_train is not None or args.train_epochs is not None:
            raise ValueError("--n-train / --train-epochs size the synthetic workload; a --checkpoint is already "
                             "trained")
    from .cli_purify import defense_config

    for d in names:  # unknown setting names and bad values fail here, before any training or loading
        check_settings(d, overrides.get(d, {}))
        defense_config(d, True, None, {**BENCH_SETTINGS[d], **overrides.get(d, {})}, "--set/--epochs/--batch-size")

    progress = sys.stderr.isatty()
    if args.checkpoint is not None:
        path, spec, target = resolve_checkpoint(args.checkpoint, args.data, args.trigger, args.target)
        wl = real_workload(path, args.data, trigger=spec, target=target, arch=args.arch,
                           n_clean=args.n_clean or 2500, n_eval=args.n_eval,
                           model=build_model() if build_model is not None else None)
    else:
        sizes = {k: getattr(args, k) for k in ("n_train", "train_epochs", "n_clean", "n_eval")
                 if getattr(args, k) is not None}
        if not args.json:
            print(f"fastpurify bench: backdooring a {args.arch} on synthetic data (BadNets 4x4 patch, target "
                  f"{SYNTHETIC['target']}) on {device} ...", flush=True)
        wl = synthetic_workload(args.arch, seed=args.seed, device=device, progress=progress, **sizes)
    env = environment(device)
    if not args.json:
        print(f"workload: {wl.info['source']}; defenses {', '.join(names)}; device {device}, "
              f"{env['threads']} threads, seed {args.seed}", flush=True)
    rows = run_comparison(names, wl, overrides, seed=args.seed, progress=progress, device=device,
                          repeats=args.repeats, warmup=not args.no_warmup, providers=providers)
    if args.json:
        print(json.dumps({"workload": wl.describe(), "environment": env, "rows": rows}, default=str))
    else:
        print()
        print(render_markdown(rows))
        print(f"{env['device']}, torch {env['torch']}, {env['threads']} threads, fastpurify {env['fastpurify']}"
              + (f", commit {env['commit']}" if env["commit"] else ""))
    return 0


# --------------------------------------------------------------------------------------------------------


def _add_model_options(s, record: bool) -> None:
    """--model / --model-kwargs (any model: fastpurify/models/factory.py) and --record (fastpurify/backdoorbench.py)."""
    s.add_argument("--model", default=None, metavar="MODULE:FACTORY", help="a model of your own: the factory that "
                   "builds it, e.g. mypkg.net:build or path/to/net.py:build (or a built-in name); instead of --arch")
    s.add_argument("--model-kwargs", default=None, metavar="JSON", help="keyword arguments of the --model factory, "
                   "a JSON object, e.g. '{\"num_classes\": 10}'")
    if record:
        s.add_argument("--record", default=None, metavar="PATH", help="a BackdoorBench attack record (its folder or "
                       "attack_result.pt) instead of --checkpoint/--trigger/--target: it carries the model, the "
                       "triggered test set and the target")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="fastpurify", description="Purify backdoored PyTorch image classifiers fast.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    s = sub.add_parser("info", help="what this installation can run: versions, extension, Triton, GPU, backends")
    s.add_argument("--json", action="store_true", help="print one JSON object")
    s.set_defaults(func=_cmd_info)

    s = sub.add_parser("evaluate", help="ACC / ASR / RA of a checkpoint on the CIFAR-10 test batch")
    s.add_argument("--arch", default=None, help="built-in architecture: small_vgg (default), preact_resnet18, resnet18")
    s.add_argument("--checkpoint", default=None, help="checkpoint file (state dict, {'net': ...} or {'model': ...}, "
                                                      "or .safetensors)")
    _add_model_options(s, record=True)
    s.add_argument("--data", default=None, help="folder holding cifar-10-batches-py (default: $FASTPURIFY_DATA "
                                                "or ../shared/data)")
    s.add_argument("--trigger", default=None, help="trigger SPEC, e.g. patch:size=4,row=27,col=27,value=1 | "
                                                   "add:FILE.png | blend:FILE.png,alpha=0.2 | "
                                                   "masked:pattern=FILE.png,mask=FILE.npy")
    s.add_argument("--target", type=int, default=None, help="target label of the attack")
    s.add_argument("--count", type=int, default=None, help="evaluate on the first COUNT test images only")
    s.add_argument("--batch-size", type=int, default=500, help="images per evaluation batch (default 500)")
    s.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    s.add_argument("--json", action="store_true", help="print one JSON object (acc, asr, ra in percent, counts)")
    s.set_defaults(func=_cmd_evaluate)

    s = sub.add_parser("purify", help="purify a checkpoint on CIFAR-10 clean data and measure before/after")
    s.add_argument("defense", help="sau | ibau | awm | baerase | bcu, or auto: the measured plan of "
                                   "fastpurify.purify (fastpurify/auto.py), fitted to --time-budget")
    s.add_argument("--arch", default=None, help="built-in architecture: small_vgg (default), preact_resnet18, resnet18")
    _add_model_options(s, record=True)
    s.add_argument("--recipe", default=None, metavar="{published,robust}",
                   help="the defense's settings: published (default; the paper's) or robust (fast path only, where "
                        "measured: settings that lower ASR further than the published ones, at an ACC cost; "
                        "fastpurify/recipes.py)")
    s.add_argument("--checkpoint", default=None, help="checkpoint file (required here or in --config)")
    s.add_argument("--data", default=None, help="folder holding cifar-10-batches-py")
    s.add_argument("--clean-count", type=int, default=2500, help="the defender's clean set: the first N training "
                                                                   "images (default 2500)")
    s.add_argument("--eval-count", type=int, default=None, help="evaluate on the first N test images (default all)")
    s.add_argument("--trigger", default=None, help="the attack's trigger SPEC (used only to evaluate; required here "
                                                   "or in --config)")
    s.add_argument("--target", type=int, default=None, help="the attack's target label (used only to evaluate; "
                                                            "required here or in --config)")
    s.add_argument("--reference", action="store_true", help="run the faithful eager port of the published code")
    s.add_argument("--list-options", action=ListOptionsAction,
                   help="list the defense's settings (the --set keys) with their defaults and exit; after "
                        "--reference: the reference's")
    s.add_argument("--config", default=None, metavar="FILE", help="YAML/JSON file of this command's options and "
                   "the defense's settings (keys as in the Python API; options given here win): fastpurify/config.py")
    s.add_argument("--epochs", type=int, default=None, help="the defense's rounds (default: its published schedule; "
                                                            "list them with --list-options)")
    s.add_argument("--time-budget", type=float, default=None, metavar="SECONDS",
                   help="finish within SECONDS: the schedule is fitted after a warm-up round (status and schedule say "
                        "what ran)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE",
                   help="a hyper-parameter, e.g. --set lr=1e-4; the keys: --list-options "
                        "(repeatable; BAERASE: --set target=T)")
    s.add_argument("--seed", type=int, default=0, help="seed of every random choice of the run (default 0): the same "
                                                       "seed, options and thread count give the same result")
    s.add_argument("--device", default="auto",
                   help="cpu | cuda | cuda:N | auto (default: cuda when available, else cpu)")
    s.add_argument("--out", default=None, help="save the purified state dict ({'model': ...}) to this file (on "
                                               "Ctrl-C: the last completed round's; without --out: "
                                               "purify-interrupted.pth)")
    s.add_argument("--checkpoint-every", type=int, default=None, metavar="N",
                   help="write the run's state every N rounds (to --state, default OUT.state.pt) so that an "
                        "interrupted run can go on with --resume")
    s.add_argument("--state", default=None, metavar="PATH", help="the state file of --checkpoint-every (default: "
                                                                  "every round)")
    s.add_argument("--resume", default=None, metavar="PATH", help="continue an interrupted run from its state file "
                                                                   "(give the same command and options again)")
    s.add_argument("--plot", default=None, metavar="PNG", help="draw the per-round curves and the before/after table "
                                                               "to this PNG (needs pip install fastpurify[plot])")
    s.add_argument("--json", action="store_true", help="print one JSON object (settings, status, schedule, ACC/ASR/RA "
                                                       "before and after, verdict) on stdout; progress stays on stderr")
    s.set_defaults(func=_cmd_purify)

    s = sub.add_parser("demo", help="train a backdoored SmallVGG (synthetic data by default) and measure it")
    s.add_argument("--data", default=None, help="use the CIFAR-10 files in this folder instead of synthetic data")
    s.add_argument("--epochs", type=int, default=None, help="training epochs of the backdoored model (default 8 on "
                                                            "synthetic data, 30 on CIFAR-10)")
    s.add_argument("--target", type=int, default=0, help="the attack's target label, 0..9 (default 0)")
    s.add_argument("--poison-rate", type=float, default=0.1, help="share of training images poisoned, in (0, 1] "
                                                                  "(default 0.1)")
    s.add_argument("--defenses", nargs="+", default=None, help="defenses to run after the attack, e.g. sau bcu or "
                   "sau,bcu (default: all five; 'none' only trains and measures the backdoor)")
    s.add_argument("--clean-count", type=int, default=1000, help="the defender's clean images (default 1000)")
    s.add_argument("--reference", action="store_true", help="run the faithful eager ports of the published code")
    s.add_argument("--seed", type=int, default=0, help="seed of the data, the training and the defenses (default 0)")
    s.add_argument("--device", default="auto",
                   help="cpu | cuda | cuda:N | auto (default: cuda when available, else cpu)")
    s.add_argument("--json", action="store_true", help="print one JSON object (the attack and every defense's row)")
    s.set_defaults(func=_cmd_demo)

    s = sub.add_parser("bench", help="time each defense's reference against its fast path on this machine")
    s.add_argument("--defenses", nargs="+", default=None, help="sau ibau awm baerase bcu (default: all; commas ok)")
    s.add_argument("--arch", default=None, help="synthetic workload's model: small_vgg (default) | preact_resnet18 | "
                                                       "resnet18 (with --checkpoint: its architecture)")
    s.add_argument("--batch-size", type=int, default=None, help="every defense's batch size (default: its own)")
    _add_model_options(s, record=False)
    s.add_argument("--checkpoint", default=None, help="a backdoored checkpoint (or badnets | trojan_wm, the shared "
                                                      "ones) instead of the synthetic workload")
    s.add_argument("--data", default=None, help="with --checkpoint: folder holding cifar-10-batches-py")
    s.add_argument("--trigger", default=None, help="with --checkpoint: the attack's trigger SPEC")
    s.add_argument("--target", type=int, default=None, help="with --checkpoint: the attack's target label")
    s.add_argument("--epochs", type=int, default=None, help="every defense's rounds (default: fastpurify.bench."
                                                            "BENCH_SETTINGS)")
    s.add_argument("--set", action="append", metavar="DEFENSE.KEY=VALUE", help="a setting, e.g. --set sau.lr=1e-4")
    s.add_argument("--n-clean", type=int, default=None, help="clean images (default 500 synthetic / 2500 CIFAR)")
    s.add_argument("--n-eval", type=int, default=None, help="evaluation images (default 500 synthetic / all)")
    s.add_argument("--n-train", type=int, default=None, help="synthetic training images (default 3000)")
    s.add_argument("--train-epochs", type=int, default=None, help="synthetic training epochs (default 4)")
    s.add_argument("--repeats", type=int, default=1, help="timed calls per path (median; default 1)")
    s.add_argument("--no-warmup", action="store_true", help="skip the throw-away warm-up call of each path")
    s.add_argument("--providers", default="reference,fast", metavar="LIST",
                   help="comma-separated: reference (always), fast, compile (the reference given torch.compile(model), "
                        "mode default on CPU / reduce-overhead on GPU), compile-max (max-autotune-no-cudagraphs), "
                        "compile:MODE; compiled providers report compile time apart and are checked against the "
                        "reference's ACC/ASR (default: reference,fast)")
    s.add_argument("--seed", type=int, default=0, help="seed of the workload and of every run (default 0)")
    s.add_argument("--device", default="auto",
                   help="cpu | cuda | cuda:N | auto (default: cuda when available, else cpu)")
    s.add_argument("--json", action="store_true", help="print one JSON object (rows + environment)")
    s.set_defaults(func=_cmd_bench)
    sweep.add_parser(sub)  # fastpurify sweep: fastpurify/sweep.py
    from .plot import add_parser as add_plot_parser

    add_plot_parser(sub)  # fastpurify plot: fastpurify/plot.py
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # purify --config: which options the command line gave
    try:
        return args.func(args)
    except USER_ERRORS as e:
        if os.environ.get("FASTPURIFY_DEBUG") == "1":
            raise
        print(f"fastpurify: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:  # outside a defense (loading, training, evaluating): nothing to save
        if os.environ.get("FASTPURIFY_DEBUG") == "1":
            raise
        print("fastpurify: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
