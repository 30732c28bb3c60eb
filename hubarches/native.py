"""The optional C helpers of training and embedding (``hubarches._fastcore``).

* The likelihood's elementwise core: :func:`hubarches.fastlik.elementwise_core` evaluated by
  PyTorch is some forty passes over the cells × genes arrays; the C version reads each
  cell's row twice and vectorises the logarithms and exponentials.
* Dense rows (and their log1p) of a CSR matrix, in one parallel pass: minibatches and the
  encoder's input.
* The NB log-gamma terms ``Σ log Γ(x+θ) − log Γ(θ)`` and their θ-gradient read straight from
  a minibatch's CSR rows, small counts from a per-step table: reference training no longer
  builds coordinate lists, gathers and scatters per nonzero count.

Built at install time when a C compiler is present and used for float32 CPU tensors; set
``HUBARCHES_NATIVE=0`` to use PyTorch's versions instead (the results agree to float rounding).
"""

from __future__ import annotations

import os

import numpy as np
import scipy.sparse as sp
import torch

__all__ = [
    "NATIVE_ENV",
    "PreparedCore",
    "available",
    "csr_supported",
    "dense_log1p",
    "dense_rows",
    "native_core",
    "supports",
    "theta_log_gamma",
    "theta_log_gamma_by_category",
    "theta_log_gamma_grad",
    "theta_log_gamma_with_grad",
]

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
    x: torch.Tensor | None,
    log_library: torch.Tensor,
    theta: torch.Tensor | None,
    log_theta: torch.Tensor | None,
    *,
    zinb: bool,
    want_theta: bool,
    bias_a: torch.Tensor | None = None,
    bias_p: torch.Tensor | None = None,
    csr: sp.csr_matrix | None = None,
    rows: np.ndarray | None = None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
    """:func:`hubarches.fastlik.elementwise_core` in C; call only where :func:`supports`.

    ``bias_a`` and ``bias_p`` (``[n_genes]``, contiguous float32), when given, are added to
    every row of ``a`` and ``p`` first: the heads' biases, so their products need not
    broadcast them into cells × genes arrays. With ``x`` None the counts are the ``rows``
    of ``csr`` (all rows if None; a matrix :func:`csr_supported` takes), each densified
    into a scratch row where it is read: a minibatch needs no dense copy. ``out``, when
    given, is ``(nll, grad_a, grad_p)`` to write into: float32 CPU, ``grad_a`` and ``grad_p``
    with rows of one common stride (column blocks of one matrix, so that a single product
    takes both heads' gradients).
    """
    csr_args = None
    if x is None:
        if csr is None or not csr_supported(csr) or csr.shape[1] != a.shape[1]:
            raise ValueError("without dense counts the core needs CSR rows it can read")
        picked = None if rows is None else _checked_rows(csr, rows)
        csr_args = _csr_arguments(csr, picked)
        if csr_args[0] != a.shape[0]:
            raise ValueError(f"{csr_args[0]} CSR rows for {a.shape[0]} cells of logits")
    assert _fastcore is not None
    n_cells, n_genes = a.shape
    if out is None:
        out = (
            torch.empty(n_cells, dtype=torch.float32),
            torch.empty(n_cells, n_genes, dtype=torch.float32),
            torch.empty(n_cells, n_genes, dtype=torch.float32) if zinb else None,
        )
    poisson = theta is None or log_theta is None
    grad_lt = torch.empty(n_cells, n_genes) if want_theta and not poisson else None
    _fastcore.core(
        *_core_arguments(
            a, p, x, log_library, theta, log_theta, zinb=zinb, bias_a=bias_a, bias_p=bias_p,
            csr_args=csr_args, out=out, grad_lt=grad_lt,
        )
    )  # fmt: skip
    return out[0], out[1], out[2], grad_lt


def _address(t: torch.Tensor | None) -> int:
    """A tensor's first element's address for the C core; 0 for none."""
    return 0 if t is None else t.data_ptr()


# Where _fastcore.core takes the arguments that change from minibatch to minibatch.
_LIBRARY_AT, _CSR_AT, _THREADS_AT = 7, 19, 21


def _core_arguments(
    a: torch.Tensor,
    p: torch.Tensor | None,
    x: torch.Tensor | None,
    log_library: torch.Tensor | None,
    theta: torch.Tensor | None,
    log_theta: torch.Tensor | None,
    *,
    zinb: bool,
    bias_a: torch.Tensor | None,
    bias_p: torch.Tensor | None,
    csr_args: tuple[int, ...] | None,
    out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
    grad_lt: torch.Tensor | None,
) -> tuple[object, ...]:
    """``_fastcore.core``'s arguments, after checking the biases and the output buffers."""
    n_cells, n_genes = a.shape
    for bias in (bias_a, bias_p):
        if bias is not None and not (_contiguous(bias) and tuple(bias.shape) == (n_genes,)):
            raise ValueError("a bias must be a contiguous float32 vector with one value per gene")
    nll, grad_a, grad_p = out
    if not (
        _contiguous(nll)
        and tuple(nll.shape) == (n_cells,)
        and _rows_dense(grad_a, (n_cells, n_genes))
        and (grad_p is None) == (not zinb)
        and (
            grad_p is None
            or (_rows_dense(grad_p, (n_cells, n_genes)) and grad_p.stride(0) == grad_a.stride(0))
        )
    ):
        raise ValueError("the output buffers do not fit the logits")
    poisson = theta is None or log_theta is None
    mode = _THETA_NONE if poisson else (_THETA_GENE if theta.dim() == 1 else _THETA_CELL)
    return (
        n_cells,
        n_genes,
        _address(a),
        a.stride(0),
        _address(p),
        0 if p is None else p.stride(0),
        _address(x),
        _address(log_library),
        _address(theta),
        _address(log_theta),
        mode,
        int(zinb),
        int(grad_lt is not None),
        _address(nll),
        _address(grad_a),
        _address(grad_p),
        _address(grad_lt),
        _address(bias_a),
        _address(bias_p),
        csr_args,
        grad_a.stride(0) if n_cells > 1 else n_genes,
        torch.get_num_threads(),
    )


class PreparedCore:
    """:func:`native_core` on buffers that stay the same from call to call (training).

    The logits, the dispersion, the biases and the outputs are checked once, here; each call
    passes only what changes, a minibatch's CSR rows and library sizes, to the C core. A
    query step spent ~35 µs (2 %) in :func:`native_core`'s checks and argument building.
    ``grad_lt``, when given, receives the per-cell gradient in ``log θ`` (reference training,
    whose θ changes in place in the buffer given).
    """

    def __init__(
        self,
        a: torch.Tensor,
        p: torch.Tensor | None,
        theta: torch.Tensor | None,
        log_theta: torch.Tensor | None,
        *,
        zinb: bool,
        bias_a: torch.Tensor | None,
        bias_p: torch.Tensor | None,
        out: tuple[torch.Tensor, torch.Tensor, torch.Tensor | None],
        grad_lt: torch.Tensor | None = None,
    ) -> None:
        if _fastcore is None or a.dim() != 2 or not _rows_dense(a, (a.shape[0], a.shape[1])):
            raise ValueError("the C core needs float32 CPU logits with contiguous rows")
        n_cells, n_genes = a.shape
        if (zinb and p is None) or (p is not None and not _rows_dense(p, (n_cells, n_genes))):
            raise ValueError("the dropout logits must match the logits")
        if theta is not None and log_theta is not None:
            for t in (theta, log_theta):
                if not (_contiguous(t) and tuple(t.shape) in ((n_genes,), (n_cells, n_genes))):
                    raise ValueError("θ must be contiguous float32, per gene or per cell")
        if grad_lt is not None and (
            theta is None
            or not (_contiguous(grad_lt) and tuple(grad_lt.shape) == (n_cells, n_genes))
        ):
            raise ValueError("grad_lt must be contiguous float32 [n_cells, n_genes], with θ")
        self.n_cells, self.n_genes = n_cells, n_genes
        self.nll = out[0]
        self._keep = (a, p, theta, log_theta, bias_a, bias_p, out, grad_lt)  # the addresses
        # The last matrix read: its arrays (kept, so their memory stays put) and its verdict.
        self._matrix: tuple[tuple[np.ndarray, ...], tuple[int, int], tuple[int, ...]] | None = None
        self._dtypes: tuple[np.dtype, ...] = ()
        self._arguments = _core_arguments(
            a, p, None, None, theta, log_theta, zinb=zinb, bias_a=bias_a, bias_p=bias_p,
            csr_args=None, out=out, grad_lt=grad_lt,
        )  # fmt: skip

    def __call__(
        self,
        csr: sp.csr_matrix,
        rows: np.ndarray,
        log_library: np.ndarray,
        *,
        rows_checked: bool = False,
    ) -> torch.Tensor:
        """The core on ``rows`` of ``csr`` into the prepared outputs; returns the per-cell NLL.

        ``rows_checked``: the caller has checked that ``rows`` lie inside ``csr`` (a training
        step that gathered its inputs by them in C): contiguous int64 rows are then not
        checked again, a numpy pass of ~30 µs once a step's products have run.
        """
        if not self.reads(csr):
            raise ValueError("the core needs CSR rows it can read, one column per gene")
        if rows_checked and rows.dtype == np.int64 and rows.flags.c_contiguous:
            picked = rows
        else:
            picked = _checked_rows(csr, rows)
        if len(picked) != self.n_cells:
            raise ValueError(f"{len(picked)} CSR rows for {self.n_cells} cells of logits")
        if not (
            log_library.dtype == np.float32
            and log_library.flags.c_contiguous
            and log_library.shape == (self.n_cells,)
        ):
            raise ValueError("log_library must be contiguous float32, one value per cell")
        assert _fastcore is not None
        arguments = list(self._arguments)
        arguments[_LIBRARY_AT] = log_library.ctypes.data
        assert self._matrix is not None
        arguments[_CSR_AT] = (len(picked), *self._matrix[2], picked.ctypes.data)
        arguments[_THREADS_AT] = torch.get_num_threads()
        _fastcore.core(*arguments)
        return self.nll

    def reads(self, csr: sp.csr_matrix) -> bool:
        """Whether the core can read rows of ``csr`` (checked once per matrix, then kept)."""
        data, indices, indptr = arrays = (csr.data, csr.indices, csr.indptr)
        last = self._matrix
        if last is not None:  # spelled out: this runs twice a query step
            (d, i, p), shape, _ = last
            if (
                data is d
                and indices is i
                and indptr is p
                and csr.shape == shape
                and (data.dtype, indices.dtype, indptr.dtype) == self._dtypes
            ):
                return True
        if not csr_supported(csr) or csr.shape[1] != self.n_genes:
            return False
        self._matrix = (arrays, csr.shape, _csr_arguments(csr, None)[1:-1])
        self._dtypes = (data.dtype, indices.dtype, indptr.dtype)
        return True


_INDEX_TYPES = (np.dtype(np.int32), np.dtype(np.int64))


def csr_supported(csr: sp.csr_matrix) -> bool:
    """Whether the C functions can read this CSR matrix as it is (float32, int32/64 indices)."""
    if not available() or csr.data.dtype != np.float32 or csr.shape[1] < 1:
        return False
    if csr.indptr.dtype not in _INDEX_TYPES or csr.indices.dtype not in _INDEX_TYPES:
        return False
    return all(a.flags.c_contiguous for a in (csr.data, csr.indices, csr.indptr))


def _checked_rows(csr: sp.csr_matrix, rows: np.ndarray) -> np.ndarray:
    """``rows`` as contiguous int64, refusing numbers outside the matrix."""
    picked = np.ascontiguousarray(rows, dtype=np.int64)
    if picked.size and (picked.min() < 0 or picked.max() >= csr.shape[0]):
        raise IndexError(f"row numbers outside 0..{csr.shape[0] - 1}")
    return picked


def _csr_arguments(csr: sp.csr_matrix, rows: np.ndarray | None) -> tuple[int, ...]:
    """How the C functions take CSR rows: sizes, array addresses and index widths."""
    return (
        csr.shape[0] if rows is None else len(rows),
        csr.shape[1],
        csr.indptr.ctypes.data,
        int(csr.indptr.dtype == np.int64),
        csr.indices.ctypes.data,
        int(csr.indices.dtype == np.int64),
        csr.data.ctypes.data,
        0 if rows is None else rows.ctypes.data,
    )


def _densify(
    csr: sp.csr_matrix,
    rows: np.ndarray | None,
    out: torch.Tensor | None,
    out_log: torch.Tensor | None,
) -> None:
    """One call of the C densify: counts into ``out`` and/or log1p into ``out_log``."""
    assert _fastcore is not None
    if (csr.shape[0] if rows is None else len(rows)) == 0:
        return
    _fastcore.densify(
        *_csr_arguments(csr, rows),
        0 if out is None else out.data_ptr(),
        0 if out_log is None else out_log.data_ptr(),
        torch.get_num_threads(),
    )


def dense_rows(csr: sp.csr_matrix, rows: np.ndarray, *, log1p: bool = False) -> torch.Tensor | None:
    """Rows ``rows`` of a float32 CSR matrix as a dense tensor, or None where unsupported.

    Skips scipy's intermediate CSR of the selected rows: a minibatch is formed in one pass.
    With ``log1p`` the rows' ``log1p``, taken on the stored values only. Row numbers are
    checked here; column indices outside the matrix are refused in C.
    """
    if not csr_supported(csr):
        return None
    picked = _checked_rows(csr, rows)
    out = torch.empty(len(picked), csr.shape[1], dtype=torch.float32)
    _densify(csr, picked, None if log1p else out, out if log1p else None)
    return out


def dense_log1p(csr: sp.csr_matrix, out: torch.Tensor) -> bool:
    """``log1p`` of every row of a float32 CSR matrix, written densely into ``out``.

    False (nothing written) where the C functions cannot read ``csr`` or write ``out``.
    """
    if not csr_supported(csr) or not _contiguous(out):
        return False
    if tuple(out.shape) != (csr.shape[0], csr.shape[1]):
        raise ValueError(f"out has shape {tuple(out.shape)}, expected {csr.shape}")
    _densify(csr, None, None, out)
    return True


def _theta_lgamma_call(
    csr: sp.csr_matrix,
    rows: np.ndarray | None,
    theta: torch.Tensor,
    weights: torch.Tensor | None,
    out: torch.Tensor,
    values: torch.Tensor | None = None,
) -> None:
    """One call of the C log-gamma pass; ``rows`` None means every row, in order."""
    assert _fastcore is not None
    if tuple(theta.shape) != (csr.shape[1],) or not _contiguous(theta):
        raise ValueError(f"θ must be a contiguous float32 CPU vector of {csr.shape[1]} genes")
    picked = None if rows is None else _checked_rows(csr, rows)
    _fastcore.theta_lgamma(
        *_csr_arguments(csr, picked),
        theta.data_ptr(),
        0 if weights is None else weights.data_ptr(),
        out.data_ptr(),
        torch.get_num_threads(),
        0 if values is None else values.data_ptr(),
    )


def theta_log_gamma(
    csr: sp.csr_matrix, rows: np.ndarray | None, theta: torch.Tensor
) -> torch.Tensor:
    """Per row, ``Σ log Γ(x+θ_g) − log Γ(θ_g)`` over its stored counts (θ per gene).

    Call only where :func:`csr_supported`; ``rows`` None takes every row in order.
    """
    n_rows = csr.shape[0] if rows is None else len(rows)
    out = torch.empty(n_rows, dtype=torch.float32)
    if n_rows:
        _theta_lgamma_call(csr, rows, theta, None, out)
    return out


def theta_log_gamma_grad(
    csr: sp.csr_matrix, rows: np.ndarray | None, theta: torch.Tensor, weights: torch.Tensor
) -> torch.Tensor:
    """Per gene, ``Σ_i w_i Σ ψ(x_ig+θ_g) − ψ(θ_g)``: the θ-gradient of ``Σ_i w_i`` × the above."""
    return theta_log_gamma_with_grad(csr, rows, theta, weights, values=False)[1]


def theta_log_gamma_with_grad(
    csr: sp.csr_matrix,
    rows: np.ndarray | None,
    theta: torch.Tensor,
    weights: torch.Tensor,
    *,
    values: bool = True,
) -> tuple[torch.Tensor | None, torch.Tensor]:
    """:func:`theta_log_gamma` (when ``values``) and :func:`theta_log_gamma_grad` in one pass.

    A training step needs both; each row is then read once from memory, not twice.
    """
    n_rows = csr.shape[0] if rows is None else len(rows)
    if not _contiguous(weights) or tuple(weights.shape) != (n_rows,):
        raise ValueError(f"weights must be a contiguous float32 CPU vector of {n_rows} rows")
    grad = torch.zeros(csr.shape[1], dtype=torch.float32)
    sums = torch.zeros(n_rows, dtype=torch.float32) if values else None
    if n_rows:
        _theta_lgamma_call(csr, rows, theta, weights, grad, sums)
    return sums, grad


def theta_log_gamma_by_category(
    csr: sp.csr_matrix,
    rows: np.ndarray | None,
    categories: np.ndarray,
    theta_table: torch.Tensor,
    weights: torch.Tensor,
    out: torch.Tensor,
    *,
    grad_lt: torch.Tensor | None = None,
    scale: float = 0.0,
) -> float:
    """The log-gamma terms with θ per category (gene-batch dispersion), in one C call.

    Row ``i`` reads θ row ``categories[i]`` of ``theta_table`` (categories × genes). Returns
    ``Σ_i Σ_g log Γ(x+θ) − log Γ(θ)`` over the rows' stored counts, and writes into ``out``
    (categories × genes), for every category ``c``, ``scale Σ_{i∈c} grad_lt[i] − θ_c ⊙
    Σ_{i∈c} w_i Σ_g [ψ(x+θ_c) − ψ(θ_c)]``: the gradient in log θ of a weighted loss whose
    other terms gave ``grad_lt`` (rows × genes; None for none). Absent categories get zeros.
    A step then pays one call, not one per batch present. Call only where
    :func:`csr_supported`; ``rows`` None takes every row in order.
    """
    assert _fastcore is not None
    n_rows = csr.shape[0] if rows is None else len(rows)
    n_genes = csr.shape[1]
    table_ok = theta_table.dim() == 2 and theta_table.shape[1] == n_genes
    if not (table_ok and theta_table.shape[0] >= 1 and _contiguous(theta_table)):
        raise ValueError(f"θ must be a contiguous float32 CPU table of categories × {n_genes}")
    shape = (theta_table.shape[0], n_genes)
    if not _contiguous(out) or tuple(out.shape) != shape:
        raise ValueError(f"out must be a contiguous float32 CPU table of shape {shape}")
    if not _contiguous(weights) or tuple(weights.shape) != (n_rows,):
        raise ValueError(f"weights must be a contiguous float32 CPU vector of {n_rows} rows")
    if grad_lt is not None and (
        not _contiguous(grad_lt) or tuple(grad_lt.shape) != (n_rows, n_genes)
    ):
        raise ValueError(f"grad_lt must be a contiguous float32 CPU matrix of {n_rows} rows")
    codes = np.ascontiguousarray(categories, dtype=np.int64)
    if codes.shape != (n_rows,):
        raise ValueError(f"one category per row: {n_rows} rows, {codes.size} categories")
    picked = None if rows is None else _checked_rows(csr, rows)
    return float(
        _fastcore.theta_lgamma_groups(
            *_csr_arguments(csr, picked),
            codes.ctypes.data,
            shape[0],
            theta_table.data_ptr(),
            0 if grad_lt is None else grad_lt.data_ptr(),
            scale,
            weights.data_ptr(),
            out.data_ptr(),
            torch.get_num_threads(),
        )
    )
