"""The fused likelihood core: compiled equals eager, and a failed compile falls back."""

from __future__ import annotations

import pytest
import torch

from hubarches import fastlik
from hubarches.errors import HubarchesWarning


def _inputs(b: int = 24, g: int = 40) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(0)
    a = torch.randn(b, g, generator=gen)
    p = torch.randn(b, g, generator=gen)
    x = torch.poisson(torch.rand(b, g, generator=gen) * 3, generator=gen)
    log_lib = torch.log(x.sum(1) + 1)
    log_theta = torch.randn(g, generator=gen)
    return a, p, x, log_lib, log_theta.exp(), log_theta


@pytest.fixture(autouse=True)
def _fresh_compile_state(monkeypatch: pytest.MonkeyPatch):
    monkeypatch.setattr(
        fastlik, "_COMPILE_STATE", {"enabled": False, "failed": False, "core": None}
    )
    monkeypatch.delenv(fastlik.COMPILE_ENV, raising=False)


def test_compile_policy_follows_env_then_request_then_length(monkeypatch: pytest.MonkeyPatch):
    assert fastlik.compile_wanted(fastlik.COMPILE_MIN_STEPS)
    assert not fastlik.compile_wanted(fastlik.COMPILE_MIN_STEPS - 1)
    assert fastlik.compile_wanted(1, requested=True)
    monkeypatch.setenv(fastlik.COMPILE_ENV, "0")
    assert not fastlik.compile_wanted(10**9, requested=True)
    monkeypatch.setenv(fastlik.COMPILE_ENV, "1")
    assert fastlik.compile_wanted(1, requested=False)


def test_compiled_core_matches_eager() -> None:
    args = _inputs()
    eager = fastlik.elementwise_core(*args, zinb=True, want_theta=True)
    with fastlik.compiled(True):
        fused = fastlik._run_core(*args, zinb=True, want_theta=True)
    assert not fastlik._COMPILE_STATE["failed"], "torch.compile failed on this machine"
    for e, c in zip(eager, fused, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-5, atol=1e-4)


def test_failed_compile_warns_once_and_falls_back(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(fn, **_kwargs):
        def run(*_a, **_k):
            raise RuntimeError("no C++ compiler")

        return run

    monkeypatch.setattr(torch, "compile", broken)
    args = _inputs()
    eager = fastlik.elementwise_core(*args, zinb=False, want_theta=False)
    with fastlik.compiled(True), pytest.warns(HubarchesWarning, match="torch.compile"):
        out = fastlik._run_core(*args, zinb=False, want_theta=False)
    torch.testing.assert_close(out[0], eager[0])
    with fastlik.compiled(True):
        fastlik._run_core(*args, zinb=False, want_theta=False)  # no second warning
    assert fastlik._COMPILE_STATE["failed"]


def test_log_gamma_table_equals_lgamma_with_gradients() -> None:
    """Small counts use a table of Σ log(θ+j); large and non-integer ones use lgamma."""
    gen = torch.Generator().manual_seed(3)
    theta = (torch.rand(30, generator=gen, dtype=torch.float64) * 5 + 0.05).requires_grad_()
    rows = torch.arange(12).repeat_interleave(10)
    cols = torch.randint(0, 30, (120,), generator=gen)
    values = torch.randint(1, 40, (120,), generator=gen).double()  # some above SMALL_COUNT
    values[::17] += 0.25  # non-integer entries take the lgamma path too
    fast = fastlik.nonzero_log_gamma(theta, rows, cols, values, 12)
    (g_fast,) = torch.autograd.grad(fast.sum(), theta)
    th = theta[cols]
    terms = torch.lgamma(values + th) - torch.lgamma(th) - torch.lgamma(values + 1)
    plain = torch.zeros(12, dtype=torch.float64).index_add(0, rows, terms)
    (g_plain,) = torch.autograd.grad(plain.sum(), theta)
    torch.testing.assert_close(fast, plain, rtol=1e-10, atol=1e-9)
    torch.testing.assert_close(g_fast, g_plain, rtol=1e-9, atol=1e-9)
    assert (values <= fastlik.SMALL_COUNT).any()
    assert (values > fastlik.SMALL_COUNT).any()
