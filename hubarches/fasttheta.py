"""Gene-batch dispersion in the hand-written query step (:class:`hubarches.fastnet.QueryStep`).

With one θ per gene and batch, each cell reads the θ row of its batch: the reference's
columns stay frozen, the columns surgery added for the query's batches train. Each step
gathers the cells' ``log θ`` rows for the C core (which then also gives the per-cell
gradient in ``log θ``), and, where θ trains, takes the log-gamma terms ``Σ log Γ(x+θ) −
log Γ(θ)`` and their θ-gradient, one C pass over the stored counts per batch in the
minibatch. The added columns' gradient is the sum over their cells.
"""

from __future__ import annotations

import numpy as np
import torch

from hubarches import native
from hubarches.batching import Minibatch
from hubarches.fastlik import _theta_log_gamma, row_sums
from hubarches.nn import CovariateWeight

__all__ = ["BatchTheta"]


class BatchTheta:
    """The θ rows of a step's cells, and the gradient of the added columns, step by step."""

    def __init__(self, dispersion: CovariateWeight, grads: dict[int, torch.Tensor]) -> None:
        reference = dispersion.weight.detach()  # [n_genes, reference categories]
        self.n_genes, self.n_reference = reference.shape
        self.added = dispersion.weight_new
        # log θ by category, one contiguous row each: the reference's rows set once here.
        self.table = torch.empty(dispersion.n_categories, self.n_genes)
        self.table[: self.n_reference] = reference.t()
        self.theta_table = torch.exp(self.table)
        self.trains = self.added is not None and self.added.requires_grad
        self.grad_added: torch.Tensor | None = None
        if self.trains:
            assert self.added is not None
            self.grad_added = grads.setdefault(id(self.added), torch.zeros_like(self.added))
        self._grad_table = torch.zeros(dispersion.n_categories, self.n_genes)

    def gather(
        self, categories: np.ndarray, log_theta: torch.Tensor, theta: torch.Tensor
    ) -> torch.Tensor:
        """Each cell's ``log θ`` and θ rows into the buffers; returns the categories' index."""
        if self.added is not None:
            added = self.added.detach().t()
            self.table[self.n_reference :] = added
            torch.exp(added, out=self.theta_table[self.n_reference :])
        index = torch.from_numpy(categories)
        torch.index_select(self.table, 0, index, out=log_theta)
        torch.index_select(self.theta_table, 0, index, out=theta)
        return index

    def log_gamma_and_gradient(
        self,
        batch: Minibatch,
        index: torch.Tensor,
        theta: torch.Tensor,
        grad_lt: torch.Tensor,
        weights: torch.Tensor,
    ) -> float:
        """``Σ_i Σ_g log Γ(x+θ) − log Γ(θ)`` over the step's cells; the added columns' gradient.

        ``grad_lt`` is the core's per-cell gradient in ``log θ`` (of the summed NLL without
        these terms), ``weights`` the cells' weights in the mean loss (1/n each).
        """
        assert self.grad_added is not None
        n = len(index)
        scale = float(weights[0]) if n else 0.0
        grad = self._grad_table.zero_()
        grad.index_add_(0, index, grad_lt, alpha=scale)
        stored = batch.stored
        if stored is not None and native.csr_supported(stored.csr):
            total = 0.0
            categories = index.numpy()
            for c in np.unique(categories):
                picked = categories == c
                value, grad_theta = native.theta_log_gamma_with_grad(
                    stored.csr, stored.rows[picked], self.theta_table[c], weights[: picked.sum()]
                )
                assert value is not None
                total += float(value.sum(dtype=torch.float64))
                grad[c].sub_(grad_theta.mul_(self.theta_table[c]))
        else:  # dense counts: autograd on the per-nonzero terms
            per_cell = theta.clone().requires_grad_(True)
            rows, cols, values = batch.nonzero
            with torch.enable_grad():
                terms = row_sums(_theta_log_gamma(per_cell, rows, cols, values), rows, n).sum()
                (grad_theta,) = torch.autograd.grad(terms, per_cell)
            total = float(terms.detach())
            grad.index_add_(0, index, grad_theta.mul_(theta), alpha=-scale)
        self.grad_added.copy_(grad[self.n_reference :].t())
        return total
