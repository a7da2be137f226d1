"""Test helpers shared by tests/ and benchmarks/: the ONE tolerance table (DESIGN.md rule 7) and backend
enumeration.

Tolerances are ``torch.testing.assert_close``'s defaults per dtype; a looser one is passed explicitly at
the call site with a comment giving the measured error.
"""

from __future__ import annotations

from typing import List, Optional, Tuple

import torch

from . import backend as _backend

# (rtol, atol): torch.testing.assert_close defaults.
TOLERANCES = {
    torch.float64: (1e-7, 1e-7),
    torch.float32: (1.3e-6, 1e-5),
    torch.float16: (1e-3, 1e-5),
    torch.bfloat16: (1.6e-2, 1e-5),
}


def tolerance(dtype: torch.dtype) -> Tuple[float, float]:
    """(rtol, atol) for comparing a result of ``dtype`` against the reference."""
    return TOLERANCES[dtype]


def assert_close(actual: torch.Tensor, expected: torch.Tensor, *, rtol: Optional[float] = None,
                 atol: Optional[float] = None, msg: str = "") -> None:
    """``torch.testing.assert_close`` with the table's tolerance for ``expected.dtype`` unless overridden."""
    rt, at = TOLERANCES.get(expected.dtype, (None, None))
    torch.testing.assert_close(
        actual, expected, rtol=rt if rtol is None else rtol, atol=at if atol is None else atol, equal_nan=True,
        msg=(lambda m: f"{msg}\n{m}") if msg else None,
    )


def backends_for(op: str, device_type: str, dtype: torch.dtype = torch.float32) -> List[str]:
    """The backends that can run ``op`` here on ``device_type`` tensors."""
    return [b for b in _backend.BACKENDS if _backend.why_not(op, b, device_type, dtype) is None]
