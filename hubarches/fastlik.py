"""The decoder's likelihood with hand-derived gradients: one pass forward, none backward.

Autograd through :mod:`hubarches.likelihoods` keeps a dozen cells × genes intermediates and
walks them back one kernel at a time; the per-step cost of scVI-style training is dominated
by that elementwise work, not by matrix multiplies. Here the negative log-likelihood and its
gradients with respect to the softmax logits ``a``, the dropout logits ``p`` and the log
inverse dispersion ``log θ`` are computed together in the forward pass and merely scaled in
the backward pass. With ``ρ = softmax(a)``, ``μ = l·ρ``, ``t = θ + μ``, ``w = θ log(θ/t)``:

* NB:   ``log p = w + x log(μ/t) + C``;  ZINB, x > 0: ``log p = w + x log(μ/t) − softplus(p) + C``;
  ZINB, x = 0: ``log p = softplus(w − p) − softplus(−p)``;  Poisson: ``x log μ − μ + C``,
  where ``C = log Γ(x+θ) − log Γ(θ) − log Γ(x+1)`` (Poisson: ``−log Γ(x+1)``).
* ``∂ log p/∂μ · μ = θ/t · (x − μ q)`` with ``q = 1`` for x > 0 (and NB), ``σ(w − p)`` for a
  ZINB zero; the softmax turns it into ``∂/∂a = v − ρ Σ_g v_g``.

``C`` is left out of the fused part: it involves only the nonzero entries of ``x``, so
:func:`nonzero_log_gamma` evaluates it on those alone — and when ``θ`` is frozen (query
training) it is a per-cell constant, computed once for the whole query.

The core runs in C on float32 CPU tensors where :mod:`hubarches.native` is built, else as
PyTorch operations (compiled for long runs). :class:`HeadsCountNLL` wraps it together with
the decoder's two gene-wide heads as one autograd node.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import scipy.sparse as sp
import torch

from hubarches import native
from hubarches.errors import warn
from hubarches.gemm import (
    Stacked,
    kernels_available,
    times,
    times_transposed,
    transposed_times,
)

__all__ = [
    "COMPILE_ENV",
    "COMPILE_MIN_STEPS",
    "CsrRows",
    "HeadsCountNLL",
    "compile_wanted",
    "compiled",
    "count_nll",
    "elementwise_core",
    "log_factorial",
    "nonzero_coordinates",
    "nonzero_log_gamma",
    "row_sums",
    "stored_log_gamma",
]

COMPILE_ENV = "HUBARCHES_COMPILE"
"""``1`` always compiles the elementwise core with torch.compile, ``0`` never does; unset,
training decides by its length (:data:`COMPILE_MIN_STEPS`)."""
COMPILE_MIN_STEPS = 5_000
"""Optimizer steps from which compiling pays: the first compilation on a machine takes
~10-20 s (later ones ~1-4 s, from torch's on-disk cache) and saves a few ms per step. On
the CPU the C core (:mod:`hubarches.native`) comes first where it is built, so this matters
only without it, or on a GPU."""


def elementwise_core(
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
    """Per-cell NLL without ``C`` and its gradients w.r.t. ``a``, ``p`` and ``log θ``.

    ``theta``/``log_theta`` are ``[G]`` or ``[B, G]``; None means Poisson. Returns
    ``(nll [B], d/da [B, G], d/dp [B, G] or None, d/dlog θ [B, G] or None)``.
    """
    m = a.amax(dim=1, keepdim=True)
    e = torch.exp(a - m)
    s = e.sum(dim=1, keepdim=True)
    rho = e / s
    lib = torch.exp(log_library).unsqueeze(1)
    mu = lib * rho
    log_mu = (log_library.unsqueeze(1) - m - torch.log(s)) + a
    if theta is None or log_theta is None:  # Poisson
        ll = x * log_mu - mu
        v = x - mu
        grad_a = v - rho * v.sum(dim=1, keepdim=True)
        return -ll.sum(dim=1), -grad_a, None, None
    t = theta + mu
    log_t = torch.log(t)
    w = theta * (log_theta - log_t)
    lin = w + x * (log_mu - log_t)
    grad_p = None
    if zinb:
        assert p is not None
        # Selections are blends with a 0/1 mask (``b + nz·(a − b)``): torch.where on a
        # boolean mask is an order of magnitude slower on CPU. softplus and sigmoid of one
        # argument share exp(−|·|): 6 transcendental functions per element instead of 10.
        nz = (x > 0).to(x.dtype)
        e_p = torch.exp(-p.abs())
        sp_neg = torch.relu(-p) + torch.log1p(e_p)  # softplus(−p)
        sig_p = (e_p + (p >= 0).to(p.dtype) * (1.0 - e_p)) / (1.0 + e_p)  # σ(p)
        y = w - p
        e_y = torch.exp(-y.abs())
        sp_y = torch.relu(y) + torch.log1p(e_y)  # softplus(y)
        sig_y = (e_y + (y >= 0).to(y.dtype) * (1.0 - e_y)) / (1.0 + e_y)  # σ(y)
        ll = (sp_y - sp_neg) + nz * (lin - p - sp_y)
        q = sig_y + nz * (1.0 - sig_y)
        grad_p = -((1.0 - sig_p - sig_y) + nz * (sig_y - 1.0))
        v = theta / t * (x - mu * q)
    else:
        ll = lin
        q = None
        v = theta / t * (x - mu)
    grad_a = v - rho * v.sum(dim=1, keepdim=True)
    grad_log_theta = None
    if want_theta:
        dw = log_theta - log_t + mu / t
        grad_theta = (dw if q is None else q * dw) - x / t
        grad_log_theta = -(theta * grad_theta)
    return -ll.sum(dim=1), -grad_a, grad_p, grad_log_theta


_COMPILE_STATE: dict[str, Any] = {"enabled": False, "failed": False, "core": None}


def compile_wanted(steps: int, requested: bool | None = None) -> bool:
    """Whether to compile for a run of ``steps`` optimizer steps.

    ``HUBARCHES_COMPILE`` (``1``/``0``) wins, then ``requested``, then the run's length.
    """
    env = os.environ.get(COMPILE_ENV, "").strip()
    if env in ("0", "1"):
        return env == "1"
    if requested is not None:
        return requested
    return steps >= COMPILE_MIN_STEPS


@contextlib.contextmanager
def compiled(enabled: bool) -> Iterator[None]:
    """Use the compiled elementwise core inside this block (when ``enabled``)."""
    previous = _COMPILE_STATE["enabled"]
    _COMPILE_STATE["enabled"] = enabled
    try:
        yield
    finally:
        _COMPILE_STATE["enabled"] = previous


def _run_core(*args: Any, **kwargs: Any) -> tuple[Any, ...]:
    """Run the compiled core when enabled; fall back to eager, once warned, if it fails.

    Compilation needs a working C++ toolchain; without one hubarches is slower, not broken.
    The C core (:mod:`hubarches.native`), where it is built, comes first on the CPU: it is
    as fast as the compiled one and needs no compilation at run time.
    """
    if native.supports(*args[:6]):
        return native.native_core(*args, **kwargs)
    if _COMPILE_STATE["enabled"] and not _COMPILE_STATE["failed"]:
        if _COMPILE_STATE["core"] is None:
            _COMPILE_STATE["core"] = torch.compile(elementwise_core, dynamic=True)
        try:
            return _COMPILE_STATE["core"](*args, **kwargs)
        except Exception as err:  # torch raises many kinds when a toolchain is missing
            _COMPILE_STATE["failed"] = True
            warn(
                f"torch.compile is unavailable here ({type(err).__name__}); training goes "
                f"on uncompiled, which is slower. Set {COMPILE_ENV}=0 to skip the attempt"
            )
    return elementwise_core(*args, **kwargs)


def _plain_bias(*biases: torch.Tensor | None) -> bool:
    """Biases the C core can read: contiguous float32 CPU vectors (or None)."""
    return all(
        b is None or (b.device.type == "cpu" and b.dtype == torch.float32 and b.is_contiguous())
        for b in biases
    )


def _stacked_heads(
    h: torch.Tensor, w_a: torch.Tensor, w_p: torch.Tensor | None
) -> torch.Tensor | Stacked | None:
    """Both heads' weights as one matrix ``[2G, H]`` where hubarches' kernels run, else None.

    One product each way instead of two, at ~2.4× MKL's rate on AMD; None: torch, head by head.
    Two heads come as a :data:`~hubarches.gemm.Stacked` pair that the kernels pack in place.
    """
    if not kernels_available() or h.dim() != 2:
        return None
    weights = [w_a] if w_p is None else [w_a, w_p]
    if any(w.device.type != "cpu" or w.dtype != torch.float32 for w in (h, *weights)):
        return None
    if any(w.dim() != 2 or w.shape[1] != h.shape[1] for w in weights):
        return None
    if w_p is None:
        return w_a.detach().contiguous()
    return w_a.detach().contiguous(), w_p.detach().contiguous()


class HeadsCountNLL(torch.autograd.Function):
    """The decoder's gene-wide heads and the likelihood as one autograd node.

    Forward: the heads' products ``a = h W_aᵀ + b_a`` (and the dropout logits ``p``), then
    the core, which also yields ``∂/∂a`` and ``∂/∂p``. Backward multiplies those by the
    frozen or trainable head weights; the per-cell weights of the incoming gradient are
    applied to the ``cells × hidden`` side of each product, never to ``cells × genes``
    arrays, and no weight gradient is formed for frozen heads (query training).
    """

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx,
        h: torch.Tensor,
        w_a: torch.Tensor,
        b_a: torch.Tensor,
        w_p: torch.Tensor | None,
        b_p: torch.Tensor | None,
        log_theta: torch.Tensor | None,
        x: torch.Tensor,
        log_library: torch.Tensor,
        zinb: bool,
    ) -> torch.Tensor:
        """Per-cell NLL (without the log-gamma terms)."""
        want_theta = log_theta is not None and ctx.needs_input_grad[5]
        theta = None if log_theta is None else torch.exp(log_theta)
        # The C core adds the biases itself: products without them spare two broadcasts of
        # cells × genes arrays a step.
        with_p = w_p is not None and b_p is not None
        stacked = _stacked_heads(h, w_a, w_p if with_p else None)
        grads = None
        if stacked is None:
            a = torch.mm(h, w_a.t())
            p = torch.mm(h, w_p.t()) if with_p else None
        else:  # both heads as one product, on hubarches' kernels
            n_genes = w_a.shape[0]
            width = n_genes + (w_p.shape[0] if with_p and w_p is not None else 0)
            heads = times_transposed(h, stacked, h.new_empty(h.shape[0], width))
            a, p = heads[:, :n_genes], heads[:, n_genes:] if with_p else None
            grads = torch.empty_like(heads)
        if native.supports(a, p, x, log_library, theta, log_theta) and _plain_bias(b_a, b_p):
            out = None
            if grads is not None:
                out = (
                    h.new_empty(h.shape[0]),
                    grads[:, :n_genes],
                    grads[:, n_genes:] if with_p else None,
                )
            nll, grad_a, grad_p, grad_lt = native.native_core(
                a,
                p,
                x,
                log_library,
                theta,
                log_theta,
                zinb=zinb,
                want_theta=want_theta,
                bias_a=b_a,
                bias_p=b_p,
                out=out,
            )
        else:
            a = a.add_(b_a)
            p = None if p is None or b_p is None else p.add_(b_p)
            nll, grad_a, grad_p, grad_lt = _run_core(
                a, p, x, log_library, theta, log_theta, zinb=zinb, want_theta=want_theta
            )
        ctx.save_for_backward(h, w_a, w_p, grad_a, grad_p, grad_lt)
        ctx.theta_per_gene = log_theta is not None and log_theta.dim() == 1
        # The kernels' product back to h reads both heads' gradients from the one buffer the
        # core wrote (the C core's case); elsewhere backward multiplies head by head.
        same = grads is not None and grad_a.data_ptr() == grads.data_ptr()
        ctx.stacked, ctx.grads = (stacked, grads) if same else (None, None)
        return nll

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad_nll: torch.Tensor
    ) -> tuple[torch.Tensor | None, ...]:
        """Gradients of ``Σ grad_nll · nll`` for whichever inputs need them."""
        h, w_a, w_p, grad_a, grad_p, grad_lt = ctx.saved_tensors
        need = ctx.needs_input_grad
        scale = grad_nll.unsqueeze(1)
        out: list[torch.Tensor | None] = [None] * 9
        if need[0]:
            if ctx.stacked is not None:
                g_h = times(ctx.grads, ctx.stacked, h.new_empty(h.shape))
            else:
                g_h = grad_a @ w_a
                if grad_p is not None:
                    g_h = torch.addmm(g_h, grad_p, w_p)
            out[0] = g_h * scale
        if need[1] or need[3]:
            h_scaled = h * scale
            if ctx.stacked is not None:  # both heads' weight gradients as one product
                both = transposed_times(
                    ctx.grads, h_scaled, h.new_empty(ctx.grads.shape[1], h.shape[1])
                )
                n_genes = w_a.shape[0]
                out[1] = both[:n_genes] if need[1] else None
                out[3] = both[n_genes:] if need[3] and grad_p is not None else None
            else:
                if need[1]:
                    out[1] = grad_a.t() @ h_scaled
                if need[3] and grad_p is not None:
                    out[3] = grad_p.t() @ h_scaled
        if need[2]:
            out[2] = grad_a.t() @ grad_nll
        if need[4] and grad_p is not None:
            out[4] = grad_p.t() @ grad_nll
        if grad_lt is not None:
            out[5] = grad_lt.t() @ grad_nll if ctx.theta_per_gene else grad_lt * scale
        return tuple(out)


SMALL_COUNT = 16
"""Counts up to this take ``log Γ(x+θ) − log Γ(θ) = Σ_{j<x} log(θ+j)`` from a per-gene table
(``G × SMALL_COUNT`` logarithms a step) instead of a log-gamma and, backward, a digamma per
nonzero entry: most counts are small, and log-gamma/digamma are slow elementwise."""


def _theta_log_gamma(
    theta: torch.Tensor, rows: torch.Tensor, cols: torch.Tensor, values: torch.Tensor
) -> torch.Tensor:
    """Per-nonzero ``log Γ(x+θ) − log Γ(θ)``, differentiable in θ.

    Every entry reads the table at ``c = min(round(x), SMALL_COUNT)``; the few entries with
    ``x ≠ c`` (large or non-integer counts) add ``log Γ(x+θ) − log Γ(c+θ)``.
    """
    if theta.dim() != 1:  # θ per cell and gene (gene-batch dispersion)
        th = theta[rows, cols]
        return torch.lgamma(values + th) - torch.lgamma(th)
    width = SMALL_COUNT + 1
    steps = torch.arange(SMALL_COUNT, dtype=theta.dtype, device=theta.device)
    table = torch.log(theta.unsqueeze(1) + steps).cumsum(dim=1)  # Σ_{j<c} for c = 1..K
    table = torch.cat([torch.zeros_like(table[:, :1]), table], dim=1)  # and c = 0
    c = torch.round(values).clamp(max=SMALL_COUNT)
    terms = table.reshape(-1).index_select(0, cols * width + c.long())
    off = torch.nonzero(values != c).squeeze(1)
    if off.numel():
        th = theta.index_select(0, cols.index_select(0, off))
        correction = torch.lgamma(values.index_select(0, off) + th) - torch.lgamma(
            c.index_select(0, off) + th
        )
        terms = terms.index_add_(0, off, correction)  # in place: the gather keeps no output
    return terms


def nonzero_coordinates(csr: sp.csr_matrix) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(rows, cols, values)`` of a CSR matrix's stored entries, as tensors."""
    rows = np.repeat(np.arange(csr.shape[0]), np.diff(csr.indptr))
    return (
        torch.from_numpy(rows),
        torch.from_numpy(csr.indices.astype(np.int64)),
        torch.from_numpy(np.asarray(csr.data, dtype=np.float32)),
    )


@dataclass(frozen=True)
class CsrRows:
    """A minibatch's stored counts as rows of a CSR matrix (all rows, in order, if None).

    The C log-gamma pass reads them in place; :meth:`coordinates` gives the coordinate
    lists that the PyTorch path needs.
    """

    csr: sp.csr_matrix
    rows: np.ndarray | None = None

    @property
    def n_rows(self) -> int:
        """Number of cells in the minibatch."""
        return self.csr.shape[0] if self.rows is None else len(self.rows)

    def coordinates(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(rows, cols, values)`` of the stored counts, rows numbered within the batch."""
        return nonzero_coordinates(self.csr if self.rows is None else self.csr[self.rows])


class _CsrThetaLogGamma(torch.autograd.Function):
    """Per cell ``Σ log Γ(x+θ) − log Γ(θ)`` over its stored counts, in C, differentiable in θ."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, theta: torch.Tensor, stored: CsrRows
    ) -> torch.Tensor:
        """One pass over the stored counts (θ per gene, float32 on the CPU)."""
        theta = theta.detach().contiguous()
        ctx.save_for_backward(theta)
        ctx.stored = stored
        return native.theta_log_gamma(stored.csr, stored.rows, theta)

    @staticmethod
    def backward(  # type: ignore[override]
        ctx: torch.autograd.function.FunctionCtx, grad: torch.Tensor
    ) -> tuple[torch.Tensor | None, None]:
        """``Σ_i grad_i Σ ψ(x+θ_g) − ψ(θ_g)`` per gene."""
        if not ctx.needs_input_grad[0]:
            return None, None
        (theta,) = ctx.saved_tensors
        stored = ctx.stored
        weights = grad.detach().float().contiguous()
        return native.theta_log_gamma_grad(stored.csr, stored.rows, theta, weights), None


def stored_log_gamma(
    theta: torch.Tensor | None, stored: CsrRows, *, factorial: torch.Tensor | None = None
) -> torch.Tensor | None:
    """:func:`nonzero_log_gamma` read in C straight from the CSR rows; None where it cannot.

    Takes θ per gene (or None, Poisson) as a float32 CPU vector, and a CSR matrix that
    :func:`hubarches.native.csr_supported` accepts.
    """
    if not native.csr_supported(stored.csr):
        return None
    if theta is not None and (
        theta.dim() != 1 or theta.device.type != "cpu" or theta.dtype != torch.float32
    ):
        return None
    if factorial is None:  # Σ log Γ(x+1) is the same pass with θ = 1
        ones = torch.ones(stored.csr.shape[1], dtype=torch.float32)
        factorial = native.theta_log_gamma(stored.csr, stored.rows, ones)
    if theta is None:
        return -factorial
    return _CsrThetaLogGamma.apply(theta, stored) - factorial


def row_sums(values: torch.Tensor, rows: torch.Tensor, n_cells: int) -> torch.Tensor:
    """Per-cell sums of per-nonzero ``values`` (differentiable).

    Coordinates listed cell by cell, as CSR matrices and ``torch.nonzero`` give them, are
    summed as segments, several times faster than a scatter-add, forward and backward.
    """
    if rows.numel() > 1 and bool((rows[1:] >= rows[:-1]).all()):
        lengths = torch.bincount(rows, minlength=n_cells)
        return torch.segment_reduce(values, "sum", lengths=lengths, unsafe=True)
    out = torch.zeros(n_cells, dtype=values.dtype, device=values.device)
    return out.index_add(0, rows, values)


def log_factorial(rows: torch.Tensor, values: torch.Tensor, n_cells: int) -> torch.Tensor:
    """``Σ_g log Γ(x_g + 1)`` per cell: a constant of the data, computed once per data set."""
    out = torch.zeros(n_cells, dtype=values.dtype, device=values.device)
    return out.index_add(0, rows, torch.lgamma(values + 1.0))


def theta_log_gamma_and_grad(
    theta: torch.Tensor,
    nonzero: tuple[torch.Tensor, torch.Tensor, torch.Tensor],
    n_cells: int,
) -> tuple[float, torch.Tensor]:
    """``Σ_i Σ_g log Γ(x+θ) − log Γ(θ)`` over the nonzero counts, and its gradient in θ.

    θ per gene or per cell and gene; autograd on the per-nonzero terms. The hand-written
    steps' path for dense minibatches, whose stored rows the C pass cannot read.
    """
    leaf = theta.detach().clone().requires_grad_(True)
    rows, cols, values = nonzero
    with torch.enable_grad():
        total = row_sums(_theta_log_gamma(leaf, rows, cols, values), rows, n_cells).sum()
        (grad,) = torch.autograd.grad(total, leaf)
    return float(total.detach()), grad


def nonzero_log_gamma(
    theta: torch.Tensor | None,
    nz_rows: torch.Tensor,
    nz_cols: torch.Tensor,
    nz_values: torch.Tensor,
    n_cells: int,
    *,
    factorial: torch.Tensor | None = None,
) -> torch.Tensor:
    """``Σ_g C(x_g, θ_g)`` per cell, evaluated on the nonzero counts only (differentiable).

    ``C = log Γ(x+θ) − log Γ(θ) − log Γ(x+1)`` vanishes where ``x = 0``; for Poisson
    (``theta`` None) only ``−log Γ(x+1)`` remains. ``factorial``, the per-cell
    ``Σ log Γ(x+1)`` computed beforehand (:func:`log_factorial`), saves evaluating it again.
    """
    if factorial is None:
        factorial = log_factorial(nz_rows, nz_values, n_cells)
    if theta is None:
        return -factorial
    terms = _theta_log_gamma(theta, nz_rows, nz_cols, nz_values)
    return row_sums(terms, nz_rows, n_cells) - factorial


def count_nll(
    h: torch.Tensor,
    scale_head: torch.nn.Linear,
    dropout_head: torch.nn.Linear | None,
    log_theta: torch.Tensor | None,
    x: torch.Tensor,
    log_library: torch.Tensor,
    *,
    zinb: bool,
) -> torch.Tensor:
    """Per-cell NLL without the log-gamma terms, from the decoder's last hidden layer ``h``.

    Differentiable in ``h``, both heads' weights and biases, and ``log θ``.
    """
    w_p = None if dropout_head is None else dropout_head.weight
    b_p = None if dropout_head is None else dropout_head.bias
    return HeadsCountNLL.apply(
        h, scale_head.weight, scale_head.bias, w_p, b_p, log_theta, x, log_library, zinb
    )
