"""``fastpurify sweep study.yaml``: a grid of defenses × recipes × checkpoints × seeds, run in parallel, resumable.

A study file (YAML or JSON, read as :mod:`fastpurify.config` reads files) says what to run::

    name: badnets-study            # optional (default: the file's name without extension)
    out_dir: sweeps/badnets-study  # or --out DIR (default: sweep-<name>)
    data: ../shared/data           # CIFAR-10 (and the shared checkpoints) folder; default as for purify
    clean_count: 2500              # the defender's clean set: the first N training images
    eval_count: 1000               # evaluate on the first N test images (default: all)
    seeds: [0, 1, 2]               # or a count: 3 means seeds 0, 1, 2
    device: auto                   # auto | cpu | cuda | cuda:N
    reference: false               # true: the reference ports instead of the fast paths
    workers: 2                     # or --workers N; default: one per GPU, else one per threads_per_worker cores;
                                   # 0: the cells run one after another in the sweep's own process (debugging)
    threads_per_worker: 1          # CPU threads of each worker (default: the cores divided among the workers)
    settings: {time_budget: 120}   # settings for every defense, below each recipe's own
    defenses:
      sau:                         # recipe name: the defense's settings (keys of the Python API)
        published: {}              # ``published`` = the published defaults
        short: {epochs: 2, lr: 1.0e-4}
      ibau:                        # nothing (or {}): the published recipe only
      bcu: {fast: {epochs: 5, batch_size: 64, augment: false}}
    checkpoints:
      - badnets                    # a shared checkpoint of the data folder (badnets, trojan_wm)
      - name: mine                 # or a file with what ``fastpurify purify`` takes
        path: ckpt/mine.pth
        arch: small_vgg            # or model: MODULE:FACTORY (or path/to/net.py:FACTORY) and model_kwargs: {...}
        trigger: "patch:size=3,row=29,col=29,value=1"
        target: 0
        # data: other/folder       # this checkpoint's CIFAR-10 folder, if not the study's
      - {name: bb, record: record/badnet_0_1}  # a BackdoorBench record (fastpurify.backdoorbench): it carries its
                                               # model, trigger and target; its data: is the record's unless given

``defenses`` may also be a list of names (each with the published recipe). A recipe may set ``reference:
true`` (that recipe runs the reference port). Each cell — one defense recipe on one checkpoint with one seed —
is one ``fastpurify purify`` run (the same code) with its before/after evaluation. Everything is checked before
any cell runs: the keys, every recipe's settings (as ``--set`` is), the checkpoints' files, architectures,
triggers and targets, the data folder, a clean set smaller than a defense's batch.

Outputs in ``out_dir``: ``cells/<cell id>.json`` (one finished row per cell, written atomically),
``results.csv`` and ``results.json`` (one row per cell), ``summary.md`` (see :mod:`fastpurify.sweep_report`).
A cell's id is its name plus a hash of everything that decides its result (defense, path, settings, the
checkpoint's bytes, trigger, target, data folder, counts, seed), so a rerun skips the finished cells, redoes a
cell killed midway, and never reuses a row whose settings changed. A failed cell (a DivergenceError, say) is a
row with its error; the others go on, and the exit status is 1; its row is kept like a finished one (the same
settings fail the same way), and ``--retry-failed`` runs it again. A worker process that dies mid-cell fails
that cell without writing its row (a rerun tries it again) and is replaced. Ctrl-C stops the workers (exit 130);
the finished cells are kept and the same command goes on where it stopped.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import math
import os
import re
import signal
import sys
import threading
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional

STUDY_KEYS = ("name", "out_dir", "data", "clean_count", "eval_count", "seeds", "device", "reference", "workers",
              "threads_per_worker", "settings", "defenses", "checkpoints")
CHECKPOINT_KEYS = ("name", "path", "record", "arch", "model", "model_kwargs", "trigger", "target", "data")
# Defense options the sweep itself owns (per cell or per study): a recipe may not set them.
SWEEP_OWNED = {"seed": "give seeds: at the study's top level", "device": "give device: at the study's top level",
               "progress": "the sweep shows a line per finished cell", "inplace": "each cell purifies a copy",
               "eval_data": "each cell is evaluated on the test images (eval_count:)",
               "checkpoint": "a sweep resumes by cells, not by a defense's state file",
               "checkpoint_every": "a sweep resumes by cells", "resume": "a sweep resumes by cells"}
_NAME = re.compile(r"^[A-Za-z0-9_.+-]+$")
EXIT_FAILED = 1


@dataclass
class Study:
    """A checked study: its cells (plain dicts, picklable, see :func:`plan_cells`) and how to run them."""

    name: str
    source: str
    out_dir: Path
    cells: List[Dict[str, Any]]
    device: str = "auto"
    workers: Optional[int] = None
    threads_per_worker: Optional[int] = None


def record_reader():
    """``fastpurify.backdoorbench.read_record`` (BackdoorBench records as checkpoints), or an error saying that
    this installation cannot read them."""
    try:
        from .backdoorbench import read_record
    except ImportError as e:
        if e.name != "fastpurify.backdoorbench":  # the module is there; something it needs is not
            raise
        raise ValueError("record: checkpoints (BackdoorBench records) need fastpurify.backdoorbench, which this "
                         "version of fastpurify does not have; give path:, arch:, trigger: and target: instead"
                         ) from None
    return read_record


def _check_keys(d: Dict[str, Any], valid, where: str) -> None:
    unknown = [k for k in d if k not in valid]
    if unknown:
        raise ValueError(f"{where}: unknown key(s) {unknown}; valid: {', '.join(valid)}")


def _count(v: Any, where: str, minimum: int = 1) -> int:
    if isinstance(v, bool) or not isinstance(v, int) or v < minimum:
        raise ValueError(f"{where}: expected an integer >= {minimum}, got {v!r}")
    return v


def _name(v: Any, where: str) -> str:
    if not isinstance(v, str) or not _NAME.match(v):
        raise ValueError(f"{where}: {v!r} is not a usable name (letters, digits and _ . + - only)")
    return v


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def _checkpoint(entry: Any, where: str, data: Path) -> Dict[str, Any]:
    """A checked checkpoint entry: ``{name, kind, path, arch, trigger, target, data, sha256}``."""
    from .bench import SHARED_CHECKPOINTS, resolve_checkpoint
    from .cli import NUM_CLASSES
    from .data import find_cifar10
    from .triggers import parse_trigger

    if isinstance(entry, str):
        if entry not in SHARED_CHECKPOINTS:
            raise ValueError(f"{where}: {entry!r} is not a shared checkpoint ({', '.join(SHARED_CHECKPOINTS)}); give a "
                             "mapping with path:, arch:, trigger: and target:")
        entry = {"path": entry}
    if not isinstance(entry, dict):
        raise ValueError(f"{where}: expected a shared checkpoint's name or a mapping, got {entry!r}")
    _check_keys(entry, CHECKPOINT_KEYS, where)
    if ("path" in entry) == ("record" in entry):
        raise ValueError(f"{where}: give exactly one of path: (a checkpoint file or {', '.join(SHARED_CHECKPOINTS)}) "
                         "and record: (a BackdoorBench record)")
    data = Path(str(entry.get("data", data))).expanduser()
    if "record" in entry:
        return _record_entry(entry, where, data)
    try:
        cifar = find_cifar10(data)
    except FileNotFoundError as e:
        raise FileNotFoundError(f"{where}: {e}") from None
    key = str(entry["path"])
    trig = entry.get("trigger")
    target = entry.get("target")
    try:
        path, spec, target = resolve_checkpoint(key, data, None if trig is None else str(trig), target)
    except ValueError:
        raise ValueError(f"{where}: checkpoint {key!r} needs trigger: SPEC and target: T") from None
    if not path.is_file():
        raise FileNotFoundError(f"{where}: checkpoint file {str(path)!r} not found")
    if isinstance(target, bool) or not isinstance(target, int) or not 0 <= target < NUM_CLASSES:
        raise ValueError(f"{where}: target: expected a CIFAR-10 label in [0, {NUM_CLASSES}), got {target!r}")
    try:
        parse_trigger(spec)
        arch, kwargs = _model_choice(entry)
    except (ValueError, FileNotFoundError) as e:
        raise type(e)(f"{where}: {e}") from None
    name = entry.get("name", key if key in SHARED_CHECKPOINTS else path.stem)
    return {"name": _name(name, f"{where}: name"), "kind": "path", "path": str(path.resolve()), "arch": arch,
            "model_kwargs": kwargs, "trigger": spec, "target": target, "data": str(cifar.resolve()),
            "sha256": _file_hash(path)}


def _record_entry(entry: Dict[str, Any], where: str, data: Path) -> Dict[str, Any]:
    """A BackdoorBench record as a checkpoint: it carries its model, triggered test images and target; ``model:``
    / ``model_kwargs:`` build a network its ``model_name`` does not map (fastpurify.backdoorbench.read_record)."""
    record_reader()
    bad = [k for k in ("trigger", "target", "arch") if k in entry]
    if bad:
        raise ValueError(f"{where}: {', '.join(bad)}: a record carries its own model, trigger and target (give model: "
                         "and model_kwargs: for a network it does not name)")
    path = Path(str(entry["record"])).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"{where}: record {str(path)!r} not found")
    kwargs = entry.get("model_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"{where}: model_kwargs: expected a mapping, got {kwargs!r}")
    file = path / "attack_result.pt" if path.is_dir() else path
    return {"name": _name(entry.get("name", path.name), f"{where}: name"), "kind": "record",
            "path": str(path.resolve()), "data": str(data.resolve()) if "data" in entry else None,
            "arch": entry.get("model"), "model_kwargs": kwargs, "trigger": None, "target": None,
            "sha256": _file_hash(file) if file.is_file() else None}


def _model_choice(entry: Dict[str, Any]) -> tuple:
    """``(spec, kwargs)`` of a checkpoint entry: ``arch:`` (a built-in name, default small_vgg) or ``model:`` (a
    built-in name or MODULE:FACTORY / path/to/file.py:FACTORY, imported now) with ``model_kwargs:``, as
    ``purify --arch / --model / --model-kwargs`` take them (fastpurify.models.factory)."""
    from .models.factory import import_factory, is_builtin, model_from_args

    kwargs = entry.get("model_kwargs")
    if kwargs is not None and not isinstance(kwargs, dict):
        raise ValueError(f"model_kwargs: expected a mapping of the factory's keyword arguments, got {kwargs!r}")
    text = None if kwargs is None else json.dumps(kwargs)
    opts = argparse.Namespace(arch=entry.get("arch"), model=entry.get("model"), model_kwargs=text)
    spec, kwargs = model_from_args(opts)
    if not is_builtin(spec):
        import_factory(spec)
    return spec, kwargs


def _recipes(raw: Any, where: str) -> List[tuple]:
    """``[(defense, recipe, settings)]`` from the study's ``defenses:`` (names are checked, settings not yet)."""
    from .defenses import DEFENSES

    if isinstance(raw, str):
        raw = [raw]
    if isinstance(raw, list):
        raw = {d: None for d in raw}
    if not isinstance(raw, dict) or not raw:
        raise ValueError(f"{where}: expected a list of defenses ({', '.join(DEFENSES)}) or a mapping defense: "
                         "{recipe: settings}")
    out = []
    for d, recipes in raw.items():
        name = str(d).lower()
        if name not in DEFENSES:
            raise ValueError(f"{where}: unknown defense {d!r}; valid: {', '.join(DEFENSES)}")
        if recipes is None or recipes == {}:
            recipes = {"published": {}}
        if not isinstance(recipes, dict):
            raise ValueError(f"{where}.{d}: expected a mapping recipe name: {{settings}}, got {recipes!r}")
        for r, settings in recipes.items():
            r = _name(str(r), f"{where}.{d}: recipe name")
            settings = {} if settings is None else settings
            if not isinstance(settings, dict):
                raise ValueError(f"{where}.{d}.{r}: expected a mapping of settings, got {settings!r}")
            if r == "published" and settings:
                raise ValueError(f"{where}.{d}.published: the recipe 'published' is the published defaults; give "
                                 f"settings {sorted(settings)} another recipe name")
            out.append((name, r, dict(settings)))
    return out


def _check_settings(defense: str, settings: Dict[str, Any], reference: bool, clean_count: int, where: str) -> None:
    """A recipe's settings checked as ``purify --set`` checks them (the defense's dataclass built and validated),
    and its batch against the clean set."""
    from .cli_purify import SMALL_CLEAN_OK, defense_config
    from .defenses._run import COMMON_OPTIONS

    for k in settings:
        if k in SWEEP_OWNED:
            raise ValueError(f"{where}: {k}: {SWEEP_OWNED[k]}")
    tb = settings.get("time_budget")
    if tb is not None and (isinstance(tb, bool) or not isinstance(tb, (int, float)) or not math.isfinite(tb)
                           or tb <= 0):
        raise ValueError(f"{where}: time_budget must be a positive number of seconds, got {tb!r}")
    epochs = settings.get("epochs")
    if epochs is not None:
        _count(epochs, f"{where}: epochs")
    hyper = {k: v for k, v in settings.items() if k not in COMMON_OPTIONS}
    cfg = defense_config(defense, reference, epochs, hyper, where)
    bs = getattr(cfg, "batch_size", None)
    if isinstance(bs, int) and clean_count < bs and defense not in SMALL_CLEAN_OK:
        raise ValueError(f"{where}: clean_count {clean_count} is fewer than one batch of {defense} ({bs} images); "
                         f"give clean_count: {bs} or more, or a smaller batch_size")


def cell_id(cell: Dict[str, Any]) -> str:
    """``<defense>-<recipe>-<checkpoint>-seed<seed>-<hash>``; the hash covers everything that decides the result."""
    key = {k: cell[k] for k in ("defense", "recipe", "reference", "settings", "clean_count", "eval_count", "seed")}
    key["ckpt"] = {k: v for k, v in cell["ckpt"].items() if k != "name"}
    digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{cell['defense']}-{cell['recipe']}-{cell['ckpt']['name']}-seed{cell['seed']}-{digest}"


def plan_cells(path, out: Optional[str] = None) -> Study:
    """Read and check the study file ``path`` (everything, before any cell runs) and list its cells, in the order
    defense, recipe, checkpoint, seed. Raises ValueError / TypeError / FileNotFoundError naming the file and key."""
    from .config import check_type, load_file
    from .data import default_data_dir

    source = str(path)
    raw = load_file(path, "study")
    _check_keys(raw, STUDY_KEYS, source)
    for k in ("defenses", "checkpoints"):
        if not raw.get(k):
            raise ValueError(f"{source}: {k}: missing or empty; the study needs at least one")
    name = _name(str(raw.get("name", Path(source).stem)), f"{source}: name")
    data = Path(str(raw.get("data") or default_data_dir())).expanduser()
    clean_count = _count(raw.get("clean_count", 2500), f"{source}: clean_count")
    eval_count = raw.get("eval_count")
    if eval_count is not None:
        _count(eval_count, f"{source}: eval_count")
    seeds = raw.get("seeds", [0])
    if isinstance(seeds, int) and not isinstance(seeds, bool):
        seeds = list(range(_count(seeds, f"{source}: seeds")))
    if not isinstance(seeds, list) or not seeds or any(isinstance(s, bool) or not isinstance(s, int) for s in seeds):
        raise ValueError(f"{source}: seeds: expected a list of integers or a count, got {seeds!r}")
    reference = check_type(raw.get("reference", False), bool, f"{source}: reference")
    device = str(raw.get("device", "auto"))
    if device != "auto" and not re.match(r"^(cpu|cuda(:\d+)?)$", device):
        raise ValueError(f"{source}: device: expected auto, cpu, cuda or cuda:N, got {device!r}")
    workers = raw.get("workers")
    threads = raw.get("threads_per_worker")
    for k, v in (("workers", workers), ("threads_per_worker", threads)):
        if v is not None:
            _count(v, f"{source}: {k}", minimum=0 if k == "workers" else 1)
    common = raw.get("settings") or {}
    if not isinstance(common, dict):
        raise ValueError(f"{source}: settings: expected a mapping of defense settings, got {common!r}")
    recipes = []
    for d, r, settings in _recipes(raw["defenses"], f"{source}: defenses"):
        merged = {**common, **settings}
        ref = check_type(merged.pop("reference", reference), bool, f"{source}: defenses.{d}.{r}: reference")
        _check_settings(d, merged, ref, clean_count, f"{source}: defenses.{d}.{r}")
        recipes.append((d, r, merged, ref))
    if not isinstance(raw["checkpoints"], list):
        raise ValueError(f"{source}: checkpoints: expected a list, got {raw['checkpoints']!r}")
    ckpts = [_checkpoint(e, f"{source}: checkpoints[{i}]", data) for i, e in enumerate(raw["checkpoints"])]
    seen = set()
    for c in ckpts:
        if c["name"] in seen:
            raise ValueError(f"{source}: checkpoints: two are named {c['name']!r}; give each a distinct name:")
        seen.add(c["name"])
    cells = []
    for d, r, settings, ref in recipes:
        for ck in ckpts:
            for seed in dict.fromkeys(seeds):
                cell = {"study": name, "defense": d, "recipe": r, "reference": ref, "settings": settings, "ckpt": ck,
                        "checkpoint": ck["name"], "clean_count": clean_count, "eval_count": eval_count, "seed": seed,
                        "device": device}
                cell["cell"] = cell_id(cell)
                cells.append(cell)
    out_dir = Path(out or raw.get("out_dir") or f"sweep-{name}").expanduser()
    return Study(name=name, source=source, out_dir=out_dir, cells=cells, device=device, workers=workers,
                 threads_per_worker=threads)


# --------------------------------------------------------------------------------------------------------
# Running: finished cells, workers, the dispatch loop
# --------------------------------------------------------------------------------------------------------


def finished_rows(out_dir: Path, cells: List[Dict[str, Any]], retry_failed: bool = False) -> Dict[str, Dict]:
    """``{cell id: row}`` for the cells whose row file exists, reads, and names the cell (a failed one counts
    unless ``retry_failed``)."""
    done = {}
    for c in cells:
        f = Path(out_dir) / "cells" / f"{c['cell']}.json"
        try:
            row = json.loads(f.read_text(encoding="utf-8"))
        except (OSError, ValueError):
            continue
        if isinstance(row, dict) and row.get("cell") == c["cell"] and not (retry_failed and row.get("status") ==
                                                                           "failed"):
            done[c["cell"]] = row
    return done


def worker_plan(device: str, workers: Optional[int], threads: Optional[int]) -> List[Dict[str, Any]]:
    """One ``{"env": {...}, "threads": k}`` per worker. CUDA (``device`` auto with a GPU, or cuda): by default one
    worker per visible GPU, each pinned to its GPU with CUDA_VISIBLE_DEVICES; CPU: by default one worker per
    ``threads`` cores (default: all cores in one worker), each with ``threads`` intra-op threads. ``workers=0``:
    none (the cells run in this process)."""
    import torch

    if workers == 0:
        return []
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    cuda = device.startswith("cuda") or (device == "auto" and torch.cuda.is_available())
    if cuda and device in ("auto", "cuda"):
        visible = os.environ.get("CUDA_VISIBLE_DEVICES")
        gpus = [g for g in visible.split(",") if g.strip()] if visible else [
            str(i) for i in range(torch.cuda.device_count())]
        if not gpus:
            raise ValueError(f"device {device!r}: no CUDA device is visible; use device: cpu")
        n = workers or len(gpus)
        k = threads or max(1, cores // n)
        return [{"env": {"CUDA_VISIBLE_DEVICES": gpus[i % len(gpus)]}, "threads": k} for i in range(n)]
    if workers is None:
        k = threads or cores
        n = max(1, cores // k)
    else:
        n, k = workers, threads or max(1, cores // workers)
    return [{"env": {"OMP_NUM_THREADS": str(k), "MKL_NUM_THREADS": str(k)}, "threads": k} for _ in range(n)]


@contextlib.contextmanager
def _spawn_env(env: Dict[str, str]) -> Iterator[None]:
    """``env`` in os.environ and SIGINT ignored while a worker is spawned: the child starts with both (a Ctrl-C
    at the terminal reaches the whole process group; only the parent acts on it)."""
    old = {k: os.environ.get(k) for k in env}
    main = threading.current_thread() is threading.main_thread()
    handler = signal.signal(signal.SIGINT, signal.SIG_IGN) if main else None
    os.environ.update(env)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if main:
            signal.signal(signal.SIGINT, handler)


class _Worker:
    def __init__(self, ctx, plan: Dict[str, Any], cells_dir: Path) -> None:
        from .sweep_worker import worker_main

        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=worker_main, args=(child, plan["threads"], str(cells_dir)), daemon=True)
        with _spawn_env(plan["env"]):
            self.proc.start()
        child.close()
        self.plan, self.cell = plan, None

    def give(self, cell: Optional[Dict[str, Any]]) -> None:
        self.cell = cell
        with contextlib.suppress(OSError):
            self.conn.send(cell)

    def stop(self, timeout: float = 5.0) -> None:
        if self.proc.is_alive():
            self.proc.terminate()
            self.proc.join(timeout)
            if self.proc.is_alive():
                self.proc.kill()
                self.proc.join(timeout)
        self.conn.close()


def _run_here(todo: List[Dict[str, Any]], cells_dir: Path, report) -> bool:
    """``--workers 0``: the cells one after another in this process (for debugging: pdb, tracebacks)."""
    from .sweep_worker import run_cell, write_json_atomic

    cache: Dict[Any, Any] = {}
    try:
        for cell in todo:
            row = run_cell(cell, cache)
            write_json_atomic(cells_dir / f"{cell['cell']}.json", row)
            report(row)
    except KeyboardInterrupt:
        return False
    return True


def run_cells(todo: List[Dict[str, Any]], plans: List[Dict[str, Any]], cells_dir: Path, report) -> bool:
    """Run ``todo`` on one worker per entry of ``plans`` (none: in this process); ``report(row)`` is called for
    each finished cell (in the parent). Returns True when every cell ran, False after Ctrl-C (the workers are
    stopped; rows already written stay). A worker that dies mid-cell gives that cell a failed row (not written: a
    rerun redoes it)."""
    import multiprocessing as mp
    from multiprocessing.connection import wait

    from .sweep_worker import base_row

    if not plans:
        return _run_here(todo, cells_dir, report)
    ctx = mp.get_context("spawn")
    pending = deque(todo)
    workers = [_Worker(ctx, p, cells_dir) for p in plans[:max(1, min(len(plans), len(todo)))]]
    try:
        for w in workers:
            w.give(pending.popleft() if pending else None)
        while any(w.cell is not None for w in workers):
            busy = [w for w in workers if w.cell is not None]
            ready = wait([w.conn for w in busy] + [w.proc.sentinel for w in busy])
            for i, w in enumerate(workers):
                if w.cell is None or (w.conn not in ready and w.proc.sentinel not in ready):
                    continue
                row = None
                with contextlib.suppress(EOFError, OSError):
                    row = w.conn.recv() if w.conn.poll() else None
                if row is None:
                    if w.proc.is_alive():
                        continue
                    row = base_row(w.cell)
                    row.update(status="failed", error=f"the worker process ended (exit code {w.proc.exitcode}) "
                                                      "during this cell; rerun the sweep to retry it")
                    w.stop()
                    w.cell = None
                    if pending:
                        workers[i] = w = _Worker(ctx, w.plan, cells_dir)
                report(row)
                if w.proc.is_alive():
                    w.give(pending.popleft() if pending else None)
        return True
    except KeyboardInterrupt:
        return False
    finally:
        for w in workers:
            w.stop()


# --------------------------------------------------------------------------------------------------------
# fastpurify sweep
# --------------------------------------------------------------------------------------------------------


def _plot(out_dir: Path, rows, title: str) -> str:
    from .plot import plot_sweep  # matplotlib is imported only now; without it: one line naming the extra

    return plot_sweep(rows, out_dir, title=title)


def cmd_sweep(args) -> int:
    from .sweep_report import progress_line, write_outputs

    if args.workers is not None:
        _count(args.workers, "--workers", minimum=0)
    if args.threads_per_worker is not None:
        _count(args.threads_per_worker, "--threads-per-worker")
    study = plan_cells(args.study, args.out)
    cells_dir = study.out_dir / "cells"
    done = finished_rows(study.out_dir, study.cells, args.retry_failed)
    todo = [c for c in study.cells if c["cell"] not in done]
    if args.dry_run:
        print(f"sweep {study.name}: {len(study.cells)} cells, {len(done)} done, {len(todo)} to run -> {study.out_dir}")
        for c in study.cells:
            state = done[c["cell"]]["status"] if c["cell"] in done else "to run"
            print(f"  {c['defense']}/{c['recipe']}/{c['checkpoint']}/seed{c['seed']}  [{state}]  {c['cell']}")
        return 0
    workers = args.workers if args.workers is not None else study.workers
    plans = worker_plan(study.device, workers, args.threads_per_worker or study.threads_per_worker)
    try:
        cells_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"out_dir {str(study.out_dir)!r} cannot be created ({e.strerror or e})") from None
    for stale in cells_dir.glob(".*.tmp"):  # a worker killed while writing its row
        stale.unlink(missing_ok=True)
    how = (f" on {min(len(plans), len(todo))} worker(s) x {plans[0]['threads']} thread(s)" if plans else
           " in this process (--workers 0)") if todo else ""
    print(f"sweep {study.name}: {len(study.cells)} cells ({len(done)} already done, {len(todo)} to run){how} -> "
          f"{study.out_dir}", flush=True)
    rows = dict(done)
    count = [0]

    def report(row):
        rows[row["cell"]] = row
        count[0] += 1
        print(progress_line(count[0], len(todo), row), flush=True)

    complete = run_cells(todo, plans, cells_dir, report) if todo else True
    from .sweep_worker import base_row

    table = [rows.get(c["cell"]) or base_row(c) for c in study.cells]
    note = "" if complete else f"Interrupted: {sum(r['status'] != 'pending' for r in table)} of {len(table)} cells ran."
    paths = write_outputs(study.out_dir, study.name, table, note)
    failed = [r for r in table if r["status"] == "failed"]
    if args.plot and complete:
        print(f"plot: {_plot(study.out_dir, table, f'sweep {study.name}')}")
    if not complete:
        print(f"fastpurify: interrupted: {len(rows)} of {len(table)} cells finished (kept in {cells_dir}); run the "
              "same command again to finish the rest", file=sys.stderr)
        return 130
    print(f"results: {paths['csv']}, {paths['json']}; summary: {paths['summary']}")
    if failed:
        print(f"fastpurify: {len(failed)} of {len(table)} cells failed (status failed in {paths['csv']}); first: "
              f"{failed[0]['defense']}/{failed[0]['recipe']}/{failed[0]['checkpoint']}/seed{failed[0]['seed']}: "
              f"{failed[0]['error']}", file=sys.stderr)
        return EXIT_FAILED
    return 0


def add_parser(sub) -> argparse.ArgumentParser:
    """Register ``fastpurify sweep`` on the command line's subparsers."""
    s = sub.add_parser("sweep", help="run a study: defenses x recipes x checkpoints x seeds, in parallel, resumable",
                       description="Run the grid of a study file (YAML/JSON; format: fastpurify/sweep.py). Finished "
                                   "cells are kept in OUT/cells and skipped on a rerun.")
    s.add_argument("study", help="the study file (.yaml/.yml needs pip install fastpurify[yaml]; .json needs nothing)")
    s.add_argument("--out", default=None, metavar="DIR", help="output folder (default: the study's out_dir, else "
                                                              "sweep-NAME)")
    s.add_argument("--workers", type=int, default=None, metavar="N",
                   help="parallel worker processes (default: one per GPU; on CPU one per --threads-per-worker cores; "
                        "0: run the cells in this process, for debugging)")
    s.add_argument("--threads-per-worker", type=int, default=None, metavar="K",
                   help="CPU threads of each worker (default: the cores divided among the workers)")
    s.add_argument("--dry-run", action="store_true", help="list the cells (and which are done) without running any")
    s.add_argument("--retry-failed", action="store_true", help="run again the cells whose row says failed")
    s.add_argument("--plot", action="store_true", help="plot the results when the sweep is done (needs "
                                                       "fastpurify[plot])")
    s.set_defaults(func=cmd_sweep)
    return s
