"""Count likelihoods of the decoder: negative binomial, zero-inflated NB, Poisson.

All functions take counts ``x``, means ``mu`` and (for NB/ZINB) inverse dispersions
``theta`` of the same shape (or broadcastable) and return the elementwise log-probability.
They follow scvi-tools' parametrisation, so a reference trained with either tool means the
same thing.
"""

from __future__ import annotations

import torch
from torch.nn.functional import softplus

__all__ = ["log_nb", "log_poisson", "log_zinb"]

EPS = 1e-8
"""Guards the logarithms against exact zeros, as scvi-tools does."""


def log_nb(x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor) -> torch.Tensor:
    r"""Log NB(x; μ, θ).

    .. math:: θ\log\frac{θ}{θ+μ} + x\log\frac{μ}{θ+μ} + \log Γ(x+θ) − \log Γ(θ) − \log Γ(x+1)
    """
    log_theta_mu = torch.log(theta + mu + EPS)
    return (
        theta * (torch.log(theta + EPS) - log_theta_mu)
        + x * (torch.log(mu + EPS) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )


def log_zinb(
    x: torch.Tensor, mu: torch.Tensor, theta: torch.Tensor, pi_logits: torch.Tensor
) -> torch.Tensor:
    r"""Log ZINB(x; μ, θ, π) with dropout probability ``sigmoid(pi_logits)``.

    For x = 0: :math:`\log(σ(π) + σ(−π)\,NB(0))`; for x > 0: :math:`\log σ(−π) + \log NB(x)`,
    written with softplus for stability.
    """
    softplus_neg_pi = softplus(-pi_logits)
    log_theta_mu = torch.log(theta + mu + EPS)
    pi_theta_log = -pi_logits + theta * (torch.log(theta + EPS) - log_theta_mu)
    case_zero = softplus(pi_theta_log) - softplus_neg_pi
    case_nonzero = (
        -softplus_neg_pi
        + pi_theta_log
        + x * (torch.log(mu + EPS) - log_theta_mu)
        + torch.lgamma(x + theta)
        - torch.lgamma(theta)
        - torch.lgamma(x + 1)
    )
    return torch.where(x < EPS, case_zero, case_nonzero)


def log_poisson(x: torch.Tensor, mu: torch.Tensor) -> torch.Tensor:
    """Log Poisson(x; μ) = x log μ − μ − log Γ(x+1)."""
    return x * torch.log(mu + EPS) - mu - torch.lgamma(x + 1)
