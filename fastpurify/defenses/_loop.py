"""The one loop helper every defense (reference and fast) runs in (DESIGN.md rule 9).

It owns what is not the algorithm: checking the inputs, copying the model, seeding, the progress display (a
bar on a terminal, lines in a log: ``fastpurify/_progress.py``), per-round history, evaluation on ``eval_data``
every ``eval_every`` rounds (timed apart from the defense), the finite-loss guard, timings per phase, and the
time budget. A defense is a function ``algorithm(net, data, cfg, loop)`` that reaches its data only through
``loop.batches`` and changes weights only through ``loop.step(optimizer)``, so that multi-GPU runs can be added
here without touching it.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence

import torch
from torch import Tensor, nn

from .._progress import Progress
from . import _dist, _guard, _state
from ._guard import RuleNineError  # noqa: F401  (re-exported)
from ._state import DivergenceError, PurificationError  # noqa: F401  (re-exported)

STATUSES = ("completed", "budget_exhausted", "interrupted")

# A loss whose magnitude passes this has exploded (a mean cross-entropy of a healthy model is below 1e2; SAU at
# lr=1e3 reached 4.8e33): the run stops with a DivergenceError naming the round and step.
LOSS_LIMIT = 1e8

# The part of a time budget kept back for what follows the last step (the final model, moving it back to the
# user's device, the result): a share of the budget, at least a few milliseconds.
BUDGET_RESERVE = 0.02
BUDGET_RESERVE_MIN_S = 0.02


class TimeBudgetError(RuntimeError):
    """The ``time_budget`` ran out before the defense could change the model once: nothing was purified."""


class Interrupted(KeyboardInterrupt):
    """A defense was interrupted (Ctrl-C). ``result`` is a :class:`PurifyResult` with ``status="interrupted"``
    whose model holds the weights after the last completed round (the model as given when none completed), and
    ``result.schedule["rounds"]`` says how many rounds completed. With ``checkpoint=`` the run can be continued
    with ``resume=``; with ``inplace=True`` the model you gave is left as it was (the partial result is a copy)."""

    def __init__(self, result: PurifyResult) -> None:
        super().__init__(f"{result.defense}: interrupted after {result.schedule.get('rounds', 0)} completed round(s)")
        self.result = result


@dataclass
class EvalSet:
    """Held-out data to evaluate on during a defense: clean ``(x, y)`` and, optionally, the attack's trigger
    and target for ASR/RA. Never shown to the defense itself."""

    x: Tensor
    y: Tensor
    trigger: Optional[Callable[[Tensor], Tensor]] = None
    target: Optional[int] = None


@dataclass
class PurifyResult:
    """What a defense returns.

    ``model``: the purified model (a copy unless ``inplace=True``), in the train/eval mode and on the device
    the input model had. ``history``: one dict per round (losses; ACC/ASR/RA when evaluated). ``timings``:
    seconds per phase; ``defense`` excludes evaluation, ``eval`` is evaluation alone. ``status``:
    ``"completed"`` or ``"budget_exhausted"``. ``config``: the hyper-parameters used. ``info``: per-defense
    extras (e.g. BAERASE's per-class scores, BCU's layer groups).
    """

    model: nn.Module
    history: List[Dict[str, Any]]
    timings: Dict[str, float]
    status: str
    defense: str
    config: Dict[str, Any]
    info: Dict[str, Any] = field(default_factory=dict)
    schedule: Dict[str, Any] = field(default_factory=dict)

    def save(self, path) -> Any:
        """Weights to ``path`` (.pt/.pth or .safetensors), the rest to JSON beside it: fastpurify/results.py."""
        from ..results import save_result

        return save_result(self, path)

    @staticmethod
    def load(path, model: Optional[nn.Module] = None) -> PurifyResult:
        """A result :meth:`save` wrote (its .json or weights file); ``model`` receives the weights (a copy)."""
        from ..results import load_result

        return load_result(path, model=model)

    def __repr__(self) -> str:
        last = self.history[-1] if self.history else {}
        shown = {k: (round(v, 4) if isinstance(v, float) else v) for k, v in last.items()}
        return (f"PurifyResult(defense={self.defense!r}, status={self.status!r}, rounds={len(self.history)}, "
                f"defense_seconds={self.timings.get('defense', 0.0):.1f}, last={shown})")


class Loop(_guard.Guarded, _dist.Sharded):
    """Round iterator with progress, history, evaluation cadence, finite guard, phase timings and budget.

    Usage inside a defense::

        for r in loop.rounds():
            for idx in loop.batches(len(data), cfg.batch_size):
                with loop.phase("unlearn"):
                    loss = ...
                    loop.check_finite(loss)
                    loop.step(optimizer, loss)
            loop.log(loss=loss)
    """

    def __init__(self, name: str, rounds: int, *, device: torch.device, seed: int, progress: bool,
                 time_budget: Optional[float], eval_fn: Optional[Callable[[], Dict[str, float]]], eval_every: int,
                 sync_checks: bool = True, clock_start: Optional[float] = None,
                 clock: Optional[Callable[[], float]] = None, model: Optional[nn.Module] = None,
                 checkpoint: Optional[Any] = None, checkpoint_every: int = 1,
                 resume_state: Optional[Dict[str, Any]] = None, meta: Optional[Dict[str, Any]] = None,
                 progress_file: Optional[Any] = None, group: Optional[_dist.Group] = None,
                 guard: bool = False) -> None:
        self.name = name
        # data parallelism (_dist.py): None in one process
        self.group = group
        self.rank = group.rank if group is not None else 0
        self.world = group.world if group is not None else 1
        self.batch_rows: Optional[slice] = None  # this rank's rows of the last global batch batches() yielded
        self.batch_n = 0  # that global batch's size
        # the rule-9 guard (tests): weights may change only inside step() and writing()
        self.guard = guard
        self._guard_state: Optional[List[Tensor]] = None
        self._yielded: Dict[int, Tensor] = {}  # index tensors batches() handed out (the data guard's allow list)
        # The clock of timings and of the time budget: time.perf_counter, or a test's deterministic clock.
        self.clock = clock if clock is not None else time.perf_counter
        self.model = model  # the working model: health checks, snapshots, checkpoints
        self.checkpoint = checkpoint
        self.checkpoint_every = checkpoint_every
        self._resume_state = resume_state
        self.meta = meta or {}
        self._tracked: Dict[str, Any] = {}
        self.last_good: Optional[Dict[str, Tensor]] = None  # the model after the last completed round
        # The state of the model as the defense would return it now (AWM folds its masks in): set by set_export
        self._export: Optional[Callable[[], Dict[str, Tensor]]] = None
        self.completed_rounds = 0
        self._init_rms: Dict[str, float] = {}  # each parameter's RMS before the first round
        self.total_rounds = rounds  # may be lowered after the warm-up round when a time budget is given
        self.requested_rounds = rounds
        self.device = device
        self.progress = progress
        # a bar on a terminal, lines elsewhere (progress_file, default sys.stderr): _progress.py
        self._progress = Progress(name, rounds, enabled=progress and self.rank == 0, file=progress_file,
                                  clock=self.clock, budget_left=None if time_budget is None else self._remaining_local)
        self.time_budget = time_budget
        self.eval_fn = eval_fn
        self.eval_every = eval_every
        self.sync_checks = sync_checks  # references check every loss at once (they sync anyway)
        self.generator = torch.Generator().manual_seed(seed)
        self.history: List[Dict[str, Any]] = []
        self.timings: Dict[str, float] = defaultdict(float)
        self.status = "completed"
        self.schedule: Dict[str, Any] = {}  # what ran (result.schedule); defenses add their inner phases
        self.round = -1
        self.step_in_round = 0
        self._pending: Dict[str, Any] = {}
        self._bad_step: Optional[Tensor] = None
        self._start = None
        self._eval_seconds = 0.0
        # time budget: the clock starts when the defense was called (setup counts), evaluation does not count
        self._origin = self.clock() if clock_start is None else clock_start
        self._cut = False  # the budget stopped the run
        self._updated = False  # a step changed the model
        self._first_update_at: Optional[float] = None  # budget clock at the end of the first model step
        self._first_tick: Optional[float] = None  # budget clock at the first step boundary (setup before it)
        self._last_tick: Optional[float] = None
        self._tick_kind = "step"
        self._costs: Dict[str, List[float]] = defaultdict(list)  # the last three step costs of each kind
        self._share_limit: Optional[float] = None  # the budget clock a share() block may reach
        self._share_steps = 0
        self._pre_share = 0.0  # the largest share work before the first update may take (for the advice)
        self._round_costs: List[float] = []
        self._once_seconds = 0.0  # one-off work in the current round (phase(once=True))
        self._phase_events: List[Any] = []  # (name, once, start, end) CUDA events not yet read
        self._cut_steps: Optional[Dict[str, int]] = None

    # ------------------------------------------------------------------------------------------- timing
    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    @contextlib.contextmanager
    def phase(self, name: str, *, once: bool = False):
        """Time a phase of the defense. ``once=True`` marks one-off work inside a round (e.g. BAERASE's trigger
        recovery in the first round): a time budget's planner leaves it out of the cost of a round. On CUDA the
        phase is timed with CUDA events, read at the round's end (no synchronisation inside a step); on the CPU
        with the loop's clock."""
        if self.device.type == "cuda":
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            try:
                yield
            finally:
                end.record()
                self._phase_events.append((name, once, start, end))
            return
        t0 = self.clock()
        try:
            yield
        finally:
            self._add_phase(name, once, self.clock() - t0)

    def _add_phase(self, name: str, once: bool, dt: float) -> None:
        self.timings[name] += dt
        if once:
            self._once_seconds += dt

    def _read_phases(self) -> None:
        """The CUDA-event phase times recorded so far (one synchronisation, at a round's end)."""
        if self._phase_events:
            self._phase_events[-1][3].synchronize()
            for name, once, start, end in self._phase_events:
                self._add_phase(name, once, start.elapsed_time(end) / 1000.0)
            self._phase_events.clear()

    def elapsed(self) -> float:
        """Seconds of defense so far (evaluation excluded)."""
        return 0.0 if self._start is None else self.clock() - self._start - self._eval_seconds

    # ------------------------------------------------------------------------------------------- budget
    def _budget_clock(self) -> float:
        """Seconds since the defense was called, evaluation excluded (what the time budget is spent on). On
        CUDA the device is synchronised first, so that queued work counts: with a budget, one sync per step.
        Data-parallel: rank 0's clock, broadcast (one collective), so that every rank takes the same decisions."""
        self._sync()
        now = self.clock() - self._origin - self._eval_seconds
        return now if self.group is None else self.group.broadcast_float(now)

    def _remaining_local(self) -> float:
        """The budget left by this rank's own clock (the progress display's ETA: no collective)."""
        return self._limit() - (self.clock() - self._origin - self._eval_seconds)

    def _limit(self) -> float:
        b = float(self.time_budget)
        return b - max(BUDGET_RESERVE * b, BUDGET_RESERVE_MIN_S)

    def remaining(self) -> float:
        """Seconds of the time budget left for steps (``inf`` without a budget)."""
        if self.time_budget is None:
            return math.inf
        return self._limit() - self._budget_clock()

    def out_of_time(self, kind: str = "step") -> bool:
        """At a step boundary: ``True`` when the next step (of ``kind``) would not finish within the budget (then
        the run stops: every later call and :meth:`batches` say so too, and :meth:`rounds` ends after this
        round), or, inside :meth:`share`, when it would pass the block's share (then only the block ends).
        Measures the cost of the step since the previous boundary, per kind of step. Always ``False`` without a
        budget. (Every call is also a heartbeat of the progress display.)

        Until the first model update the run is the warm-up and is never cut (only a :meth:`share` block ends):
        the minimal useful run is then measured, not guessed, and when its first update ended past the budget
        :class:`TimeBudgetError` says how long a budget it needs."""
        self._progress.heartbeat()
        if self.time_budget is None:
            return False
        if self._cut:
            return True
        now = self._budget_clock()
        if self._last_tick is None:
            self._first_tick = now  # setup: everything from the call to the first step
        else:
            costs = self._costs[self._tick_kind]
            costs.append(now - self._last_tick)
            del costs[:-3]
        self._last_tick, self._tick_kind = now, kind
        predicted = self._predict(kind)
        if self._share_limit is not None:
            if self._share_steps > 0 and now + predicted > self._share_limit:
                return True
            self._share_steps += 1
        if not self._updated:
            return False
        self._judge_warm_up()
        if now + predicted <= self._limit():
            return False
        self._cut = True
        self._cut_steps = {"round": self.round + 1, "steps": self.step_in_round}
        return True

    def _predict(self, kind: str) -> float:
        """The cost of the next step of ``kind``: the dearest of its last three; for a kind not seen yet, the
        dearest recent step of any kind."""
        costs = self._costs.get(kind) or [c for cs in self._costs.values() for c in cs]
        return max(costs) if costs else 0.0

    @contextlib.contextmanager
    def share(self, fraction: float):
        """Before the first model update, give the steps inside the block at most ``fraction`` of the budget that
        remains when it starts (at least one step runs): for work that precedes the model update in a round —
        I-BAU's perturbation pass, AWM's trigger recovery — so that the first update still fits. Once a round was
        timed the planner fits whole rounds, so later blocks are not limited; without a budget nothing changes."""
        if self.time_budget is None or self._updated:
            yield
            return
        self._pre_share = max(self._pre_share, fraction)
        outer = (self._share_limit, self._share_steps)
        self._share_limit = self._budget_clock() + fraction * max(0.0, self.remaining())
        self._share_steps = 0
        try:
            yield
        finally:
            self._share_limit, self._share_steps = outer

    def _judge_warm_up(self) -> None:
        """After the first model update: raise when it ended past the budget."""
        if self._first_update_at is not None and self._first_update_at > self._limit():
            self._too_short()

    def _too_short(self) -> None:
        """The first model update ended past the budget. The budget that fits the measured minimal run: its first
        update, plus the share of the budget that work before it may take, plus the reserve, with a 25 % margin
        (a budget of that size was checked to run: tests/test_time_budget.py)."""
        first = self._first_update_at
        setup = self._first_tick if self._first_tick is not None else first
        need = 1.25 * first / (1.0 - BUDGET_RESERVE - self._pre_share)
        raise TimeBudgetError(
            f"{self.name}: time_budget={self.time_budget:.3g} s is too short for one useful step: the first model "
            f"update ended at {first:.3g} s ({setup:.3g} s of setup before the first step); give at least "
            f"{need:.3g} s (measured on this run, with a 25 % margin), or time_budget=None. Nothing was returned "
            "as purified.")

    def fit(self, requested: int, cost_each: float, share: float = 1.0) -> int:
        """How many units of an inner phase (e.g. recovery epochs), each costing about ``cost_each`` seconds,
        fit in ``share`` of the remaining budget: ``requested`` without a budget, else between 1 and
        ``requested`` (0 when ``requested`` is 0)."""
        if requested <= 0:
            return 0
        if self.time_budget is None:
            return requested
        if not self._updated:
            self._pre_share = max(self._pre_share, share)
        left = share * self.remaining()
        if self.group is not None:  # rank 0's measured cost decides for all
            cost_each = self.group.broadcast_float(cost_each, "budget plan")
        n = int(left // cost_each) if cost_each > 0 else requested
        return max(1, min(requested, n))

    def _plan(self, done: int) -> None:
        """After ``done`` rounds: fit the remaining rounds into the budget (lowering or restoring
        ``total_rounds``). The first round, which carries the warm-up, is used alone only until a second
        round was timed."""
        costs = self._round_costs[1:] or self._round_costs
        per_round = sum(costs) / len(costs)
        left = self.remaining()
        more = max(0, int(round(left / per_round))) if per_round > 0 else self.requested_rounds
        planned = min(self.requested_rounds, done + more)
        self.total_rounds = planned
        self.schedule.update(round_seconds=per_round, planned_rounds=planned)

    # ------------------------------------------------------------------------------------------- data
    def batches(self, n: int, batch_size: int, *, shuffle: bool = True, drop_last: bool = False,
                replacement: bool = False, steps: Optional[int] = None, budget: bool = True,
                kind: str = "step") -> Iterator[Tensor]:
        """Index tensors (on the device) over ``n`` samples: an epoch in seeded random order (or in order),
        or ``steps`` batches drawn with replacement. With a time budget, stops early when the next step would
        not fit (:meth:`out_of_time`, which times steps per ``kind``); ``budget=False`` for passes that must run
        whole (scoring)."""
        timed = budget and self.time_budget is not None
        if replacement:
            count = steps if steps is not None else max(1, n // batch_size)
            # all the phase's indices drawn at once (the same stream as one draw per step) and copied to the device
            # in one transfer, not one blocking copy per step
            drawn = torch.randint(0, n, (count, batch_size), generator=self.generator)
            rows = self.group.rows(batch_size) if self.group is not None else slice(0, batch_size)
            drawn = drawn[:, rows].to(self.device)  # data-parallel: this rank's rows of every global batch
            self._progress.expect(count)
            for i in range(count):
                if timed and self.out_of_time(kind):
                    return
                self._progress.heartbeat()
                yield self._hand_out(drawn[i], rows, batch_size)
            if timed:
                self.out_of_time(kind)  # time the last step
            return
        order = torch.randperm(n, generator=self.generator) if shuffle else torch.arange(n)
        order = order.to(self.device)
        stop = n - n % batch_size if drop_last else n
        starts = range(0, stop, batch_size)
        self._progress.expect(len(starts) if steps is None else min(steps, len(starts)))
        count = 0
        for s in starts:
            if steps is not None and count >= steps:
                break
            if timed and self.out_of_time(kind):
                return
            self._progress.heartbeat()
            count += 1
            idx = order[s:s + batch_size]
            rows = self.group.rows(idx.shape[0]) if self.group is not None else slice(0, idx.shape[0])
            yield self._hand_out(idx[rows], rows, idx.shape[0])
        if timed:
            self.out_of_time(kind)  # time the last step

    # ------------------------------------------------------------------------------------------- steps
    def check_finite(self, loss: Tensor, what: str = "loss") -> None:
        """Stop with an error naming the round and step when ``loss`` is not finite. References check at
        once; fast paths record the first bad step on the device and are checked at the round's end."""
        step = self.step_in_round
        if self.sync_checks:
            v = float(loss.detach())
            if not math.isfinite(v) or abs(v) > LOSS_LIMIT:
                kind = "non-finite" if not math.isfinite(v) else f"exploding (|{what}| > {LOSS_LIMIT:g})"
                raise DivergenceError(f"{self.name}: {kind} {what} ({v:.4g}) at round {self.round + 1}, "
                                      f"step {step + 1}; the run diverged: lower the learning rate or check the "
                                      "model and data")
            return
        d = loss.detach()
        bad = ~(torch.isfinite(d) & (d.abs() <= LOSS_LIMIT)).all()
        # step if bad else -1, by device arithmetic on a Python int: a tensor made from a host scalar would be a
        # blocking host-to-device copy per step on CUDA (pytorch/pytorch#120996)
        first = bad.long() * (step + 1) - 1
        self._bad_step = first if self._bad_step is None else torch.where(self._bad_step >= 0, self._bad_step, first)

    def step(self, optimizer: torch.optim.Optimizer, loss: Optional[Tensor] = None, *,
             updates_model: bool = True, shares: bool = False,
             project: Optional[Callable[[], None]] = None) -> None:
        """The one point where weights change: backward (when ``loss`` is given), optimizer step, zero grad.
        ``updates_model=False`` for optimizers of auxiliary networks (e.g. BAERASE's generator): their steps
        do not count as purification for the time budget's too-short check.

        Data-parallel, the gradients of the optimizer's parameters are summed over the ranks here (one
        collective), after ``loss`` — the mean over this rank's rows of the last batch — was weighted by the rank's
        share of that global batch. ``shares=True``: the loss (or the ``.grad`` the caller set) is already this
        rank's share of the global loss (I-BAU's hypergradient, over two batches). ``project``: a projection run
        right after the optimizer step, part of it (AWM's clamp of the masks to [0, 1])."""
        self._check_guard("before")
        if loss is not None:
            optimizer.zero_grad(set_to_none=True)
            # data-parallel: the rank's loss (a mean over its rows) weighted by its share of the global batch, so
            # that the SUM of the ranks' gradients is the one-process gradient of the global batch's mean
            scale = None if self.group is None or shares else (self.batch_rows.stop - self.batch_rows.start) / max(
                1, self.batch_n)
            (loss if scale is None else loss * scale).backward()
        if self.group is not None:
            _dist.reduce_grads(self.group, _dist.optimizer_params(optimizer))
        optimizer.step()
        if project is not None:
            project()
        self._check_guard("after")
        if updates_model:
            if not self._updated and self.time_budget is not None:
                self._first_update_at = self._budget_clock()
            self._updated = True
            self.step_in_round += 1
            self._progress.step()

    def log(self, **values: Any) -> None:
        """Record values for this round (tensors are read once, at the round's end)."""
        for k, v in values.items():
            self._pending[k] = v.detach() if isinstance(v, Tensor) else v

    # ------------------------------------------------------------------------------------------- rounds
    def rounds(self) -> Iterator[int]:
        """Yield round indices. With a time budget, the first round is the warm-up: after it (and after every
        later round) the remaining rounds are fitted into the budget from the measured round cost, and
        ``total_rounds`` is lowered to what fits (defenses whose schedule depends on the number of rounds read
        ``total_rounds`` each round, so their schedule is compressed, not cut); a round the budget cuts short
        (:meth:`batches`) is the last. ``status`` becomes ``"budget_exhausted"`` when fewer rounds than asked
        ran; ``schedule`` records what ran."""
        self._start = self.clock()
        r = first = self._begin()
        try:
            while True:
                if self.time_budget is not None and r > first:
                    if self._cut:
                        break
                    self._plan(r)  # re-planned after every round, also when the last plan said stop here
                    self._judge_warm_up()
                if r >= self.total_rounds:
                    break
                self.round, self.step_in_round, self._pending, self._bad_step = r, 0, {}, None
                self._yielded.clear()
                self._once_seconds = 0.0
                self._progress.start_round(r, self.total_rounds)
                t_round = self._budget_clock() if self.time_budget is not None else 0.0
                yield r
                self._read_phases()
                if self.time_budget is not None:
                    self._round_costs.append(self._budget_clock() - t_round - self._once_seconds)
                self._end_round()
                r += 1
                self._round_done(r)
                self._progress.end_round(self.history[-1], self.total_rounds)
        finally:
            self._progress.close()
            self._read_phases()
            self.timings["defense"] = self.elapsed()
            self.timings["eval"] = self._eval_seconds
            if self._cut or self.total_rounds < self.requested_rounds:
                self.status = "budget_exhausted"
            self.schedule.update(rounds=len(self.history), requested_rounds=self.requested_rounds,
                                 time_budget=self.time_budget)
            if self._cut_steps is not None:
                self.schedule["cut_in_round"] = self._cut_steps

    # ------------------------------------------------------------------------------------------- state
    def track(self, **objects: Any) -> None:
        """Register what a defense carries from one round to the next besides the model — optimizers, modules,
        tensors (updated in place), generators, or ``(get, set)`` pairs of functions — so that a checkpoint holds
        it and ``resume=`` restores it. Call before :meth:`rounds`."""
        for k, o in objects.items():
            ok = isinstance(o, (Tensor, torch.Generator)) or (isinstance(o, tuple) and len(o) == 2 and callable(o[0])
                                                               and callable(o[1])) or hasattr(o, "load_state_dict")
            if not ok:
                raise TypeError(f"loop.track: {k} is a {type(o).__name__}; expected a module, an optimizer, a tensor, "
                                "a generator or a (get, set) pair")
            self._tracked[k] = o

    def set_export(self, fn: Callable[[], Dict[str, Tensor]]) -> None:
        """For a defense whose model, while it runs, is not yet what it returns (AWM learns masks beside the
        weights): ``fn()`` gives the state dict of the model it would return now, keyed like the model's own.
        What an interruption hands back after a completed round."""
        self._export = fn

    def _snapshot(self) -> Dict[str, Tensor]:
        return _state.snapshot(self.model) if self._export is None else \
            {k: v.detach().clone() for k, v in self._export().items()}

    def _begin(self) -> int:
        """Before the first round: the reference sizes of the weights; with ``resume``, every state the
        checkpoint holds, and the round to continue from."""
        if self.model is not None:
            self._init_rms = _state.param_rms(self.model, _state.tensor_norms(self.model))
        st = self._resume_state
        if st is None:
            return 0
        self.model.load_state_dict(st["net"])
        _state.load_tracked(self._tracked, st["tracked"], self.name)
        self.generator.set_state(st["generator"])
        _state.set_rng_states(st["rng"], self.device)
        self.history = list(st["history"])
        self._init_rms = dict(st["init_rms"])
        self._updated = bool(st["updated"])
        self.schedule.update(st["schedule"])
        self.last_good = self._snapshot()
        self.completed_rounds = int(st["rounds_done"])
        self.schedule["resumed_from_round"] = self.completed_rounds
        return self.completed_rounds

    def _check_health(self) -> None:
        """After every round: the weights and buffers are finite and no parameter exploded (one device read)."""
        if self.model is None:
            return
        norms = _state.tensor_norms(self.model)  # one device read for both checks
        bad = _state.nonfinite_tensors(self.model, norms=norms)
        if bad:
            raise DivergenceError(_state.describe_nonfinite(self.name, bad, f"after round {self.round + 1}"))
        for n, b in _state.param_rms(self.model, norms).items():
            a = self._init_rms.get(n, b)
            if b > _state.DIVERGENCE_FACTOR * max(a, 1.0):
                raise DivergenceError(
                    f"{self.name}: the weights diverged in round {self.round + 1}: {n} grew from RMS {a:.3g} to "
                    f"{b:.3g} (more than {_state.DIVERGENCE_FACTOR:g}x); lower the learning rate")

    def _round_done(self, done: int) -> None:
        """A round finished whole: remember its model (what an interruption returns) and write the checkpoint."""
        self.completed_rounds = done
        if self.model is not None:
            self.last_good = self._snapshot()
        if self.checkpoint is not None and self.rank == 0 and (done % self.checkpoint_every == 0
                                                                or done >= self.total_rounds):
            self.write_checkpoint()

    def write_checkpoint(self) -> None:
        state = dict(self.meta, format=_state.FORMAT, rounds_done=self.completed_rounds,
                     net={k: v.detach().cpu().clone() for k, v in self.model.state_dict().items()},
                     schedule={k: v for k, v in self.schedule.items() if k != "resumed_from_round"},
                     tracked=_state.tracked_states(self._tracked), generator=self.generator.get_state(),
                     rng=_state.rng_states(self.device), history=self.history, init_rms=self._init_rms,
                     updated=self._updated)
        _state.save(self.checkpoint, state)

    def _end_round(self) -> None:
        self._check_guard("at the end of")
        s = int(self._bad_step) if self._bad_step is not None else -1  # the one sync of the finite guard per round
        if self.group is not None:  # a step that went bad on any rank stops every rank
            s = self.group.max_int(s)
        if s >= 0:
            raise DivergenceError(f"{self.name}: non-finite or exploding loss (|loss| > {LOSS_LIMIT:g}) at round "
                                  f"{self.round + 1}, step {s + 1}; the run diverged: lower the learning rate "
                                  "or check the model and data")
        self._check_health()
        rec: Dict[str, Any] = {"round": self.round + 1, "seconds": self.elapsed()}
        tensors = {k: v for k, v in self._pending.items() if isinstance(v, Tensor)}
        if tensors:
            stacked = torch.stack([t.float().mean() for t in tensors.values()])
            if self.group is not None:  # data-parallel: the mean of the ranks' per-round values
                stacked = self.group.sum(stacked, "history") / self.world
            rec.update(dict(zip(tensors, stacked.tolist())))
        rec.update({k: v for k, v in self._pending.items() if not isinstance(v, Tensor)})
        last = self.round + 1 == self.total_rounds or self._cut
        if self.eval_fn is not None and self.rank == 0 and ((self.round + 1) % self.eval_every == 0 or last):
            self._sync()
            t0 = self.clock()
            rec.update(self.eval_fn())
            self._eval_seconds += self.clock() - t0
        self.history.append(rec)


#: The fast paths' ``precision`` option.
PRECISIONS = ("fp32", "bf16")


def precision_autocast(precision: str, device: torch.device):
    """The context of a fast path's forwards: bf16 autocast on ``device`` for ``precision="bf16"``; for "fp32"
    autocast is off (also inside a caller's own autocast region)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16")


def check_choice(name: str, value: Any, valid: Sequence[Any]) -> None:
    """A clear error for an unknown option value, listing the valid ones."""
    if value not in valid:
        raise ValueError(f"{name}={value!r} is not valid; expected one of: {', '.join(map(repr, valid))}")


def check_positive(name: str, value: Any, *, integer: bool = False, allow_zero: bool = False) -> None:
    ok = isinstance(value, int) if integer else isinstance(value, (int, float))
    if isinstance(value, bool) or not ok or not math.isfinite(value) or value < 0 or (value == 0 and not allow_zero):
        kind = "integer" if integer else "number"
        raise ValueError(f"{name} must be a {'non-negative' if allow_zero else 'positive'} {kind}, got {value!r}")


def __getattr__(name: str):
    # The driver lives in _run.py (it imports this module); defenses import it from here as they always did.
    if name in ("run_defense", "_config"):
        from . import _run

        return getattr(_run, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
