"""The command line: info, evaluate (the real checkpoints' published numbers), demo, and clear errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

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


@needs_real
def test_purify_time_budget(capsys):
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
