"""``torch.compile`` of the eager reference as a benchmark provider (issue 17): what a user would try first to make
a reference defense or op fast, timed beside the reference and the fast path.

Providers (``fastpurify bench --providers``, ``benchmarks/end_to_end.py --providers``):

- ``reference`` — the faithful eager port (always run: it is the baseline and the correctness yardstick);
- ``fast`` — the fast path (``fastpurify.defenses.<name>``);
- ``compile`` — the reference defense given ``torch.compile(model, mode=M)``: M = ``"default"`` on a CPU,
  ``"reduce-overhead"`` (CUDA graphs) on a GPU;
- ``compile-max`` — the same with ``mode="max-autotune-no-cudagraphs"``;
- ``compile:MODE`` — any other ``torch.compile`` mode.

**What is compiled, and why.** The natural thing a user does without rewriting the reference is
``fastpurify.reference.defenses.sau(torch.compile(model), data)``: the model is the compute (convolutions,
BatchNorm, the head) of every forward and backward the reference runs; the reference's own step functions
(``shared_pgd``, ``unlearning_loss``, I-BAU's ``implicit_hypergradient``, AWM's recovery loop, ...) are full of
host syncs (``.item()``, ``float(norm) < tol``, ``if mask.sum() == 0``), data-dependent boolean indexing
(``loss[~adv]``) and ``backward()`` calls, each a graph break, so compiling them adds compile time around
graphs that are mostly the model anyway. The reference copies its input (``copy.deepcopy``), and SAU and BCU
deep-copy it again for their frozen teacher: ``torch.compile``'s ``OptimizedModule`` supports that (its
``__reduce__`` rebuilds the wrapper around the copied module), so every copy runs compiled. Nothing of the
reference changes.

One setting is changed, the one the first error message asks for: the references call
``backward(retain_graph=True)`` (I-BAU's perturbation pass, AWM's recovery) or ``autograd.grad(...,
create_graph=True)`` (I-BAU's fixed-point map), which AOTAutograd's donated buffers refuse ("This backward
function was compiled with non-empty donated buffers which requires create_graph=False and retain_graph=False
... or set torch._functorch.config.donated_buffer=False"); the compiled provider runs with
``donated_buffer=False``. With it AWM compiles; I-BAU still cannot: its hypergradient differentiates the
model's gradient (double backward), and torch 2.13 raises "torch.compile with aot_autograd does not currently
support double backward". Such a provider's record says ``status="error"`` and the exception's first line; the
bench goes on.

**What is timed.** Inductor's on-disk caches are switched off (``fx_graph_cache``, the AOTAutograd cache) and
dynamo is reset before each compiled provider, so ``compile_s`` is a cold compile. The first call (the whole
defense with the timed settings, so that it meets every batch shape the timed calls meet: the last, smaller
batch, the training and evaluation modes) compiles and runs: its wall time is ``first_call_s``. The
``repeats`` calls after it are the steady state: ``defense_s`` is their median (``result.timings["defense"]``),
and ``compile_s = first_call_s − the first warm call's wall time``. ``recompiles`` counts the graphs dynamo
compiled during the warm calls (0 when the first call saw every shape), ``graph_breaks`` the graph breaks of
the first call.

**Correctness.** The purified model is evaluated eagerly (its ``_orig_mod``) on the workload's evaluation data;
``matches_reference`` says whether its ACC and ASR lie within ±1 point of the reference's (as ``agree`` does
for the fast path; compiled kernels round differently, and training amplifies that, so bit equality is not
expected). A compiled provider that disagrees is flagged in the table. ``after_first_call`` holds the metrics of
the compiling call's model too, so that a warm call that reuses graphs wrongly (but the first one right) shows.
``matches_reference`` requires both calls to agree.
"""

from __future__ import annotations

import contextlib
import statistics
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple

import torch
from torch import nn

#: Provider names ``--providers`` accepts besides ``compile:MODE``.
PROVIDERS = ("reference", "fast", "compile", "compile-max")
DEFAULT_PROVIDERS = ("reference", "fast")
#: ``torch.compile`` modes (torch 2.13).
MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def compile_mode(provider: str, device_type: str = "cpu") -> Optional[str]:
    """The ``torch.compile`` mode of a provider name (None: not a compiled provider).

    Example::

        >>> compile_mode("compile", "cpu"), compile_mode("compile", "cuda"), compile_mode("compile-max")
        ('default', 'reduce-overhead', 'max-autotune-no-cudagraphs')
    """
    if provider == "compile":
        return "reduce-overhead" if device_type == "cuda" else "default"
    if provider == "compile-max":
        return "max-autotune-no-cudagraphs"
    if provider.startswith("compile:"):
        return provider.split(":", 1)[1]
    return None


def parse_providers(text: Any) -> List[str]:
    """``"reference,fast,compile"`` (or a list) -> checked provider names, in order, without duplicates. Raises
    ValueError naming the valid ones; the reference must be among them (it is the baseline and the yardstick of
    every correctness check)."""
    items = text.split(",") if isinstance(text, str) else list(text or [])
    names = list(dict.fromkeys(str(p).strip().lower() for p in items if str(p).strip()))
    if not names:
        raise ValueError(f"--providers: no provider given; valid: {', '.join(PROVIDERS)}, compile:MODE")
    for p in names:
        mode = compile_mode(p)
        if p not in PROVIDERS and mode not in MODES:
            raise ValueError(f"--providers: unknown provider {p!r}; valid: {', '.join(PROVIDERS)} or compile:MODE "
                             f"with MODE one of {', '.join(MODES)}")
    if "reference" not in names:
        raise ValueError(f"--providers {','.join(names)}: include 'reference' (every speed-up and every "
                         "correctness check is against it), e.g. --providers reference,compile")
    return names


def compiled_providers(providers: Sequence[str]) -> List[str]:
    return [p for p in providers if compile_mode(p) is not None]


def first_line(exc: BaseException) -> str:
    """``Type: the exception's first non-empty line`` (at most 300 characters)."""
    text = next((line.strip() for line in str(exc).splitlines() if line.strip()), "")
    return f"{type(exc).__name__}: {text}"[:300]


@contextlib.contextmanager
def cold_compile(reset_after: bool = True) -> Iterator[None]:
    """Dynamo reset, inductor's FX-graph and AOTAutograd caches off, donated buffers off (module docstring);
    ``reset_after=False`` keeps what was compiled for the caller to time."""
    import torch._dynamo
    import torch._functorch.config as functorch_config
    import torch._inductor.config as inductor_config

    torch._dynamo.reset()
    patches = [inductor_config.patch(fx_graph_cache=False), functorch_config.patch(donated_buffer=False)]
    if hasattr(functorch_config, "enable_autograd_cache"):
        patches.append(functorch_config.patch(enable_autograd_cache=False))
    with contextlib.ExitStack() as stack:
        for p in patches:
            stack.enter_context(p)
        try:
            yield
        finally:
            if reset_after:
                torch._dynamo.reset()


def dynamo_counts() -> Tuple[int, int]:
    """(graphs compiled so far, graph breaks so far) from dynamo's counters."""
    from torch._dynamo.utils import counters

    return int(counters["stats"]["unique_graphs"]), int(sum(counters["graph_break"].values()))


def unwrap(model: nn.Module) -> nn.Module:
    """The module inside a ``torch.compile`` wrapper (the model itself when not wrapped)."""
    return getattr(model, "_orig_mod", model)


def run_compiled(provider: str, call: Callable[[nn.Module], Tuple[Any, float]], model: nn.Module,
                 evaluate: Callable[[nn.Module], Tuple[Any, float]], repeats: int,
                 device_type: str = "cpu") -> Dict[str, Any]:
    """Run one defense with ``torch.compile(model)``: a first call (compile + run), ``repeats`` warm calls, an
    eager evaluation of the purified model. ``call(m)`` runs the reference defense on ``m`` and returns
    ``(result, wall seconds)``; ``evaluate(m)`` returns ``(EvalResult, seconds)``. Never raises for a compile
    failure: the record then has ``status="error"`` and ``error`` (the exception's first line)."""
    mode = compile_mode(provider, device_type)
    rec: Dict[str, Any] = {"provider": provider, "mode": mode, "what": "torch.compile(model) given to the reference",
                           "donated_buffer": False, "status": "ok", "error": None}
    with cold_compile():
        compiled = torch.compile(model, mode=mode)
        graphs0, breaks0 = dynamo_counts()
        try:
            result, first = call(compiled)
            graphs1, breaks1 = dynamo_counts()
            first_after, _ = evaluate(unwrap(result.model))  # the compiling call's model, judged too (below)
            runs, walls = [], []
            for _ in range(repeats):
                del result
                result, wall = call(compiled)
                runs.append(float(result.timings["defense"]))
                walls.append(wall)
            graphs2, _ = dynamo_counts()
        except Exception as e:  # noqa: BLE001  (any compile failure becomes the row's reason)
            rec.update(status="error", error=first_line(e))
            return rec
    after, eval_s = evaluate(unwrap(result.model))
    rec.update({
        "first_call_s": first, "compile_s": max(0.0, first - walls[0]), "defense_s": statistics.median(runs),
        "defense_s_runs": runs, "wall_s": walls[0], "eval_s": eval_s, "run_status": result.status,
        "rounds": len(result.history), "graphs": graphs1 - graphs0, "recompiles": graphs2 - graphs1,
        "graph_breaks": breaks1 - breaks0, "after": {"acc": after.acc, "asr": after.asr, "ra": after.ra},
        "after_first_call": {"acc": first_after.acc, "asr": first_after.asr, "ra": first_after.ra},
    })
    return rec


def judge(rec: Dict[str, Any], reference: Mapping[str, Any], tolerance: float = 1.0) -> None:
    """Add ``matches_reference`` (ACC and ASR after within ±``tolerance`` points of the reference's) and
    ``speedup`` (reference defense_s / this defense_s) to a compiled record, in place."""
    if rec.get("status") != "ok":
        rec["matches_reference"], rec["speedup"] = None, None
        return
    rec["matches_reference"] = all(abs(got[k] - reference["after"][k]) <= tolerance for k in ("acc", "asr")
                                   for got in (rec["after"], rec.get("after_first_call") or rec["after"])
                                   if got[k] is not None and reference["after"][k] is not None)
    rec["speedup"] = reference["defense_s"] / rec["defense_s"] if rec["defense_s"] > 0 else None


def best_provider(row: Mapping[str, Any]) -> Optional[str]:
    """The provider with the smallest defense_s in a bench row (reference, fast, and each compiled one that ran
    and matched the reference)."""
    times = {"reference": row["reference"]["defense_s"]}
    if row.get("fast"):
        times["fast"] = row["fast"]["defense_s"]
    for p, rec in (row.get("compiled") or {}).items():
        if rec.get("status") == "ok" and rec.get("matches_reference"):
            times[p] = rec["defense_s"]
    return min(times, key=times.get)


def compiled_cells(row: Mapping[str, Any], provider: str, secs: Callable[[Optional[float]], str]) -> str:
    """One compiled provider's table cell: ``defense s (speed-up vs reference; compile s)``, a ``★`` when it beats
    the fast path, ``✗`` when its ACC/ASR disagree with the reference, or the reason it could not run."""
    rec = (row.get("compiled") or {}).get(provider)
    if rec is None:
        return "—"
    if rec["status"] != "ok":
        return f"failed: {rec['error']}".replace("|", "\\|")
    mark = ""
    if row.get("fast") and rec["defense_s"] < row["fast"]["defense_s"]:
        mark = " ★ beats fast"
    if rec.get("matches_reference") is False:
        mark += " ✗ ACC/ASR differ from the reference"
    speed = f"{rec['speedup']:.2f}×" if rec.get("speedup") else "—"
    return f"{secs(rec['defense_s'])} ({speed}; compile {secs(rec['compile_s'])}){mark}"


def extra_columns(rows: Sequence[Mapping[str, Any]], secs: Callable[[Optional[float]], str],
                  num: Callable[[Optional[float]], str]) -> Tuple[List[str], List[List[str]], List[str]]:
    """The table columns the compiled providers add to :func:`fastpurify.bench.render_markdown`: (header cells,
    cells per row, legend lines); nothing when no row has a compiled provider."""
    provs = list(dict.fromkeys(p for r in rows for p in (r.get("compiled") or {})))
    if not provs:
        return [], [[] for _ in rows], []
    modes = {p: compile_mode(p, str(r.get("device", "cpu")).split(":")[0]) for r in rows for p in r.get("compiled", {})}
    head = [f"{p} ({modes[p]}) s (× ref; compile s)" for p in provs]
    head += [f"ACC / ASR after {p}" for p in provs] + ["best"]
    cells = []
    for r in rows:
        comp = r.get("compiled") or {}
        row = [compiled_cells(r, p, secs) for p in provs]
        for p in provs:
            rec = comp.get(p)
            ok = rec is not None and rec["status"] == "ok"
            row.append(f"{num(rec['after']['acc'])} / {num(rec['after']['asr'])}" if ok else "—")
        row.append(str(r.get("best") or best_provider(r)) if comp else "—")
        cells.append(row)
    legend = ["compile: the reference defense given `torch.compile(model, mode=...)` (fastpurify/bench_compile.py): "
              "defense s of the warm call(s) after a first call that compiled; × ref = ref s / this; compile s = "
              "first call's wall time − the warm call's. ★: faster than the fast path; ✗: ACC/ASR after not within "
              "±1 point of the reference's; failed: the exception's first line (the provider could not run). best: "
              "the fastest provider whose ACC/ASR agree with the reference."]
    return head, cells, legend


__all__ = ["extra_columns", "DEFAULT_PROVIDERS", "MODES", "PROVIDERS", "best_provider", "cold_compile", "compile_mode",
           "compiled_cells", "compiled_providers", "dynamo_counts", "first_line", "judge", "parse_providers",
           "run_compiled", "unwrap"]
