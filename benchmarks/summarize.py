"""Summarise pytest-benchmark results: one markdown table per device, and the tables in docs/benchmarks.md.

Reads every ``benchmarks/results/<device>/*.json`` written by ``pytest benchmarks --benchmark-json ...``
(pytest-benchmark's format, with our ``extra_info``: provider, shape, dtype, device, versions, commit) and
writes ``benchmarks/results/<device>/summary.md``; then replaces the block between the
``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->`` markers of docs/benchmarks.md with all summaries (the
README links there).

Compiled providers (``compile-<mode>``: ``torch.compile`` of the eager reference, benchmarks/_compiled.py) get their
cold compile time in the ``compile s`` column; ``vs best other`` is the best other provider's median over this one's
(above 1: this one is the fastest of its group), and ``★`` marks a compiled reference that beats every other provider
of its group, kernels included. Result files named ``<op>_compile.json`` hold a run of every CPU provider with the
compiled ones, all under the same load; their groups are labelled ``(compile run)``. The load average recorded
before and after each case is summarised per file under the table.

Usage: ``python benchmarks/summarize.py [--no-readme]``
"""

from __future__ import annotations

import argparse
import json
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"
BEGIN, END = "<!-- benchmarks:begin -->", "<!-- benchmarks:end -->"


def _fmt_time(s: float) -> str:
    return f"{s * 1e6:.1f} µs" if s < 1e-3 else (f"{s * 1e3:.2f} ms" if s < 1 else f"{s:.2f} s")


def _where(seen: dict, key: str, fmt: str) -> str:
    """``fmt`` filled with the value when every result file agrees, else with each value and the files it comes
    from (the files of a folder are written at different commits: one header value would misdate the others'
    rows)."""
    values = seen[key]
    if len(values) <= 1:
        return fmt.format(next(iter(values), None))
    return fmt.format(", ".join(f"{v} ({', '.join(sorted(files))})" for v, files in values.items()))


def summarize_device(folder: Path) -> str:
    groups = defaultdict(list)
    env = {}
    seen = defaultdict(lambda: defaultdict(set))  # key -> value -> result files (stems) that recorded it
    loads = defaultdict(list)  # result file -> 1-minute load averages recorded around its cases
    for f in sorted(folder.glob("*.json")):
        try:
            data = json.loads(f.read_text())
        except json.JSONDecodeError:  # a benchmark run still writing its file
            continue
        for b in data.get("benchmarks", []) if isinstance(data, dict) else []:
            extra = b.get("extra_info", {})
            env = env or extra
            for key in ("torch", "cuda", "triton", "threads", "commit"):
                seen[key][str(extra.get(key))].add(f.stem)
            group = (b.get("group") or b["name"]) + (" (compile run)" if f.stem.endswith("_compile") else "")
            groups[(f.stem, group)].append((extra.get("provider", b["name"]), b["stats"], extra))
            if extra.get("loadavg_before"):
                loads[f.stem].append(extra["loadavg_before"][0])
                loads[f.stem].append(extra.get("loadavg_after", extra["loadavg_before"])[0])
    if not groups:
        return ""
    lines = [f"### {env.get('device', folder.name)}", "",
             ", ".join(_where(seen, k, fmt) for k, fmt in (("torch", "torch {}"), ("cuda", "CUDA {}"), ("triton",
                       "triton {}"), ("threads", "{} CPU threads"), ("commit", "commit {}"))), "",
             "| benchmark | provider | median | min | vs torch (eager reference) | vs best other | GB/s | compile s |",
             "| --- | --- | --- | --- | --- | --- | --- | --- |"]
    for (_, group), rows in sorted(groups.items()):
        ref = next((s["median"] for p, s, _ in rows if p == "torch"), None)
        for provider, stats, extra in sorted(rows, key=lambda r: r[1]["median"]):
            speed = f"{ref / stats['median']:.2f}x" if ref else "-"
            others = [s["median"] for p, s, _ in rows if p != provider]
            vs_best = f"{min(others) / stats['median']:.2f}x" if others else "-"
            gbs = f"{extra['bytes'] / stats['median'] / 1e9:.1f}" if extra.get("bytes") else "-"
            comp = extra.get("compile") or {}
            name = provider
            if comp and others and stats["median"] < min(others):
                name += " ★"
            if comp and comp.get("matches_eager") is False:
                name += " ✗ differs from eager"
            csec = f"{comp['compile_s']:.1f}" if comp.get("compile_s") is not None else "-"
            lines.append(f"| {group} | {name} | {_fmt_time(stats['median'])} | {_fmt_time(stats['min'])} "
                         f"| {speed} | {vs_best} | {gbs} | {csec} |")
    if loads:
        spans = ", ".join(f"{stem} {min(v):.1f}–{max(v):.1f}" for stem, v in sorted(loads.items()))
        lines += ["", f"Load average (1 min) around the cases, min–max per result file: {spans} (2 CPU threads; "
                      "above 2 the machine was shared with other jobs). Where the load was far above 2, a case waited "
                      "for a core for much of its time: medians of sub-millisecond cases then measure the scheduler "
                      "more than the code, and the min column is the better comparison."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-readme", action="store_true", help="write the per-device summaries only (not "
                                                             "docs/benchmarks.md)")
    args = ap.parse_args(argv)
    parts = []
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()) if RESULTS.exists() else []:
        text = summarize_device(folder)
        if text:
            (folder / "summary.md").write_text("# Benchmark summary\n\n" + text)
            parts.append(text)
            print(f"wrote {folder / 'summary.md'}")
    if not args.no_readme:
        readme = ROOT / "docs" / "benchmarks.md"
        body = readme.read_text()
        if BEGIN in body and END in body:
            block = "\n".join(parts) if parts else "No results yet.\n"
            head, rest = body.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            readme.write_text(f"{head}{BEGIN}\n{block}{END}{tail}")
            print(f"updated {readme}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
