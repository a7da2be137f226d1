"""Faithful eager ports of the five published defenses — the baselines every speed-up is measured against
and the ground truth the fast paths are tested against. Each module holds one algorithm and its
hyper-parameter dataclass; all share the common API of :mod:`fastpurify.defenses._loop`.

Example::

    >>> import fastpurify.reference.defenses as ref                # doctest: +SKIP
    >>> result = ref.ibau(model, (x, y), epochs=1)
"""

# The functions are bound after their modules are imported, so that ``defenses.sau`` is the function and
# not the submodule of the same name (importing a submodule sets that attribute on its package).
from .awm import AWMConfig, awm
from .baerase import BAERASEConfig, baerase
from .bcu import BCUConfig, bcu
from .ibau import IBAUConfig, ibau
from .sau import SAUConfig, sau

DEFENSES = ("sau", "ibau", "awm", "baerase", "bcu")

__all__ = ["DEFENSES", "sau", "ibau", "awm", "baerase", "bcu", "SAUConfig", "IBAUConfig", "AWMConfig",
           "BAERASEConfig", "BCUConfig"]
