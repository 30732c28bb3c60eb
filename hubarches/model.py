"""The conditional VAE (scVI-equivalent) on tensors: encode, decode, loss, embed.

No AnnData and no files here. Inputs are dense count tensors ``x`` (cells × genes in
manifest order) and integer covariate codes ``s`` (cells × covariates, manifest order).

Generative model, per cell: ``z ~ N(0, I)``; ``ρ = softmax(f(z, s))`` over genes;
``x_g ~ NB(l·ρ_g, θ_g)`` (or ZINB / Poisson) with the observed library ``l = Σ_g x_g``.
Inference: ``q(z | x, s) = N(μ(x, s), σ²(x, s))`` on ``log1p(x)``.
Loss per cell: ``−log p(x | z, s) + β·KL(q(z | x, s) ‖ N(0, I))``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass

import torch
from torch import nn

from hubarches.config import ModelConfig
from hubarches.errors import ModelError, WeightsError
from hubarches.fastlik import CsrRows, count_nll, nonzero_log_gamma, stored_log_gamma
from hubarches.likelihoods import log_nb, log_poisson, log_zinb
from hubarches.nn import MLP, CovariateWeight

__all__ = ["CVAE", "VAR_EPS", "LossTerms", "build_model"]

VAR_EPS = 1e-4
"""Added to the encoder's variance, ``σ² = exp(·) + VAR_EPS``, as in scvi-tools."""


@dataclass(frozen=True)
class LossTerms:
    """Per-cell loss terms of a minibatch; ``total(β)`` is what training minimises."""

    reconstruction: torch.Tensor
    kl: torch.Tensor

    def total(self, kl_weight: float) -> torch.Tensor:
        """Mean over cells of ``reconstruction + kl_weight · kl``."""
        return (self.reconstruction + kl_weight * self.kl).mean()


Coordinates = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
"""``(rows, cols, values)`` of a minibatch's nonzero counts."""


Stored = Coordinates | CsrRows | Callable[[], Coordinates]
"""A minibatch's nonzero counts: coordinates, CSR rows, or a function giving coordinates."""


def _coordinates(x: torch.Tensor, given: Stored | None) -> Coordinates:
    """The nonzero coordinates of ``x``: those given (or given by a function), else found."""
    if isinstance(given, CsrRows):
        return given.coordinates()
    if callable(given):
        return given()
    if given is not None:
        return given
    rows, cols = torch.nonzero(x, as_tuple=True)
    return rows, cols, x[rows, cols]


class Encoder(nn.Module):
    """``log1p(x)`` (+ covariates) → hidden blocks → mean and variance of ``q(z|x,s)``."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        sizes = config.covariate_sizes if config.encode_covariates else ()
        self.mlp = MLP(
            config.n_genes,
            config.n_hidden,
            n_layers=config.n_layers,
            covariate_sizes=sizes,
            inject_all=config.covariate_injection == "all",
            norm=config.encoder_norm,
            dropout=config.dropout,
        )
        self.mean = nn.Linear(config.n_hidden, config.n_latent)
        self.log_var = nn.Linear(config.n_hidden, config.n_latent)

    def forward(
        self,
        x_log: torch.Tensor,
        codes: torch.Tensor,
        *,
        first_expression: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``q(z | x, s)``."""
        h = self.mlp(x_log, codes, first_expression=first_expression)
        return self.mean(h), torch.exp(self.log_var(h)) + VAR_EPS


class Decoder(nn.Module):
    """``z`` (+ covariates) → hidden blocks → gene proportions and dropout logits."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.mlp = MLP(
            config.n_latent,
            config.n_hidden,
            n_layers=config.n_layers,
            covariate_sizes=config.covariate_sizes,
            inject_all=config.covariate_injection == "all",
            norm=config.decoder_norm,
            dropout=0.0,
        )
        self.scale = nn.Linear(config.n_hidden, config.n_genes)
        self.dropout_logits = (
            nn.Linear(config.n_hidden, config.n_genes) if config.likelihood == "zinb" else None
        )

    def forward(
        self, z: torch.Tensor, codes: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Logits of ``ρ`` (softmax over genes) and ZINB dropout logits (None otherwise)."""
        h = self.mlp(z, codes)
        pi = self.dropout_logits(h) if self.dropout_logits is not None else None
        return self.scale(h), pi


class CVAE(nn.Module):
    """scVI's conditional VAE, with covariate weights that surgery can grow."""

    def __init__(self, config: ModelConfig) -> None:
        super().__init__()
        self.config = config
        self.encoder = Encoder(config)
        self.decoder = Decoder(config)
        self.dispersion: nn.Parameter | CovariateWeight | None
        if config.likelihood == "poisson":
            self.dispersion = None
        elif config.dispersion == "gene":
            self.dispersion = nn.Parameter(torch.randn(config.n_genes))
        else:
            # θ per gene and batch: one column per batch category, grown by surgery like W_s.
            self.dispersion = CovariateWeight(config.n_genes, config.n_batches)
            with torch.no_grad():
                self.dispersion.weight.normal_()
        self.register_buffer("trained", torch.zeros((), dtype=torch.bool))

    # --- checks -------------------------------------------------------------------------

    def check_inputs(self, x: torch.Tensor, codes: torch.Tensor) -> None:
        """Raise ModelError unless ``x`` and ``codes`` fit this model."""
        cfg = self.config
        if x.dim() != 2 or x.shape[1] != cfg.n_genes:
            raise ModelError(
                f"expected counts of shape [n_cells, {cfg.n_genes}], got {list(x.shape)}"
            )
        if codes.dim() != 2 or codes.shape != (x.shape[0], len(cfg.covariate_sizes)):
            raise ModelError(
                f"expected covariate codes of shape [{x.shape[0]}, {len(cfg.covariate_sizes)}]"
                f", got {list(codes.shape)}"
            )
        if codes.dtype not in (torch.int64, torch.int32):
            raise ModelError(f"covariate codes must be integers, got {codes.dtype}")
        if codes.numel():
            sizes = torch.tensor(cfg.covariate_sizes, device=codes.device)
            if bool((codes < 0).any()) or bool((codes >= sizes).any()):
                raise ModelError(
                    f"covariate codes out of range for categories {cfg.covariate_sizes}"
                )

    # --- pieces -------------------------------------------------------------------------

    def theta(self, codes: torch.Tensor) -> torch.Tensor:
        """Inverse dispersion θ: ``[n_genes]`` or per cell ``[n_cells, n_genes]``."""
        if isinstance(self.dispersion, CovariateWeight):
            return torch.exp(self.dispersion(codes[:, 0]))
        if self.dispersion is None:
            raise ModelError("a Poisson model has no dispersion")
        return torch.exp(self.dispersion)

    def encode(
        self,
        x: torch.Tensor,
        codes: torch.Tensor,
        *,
        first_expression: torch.Tensor | None = None,
        x_log: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Mean and variance of ``q(z | x, s)`` from counts.

        With ``first_expression`` (the first layer's ``W_x log1p(x) + b``, computed before)
        the counts themselves are not looked at again; ``x_log``, when given, is
        ``log1p(x)`` computed before (a minibatch takes it on the nonzero counts only).
        """
        if first_expression is not None:
            x_log = x
        elif x_log is None:
            x_log = torch.log1p(x)
        return self.encoder(x_log, codes, first_expression=first_expression)

    def _decode_mean(
        self, z: torch.Tensor, codes: torch.Tensor, log_library: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor | None, torch.Tensor]:
        """Decoder outputs: softmax logits, dropout logits and ``μ = l · softmax``."""
        logits, pi = self.decoder(z, codes)
        mu = torch.exp(log_library).unsqueeze(1) * torch.softmax(logits, dim=-1)
        return logits, pi, mu

    def log_dispersion(self, codes: torch.Tensor) -> torch.Tensor | None:
        """``log θ``: ``[n_genes]``, or ``[n_cells, n_genes]`` per batch; None for Poisson."""
        if isinstance(self.dispersion, CovariateWeight):
            return self.dispersion(codes[:, 0])
        return self.dispersion

    def draw_noise(
        self, n_cells: int, *, generator: torch.Generator | None, like: torch.Tensor
    ) -> torch.Tensor:
        """Standard normal noise ``[n_cells, n_latent]`` for the reparametrisation."""
        shape = (n_cells, self.config.n_latent)
        return torch.randn(shape, generator=generator, device=like.device, dtype=like.dtype)

    def sample_z(
        self,
        x: torch.Tensor,
        codes: torch.Tensor,
        *,
        first_expression: torch.Tensor | None,
        noise: torch.Tensor,
        x_log: torch.Tensor | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """A reparametrised sample ``μ + σ·noise`` of ``q(z | x, s)`` and the KL to the prior."""
        q_mean, q_var = self.encode(x, codes, first_expression=first_expression, x_log=x_log)
        z = q_mean + q_var.sqrt() * noise
        # KL(N(μ, σ²) ‖ N(0, 1)) summed over latent dimensions.
        kl = 0.5 * (q_var + q_mean.square() - 1.0 - torch.log(q_var)).sum(-1)
        return z, kl

    def loss(
        self,
        x: torch.Tensor,
        codes: torch.Tensor,
        *,
        first_expression: torch.Tensor | None = None,
        generator: torch.Generator | None = None,
        log_gamma: torch.Tensor | None = None,
        nonzero: Stored | None = None,
        factorial: torch.Tensor | None = None,
        noise: torch.Tensor | None = None,
        log_library: torch.Tensor | None = None,
        x_log: torch.Tensor | None = None,
    ) -> LossTerms:
        """Per-cell reconstruction loss and KL divergence of a minibatch of counts.

        The likelihood runs through :mod:`hubarches.fastlik`. Its log-gamma terms live on
        the nonzero counts: pass them as ``nonzero = (rows, cols, values)``, as the batch's
        rows of a CSR matrix (:class:`~hubarches.fastlik.CsrRows`, read in C), or a function
        that gives coordinates when needed (found from ``x`` otherwise), with the per-cell data
        constant ``factorial`` (Σ log Γ(x+1)) if it was computed beforehand; or, when the
        dispersion is frozen, as the per-cell constant ``log_gamma`` computed once.
        ``x_log`` is ``log1p(x)`` where the caller has it (a minibatch's :attr:`x_log`).
        Equal, to float rounding, to :meth:`plain_loss`.
        """
        if noise is None:
            noise = self.draw_noise(x.shape[0], generator=generator, like=x)
        z, kl = self.sample_z(x, codes, first_expression=first_expression, noise=noise, x_log=x_log)
        if log_library is None:  # training passes the per-cell constant, computed once
            log_library = torch.log(x.sum(-1))
        log_theta = self.log_dispersion(codes)
        decoder = self.decoder
        nll = count_nll(
            decoder.mlp(z, codes),
            decoder.scale,
            decoder.dropout_logits,
            log_theta,
            x,
            log_library,
            zinb=self.config.likelihood == "zinb",
        )
        if log_gamma is None:
            theta = None if log_theta is None else torch.exp(log_theta)
            if isinstance(nonzero, CsrRows):  # read in place, in C, where it can be
                log_gamma = stored_log_gamma(theta, nonzero, factorial=factorial)
            if log_gamma is None:
                log_gamma = nonzero_log_gamma(
                    theta, *_coordinates(x, nonzero), n_cells=x.shape[0], factorial=factorial
                )
        return LossTerms(reconstruction=nll - log_gamma, kl=kl)

    def plain_loss(
        self,
        x: torch.Tensor,
        codes: torch.Tensor,
        *,
        generator: torch.Generator | None = None,
    ) -> LossTerms:
        """The straightforward loss, autograd through :mod:`hubarches.likelihoods`.

        Kept as the reference that the fused :meth:`loss` is tested against.
        """
        noise = self.draw_noise(x.shape[0], generator=generator, like=x)
        z, kl = self.sample_z(x, codes, first_expression=None, noise=noise)
        _, pi, mu = self._decode_mean(z, codes, torch.log(x.sum(-1)))
        lik = self.config.likelihood
        if lik == "poisson":
            log_p = log_poisson(x, mu)
        elif lik == "nb":
            log_p = log_nb(x, mu, self.theta(codes))
        else:
            assert pi is not None
            log_p = log_zinb(x, mu, self.theta(codes), pi)
        return LossTerms(reconstruction=-log_p.sum(-1), kl=kl)

    @torch.inference_mode()
    def embed(
        self,
        x: torch.Tensor,
        codes: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Latent means (or one sample of ``q(z|x,s)``) of a batch of cells, in eval mode."""
        self.check_inputs(x, codes)
        return self.embed_log(torch.log1p(x), codes, sample=sample, generator=generator)

    @torch.inference_mode()
    def embed_log(
        self,
        x_log: torch.Tensor,
        codes: torch.Tensor,
        *,
        sample: bool = False,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """As :meth:`embed`, from ``log1p(x)`` (which sparse callers compute on nonzeros)."""
        self.check_inputs(x_log, codes)
        was_training = self.training
        self.eval()
        try:
            mean, var = self.encoder(x_log, codes)
            if sample:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device)
                return mean + var.sqrt() * noise
            return mean
        finally:
            self.train(was_training)

    # --- weights ------------------------------------------------------------------------

    def load_weights(self, tensors: Mapping[str, torch.Tensor]) -> None:
        """Load a state dict strictly: missing or unexpected tensors are an error naming them."""
        own = self.state_dict()
        missing = sorted(set(own) - set(tensors))
        unexpected = sorted(set(tensors) - set(own))
        wrong = [
            f"{k} {tuple(tensors[k].shape)} ≠ {tuple(v.shape)}"
            for k, v in own.items()
            if k in tensors and tuple(tensors[k].shape) != tuple(v.shape)
        ]
        if missing or unexpected or wrong:
            detail = f"; wrong shapes: {', '.join(wrong[:5])}" if wrong else ""
            raise WeightsError(
                "the weights do not match the architecture in the manifest" + detail,
                missing=missing,
                unexpected=unexpected,
                hint="The bundle is inconsistent; pull it again or rebuild it",
            )
        self.load_state_dict(dict(tensors), strict=True)

    @classmethod
    def from_weights(cls, config: ModelConfig, tensors: Mapping[str, torch.Tensor]) -> CVAE:
        """Build a model and load its weights strictly, skipping a random initialisation.

        The modules are created on the meta device (no memory, no random numbers) and only
        then given storage, which the weights fill: loading a large model costs a copy.
        """
        with torch.device("meta"):
            model = cls(config)
        model.to_empty(device="cpu")
        model.load_weights(tensors)
        return model


def build_model(config: ModelConfig, *, seed: int = 0) -> CVAE:
    """A freshly initialised model; the same seed gives the same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return CVAE(config)
