"""Reference BCU: layer groups from the structure, the re-initialisation rates, distillation that lowers
the attack success of a backdoored model without labels, determinism, validation; the runs on every available
device (cuda when present)."""

import pytest
import torch
from torch import nn

from fastpurify.metrics import evaluate
from fastpurify.models import PreActResNet18, ResNet18, SmallVGG
from fastpurify.reference.defenses.bcu import BCUConfig, bcu, layer_groups, reinitialize


class TVStyleVGG(nn.Module):
    """torchvision-style names (features.N / classifier.N), grouped, 1×1 and dilated convs: the authors'
    name-based grouping would put every layer in the stem group."""

    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),               # out 32x32: stem
            nn.Conv2d(16, 32, 3, padding=1, groups=2), nn.ReLU(), nn.MaxPool2d(2),    # 16x16
            nn.Conv2d(32, 32, 1), nn.ReLU(), nn.MaxPool2d(2),                         # 8x8
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),              # 4x4
            nn.Conv2d(64, 64, 3, padding=2, dilation=2), nn.ReLU(),                   # 2x2
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(256, 32), nn.ReLU(), nn.Linear(32, 10))

    def forward(self, x):
        return self.classifier(self.features(x))


def test_layer_groups_follow_structure_not_names():
    x = torch.rand(2, 3, 32, 32)
    g = layer_groups(PreActResNet18(), x)
    assert g["conv1"] == "stem" and g["linear"] == "classifier"  # authors' prefixes would give 'stem' to linear
    assert g["layer1.1.conv2"] == "stage1" and g["layer2.0.shortcut.0"] == "stage2"
    assert g["layer3.0.conv1"] == "stage3" and g["layer4.1.conv2"] == "stage4"
    assert layer_groups(ResNet18(), x)["layer4.0.shortcut.0"] == "stage4"
    v = layer_groups(SmallVGG(), x)
    assert (v["features.0"], v["features.3"], v["features.11"], v["features.19"], v["classifier"]) == (
        "stem", "stage2", "stage3", "stage4", "classifier")
    t = layer_groups(TVStyleVGG(), x)
    assert t["features.0"] == "stem" and t["classifier.1"] == "classifier" and t["classifier.3"] == "classifier"
    assert (t["features.3"], t["features.6"], t["features.9"], t["features.12"]) == (
        "stage1", "stage2", "stage3", "stage4")
    o = layer_groups(PreActResNet18(), x, stage_map={"layer1": "stage3", "linear": "stage4"})
    assert o["layer1.0.conv1"] == "stage3" and o["linear"] == "stage4" and o["layer2.0.conv1"] == "stage2"


def test_reinitialize_replaces_the_expected_fraction():
    m = PreActResNet18()
    ref = {k: v.clone() for k, v in m.state_dict().items()}
    groups = layer_groups(m, torch.rand(2, 3, 32, 32))
    counts = reinitialize(m, groups, {"stage4": 0.5, "stem": 0.0}, torch.Generator().manual_seed(0))
    assert counts["stem"]["replaced"] == 0 and counts["stem"]["total"] == 64 * 3 * 9
    frac = counts["stage4"]["replaced"] / counts["stage4"]["total"]
    assert 0.49 < frac < 0.51
    changed = (m.layer4[0].conv1.weight != ref["layer4.0.conv1.weight"]).float().mean()
    assert 0.45 < changed < 0.55
    for k, v in m.state_dict().items():  # BN parameters and buffers are the teacher's
        if ".bn" in k:
            assert torch.equal(v, ref[k]), k


def test_bcu_lowers_attack_success_without_labels(backdoored, device):
    b = backdoored
    r = bcu(b["model"], b["x"], epochs=8, batch_size=64, progress=False, seed=0, device=device)
    after = evaluate(r.model, b["x_test"], b["y_test"], trigger=b["trigger"], target=b["target"])
    assert after.asr < b["before"].asr - 40, (b["before"], after)
    assert r.status == "completed" and len(r.history) == 8 and r.history[-1]["temperature"] == pytest.approx(4.0)
    assert r.info["layer_groups"]["classifier"] == "classifier"
    assert not r.model.training  # the fixture model was in eval mode


def _same(a, b, device) -> bool:
    """Bit-equal states; on CUDA within 1e-5 relative, since cuDNN may pick another algorithm (and sum in another
    order) from one call to the next (not measured on a GPU here)."""
    pairs = list(zip(a.state_dict().values(), b.state_dict().values()))
    if device.type == "cpu":
        return all(torch.equal(u, v) for u, v in pairs)
    return all(torch.allclose(u.float(), v.float(), rtol=1e-5, atol=1e-6) for u, v in pairs)


def test_bcu_is_deterministic_and_ignores_labels(backdoored, device):
    b = backdoored
    kw = dict(epochs=1, batch_size=100, progress=False, seed=7, device=device)
    r1 = bcu(b["model"], b["x"][:200], **kw)
    r2 = bcu(b["model"], (b["x"][:200], b["y"][:200]), **kw)
    assert _same(r1.model, r2.model, device)
    r3 = bcu(b["model"], b["x"][:200], **dict(kw, seed=8))
    assert not _same(r1.model, r3.model, device)


@pytest.mark.parametrize("kw,error,match", [
    ({"reinit_rates": {"stage5": 0.1}}, ValueError, r"unknown group\(s\) \['stage5'\]; valid groups: stem, stage1"),
    ({"reinit_rates": {"stage4": 1.5}}, ValueError,
     r"reinit_rates\['stage4'\] must be a probability in \[0, 1\], got 1.5"),
    ({"stage_map": {"layer1": "middle"}}, ValueError, r"unknown group\(s\) \{'layer1': 'middle'\}"),
    ({"lr": 0}, ValueError, r"lr must be a positive number, got 0"),
    ({"epochs": 2.5}, TypeError, r"epochs must be an integer, got 2.5"),  # a wrong type
])
def test_bcu_validates(kw, error, match):
    with pytest.raises(error, match=match):
        bcu(SmallVGG(), torch.rand(8, 3, 32, 32), progress=False, batch_size=4, **kw)
    assert BCUConfig().reinit_rates["stage4"] == 0.27
