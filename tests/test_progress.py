"""Progress people can see (fastpurify/_progress.py): on a terminal a bar that counts the steps of every
round, with a total over the rounds still to run; in a log one line per round with its ETA, and intermediate lines
inside a long round; nothing with ``progress=False``. Every test runs on a fake clock: no wall-time assertion."""

import io
import re

import pytest
import torch
from _tiny import tiny_cnn
from test_time_budget import FakeClock

import fastpurify
from fastpurify._progress import Progress, format_duration, format_values
from fastpurify.data import synthetic_dataset
from fastpurify.defenses._loop import Loop

pytestmark = pytest.mark.usefixtures("one_thread")


class Terminal(io.StringIO):
    """A file that says it is a terminal, as a forced TTY."""

    def isatty(self) -> bool:
        return True


class Seen(list):
    """(round, bar.n, bar.total) after every step, and the bar itself."""

    bar = None


def _loop(rounds, file, clock, progress=True):
    return Loop("toy", rounds, device=torch.device("cpu"), seed=0, progress=progress, time_budget=None,
                eval_fn=None, eval_every=1, clock=clock, progress_file=file)


def _run(loop, clock, *, n=32, batch_size=8, step_s=5.0, use_batches=True, steps=4, seen=None):
    """A defense whose steps cost ``step_s`` on the fake clock; ``seen`` collects (round, bar n, bar total) after
    every step."""
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.0)
    for r in loop.rounds():
        it = loop.batches(n, batch_size) if use_batches else range(steps)
        for _ in it:
            clock.advance(step_s)
            loop.check_finite(torch.tensor(0.5))
            loop.step(opt, (w * 0).sum())
            bar = loop._progress.bar
            if seen is not None and bar is not None:
                seen.append((r, bar.n, bar.total))
                seen.bar = bar
        loop.log(loss=torch.tensor(0.5), asr=12.14)


def test_log_prints_one_line_per_round_with_round_numbers_and_eta():
    clock, log = FakeClock(), io.StringIO()
    loop = _loop(3, log, clock)
    _run(loop, clock)  # 4 steps of 5 s per round
    lines = log.getvalue().strip().splitlines()
    assert lines == [
        "toy: round 1/3 done, 20.0 s, ETA 40.0 s, loss 0.5, ASR 12.1 %",
        "toy: round 2/3 done, 20.0 s, ETA 20.0 s, loss 0.5, ASR 12.1 %",
        "toy: round 3/3 done, 20.0 s, total 1m 00s, loss 0.5, ASR 12.1 %",
    ]
    assert loop._progress.mode == "lines" and loop._progress.bar is None


def test_eta_leaves_out_the_warm_up_round():
    clock, log = FakeClock(), io.StringIO()
    p = Progress("sau", 10, file=log, clock=clock)
    for r, seconds in enumerate([100.0, 40.0, 42.0]):  # a long first round (warm-up, one-off work)
        p.start_round(r, 10)
        clock.advance(seconds)
        p.end_round({"loss": 0.512}, 10)
    last = log.getvalue().strip().splitlines()[-1]
    assert last == "sau: round 3/10 done, 42.0 s, ETA 4m 47s, loss 0.512"  # 7 rounds x 41 s (not 54 s)


def test_eta_never_passes_the_time_budget():
    clock, log = FakeClock(), io.StringIO()
    p = Progress("sau", 100, file=log, clock=clock, budget_left=lambda: 25.0)
    p.start_round(0, 100)
    clock.advance(10.0)
    p.end_round({}, 100)
    assert log.getvalue().strip() == "sau: round 1/100 done, 10.0 s, ETA 25.0 s (time budget)"


def test_a_long_round_prints_intermediate_lines_at_most_every_interval():
    clock, log = FakeClock(), io.StringIO()
    loop = _loop(2, log, clock)
    _run(loop, clock, n=100, batch_size=10, step_s=10.0)  # 10 steps of 10 s per round
    lines = log.getvalue().strip().splitlines()
    inter = [ln for ln in lines if "into the round" in ln]
    # a line at 30, 60, 90 s of each round (the round's own line resets the 30 s)
    assert len(inter) == 6 and len(lines) == 8, lines
    assert inter[0] == "toy: round 1/2, step 3/10, 30.0 s into the round, ETA 2m 50s"  # 7 steps + 1 round of 10
    assert inter[3].startswith("toy: round 2/2, step 3/10, ") and inter[3].endswith("ETA 1m 10s")
    assert [int(re.search(r"step (\d+)/10", ln).group(1)) for ln in inter] == [3, 6, 9] * 2
    assert ", 1m 00s into the round" in inter[1] and ", 1m 30s into the round" in inter[2]


def test_a_long_pass_before_the_first_model_step_is_reported():
    """I-BAU's perturbation pass: step boundaries (out_of_time) but no model step yet."""
    clock, log = FakeClock(), io.StringIO()
    loop = _loop(1, log, clock)
    w = torch.zeros(1, requires_grad=True)
    opt = torch.optim.SGD([w], lr=0.0)
    for _ in loop.rounds():
        for _ in range(4):
            clock.advance(20.0)
            assert not loop.out_of_time("perturbation")
        loop.step(opt, (w * 0).sum())
    lines = log.getvalue().strip().splitlines()
    assert lines[:2] == ["toy: round 1/1, 40.0 s into the round, no model step yet",
                         "toy: round 1/1, 1m 20s into the round, no model step yet"]
    assert lines[2].startswith("toy: round 1/1 done, 1m 20s, total 1m 20s")


def test_terminal_bar_counts_steps_over_all_rounds():
    clock, term = FakeClock(), Terminal()
    loop = _loop(3, term, clock)
    seen = Seen()
    _run(loop, clock, seen=seen)  # 32 images in batches of 8: 4 steps per round, known from the first batches()
    assert loop._progress.mode == "bar"
    bar = seen.bar
    assert seen[0] == (0, 1, 12) and seen[-1] == (2, 12, 12)
    assert [s[1] for s in seen] == list(range(1, 13))
    assert all(total == 12 for _, _, total in seen)
    out = term.getvalue()
    assert "toy round 1/3" in out and "toy round 3/3" in out and "steps" in out
    assert loop._progress.bar is None  # closed at the end
    assert bar.total == 12 and bar.n == 12  # after the last round: no step left to come
    assert "loss 0.5, ASR 12.1 %" in out  # the round's values beside the bar


def test_terminal_bar_total_learned_from_the_first_round():
    """Steps made without loop.batches (a defense that draws its own): unknown in round 1, then rounds x steps."""
    clock, term = FakeClock(), Terminal()
    loop = _loop(3, term, clock)
    seen = Seen()
    _run(loop, clock, use_batches=False, steps=5, seen=seen)
    assert [total for r, _, total in seen if r == 0] == [None] * 5
    assert [total for r, _, total in seen if r > 0] == [15] * 10 and seen[-1][1] == 15


def test_progress_false_prints_nothing():
    clock, log, term = FakeClock(), io.StringIO(), Terminal()
    for f in (log, term):
        loop = _loop(2, f, clock, progress=False)
        _run(loop, clock, step_s=50.0)
        assert loop._progress.mode is None and f.getvalue() == ""


def test_defense_progress_goes_to_stderr_only(capsys):
    """A real defense with progress=True (the default) on a non-terminal stderr: one line per round there, nothing
    on stdout; progress=False: nothing at all."""
    x, _ = synthetic_dataset(n=64, seed=0)
    fastpurify.bcu(tiny_cnn(16, seed=0), x, epochs=2, batch_size=32)
    out = capsys.readouterr()
    assert out.out == ""
    lines = out.err.strip().splitlines()
    assert len(lines) == 2 and lines[0].startswith("bcu: round 1/2 done, ") and "ETA" in lines[0], out.err
    assert lines[1].startswith("bcu: round 2/2 done, ") and "total" in lines[1] and "loss" in lines[1]
    fastpurify.bcu(tiny_cnn(16, seed=0), x, epochs=2, batch_size=32, progress=False)
    assert capsys.readouterr() == ("", "")


def test_training_prints_a_line_per_epoch(capsys):
    from fastpurify.train import train_backdoored
    from fastpurify.triggers import PatchTrigger

    x, y = synthetic_dataset(n=64, seed=0)
    train_backdoored(tiny_cnn(16, seed=0), x, y, trigger=PatchTrigger(), target=0, epochs=2, batch_size=32,
                     augment=False, progress=True)
    out = capsys.readouterr()
    lines = out.err.strip().splitlines()
    assert out.out == "" and len(lines) == 2, out
    assert lines[0].startswith("train: epoch 1/2 done, ") and "ETA" in lines[0] and "loss" in lines[0]
    assert lines[1].startswith("train: epoch 2/2 done, ") and "total" in lines[1]


@pytest.mark.parametrize("seconds,text", [(0.04, "0.0 s"), (59.94, "59.9 s"), (61, "1m 01s"), (7322, "2h 02m")])
def test_format_duration(seconds, text):
    assert format_duration(seconds) == text


def test_format_values_shows_losses_and_percentages_only():
    rec = {"round": 2, "seconds": 3.0, "loss": 1.0, "delta_loss": -2.5, "delta_norm": 3.0, "acc": 90.0, "ra": 50.0}
    assert format_values(rec) == "loss 1, delta_loss -2.5, ACC 90.0 %, RA 50.0 %"
