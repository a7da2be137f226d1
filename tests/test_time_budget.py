"""Time budgets (``time_budget=seconds``), tested on a deterministic clock: the loop fits the schedule into the
budget after a warm-up round, cuts a round at a step boundary when the next step would not fit, reports what ran
(``result.schedule``) and ``status``, and refuses to return an unpurified model when the budget is too short for
one useful step — with advice that works when followed.

No test here reads the wall clock. The loop helper takes a ``clock`` (``run_defense(..., clock=...)``); the
tests pass a :class:`FakeClock` that advances only when the test says work was done: by a fixed cost per step
for the loop's own tests, and, for the five defenses, by a cost per image of every forward and backward pass
through the model (:class:`Clocked`), so that each defense's phases cost what their passes cost. How the budgets
hold on real time is measured by ``benchmarks/test_bench_budget.py``.
"""

from dataclasses import dataclass

import pytest
import torch
from _tiny import tiny_cnn
from torch import nn

import fastpurify
from fastpurify.data import synthetic_dataset
from fastpurify.defenses._loop import run_defense
from fastpurify.reference import defenses as ref

pytestmark = pytest.mark.usefixtures("one_thread")


class FakeClock:
    """A clock that moves only when told. Deep copies share it (the defenses copy the model that advances it)."""

    def __init__(self) -> None:
        self.t = 0.0

    def __call__(self) -> float:
        return self.t

    def advance(self, dt: float) -> None:
        self.t += dt

    def __deepcopy__(self, memo):
        return self


@dataclass
class SleepConfig:
    epochs: int = 100
    batch_size: int = 8
    step_s: float = 0.01  # cost of one step


def sleepy(clock: FakeClock, setup_s: float = 0.0):
    """A defense whose steps cost ``step_s`` on ``clock``; records the rounds it believed it had each round."""

    def algorithm(net, data, cfg, loop):
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        clock.advance(setup_s)
        seen = []
        for _ in loop.rounds():
            seen.append(loop.total_rounds)
            for _ in loop.batches(len(data), cfg.batch_size):
                clock.advance(cfg.step_s)
                loop.step(opt)
        return {"seen_total": seen}

    return algorithm


def _xy(n=32):
    g = torch.Generator().manual_seed(0)
    return torch.rand(n, 3, 8, 8, generator=g), torch.randint(0, 4, (n,), generator=g)


class Lin(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(3 * 8 * 8, 4)

    def forward(self, x):
        return self.fc(x.flatten(1))


def _sleep_run(epochs, step_s, budget, n=32, batch_size=8, setup_s=0.0):
    clock = FakeClock()
    r = run_defense("sleepy", sleepy(clock, setup_s), SleepConfig, Lin(), _xy(n), epochs=epochs, step_s=step_s,
                    batch_size=batch_size, time_budget=budget, progress=False, clock=clock)
    return r, clock.t


def test_schedule_is_fitted_after_the_warm_up_round():
    # a round = 4 steps of 25 ms = 0.1 s; 100 rounds asked, 1 s given: 9 rounds fit (2 % is kept in reserve)
    r, end = _sleep_run(100, 0.025, 1.0)
    assert r.status == "budget_exhausted"
    seen = r.info["seen_total"]
    assert seen[0] == 100 and seen[-1] == 10  # lowered after the warm-up round: a compressed schedule
    assert r.schedule["rounds"] == len(r.history) == len(seen) and r.schedule["requested_rounds"] == 100
    assert r.schedule["time_budget"] == 1.0 and r.schedule["round_seconds"] == pytest.approx(0.1)
    assert 0.9 <= end <= 1.0


def test_no_budget_runs_the_whole_schedule():
    r, _ = _sleep_run(3, 0.0, None)
    assert r.status == "completed" and r.schedule == {"rounds": 3, "requested_rounds": 3, "time_budget": None}
    assert r.info["seen_total"] == [3, 3, 3]


def test_a_budget_that_fits_the_schedule_completes_it():
    r, end = _sleep_run(3, 0.001, 30)
    assert r.status == "completed" and len(r.history) == 3 and "cut_in_round" not in r.schedule
    assert end == pytest.approx(0.012)


def test_a_long_round_is_cut_at_a_step_boundary():
    # one round is 64 steps of 20 ms (1.28 s); a 0.5 s budget ends inside the first round, within a step of it
    r, end = _sleep_run(5, 0.02, 0.5, n=64, batch_size=1)
    assert r.status == "budget_exhausted" and len(r.history) == 1
    assert r.schedule["cut_in_round"] == {"round": 1, "steps": 23}  # 23 × 0.02 s + one more would pass 0.48
    assert 0.5 - 0.02 - 0.02 <= end <= 0.5


def test_too_short_for_one_step_is_an_error_with_advice_that_works():
    model = Lin()
    before = [p.detach().clone() for p in model.parameters()]
    clock = FakeClock()
    with pytest.raises(fastpurify.TimeBudgetError,
                       match=r"sleepy: time_budget=0.05 s is too short for one useful step: the first model update "
                             r"ended at 0.3 s \(0.1 s of setup before the first step\); give at least (\S+) s") as e:
        run_defense("sleepy", sleepy(clock, setup_s=0.1), SleepConfig, model, _xy(), step_s=0.2, time_budget=0.05,
                    progress=False, clock=clock)
    assert all(torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert clock.t == pytest.approx(0.3)  # it failed right after the first step, not at the end of a round
    advice = float(str(e.value).split("give at least ")[1].split(" s")[0])
    r, end = _sleep_run(100, 0.2, advice, setup_s=0.1)
    assert r.status == "budget_exhausted" and end <= advice


@pytest.mark.parametrize("budget", [0.01, 1e-6])
def test_tiny_budgets_never_advise_zero_seconds(budget):
    with pytest.raises(fastpurify.TimeBudgetError, match=r"give at least 0\.0[1-9]\d* s|give at least [1-9]"):
        _sleep_run(10, 0.01, budget, setup_s=0.005)


def test_fit_sizes_an_inner_phase():
    out = {}
    clock = FakeClock()

    def inner(net, data, cfg, loop):
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        out["free"] = loop.fit(7, 1.0)
        for _ in loop.rounds():
            out["fit"] = loop.fit(1000, 0.1, share=0.5)
            out["none"] = loop.fit(0, 0.1)
            loop.step(opt)

    run_defense("fit", inner, SleepConfig, Lin(), _xy(), epochs=1, time_budget=2.0, progress=False, clock=clock)
    # 1.96 s left: one 1-s unit of 7; half of it holds 9 units of 0.1 s
    assert out["free"] == 1 and out["fit"] == 9 and out["none"] == 0
    run_defense("fit", inner, SleepConfig, Lin(), _xy(), epochs=1, progress=False, clock=clock)
    assert out["fit"] == 1000  # no budget: what was asked


def test_share_limits_the_work_before_the_first_update_only():
    clock = FakeClock()
    ran = []

    def two_phase(net, data, cfg, loop):
        opt = torch.optim.SGD(net.parameters(), lr=0.0)
        for _ in loop.rounds():
            count = 0
            with loop.share(0.25):
                for _ in loop.batches(len(data), 1, kind="pre"):
                    clock.advance(0.1)
                    count += 1
            ran.append(count)
            for _ in loop.batches(len(data), 8, kind="update"):
                clock.advance(0.1)
                loop.step(opt)

    run_defense("two", two_phase, SleepConfig, Lin(), _xy(), epochs=3, time_budget=10.0, progress=False, clock=clock)
    # round 1: at most a quarter of 9.8 s for the 32 pre-steps of 0.1 s; afterwards whole rounds (3.6 s) are planned
    assert ran == [24, 32, 32]


# ------------------------------------------------------------------------------------ the five defenses


class Clocked(nn.Module):
    """``tiny_cnn`` whose passes cost time on a :class:`FakeClock`: ``fwd`` seconds per image forward, twice that
    per image backward (through the logits)."""

    def __init__(self, clock: FakeClock, fwd: float = 1e-3) -> None:
        super().__init__()
        self.net = tiny_cnn(16, seed=0)
        self.clock, self.fwd = clock, fwd

    def forward(self, x):
        self.clock.advance(self.fwd * x.shape[0])
        out = self.net(x)
        if out.requires_grad:
            out.register_hook(lambda g, n=x.shape[0]: self.clock.advance(2 * self.fwd * n) or g)
        return out


_X, _Y = synthetic_dataset(n=96, seed=5)
# far longer schedules than the budget allows
_LONG = {
    "sau": dict(epochs=1000, batch_size=32),
    "ibau": dict(epochs=1000, batch_size=32),
    "awm": dict(epochs=1000, batch_size=32, inner=1),
    "baerase": dict(epochs=1000, recovery_epochs=1000, target=0, hidden_size=32, batch_size=32, stop_rate=None),
    "bcu": dict(epochs=1000, batch_size=32, augment=False),
}
_PATHS = [(n, "fast") for n in fastpurify.DEFENSES] + [(n, "reference") for n in fastpurify.DEFENSES]


def _run(name, path, budget):
    clock = FakeClock()
    fn = getattr(fastpurify if path == "fast" else ref, name)
    data = _X if name == "bcu" else (_X, _Y)
    r = fn(Clocked(clock), data, time_budget=budget, progress=False, clock=clock, **_LONG[name])
    return r, clock.t


@pytest.mark.parametrize("name,path", _PATHS)
def test_every_defense_ends_within_ten_percent_of_its_budget(name, path):
    r, end = _run(name, path, 10.0)
    assert end <= 11.0, (name, path, end, r.schedule)
    # a run ends early only by less than one round or one step (a round of these costs 1-4 fake seconds)
    assert end >= 10.0 - 1.1 * max(r.schedule["round_seconds"], 1.0), (name, path, end, r.schedule)
    assert r.status == "budget_exhausted" and 1 <= r.schedule["rounds"] < 1000
    assert r.schedule["rounds"] == len(r.history)
    if name == "baerase":
        assert 1 <= r.schedule["recovery_epochs"] < 1000


@pytest.mark.parametrize("name,path", _PATHS)
def test_a_too_short_budget_fails_after_one_step_with_advice_that_works(name, path):
    with pytest.raises(fastpurify.TimeBudgetError, match=rf"{name}: time_budget=0.01 s is too short") as e:
        _run(name, path, 0.01)
    advice = float(str(e.value).split("give at least ")[1].split(" s")[0])
    assert advice > 0.01
    r, end = _run(name, path, advice)
    assert r.status in ("completed", "budget_exhausted") and end <= 1.1 * advice, (name, path, advice, end)
