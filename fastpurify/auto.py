"""``fastpurify.purify``: one call that purifies without knowing the attack.

It runs a *plan* — a sequence of (defense, recipe) steps, each on the model the step before returned — chosen
from the measurements in benchmarks/results/cpu-amd-epyc-2t/quality.md and zoo.md (:data:`PLAN` says which and
why), fitted to an optional time budget, and returns the usual :class:`~fastpurify.PurifyResult` with what it
ran in ``info["steps"]``.

Time budget: each step gets the budget that remains when it starts, less what the steps after it are
estimated to need (their share of the plan's relative cost, :data:`PLAN`), so the first step cannot eat the
whole budget; the last step gets everything that remains. A step that cannot make one useful update in its
share raises :class:`~fastpurify.TimeBudgetError` for a one-step plan; in a longer plan the steps after a
budget-limited step are skipped and the result's status is ``"budget_exhausted"`` (never ``"completed"``).

Example::

    >>> import fastpurify                                                     # doctest: +SKIP
    >>> result = fastpurify.purify(model, (x, y), time_budget=600)
    >>> result.info["steps"]        # [{'defense': 'ibau', 'recipe': 'robust', 'status': 'completed', ...}]
"""

from __future__ import annotations

import time
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

from torch import nn

from .defenses import DEFENSES, PurifyResult, TimeBudgetError
from .recipes import recipe_settings

__all__ = ["PLAN", "purify"]

#: The default plan: ``(defense, recipe, relative cost)`` steps (the cost splits a time budget between them).
#: I-BAU with its robust recipe is the one measured to meet the bar on both shared checkpoints (chosen on validation
#: images of data_batch_1; on the test set, 3 seeds: badnets ACC / ASR 82.82 / 4.23 %, trojan_wm 82.98 / 4.62 %,
#: from the published 9.3 / 18.5 % ASR; benchmarks/results/cpu-amd-epyc-2t/quality.md) and the models trained
#: here (zoo.md). AWM meets the bar on the watermark checkpoint but leaves 93 % ASR on the patch one.
PLAN: Tuple[Tuple[str, str, float], ...] = (("ibau", "robust", 1.0),)

# Options of purify() passed to every step unchanged.
_SHARED = ("normalization", "num_classes", "backend", "device", "seed", "check_range", "max_images", "progress")


def _check_plan(plan) -> List[Dict[str, Any]]:
    """The plan as ``[{"defense", "recipe", "cost", "settings"}]``; a step is ``"ibau"``, ``(defense, recipe)``,
    ``(defense, recipe, cost)`` or a dict with those keys and optional ``settings`` (the defense's
    hyper-parameters, over the recipe's)."""
    if isinstance(plan, (str, bytes)) or not isinstance(plan, Sequence) or not plan:
        raise TypeError(f"plan must be a non-empty sequence of (defense, recipe[, cost]) steps, got {plan!r}")
    steps = []
    for i, step in enumerate(plan):
        if isinstance(step, str):
            step = {"defense": step}
        elif isinstance(step, (tuple, list)) and len(step) in (2, 3):
            step = dict(zip(("defense", "recipe", "cost"), step))
        if not isinstance(step, dict) or "defense" not in step or set(step) - {"defense", "recipe", "cost", "settings"}:
            raise TypeError(f"plan step {i} must be a defense name, (defense, recipe), (defense, recipe, cost) or a "
                            f"dict with defense, recipe, cost, settings; got {step!r}")
        d, r = step["defense"], step.get("recipe", "published")
        cost, settings = step.get("cost", 1.0), step.get("settings") or {}
        if d not in DEFENSES:
            raise ValueError(f"plan step {i}: unknown defense {d!r}; valid: {', '.join(DEFENSES)}")
        recipe_settings(d, r)  # an unknown recipe, or a robust one the defense lacks, is an error here
        if isinstance(cost, bool) or not isinstance(cost, (int, float)) or not cost > 0:
            raise ValueError(f"plan step {i}: the relative cost must be a number > 0, got {cost!r}")
        if not isinstance(settings, dict):
            raise TypeError(f"plan step {i}: settings must be a dict of the defense's hyper-parameters, "
                            f"got {settings!r}")
        steps.append({"defense": d, "recipe": r, "cost": float(cost), "settings": dict(settings)})
    return steps


def _labelled(clean_data: Any) -> bool:
    return isinstance(clean_data, (tuple, list)) and len(clean_data) == 2


def purify(model: nn.Module, clean_data: Any, time_budget: Optional[float] = None, *,
           plan: Optional[Sequence[Any]] = None, eval_data: Any = None, eval_every: int = 1, seed: int = 0,
           inplace: bool = False, progress: bool = True, clock: Optional[Callable[[], float]] = None,
           **options: Any) -> PurifyResult:
    """Purify ``model`` with the plan the measurements support (:data:`PLAN`), within ``time_budget`` seconds.

    ``clean_data``: labelled clean images ``(x, y)`` (x N×C×H×W in [0, 1]) or a DataLoader of such pairs, as the
    defenses take them. ``plan``: your own sequence of ``(defense, recipe)`` steps instead (e.g.
    ``[("ibau", "robust"), ("awm", "published")]``). ``options``: the common options every defense takes
    (``device``, ``normalization``, ``num_classes``, ``backend``, ``check_range``, ``max_images``);
    hyper-parameters belong to a single defense, so call that defense to set them. ``eval_data`` is evaluated
    after every round of every step (``history`` says which step a round belongs to).

    Returns a :class:`~fastpurify.PurifyResult` with ``defense="auto"``, the rounds of every step in
    ``history`` (each with ``step`` and ``defense``), ``timings`` summed over the steps, ``config`` =
    ``{"plan": [...]}``, and ``info["steps"]``: per step its defense, recipe, status, rounds, seconds and
    configuration. ``clock``: the clock of the budget (default ``time.perf_counter``; tests inject one). The
    model you gave is not changed unless ``inplace=True`` (then only by a run that succeeds).
    """
    steps = _check_plan(PLAN if plan is None else plan)
    unknown = sorted(set(options) - set(_SHARED))
    if unknown:
        raise TypeError(f"purify: unknown option(s) {unknown}; it takes {', '.join(_SHARED)} (hyper-parameters "
                        "belong to one defense: call fastpurify.<defense>(..., recipe=...) to set them)")
    if not isinstance(inplace, bool):
        raise TypeError(f"inplace must be True or False, got {inplace!r}")
    if time_budget is not None and (isinstance(time_budget, bool) or not isinstance(time_budget, (int, float))
                                    or not time_budget > 0 or time_budget != time_budget):
        raise ValueError(f"time_budget must be a positive number of seconds (or None), got {time_budget!r}")
    if not _labelled(clean_data) and any(st["defense"] != "bcu" for st in steps) and not _is_loader(clean_data):
        raise ValueError("purify needs labelled clean images (x, y): its plan "
                         f"({', '.join(st['defense'] + ' ' + st['recipe'] for st in steps)}) trains on labels. "
                         "For unlabelled images "
                         "call fastpurify.bcu(model, x) (label-free; it does not meet the bar on the shared "
                         "checkpoints: benchmarks/results/cpu-amd-epyc-2t/quality.md)")
    from . import defenses

    clock = clock if clock is not None else time.perf_counter
    start = clock()
    history: List[Dict[str, Any]] = []
    timings: Dict[str, float] = {}
    info_steps: List[Dict[str, Any]] = []
    # with inplace=True the later steps change your model too: a failure in one of them puts the weights you gave
    # back (the first step restores them itself)
    given = {k: v.detach().clone() for k, v in model.state_dict().items()} if inplace and len(steps) > 1 else None
    current = model
    status = "completed"
    for i, st in enumerate(steps):
        d, r, cost = st["defense"], st["recipe"], st["cost"]
        kw: Dict[str, Any] = dict(st["settings"], **options, seed=seed + i, progress=progress, recipe=r)
        if clock is not time.perf_counter:
            kw["clock"] = clock
        if eval_data is not None:
            kw.update(eval_data=eval_data, eval_every=eval_every)
        if time_budget is not None:
            left = time_budget - (clock() - start)
            later = sum(s["cost"] for s in steps[i + 1:])
            share = left * cost / (cost + later) if later else left
            if share <= 0:
                info_steps.append({"defense": d, "recipe": r, "status": "skipped (time budget)"})
                status = "budget_exhausted"
                continue
            kw["time_budget"] = share
        data = clean_data if d != "bcu" or not _labelled(clean_data) else clean_data[0]
        # the first step works on a copy (or on your model, with inplace=True: restored if it fails); the steps
        # after it on the previous step's result, which is already a copy
        kw["inplace"] = inplace if i == 0 else True
        try:
            res = getattr(defenses, d)(current, data, **kw)
        except BaseException as e:
            if not isinstance(e, TimeBudgetError) or i == 0:
                if given is not None and i > 0:
                    model.load_state_dict(given)
                if isinstance(e, TimeBudgetError):
                    plan_text = [(s["defense"], s["recipe"]) for s in steps]
                    raise TimeBudgetError(f"purify: {e} (plan {plan_text}; step 1 got "
                                          f"{kw['time_budget']:.3g} s of time_budget={time_budget:g})") from None
                raise
            info_steps.append({"defense": d, "recipe": r, "status": f"skipped ({e})"})
            status = "budget_exhausted"
            continue
        current = res.model
        history += [{**h, "step": i, "defense": d} for h in res.history]
        for k, v in res.timings.items():
            if k != "images_per_s":
                timings[k] = timings.get(k, 0.0) + v
        timings[f"step{i}_{d}"] = res.timings.get("defense", 0.0)
        info_steps.append({"defense": d, "recipe": r, "status": res.status, "rounds": len(res.history),
                           "seconds": res.timings.get("defense", 0.0), "config": res.config, "info": res.info})
        if res.status != "completed":
            status = res.status
    if all(s["status"].startswith("skipped") for s in info_steps):
        raise TimeBudgetError(f"purify: time_budget={time_budget:.3g} s left no step able to run: {info_steps}")
    config = {"plan": steps}
    return PurifyResult(model=current, history=history, timings=timings, status=status, defense="auto",
                        config=config, info={"recipe": "auto", "steps": info_steps},
                        schedule={"rounds": len(history)})


def _is_loader(data: Any) -> bool:
    return hasattr(data, "__iter__") and not hasattr(data, "shape") and not isinstance(data, (tuple, list))
