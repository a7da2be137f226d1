"""The common defense API and the shared loop helper: input forms, validation before any work, copies and
modes, seeding, the finite guard, evaluation cadence, time budget, normalisation, the class form."""

from dataclasses import dataclass

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

import fastpurify
from fastpurify.defenses._loop import EvalSet, run_defense
from fastpurify.triggers import PatchTrigger


class Tiny(nn.Module):
    def __init__(self, classes=4, channels=3):
        super().__init__()
        self.conv = nn.Conv2d(channels, 4, 3, padding=1)
        self.bn = nn.BatchNorm2d(4)
        self.fc = nn.Linear(4, classes)
        self.seen = []

    def forward(self, x):
        self.seen.append(x.detach())
        return self.fc(self.bn(self.conv(x)).mean(dim=(2, 3)))


@dataclass
class ToyConfig:
    epochs: int = 2
    batch_size: int = 8
    lr: float = 0.1
    nan_at: int = -1  # round index at which the loss turns NaN

    def validate(self):
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr!r}")


def _toy(net, data, cfg, loop):
    opt = torch.optim.SGD(net.parameters(), lr=cfg.lr)
    for r in loop.rounds():
        for idx in loop.batches(len(data), cfg.batch_size):
            with loop.phase("train"):
                loss = nn.functional.cross_entropy(net(data.x[idx]), data.y[idx])
                if r == cfg.nan_at and loop.step_in_round == 1:
                    loss = loss * float("nan")
                loop.check_finite(loss)
                loop.step(opt, loss)
        loop.log(loss=loss)
    return {"rounds_run": len(loop.history)}


def toy(model, data, **kw):
    return run_defense("toy", _toy, ToyConfig, model, data, **kw)


def _data(n=32, classes=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, classes, (n,), generator=g)


def _params(m):
    return [p.detach().clone() for p in m.state_dict().values()]


def test_returns_a_copy_and_keeps_the_users_model():
    m = Tiny().train()
    before = _params(m)
    x, y = _data()
    r = toy(m, (x, y), progress=False)
    assert r.model is not m and r.status == "completed" and len(r.history) == 2
    assert all(torch.equal(a, b) for a, b in zip(before, _params(m)))
    assert m.training and r.model.training  # the mode the user's model had
    assert not all(torch.equal(a, b) for a, b in zip(before, _params(r.model)))
    assert r.info == {"recipe": "published", "rounds_run": 2}
    assert r.timings["train"] > 0 and r.timings["defense"] >= r.timings["train"]
    assert set(r.history[0]) >= {"round", "seconds", "loss"}


def test_inplace_updates_and_restores_mode():
    m = Tiny().eval()
    before = _params(m)
    r = toy(m, _data(), inplace=True, progress=False)
    assert r.model is m and not m.training
    assert not all(torch.equal(a, b) for a, b in zip(before, _params(m)))


def test_input_forms_are_equivalent_and_deterministic():
    x, y = _data()
    extra = torch.arange(len(y))

    class DS(Dataset):
        def __len__(self):
            return len(y)

        def __getitem__(self, i):
            return x[i], y[i], "extra", extra[i]

    forms = [(x, y), (x, y, extra), DS(), DataLoader(TensorDataset(x, y, extra), batch_size=5), TensorDataset(x, y)]
    results = []
    for f in forms:
        torch.manual_seed(0)
        m = Tiny()
        results.append(_params(toy(m, f, progress=False, seed=3).model))
    for other in results[1:]:
        assert all(torch.equal(a, b) for a, b in zip(results[0], other))
    torch.manual_seed(0)
    different = _params(toy(Tiny(), (x, y), progress=False, seed=4).model)
    assert not all(torch.equal(a, b) for a, b in zip(results[0], different))


@pytest.mark.parametrize("data,kw,exc,match", [
    ((torch.rand(0, 3, 8, 8), torch.zeros(0, dtype=torch.long)), {}, ValueError, r"empty"),
    ((torch.rand(4, 3, 8, 8), torch.zeros(4, dtype=torch.long)), {}, ValueError,
     r"holds 4 images, fewer than one batch \(batch_size=8\)"),
    ((torch.rand(16, 3, 8, 8), torch.zeros(16)), {}, TypeError, r"labels must be integers, got dtype torch.float32"),
    ((torch.rand(16, 3, 8, 8), torch.full((16,), 7)), {}, ValueError, r"label 7 is outside \[0, 4\)"),
    ((torch.rand(16, 3, 8, 8), torch.full((16,), -1)), {}, ValueError, r"label -1 is outside"),
    ((torch.rand(16, 3, 8, 8), torch.zeros(15, dtype=torch.long)), {}, ValueError, r"16 images but 15 labels"),
    ((torch.rand(16, 8, 8), torch.zeros(16, dtype=torch.long)), {}, ValueError, r"N×C×H×W, got shape \(16, 8, 8\)"),
    ((torch.rand(16, 1, 8, 8), torch.zeros(16, dtype=torch.long)), {}, ValueError, r"1 channels but the model's "
                                                                                    r"first convolution expects 3"),
    ((torch.full((16, 3, 8, 8), float("nan")), torch.zeros(16, dtype=torch.long)), {}, ValueError, r"non-finite"),
    ((torch.rand(16, 3, 8, 8) * 255, torch.zeros(16, dtype=torch.long)), {}, ValueError,
     r"span \[0\.\d+, 25\d\.?\d*\], outside \[0, 1\].*normalization=\(mean, std\).*check_range=False"),
    ((torch.randint(0, 255, (16, 3, 8, 8), dtype=torch.uint8), torch.zeros(16, dtype=torch.long)), {}, TypeError,
     r"floating point.*uint8"),
    ("images.npz", {}, TypeError, r"DataLoader, a Dataset, an IterableDataset, an \(x, y\) pair.*got str"),
    (None, {"backend": "fast"}, ValueError, r"backend='fast' is not valid; expected one of: 'auto', 'cuda'"),
    (None, {"eval_every": 0}, ValueError, r"eval_every must be a positive integer, got 0"),
    (None, {"time_budget": -1}, ValueError, r"time_budget must be a positive number, got -1"),
    (None, {"lr": -1.0}, ValueError, r"lr must be positive, got -1.0"),
    (None, {"learning_rate": 0.1}, TypeError, r"unknown hyper-parameter\(s\) \['learning_rate'\]; valid: epochs, "
                                              r"batch_size, lr, nan_at"),
    (None, {"normalization": ((0.5,), (0.5,))}, ValueError, r"1 means and 1 stds; the images have 3 channels"),
    (None, {"num_classes": 10}, ValueError, r"num_classes=10 but the model returns 4 logits"),
])
def test_bad_input_is_reported_before_any_work(data, kw, exc, match):
    m = Tiny()
    before = _params(m)
    with pytest.raises(exc, match=match):
        toy(m, _data() if data is None else data, progress=False, **kw)
    assert all(torch.equal(a, b) for a, b in zip(before, _params(m)))
    assert len(m.seen) <= 1  # at most the two-image probe ran


def test_model_output_must_be_logits():
    class Bad(Tiny):
        def forward(self, x):
            return super().forward(x).sum(1)

    with pytest.raises(ValueError, match=r"logits of shape \(N, num_classes\); on 2 images it returned \(2,\)"):
        toy(Bad(), _data(), progress=False)


def test_check_range_can_be_turned_off():
    x, y = _data()
    r = toy(Tiny(), (x * 2 - 0.5, y), check_range=False, progress=False)
    assert r.status == "completed"


def test_finite_guard_names_round_and_step():
    for sync in (True, False):
        with pytest.raises(FloatingPointError, match=r"toy: non-finite.* loss.* at round 2, step 2"):
            toy(Tiny(), _data(), epochs=3, nan_at=1, progress=False, sync_checks=sync)


def test_eval_cadence_and_separate_timing():
    x, y = _data()
    trig = PatchTrigger(2, 0, 0, 1.0)
    r = toy(Tiny(), (x, y), epochs=3, eval_every=2, eval_data=EvalSet(x, y, trig, 1), progress=False)
    evaluated = [("acc" in h) for h in r.history]
    assert evaluated == [False, True, True]  # every 2nd round and the last
    assert {"acc", "asr", "ra"} <= set(r.history[1]) and r.timings["eval"] > 0
    r2 = toy(Tiny(), (x, y), epochs=1, eval_data=(x, y), progress=False)
    assert "acc" in r2.history[0] and "asr" not in r2.history[0]


def test_time_budget_stops_between_rounds():
    from test_time_budget import FakeClock

    clock = FakeClock()

    def slow(net, data, cfg, loop):
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        for _ in loop.rounds():
            clock.advance(0.2)
            loop.step(opt)

    r = run_defense("slow", slow, ToyConfig, Tiny(), _data(), epochs=50, time_budget=0.5, progress=False, clock=clock)
    assert r.status == "budget_exhausted" and len(r.history) == 2 and r.timings["defense"] == pytest.approx(0.4)


def test_normalization_is_applied_in_front_of_the_model():
    m = Tiny()
    x, y = _data()
    mean, std = (0.5, 0.4, 0.3), (0.2, 0.25, 0.5)
    r = toy(m, (x, y), normalization=(mean, std), epochs=1, progress=False)
    seen = r.model.seen[-1]
    assert seen.min() < -0.5 or seen.max() > 1.5  # the model saw normalised, not pixel, inputs
    assert type(r.model) is Tiny  # the user gets their own architecture back, without the wrapper


def test_class_form_and_top_level_names():
    from fastpurify.data import synthetic_dataset

    x, _ = synthetic_dataset(n=16)
    purifier = fastpurify.BCU(epochs=1, batch_size=8, progress=False)
    assert "epochs=1" in repr(purifier)
    r = purifier(fastpurify.models.SmallVGG(), x)
    assert r.defense == "bcu" and r.status == "completed"
    for name in ("sau", "ibau", "awm", "baerase", "bcu"):
        assert callable(getattr(fastpurify, name))
    # all five have their fast path now; fastpurify.info() says so
    assert fastpurify.info()["defenses"] == {n: "fast path" for n in fastpurify.DEFENSES}
