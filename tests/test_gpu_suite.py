"""benchmarks/gpu_suite.py, the one command for the first GPU run: its --dry-run (CPU, tiny, no build) runs every
stage for real, so that the suite cannot rot before a GPU runs it; the deadline skips what would not fit; a stage
past its time cap is stopped with SIGINT and keeps what it printed; .data is prepared from ../shared/data."""

import importlib.util
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from fastpurify.data import default_data_dir, load_cifar10

ROOT = Path(__file__).resolve().parents[1]
SUITE = ROOT / "benchmarks" / "gpu_suite.py"
DATA = default_data_dir()
HAS_REAL = (DATA / "ibau" / "badnets_8_02_ckpt.pth").is_file() and (DATA / "cifar10" / "cifar-10-batches-py").is_dir()
ENV_KEYS = {"device", "torch", "cuda", "triton", "commit"}


def _module(name):
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _suite(*args, timeout=600):
    return subprocess.run([sys.executable, str(SUITE), *args], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def dry_run(tmp_path_factory):
    out, mirror = tmp_path_factory.mktemp("suite"), tmp_path_factory.mktemp("mirror")
    r = _suite("--dry-run", "--out", str(out), "--mirror", str(mirror), "--data", str(DATA))
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]
    return out, mirror, r.stdout


def test_dry_run_runs_every_stage(dry_run):
    out, _, stdout = dry_run
    doc = json.loads((out / "gpu_suite.json").read_text())
    assert doc["dry_run"] and ENV_KEYS <= set(doc["environment"])
    stages = doc["stages"]
    assert list(stages) == ["build", "tests", "ops", "synthetic", "real", "scaling"]
    build = stages["build"]
    assert build["status"] == "not run (dry run: no build)" and "--no-index" in build["command"]
    assert build["MAX_JOBS"].isdigit() and build["backends"]["extension"] is not None
    assert build["backends"]["ops"]["pgd_update"]["auto"] in ("cpp", "torch")  # the probe saw every op
    tests = stages["tests"]
    assert tests["status"] == "completed" and tests["outcomes"]["passed"] >= 3 and not tests["failures"]
    assert stages["ops"]["status"] == "completed" and stages["ops"]["benchmarks"] >= 1
    assert stages["synthetic"]["finished"] == ["sau", "ibau", "awm", "baerase", "bcu"]
    if HAS_REAL:
        assert stages["real"]["finished"] == ["badnets:bcu", "trojan_wm:bcu"], stages["real"]
    else:
        assert stages["real"]["status"].startswith("skipped:"), stages["real"]
    assert stages["scaling"]["status"] == "skipped: 0 GPU(s) (the scaling run needs 2 or more)"
    assert all(s["status"] in ("completed", "not run (dry run: no build)") or s["status"].startswith("skipped:")
               for s in stages.values()), stages
    assert "== real:" in stdout


def test_dry_run_files_record_where_they_ran(dry_run):
    out, _, _ = dry_run
    ops = json.loads((out / "ops.json").read_text())
    assert ENV_KEYS <= set(ops["environment"]) and ops["benchmarks"][0]["stats"]["median"] > 0
    # the README's tables read the suite's op benchmarks as they read any other
    assert "dual_logit_loss fwd 256x10 fp32 cpu | torch |" in _module("summarize").summarize_device(out)
    syn = json.loads((out / "synthetic.json").read_text())
    assert syn["status"] == "completed" and ENV_KEYS <= set(syn["environment"])
    assert [r["defense"] for r in syn["rows"]] == ["sau", "ibau", "awm", "baerase", "bcu"]
    for r in syn["rows"]:
        assert r["reference"]["defense_s"] > 0 and r["fast"]["defense_s"] > 0 and r["fast"]["status"] == "completed"
    md = (out / "gpu_suite.md").read_text()
    assert "| stage | status | seconds | result |" in md and "## Synthetic backdoor: small_vgg" in md
    if HAS_REAL:
        e2e = json.loads((out / "end_to_end.json").read_text())
        assert ENV_KEYS <= set(e2e["environment"])
        assert sorted((r["checkpoint"], r["defense"]) for r in e2e["rows"]) == [("badnets", "bcu"),
                                                                                ("trojan_wm", "bcu")]
        assert "## Real checkpoints" in md and "### badnets" in md


def test_dry_run_mirror_fits_the_device_tool(dry_run):
    # what comes back from $OUT: at most 8 files (the log makes one more), 16 MiB each, plain names, one level
    out, mirror, _ = dry_run
    files = sorted(p.name for p in mirror.iterdir())
    assert set(files) <= {"gpu_suite.json", "gpu_suite.md", "ops.json", "synthetic.json", "end_to_end.json",
                          "end_to_end.md"} and {"gpu_suite.json", "gpu_suite.md", "ops.json"} <= set(files)
    assert len(files) + 1 <= 8
    for p in mirror.iterdir():
        assert p.is_file() and re.fullmatch(r"[A-Za-z0-9._-]+", p.name) and p.stat().st_size < 16 * 2**20
        assert p.read_bytes() == (out / p.name).read_bytes()  # the last version of each


def test_the_deadline_skips_what_does_not_fit(tmp_path):
    r = _suite("--dry-run", "--out", str(tmp_path), "--deadline", "0", "--stages", "tests", "synthetic")
    assert r.returncode == 0, r.stderr[-2000:]
    doc = json.loads((tmp_path / "gpu_suite.json").read_text())
    assert list(doc["stages"]) == ["tests", "synthetic"]
    for rec in doc["stages"].values():
        assert rec["status"].startswith("skipped:") and "deadline" in rec["status"]
    assert "skipped:" in (tmp_path / "gpu_suite.md").read_text()


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the message given where no GPU is")
def test_a_full_run_needs_a_gpu(tmp_path):
    r = _suite("--out", str(tmp_path), timeout=120)
    assert r.returncode == 2 and "--dry-run" in r.stderr and not (tmp_path / "gpu_suite.json").exists()


def test_a_stage_past_its_cap_is_interrupted_and_keeps_its_output():
    gpu_suite = _module("gpu_suite")
    # SIGINT first, so that pytest and the defenses write what they finished: the child sees KeyboardInterrupt
    code = ("import time\nprint('started', flush=True)\ntry:\n    time.sleep(120)\nexcept KeyboardInterrupt:\n"
            "    print('interrupted', flush=True)\n    raise SystemExit(3)\n")
    r = gpu_suite._run([sys.executable, "-c", code], cap=3.0)
    assert r["stopped"] and r["rc"] == 3 and r["output"] == "started\ninterrupted\n"
    assert gpu_suite._status(r) == "stopped at its time cap"
    r = gpu_suite._run([sys.executable, "-c", "print('quick')"], cap=60.0)
    assert not r["stopped"] and r["rc"] == 0 and gpu_suite._status(r) == "completed"


@pytest.mark.skipif(not HAS_REAL, reason=f"needs the shared data in {DATA}")
def test_prepare_data_fits_the_carry_and_loads(tmp_path):
    gpu_suite = _module("gpu_suite")
    gpu_suite.prepare_data(str(DATA), tmp_path, clean_count=100)
    x, y = load_cifar10(tmp_path, split="train")
    x0, y0 = load_cifar10(DATA, split="train", count=100)
    assert torch.equal(x, x0) and torch.equal(y, y0)
    assert load_cifar10(tmp_path, split="test")[0].shape == (10000, 3, 32, 32)
    for rel in ("ibau/badnets_8_02_ckpt.pth", "ibau/trojan_wm_2_02_ckpt.pth", "ibau/trojan_wm.png"):
        assert (tmp_path / rel).read_bytes() == (DATA / rel).read_bytes()
    size = sum(p.stat().st_size for p in tmp_path.rglob("*") if p.is_file())
    assert size < 48 * 2**20  # with 2,500 images about 41 MB: the tree and the carry stay under 64 MiB
