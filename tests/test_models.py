"""Models: checkpoint compatibility with the real I-BAU files, forward shapes, load_checkpoint layouts and errors."""

from __future__ import annotations

import pytest
import torch

from fastpurify.data import default_data_dir
from fastpurify.models import (
    ARCHS,
    CheckpointError,
    PreActResNet18,
    ResNet18,
    SmallVGG,
    build_model,
    extract_state_dict,
    load_checkpoint,
)

IBAU = default_data_dir() / "ibau"
BADNETS = IBAU / "badnets_8_02_ckpt.pth"
needs_ibau = pytest.mark.skipif(
    not BADNETS.is_file(), reason=f"real I-BAU checkpoints not found at {IBAU} (set FASTPURIFY_DATA)"
)


@pytest.fixture(scope="module")
def vgg_sd():
    torch.manual_seed(0)
    return SmallVGG().state_dict()


# ---------------------------------------------------------------------------------------------- architectures


@needs_ibau
def test_small_vgg_matches_real_checkpoint_exactly():
    sd = torch.load(BADNETS, map_location="cpu", weights_only=True)["net"]
    model_sd = SmallVGG().state_dict()
    assert list(model_sd) == list(sd)  # same keys in the same order
    for k, v in sd.items():
        assert model_sd[k].shape == v.shape, k
    SmallVGG().load_state_dict(sd, strict=True)


def test_small_vgg_layer_indices():
    f = SmallVGG().features
    convs = [i for i, m in enumerate(f) if isinstance(m, torch.nn.Conv2d)]
    bns = [i for i, m in enumerate(f) if isinstance(m, torch.nn.BatchNorm2d)]
    drops = [m.p for m in f if isinstance(m, torch.nn.Dropout)]
    assert convs == [0, 3, 8, 11, 16, 19]
    assert bns == [1, 4, 9, 12, 17, 20]
    assert drops == [0.3, 0.4, 0.4]
    assert [f[i].out_channels for i in convs] == [32, 32, 64, 64, 128, 128]


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("num_classes", [10, 43])
def test_forward_shapes(arch, num_classes):
    model = build_model(arch, num_classes).eval()
    with torch.no_grad():
        out = model(torch.rand(3, 3, 32, 32))
    assert out.shape == (3, num_classes)
    assert torch.isfinite(out).all()


def test_preact_resnet18_layout():
    m = PreActResNet18()
    keys = set(m.state_dict())
    assert "linear.weight" in keys and "conv1.weight" in keys
    assert "bn1.weight" not in keys  # no stem BN and no final BN before pooling
    assert "layer1.0.shortcut.0.weight" not in keys  # identity block: no shortcut
    assert m.layer2[0].shortcut[0].weight.shape == (128, 64, 1, 1)
    assert len(m.layer2[0].shortcut) == 1  # conv only, no BN
    assert {"layer1.0.bn1.weight", "layer1.0.conv1.weight", "layer1.0.bn2.weight", "layer1.0.conv2.weight"} <= keys
    assert isinstance(m.avgpool, torch.nn.AdaptiveAvgPool2d)
    assert sum(p.numel() for p in m.parameters()) == 11_171_146


def test_resnet18_layout():
    m = ResNet18()
    keys = set(m.state_dict())
    assert {"conv1.weight", "bn1.weight", "linear.weight", "layer2.0.shortcut.1.running_mean"} <= keys
    assert not any(k.startswith("layer1.0.shortcut") for k in keys)
    assert m.conv1.kernel_size == (3, 3) and m.conv1.stride == (1, 1)
    assert sum(p.numel() for p in m.parameters()) == 11_173_962


def test_build_model_unknown_arch():
    with pytest.raises(ValueError) as e:
        build_model("vgg19")
    msg = str(e.value)
    assert "'vgg19'" in msg and all(name in msg for name in ARCHS)
    with pytest.raises(ValueError, match="num_classes"):
        build_model("small_vgg", 0)


# ---------------------------------------------------------------------------------------------- load_checkpoint


@pytest.mark.parametrize("layout", ["plain", "net", "model", "state_dict", "dataparallel"])
def test_load_checkpoint_layouts(tmp_path, vgg_sd, layout):
    sd = {f"module.{k}": v for k, v in vgg_sd.items()} if layout == "dataparallel" else vgg_sd
    obj = sd if layout in ("plain", "dataparallel") else {layout: sd, "acc": 90.0, "epoch": 3}
    path = tmp_path / "ckpt.pth"
    torch.save(obj, path)
    model = load_checkpoint(path)
    assert isinstance(model, SmallVGG) and not model.training
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, vgg_sd[k], rtol=0, atol=0)


def test_load_checkpoint_infers_num_classes(tmp_path):
    torch.save({"model": build_model("preact_resnet18", 43).state_dict()}, tmp_path / "p.pth")
    model = load_checkpoint(tmp_path / "p.pth", arch="preact_resnet18")
    assert isinstance(model, PreActResNet18) and model.linear.out_features == 43


@pytest.mark.skipif(not BADNETS.is_file(), reason=f"real I-BAU checkpoints not found at {IBAU}")
def test_load_real_checkpoint():
    model = load_checkpoint(BADNETS)
    sd = torch.load(BADNETS, map_location="cpu", weights_only=True)["net"]
    torch.testing.assert_close(model.features[19].weight, sd["features.19.weight"], rtol=0, atol=0)
    assert not model.training


def test_missing_file(tmp_path):
    path = tmp_path / "nope.pth"
    with pytest.raises(FileNotFoundError, match="nope.pth"):
        load_checkpoint(path)


def test_not_a_checkpoint(tmp_path):
    path = tmp_path / "notes.pth"
    path.write_text("hello, not a checkpoint")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    assert "notes.pth" in str(e.value) and "not a torch checkpoint" in str(e.value)


def test_truncated_checkpoint(tmp_path, vgg_sd):
    full = tmp_path / "full.pth"
    torch.save(vgg_sd, full)
    cut = tmp_path / "cut.pth"
    cut.write_bytes(full.read_bytes()[:3000])
    with pytest.raises(CheckpointError, match="cut.pth.*not a readable torch checkpoint"):
        load_checkpoint(cut)


def test_pickled_module_is_refused(tmp_path):
    path = tmp_path / "whole.pth"
    torch.save(torch.nn.Linear(2, 2), path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "torch.nn.modules.linear.Linear" in msg and "state_dict()" in msg


def test_unknown_layout_lists_keys(tmp_path, vgg_sd):
    path = tmp_path / "odd.pth"
    torch.save({"weights": vgg_sd, "acc": 1.0}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "'weights'" in msg and "'acc'" in msg and "'net'" in msg and "'state_dict'" in msg


def test_layout_key_without_state_dict(tmp_path):
    path = tmp_path / "bad.pth"
    torch.save({"net": [1, 2, 3]}, path)
    with pytest.raises(CheckpointError, match="'net' holds a list"):
        load_checkpoint(path)


def test_wrong_arch_suggests_the_right_one(tmp_path, vgg_sd):
    path = tmp_path / "vgg.pth"
    torch.save({"net": vgg_sd}, path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path, arch="resnet18")
    msg = str(e.value)
    assert "arch='resnet18'" in msg
    assert "122 missing keys" in msg and "44 unexpected keys" in msg
    assert "features.0.weight" in msg and "conv1.weight" in msg  # a few of each are shown
    assert "fits arch='small_vgg'" in msg


def test_foreign_keys_no_suggestion(tmp_path):
    path = tmp_path / "mlp.pth"
    torch.save(torch.nn.Sequential(torch.nn.Linear(4, 2)).state_dict(), path)
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(path)
    msg = str(e.value)
    assert "2 unexpected keys (0.weight, 0.bias)" in msg and "none of" in msg


def test_partial_missing_keys(tmp_path, vgg_sd):
    sd = {k: v for k, v in vgg_sd.items() if not k.startswith("features.19.")}
    torch.save(sd, tmp_path / "partial.pth")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "partial.pth")
    assert "2 missing keys (features.19.weight, features.19.bias)" in str(e.value)
    assert "unexpected" not in str(e.value)


def test_shape_mismatch(tmp_path, vgg_sd):
    sd = dict(vgg_sd)
    sd["features.3.weight"] = torch.zeros(32, 32, 5, 5)
    torch.save(sd, tmp_path / "shape.pth")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "shape.pth")
    msg = str(e.value)
    assert "features.3.weight" in msg and "(32, 32, 5, 5)" in msg and "(32, 32, 3, 3)" in msg


def test_num_classes_mismatch(tmp_path, vgg_sd):
    torch.save(vgg_sd, tmp_path / "ten.pth")
    with pytest.raises(CheckpointError) as e:
        load_checkpoint(tmp_path / "ten.pth", num_classes=43)
    msg = str(e.value)
    assert "10 classes" in msg and "num_classes=43" in msg and "classifier.weight" in msg


def test_unknown_arch_before_reading(tmp_path):
    with pytest.raises(ValueError, match="unknown architecture 'vgg'.*small_vgg"):
        load_checkpoint(tmp_path / "whatever.pth", arch="vgg")


def test_extract_state_dict_strips_prefixes():
    sd = extract_state_dict({"state_dict": {"module._orig_mod.a": torch.zeros(1)}})
    assert list(sd) == ["a"]
    mixed = extract_state_dict({"module.a": torch.zeros(1), "b": torch.zeros(1)})
    assert sorted(mixed) == ["b", "module.a"]  # only a prefix shared by every key is a wrapper's
