"""``torch.compile`` of the eager reference as a benchmark provider (fastpurify/bench_compile.py): provider names,
one defense and one op compiled on a tiny workload (compile time and a correctness check reported), and a defense
that cannot compile (I-BAU's double backward) reported in its row instead of raised.

Compiling is slow on 2 CPU cores (inductor runs a C++ compiler): the two compiling defense tests are marked slow
(about 15-60 s each, measured under load), the op test compiles one elementwise graph (a few seconds)."""

import importlib.util
import math
from pathlib import Path

import pytest
import torch

from fastpurify.bench import render_markdown, run_comparison, synthetic_workload
from fastpurify.bench_compile import best_provider, compile_mode, first_line, parse_providers
from fastpurify.cli import main

ROOT = Path(__file__).resolve().parents[1]


def _compiled_ops():
    spec = importlib.util.spec_from_file_location("compiled_ops", ROOT / "benchmarks" / "_compiled.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(one_thread):
    return synthetic_workload("small_vgg", n_train=64, train_epochs=1, n_clean=32, n_eval=32, seed=0)


def test_parse_providers():
    assert parse_providers("reference,fast,compile") == ["reference", "fast", "compile"]
    assert parse_providers(["reference", "compile-max", "compile:max-autotune"]) == [
        "reference", "compile-max", "compile:max-autotune"]
    assert compile_mode("compile", "cuda") == "reduce-overhead" and compile_mode("fast") is None
    with pytest.raises(ValueError, match="unknown provider 'jit'.*compile:MODE"):
        parse_providers("reference,jit")
    with pytest.raises(ValueError, match="unknown provider 'compile:fastest'"):
        parse_providers("reference,compile:fastest")
    with pytest.raises(ValueError, match="include 'reference'"):
        parse_providers("fast,compile")
    assert first_line(RuntimeError("\nfirst\nsecond")) == "RuntimeError: first"


def test_cli_providers_checked_before_work(capsys):
    assert main(["bench", "--providers", "reference,jit", "--defenses", "sau"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastpurify: error: --providers: unknown provider 'jit'") and "backdooring" not in err


def test_best_provider_marks_a_faster_compile():
    row = {"reference": {"defense_s": 4.0}, "fast": {"defense_s": 2.0},
           "compiled": {"compile": {"status": "ok", "defense_s": 1.0, "compile_s": 30.0, "speedup": 4.0,
                                    "matches_reference": True, "after": {"acc": 80.0, "asr": 5.0, "ra": 1.0}},
                        "compile-max": {"status": "error", "error": "RuntimeError: boom"}},
           "defense": "sau", "settings": {}, "speedup": 2.0, "device": "cpu"}
    for rec in ("reference", "fast"):
        row[rec].update(eval_s=1.0, cold_start_s=0.0, warmup_s=1.0, before={"acc": 1.0, "asr": 1.0, "ra": 1.0},
                        after={"acc": 1.0, "asr": 1.0, "ra": 1.0})
    assert best_provider(row) == "compile"
    table = render_markdown([row])
    assert "★ beats fast" in table and "failed: RuntimeError: boom" in table and "| compile |" in table
    row["compiled"]["compile"]["matches_reference"] = False  # a wrong compile is never "best", and is flagged
    assert best_provider(row) == "fast" and "✗" in render_markdown([row])


@pytest.mark.slow
def test_compiled_defense_reports_compile_time_and_agreement(tiny):
    rows = run_comparison(["awm"], tiny, settings={"awm": {"inner": 1}}, seed=0, warmup=False,
                          providers=["reference", "compile"])
    (row,) = rows
    assert row["fast"] is None and row["providers"] == ["reference", "compile"]
    rec = row["compiled"]["compile"]
    assert rec["status"] == "ok", rec["error"]
    assert rec["mode"] == "default" and rec["run_status"] == "completed" and rec["rounds"] == 1
    for key in ("compile_s", "first_call_s", "defense_s", "eval_s"):
        assert math.isfinite(rec[key]) and rec[key] >= 0, (key, rec[key])
    assert rec["graphs"] >= 1  # something was compiled
    assert rec["matches_reference"] is True  # AWM's masks: the compiled model purifies as the eager one
    assert row["best"] in ("reference", "compile")
    assert "compile s (default)" in render_markdown(rows)


@pytest.mark.slow
def test_uncompilable_defense_is_reported_not_raised(tiny):
    rows = run_comparison(["ibau"], tiny, seed=0, warmup=False, providers=["reference", "compile"])
    rec = rows[0]["compiled"]["compile"]
    assert rec["status"] == "error" and "double backward" in rec["error"]
    assert rec["error"].startswith("RuntimeError: ") and "\n" not in rec["error"]
    assert rows[0]["best"] == "reference"
    assert "failed: RuntimeError: torch.compile with aot_autograd does not currently support double backward" in \
        render_markdown(rows)


def test_compiled_op_matches_eager_and_times_compile(one_thread):
    ops = _compiled_ops()
    g = torch.Generator().manual_seed(0)
    delta, grad, x = torch.zeros(4, 3, 8, 8), torch.randn(4, 3, 8, 8, generator=g), torch.rand(4, 3, 8, 8,
                                                                                                 generator=g)
    from fastpurify.reference import pgd_update_ref

    def fn(d, gr, xx):
        return pgd_update_ref(d, gr, step=2 / 255, eps=8 / 255, x=xx)

    run, info = ops.compile_op(fn, "default", (delta, grad, x))
    assert info["status"] == "ok" and info["compile_s"] >= 0 and info["max_abs_err"] <= 1e-6
    out = run()
    torch.testing.assert_close(out, fn(delta, grad, x))
    bad, info = ops.compile_op(fn, "no-such-mode", (delta, grad, x))  # a compile failure: reported, not raised
    assert bad is None and info["status"] == "error" and "no-such-mode" in info["error"]
