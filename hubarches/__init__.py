"""hubarches: a model hub for single-cell reference atlases, built on scArches."""

from __future__ import annotations

from hubarches._version import __version__

__all__ = ["__version__"]
