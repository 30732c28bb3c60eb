"""Adam without ``torch.optim``'s start-up cost and per-step bookkeeping.

``torch.optim.Adam`` imports ``torch._dynamo`` when the first optimizer is built (about 0.9 s
on two cores): a third of a short ``hubarches map`` run, spent before the first step, and its
``step`` sorts tensors by device and dtype in Python every time. This module calls the kernel
that ``torch.optim.Adam(fused=True)`` calls (``torch._fused_adam_``, so the steps are bitwise
the same) directly, and where a build of torch lacks it applies the same update (L2 weight
decay added to the gradient, bias-corrected moments, ε outside the square root) in
``torch._foreach`` operations.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from hubarches.errors import ModelError

__all__ = ["Adam"]


class Adam:
    """``torch.optim.Adam``'s update for a list of tensors (``zero_grad`` and ``step``)."""

    def __init__(
        self,
        parameters: Sequence[torch.nn.Parameter],
        *,
        lr: float,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        weight_decay: float = 0.0,
    ) -> None:
        self.parameters = list(parameters)
        if not self.parameters:
            raise ModelError("Adam needs at least one tensor to optimise")
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= b < 1 for b in betas):
            raise ModelError(
                f"invalid Adam settings: lr={lr}, betas={betas}, eps={eps}, "
                f"weight_decay={weight_decay}"
            )
        self.lr, self.betas, self.eps, self.weight_decay = lr, betas, eps, weight_decay
        with torch.no_grad():
            self.exp_avg = [torch.zeros_like(p) for p in self.parameters]
            self.exp_avg_sq = [torch.zeros_like(p) for p in self.parameters]
            # Step counts per tensor, as float32 tensors on its device (the fused kernel's).
            self.state_steps = [
                torch.zeros((), dtype=torch.float32, device=p.device) for p in self.parameters
            ]
        first = self.parameters[0]
        self._fused = hasattr(torch, "_fused_adam_") and all(
            p.dtype == first.dtype and p.device == first.device for p in self.parameters
        )

    @property
    def param_groups(self) -> list[dict[str, object]]:
        """The tensors and settings, laid out as ``torch.optim.Optimizer.param_groups``."""
        return [
            {
                "params": self.parameters,
                "lr": self.lr,
                "betas": self.betas,
                "eps": self.eps,
                "weight_decay": self.weight_decay,
            }
        ]

    def zero_grad(self, set_to_none: bool = True) -> None:
        """Forget the gradients (always by setting them to None)."""
        del set_to_none
        for p in self.parameters:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        """One Adam step on every tensor that has a gradient."""
        live = [i for i, p in enumerate(self.parameters) if p.grad is not None]
        if not live:
            return
        params = [self.parameters[i] for i in live]
        grads = [p.grad for p in params]
        exp_avg = [self.exp_avg[i] for i in live]
        exp_avg_sq = [self.exp_avg_sq[i] for i in live]
        steps = [self.state_steps[i] for i in live]
        torch._foreach_add_(steps, 1.0)
        if self._fused:
            try:
                torch._fused_adam_(
                    params,
                    grads,
                    exp_avg,
                    exp_avg_sq,
                    [],
                    steps,
                    amsgrad=False,
                    lr=self.lr,
                    beta1=self.betas[0],
                    beta2=self.betas[1],
                    weight_decay=self.weight_decay,
                    eps=self.eps,
                    maximize=False,
                    grad_scale=None,
                    found_inf=None,
                )
                return
            except (RuntimeError, TypeError):  # no fused kernel for this device or dtype
                self._fused = False
        self._foreach_step(params, grads, exp_avg, exp_avg_sq, steps)

    def _foreach_step(
        self,
        params: list[torch.Tensor],
        grads: list[torch.Tensor],
        exp_avg: list[torch.Tensor],
        exp_avg_sq: list[torch.Tensor],
        steps: list[torch.Tensor],
    ) -> None:
        """``torch.optim.Adam``'s update in ``torch._foreach`` operations."""
        beta1, beta2 = self.betas
        if self.weight_decay:
            grads = torch._foreach_add(grads, params, alpha=self.weight_decay)
        torch._foreach_lerp_(exp_avg, grads, 1.0 - beta1)
        torch._foreach_mul_(exp_avg_sq, beta2)
        torch._foreach_addcmul_(exp_avg_sq, grads, grads, value=1.0 - beta2)
        for count in sorted({float(t) for t in steps}):
            group = [i for i, t in enumerate(steps) if float(t) == count]
            bias1 = 1.0 - beta1**count
            bias2_sqrt = math.sqrt(1.0 - beta2**count)
            denom = torch._foreach_sqrt([exp_avg_sq[i] for i in group])
            torch._foreach_div_(denom, bias2_sqrt)
            torch._foreach_add_(denom, self.eps)
            torch._foreach_addcdiv_(
                [params[i] for i in group],
                [exp_avg[i] for i in group],
                denom,
                value=-self.lr / bias1,
            )
