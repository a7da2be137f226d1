"""One command for the first GPU run (issue 14, item 7): build the extension, run the GPU tests, the op
benchmarks, and the five defenses reference against fast path on a synthetic PreActResNet18 backdoor and on the two
real checkpoints, within a deadline, each stage's results written as soon as it finishes.

Usage::

    python benchmarks/gpu_suite.py --data .data                   # one H100/H200: about 9 minutes, then stops
    python benchmarks/gpu_suite.py --dry-run --out /tmp/suite      # CPU, tiny, no build (tests/test_gpu_suite.py)
    python benchmarks/gpu_suite.py --prepare-data ../shared/data   # fill .data/ for a machine without ../shared
    python benchmarks/gpu_suite.py --collect DIR                   # a device run's files -> results/<device>/

Stages, in order (``--stages`` picks some). Each has a minimum useful time; a stage starts only when that much of
the ``--deadline`` (default 540 s) is left, and may run until the later stages' minimums are all that is left
(then it is stopped: SIGINT first, so pytest and the defenses write what they finished). A skipped or stopped
stage says so in ``gpu_suite.json`` and ``gpu_suite.md``.

- build (60 s): ``pip install --no-build-isolation --no-deps --no-index -e .`` with ``MAX_JOBS`` = the core
  count, and ``FASTPURIFY_FORCE_CUDA=1`` and ``TORCH_CUDA_ARCH_LIST`` = this GPU's when nvcc is present; then
  which backend every op gets on the device;
- tests (60 s): ``pytest -m gpu tests`` (TF32 off, the defense tests on CUDA, the steps under sync debug mode);
- ops (45 s): the GPU cases of the op benchmarks, ``benchmarks/test_bench_{pgd,universal,dual_logit,cg,attack,
  masked_conv}.py -m gpu`` (the defense and budget files are left out: minutes each);
- synthetic (45 s): ``fastpurify.bench.run_comparison`` of the five defenses on a PreActResNet18 backdoored on
  synthetic data (``BENCH_SETTINGS``: one round or a short schedule each);
- real (60 s): the same on ``badnets`` and ``trojan_wm`` (2,500 clean images, all 10,000 test images; ``--data``);
- scaling (60 s): with 2 or more GPUs, ``benchmarks/scaling.py`` over 1/2/4/8 of them (NCCL, one GPU per process,
  the same global batches): seconds per round and agreement with one process (skipped on one GPU).

Files, in ``--out`` (default ``benchmarks/results/<device>/``, the tag of ``benchmarks/_env.py``), each also copied
to ``--mirror DIR`` when it is written; every one records the device name, torch, triton and CUDA versions and the
commit: ``gpu_suite.json`` (every stage's status, seconds, build log tail, backends, test outcomes and failures),
``gpu_suite.md`` (the same as tables), ``ops.json`` (pytest-benchmark's format: ``benchmarks/summarize.py`` reads
it), ``synthetic.json`` (run_comparison rows), ``end_to_end.json`` and ``end_to_end.md`` (the real checkpoints,
``benchmarks/end_to_end.py``'s format). Nothing is downloaded: pip runs with ``--no-index``.

On this workplace's device machine (``run`` tool; torch 2.11 and triton 3.6 preinstalled, no network, the results
come back from ``$OUT``: at most 8 files, so the log is the seventh). First, here::

    python benchmarks/gpu_suite.py --prepare-data ../shared/data

which writes ``.data/`` (gitignored): ``cifar10/cifar-10-batches-py/test_batch`` and ``batches.meta`` copied, a
``data_batch_1`` holding its first 2,500 images (the defender's clean set; the whole file would pass the 64 MiB
that travels), and ``ibau/`` with the two checkpoints and ``trojan_wm.png`` (about 41 MB). Then the call::

    run(command='set -o pipefail; PYTHONUNBUFFERED=1 python3 benchmarks/gpu_suite.py --data .data '
                '--mirror "$OUT" 2>&1 | tee "$OUT/suite.log"',
        carry=[".data"], timeout_s=600)

and, back here, ``python benchmarks/gpu_suite.py --collect <files_at>`` copies the files into
``benchmarks/results/<device>/`` (the log stays out), ready to commit; ``python benchmarks/summarize.py`` then
adds the op benchmarks to docs/benchmarks.md.
"""

from __future__ import annotations

import argparse
import json
import os
import pickle
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any, Dict, List, Optional

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(1, str(Path(__file__).resolve().parents[1]))  # the repository, when fastpurify is not installed
from _env import ROOT, device_tag  # noqa: E402

STAGES = ("build", "tests", "ops", "synthetic", "real", "scaling")
# seconds a stage needs to be useful
MINIMUM = {"build": 60, "tests": 60, "ops": 45, "synthetic": 45, "real": 60, "scaling": 60}
DRY_MINIMUM = {"build": 1, "tests": 5, "ops": 5, "synthetic": 5, "real": 5, "scaling": 1}
OP_BENCHMARKS = [f"benchmarks/test_bench_{n}.py" for n in ("pgd", "universal", "dual_logit", "cg", "attack",
                                                           "masked_conv")]
CHECKPOINTS = ("badnets", "trojan_wm")
# --dry-run's defense settings: one round of the shortest inner schedules (the code paths, not the method)
DRY_SETTINGS = {"sau": {"epochs": 1, "pgd_steps": 2}, "ibau": {"epochs": 1, "K": 2},
                "awm": {"epochs": 1, "inner": 1}, "baerase": {"epochs": 1, "recovery_epochs": 1, "hidden_size": 32},
                "bcu": {"epochs": 1}}
OUT_FILES = ("gpu_suite.json", "gpu_suite.md", "ops.json", "synthetic.json", "end_to_end.json", "end_to_end.md")


# --------------------------------------------------------------------------------------------------------
# Writing
# --------------------------------------------------------------------------------------------------------


def _mirror(path: Path, mirror: Optional[str]) -> None:
    if mirror and path.exists():
        Path(mirror).mkdir(parents=True, exist_ok=True)
        shutil.copy2(path, Path(mirror) / path.name)


def _write(path: Path, text: str, mirror: Optional[str]) -> None:
    """Write through a temporary file, so that a stop mid-write leaves the previous version, then mirror."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)
    _mirror(path, mirror)


def environment(device: str) -> Dict[str, Any]:
    """Device name, versions, cores, commit (fastpurify.bench.environment) and the results folder's tag."""
    from fastpurify.bench import environment as bench_environment

    env = bench_environment(device)
    env.update(device_tag=device_tag(), cores=os.cpu_count())
    return env


# --------------------------------------------------------------------------------------------------------
# Subprocesses with a time cap
# --------------------------------------------------------------------------------------------------------


def _run(cmd: List[str], cap: float, env: Optional[Dict[str, str]] = None) -> Dict[str, Any]:
    """Run ``cmd`` in the repository, its output streamed to ours and kept; past ``cap`` seconds its process
    group gets SIGINT (pytest and the defenses then write what they finished), and SIGKILL 20 s later."""
    t0 = time.monotonic()
    p = subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                         errors="replace", bufsize=1, start_new_session=True)
    lines: List[str] = []

    def pump() -> None:
        for line in p.stdout:
            sys.stdout.write(line)
            lines.append(line)

    reader = threading.Thread(target=pump, daemon=True)
    reader.start()
    grace = min(20.0, 0.2 * cap)
    stopped = False
    try:
        rc = p.wait(timeout=max(1.0, cap - grace))
    except subprocess.TimeoutExpired:
        stopped = True
        os.killpg(p.pid, signal.SIGINT)
        try:
            rc = p.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(p.pid, signal.SIGKILL)
            rc = p.wait()
    reader.join(10)
    sys.stdout.flush()
    return {"rc": rc, "stopped": stopped, "seconds": round(time.monotonic() - t0, 1), "output": "".join(lines)}


def _status(r: Dict[str, Any]) -> str:
    return "stopped at its time cap" if r["stopped"] else ("completed" if r["rc"] == 0 else f"failed (exit {r['rc']})")


# --------------------------------------------------------------------------------------------------------
# Stages
# --------------------------------------------------------------------------------------------------------


def _nvcc() -> Optional[str]:
    found = shutil.which("nvcc")
    if found:
        return found
    for cand in (os.environ.get("CUDA_HOME", ""), "/usr/local/cuda"):
        if cand and (Path(cand) / "bin" / "nvcc").is_file():
            return str(Path(cand) / "bin" / "nvcc")
    return None


def probe_backends(device: str) -> Dict[str, Any]:
    """Which backend each op gets on ``device`` (a fresh interpreter, so that a just-built extension loads)."""
    code = (f"import json, fastpurify.backend as b; i = b.info(); d = {device!r}\n"
            "print('PROBE' + json.dumps({'extension': i['extension'], 'gpu': i['gpu'], 'triton': i['triton'],"
            " 'triton_error': i['triton_error'], 'ops': {n: {'auto': o.get(d + '_auto'), 'available': "
            "[k for k, v in o.get(d, {}).items() if v['available']], 'why_not': {k: v['reason'] for k, v in "
            "o.get(d, {}).items() if not v['available']}} for n, o in i['ops'].items()}}, default=str))")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=300)
    for line in out.stdout.splitlines():
        if line.startswith("PROBE"):
            return json.loads(line[5:])
    return {"error": (out.stderr or out.stdout)[-2000:]}


def stage_build(a, cap: float) -> Dict[str, Any]:
    import torch

    nvcc = _nvcc()
    env = dict(os.environ, MAX_JOBS=str(os.cpu_count() or 1), PIP_NO_INDEX="1", PIP_DISABLE_PIP_VERSION_CHECK="1")
    if nvcc:
        env["FASTPURIFY_FORCE_CUDA"] = "1"
        env.setdefault("CUDA_HOME", str(Path(nvcc).resolve().parents[1]))
        env["PATH"] = f"{Path(nvcc).parent}{os.pathsep}{env.get('PATH', '')}"
    if torch.cuda.is_available():  # this GPU's architecture only: a quarter of the compile of four
        major, minor = torch.cuda.get_device_capability()
        env.setdefault("TORCH_CUDA_ARCH_LIST", f"{major}.{minor}")
    cmd = [sys.executable, "-m", "pip", "install", "--no-build-isolation", "--no-deps", "--no-index", "-e", "."]
    rec: Dict[str, Any] = {"command": " ".join(["python"] + cmd[1:]), "nvcc": nvcc, "MAX_JOBS": env["MAX_JOBS"],
                           "FASTPURIFY_FORCE_CUDA": env.get("FASTPURIFY_FORCE_CUDA"),
                           "TORCH_CUDA_ARCH_LIST": env.get("TORCH_CUDA_ARCH_LIST")}
    if nvcc:
        v = subprocess.run([nvcc, "--version"], capture_output=True, text=True)
        rec["nvcc_version"] = (v.stdout.strip().splitlines() or [""])[-1]
    if a.dry_run:
        rec.update(status="not run (dry run: no build)", seconds=0.0)
    else:
        r = _run(cmd, cap, env)
        rec.update(status=_status(r), seconds=r["seconds"], log_tail=r["output"][-4000:])
    rec["backends"] = probe_backends(a.device)
    return rec


_OUTCOME = re.compile(r"^(\S+::\S+) (PASSED|FAILED|ERROR|SKIPPED|XFAIL|XPASS)\b", re.M)
_SHORT = re.compile(r"^(FAILED|ERROR) (\S+)(?: - (.*))?$", re.M)
_SKIP = re.compile(r"^SKIPPED \[(\d+)\] ([^:]+):\d+: (.*)$", re.M)
_FINAL = re.compile(r"^=+ (.*\d+ (?:passed|failed|skipped|error|deselected|xfailed|xpassed).*) =+$", re.M)


def _pytest(args: List[str], cap: float, env: Dict[str, str]) -> Dict[str, Any]:
    cmd = [sys.executable, "-m", "pytest", *args, "-v", "-rfEsx", "--tb=short", "-p", "no:cacheprovider",
           "--color=no", "--durations=10"]
    r = _run(cmd, cap, env)
    out = r["output"]
    outcomes: Dict[str, int] = {}
    for _, what in _OUTCOME.findall(out):
        outcomes[what.lower()] = outcomes.get(what.lower(), 0) + 1
    skips: Dict[str, int] = {}
    for n, _, reason in _SKIP.findall(out):
        skips[reason] = skips.get(reason, 0) + int(n)
    final = _FINAL.findall(out)
    return {"command": " ".join(["python"] + cmd[1:]), "status": _status(r), "seconds": r["seconds"],
            "outcomes": outcomes, "summary": final[-1] if final else None,
            "failures": [{"test": t, "kind": k, "message": (m or "")[:300]} for k, t, m in _SHORT.findall(out)][:60],
            "skip_reasons": skips, "durations": re.findall(r"^\d+\.\d+s (?:call|setup|teardown) +\S+$", out, re.M),
            "output_tail": out[-3000:] if r["rc"] not in (0, None) and not _OUTCOME.search(out) else None}


def stage_tests(a, cap: float) -> Dict[str, Any]:
    env = dict(os.environ, FASTPURIFY_DATA=str(Path(a.data).resolve()))
    # dry run: the smallest real selection, the TF32 switch's own tests (the GPU ones are skipped on a CPU)
    args = ["tests/test_masked_conv.py", "-k", "tf32"] if a.dry_run else ["-m", "gpu", "tests"]
    return _pytest(args, cap, env)


def stage_ops(a, cap: float, out: Path) -> Dict[str, Any]:
    raw = out / ".ops.raw.json"
    raw.unlink(missing_ok=True)
    if a.dry_run:
        args = ["benchmarks/test_bench_dual_logit.py", "-k", "cpu and torch and fwd-256x10", "--benchmark-min-rounds=1",
                "--benchmark-max-time=0.001", "--benchmark-warmup=off"]
    else:  # the GPU cases; short rounds (CUDA-event-like medians need few), every provider
        args = [*OP_BENCHMARKS, "-m", "gpu", "--benchmark-min-rounds=5", "--benchmark-max-time=0.2"]
    rec = _pytest([*args, f"--benchmark-json={raw}"], cap, dict(os.environ))
    data = json.loads(raw.read_text()) if raw.exists() else {"benchmarks": []}
    raw.unlink(missing_ok=True)
    rec["benchmarks"] = len(data.get("benchmarks", []))
    data["gpu_suite"] = {k: v for k, v in rec.items() if k != "durations"}
    data["environment"] = environment(a.device)
    _write(out / "ops.json", json.dumps(data, indent=1, default=str), a.mirror)
    return rec


def stage_scaling(a, cap: float, out: Path) -> Dict[str, Any]:
    """The data-parallel scaling run (benchmarks/scaling.py, NCCL, one GPU per process) over 1, 2, 4, 8 GPUs (as
    many as there are); skipped on one GPU and in a dry run (tests/test_distributed.py covers the CPU path)."""
    import torch

    count = 0 if a.dry_run else torch.cuda.device_count()
    if count < 2:
        return {"status": f"skipped: {count} GPU(s) (the scaling run needs 2 or more)", "seconds": 0}
    procs = [p for p in (1, 2, 4, 8) if p <= count]
    cmd = [sys.executable, str(Path(__file__).resolve().parent / "scaling.py"), "--device", "cuda", "--procs",
           *map(str, procs), "--images", "2048", "--out", str(out)]
    r = _run(cmd, cap, dict(os.environ))
    for name in ("scaling.json", "scaling.md"):
        if (out / name).exists():
            _mirror(out / name, a.mirror)
    return {"status": _status(r), "seconds": r["seconds"], "procs": procs,
            "output_tail": r["output"][-3000:] if r["rc"] not in (0, None) else None}


def _defense_child(a, stage: str, cap: float) -> Dict[str, Any]:
    cmd = [sys.executable, str(Path(__file__).resolve()), "--child", stage, "--out", str(a.out), "--data", a.data,
           "--device", a.device] + (["--mirror", a.mirror] if a.mirror else []) + (["--dry-run"] if a.dry_run else [])
    r = _run(cmd, cap, dict(os.environ))
    done = re.findall(r"^DONE (\S+)", r["output"], re.M)
    skipped = re.findall(r"^SKIP (.*)$", r["output"], re.M)
    status = "skipped: " + "; ".join(skipped) if skipped and not done else _status(r)
    return {"status": status, "seconds": r["seconds"], "finished": done,
            "output_tail": r["output"][-3000:] if r["rc"] not in (0, None) else None}


def child_synthetic(a) -> None:
    """The five defenses on a synthetic backdoor: PreActResNet18 on the GPU, a tiny SmallVGG in a dry run."""
    from fastpurify.bench import DEFENSES, run_comparison, synthetic_workload

    env = environment(a.device)
    if a.dry_run:
        wl = synthetic_workload("small_vgg", n_train=64, train_epochs=1, n_clean=32, n_eval=32, device=a.device)
        settings, warmup = DRY_SETTINGS, False
    else:  # trained in seconds on the GPU; 1,000 clean images: 4 SAU batches, 10 I-BAU steps per round
        wl = synthetic_workload("preact_resnet18", n_train=5000, train_epochs=8, n_clean=1000, n_eval=1000,
                                device=a.device)
        settings, warmup = {}, True
    doc: Dict[str, Any] = {"environment": env, "workload": wl.describe(), "status": "running", "rows": []}
    for d in DEFENSES:
        doc["rows"] += run_comparison([d], wl, settings, seed=0, device=a.device, warmup=warmup)
        _write(Path(a.out) / "synthetic.json", json.dumps(doc, indent=1, default=str), a.mirror)
        print(f"DONE {d}", flush=True)
    doc["status"] = "completed"
    _write(Path(a.out) / "synthetic.json", json.dumps(doc, indent=1, default=str), a.mirror)


def child_real(a) -> None:
    """The five defenses on each real checkpoint (benchmarks/end_to_end.py's rows and files); a dry run: BCU, one
    epoch, 32 clean and 64 test images."""
    import end_to_end

    from fastpurify.bench import DEFENSES, SHARED_CHECKPOINTS, real_workload, resolve_checkpoint, run_comparison

    env = environment(a.device)
    out = Path(a.out)
    for ck in CHECKPOINTS:
        path, spec, target = resolve_checkpoint(ck, a.data)
        if not path.is_file():
            print(f"SKIP {ck}: {path} not found (--data {a.data}; see --prepare-data)", flush=True)
            continue
        n_clean, n_eval = (32, 64) if a.dry_run else (2500, None)
        wl = real_workload(path, a.data, trigger=spec, target=target, n_clean=n_clean, n_eval=n_eval)
        for d in (("bcu",) if a.dry_run else DEFENSES):
            rows = run_comparison([d], wl, DRY_SETTINGS if a.dry_run else {}, seed=0, device=a.device,
                                  warmup=not a.dry_run)
            for r in rows:
                r.update(checkpoint=ck, workload_info=wl.describe(), environment=env)
            end_to_end.merge_rows(out, rows, env)
            for name in ("end_to_end.json", "end_to_end.md"):
                _mirror(out / name, a.mirror)
            print(f"DONE {ck}:{d}", flush=True)
    assert set(CHECKPOINTS) <= set(SHARED_CHECKPOINTS)


# --------------------------------------------------------------------------------------------------------
# The summary
# --------------------------------------------------------------------------------------------------------


def _stage_line(name: str, rec: Dict[str, Any]) -> str:
    if name == "build":
        ext = (rec.get("backends") or {}).get("extension") or {}
        what = f"extension built: {ext.get('built')}, with CUDA: {ext.get('with_cuda')}"
    elif name in ("tests", "ops"):
        what = rec.get("summary") or ", ".join(f"{v} {k}" for k, v in rec.get("outcomes", {}).items()) or "-"
        if name == "ops":
            what += f"; {rec.get('benchmarks', 0)} benchmarks recorded"
    else:
        what = "finished: " + (", ".join(rec.get("finished", [])) or "none")
    return f"| {name} | {rec.get('status')} | {rec.get('seconds', '-')} | {what} |"


def render(doc: Dict[str, Any], out: Path) -> str:
    from fastpurify.bench import render_markdown

    env = doc["environment"]
    lines = [f"# GPU suite on {env['device']}", "",
             f"torch {env['torch']}, CUDA {env['cuda']}, triton {env['triton']}, {env['cores']} cores, commit "
             f"{env['commit']}; deadline {doc['deadline']} s{' (dry run)' if doc['dry_run'] else ''}; "
             f"`{env['command']}`. Written by `benchmarks/gpu_suite.py` after every stage.", "",
             "| stage | status | seconds | result |", "| --- | --- | --- | --- |"]
    lines += [_stage_line(n, r) for n, r in doc["stages"].items()]
    build = doc["stages"].get("build", {})
    ops = (build.get("backends") or {}).get("ops")
    if ops:
        lines += ["", "## Backends on the device (after the build)", "", "| op | auto | available | why not |",
                  "| --- | --- | --- | --- |"]
        lines += [f"| {n} | {o['auto']} | {', '.join(o['available'])} | "
                  f"{'; '.join(f'{k}: {v}' for k, v in o['why_not'].items())[:200]} |" for n, o in ops.items()]
    tests = doc["stages"].get("tests", {})
    if tests.get("failures"):
        lines += ["", "## Test failures", ""] + [f"- {f['kind']} `{f['test']}`: {f['message']}"
                                                 for f in tests["failures"]]
    if (out / "ops.json").exists():
        import summarize

        table = summarize.summarize_device(out)
        if table:
            lines += ["", "## Op benchmarks", "", table.split("\n", 2)[2].strip()]
    syn = out / "synthetic.json"
    if syn.exists():
        s = json.loads(syn.read_text())
        w = s["workload"]
        lines += ["", f"## Synthetic backdoor: {w['arch']}, {w['clean_count']} clean, {w['eval_count']} evaluation "
                      f"images ({s['status']})", "", render_markdown(s["rows"]).split("\n\n")[0]]
    e2e = out / "end_to_end.md"
    if e2e.exists():
        lines += ["", "## Real checkpoints (end_to_end.md)", "",
                  e2e.read_text().split("\n", 2)[2].strip().replace("\n## ", "\n### ")]
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------------------------------------
# Data for a machine without ../shared, and collecting a device run's files
# --------------------------------------------------------------------------------------------------------


def prepare_data(src: str, dest: Path, clean_count: int = 2500) -> None:
    """``dest`` (default ``.data``) from ``src`` (``../shared/data``): the test batch and class names copied, the
    first ``clean_count`` images of data_batch_1 in a batch of their own, the two checkpoints and the trigger."""
    from fastpurify.bench import SHARED_CHECKPOINTS
    from fastpurify.data import find_cifar10, load_cifar10

    cifar = find_cifar10(src)
    target = dest / "cifar10" / "cifar-10-batches-py"
    target.mkdir(parents=True, exist_ok=True)
    for name in ("test_batch", "batches.meta"):
        shutil.copy2(cifar / name, target / name)
    with open(cifar / "data_batch_1", "rb") as f:
        batch = pickle.load(f, encoding="latin1")
    keep = {k: (v[:clean_count] if k in ("data", "labels", "filenames") else v) for k, v in batch.items()}
    with open(target / "data_batch_1", "wb") as f:
        pickle.dump(keep, f, protocol=2)
    (dest / "ibau").mkdir(parents=True, exist_ok=True)
    for rel, _, _ in SHARED_CHECKPOINTS.values():
        shutil.copy2(Path(src) / rel, dest / rel)
    shutil.copy2(Path(src) / "ibau" / "trojan_wm.png", dest / "ibau" / "trojan_wm.png")
    (dest / "README.md").write_text(
        f"Written by `python benchmarks/gpu_suite.py --prepare-data {src}` for a machine without ../shared: the "
        f"CIFAR-10 test batch, a data_batch_1 cut to its first {clean_count} images (the defender's clean set), "
        "the two I-BAU checkpoints and trojan_wm.png. Gitignored; travels with `carry=['.data']`.\n")
    a, b = load_cifar10(dest, split="train"), load_cifar10(src, split="train", count=clean_count)
    assert a[0].equal(b[0]) and a[1].equal(b[1]), "the cut data_batch_1 differs from the source's first images"
    size = sum(p.stat().st_size for p in dest.rglob("*") if p.is_file())
    print(f"wrote {dest}: {size / 2**20:.1f} MiB (the device tool carries at most 64 MiB with the tree)")


def collect(src: str) -> Path:
    """Copy a device run's files (the ``$OUT`` of the run tool) into ``benchmarks/results/<device>/``."""
    doc = json.loads((Path(src) / "gpu_suite.json").read_text())
    folder = ROOT / "benchmarks" / "results" / doc["environment"]["device_tag"]
    folder.mkdir(parents=True, exist_ok=True)
    for name in OUT_FILES:
        if (Path(src) / name).is_file():
            shutil.copy2(Path(src) / name, folder / name)
            print(f"copied {name} -> {folder / name}")
    return folder


# --------------------------------------------------------------------------------------------------------
# Main
# --------------------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default=None, help="results folder (default benchmarks/results/<device>/; a new "
                                                "temporary folder with --dry-run)")
    ap.add_argument("--mirror", default=None, help="also copy every file written there (the device tool's $OUT)")
    ap.add_argument("--data", default=None, help="data folder: CIFAR-10 and the I-BAU checkpoints (default .data if "
                                                 "present, else ../shared/data)")
    ap.add_argument("--deadline", type=float, default=540.0, help="seconds for everything (default 540)")
    ap.add_argument("--stages", nargs="+", choices=STAGES, default=list(STAGES))
    ap.add_argument("--dry-run", action="store_true", help="CPU, tiny shapes, no build: every stage in its smallest "
                                                           "form, really run")
    ap.add_argument("--device", default=None, help="default cuda (cpu with --dry-run)")
    ap.add_argument("--prepare-data", metavar="SRC", default=None, help="write .data/ from SRC and stop")
    ap.add_argument("--collect", metavar="DIR", default=None, help="copy a device run's files into results/ and stop")
    ap.add_argument("--child", choices=("synthetic", "real"), default=None, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)

    if a.prepare_data:
        prepare_data(a.prepare_data, ROOT / ".data")
        return 0
    if a.collect:
        collect(a.collect)
        return 0
    if a.data is None:
        from fastpurify.data import default_data_dir

        a.data = str(ROOT / ".data") if (ROOT / ".data").is_dir() else str(default_data_dir())
    a.device = a.device or ("cpu" if a.dry_run else "cuda")
    if a.child:
        (child_synthetic if a.child == "synthetic" else child_real)(a)
        return 0

    import torch

    if a.device.startswith("cuda") and not torch.cuda.is_available():
        print(f"gpu_suite: no CUDA device here (torch {torch.__version__}); use --dry-run (CPU) or --device cpu",
              file=sys.stderr)
        return 2
    out = Path(a.out) if a.out else (Path(tempfile.mkdtemp(prefix="gpu_suite_")) if a.dry_run
                                     else ROOT / "benchmarks" / "results" / device_tag())
    a.out = str(out)
    out.mkdir(parents=True, exist_ok=True)
    minimum = DRY_MINIMUM if a.dry_run else MINIMUM
    stages = [s for s in STAGES if s in a.stages]
    doc: Dict[str, Any] = {"environment": environment(a.device), "deadline": a.deadline, "dry_run": a.dry_run,
                           "data": a.data, "stages": {}}
    t0 = time.monotonic()

    def save() -> None:
        doc["elapsed_s"] = round(time.monotonic() - t0, 1)
        _write(out / "gpu_suite.json", json.dumps(doc, indent=1, default=str), a.mirror)
        _write(out / "gpu_suite.md", render(doc, out), a.mirror)

    print(f"gpu_suite: {', '.join(stages)} on {doc['environment']['device']} within {a.deadline:.0f} s -> {out}",
          flush=True)
    for i, name in enumerate(stages):
        left = a.deadline - (time.monotonic() - t0)
        later = sum(minimum[s] for s in stages[i + 1:])
        if left < minimum[name]:
            doc["stages"][name] = {"status": f"skipped: {left:.0f} s of the {a.deadline:.0f} s deadline left, the "
                                             f"stage needs {minimum[name]} s", "seconds": 0}
            print(f"== {name}: {doc['stages'][name]['status']}", flush=True)
            save()
            continue
        cap = max(minimum[name], left - later)
        print(f"== {name} (at most {cap:.0f} s)", flush=True)
        try:
            if name == "build":
                rec = stage_build(a, cap)
            elif name == "tests":
                rec = stage_tests(a, cap)
            elif name == "ops":
                rec = stage_ops(a, cap, out)
            elif name == "scaling":
                rec = stage_scaling(a, cap, out)
            else:
                rec = _defense_child(a, name, cap)
        except Exception as e:  # a broken stage must not take the later ones with it
            rec = {"status": f"failed: {type(e).__name__}: {e}", "seconds": None}
        rec["cap_s"] = round(cap, 1)
        doc["stages"][name] = rec
        print(f"== {name}: {rec['status']}", flush=True)
        save()
    print(f"gpu_suite: done in {time.monotonic() - t0:.0f} s; {out / 'gpu_suite.md'}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
