"""What a long run shows while it runs: the rounds of the loop helper (every defense) and the epochs of ``train``.

Two displays, chosen by where the progress goes (``sys.stderr`` unless a file is given):

- **a terminal**: a tqdm bar that counts the model steps (every ``loop.step`` that changes the model, every
  training batch), described with the round, e.g. ``sau round 3/10 |████   | 52/200 steps [00:14<00:41]``. Its
  total covers the rounds still to run (steps per round × rounds) as soon as the steps of a round are known: from
  the first completed round, and before it from the batches the round asked for (a guess the loop makes in
  :meth:`Progress.expect`), so the ETA covers the whole run, not only the round;
- **anything else** (a log file, a pipe, a notebook): plain lines, one per completed round, with the round's
  time, the ETA of the run and the round's losses and ACC/ASR/RA
  (``sau: round 3/10 done, 41.2 s, ETA 4m 50s, loss 0.512, ASR 12.1 %``), and, inside a round longer than
  ``interval`` seconds (30), an intermediate line at most every ``interval`` seconds, so that a log never stays
  silent for long (a one-round I-BAU once showed 0/1 for 5 minutes; a demo wrote nothing for 796 s into a log).

The clock is injected (the loop's own, so that tests run on a fake clock); nothing here reads a device value
(the losses shown are the floats the loop already read at the round's end).

Example:
    >>> import io
    >>> t = [0.0]
    >>> log = io.StringIO()
    >>> p = Progress("sau", 2, file=log, clock=lambda: t[0])
    >>> for r in range(2):
    ...     p.start_round(r, 2)
    ...     t[0] += 10.0
    ...     p.end_round({"loss": 0.5}, 2)
    >>> print(log.getvalue().strip())
    sau: round 1/2 done, 10.0 s, ETA 10.0 s, loss 0.5
    sau: round 2/2 done, 10.0 s, total 20.0 s, loss 0.5
"""

from __future__ import annotations

import re
import sys
import time
from typing import Any, Callable, Dict, List, Optional, TextIO

#: Seconds of wall time between two intermediate lines of a long round (lines mode).
INTERVAL_S = 30.0
# Seconds between two refreshes of the bar while no step ends (a long pass before the first model step).
BAR_REFRESH_S = 1.0
# The bar: ``sau round 3/10:  26%|██▋       | 52/200 steps [00:14<00:41, 3.6step/s, loss=0.51]``.
BAR_FORMAT = "{desc}: {percentage:3.0f}%|{bar}| {n_fmt}/{total_fmt} steps [{elapsed}<{remaining}, {rate_fmt}{postfix}]"
#: Matches the lines of the lines mode (``sau: round 3/10 ...``, ``train: epoch 1/8 ...``), e.g. to tell them
#: from a command's own messages in a log.
PROGRESS_LINE = re.compile(r"^[\w.-]+: (round|epoch) \d+/\d+[ ,]")
# Values of a round's record shown in its line: ACC/ASR/RA as percentages, every loss as a number.
PERCENT_KEYS = ("acc", "asr", "ra")


def format_duration(seconds: float) -> str:
    """``41.2 s``, ``4m 10s``, ``1h 02m``.

    Example:
        >>> format_duration(41.23), format_duration(250), format_duration(3725)
        ('41.2 s', '4m 10s', '1h 02m')
    """
    if seconds < 60:
        return f"{seconds:.1f} s"
    s = int(round(seconds))
    if s < 3600:
        return f"{s // 60}m {s % 60:02d}s"
    return f"{s // 3600}h {s % 3600 // 60:02d}m"


def _is_terminal(file: Any) -> bool:
    try:
        return bool(file.isatty())
    except (AttributeError, ValueError):  # no isatty, or a closed file
        return False


def format_values(record: Dict[str, Any]) -> str:
    """The losses and ACC/ASR/RA of a round's record, as its progress line shows them.

    Example:
        >>> format_values({"round": 3, "seconds": 1.0, "loss": 0.51234, "asr": 12.14, "acc": 97.0})
        'loss 0.5123, ACC 97.0 %, ASR 12.1 %'
    """
    parts = [f"{k} {v:.4g}" for k, v in record.items() if "loss" in k and isinstance(v, (int, float))]
    parts += [f"{k.upper()} {record[k]:.1f} %" for k in PERCENT_KEYS if isinstance(record.get(k), (int, float))]
    return ", ".join(parts)


class Progress:
    """The progress of a run of ``total`` rounds (``unit="epoch"`` for training), on ``file`` (default: the
    ``sys.stderr`` of the moment it is created). ``mode`` is ``"bar"`` on a terminal, ``"lines"`` elsewhere,
    ``None`` when ``enabled`` is false (then every method does nothing). The caller tells it
    :meth:`start_round`, :meth:`expect` (the batches a round asked for), :meth:`step` (a model step),
    :meth:`heartbeat` (any other step boundary), :meth:`end_round` and :meth:`close`."""

    def __init__(self, name: str, total: int, *, enabled: bool = True, file: Optional[TextIO] = None,
                 clock: Callable[[], float] = time.perf_counter, unit: str = "round",
                 interval: float = INTERVAL_S, budget_left: Optional[Callable[[], float]] = None) -> None:
        self.file = file if file is not None else sys.stderr
        self.mode = None if not enabled else ("bar" if _is_terminal(self.file) else "lines")
        self.name, self.unit, self.clock, self.interval = name, unit, clock, interval
        self.budget_left = budget_left  # seconds a time budget leaves (an ETA never passes it); read per line
        self.total, self.round = total, 0
        self.steps = 0  # model steps in the current round
        self.steps_before = 0  # model steps of this run before the current round
        self.per_round: Optional[int] = None  # steps of the last completed round that made any
        self.guess: Optional[int] = None  # steps the current round asked for (before a round was completed)
        self.round_times: List[float] = []
        self.bar = None
        self._round_start = self._last_refresh = 0.0
        self._last_line: Optional[float] = None  # when the last line was printed (lines mode)

    # ------------------------------------------------------------------------------------------- events
    def start_round(self, r: int, total: int) -> None:
        if self.mode is None:
            return
        self.round, self.total, self.steps, self.guess = r, total, 0, None
        self._round_start = now = self.clock()
        if self._last_line is None:
            self._last_line = now
        if self.mode == "bar":
            desc = f"{self.name} {self.unit} {r + 1}/{total}"
            if self.bar is None:
                from tqdm import tqdm

                self.bar = tqdm(total=self._bar_total(), desc=desc, unit="step", leave=False, file=self.file,
                                dynamic_ncols=True, bar_format=BAR_FORMAT)
            self.bar.set_description_str(desc, refresh=False)
            self._set_bar_total()

    def expect(self, count: int) -> None:
        """The current round asked for ``count`` batches: its number of steps, until a completed round tells."""
        if self.mode is None or self.per_round is not None or count <= 0:
            return
        self.guess = count
        if self.bar is not None:
            self._set_bar_total()

    def step(self) -> None:
        """A model step ended."""
        if self.mode is None:
            return
        self.steps += 1
        if self.bar is not None:
            self.bar.update(1)
            if self.bar.total is not None and self.bar.n > self.bar.total:  # more steps than the round asked for
                self._set_bar_total()
        else:
            self.heartbeat()

    def heartbeat(self) -> None:
        """A step boundary that changed no model (a perturbation step, a recovery batch): in lines mode, an
        intermediate line when ``interval`` seconds passed since the last line; on a terminal, a refresh of the
        bar's clock."""
        if self.mode is None:
            return
        now = self.clock()
        if self.bar is not None:
            if now - self._last_refresh >= BAR_REFRESH_S:
                self._last_refresh = now
                self.bar.refresh()
        elif self._last_line is not None and now - self._last_line >= self.interval:
            self._last_line = now
            self._print(self._intermediate(now))

    def end_round(self, record: Dict[str, Any], total: int) -> None:
        """The round ended whole; ``record`` is its history entry, ``total`` the rounds now planned."""
        if self.mode is None:
            return
        now = self.clock()
        self.round_times.append(now - self._round_start)
        self.total = total
        if self.steps > 0:
            self.per_round = self.steps
        self.steps_before += self.steps
        self.steps, self.guess = 0, None
        done = self.round + 1
        if self.bar is not None:
            self.round = done  # the steps still to come are those of the rounds after this one
            self._set_bar_total()
            self.bar.set_postfix_str(format_values(record), refresh=True)
            return
        self._last_line = now
        when = (f"ETA {self._eta(self._per_round() * (total - done))}" if done < total else
                f"total {format_duration(sum(self.round_times))}")
        values = format_values(record)
        self._print(f"{self.name}: {self.unit} {done}/{total} done, {format_duration(self.round_times[-1])}, {when}"
                    + (f", {values}" if values else ""))

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None

    # ------------------------------------------------------------------------------------------- estimates
    def _per_round(self) -> float:
        """Seconds a round takes: the mean of the completed rounds, the first left out once there are others (it
        carries the warm-up and one-off work)."""
        times = self.round_times[1:] or self.round_times
        return sum(times) / len(times)

    def _round_steps(self) -> Optional[int]:
        return self.per_round or self.guess

    def _bar_total(self) -> Optional[int]:
        """The steps of this run: those made, and the steps of the current round and of the ones after it."""
        each = self._round_steps()
        if each is None:
            return None
        left = max(0, self.total - self.round)
        return max(self.steps_before + self.steps, self.steps_before + each * left)

    def _set_bar_total(self) -> None:
        self.bar.total = self._bar_total()
        self.bar.refresh()

    def _eta(self, seconds: float) -> str:
        if self.budget_left is not None:
            left = max(0.0, self.budget_left())
            if left < seconds:
                return f"{format_duration(left)} (time budget)"
        return format_duration(seconds)

    def _intermediate(self, now: float) -> str:
        """``ibau: round 1/3, step 12/40, 35.0 s into the round, ETA 4m 10s``: the ETA when the steps of a round
        and the time of one step are known."""
        into = now - self._round_start
        each = self._round_steps()
        head = f"{self.name}: {self.unit} {self.round + 1}/{self.total}, "
        if self.steps == 0:
            return head + f"{format_duration(into)} into the {self.unit}, no model step yet"
        step_s = into / self.steps
        text = head + f"step {self.steps}" + (f"/{each}" if each else "") + f", {format_duration(into)} into the " \
            + self.unit
        if each is None:
            return text
        later = self.total - self.round - 1
        round_s = self._per_round() if self.round_times else step_s * each
        return text + f", ETA {self._eta(step_s * max(0, each - self.steps) + later * round_s)}"

    def _print(self, line: str) -> None:
        print(line, file=self.file, flush=True)
