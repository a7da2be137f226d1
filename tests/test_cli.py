"""The command line: info, evaluate (the real checkpoints' published numbers), demo, and clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from fastpurify._progress import PROGRESS_LINE
from fastpurify.cli import main
from fastpurify.data import default_data_dir

DATA = default_data_dir()
IBAU = DATA / "ibau"
HAS_REAL = (IBAU / "badnets_8_02_ckpt.pth").is_file() and (DATA / "cifar10" / "cifar-10-batches-py").is_dir()
needs_real = pytest.mark.skipif(not HAS_REAL, reason=f"real data not found under {DATA} (set FASTPURIFY_DATA)")


def _cli(*args, env_extra=None, timeout=600):
    env = dict(os.environ, **(env_extra or {}))
    return subprocess.run([sys.executable, "-m", "fastpurify", *args], capture_output=True, text=True, env=env,
                          timeout=timeout)


def test_info_json_lists_every_backend_with_reasons():
    res = _cli("info", "--json")
    assert res.returncode == 0, res.stderr
    data = json.loads(res.stdout)
    assert data["torch"] == torch.__version__
    assert data["extension"]["built"] is True and data["extension"]["with_cuda"] is False
    cpu = data["ops"]["pgd_update"]["cpu"]
    assert set(cpu) == {"cuda", "triton", "cpp", "torch"}
    assert cpu["cpp"]["available"] and cpu["torch"]["available"]
    assert not cpu["cuda"]["available"] and "CUDA" in cpu["cuda"]["reason"]
    assert data["ops"]["pgd_update"]["cpu_auto"] == "cpp"
    if not torch.cuda.is_available():
        assert data["gpu"] is None


def test_info_human_readable(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "op pgd_update" in out and "cpp     yes" in out and "extension fastpurify._C: built" in out


@needs_real
@pytest.mark.parametrize("ckpt,trigger,target,acc,asr", [
    ("badnets_8_02_ckpt.pth", "patch:size=4,row=27,col=27,value=1", 8, 84.46, 97.74),
    ("trojan_wm_2_02_ckpt.pth", f"add:{IBAU / 'trojan_wm.png'}", 2, 85.02, 99.90),
])
def test_evaluate_reproduces_published_numbers(ckpt, trigger, target, acc, asr):
    res = _cli("evaluate", "--arch", "small_vgg", "--checkpoint", str(IBAU / ckpt), "--data", str(DATA),
               "--trigger", trigger, "--target", str(target), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout)
    assert (round(out["acc"], 2), round(out["asr"], 2)) == (acc, asr)
    assert out["n_clean"] == 10000 and out["n_triggered"] == 9000
    assert 0 <= out["ra"] <= 100 - out["asr"] + 1e-9


@needs_real
def test_evaluate_human_output(capsys):
    assert main(["evaluate", "--checkpoint", str(IBAU / "badnets_8_02_ckpt.pth"), "--data", str(DATA), "--count",
                 "200", "--trigger", "patch:size=4,row=27,col=27,value=1", "--target", "8"]) == 0
    out = capsys.readouterr().out
    assert "ACC" in out and "ASR" in out and "RA" in out and "/200)" in out


def _err(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    # a run that started may have shown progress first (stderr is not a terminal here: plain lines)
    err = "".join(ln for ln in err.splitlines(keepends=True) if not PROGRESS_LINE.match(ln))
    assert err.startswith("fastpurify: error: ") and "Traceback" not in err
    return err


def test_bad_inputs_are_one_clear_line(capsys, tmp_path):
    ckpt = tmp_path / "vgg.pth"
    from fastpurify.models import SmallVGG

    torch.save({"net": SmallVGG().state_dict()}, ckpt)
    data = tmp_path / "nodata"
    data.mkdir()
    err = _err(capsys, ["evaluate", "--arch", "vgg99", "--checkpoint", str(ckpt), "--data", str(data)])
    assert "vgg99" in err and "small_vgg" in err
    err = _err(capsys, ["evaluate", "--arch", "preact_resnet18", "--checkpoint", str(ckpt), "--data", str(data)])
    assert "preact_resnet18" in err and "small_vgg" in err  # keys do not fit; says which arch would
    err = _err(capsys, ["evaluate", "--checkpoint", str(ckpt), "--data", str(data)])
    assert str(data) in err and "test_batch" in err
    err = _err(capsys, ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--trigger", "patch:size=four",
                        "--target", "1"])
    assert "patch:size=four" in err
    err = _err(capsys, ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--trigger", "sparkle:1",
                        "--target", "1"])
    assert "sparkle" in err
    err = _err(capsys, ["evaluate", "--checkpoint", str(tmp_path / "missing.pth"), "--data", str(data)])
    assert "missing.pth" in err
    err = _err(capsys, ["evaluate", "--checkpoint", str(ckpt), "--data", str(data), "--trigger", "patch:size=3"])
    assert "--target" in err


@needs_real
def test_target_outside_class_range(capsys):
    err = _err(capsys, ["evaluate", "--checkpoint", str(IBAU / "badnets_8_02_ckpt.pth"), "--data", str(DATA),
                        "--count", "50", "--trigger", "patch:size=4,row=27,col=27,value=1", "--target", "12"])
    assert "12" in err and "[0, 10)" in err


def test_masked_trigger_spec_through_cli(capsys, tmp_path):
    """A masked trigger with an .npy mask parses and evaluates (on a tiny synthetic CIFAR folder)."""
    from fastpurify.models import SmallVGG

    folder = tmp_path / "cifar-10-batches-py"
    folder.mkdir()
    rng = np.random.default_rng(0)
    import pickle

    batch = {"data": rng.integers(0, 256, (20, 3072), dtype=np.uint8), "labels": list(range(10)) * 2}
    with open(folder / "test_batch", "wb") as f:
        pickle.dump(batch, f)
    np.save(tmp_path / "mask.npy", np.zeros((32, 32), dtype=np.float32))
    np.save(tmp_path / "pattern.npy", np.ones((3, 32, 32), dtype=np.float32))
    ckpt = tmp_path / "m.pth"
    torch.save(SmallVGG().state_dict(), ckpt)
    assert main(["evaluate", "--checkpoint", str(ckpt), "--data", str(tmp_path), "--json", "--trigger",
                 f"masked:pattern={tmp_path / 'pattern.npy'},mask={tmp_path / 'mask.npy'}", "--target", "3"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["n_clean"] == 20 and out["n_triggered"] == 18


def test_demo_trains_only_with_defenses_none():
    res = _cli("demo", "--epochs", "1", "--defenses", "none", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["epochs"] == 1 and out["n_clean"] == 2000 and 0 <= out["acc"] <= 100 and out["asr"] is not None


@needs_real
def test_purify_real_checkpoint_json_and_saved_model(tmp_path):
    out_file = tmp_path / "purified.pth"
    res = _cli("purify", "ibau", "--reference", "--checkpoint", str(IBAU / "badnets_8_02_ckpt.pth"), "--data",
               str(DATA), "--clean-count", "200", "--eval-count", "300", "--epochs", "1", "--set", "batch_size=100",
               "--trigger", "patch:size=4,row=27,col=27,value=1", "--target", "8", "--out", str(out_file), "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["defense"] == "ibau" and out["path"] == "reference" and out["rounds"] == 1
    assert out["clean_count"] == 200 and out["eval_count"] == 300 and out["config"]["batch_size"] == 100
    assert out["status"] == "completed" and out["defense_seconds"] > 0
    for k in ("acc", "asr", "ra"):
        assert 0 <= out["before"][k] <= 100 and 0 <= out["after"][k] <= 100
    # the purified weights were saved, load back with weights_only and reproduce the reported accuracy
    from fastpurify.data import load_cifar10
    from fastpurify.metrics import evaluate
    from fastpurify.models import load_checkpoint
    from fastpurify.triggers import PatchTrigger

    model = load_checkpoint(out_file, arch="small_vgg")
    before = load_checkpoint(IBAU / "badnets_8_02_ckpt.pth", arch="small_vgg")
    assert any(not torch.equal(a, b) for a, b in zip(model.state_dict().values(), before.state_dict().values()))
    xt, yt = load_cifar10(DATA, split="test", count=300)
    r = evaluate(model, xt, yt, trigger=PatchTrigger(4, 27, 27, 1.0), target=8)
    assert abs(r.acc - out["after"]["acc"]) < 1e-6 and abs(r.asr - out["after"]["asr"]) < 1e-6


@needs_real
def test_purify_human_output(capsys):
    assert main(["purify", "bcu", "--checkpoint", str(IBAU / "badnets_8_02_ckpt.pth"), "--data", str(DATA),
                 "--clean-count", "128", "--eval-count", "100", "--epochs", "1", "--set", "batch_size=64", "--trigger",
                 "patch:size=4,row=27,col=27,value=1", "--target", "8"]) == 0
    out = capsys.readouterr().out
    assert "bcu (" in out and "before" in out and "after" in out and "DER" in out and "128 clean images" in out
    # a plain verdict against the bar (one epoch of BCU on 128 images does not remove the backdoor)
    assert "backdoor NOT removed: ASR" in out and "> 5 %" in out


def test_purify_bad_inputs_are_one_clear_line(capsys, tmp_path):
    ckpt = tmp_path / "vgg.pth"
    from fastpurify.models import SmallVGG

    torch.save({"net": SmallVGG().state_dict()}, ckpt)
    base = ["--checkpoint", str(ckpt), "--data", str(tmp_path), "--trigger", "patch:size=3", "--target", "0"]
    err = _err(capsys, ["purify", "nad", *base])
    assert "'nad'" in err and "sau" in err and "bcu" in err
    err = _err(capsys, ["purify", "sau", *base, "--set", "lr"])
    assert "--set 'lr'" in err and "key=value" in err
    err = _err(capsys, ["purify", "sau", *base, "--clean-count", "0"])
    assert "--clean-count must be >= 1, got 0" in err


class _TickClock:
    """A clock that advances a fixed tick at every read: the defense's time is a count of its clock reads, the same
    on a busy machine as on a quiet one (no wall-clock assertion)."""

    def __init__(self, tick: float) -> None:
        self.t, self.tick = 0.0, tick

    def __call__(self) -> float:
        self.t += self.tick
        return self.t


@needs_real
def test_purify_time_budget(capsys, monkeypatch):
    import types

    import fastpurify.defenses._run as run_mod

    monkeypatch.setattr(run_mod, "time", types.SimpleNamespace(perf_counter=_TickClock(0.05)))
    base = ["--checkpoint", str(IBAU / "badnets_8_02_ckpt.pth"), "--data", str(DATA), "--clean-count", "256",
            "--eval-count", "100", "--trigger", "patch:size=4,row=27,col=27,value=1", "--target", "8"]
    # far too short for one step: one clear line, no model reported as purified
    err = _err(capsys, ["purify", "sau", *base, "--time-budget", "0.001"])
    assert "time_budget=0.001 s is too short for one useful step" in err and "after" not in err
    # 100 epochs asked, 6 s given: the schedule is fitted and reported
    assert main(["purify", "bcu", *base, "--epochs", "100", "--set", "batch_size=64", "--time-budget", "6",
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "budget_exhausted" and 1 <= out["rounds"] < 100 and out["defense_seconds"] < 6
    assert out["schedule"]["rounds"] == out["rounds"] and out["schedule"]["requested_rounds"] == 100


@needs_real
def test_purify_unknown_hyperparameter_lists_valid_ones(capsys):
    err = _err(capsys, ["purify", "ibau", "--checkpoint", str(IBAU / "badnets_8_02_ckpt.pth"), "--data", str(DATA),
                        "--clean-count", "100", "--eval-count", "50", "--set", "tau=3", "--trigger",
                        "patch:size=4,row=27,col=27,value=1", "--target", "8"])
    assert "tau" in err and "batch_size" in err


def test_demo_runs_a_defense_and_reports_it():
    res = _cli("demo", "--epochs", "1", "--defenses", "bcu", "--clean-count", "300", "--json")
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    (row,) = out["defenses"]
    assert row["defense"] == "bcu" and row["rounds"] >= 1 and row["seconds"] > 0 and out["clean_count"] == 300
    assert 0 <= row["acc"] <= 100 and 0 <= row["asr"] <= 100


def test_demo_unknown_defense(capsys):
    err = _err(capsys, ["demo", "--defenses", "sau,fineprune"])
    assert "'fineprune'" in err and "ibau" in err


# --------------------------------------------------------------------------------------------------------
# Issue 13: everything checked before any work (items 8, 12), Ctrl-C and resume (item 9). These run on a tiny
# CIFAR-format folder of random images, so they need no shared data.
# --------------------------------------------------------------------------------------------------------


def _fake_cifar(root, n_train=128, n_test=64):
    """A folder that load_cifar10 reads: data_batch_1 and test_batch of random uint8 images, labels 0..9."""
    import pickle

    folder = root / "cifar-10-batches-py"
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for name, n in (("data_batch_1", n_train), ("test_batch", n_test)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": rng.integers(0, 256, (n, 3072), dtype=np.uint8), "labels": list(range(10)) * (n // 10)
                         + list(range(n % 10))}, f)
    return root


@pytest.fixture
def workload(tmp_path):
    from fastpurify.models import SmallVGG

    torch.manual_seed(0)
    ckpt = tmp_path / "vgg.pth"
    torch.save({"net": SmallVGG().state_dict()}, ckpt)
    data = _fake_cifar(tmp_path / "data")
    return {"ckpt": ckpt, "data": data, "base": ["--checkpoint", str(ckpt), "--data", str(data), "--trigger",
                                                 "patch:size=3,row=29,col=29,value=1", "--target", "0"]}


@pytest.fixture
def no_work(monkeypatch):
    """Fail the test if the command loads a model, trains or evaluates: its checks must come first."""
    import fastpurify.metrics
    import fastpurify.models
    import fastpurify.train

    def forbidden(*a, **k):
        raise AssertionError("work started before the input was checked")

    for mod, fn in ((fastpurify.models, "load_checkpoint"), (fastpurify.metrics, "evaluate"),
                    (fastpurify.train, "train_backdoored")):
        monkeypatch.setattr(mod, fn, forbidden)


@pytest.mark.parametrize("extra,expected", [
    (["--out", "/nonexistent_dir/x.pth"], "'/nonexistent_dir' does not exist"),
    (["--out", "{tmp}"], "is a directory"),
    (["--set", "lr=abc"], "lr must be a number, got 'abc'"),
    (["--set", "lr=-1"], "lr must be a positive number, got -1"),
    (["--set", "tau=3"], "unknown hyper-parameter(s) ['tau']"),
    (["--set", "epochs=3"], "--set epochs=...: use --epochs N"),
    (["--set", "inplace=true"], "--set inplace=...: the command purifies a copy"),
    (["--time-budget", "0"], "--time-budget must be a positive number of seconds, got 0"),
    (["--time-budget", "-5"], "--time-budget must be a positive number of seconds, got -5"),
    (["--time-budget", "nan"], "--time-budget must be a positive number of seconds, got nan"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--eval-count", "0"], "--eval-count must be >= 1, got 0"),
    (["--checkpoint-every", "0", "--out", "{tmp}/x.pth"], "--checkpoint-every must be >= 1, got 0"),
    (["--checkpoint-every", "2"], "--checkpoint-every needs a file for the run's state"),
    (["--state", "/nonexistent_dir/s.pt"], "'/nonexistent_dir' does not exist"),
    (["--resume", "{tmp}/missing.state.pt"], "no such file"),
])
def test_purify_checks_options_before_loading_anything(capsys, tmp_path, workload, no_work, extra, expected):
    """Issue 13, item 8: a bad output path or option used to surface only after the defense (or after the 30-40 s
    evaluation before it); now it is one line, exit 2, and nothing was loaded."""
    extra = [e.replace("{tmp}", str(tmp_path)) for e in extra]
    err = _err(capsys, ["purify", "sau", *workload["base"], *extra])
    assert expected in err, err


def test_purify_target_outside_cifar_labels(capsys, workload, no_work):
    base = [a for a in workload["base"] if a not in ("--target", "0")]
    err = _err(capsys, ["purify", "ibau", *base, "--target", "10"])
    assert "--target 10" in err and "[0, 10)" in err


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="uses /proc, a file system nobody can write")
def test_purify_unwritable_out_is_found_by_a_real_write(capsys, workload, no_work):
    """Permission bits do not stop root; a probe file beside --out does tell (nothing is written to --out)."""
    err = _err(capsys, ["purify", "sau", *workload["base"], "--out", "/proc/fastpurify-purified.pth"])
    assert "cannot be written" in err


def test_out_probe_leaves_an_existing_file_alone(tmp_path):
    from fastpurify.cli_purify import check_writable_file

    f = tmp_path / "old.pth"
    f.write_bytes(b"precious")
    check_writable_file(f, "--out")
    assert f.read_bytes() == b"precious" and sorted(p.name for p in tmp_path.iterdir()) == ["old.pth"]


def test_purify_small_clean_set_fails_before_any_evaluation(capsys, monkeypatch, workload):
    """A clean set smaller than one batch fails in the defense's own checks, before its first step and before any
    evaluation (the command evaluates only after the defense)."""
    import fastpurify.metrics

    monkeypatch.setattr(fastpurify.metrics, "evaluate", lambda *a, **k: pytest.fail("evaluated before the check"))
    err = _err(capsys, ["purify", "sau", *workload["base"], "--clean-count", "20"])
    assert "fewer than one batch" in err and "batch_size=256" in err


def test_purify_saves_the_result_and_reports_before_and_after(tmp_path, capsys, workload):
    out_file = tmp_path / "purified.pth"
    assert main(["purify", "bcu", *workload["base"], "--clean-count", "64", "--set", "batch_size=32", "--epochs", "1",
                 "--out", str(out_file), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["status"] == "completed" and out["rounds"] == 1 and out["out"] == str(out_file)
    assert 0 <= out["before"]["acc"] <= 100 and 0 <= out["after"]["acc"] <= 100
    saved = torch.load(out_file, weights_only=True)
    assert saved["status"] == "completed" and saved["rounds"] == 1 and saved["defense"] == "bcu"


@pytest.mark.parametrize("extra,expected", [
    (["--target", "10"], "--target 10: the demo's data has 10 classes; give a label in [0, 10)"),
    (["--target", "-1"], "give a label in [0, 10)"),
    (["--epochs", "0"], "--epochs must be >= 1, got 0"),
    (["--clean-count", "0"], "--clean-count must be >= 1, got 0"),
    (["--poison-rate", "0"], "--poison-rate must lie in (0, 1]"),
    (["--poison-rate", "1.5"], "--poison-rate must lie in (0, 1]"),
    (["--clean-count", "50", "--defenses", "sau"], "--clean-count 50 is fewer than one batch of sau (256 images"),
])
def test_demo_checks_options_before_training(capsys, no_work, extra, expected):
    """Issue 13, item 12: `demo --target 10` trained an 11-class model and exited 0."""
    err = _err(capsys, ["demo", *extra])
    assert expected in err, err


def test_small_clean_ok_matches_the_defenses():
    """cli_purify.SMALL_CLEAN_OK (the demo's early check) says which defenses accept fewer clean images than one
    batch; each defense's own check is the truth (it fails before any work, so this is cheap)."""
    from _tiny import tiny_cnn

    import fastpurify
    from fastpurify.cli_purify import SMALL_CLEAN_OK
    from fastpurify.defenses import DEFENSES, PurificationError

    x = torch.rand(4, 3, 32, 32)
    y = torch.arange(4)
    for name in DEFENSES:
        extra = {"target": 0} if name == "baerase" else {}
        try:
            getattr(fastpurify, name)(tiny_cnn(seed=0), x if name == "bcu" else (x, y), batch_size=8, epochs=1,
                                      progress=False, time_budget=1e-3, **extra)
            small_ok = True
        except ValueError as e:
            small_ok = "fewer than one batch" not in str(e)
        except (fastpurify.TimeBudgetError, PurificationError):
            small_ok = True  # it got past the data checks
        assert small_ok == (name in SMALL_CLEAN_OK), name


def _popen(args, cwd):
    """The CLI in a child process that turns SIGINT into KeyboardInterrupt, as in a terminal (a shell running this
    suite in the background may hand its children SIGINT ignored, and Python keeps an ignored SIGINT ignored)."""
    import signal

    return subprocess.Popen([sys.executable, "-m", "fastpurify", *args], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1"),
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))


def test_ctrl_c_saves_the_last_round_and_resume_finishes_the_run(tmp_path, workload):
    """Issue 13, item 9: SIGINT after the first round (seen as the state file appearing, no fixed sleep) exits 130
    with one line, saves the last completed round's model to --out, and --resume then ends where an uninterrupted
    run ends."""
    import signal
    import time

    out, state = tmp_path / "purified.pth", tmp_path / "purified.pth.state.pt"
    args = ["purify", "ibau", *workload["base"], "--clean-count", "128", "--eval-count", "20", "--set",
            "batch_size=64", "--epochs", "4", "--seed", "3"]
    proc = _popen([*args, "--checkpoint-every", "1", "--out", str(out)], cwd=tmp_path)
    try:
        while not state.exists() and proc.poll() is None:  # written atomically after each completed round
            time.sleep(0.02)
        assert proc.poll() is None, f"the run ended before the first round was seen: {proc.communicate()}"
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    # the progress lines of the completed rounds (stderr is a pipe: one line per round), then one line
    lines = [ln for ln in stderr.strip().splitlines() if not PROGRESS_LINE.match(ln)]
    assert len(lines) == 1 and "Traceback" not in stderr, stderr
    assert "ibau: round 1/4 done, " in stderr, stderr
    assert lines[0].startswith("fastpurify: interrupted: saved the model after ") and str(out) in lines[0]
    assert f"--resume {state}" in lines[0]
    saved = torch.load(out, weights_only=True)
    assert saved["status"] == "interrupted" and 1 <= saved["rounds"] < 4

    one = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # all three runs on one thread: the same reduction order
    res = _cli(*args, "--resume", str(state), "--out", str(out), "--json", env_extra=one)
    assert res.returncode == 0, res.stderr
    resumed = json.loads(res.stdout.strip().splitlines()[-1])
    assert resumed["status"] == "completed" and resumed["rounds"] == 4
    assert resumed["schedule"]["resumed_from_round"] >= 1
    whole = tmp_path / "whole.pth"
    res = _cli(*args, "--out", str(whole), "--json", env_extra=one)
    assert res.returncode == 0, res.stderr
    a, b = torch.load(out, weights_only=True)["model"], torch.load(whole, weights_only=True)["model"]
    for k in b:  # the same steps in the same order: equal up to float rounding
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6, msg=k)


def test_ctrl_c_without_out_writes_a_named_file(tmp_path, workload):
    import signal
    import time

    proc = _popen(["purify", "ibau", *workload["base"], "--clean-count", "128", "--set", "batch_size=64", "--epochs",
                   "4", "--state", str(tmp_path / "run.state"), "--json"], cwd=tmp_path)
    try:
        while not (tmp_path / "run.state").exists() and proc.poll() is None:
            time.sleep(0.02)
        proc.send_signal(signal.SIGINT)
        stdout, stderr = proc.communicate(timeout=300)
    finally:
        proc.kill()
    assert proc.returncode == 130, stderr
    report = json.loads(stdout.strip().splitlines()[-1])
    assert report["status"] == "interrupted" and report["out"] == "purify-interrupted.pth" and report["rounds"] >= 1
    assert (tmp_path / "purify-interrupted.pth").is_file() and "purify-interrupted.pth" in stderr


def test_ctrl_c_before_the_first_round_writes_nothing(capsys, monkeypatch, tmp_path, workload):
    """An interruption with no completed round has nothing purified to save: the model as given must not be
    written to --out as if it were the result."""
    import fastpurify.defenses
    from fastpurify.defenses import Interrupted, PurifyResult

    def interrupted(model, clean, **kwargs):
        raise Interrupted(PurifyResult(model=model, history=[], timings={}, status="interrupted", defense="ibau",
                                       config={"epochs": 5}, schedule={"rounds": 0}))

    monkeypatch.setattr(fastpurify.defenses, "ibau", interrupted)
    out = tmp_path / "x.pth"
    assert main(["purify", "ibau", *workload["base"], "--clean-count", "20", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "before the first round of ibau completed" in err and "nothing written" in err
    assert not out.exists()


def test_ctrl_c_outside_a_defense_is_one_line(capsys, monkeypatch):
    import fastpurify.train

    def stop(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(fastpurify.train, "train_backdoored", stop)
    assert main(["demo", "--defenses", "none", "--epochs", "1"]) == 130
    assert capsys.readouterr().err == "fastpurify: interrupted\n"


@pytest.mark.parametrize("extra,expected", [
    (["--set", "sau.lr=-1"], "lr must be a positive number, got -1"),
    (["--set", "ibau.shuffle=maybe"], "shuffle must be True or False, got 'maybe'"),
])
def test_bench_checks_setting_values_before_training(capsys, no_work, extra, expected):
    err = _err(capsys, ["bench", "--defenses", "sau", "ibau", *extra])
    assert expected in err, err
