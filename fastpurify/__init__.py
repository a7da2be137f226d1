"""fastpurify: purify backdoored PyTorch image classifiers fast.

Importing fastpurify needs no compiled extension, no GPU and no Triton (DESIGN.md rule 4); missing pieces
raise at call time with the command that fixes them. ``fastpurify.info()`` says what is available.
"""

__version__ = "0.1.0"

from .backend import BackendUnavailableError, info  # noqa: E402

__all__ = ["__version__", "info", "BackendUnavailableError"]
