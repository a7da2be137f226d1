"""``fastpurify purify``, and the checks of a defense's options that the command line makes before any work.

Everything that needs no model or data is checked before anything is loaded (counts, the time budget, the
output and state files — with a real test write beside them, not only permission bits — and the defense's
configuration, built and validated as the defense will); the defense then checks the model and data against its
configuration before its first step, and only then is anything evaluated. Ctrl-C during the defense saves the
model of the last completed round and exits with status 130; ``--checkpoint-every`` / ``--resume`` let a long
run go on where it stopped.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import sys
import tempfile
import time
from pathlib import Path
from typing import Optional

from .cli import EXIT_INTERRUPTED, NUM_CLASSES, _device, _print_eval, parse_sets
from .defenses import Interrupted

# Where an interrupted ``purify`` without --out saves the model of its last completed round.
INTERRUPTED_FILE = "purify-interrupted.pth"
# Defenses that run on fewer clean images than one batch (run_defense(..., allow_small=True) in their modules;
# tests/test_cli.py checks this against the defenses); the others reject such a clean set.
SMALL_CLEAN_OK = ("awm",)

# Defense options that a command-line flag (or the command itself) owns: ``--set`` must not set them.
CLI_OWNED = {
    "epochs": "use --epochs N", "time_budget": "use --time-budget SECONDS", "seed": "use --seed N",
    "device": "use --device", "checkpoint": "use --state PATH (or --checkpoint-every N)",
    "checkpoint_every": "use --checkpoint-every N", "resume": "use --resume PATH",
    "progress": "the command shows progress on stderr", "inplace": "the command purifies a copy; --out saves it",
    "eval_data": "the command evaluates on the CIFAR-10 test images itself (--eval-count)",
}


def check_writable_file(path, flag: str) -> Path:
    """Fail before any work when ``path`` cannot be written: a directory, a missing folder, no permission, a
    read-only file system. Nothing is written to ``path`` itself: the probe is a temporary file beside it."""
    from .defenses._state import check_writable

    path = Path(path)
    check_writable(path, flag)
    parent = path.parent if str(path.parent) else Path(".")
    try:  # os.access says yes to root on a read-only folder or file system: only a real write tells
        fd, probe = tempfile.mkstemp(dir=parent, prefix=".fastpurify-probe-")
        os.close(fd)
        os.unlink(probe)
        if path.exists():
            with open(path, "ab"):  # append mode: opens for writing, changes nothing
                pass
    except OSError as e:
        raise ValueError(f"{flag} {str(path)!r} cannot be written ({e.strerror or e})") from None
    return path


def defense_config(name: str, reference: bool, epochs: Optional[int], hyper: dict, source: str):
    """The hyper-parameter dataclass the defense will build from ``hyper`` (and ``epochs``), built and validated
    the way the defense does it, without any model or data: a bad value fails here, before any loading."""
    from .defenses import FAST_PATHS
    from .defenses._loop import _config

    fast = FAST_PATHS[name] and not reference
    module = importlib.import_module(f"fastpurify.{'defenses' if fast else 'reference.defenses'}.{name}")
    try:
        return _config(getattr(module, f"{'Fast' if fast else ''}{name.upper()}Config"), epochs, dict(hyper), name)
    except (TypeError, ValueError) as e:
        raise type(e)(f"{e} (from {source})") from None


def check_counts(**flags) -> None:
    for flag, v in flags.items():
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")


def _check_purify(args) -> dict:
    """Everything ``purify`` can check before loading anything: the defense, every count, the time budget, the
    output and state files, and the defense's configuration (``--set`` and ``--epochs`` built into its
    hyper-parameter dataclass and validated, as the defense itself will). Returns the defense's keyword arguments
    besides the model, data, seed, device and progress."""
    from .defenses import DEFENSES
    from .defenses._run import COMMON_OPTIONS
    from .models.factory import model_from_args

    name = args.defense.lower()
    if name not in DEFENSES + ("auto",):
        raise ValueError(f"unknown defense {args.defense!r}; valid: {', '.join(DEFENSES)}, auto")
    if name == "auto":
        _check_auto(args)
    args.model_choice = model_from_args(args)  # --arch / --model / --model-kwargs: fastpurify/models/factory.py
    check_counts(clean_count=args.clean_count, eval_count=args.eval_count, epochs=args.epochs,
                 checkpoint_every=args.checkpoint_every)
    if args.target is not None and not 0 <= args.target < NUM_CLASSES:  # None: a --record carries its target
        raise ValueError(f"--target {args.target} is not a CIFAR-10 label: expected one in [0, {NUM_CLASSES})")
    if args.time_budget is not None and not (math.isfinite(args.time_budget) and args.time_budget > 0):
        raise ValueError(f"--time-budget must be a positive number of seconds, got {args.time_budget:g}")
    sets = {**getattr(args, "config_settings", {}), **parse_sets(args.set)}  # a --config file's, below --set
    for k in sets:
        if k in CLI_OWNED:
            raise ValueError(f"--set {k}=...: {CLI_OWNED[k]}")
    kwargs = {k: v for k, v in sets.items() if k in COMMON_OPTIONS}
    hyper = {k: v for k, v in sets.items() if k not in COMMON_OPTIONS}
    if getattr(args, "recipe", None) is not None:
        kwargs["recipe"] = args.recipe
    if name == "auto":
        if hyper or kwargs.get("recipe") is not None:
            raise ValueError(f"purify auto runs its own plan: it takes no --recipe or defense setting (got "
                             f"{sorted(hyper) + (['recipe'] if 'recipe' in kwargs else [])}); to set them, name a "
                             "defense instead of auto")
    else:
        from .recipes import apply_recipe

        # the recipe's settings under the ones given, checked as the defense will check them
        recipe_hyper, recipe_epochs = apply_recipe(name, kwargs.get("recipe", "published"), hyper, args.epochs,
                                                   fast_path=not args.reference)
        defense_config(name, args.reference, recipe_epochs, recipe_hyper, "--recipe/--set/--epochs")
    kwargs.update(hyper)
    if args.epochs is not None:
        kwargs["epochs"] = args.epochs
    if args.time_budget is not None:
        kwargs["time_budget"] = args.time_budget
    if getattr(args, "plot", None) is not None:  # matplotlib and the file, before any work
        from .plot import check_plot_file

        check_writable_file(check_plot_file(args.plot, "--plot"), "--plot")
    if args.out is not None and getattr(args, "record", None) is None:  # with --record: a folder (backdoorbench.py)
        check_writable_file(args.out, "--out")
    state = args.state
    if state is None and args.checkpoint_every is not None:
        if args.out is None:
            raise ValueError("--checkpoint-every needs a file for the run's state: --state PATH, or --out FILE (the "
                             "state then goes to FILE.state.pt)")
        state = f"{args.out}.state.pt"
    if state is not None:
        kwargs.update(checkpoint=str(check_writable_file(state, "--state")),
                      checkpoint_every=args.checkpoint_every or 1)
    if args.resume is not None:
        if not Path(args.resume).is_file():
            raise FileNotFoundError(f"--resume {args.resume!r}: no such file (the --state file of an earlier run)")
        kwargs["resume"] = args.resume
    return kwargs


def _check_auto(args) -> None:
    """``purify auto``: the options that belong to one defense do not apply to a plan of several."""
    given = [flag for flag, v in (("--reference", args.reference), ("--epochs", args.epochs),
                                  ("--checkpoint-every", args.checkpoint_every), ("--state", args.state),
                                  ("--resume", args.resume)) if v]
    if given:
        raise ValueError(f"purify auto runs a plan of defenses (fastpurify.purify); {', '.join(given)} belong(s) to "
                         "one defense: name the defense instead of auto")


def _save_model(path, result, args, name: str) -> None:
    """``{'model': state dict, 'arch', 'defense', ...}`` by torch.save, or a .safetensors file with the rest as its
    metadata (fastpurify.models.save_checkpoint)."""
    from .models import save_checkpoint

    extra = {"arch": args.arch, "defense": name, "reference": bool(args.reference), "config": result.config,
             "status": result.status, "rounds": result.schedule.get("rounds", len(result.history))}
    if getattr(args, "model_choice", (None, None))[1]:
        extra["model_kwargs"] = args.model_choice[1]
    save_checkpoint(path, result.model.state_dict(), extra)


def _interrupted(args, name: str, result, kwargs: dict) -> int:
    """Ctrl-C during the defense: save the model of the last completed round and say how to go on."""
    done, asked = result.schedule.get("rounds", 0), result.config.get("epochs")
    state = kwargs.get("checkpoint")
    how = (f"continue it with the same command and --resume {state}" if state and Path(state).is_file() else
           "to resume an interrupted run later, give --checkpoint-every N")
    if done == 0:
        msg = f"interrupted before the first round of {name} completed: nothing was purified, nothing written; {how}"
        path = None
    else:
        path = (args.out if getattr(args, "record", None) is None else None) or INTERRUPTED_FILE
        _save_model(path, result, args, name)
        msg = f"interrupted: saved the model after {done} of {asked} rounds of {name} to {path}; {how}"
    if args.json:
        print(json.dumps({"defense": name, "status": "interrupted", "rounds": done, "requested_rounds": asked,
                          "out": path, "state": state}))
    print(f"fastpurify: {msg}", file=sys.stderr)
    return EXIT_INTERRUPTED


def run_defense(name: str, model, x, y, *, reference: bool, seed: int, device, progress: bool, **kwargs):
    """Run defense ``name`` (its fast path, or the reference port) on ``model`` with the clean images ``x`` and
    labels ``y`` (BCU uses no labels); returns its PurifyResult. Used by ``purify`` and ``sweep``."""
    from . import defenses as fast_defenses
    from .reference import defenses as ref_defenses

    if name == "auto":  # the measured plan: fastpurify/auto.py
        from .auto import purify

        return purify(model, (x, y), seed=seed, device=device, progress=progress, **kwargs)
    fn = getattr(ref_defenses if reference else fast_defenses, name)
    return fn(model, x if name == "bcu" else (x, y), seed=seed, device=device, progress=progress, **kwargs)


def before_after(model, result, xt, yt, trigger, target: int, device):
    """ACC/ASR/RA of the input ``model`` and of ``result.model`` on ``(xt, yt)``: ``(before, after, eval seconds)``
    (the seconds include the defense's own evaluations). Used by ``purify`` and ``sweep``."""
    from .metrics import evaluate

    t0 = time.perf_counter()
    before = evaluate(model, xt, yt, trigger=trigger, target=target, device=device)
    after = evaluate(result.model, xt, yt, trigger=trigger, target=target, device=device)
    return before, after, time.perf_counter() - t0 + result.timings.get("eval", 0.0)


#: Seconds a collective of a data-parallel run may wait for the other ranks (then it fails with a clear error).
DIST_TIMEOUT_ENV = "FASTPURIFY_DIST_TIMEOUT"


def join_process_group(device):
    """Under ``torchrun`` (``WORLD_SIZE`` > 1 in the environment): join the process group — NCCL with one GPU per
    process (``cuda:LOCAL_RANK``) when the device is CUDA, gloo on CPU — with a bounded timeout
    (``FASTPURIFY_DIST_TIMEOUT`` seconds, default 300), so that a rank that died makes the others fail instead of
    hang. Returns ``(rank, device)``; ``(0, device)`` in one process or when the caller already joined."""
    import datetime

    import torch
    import torch.distributed as dist

    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return 0, device
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        raw = os.environ.get(DIST_TIMEOUT_ENV, "300")
        try:
            timeout = float(raw)
            assert timeout > 0
        except (ValueError, AssertionError):
            raise ValueError(f"{DIST_TIMEOUT_ENV}={raw!r}: expected a number of seconds > 0") from None
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=timeout))
    return dist.get_rank(), device


def cmd_purify(args) -> int:
    from . import defenses as fast_defenses
    from .config import purify_config
    from .data import load_cifar10
    from .metrics import der
    from .models.factory import load_model
    from .triggers import parse_trigger

    if getattr(args, "record", None) is not None:  # a BackdoorBench attack record: fastpurify/cli_record.py
        from .cli_record import cmd_purify_record

        return cmd_purify_record(args)
    with purify_config(args):  # --config FILE fills the options not given (fastpurify/config.py)
        kwargs = _check_purify(args)  # every check that needs no model or data, before any loading
    name = args.defense.lower()
    trigger = parse_trigger(args.trigger)
    # torchrun: every rank runs the defense on its share of each batch; only rank 0 shows progress, evaluates,
    # saves and prints (fastpurify/defenses/_dist.py)
    rank, device = join_process_group(_device(args.device))
    model = load_model(args.checkpoint, *args.model_choice).to(device)
    x, y = load_cifar10(args.data, split="train", count=args.clean_count)
    xt, yt = load_cifar10(args.data, split="test", count=args.eval_count)

    # The defense runs first: it checks the model and data against its configuration before any work (a clean
    # set smaller than one batch, a backend that cannot run), so no such error waits for an evaluation. The model
    # it was given is not modified (it works on a copy), so "before" is measured on it afterwards.
    progress = True  # on stderr (a bar on a terminal, lines in a log: fastpurify/_progress.py); stdout stays clean
    try:
        result = run_defense(name, model, x, y, reference=args.reference, seed=args.seed, device=device,
                             progress=progress, **kwargs)
    except Interrupted as e:
        return _interrupted(args, name, e.result, kwargs) if rank == 0 else EXIT_INTERRUPTED
    if rank != 0:  # rank 0 reports; the weights are the same on every rank
        return 0
    if args.out:
        _save_model(args.out, result, args, name)
    before, after, eval_s = before_after(model, result, xt, yt, trigger, args.target, device)
    out = {
        "defense": name, "path": "reference" if args.reference else fast_defenses.status().get(name, "fast path"),
        "arch": args.arch, "checkpoint": str(args.checkpoint), "clean_count": len(y), "eval_count": len(yt),
        "before": {k: before.as_dict()[k] for k in ("acc", "asr", "ra")},
        "after": {k: after.as_dict()[k] for k in ("acc", "asr", "ra")},
        "der": der(before, after), "defense_seconds": result.timings.get("defense"), "eval_seconds": eval_s,
        "status": result.status, "rounds": len(result.history), "schedule": result.schedule,
        "config": result.config, "recipe": result.info.get("recipe"), "device": str(device), "seed": args.seed,
        "out": args.out,
        "state": kwargs.get("checkpoint"), "history": result.history,
    }
    if name == "auto":  # what the plan ran
        out["steps"] = [{k: st.get(k) for k in ("defense", "recipe", "status", "rounds", "seconds")}
                        for st in result.info["steps"]]
    return report(args, out, before, after, os.path.basename(str(args.checkpoint)))


def report(args, out: dict, before, after, source: str) -> int:
    """The end of ``purify`` (also with ``--record``): the plot, then one JSON object or the human summary of
    ``out`` (the run's fields) with the before/after lines."""
    if before.asr is not None and after.asr is not None:  # the plain verdict against the bar (metrics.BAR)
        from .metrics import BAR, verdict

        out["verdict"] = {**verdict(before, after), "bar": dict(BAR)}
    if getattr(args, "plot", None) is not None:  # per-round curves and the before/after table: fastpurify/plot.py
        from .plot import plot_result

        out["plot"] = plot_result(out, args.plot)
    if args.json:
        print(json.dumps(out, default=str))
    else:
        print(f"{out['defense']} ({out['path']}) on {source}, {out['clean_count']} clean images, {out['rounds']} "
              f"rounds, {out['defense_seconds']:.1f} s on {out['device']} ({out['status']})")
        for st in out.get("steps") or ():
            secs = f", {st['seconds']:.1f} s" if st.get("seconds") is not None else ""
            print(f"  step {st['defense']} (recipe {st['recipe']}): {st['status']}"
                  + (f", {st['rounds']} rounds" if st.get("rounds") is not None else "") + secs)
        _print_eval("  before", before)
        _print_eval("  after ", after)
        print(f"  DER {out['der']:.2f} %   evaluation {out['eval_seconds']:.1f} s"
              + (f"   saved to {out['out']}" if out["out"] else ""))
        if out.get("verdict"):
            print(f"  {out['verdict']['text']}")
        if out.get("plot"):
            print(f"  plot {out['plot']}")
    return 0
