"""What a ``fastpurify sweep`` writes: ``results.csv``, ``results.json`` and ``summary.md``, and its progress lines.

``summary.md`` has one line per defense × recipe × checkpoint: over the seeds that finished, the mean ± sample
standard deviation and the min–max of ACC and ASR after purification, the mean ACC drop (ACC before minus ACC
after), n, and a ✓ where the defense clears the bar: mean ASR after ≤ 5 % and mean ACC drop ≤ 3
points (:data:`fastpurify.metrics.BAR`, the bar ``fastpurify purify`` and the demo apply to one run).
"""

from __future__ import annotations

import csv
import io
import json
import math
import statistics
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from .metrics import BAR  # the bar of the summary's ✓: ASR after at most 5 %, ACC drop at most 3 points
from .sweep_worker import write_atomic, write_json_atomic

# results.csv's columns, in order (results.json's rows hold these and the cell's full defense configuration).
COLUMNS = ("study", "cell", "defense", "recipe", "checkpoint", "arch", "seed", "status", "acc_before", "asr_before",
           "ra_before", "acc_after", "asr_after", "ra_after", "der", "defense_seconds", "eval_seconds", "seconds",
           "rounds", "path", "device", "clean_count", "eval_count", "settings", "error")

# Statuses of a cell that produced a purified model (the others: failed, pending).
FINISHED = ("completed", "budget_exhausted")


def _fmt(v: Optional[float], digits: int = 1) -> str:
    return "–" if v is None or (isinstance(v, float) and math.isnan(v)) else f"{v:.{digits}f}"


def spread(values: Sequence[float]) -> Dict[str, Optional[float]]:
    """Mean, sample standard deviation (n - 1; None for fewer than two values), min and max of ``values``."""
    vals = [float(v) for v in values]
    if not vals:
        return {"mean": None, "sd": None, "min": None, "max": None}
    return {"mean": statistics.fmean(vals), "sd": statistics.stdev(vals) if len(vals) > 1 else None,
            "min": min(vals), "max": max(vals)}


def aggregate(rows: Sequence[Dict[str, Any]]) -> List[Dict[str, Any]]:
    """One group per defense × recipe × checkpoint (in the rows' order) over the seeds whose cell finished:
    ``n``, ``failed`` (cells that failed or have not run), ``acc_after`` / ``asr_after`` / ``acc_before`` /
    ``acc_drop`` spreads (:func:`spread`) and ``passes`` (the bar :data:`BAR`; None without a finished seed).

    Example:
        >>> rows = [{"defense": "sau", "recipe": "published", "checkpoint": "badnets", "status": "completed",
        ...          "acc_before": 85.0, "acc_after": a, "asr_after": s} for a, s in ((84.0, 2.0), (83.0, 4.0))]
        >>> g = aggregate(rows)[0]
        >>> g["n"], g["asr_after"]["mean"], round(g["asr_after"]["sd"], 4), g["acc_drop"]["mean"], g["passes"]
        (2, 3.0, 1.4142, 1.5, True)
    """
    groups: Dict[tuple, List[Dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["defense"], r["recipe"], r["checkpoint"]), []).append(r)
    out = []
    for (defense, recipe, checkpoint), rs in groups.items():
        ok = [r for r in rs if r.get("status") in FINISHED and r.get("acc_after") is not None]
        g = {"defense": defense, "recipe": recipe, "checkpoint": checkpoint, "n": len(ok), "failed": len(rs) - len(ok),
             "seeds": [r.get("seed") for r in ok]}
        for k in ("acc_after", "asr_after", "acc_before"):
            g[k] = spread([r[k] for r in ok if r.get(k) is not None])
        g["acc_drop"] = spread([r["acc_before"] - r["acc_after"] for r in ok if r.get("acc_before") is not None])
        asr, drop = g["asr_after"]["mean"], g["acc_drop"]["mean"]
        g["passes"] = None if asr is None or drop is None else (asr <= BAR["max_asr"] and drop <= BAR["max_acc_drop"])
        out.append(g)
    return out


def _mean_sd(s: Dict[str, Optional[float]]) -> str:
    if s["mean"] is None:
        return "–"
    return _fmt(s["mean"]) + ("" if s["sd"] is None else f" ± {_fmt(s['sd'])}")


def _range(s: Dict[str, Optional[float]]) -> str:
    return "–" if s["min"] is None else f"{_fmt(s['min'])}–{_fmt(s['max'])}"


def render_summary(groups: Sequence[Dict[str, Any]], study: str, note: str = "") -> str:
    """``summary.md``: a Markdown table of :func:`aggregate`'s groups, with the bar it applies."""
    lines = [f"# Sweep {study}", "",
             f"Per defense × recipe × checkpoint, over the seeds that finished: ACC and ASR after purification as "
             f"mean ± sample standard deviation (n − 1) and min–max, in percent; ACC drop = ACC before − ACC after "
             f"(mean, points). ✓: mean ASR after ≤ {BAR['max_asr']:g} % and mean ACC drop ≤ "
             f"{BAR['max_acc_drop']:g} points (fastpurify.metrics.BAR).", ""]
    if note:
        lines += [note, ""]
    lines += ["| defense | recipe | checkpoint | n | failed | ASR after | ASR min–max | ACC after | ACC min–max | "
              "ACC before | ACC drop | bar |",
              "| --- | --- | --- | --: | --: | --: | --: | --: | --: | --: | --: | :-: |"]
    for g in groups:
        mark = "–" if g["passes"] is None else ("✓" if g["passes"] else "✗")
        lines.append(f"| {g['defense']} | {g['recipe']} | {g['checkpoint']} | {g['n']} | {g['failed']} | "
                     f"{_mean_sd(g['asr_after'])} | {_range(g['asr_after'])} | {_mean_sd(g['acc_after'])} | "
                     f"{_range(g['acc_after'])} | {_fmt(g['acc_before']['mean'])} | {_fmt(g['acc_drop']['mean'])} | "
                     f"{mark} |")
    return "\n".join(lines) + "\n"


def _csv_value(v: Any) -> Any:
    if v is None:
        return ""
    if isinstance(v, (dict, list)):
        return json.dumps(v, sort_keys=True, default=str)
    return v


def write_outputs(out_dir: Path, study: str, rows: Sequence[Dict[str, Any]], note: str = "") -> Dict[str, Path]:
    """Write ``results.csv``, ``results.json`` and ``summary.md`` to ``out_dir`` (each atomically)."""
    out_dir = Path(out_dir)
    buf = io.StringIO()
    w = csv.DictWriter(buf, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    w.writeheader()
    for r in rows:
        w.writerow({k: _csv_value(r.get(k)) for k in COLUMNS})
    paths = {"csv": out_dir / "results.csv", "json": out_dir / "results.json", "summary": out_dir / "summary.md"}
    write_atomic(paths["csv"], buf.getvalue())
    groups = aggregate(rows)
    write_json_atomic(paths["json"], {"study": study, "bar": BAR, "rows": list(rows), "summary": groups})
    write_atomic(paths["summary"], render_summary(groups, study, note))
    return paths


def progress_line(i: int, total: int, row: Dict[str, Any]) -> str:
    """``[3/8] sau/published/badnets/seed1: ASR 94.1 -> 3.2, ACC 84.5 -> 80.1 (12 s)``."""
    head = f"[{i}/{total}] {row['defense']}/{row['recipe']}/{row['checkpoint']}/seed{row['seed']}"
    secs = f"({row.get('seconds') or 0:.0f} s)"
    if row.get("status") not in FINISHED:
        return f"{head}: FAILED {row.get('error')} {secs}"
    extra = "" if row["status"] == "completed" else f", {row['status']}"
    return (f"{head}: ASR {_fmt(row.get('asr_before'))} -> {_fmt(row.get('asr_after'))}, ACC "
            f"{_fmt(row.get('acc_before'))} -> {_fmt(row.get('acc_after'))}{extra} {secs}")
