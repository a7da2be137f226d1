"""Public ops, registered with torch.library as ``fastpurify::<op>``; each picks its backend through
:mod:`fastpurify.backend`."""

from .attack import SharedPGD, pgd, shared_pgd
from .dual_logit import dual_logit_loss
from .pgd import pgd_update, pgd_update_
from .universal import universal_update, universal_update_

__all__ = ["SharedPGD", "dual_logit_loss", "pgd", "pgd_update", "pgd_update_", "universal_update",
           "universal_update_", "shared_pgd"]
