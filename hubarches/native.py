"""The optional C implementation of the likelihood's elementwise core (``hubarches._fastcore``).

:func:`hubarches.fastlik.elementwise_core` evaluated by PyTorch is some forty passes over the
cells × genes arrays; the C version reads each cell's row twice and vectorises the
logarithms and exponentials, which makes a query step about twice as fast on the CPU. It is
built at install time when a C compiler is present and used for float32 CPU tensors; set
``HUBARCHES_NATIVE=0`` to use PyTorch's version instead (the results agree to float rounding).
"""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp
import torch

__all__ = ["NATIVE_ENV", "available", "dense_rows", "native_core", "supports"]

NATIVE_ENV = "HUBARCHES_NATIVE"
"""``0`` turns the C core off; anything else (or unset) uses it where it is built."""

try:
    from hubarches import _fastcore
except ImportError:  # built without a C compiler: PyTorch computes the core
    _fastcore = None

_THETA_NONE, _THETA_GENE, _THETA_CELL = 0, 1, 2


def available() -> bool:
    """Whether the C core is built and not turned off by :data:`NATIVE_ENV`."""
    return _fastcore is not None and os.environ.get(NATIVE_ENV, "").strip() != "0"


def _rows_dense(t: torch.Tensor, shape: tuple[int, int]) -> bool:
    """A float32 CPU matrix of ``shape`` whose rows are contiguous."""
    return (
        t.device.type == "cpu"
        and t.dtype == torch.float32
        and tuple(t.shape) == shape
        and (t.stride(1) == 1 or shape[1] == 1)
    )


def _contiguous(t: torch.Tensor) -> bool:
    """A contiguous float32 CPU tensor."""
    return t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous()


def supports(
    a: torch.Tensor,
    p: torch.Tensor | None,
    x: torch.Tensor,
    log_library: torch.Tensor,
    theta: torch.Tensor | None,
    log_theta: torch.Tensor | None,
) -> bool:
    """Whether :func:`native_core` can take these tensors (else PyTorch computes the core)."""
    if not available() or a.dim() != 2:
        return False
    shape = (a.shape[0], a.shape[1])
    if not (_rows_dense(a, shape) and _contiguous(x) and tuple(x.shape) == shape):
        return False
    if not (_contiguous(log_library) and tuple(log_library.shape) == (shape[0],)):
        return False
    if p is not None and not _rows_dense(p, shape):
        return False
    if theta is None or log_theta is None:
        return theta is None and log_theta is None and p is None
    return all(
        _contiguous(t) and tuple(t.shape) in ((shape[1],), shape) and t.shape == theta.shape
        for t in (theta, log_theta)
    )


def native_core(
    a: torch.Tensor,
    p: torch.Tensor | None,
    x: torch.Tensor,
    log_library: torch.Tensor,
    theta: torch.Tensor | None,
    log_theta: torch.Tensor | None,
    *,
    zinb: bool,
    want_theta: bool,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`hubarches.fastlik.elementwise_core` in C; call only where :func:`supports`."""
    assert _fastcore is not None
    n_cells, n_genes = a.shape
    poisson = theta is None or log_theta is None
    mode = _THETA_NONE if poisson else (_THETA_GENE if theta.dim() == 1 else _THETA_CELL)
    nll = torch.empty(n_cells, dtype=torch.float32)
    grad_a = torch.empty(n_cells, n_genes, dtype=torch.float32)
    grad_p = torch.empty_like(grad_a) if zinb else None
    grad_lt = torch.empty_like(grad_a) if want_theta and not poisson else None

    def address(t: torch.Tensor | None) -> int:
        return 0 if t is None else t.data_ptr()

    _fastcore.core(
        n_cells,
        n_genes,
        address(a),
        a.stride(0),
        address(p),
        0 if p is None else p.stride(0),
        address(x),
        address(log_library),
        address(theta),
        address(log_theta),
        mode,
        int(zinb),
        int(grad_lt is not None),
        address(nll),
        address(grad_a),
        address(grad_p),
        address(grad_lt),
        torch.get_num_threads(),
    )
    return nll, grad_a, grad_p, grad_lt


_INDEX_TYPES = (np.dtype(np.int32), np.dtype(np.int64))


def dense_rows(csr: sp.csr_matrix, rows: np.ndarray) -> torch.Tensor | None:
    """Rows ``rows`` of a float32 CSR matrix as a dense tensor, or None where unsupported.

    Skips scipy's intermediate CSR of the selected rows: a minibatch is formed in one pass.
    Row numbers are checked here; column indices outside the matrix are refused in C.
    """
    if not available() or csr.data.dtype != np.float32 or csr.shape[1] < 1:
        return None
    if csr.indptr.dtype not in _INDEX_TYPES or csr.indices.dtype not in _INDEX_TYPES:
        return None
    arrays = (csr.data, csr.indices, csr.indptr)
    if not all(a.flags.c_contiguous for a in arrays):
        return None
    picked = np.ascontiguousarray(rows, dtype=np.int64)
    if picked.size and (picked.min() < 0 or picked.max() >= csr.shape[0]):
        raise IndexError(f"row numbers outside 0..{csr.shape[0] - 1}")
    out = torch.empty(len(picked), csr.shape[1], dtype=torch.float32)
    if not len(picked):
        return out
    assert _fastcore is not None
    _fastcore.densify(
        len(picked),
        csr.shape[1],
        csr.indptr.ctypes.data,
        int(csr.indptr.dtype == np.int64),
        csr.indices.ctypes.data,
        int(csr.indices.dtype == np.int64),
        csr.data.ctypes.data,
        picked.ctypes.data,
        out.data_ptr(),
    )
    return out
