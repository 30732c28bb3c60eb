"""Shared pieces of the tests of the hand-written training steps (fastnet, fastref)."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

from hubarches import fastnet, native
from hubarches.fastnet import AdamSettings
from hubarches.model import CVAE

needs_c = pytest.mark.skipif(
    fastnet._fastnet is None or not native.available(), reason="C extension not built"
)

FROZEN = AdamSettings(lr=0.0, eps=0.01)
"""Adam that leaves the tensors as they are: a step's gradients can be read unchanged."""


class FixedMask(nn.Module):
    """Dropout with a given (scaled) mask, so the reference sees the step's draws."""

    def __init__(self, mask: torch.Tensor) -> None:
        super().__init__()
        self.mask = mask

    def forward(self, h: torch.Tensor) -> torch.Tensor:
        return h * self.mask


def plain_backward(
    model: CVAE,
    x: torch.Tensor,
    codes: torch.Tensor,
    noise: torch.Tensor,
    masks: list[torch.Tensor | None],
    kl_weight: float,
) -> tuple[list[float], CVAE]:
    """The plain loss through autograd, in float64, with a step's noise and dropout masks.

    Returns ``(loss, mean reconstruction, mean KL)`` and the float64 copy of ``model`` whose
    tensors hold the gradients.
    """
    ref = copy.deepcopy(model).double()
    for block, mask in zip(ref.encoder.mlp.blocks, masks, strict=True):
        block.dropout = nn.Identity() if mask is None else FixedMask(mask.double())
    ref.draw_noise = lambda n, *, generator, like: noise.double()  # type: ignore[method-assign]
    terms = ref.plain_loss(x.double(), codes)
    loss = terms.total(kl_weight)
    loss.backward()
    stats = [float(t.detach()) for t in (loss, terms.reconstruction.mean(), terms.kl.mean())]
    return stats, ref
