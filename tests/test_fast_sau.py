"""The fast SAU (fastpurify/defenses/sau.py) against the reference port: same purification, step by step, on every
available device (cuda when present), with the steps checked for host synchronisation."""

import copy

import pytest
import torch

import fastpurify
from fastpurify.data import synthetic_dataset
from fastpurify.defenses.sau import FastSAUConfig, _attack
from fastpurify.models import SmallVGG
from fastpurify.reference.defenses import sau as sau_ref
from fastpurify.reference.defenses.sau import shared_pgd
from fastpurify.testing import host_sync_check


@pytest.fixture(scope="module")
def setup():
    torch.manual_seed(0)
    model = SmallVGG().eval()
    with torch.no_grad():
        model.classifier.weight.mul_(20)  # predictions that react to δ, so that the attack finds poisons
    x, y = synthetic_dataset(n=96, seed=3)
    return model, x, y


def test_fast_sau_follows_the_reference(setup, device):
    model, x, y = setup
    kw = dict(epochs=2, batch_size=32, progress=False, seed=1, device=device)
    fast = fastpurify.sau(model, (x, y), **kw)
    ref = sau_ref(model, (x, y), **kw)
    assert fastpurify.defenses.status()["sau"] == "fast path"
    assert len(fast.history) == len(ref.history) == 2
    # CPU: the attack is bit-exact; the unlearning loss sums in another order: a few ulp per step. CUDA: the fast
    # attack stacks both models into grouped convolutions and uses the fused loss kernel, so its input gradients
    # round differently, and an element whose gradient is ~0 may take the other sign (δ moves by 2·step there):
    # 1e-2 relative on the round means (not measured on a GPU yet).
    tol = 1e-2 if device.type == "cuda" else 1e-4
    for hf, hr in zip(fast.history, ref.history):
        for k in ("loss", "loss_clean", "loss_sar", "poison_frac", "shared_frac", "pgd_steps"):
            assert abs(hf[k] - hr[k]) <= tol * max(1.0, abs(hr[k])), (k, hf[k], hr[k])
    assert hr["poison_frac"] > 0  # the unlearning term was exercised
    for pf, pr in zip(fast.model.parameters(), ref.model.parameters()):
        torch.testing.assert_close(pf, pr, rtol=tol, atol=tol / 10)
    # the user's model is untouched and no weight gradient was left behind
    assert all(p.grad is None for p in model.parameters())


def test_fast_sau_options_are_validated(setup):
    model, x, y = setup
    with pytest.raises(ValueError, match=r"precision='fp16' is not valid; expected one of: 'fp32', 'bf16'"):
        fastpurify.sau(model, (x, y), precision="fp16", progress=False)
    with pytest.raises(TypeError, match=r"channels_last must be True or False, got 1"):  # a wrong type
        fastpurify.sau(model, (x, y), channels_last=1, progress=False)


def test_fast_sau_bf16_and_channels_last_run(setup, device):
    model, x, y = setup
    r = fastpurify.sau(model, (x, y), epochs=1, batch_size=32, precision="bf16", channels_last=True, progress=False,
                       device=device)
    assert r.status == "completed" and r.model.features[0].weight.is_contiguous()


@pytest.mark.parametrize("init", ["max", "random"])
def test_fast_sau_reg_norm_follows_the_reference(setup, init, device):
    """norm="Reg" (no projection, which the config accepts and the reference runs) raised KeyError: 'Reg' on the fast
    path (issue 13, item 15)."""
    model, x, y = setup
    net = copy.deepcopy(model).to(device)
    frozen = copy.deepcopy(net).requires_grad_(False)
    xb, yb = x[:32].to(device), y[:32].to(device)
    cfg = FastSAUConfig(norm="Reg", pgd_init=init, eps=0.05, step_size=0.3)
    d_fast, i_fast = _attack(net, frozen, cfg)(xb, yb, generator=torch.Generator().manual_seed(0))
    d_ref, i_ref = shared_pgd(net, frozen, xb, yb, eps=0.05, step_size=0.3, norm="Reg", init=init,
                              generator=torch.Generator().manual_seed(0))
    gpu = device.type == "cuda"
    # CUDA: the early exit counts steps until every row is shared, which a sign flipped by another summation
    # order (below) can move by one (not measured on a GPU yet)
    assert abs(int(i_fast["steps"]) - i_ref["steps"]) <= (1 if gpu else 0)
    assert float(d_ref.abs().max()) > 1.0  # nothing projected δ back to ε = 0.05
    # The same sign steps from the same δ0 (measured: bit-identical here). Where an input gradient is ~0 its sign
    # can flip with another CPU's rounding, moving that element by 2·step: allow a few such elements (on CUDA,
    # whose stacked models and fused loss round every gradient differently, ten times as many).
    assert float(((d_fast - d_ref).abs() > 1e-6).float().mean()) <= (1e-2 if gpu else 1e-3)
    kw = dict(epochs=1, batch_size=32, progress=False, seed=1, norm="Reg", pgd_init=init, device=device)
    fast, ref = fastpurify.sau(model, (x, y), **kw), sau_ref(model, (x, y), **kw)
    assert fast.status == ref.status == "completed"
    for k in ("loss", "loss_clean", "loss_sar", "poison_frac", "shared_frac"):
        # measured: identical on the CPU; the bound is test_fast_sau_follows_the_reference's
        assert abs(fast.history[0][k] - ref.history[0][k]) <= (1e-2 if gpu else 1e-4) * max(
            1.0, abs(ref.history[0][k])), k


def test_fast_sau_steps_do_not_sync_the_host(setup, device):
    """The docstring's "no host synchronisation" (masks instead of boolean indexing, the early exit decided on the
    device, statistics read once per round), checked: every batch's attack and unlearning step runs under
    torch.cuda.set_sync_debug_mode("error") on CUDA, under the CPU stand-in with the GPU strategies here."""
    model, x, y = setup
    # (this check, run with the GPU strategies on a CPU, found the stacked attack refusing the frozen f0: fixed in
    # ops/attack.py, d015474)
    with host_sync_check(device) as scope:
        r = fastpurify.sau(model, (x, y), epochs=2, batch_size=32, device=device, progress=False)
    assert r.status == "completed" and scope.steps == 6  # 2 rounds of 3 batches, each checked
