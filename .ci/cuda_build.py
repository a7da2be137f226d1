#!/usr/bin/env python3
"""The CUDA build, checked (issue 14, item 4; DESIGN.md rules 5 and 6).

Builds ``fastpurify._C`` with its CUDA kernels and the torch-facing ``csrc/cuda/*_bind.cpp`` launchers against the
CUDA-enabled torch 2.13.0 from PyPI, in a throwaway virtualenv, on a machine without a GPU (nvcc only); imports the
extension (no GPU is needed to import it) and checks that ``has_cuda()`` is true and that the CUDA launchers it
exports are exactly the ones the ops load: every registered op's ``cuda`` loader is run once against a recorder
(so names built with f-strings count too) and once against the real module. Then it writes
``benchmarks/results/cuda-build/summary.md`` and ``summary.json``: torch/CUDA/nvcc versions, download and build
seconds, compiler warnings, the launchers, and a hash of the build inputs (every file under ``csrc/`` and
``setup.py``). ``tests/test_build.py`` recomputes that hash, so a change to ``csrc/`` or ``setup.py`` cannot land
without running this again:

    python3 .ci/cuda_build.py                   # ~8 GB on disk (wheels + virtualenv), reused between runs
    python3 .ci/cuda_build.py --out /tmp/x      # write the summary elsewhere (an experiment, not the record)

Only the Python standard library is needed to run it; the torch it builds against lives in the virtualenv
(``--venv``, default ``$XDG_CACHE_HOME/fastpurify/cuda-build-torch-2.13.0``), which is kept and reused when it still
holds the CUDA torch and the CUDA library headers, and re-made otherwise. The wheels are downloaded once into
``--wheelhouse`` (beside it), so re-making the virtualenv costs no download. The build runs on a clean copy of the
tree (what a clone holds: tracked and untracked, non-ignored files), so the working tree gets no build/ or .so.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import json
import os
import platform
import re
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TORCH_PIN = "2.13.0"
INDEX_URL = "https://pypi.org/simple"
# The pure-Python packages the build and `import fastpurify` need besides torch (pyproject: numpy, tqdm).
BUILD_PACKAGES = ["setuptools", "wheel", "ninja", "numpy", "tqdm"]
# Torch's CUDA extension headers include these two CUDA library headers (ATen/cuda/CUDAContext.h); the nvcc-only
# toolkit on the CI machine has neither. They come from the pip packages of those libraries, which the CUDA torch
# wheel depends on.
NEEDED_HEADERS = ("cusparse.h", "cublas_v2.h")
SUMMARY_DIR = ROOT / "benchmarks" / "results" / "cuda-build"
COMMAND = "python3 .ci/cuda_build.py"
ARCH_LIST = "9.0"


# ----------------------------------------------------------------------------------------------------------------
# The build inputs and their hash (tests/test_build.py imports these two).
# ----------------------------------------------------------------------------------------------------------------


def input_files(root: Path) -> list[str]:
    """The files whose content decides what the CUDA build does: every regular file under ``csrc/`` (setup.py
    globs the sources there, and the headers are there) and ``setup.py``; POSIX paths relative to ``root``,
    sorted, so the order never depends on the file system."""
    root = Path(root)
    files = [p.relative_to(root).as_posix() for p in (root / "csrc").rglob("*")
             if p.is_file() and "__pycache__" not in p.parts]
    return sorted(files + ["setup.py"])


def input_digests(root: Path) -> dict[str, str]:
    """``{path: sha256 of the file's bytes}`` for each of :func:`input_files`."""
    return {rel: hashlib.sha256((Path(root) / rel).read_bytes()).hexdigest() for rel in input_files(root)}


def inputs_hash(root: Path, digests: dict[str, str] | None = None) -> str:
    """One sha256 over the sorted (path, content digest) pairs: a renamed, added, removed or edited file changes
    it; nothing else (timestamps, permissions, the checkout's location, the order the file system lists) does."""
    digests = input_digests(root) if digests is None else digests
    return hashlib.sha256("".join(f"{rel}\0{digests[rel]}\n" for rel in sorted(digests)).encode()).hexdigest()


# ----------------------------------------------------------------------------------------------------------------
# Which CUDA launchers the ops load (runs in whichever Python imports it; needs fastpurify importable).
# ----------------------------------------------------------------------------------------------------------------


class _Recorder:
    """Stands in for ``fastpurify._C``: records every attribute a loader asks for."""

    def __init__(self):
        self.names: list[str] = []
        self.__name__ = "fastpurify._C (recorder)"

    def __getattr__(self, name):
        if name.startswith("__"):
            raise AttributeError(name)
        self.names.append(name)
        return lambda *a, **k: None


def requested_cuda_launchers() -> dict[str, list[str]]:
    """``{op: [extension attribute, ...]}``: what each registered op's ``cuda`` loader takes from the extension.
    Runs the loaders against a recorder in place of ``backend.extension()``, so no extension and no GPU are
    needed, and names the loaders build at run time (``f"{name}_cuda_"``) are found as well as literal ones."""
    from fastpurify import backend

    ops = backend.registered_ops()
    real = backend.extension
    out = {}
    try:
        for name in sorted(ops):
            loader = ops[name].impls.get("cuda")
            if loader is None:
                continue
            rec = _Recorder()
            backend.extension = lambda rec=rec: rec
            loader()
            out[name] = sorted(set(rec.names))
    finally:
        backend.extension = real
    return out


def _check_extension() -> dict:
    """Run inside the CUDA virtualenv, in the built copy of the tree: import the extension and compare."""
    import importlib

    import torch

    ext = importlib.import_module("fastpurify._C")
    from fastpurify import backend

    wanted = requested_cuda_launchers()
    wanted_names = sorted({n for names in wanted.values() for n in names})
    # Launchers are named <op>_cuda or <op>_cuda_ (DESIGN.md rule 1); has_cuda() is the build flag, checked apart.
    exported = sorted(n for n in dir(ext) if re.fullmatch(r"[a-z]\w*_cuda_?", n) and n != "has_cuda")
    load_errors = {}
    for op in wanted:  # the real loaders against the real module: each must resolve
        try:
            backend.registered_ops()[op].impls["cuda"]()
        except Exception as e:  # noqa: BLE001 - reported, and fails the check
            load_errors[op] = f"{type(e).__name__}: {e}"
    return {
        "torch": torch.__version__, "torch_cuda": torch.version.cuda, "so": ext.__file__,
        "so_bytes": os.path.getsize(ext.__file__), "has_cuda": bool(ext.has_cuda()),
        "ops": wanted, "wanted": wanted_names, "exported": exported,
        "missing": sorted(set(wanted_names) - set(exported)), "unused": sorted(set(exported) - set(wanted_names)),
        "load_errors": load_errors, "gpu_visible": torch.cuda.is_available(),
    }


# ----------------------------------------------------------------------------------------------------------------
# The virtualenv.
# ----------------------------------------------------------------------------------------------------------------


def _pip_env() -> dict:
    """pip talking to PyPI only. This machine's pip configuration adds find-links /opt/wheels (a CPU build of the
    same torch, 2.13.0+cpu, which pip would prefer: a local version sorts above 2.13.0), local indexes and a
    constraints file; PIP_CONFIG_FILE=/dev/null drops the configuration files and the PIP_* variables below are
    the ones that would still add them. The certificate bundle stays (it may be what reaches PyPI here)."""
    env = dict(os.environ)
    for var in ("PIP_FIND_LINKS", "PIP_EXTRA_INDEX_URL", "PIP_INDEX_URL", "PIP_CONSTRAINT", "PIP_NO_INDEX",
                "PIP_REQUIRE_VIRTUALENV"):
        env.pop(var, None)
    env["PIP_CONFIG_FILE"] = os.devnull
    env["PIP_DISABLE_PIP_VERSION_CHECK"] = "1"
    return env


_PROBE = r"""
import importlib, json, pathlib, sys
import torch
site = pathlib.Path(torch.__file__).resolve().parents[1]
heads = {}
for h in sys.argv[1:]:
    hits = sorted(str(p.parent) for p in (site / "nvidia").rglob(h)) if (site / "nvidia").is_dir() else []
    heads[h] = hits
mods = {}
for m in ("setuptools", "wheel", "ninja", "numpy", "tqdm"):
    try:
        importlib.import_module(m)
        mods[m] = True
    except ImportError:
        mods[m] = False
from importlib import metadata
cuda_dists = sorted(f"{d.metadata['Name']}=={d.version}" for d in metadata.distributions()
                    if d.metadata["Name"].lower().startswith(("nvidia", "cuda", "triton")))
print(json.dumps({"torch": torch.__version__, "cuda": torch.version.cuda, "headers": heads, "modules": mods,
                  "site": str(site), "cuda_packages": cuda_dists}))
"""


def _probe(python: Path) -> dict | None:
    if not python.exists():
        return None
    res = subprocess.run([str(python), "-c", _PROBE, *NEEDED_HEADERS], capture_output=True, text=True)
    if res.returncode != 0:
        return None
    return json.loads(res.stdout.strip().splitlines()[-1])


def _venv_is_right(p: dict | None) -> bool:
    return bool(p and p["torch"].split("+")[0] == TORCH_PIN and p["cuda"] and all(p["modules"].values())
                and all(p["headers"].values()))


def _run(cmd, log=None, **kw):
    print("+", " ".join(str(c) for c in cmd), flush=True)
    res = subprocess.run([str(c) for c in cmd], text=True, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, **kw)
    if log is not None:
        Path(log).write_text(res.stdout)
    if res.returncode != 0:
        sys.stdout.write(res.stdout[-20000:])
        raise SystemExit(f"cuda_build: command failed ({res.returncode}): {' '.join(str(c) for c in cmd)}")
    return res.stdout


def _dir_bytes(path: Path) -> int:
    return sum(p.stat().st_size for p in Path(path).rglob("*") if p.is_file() and not p.is_symlink())


def ensure_venv(venv: Path, wheelhouse: Path) -> dict:
    """The virtualenv with the CUDA torch, reused when it is right; returns what it took."""
    python = venv / "bin" / "python"
    made = venv / "fastpurify-cuda-build.json"  # what making this virtualenv took, reported again on reuse
    probe = _probe(python)
    if _venv_is_right(probe):
        earlier = json.loads(made.read_text()) if made.is_file() else {}
        return {**earlier, "reused": True, "probe": probe}
    env = _pip_env()
    wheelhouse.mkdir(parents=True, exist_ok=True)
    before = _dir_bytes(wheelhouse)
    t0 = time.perf_counter()
    # Download first (into a kept folder), then install from it offline: the download is measured on its own and
    # a re-made virtualenv costs no second download. `pip download` skips the files already in the folder.
    reqs = [f"torch=={TORCH_PIN}", *BUILD_PACKAGES]
    _run([sys.executable, "-m", "pip", "download", "-q", "--index-url", INDEX_URL, "-d", wheelhouse,
          "--only-binary", ":all:", *reqs],
         env=env)
    download_s = time.perf_counter() - t0
    downloaded = _dir_bytes(wheelhouse) - before
    if venv.exists():
        shutil.rmtree(venv)
    t1 = time.perf_counter()
    # No --system-site-packages: the system's CPU torch must not be the one the build sees.
    _run([sys.executable, "-m", "venv", venv])
    _run([python, "-m", "pip", "install", "-q", "--no-index", "--find-links", wheelhouse, *reqs], env=env)
    install_s = time.perf_counter() - t1
    probe = _probe(python)
    if not probe or not probe["cuda"] or probe["torch"].split("+")[0] != TORCH_PIN:
        raise SystemExit(f"cuda_build: the virtualenv's torch is not the CUDA build of {TORCH_PIN}: {probe}")
    missing = [h for h, hits in probe["headers"].items() if not hits]
    if missing:
        raise SystemExit(f"cuda_build: the CUDA torch's dependencies hold no {missing} under {probe['site']}/nvidia; "
                         "install the nvidia-* packages that carry them and point CUDA_INC_PATH at their include")
    out = {"reused": False, "download_s": round(download_s, 1), "download_bytes": downloaded,
           "install_s": round(install_s, 1), "wheelhouse_bytes": _dir_bytes(wheelhouse), "venv_bytes": _dir_bytes(venv),
           "made": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    made.write_text(json.dumps(out, indent=1) + "\n")
    return {**out, "probe": probe}


# ----------------------------------------------------------------------------------------------------------------
# The build.
# ----------------------------------------------------------------------------------------------------------------


def copy_tree(dst: Path) -> None:
    """What a clone holds: tracked files and untracked, non-ignored ones (no build/, no .so, no __pycache__)."""
    res = subprocess.run(["git", "-C", str(ROOT), "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
                         capture_output=True, check=True)
    for rel in res.stdout.decode().split("\0"):
        src = ROOT / rel
        if rel and src.is_file():
            (dst / rel).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(src, dst / rel)


_WARN = re.compile(r"(?:^|\s)warning(?:\s*#\d+-D)?\s*:|: warning:", re.IGNORECASE)


def count_warnings(log: str, src: Path, site: str) -> dict:
    """Compiler warnings in a build log: every line, and the distinct ones (a header's warning repeats in each
    translation unit that includes it) by where they point: torch's headers, fastpurify's csrc, or elsewhere."""
    # Paths of this run's temporary copy and virtualenv are shortened, so runs compare and the record is portable.
    lines = [ln.strip().replace(f"{src}/", "").replace(site, "<site-packages>") for ln in log.splitlines()
             if _WARN.search(ln)]
    distinct = sorted(set(lines))
    where = {"torch": 0, "csrc": 0, "other": 0}
    for ln in distinct:
        if "<site-packages>/torch/" in ln:
            where["torch"] += 1
        elif ln.startswith("csrc/"):
            where["csrc"] += 1
        else:
            where["other"] += 1
    return {"lines": len(lines), "distinct": len(distinct), "distinct_by_origin": where, "examples": distinct[:12]}


def nvcc_version() -> str:
    out = subprocess.run(["nvcc", "--version"], capture_output=True, text=True).stdout
    m = re.search(r"release ([\d.]+), V([\d.]+)", out)
    return m.group(2) if m else out.strip().splitlines()[-1]


def cuda_home() -> str:
    """The toolkit nvcc belongs to. torch derives CUDA_HOME from `which nvcc` (dirname twice): this machine's
    /usr/local/bin/nvcc is a wrapper script, which would give /usr/local, whose include/ holds no cuda_runtime.h.
    nvcc itself says where it lives (`TOP=` in its --dryrun output)."""
    out = subprocess.run(["nvcc", "--dryrun", "-c", "-x", "cu", os.devnull], capture_output=True, text=True).stderr
    m = re.search(r"TOP=(\S+)", out)
    if m and Path(m.group(1), "include", "cuda_runtime.h").exists():
        return str(Path(m.group(1)).resolve())
    return str(Path(os.path.realpath(shutil.which("nvcc"))).parents[1])


def build(venv: Path, src: Path, jobs: int, inc: str) -> tuple[float, float, str]:
    """(wall seconds, CPU seconds of all compiler processes, log). The CPU seconds do not depend on what else the
    machine runs; the wall seconds do (CI shares its 2 cores)."""
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise SystemExit("cuda_build: nvcc is not on PATH (the CUDA toolkit's compiler is needed; no GPU is)")
    env = dict(os.environ)
    env.update({
        "FASTPURIFY_FORCE_CUDA": "1", "TORCH_CUDA_ARCH_LIST": ARCH_LIST, "MAX_JOBS": str(jobs),
        "CUDA_INC_PATH": inc,
        "CUDA_HOME": env.get("CUDA_HOME") or cuda_home(),
    })
    env.pop("FASTPURIFY_SKIP_EXT", None)
    t0, r0 = time.perf_counter(), resource.getrusage(resource.RUSAGE_CHILDREN)
    log = _run([venv / "bin" / "python", "setup.py", "build_ext", "--inplace"], cwd=src, env=env)
    r1 = resource.getrusage(resource.RUSAGE_CHILDREN)
    return time.perf_counter() - t0, (r1.ru_utime + r1.ru_stime) - (r0.ru_utime + r0.ru_stime), log


def _check_in_venv(venv: Path, src: Path) -> dict:
    code = ("import json, runpy, sys\n"
            f"m = runpy.run_path({str(Path(__file__).resolve())!r}, run_name='cuda_build_check')\n"
            "print('CUDA_BUILD_CHECK ' + json.dumps(m['_check_extension']()))\n")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    env["CUDA_VISIBLE_DEVICES"] = env.get("CUDA_VISIBLE_DEVICES", "")
    out = _run([venv / "bin" / "python", "-c", code], cwd=src, env=env)
    line = [ln for ln in out.splitlines() if ln.startswith("CUDA_BUILD_CHECK ")][-1]
    return json.loads(line[len("CUDA_BUILD_CHECK "):])


# ----------------------------------------------------------------------------------------------------------------
# The summary.
# ----------------------------------------------------------------------------------------------------------------


def _git(*args) -> str:
    res = subprocess.run(["git", "-C", str(ROOT), *args], capture_output=True, text=True)
    return res.stdout.strip() if res.returncode == 0 else ""


def render_md(s: dict) -> str:
    w = s["warnings"]
    v = s["venv"]
    ok = "passed" if s["passed"] else "FAILED"
    c = s["check"]
    origin = ", ".join(f"{k} {n}" for k, n in w["distinct_by_origin"].items())
    rows = "\n".join(f"| `{op}` | {', '.join(f'`{n}`' for n in names)} |" for op, names in s["check"]["ops"].items())
    ex = "\n".join(f"    {e}" for e in w["examples"]) or "    (none)"
    fails = "".join(f"\n- {f}" for f in s["failures"])
    if "download_s" in v:
        dl = (f"{v['download_bytes'] / 2**30:.2f} GiB of wheels downloaded in {v['download_s']:.0f} s, installed in "
              f"{v['install_s']:.0f} s ({v['venv_bytes'] / 2**30:.1f} GiB)")
        dl = f"reused; when an earlier run made it ({v['made']}): {dl}" if v["reused"] else dl
    else:
        dl = "reused (made before the script recorded what that took)"
    pk = ", ".join(s["cuda_packages"])
    return f"""# CUDA build check: {ok}

`{COMMAND}` (issue 14 item 4): fastpurify._C built with its CUDA kernels against the CUDA torch from PyPI in a
throwaway virtualenv, on a machine without a GPU, then imported and checked. Rerun it whenever `csrc/` or `setup.py`
changes; `tests/test_build.py` fails until the hash below matches the tree.

| | |
| --- | --- |
| inputs hash (`csrc/**`, `setup.py`; {len(s['inputs'])} files) | `{s['inputs_hash']}` |
| commit (the tree may have had uncommitted changes) | `{s['commit']}` |
| torch | {s['check']['torch']} (CUDA {s['check']['torch_cuda']}); headers from `CUDA_INC_PATH={s['cuda_inc_path']}` |
| CUDA packages in the virtualenv | {pk} |
| nvcc | {s['nvcc']} |
| host | {s['host']}, {s['cores']} cores, `MAX_JOBS={s['jobs']}`, `TORCH_CUDA_ARCH_LIST="{s['arch_list']}"` |
| virtualenv | {dl} |
| build | {s['build_s']:.0f} s wall, {s['build_cpu_s']:.0f} s CPU (`setup.py build_ext` on a clean copy of the tree) |
| compiler warnings | {w['lines']} lines, {w['distinct']} distinct (by where they point: {origin}) |
| extension | `has_cuda()` = {s['check']['has_cuda']}, {s['check']['so_bytes'] / 2**20:.1f} MiB |
| CUDA launchers | {len(c['exported'])} exported, {len(c['wanted'])} loaded by the ops; \
missing: {c['missing'] or 'none'}; unused: {c['unused'] or 'none'} |
{fails}

## Launchers each op's `cuda` loader takes from the extension

| op | launchers |
| --- | --- |
{rows}

## Distinct warnings (first {len(w['examples'])})

{ex}
"""


def main(argv=None) -> int:
    cache = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "fastpurify"
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--venv", type=Path, default=cache / f"cuda-build-torch-{TORCH_PIN}")
    ap.add_argument("--wheelhouse", type=Path, default=cache / f"cuda-wheels-torch-{TORCH_PIN}")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--out", type=Path, default=SUMMARY_DIR, help="where summary.md/.json go")
    ap.add_argument("--keep", action="store_true", help="keep the built copy of the tree (its path is printed)")
    args = ap.parse_args(argv)

    start = time.perf_counter()
    venv = ensure_venv(args.venv.resolve(), args.wheelhouse.resolve())
    heads = venv["probe"]["headers"]
    dirs = sorted({d for hits in heads.values() for d in hits})
    if len(dirs) != 1:  # torch honours one CUDA_INC_PATH; the cu13 packages put all headers in one folder
        raise SystemExit(f"cuda_build: the CUDA headers are in {len(dirs)} folders ({dirs}); CUDA_INC_PATH takes one")
    work = Path(tempfile.mkdtemp(prefix="fastpurify-cuda-build."))
    try:
        src = work / "src"
        src.mkdir()
        copy_tree(src)
        files = input_digests(src)
        digest = inputs_hash(src, files)
        build_s, build_cpu_s, log = build(args.venv.resolve(), src, args.jobs, dirs[0])
        (work / "build.log").write_text(log)
        check = _check_in_venv(args.venv.resolve(), src)
    finally:
        if args.keep:
            print(f"cuda_build: kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)

    failures = []
    if not check["has_cuda"]:
        failures.append("has_cuda() is false: the CUDA sources were not compiled in")
    if check["missing"]:
        failures.append(f"the ops load CUDA launchers the extension does not export: {check['missing']}")
    if check["unused"]:
        failures.append(f"the extension exports CUDA launchers that no op loads: {check['unused']}")
    if not check["wanted"]:
        failures.append("no op loads a CUDA launcher (the recorder found none)")
    for op, err in check["load_errors"].items():
        failures.append(f"{op}: its cuda loader failed against the real extension: {err}")
    venv_out = {k: v for k, v in venv.items() if k != "probe"}
    summary = {
        "passed": not failures, "failures": failures, "inputs_hash": digest, "inputs": files,
        "commit": _git("rev-parse", "HEAD"), "dirty_inputs": bool(_git("status", "--porcelain", "csrc", "setup.py")),
        "nvcc": nvcc_version(), "host": platform.platform(), "cores": os.cpu_count(), "jobs": args.jobs,
        "arch_list": ARCH_LIST, "cuda_inc_path": dirs[0].replace(venv["probe"]["site"], "<site-packages>"),
        "cuda_packages": venv["probe"].get("cuda_packages", []),
        "venv": venv_out, "build_s": round(build_s, 1), "build_cpu_s": round(build_cpu_s, 1),
        "warnings": count_warnings(log, src, venv["probe"]["site"]),
        "total_s": round(time.perf_counter() - start, 1),
        "check": {k: v for k, v in check.items() if k != "so"},
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "summary.json").write_text(json.dumps(summary, indent=1, sort_keys=True) + "\n")
    (args.out / "summary.md").write_text(render_md(summary))
    print(render_md(summary))
    print(f"cuda_build: {'passed' if not failures else 'FAILED'} in {summary['total_s']:.0f} s; wrote {args.out}")
    return 0 if not failures else 1


if __name__ == "__main__":
    with contextlib.suppress(KeyboardInterrupt):
        sys.exit(main())
