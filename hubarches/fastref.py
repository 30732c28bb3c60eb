"""Reference training's step by hand, as query training's (:mod:`hubarches.fastnet`).

Reference training changes every tensor, so a step needs every gradient. Through autograd it
spent about a third of its time on two cores in ~100 small operations and their bookkeeping.
Here a step is a dozen calls: the encoder's first product (``torch.addmm``), the small network
forward in C (``hubarches._fastnet``, dropout masks drawn there), the decoder's two gene-wide
heads on hubarches' kernels and the likelihood's C core (which also gives the gradient in
``log θ``), the log-gamma terms of the stored counts in C, the small network backward in C
with every block's and latent head's weight gradient, the heads' and the first layer's weight
gradients as two products, and Adam in C. For the same noise and masks the loss and every
gradient are autograd's to float rounding (``tests/test_fastref.py``).

Used for float32 CPU models with one dispersion per gene, per gene and batch
(:mod:`hubarches.fasttheta`) or none (Poisson), and layer norm without affine parameters (or
none); :func:`reference_step` returns None elsewhere (a GPU, batch norm, whose batch
statistics train, no C extension) and autograd runs the step.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from hubarches import native
from hubarches.batching import Minibatch
from hubarches.fastlik import theta_log_gamma_and_grad
from hubarches.fastnet import (
    _NORM_AFFINE,
    AdamSettings,
    AdamState,
    MaskSeeds,
    _address,
    _block,
    _fastnet,
    _grad_buffer,
    _plain,
    _State,
    _state,
    gather_inputs,
    gather_table,
    net_plan,
)
from hubarches.fasttheta import BatchTheta
from hubarches.gemm import Stacked, kernels_available, times, times_transposed, transposed_times
from hubarches.model import CVAE
from hubarches.nn import CovariateWeight

__all__ = ["ReferenceStep", "reference_step"]


@dataclass
class _HeadBlocks:
    """The heads' logits and their gradients for one minibatch size, in blocks of columns.

    On hubarches' kernels one block holds both heads side by side (one product each way, both
    weights read in place as one matrix); where torch runs the products (Intel's processors,
    ``HUBARCHES_GEMM=torch``) each head has a block of its own, so that no step copies the
    two weights into one.
    """

    logits: list[torch.Tensor]  # [n, columns] each
    grads: list[torch.Tensor]
    weights: list[torch.Tensor | Stacked]  # each block's weight rows
    offsets: list[int]  # each block's first row in the stacked weights

    @classmethod
    def make(cls, n: int, weights: tuple[torch.Tensor, ...], kernels: bool) -> _HeadBlocks:
        """Blocks for ``n`` cells: one for all heads (kernels) or one per head."""
        rows = [w.shape[0] for w in weights]
        parts = [sum(rows)] if kernels else rows
        pair: list[torch.Tensor | Stacked] = [weights if len(weights) > 1 else weights[0]]
        return cls(
            logits=[torch.empty(n, r) for r in parts],
            grads=[torch.empty(n, r) for r in parts],
            weights=pair if kernels else list(weights),
            offsets=[sum(parts[:k]) for k in range(len(parts))],
        )

    def head(self, k: int, n_genes: int, grads: bool = False) -> torch.Tensor:
        """Head ``k``'s ``[n, n_genes]`` logits (or gradients): a block, or columns of one."""
        blocks = self.grads if grads else self.logits
        if len(blocks) > 1:
            return blocks[k]
        return blocks[0][:, k * n_genes : (k + 1) * n_genes]

    def forward(self, h: torch.Tensor) -> None:
        """Every head's logits ``h Wᵀ`` (without the biases, which the core adds)."""
        for out, w in zip(self.logits, self.weights, strict=True):
            times_transposed(h, w, out)

    def backward(self, out: torch.Tensor) -> None:
        """The gradient at the heads' input: ``Σ_k grads_k W_k``."""
        times(self.grads[0], self.weights[0], out)
        for g, w in zip(self.grads[1:], self.weights[1:], strict=True):
            assert isinstance(w, torch.Tensor)
            out.addmm_(g, w)

    def weight_gradients(
        self, h_scaled: torch.Tensor, grad_w: torch.Tensor, grad_b: torch.Tensor, scale: float
    ) -> None:
        """The heads' weight gradients ``gradsᵀ h_scaled`` and bias gradients ``scale Σ grads``."""
        for g, at in zip(self.grads, self.offsets, strict=True):
            rows = slice(at, at + g.shape[1])
            transposed_times(g, h_scaled, grad_w[rows])
            torch.sum(g, 0, out=grad_b[rows]).mul_(scale)


@dataclass
class _Buffers:
    """One minibatch size's buffers, plan and prepared core, reused step after step."""

    enc: _State
    dec: _State
    lat: dict[str, torch.Tensor]
    heads: _HeadBlocks
    plan: np.ndarray
    core: native.PreparedCore
    rows: np.ndarray  # int64 [n]: 0..n-1, the first product's rows in C
    step_rows: np.ndarray  # int64 [n]: the step's rows of the data
    codes: np.ndarray  # int64 [n, n_covariates]
    library: np.ndarray  # float32 [n], log library sizes
    factorial: np.ndarray  # float64 [n], Σ log Γ(x+1)
    seeds: np.ndarray  # uint64, one per block
    weights: torch.Tensor  # float32 [n], 1/n: the log-gamma gradient's cell weights
    common: tuple[int, ...] = ()  # _fastnet's leading arguments
    gather: tuple[int, ...] = ()  # _fastnet.gather's trailing arguments
    table: np.ndarray | None = None  # the gather table those point to
    totals: tuple[int, ...] = ()  # _fastnet.totals' arguments


class ReferenceStep:
    """One reference-training step: a minibatch's loss, every gradient, and Adam's update.

    Built by :func:`reference_step`. The gradients are left in the parameters' ``.grad``
    (buffers set once here) after each step.
    """

    def __init__(
        self,
        model: CVAE,
        codes: torch.Tensor,
        *,
        log_library: torch.Tensor,
        factorial: torch.Tensor,
        adam: AdamSettings,
    ) -> None:
        assert _fastnet is not None
        self.model = model  # keeps alive every tensor the plans point into
        self.codes = np.ascontiguousarray(codes.numpy(), dtype=np.int64)
        self.log_library = np.ascontiguousarray(log_library.numpy(), dtype=np.float32)
        self.factorial = np.ascontiguousarray(factorial.numpy(), dtype=np.float64)
        grads: dict[int, torch.Tensor] = {}
        enc, dec = model.encoder, model.decoder
        self.encoder = [
            _block(b, grads, first=k == 0, dropout=True) for k, b in enumerate(enc.mlp.blocks)
        ]
        self.decoder = [_block(b, grads, first=False, dropout=True) for b in dec.mlp.blocks]
        if any(b.norm == _NORM_AFFINE for b in self.encoder + self.decoder):
            raise ValueError("batch norm trains on batch statistics: autograd runs the step")
        # Blocks whose transposed weight C reads: refreshed from the parameter each step.
        self._refreshed = [b for b in self.encoder + self.decoder if b.source is not None]
        first = enc.mlp.blocks[0].linear.expression
        self.w1, self.b1 = first.weight.detach(), first.bias.detach()
        self.grad_w1 = _grad_buffer(first.weight, grads)
        latent = (enc.mean.weight, enc.mean.bias, enc.log_var.weight, enc.log_var.bias)
        self.latent = tuple(t.detach() for t in latent)
        self.latent_grads = tuple(_grad_buffer(t, grads) for t in latent)
        # The heads' weights (read in place); their gradients side by side in one buffer.
        self.kernels = kernels_available()
        self.zinb = dec.dropout_logits is not None
        heads = [dec.scale] + ([dec.dropout_logits] if dec.dropout_logits is not None else [])
        self.n_genes, self.n_hidden = dec.scale.weight.shape
        self.n_latent = model.config.n_latent
        width = self.n_genes * len(heads)
        self.heads_w = tuple(h.weight.detach() for h in heads)
        self.grad_heads_w = torch.zeros(width, self.n_hidden)
        self.grad_heads_b = torch.zeros(width)
        for k, h in enumerate(heads):
            part = slice(k * self.n_genes, (k + 1) * self.n_genes)
            grads[id(h.weight)] = self.grad_heads_w[part]
            grads[id(h.bias)] = self.grad_heads_b[part]
        self.b_a = dec.scale.bias.detach()
        self.b_p = None if dec.dropout_logits is None else dec.dropout_logits.bias.detach()
        dispersion = model.dispersion
        # Poisson: no dispersion, no θ terms. Otherwise one log θ per gene, or per gene and
        # batch (each cell's row gathered every step).
        self.log_theta: torch.Tensor | None = None
        self.theta: torch.Tensor | None = None
        self.grad_log_theta: torch.Tensor | None = None
        self.batch_theta: BatchTheta | None = None
        if isinstance(dispersion, CovariateWeight):
            self.batch_theta = BatchTheta(dispersion, grads)
        elif dispersion is not None:
            if not isinstance(dispersion, torch.nn.Parameter) or dispersion.dim() != 1:
                raise ValueError("the hand-written step takes one dispersion per gene, or none")
            self.log_theta = dispersion.detach()
            self.theta = torch.empty_like(self.log_theta)
            self.grad_log_theta = grads.setdefault(id(dispersion), torch.zeros_like(dispersion))
        parameters = list(model.parameters())
        if {id(p) for p in parameters} != set(grads) or not all(
            p.requires_grad and _plain(p) for p in parameters
        ):
            raise ValueError("the hand-written step covers every tensor of this model only")
        for p in parameters:
            p.grad = grads[id(p)]
        self._grads = grads
        self._adam = AdamState(parameters, adam)
        self._seeds = MaskSeeds()
        self._buffers: dict[int, _Buffers] = {}

    def buffers(self, n: int) -> _Buffers:
        """The buffers for ``n`` cells, made at the first minibatch of that size."""
        if n not in self._buffers:
            self._buffers[n] = self._make_buffers(n)
        return self._buffers[n]

    def _make_buffers(self, n: int) -> _Buffers:
        """Buffers, plan and core for ``n`` cells."""
        lat = {k: torch.empty(n, self.n_latent)
               for k in ("mean", "var", "z", "dz", "noise", "d_mean", "d_log_var")}  # fmt: skip
        lat.update(
            kl=torch.empty(n),
            nll=torch.empty(n),
            dh=torch.empty(n, self.n_hidden),
            grad_h=torch.empty(n, self.n_hidden),
            first=torch.empty(n, self.n_hidden),
            h_scaled=torch.empty(n, self.n_hidden),
            grad_lt=torch.empty(n, self.n_genes if self._theta_trains else 0),
        )
        if self.batch_theta is not None:
            lat["theta"] = torch.empty(n, self.n_genes)
            lat["log_theta"] = torch.empty(n, self.n_genes)
        enc, dec = _state(self.encoder, n), _state(self.decoder, n)
        heads = _HeadBlocks.make(n, self.heads_w, self.kernels)
        header = {
            "cells": n,
            "hidden": self.n_hidden,
            "latent": self.n_latent,
            "first": _address(lat["first"]),
            "first_stride": self.n_hidden,
            **dict(zip(("wm", "bm", "wv", "bv"), map(_address, self.latent), strict=True)),
            **{k: _address(lat[k]) for k in ("mean", "var", "z", "kl", "dz", "dh", "noise")},
            "enc_lowest": 0,
            "dec_lowest": 0,
            "grad_h": _address(lat["grad_h"]),
            "d_mean": _address(lat["d_mean"]),
            "d_log_var": _address(lat["d_log_var"]),
        }
        names = ("grad_wm", "grad_bm", "grad_wv", "grad_bv")
        header.update(zip(names, map(_address, self.latent_grads), strict=True))
        plan = net_plan(header, (self.encoder, enc), (self.decoder, dec))
        a, p, grad_a, grad_p = self._views(heads)
        theta, log_theta = self._thetas(lat)
        core = native.PreparedCore(
            a,
            p,
            theta,
            log_theta,
            zinb=self.zinb,
            bias_a=self.b_a,
            bias_p=self.b_p,
            out=(lat["nll"], grad_a, grad_p),
            grad_lt=lat["grad_lt"] if self._theta_trains else None,
        )
        buffers = _Buffers(
            enc=enc,
            dec=dec,
            lat=lat,
            heads=heads,
            plan=plan,
            core=core,
            rows=np.arange(n, dtype=np.int64),
            step_rows=np.zeros(n, dtype=np.int64),
            codes=np.zeros((n, self.codes.shape[1]), dtype=np.int64),
            library=np.zeros(n, dtype=np.float32),
            factorial=np.zeros(n, dtype=np.float64),
            seeds=np.zeros(len(self.encoder) + len(self.decoder), dtype=np.uint64),
            weights=torch.full((n,), 1.0 / n),
        )
        buffers.common = (
            _address(plan), len(plan), n, _address(buffers.rows), _address(buffers.codes),
            self.codes.shape[1],
        )  # fmt: skip
        buffers.table, buffers.gather = gather_table(
            (self.codes, self.log_library, self.factorial),
            (buffers.codes, buffers.library, buffers.factorial),
            buffers.step_rows,
        )
        buffers.totals = (
            _address(lat["nll"]), _address(lat["kl"]), _address(buffers.factorial), n,
        )  # fmt: skip
        return buffers

    @property
    def _theta_trains(self) -> bool:
        """Whether the model has a θ to train (not Poisson)."""
        return self.theta is not None or self.batch_theta is not None

    def _thetas(
        self, lat: dict[str, torch.Tensor]
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The θ and log θ the core reads: per gene, or the buffers of per-cell rows."""
        if self.batch_theta is not None:
            return lat["theta"], lat["log_theta"]
        return self.theta, self.log_theta

    def _views(
        self, heads: _HeadBlocks
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor | None]:
        """The scale head's logits, the dropout head's (or None) and their gradients."""
        g = self.n_genes
        a, grad_a = heads.head(0, g), heads.head(0, g, grads=True)
        if not self.zinb:
            return a, None, grad_a, None
        return a, heads.head(1, g), grad_a, heads.head(1, g, grads=True)

    def _likelihood(self, b: _Buffers, batch: Minibatch) -> None:
        """The heads' products and the C core on them: NLL and gradients into ``b``'s buffers."""
        lat = b.lat
        b.heads.forward(b.dec.out[-1])
        stored = batch.stored
        if stored is not None and b.core.reads(stored.csr):
            b.core(stored.csr, stored.rows, b.library)
            return
        a, p, grad_a, grad_p = self._views(b.heads)
        theta, log_theta = self._thetas(lat)
        _, _, _, grad_lt = native.native_core(
            a,
            p,
            batch.x,
            torch.from_numpy(b.library),
            theta,
            log_theta,
            zinb=self.zinb,
            want_theta=self._theta_trains,
            bias_a=self.b_a,
            bias_p=self.b_p,
            out=(lat["nll"], grad_a, grad_p),
        )
        if grad_lt is not None:
            lat["grad_lt"].copy_(grad_lt)

    def _log_gamma(self, b: _Buffers, batch: Minibatch, n: int) -> tuple[float, torch.Tensor]:
        """``Σ_i Σ_g log Γ(x+θ) − log Γ(θ)`` over the stored counts, and its θ-gradient / n."""
        assert self.theta is not None
        stored = batch.stored
        if stored is not None and native.csr_supported(stored.csr):
            value, grad = native.theta_log_gamma_with_grad(
                stored.csr, stored.rows, self.theta, b.weights
            )
            assert value is not None
            return float(value.sum(dtype=torch.float64)), grad
        total, grad = theta_log_gamma_and_grad(self.theta, batch.nonzero, n)
        return total, grad / n

    @torch.no_grad()
    def __call__(
        self,
        rows: np.ndarray,
        batch: Minibatch,
        generator: torch.Generator | None,
        kl_weight: float,
    ) -> tuple[float, float, float]:
        """One training step: every gradient of the minibatch's mean loss, then Adam's update.

        Returns ``(loss, mean reconstruction loss, mean KL)``, summed in float64.
        """
        assert _fastnet is not None
        n = len(rows)
        b = self.buffers(n)
        lat = b.lat
        # Raises for rows outside the data before any C pass reads them.
        gather_inputs(rows, len(self.codes), b.gather)
        threads = torch.get_num_threads()
        for blk in self._refreshed:
            assert blk.weight is not None
            assert blk.source is not None
            blk.weight.copy_(blk.source.detach().t())
        if self.log_theta is not None:
            assert self.theta is not None
            torch.exp(self.log_theta, out=self.theta)
        bt = self.batch_theta
        if bt is not None:
            index = bt.gather(b.codes[:, 0].copy(), lat["log_theta"], lat["theta"])
        x_log = batch.x_log
        torch.addmm(self.b1, x_log, self.w1.t(), out=lat["first"])
        lat["noise"].normal_(generator=generator)
        for k, seed in enumerate(self._seeds.draw(self.encoder + self.decoder)):
            b.seeds[k] = seed or 0
        _fastnet.net_forward(*b.common, _address(b.seeds), 0.0, 0.0, threads)
        self._likelihood(b, batch)
        b.heads.backward(lat["grad_h"])
        torch.mul(b.dec.out[-1], 1.0 / n, out=lat["h_scaled"])
        b.heads.weight_gradients(lat["h_scaled"], self.grad_heads_w, self.grad_heads_b, 1.0 / n)
        log_gamma = 0.0
        if bt is not None:
            log_gamma = bt.log_gamma_and_gradient(
                batch, index, lat["theta"], lat["grad_lt"], b.weights
            )
        elif self.grad_log_theta is not None:
            assert self.theta is not None
            log_gamma, grad_theta = self._log_gamma(b, batch, n)
            torch.sum(lat["grad_lt"], 0, out=self.grad_log_theta).mul_(1.0 / n)
            self.grad_log_theta.sub_(grad_theta.mul_(self.theta))
        _fastnet.net_backward(*b.common, 0, 1.0 / n, kl_weight / n, threads)
        if self.grad_w1 is not None:
            torch.mm(b.enc.dpre[0].t(), x_log, out=self.grad_w1)
        self._adam.step()
        nll, kl_sum, factorial = _fastnet.totals(*b.totals)
        reconstruction = (nll - log_gamma + factorial) / n
        kl = kl_sum / n
        return reconstruction + kl_weight * kl, reconstruction, kl


def reference_step(
    model: CVAE,
    codes: torch.Tensor,
    *,
    log_library: torch.Tensor,
    factorial: torch.Tensor,
    adam: AdamSettings,
) -> ReferenceStep | None:
    """A :class:`ReferenceStep` for this fresh model, or None where it cannot run."""
    if _fastnet is None or not native.available():
        return None
    tensors = [log_library, factorial, *model.parameters(), *model.buffers()]
    if any(t.device.type != "cpu" for t in tensors):
        return None
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return None
    try:
        return ReferenceStep(model, codes, log_library=log_library, factorial=factorial, adam=adam)
    except ValueError:  # a layer the C side does not evaluate: autograd runs the step
        return None
