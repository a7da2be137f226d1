"""Large-model families (issue 16): the ResNet-50 and ViT layouts, and every defense — reference and fast path — on
small-width versions of both.

Fast tests: the full-size layouts (torchvision's parameter counts and state-dict keys), the small versions' forward
and backward at 224×224, the per-architecture choices (AWM's mask_layers, BCU's groups). ``slow`` tests: each of the
five defenses, reference and fast, one step on a batch of 2 at 224×224 (the shapes work end to end). Not here yet:
the purification test (a small ResNet-50 and ViT backdoored in the suite, each defense lowering the ASR while
keeping the ACC) — training one took longer than the suite can afford on 2 CPU cores (issue 16, open).

I-BAU differentiates the model twice, and PyTorch's fused CPU attention kernel
(``_scaled_dot_product_flash_attention_for_cpu``, which ``nn.MultiheadAttention`` picks) has no double backward: both
I-BAU paths run under ``sdpa_kernel(SDPBackend.MATH)`` themselves (``twice_differentiable_attention``), and the
ViT test below runs them as a user would, without it.
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fastpurify
from fastpurify.models import ARCHS, ResNet50, ViT, build_model
from fastpurify.reference import defenses as ref

pytestmark = pytest.mark.usefixtures("one_thread")

DEFENSES = ("sau", "ibau", "awm", "baerase", "bcu")


def small_resnet50(num_classes: int = 10) -> nn.Module:
    """ResNet-50's layout (bottlenecks [3, 4, 6, 3], 7×7/2 stem + max-pool) at base width 8 instead of 64."""
    torch.manual_seed(0)
    return ResNet50(num_classes, width=8)


def small_vit(num_classes: int = 10, image_size: int = 224, patch: int = 16) -> nn.Module:
    """ViT-B/16's layout at dim 32, depth 4, 2 heads; the head drawn N(0, 0.1) instead of torchvision's zeros (a
    zero head sends no gradient into the body, so an untrained model would give the defenses nothing to do)."""
    torch.manual_seed(0)
    net = ViT(num_classes, dim=32, depth=4, heads=2, patch=patch, image_size=image_size)
    nn.init.normal_(net.heads.head.weight, std=0.1)
    return net


# ---------------------------------------------------------------------------------------------- layouts


@pytest.mark.slow  # builds 112 M parameters: ~16 s on one loaded core
def test_full_size_layouts_are_torchvisions():
    """Parameter counts of torchvision's resnet50() / vit_b_16() (1,000 classes) and their state-dict key names."""
    r = build_model("resnet50", 1000)
    assert sum(p.numel() for p in r.parameters()) == 25_557_032
    keys = set(r.state_dict())
    assert len(keys) == 320
    assert {"conv1.weight", "bn1.running_mean", "layer1.0.downsample.0.weight", "layer1.0.downsample.1.bias",
            "layer3.5.conv3.weight", "layer4.2.bn3.num_batches_tracked", "fc.weight", "fc.bias"} <= keys
    assert "layer1.1.downsample.0.weight" not in keys and r.layer2[0].conv2.stride == (2, 2)  # v1.5: 3×3 strides
    v = build_model("vit", 1000)
    assert sum(p.numel() for p in v.parameters()) == 86_567_656
    keys = set(v.state_dict())
    assert {"class_token", "conv_proj.weight", "encoder.pos_embedding", "encoder.ln.weight", "heads.head.weight",
            "encoder.layers.encoder_layer_11.self_attention.in_proj_weight",
            "encoder.layers.encoder_layer_0.self_attention.out_proj.bias",
            "encoder.layers.encoder_layer_0.mlp.0.weight", "encoder.layers.encoder_layer_0.mlp.3.bias",
            "encoder.layers.encoder_layer_0.ln_1.weight", "encoder.layers.encoder_layer_0.ln_2.bias"} <= keys
    assert v.encoder.pos_embedding.shape == (1, 197, 768) and v.conv_proj.stride == (16, 16)
    assert {"resnet50", "vit"} <= set(ARCHS)


@pytest.mark.parametrize("make", [small_resnet50, small_vit], ids=["resnet50", "vit"])
def test_small_versions_train_at_224(make):
    net = make()
    x = torch.rand(8, 3, 224, 224)
    loss = F.cross_entropy(net(x), torch.arange(8) % 10)
    loss.backward()
    assert torch.isfinite(loss)
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in net.parameters())


def test_vit_other_input_sizes_and_errors():
    net = small_vit(image_size=224).eval()
    assert net(torch.rand(2, 3, 64, 64)).shape == (2, 10)  # 4×4 patches: the position grid is resized
    with pytest.raises(ValueError, match="not a multiple of the patch size 16"):
        net(torch.rand(1, 3, 40, 40))
    with pytest.raises(ValueError, match=r"dim \(30\) must be a multiple of heads \(4\)"):
        ViT(dim=30, heads=4)
    with pytest.raises(ValueError, match="width must be a positive integer"):
        ResNet50(width=0)


def test_per_architecture_choices():
    """AWM masks a ViT's Linear / attention weights on request and refuses the published 'conv' (its one conv is
    the patch embedding); BCU groups the ViT by block and the ResNet-50 by resolution."""
    vit, x = small_vit(), torch.rand(2, 3, 224, 224)
    with pytest.raises(ValueError, match=r"mask_layers='conv\+linear'"):
        fastpurify.awm(vit, (x, torch.tensor([0, 1])), progress=False)
    from fastpurify.reference.defenses.awm import maskable_layers
    from fastpurify.reference.defenses.bcu import layer_groups

    keys = [k for k, _, _ in maskable_layers(vit, "conv+linear")]
    assert keys[0] == "conv_proj" and "encoder.layers.encoder_layer_3.self_attention.in_proj_weight" in keys
    g = layer_groups(vit, x)
    assert [g[f"encoder.layers.encoder_layer_{i}.mlp.0"] for i in range(4)] == ["stage1", "stage2", "stage3",
                                                                                "stage4"]
    assert g["conv_proj"] == "stem" and g["heads.head"] == "classifier"
    r = layer_groups(small_resnet50(), torch.rand(2, 3, 64, 64))
    assert (r["conv1"], r["layer1.2.conv3"], r["layer3.0.conv2"], r["layer4.2.conv3"], r["fc"]) == (
        "stem", "stage1", "stage3", "stage4", "classifier")


# ---------------------------------------------------------------------------------------------- every defense


#: One step of each defense on a batch of 2 (the smallest settings that run every phase once).
ONE_STEP = {
    "sau": dict(batch_size=2, pgd_steps=1),
    "ibau": dict(batch_size=2, K=1),
    "awm": dict(batch_size=2, inner=1),
    "baerase": dict(batch_size=2, recovery_epochs=1, hidden_size=32, noise_dim=8, target=0),
    "bcu": dict(batch_size=2),
}


@pytest.mark.slow
@pytest.mark.parametrize("impl", ["reference", "fast"])
@pytest.mark.parametrize("defense", DEFENSES)
@pytest.mark.parametrize("family", ["resnet50", "vit"])
def test_every_defense_runs_at_224(family, defense, impl):
    """Each defense, reference and fast, one step at 224×224 (batch 2): a completed run that returns the user's
    class with finite weights, and the user's model untouched."""
    net = (small_resnet50 if family == "resnet50" else small_vit)(4).eval()
    state = {k: v.clone() for k, v in net.state_dict().items()}
    x, y = torch.rand(2, 3, 224, 224), torch.tensor([1, 2])
    kw = dict(ONE_STEP[defense], epochs=1, progress=False, seed=0)
    if defense == "awm" and family == "vit":
        kw["mask_layers"] = "conv+linear"
    fn = getattr(ref if impl == "reference" else fastpurify, defense)
    r = fn(net, x if defense == "bcu" else (x, y), **kw)  # I-BAU on a ViT: no sdpa_kernel needed by the caller
    assert r.status == "completed" and type(r.model) is type(net)
    assert all(torch.isfinite(p).all() for p in r.model.parameters())
    assert r.model.eval()(x).shape == (2, 4)
    assert all(torch.equal(v, state[k]) for k, v in net.state_dict().items())
