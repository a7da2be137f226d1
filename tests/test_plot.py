"""Plots (fastpurify/plot.py): a purification's curves and before/after table, a sweep's ASR vs ACC drop with the
bar shaded, ``fastpurify plot`` and ``purify --plot``. Each PNG is opened and checked: its size, that it is not
blank (pixel spread, many colours), and that the colours of what it should show are in it."""

import json
import sys

import numpy as np
import pytest
import torch
from _tiny import tiny_cnn

from fastpurify import PurifyResult
from fastpurify.cli import main
from fastpurify.plot import plot_result, plot_sweep

pytestmark = pytest.mark.usefixtures("one_thread")

RED = (214, 39, 40)  # matplotlib's tab:red: the ASR curve
BLUE = (31, 119, 180)  # tab:blue: the ACC curve
BAR_SHADE = (223, 239, 223)  # tab:green at alpha 0.15 on white: the bar's region


def _image(path, min_w, min_h):
    """The PNG as an H×W×3 uint8 array, after checking its size and that it is not blank."""
    from matplotlib.image import imread

    img = imread(str(path))
    assert img.ndim == 3 and img.shape[2] in (3, 4), img.shape
    h, w = img.shape[:2]
    assert w >= min_w and h >= min_h, (w, h)
    rgb = (img[..., :3] * 255).round().astype(np.uint8)
    assert rgb.std() > 10, "the image is (nearly) one colour"
    colours = np.unique(rgb.reshape(-1, 3), axis=0)
    assert len(colours) > 50, f"only {len(colours)} distinct colours"
    return rgb


def _has(rgb, colour, tol=12, at_least=30):
    near = np.abs(rgb.astype(int) - np.array(colour)).max(axis=2) <= tol
    return int(near.sum()) >= at_least


def _history(rounds=4):
    return [{"round": i, "seconds": 0.5 * i, "loss": 1.0 / i, "delta_loss": -0.5 / i, "acc": 90.0 - i,
             "asr": 80.0 / i, "ra": 10.0 * i} for i in range(1, rounds + 1)]


def _report(**extra):
    """What fastpurify purify --json prints (with the history it now carries)."""
    return {"defense": "ibau", "status": "completed", "rounds": 4, "defense_seconds": 12.5, "history": _history(),
            "before": {"acc": 92.0, "asr": 100.0, "ra": 0.0}, "after": {"acc": 86.0, "asr": 20.0, "ra": 40.0},
            "der": 87.0, **extra}


def test_plot_result_from_a_purify_report(tmp_path):
    path = tmp_path / "report.json"
    path.write_text("some log line\n" + json.dumps(_report()) + "\n")  # purify --json's last line is the report
    png = tmp_path / "r.png"
    assert plot_result(path, png) == str(png)
    rgb = _image(png, min_w=1200, min_h=300)  # three panels side by side
    assert _has(rgb, RED) and _has(rgb, BLUE)


def test_plot_result_of_a_saved_result_through_the_cli(tmp_path, capsys):
    r = PurifyResult(model=tiny_cnn(16, seed=0), history=_history(3), timings={"defense": 1.5}, status="completed",
                     defense="sau", config={"epochs": 3}, schedule={"rounds": 3})
    json_path = r.save(tmp_path / "purified.pt")
    assert main(["plot", str(json_path)]) == 0
    png = tmp_path / "purified.png"  # the default: the result's name with .png
    assert capsys.readouterr().out.strip() == str(png)
    rgb = _image(png, min_w=800, min_h=300)  # curves and losses; no before/after table without a report
    assert _has(rgb, RED)
    assert main(["plot", str(json_path), "-o", str(tmp_path / "other.png")]) == 0
    _image(tmp_path / "other.png", min_w=800, min_h=300)


def test_plot_result_of_a_purify_result_with_before_and_after(tmp_path):
    from fastpurify.data import synthetic_dataset
    from fastpurify.metrics import evaluate
    from fastpurify.triggers import PatchTrigger

    model = tiny_cnn(16, seed=0).eval()
    r = PurifyResult(model=model, history=_history(3), timings={"defense": 1.5}, status="completed",
                     defense="sau", config={}, schedule={})
    xt, yt = synthetic_dataset(n=32, seed=1, split="test")
    before = evaluate(model, xt, yt, trigger=PatchTrigger(), target=0)
    plain, table = tmp_path / "plain.png", tmp_path / "table.png"
    plot_result(r, plain)
    plot_result(r, table, before=before, after={"acc": 80.0, "asr": 1.0, "ra": 70.0})
    w_plain, w_table = _image(plain, 800, 300).shape[1], _image(table, 1200, 300).shape[1]
    assert w_table > w_plain * 1.3  # a third panel: the before/after table
    with pytest.raises(TypeError, match="EvalResult or a dict"):
        plot_result(r, table, before=[90.0, 100.0])


def test_plot_sweep_draws_the_bar_and_every_group(tmp_path):
    rng = np.random.default_rng(0)
    rows = [{"defense": d, "recipe": rc, "checkpoint": ck, "seed": s, "acc_before": 90.0,
             "acc_after": 90.0 - float(rng.uniform(0, 6)), "asr_before": 99.0, "asr_after": float(rng.uniform(0, 15)),
             "status": "completed"}
            for d in ("sau", "ibau") for rc in ("published", "tuned") for ck in ("badnets", "trojan_wm")
            for s in range(3)]
    rows.append({"defense": "awm", "recipe": "published", "checkpoint": "badnets", "seed": 0, "acc_before": 90.0,
                 "acc_after": None, "asr_before": 99.0, "asr_after": None})  # a cell that failed: not drawn
    out = plot_sweep(rows, tmp_path)  # a folder: sweep.png in it
    assert out == str(tmp_path / "sweep.png")
    rgb = _image(out, min_w=1000, min_h=350)  # two checkpoints side by side
    assert _has(rgb, BAR_SHADE, tol=6, at_least=2000)


def test_bad_input_is_a_clear_error(tmp_path):
    with pytest.raises(ValueError, match="lacks the key"):
        plot_sweep([{"defense": "sau", "recipe": "x", "checkpoint": "c", "seed": 0}], tmp_path / "s.png")
    with pytest.raises(ValueError, match="should end in .png"):
        plot_result(_report(), tmp_path / "r.pdf")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        plot_result(_report(), tmp_path / "missing" / "r.png")
    with pytest.raises(ValueError, match="nothing to draw"):
        plot_result({"defense": "sau", "history": [{"round": 1, "seconds": 1.0}]}, tmp_path / "r.png")
    with pytest.raises(TypeError, match="list of dicts"):
        plot_sweep("rows.csv", tmp_path / "s.png")


def test_cli_errors_are_one_line(tmp_path, capsys):
    assert main(["plot", str(tmp_path / "missing.json")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastpurify: error: result file not found") and err.count("\n") == 1
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    assert main(["plot", str(bad)]) == 2
    assert "is not a JSON file" in capsys.readouterr().err


def test_missing_matplotlib_names_the_extra(tmp_path, monkeypatch, capsys):
    for mod in ("matplotlib", "matplotlib.figure", "matplotlib.backends.backend_agg"):
        monkeypatch.setitem(sys.modules, mod, None)  # import fails as if it were not installed
    with pytest.raises(ImportError, match=r"pip install fastpurify\[plot\]"):
        plot_result(_report(), tmp_path / "r.png")
    path = tmp_path / "report.json"
    path.write_text(json.dumps(_report()))
    assert main(["plot", str(path)]) == 2
    assert "pip install fastpurify[plot]" in capsys.readouterr().err
    assert not (tmp_path / "report.png").exists()


def test_purify_plot_option(tmp_path, capsys):
    from test_cli import _fake_cifar

    torch.manual_seed(0)
    from fastpurify.models import SmallVGG

    ckpt = tmp_path / "vgg.pth"
    torch.save({"net": SmallVGG().state_dict()}, ckpt)
    data = _fake_cifar(tmp_path / "data")
    base = ["purify", "bcu", "--checkpoint", str(ckpt), "--data", str(data), "--trigger",
            "patch:size=3,row=29,col=29,value=1", "--target", "0", "--clean-count", "64", "--set", "batch_size=32",
            "--epochs", "2"]
    png = tmp_path / "bcu.png"
    assert main([*base, "--plot", str(png), "--json"]) == 0
    captured = capsys.readouterr()
    out = json.loads(captured.out.strip().splitlines()[-1])
    assert out["plot"] == str(png) and len(out["history"]) == 2
    assert "bcu: round 2/2 done" in captured.err  # progress on stderr, stdout only the report
    _image(png, min_w=800, min_h=300)
    assert main([*base, "--plot", str(tmp_path / "bcu.svg")]) == 2  # checked before any work
    assert "should end in .png" in capsys.readouterr().err
