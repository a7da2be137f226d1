"""What each defense asks of a GPU per round, counted on a CPU: ATen ops dispatched, host-visible reads and the
host synchronisations they would be on CUDA, reference against fast path — and which ops a CUDA graph replaces.

On a GPU a step at small batch is bound by launches and host synchronisation, not arithmetic (specs/kernels.md),
and both are visible without a GPU:

- every ATen op passes through a ``TorchDispatchMode`` (:class:`OpCounter`; backward ops included; an op that is
  not a view is about one kernel launch on a GPU);
- every read of a tensor's value on the host passes through a ``TorchFunctionMode`` (:class:`ReadCounter`:
  ``.item()``, ``bool()``, ``float()``, ``int()``, ``.tolist()``, ``.numpy()``, formatting). ``.item()`` and the
  casts dispatch ``aten::_local_scalar_dense`` (counted too), but ``.tolist()`` of a CPU tensor dispatches
  nothing, so only the function mode sees every read;
- which of those events would synchronise the host with a GPU — a read of a *device* tensor (not of a host
  generator's draw or a CPU optimizer counter), a blocking host-to-device copy (``torch.as_tensor(x,
  device=)``, ``.to(device)`` of pageable memory), ``.cpu()`` of a device tensor, a data-dependent shape — is
  decided by :class:`SyncCounter`, the CPU stand-in of ``fastpurify.testing.host_sync_check`` (it tracks which
  tensors live on the host under CUDA semantics), here counting instead of raising.

The fast paths run their GPU strategies (``backend.launch_bound`` -> True, as ``host_sync_check`` does: stacked
models, device-side early exits, fused optimizers), so their counts are what a GPU run dispatches; ``--cpu`` counts
the CPU strategies instead. Each count is attributed to its round, its loop phase (``Loop.phase``) and, for the
steps a fast path captures into a CUDA graph, to that graph; syncs are also listed by call site.

Workload (the issue's): the real SmallVGG BadNets checkpoint (``../shared/data/ibau/badnets_8_02_ckpt.pth``),
the first 256 CIFAR-10 training images, ``fastpurify.bench.BENCH_SETTINGS`` with ``epochs=2`` (BAERASE told the
target), one CPU thread, seed 0. *1 round* = the setup, the first round and what follows the last round; *+1
round* = the second round (what a run with ``epochs=2`` dispatches beyond ``epochs=1``: the first round and the
end are the same in both; checked against two runs, see ``--two-runs``). The counts do not depend on the thread
count or the machine's speed (no time budget).

Writes ``benchmarks/results/<device>/dispatch.json`` and ``dispatch.md``. Usage::

    python benchmarks/dispatch.py                       # all five defenses, both paths (~7 min of one core)
    python benchmarks/dispatch.py --defenses ibau --n-clean 128
    python benchmarks/dispatch.py --render              # dispatch.md again from dispatch.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import importlib
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, when fastpurify is not installed
from _env import ROOT, device_tag, environment  # noqa: E402

from fastpurify.testing import _HostSyncMode  # noqa: E402  (the CPU stand-in of CUDA's sync semantics)

DEFAULT_DATA = ROOT.parent / "shared" / "data"
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
GRAPH = "graph"  # the region of a step a fast path captures into a CUDA graph
DEFENSES = ("sau", "ibau", "awm", "baerase", "bcu")

# --------------------------------------------------------------------------------------------------------
# The counters
# --------------------------------------------------------------------------------------------------------


def call_site() -> str:
    """``path:function`` of the innermost caller outside torch and this file (paths relative to the repository),
    prefixed with the innermost torch function when the event happened inside torch (e.g. an optimizer)."""
    f = sys._getframe(1)
    inner_torch = None
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(TORCH_DIR):
            # the Tensor dunder wrappers (overrides.py, _tensor.py) are how a read is spelled, not who reads
            if inner_torch is None and not name.endswith(("overrides.py", "_tensor.py")):
                inner_torch = f"torch/{Path(name).relative_to(TORCH_DIR)}:{f.f_code.co_name}"
        elif name not in (__file__, _HOST_SYNC_FILE) and "contextlib" not in name:
            try:
                where = str(Path(name).resolve().relative_to(ROOT))
            except ValueError:
                where = Path(name).name
            site = f"{where}:{f.f_code.co_name}"
            return f"{inner_torch} <- {site}" if inner_torch else site
        f = f.f_back
    return inner_torch or "?"


_HOST_SYNC_FILE = sys.modules[_HostSyncMode.__module__].__file__


class Regions:
    """Where the counts go: the round (``"setup"``, 0, 1, …, ``"after"``), the loop phase and whether a
    captured step is running. ``entries`` counts how often each region was entered (GRAPH: one replay each)."""

    def __init__(self) -> None:
        self.stack: List[str] = []
        self.round: Any = "setup"
        self.entries: Counter = Counter()

    @contextlib.contextmanager
    def region(self, name: str):
        self.stack.append(name)
        self.entries[(self.round, name)] += 1
        try:
            yield
        finally:
            self.stack.pop()

    def key(self) -> Tuple[Any, str, bool]:
        names = [n for n in self.stack if n != GRAPH]
        return self.round, (names[-1] if names else "(outside phases)"), GRAPH in self.stack


class OpCounter(TorchDispatchMode):
    """Every ATen op dispatched while active, per region key; ``views`` are ops whose result aliases an input (no
    kernel on a GPU); ``scalar_dense`` counts ``aten::_local_scalar_dense``."""

    def __init__(self, regions: Regions) -> None:
        super().__init__()
        self.regions = regions
        self.ops: Counter = Counter()
        self.views: Counter = Counter()
        self.scalar_dense: Counter = Counter()
        self.by_name: Counter = Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        key = self.regions.key()
        self.ops[key] += 1
        self.by_name[func.name()] += 1
        returns = func._schema.returns
        if returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write:
            self.views[key] += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_dense[key] += 1
        return func(*args, **(kwargs or {}))


_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
          torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.__format__}


class ReadCounter(TorchFunctionMode):
    """Every host read of a tensor's value (of host and device tensors alike), per region key and call site; a
    read made inside another (``__format__`` calling ``item``) counts once."""

    def __init__(self, regions: Regions) -> None:
        super().__init__()
        self.regions = regions
        self.reads: Counter = Counter()
        self.sites: Counter = Counter()
        self._depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        read = func in _READS
        if read and self._depth == 0:
            self.reads[self.regions.key()] += 1
            self.sites[(self.regions.round, call_site())] += 1
        self._depth += read
        try:
            return func(*args, **(kwargs or {}))
        finally:
            self._depth -= read


class _Always:
    """The scope of :class:`SyncCounter`: every call is inside a checked step."""

    in_step = True


class SyncCounter(_HostSyncMode):
    """The CPU stand-in of ``fastpurify.testing.host_sync_check`` (host tensors tracked under CUDA semantics),
    counting each would-be synchronisation per region key and ``(what, call site)`` instead of raising."""

    def __init__(self, regions: Regions) -> None:
        super().__init__(_Always())
        self.regions = regions
        self.syncs: Counter = Counter()
        self.sites: Counter = Counter()

    def _event(self, what: str) -> None:
        self.syncs[self.regions.key()] += 1
        self.sites[(self.regions.round, f"{_short(what)} at {call_site()}")] += 1


_LABELS = ((" reads a device tensor", "read "), ("copies host data to the device", "blocking H2D "),
           ("of a host tensor copies it", "blocking H2D "), ("copies a device tensor to the host", "D2H "),
           ("from a host tensor waits", "blocking H2D "))


def _short(what: str) -> str:
    """The stand-in's event text, shortened: ``read tolist()``, ``blocking H2D torch.as_tensor(..., device=)``."""
    for needle, label in _LABELS:
        if needle in what:
            return label + what.split(" ")[0].replace("(...,", "(device=)")
    return what


@contextlib.contextmanager
def counting(patches: Sequence[Tuple[Any, str]] = (), gpu_strategies: bool = False):
    """Count inside the block; yields ``(ops, reads, syncs, regions)``. ``Loop.rounds`` and ``Loop.phase`` are
    wrapped so that counts fall into their round and phase; each ``(owner, attribute)`` of ``patches`` names a
    function run in the :data:`GRAPH` region (a step a fast path captures on CUDA); ``gpu_strategies`` makes
    ``backend.launch_bound`` say True in every fastpurify module (the strategies a GPU run takes)."""
    from fastpurify import backend
    from fastpurify.defenses._loop import Loop

    regions = Regions()
    counters = OpCounter(regions), ReadCounter(regions), SyncCounter(regions)
    saved: List[Tuple[Any, str, Any]] = []

    def patch(owner, attr, value):
        saved.append((owner, attr, owner.__dict__[attr] if isinstance(owner, type) else getattr(owner, attr)))
        setattr(owner, attr, value)

    plain_phase, plain_rounds = Loop.phase, Loop.rounds

    @contextlib.contextmanager
    def phase(self, name, **kw):
        with plain_phase(self, name, **kw), regions.region(name):
            yield

    def rounds(self):
        gen = plain_rounds(self)
        try:
            for r in gen:  # a round's end (_end_round, _round_done) runs in the next() after its body: still r
                regions.round = r
                yield r
        finally:
            gen.close()
            regions.round = "after"

    def in_graph(fn):
        def wrapped(*a, **kw):
            with regions.region(GRAPH):
                return fn(*a, **kw)
        return wrapped

    try:
        patch(Loop, "phase", phase)
        patch(Loop, "rounds", rounds)
        for owner, attr in patches:
            patch(owner, attr, in_graph(getattr(owner, attr)))
        if gpu_strategies:
            original = backend.launch_bound
            for mod in [m for n, m in list(sys.modules.items()) if n.startswith("fastpurify") and m is not None]:
                if getattr(mod, "launch_bound", None) is original:
                    patch(mod, "launch_bound", lambda device: True)
        with counters[2], counters[1], counters[0]:
            yield (*counters, regions)
    finally:
        for owner, attr, value in reversed(saved):
            setattr(owner, attr, value)


# --------------------------------------------------------------------------------------------------------
# The defenses
# --------------------------------------------------------------------------------------------------------


def captured_steps(name: str, path: str) -> List[Tuple[Any, str]]:
    """The functions whose ops a CUDA graph replaces on a GPU: the fast I-BAU's hypergradient solve
    (``implicit_hypergrad``, which ``HypergradGraphs`` captures per batch shape) and the fast SAU's attack step
    (``SharedPGD._step``, captured with ``cuda_graph=True``)."""
    if path != "fast":
        return []
    if name == "ibau":  # the module (the package attribute of the same name is the defense function)
        return [(importlib.import_module("fastpurify.defenses.ibau"), "implicit_hypergrad")]
    if name == "sau":
        from fastpurify.ops.attack import SharedPGD

        return [(SharedPGD, "_step")]
    return []


def defense_fn(name: str, path: str) -> Callable:
    pkg = "fastpurify.defenses" if path == "fast" else "fastpurify.reference.defenses"
    return getattr(importlib.import_module(f"{pkg}.{name}"), name)


def _sum(counter: Counter, rounds: Sequence[Any], **match) -> int:
    """The counts whose key's round is in ``rounds`` (and whose phase/captured equal ``match``'s)."""
    out = 0
    for (r, phase, captured), v in counter.items():
        if r in rounds and match.get("phase", phase) == phase and match.get("captured", captured) == captured:
            out += v
    return out


def summarize(ops: OpCounter, reads: ReadCounter, syncs: SyncCounter, regions: Regions, rounds: Sequence[Any]
              ) -> Dict[str, Any]:
    """The counts of ``rounds`` (round keys), with per-phase splits and the sync and read sites."""
    phases = sorted({p for (r, p, _) in ops.ops if r in rounds})
    return {
        "ops": _sum(ops.ops, rounds), "kernels": _sum(ops.ops, rounds) - _sum(ops.views, rounds),
        "reads": _sum(reads.reads, rounds), "scalar_dense": _sum(ops.scalar_dense, rounds),
        "syncs": _sum(syncs.syncs, rounds),
        "graph_ops": _sum(ops.ops, rounds, captured=True),
        "graph_kernels": _sum(ops.ops, rounds, captured=True) - _sum(ops.views, rounds, captured=True),
        "graph_syncs": _sum(syncs.syncs, rounds, captured=True),
        "graph_steps": sum(v for (r, n), v in regions.entries.items() if r in rounds and n == GRAPH),
        "phases": {p: {"ops": _sum(ops.ops, rounds, phase=p),
                       "graph_ops": _sum(ops.ops, rounds, phase=p, captured=True),
                       "reads": _sum(reads.reads, rounds, phase=p), "syncs": _sum(syncs.syncs, rounds, phase=p)}
                   for p in phases},
        "sync_sites": _by_site(syncs.sites, rounds), "read_sites": _by_site(reads.sites, rounds),
    }


def _by_site(counter: Counter, rounds: Sequence[Any]) -> Dict[str, int]:
    out: Counter = Counter()
    for (r, site), v in counter.items():
        if r in rounds:
            out[site] += v
    return dict(out)


def count_run(name: str, path: str, model, data, settings: Dict[str, Any], *, gpu_strategies: bool = True,
              seed: int = 0) -> Dict[str, Any]:
    """One run of a defense under the counters: the counts of its first round (with the setup and the end) and
    of each later round, and its wall time (for the record)."""
    fn = defense_fn(name, path)
    t0 = time.perf_counter()
    with counting(captured_steps(name, path), gpu_strategies=gpu_strategies) as (ops, reads, syncs, regions):
        r = fn(copy.deepcopy(model), data, progress=False, seed=seed, **settings)
    n = len(r.history)
    return {"rounds": n, "seconds": time.perf_counter() - t0,
            "one": summarize(ops, reads, syncs, regions, ("setup", 0, "after")),
            "later": [summarize(ops, reads, syncs, regions, (i,)) for i in range(1, n)],
            "ops_by_name": dict(ops.by_name)}


# --------------------------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------------------------

#: Per defense: what a CUDA graph replaces on a GPU, or why nothing is captured (read from
#: fastpurify/defenses/<name>.py and _loop.py; dispatch.md prints them under the tables).
GRAPH_NOTES = {
    "sau": "**captured with `cuda_graph=True`** (not the default): each attack step (`SharedPGD._step`: both "
           "models stacked, the fused loss, the input gradient and the fused update) is one graph per batch shape "
           "(`SharedPGD.graphs`, an LRU of 4 entries: a ragged last batch gets its own graph instead of evicting "
           "the full one), replayed `pgd_steps` times per batch. The unlearning step is not captured: it calls "
           "`loop.step(opt, loss)`, which runs the backward inside the loop helper.",
    "ibau": "**captured on CUDA by default** (`cuda_graph=None`: a batch shape that repeats at least 3 times in "
            "the run, so every shape of the default 5 rounds; `True`: every shape; `False`: none): the "
            "hypergradient step (`implicit_hypergrad`: outer gradients, the inner gradient graph, the K = 5 "
            "fixed-point solve with its tolerance tested on the device, the mixed product) is one graph per "
            "(inner, outer) batch shape (`HypergradGraphs`) fed by 6 device-to-device copies; the fused Adam step "
            "stays outside it, at `loop.step`. The perturbation pass is not captured (capturable the same way: a "
            "static-shape step with no host read; 6 % of a round's ops).",
    "awm": "not captured. Both phases' steps have static shapes (batches drawn with replacement: always "
           "`batch_size`) and no read of a device tensor, but (1) the mask step calls `loop.step(opt, loss)`, "
           "which runs `backward()` inside the loop helper: a captured step must compute the mask gradients "
           "with `torch.autograd.grad` inside the graph and call `loop.step(opt)`, as I-BAU's does; "
           "(2) `MaskedAdamClamp` passes the step count and bias corrections as host numbers (a graph would "
           "bake them in): it stays outside the graph, one launch; (3) each step's indices come from "
           "`Loop.batches(replacement=True)` as a blocking `.to(device)` of a host draw (the syncs below): "
           "they must be staged into a static device buffer outside the graph (pinned, non-blocking); (4) the "
           "recovery's last step fuses the L1 rescale (its own graph). Changes in awm.py and _loop.py.",
    "baerase": "not captured. Each unlearning and recovery step draws the stamp location on the host "
               "(`location()`: `torch.rand(2).tolist()`, then Python slicing at those offsets): a graph would "
               "replay the captured offsets, so `stamp_into` needs device-side offsets (or a fixed "
               "`position=\"corner\"`); the noise and z draws reach the device through pinned memory (they could "
               "be copied into static buffers outside a graph); the recovery's two `loop.step(opt, loss)` and the "
               "unlearning's one run the backward inside the loop helper; the early-stop flip rate is one read "
               "per round, by design (it decides whether to go on).",
    "bcu": "not captured. A step is one teacher forward and one student forward + backward at batch 256 (the "
           "fewest ops per image of the five: ~210 ops a step here); the temperature changes every round (a "
           "host number in the loss: a graph per round, or a device scalar); the augmentation and the "
           "dropout masks draw from device generators (a graph replays them only when registered with "
           "`CUDAGraph.register_generator_state`); `loop.step(opt, loss)` runs the backward inside the loop "
           "helper. At batch 256 each convolution is large enough that launches are a small share: measure "
           "first.",
}


#: Launches a replay adds besides the graph: copies into the static inputs (and out of the state), per replay
#: (I-BAU: X1, Y1, Xj, Yj, Mj, δ) or per batch (SAU: the 11 state tensors in, and cloned out, once per batch of
#: ``pgd_steps`` replays).
GRAPH_COPIES = {"ibau": lambda replays, settings: 6 * replays,
                "sau": lambda replays, settings: 22 * replays // settings.get("pgd_steps", 5)}


def _row(d: Dict[str, Any]) -> str:
    return f"{d['ops']:,} | {d['kernels']:,} | {d['syncs']} | {d['reads']} | {d['scalar_dense']}"


def render(rows: List[Dict[str, Any]], env: Dict[str, Any], workload: str) -> str:
    rows = sorted(rows, key=lambda r: (DEFENSES.index(r["defense"]), r["path"] != "reference"))
    lines = [
        "# Dispatch counts: ATen ops and host synchronisations per round, reference against fast path", "",
        f"Counted on CPU by `benchmarks/dispatch.py` ({workload}; torch {env['torch']}, commit {env['commit']}). "
        "**ops**: ATen ops dispatched (a TorchDispatchMode; backward ops included); **kernels**: the ops that are "
        "not views, about one launch each on a GPU; **syncs**: what would synchronise the host with a GPU — reads "
        "of a device tensor's value, blocking host-to-device copies (`torch.as_tensor(x, device=)`, `.to(device)` "
        "of pageable memory), `.cpu()` of a device tensor, data-dependent shapes (the CPU stand-in of "
        "`fastpurify.testing.host_sync_check`); **reads**: every host read of a tensor's value, host tensors "
        "included (a host generator's draws, a CPU optimizer's step counter: no sync); **`_lsd`**: "
        "`aten::_local_scalar_dense`, the op `.item()`/`bool()`/`float()`/`int()` dispatch (`.tolist()` of a CPU "
        "tensor dispatches nothing, so it undercounts the reads). **in a graph**: the ops of the steps a fast "
        "path captures into a CUDA graph on a GPU, where each such step becomes one graph launch plus the copies "
        "into its static inputs. *1 round*: setup, the first round and the end; *+1 round*: the second round.", "",
        "| defense | path | ops, 1 round | kernels | syncs | reads | `_lsd` | ops, +1 round | kernels | syncs | "
        "reads | `_lsd` | in a graph, +1 round | left with graphs, +1 round |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | --- |",
    ]
    for r in rows:
        one, more = r["one"], r["more"]
        left = "—"
        if more["graph_ops"]:
            copies = GRAPH_COPIES[r["defense"]](more["graph_steps"], r["settings"])
            left = (f"{more['kernels'] - more['graph_kernels'] + copies:,} kernels ({copies} of them copies into "
                    f"the graphs' inputs) + {more['graph_steps']} graph launches, {more['syncs'] - more['graph_syncs']}"
                    " syncs")
        share = f"{more['graph_ops']:,} ({100 * more['graph_ops'] / max(1, more['ops']):.0f} %)"
        lines.append(f"| {r['defense']} | {r['path']} | {_row(one)} | {_row(more)} | {share} | {left} |")
    lines += ["", "## Per phase (+1 round)", "",
              "| defense | path | phase | ops | in a graph | syncs | reads |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        for p, d in sorted(r["more"]["phases"].items()):
            lines.append(f"| {r['defense']} | {r['path']} | {p} | {d['ops']:,} | {d['graph_ops']:,} | {d['syncs']} | "
                         f"{d['reads']} |")
    lines += ["", "## Where the syncs of a round are (+1 round, by call site)", ""]
    for r in rows:
        sites = sorted(r["more"]["sync_sites"].items(), key=lambda kv: (-kv[1], kv[0]))
        lines.append(f"- **{r['defense']} {r['path']}**: "
                     + ("; ".join(f"{s} ×{v}" for s, v in sites) if sites else "none"))
    lines += ["", "## What a CUDA graph replaces on a GPU", ""]
    lines += [f"- **{n}**: {GRAPH_NOTES[n]}" for n in DEFENSES if any(r["defense"] == n for r in rows)]
    lines.append("")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------------------
# The script
# --------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    from fastpurify.bench import BENCH_SETTINGS, SHARED_CHECKPOINTS, check_settings
    from fastpurify.data import load_cifar10
    from fastpurify.models import load_checkpoint

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--defenses", nargs="+", default=list(DEFENSES), choices=DEFENSES)
    ap.add_argument("--paths", nargs="+", default=["reference", "fast"], choices=("reference", "fast"))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--n-clean", type=int, default=256)
    ap.add_argument("--cpu", action="store_true", help="count the fast paths' CPU strategies (launch_bound False)")
    ap.add_argument("--two-runs", action="store_true", help="also run epochs=1 and check that its counts equal the "
                                                            "first round's of the epochs=2 run")
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    ap.add_argument("--render", action="store_true", help="rewrite dispatch.md from dispatch.json (no counting)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / device_tag()  # before 1 thread
    if args.render:
        saved = json.loads((out / "dispatch.json").read_text())
        (out / "dispatch.md").write_text(render(saved["rows"], saved["environment"], saved["workload"]))
        return 0
    torch.set_num_threads(1)  # the counts do not depend on it; the machine is shared
    rel, _, target = SHARED_CHECKPOINTS["badnets"]
    model = load_checkpoint(Path(args.data) / rel, arch="small_vgg")
    x, y = load_cifar10(Path(args.data) / "cifar10", split="train", count=args.n_clean)
    strategies = "the CPU strategies" if args.cpu else "the fast paths' GPU strategies"
    workload = (f"the SmallVGG badnets checkpoint, the first {args.n_clean} CIFAR-10 training images, "
                f"`BENCH_SETTINGS` with `epochs=2`, BAERASE told the target, {strategies}, 1 thread, seed 0")
    env = environment()  # the commit whose code is counted
    rows = []
    for name in args.defenses:
        settings = {**BENCH_SETTINGS[name], **({"target": target} if name == "baerase" else {}), "epochs": 2}
        check_settings(name, settings)
        for path in args.paths:
            run = count_run(name, path, model, (x, y), settings, gpu_strategies=not args.cpu)
            row = {"defense": name, "path": path, "settings": settings, "seconds": run["seconds"],
                   "one": run["one"], "more": run["later"][0] if run["later"] else None}
            if args.two_runs:
                single = count_run(name, path, model, (x, y), {**settings, "epochs": 1}, gpu_strategies=not args.cpu)
                same = {k: (single["one"][k], run["one"][k]) for k in ("ops", "reads", "syncs")}
                row["two_runs_check"] = same
                print(f"  epochs=1 run against the first round of epochs=2 (ops, reads, syncs): {same}")
            rows.append(row)
            print(f"{name} {path}: 1 round {row['one']['ops']:,} ops / {row['one']['syncs']} syncs, +1 round "
                  f"{row['more']['ops']:,} ops / {row['more']['syncs']} syncs ({run['seconds']:.0f} s)", flush=True)
    out.mkdir(parents=True, exist_ok=True)
    (out / "dispatch.json").write_text(json.dumps({"environment": env, "workload": workload, "rows": rows},
                                                  indent=1, default=str))
    (out / "dispatch.md").write_text(render(rows, env, workload))
    print(f"wrote {out / 'dispatch.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
