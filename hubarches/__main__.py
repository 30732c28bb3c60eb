"""``python -m hubarches``: the same as the ``hubarches`` command."""

from __future__ import annotations

import sys

from hubarches.cli import main

if __name__ == "__main__":
    sys.exit(main())
