"""Eager PyTorch references: the ``torch`` backend of every op, the ground truth of every test and the
baseline of every benchmark (DESIGN.md rule 2)."""

from .dual_logit import dual_logit_loss_ref
from .pgd import pgd_update_ref
from .universal import universal_update_ref

__all__ = ["dual_logit_loss_ref", "pgd_update_ref", "universal_update_ref"]
