"""Public ops, registered with torch.library as ``fastpurify::<op>``; each picks its backend through
:mod:`fastpurify.backend`."""

from .attack import SharedPGD, pgd, shared_pgd
from .cg import CapturedHypergrad, cg_direction_, cg_solve, cg_step_, fixed_point_solve, hvp, implicit_hypergrad
from .dual_logit import dual_logit_loss
from .masked_conv import build_masked_weights_, mask_grads_, masked_adam_clamp_, masked_conv2d
from .pgd import pgd_update, pgd_update_
from .universal import universal_update, universal_update_

__all__ = ["CapturedHypergrad", "cg_direction_", "cg_solve", "cg_step_", "fixed_point_solve", "hvp",
           "implicit_hypergrad",
           "SharedPGD", "dual_logit_loss", "pgd", "pgd_update", "pgd_update_", "universal_update",
           "universal_update_", "shared_pgd",
           "build_masked_weights_", "mask_grads_", "masked_adam_clamp_", "masked_conv2d"]
