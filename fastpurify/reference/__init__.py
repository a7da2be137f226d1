"""Eager PyTorch references: the ``torch`` backend of every op, the ground truth of every test and the
baseline of every benchmark (DESIGN.md rule 2)."""

from .pgd import pgd_update_ref

__all__ = ["pgd_update_ref"]
