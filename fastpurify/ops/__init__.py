"""Public ops, registered with torch.library as ``fastpurify::<op>``; each picks its backend through
:mod:`fastpurify.backend`."""

from .pgd import pgd_update, pgd_update_

__all__ = ["pgd_update", "pgd_update_"]
