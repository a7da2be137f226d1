"""Eager PyTorch references: the ``torch`` backend of every op, the ground truth of every test and the
baseline of every benchmark (DESIGN.md rule 2)."""

from .cg import cg_direction_ref, cg_step_ref
from .dual_logit import dual_logit_loss_ref
from .masked_conv import build_masked_weights_ref, mask_grads_ref, masked_adam_clamp_ref, masked_conv2d_ref
from .pgd import pgd_update_ref
from .universal import universal_update_ref

__all__ = ["cg_direction_ref", "cg_step_ref", "dual_logit_loss_ref", "pgd_update_ref", "universal_update_ref",
           "build_masked_weights_ref", "mask_grads_ref", "masked_adam_clamp_ref", "masked_conv2d_ref"]
