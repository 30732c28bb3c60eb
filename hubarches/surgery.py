"""Architectural surgery (scArches): grow covariate blocks for unseen categories, freeze the rest.

For a layer ``f(x, s) = W_x x + W_s s`` surgery adds ``W_{s'}`` for ``L`` unseen categories,
``f(x, s, s') = W_x x + W_s s + W_{s'} s'``, in every layer that takes covariates, encoder and
decoder, plus new entries of per-category parameters (gene-batch dispersion). The new columns
of a covariate sit right after that covariate's existing block, so category ``j`` of covariate
``c`` keeps its column index. Only the new tensors train; everything else is frozen, which
makes the embedding of any reference cell through the extension bitwise identical to the
reference model's.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import torch
from torch import nn

from hubarches.errors import SurgeryError
from hubarches.model import CVAE
from hubarches.nn import CovariateWeight

__all__ = [
    "SurgeryPlan",
    "covariate_weights",
    "freeze_reference",
    "grow",
    "new_parameters",
    "plan_surgery",
]


@dataclass(frozen=True)
class SurgeryPlan:
    """What surgery adds: per covariate key, the categories after surgery and the new ones."""

    keys: tuple[str, ...]
    categories: tuple[tuple[str, ...], ...]
    added: tuple[tuple[str, ...], ...]

    @property
    def n_new(self) -> tuple[int, ...]:
        """Number of new categories per covariate, in manifest order."""
        return tuple(len(a) for a in self.added)

    @property
    def is_noop(self) -> bool:
        """True when the query brings no category the reference lacks."""
        return not any(self.added)

    def added_by_key(self) -> dict[str, list[str]]:
        """The new categories of each covariate that gained any."""
        return {k: list(a) for k, a in zip(self.keys, self.added, strict=True) if a}


def plan_surgery(
    covariates: Sequence[tuple[str, Sequence[str]]],
    new_categories: Mapping[str, Sequence[str]],
) -> SurgeryPlan:
    """Work out the extended category lists from the reference's and the query's.

    Category values are compared as strings; those the reference already has are not new,
    and each new one is added once, in the order given.
    """
    keys = tuple(key for key, _ in covariates)
    unknown = sorted(set(new_categories) - set(keys))
    if unknown:
        raise SurgeryError(
            f"categories given for unknown covariates {unknown}",
            hint=f"The reference's covariates are {list(keys)}",
        )
    categories: list[tuple[str, ...]] = []
    added: list[tuple[str, ...]] = []
    for key, known in covariates:
        have = [str(c) for c in known]
        seen = set(have)
        fresh: list[str] = []
        for cat in new_categories.get(key, ()):
            name = str(cat)
            if name not in seen:
                seen.add(name)
                fresh.append(name)
        categories.append(tuple(have + fresh))
        added.append(tuple(fresh))
    return SurgeryPlan(keys=keys, categories=tuple(categories), added=tuple(added))


def covariate_weights(model: CVAE) -> list[tuple[int, CovariateWeight]]:
    """Every per-category tensor of the model with the covariate index it belongs to."""
    found: list[tuple[int, CovariateWeight]] = []
    for mlp in (model.encoder.mlp, model.decoder.mlp):
        for block in mlp.blocks:
            found.extend(enumerate(block.linear.covariates))
    if isinstance(model.dispersion, CovariateWeight):
        found.append((0, model.dispersion))  # gene-batch dispersion belongs to the batch key
    return found


def grow(model: CVAE, n_new: Sequence[int], *, seed: int = 0) -> CVAE:
    """Return a copy of a trained model with ``n_new[c]`` new categories for covariate ``c``.

    The input is untouched. The copy's reference tensors are frozen and the new ones
    trainable (see :func:`freeze_reference`). With no new categories the copy is unchanged.
    """
    sizes = model.config.covariate_sizes
    if not bool(model.trained):
        raise SurgeryError(
            "surgery needs a trained reference model",
            hint="Train the reference first (hubarches train) or load a published one",
        )
    if len(n_new) != len(sizes):
        raise SurgeryError(
            f"expected a count of new categories for each of the {len(sizes)} covariates, "
            f"got {len(n_new)}"
        )
    if any(n < 0 for n in n_new):
        raise SurgeryError(f"counts of new categories must be ≥ 0, got {list(n_new)}")
    extension = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    for cov, weight in covariate_weights(extension):
        weight.add_categories(int(n_new[cov]), generator=generator)
        if weight is extension.dispersion and n_new[cov]:
            # New batches start from the mean log-dispersion of the reference's batches.
            assert weight.weight_new is not None
            with torch.no_grad():
                fill = weight.weight.mean(dim=1, keepdim=True)
                weight.weight_new.copy_(fill.expand_as(weight.weight_new))
    extension.config = extension.config.with_covariate_sizes(
        tuple(k + int(n) for k, n in zip(sizes, n_new, strict=True))
    )
    freeze_reference(extension)
    return extension


def new_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The tensors added by surgery: the only ones query training may change."""
    return [
        m.weight_new
        for m in model.modules()
        if isinstance(m, CovariateWeight) and m.weight_new is not None
    ]


def freeze_reference(model: nn.Module) -> list[nn.Parameter]:
    """Freeze every reference tensor and return the new, trainable ones."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = new_parameters(model)
    for p in trainable:
        p.requires_grad_(True)
    return trainable
