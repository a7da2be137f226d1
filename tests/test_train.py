"""Training: batched augmentation, determinism, the optimisation loop, backdoor training on synthetic data."""

from __future__ import annotations

import time

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from fastpurify.data import synthetic_dataset
from fastpurify.metrics import evaluate
from fastpurify.models import SmallVGG
from fastpurify.train import augment_batch, train, train_backdoored
from fastpurify.triggers import PatchTrigger

# The demo settings: 8 epochs leave margin (6 epochs gave one seed in 4 only 92 % ACC); augment=False because
# crops and flips move the corner trigger and, measured, left one seed in 3 at 88.5 % ASR after 8 epochs.
DEMO = {"n": 5000, "n_test": 2000, "epochs": 8, "lr": 0.01, "batch_size": 128, "augment": False}


def test_augment_batch_is_a_crop_or_flipped_crop():
    x = torch.rand(16, 3, 8, 8)
    out = augment_batch(x, torch.Generator().manual_seed(0), padding=2)
    padded = F.pad(x, (2, 2, 2, 2))
    seen_flip, seen_offsets = set(), set()
    for i in range(16):
        matches = [
            (oy, ox, flip)
            for oy in range(5)
            for ox in range(5)
            for flip in (False, True)
            if torch.equal(out[i], (lambda c: c.flip(-1) if flip else c)(padded[i, :, oy : oy + 8, ox : ox + 8]))
        ]
        assert matches, f"sample {i} is not a (flipped) crop of its padded input"
        seen_flip |= {m[2] for m in matches}
        seen_offsets |= {m[:2] for m in matches}
    assert seen_flip == {False, True} and len(seen_offsets) > 3


def test_augment_batch_no_padding_is_identity_or_flip():
    x = torch.rand(32, 3, 5, 5)
    out = augment_batch(x, torch.Generator().manual_seed(1), padding=0)
    same = (out == x).flatten(1).all(1)
    flipped = (out == x.flip(-1)).flatten(1).all(1)
    assert (same | flipped).all() and same.any() and flipped.any()


def _tiny_model():
    return nn.Sequential(
        nn.Conv2d(3, 8, 3, padding=1),
        nn.BatchNorm2d(8),
        nn.ReLU(),
        nn.AdaptiveAvgPool2d(1),
        nn.Flatten(),
        nn.Linear(8, 4),
    )


def _color_task(n=256):
    # class c = one dominant colour channel (c < 3) or grey (c = 3): learnable by the tiny model
    g = torch.Generator().manual_seed(0)
    y = torch.arange(n) % 4
    x = 0.3 * torch.rand(n, 3, 16, 16, generator=g)
    for c in range(3):
        x[y == c, c] += 0.6
    x[y == 3] += 0.3
    return x, y


def test_train_learns_and_returns_eval_mode():
    x, y = _color_task()
    torch.manual_seed(0)
    model = _tiny_model()
    before = evaluate(model, x, y).acc
    out = train(model, x, y, epochs=5, lr=0.05, batch_size=32, seed=0)
    assert out is model and not model.training
    assert evaluate(model, x, y).acc >= 95.0 > before
    assert all(p.is_contiguous() for p in model.parameters())  # channels_last was undone


def test_train_is_deterministic_and_seeded():
    x, y = synthetic_dataset(n=96)

    def run(seed):
        torch.manual_seed(123)  # same initial weights for every run
        m = SmallVGG()
        train(m, x, y, epochs=1, batch_size=32, seed=seed)
        return m.state_dict()

    a, b, c = run(0), run(0), run(1)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].is_floating_point())


def test_train_leaves_global_rng_alone():
    x, y = _color_task(64)
    model = _tiny_model()
    torch.manual_seed(7)
    expected = torch.rand(3)
    torch.manual_seed(7)
    train(model, x, y, epochs=1, batch_size=16, seed=3)
    assert torch.equal(torch.rand(3), expected)


def test_zero_epochs_changes_nothing_and_batch_of_one_is_skipped():
    x, y = _color_task(33)  # 33 = 2 * 16 + 1: the last batch of one sample must be skipped (BatchNorm)
    model = _tiny_model()
    w = model[0].weight.detach().clone()
    train(model, x, y, epochs=0)
    assert torch.equal(model[0].weight, w)
    train(model, x, y, epochs=1, batch_size=16)
    assert not torch.equal(model[0].weight, w)


def test_train_validation():
    x, y = _color_task(8)
    with pytest.raises(ValueError, match="8 images but y holds 7"):
        train(_tiny_model(), x, y[:7], epochs=1)
    with pytest.raises(ValueError, match="epochs"):
        train(_tiny_model(), x, y, epochs=-1)
    with pytest.raises(ValueError, match="integer label"):
        train(_tiny_model(), x, y.float(), epochs=1)
    with pytest.raises(ValueError, match="lr"):
        train(_tiny_model(), x, y, epochs=1, lr=0.0)


def test_train_backdoored_info_and_seeding():
    x, y = synthetic_dataset(n=64)
    kw = {"trigger": PatchTrigger(), "target": 0, "poison_rate": 0.25, "epochs": 1, "batch_size": 32, "seed": 5}
    m1, info = train_backdoored("small_vgg", x, y, **kw)
    m2, _ = train_backdoored("small_vgg", x, y, **kw)
    assert isinstance(m1, SmallVGG) and not m1.training
    assert info["arch"] == "small_vgg" and info["n_train"] == 64 and info["n_poisoned"] == 16
    assert info["trigger"] == "patch:size=4,row=27,col=27,value=1" and info["target"] == 0
    assert (y[info["poisoned_index"]] != 0).all()
    assert info["train_time_s"] > 0 and info["final_loss"] == info["final_loss"]  # not NaN
    for k, v in m1.state_dict().items():
        torch.testing.assert_close(v, m2.state_dict()[k], rtol=0, atol=0)
    own = SmallVGG()
    m3, info3 = train_backdoored(own, x, y, **kw)
    assert m3 is own and info3["arch"] == "SmallVGG"
    with pytest.raises(ValueError, match="unknown architecture 'vgg'"):
        train_backdoored("vgg", x, y, **kw)


@pytest.mark.slow
def test_synthetic_backdoor_demo_reaches_targets():
    """The demo claim: SmallVGG backdoored on synthetic data reaches ACC >= 90 and ASR >= 95 in < 2 min."""
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        x, y = synthetic_dataset(n=DEMO["n"], seed=0, split="train")
        xt, yt = synthetic_dataset(n=DEMO["n_test"], seed=0, split="test")
        start = time.perf_counter()
        model, info = train_backdoored(
            "small_vgg",
            x,
            y,
            trigger=PatchTrigger(4, 27, 27, 1.0),
            target=0,
            poison_rate=0.1,
            epochs=DEMO["epochs"],
            lr=DEMO["lr"],
            batch_size=DEMO["batch_size"],
            augment=DEMO["augment"],
            seed=0,
        )
        seconds = time.perf_counter() - start
        r = evaluate(model, xt, yt, trigger=PatchTrigger(4, 27, 27, 1.0), target=0)
    finally:
        torch.set_num_threads(threads)
    print(f"synthetic demo: {r} in {seconds:.1f} s training")
    # The time (target: under 2 minutes on 2 CPU cores) is printed here and by `fastpurify demo`, not asserted:
    # a timed unit test fails on a busy machine for reasons unrelated to the code.
    assert r.acc >= 90.0 and r.asr >= 95.0, str(r)


def test_a_target_past_the_labels_is_an_error_not_an_extra_class():
    # issue 13 item 12: target 10 on 10-class labels trained an 11-class model
    x, y = synthetic_dataset(n=32, seed=0)
    with pytest.raises(ValueError, match=r"target 10 is outside \[0, 10\)"):
        train_backdoored("small_vgg", x, y, trigger=PatchTrigger(4, 27, 27, 1.0), target=10, epochs=1)
