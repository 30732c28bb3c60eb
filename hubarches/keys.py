"""Where a mapping's results go in an AnnData: the ``obsm``, ``obs`` and ``uns`` keys."""

from __future__ import annotations

__all__ = [
    "LATENT_KEY",
    "OBS_LABEL",
    "OBS_OK",
    "OBS_PROBABILITY",
    "OBS_SCORE",
    "OBS_UNCERTAINTY",
    "UNS_KEY",
]

LATENT_KEY = "X_hubarches"
"""``obsm``: the latent means of the query cells."""
UNS_KEY = "hubarches"
"""``uns``: the mapping report."""
OBS_LABEL = "hubarches_label"
"""``obs``: the transferred label, ``Unknown`` where uncertain or off the atlas."""
OBS_PROBABILITY = "hubarches_label_probability"
"""``obs``: the winning label's share of the neighbours' weight."""
OBS_UNCERTAINTY = "hubarches_label_uncertainty"
"""``obs``: one minus that probability."""
OBS_SCORE = "hubarches_mapping_score"
"""``obs``: the mapping-quality score (large: far from the reference)."""
OBS_OK = "hubarches_mapping_ok"
"""``obs``: whether the cell passes the mapping-quality check."""
