"""Reference BAERASE (fastpurify/reference/defenses/baerase.py): the math pieces (DV bound, MINE's corrected
objective, stamping, the batched per-class networks), the contract, and that it detects the target and purifies
a tiny backdoored model, on every available device (cuda when present).

The tiny model (3 conv layers, 16/32/64 channels) is trained once per module on 1,500 synthetic images with a
3×3 white patch at a random position per poisoned image (20 % poisoned, target 0): about 94 % ACC and 91 % ASR.
BAERASE's generator stamps its patches at random locations, the threat model of the published code (random-
position BadNets); on a fixed-corner patch its random-location patches flip about 1 % of images.
"""

import copy
import math

import pytest
import torch
from _tiny import RandomPatch, patch_backdoored, tiny_cnn
from torch import nn

from fastpurify.data import synthetic_dataset
from fastpurify.defenses._loop import PurifyResult
from fastpurify.metrics import evaluate
from fastpurify.reference.defenses.baerase import Generator, Mine, baerase, dv_bound, location, mine_loss, stamp

# conftest's: the CPU, and CUDA marked gpu (a module-scoped fixture cannot take the function-scoped `device`)
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.gpu, id="cuda")]


def _tiny(num_classes: int = 10) -> nn.Module:
    return tiny_cnn(64, num_classes=num_classes)


def _same(a: nn.Module, b: nn.Module, device=None) -> bool:
    """Bit-equal states; on CUDA within 1e-5 relative, since cuDNN may pick another algorithm (and sum in another
    order) from one call to the next (not measured on a GPU here)."""
    sa, sb = a.state_dict(), b.state_dict()
    if device is None or torch.device(device).type == "cpu":
        return sa.keys() == sb.keys() and all(torch.equal(sa[k], sb[k]) for k in sa)
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k].float(), sb[k].float(), rtol=1e-5, atol=1e-6)
                                          for k in sa)


@pytest.fixture(scope="module", autouse=True)
def _threads():
    old = torch.get_num_threads()
    torch.set_num_threads(min(old, 2))
    yield
    torch.set_num_threads(old)


@pytest.fixture(scope="module")
def backdoored():
    return patch_backdoored()


@pytest.fixture(scope="module")
def clean():
    return synthetic_dataset(n=160, seed=7)


# Small networks and few steps so that the detection (10 generators at once) fits a unit test; a larger
# generator lr (2e-3 instead of 2e-4) makes up for the 15 generator steps instead of the published 200.
SMALL = dict(hidden_size=64, recovery_epochs=3, batch_size=32, gen_lr=2e-3)


@pytest.fixture(scope="module", params=DEVICES)
def detected(request, backdoored, clean):
    """The detection run on each available device (one module-scoped run per device)."""
    before = copy.deepcopy(backdoored)
    result = baerase(backdoored, clean, target=None, epochs=2, progress=False, seed=0, device=request.param, **SMALL)
    return before, result, torch.device(request.param)


# ---------------------------------------------------------------------------------------------- the math


def test_dv_bound_known_cases():
    # Two equal fair bits: MI = log 2. The optimal critic T = log p(z,y)/(p(z)p(y)) is log 2 on the diagonal and
    # -inf off it; joint samples (0,0), (1,1); product-of-marginals samples: all four pairs.
    big = -1e4
    t_joint = torch.tensor([[math.log(2), math.log(2)]])
    t_marg = torch.tensor([[math.log(2), big, big, math.log(2)]])
    assert dv_bound(t_joint, t_marg).item() == pytest.approx(math.log(2), abs=1e-6)
    # Independent variables / a constant critic: the bound is 0; it is batched over the first dimension.
    c = torch.tensor([[1.5] * 3, [-2.0] * 3])
    assert torch.allclose(dv_bound(c, c), torch.zeros(2), atol=1e-6)
    # A suboptimal critic (0 instead of -inf off the diagonal) gives a looser bound: log 2 - log 1.5 = log 4/3.
    t_marg0 = torch.tensor([[math.log(2), 0.0, 0.0, math.log(2)]])
    assert dv_bound(t_joint, t_marg0).item() == pytest.approx(math.log(4 / 3), abs=1e-6)


def test_mine_loss_moving_average_and_gradient():
    torch.manual_seed(0)
    tj = torch.randn(2, 8, requires_grad=True)
    tm = torch.randn(2, 8, requires_grad=True)
    ma = [None, None]
    # First call: the average starts at e = mean exp T_marginal; the value and gradient then equal the DV bound's.
    et = torch.exp(tm.detach()).mean(-1)
    loss = mine_loss(tj, tm, ma, rate=0.001)
    assert ma == pytest.approx(et.tolist())
    g_mine = torch.autograd.grad(loss.sum(), [tj, tm])
    g_dv = torch.autograd.grad(dv_bound(tj, tm).sum(), [tj, tm])
    for a, b in zip(g_mine, g_dv):
        assert torch.allclose(a, b, atol=1e-6)
    # Second call: ā moves by rate·(e − ā) and the marginal gradient is ∇e/ā, not ∇e/e.
    tm2 = (tm.detach() + 1.0).requires_grad_(True)
    e2 = torch.exp(tm2.detach()).mean(-1)
    old = list(ma)
    loss2 = mine_loss(tj, tm2, ma, rate=0.5)
    assert ma == pytest.approx([o + 0.5 * (e - o) for o, e in zip(old, e2.tolist())])
    (g,) = torch.autograd.grad(loss2.sum(), [tm2])
    expected = -torch.exp(tm2.detach()) / 8 / torch.tensor(ma).unsqueeze(1)
    assert torch.allclose(g, expected, atol=1e-6)


def test_stamp_and_location():
    x = torch.zeros(2, 3, 8, 8)
    patches = torch.arange(2 * 2 * 27, dtype=torch.float32).view(2, 2, 27).requires_grad_(True)
    out = stamp(x, patches, 4, 1)
    assert out.shape == (4, 3, 8, 8)
    assert torch.equal(out[3, :, 4:7, 1:4], patches[1, 1].detach().view(3, 3, 3))
    assert out[:, :, :4].abs().sum() == 0 and out[:, :, :, 4:].abs().sum() == 0
    out.sum().backward()
    assert torch.equal(patches.grad, torch.ones_like(patches))
    assert x.abs().sum() == 0  # the input is not modified
    g = torch.Generator().manual_seed(0)
    rows = {location(32, 32, 3, "random", g)[0] for _ in range(2000)}
    assert rows == set(range(29))  # ⌊u·(H − k)⌋: the last offset H − k is never drawn, as published
    assert location(32, 30, 3, "corner", g) == (29, 27)


def test_batched_generators_are_independent(device):
    torch.manual_seed(0)
    gen = Generator(3, 8, 27, 16).train().to(device)
    z = torch.rand(3, 5, 8, device=device)
    out = gen(z)
    assert out.shape == (3, 5, 27) and 0 < out.min() and out.max() < 1
    out[1].sum().backward()  # only generator 1's weights get gradients (BatchNorm statistics are per class)
    for fc in gen.fc:
        assert fc.weight.grad[0].abs().sum() == 0 and fc.weight.grad[2].abs().sum() == 0
        assert fc.weight.grad[1].abs().sum() > 0
    gen.eval()
    with torch.no_grad():
        full = gen(z)
        for i in range(3):
            assert torch.allclose(gen.select(i)(z[i:i + 1])[0], full[i], atol=1e-6)
    assert Mine(3, 8, 27, 16)(z, full).shape == (3, 5)


# ---------------------------------------------------------------------------------------------- the contract


def test_detects_target_and_lowers_attack_success(backdoored, detected):
    _, result, _ = detected
    assert isinstance(result, PurifyResult) and result.status == "completed"
    info = result.info
    assert info["detected_target"] == 0 and info["target"] == 0
    scores = info["class_scores"]
    assert sorted(scores) == list(range(10))
    assert scores[0] > 3 * max(scores[c] for c in range(1, 10)) and scores[0] > 0.05, scores
    assert len(info["recovery"]) == 3 and len(info["recovery"][0]["flip_rate"]) == 10
    xt, yt = synthetic_dataset(n=600, split="test")
    b = evaluate(backdoored, xt, yt, trigger=RandomPatch(3, seed=5), target=0)
    a = evaluate(result.model, xt, yt, trigger=RandomPatch(3, seed=5), target=0)
    assert b.asr > 80 and b.acc > 85, f"the tiny backdoored model is off: {b}"
    assert a.asr < b.asr - 40, f"BAERASE did not lower the attack success enough: before {b}, after {a}"
    assert a.acc > 60, f"BAERASE destroyed the clean accuracy: before {b}, after {a}"
    assert {"recover", "unlearn", "defense"} <= set(result.timings)
    assert type(result.model) is nn.Sequential and all(p.grad is None for p in result.model.parameters())


def test_user_model_not_mutated_unless_inplace(backdoored, detected, clean):
    before, _, device = detected
    assert _same(backdoored, before)
    target = copy.deepcopy(before)
    r = baerase(target, clean, target=0, epochs=1, recovery_epochs=1, hidden_size=16, batch_size=64,
                stop_rate=None, progress=False, inplace=True, device=device)
    assert r.model is target and not _same(target, before)


def test_deterministic_under_seed(backdoored, clean, device):
    kw = dict(target=0, epochs=1, recovery_epochs=1, hidden_size=16, batch_size=64, stop_rate=None, progress=False,
              device=device)
    a = baerase(backdoored, clean, seed=3, **kw)
    b = baerase(backdoored, clean, seed=3, **kw)
    c = baerase(backdoored, clean, seed=4, **kw)
    assert _same(a.model, b.model, device)
    if device.type == "cpu":
        assert a.info["class_scores"] == b.info["class_scores"] and a.history[0]["loss"] == b.history[0]["loss"]
    else:  # counts of images may move by one where a logit sits on a tie; the loss by rounding
        assert a.info["class_scores"] == pytest.approx(b.info["class_scores"], abs=1.5 / 160)
        assert a.history[0]["loss"] == pytest.approx(b.history[0]["loss"], rel=1e-5)
    assert not _same(a.model, c.model, device)


def test_early_stop_on_generated_patches(backdoored, clean, device):
    # A threshold every flip rate is below stops after the first unlearning epoch; None never stops.
    kw = dict(target=3, epochs=3, recovery_epochs=1, hidden_size=16, batch_size=64, progress=False, device=device)
    r = baerase(backdoored, clean, stop_rate=1.01, **kw)
    assert r.info["stopped_early"] == 1 and len(r.history) == 1 and "patch_flip_rate" in r.history[0]
    assert r.info["target"] == 3 and "detected_target" not in r.info
    r = baerase(backdoored, clean, stop_rate=None, **kw)
    assert r.info["stopped_early"] is None and len(r.history) == 3


# ---------------------------------------------------------------------------------------------- validation


def test_unknown_hyperparameter_lists_valid_ones(backdoored, clean):
    with pytest.raises(TypeError, match="recovery_epochs") as e:
        baerase(backdoored, clean, alpha_u=5, progress=False)
    assert "alpha_u" in str(e.value)


@pytest.mark.parametrize("target", [10, 11])
def test_target_outside_classes(backdoored, clean, target):
    with pytest.raises(ValueError, match=r"\[0, 10\)") as e:
        baerase(backdoored, clean, target=target, progress=False)
    assert str(target) in str(e.value)


@pytest.mark.parametrize("kw, shown", [
    (dict(target=-1), "-1"), (dict(target=1.5), "1.5"), (dict(target=True), "True"),
    (dict(position="middle"), "'random', 'corner'"), (dict(noise_dim=10), "10"), (dict(beta=2.0), "2.0"),
    (dict(epochs=0), "0"), (dict(recovery_epochs=-3), "-3"), (dict(gen_betas=(0.5,)), "(0.5,)"),
    (dict(lr=0.0), "0.0"), (dict(stop_rate=-0.1), "-0.1"), (dict(patch_noise=float("inf")), "inf"),
])
def test_bad_values_name_the_value(backdoored, clean, kw, shown):
    with pytest.raises(ValueError) as e:
        baerase(backdoored, clean, progress=False, **kw)
    assert shown in str(e.value) and next(iter(kw)) in str(e.value)


def test_patch_larger_than_image_is_refused():
    x, y = torch.rand(8, 3, 4, 4), torch.arange(8) % 2
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.Flatten(), nn.Linear(16, 2))
    with pytest.raises(ValueError, match="patch_size=5"):
        baerase(model, (x, y), target=0, patch_size=5, batch_size=4, progress=False)
