"""Reference against fast path, defense by defense, on one workload: the logic of ``fastpurify bench`` and of
``benchmarks/end_to_end.py``.

A :class:`Workload` is a backdoored model (a factory that returns a fresh copy), the defender's clean data,
held-out evaluation data with the attack's trigger and target, an optional input normalisation and the
architecture's name. :func:`synthetic_workload` trains one quickly (BadNets 4×4 white patch, target 0, 10 %
poisoned, on :func:`fastpurify.data.synthetic_dataset`); :func:`real_workload` loads a checkpoint and CIFAR-10
(``fastpurify evaluate``'s loaders and trigger specs; :data:`SHARED_CHECKPOINTS` names the two I-BAU
checkpoints of ``../shared/data``).

:func:`run_comparison` runs, for each defense, the eager reference (``fastpurify.reference.defenses.<name>``)
and then the fast path (``fastpurify.defenses.<name>``, when ``fastpurify/defenses/<name>.py`` exists; else
the row says "no fast path"), one after the other in one process, on the same input model, the same clean
data and the same seed. What each path records (seconds from ``time.perf_counter``, the GPU synchronised
before every clock read):

- ``defense_s``: ``result.timings["defense"]`` — the defense's rounds alone, as the loop helper measures them
  (evaluation excluded; the median over ``repeats`` timed calls; every value in ``defense_s_runs``);
- ``cold_start_s``: wall time of the timed call minus ``timings["defense"]`` minus ``timings["eval"]``: input
  checks, the model copy and its move to the device, the data checks (one probe forward of the model), the
  algorithm's set-up before its first round (frozen copies, masks, layer groups, generators) and the
  bookkeeping after its last one. It is the first timed call's (the one that is also evaluated);
- ``warmup_s``: wall time of a throw-away call made first (one batch of the clean data, one round, the
  shortest inner schedule: :data:`WARMUP_SETTINGS`) so that first-use costs — lazy imports, allocator
  growth, Triton compilation, cuDNN autotuning, CUDA-graph capture — land here and not in ``defense_s``;
  ``None`` with ``warmup=False``;
- ``eval_s``: a separate :func:`fastpurify.metrics.evaluate` of the input model before and of the purified
  model after the defense (clean and triggered evaluation data), timed apart from the defense;
- ``before`` / ``after`` (ACC, ASR, RA in percent) and ``der``. ``before`` is measured again before the fast
  path on the same input model, so equal values also show that the reference left its input untouched.

``speedup`` is ``reference defense_s / fast defense_s``; ``agree`` says whether the fast path's ACC and ASR
after the defense lie within ±1 point of the reference's (``specs/evaluation.md``).

A third kind of provider, ``providers=[..., "compile"]`` (``fastpurify bench --providers reference,fast,compile``),
is what a user would try first to make a reference fast: the reference defense, unchanged, given
``torch.compile(model)`` (modes ``default`` / ``max-autotune-no-cudagraphs`` on a CPU, ``reduce-overhead`` on a
GPU). The model is compiled, not the reference's step functions: those are host syncs, boolean-mask indexing and
``backward()`` calls between model calls, each a graph break, while the model is where the compute is. Its first
call compiles (``compile_s`` is reported apart), the warm calls after it are timed, and its ACC/ASR are checked
against the reference's; a provider that cannot compile (I-BAU: double backward) records the exception's first
line instead of stopping the bench. :mod:`fastpurify.bench_compile` has the details.

Default settings (:data:`BENCH_SETTINGS`): each defense's published hyper-parameters with a shortened
schedule so that a run on a CPU finishes in minutes; the caller overrides any of them per defense.

Example::

    >>> from fastpurify.bench import synthetic_workload, run_comparison, render_markdown   # doctest: +SKIP
    >>> wl = synthetic_workload(n_train=3000, train_epochs=4, n_clean=500, n_eval=500)
    >>> rows = run_comparison(["ibau", "awm"], wl, settings={"ibau": {"epochs": 1}}, seed=0)
    >>> print(render_markdown(rows))
"""

from __future__ import annotations

import copy
import dataclasses
import os
import re
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import Tensor, nn

from .defenses import DEFENSES

#: Per-defense settings of a bench run: the published hyper-parameters except for the schedule, shortened so
#: that reference + fast path of all five finish in minutes on a CPU for the synthetic workload (500 clean
#: images) and in about an hour on 2 CPU cores for a real checkpoint with 2,500 clean images. A speed-up is a
#: ratio of per-round work, which a shorter schedule keeps; the purification a short schedule reaches is
#: weaker than the published one (benchmarks/quality.py measures that).
BENCH_SETTINGS: Dict[str, Dict[str, Any]] = {
    "sau": {"epochs": 1},  # published 100 rounds; each one PGD (5 steps) + one unlearning step per batch
    "ibau": {"epochs": 1},  # published 5 rounds (perturbation pass + hypergradient pass, K = 5)
    "awm": {"epochs": 1},  # published 20 rounds (trigger recovery + mask update, inner = 5)
    "baerase": {"epochs": 1, "recovery_epochs": 2},  # published 10 + 10; the target is the workload's (below)
    "bcu": {"epochs": 5},  # published 100 distillation epochs; the cosine schedule keeps T_max = 100
}
#: Keys filled from the workload when the caller does not give them: BAERASE is told the attack's target, as the
#: demo and benchmarks/quality.py do (``target=None`` in the settings asks for detection: a recovery for
#: every class).
FROM_WORKLOAD = {"baerase": ("target",)}

#: The throw-away warm-up call: one round over one batch, the shortest inner schedules.
WARMUP_SETTINGS: Dict[str, Dict[str, Any]] = {
    "sau": {"epochs": 1},
    "ibau": {"epochs": 1},
    "awm": {"epochs": 1, "inner": 1},
    "baerase": {"epochs": 1, "recovery_epochs": 1},
    "bcu": {"epochs": 1},
}

#: The two real backdoored checkpoints of ``../shared/data`` (see its README): file, trigger spec, target.
SHARED_CHECKPOINTS: Dict[str, Tuple[str, str, int]] = {
    "badnets": ("ibau/badnets_8_02_ckpt.pth", "patch:size=4,row=27,col=27,value=1", 8),
    "trojan_wm": ("ibau/trojan_wm_2_02_ckpt.pth", "add:{data}/ibau/trojan_wm.png", 2),
}

#: The synthetic workload's defaults: a backdoored SmallVGG trains to ACC and ASR above 85 % in about half a
#: minute on 2 CPU cores (the test suite's fixture, tests/conftest.py).
SYNTHETIC = {"n_train": 3000, "train_epochs": 4, "n_clean": 500, "n_eval": 500, "target": 0, "poison_rate": 0.1}

ARCHS = ("small_vgg", "preact_resnet18", "resnet18")


@dataclass
class Workload:
    """What a comparison runs on. ``model_factory()`` returns a fresh backdoored model (eval mode, CPU);
    ``clean`` is the defender's ``(x, y)`` (BCU gets ``x`` only); ``eval_x``/``eval_y`` with ``trigger`` and
    ``target`` measure ACC/ASR/RA; ``normalization`` is ``(mean, std)`` for models that expect normalised
    inputs (None: inputs in [0, 1])."""

    name: str
    arch: str
    model_factory: Callable[[], nn.Module]
    clean: Tuple[Tensor, Tensor]
    eval_x: Tensor
    eval_y: Tensor
    trigger: Callable[[Tensor], Tensor]
    target: int
    normalization: Optional[Tuple[Sequence[float], Sequence[float]]] = None
    info: Dict[str, Any] = field(default_factory=dict)

    def describe(self) -> Dict[str, Any]:
        return {"name": self.name, "arch": self.arch, "clean_count": int(self.clean[0].shape[0]),
                "eval_count": int(self.eval_x.shape[0]), "target": self.target,
                "trigger": portable_text(getattr(self.trigger, "spec", repr(self.trigger))),
                "normalization": self.normalization, **self.info}


# --------------------------------------------------------------------------------------------------------
# Workloads
# --------------------------------------------------------------------------------------------------------


def _positive(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def _check_arch(arch: str) -> str:
    if arch not in ARCHS:
        raise ValueError(f"unknown architecture {arch!r}; valid names: {', '.join(ARCHS)}")
    return arch


def synthetic_workload(arch: str = "small_vgg", *, n_train: int = SYNTHETIC["n_train"],
                       train_epochs: int = SYNTHETIC["train_epochs"], n_clean: int = SYNTHETIC["n_clean"],
                       n_eval: int = SYNTHETIC["n_eval"], seed: int = 0, device=None,
                       progress: bool = False) -> Workload:
    """Backdoor ``arch`` on ``n_train`` synthetic images (BadNets 4×4 white patch at rows/cols 27..30, target
    0, 10 % poisoned, SGD lr 0.01, no augmentation: random crops move the corner patch) for ``train_epochs``
    epochs; the defender gets a disjoint draw of ``n_clean`` images, the evaluation ``n_eval`` test-split
    images. Training runs once; the factory returns copies of the trained model.

    Shapes: clean ``x`` n_clean×3×32×32 in [0, 1], ``y`` n_clean labels in 0..9.
    """
    from .data import synthetic_dataset
    from .train import train_backdoored
    from .triggers import PatchTrigger

    _check_arch(arch)
    for name, v in (("n_train", n_train), ("train_epochs", train_epochs), ("n_clean", n_clean),
                    ("n_eval", n_eval)):
        _positive(name, v)
    trigger = PatchTrigger(size=4, row=27, col=27, value=1.0)
    x, y = synthetic_dataset(n=n_train, seed=seed, split="train")
    t0 = time.perf_counter()
    model, _ = train_backdoored(arch, x, y, trigger=trigger, target=SYNTHETIC["target"],
                                poison_rate=SYNTHETIC["poison_rate"], epochs=train_epochs, lr=0.01, augment=False,
                                device=device, seed=seed, progress=progress)
    train_s = time.perf_counter() - t0
    model = model.cpu().eval()
    xc, yc = synthetic_dataset(n=n_clean, seed=seed + 1000, split="train")
    xt, yt = synthetic_dataset(n=n_eval, seed=seed, split="test")
    return Workload(
        name=f"synthetic-{arch}", arch=arch, model_factory=lambda: copy.deepcopy(model), clean=(xc, yc), eval_x=xt,
        eval_y=yt, trigger=trigger, target=SYNTHETIC["target"],
        info={"source": f"synthetic 10-class data: {n_train} training images (epochs={train_epochs}, "
                        f"{SYNTHETIC['poison_rate']:.0%} poisoned), {n_clean} clean, {n_eval} evaluation images",
              "n_train": n_train, "train_epochs": train_epochs, "train_seconds": round(train_s, 2)})


def resolve_checkpoint(checkpoint: Union[str, os.PathLike], data: Union[str, os.PathLike],
                       trigger: Optional[str] = None, target: Optional[int] = None) -> Tuple[Path, str, int]:
    """``badnets`` / ``trojan_wm`` (the shared checkpoints under ``data``) or a path with its trigger spec and
    target; returns ``(path, trigger spec, target)``."""
    key = str(checkpoint)
    if key in SHARED_CHECKPOINTS:
        rel, spec, tgt = SHARED_CHECKPOINTS[key]
        return Path(data) / rel, trigger or spec.format(data=data), tgt if target is None else target
    if trigger is None or target is None:
        raise ValueError(f"checkpoint {key!r}: give its --trigger SPEC and --target T (or name one of "
                         f"{', '.join(SHARED_CHECKPOINTS)})")
    return Path(key), trigger, target


def real_workload(checkpoint: Union[str, os.PathLike], data: Union[str, os.PathLike], *, trigger: str, target: int,
                  arch: str = "small_vgg", n_clean: Optional[int] = 2500, n_eval: Optional[int] = None,
                  normalization=None, model: Optional[nn.Module] = None) -> Workload:
    """A checkpoint (``fastpurify.models.load_checkpoint``) with CIFAR-10 from ``data``: the defender's clean
    set is the first ``n_clean`` training images (``data_batch_1`` first), the evaluation the first ``n_eval``
    of ``test_batch`` (None: all 10,000); ``trigger`` is a spec of :func:`fastpurify.triggers.parse_trigger`.
    ``model``: a model of any architecture to load the checkpoint into (``arch`` then only names it)."""
    from .data import load_cifar10
    from .models import load_checkpoint
    from .triggers import parse_trigger

    if model is None:
        _check_arch(arch)
    trig = parse_trigger(trigger)  # cheap checks first
    if isinstance(target, bool) or not isinstance(target, int) or target < 0:
        raise ValueError(f"target must be a class index >= 0, got {target!r}")
    for name, v in (("n_clean", n_clean), ("n_eval", n_eval)):
        if v is not None:
            _positive(name, v)
    model = load_checkpoint(checkpoint, arch=arch, model=model).eval()
    x, y = load_cifar10(data, split="train", count=n_clean)
    xt, yt = load_cifar10(data, split="test", count=n_eval)
    return Workload(name=Path(checkpoint).name, arch=arch, model_factory=lambda: copy.deepcopy(model), clean=(x, y),
                    eval_x=xt, eval_y=yt, trigger=trig, target=target, normalization=normalization,
                    info={"source": f"{portable_path(checkpoint)} with CIFAR-10 from {portable_path(data)}",
                          "checkpoint": portable_path(checkpoint), "trigger_spec": portable_text(trigger)})


# Recorded paths (result files, tables, ``--json`` output) are relative to the repository, so that committed
# results do not carry the absolute paths of the machine they ran on (issue 13: /work/..., /root/...).
REPO = Path(__file__).resolve().parents[1]
# An absolute path inside a text: a "/" at the start or after a space, quote or one of :=,( (a trigger spec
# "add:/x.png", an option "--out=/x"), not after another "/" (a URL), up to a space, quote or one of ,;()
_ABSOLUTE = re.compile(r"(?<![^\s:=,(\"'`])/(?!/)[^\s,;()\"'`]+")


def portable_path(path: Union[str, os.PathLike]) -> str:
    """``path`` as a result records it: relative to the repository when it lies inside it or in a folder beside it
    (``benchmarks/results/x``, ``../shared/data/ibau/badnets_8_02_ckpt.pth``); elsewhere only its last two
    parts after ``.../``. A relative path is kept as given.

    Example::

        >>> portable_path(REPO.parent / "shared" / "data")
        '../shared/data'
    """
    p = Path(path)
    if not p.is_absolute():
        return str(path)
    rel = os.path.relpath(p, REPO)
    if not rel.startswith(os.path.join(os.pardir, os.pardir)):
        return Path(rel).as_posix()
    return ".../" + "/".join(p.parts[-2:])


def portable_text(text: str) -> str:
    """``text`` with every absolute path in it made :func:`portable_path` (a command line, a trigger spec)."""
    return _ABSOLUTE.sub(lambda m: portable_path(m.group(0).rstrip(".:")) + m.group(0)[len(m.group(0).rstrip(".:")):],
                         text)


# --------------------------------------------------------------------------------------------------------
# Settings
# --------------------------------------------------------------------------------------------------------


def _config_class(name: str):
    import importlib

    mod = importlib.import_module(f"fastpurify.reference.defenses.{name}")
    return getattr(mod, f"{name.upper()}Config")


def check_defenses(defenses: Sequence[str]) -> List[str]:
    names = [str(d).strip().lower() for d in defenses]
    if not names:
        raise ValueError(f"no defense given; valid: {', '.join(DEFENSES)}")
    for d in names:
        if d not in DEFENSES:
            raise ValueError(f"unknown defense {d!r}; valid: {', '.join(DEFENSES)}")
    return list(dict.fromkeys(names))


def check_settings(name: str, settings: Mapping[str, Any]) -> Dict[str, dataclasses.Field]:
    """Raise ValueError naming the valid hyper-parameters when ``settings`` holds a key that ``name``'s
    reference configuration does not have; return its fields."""
    valid = {f.name: f for f in dataclasses.fields(_config_class(name))}
    unknown = sorted(set(settings) - set(valid))
    if unknown:
        raise ValueError(f"{name}: unknown setting(s) {unknown}; valid: {', '.join(valid)}")
    return valid


def resolve_settings(name: str, workload: Workload, overrides: Optional[Mapping[str, Any]] = None) -> Dict[str, Any]:
    """:data:`BENCH_SETTINGS` of ``name`` updated with ``overrides``; keys of :data:`FROM_WORKLOAD` not given
    are taken from the workload; a ``batch_size`` (given or default) larger than the clean set is lowered to
    its size (recorded in the returned settings). Unknown keys are an error naming the valid ones."""
    settings = {**BENCH_SETTINGS[name], **dict(overrides or {})}
    valid = check_settings(name, settings)
    for key in FROM_WORKLOAD.get(name, ()):
        settings.setdefault(key, getattr(workload, key))
    n = int(workload.clean[0].shape[0])
    bs = settings.get("batch_size", valid["batch_size"].default if "batch_size" in valid else None)
    if isinstance(bs, int) and bs > n:
        settings["batch_size"] = n
    return settings


# --------------------------------------------------------------------------------------------------------
# The comparison
# --------------------------------------------------------------------------------------------------------


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _metrics(r) -> Dict[str, Optional[float]]:
    return {"acc": r.acc, "asr": r.asr, "ra": r.ra}


def _evaluate(model: nn.Module, wl: Workload, device: torch.device):
    from .metrics import evaluate

    _sync(device)
    t0 = time.perf_counter()
    r = evaluate(model, wl.eval_x, wl.eval_y, trigger=wl.trigger, target=wl.target, device=device,
                 normalization=wl.normalization)
    _sync(device)
    return r, time.perf_counter() - t0


def _clean_for(name: str, x: Tensor, y: Tensor):
    return x if name == "bcu" else (x, y)  # BCU uses no labels


def _call(fn, name: str, model: nn.Module, wl: Workload, clean, settings: Dict[str, Any], seed: int,
          device: torch.device):
    kw = dict(seed=seed, device=device, progress=False, **settings)
    if wl.normalization is not None:
        kw["normalization"] = wl.normalization
    _sync(device)
    t0 = time.perf_counter()
    result = fn(model, clean, **kw)
    _sync(device)
    return result, time.perf_counter() - t0


def _warmup(fn, name: str, model: nn.Module, wl: Workload, settings: Dict[str, Any], seed: int,
            device: torch.device) -> float:
    bs = settings.get("batch_size") or getattr(_config_class(name)(), "batch_size", 128)
    n = min(int(wl.clean[0].shape[0]), int(bs))
    x, y = wl.clean[0][:n], wl.clean[1][:n]
    _, wall = _call(fn, name, model, wl, _clean_for(name, x, y), {**settings, **WARMUP_SETTINGS[name]}, seed,
                    device)
    return wall


def _path_record(result, wall: float, before, after, eval_s: float, warmup_s: Optional[float],
                 runs: List[float]) -> Dict[str, Any]:
    from .metrics import der

    defense_s = float(result.timings["defense"])
    return {
        "defense_s": statistics.median(runs), "defense_s_runs": runs, "eval_s": eval_s,
        "cold_start_s": max(0.0, wall - defense_s - float(result.timings.get("eval", 0.0))),
        "warmup_s": warmup_s, "wall_s": wall, "status": result.status, "rounds": len(result.history),
        "images_per_s": result.timings.get("images_per_s"),
        "phases": {k: v for k, v in result.timings.items() if k not in ("defense", "eval", "images_per_s")},
        "before": _metrics(before), "after": _metrics(after),
        "der": der(before, after) if before.asr is not None else None,
    }


def _progress(progress, total: int):
    """(bar or None, callback(message)) for ``progress``: True = a tqdm bar on stderr when it is a tty;
    a callable = called with a message at each step; False/None = silent."""
    if callable(progress):
        return None, progress
    if progress and sys.stderr.isatty():
        from tqdm.auto import tqdm

        bar = tqdm(total=total, desc="bench", unit="step", file=sys.stderr, leave=False)
        return bar, lambda msg: bar.set_postfix_str(msg, refresh=True)
    return None, lambda msg: None


def run_comparison(defenses: Sequence[str], workload: Workload, settings: Optional[Mapping[str, Mapping]] = None,
                   seed: int = 0, progress: Union[bool, Callable[[str], None], None] = False, *,
                   device=None, repeats: int = 1, warmup: bool = True,
                   fast_settings: Optional[Mapping[str, Mapping]] = None,
                   providers: Sequence[str] = ("reference", "fast")) -> List[Dict[str, Any]]:
    """For each defense, the reference then the fast path on the same model copy, clean data and seed, one
    after the other in this process; one row (a dict) per defense (the module docstring says what each field
    measures).

    ``settings``: per-defense overrides of :data:`BENCH_SETTINGS` (``{"sau": {"epochs": 2}}``), applied to both
    paths; ``fast_settings``: extra options of the fast path only (``{"sau": {"precision": "bf16"}}``).
    ``repeats``: timed calls per path (interleaved reference, fast, reference, ...; ``defense_s`` is their
    median; only the first is evaluated). ``device``: default CUDA when available, else CPU. ``providers``:
    ``reference`` (always), ``fast``, and ``compile`` / ``compile-max`` / ``compile:MODE``: the reference given
    ``torch.compile(model)``, run after the other two (:mod:`fastpurify.bench_compile` says what is compiled and
    timed); their records are in ``row["compiled"]``, the fastest provider in ``row["best"]``.

    Row keys: ``defense``, ``settings``, ``fast_settings``, ``seed``, ``clean_count``, ``eval_count``,
    ``has_fast_path``, ``fast_path`` (``"fast path"`` or ``"no fast path"``), ``reference`` and ``fast`` (the
    path records; ``fast`` is None without a fast path), ``speedup``, ``agree``, ``workload``, ``device``.
    """
    from . import defenses as fast_defenses
    from .bench_compile import best_provider, compiled_providers, judge, parse_providers, run_compiled
    from .reference import defenses as ref_defenses

    names = check_defenses(defenses)
    providers = parse_providers(providers)
    compiled = compiled_providers(providers)
    _positive("repeats", repeats)
    if isinstance(seed, bool) or not isinstance(seed, int):
        raise ValueError(f"seed must be an integer, got {seed!r}")
    settings = dict(settings or {})
    fast_settings = dict(fast_settings or {})
    for key in (*settings, *fast_settings):
        check_defenses([key])
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    resolved = {n: resolve_settings(n, workload, settings.get(n)) for n in names}

    per_path = (1 if warmup else 0) + 3 + (repeats - 1)  # warm-up, evaluate before, defense, evaluate after
    total = sum(per_path * (2 if fast_defenses.FAST_PATHS.get(n) and "fast" in providers else 1) + len(compiled)
                for n in names)
    bar, say = _progress(progress, total)

    def step(msg: str) -> None:
        say(msg)
        if bar is not None:
            bar.update(1)

    rows = []
    try:
        for name in names:
            has_fast = bool(fast_defenses.FAST_PATHS.get(name))
            paths = [("reference", getattr(ref_defenses, name), resolved[name])]
            if has_fast and "fast" in providers:
                paths.append(("fast", getattr(fast_defenses, name), {**resolved[name], **fast_settings.get(name, {})}))
            model = workload.model_factory().to(dev).eval()  # the one input model of both paths
            clean = _clean_for(name, *workload.clean)
            warm, first, runs = {}, {}, {p: [] for p, _, _ in paths}
            for path, fn, cfg in paths:
                if warmup:
                    say(f"{name} {path}: warm-up")
                    warm[path] = _warmup(fn, name, model, workload, cfg, seed, dev)
                    step(f"{name} {path}: warm-up done")
            for rep in range(repeats):
                for path, fn, cfg in paths:
                    if rep == 0:
                        say(f"{name} {path}: evaluate before")
                        before, t_before = _evaluate(model, workload, dev)
                        step(f"{name} {path}: evaluated")
                    say(f"{name} {path}: defense" + (f" (repeat {rep + 1}/{repeats})" if repeats > 1 else ""))
                    result, wall = _call(fn, name, model, workload, clean, cfg, seed, dev)
                    runs[path].append(float(result.timings["defense"]))
                    step(f"{name} {path}: {result.timings['defense']:.1f} s")
                    if rep == 0:
                        say(f"{name} {path}: evaluate after")
                        after, t_after = _evaluate(result.model, workload, dev)
                        step(f"{name} {path}: evaluated")
                        first[path] = (result, wall, before, after, t_before + t_after)
                    del result
            recs = {p: _path_record(*first[p][:4], first[p][4], warm.get(p), runs[p]) for p in first}
            ref, fast = recs["reference"], recs.get("fast")
            speedup = ref["defense_s"] / fast["defense_s"] if fast and fast["defense_s"] > 0 else None
            agree = None
            if fast is not None:
                agree = all(abs(fast["after"][k] - ref["after"][k]) <= 1.0 for k in ("acc", "asr")
                            if ref["after"][k] is not None and fast["after"][k] is not None)
            comp = {}
            for prov in compiled:  # the reference again, given torch.compile(model): after the others
                say(f"{name} {prov}: compile + first call, then {repeats} warm call(s)")
                comp[prov] = run_compiled(
                    prov, lambda m, f=paths[0][1], n=name, c=clean: _call(f, n, m, workload, c, resolved[n], seed, dev),
                    model, lambda m: _evaluate(m, workload, dev), repeats, dev.type)
                judge(comp[prov], ref)
                step(f"{name} {prov}: " + (f"{comp[prov]['defense_s']:.1f} s" if comp[prov]["status"] == "ok"
                                            else comp[prov]["error"]))
            row_compiled = {"compiled": comp, "providers": providers} if compiled else {}
            rows.append({
                **row_compiled,
                "defense": name, "settings": resolved[name], "fast_settings": dict(fast_settings.get(name, {})),
                "seed": seed, "clean_count": int(workload.clean[0].shape[0]),
                "eval_count": int(workload.eval_x.shape[0]), "has_fast_path": has_fast,
                "fast_path": "fast path" if has_fast else "no fast path", "reference": ref, "fast": fast,
                "speedup": speedup, "agree": agree, "workload": workload.name, "device": str(dev),
            })
            if compiled:
                rows[-1]["best"] = best_provider(rows[-1])
    finally:
        if bar is not None:
            bar.close()
    return rows


# Rendering and environment: fastpurify/bench_report.py (re-exported here)
from .bench_report import environment, fmt_settings, render_markdown  # noqa: E402

__all__ = ["BENCH_SETTINGS", "DEFENSES", "SHARED_CHECKPOINTS", "SYNTHETIC", "WARMUP_SETTINGS", "Workload",
           "check_settings", "environment", "fmt_settings", "real_workload", "render_markdown",
           "resolve_checkpoint", "resolve_settings", "run_comparison", "synthetic_workload"]


# --------------------------------------------------------------------------------------------------------
# ``--set DEFENSE.KEY=VALUE`` of ``fastpurify bench`` and benchmarks/end_to_end.py
# --------------------------------------------------------------------------------------------------------


def parse_defense_sets(items: Optional[Sequence[str]]) -> Dict[str, Dict[str, Any]]:
    """``DEFENSE.KEY=VALUE`` items (``--set sau.epochs=2``) -> ``{"sau": {"epochs": 2}}``."""
    from .cli import parse_sets

    per: Dict[str, Dict[str, Any]] = {}
    for key, value in parse_sets(list(items or [])).items():
        d, _, k = key.partition(".")
        if not k or d.lower() not in DEFENSES:
            raise ValueError(f"--set {key}=...: expected DEFENSE.KEY=VALUE with DEFENSE one of {', '.join(DEFENSES)}, "
                             "e.g. --set sau.epochs=2")
        per.setdefault(d.lower(), {})[k] = value
    return per
