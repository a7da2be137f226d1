"""``torch.compile`` of the eager reference as a benchmark provider (fastpurify/bench_compile.py): provider names,
one defense and one op compiled on a tiny workload (compile time and a correctness check reported), and a defense
that cannot compile (I-BAU's double backward) reported in its row instead of raised.

Compiling is slow on 2 CPU cores (inductor runs a C++ compiler): the two compiling defense tests are marked slow,
the op test compiles one elementwise graph (about 19 s under a load of 5 on 2 cores, most of it inductor's first
import and C++ compile)."""

import copy
import importlib.util
import math
from pathlib import Path

import pytest
import torch
from _tiny import tiny_cnn

from fastpurify.bench import Workload, render_markdown, run_comparison
from fastpurify.bench_compile import best_provider, compile_mode, first_line, parse_providers
from fastpurify.cli import main
from fastpurify.data import synthetic_dataset
from fastpurify.triggers import PatchTrigger

ROOT = Path(__file__).resolve().parents[1]


def _compiled_ops():
    spec = importlib.util.spec_from_file_location("compiled_ops", ROOT / "benchmarks" / "_compiled.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture(scope="module")
def tiny(one_thread):
    """tests/_tiny.py's three-block CNN (untrained: compiling it is what is tested), 32 clean and 64 evaluation
    images: compiling SmallVGG instead took 4-8 minutes per test on 2 shared cores."""
    net = tiny_cnn(seed=0).eval()
    x, y = synthetic_dataset(n=32, seed=1)
    xt, yt = synthetic_dataset(n=64, seed=2, split="test")
    return Workload(name="tiny", arch="tiny_cnn", model_factory=lambda: copy.deepcopy(net), clean=(x, y), eval_x=xt,
                    eval_y=yt, trigger=PatchTrigger(size=4, row=27, col=27, value=1.0), target=0)


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
    assert "compile (default) s (× ref; compile s)" in render_markdown(rows)


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


def test_summary_marks_a_compiled_reference_that_beats_the_kernels(tmp_path):
    import json

    spec = importlib.util.spec_from_file_location("summarize", ROOT / "benchmarks" / "summarize.py")
    summarize = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(summarize)

    def case(provider, median, **extra):
        return {"name": provider, "group": "pgd_update linf", "stats": {"median": median, "min": median},
                "extra_info": {"provider": provider, "device": "cpu-x", "threads": 2, "commit": "abc",
                               "loadavg_before": [2.5, 2, 2], "loadavg_after": [3.5, 2, 2], **extra}}

    comp = {"compile_s": 12.34, "matches_eager": True}
    runs = [case("torch", 4.0), case("cpp", 2.0), case("compile-default", 1.0, compile=comp),
            case("compile-max-autotune-no-cudagraphs", 3.0, compile={**comp, "matches_eager": False})]
    (tmp_path / "pgd_compile.json").write_text(json.dumps({"benchmarks": runs}))
    text = summarize.summarize_device(tmp_path)
    assert "| pgd_update linf (compile run) | compile-default ★ | 1.00 s | 1.00 s | 4.00x | 2.00x | - | 12.3 |" in text
    assert "| cpp | 2.00 s | 2.00 s | 2.00x | 0.50x |" in text  # the kernel, half as fast as the compiled reference
    assert "compile-max-autotune-no-cudagraphs ✗ differs from eager" in text
    assert "pgd_compile 2.5–3.5" in text


def test_end_to_end_keeps_compiled_rows_beside_the_others():
    spec = importlib.util.spec_from_file_location("end_to_end", ROOT / "benchmarks" / "end_to_end.py")
    e2e = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(e2e)

    def row(compiled):
        rec = {"defense_s": 2.0, "eval_s": 1.0, "cold_start_s": 0.0, "warmup_s": 1.0,
               "before": {"acc": 80.0, "asr": 90.0, "ra": 1.0}, "after": {"acc": 79.0, "asr": 5.0, "ra": 60.0}}
        r = {"defense": "bcu", "checkpoint": "badnets", "settings": {"epochs": 1}, "fast_settings": {},
             "reference": rec, "fast": dict(rec, defense_s=1.0), "speedup": 2.0, "device": "cpu",
             "workload_info": {"clean_count": 500, "eval_count": 2000},
             "environment": {"commit": "abc", "threads": 2, "command": "end_to_end.py", "device": "cpu",
                             "torch": "2.13", "loadavg_before": [3.0, 2.0, 1.0], "loadavg_after": [4.0, 2.5, 1.5]}}
        if compiled:
            r["providers"] = ["reference", "fast", "compile"]
            r["compiled"] = {"compile": {"status": "error", "error": "RuntimeError: no double backward"}}
        return r

    plain, comp = row(False), row(True)
    assert e2e.row_key(plain) != e2e.row_key(comp) and e2e.row_key(comp)[-1] == "compile"
    text = e2e.render_tables([plain, comp], plain["environment"])
    assert "### badnets: with the compiled reference (torch.compile)" in text
    assert "failed: RuntimeError: no double backward" in text and "bcu (load 3.0/2.0/1.0 → 4.0/2.5/1.5)" in text
    assert text.count("| bcu | epochs=1 |") == 2 and "compile: the reference defense given" in text
