"""Summarise pytest-benchmark results: one markdown table per device, and the tables in the README.

Reads every ``benchmarks/results/<device>/*.json`` written by ``pytest benchmarks --benchmark-json ...``
(pytest-benchmark's format, with our ``extra_info``: provider, shape, dtype, device, versions, commit) and
writes ``benchmarks/results/<device>/summary.md``; then replaces the block between the
``<!-- benchmarks:begin -->`` and ``<!-- benchmarks:end -->`` markers of README.md with all summaries.

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
            groups[(f.stem, b.get("group") or b["name"])].append((extra.get("provider", b["name"]), b["stats"], extra))
    if not groups:
        return ""
    lines = [f"### {env.get('device', folder.name)}", "",
             ", ".join(_where(seen, k, fmt) for k, fmt in (("torch", "torch {}"), ("cuda", "CUDA {}"), ("triton",
                       "triton {}"), ("threads", "{} CPU threads"), ("commit", "commit {}"))), "",
             "| benchmark | provider | median | min | vs torch (eager reference) | GB/s |",
             "| --- | --- | --- | --- | --- | --- |"]
    for (_, group), rows in sorted(groups.items()):
        ref = next((s["median"] for p, s, _ in rows if p == "torch"), None)
        for provider, stats, extra in sorted(rows, key=lambda r: r[1]["median"]):
            speed = f"{ref / stats['median']:.2f}x" if ref else "-"
            gbs = f"{extra['bytes'] / stats['median'] / 1e9:.1f}" if extra.get("bytes") else "-"
            lines.append(f"| {group} | {provider} | {_fmt_time(stats['median'])} | {_fmt_time(stats['min'])} "
                         f"| {speed} | {gbs} |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--no-readme", action="store_true", help="write the per-device summaries only")
    args = ap.parse_args(argv)
    parts = []
    for folder in sorted(p for p in RESULTS.iterdir() if p.is_dir()) if RESULTS.exists() else []:
        text = summarize_device(folder)
        if text:
            (folder / "summary.md").write_text("# Benchmark summary\n\n" + text)
            parts.append(text)
            print(f"wrote {folder / 'summary.md'}")
    if not args.no_readme:
        readme = ROOT / "README.md"
        body = readme.read_text()
        if BEGIN in body and END in body:
            block = "\n".join(parts) if parts else "No results yet.\n"
            head, rest = body.split(BEGIN, 1)
            _, tail = rest.split(END, 1)
            readme.write_text(f"{head}{BEGIN}\n{block}{END}{tail}")
            print("updated README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
