"""``python -m fastpurify``: the same as the ``fastpurify`` command."""

import sys

from .cli import main

sys.exit(main())
