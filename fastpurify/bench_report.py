"""The tables and the environment record of ``fastpurify bench`` and benchmarks/end_to_end.py: a markdown table
per :func:`fastpurify.bench.run_comparison` row set, and where a comparison ran (device, versions, threads, the
command, the git commit). Split from fastpurify/bench.py, which re-exports these names."""

from __future__ import annotations

import math
import platform
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence

import torch

# --------------------------------------------------------------------------------------------------------
# Rendering and environment
# --------------------------------------------------------------------------------------------------------


def fmt_settings(settings: Mapping[str, Any]) -> str:
    return ", ".join(f"{k}={v}" for k, v in settings.items()) or "published defaults"


def _num(v: Optional[float], digits: int = 2) -> str:
    return "—" if v is None or (isinstance(v, float) and not math.isfinite(v)) else f"{v:.{digits}f}"


def _secs(v: Optional[float]) -> str:
    if v is None:
        return "—"
    return f"{v:.2f}" if v < 10 else f"{v:.1f}"


def _pair(ref: Mapping[str, Any], fast: Optional[Mapping[str, Any]], key: str) -> str:
    return f"{_secs(ref[key])} / {_secs(fast[key]) if fast else '—'}"


def _metric(ref: Mapping[str, Any], fast: Optional[Mapping[str, Any]], key: str) -> str:
    after_fast = _num(fast["after"][key]) if fast else "—"
    return f"{_num(ref['before'][key])} → {_num(ref['after'][key])} / {after_fast}"


def render_markdown(rows: Sequence[Mapping[str, Any]], *, title: Optional[str] = None) -> str:
    """A markdown table, one line per row of :func:`run_comparison`, and a legend."""
    from .bench_compile import extra_columns

    head, extra, legend = extra_columns(rows, _secs, _num)  # the compiled providers' columns, if any ran
    lines = [title, ""] if title else []
    lines += [
        "| defense | settings | ref s | fast s | speedup | eval s ref / fast | cold start s ref / fast | "
        "warm-up s ref / fast | ACC before → after ref / fast | ASR before → after ref / fast | "
        "RA before → after ref / fast |" + "".join(f" {h} |" for h in head),
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |" + " --- |" * len(head),
    ]
    for r, more in zip(rows, extra):
        ref, fast = r["reference"], r.get("fast")
        settings = fmt_settings(r["settings"])
        if r.get("fast_settings"):
            settings += "; fast: " + fmt_settings(r["fast_settings"])
        absent = "not run" if r.get("has_fast_path") else "no fast path"  # not run: --providers left it out
        speed = absent if not fast else (f"{r['speedup']:.2f}×" if r.get("speedup") else "—")
        lines.append(
            f"| {r['defense']} | {settings} | {_secs(ref['defense_s'])} | "
            f"{_secs(fast['defense_s']) if fast else absent} | {speed} | {_pair(ref, fast, 'eval_s')} | "
            f"{_pair(ref, fast, 'cold_start_s')} | {_pair(ref, fast, 'warmup_s')} | {_metric(ref, fast, 'acc')} | "
            f"{_metric(ref, fast, 'asr')} | {_metric(ref, fast, 'ra')} |" + "".join(f" {c} |" for c in more))
    lines += [
        "",
        "ref s / fast s: the defense alone (`result.timings[\"defense\"]`, evaluation excluded; median of the timed "
        "calls); speedup = ref s / fast s. eval s: a separate evaluation before and after, timed apart. cold start: "
        "wall time of the timed call minus its defense and eval time (input checks, model copy, data checks, "
        "set-up before the first round). warm-up: a throw-away call on one batch, one round, made first. ACC, "
        "ASR, RA in percent (ASR and RA over triggered images whose label is not the target).",
        *legend,
    ]
    return "\n".join(lines) + "\n"


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "cpu"


def _commit() -> Optional[str]:
    root = Path(__file__).resolve().parents[1]
    try:
        out = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True, text=True,
                             timeout=10)
        if out.returncode != 0 or not out.stdout.strip():
            return None
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return out.stdout.strip() + ("+dirty" if dirty else "")  # +dirty: tracked files differ from the commit
    except (OSError, subprocess.SubprocessError):
        return None


def _command() -> str:
    from .bench import portable_text

    prog = Path(sys.argv[0]).name if sys.argv and sys.argv[0] else "python"
    if prog == "__main__.py":
        prog = "fastpurify"
    return " ".join([prog, *(portable_text(a) for a in sys.argv[1:])])


def environment(device=None) -> Dict[str, Any]:
    """Where a comparison ran: device name, versions, threads, dtype, the command line and the git commit."""
    from . import __version__

    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        import triton

        triton_version = triton.__version__
    except ImportError:
        triton_version = None
    return {
        "device": torch.cuda.get_device_name(dev) if dev.type == "cuda" else _cpu_name(),
        "device_type": dev.type, "torch": torch.__version__, "cuda": torch.version.cuda, "triton": triton_version,
        "fastpurify": __version__, "python": platform.python_version(), "threads": torch.get_num_threads(),
        "dtype": "float32", "command": _command(), "commit": _commit(),
    }
