"""``fastpurify sweep``: studies checked before any cell runs, parallel workers, Ctrl-C and resume, the summary.

The studies run tiny cells (``tests/_tiny.py``'s ``tiny_cnn`` through ``model:``, a CIFAR-format folder of random
images, one epoch): the point is the machinery, not the defenses' numbers.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from test_cli import _fake_cifar

from fastpurify.cli import main
from fastpurify.sweep import plan_cells
from fastpurify.sweep_report import aggregate, render_summary

TINY = f"{Path(__file__).parent / '_tiny.py'}:tiny_cnn"
PATCH = "patch:size=3,row=29,col=29,value=1"
METRICS = ("acc_before", "asr_before", "ra_before", "acc_after", "asr_after", "ra_after", "der")


@pytest.fixture
def grid(tmp_path):
    """A 2 defenses x 2 checkpoints x 2 seeds study of tiny cells (as JSON: no YAML needed) and its folder."""
    from _tiny import tiny_cnn

    data = _fake_cifar(tmp_path / "data", n_train=64, n_test=40)
    for s in (0, 1):
        torch.save(tiny_cnn(seed=s).state_dict(), tmp_path / f"m{s}.pth")
    study = {
        "name": "grid", "data": str(data), "clean_count": 64, "eval_count": 40, "seeds": [0, 1],
        "threads_per_worker": 1, "settings": {"epochs": 1},
        "defenses": {"bcu": {"small": {"batch_size": 32, "augment": False}},
                     "ibau": {"small": {"batch_size": 32, "K": 1}}},
        "checkpoints": [{"name": f"m{s}", "path": str(tmp_path / f"m{s}.pth"), "model": TINY, "trigger": PATCH,
                         "target": s} for s in (0, 1)],
    }
    return tmp_path, study


def _write(path, study):
    path.write_text(json.dumps(study))
    return str(path)


def _group_alive(pgid) -> bool:
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    return True


def _rows(out):
    return {r["cell"]: r for r in json.loads((out / "results.json").read_text())["rows"]}


# --------------------------------------------------------------------------------------------------------
# summary.md: mean ± sample standard deviation, min-max, n, the bar
# --------------------------------------------------------------------------------------------------------


def test_aggregate_on_hand_made_rows():
    def row(ckpt, seed, acc_after, asr_after, status="completed"):
        return {"defense": "sau", "recipe": "published", "checkpoint": ckpt, "seed": seed, "status": status,
                "acc_before": 90.0, "acc_after": acc_after, "asr_after": asr_after}

    rows = [row("a", 0, 88.0, 2.0), row("a", 1, 87.0, 4.0), row("a", 2, 86.0, 9.0),
            row("b", 0, 80.0, 1.0), row("b", 1, None, None, status="failed"),
            {"defense": "ibau", "recipe": "fast", "checkpoint": "a", "seed": 0, "status": "failed"}]
    a, b, c = aggregate(rows)
    assert (a["n"], a["failed"], b["n"], b["failed"], c["n"], c["failed"]) == (3, 0, 1, 1, 0, 1)
    assert a["asr_after"]["mean"] == pytest.approx(5.0)
    assert a["asr_after"]["sd"] == pytest.approx(13 ** 0.5)  # sample sd: sqrt((9 + 1 + 16) / (3 - 1))
    assert (a["asr_after"]["min"], a["asr_after"]["max"]) == (2.0, 9.0)
    assert a["acc_after"]["mean"] == pytest.approx(87.0) and a["acc_after"]["sd"] == pytest.approx(1.0)
    assert a["acc_drop"]["mean"] == pytest.approx(3.0)
    assert a["passes"] is True  # mean ASR 5.0 <= 5 and mean drop 3.0 <= 3: the bar is inclusive
    assert b["passes"] is False and b["asr_after"]["sd"] is None  # drop 10 points; one seed has no spread
    assert c["passes"] is None and c["asr_after"]["mean"] is None
    md = render_summary([a, b, c], "study")
    assert "| sau | published | a | 3 | 0 | 5.0 ± 3.6 | 2.0–9.0 | 87.0 ± 1.0 | 86.0–88.0 | 90.0 | 3.0 | ✓ |" in md
    assert "| sau | published | b | 1 | 1 | 1.0 | 1.0–1.0 | 80.0 |" in md and "✗" in md
    assert "mean ASR after ≤ 5 %" in md and "ACC drop ≤ 3 points" in md


# --------------------------------------------------------------------------------------------------------
# The plan: cell ids, dry run, bad studies
# --------------------------------------------------------------------------------------------------------


def test_dry_run_lists_cells_and_ids_follow_the_settings(tmp_path, grid, capsys):
    root, study = grid
    out = root / "out"
    assert main(["sweep", _write(root / "s.json", study), "--out", str(out), "--dry-run"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[0] == f"sweep grid: 8 cells, 0 done, 8 to run -> {out}"
    assert sum("[to run]" in line for line in lines) == 8 and "bcu/small/m0/seed0" in lines[1]
    assert not out.exists()  # a dry run writes nothing

    ids = [c["cell"] for c in plan_cells(root / "s.json").cells]
    assert len(set(ids)) == 8 and ids == [c["cell"] for c in plan_cells(root / "s.json").cells]
    study["defenses"]["ibau"]["small"]["K"] = 2  # only the ibau cells change
    changed = [c["cell"] for c in plan_cells(_write(root / "s2.json", study)).cells]
    assert changed[:4] == ids[:4] and not set(changed[4:]) & set(ids)
    torch.save({"net": torch.load(root / "m1.pth")}, root / "m1.pth")  # the same weights, other bytes
    again = [c["cell"] for c in plan_cells(root / "s2.json").cells]
    assert [a == b for a, b in zip(again, changed)] == [True, True, False, False] * 2


@pytest.mark.parametrize("change,expected", [
    (lambda s: s["defenses"].update(nad={}), "defenses: unknown defense 'nad'; valid: sau, ibau"),
    (lambda s: s["defenses"]["bcu"]["small"].update(tau_x=3), "unknown hyper-parameter(s) ['tau_x']"),
    (lambda s: s["defenses"]["ibau"]["small"].update(lr=-1), "lr must be a positive number, got -1"),
    (lambda s: s["defenses"]["ibau"]["small"].update(seed=3), "defenses.ibau.small: seed: give seeds:"),
    (lambda s: s["defenses"]["ibau"].update(published={"lr": 0.1}), "the recipe 'published' is the published"),
    (lambda s: s["defenses"]["ibau"]["small"].update(batch_size=128), "clean_count 64 is fewer than one batch"),
    (lambda s: s["checkpoints"][1].update(path="/nonexistent/m.pth"), "checkpoints[1]: checkpoint file"),
    (lambda s: s["checkpoints"][0].pop("trigger"), "checkpoints[0]: checkpoint"),
    (lambda s: s["checkpoints"][0].update(target=10), "checkpoints[0]: target: expected a CIFAR-10 label"),
    (lambda s: s["checkpoints"][0].update(model="nomodule_xyz:build"), "checkpoints[0]: --model"),
    (lambda s: s["checkpoints"].append("resnet_cifar"), "checkpoints[2]: 'resnet_cifar' is not a shared"),
    (lambda s: s.update(seeds="three"), "seeds: expected a list of integers"),
    (lambda s: s.update(epochs=3), "unknown key(s) ['epochs']"),
    (lambda s: s.update(data="/nonexistent"), "CIFAR-10 python batches not found"),
])
def test_bad_study_fails_before_any_cell(tmp_path, grid, capsys, monkeypatch, change, expected):
    import fastpurify.sweep

    monkeypatch.setattr(fastpurify.sweep, "run_cells", lambda *a, **k: pytest.fail("a cell ran"))
    root, study = grid
    change(study)
    path = _write(root / "bad.json", study)
    assert main(["sweep", path, "--out", str(root / "out")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastpurify: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert path in err and expected in err, err
    assert not (root / "out").exists()


def test_unknown_setting_names_the_valid_ones(grid):
    root, study = grid
    study["defenses"]["bcu"]["small"]["tau_x"] = 3
    with pytest.raises(TypeError, match=r"unknown hyper-parameter\(s\) \['tau_x'\].*batch_size"):
        plan_cells(_write(root / "bad.json", study))


# --------------------------------------------------------------------------------------------------------
# Running: a failed cell, the outputs, the rerun (in this process: --workers 0)
# --------------------------------------------------------------------------------------------------------


def test_failed_cell_is_a_row_and_the_others_go_on(grid, capsys, one_thread):
    root, study = grid
    study.update(seeds=[0], checkpoints=study["checkpoints"][:1])
    study["defenses"]["bcu"]["rushed"] = {"batch_size": 32, "time_budget": 1e-9}  # too short for one step
    out = root / "out"
    argv = ["sweep", _write(root / "s.json", study), "--out", str(out), "--workers", "0"]
    assert main(argv) == 1
    captured = capsys.readouterr()
    assert "[3/3]" in captured.out and "FAILED TimeBudgetError" in captured.out
    assert "1 of 3 cells failed" in captured.err and "bcu/rushed/m0/seed0" in captured.err
    rows = list(_rows(out).values())
    assert [(r["recipe"], r["status"]) for r in rows] == [("small", "completed"), ("rushed", "failed"),
                                                           ("small", "completed")]
    assert "too short" in rows[1]["error"] and rows[1]["acc_after"] is None
    assert all(0 <= rows[0][k] <= 100 for k in METRICS[:6]) and rows[0]["rounds"] == 1
    csv_lines = (out / "results.csv").read_text().splitlines()
    assert csv_lines[0].startswith("study,cell,defense,recipe,checkpoint,arch,seed,status,acc_before")
    assert len(csv_lines) == 4 and ",failed," in csv_lines[2] and "TimeBudgetError" in csv_lines[2]
    assert "| bcu | rushed | m0 | 0 | 1 |" in (out / "summary.md").read_text()

    mtimes = {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")}
    assert main(argv) == 1  # a rerun: every cell has a row (the failed one too), nothing runs
    assert "0 to run" in capsys.readouterr().out
    assert {p.name: p.stat().st_mtime_ns for p in (out / "cells").glob("*.json")} == mtimes
    assert main([*argv, "--retry-failed"]) == 1  # runs the failed cell again, and only it
    assert "(2 already done, 1 to run)" in capsys.readouterr().out


def test_worker_plan_cpu_and_gpu_pinning(monkeypatch):
    """Workers per device: one per GPU pinned with CUDA_VISIBLE_DEVICES (round robin when more are asked), on a
    CPU one per threads_per_worker cores (default all cores in one); 0 workers: none (in this process)."""
    from fastpurify.sweep import worker_plan

    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: set(range(8)), raising=False)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    plan = lambda *a: [(w["threads"], w["env"]) for w in worker_plan(*a)]  # noqa: E731
    assert plan("auto", None, None) == [(8, {"OMP_NUM_THREADS": "8", "MKL_NUM_THREADS": "8"})]
    assert [t for t, _ in plan("auto", None, 2)] == [2, 2, 2, 2]
    assert [t for t, _ in plan("cpu", 3, None)] == [2, 2, 2]
    assert plan("auto", 0, None) == []
    with pytest.raises(ValueError, match="no CUDA device is visible"):
        worker_plan("cuda", None, None)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 2)
    monkeypatch.delenv("CUDA_VISIBLE_DEVICES", raising=False)
    assert plan("auto", None, None) == [(4, {"CUDA_VISIBLE_DEVICES": "0"}), (4, {"CUDA_VISIBLE_DEVICES": "1"})]
    monkeypatch.setenv("CUDA_VISIBLE_DEVICES", "3,5")
    assert [e["CUDA_VISIBLE_DEVICES"] for _, e in plan("cuda", 3, None)] == ["3", "5", "3"]
    assert [t for t, _ in plan("cpu", None, None)] == [8]  # device: cpu stays on the CPU


@pytest.mark.slow
def test_a_worker_that_dies_fails_its_cell_and_is_replaced(grid, capsys):
    """A worker process that ends mid-cell (here: the model factory exits the process) gives that cell a failed
    row, not written to cells/ (a rerun tries it again); a new worker takes the next cell."""
    root, study = grid
    (root / "dies.py").write_text("import os\n\n\ndef build():\n    os._exit(3)\n")
    for c in study["checkpoints"]:
        c["model"] = f"{root / 'dies.py'}:build"
    study.update(seeds=[0], defenses={"bcu": study["defenses"]["bcu"]})
    out = root / "out"
    assert main(["sweep", _write(root / "s.json", study), "--out", str(out), "--workers", "1"]) == 1
    captured = capsys.readouterr()
    assert captured.out.count("FAILED the worker process ended (exit code 3) during this cell") == 2, captured.out
    assert [r["status"] for r in _rows(out).values()] == ["failed", "failed"]
    assert not list((out / "cells").glob("*.json"))


# --------------------------------------------------------------------------------------------------------
# Two workers, Ctrl-C midway, resume: the same table as an uninterrupted run
# --------------------------------------------------------------------------------------------------------


@pytest.mark.slow
def test_two_workers_ctrl_c_and_resume_give_the_uninterrupted_table(grid, one_thread, capsys):
    """Ctrl-C at the terminal (SIGINT to the whole process group) once a cell has finished: the parent stops its
    workers and exits 130, keeping the finished rows; the same command then runs only the rest, and every row
    equals what an uninterrupted run of the cell gives (the same seeds, one thread each)."""
    from fastpurify.sweep_worker import run_cell

    root, study = grid
    path = _write(root / "s.json", study)
    out = root / "out"
    cmd = [sys.executable, "-m", "fastpurify", "sweep", path, "--out", str(out), "--workers", "2"]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    try:
        while proc.poll() is None and not list((out / "cells").glob("*.json")):
            time.sleep(0.02)
        os.killpg(proc.pid, signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=120)
    finally:
        proc.kill()
    assert proc.returncode == 130, (stdout, stderr)
    deadline = time.monotonic() + 10
    while _group_alive(proc.pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not _group_alive(proc.pid), "a worker outlived the interrupted sweep"
    assert "fastpurify: interrupted:" in stderr and "run the same command again" in stderr, stderr
    kept = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in (out / "cells").glob("*.json")}
    assert 1 <= len(kept) < 8, "the sweep was not stopped midway"

    assert main(cmd[3:]) == 0  # the same command again (here: its workers are spawned all the same)
    resumed = capsys.readouterr().out
    assert f"({len(kept)} already done, {8 - len(kept)} to run) on 2 worker(s) x 1 thread(s)" in resumed
    assert sum(line.startswith("[") for line in resumed.splitlines()) == 8 - len(kept)
    for p, (mtime, data) in kept.items():  # finished before the interruption: not recomputed
        assert p.stat().st_mtime_ns == mtime and p.read_bytes() == data
    assert not list((out / "cells").glob(".*.tmp"))
    rows = _rows(out)
    assert len(rows) == 8 and all(r["status"] == "completed" for r in rows.values())
    new = [r for r in rows.values() if out / "cells" / f"{r['cell']}.json" not in kept]
    assert len({r["worker"] for r in new}) == 2 and os.getpid() not in {r["worker"] for r in new}

    for cell in plan_cells(path).cells:  # the uninterrupted run, cell by cell, here on one thread
        ref, got = run_cell(cell), rows[cell["cell"]]
        assert ref["status"] == got["status"] and ref["rounds"] == got["rounds"]
        for k in METRICS:
            assert got[k] == pytest.approx(ref[k], abs=1e-6), (cell["cell"], k)
    table = (out / "results.csv").read_text().splitlines()
    assert len(table) == 9 and (out / "summary.md").read_text().count("| 2 | 0 |") == 4


# --------------------------------------------------------------------------------------------------------
# --plot, and BackdoorBench records as checkpoints
# --------------------------------------------------------------------------------------------------------


def test_plot_draws_the_sweep(grid, capsys, one_thread):
    pytest.importorskip("matplotlib")
    pytest.importorskip("fastpurify.plot")
    root, study = grid
    study.update(seeds=[0], checkpoints=study["checkpoints"][:1], defenses={"bcu": study["defenses"]["bcu"]})
    out = root / "out"
    assert main(["sweep", _write(root / "s.json", study), "--out", str(out), "--workers", "0", "--plot"]) == 0
    assert f"plot: {out / 'sweep.png'}" in capsys.readouterr().out
    assert (out / "sweep.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_backdoorbench_record_as_a_checkpoint(tmp_path, capsys, one_thread):
    """``record: PATH`` runs the cell on the record's model, clean images and triggered test images."""
    pytest.importorskip("fastpurify.backdoorbench")
    pytest.importorskip("PIL.Image")
    from _tiny import tiny_cnn
    from test_backdoorbench import _write_cifar, _write_record

    from fastpurify.triggers import AddTrigger

    g = torch.Generator().manual_seed(0)
    train = (torch.randint(0, 256, (64, 3, 32, 32), generator=g).float() / 255, torch.arange(64) % 10)
    test = (torch.randint(0, 256, (30, 3, 32, 32), generator=g).float() / 255, torch.arange(30) % 10)
    _write_cifar(tmp_path / "data" / "cifar10" / "cifar-10-batches-py", train, test)
    trigger = AddTrigger(torch.full((3, 32, 32), 0.1))
    folder = _write_record(tmp_path, "additive", "tiny_cnn", tiny_cnn(seed=0).state_dict(), trigger, test)
    entry = {"name": "bb", "record": str(folder), "model": TINY}
    study = {"data": str(tmp_path / "data"), "clean_count": 64, "eval_count": 30, "settings": {"epochs": 1},
             "defenses": {"bcu": {"small": {"batch_size": 32, "augment": False}}}, "checkpoints": [entry]}
    assert main(["sweep", _write(tmp_path / "s.json", study), "--out", str(tmp_path / "out"), "--workers", "0"]) == 0
    (row,) = _rows(tmp_path / "out").values()
    assert row["status"] == "completed" and row["checkpoint"] == "bb" and row["rounds"] == 1
    assert all(0 <= row[k] <= 100 for k in METRICS[:6])
    entry["target"] = 0  # a record carries its own target
    assert main(["sweep", _write(tmp_path / "bad.json", study), "--out", str(tmp_path / "out2")]) == 2
    assert "checkpoints[0]: target: a record carries its own model, trigger and target" in capsys.readouterr().err
