"""fastpurify.bench and ``fastpurify bench``: reference against fast path on one workload, its rows, its table,
and the command line's output and errors (a tiny synthetic workload: a few seconds per test)."""

import json
import math

import pytest
import torch

import fastpurify.defenses as fast_defenses
from fastpurify.bench import (
    BENCH_SETTINGS,
    check_defenses,
    real_workload,
    render_markdown,
    resolve_checkpoint,
    resolve_settings,
    run_comparison,
    synthetic_workload,
)
from fastpurify.cli import main
from fastpurify.data import default_data_dir

TINY = ["--n-train", "64", "--train-epochs", "1", "--n-clean", "32", "--n-eval", "32"]
PATH_KEYS = {"defense_s", "defense_s_runs", "eval_s", "cold_start_s", "warmup_s", "wall_s", "status", "rounds",
             "images_per_s", "phases", "before", "after", "der"}
ROW_KEYS = {"defense", "settings", "fast_settings", "seed", "clean_count", "eval_count", "has_fast_path", "fast_path",
            "reference", "fast", "speedup", "agree", "workload", "device"}
DATA = default_data_dir()
HAS_REAL = (DATA / "ibau" / "badnets_8_02_ckpt.pth").is_file() and (DATA / "cifar10" / "cifar-10-batches-py").is_dir()


@pytest.fixture(scope="module")
def tiny(one_thread):
    return synthetic_workload("small_vgg", n_train=64, train_epochs=1, n_clean=32, n_eval=32, seed=0)


def _positive_finite(v):
    return isinstance(v, float) and math.isfinite(v) and v > 0


def test_run_comparison_rows(tiny):
    messages = []
    rows = run_comparison(["ibau", "awm"], tiny, settings={"awm": {"inner": 1}}, seed=3, progress=messages.append)
    assert [r["defense"] for r in rows] == ["ibau", "awm"]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["has_fast_path"] and r["fast_path"] == "fast path" and r["seed"] == 3
        assert r["clean_count"] == 32 and r["eval_count"] == 32 and r["device"] == "cpu"
        assert r["settings"]["batch_size"] == 32  # capped at the clean set's size (defaults 100 and 128)
        ref, fast = r["reference"], r["fast"]
        for rec in (ref, fast):
            assert set(rec) == PATH_KEYS
            for key in ("defense_s", "eval_s", "warmup_s", "wall_s"):
                assert _positive_finite(rec[key]), (key, rec[key])
            assert math.isfinite(rec["cold_start_s"]) and rec["cold_start_s"] >= 0
            assert rec["wall_s"] >= rec["defense_s"] + rec["cold_start_s"] - 1e-6
            assert rec["defense_s_runs"] == [rec["defense_s"]] and rec["rounds"] == 1
            assert rec["status"] == "completed"
            assert {k: v is not None for k, v in rec["after"].items()} == {"acc": True, "asr": True, "ra": True}
        assert ref["before"] == fast["before"]  # same input model, same evaluation data: the reference left it alone
        assert r["speedup"] == pytest.approx(ref["defense_s"] / fast["defense_s"])
        assert isinstance(r["agree"], bool)
    assert r["settings"]["inner"] == 1 and r["settings"]["epochs"] == BENCH_SETTINGS["awm"]["epochs"]
    assert any(m.startswith("ibau reference") for m in messages) and any(m.startswith("awm fast") for m in messages)


def test_no_fast_path_and_repeats(tiny, monkeypatch):
    monkeypatch.setitem(fast_defenses.FAST_PATHS, "bcu", False)
    rows = run_comparison(["bcu"], tiny, settings={"bcu": {"epochs": 1}}, repeats=3, warmup=False)
    r = rows[0]
    assert r["fast"] is None and r["speedup"] is None and r["agree"] is None
    assert r["has_fast_path"] is False and r["fast_path"] == "no fast path"
    ref = r["reference"]
    assert len(ref["defense_s_runs"]) == 3 and ref["warmup_s"] is None
    assert ref["defense_s"] == sorted(ref["defense_s_runs"])[1]  # the median of the timed calls
    table = render_markdown(rows)
    assert "| bcu | epochs=1, batch_size=32 |" in table and table.count("no fast path") == 2


def test_settings():
    class W:  # what resolve_settings reads of a workload
        clean = (torch.zeros(40, 3, 32, 32), torch.zeros(40))
        target = 7

    assert resolve_settings("baerase", W)["target"] == 7  # BAERASE is told the workload's target
    assert resolve_settings("baerase", W, {"target": None})["target"] is None  # ...unless asked to detect it
    assert resolve_settings("sau", W, {"epochs": 3, "batch_size": 16}) == {"epochs": 3, "batch_size": 16}
    assert resolve_settings("bcu", W)["batch_size"] == 40
    with pytest.raises(ValueError, match=r"sau: unknown setting\(s\) \['bogus'\]; valid: epochs"):
        resolve_settings("sau", W, {"bogus": 1})
    with pytest.raises(ValueError, match="unknown defense 'nope'"):
        check_defenses(["sau", "nope"])
    assert check_defenses(["SAU", "sau", "bcu"]) == ["sau", "bcu"]
    with pytest.raises(ValueError, match="--trigger SPEC and --target T"):
        resolve_checkpoint("my.pth", "/data")
    path, spec, target = resolve_checkpoint("trojan_wm", "/data")
    assert str(path) == "/data/ibau/trojan_wm_2_02_ckpt.pth" and spec == "add:/data/ibau/trojan_wm.png" and target == 2


def _row(defense, ref_s, fast_s):
    def rec(s, after_asr):
        return {"defense_s": s, "eval_s": 0.5, "cold_start_s": 0.012, "warmup_s": 1.25,
                "before": {"acc": 90.0, "asr": 99.5, "ra": 0.25}, "after": {"acc": 88.0, "asr": after_asr, "ra": 70.0}}

    fast = rec(fast_s, 2.0) if fast_s else None
    return {"defense": defense, "settings": {"epochs": 1}, "fast_settings": {}, "reference": rec(ref_s, 1.5),
            "fast": fast, "speedup": ref_s / fast_s if fast_s else None}


def test_render_markdown():
    text = render_markdown([_row("ibau", 12.0, 4.0), _row("baerase", 30.0, None)], title="## t")
    lines = text.splitlines()
    assert lines[0] == "## t"
    header = [c.strip() for c in lines[2].strip("|").split("|")]
    assert header == ["defense", "settings", "ref s", "fast s", "speedup", "eval s ref / fast",
                      "cold start s ref / fast", "warm-up s ref / fast", "ACC before → after ref / fast",
                      "ASR before → after ref / fast", "RA before → after ref / fast"]
    ibau = [c.strip() for c in lines[4].strip("|").split("|")]
    assert ibau == ["ibau", "epochs=1", "12.0", "4.00", "3.00×", "0.50 / 0.50", "0.01 / 0.01", "1.25 / 1.25",
                    "90.00 → 88.00 / 88.00", "99.50 → 1.50 / 2.00", "0.25 → 70.00 / 70.00"]
    baerase = [c.strip() for c in lines[5].strip("|").split("|")]
    assert baerase[2:5] == ["30.0", "no fast path", "no fast path"] and baerase[8] == "90.00 → 88.00 / —"
    assert "speedup = ref s / fast s" in text


def test_cli_bench_json(capsys, one_thread):
    assert main(["bench", "--defenses", "ibau", "--epochs", "1", "--json", "--no-warmup", *TINY]) == 0
    out = json.loads(capsys.readouterr().out)
    assert set(out) == {"workload", "environment", "rows"}
    env = out["environment"]
    assert env["torch"] == torch.__version__ and env["threads"] == 1 and env["device_type"] == "cpu"
    assert {"device", "command", "commit", "dtype"} <= set(env)
    assert out["workload"]["clean_count"] == 32 and out["workload"]["eval_count"] == 32
    (row,) = out["rows"]
    assert set(row) == ROW_KEYS and row["defense"] == "ibau" and row["settings"]["epochs"] == 1
    assert row["speedup"] == pytest.approx(row["reference"]["defense_s"] / row["fast"]["defense_s"])


def test_cli_bench_table(capsys, one_thread):
    assert main(["bench", "--defenses", "bcu", "--epochs", "1", "--batch-size", "16", *TINY]) == 0
    out = capsys.readouterr().out
    assert "| defense | settings | ref s | fast s | speedup |" in out
    assert "| bcu | epochs=1, batch_size=16 |" in out and "threads" in out


@pytest.mark.parametrize("argv,needle", [
    (["--defenses", "sau", "nope"], "unknown defense 'nope'"),
    (["--defenses", "sau,nope"], "unknown defense 'nope'"),
    (["--arch", "vgg99"], "unknown architecture 'vgg99'"),
    (["--checkpoint", "model.pth"], "--checkpoint model.pth needs --data DIR"),
    (["--checkpoint", "badnets"], "--checkpoint badnets needs --data DIR"),
    (["--checkpoint", "model.pth", "--data", "d"], "--trigger SPEC, --target T"),
    (["--trigger", "patch:size=3", "--target", "1"], "--trigger, --target: only with --checkpoint"),
    (["--epochs", "0"], "--epochs must be >= 1"),
    (["--set", "epochs=2"], "expected DEFENSE.KEY=VALUE"),
    (["--defenses", "ibau", "--set", "ibau.bogus=2"], "ibau: unknown setting(s) ['bogus']"),
    (["--checkpoint", "badnets", "--data", "d", "--n-train", "10"], "--n-train / --train-epochs"),
])
def test_cli_bench_bad_input(capsys, argv, needle):
    assert main(["bench", *argv]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    err = captured.err
    assert err.startswith("fastpurify: error: ") and err.count("\n") == 1 and "Traceback" not in err
    assert needle in err


@pytest.mark.skipif(not HAS_REAL, reason=f"real data not found under {DATA} (set FASTPURIFY_DATA)")
def test_real_workload_shared_checkpoint():
    path, spec, target = resolve_checkpoint("badnets", DATA)
    wl = real_workload(path, DATA, trigger=spec, target=target, n_clean=20, n_eval=50)
    assert wl.clean[0].shape == (20, 3, 32, 32) and wl.eval_x.shape[0] == 50 and wl.target == 8
    m1, m2 = wl.model_factory(), wl.model_factory()
    assert m1 is not m2 and not m1.training
    assert wl.describe()["trigger_spec"] == "patch:size=4,row=27,col=27,value=1"


# --------------------------------------------------------------------------------------------------------
# Issue 13, item 16: results record no absolute path of the machine they ran on, and the benchmark tables name
# the commits their rows come from.
# --------------------------------------------------------------------------------------------------------

ROOT = __import__("pathlib").Path(__file__).resolve().parents[1]
# An absolute path of a machine: a home, a work or temporary folder, a user's folder.
MACHINE_PATH = r"(?<![\w.])/(?:work|root|home|tmp|Users|mnt|data|scratch)/"


def test_portable_paths():
    from fastpurify.bench import REPO, portable_path, portable_text

    assert portable_path(REPO / "benchmarks" / "results" / "x") == "benchmarks/results/x"
    assert portable_path(REPO.parent / "shared" / "data" / "ibau" / "a.pth") == "../shared/data/ibau/a.pth"
    assert portable_path("relative/as/given") == "relative/as/given"
    far = "/nowhere-near/the/repository/ckpt.pth"  # neither inside the repository nor in a folder beside it
    assert portable_path(far) == ".../repository/ckpt.pth"
    text = (f"end_to_end.py --data {REPO.parent}/shared/data --out={REPO}/benchmarks/results/cpu "
            f"--trigger add:{REPO.parent}/shared/data/ibau/t.png, see https://example.org/a/b.")
    assert portable_text(text) == ("end_to_end.py --data ../shared/data --out=benchmarks/results/cpu --trigger "
                                   "add:../shared/data/ibau/t.png, see https://example.org/a/b.")


def test_real_workload_and_environment_record_no_absolute_path(tmp_path, monkeypatch):
    """The workload's description and the command line recorded in a result used to carry /work/... paths."""
    import pickle
    import re
    import sys

    import numpy as np

    from fastpurify.bench import environment
    from fastpurify.models import SmallVGG

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for name in ("data_batch_1", "test_batch"):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": list(range(10)) * 2}, f)
    ckpt = tmp_path / "ckpt.pth"
    torch.save(SmallVGG().state_dict(), ckpt)
    np.save(tmp_path / "pattern.npy", np.zeros((3, 32, 32), dtype=np.float32))
    np.save(tmp_path / "mask.npy", np.zeros((32, 32), dtype=np.float32))
    spec = f"masked:pattern={tmp_path / 'pattern.npy'},mask={tmp_path / 'mask.npy'}"
    wl = real_workload(ckpt, tmp_path, trigger=spec, target=1, n_clean=10, n_eval=10)
    monkeypatch.setattr(sys, "argv", ["end_to_end.py", "--data", str(tmp_path), f"--out={tmp_path}/res"])
    recorded = json.dumps({"workload": wl.describe(), "environment": environment("cpu")})
    assert str(tmp_path) not in recorded and not re.search(MACHINE_PATH, recorded), recorded
    assert "ckpt.pth" in wl.describe()["checkpoint"] and "pattern.npy" in wl.describe()["trigger_spec"]


def test_committed_results_carry_no_absolute_paths():
    import re

    bad = [f"{f.relative_to(ROOT)}: {m.group(0)}..." for f in sorted((ROOT / "benchmarks" / "results").rglob("*"))
           if f.suffix in (".json", ".md") for m in [re.search(MACHINE_PATH + r"\S{0,40}", f.read_text())] if m]
    assert not bad, bad


def test_summary_names_the_commit_of_every_result_file(tmp_path):
    import importlib.util

    spec = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)

    def result(commit):
        extra = {"provider": "torch", "device": "cpu-x", "torch": "2.13", "threads": 2, "commit": commit}
        return {"benchmarks": [{"name": "b", "group": "g", "stats": {"median": 1.0, "min": 1.0}, "extra_info": extra}]}

    (tmp_path / "pgd.json").write_text(json.dumps(result("aaaaaaa")))
    (tmp_path / "cg.json").write_text(json.dumps(result("aaaaaaa")))
    (tmp_path / "defenses.json").write_text(json.dumps(result("bbbbbbb")))
    header = summarize.summarize_device(tmp_path).splitlines()[2]
    assert "commit aaaaaaa (cg, pgd), bbbbbbb (defenses)" in header and "2 CPU threads" in header
    (tmp_path / "defenses.json").unlink()
    assert summarize.summarize_device(tmp_path).splitlines()[2].endswith("commit aaaaaaa")
