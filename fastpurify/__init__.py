"""fastpurify: purify backdoored PyTorch image classifiers fast.

``fastpurify.sau / ibau / awm / baerase / bcu(model, clean_data, ...)`` purify a model and return a
:class:`PurifyResult`; ``fastpurify.SAU(...)`` etc. are the class forms. Importing fastpurify needs no
compiled extension, no GPU and no Triton (DESIGN.md rule 4); missing pieces raise at call time with the
command that fixes them. ``fastpurify.info()`` says what is available.

Example::

    >>> import fastpurify                                             # doctest: +SKIP
    >>> result = fastpurify.ibau(model, (x, y), eval_data=(x_test, y_test, trigger, target))
    >>> result.model, result.history[-1], result.timings["defense"]
"""

import importlib

__version__ = "0.1.0"

from .auto import purify  # noqa: E402
from .backend import BackendUnavailableError, info  # noqa: E402
from .defenses import (  # noqa: E402
    AWM,
    BAERASE,
    BCU,
    DEFENSES,
    IBAU,
    SAU,
    DivergenceError,
    EvalSet,
    Interrupted,
    PurificationError,
    PurifyResult,
    TimeBudgetError,
)

_SUBMODULES = ("auto", "backend", "cli", "data", "defenses", "kernels", "metrics", "models", "ops", "recipes",
               "reference", "testing", "train", "triggers")

__all__ = ["__version__", "info", "purify", "BackendUnavailableError", "PurifyResult", "EvalSet", "TimeBudgetError",
           "Interrupted", "DivergenceError", "PurificationError",
           *DEFENSES,
           "SAU", "IBAU", "AWM", "BAERASE", "BCU"]


def __getattr__(name):
    if name in DEFENSES:
        return getattr(importlib.import_module(".defenses", __name__), name)
    if name in _SUBMODULES:
        return importlib.import_module(f".{name}", __name__)
    raise AttributeError(f"module 'fastpurify' has no attribute {name!r}")
