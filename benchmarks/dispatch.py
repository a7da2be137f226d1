"""What each defense asks of the device per round: ATen ops dispatched and host-visible reads, reference against
fast path, counted on CPU — and which of those ops a CUDA graph replaces on a GPU.

On a GPU a step at small batch is bound by launches and host synchronisation, not arithmetic (specs/kernels.md),
and both are visible without a GPU: every ATen op the defense dispatches passes through a
``TorchDispatchMode`` (:class:`OpCounter`; a non-view op is about one kernel launch on a GPU), and every read of
a tensor's value on the host through a ``TorchFunctionMode`` (:class:`ReadCounter`: ``.item()``, ``bool()``,
``float()``, ``int()``, ``.tolist()``, ``.numpy()``, formatting — on a GPU each waits for the device; ``.item()``
and the casts dispatch ``aten::_local_scalar_dense``, ``.tolist()`` on a CPU tensor dispatches nothing, so the
function mode is the one that sees them all), together with ``.to(device)`` / ``as_tensor(device=)`` calls
(host-to-device copies: from pageable memory without ``non_blocking`` each one synchronises the stream on CUDA).
Each op and read is attributed to the loop phase it ran in (``Loop.phase``) and, for the steps a fast path
captures into a CUDA graph, to that graph; reads are also listed by call site.

Workload (the issue's): the real SmallVGG BadNets checkpoint (``../shared/data/ibau/badnets_8_02_ckpt.pth``),
the first 256 CIFAR-10 training images, ``fastpurify.bench.BENCH_SETTINGS`` with ``epochs`` = 1 and then 2
(BAERASE told the target), one CPU thread, seed 0; the cost of a round is the second run minus the first. The
counts do not depend on the thread count or the machine's speed (the time budget is off).

Writes ``benchmarks/results/<device>/dispatch.json`` and ``dispatch.md``. Usage::

    python benchmarks/dispatch.py                       # all five defenses, both paths (about 4 min on 1 thread)
    python benchmarks/dispatch.py --defenses ibau --n-clean 128
    python benchmarks/dispatch.py --render              # dispatch.md again from dispatch.json
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, when fastpurify is not installed
from _env import ROOT, device_tag, environment  # noqa: E402

DEFAULT_DATA = ROOT.parent / "shared" / "data"
TORCH_DIR = str(Path(torch.__file__).resolve().parent)
GRAPH = "graph"  # the region name of a step a fast path captures into a CUDA graph

# --------------------------------------------------------------------------------------------------------
# The counters
# --------------------------------------------------------------------------------------------------------


def call_site(skip: str = __file__) -> str:
    """``path:function`` of the innermost caller outside torch and this file (paths relative to the repository),
    prefixed with the innermost torch function when the read happened inside torch (e.g. an optimizer)."""
    f = sys._getframe(1)
    inner_torch = None
    while f is not None:
        name = f.f_code.co_filename
        if name.startswith(TORCH_DIR):
            # the Tensor dunder wrappers (overrides.py, _tensor.py) are how a read is spelled, not who reads
            if inner_torch is None and not name.endswith(("overrides.py", "_tensor.py")):
                inner_torch = f"torch/{Path(name).relative_to(TORCH_DIR)}:{f.f_code.co_name}"
        elif name != skip and "contextlib" not in name:
            try:
                where = str(Path(name).resolve().relative_to(ROOT))
            except ValueError:
                where = Path(name).name
            site = f"{where}:{f.f_code.co_name}"
            return f"{inner_torch} <- {site}" if inner_torch else site
        f = f.f_back
    return inner_torch or "?"


class _Regions:
    """The stack of named regions (loop phases, captured steps) the counts are attributed to."""

    def __init__(self) -> None:
        self.stack: List[str] = []
        self.entries: Counter = Counter()  # name -> times entered (GRAPH: one graph replay each on a GPU)

    @contextlib.contextmanager
    def region(self, name: str):
        self.stack.append(name)
        self.entries[name] += 1
        try:
            yield
        finally:
            self.stack.pop()

    def phase(self) -> str:
        names = [n for n in self.stack if n != GRAPH]
        return names[-1] if names else "(outside phases)"

    def captured(self) -> bool:
        return GRAPH in self.stack


class OpCounter(TorchDispatchMode):
    """Counts every ATen op dispatched while active (autograd's backward ops included), per (phase, captured)
    region; ``views`` are ops whose result aliases an input (no kernel on a GPU); ``scalar_dense`` counts
    ``aten::_local_scalar_dense`` (what ``.item()``, ``bool()``, ``float()`` and ``int()`` dispatch)."""

    def __init__(self, regions: Optional[_Regions] = None) -> None:
        super().__init__()
        self.regions = regions or _Regions()
        self.ops: Counter = Counter()  # (phase, captured) -> ops
        self.views: Counter = Counter()
        self.by_name: Counter = Counter()
        self.scalar_dense = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        key = (self.regions.phase(), self.regions.captured())
        self.ops[key] += 1
        self.by_name[func.name()] += 1
        returns = func._schema.returns
        if returns and returns[0].alias_info is not None and not returns[0].alias_info.is_write:
            self.views[key] += 1
        if func is torch.ops.aten._local_scalar_dense.default:
            self.scalar_dense += 1
        return func(*args, **(kwargs or {}))

    @property
    def total(self) -> int:
        return sum(self.ops.values())


_READS = {torch.Tensor.item, torch.Tensor.tolist, torch.Tensor.__bool__, torch.Tensor.__float__,
          torch.Tensor.__int__, torch.Tensor.__index__, torch.Tensor.numpy, torch.Tensor.__format__}
_TO_DEVICE = {torch.Tensor.to, torch.as_tensor, torch.tensor, torch.Tensor.cuda}


def _device_arg(func, args, kwargs) -> bool:
    """Whether a ``.to(...)`` / ``as_tensor`` / ``tensor`` call names a device (a host-to-device copy on a GPU run
    when its source is on the host)."""
    if func is torch.Tensor.cuda:
        return True
    if kwargs.get("device") is not None:
        return True
    if func is torch.Tensor.to:
        return any(isinstance(a, (torch.device, str, int)) and not isinstance(a, bool) for a in args[1:])
    return False


class ReadCounter(TorchFunctionMode):
    """Counts host-visible reads of tensor values (each one waits for the device on a GPU) and device-naming
    copies (``.to(device)`` and friends; ``blocking`` when not ``non_blocking=True``), per phase and per call
    site. Reads made inside another read (``__format__`` calling ``item``) count once."""

    def __init__(self, regions: Optional[_Regions] = None) -> None:
        super().__init__()
        self.regions = regions or _Regions()
        self.reads: Counter = Counter()  # (phase, captured) -> reads
        self.read_sites: Counter = Counter()
        self.copies: Counter = Counter()  # (phase, blocking) -> calls
        self.copy_sites: Counter = Counter()
        self._depth = 0

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func in _READS and self._depth == 0:
            self.reads[(self.regions.phase(), self.regions.captured())] += 1
            self.read_sites[call_site()] += 1
        elif func in _TO_DEVICE and self._depth == 0 and _device_arg(func, args, kwargs):
            blocking = not kwargs.get("non_blocking", False)
            self.copies[(self.regions.phase(), blocking)] += 1
            self.copy_sites[(call_site(), blocking)] += 1
        self._depth += func in _READS
        try:
            return func(*args, **kwargs)
        finally:
            self._depth -= func in _READS


@contextlib.contextmanager
def counting(patches: Sequence[Tuple[Any, str]] = ()):
    """Count ops and reads inside the block: yields ``(ops, reads, regions)``. ``Loop.phase`` is wrapped so that
    counts fall into the phase they ran in; each ``(owner, attribute)`` of ``patches`` names a function to run in
    the :data:`GRAPH` region (the steps a fast path captures on CUDA)."""
    from fastpurify.defenses._loop import Loop

    regions = _Regions()
    ops, reads = OpCounter(regions), ReadCounter(regions)
    saved = [(Loop, "phase", Loop.phase)]
    plain_phase = Loop.phase

    @contextlib.contextmanager
    def phase(self, name, **kw):
        with plain_phase(self, name, **kw), regions.region(name):
            yield

    Loop.phase = phase
    for owner, attr in patches:
        fn = getattr(owner, attr)
        saved.append((owner, attr, fn))

        def wrapped(*a, _fn=fn, **kw):
            with regions.region(GRAPH):
                return _fn(*a, **kw)

        setattr(owner, attr, wrapped)
    try:
        with reads, ops:
            yield ops, reads, regions
    finally:
        for owner, attr, fn in reversed(saved):
            setattr(owner, attr, fn)


# --------------------------------------------------------------------------------------------------------
# The defenses
# --------------------------------------------------------------------------------------------------------


def captured_steps(name: str, path: str) -> List[Tuple[Any, str]]:
    """The functions whose ops a CUDA graph replaces on a GPU: the fast I-BAU's hypergradient solve
    (``implicit_hypergrad``, which ``HypergradGraphs`` captures per batch shape) and the fast SAU's attack step
    (``SharedPGD._step``, captured with ``cuda_graph=True``)."""
    if path != "fast":
        return []
    if name == "ibau":
        import importlib

        # the module (the package attribute of the same name is the defense function)
        return [(importlib.import_module("fastpurify.defenses.ibau"), "implicit_hypergrad")]
    if name == "sau":
        from fastpurify.ops.attack import SharedPGD

        return [(SharedPGD, "_step")]
    return []


def defense_fn(name: str, path: str) -> Callable:
    import importlib

    if path == "fast":
        return getattr(importlib.import_module(f"fastpurify.defenses.{name}"), name)
    return getattr(importlib.import_module(f"fastpurify.reference.defenses.{name}"), name)


def count_run(name: str, path: str, model, data, settings: Dict[str, Any], seed: int = 0) -> Dict[str, Any]:
    """One run of a defense under the counters; returns the counts (and the run's wall time, for the record)."""
    fn = defense_fn(name, path)
    t0 = time.perf_counter()
    with counting(captured_steps(name, path)) as (ops, reads, regions):
        r = fn(copy.deepcopy(model), data, progress=False, seed=seed, **settings)
    phases = sorted({k[0] for k in ops.ops} | {k[0] for k in reads.reads})
    return {
        "rounds": len(r.history), "seconds": time.perf_counter() - t0, "ops": ops.total,
        "views": sum(ops.views.values()), "scalar_dense": ops.scalar_dense,
        "reads": sum(reads.reads.values()),
        "blocking_copies": sum(v for (_, b), v in reads.copies.items() if b),
        "nonblocking_copies": sum(v for (_, b), v in reads.copies.items() if not b),
        "captured_ops": sum(v for (_, c), v in ops.ops.items() if c),
        "captured_views": sum(v for (_, c), v in ops.views.items() if c),
        "captured_reads": sum(v for (_, c), v in reads.reads.items() if c),
        "graph_steps": regions.entries[GRAPH],
        "phases": {p: {"ops": sum(v for (q, _), v in ops.ops.items() if q == p),
                       "captured_ops": ops.ops.get((p, True), 0),
                       "reads": sum(v for (q, _), v in reads.reads.items() if q == p),
                       "blocking_copies": reads.copies.get((p, True), 0)} for p in phases},
        "read_sites": dict(reads.read_sites),
        "copy_sites": {f"{s} ({'blocking' if b else 'non_blocking'})": v for (s, b), v in reads.copy_sites.items()},
    }


def _minus(two: Dict[str, Any], one: Dict[str, Any]) -> Dict[str, Any]:
    """The second round's cost: the 2-round counts minus the 1-round counts (also per phase and site)."""
    out = {k: two[k] - one[k] for k in two if isinstance(two[k], (int, float)) and k != "seconds"}
    out["phases"] = {p: {k: v - one["phases"].get(p, {}).get(k, 0) for k, v in d.items()}
                     for p, d in two["phases"].items()}
    for key in ("read_sites", "copy_sites"):
        out[key] = {s: v - one[key].get(s, 0) for s, v in two[key].items() if v - one[key].get(s, 0)}
    return out


# --------------------------------------------------------------------------------------------------------
# The tables
# --------------------------------------------------------------------------------------------------------

#: Per defense: what a CUDA graph replaces on a GPU, or why nothing is captured (dispatch.md says it under the
#: tables; the reasons are the code's, read from fastpurify/defenses/<name>.py and _loop.py).
GRAPH_NOTES = {
    "sau": "**captured with `cuda_graph=True`** (not the default): each attack step (`SharedPGD._step`: both "
           "forwards, the loss, the input gradient and the fused update) is one graph per batch shape "
           "(`SharedPGD.graphs`, an LRU of 4: a ragged last batch gets its own graph instead of evicting the "
           "full one), and the graph runs every step (early exit on the device) where the CPU count stops early. "
           "The unlearning step is not captured: `loop.step(opt, loss)` runs the backward inside the loop.",
    "ibau": "**captured on CUDA by default** (`cuda_graph=None`: a batch shape that repeats at least 3 times in "
            "the run; `True`: every shape): the hypergradient step (`implicit_hypergrad`: outer gradients, inner "
            "gradient graph, the K = 5 fixed-point solve, the mixed product) is one graph per (inner, outer) batch "
            "shape (`HypergradGraphs`), fed by 6 device-to-device copies; the fused Adam step stays outside it at "
            "`loop.step`. The perturbation pass is not captured (one step per batch, each batch a different "
            "shape-free δ update: capturable, but 1/6 of the ops).",
    "awm": "not captured. Both phases' steps have static shapes (batches drawn with replacement, always "
           "`batch_size`) and no host read, but: (1) the mask step calls `loop.step(opt, loss)`, which runs "
           "`backward()` inside the loop helper — capturing it needs the step to compute the mask gradients with "
           "`torch.autograd.grad` inside the graph and call `loop.step(opt)`, as I-BAU does; (2) "
           "`MaskedAdamClamp` passes the step count and bias corrections as host numbers (baked into a graph): "
           "it stays outside, one launch; (3) every step's batch indices come from `Loop.batches(replacement=True)` "
           "as `torch.randint(...).to(device)`, a blocking pageable copy (a stream sync per step on CUDA, "
           "counted below) that must land in a static index buffer outside the graph; (4) the recovery's last "
           "step fuses the L1 rescale (a second graph). Needed: changes in awm.py and _loop.py (see the report).",
    "baerase": "not captured. The unlearning and recovery steps draw the stamp location on the host "
               "(`location()`: `torch.rand(2).tolist()`, then Python slicing at those offsets): a graph would "
               "replay the captured offsets, so `stamp_into` would need device-side offsets (or "
               "`position=\"corner\"`, fixed); the noise and z draws come from the host generator through pinned "
               "memory (copyable into static buffers outside a graph); the recovery's two `loop.step(opt, loss)` "
               "and the unlearning's one run backward inside the loop helper; the early-stop flip rate is a host "
               "read per round (needed: it decides whether to go on).",
    "bcu": "not captured. A step is one teacher forward and one student forward + backward at batch 256 (the "
           "fewest ops per image of the five); the temperature changes every round (a host number in the loss: "
           "a graph per round, or a device scalar), the augmentation and the dropout masks draw from device "
           "generators (capturable only when registered with the graph: `CUDAGraph.register_generator_state`), "
           "and `loop.step(opt, loss)` runs the backward inside the loop helper. At batch 256 the convolutions "
           "are large enough that the launch overhead is a small share; measure before capturing.",
}


def render(rows: List[Dict[str, Any]], env: Dict[str, Any], workload: str) -> str:
    order = {n: i for i, n in enumerate(("sau", "ibau", "awm", "baerase", "bcu"))}
    rows = sorted(rows, key=lambda r: (order.get(r["defense"], 9), r["path"] != "reference"))
    lines = [
        "# Dispatch counts: ATen ops and host reads per round, reference against fast path", "",
        f"Counted on CPU by `benchmarks/dispatch.py` ({workload}; torch {env['torch']}, commit {env['commit']}). "
        "**ops**: ATen ops dispatched (TorchDispatchMode; backward ops included; *kernels* = ops that are not "
        "views, about one launch each on a GPU); **reads**: host reads of a tensor's value (`.item()`, "
        "`bool()`, `float()`, `int()`, `.tolist()`, `.numpy()`, formatting: on a GPU each waits for the device, "
        "unless the tensor lives on the host, as a host generator's draws do — see the sites below); "
        "`_local_scalar_dense` is the op `.item()`/`bool()`/`float()`/`int()` dispatch (`.tolist()` of a CPU "
        "tensor dispatches nothing, so the reads column is the complete one); **H2D**: `.to(device)` / "
        "`as_tensor(device=)` calls, *blocking* ones synchronise the stream on CUDA when the source is pageable "
        "host memory. **in graph**: ops of the steps a fast path captures into a CUDA graph on a GPU (replaced "
        "there by one graph launch per step plus the copies into its static inputs). 1 round = a run with "
        "`epochs=1` (setup included); +1 round = `epochs=2` minus `epochs=1`.", "",
        "| defense | path | ops, 1 round | kernels | reads | `_local_scalar_dense` | blocking H2D | "
        "ops, +1 round | kernels | reads | blocking H2D | in graph, +1 round | left on the host with graphs |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for r in rows:
        one, more = r["one"], r["marginal"]
        left = "—"
        if more["captured_ops"]:
            left = f"{more['ops'] - more['captured_ops']:,} ops + {more['graph_steps']} replays"
        lines.append(
            f"| {r['defense']} | {r['path']} | {one['ops']:,} | {one['ops'] - one['views']:,} | {one['reads']} | "
            f"{one['scalar_dense']} | {one['blocking_copies']} | {more['ops']:,} | {more['ops'] - more['views']:,} | "
            f"{more['reads']} | {more['blocking_copies']} | "
            f"{more['captured_ops']:,} ({100 * more['captured_ops'] / max(1, more['ops']):.0f} %) | {left} |")
    lines += ["", "## Per phase (+1 round: ops, of which in a graph, reads, blocking H2D)", ""]
    lines += ["| defense | path | phase | ops | in graph | reads | blocking H2D |",
              "| --- | --- | --- | ---: | ---: | ---: | ---: |"]
    for r in rows:
        for p, d in sorted(r["marginal"]["phases"].items()):
            if any(d.values()):
                lines.append(f"| {r['defense']} | {r['path']} | {p} | {d['ops']:,} | {d['captured_ops']:,} | "
                             f"{d['reads']} | {d['blocking_copies']} |")
    lines += ["", "## Where the reads and the blocking copies of a round are (+1 round, by call site)", ""]
    for r in rows:
        sites = r["marginal"]["read_sites"]
        copies = {s: v for s, v in r["marginal"]["copy_sites"].items() if s.endswith("(blocking)")}
        if not sites and not copies:
            continue
        lines.append(f"- **{r['defense']} {r['path']}**: "
                     + "; ".join([f"read `{s}` ×{v}" for s, v in sorted(sites.items(), key=lambda kv: -kv[1])]
                                 + [f"H2D `{s.rsplit(' (', 1)[0]}` ×{v}"
                                    for s, v in sorted(copies.items(), key=lambda kv: -kv[1])]))
    lines += ["", "## What a CUDA graph replaces on a GPU", ""]
    for name in sorted({r["defense"] for r in rows}, key=lambda n: order.get(n, 9)):
        lines.append(f"- **{name}**: {GRAPH_NOTES.get(name, '')}")
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
    ap.add_argument("--defenses", nargs="+", default=["sau", "ibau", "awm", "baerase", "bcu"])
    ap.add_argument("--paths", nargs="+", default=["reference", "fast"], choices=("reference", "fast"))
    ap.add_argument("--data", default=str(DEFAULT_DATA))
    ap.add_argument("--n-clean", type=int, default=256)
    ap.add_argument("--out", default=None, help="output folder (default benchmarks/results/<device>)")
    ap.add_argument("--render", action="store_true", help="rewrite dispatch.md from dispatch.json (no counting)")
    args = ap.parse_args(argv)
    out = Path(args.out) if args.out else ROOT / "benchmarks" / "results" / device_tag()  # before 1 thread
    if args.render:
        saved = json.loads((out / "dispatch.json").read_text())
        (out / "dispatch.md").write_text(render(saved["rows"], saved["environment"], saved["workload"]))
        return 0
    torch.set_num_threads(1)  # counts do not depend on it; the machine is shared
    rel, _, target = SHARED_CHECKPOINTS["badnets"]
    model = load_checkpoint(Path(args.data) / rel, arch="small_vgg")
    x, y = load_cifar10(Path(args.data) / "cifar10", split="train", count=args.n_clean)
    workload = (f"SmallVGG badnets checkpoint, the first {args.n_clean} CIFAR-10 training images, "
                "`fastpurify.bench.BENCH_SETTINGS` with `epochs` 1 and 2, BAERASE told the target, 1 thread, seed 0")
    env = environment()
    rows = []
    for name in args.defenses:
        for path in args.paths:
            settings = {**BENCH_SETTINGS[name], **({"target": target} if name == "baerase" else {})}
            check_settings(name, settings)
            runs = {}
            for epochs in (1, 2):
                runs[epochs] = count_run(name, path, model, (x, y), {**settings, "epochs": epochs})
                print(f"{name} {path} epochs={epochs}: {runs[epochs]['ops']:,} ops, {runs[epochs]['reads']} reads, "
                      f"{runs[epochs]['seconds']:.1f} s", flush=True)
            rows.append({"defense": name, "path": path, "settings": settings, "one": runs[1], "two": runs[2],
                         "marginal": _minus(runs[2], runs[1])})
    out.mkdir(parents=True, exist_ok=True)
    (out / "dispatch.json").write_text(json.dumps({"environment": env, "workload": workload, "rows": rows},
                                                  indent=1, default=str))
    (out / "dispatch.md").write_text(render(rows, env, workload))
    print(f"wrote {out / 'dispatch.md'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
