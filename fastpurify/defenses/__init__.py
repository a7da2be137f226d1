"""The five defenses behind one call each: ``fastpurify.sau(model, clean_data, ...)`` etc.

A defense whose fast path exists (fastpurify/defenses/<name>.py, on fastpurify's ops) runs it; the others run
the faithful eager references of :mod:`fastpurify.reference.defenses` until theirs lands. ``fastpurify info``
says which path each defense takes.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Any, Dict

from ._loop import EvalSet, Interrupted, PurifyResult, TimeBudgetError
from ._state import DivergenceError, PurificationError

DEFENSES = ("sau", "ibau", "awm", "baerase", "bcu")
CLASSES = {"SAU": "sau", "IBAU": "ibau", "AWM": "awm", "BAERASE": "baerase", "BCU": "bcu"}
# A defense has a fast path when fastpurify/defenses/<name>.py exists (then it is imported below, at package import).
FAST_PATHS: Dict[str, bool] = {name: (Path(__file__).parent / f"{name}.py").is_file() for name in DEFENSES}


def _function(name: str):
    if FAST_PATHS[name]:
        return getattr(importlib.import_module(f"{__name__}.{name}"), name)
    return getattr(importlib.import_module(f"fastpurify.reference.defenses.{name}"), name)


def status() -> Dict[str, str]:
    """Which implementation ``fastpurify.<defense>`` runs, for ``fastpurify info``."""
    return {n: ("fast path" if FAST_PATHS[n] else "reference (eager port; fast path not implemented yet)")
            for n in DEFENSES}


class Defense:
    """Class form of a defense: holds a configuration, then purifies any number of models.

    Example::

        >>> purifier = fastpurify.IBAU(epochs=2, batch_size=100)      # doctest: +SKIP
        >>> result = purifier(model, (x, y), eval_data=(xt, yt))
    """

    name = ""

    def __init__(self, **options: Any) -> None:
        self.options = options

    def __call__(self, model, clean_data, **overrides: Any) -> PurifyResult:
        return _function(self.name)(model, clean_data, **{**self.options, **overrides})

    def __repr__(self) -> str:
        opts = ", ".join(f"{k}={v!r}" for k, v in self.options.items())
        return f"{type(self).__name__}({opts})"


def _make_class(cls_name: str, fn_name: str):
    return type(cls_name, (Defense,), {"name": fn_name, "__doc__": f"Class form of ``fastpurify.{fn_name}``."})


SAU, IBAU, AWM, BAERASE, BCU = (_make_class(c, f) for c, f in CLASSES.items())


# Bind the five functions. The fast modules are imported first: importing a submodule sets the package
# attribute of the same name (``defenses.sau`` = the module), so the functions must be bound after it.
for _name in DEFENSES:
    if FAST_PATHS[_name]:
        importlib.import_module(f"{__name__}.{_name}")
for _name in DEFENSES:
    globals()[_name] = _function(_name)
del _name


__all__ = ["DEFENSES", "EvalSet", "PurifyResult", "TimeBudgetError", "Interrupted", "DivergenceError",
           "PurificationError", "status", *DEFENSES, *CLASSES]
