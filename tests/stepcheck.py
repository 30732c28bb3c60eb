"""Shared pieces of the tests of the hand-written training steps (fastnet, fastref)."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from hubarches import fastnet, native
from hubarches.fastnet import AdamSettings

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
