"""BackdoorBench attack records in, defense results out (fastpurify/backdoorbench.py, fastpurify/cli_record.py).

The records here are written by ``_write_record`` below in BackdoorBench's attack-record format (as its
save_attack_result writes it: the poisoned datasets' states with PIL images and numpy arrays, the clean data by
path), around a model backdoored in the test on synthetic CIFAR-shaped data stored as CIFAR-10 python batches.
"""

import json
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from _tiny import tiny_cnn
from torch import nn

from fastpurify.backdoorbench import (
    DEFENSE_FILE,
    NORMALIZATION,
    RecordError,
    read_record,
    read_result,
    write_result,
)
from fastpurify.cli import main

Image = pytest.importorskip("PIL.Image")  # only to write the records the way BackdoorBench does

TESTS = Path(__file__).resolve().parent
TINY = f"{TESTS / '_tiny.py'}:tiny_cnn"  # the record's model for the command line: the file-path form of --model
TARGET = 0
N_TRAIN, N_TEST = 1024, 300


def _uint8(x):
    return (x * 255).round().to(torch.uint8)


def _write_cifar(folder: Path, train, test) -> None:
    folder.mkdir(parents=True)
    for name, (x, y) in (("data_batch_1", train), ("test_batch", test)):
        with open(folder / name, "wb") as f:
            pickle.dump({"data": _uint8(x).reshape(len(y), -1).numpy(), "labels": y.tolist()}, f)


def _dataset_state(x_poisoned, y, target, indicator):
    """A BackdoorBench poisoned-dataset state (prepro_cls_DatasetBD_v2.retrieve_state()): the poisoned images as
    PIL images keyed by their numpy int64 index, with (backdoor label, original label)."""
    table = {np.int64(i): (Image.fromarray(_uint8(x_poisoned[i]).permute(1, 2, 0).numpy()), target, int(y[i]))
             for i in np.flatnonzero(indicator)}
    return {"bd_data_container": {"save_folder_path": None, "data_dict": table, "save_file_format": ".png"},
            "getitem_all": True, "getitem_all_switch": False, "original_index_array": np.flatnonzero(indicator),
            "poison_indicator": indicator.astype(np.float64), "save_folder_path": None}


def _write_record(root: Path, attack: str, model_name: str, state_dict, trigger, test, train=None, **changes):
    """``root/record/<attack>/attack_result.pt`` in BackdoorBench's format, data_path relative to ``root`` as
    BackdoorBench writes it (./data/cifar10). ``changes`` replace keys (malformed records)."""
    xt, yt = test
    indicator = (yt != TARGET).numpy().astype(np.int64)
    bd_train = None
    if train is not None:
        xs, ys = train
        ind = np.zeros(len(ys), dtype=np.int64)
        ind[:10] = 1
        bd_train = _dataset_state(trigger(xs[:10].clone()), ys, TARGET, ind)
    record = {"model_name": model_name, "num_classes": 10, "model": state_dict, "data_path": "./data/cifar10",
              "img_size": [32, 32, 3], "clean_data": "cifar10", "bd_train": bd_train,
              "bd_test": _dataset_state(trigger(xt.clone()), yt, TARGET, indicator)}
    record.update(changes)
    folder = root / "record" / attack
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(record, folder / "attack_result.pt")
    return folder


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py: 2 threads stall on the shared 2 cores


@pytest.fixture(scope="module")
def bench_root(tmp_path_factory, one_thread):
    """A BackdoorBench checkout in miniature: data/cifar10 (synthetic images as CIFAR batches) and
    record/additive/attack_result.pt, a tiny_cnn backdoored (additive ±0.1 pattern, target 0) on the normalised
    inputs BackdoorBench's models see. ~10 s on 2 cores."""
    from fastpurify.data import synthetic_dataset
    from fastpurify.defenses._inputs import Normalize
    from fastpurify.train import train_backdoored
    from fastpurify.triggers import AddTrigger

    root = tmp_path_factory.mktemp("backdoorbench")
    x, y = synthetic_dataset(n=N_TRAIN, seed=0)
    xt, yt = synthetic_dataset(n=N_TEST, seed=0, split="test")
    x, xt = _uint8(x).float() / 255, _uint8(xt).float() / 255  # what the CIFAR files hold
    _write_cifar(root / "data" / "cifar10" / "cifar-10-batches-py", (x, y), (xt, yt))
    g = torch.Generator().manual_seed(0)
    trigger = AddTrigger(0.1 * (torch.randint(0, 2, (3, 32, 32), generator=g).float() * 2 - 1))
    net = tiny_cnn(32, seed=0)
    train_backdoored(nn.Sequential(Normalize(*NORMALIZATION["cifar10"]), net), x, y, trigger=trigger, target=TARGET,
                     epochs=10, lr=0.05, batch_size=64, augment=False)
    sd = {f"module.{k}": v for k, v in net.state_dict().items()}  # saved from nn.DataParallel, as often
    folder = _write_record(root, "additive", "tiny_cnn", sd, trigger, (xt, yt), train=(x, y))
    return {"root": root, "record": folder, "net": net.eval(), "trigger": trigger, "test": (xt, yt), "train": (x, y)}


def _tiny_factory(num_classes=10):
    return tiny_cnn(32, num_classes=num_classes)


def _same(sd_a, sd_b):
    return sd_a.keys() == sd_b.keys() and all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)


# --------------------------------------------------------------------------------------------------------
# Reading
# --------------------------------------------------------------------------------------------------------


def test_read_record_rebuilds_data_model_and_targets(bench_root):
    rec = read_record(bench_root["record"], model=_tiny_factory, clean_count=100)
    xt, yt = bench_root["test"]
    assert rec.attack == "additive" and rec.model_name == "tiny_cnn" and rec.num_classes == 10
    assert rec.normalization == NORMALIZATION["cifar10"] and rec.targets == [TARGET]
    assert rec.data_dir == bench_root["root"] / "data" / "cifar10" / "cifar-10-batches-py"
    assert torch.equal(rec.clean_test[0], xt) and torch.equal(rec.clean_test[1], yt)
    assert rec.clean_train[0].shape == (100, 3, 32, 32)
    assert torch.equal(rec.clean_train[1], bench_root["train"][1][:100])
    keep = yt != TARGET  # the triggered images: every test image not of the target class, with its own label
    assert torch.equal(rec.bd_index, torch.nonzero(keep).flatten()) and torch.equal(rec.bd_y, yt[keep])
    assert (rec.bd_target == TARGET).all()
    expected = _uint8(bench_root["trigger"](xt[keep].clone())).float() / 255  # exactly the stored pixels
    assert torch.equal(rec.bd_x, expected)
    assert _same(rec.model.state_dict(), bench_root["net"].state_dict())  # module. prefix stripped
    assert rec.poisoned_train_index.tolist() == list(range(10))
    r = rec.evaluate()
    assert r.n_triggered == int(keep.sum()) and r.asr > 90 and r.acc > 80, r


def test_eval_count_keeps_the_triggered_images_among_the_first(bench_root):
    rec = read_record(bench_root["record"], model=_tiny_factory, clean_count=0, eval_count=50)
    assert rec.clean_train is None and len(rec.clean_test[1]) == 50
    assert rec.bd_index.max() < 50 and len(rec.bd_index) == int((bench_root["test"][1][:50] != TARGET).sum())


def test_images_kept_on_disk(tmp_path, bench_root):
    """BackdoorBench's save_folder_path mode: the container holds {"path", "other_info"} and the PNG files lie in
    the record folder, named relative to the BackdoorBench checkout."""
    folder = _bad(tmp_path, bench_root)
    obj = torch.load(folder / "attack_result.pt", weights_only=False)
    table = obj["bd_test"]["bd_data_container"]["data_dict"]
    for i, (im, target, label) in list(table.items()):
        rel = f"record/bad/bd_test_dataset/{label}/{i}.png"
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        im.save(tmp_path / rel)
        table[i] = {"path": rel, "other_info": [target, label]}
    obj["bd_test"]["bd_data_container"]["save_folder_path"] = "record/bad/bd_test_dataset"
    torch.save(obj, folder / "attack_result.pt")
    rec = read_record(folder, model=_tiny_factory, clean_count=0, eval_count=60)
    ref = read_record(bench_root["record"], model=_tiny_factory, clean_count=0, eval_count=60)
    assert torch.equal(rec.bd_x, ref.bd_x) and torch.equal(rec.bd_y, ref.bd_y)  # PNG is lossless


def test_preact_resnet18_record_loads_with_its_keys(tmp_path, bench_root):
    """BackdoorBench's PreActResNet18 and fastpurify's have the same state-dict keys: a record of one loads with
    no model= at all."""
    from fastpurify.models import PreActResNet18

    torch.manual_seed(0)
    sd = PreActResNet18(10).state_dict()
    root = tmp_path
    (root / "data").symlink_to(bench_root["root"] / "data")
    folder = _write_record(root, "badnet_preact", "preactresnet18", sd, bench_root["trigger"], bench_root["test"])
    rec = read_record(folder / "attack_result.pt", clean_count=0, eval_count=20)
    assert type(rec.model).__name__ == "PreActResNet18" and _same(rec.model.state_dict(), sd)
    assert rec.evaluate().n_clean == 20


# --------------------------------------------------------------------------------------------------------
# Purify and write back
# --------------------------------------------------------------------------------------------------------

IBAU = ["--epochs", "2", "--set", "batch_size=50", "--set", "outer_portion=0.02", "--set", "delta_l2_radius=10.0"]


@pytest.mark.slow
def test_round_trip_read_purify_write_read(capsys, bench_root):
    """purify --record: I-BAU lowers the record's ASR, the result lands where BackdoorBench's analysis looks
    (record/<attack>/defense/i-bau/defense_result.pt with i-bau_df_summary.csv), and it reads back. ~8 s."""
    record = bench_root["record"]
    assert main(["purify", "ibau", "--record", str(record), "--model", TINY, "--clean-count", "300", *IBAU,
                 "--json"]) == 0
    out = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    folder = record / "defense" / "i-bau"
    assert out["out"] == str(folder) and out["status"] == "completed" and out["targets"] == [TARGET]
    # measured: ASR 99.6 -> 0.0, ACC 97.3 -> 90.0
    assert out["before"]["asr"] > 90 and out["after"]["asr"] < out["before"]["asr"] - 40, out
    assert out["after"]["acc"] > 50, out
    back = read_result(folder)
    assert back["model_name"] == "tiny_cnn" and back["num_classes"] == 10
    assert sorted(p.name for p in folder.iterdir()) == [DEFENSE_FILE, "fastpurify.json", "i-bau_df.csv",
                                                         "i-bau_df_summary.csv"]
    summary = back["summary"]["i-bau_df_summary.csv"]
    assert set(summary) == {"last", "valid_max", "exist_nan_value"}
    assert float(summary["last"]["test_asr"]) == pytest.approx(out["after"]["asr"] / 100)
    assert float(summary["last"]["test_acc"]) == pytest.approx(out["after"]["acc"] / 100)
    assert summary["exist_nan_value"]["test_ra"] == "False"
    assert back["fastpurify"]["before"]["asr"] == pytest.approx(out["before"]["asr"])
    # the written model, loaded as BackdoorBench's analysis loads it, measures what purify reported
    net = _tiny_factory(back["num_classes"])
    net.load_state_dict(back["model"])
    rec = read_record(record, model=_tiny_factory, clean_count=0)
    assert rec.evaluate(net).asr == pytest.approx(out["after"]["asr"])
    # the record itself was not touched, and evaluate --record agrees with purify's "before"
    assert main(["evaluate", "--record", str(record), "--model", TINY, "--json"]) == 0
    assert json.loads(capsys.readouterr().out)["asr"] == pytest.approx(out["before"]["asr"])


def test_write_result_python_api_and_out_dir(tmp_path, bench_root):
    rec = read_record(bench_root["record"], model=_tiny_factory, clean_count=0, eval_count=40)
    after = rec.evaluate()
    folder = write_result(rec.model, rec, after, name="my-defense", out_dir=tmp_path / "out")
    back = read_result(folder / DEFENSE_FILE)
    assert folder == tmp_path / "out" and _same(back["model"], rec.model.state_dict())
    summary = back["summary"]["my-defense_df_summary.csv"]
    assert float(summary["valid_max"]["test_acc"]) == pytest.approx(after.acc / 100)
    write_result(rec.model, rec, after, name="my-defense", out_dir=tmp_path / "out")  # its own result: overwritten
    # by path, without a record object: model_name / num_classes come from the record file
    folder = write_result(rec.model, bench_root["record"], name="by-path", out_dir=tmp_path / "by-path")
    assert read_result(folder)["model_name"] == "tiny_cnn" and read_result(folder)["summary"] == {}


def test_never_overwrites_a_result_fastpurify_did_not_write(capsys, tmp_path, bench_root):
    foreign = tmp_path / "theirs"
    foreign.mkdir()
    torch.save({"model_name": "tiny_cnn", "num_classes": 10, "model": {}}, foreign / DEFENSE_FILE)
    rec = read_record(bench_root["record"], model=_tiny_factory, clean_count=0, eval_count=20)
    with pytest.raises(RecordError, match="that fastpurify did not write"):
        write_result(rec.model, rec, out_dir=foreign)
    err = _err(capsys, ["purify", "bcu", "--record", str(bench_root["record"]), "--model", TINY, "--out", str(foreign),
                        "--epochs", "1"])
    assert "not overwriting it" in err


# --------------------------------------------------------------------------------------------------------
# Malformed records and bad options: one clear line
# --------------------------------------------------------------------------------------------------------


def _err(capsys, argv):
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("fastpurify: error: ") and "Traceback" not in err and len(err.strip().splitlines()) == 1
    return err


def _bad(root, bench_root, **changes):
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "data").exists():
        (root / "data").symlink_to(bench_root["root"] / "data")
    name = changes.pop("model_name", "tiny_cnn")
    return _write_record(root, "bad", name, bench_root["net"].state_dict(), bench_root["trigger"], bench_root["test"],
                         **changes)


@pytest.mark.parametrize("changes,expected", [
    ({"bd_test": None, "model": None}, "'model' is a NoneType"),
    ({"num_classes": "10"}, "'num_classes' is a str"),
    ({"data_path": "./nowhere/cifar10"}, "the record's data_path './nowhere/cifar10' holds no CIFAR-10 python batches"),
    ({"img_size": [64, 64, 3]}, "img_size [64, 64, 3] does not match cifar10 ([32, 32, 3])"),
    ({"clean_data": "gtsrb"}, "clean_data 'gtsrb': fastpurify reads records of cifar10 only"),
    ({"bd_test": {"x": torch.zeros(1), "y": torch.zeros(1)}}, "the format of BackdoorBench 1.x"),
    ({"bd_test": {"poison_indicator": np.zeros(3)}}, "bd_test is not a poisoned-dataset state"),
    ({"num_classes": 7}, "2 tensors have the wrong shape for the model (Sequential, for model_name 'tiny_cnn')"),
])
def test_malformed_records(capsys, tmp_path, bench_root, changes, expected):
    folder = _bad(tmp_path, bench_root, **changes)
    with pytest.raises((RecordError, FileNotFoundError, ValueError)) as info:
        read_record(folder, model=_tiny_factory, clean_count=0)
    assert expected in str(info.value), info.value
    err = _err(capsys, ["evaluate", "--record", str(folder), "--model", TINY])
    assert expected in err


def test_missing_keys_and_unknown_model_name(capsys, tmp_path, bench_root):
    folder = _bad(tmp_path, bench_root)
    obj = torch.load(folder / "attack_result.pt", weights_only=False)
    del obj["img_size"], obj["bd_test"]
    torch.save(obj, folder / "attack_result.pt")
    err = _err(capsys, ["evaluate", "--record", str(folder)])
    assert "is not a BackdoorBench attack record: missing key(s) ['img_size', 'bd_test']" in err
    folder = _bad(tmp_path / "b", bench_root, model_name="vgg19_bn")
    err = _err(capsys, ["evaluate", "--record", str(folder)])
    assert "model_name 'vgg19_bn' has no fastpurify equivalent" in err and "--model MODULE:FACTORY" in err


def test_wrong_data_and_foreign_pickles(capsys, tmp_path, bench_root):
    folder = _bad(tmp_path, bench_root)
    other = tmp_path / "other"  # a CIFAR folder of the right size whose labels are not the attack's
    from fastpurify.data import synthetic_dataset

    xs, ys = synthetic_dataset(n=N_TEST, seed=7, split="test")
    _write_cifar(other / "cifar-10-batches-py", (xs, ys), (xs, (ys + 1) % 10))
    err = _err(capsys, ["evaluate", "--record", str(folder), "--model", TINY, "--data", str(other)])
    assert "carry an original label that differs from the test set" in err
    folder = _bad(tmp_path / "c", bench_root, extra=Path("x"))  # a global outside the format
    err = _err(capsys, ["evaluate", "--record", str(folder), "--model", TINY])
    assert "holds a pickled pathlib.PosixPath" in err
    err = _err(capsys, ["evaluate", "--record", str(tmp_path / "c")])
    assert "holds no attack_result.pt" in err


@pytest.mark.parametrize("extra,expected", [
    (["--checkpoint", "x.pth"], "--checkpoint: not with --record"),
    (["--trigger", "patch:size=3", "--target", "0"], "--trigger, --target: not with --record"),
    (["--arch", "small_vgg"], "--arch: not with --record"),
    (["--model-kwargs", "{}"], "--model-kwargs needs --model"),
    (["--model", "userpkg.net:nothing"], "userpkg.net has no attribute 'nothing'"),
])
def test_record_options_checked_first(capsys, bench_root, extra, expected):
    for command in (["evaluate"], ["purify", "ibau"]):
        err = _err(capsys, [*command, "--record", str(bench_root["record"]), *extra])
        assert expected in err, err
