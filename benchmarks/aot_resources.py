"""Registers, spills and shared memory of every GPU kernel, read from the compilers — no GPU needed.

    python benchmarks/aot_resources.py [--jobs N] [--arch 90 --arch 80] [--no-triton] [--no-cuda] [--covering]

- Triton: every variant of every combination of the launchers' options (``python -m fastpurify.kernels.aot --full``,
  run without TRITON_INTERPRET) under this Python's triton, for sm_90 and sm_80 →
  ``benchmarks/results/aot/triton-<version>.{json,md}``. For the version torch 2.13.0's CUDA wheel pins, run this
  script with the python of ``.ci/aot.sh``'s virtualenv (``~/.cache/fastpurify/aot-triton-3.7.1/bin/python``).
- CUDA: ``nvcc --resource-usage`` (ptxas -v) on every ``csrc/cuda/*.cu`` with setup.py's flags →
  ``benchmarks/results/aot/cuda-nvcc-<version>.{json,md}``.

"spill" is the stack frame in bytes per thread (these kernels declare no local arrays, so it is spill or call
frames), with the local stores/loads counted in the SASS; "smem" the dynamic shared memory Triton requests (the
CUDA kernels' static shared memory); "mma" the matrix instructions (wgmma: Hopper tensor cores; mma.sync:
Ampere's; -: FMA).
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
from collections import defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "benchmarks" / "results" / "aot"
NVCC_FLAGS = ["-O3", "-std=c++20", "--use_fast_math", "-lineinfo"]  # setup.py's nvcc flags

sys.path.insert(0, str(ROOT))
from benchmarks._env import environment  # noqa: E402


def _header(title: str, env: dict, extra: str) -> list:
    return [f"# {title}", "", f"Compile-only (no GPU): torch {env['torch']}, triton {env['triton']}, commit "
            f"{env['commit']}; {extra}. Written by `python benchmarks/aot_resources.py`.", ""]


# --------------------------------------------------------------------------------------------------------
# Triton
# --------------------------------------------------------------------------------------------------------


def _variant_cells(v: dict) -> tuple:
    cons = ", ".join(f"{k}={c}" for k, c in v["constexprs"].items() if not k.startswith("BLOCK") and k not in
                     ("BM", "BN", "BK"))
    blocks = "×".join(str(c) for k, c in v["constexprs"].items() if k.startswith("BLOCK") or k in ("BM", "BN", "BK"))
    ptrs = [(n.removesuffix("_ptr"), t[1:]) for n, t in v["signature"].items() if t.startswith("*")]
    main = ptrs[0][1] if ptrs else "-"
    odd = [f"{n}={t}" for n, t in ptrs if t != main]
    return cons, blocks, main + (f" ({', '.join(odd)})" if odd else "")


def _res_cells(r: dict | None) -> list:
    if r is None:
        return ["", "", "", ""]
    if not r["ok"]:
        return ["FAIL", "", "", ""]
    x = r["resources"]
    spill = f"{x['stack']} ({x['stl']}/{x['ldl']})" if x["stack"] or x["local"] else "0"
    return [str(x["regs"]), spill, str(x["shared"]), x["mma"]]


def _label(v: dict) -> str:
    cons = ",".join(f"{n}={c}" for n, c in v["constexprs"].items())
    ptrs = ",".join(f"{n}={t[1:]}" for n, t in v["signature"].items() if t.startswith("*"))
    return f"{v['kernel'].split(':')[1]}[{cons}|{ptrs}]"


def _compact(report: dict) -> dict:
    """The report as saved: variants keep their pointer types, results their variant index and resources."""
    variants = [dict(v, signature={n: t for n, t in v["signature"].items() if t.startswith("*")})
                for v in report["variants"]]
    for v in variants:  # the label is rebuilt from the constexprs and pointer types (_label)
        v.pop("attrs", None)
        v.pop("label", None)
    results = [{k: r[k] for k in ("variant", "arch", "ok", "error", "resources")} for r in report["results"]]
    return dict(report, variants=variants, results=results)


def render_triton(report: dict, env: dict) -> str:
    archs = report["archs"]
    for r in report["results"]:
        r.setdefault("label", _label(report["variants"][r["variant"]]))
    by = {(r["variant"], r["arch"]): r for r in report["results"]}
    fails = [r for r in report["results"] if not r["ok"]]
    spills = [r for r in report["results"] if r["ok"] and (r["resources"]["stack"] or r["resources"]["local"])]
    which = "every option combination" if report["full"] else "the test suite's set"
    lines = _header(f"Triton kernels, triton {report['triton']}", env,
                    f"{len(report['variants'])} variants ({which}) × sm_{', sm_'.join(map(str, archs))}; this run took "
                    f"{report['seconds']:.0f} s with {report['jobs']} processes (variants in the triton cache are not "
                    "compiled again)")
    lines += [f"**{len(fails)} variants fail to compile; {len(spills)} have a stack frame (spill); most registers: "
              f"{max((r['resources']['regs'] for r in report['results'] if r['ok']), default=0)}.**", ""]
    for r in fails:
        lines.append(f"- FAIL sm_{r['arch']} `{r['label']}`: {r['error'].splitlines()[-1][:300]}")
    for r in spills:
        lines.append(f"- spill sm_{r['arch']} `{r['label']}`: {r['resources']['stack']} bytes, "
                     f"{r['resources']['stl']} stores / {r['resources']['ldl']} loads")
    per_kernel = defaultdict(list)
    for i, v in enumerate(report["variants"]):
        per_kernel[v["kernel"]].append((i, v))
    arch_cols = " | ".join(f"sm_{a} regs | spill | smem | mma" for a in archs)
    for kernel in report["kernels"]:
        lines += ["", f"## `{kernel}`", "", f"| constexprs | blocks | data | {arch_cols} |",
                  "|" + " --- |" * (3 + 4 * len(archs))]
        for i, v in per_kernel.get(kernel, []):
            cells = list(_variant_cells(v))
            for a in archs:
                cells += _res_cells(by.get((i, a)))
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def run_triton(archs, jobs: int, full: bool, env: dict) -> Path:
    OUT.mkdir(parents=True, exist_ok=True)
    tmp = OUT / ".triton-report.json"
    cmd = [sys.executable, "-m", "fastpurify.kernels.aot", "--jobs", str(jobs), "--json", str(tmp)]
    cmd += [a for arch in archs for a in ("--arch", str(arch))] + (["--full"] if full else [])
    sub_env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(cmd, env=sub_env, capture_output=True, text=True)
    if not tmp.exists():
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr[-4000:]}")
    report = json.loads(tmp.read_text())
    tmp.unlink()
    stem = f"triton-{report['triton']}"
    (OUT / f"{stem}.json").write_text(json.dumps({"environment": env, **_compact(report)}, separators=(",", ":")))
    (OUT / f"{stem}.md").write_text(render_triton(report, env))
    return OUT / f"{stem}.md"


# --------------------------------------------------------------------------------------------------------
# CUDA (ptxas -v through nvcc --resource-usage)
# --------------------------------------------------------------------------------------------------------

_ENTRY = re.compile(r"Compiling entry function '(\w+)' for 'sm_(\d+)'")
_PROPS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers(?:, used \d+ barriers)?(?:, (\d+) bytes cumulative stack size)?"
                   r"(?:, (\d+) bytes smem)?")


def _demangle(names: list) -> dict:
    if not names or shutil.which("c++filt") is None:
        return {n: n for n in names}
    out = subprocess.run(["c++filt"], input="\n".join(names), capture_output=True, text=True).stdout.splitlines()
    # drop the anonymous namespace and the parameter list: fastpurify::<kernel><template args>
    short = [re.sub(r"^void |\(.*\)$", "", re.sub(r"fastpurify::\(anonymous namespace\)::", "", d)) for d in out]
    return dict(zip(names, short))


def parse_ptxas(text: str) -> list:
    rows, cur = [], None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            cur = {"mangled": m.group(1), "arch": int(m.group(2))}
        elif cur is not None and (m := _PROPS.search(line)):
            cur.update(stack=int(m.group(1)), spill_stores=int(m.group(2)), spill_loads=int(m.group(3)))
        elif cur is not None and (m := _USED.search(line)):
            cur.update(regs=int(m.group(1)), smem=int(m.group(3) or 0))
            rows.append(cur)
            cur = None
    return rows


def _nvcc(cu: Path, arch: int) -> list:
    cmd = ["nvcc", "-c", *NVCC_FLAGS, f"-arch=sm_{arch}", "--resource-usage", f"-I{ROOT / 'csrc'}", str(cu),
           "-o", os.devnull]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode:
        raise SystemExit(f"{' '.join(cmd)} failed:\n{res.stderr}")
    return [dict(r, file=cu.name) for r in parse_ptxas(res.stdout + res.stderr)]


def run_cuda(archs, jobs: int, env: dict) -> Path:
    version = re.search(r"release ([\d.]+)", subprocess.run(["nvcc", "--version"], capture_output=True,
                                                            text=True).stdout).group(1)
    files = sorted((ROOT / "csrc" / "cuda").glob("*.cu"))
    with ThreadPoolExecutor(max(1, jobs)) as pool:
        rows = [r for part in pool.map(lambda fa: _nvcc(*fa), [(f, a) for a in archs for f in files]) for r in part]
    names = _demangle([r["mangled"] for r in rows])
    for r in rows:
        r["kernel"] = names[r["mangled"]]
    rows.sort(key=lambda r: (r["file"], r["kernel"], r["arch"]))
    spills = [r for r in rows if r["stack"] or r["spill_stores"]]
    lines = _header(f"CUDA kernels, nvcc {version}", env, f"`nvcc {' '.join(NVCC_FLAGS)} -arch=sm_XX "
                    "--resource-usage` (setup.py's flags)")
    lines += [f"**{len(rows)} kernel instantiations; {len(spills)} with a stack frame or spills; most registers: "
              f"{max((r['regs'] for r in rows), default=0)}.**", "",
              "| file | kernel | arch | regs | stack B | spill stores/loads B | static smem B |",
              "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        lines.append(f"| {r['file']} | `{r['kernel']}` | sm_{r['arch']} | {r['regs']} | {r['stack']} | "
                     f"{r['spill_stores']}/{r['spill_loads']} | {r['smem']} |")
    stem = f"cuda-nvcc-{version}"
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / f"{stem}.json").write_text(json.dumps({"environment": env, "nvcc": version, "flags": NVCC_FLAGS,
                                                  "rows": rows}, indent=1))
    (OUT / f"{stem}.md").write_text("\n".join(lines) + "\n")
    return OUT / f"{stem}.md"


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, action="append", help="compute capability (repeatable; default 90 and 80)")
    p.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    p.add_argument("--covering", action="store_true", help="Triton: only the test suite's variants")
    p.add_argument("--no-triton", action="store_true")
    p.add_argument("--no-cuda", action="store_true")
    p.add_argument("--render", action="store_true", help="only rewrite the .md tables from the saved .json")
    a = p.parse_args(argv)
    if a.render:
        for path in sorted(OUT.glob("triton-*.json")):
            saved = json.loads(path.read_text())
            path.with_name(path.name.removesuffix(".json") + ".md").write_text(
                render_triton(saved, saved["environment"]))
        return 0
    archs = tuple(a.arch or (90, 80))
    env = dict(environment(), device="none (compile only)")
    if not a.no_triton:
        print("wrote", run_triton(archs, a.jobs, not a.covering, env))
    if not a.no_cuda:
        if shutil.which("nvcc") is None:
            print("nvcc not found: no CUDA table", file=sys.stderr)
        else:
            print("wrote", run_cuda(archs, a.jobs, env))
    return 0


if __name__ == "__main__":
    sys.exit(main())
