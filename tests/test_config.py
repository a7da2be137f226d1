"""Configuration files: ``fastpurify purify DEFENSE --config FILE`` (precedence, errors before any work) and
:func:`fastpurify.config.load_file` (YAML and JSON)."""

import json
import sys
from pathlib import Path

import pytest
from test_cli import _err, _fake_cifar, no_work  # noqa: F401  (no_work: a fixture)

from fastpurify.cli import build_parser, main
from fastpurify.cli_purify import _check_purify
from fastpurify.config import load_file, purify_config

EXAMPLES = Path(__file__).resolve().parents[1] / "examples"


def _args(argv):
    args = build_parser().parse_args(argv)
    args.argv = argv
    return args


def _checked(argv):
    """``purify``'s options after --config and every check that needs no loading; and the defense's options."""
    args = _args(argv)
    with purify_config(args):
        kwargs = _check_purify(args)
    return args, kwargs


def test_file_fills_options_and_the_command_line_wins(tmp_path, no_work):  # noqa: F811
    f = tmp_path / "run.yaml"
    f.write_text("checkpoint: m.pth\ntrigger: 'patch:size=3'\ntarget: 8\nclean_count: 100\nseed: 5\n"
                 "epochs: 3\nlr: 1e-4\nbatch_size: 64\nreference: true\ndevice: cpu\n")
    args, kwargs = _checked(["purify", "sau", "--config", str(f), "--seed", "0", "--set", "batch_size=32"])
    assert (args.checkpoint, args.trigger, args.target, args.clean_count, args.device) == ("m.pth", "patch:size=3",
                                                                                          8, 100, "cpu")
    assert args.seed == 0  # given on the command line (even though 0 is the default): it wins over seed: 5
    assert args.reference is True and kwargs["epochs"] == 3
    assert kwargs["lr"] == 1e-4 and isinstance(kwargs["lr"], float)  # YAML 1.1 would read "1e-4" as a string
    assert kwargs["batch_size"] == 32  # --set wins over the file's setting
    args, kwargs = _checked(["purify", "sau", "--config", str(f), "--clean-count", "7", "--target", "3"])
    assert (args.clean_count, args.target, args.seed, kwargs["batch_size"]) == (7, 3, 5, 64)
    f.write_text(f.read_text() + "model: tests/userpkg/net.py:build\nmodel_kwargs: {width: 8}\n")
    args, _ = _checked(["purify", "sau", "--config", str(f)])
    assert args.model_choice == ("tests/userpkg/net.py:build", {"width": 8})  # a mapping, as --model-kwargs' JSON


@pytest.mark.slow
def test_json_config_runs_purify(tmp_path, capsys):
    import torch
    from _tiny import tiny_cnn

    torch.save(tiny_cnn(seed=0).state_dict(), tmp_path / "tiny.pth")
    data = _fake_cifar(tmp_path / "data")
    cfg = {"checkpoint": str(tmp_path / "tiny.pth"), "model": f"{Path(__file__).parent / '_tiny.py'}:tiny_cnn",
           "data": str(data), "trigger": "patch:size=3,row=29,col=29,value=1", "target": 0, "clean_count": 64,
           "eval_count": 20, "epochs": 1, "batch_size": 32, "augment": False}
    (tmp_path / "run.json").write_text(json.dumps(cfg))
    assert main(["purify", "bcu", "--config", str(tmp_path / "run.json"), "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert out["clean_count"] == 64 and out["eval_count"] == 20 and out["rounds"] == 1
    assert out["config"]["batch_size"] == 32 and out["config"]["augment"] is False


@pytest.mark.parametrize("text,expected", [
    ("tau: 3", "unknown hyper-parameter(s) ['tau']"),
    ("lr: -1", "lr must be a positive number, got -1"),
    ("target: eight", "{f}: target: expected an integer, got 'eight'"),
    ("clean_count: 0", "--clean-count must be >= 1, got 0 (clean_count: from {f})"),
    ("time_budget: 0", "--time-budget must be a positive number of seconds, got 0 (time_budget: from {f})"),
    ("reference: 'yes'", "{f}: reference: expected true or false, got 'yes'"),
    ("progress: true", "{f}: progress: the command shows progress on stderr"),
    ("defense: ibau", "{f}: defense: 'ibau' but the command runs 'sau'"),
    ("json: true", "{f}: json: not a configuration key"),
    ("record: rec/badnet", "{f}: record: give --record PATH on the command line"),
])
def test_bad_file_values_name_the_file_and_key_before_any_work(tmp_path, capsys, no_work, text, expected):  # noqa: F811
    f = tmp_path / "run.yaml"
    f.write_text("checkpoint: m.pth\ntrigger: patch\ntarget: 1\n" + text + "\n")
    err = _err(capsys, ["purify", "sau", "--config", str(f)])
    assert expected.format(f=f) in err and str(f) in err, err


def test_set_on_the_command_line_replaces_a_bad_file_value(tmp_path, no_work):  # noqa: F811
    f = tmp_path / "run.yaml"
    f.write_text("checkpoint: m.pth\ntrigger: patch\ntarget: 1\nlr: -1\n")
    _, kwargs = _checked(["purify", "sau", "--config", str(f), "--set", "lr=0.001"])
    assert kwargs["lr"] == 0.001


def test_required_inputs_come_from_the_command_line_or_the_file(tmp_path, capsys, no_work):  # noqa: F811
    err = _err(capsys, ["purify", "sau", "--checkpoint", "m.pth"])
    assert "the following arguments are required: --trigger, --target" in err
    f = tmp_path / "run.json"
    f.write_text(json.dumps({"trigger": "patch", "target": 2}))
    args, _ = _checked(["purify", "sau", "--config", str(f), "--checkpoint", "m.pth"])
    assert (args.checkpoint, args.target) == ("m.pth", 2)


def test_load_file_formats_and_errors(tmp_path):
    f = tmp_path / "a.yaml"
    f.write_text("lr: 1e-4\nn: 5\nf: 1.5e3\ns: abc\nneg: -2E-1\nversion: 1.0\n")
    assert load_file(f) == {"lr": 1e-4, "n": 5, "f": 1500.0, "s": "abc", "neg": -0.2, "version": 1.0}
    (tmp_path / "empty.yaml").write_text("")
    assert load_file(tmp_path / "empty.yaml") == {}
    with pytest.raises(FileNotFoundError, match="missing.yaml"):
        load_file(tmp_path / "missing.yaml")
    (tmp_path / "list.yaml").write_text("- 1\n- 2\n")
    with pytest.raises(ValueError, match="expected a mapping of key: value at the top level, got list"):
        load_file(tmp_path / "list.yaml")
    (tmp_path / "bad.yaml").write_text("a: [1, 2\n")
    with pytest.raises(ValueError, match="bad.yaml: not valid YAML"):
        load_file(tmp_path / "bad.yaml")
    (tmp_path / "bad.json").write_text("{'a': 1}")
    with pytest.raises(ValueError, match="bad.json: not valid JSON"):
        load_file(tmp_path / "bad.json")


def test_missing_pyyaml_names_the_extra(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(sys.modules, "yaml", None)  # import yaml now fails, as without PyYAML
    (tmp_path / "s.yaml").write_text("defenses: [sau]\n")
    err = _err(capsys, ["sweep", str(tmp_path / "s.yaml")])
    assert "needs PyYAML: pip install fastpurify[yaml]" in err
    (tmp_path / "s.json").write_text('{"a": 1}')
    assert load_file(tmp_path / "s.json") == {"a": 1}  # JSON needs nothing


def test_examples_are_valid(no_work):  # noqa: F811
    args, kwargs = _checked(["purify", "sau", "--config", str(EXAMPLES / "purify.yaml")])
    assert args.target == 8 and kwargs["epochs"] == 5 and kwargs["lr"] == 1e-4
    from fastpurify.data import default_data_dir
    from fastpurify.sweep import plan_cells

    if not (default_data_dir() / "ibau" / "badnets_8_02_ckpt.pth").is_file():
        pytest.skip(f"the shared checkpoints are not under {default_data_dir()}")
    study = plan_cells(EXAMPLES / "study.yaml")
    assert len(study.cells) == 18 and {c["checkpoint"] for c in study.cells} == {"badnets", "trojan_wm"}
