"""Minibatches from sparse counts: the matrix stays CSR until a batch is formed.

Two sources share one interface (:class:`Counts`): :class:`CountMatrix` holds a CSR matrix
in memory; :class:`StreamedCounts` reads row blocks on demand (e.g. from a backed ``.h5ad``)
so that a query of millions of cells never sits in memory. Training shuffles blocks, then
cells within a block: for an in-memory matrix, one block is the whole matrix and this is a
plain global shuffle. Also here: the device choice and batched embedding.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

import numpy as np
import scipy.sparse as sp
import torch

from hubarches import native
from hubarches.errors import ModelError
from hubarches.fastlik import CsrRows, nonzero_coordinates
from hubarches.model import CVAE

__all__ = [
    "BLOCK_CELLS",
    "CountMatrix",
    "Counts",
    "Minibatch",
    "StreamedCounts",
    "embed_matrix",
    "nonzero_coordinates",
    "pick_device",
]

EMBED_BATCH_SIZE = 1024
"""Cells per forward pass when embedding; large batches amortise per-call overhead."""
BLOCK_CELLS = 16_384
"""Cells read at once from a streamed source: large enough for sequential reads and a good
shuffle, small enough that a block and its aligned copy stay near 100 MB at typical density
(a million-cell query then maps in under 2 GB; see bench/stream_1m.py)."""


def pick_device(device: str | torch.device | None = "auto") -> torch.device:
    """The device to compute on: CUDA when present for ``"auto"``, else what was asked."""
    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


class Minibatch:
    """Dense counts of a few cells; ``(rows, cols, values)`` of their nonzero entries on demand.

    Query training with a frozen dispersion never asks for the coordinates, so they are
    only built (once) when read.
    """

    def __init__(
        self,
        x: torch.Tensor | Callable[[], torch.Tensor],
        *,
        csr: sp.csr_matrix | Callable[[], sp.csr_matrix] | None = None,
        nonzero: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None,
        stored: CsrRows | None = None,
        log1p: Callable[[], torch.Tensor] | None = None,
    ) -> None:
        if csr is None and nonzero is None:
            raise ModelError("a minibatch needs its CSR rows or its nonzero coordinates")
        # Dense counts, or a function that makes them (float32, on the CPU) when first read:
        # query training's C step reads the CSR rows and never needs them.
        self._x = x
        self._log1p: torch.Tensor | Callable[[], torch.Tensor] | None = log1p
        self._csr = csr  # or a function that cuts them out, called only when needed
        self._nonzero = nonzero
        self._stored = stored

    @property
    def x(self) -> torch.Tensor:
        """The dense counts ``[n_cells, n_genes]``."""
        if callable(self._x):
            self._x = self._x()
        return self._x

    @property
    def x_log(self) -> torch.Tensor:
        """``log1p`` of the dense counts, the encoder's input; made once, when first read.

        Batches cut from a CSR matrix take it on the stored values only, in C (log1p(0) = 0):
        one logarithm per stored count instead of one per entry, in one pass.
        """
        if self._log1p is None:
            self._log1p = torch.log1p(self.x)
        elif callable(self._log1p):
            self._log1p = self._log1p()
        return self._log1p

    @property
    def stored(self) -> CsrRows | None:
        """The batch's rows of the source CSR matrix, where the C code can read them."""
        return self._stored

    @classmethod
    def from_csr(cls, sub: sp.csr_matrix) -> Minibatch:
        """Densify a few CSR rows."""
        return cls(torch.from_numpy(sub.toarray()), csr=sub)

    @property
    def nonzero(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, cols, values)`` of the nonzero counts."""
        if self._nonzero is None:
            assert self._csr is not None
            csr = self._csr() if callable(self._csr) else self._csr
            self._nonzero = nonzero_coordinates(csr)
        return self._nonzero

    def stored_counts(
        self,
    ) -> CsrRows | Callable[[], tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """The nonzero counts for the likelihood, as the model's ``nonzero`` argument takes them.

        Rows of the source CSR matrix where the C log-gamma pass can read them in place,
        else a function that builds coordinates.
        """
        if self._stored is not None and (callable(self._x) or self._x.device.type == "cpu"):
            return self._stored
        return lambda: self.nonzero

    def to(self, device: torch.device, dtype: torch.dtype = torch.float32) -> Minibatch:
        """The same batch on ``device``, counts as ``dtype``."""
        if device.type == "cpu" and (
            dtype == torch.float32 if callable(self._x) else dtype == self._x.dtype
        ):
            return self

        if self._nonzero is None and device.type == "cpu":

            def log1p() -> torch.Tensor:  # converted only if read
                return self.x_log.to(dtype)

            return Minibatch(self.x.to(dtype), csr=self._csr, stored=self._stored, log1p=log1p)
        rows, cols, vals = self.nonzero
        return Minibatch(  # on an accelerator log1p is cheaper there than a second copy
            self.x.to(device, dtype),
            nonzero=(rows.to(device), cols.to(device), vals.to(device, dtype)),
        )


@runtime_checkable
class Counts(Protocol):
    """Counts (cells × genes) that can be read in sequential blocks and shuffled batches."""

    @property
    def n_cells(self) -> int:
        """Number of cells (rows)."""
        ...

    @property
    def n_genes(self) -> int:
        """Number of genes (columns)."""
        ...

    def library(self) -> np.ndarray:
        """Total counts per cell."""
        ...

    def blocks(self, size: int) -> Iterator[tuple[int, CountMatrix]]:
        """Consecutive row blocks ``(first row, block)`` covering every cell, in order."""
        ...

    def batches(
        self, rows: np.ndarray, batch_size: int, rng: np.random.Generator
    ) -> Iterator[tuple[np.ndarray, Minibatch]]:
        """Shuffled minibatches ``(row indices, batch)`` over the given rows, once each."""
        ...


def _csr_view(
    data: np.ndarray, indices: np.ndarray, indptr: np.ndarray, shape: tuple[int, int]
) -> sp.csr_matrix:
    """A CSR matrix on existing arrays, without copying them.

    scipy's constructor copies slices of larger arrays (to free the rest), which for row
    blocks of a big matrix means copying every block; the arrays here are consistent by
    construction, so they are set directly.
    """
    out = sp.csr_matrix(shape, dtype=data.dtype)
    out.data, out.indices, out.indptr = data, indices, indptr
    return out


@dataclass(frozen=True)
class CountMatrix:
    """Counts kept as CSR in memory; dense only for the rows of one minibatch."""

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

    @property
    def shape(self) -> tuple[int, int]:
        """``(n_cells, n_genes)``."""
        return (self.csr.shape[0], self.csr.shape[1])

    def library(self) -> np.ndarray:
        """Total counts per cell."""
        return np.asarray(self.csr.sum(axis=1), dtype=np.float32).ravel()

    def dense_rows(self, rows: np.ndarray) -> torch.Tensor:
        """The given rows as a dense float32 tensor (cells × genes)."""
        return torch.from_numpy(self.csr[rows].toarray())

    def minibatch(self, rows: np.ndarray) -> Minibatch:
        """The given rows, dense, together with the coordinates of their nonzero counts."""
        self._check_rows(rows)
        return self._minibatch(rows, native.csr_supported(self.csr))

    def _check_rows(self, rows: np.ndarray) -> None:
        """Refuse row numbers outside the matrix (IndexError)."""
        if len(rows) and (np.min(rows) < 0 or np.max(rows) >= self.n_cells):
            raise IndexError(f"row numbers outside 0..{self.n_cells - 1}")

    def _minibatch(self, rows: np.ndarray, readable: bool) -> Minibatch:
        """:meth:`minibatch` of rows already checked; ``readable``: the C code reads the CSR."""
        if not readable:
            return Minibatch.from_csr(self.csr[rows])
        csr = self.csr

        def dense(log1p: bool = False) -> torch.Tensor:
            out = native.dense_rows(csr, rows, log1p=log1p)  # None if the C code is off
            if out is not None:
                return out
            plain = torch.from_numpy(csr[rows].toarray())
            return torch.log1p(plain) if log1p else plain

        return Minibatch(
            dense, csr=lambda: csr[rows], stored=CsrRows(csr, rows), log1p=lambda: dense(True)
        )

    def row_block(self, start: int, stop: int) -> CountMatrix:
        """Rows ``start:stop`` as a view on this matrix's arrays (no copy of the counts)."""
        first, last = self.csr.indptr[start], self.csr.indptr[stop]
        return CountMatrix(
            _csr_view(
                self.csr.data[first:last],
                self.csr.indices[first:last],
                (self.csr.indptr[start : stop + 1] - first).astype(self.csr.indices.dtype),
                (stop - start, self.n_genes),
            )
        )

    def dense_log1p(self, buffer: np.ndarray | None = None) -> torch.Tensor:
        """``log1p`` of all rows, dense: the encoder's input.

        log1p(0) = 0, so it is taken on the stored values only, before densifying. With a
        ``buffer`` of at least ``n_cells`` rows the result is written there (and shares its
        memory), which spares a fresh, page-faulting allocation per block.
        """
        out = (
            torch.empty(self.shape, dtype=torch.float32)
            if buffer is None
            else torch.from_numpy(buffer[: self.n_cells])
        )
        if native.dense_log1p(self.csr, out):  # one parallel pass in C
            return out
        logged = sp.csr_matrix(
            (
                torch.log1p(torch.from_numpy(self.csr.data)).numpy(),
                self.csr.indices,
                self.csr.indptr,
            ),
            shape=self.csr.shape,
            copy=False,
        )
        dense = out.numpy()
        dense.fill(0.0)  # scipy adds into ``out``
        logged.toarray(out=dense)
        return out

    def blocks(self, size: int) -> Iterator[tuple[int, CountMatrix]]:
        """Consecutive row blocks covering the matrix (views, not copies)."""
        for start in range(0, self.n_cells, size):
            yield start, self.row_block(start, min(self.n_cells, start + size))

    def batches(
        self, rows: np.ndarray, batch_size: int, rng: np.random.Generator
    ) -> Iterator[tuple[np.ndarray, Minibatch]]:
        """A global shuffle of ``rows`` cut into minibatches.

        The rows are checked, and the matrix's layout looked at, once per pass rather than
        per minibatch: each numpy call costs ~30 µs between a training step's large products.
        """
        self._check_rows(rows)
        readable = native.csr_supported(self.csr)
        order = np.asarray(rows, dtype=np.int64)[rng.permutation(len(rows))]
        for start in range(0, len(order), batch_size):
            chunk = order[start : start + batch_size]
            yield chunk, self._minibatch(chunk, readable)


@dataclass
class StreamedCounts:
    """Counts read block by block through ``read(start, stop) -> CSR``; never all in memory.

    ``read`` returns the rows ``start:stop`` as CSR float32 with ``n_genes`` columns (the
    query pipeline aligns genes and checks counts there). Per-cell library sizes are
    computed on the first pass and kept (one float per cell).
    """

    read: Callable[[int, int], sp.csr_matrix]
    n_cells: int
    n_genes: int
    block_cells: int = BLOCK_CELLS
    _library: np.ndarray | None = field(default=None, repr=False)
    _cached: CountMatrix | None = field(default=None, repr=False)

    def _block(self, start: int) -> CountMatrix:
        """Read one block; a source of a single block is read once and kept."""
        if self._cached is not None:
            return self._cached
        stop = min(self.n_cells, start + self.block_cells)
        block = CountMatrix.from_matrix(self.read(start, stop))
        if block.shape != (stop - start, self.n_genes):
            raise ModelError(
                f"a block of rows {start}:{stop} has shape {block.shape}, expected "
                f"{(stop - start, self.n_genes)}"
            )
        if self.n_cells <= self.block_cells:
            self._cached = block
        return block

    def set_library(self, library: np.ndarray) -> None:
        """Record library sizes computed while the data was read for another purpose."""
        if library.shape != (self.n_cells,):
            raise ModelError(f"expected {self.n_cells} library sizes, got {library.shape}")
        self._library = library

    def library(self) -> np.ndarray:
        """Total counts per cell (one pass over the data the first time)."""
        if self._library is None:
            lib = np.empty(self.n_cells, dtype=np.float32)
            for start, block in self.blocks(self.block_cells):
                lib[start : start + block.n_cells] = block.library()
            self._library = lib
        return self._library

    def blocks(self, size: int) -> Iterator[tuple[int, CountMatrix]]:
        """Blocks read sequentially; ``size`` subdivides each read block."""
        for start in range(0, self.n_cells, self.block_cells):
            block = self._block(start)
            yield from ((start + s, b) for s, b in block.blocks(size))

    def batches(
        self, rows: np.ndarray, batch_size: int, rng: np.random.Generator
    ) -> Iterator[tuple[np.ndarray, Minibatch]]:
        """Blocks in random order, cells shuffled within each block."""
        block_of = rows // self.block_cells
        present = np.unique(block_of)
        # One block: the same draws as an in-memory matrix, so results do not depend on it.
        for b in present if len(present) == 1 else rng.permutation(present):
            start = int(b) * self.block_cells
            block = self._block(start)
            local = rows[block_of == b] - start
            for chunk, batch in block.batches(local, batch_size, rng):
                yield chunk + start, batch


def embed_matrix(
    model: CVAE,
    counts: Counts,
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
    buffer = np.empty((min(batch_size, counts.n_cells), counts.n_genes), dtype=np.float32)
    for start, block in counts.blocks(batch_size):
        stop = start + block.n_cells
        x_log = block.dense_log1p(buffer).to(dev)
        z = model.embed_log(x_log, codes_t[start:stop].to(dev), sample=sample, generator=generator)
        out[start:stop] = z.cpu().numpy()
    return out
