"""PurifyResult.save / PurifyResult.load (fastpurify/results.py): the weights as a checkpoint, everything else as
plain JSON beside them, every non-JSON value converted explicitly with a note, and a round trip that gives the
same weights, history and schedule back."""

import json
import math

import pytest
import torch
from _tiny import tiny_cnn

import fastpurify
from fastpurify import PurifyResult
from fastpurify.data import synthetic_dataset
from fastpurify.results import FORMAT, OMIT, TENSOR_LIST_MAX, result_json_path, to_json
from fastpurify.triggers import PatchTrigger

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def bcu_result():
    x, y = synthetic_dataset(n=64, seed=0)
    xt, yt = synthetic_dataset(n=32, seed=1, split="test")
    trig = PatchTrigger()
    return fastpurify.bcu(tiny_cnn(16, seed=0), x, epochs=2, batch_size=32, progress=False,
                          eval_data=(xt, yt, trig, 0))


def _strict_json(path):
    def bad(c):
        raise AssertionError(f"{path} holds the non-JSON constant {c}")

    return json.loads(path.read_text(), parse_constant=bad)


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_round_trip(tmp_path, bcu_result, suffix):
    r = bcu_result
    path = tmp_path / f"purified{suffix}"
    json_path = r.save(path)
    assert json_path == tmp_path / "purified.json" and path.is_file()
    rec = _strict_json(json_path)
    assert rec["format"] == FORMAT and rec["weights"] == path.name and rec["defense"] == "bcu"
    assert rec["weights_format"] == ("safetensors" if suffix == ".safetensors" else "torch")

    target = tiny_cnn(16, seed=5)  # another initialisation of the same architecture
    before = {k: v.clone() for k, v in target.state_dict().items()}
    for source in (json_path, path):  # the JSON file or the weights file
        back = PurifyResult.load(source, model=target)
        assert isinstance(back, PurifyResult) and back.model is not target
        for k, v in r.model.state_dict().items():
            torch.testing.assert_close(back.model.state_dict()[k], v.cpu(), rtol=0, atol=0)
        assert back.history == r.history and back.status == r.status and back.defense == "bcu"
        assert back.schedule == r.schedule and back.timings == pytest.approx(dict(r.timings))
        assert {"acc", "asr", "ra", "loss"} <= set(back.history[-1])
        assert back.config == json.loads(json.dumps(back.config))
    for k, v in target.state_dict().items():  # the model given to load is not changed
        assert torch.equal(v, before[k]), k

    bare = PurifyResult.load(json_path)
    assert bare.model is None and set(bare.state_dict) == set(r.model.state_dict())
    again = tmp_path / "again.pt"
    bare.save(again)  # a result loaded without a model saves its state dict
    assert set(PurifyResult.load(again).state_dict) == set(r.model.state_dict())
    # the weights file is an ordinary checkpoint
    net = fastpurify.models.load_checkpoint(path, model=tiny_cnn(16, seed=7))
    torch.testing.assert_close(net.state_dict()["0.weight"], r.model.state_dict()["0.weight"].cpu())


def test_non_json_values_are_converted_with_a_note(tmp_path):
    model = tiny_cnn(16, seed=0)
    big = torch.zeros(TENSOR_LIST_MAX + 1)
    r = PurifyResult(
        model=model, history=[{"round": 1, "loss": float("nan"), "seconds": 0.5}], timings={"defense": 1.0},
        status="completed", defense="toy",
        config={"size": (3, 3), "trigger": PatchTrigger(), "fn": len, "device": torch.device("cpu")},
        info={"delta": torch.ones(1, 2, 2), "masks": {"conv": big}, "scores": {0: 1.5, 1: torch.tensor(2.0)}},
        schedule={"rounds": 1})
    json_path = r.save(tmp_path / "r.pt")
    rec = _strict_json(json_path)
    assert rec["config"]["size"] == [3, 3] and rec["config"]["device"] == "cpu"
    assert rec["config"]["trigger"] == PatchTrigger().spec and "fn" not in rec["config"]
    assert rec["info"]["delta"] == [[[1.0, 1.0], [1.0, 1.0]]] and rec["info"]["masks"] == {}
    assert rec["info"]["scores"] == {"0": 1.5, "1": 2.0}
    assert rec["history"][0]["loss"] is None
    notes = rec["conversions"]
    assert "tuple" in notes["config.size"] and "left out" in notes["config.fn"]
    assert "left out" in notes["info.masks.conv"] and str(TENSOR_LIST_MAX) in notes["info.masks.conv"]
    assert "nested list" in notes["info.delta"] and "null" in notes["history[0].loss"]
    assert "key 0" in notes["info.scores.0"]
    back = PurifyResult.load(json_path)
    assert back.conversions == notes and back.info["delta"] == [[[1.0, 1.0], [1.0, 1.0]]]
    assert isinstance(r.config["size"], tuple) and r.info["masks"]["conv"] is big  # the result is not changed


def test_to_json_leaves_out_what_it_cannot_write():
    notes = {}
    assert to_json(object(), "x", notes) is OMIT and "object" in notes["x"]
    assert to_json([1, len], "l", notes) == [1, None]
    assert math.isnan(float("nan")) and to_json(float("inf"), "f", notes) is None


def test_bad_paths_and_files_are_clear_errors(tmp_path, bcu_result):
    with pytest.raises(ValueError, match=r"ending in \.pt, \.pth, \.safetensors"):
        bcu_result.save(tmp_path / "purified.json")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        bcu_result.save(tmp_path / "missing" / "purified.pt")
    with pytest.raises(FileNotFoundError, match="not found"):
        PurifyResult.load(tmp_path / "nothing.pt")
    report = tmp_path / "report.json"  # what fastpurify purify --json prints: no weights
    report.write_text(json.dumps({"defense": "sau", "before": {}, "after": {}}))
    with pytest.raises(ValueError, match="not a saved PurifyResult"):
        PurifyResult.load(report)
    path = tmp_path / "p.pt"
    bcu_result.save(path)
    with pytest.raises(ValueError, match="wrong shape"):
        PurifyResult.load(path, model=tiny_cnn(32, seed=0))  # another architecture
    with pytest.raises(TypeError, match="nn.Module"):
        PurifyResult.load(path, model="tiny_cnn")
    path.unlink()
    with pytest.raises(FileNotFoundError, match="weights file"):
        PurifyResult.load(result_json_path(path))
