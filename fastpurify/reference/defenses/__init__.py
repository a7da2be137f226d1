"""Faithful eager ports of the five published defenses — the baselines every speed-up is measured against
and the ground truth the fast paths are tested against. Each module holds one algorithm and its
hyper-parameter dataclass; all share the common API of :mod:`fastpurify.defenses._loop`.

Example::

    >>> import fastpurify.reference as ref                       # doctest: +SKIP
    >>> result = ref.ibau(model, (x, y), epochs=1)
"""

import importlib

DEFENSES = ("sau", "ibau", "awm", "baerase", "bcu")
CONFIGS = {"sau": "SAUConfig", "ibau": "IBAUConfig", "awm": "AWMConfig", "baerase": "BAERASEConfig",
           "bcu": "BCUConfig"}

__all__ = list(DEFENSES) + list(CONFIGS.values())


def __getattr__(name):
    # Lazy: importing fastpurify.reference must not import every algorithm.
    for mod, cfg in CONFIGS.items():
        if name in (mod, cfg):
            return getattr(importlib.import_module(f"{__name__}.{mod}"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
