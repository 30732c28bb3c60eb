"""Reference weights passed between hubarches and scvi-tools, for the cross-training check.

``cross.py`` trains a reference with one tool and maps the query with the other, to tell a
difference in quality that comes from reference training from one that comes from query
training. Both sides write and read one ``.npz``: the reference module's tensors under
scvi-tools' names (scArches variant, one hidden layer, gene dispersion, ZINB), plus the gene
and batch order their axes follow. Numpy only: the scvi-tools side imports this from the
peer's own Python.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

ENC_W = "z_encoder.encoder.fc_layers.Layer 0.0.weight"  # [hidden, genes + batches]
ENC_B = "z_encoder.encoder.fc_layers.Layer 0.0.bias"
MEAN_W, MEAN_B = "z_encoder.mean_encoder.weight", "z_encoder.mean_encoder.bias"
VAR_W, VAR_B = "z_encoder.var_encoder.weight", "z_encoder.var_encoder.bias"
DEC_W = "decoder.px_decoder.fc_layers.Layer 0.0.weight"  # [hidden, latent + batches]
DEC_B = "decoder.px_decoder.fc_layers.Layer 0.0.bias"
SCALE_W, SCALE_B = "decoder.px_scale_decoder.0.weight", "decoder.px_scale_decoder.0.bias"
DROP_W, DROP_B = "decoder.px_dropout_decoder.weight", "decoder.px_dropout_decoder.bias"
PX_R = "px_r"
KEYS = (ENC_W, ENC_B, MEAN_W, MEAN_B, VAR_W, VAR_B, DEC_W, DEC_B)
KEYS += (SCALE_W, SCALE_B, DROP_W, DROP_B, PX_R)
_GENES, _BATCHES = "__genes__", "__batches__"


class ExchangeError(ValueError):
    """The file does not hold the tensors or orders this check needs."""


def save(
    path: str | os.PathLike[str],
    tensors: dict[str, np.ndarray],
    genes: Sequence[str],
    batches: Sequence[str],
) -> None:
    """Write ``tensors`` (scvi-tools names, axes in ``genes`` / ``batches`` order)."""
    missing = [k for k in KEYS if k not in tensors]
    if missing:
        raise ExchangeError(f"tensors missing: {missing}")
    arrays = {k: np.asarray(tensors[k], dtype=np.float32) for k in KEYS}
    arrays[_GENES] = np.asarray(list(genes), dtype=str)
    arrays[_BATCHES] = np.asarray(list(batches), dtype=str)
    tmp = Path(f"{os.fspath(path)}.partial.npz")
    np.savez(tmp, **arrays)
    tmp.replace(path)


def load(
    path: str | os.PathLike[str], genes: Sequence[str], batches: Sequence[str]
) -> dict[str, np.ndarray]:
    """Read the tensors with their gene and batch axes put in the caller's order."""
    with np.load(path) as f:
        data = {k: f[k] for k in f.files}
    have_genes, have_batches = list(data.pop(_GENES)), list(data.pop(_BATCHES))
    g = _order(have_genes, genes, "genes")
    b = _order(have_batches, batches, "batches")
    n_genes, n_latent = len(have_genes), data[MEAN_W].shape[0]
    out = dict(data)
    enc = data[ENC_W]
    out[ENC_W] = np.concatenate([enc[:, :n_genes][:, g], enc[:, n_genes:][:, b]], axis=1)
    dec = data[DEC_W]
    out[DEC_W] = np.concatenate([dec[:, :n_latent], dec[:, n_latent:][:, b]], axis=1)
    for key in (SCALE_W, SCALE_B, DROP_W, DROP_B, PX_R):
        out[key] = data[key][g]
    return out


def _order(have: list[str], want: Sequence[str], what: str) -> np.ndarray:
    """Indices into ``have`` that give ``want``; the two must hold the same names."""
    if sorted(have) != sorted(want):
        raise ExchangeError(f"the file's {what} differ from this reference's")
    index = {name: i for i, name in enumerate(have)}
    return np.asarray([index[name] for name in want], dtype=np.int64)
