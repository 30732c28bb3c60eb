"""Gene-batch dispersion in the hand-written training steps (fastnet's and fastref's).

With one θ per gene and batch, each cell reads the θ row of its batch. In query training the
reference's columns stay frozen and the columns surgery added for the query's batches train;
in reference training every column trains. Each step gathers the cells' ``log θ`` rows for
the C core (which then also gives the per-cell gradient in ``log θ``), and, where θ trains,
takes the log-gamma terms ``Σ log Γ(x+θ) − log Γ(θ)`` and their θ-gradient in one C call over
the stored counts, a table per batch present. A column's gradient is the sum over its cells.
"""

from __future__ import annotations

import numpy as np
import torch

from hubarches import native
from hubarches.batching import Minibatch
from hubarches.fastlik import theta_log_gamma_and_grad
from hubarches.nn import CovariateWeight

__all__ = ["BatchTheta"]


class BatchTheta:
    """The θ rows of a step's cells, and the gradient of the columns that train, step by step."""

    def __init__(self, dispersion: CovariateWeight, grads: dict[int, torch.Tensor]) -> None:
        self.n_genes = dispersion.weight.shape[0]
        # log θ by category, one contiguous row each: frozen columns' rows set once here.
        self.table = torch.empty(dispersion.n_categories, self.n_genes)
        parts: list[tuple[int, torch.Tensor]] = [(0, dispersion.weight)]
        if dispersion.weight_new is not None:
            parts.append((dispersion.weight.shape[1], dispersion.weight_new))
        for start, w in parts:
            self.table[start : start + w.shape[1]] = w.detach().t()
        self.theta_table = torch.exp(self.table)
        # The columns that train, each with its first category and its gradient buffer.
        self.trained = [
            (start, w, grads.setdefault(id(w), torch.zeros_like(w)))
            for start, w in parts
            if w.requires_grad
        ]
        self.trains = bool(self.trained)
        self._grad_table = torch.zeros(dispersion.n_categories, self.n_genes)

    def gather(
        self, categories: np.ndarray, log_theta: torch.Tensor, theta: torch.Tensor
    ) -> torch.Tensor:
        """Each cell's ``log θ`` and θ rows into the buffers; returns the categories' index."""
        for start, w, _ in self.trained:
            rows = slice(start, start + w.shape[1])
            self.table[rows] = w.detach().t()
            torch.exp(self.table[rows], out=self.theta_table[rows])
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
        """``Σ_i Σ_g log Γ(x+θ) − log Γ(θ)`` over the step's cells; the trained columns' gradient.

        ``grad_lt`` is the core's per-cell gradient in ``log θ`` (of the summed NLL without
        these terms), ``weights`` the cells' weights in the mean loss (1/n each).
        """
        assert self.trains
        n = len(index)
        scale = float(weights[0]) if n else 0.0
        grad = self._grad_table
        stored = batch.stored
        if stored is not None and native.csr_supported(stored.csr):
            # One C call for every batch present: the core's part and the log-gamma part.
            total = native.theta_log_gamma_by_category(
                stored.csr, stored.rows, index.numpy(), self.theta_table, weights, grad,
                grad_lt=grad_lt, scale=scale,
            )  # fmt: skip
        else:  # dense counts: autograd on the per-nonzero terms
            grad.zero_().index_add_(0, index, grad_lt, alpha=scale)
            total, grad_theta = theta_log_gamma_and_grad(theta, batch.nonzero, n)
            grad.index_add_(0, index, grad_theta.mul_(theta), alpha=-scale)
        for start, w, grad_w in self.trained:
            grad_w.copy_(grad[start : start + w.shape[1]].t())
        return total
