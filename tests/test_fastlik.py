"""The fused likelihood core: C and compiled equal eager, and a failed compile falls back."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from hubarches import fastlik, native
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
    monkeypatch.delenv(native.NATIVE_ENV, raising=False)


def test_compile_policy_follows_env_then_request_then_length(monkeypatch: pytest.MonkeyPatch):
    assert fastlik.compile_wanted(fastlik.COMPILE_MIN_STEPS)
    assert not fastlik.compile_wanted(fastlik.COMPILE_MIN_STEPS - 1)
    assert fastlik.compile_wanted(1, requested=True)
    monkeypatch.setenv(fastlik.COMPILE_ENV, "0")
    assert not fastlik.compile_wanted(10**9, requested=True)
    monkeypatch.setenv(fastlik.COMPILE_ENV, "1")
    assert fastlik.compile_wanted(1, requested=False)


def test_compiled_core_matches_eager(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(native.NATIVE_ENV, "0")  # the C core would otherwise come first
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
    monkeypatch.setenv(native.NATIVE_ENV, "0")
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


# --- the C core (hubarches._fastcore) ----------------------------------------------------------


def _c_compiler() -> bool:
    import shutil
    import sys

    return sys.platform.startswith("linux") and shutil.which("cc") is not None


@pytest.mark.skipif(not _c_compiler(), reason="no C compiler to build the extension with")
def test_c_core_is_built_where_a_compiler_exists() -> None:
    """Installing on a machine with a C compiler must build the core (else it runs 2× slower)."""
    assert native._fastcore is not None, "hubarches._fastcore was not built: reinstall"
    assert native.available()


needs_c = pytest.mark.skipif(native._fastcore is None, reason="hubarches._fastcore not built")


@pytest.fixture(params=[0, 1], ids=["libm", "inline"])
def core_math(request: pytest.FixtureRequest):
    """Run the C core with libm's exp and log, then with its inline ones (set_math)."""
    assert native._fastcore is not None
    native._fastcore.set_math(request.param)
    yield request.param
    native._fastcore.set_math(-1)


@needs_c
@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
@pytest.mark.parametrize("theta_per_cell", [False, True])
@pytest.mark.parametrize("want_theta", [False, True])
def test_c_core_matches_eager(
    likelihood: str, theta_per_cell: bool, want_theta: bool, core_math: int
) -> None:
    gen = torch.Generator().manual_seed(1)
    b, g = 37, 301  # odd sizes: vector remainders and a thread's uneven share of rows
    a = torch.randn(b, g, generator=gen) * 4
    a[0, :5] = torch.tensor([40.0, -40.0, 0.0, 25.0, -60.0])  # extreme logits
    p = torch.randn(b, g, generator=gen) * 6
    p[1, :4] = torch.tensor([30.0, -30.0, 0.0, 80.0])
    x = torch.poisson(torch.rand(b, g, generator=gen) ** 4 * 30, generator=gen)
    x[2, 7] = 5_000.0  # a large count
    x[3] = 0.0
    x[3, 0] = 1.0  # a cell with a single count
    log_lib = torch.log(x.sum(1))
    log_theta = torch.randn(b, g, generator=gen) if theta_per_cell else torch.randn(g)
    theta, lt = (None, None) if likelihood == "poisson" else (log_theta.exp(), log_theta)
    pp = p if likelihood == "zinb" else None
    zinb = likelihood == "zinb"
    assert native.supports(a, pp, x, log_lib, theta, lt)
    eager = fastlik.elementwise_core(a, pp, x, log_lib, theta, lt, zinb=zinb, want_theta=want_theta)
    fast = native.native_core(a, pp, x, log_lib, theta, lt, zinb=zinb, want_theta=want_theta)
    for e, c in zip(eager, fast, strict=True):
        if e is None:
            assert c is None
            continue
        assert torch.isfinite(c).all()
        scale = float(e.abs().max())
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-5 * scale)


@needs_c
def test_the_core_s_two_kinds_of_exp_and_log_agree_and_inline_is_the_default() -> None:
    """Inline exp/log (the default, on every processor) and libm's agree to float rounding."""
    assert native._fastcore is not None
    gen = torch.Generator().manual_seed(3)
    a, p = torch.randn(64, 500, generator=gen) * 8, torch.randn(64, 500, generator=gen) * 8
    x = torch.poisson(torch.rand(64, 500, generator=gen) ** 3 * 50, generator=gen)
    log_lib, log_theta = torch.log(x.sum(1) + 1), torch.randn(500, generator=gen) * 2
    runs = []
    try:
        for mode in (0, 1):
            assert native._fastcore.set_math(mode) == mode
            runs.append(
                native.native_core(
                    a, p, x, log_lib, log_theta.exp(), log_theta, zinb=True, want_theta=True
                )
            )
        with pytest.raises(ValueError, match="-1, 0 or 1"):
            native._fastcore.set_math(2)
    finally:
        auto = native._fastcore.set_math(-1)
    assert auto == 1
    for libm, inline in zip(*runs, strict=True):
        assert libm is not None
        assert inline is not None
        torch.testing.assert_close(inline, libm, rtol=2e-6, atol=2e-6 * float(libm.abs().max()))


@needs_c
@pytest.mark.parametrize("mode", [0, 1], ids=["libm", "inline"])
def test_the_core_s_exp_and_log_are_accurate(mode: int) -> None:
    """exp on [-87, 0] and log over 2^-40..2^60 against float64, and their edge values.

    The inline functions are within 1 ulp (measured 0.97 and 0.83); libmvec documents 4 ulp
    for its vector variants (measured 2.8 and 3.8).
    """
    assert native._fastcore is not None
    x = np.concatenate([np.linspace(-87.0, 0.0, 200_001), [-0.0, -1e-30, -1e-7]])
    y = np.concatenate([np.exp2(np.linspace(-40.0, 60.0, 200_001)), [1.0, 1 + 2**-23, 1 - 2**-24]])
    x, y = x.astype(np.float32), y[: len(x)].astype(np.float32)
    extra = np.array([-100.0, np.nan], dtype=np.float32), np.array([np.inf, np.nan], np.float32)
    x, y = np.concatenate([x, extra[0]]), np.concatenate([y, extra[1]])
    e, lg = np.empty_like(x), np.empty_like(y)
    try:
        native._fastcore.set_math(mode)
        native._fastcore.math_values(
            len(x), x.ctypes.data, e.ctypes.data, y.ctypes.data, lg.ctypes.data
        )
    finally:
        native._fastcore.set_math(-1)
    body = slice(0, len(x) - 2)
    ulp_e = np.abs(e[body] - np.exp(x[body].astype(np.float64))) / np.spacing(e[body])
    ref = np.log(y[body].astype(np.float64))
    ulp_l = np.abs(lg[body] - ref) / np.spacing(np.maximum(np.abs(ref), 2**-40).astype(np.float32))
    bound = 1.5 if mode == 1 else 4.0
    assert ulp_e.max() <= bound
    assert ulp_l.max() <= bound
    assert 0.0 <= e[-2] < 2e-38  # below e^-87.3: a tiny normal float or zero
    assert np.isnan(e[-1])
    assert np.isinf(lg[-2])
    assert np.isnan(lg[-1])


@needs_c
def test_c_core_reads_row_strided_views() -> None:
    """Logits may be column blocks of one wider matrix (both decoder heads in one product)."""
    a, p, x, log_lib, theta, log_theta = _inputs()
    both = torch.cat([a, p], dim=1)
    av, pv = both[:, : a.shape[1]], both[:, a.shape[1] :]
    assert not av.is_contiguous()
    assert native.supports(av, pv, x, log_lib, theta, log_theta)
    out = native.native_core(av, pv, x, log_lib, theta, log_theta, zinb=True, want_theta=True)
    ref = fastlik.elementwise_core(a, p, x, log_lib, theta, log_theta, zinb=True, want_theta=True)
    for e, c in zip(ref, out, strict=True):
        torch.testing.assert_close(c, e, rtol=1e-4, atol=1e-4)


@needs_c
@pytest.mark.parametrize("likelihood", ["zinb", "nb", "poisson"])
def test_c_core_adds_the_heads_biases_to_each_row(likelihood: str) -> None:
    """Biases given apart equal biases already added to the logits."""
    a, p, x, log_lib, theta, log_theta = _inputs()
    gen = torch.Generator().manual_seed(4)
    b_a, b_p = torch.randn(a.shape[1], generator=gen), torch.randn(a.shape[1], generator=gen)
    zinb = likelihood == "zinb"
    pp = p if zinb else None
    th, lt = (None, None) if likelihood == "poisson" else (theta, log_theta)
    given = native.native_core(
        a,
        pp,
        x,
        log_lib,
        th,
        lt,
        zinb=zinb,
        want_theta=False,
        bias_a=b_a,
        bias_p=b_p if zinb else None,
    )
    added = native.native_core(
        a + b_a,
        None if pp is None else pp + b_p,
        x,
        log_lib,
        th,
        lt,
        zinb=zinb,
        want_theta=False,
    )
    for g, e in zip(given, added, strict=True):
        assert (g is None) == (e is None)
        if g is not None:
            torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(
        given[0], native.native_core(a, pp, x, log_lib, th, lt, zinb=zinb, want_theta=False)[0]
    )
    with pytest.raises(ValueError, match="one value per gene"):
        native.native_core(a, pp, x, log_lib, th, lt, zinb=zinb, want_theta=False, bias_a=b_a[:-1])


@needs_c
def test_c_core_writes_both_gradients_into_one_buffer() -> None:
    """Given outputs: grad_a and grad_p as column blocks of one matrix, same values."""
    a, p, x, log_lib, theta, log_theta = _inputs()
    n, g = a.shape
    fresh = native.native_core(a, p, x, log_lib, theta, log_theta, zinb=True, want_theta=True)
    both, nll = torch.full((n, 2 * g), float("nan")), torch.empty(n)
    given = native.native_core(
        a,
        p,
        x,
        log_lib,
        theta,
        log_theta,
        zinb=True,
        want_theta=True,
        out=(nll, both[:, :g], both[:, g:]),
    )
    assert given[0] is nll
    for f, o in zip(fresh, (nll, both[:, :g], both[:, g:], given[3]), strict=True):
        torch.testing.assert_close(o, f, rtol=0, atol=0)
    with pytest.raises(ValueError, match="output buffers"):
        native.native_core(
            a,
            p,
            x,
            log_lib,
            theta,
            log_theta,
            zinb=True,
            want_theta=False,
            out=(nll, both[:, :g], both[:-1, g:]),
        )


@needs_c
def test_c_core_declines_what_it_cannot_read(monkeypatch: pytest.MonkeyPatch) -> None:
    a, p, x, log_lib, theta, log_theta = _inputs()
    assert native.supports(a, p, x, log_lib, theta, log_theta)
    assert not native.supports(a.double(), p, x, log_lib, theta, log_theta)
    assert not native.supports(a.t().contiguous().t(), p, x, log_lib, theta, log_theta)
    assert not native.supports(a, p, x.t().contiguous().t(), log_lib, theta, log_theta)
    assert not native.supports(a, p, x, log_lib, theta[:-1], log_theta[:-1])
    assert not native.supports(a, p, x, log_lib, None, None)  # ZINB logits without θ
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert not native.available()
    assert not native.supports(a, p, x, log_lib, theta, log_theta)


@needs_c
@pytest.mark.parametrize("likelihood", ["zinb", "nb"])
def test_loss_gradients_agree_with_and_without_the_c_core(
    monkeypatch: pytest.MonkeyPatch, likelihood: str
) -> None:
    from hubarches.config import ModelConfig
    from hubarches.model import build_model

    config = ModelConfig(
        n_genes=50, covariate_sizes=(3,), likelihood=likelihood, dispersion="gene-batch"
    )
    model = build_model(config, seed=0).eval()  # no dropout: both runs see one network
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(16, 50, generator=gen) * 4, generator=gen)
    x[:, 0] += 1
    codes = torch.randint(0, 3, (16, 1), generator=gen)
    noise = torch.randn(16, config.n_latent, generator=gen)
    results = []
    for flag in ("1", "0"):
        monkeypatch.setenv(native.NATIVE_ENV, flag)
        model.zero_grad(set_to_none=True)
        model.loss(x, codes, noise=noise).total(0.5).backward()
        results.append({n: q.grad.clone() for n, q in model.named_parameters()})
    with_c, without = results
    for name, grad in without.items():
        torch.testing.assert_close(with_c[name], grad, rtol=1e-4, atol=1e-5, msg=name)
