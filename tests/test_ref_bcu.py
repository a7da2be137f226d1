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


class TimmStyleViT(nn.Module):
    """timm's layout: patch_embed.proj conv, blocks (ModuleList) of attn.qkv / attn.proj Linear layers (no
    nn.MultiheadAttention) and mlp.fc1 / mlp.fc2, norm, head on the class token."""

    def __init__(self, depth=6, dim=16, patch=8):
        super().__init__()
        self.patch_embed = nn.Module()
        self.patch_embed.proj = nn.Conv2d(3, dim, patch, stride=patch)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
        self.blocks = nn.ModuleList()
        for _ in range(depth):
            b = nn.Module()
            b.norm1, b.norm2 = nn.LayerNorm(dim), nn.LayerNorm(dim)
            b.attn = nn.Module()
            b.attn.qkv, b.attn.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
            b.mlp = nn.Module()
            b.mlp.fc1, b.mlp.fc2 = nn.Linear(dim, 2 * dim), nn.Linear(2 * dim, dim)
            self.blocks.append(b)
        self.norm, self.head = nn.LayerNorm(dim), nn.Linear(dim, 10)

    def forward(self, x):
        x = self.patch_embed.proj(x).flatten(2).transpose(1, 2)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        for b in self.blocks:
            q, k, v = b.attn.qkv(b.norm1(x)).chunk(3, dim=-1)
            x = x + b.attn.proj(torch.softmax(q @ k.transpose(1, 2) / 4, -1) @ v)
            x = x + b.mlp.fc2(torch.relu(b.mlp.fc1(b.norm2(x))))
        return self.head(self.norm(x)[:, 0])


def test_layer_groups_of_transformers_by_block():
    """A ViT keeps one token 'resolution': the patch embedding is the stem, the blocks split by depth into the four
    stages (fewer than four blocks: the deepest stages), attention's out_proj joins its block, the head is the
    classifier — for torchvision's layout (nn.MultiheadAttention) and timm's (Linear qkv / proj)."""
    from fastpurify.models import ViT

    x = torch.rand(2, 3, 32, 32)
    g = layer_groups(ViT(10, dim=32, depth=12, heads=2, patch=8, image_size=32), x)
    blk = "encoder.layers.encoder_layer_{}.".format
    assert g["conv_proj"] == "stem" and g["heads.head"] == "classifier"
    assert [g[blk(i) + "self_attention"] for i in range(12)] == [f"stage{1 + i // 3}" for i in range(12)]
    assert all(g[blk(i) + s] == g[blk(i) + "self_attention"] for i in range(12)
               for s in ("self_attention.out_proj", "mlp.0", "mlp.3"))
    g2 = layer_groups(ViT(10, dim=32, depth=2, heads=2, patch=8, image_size=32), x)
    assert (g2[blk(0) + "mlp.3"], g2[blk(1) + "self_attention.out_proj"]) == ("stage3", "stage4")
    t = layer_groups(TimmStyleViT(depth=6), x)
    assert t["patch_embed.proj"] == "stem" and t["head"] == "classifier"
    assert [t[f"blocks.{i}.attn.qkv"] for i in range(6)] == ["stage1", "stage1", "stage2", "stage3", "stage3",
                                                             "stage4"]
    assert t["blocks.5.mlp.fc2"] == t["blocks.5.attn.proj"] == "stage4"
    assert layer_groups(TimmStyleViT(), x, stage_map={"blocks.0": "stage4"})["blocks.0.mlp.fc1"] == "stage4"


def test_reinitialize_attention_weights():
    from fastpurify.models import ViT

    m = ViT(10, dim=32, depth=4, heads=2, patch=8, image_size=32)
    attn = m.encoder.layers.encoder_layer_3.self_attention
    w0, b0 = attn.in_proj_weight.detach().clone(), attn.in_proj_bias.detach().clone() + 1.0
    with torch.no_grad():
        attn.in_proj_bias.add_(1.0)  # a trained bias: 1; a fresh one is MultiheadAttention's 0
    groups = layer_groups(m, torch.rand(2, 3, 32, 32))
    counts = reinitialize(m, groups, {"stage4": 0.5}, torch.Generator().manual_seed(0))
    # stage 4 = block 3: in_proj weight + bias, out_proj weight + bias, the MLP's two Linear layers
    assert counts["stage4"]["total"] == 3 * 32 * 32 + 3 * 32 + 32 * 32 + 32 + 2 * (32 * 128) + 128 + 32
    assert 0.45 < float((attn.in_proj_weight != w0).float().mean()) < 0.55
    bias = attn.in_proj_bias.detach()
    assert 0.3 < float((bias == 0).float().mean()) < 0.7 and bool(((bias == 0) | (bias == b0)).all())
    bound = (6 / (32 + 96)) ** 0.5  # Xavier uniform of the (96, 32) projection
    assert float(attn.in_proj_weight[attn.in_proj_weight != w0].abs().max()) <= bound
