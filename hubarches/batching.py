"""Minibatches from sparse counts: the matrix stays CSR until a batch is formed.

Also the device choice and batched embedding, which every caller of the model needs.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import scipy.sparse as sp
import torch

from hubarches.errors import ModelError
from hubarches.model import CVAE

__all__ = ["CountMatrix", "Minibatch", "embed_matrix", "pick_device"]

EMBED_BATCH_SIZE = 4096
"""Cells per forward pass when embedding; large batches amortise per-call overhead."""


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device to compute on: CUDA when present for ``"auto"``, else what was asked."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


@dataclass(frozen=True)
class Minibatch:
    """Dense counts of a few cells plus ``(rows, cols, values)`` of their nonzero entries."""

    x: torch.Tensor
    nonzero: tuple[torch.Tensor, torch.Tensor, torch.Tensor]

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> Minibatch:
        """The same batch on ``device``, counts as ``dtype``."""
        if device.type == "cpu" and dtype == self.x.dtype:
            return self
        rows, cols, vals = self.nonzero
        return Minibatch(
            self.x.to(device, dtype),
            (rows.to(device), cols.to(device), vals.to(device, dtype)),
        )


@dataclass(frozen=True)
class CountMatrix:
    """Counts (cells × genes) kept as CSR; dense only for the rows of one minibatch."""

    csr: sp.csr_matrix

    @classmethod
    def from_matrix(cls, matrix: sp.spmatrix | sp.sparray | np.ndarray) -> CountMatrix:
        """Wrap any 2-D matrix; dense input is converted to CSR once."""
        csr = sp.csr_matrix(matrix, dtype=np.float32)
        csr.sum_duplicates()
        return cls(csr)

    @property
    def n_cells(self) -> int:
        """Number of rows."""
        return self.csr.shape[0]

    @property
    def n_genes(self) -> int:
        """Number of columns."""
        return self.csr.shape[1]

    def library(self) -> np.ndarray:
        """Total counts per cell."""
        return np.asarray(self.csr.sum(axis=1), dtype=np.float32).ravel()

    def dense_rows(self, rows: np.ndarray) -> torch.Tensor:
        """The given rows as a dense float32 tensor (cells × genes)."""
        return torch.from_numpy(self.csr[rows].toarray())

    def minibatch(self, rows: np.ndarray) -> Minibatch:
        """The given rows, dense, together with the coordinates of their nonzero counts."""
        sub = self.csr[rows]
        nz_rows = np.repeat(np.arange(len(rows)), np.diff(sub.indptr))
        return Minibatch(
            x=torch.from_numpy(sub.toarray()),
            nonzero=(
                torch.from_numpy(nz_rows),
                torch.from_numpy(sub.indices.astype(np.int64)),
                torch.from_numpy(sub.data),
            ),
        )

    def chunks(self, size: int) -> Iterator[tuple[np.ndarray, torch.Tensor]]:
        """Consecutive row chunks ``(rows, dense)`` covering the whole matrix."""
        for start in range(0, self.n_cells, size):
            stop = min(self.n_cells, start + size)
            yield np.arange(start, stop), torch.from_numpy(self.csr[start:stop].toarray())


def embed_matrix(
    model: CVAE,
    counts: CountMatrix,
    codes: np.ndarray,
    *,
    batch_size: int = EMBED_BATCH_SIZE,
    sample: bool = False,
    seed: int = 0,
    device: str | torch.device | None = "auto",
) -> np.ndarray:
    """Latent means (or samples) of every cell, computed in batches in eval mode."""
    if codes.shape[0] != counts.n_cells:
        raise ModelError(
            f"{counts.n_cells} cells of counts but {codes.shape[0]} rows of covariate codes"
        )
    dev = pick_device(device)
    model = model.to(dev)
    generator = torch.Generator(device=dev).manual_seed(seed) if sample else None
    out = np.empty((counts.n_cells, model.config.n_latent), dtype=np.float32)
    codes_t = torch.as_tensor(codes, dtype=torch.int64)
    for rows, x in counts.chunks(batch_size):
        z = model.embed(x.to(dev), codes_t[rows].to(dev), sample=sample, generator=generator)
        out[rows] = z.cpu().numpy()
    return out
