"""Covariate-aware layers with the expression weight and the covariate weights kept apart.

A layer that takes covariates computes ``W_x x + b + Σ_c W_c[:, s_c]``: the product of the
expression weight with the input, plus, for each categorical covariate ``c``, the column of
its weight matrix that belongs to the cell's category. This equals a Linear over ``[x,
onehot(s)]`` (the scArches formulation) but needs no one-hot matrix. Keeping ``W_c`` as its
own module lets surgery grow it with new columns and freeze the old ones by module, never by
matching parameter names.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from hubarches.config import Normalization
from hubarches.errors import ModelError, SurgeryError

__all__ = ["MLP", "CovariateLinear", "CovariateWeight", "HiddenBlock"]


def _uniform_(tensor: torch.Tensor, fan_in: int, generator: torch.Generator | None) -> None:
    """PyTorch's default Linear initialisation, U(-1/√fan_in, 1/√fan_in)."""
    bound = 1.0 / math.sqrt(fan_in)
    with torch.no_grad():
        tensor.uniform_(-bound, bound, generator=generator)


class CovariateWeight(nn.Module):
    """The weight ``W_c`` (``n_out × n_categories``) of one categorical covariate.

    After surgery the columns of the reference (``weight``) and the columns added for new
    categories (``weight_new``) are separate tensors, so the reference's can be frozen while
    the new ones train. Serialized, they are one matrix named ``weight``, exactly as a freshly
    built layer with the larger category list has it.
    """

    weight_new: nn.Parameter | None

    def __init__(self, n_out: int, n_categories: int, *, fan_in: int | None = None) -> None:
        super().__init__()
        self.fan_in = fan_in if fan_in is not None else n_categories
        self.weight = nn.Parameter(torch.empty(n_out, n_categories))
        self.register_parameter("weight_new", None)
        _uniform_(self.weight, self.fan_in, None)

    @property
    def n_categories(self) -> int:
        """Number of categories, the reference's and the added ones."""
        extra = 0 if self.weight_new is None else self.weight_new.shape[1]
        return self.weight.shape[1] + extra

    @property
    def n_added(self) -> int:
        """Number of columns added by surgery (0 for a plain layer)."""
        return 0 if self.weight_new is None else self.weight_new.shape[1]

    def full_weight(self) -> torch.Tensor:
        """All columns, reference first, in category order."""
        if self.weight_new is None:
            return self.weight
        return torch.cat([self.weight, self.weight_new], dim=1)

    def forward(self, codes: torch.Tensor) -> torch.Tensor:
        """The columns of each cell's category: ``[n_cells, n_out]``."""
        return torch.nn.functional.embedding(codes, self.full_weight().t())

    def add_categories(self, n_new: int, *, generator: torch.Generator | None = None) -> None:
        """Append ``n_new`` randomly initialised columns after the existing ones (surgery)."""
        if n_new < 0:
            raise SurgeryError(f"cannot add {n_new} categories")
        if n_new == 0:
            return
        fresh = torch.empty(self.weight.shape[0], n_new, dtype=self.weight.dtype)
        _uniform_(fresh, self.fan_in, generator)
        if self.weight_new is not None:
            fresh = torch.cat([self.weight_new.detach(), fresh], dim=1)
        self.weight_new = nn.Parameter(fresh.to(self.weight.device))

    def _save_to_state_dict(
        self, destination: dict[str, Any], prefix: str, keep_vars: bool
    ) -> None:
        weight = self.full_weight()
        destination[prefix + "weight"] = weight if keep_vars else weight.detach()

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        key = prefix + "weight"
        if key not in state_dict:
            missing_keys.append(key)
            return
        value = state_dict[key]
        expected = (self.weight.shape[0], self.n_categories)
        if tuple(value.shape) != expected:
            error_msgs.append(f"{key}: shape {tuple(value.shape)}, expected {expected}")
            return
        n_ref = self.weight.shape[1]
        with torch.no_grad():
            self.weight.copy_(value[:, :n_ref])
            if self.weight_new is not None:
                self.weight_new.copy_(value[:, n_ref:])


class CovariateLinear(nn.Module):
    """``W_x x + b + Σ_c W_c[:, s_c]``: a Linear whose covariate part can grow."""

    def __init__(self, n_in: int, n_out: int, covariate_sizes: Sequence[int]) -> None:
        super().__init__()
        fan_in = n_in + sum(covariate_sizes)
        self.expression = nn.Linear(n_in, n_out)
        _uniform_(self.expression.weight, fan_in, None)
        _uniform_(self.expression.bias, fan_in, None)
        self.covariates = nn.ModuleList(
            CovariateWeight(n_out, k, fan_in=fan_in) for k in covariate_sizes
        )

    def covariate_term(self, codes: torch.Tensor) -> torch.Tensor:
        """``Σ_c W_c[:, s_c]`` for integer codes ``[n_cells, n_covariates]``."""
        if codes.dim() != 2 or codes.shape[1] != len(self.covariates):
            raise ModelError(
                f"covariate codes must have shape [n_cells, {len(self.covariates)}], "
                f"got {list(codes.shape)}"
            )
        out = self.covariates[0](codes[:, 0])
        for c in range(1, len(self.covariates)):
            out = out + self.covariates[c](codes[:, c])
        return out

    def forward(self, x: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        """Apply the layer; ``codes`` may be None only for a layer without covariates."""
        out = self.expression(x)
        if len(self.covariates):
            if codes is None:
                raise ModelError("this layer takes covariates; pass their codes")
            out = out + self.covariate_term(codes)
        return out


class HiddenBlock(nn.Module):
    """Linear (with optional covariates) → normalization → ReLU → dropout."""

    def __init__(
        self,
        n_in: int,
        n_out: int,
        covariate_sizes: Sequence[int],
        *,
        norm: Normalization,
        dropout: float,
    ) -> None:
        super().__init__()
        self.linear = CovariateLinear(n_in, n_out, covariate_sizes)
        self.norm: nn.Module
        if norm == "batch":
            # scvi-tools' settings, so references trained either way behave alike.
            self.norm = nn.BatchNorm1d(n_out, momentum=0.01, eps=1e-3)
        elif norm == "layer":
            self.norm = nn.LayerNorm(n_out, elementwise_affine=False)
        else:
            self.norm = nn.Identity()
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        """Everything after the Linear: normalization, ReLU and dropout."""
        return self.dropout(torch.relu(self.norm(pre)))

    def forward(self, x: torch.Tensor, codes: torch.Tensor | None) -> torch.Tensor:
        """Apply the block to ``x`` with the cells' covariate codes."""
        return self.activate(self.linear(x, codes))


class MLP(nn.Module):
    """A stack of hidden blocks; covariates enter the first block, or every block."""

    def __init__(
        self,
        n_in: int,
        n_hidden: int,
        *,
        n_layers: int,
        covariate_sizes: Sequence[int],
        inject_all: bool,
        norm: Normalization,
        dropout: float,
    ) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            HiddenBlock(
                n_in if i == 0 else n_hidden,
                n_hidden,
                covariate_sizes if (i == 0 or inject_all) else (),
                norm=norm,
                dropout=dropout,
            )
            for i in range(n_layers)
        )

    def forward(
        self,
        x: torch.Tensor,
        codes: torch.Tensor | None,
        *,
        first_expression: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Apply all blocks.

        ``first_expression`` is ``W_x x + b`` of the first block, computed beforehand; when
        the first block's expression weight is frozen it is the same every epoch, so query
        training computes it once per cell and passes it here.
        """
        first = self.blocks[0]
        if first_expression is None:
            h = first(x, codes)
        else:
            pre = first_expression
            if len(first.linear.covariates):
                if codes is None:
                    raise ModelError("this layer takes covariates; pass their codes")
                pre = pre + first.linear.covariate_term(codes)
            h = first.activate(pre)
        for block in self.blocks[1:]:
            h = block(h, codes if len(block.linear.covariates) else None)
        return h

    def covariate_weights(self) -> list[CovariateWeight]:
        """Every covariate weight of every block, in block order."""
        return [w for block in self.blocks for w in block.linear.covariates]
