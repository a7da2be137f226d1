"""Metrics: a hand-made model with known answers, validation, the one-sync property, DER, the real checkpoints."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from fastpurify.data import default_data_dir, load_cifar10
from fastpurify.metrics import EvalResult, der, evaluate, verdict
from fastpurify.models import load_checkpoint
from fastpurify.triggers import PatchTrigger

DATA = default_data_dir()
IBAU = DATA / "ibau"
needs_real = pytest.mark.skipif(
    not ((IBAU / "badnets_8_02_ckpt.pth").is_file() and (DATA / "cifar10" / "cifar-10-batches-py").is_dir()),
    reason=f"real checkpoints / CIFAR-10 not found under {DATA} (set FASTPURIFY_DATA)",
)


class PixelClassifier(nn.Module):
    """Predicts class round(9 * x[:, 0, 0, 0]): answers are known exactly. Has a BN to observe the mode."""

    def __init__(self):
        super().__init__()
        self.bn = nn.BatchNorm2d(3)
        self.seen_training: list[bool] = []

    def forward(self, x):
        self.seen_training.append(self.training)
        v = 9 * x[:, 0, 0, 0]
        return -(torch.arange(10, dtype=x.dtype, device=x.device) - v[:, None]).abs()


def _data():
    # 20 images; image i has pixel (0,0) = p_i / 9 so the model predicts p_i.
    preds = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9] * 2)
    y = torch.tensor([0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 1, 1, 2, 2, 3, 3, 4, 4, 5, 5])  # 10 + 2 correct (indices 11, 12)
    x = torch.full((20, 3, 4, 4), 0.5)
    x[:, 0, 0, 0] = preds / 9
    return x, y


def test_clean_accuracy_known():
    x, y = _data()
    r = evaluate(PixelClassifier(), x, y, batch_size=3)
    assert (r.n_clean, r.n_correct) == (20, 12)
    assert r.acc == pytest.approx(60.0)
    assert r.asr is None and r.ra is None and r.n_triggered == 0
    assert r.as_dict()["n_correct"] == 12
    assert str(r) == "ACC 60.00"


def test_asr_ra_known():
    x, y = _data()
    # trigger sets pixel (0,0) to 1 -> predicted 9, the target: every non-target image is a success
    r = evaluate(PixelClassifier(), x, y, trigger=PatchTrigger(1, 0, 0, 1.0), target=9, batch_size=7)
    assert r.n_triggered == 19  # one image has true label 9
    assert (r.n_attack_success, r.n_robust) == (19, 0)
    assert (r.asr, r.ra) == (100.0, 0.0)
    # a trigger that sets pixel (0,0) to 2/9 -> predicted 2: ASR counts target 2, RA counts true label 2
    r = evaluate(PixelClassifier(), x, y, trigger=PatchTrigger(1, 0, 0, 2 / 9), target=5, batch_size=4)
    assert r.n_triggered == 17  # labels 5 appear three times
    assert r.n_attack_success == 0
    assert r.n_robust == 3  # the three non-target images whose true label is 2
    assert r.ra == pytest.approx(100 * 3 / 17)


def test_batch_size_does_not_change_counts():
    x, y = _data()
    kw = {"trigger": PatchTrigger(1, 0, 0, 2 / 9), "target": 2}
    a = evaluate(PixelClassifier(), x, y, batch_size=1, **kw)
    b = evaluate(PixelClassifier(), x, y, batch_size=500, **kw)
    assert a == b


def test_mode_restored_and_eval_used():
    x, y = _data()
    for mode in (True, False):
        m = PixelClassifier().train(mode)
        evaluate(m, x, y, trigger=PatchTrigger(1, 0, 0, 1.0), target=9)
        assert m.training is mode
        assert m.seen_training and not any(m.seen_training)


def test_mixed_modes_restored_per_module():
    m = PixelClassifier().train()
    m.bn.eval()  # e.g. a defense that freezes BatchNorm statistics
    evaluate(m, *_data())
    assert m.training and not m.bn.training


def test_mode_restored_after_error():
    m = PixelClassifier().train()
    with pytest.raises(ValueError):
        evaluate(m, *_data(), trigger=PatchTrigger(1, 0, 0, 1.0), target=10)
    assert m.training


def test_normalization_applied_after_trigger():
    x, y = _data()
    # x' = (x - 0) / 0.5 doubles pixel (0,0): images with p <= 4 become 2p; the trigger value 0.5 -> 9
    r = evaluate(PixelClassifier(), x, y, normalization=([0.0, 0.0, 0.0], [0.5, 0.5, 0.5]))
    expected = sum(int(min(round(2 * p), 9) == int(t)) for p, t in zip((x[:, 0, 0, 0] * 9).tolist(), y.tolist()))
    assert r.n_correct == expected and r.n_correct != 12
    r = evaluate(PixelClassifier(), x, y, trigger=PatchTrigger(1, 0, 0, 0.5), target=9, normalization=(0.0, 0.5))
    assert r.n_attack_success == r.n_triggered  # 0.5 normalised to 1.0 -> class 9
    with pytest.raises(ValueError, match="1 or 3 values"):
        evaluate(PixelClassifier(), x, y, normalization=([0.0, 0.0], [1.0, 1.0]))


def test_counts_are_read_once(monkeypatch):
    """Device->host reads happen a fixed number of times, however many batches there are."""
    x, y = _data()
    calls = {"item": 0, "tolist": 0, "int": 0, "float": 0, "bool": 0}
    for name, attr in (
        ("item", "item"),
        ("tolist", "tolist"),
        ("int", "__int__"),
        ("float", "__float__"),
        ("bool", "__bool__"),
    ):
        orig = getattr(torch.Tensor, attr)

        def wrapped(self, *a, _orig=orig, _name=name, **k):
            calls[_name] += 1
            return _orig(self, *a, **k)

        monkeypatch.setattr(torch.Tensor, attr, wrapped)

    def run(bs):
        for k in calls:
            calls[k] = 0
        evaluate(PixelClassifier(), x, y, trigger=PatchTrigger(1, 0, 0, 1.0), target=9, batch_size=bs)
        return dict(calls)

    many, one = run(1), run(100)
    assert many == one  # 20 + 19 batches cost no more reads than 2
    assert many["item"] == 0 and many["tolist"] == 1


def test_input_validation():
    x, y = _data()
    m = PixelClassifier()
    with pytest.raises(ValueError, match="label 10 is outside \\[0, 10\\)"):
        evaluate(m, x, torch.cat([y[:-1], torch.tensor([10])]))
    with pytest.raises(ValueError, match="label -1"):
        evaluate(m, x, torch.cat([y[:-1], torch.tensor([-1])]))
    with pytest.raises(ValueError, match="integer label"):
        evaluate(m, x, y.float())
    with pytest.raises(ValueError, match="20 images but y holds 19"):
        evaluate(m, x, y[:19])
    with pytest.raises(ValueError, match="target 12 is outside"):
        evaluate(m, x, y, trigger=PatchTrigger(1, 0, 0), target=12)
    with pytest.raises(ValueError, match="give both"):
        evaluate(m, x, y, trigger=PatchTrigger(1, 0, 0))
    with pytest.raises(ValueError, match="label 9 is outside \\[0, 5\\)"):
        evaluate(m, x, y, num_classes=5)


def test_der_formula():
    assert der((90.0, 100.0), (90.0, 0.0)) == pytest.approx(100.0)
    assert der((90.0, 100.0), (90.0, 100.0)) == pytest.approx(50.0)
    assert der((90.0, 100.0), (80.0, 100.0)) == pytest.approx(45.0)
    assert der((84.46, 97.74), (82.30, 3.43)) == pytest.approx(100 * (0.9431 - 0.0216 + 1) / 2)
    # gains are not rewarded: ACC up and ASR up both count as zero change
    assert der({"acc": 80.0, "asr": 10.0}, {"acc": 85.0, "asr": 20.0}) == pytest.approx(50.0)
    before = EvalResult(84.0, 97.0, 2.0, 10, 8, 9, 8, 0)
    after = EvalResult(83.0, 7.0, 80.0, 10, 8, 9, 1, 7)
    assert der(before, after) == pytest.approx(100 * (0.90 - 0.01 + 1) / 2)
    with pytest.raises(ValueError, match="ACC and ASR"):
        der(EvalResult(84.0, None, None, 10, 8, 0, 0, 0), after)
    with pytest.raises(ValueError, match="percentage"):
        der((0.84, 97.0), (83.0, 150.0))


def test_trigger_spec_string_is_parsed():
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(3 * 8 * 8, 3)).eval()
    x, y = torch.rand(20, 3, 8, 8), torch.arange(20) % 3
    from fastpurify.triggers import PatchTrigger

    spec = "patch:size=2,row=5,col=5,value=1"
    a = evaluate(model, x, y, trigger=spec, target=1)
    b = evaluate(model, x, y, trigger=PatchTrigger(2, 5, 5, 1.0), target=1)
    assert (a.asr, a.ra, a.n_attack_success) == (b.asr, b.ra, b.n_attack_success)
    with pytest.raises(ValueError):
        evaluate(model, x, y, trigger="patch:size=two", target=1)


def test_verdict_against_the_bar():
    removed = verdict((84.0, 97.0), (82.0, 5.0))  # on the bar: met
    assert removed["met"] and removed["text"].startswith("backdoor removed:") and removed["acc_drop"] == 2.0
    costly = verdict((84.0, 97.0), (80.5, 1.0))
    assert not costly["met"] and costly["asr_ok"] and not costly["acc_ok"] and "too high a cost" in costly["text"]
    kept = verdict(EvalResult(84.0, 97.0, 2.0, 10, 8, 9, 8, 0), EvalResult(84.0, 60.0, 30.0, 10, 8, 9, 5, 3))
    assert not kept["met"] and kept["text"].startswith("backdoor NOT removed: ASR 60.00 % > 5 %")
    assert verdict((84.0, 97.0), (80.0, 9.0), max_asr=10, max_acc_drop=5)["met"]  # the bar can be changed
    with pytest.raises(ValueError, match="ACC and ASR"):
        verdict((84.0, 97.0), EvalResult(84.0, None, None, 10, 8, 0, 0, 0))


# --------------------------------------------------------------------------------------- the real checkpoints


@pytest.fixture(scope="module")
def cifar_test():
    return load_cifar10(DATA, split="test")


@needs_real
def test_real_badnets_first_1000(cifar_test):
    # A fast regression check on 1,000 images (counts measured with this evaluator; the full-set numbers
    # below are the authoritative ones from the data README).
    x, y = cifar_test
    r = evaluate(
        load_checkpoint(IBAU / "badnets_8_02_ckpt.pth"),
        x[:1000],
        y[:1000],
        trigger=PatchTrigger(4, 27, 27, 1.0),
        target=8,
    )
    assert (r.n_correct, r.n_triggered, r.n_attack_success, r.n_robust) == (843, 894, 878, 14)


# The four README numbers on the full test set are checked through the CLI in tests/test_cli.py.
