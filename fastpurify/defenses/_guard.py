"""The rule-9 guard (DESIGN.md rule 9; tests/test_rule9.py): with ``FASTPURIFY_RULE9_GUARD=1`` a defense gets its clean
data readable only with the index tensors the loop helper handed out, and its weights may change only at
``loop.step`` or inside ``loop.writing`` — the precondition of the data-parallel runs (``_dist.py``), checked
instead of assumed. Off (the default), nothing here costs anything but an attribute test per step.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch
from torch import Tensor


class RuleNineError(AssertionError):
    """A defense read the clean data or changed the weights outside the loop helper (DESIGN.md rule 9): raised
    by the guard tests install (``Loop(guard=True)``)."""




class Guarded:
    """The loop helper's weight-write points and the guard's checks (a mixin of ``_loop.Loop``, which sets
    ``guard``, ``model``, ``group``, ``_guard_state`` and ``_yielded``)."""

    @contextlib.contextmanager
    def writing(self, what: str):
        """The one other point where weights may change: a write that is not an optimizer step (BCU's
        re-initialisation, AWM folding its masks into the weights). Data-parallel, rank 0's weights are
        broadcast afterwards (the ranks computed the same write; the broadcast makes them bit-equal)."""
        self._check_guard("before")
        yield
        if self.group is not None and self.model is not None:
            self.group.broadcast_module(self.model)
        self._check_guard("after")

    def _check_guard(self, when: str) -> None:
        """The rule-9 guard (``guard=True``, tests): the model's weights must be what the last step or write left
        (a write anywhere else is an error naming the parameter); "after" records the new state."""
        if not self.guard or self.model is None:
            return
        params = list(self.model.named_parameters())
        if when == "after" or self._guard_state is None:
            self._guard_state = [p.detach().clone() for _, p in params]
            return
        for (n, p), old in zip(params, self._guard_state):
            if p.shape != old.shape or not torch.equal(p.detach(), old):
                raise RuleNineError(f"{self.name}: the weight {n} changed outside loop.step / loop.writing "
                                    f"(seen {when} round {self.round + 1}, step {self.step_in_round + 1})")

    def end_guard(self) -> None:
        """After the defense returned: no weight changed since its last step or write (the guard's last check)."""
        self._check_guard("after the end of")

    def read_guard(self, idx: Any) -> None:
        """The data guard (``guard=True``): ``idx`` must be an index tensor :meth:`batches` handed out."""
        if self.guard and not (isinstance(idx, Tensor) and self._yielded.get(id(idx)) is idx):
            raise RuleNineError(f"{self.name}: the clean data was read with {type(idx).__name__} "
                                f"{idx if not isinstance(idx, Tensor) else tuple(idx.shape)}, not with an index "
                                "loop.batches handed out (DESIGN.md rule 9)")



class _GuardedRows:
    """The clean images (or labels) as the rule-9 guard shows them to a defense: readable only with an index
    tensor ``loop.batches`` handed out; shape, device and dtype are free."""

    def __init__(self, t: Tensor, loop: Any) -> None:
        self._t, self._loop = t, loop
        self.shape, self.device, self.dtype = t.shape, t.device, t.dtype

    def __getitem__(self, idx):
        self._loop.read_guard(idx)
        return self._t[idx]

    def __len__(self) -> int:
        return self._t.shape[0]


class GuardedData:
    """``CleanData`` behind the rule-9 guard (``FASTPURIFY_RULE9_GUARD=1``)."""

    def __init__(self, data: Any, loop: Any) -> None:
        self.x = _GuardedRows(data.x, loop)
        self.y = None if data.y is None else _GuardedRows(data.y, loop)
        self.num_classes = data.num_classes
        self._n = len(data)

    def __len__(self) -> int:
        return self._n
