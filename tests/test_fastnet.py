"""The hand-written query step against the straightforward computation."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import scipy.sparse as sp
import torch
from stepcheck import FROZEN, needs_c, plain_backward
from torch import nn

from hubarches import fastnet, native
from hubarches import train as train_module
from hubarches.batching import CountMatrix, Minibatch
from hubarches.config import ModelConfig, TrainOptions
from hubarches.fastnet import QueryStep, query_step
from hubarches.model import CVAE, build_model
from hubarches.surgery import grow, new_parameters
from hubarches.train import _log_library, first_layer_expression, frozen_log_gamma, train_query

pytestmark = needs_c

N_CELLS, N_GENES = 24, 40


def _grown(cfg: ModelConfig, *, seed: int = 0) -> CVAE:
    """A "trained" reference grown by one category per covariate, with BN statistics set."""
    ref = build_model(cfg, seed=seed)
    gen = torch.Generator().manual_seed(seed + 7)
    with torch.no_grad():
        for m in ref.modules():
            if isinstance(m, nn.BatchNorm1d):
                m.running_mean.normal_(0.0, 0.3, generator=gen)
                m.running_var.uniform_(0.5, 2.0, generator=gen)
                m.weight.uniform_(0.5, 1.5, generator=gen)
                m.bias.normal_(0.0, 0.1, generator=gen)
    ref.trained.fill_(True)
    ext = grow(ref, tuple(1 for _ in cfg.covariate_sizes), seed=seed)
    ext.eval()
    return ext


def _data(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts and codes: most cells in the new categories, some in the reference's."""
    gen = torch.Generator().manual_seed(3)
    x = torch.poisson(torch.rand(N_CELLS, N_GENES, generator=gen) * 4.0, generator=gen)
    x[:, 0] += 1.0
    x[0, 1] = 70.0  # a count beyond the log-gamma table
    sizes = [k + 1 for k in cfg.covariate_sizes]
    codes = torch.stack([torch.randint(0, k, (N_CELLS,), generator=gen) for k in sizes], dim=1)
    codes[: N_CELLS // 2, 0] = sizes[0] - 1  # the new batch
    return x, codes


def _plain_gradients(
    ext: CVAE,
    x: torch.Tensor,
    codes: torch.Tensor,
    noise: torch.Tensor,
    masks: list[torch.Tensor | None],
    kl_weight: float,
) -> tuple[list[float], list[torch.Tensor]]:
    """Loss terms and gradients of surgery's tensors through autograd in float64."""
    stats, ref = plain_backward(ext, x, codes, noise, masks, kl_weight)
    return stats, [p.grad for p in new_parameters(ref)]


def _log_gamma(ext: CVAE, counts: CountMatrix, codes: torch.Tensor) -> torch.Tensor | None:
    """What train_query gives the step: the frozen terms, or those without θ where θ trains."""
    frozen = frozen_log_gamma(ext, counts, codes)
    return frozen if frozen is not None else train_module._theta_free_log_gamma(ext, counts)


def _step(ext: CVAE, x: torch.Tensor, codes: torch.Tensor, *, dropout: bool) -> QueryStep:
    counts = CountMatrix.from_matrix(x.numpy())
    step = query_step(
        ext,
        codes,
        first_expression=first_layer_expression(ext, counts),
        log_gamma=_log_gamma(ext, counts, codes),
        log_library=_log_library(counts.library()),
        dropout=dropout,
        adam=FROZEN,
    )
    assert step is not None
    return step


CONFIGS = [
    {},
    {"likelihood": "nb", "encoder_norm": "batch", "decoder_norm": "batch"},
    {"likelihood": "poisson", "encoder_norm": "none", "decoder_norm": "none"},
    {"n_layers": 2, "covariate_injection": "all", "covariate_sizes": (3, 2)},
    {"n_layers": 3, "covariate_injection": "first", "encoder_norm": "batch"},
    {"encode_covariates": False, "n_layers": 2},
    {"dispersion": "gene-batch"},
    {"dispersion": "gene-batch", "likelihood": "nb", "covariate_sizes": (3, 2)},
]


@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("dropout", [False, True])
@pytest.mark.parametrize("options", CONFIGS)
def test_query_step_equals_plain_loss_and_gradients(
    options: dict, dropout: bool, dense: bool
) -> None:
    """Loss and every trainable gradient equal autograd's on the plain loss (float64).

    The counts come as CSR rows (read in C) or, ``dense``, as a dense minibatch.
    """
    base = {"n_genes": N_GENES, "covariate_sizes": (2,), "n_hidden": 16, "n_latent": 4}
    cfg = ModelConfig(**{**base, **options})
    ext = _grown(cfg)
    x, codes = _data(cfg)
    _check_against_plain(ext, x, codes, dropout=dropout, dense=dense)


def _check_against_plain(
    ext: CVAE, x: torch.Tensor, codes: torch.Tensor, *, dropout: bool, dense: bool
) -> QueryStep:
    """One step by hand: its loss terms and gradients against autograd's on the plain loss."""
    step = _step(ext, x, codes, dropout=dropout)
    noise_seed = 5
    rows = np.arange(N_CELLS)[::-1].copy()  # not in order: rows index the cached terms
    torch.manual_seed(11)
    counts = CountMatrix.from_matrix(x.numpy())
    batch = Minibatch.from_csr(counts.csr[rows]) if dense else counts.minibatch(rows)
    assert (batch.stored is None) == dense
    stats = step(rows, batch, torch.Generator().manual_seed(noise_seed), 0.3)
    noise = ext.draw_noise(N_CELLS, generator=torch.Generator().manual_seed(noise_seed), like=x)
    state = step._buffers(N_CELLS)[0]
    masks = [state.mask[k] if b.dropout > 0 else None for k, b in enumerate(step.encoder)]
    assert (masks[0] is not None) == (dropout and ext.config.dropout > 0)
    expected, grads = _plain_gradients(ext, x[rows], codes[rows], noise, masks, 0.3)
    np.testing.assert_allclose(stats, expected, rtol=2e-5, atol=1e-3)
    trainable = new_parameters(ext)
    assert len(trainable) == len(grads) > 0
    for p, g in zip(trainable, grads, strict=True):
        assert p.grad is not None
        scale = float(g.abs().max()) + 1e-12
        torch.testing.assert_close(p.grad.double() / scale, g / scale, rtol=0, atol=2e-5)
    return step


@pytest.mark.parametrize("dense", [False, True])
def test_query_step_with_gene_batch_dispersion_and_no_new_batch(dense: bool) -> None:
    """θ per cell but frozen (the query's batches are the reference's): no θ terms train."""
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(2, 2), n_hidden=16, n_latent=4,
                      dispersion="gene-batch")  # fmt: skip
    ref = build_model(cfg, seed=0)
    ref.trained.fill_(True)
    ext = grow(ref, (0, 1), seed=0)  # a new category of the second covariate only
    ext.eval()
    x, codes = _data(cfg)
    codes[:, 0] %= 2  # reference batches only
    step = _check_against_plain(ext, x, codes, dropout=False, dense=dense)
    assert step.batch_theta is not None
    assert not step.batch_theta.trains


@pytest.mark.parametrize("dispersion", ["gene", "gene-batch"])
def test_query_step_trains_as_the_autograd_step_does(dispersion: str) -> None:
    """Same seeds, same noise (dropout off): training takes the same path either way."""
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(2,), n_hidden=16, n_latent=4,
                      dispersion=dispersion)  # fmt: skip
    ext = _grown(cfg)
    x, codes = _data(cfg)
    counts = CountMatrix.from_matrix(x.numpy())
    options = TrainOptions(epochs=3, batch_size=8, seed=2)
    results = []
    for use_step in (True, False):
        model = copy.deepcopy(ext)
        original = train_module.query_step
        used: list[bool] = []

        def spy(
            *a: object,
            _on: bool = use_step,
            _used: list[bool] = used,
            _original: object = original,
            **k: object,
        ) -> object:
            step = _original(*a, **k) if _on else None  # type: ignore[operator]
            _used.append(step is not None)
            return step

        train_module.query_step = spy  # type: ignore[assignment]
        try:
            history = train_query(model, counts, codes.numpy(), options=options)
        finally:
            train_module.query_step = original
        assert used == [use_step]
        results.append((history, [p.detach().clone() for p in new_parameters(model)]))
    (fast, w_fast), (plain, w_plain) = results
    losses = [[e.loss for e in h.epochs] for h in (fast, plain)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    for a, b in zip(w_fast, w_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    assert not torch.equal(w_fast[0], new_parameters(ext)[0])  # training moved them


def test_dropout_masks_are_drawn_as_dropout_draws_them() -> None:
    """Bernoulli(0.9)/0.9 per unit, new each step, the same for the same torch seed."""
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(2,), n_hidden=64, n_latent=4)
    ext = _grown(cfg)
    x, codes = _data(cfg)
    batch = CountMatrix.from_matrix(x.numpy()).minibatch(np.arange(N_CELLS))

    def masks(seed: int, steps: int) -> list[torch.Tensor]:
        step = _step(ext, x, codes, dropout=True)
        torch.manual_seed(seed)
        out = []
        for _ in range(steps):
            step(np.arange(N_CELLS), batch, torch.Generator().manual_seed(0), 1.0)
            out.append(step._buffers(N_CELLS)[0].mask[0].clone())
        return out

    drawn = masks(3, 20)
    values = torch.stack(drawn)
    assert values.unique().tolist() == pytest.approx([0.0, 1 / 0.9])
    kept = float((values > 0).float().mean())
    assert abs(kept - 0.9) < 0.01  # 30,720 draws: σ = 0.0017
    assert not torch.equal(drawn[0], drawn[1])
    assert all(torch.equal(a, b) for a, b in zip(drawn[:3], masks(3, 3), strict=True))
    assert not torch.equal(drawn[0], masks(4, 1)[0])
    per_unit = (values > 0).float().mean(dim=(0, 1))  # no unit systematically dropped
    assert float(per_unit.min()) > 0.8


@pytest.mark.parametrize("weight_decay", [0.0, 0.1])
def test_the_steps_adam_update_is_torch_adams(weight_decay: float) -> None:
    """The C update against torch.optim.Adam, step for step, on tensors of two sizes."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(16, 2, generator=gen), torch.randn(5, generator=gen)]
    ref = [p.clone().requires_grad_(True) for p in params]
    start = [p.clone() for p in params]
    grads = [torch.zeros_like(p) for p in params]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    table = np.asarray(
        [
            [p.data_ptr(), g.data_ptr(), m.data_ptr(), v.data_ptr(), p.numel()]
            for p, g, (m, v) in zip(params, grads, moments, strict=True)
        ],
        dtype=np.int64,
    )
    torch_adam = torch.optim.Adam(ref, lr=0.01, eps=0.01, weight_decay=weight_decay)
    for step in range(1, 8):
        for g, r in zip(grads, ref, strict=True):
            g.copy_(torch.randn(g.shape, generator=gen) * step)
            r.grad = g.clone()
        fastnet._fastnet.adam(
            table.ctypes.data, len(table), 0.01, 0.9, 0.999, 0.01, weight_decay, step
        )
        torch_adam.step()
        for p, r in zip(params, ref, strict=True):
            torch.testing.assert_close(p, r.detach(), rtol=1e-5, atol=1e-6)
    assert all(not torch.equal(p, s) for p, s in zip(params, start, strict=True))


def _inputs(ext: CVAE, x: torch.Tensor, codes: torch.Tensor) -> dict:
    counts = CountMatrix.from_matrix(x.numpy())
    return {
        "first_expression": first_layer_expression(ext, counts),
        "log_gamma": frozen_log_gamma(ext, counts, codes),
        "log_library": _log_library(counts.library()),
        "dropout": False,
        "adam": FROZEN,
    }


def test_query_step_is_not_used_where_it_cannot_run(monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(2,), n_hidden=16, n_latent=4)
    ext = _grown(cfg)
    x, codes = _data(cfg)
    assert query_step(ext, codes, **_inputs(ext, x, codes)) is not None
    # θ trains (gene-batch dispersion with a new batch) and no θ-free log-gamma terms given
    batchwise = _grown(ModelConfig(**{**cfg.__dict__, "dispersion": "gene-batch"}))
    assert query_step(batchwise, codes, **_inputs(batchwise, x, codes)) is None
    # float64 models
    wide = copy.deepcopy(ext).double()
    assert query_step(wide, codes, **_inputs(ext, x, codes)) is None
    # a reference tensor left trainable
    loose = copy.deepcopy(ext)
    loose.decoder.scale.weight.requires_grad_(True)
    assert query_step(loose, codes, **_inputs(loose, x, codes)) is None
    monkeypatch.setenv(native.NATIVE_ENV, "0")
    assert query_step(ext, codes, **_inputs(ext, x, codes)) is None


def test_a_code_outside_the_columns_is_refused() -> None:
    """The C pass reads weights by code; a bad code is an error, never a wild read."""
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(2,), n_hidden=16, n_latent=4)
    ext = _grown(cfg)
    x, codes = _data(cfg)
    bad = codes.clone()
    bad[3, 0] = 9
    step = _step(ext, x, bad, dropout=False)
    with pytest.raises(ValueError, match="covariate code"):
        step(np.arange(N_CELLS), Minibatch.from_csr(sp.csr_matrix(x.numpy())), None, 1.0)


def test_a_step_reads_each_minibatch_afresh_from_its_reused_buffers() -> None:
    """Steps of one size share buffers: a step on rows B after rows A is a fresh step on B."""
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(2,), n_hidden=16, n_latent=4)
    ext = _grown(cfg)
    x, codes = _data(cfg)
    counts = CountMatrix.from_matrix(x.numpy())
    first, second = np.arange(0, 12), np.arange(12, 24)[::-1].copy()
    used = _step(ext, x, codes, dropout=False)  # lr 0: the model stays as it is
    used(first, counts.minibatch(first), torch.Generator().manual_seed(1), 0.5)
    again = used(second, counts.minibatch(second), torch.Generator().manual_seed(2), 0.5)
    fresh = _step(ext, x, codes, dropout=False)
    want = fresh(second, counts.minibatch(second), torch.Generator().manual_seed(2), 0.5)
    assert again == want
    assert again != used(first, counts.minibatch(first), torch.Generator().manual_seed(2), 0.5)


@pytest.mark.parametrize("bad", [-1, N_CELLS, 2**40])
def test_a_row_outside_the_data_is_refused_before_any_pass_reads_it(bad: int) -> None:
    """Nothing is gathered from a minibatch with a row outside the data: the buffers stay."""
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(2,), n_hidden=16, n_latent=4)
    ext = _grown(cfg)
    x, codes = _data(cfg)
    step = _step(ext, x, codes, dropout=False)
    rows = np.arange(N_CELLS)
    batch = Minibatch.from_csr(sp.csr_matrix(x.numpy()))
    step(rows, batch, None, 1.0)
    inputs = step._inputs[N_CELLS]
    before = [a.copy() for a in (inputs.rows, inputs.codes, inputs.library, inputs.log_gamma)]
    rows[N_CELLS // 2] = bad
    with pytest.raises(IndexError, match="outside"):
        step(rows, batch, None, 1.0)
    after = (inputs.rows, inputs.codes, inputs.library, inputs.log_gamma)
    assert all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))


def test_rows_of_any_integer_layout_give_the_same_step() -> None:
    """int32, strided and int64 rows: one result (the fast path takes contiguous int64)."""
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(2,), n_hidden=16, n_latent=4)
    ext = _grown(cfg)
    x, codes = _data(cfg)
    counts = CountMatrix.from_matrix(x.numpy())
    rows = np.arange(N_CELLS)[::-1].copy()
    layouts = [rows, rows.astype(np.int32), np.repeat(rows, 2)[::2]]
    results = []
    for picked in layouts:
        step = _step(ext, x, codes, dropout=False)  # lr 0: the model stays as it is
        results.append(
            step(picked, counts.minibatch(picked), torch.Generator().manual_seed(4), 0.5)
        )
    assert results[0] == results[1] == results[2]


def test_gather_and_totals_in_c() -> None:
    """_fastnet.gather copies rows of each array and refuses bad rows; totals sums in double."""
    assert fastnet._fastnet is not None
    src = np.arange(12, dtype=np.float64).reshape(6, 2)
    dst = np.zeros((3, 2))
    rows = np.array([5, 0, 2], dtype=np.int64)
    rows_out = np.zeros(3, dtype=np.int64)
    table = np.array([[src.ctypes.data, dst.ctypes.data, 16]], dtype=np.int64)
    args = (rows_out.ctypes.data, table.ctypes.data, 1)
    assert fastnet._fastnet.gather(rows.ctypes.data, 3, 6, *args)
    np.testing.assert_array_equal(dst, src[rows])
    np.testing.assert_array_equal(rows_out, rows)
    bad = np.array([1, 6, 0], dtype=np.int64)
    assert not fastnet._fastnet.gather(bad.ctypes.data, 3, 6, *args)
    np.testing.assert_array_equal(rows_out, rows)  # nothing written
    nll = np.array([1.5, 2.5, 1e8], dtype=np.float32)
    kl = np.array([0.25, 0.25, 0.5], dtype=np.float32)
    lg = np.array([1e-9, 2.0, 3.0])
    got = fastnet._fastnet.totals(nll.ctypes.data, kl.ctypes.data, lg.ctypes.data, 3)
    assert got == pytest.approx((1e8 + 4.0, 1.0, 5.0 + 1e-9), rel=1e-12)
    assert fastnet._fastnet.totals(nll.ctypes.data, kl.ctypes.data, 0, 3)[2] == 0.0
