"""``fastpurify evaluate --record PATH`` and ``fastpurify purify DEFENSE --record PATH``: the commands on a
BackdoorBench attack record (fastpurify/backdoorbench.py) instead of a checkpoint, a trigger spec and a target.

The record carries the model (built for its ``model_name``, or by ``--model MODULE:FACTORY``), the triggered test
images and the target(s); ``--data`` overrides its CIFAR-10 folder. ``purify`` writes the purified model back the
way BackdoorBench's defenses do, into ``record/<attack>/defense/<name>/`` (or ``--out DIR``).
"""

from __future__ import annotations

import json
import time
from typing import Optional, Tuple

from .cli import _device, _print_eval


def _record_model(args) -> Tuple[Optional[str], Optional[dict]]:
    """``(model, model_kwargs)`` for ``read_record`` from ``--model`` / ``--model-kwargs``; the options a record
    replaces are errors."""
    from .models.factory import ModelSpecError, import_factory, is_builtin, parse_model_kwargs

    given = [f"--{o}" for o in ("checkpoint", "trigger", "target", "arch") if getattr(args, o, None) is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: not with --record (the record carries the model, its triggered test "
                         "images and the target; a model of your own for its weights: --model MODULE:FACTORY)")
    if args.model_kwargs is not None and args.model is None:
        raise ModelSpecError("--model-kwargs needs --model MODULE:FACTORY (the factory it is passed to)")
    kwargs = parse_model_kwargs(args.model_kwargs) if args.model_kwargs is not None else None
    if args.model is not None and not is_builtin(args.model):
        import_factory(args.model)  # a bad spec fails now, before the record is read
    return args.model, kwargs


def _describe(rec) -> str:
    targets = rec.targets
    return (f"{rec.attack} ({rec.model_name}): {len(rec.clean_test[1])} test images, {len(rec.bd_y)} triggered "
            f"(target{'s' if len(targets) > 1 else ''} {', '.join(map(str, targets[:5]))}"
            f"{', ...' if len(targets) > 5 else ''})")


def cmd_evaluate_record(args) -> int:
    """``fastpurify evaluate --record PATH``: ACC on the clean test images, ASR/RA on the record's triggered ones."""
    from .backdoorbench import read_record

    model, model_kwargs = _record_model(args)
    if args.count is not None and args.count < 1:
        raise ValueError(f"--count must be >= 1, got {args.count}")
    device = _device(args.device)
    rec = read_record(args.record, args.data, model=model, model_kwargs=model_kwargs, clean_count=0,
                      eval_count=args.count)
    t0 = time.perf_counter()
    r = rec.evaluate(device=device, batch_size=args.batch_size)
    seconds = time.perf_counter() - t0
    if args.json:
        print(json.dumps({**r.as_dict(), **rec.describe(), "device": str(device), "seconds": round(seconds, 3)}))
    else:
        _print_eval(_describe(rec), r)
        print(f"({seconds:.1f} s on {device}; ASR: predicted the backdoor label, RA: the original label, over the "
              "record's triggered test images)")
    return 0


def cmd_purify_record(args) -> int:
    """``fastpurify purify DEFENSE --record PATH``: purify the record's model on its clean training images, measure
    it before and after on its test images, and write the result back into the record (or ``--out DIR``)."""
    from . import defenses as fast_defenses
    from .backdoorbench import DEFENSE_NAMES, read_record, result_folder, write_result
    from .cli_purify import _check_purify, _interrupted, report, run_defense
    from .defenses import Interrupted
    from .metrics import der

    if getattr(args, "config", None):  # --config FILE fills the options not given (fastpurify/config.py)
        from .config import apply_purify_config

        apply_purify_config(args, getattr(args, "argv", None) or [])
    model, model_kwargs = _record_model(args)
    kwargs = _check_purify(args)  # every check that needs no model or data, before any loading
    name = args.defense.lower()
    label = DEFENSE_NAMES.get(name, name)
    result_folder(args.record, label, args.out)  # a folder that cannot take the result fails now, not after the run
    device = _device(args.device)
    rec = read_record(args.record, args.data, model=model, model_kwargs=model_kwargs, clean_count=args.clean_count,
                      eval_count=args.eval_count)
    args.arch = model or rec.model_name  # what a file saved on Ctrl-C records
    kwargs.setdefault("normalization", rec.normalization)  # BackdoorBench's models see normalised inputs
    x, y = rec.clean_train
    try:  # progress on stderr, as purify shows it (a bar on a terminal, lines in a log); stdout stays clean
        result = run_defense(name, rec.model.to(device), x, y, reference=args.reference, seed=args.seed,
                             device=device, progress=True, **kwargs)
    except Interrupted as e:
        return _interrupted(args, name, e.result, kwargs)
    t0 = time.perf_counter()
    before = rec.evaluate(device=device)
    after = rec.evaluate(result.model, device=device)
    eval_s = time.perf_counter() - t0 + result.timings.get("eval", 0.0)
    rating = der(before, after)
    folder = write_result(result, rec, after, before=before, name=label, out_dir=args.out,
                          info={"der": rating, "seed": args.seed, "device": str(device), "reference": args.reference,
                                "clean_count": len(y), "eval_count": len(rec.clean_test[1])})
    out = {
        "defense": name, "path": "reference" if args.reference else fast_defenses.status()[name],
        **rec.describe(), "clean_count": len(y),
        "before": {k: before.as_dict()[k] for k in ("acc", "asr", "ra")},
        "after": {k: after.as_dict()[k] for k in ("acc", "asr", "ra")},
        "der": rating, "defense_seconds": result.timings.get("defense"), "eval_seconds": eval_s,
        "status": result.status, "rounds": len(result.history), "schedule": result.schedule,
        "config": result.config, "device": str(device), "seed": args.seed, "out": str(folder),
        "state": kwargs.get("checkpoint"), "history": result.history,
    }
    return report(args, out, before, after, _describe(rec))
