"""hubarches: a model hub for single-cell reference atlases, built on scArches.

Pull a published reference, map a query onto it with architectural surgery, transfer its
labels, and push the query-extended model back as the next version::

    import hubarches
    ref = hubarches.load_reference("org/atlas")
    result = ref.map(adata, batch_key="sample")
    result.adata.obsm["X_hubarches"], result.adata.obs["hubarches_label"]
    hubarches.push(result.reference, "org/atlas")

The names below are imported on first use, so ``import hubarches`` (and the command line's
``--help``, ``list`` and ``info``) does not pay for importing torch.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from hubarches._version import __version__

if TYPE_CHECKING:
    from hubarches.config import ModelConfig, TrainOptions
    from hubarches.pipeline import (
        MappingResult,
        TrainResult,
        load_reference,
        map_query,
        push,
        train_atlas,
    )
    from hubarches.reference import Reference
    from hubarches.registry import VersionInfo
    from hubarches.registry.select import get_registry

_EXPORTS = {
    "MappingResult": "hubarches.pipeline",
    "ModelConfig": "hubarches.config",
    "Reference": "hubarches.reference",
    "TrainOptions": "hubarches.config",
    "TrainResult": "hubarches.pipeline",
    "VersionInfo": "hubarches.registry",
    "get_registry": "hubarches.registry.select",
    "load_reference": "hubarches.pipeline",
    "map_query": "hubarches.pipeline",
    "push": "hubarches.pipeline",
    "train_atlas": "hubarches.pipeline",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    """Import a public name from its module on first access (PEP 562)."""
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'hubarches' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))
