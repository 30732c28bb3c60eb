"""hubarches: a model hub for single-cell reference atlases, built on scArches.

Pull a published reference, map a query onto it with architectural surgery, transfer its
labels, and push the query-extended model back as the next version::

    import hubarches
    ref = hubarches.load_reference("org/atlas")
    result = ref.map(adata, batch_key="sample")
    result.adata.obsm["X_hubarches"], result.adata.obs["hubarches_label"]
    hubarches.push(result.reference, "org/atlas")
"""

from __future__ import annotations

from hubarches._version import __version__
from hubarches.config import ModelConfig
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
from hubarches.train import TrainOptions

__all__ = [
    "MappingResult",
    "ModelConfig",
    "Reference",
    "TrainOptions",
    "TrainResult",
    "VersionInfo",
    "__version__",
    "get_registry",
    "load_reference",
    "map_query",
    "push",
    "train_atlas",
]
