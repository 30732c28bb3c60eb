"""Query training's step with the small network by hand: no autograd, a dozen calls a step.

Query training changes only the covariate columns that surgery added (scArches); the rest of
the model is frozen. A step therefore needs the network's activations and the gradient that
reaches those columns: through the decoder's gene-wide heads and likelihood (two products
and the C core of :mod:`hubarches.native`), back through the decoder's hidden blocks, the
reparametrised sample and the encoder's hidden blocks. The hidden blocks and latent heads are
``cells × n_hidden`` arrays; through PyTorch they cost ~100 operations and autograd's
bookkeeping a step, as much time on two cores as the gene-wide products. :class:`QueryStep`
runs them in C (``hubarches._fastnet``), one call per block each way. The noise is drawn as
:meth:`hubarches.model.CVAE.loss` draws it, the dropout masks (when on) in C; for the same
draws the losses and gradients are the autograd path's to float rounding
(``tests/test_fastnet.py``).

Used for float32 CPU models, with gene-batch dispersion too (the query's new θ columns
train: :mod:`hubarches.fasttheta`); :func:`query_step` returns None elsewhere (a GPU,
float64, ``HUBARCHES_NATIVE=0``, no compiler at install) and training runs through autograd
instead.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from hubarches import native
from hubarches.batching import Minibatch
from hubarches.fasttheta import BatchTheta
from hubarches.gemm import FrozenProduct
from hubarches.model import CVAE, VAR_EPS
from hubarches.nn import CovariateWeight, HiddenBlock
from hubarches.surgery import new_parameters

try:
    from hubarches import _fastnet
except ImportError:  # built without a C compiler: autograd runs the step
    _fastnet = None

__all__ = ["AdamSettings", "QueryStep", "query_step"]

_NORM_NONE, _NORM_LAYER, _NORM_AFFINE = 0, 1, 2
_MAX_COVARIATES = 16  # the C side's table size
_SEED_STEP = 0xBF58476D1CE4E5B9  # odd: successive mask seeds differ in every bit position
# The plan's layout, as hubarches/_fastnet.c's H_* and B_* enums read it.
_HEADER_FIELDS = (
    "cells",
    "enc",
    "dec",
    "hidden",
    "latent",
    "first",
    "first_stride",
    "wm",
    "bm",
    "wv",
    "bv",
    "mean",
    "var",
    "z",
    "kl",
    "dz",
    "dh",
    "noise",
    "var_eps",
    "enc_lowest",
    "dec_lowest",
    "grad_h",
    "d_mean",
    "d_log_var",
    "grad_wm",
    "grad_bm",
    "grad_wv",
    "grad_bv",
)
_BLOCK_NAMES = (
    "in",
    "out",
    "wt",
    "bias",
    "table",
    "ncov",
    "norm",
    "scale",
    "shift",
    "eps",
    "mask",
    "keep",
    "y",
    "rstd",
    "output",
    "dpre",
    "dx",
    "grad_w",
    "grad_b",
)
_HEADER, _BLOCK_FIELDS = len(_HEADER_FIELDS), len(_BLOCK_NAMES)


def _address(t: torch.Tensor | np.ndarray | None) -> int:
    """Address of a tensor's or array's first element (0 for None)."""
    if t is None:
        return 0
    if isinstance(t, np.ndarray):
        return int(t.ctypes.data)
    return int(t.data_ptr())


def _plain(t: torch.Tensor | None) -> bool:
    """A contiguous float32 CPU tensor (or None)."""
    return t is None or (t.device.type == "cpu" and t.dtype == torch.float32 and t.is_contiguous())


def _norm_plan(norm: nn.Module) -> tuple[int, torch.Tensor | None, torch.Tensor | None, float]:
    """``(kind, scale, shift, eps)`` of a block's frozen normalization, in eval mode.

    Batch norm in eval mode is a per-unit affine map of its running statistics. Raises
    ValueError for a normalization the C side does not evaluate.
    """
    if isinstance(norm, nn.Identity):
        return _NORM_NONE, None, None, 0.0
    if isinstance(norm, nn.LayerNorm) and not norm.elementwise_affine:
        return _NORM_LAYER, None, None, float(norm.eps)
    if isinstance(norm, nn.BatchNorm1d) and norm.running_var is not None:
        assert norm.running_mean is not None
        with torch.no_grad():
            scale = torch.rsqrt(norm.running_var + norm.eps)
            if norm.weight is not None:
                scale = scale * norm.weight
            shift = -norm.running_mean * scale
            if norm.bias is not None:
                shift = shift + norm.bias
        return _NORM_AFFINE, scale.float().contiguous(), shift.float().contiguous(), 0.0
    raise ValueError(f"no hand-written pass for {type(norm).__name__}")


@dataclass(frozen=True)
class AdamSettings:
    """Adam's hyper-parameters (``torch.optim.Adam``'s meaning); the step applies them."""

    lr: float
    eps: float
    weight_decay: float = 0.0
    beta1: float = 0.9
    beta2: float = 0.999


class MaskSeeds:
    """Dropout mask seeds, step after step: a counter on a base seed.

    The base is drawn from torch's global generator at the first step (training seeds that
    generator per run, so runs repeat). The C pass draws the masks (Bernoulli(1 − rate) /
    (1 − rate) per unit, as ``nn.Dropout``) and mixes cell and unit numbers into the seed:
    torch's ``bernoulli_`` cost ~0.1 ms a step, 4 % of the step.
    """

    def __init__(self) -> None:
        self._base: int | None = None
        self._count = 0

    def draw(self, blocks: list[_Block]) -> list[int | None]:
        """A fresh seed for each block whose dropout is on; None for the others."""
        if self._base is None:
            self._base = int(torch.randint(0, 2**62, (1,)).item())
        out: list[int | None] = []
        for b in blocks:
            if b.dropout > 0.0:
                self._count += 1
                out.append((self._base + self._count * _SEED_STEP) % 2**64)
            else:
                out.append(None)
        return out


class AdamState:
    """Adam's moments for float32 tensors whose ``.grad`` is set, and the C update of them."""

    def __init__(self, tensors: list[torch.Tensor], settings: AdamSettings) -> None:
        self.settings = settings
        self._tensors = tensors  # the table points into them and their gradients
        self._moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in tensors]
        self._table = np.asarray(
            [
                [_address(p), _address(p.grad), _address(m), _address(v), p.numel()]
                for p, (m, v) in zip(tensors, self._moments, strict=True)
            ],
            dtype=np.int64,
        ).reshape(-1, 5)
        self._at = _address(self._table)
        self.steps = 0

    def step(self) -> None:
        """One update of every tensor from its gradient, as ``torch.optim.Adam``'s."""
        assert _fastnet is not None
        self.steps += 1
        a = self.settings
        _fastnet.adam(
            self._at, len(self._table), a.lr, a.beta1, a.beta2, a.eps,
            a.weight_decay, self.steps, torch.get_num_threads(),
        )  # fmt: skip


@dataclass
class _Block:
    """One hidden block as the C side reads it, and its trainable columns' gradients."""

    n_in: int
    n_out: int
    weight: torch.Tensor | None  # [n_in, n_out]; None: the input is the first-layer product
    bias: torch.Tensor | None
    table: np.ndarray  # int64 [n_cov, 7]: column, ref, k_ref, added, k_new, grad, ref_grad
    trains: bool
    norm: int
    scale: torch.Tensor | None
    shift: torch.Tensor | None
    eps: float
    dropout: float
    # Reference training: the expression weight ``[n_out, n_in]`` whose transpose ``weight``
    # copies (refreshed each step), and the gradients C writes (None: frozen, or the first
    # block's weight, whose gradient is a product outside C).
    source: torch.Tensor | None = None
    grad_w: torch.Tensor | None = None
    grad_b: torch.Tensor | None = None
    addresses: tuple[int, ...] = ()  # weight, bias, table, scale, shift, grad_w, grad_b

    def __post_init__(self) -> None:
        self.addresses = tuple(
            _address(t)
            for t in (
                self.weight, self.bias, self.table, self.scale, self.shift, self.grad_w,
                self.grad_b,
            )
        )  # fmt: skip


def _grad_buffer(t: torch.Tensor | None, grads: dict[int, torch.Tensor]) -> torch.Tensor | None:
    """The gradient buffer of ``t`` in ``grads`` (by param id), made once; None if it is frozen."""
    if t is None or not t.requires_grad:
        return None
    return grads.setdefault(id(t), torch.zeros_like(t))


def _covariate_table(
    weights: list[CovariateWeight], grads: dict[int, torch.Tensor]
) -> tuple[np.ndarray, bool]:
    """The C table of a block's covariate weights; gradients go into ``grads`` (by param id).

    Whichever columns train get a gradient: surgery's in query training, the reference's own
    in reference training.
    """
    rows = []
    trains = False
    for column, w in enumerate(weights):
        added = w.weight_new
        grad, ref_grad = _grad_buffer(added, grads), _grad_buffer(w.weight, grads)
        trains = trains or grad is not None or ref_grad is not None
        if not (_plain(w.weight) and _plain(added)):
            raise ValueError("covariate weights must be contiguous float32 CPU tensors")
        k_new = 0 if added is None else added.shape[1]
        rows.append(
            [
                column,
                _address(w.weight),
                w.weight.shape[1],
                _address(added),
                k_new,
                _address(grad),
                _address(ref_grad),
            ]
        )
    return np.asarray(rows, dtype=np.int64).reshape(-1, 7), trains


def _block(
    block: HiddenBlock, grads: dict[int, torch.Tensor], *, first: bool, dropout: bool
) -> _Block:
    """Describe ``block``; ``first`` blocks of the encoder read the precomputed product."""
    linear = block.linear
    if len(linear.covariates) > _MAX_COVARIATES:
        raise ValueError("too many covariates for the hand-written pass")
    table, trains = _covariate_table(list(linear.covariates), grads)
    kind, scale, shift, eps = _norm_plan(block.norm)
    # Transposed, [n_in, n_out]: the C passes run along the outputs.
    weight = None if first else linear.expression.weight.detach().t().contiguous()
    bias = None if first else linear.expression.bias.detach()
    if not (_plain(weight) and _plain(bias)):
        raise ValueError("block weights must be contiguous float32 CPU tensors")
    rate = block.dropout.p if dropout and isinstance(block.dropout, nn.Dropout) else 0.0
    n_out = linear.expression.out_features
    source = linear.expression.weight
    return _Block(
        n_in=n_out if first else linear.expression.in_features,
        n_out=n_out,
        weight=weight,
        bias=bias,
        table=table,
        trains=trains or source.requires_grad or linear.expression.bias.requires_grad,
        norm=kind,
        scale=scale,
        shift=shift,
        eps=eps,
        dropout=rate,
        source=None if first or not source.requires_grad else source,
        grad_w=None if first else _grad_buffer(source, grads),
        grad_b=_grad_buffer(linear.expression.bias, grads),
    )


@dataclass
class _State:
    """Per-block forward state and backward scratch for a minibatch of ``n`` cells."""

    y: list[torch.Tensor]
    rstd: list[torch.Tensor]
    out: list[torch.Tensor]
    dpre: list[torch.Tensor]
    dx: list[torch.Tensor]
    mask: list[torch.Tensor]  # each step's scaled dropout masks, drawn in C

    def address(self, name: str, k: int) -> int:
        """Address of buffer ``name`` of block ``k`` (looked up once, then cached)."""
        key = (name, k)
        if key not in self._addresses:
            self._addresses[key] = _address(getattr(self, name)[k])
        return self._addresses[key]

    def __post_init__(self) -> None:
        self._addresses: dict[tuple[str, int], int] = {}


def _state(blocks: list[_Block], n: int) -> _State:
    """Buffers for ``blocks`` and ``n`` cells."""
    return _State(
        y=[torch.empty(n, b.n_out) for b in blocks],
        rstd=[torch.empty(n) for _ in blocks],
        out=[torch.empty(n, b.n_out) for b in blocks],
        dpre=[torch.empty(n, b.n_out) for b in blocks],
        dx=[torch.empty(n, b.n_in) for b in blocks],
        mask=[torch.empty(n, b.n_out) for b in blocks],
    )


@dataclass
class _Inputs:
    """A minibatch's gathered inputs for ``n`` cells, in buffers reused step after step.

    The C calls read them by address; the addresses and the rest of the calls' constant
    arguments are worked out once here (they were ~40 µs of a ~1.7 ms step).
    """

    rows: np.ndarray  # int64 [n]
    codes: np.ndarray  # int64 [n, n_covariates]
    library: np.ndarray  # float32 [n], log library sizes
    log_gamma: np.ndarray  # float64 [n]
    seeds: np.ndarray  # uint64, one per block
    nll: np.ndarray  # views of the core's and the network's per-cell outputs
    kl: np.ndarray
    common: tuple[int, ...] = ()  # _fastnet's leading arguments
    seeds_at: int = 0
    gather: tuple[int, ...] = ()  # _fastnet.gather's trailing arguments
    table: np.ndarray | None = None  # the gather table those point to
    totals: tuple[int, ...] = ()  # _fastnet.totals' arguments

    @classmethod
    def make(cls, n: int, n_covariates: int, n_blocks: int, plan: np.ndarray,
             nll: torch.Tensor, kl: torch.Tensor,
             sources: tuple[np.ndarray, np.ndarray, np.ndarray]) -> _Inputs:  # fmt: skip
        """Buffers for ``n`` cells and the network ``plan``.

        ``sources``: every cell's codes, log library size and log-gamma term, which
        :func:`gather_inputs` copies the minibatch's rows of into the buffers.
        """
        inputs = cls(
            rows=np.zeros(n, dtype=np.int64),
            codes=np.zeros((n, n_covariates), dtype=np.int64),
            library=np.zeros(n, dtype=np.float32),
            log_gamma=np.zeros(n, dtype=np.float64),
            seeds=np.zeros(n_blocks, dtype=np.uint64),
            nll=nll.numpy(),
            kl=kl.numpy(),
        )
        inputs.common = (
            _address(plan), len(plan), n, _address(inputs.rows), _address(inputs.codes),
            n_covariates,
        )  # fmt: skip
        inputs.seeds_at = _address(inputs.seeds)
        destinations = (inputs.codes, inputs.library, inputs.log_gamma)
        inputs.table, inputs.gather = gather_table(sources, destinations, inputs.rows)
        inputs.totals = (_address(inputs.nll), _address(inputs.kl), _address(inputs.log_gamma), n)
        return inputs


def gather_table(
    sources: tuple[np.ndarray, ...], destinations: tuple[np.ndarray, ...], rows_out: np.ndarray
) -> tuple[np.ndarray, tuple[int, ...]]:
    """The table :func:`gather_inputs` reads (keep it alive) and its arguments to the C call.

    Each source (every cell's values, rows contiguous) goes to the destination buffer of the
    same position; the rows themselves go to ``rows_out``. Empty destinations are left out.
    """
    pairs = zip(sources, destinations, strict=True)
    fields = [[_address(src), _address(dst), dst.itemsize * dst[0].size]
              for src, dst in pairs if dst.size]  # fmt: skip
    table = np.asarray(fields, dtype=np.int64).reshape(-1, 3)
    return table, (_address(rows_out), _address(table), len(table))


def gather_inputs(rows: np.ndarray, n_total: int, arguments: tuple[int, ...]) -> np.ndarray:
    """Copy the minibatch's ``rows`` of every per-cell input into their buffers, in one C call.

    ``arguments`` come from :func:`gather_table`. Returns the rows as contiguous int64
    (``rows`` itself where it already is). Raises IndexError, before anything is written,
    for a row outside ``0..n_total-1``.
    """
    assert _fastnet is not None
    if not (rows.dtype == np.int64 and rows.flags.c_contiguous):
        rows = np.ascontiguousarray(rows, dtype=np.int64)
    if not _fastnet.gather(rows.ctypes.data, len(rows), n_total, *arguments):
        raise IndexError(f"row numbers outside 0..{n_total - 1}")
    return rows


def net_plan(
    header: dict[str, int],
    encoder: tuple[list[_Block], _State],
    decoder: tuple[list[_Block], _State],
) -> np.ndarray:
    """The plan ``_fastnet`` reads: the header, then each block's fields, the encoder's first.

    ``header`` names fields of :data:`_HEADER_FIELDS` (those not named are 0); ``var_eps``
    and the block counts are set here.
    """
    blocks = [(b, state, k) for bs, state in (encoder, decoder) for k, b in enumerate(bs)]
    plan = np.zeros(_HEADER + len(blocks) * _BLOCK_FIELDS, dtype=np.int64)
    floats = plan.view(np.float64)
    header = {**header, "enc": len(encoder[0]), "dec": len(decoder[0])}
    for name, value in header.items():
        plan[_HEADER_FIELDS.index(name)] = value
    floats[_HEADER_FIELDS.index("var_eps")] = VAR_EPS
    for j, (b, state, k) in enumerate(blocks):
        at = _HEADER + j * _BLOCK_FIELDS
        weight, bias, table, scale, shift, grad_w, grad_b = b.addresses
        fields = {
            "in": b.n_in,
            "out": b.n_out,
            "wt": weight,
            "bias": bias,
            "table": table,
            "ncov": len(b.table),
            "norm": b.norm,
            "scale": scale,
            "shift": shift,
            "mask": state.address("mask", k),
            "y": state.address("y", k),
            "rstd": state.address("rstd", k),
            "output": state.address("out", k),
            "dpre": state.address("dpre", k),
            "dx": state.address("dx", k),
            "grad_w": grad_w,
            "grad_b": grad_b,
        }
        for name, value in fields.items():
            plan[at + _BLOCK_NAMES.index(name)] = value
        floats[at + _BLOCK_NAMES.index("eps")] = b.eps
        floats[at + _BLOCK_NAMES.index("keep")] = 1.0 - b.dropout
    return plan


def _lowest_trainable(blocks: list[_Block]) -> int | None:
    """Index of the block nearest the input with trainable columns (None: none train)."""
    return next((k for k, b in enumerate(blocks) if b.trains), None)


class QueryStep:
    """One query-training step: a minibatch's loss, its gradients, and Adam's update.

    Built by :func:`query_step` for a frozen, grown model. Only the columns surgery added
    change; their gradients are left in their ``.grad`` (set once here) after each step.
    """

    def __init__(
        self,
        model: CVAE,
        codes: torch.Tensor,
        *,
        first_expression: torch.Tensor,
        log_gamma: torch.Tensor,
        log_library: torch.Tensor,
        dropout: bool,
        adam: AdamSettings,
    ) -> None:
        assert _fastnet is not None
        self.adam = adam
        self.model = model  # keeps alive every tensor the plans point into
        self.codes = np.ascontiguousarray(codes.numpy(), dtype=np.int64)
        self.first_expression = first_expression
        self.log_gamma = log_gamma.numpy().astype(np.float64)
        self.log_library = np.ascontiguousarray(log_library.numpy(), dtype=np.float32)
        grads: dict[int, torch.Tensor] = {}
        enc, dec = model.encoder, model.decoder
        self.encoder = [
            _block(b, grads, first=k == 0, dropout=dropout) for k, b in enumerate(enc.mlp.blocks)
        ]
        self.decoder = [_block(b, grads, first=False, dropout=False) for b in dec.mlp.blocks]
        # Gene-batch dispersion: each cell's θ row gathered every step (fasttheta).
        disp = model.dispersion
        self.batch_theta = BatchTheta(disp, grads) if isinstance(disp, CovariateWeight) else None
        # The C tables point into these tensors: kept here, since a later step on the same
        # model replaces the parameters' ``.grad`` and would otherwise free them.
        self._grads = grads
        self.trainable = [p for p in new_parameters(model) if p.requires_grad]
        for p in self.trainable:
            p.grad = grads[id(p)]
            if not p.is_contiguous():
                raise ValueError("trainable tensors must be contiguous")
        self._adam = AdamState(self.trainable, adam)
        # Both gene-wide heads as one frozen product; their biases go to the C core.
        self.zinb = model.config.likelihood == "zinb"
        self.n_genes = model.config.n_genes
        drop = dec.dropout_logits
        w_a = dec.scale.weight.detach()
        self.w_heads = w_a if drop is None else torch.cat([w_a, drop.weight.detach()])
        self.heads_product = FrozenProduct(self.w_heads)
        self.b_a = dec.scale.bias.detach().contiguous()
        self.b_p = None if drop is None else drop.bias.detach().contiguous()
        self.latent = tuple(
            _address(t.detach())
            for t in (enc.mean.weight, enc.mean.bias, enc.log_var.weight, enc.log_var.bias)
        )
        log_theta = None if self.batch_theta is not None else model.log_dispersion(codes[:1])
        self.log_theta = None if log_theta is None else log_theta.detach().contiguous()
        self.theta = None if self.log_theta is None else torch.exp(self.log_theta)
        self.n_latent = model.config.n_latent
        self.n_hidden = model.config.n_hidden
        self._states: dict[int, tuple[_State, _State, dict[str, torch.Tensor]]] = {}
        self._plans: dict[int, np.ndarray] = {}
        self._views: dict[int, tuple[torch.Tensor, ...]] = {}  # of the heads' buffers
        self._cores: dict[int, native.PreparedCore] = {}  # the core on those buffers
        self._inputs: dict[int, _Inputs] = {}
        self._products: dict[int, tuple[Callable[[], torch.Tensor], ...]] = {}  # bound heads
        self._seeds = MaskSeeds()

    def _buffers(self, n: int) -> tuple[_State, _State, dict[str, torch.Tensor]]:
        """Buffers for ``n`` cells, made once per minibatch size."""
        if n not in self._states:
            latent = {k: torch.empty(n, self.n_latent) for k in ("mean", "var", "z", "dz", "noise")}
            latent["kl"] = torch.empty(n)
            latent["dh"] = torch.empty(n, self.n_hidden)
            latent["heads"] = torch.empty(n, self.w_heads.shape[0])
            latent["grad_heads"] = torch.empty(n, self.w_heads.shape[0])
            latent["nll"] = torch.empty(n)
            latent["grad_h"] = torch.empty(n, self.n_hidden)
            theta, log_theta, grad_lt = self.theta, self.log_theta, None
            if self.batch_theta is not None:  # per cell, gathered every step
                theta = latent["theta"] = torch.empty(n, self.n_genes)
                log_theta = latent["log_theta"] = torch.empty(n, self.n_genes)
                if self.batch_theta.trains:
                    grad_lt = latent["grad_lt"] = torch.empty(n, self.n_genes)
                latent["weights"] = torch.full((n,), 1.0 / n)
            enc, dec = _state(self.encoder, n), _state(self.decoder, n)
            self._states[n] = (enc, dec, latent)
            g, heads, grads = self.n_genes, latent["heads"], latent["grad_heads"]
            self._views[n] = (
                heads[:, :g],
                heads[:, g:] if self.zinb else None,
                grads[:, :g],
                grads[:, g:] if self.zinb else None,
            )
            self._plans[n] = self._plan(n, enc, dec, latent)
            a, p, grad_a, grad_p = self._views[n]
            self._cores[n] = native.PreparedCore(
                a,
                p,
                theta,
                log_theta,
                zinb=self.zinb,
                bias_a=self.b_a,
                bias_p=self.b_p if self.zinb else None,
                out=(latent["nll"], grad_a, grad_p),
                grad_lt=grad_lt,
            )
            self._inputs[n] = _Inputs.make(
                n,
                self.codes.shape[1],
                len(self.encoder) + len(self.decoder),
                self._plans[n],
                latent["nll"],
                latent["kl"],
                (self.codes, self.log_library, self.log_gamma),
            )
            h = dec.out[-1]
            self._products[n] = (
                self.heads_product.bind_forward(h, heads),
                self.heads_product.bind_backward(grads, latent["grad_h"]),
            )
        return self._states[n]

    def _plan(self, n: int, enc: _State, dec: _State, lat: dict[str, torch.Tensor]) -> np.ndarray:
        """The network as ``_fastnet`` reads it for ``n`` cells (its header and block layout)."""
        enc_lowest = _lowest_trainable(self.encoder)
        header = {
            "cells": n,
            "hidden": self.n_hidden,
            "latent": self.n_latent,
            "first": _address(self.first_expression),
            "first_stride": self.first_expression.stride(0),
            **dict(zip(("wm", "bm", "wv", "bv"), self.latent, strict=True)),
            **{k: _address(lat[k]) for k in ("mean", "var", "z", "kl", "dz", "dh", "noise")},
            "enc_lowest": -1 if enc_lowest is None else enc_lowest,
            "dec_lowest": 0 if enc_lowest is not None else _lowest_trainable(self.decoder) or 0,
            "grad_h": _address(lat["grad_h"]),
        }
        return net_plan(header, (self.encoder, enc), (self.decoder, dec))

    def _fill_seeds(self, seeds: np.ndarray) -> None:
        """Each block's mask seed into ``seeds`` (0 where its dropout is off)."""
        for k, seed in enumerate(self._dropout_seeds(self.encoder)):
            seeds[k] = seed or 0

    def _dropout_seeds(self, blocks: list[_Block]) -> list[int | None]:
        """A mask seed for each block whose dropout is on (:class:`MaskSeeds`)."""
        return self._seeds.draw(blocks)

    def _heads(
        self, n: int, batch: Minibatch, library: np.ndarray, rows: np.ndarray
    ) -> torch.Tensor:
        """The gene-wide heads and the likelihood of ``n`` cells: per-cell NLL, its gradient.

        The decoder's output is the heads' input; the buffers' ``grad_h`` gets the gradient
        of the NLL's sum there. The counts are read from the batch's CSR rows where it has
        them (no dense copy). ``library`` holds the cells' log library sizes, ``rows`` the
        step's rows of the data, already checked.
        """
        forward, backward = self._products[n]
        forward()
        stored = batch.stored
        core = self._cores[n]
        if stored is not None and core.reads(stored.csr):
            # The batch's rows of the whole data, checked in this step already: not again.
            known = stored.rows is rows and stored.csr.shape[0] == len(self.codes)
            nll = core(stored.csr, stored.rows, library, rows_checked=known)
        else:  # dense counts
            a, p, grad_a, grad_p = self._views[n]
            out = self._states[n][2]
            per_cell = self.batch_theta is not None
            trains = self.batch_theta is not None and self.batch_theta.trains
            nll, _, _, grad_lt = native.native_core(
                a,
                p,
                batch.x,
                torch.from_numpy(library),
                out["theta"] if per_cell else self.theta,
                out["log_theta"] if per_cell else self.log_theta,
                zinb=self.zinb,
                want_theta=trains,
                bias_a=self.b_a,
                bias_p=self.b_p if self.zinb else None,
                out=(out["nll"], grad_a, grad_p),
            )
            if trains:
                assert grad_lt is not None
                out["grad_lt"].copy_(grad_lt)
        # Both heads' gradients side by side in one buffer: one product back.
        backward()
        return nll

    def __call__(
        self,
        rows: np.ndarray,
        batch: Minibatch,
        generator: torch.Generator | None,
        kl_weight: float,
    ) -> tuple[float, float, float]:
        """One training step: gradients of the minibatch's mean loss, then Adam's update.

        Returns ``(loss, mean reconstruction loss, mean KL)``, summed in float64.
        """
        assert _fastnet is not None
        n = len(rows)
        self._buffers(n)
        inputs = self._inputs[n]
        # Raises for rows outside the data before any C pass reads them.
        checked = gather_inputs(rows, len(self.codes), inputs.gather)
        threads = torch.get_num_threads()
        noise = self._states[n][2]["noise"]  # drawn as CVAE.draw_noise draws it
        noise.normal_(generator=generator)
        self._fill_seeds(inputs.seeds)
        common = inputs.common
        lat = self._states[n][2]
        bt = self.batch_theta
        if bt is not None:
            index = bt.gather(inputs.codes[:, 0].copy(), lat["log_theta"], lat["theta"])
        _fastnet.net_forward(*common, inputs.seeds_at, 0.0, 0.0, threads)
        self._heads(n, batch, inputs.library, checked)
        theta_terms = 0.0
        if bt is not None and bt.trains:
            theta_terms = bt.log_gamma_and_gradient(
                batch, index, lat["theta"], lat["grad_lt"], lat["weights"]
            )
        _fastnet.net_backward(*common, 0, 1.0 / n, kl_weight / n, threads)
        self._adam.step()
        nll, kl_sum, gamma = _fastnet.totals(*inputs.totals)
        gamma += theta_terms
        reconstruction = (nll - gamma) / n
        kl = kl_sum / n
        return reconstruction + kl_weight * kl, reconstruction, kl


def query_step(
    model: CVAE,
    codes: torch.Tensor,
    *,
    first_expression: torch.Tensor,
    log_gamma: torch.Tensor | None,
    log_library: torch.Tensor,
    dropout: bool,
    adam: AdamSettings,
) -> QueryStep | None:
    """A :class:`QueryStep` for this frozen, grown model, or None where it cannot run.

    ``log_gamma``: each cell's constant likelihood terms, ``Σ log Γ(x+θ) − log Γ(θ) −
    log Γ(x+1)``; where θ trains (gene-batch dispersion, new batches) only ``−Σ log Γ(x+1)``,
    the step taking the θ terms. ``dropout`` says whether the encoder's dropout is on
    (``dropout_in_query``).
    """
    if _fastnet is None or not native.available() or log_gamma is None:
        return None
    tensors = [first_expression, log_gamma, log_library, *model.parameters(), *model.buffers()]
    if any(t.device.type != "cpu" for t in tensors):
        return None
    if any(p.dtype != torch.float32 for p in model.parameters()):
        return None
    if not (_plain(first_expression) and first_expression.dim() == 2):
        return None
    added = {id(p) for p in new_parameters(model)}
    if any(p.requires_grad for p in model.parameters() if id(p) not in added):
        return None
    try:
        return QueryStep(
            model,
            codes,
            first_expression=first_expression,
            log_gamma=log_gamma,
            log_library=log_library,
            dropout=dropout,
            adam=adam,
        )
    except ValueError:  # a layer the C side does not evaluate: autograd runs the step
        return None
