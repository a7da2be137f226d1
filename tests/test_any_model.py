"""Any model from the command line (``--model MODULE:FACTORY``, ``--model-kwargs``) and every checkpoint layout
(plain, ``net`` / ``model`` / ``state_dict`` wrappers, ``module.`` / ``_orig_mod.`` prefixes, safetensors) loaded
into a model fastpurify does not know: ``tests/userpkg/net.py``."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from test_cli import _err, _fake_cifar

from fastpurify.cli import main
from fastpurify.models import CheckpointError, load_checkpoint, read_state_dict, resolve_model, save_checkpoint
from fastpurify.models.factory import ModelSpecError

TESTS = Path(__file__).resolve().parent
SPEC = "userpkg.net:build"


def _user_net(num_classes=10, seed=0):
    from userpkg.net import build

    torch.manual_seed(seed)
    return build(num_classes=num_classes)


def _same_weights(a, b):
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)


@pytest.fixture
def user(tmp_path):
    """A checkpoint of the user's model ({'net': ...}, as I-BAU saves) and a small CIFAR-format data folder."""
    net = _user_net()
    ckpt = tmp_path / "user.pth"
    torch.save({"net": net.state_dict(), "acc": 0.5}, ckpt)
    return {"net": net, "ckpt": ckpt, "data": _fake_cifar(tmp_path / "data")}


# --------------------------------------------------------------------------------------------------------
# Checkpoint layouts
# --------------------------------------------------------------------------------------------------------


def _write(path: Path, layout: str, sd):
    if layout == "safetensors":
        save_checkpoint(path, sd, {"defense": "sau"})
        return
    if layout.startswith("prefix:"):
        sd = {layout.split(":", 1)[1] + k: v for k, v in sd.items()}
        obj = {"state_dict": sd}
    else:
        obj = sd if layout == "plain" else {layout: sd, "epoch": 3}
    torch.save(obj, path)


@pytest.mark.parametrize("layout", ["plain", "net", "model", "state_dict", "prefix:module.", "prefix:_orig_mod.",
                                    "safetensors"])
def test_every_layout_loads_into_the_users_model(tmp_path, layout):
    net = _user_net(seed=1)
    path = tmp_path / ("ckpt.safetensors" if layout == "safetensors" else "ckpt.pth")
    _write(path, layout, net.state_dict())
    fresh = _user_net(seed=2)
    assert not _same_weights(fresh, net)
    loaded = load_checkpoint(path, model=fresh)
    assert loaded is fresh and not loaded.training and _same_weights(loaded, net)


def test_safetensors_without_the_suffix_is_recognised(tmp_path):
    """A safetensors file renamed .pth is read as safetensors (its header), not refused as 'not a torch file'."""
    net = _user_net(seed=3)
    save_checkpoint(tmp_path / "a.safetensors", net.state_dict())
    (tmp_path / "a.safetensors").rename(tmp_path / "a.bin")
    assert _same_weights(load_checkpoint(tmp_path / "a.bin", model=_user_net(seed=4)), net)


def test_a_checkpoint_that_does_not_fit_leaves_the_model_untouched(tmp_path):
    path = tmp_path / "wide.pth"
    torch.save(resolve_model(SPEC, {"width": 4}).state_dict(), path)
    net = _user_net(seed=5)
    before = {k: v.clone() for k, v in net.state_dict().items()}
    with pytest.raises(CheckpointError, match=r"wrong shape for the model \(UserNet\)"):
        load_checkpoint(path, model=net)
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())


def test_safetensors_missing_package_names_the_extra(tmp_path, monkeypatch, capsys, user):
    path = tmp_path / "x.safetensors"
    save_checkpoint(path, user["net"].state_dict())
    monkeypatch.setitem(sys.modules, "safetensors", None)  # import safetensors now raises ImportError
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)
    with pytest.raises(ImportError, match=r"pip install fastpurify\[safetensors\]"):
        read_state_dict(path)
    err = _err(capsys, ["evaluate", "--model", SPEC, "--checkpoint", str(path), "--data", str(user["data"])])
    assert "pip install fastpurify[safetensors]" in err


# --------------------------------------------------------------------------------------------------------
# --model on the command line
# --------------------------------------------------------------------------------------------------------


def test_evaluate_with_a_users_model(capsys, user):
    assert main(["evaluate", "--model", SPEC, "--model-kwargs", '{"num_classes": 10}', "--checkpoint",
                 str(user["ckpt"]), "--data", str(user["data"]), "--trigger", "patch:size=3,row=29,col=29,value=1",
                 "--target", "0", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["arch"] == SPEC and out["n_clean"] == 64 and out["asr"] is not None
    # the same numbers as the Python API on the same model
    from fastpurify.data import load_cifar10
    from fastpurify.metrics import evaluate
    from fastpurify.triggers import PatchTrigger

    x, y = load_cifar10(user["data"], split="test")
    r = evaluate(user["net"].eval(), x, y, trigger=PatchTrigger(3, 29, 29, 1.0), target=0)
    assert (out["n_correct"], out["n_attack_success"]) == (r.n_correct, r.n_attack_success)


def test_builtin_name_through_model(capsys, tmp_path, user):
    from fastpurify.models import SmallVGG

    torch.save(SmallVGG().state_dict(), tmp_path / "vgg.pth")
    assert main(["evaluate", "--model", "small_vgg", "--checkpoint", str(tmp_path / "vgg.pth"), "--data",
                 str(user["data"]), "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["arch"] == "small_vgg"


@pytest.mark.parametrize("suffix", [".pth", ".safetensors"])
def test_purify_one_epoch_with_a_users_model(capsys, tmp_path, user, suffix):
    out_file = tmp_path / f"purified{suffix}"
    assert main(["purify", "bcu", "--model", SPEC, "--checkpoint", str(user["ckpt"]), "--data", str(user["data"]),
                 "--trigger", "patch:size=3,row=29,col=29,value=1", "--target", "0", "--clean-count", "64",
                 "--set", "batch_size=32", "--epochs", "1", "--out", str(out_file), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["arch"] == SPEC and out["status"] == "completed" and out["rounds"] == 1
    purified = load_checkpoint(out_file, model=_user_net(seed=9))
    assert not _same_weights(purified, user["net"])  # one round of BCU changed the weights
    if suffix == ".pth":  # the layout purify has always written: {'model': state dict, 'arch', 'defense', ...}
        saved = torch.load(out_file, weights_only=True)
        assert saved["arch"] == SPEC and saved["defense"] == "bcu" and saved["rounds"] == 1
    else:
        from safetensors import safe_open

        with safe_open(str(out_file), "pt") as f:
            meta = f.metadata()
        assert json.loads(meta["arch"]) == SPEC and json.loads(meta["defense"]) == "bcu"


def test_module_from_the_current_directory(tmp_path, monkeypatch):
    """Like ``python -m``: a module in the current directory imports even when sys.path does not hold it (the
    ``fastpurify`` console script's sys.path starts with its bin folder)."""
    (tmp_path / "cwd_net_for_fastpurify.py").write_text(
        "from torch import nn\n\ndef make(n=3):\n    return nn.Linear(4, n)\n")
    monkeypatch.chdir(tmp_path)
    kept = [p for p in sys.path if p not in ("", ".") and os.path.abspath(p) != str(tmp_path)]
    monkeypatch.setattr(sys, "path", kept)
    assert resolve_model("cwd_net_for_fastpurify:make", {"n": 5}).out_features == 5


def test_file_path_spec(user):
    net = resolve_model(f"{TESTS / 'userpkg' / 'net.py'}:build", {"num_classes": 7})
    assert net.head.out_features == 7


def test_subprocess_python_m_with_pythonpath(user):
    env = dict(os.environ, PYTHONPATH=str(TESTS) + os.pathsep + os.environ.get("PYTHONPATH", ""))
    res = subprocess.run([sys.executable, "-m", "fastpurify", "evaluate", "--model", SPEC, "--model-kwargs",
                          '{"num_classes": 10}', "--checkpoint", str(user["ckpt"]), "--data", str(user["data"]),
                          "--json"], capture_output=True, text=True, env=env, cwd=str(user["ckpt"].parent),
                         timeout=300)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["n_clean"] == 64


@pytest.mark.parametrize("argv,expected", [
    (["--model", "userpkg.net"], "expected MODULE:FACTORY"),
    (["--model", "no_such_pkg_xyz.net:build"], "no module named 'no_such_pkg_xyz' on sys.path"),
    (["--model", "no_such_pkg_xyz.net:build"], "PYTHONPATH"),
    (["--model", "userpkg.net:biuld"], "userpkg.net has no attribute 'biuld'; its callables: UserNet, build"),
    (["--model", "userpkg.net:NOT_CALLABLE"], "NOT_CALLABLE is a int, not a callable"),
    (["--model", "userpkg.net:raises"], "raised RuntimeError: no weights for this size"),
    (["--model", "userpkg.net:returns_a_dict"], "the factory returned a dict, not a torch.nn.Module"),
    (["--model", SPEC, "--model-kwargs", "{num_classes: 10}"], "--model-kwargs '{num_classes: 10}' is not valid JSON"),
    (["--model", SPEC, "--model-kwargs", "[10]"], "is a JSON list, not an object"),
    (["--model", SPEC, "--model-kwargs", '{"classes": 10}'], "the keyword arguments {'classes': 10} do not fit"),
    (["--model", SPEC, "--arch", "small_vgg"], "--arch small_vgg and --model userpkg.net:build: give one"),
    (["--model-kwargs", '{"num_classes": 10}'], "--model-kwargs needs --model"),
    (["--arch", "vgg99"], "unknown architecture 'vgg99'"),
    (["--model", "tests/nowhere/net.py:build"], "the file tests/nowhere/net.py does not exist"),
])
def test_bad_model_specs_are_one_clear_line(capsys, user, argv, expected):
    for command in (["evaluate"], ["purify", "sau", "--trigger", "patch:size=3,row=29,col=29,value=1", "--target",
                                   "0"]):
        err = _err(capsys, [*command, *argv, "--checkpoint", str(user["ckpt"]), "--data", str(user["data"])])
        assert expected in err and len(err.strip().splitlines()) == 1, err


def test_checkpoint_that_does_not_fit_the_users_model(capsys, tmp_path, user):
    torch.save({"model": resolve_model(SPEC, {"width": 4}).state_dict()}, tmp_path / "w4.pth")
    err = _err(capsys, ["evaluate", "--model", SPEC, "--checkpoint", str(tmp_path / "w4.pth"), "--data",
                        str(user["data"])])
    assert "tensors have the wrong shape for the model (UserNet)" in err and "body.0.weight" in err


def test_bench_model_needs_a_checkpoint_and_reaches_real_workload(capsys, user):
    err = _err(capsys, ["bench", "--model", SPEC, "--defenses", "bcu"])
    assert "needs --checkpoint CKPT" in err
    from fastpurify.bench import real_workload

    wl = real_workload(user["ckpt"], user["data"], trigger="patch:size=3,row=29,col=29,value=1", target=0, arch=SPEC,
                       n_clean=32, n_eval=32, model=resolve_model(SPEC))
    assert wl.arch == SPEC and _same_weights(wl.model_factory(), user["net"])


def test_model_spec_error_is_a_value_error():
    with pytest.raises(ValueError):
        resolve_model("no_colon")
    assert issubclass(ModelSpecError, ValueError)
