"""The hand-written reference step against the straightforward computation."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from stepcheck import FROZEN, needs_c, plain_backward

from hubarches import fastnet, gemm
from hubarches import train as train_module
from hubarches.batching import CountMatrix, Minibatch
from hubarches.config import ModelConfig, TrainOptions
from hubarches.fastnet import AdamSettings
from hubarches.fastref import ReferenceStep, reference_step
from hubarches.model import CVAE, build_model
from hubarches.train import _log_library, data_log_factorial, train_reference

pytestmark = needs_c

N_CELLS, N_GENES = 24, 40


def _data(cfg: ModelConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Counts (one beyond the log-gamma table, one cell all but empty) and codes."""
    gen = torch.Generator().manual_seed(3)
    x = torch.poisson(torch.rand(N_CELLS, N_GENES, generator=gen) * 4.0, generator=gen)
    x[:, 0] += 1.0
    x[0, 1] = 70.0
    x[1, 1:] = 0.0
    codes = torch.stack(
        [torch.randint(0, k, (N_CELLS,), generator=gen) for k in cfg.covariate_sizes], dim=1
    )
    return x, codes


def _made(
    model: CVAE, x: torch.Tensor, codes: torch.Tensor, adam: AdamSettings
) -> ReferenceStep | None:
    counts = CountMatrix.from_matrix(x.numpy())
    return reference_step(
        model,
        codes,
        log_library=_log_library(counts.library()),
        factorial=data_log_factorial(counts),
        adam=adam,
    )


def _step(model: CVAE, x: torch.Tensor, codes: torch.Tensor, adam: AdamSettings) -> ReferenceStep:
    step = _made(model, x, codes, adam)
    assert step is not None
    return step


CONFIGS = [
    {},
    {"likelihood": "nb"},
    {"likelihood": "poisson", "n_layers": 2},
    {"dispersion": "gene-batch", "covariate_sizes": (3, 2)},
    {"dispersion": "gene-batch", "likelihood": "nb"},
    {"n_layers": 2, "covariate_sizes": (3, 2)},
    {"n_layers": 3, "covariate_injection": "first", "encoder_norm": "none"},
    {"encode_covariates": False, "n_layers": 2, "decoder_norm": "none"},
]


@pytest.mark.parametrize("products", ["auto", "torch"])
@pytest.mark.parametrize("dense", [False, True])
@pytest.mark.parametrize("dropout", [0.0, 0.2])
@pytest.mark.parametrize("options", CONFIGS)
def test_reference_step_equals_plain_loss_and_gradients(
    options: dict, dropout: float, dense: bool, products: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Loss and the gradient of every tensor equal autograd's on the plain loss (float64).

    The counts come as CSR rows (read in C) or, ``dense``, as a dense minibatch; the heads'
    products run on hubarches' kernels where they do (``auto``) or on torch, head by head.
    """
    monkeypatch.setenv(gemm.GEMM_ENV, products)
    base = {"n_genes": N_GENES, "covariate_sizes": (3,), "n_hidden": 16, "n_latent": 4}
    cfg = ModelConfig(**{**base, "encoder_norm": "layer", "decoder_norm": "layer",
                         "dropout": dropout, **options})  # fmt: skip
    model = build_model(cfg, seed=1)
    x, codes = _data(cfg)
    step = _step(model, x, codes, FROZEN)
    assert step.kernels == (products == "auto" and gemm.kernels_available())
    rows = np.arange(N_CELLS)[::-1].copy()  # not in order: rows index the per-cell constants
    counts = CountMatrix.from_matrix(x.numpy())
    batch = Minibatch.from_csr(counts.csr[rows]) if dense else counts.minibatch(rows)
    assert (batch.stored is None) == dense
    torch.manual_seed(11)
    stats = step(rows, batch, torch.Generator().manual_seed(5), 0.3)
    noise = model.draw_noise(N_CELLS, generator=torch.Generator().manual_seed(5), like=x)
    enc = step.buffers(N_CELLS).enc
    masks = [enc.mask[k] if b.dropout > 0 else None for k, b in enumerate(step.encoder)]
    assert (masks[0] is not None) == (dropout > 0)
    expected, ref = plain_backward(model, x[rows], codes[rows], noise, masks, 0.3)
    grads = {name: p.grad for name, p in ref.named_parameters()}
    np.testing.assert_allclose(stats, expected, rtol=2e-5, atol=1e-3)
    named = dict(model.named_parameters())
    assert set(named) == set(grads)
    for name, p in named.items():
        assert p.grad is not None, name
        scale = float(grads[name].abs().max()) + 1e-12
        torch.testing.assert_close(
            p.grad.double() / scale, grads[name] / scale, rtol=0, atol=2e-5, msg=name
        )


@pytest.mark.parametrize(
    "options", [{}, {"likelihood": "poisson"}, {"dispersion": "gene-batch"}], ids=str
)
def test_reference_training_takes_the_autograd_path(options: dict) -> None:
    """Same seeds, same noise (dropout off): training ends where autograd's training does."""
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(3,), n_hidden=16, n_latent=4,
                      dropout=0.0, encoder_norm="layer", decoder_norm="layer",
                      **options)  # fmt: skip
    x, codes = _data(cfg)
    counts = CountMatrix.from_matrix(x.numpy())
    options = TrainOptions(epochs=4, batch_size=8, seed=2, validation_fraction=0.2)
    results = []
    for use_step in (True, False):
        model = build_model(cfg, seed=0)
        original = train_module.reference_step
        used: list[bool] = []

        def spy(
            *args: object,
            _on: bool = use_step,
            _used: list[bool] = used,
            _original: object = original,
            **kwargs: object,
        ) -> ReferenceStep | None:
            step = _original(*args, **kwargs) if _on else None  # type: ignore[operator]
            _used.append(step is not None)
            return step

        train_module.reference_step = spy  # type: ignore[assignment]
        try:
            history = train_reference(model, counts, codes.numpy(), options=options)
        finally:
            train_module.reference_step = original
        assert used == [use_step]
        results.append((history, [p.detach().clone() for p in model.parameters()]))
    (fast, w_fast), (plain, w_plain) = results
    losses = [[e.loss for e in h.epochs] for h in (fast, plain)]
    np.testing.assert_allclose(losses[0], losses[1], rtol=1e-4)
    validation = [h.epochs[-1].validation_loss for h in (fast, plain)]
    assert validation[0] is not None
    assert validation[0] == pytest.approx(validation[1], rel=1e-4)
    for a, b in zip(w_fast, w_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-5)
    start = [p.detach() for p in build_model(cfg, seed=0).parameters()]
    assert all(not torch.equal(a, b) for a, b in zip(w_fast, start, strict=True))  # it trained


def test_reference_training_by_hand_moves_every_tensor() -> None:
    """A few steps with a real learning rate change every tensor, the covariate columns too."""
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(3, 2), n_hidden=16, n_latent=4,
                      encoder_norm="layer", decoder_norm="layer")  # fmt: skip
    model = build_model(cfg, seed=0)
    before = {k: v.detach().clone() for k, v in model.named_parameters()}
    x, codes = _data(cfg)
    step = _step(model, x, codes, AdamSettings(lr=1e-2, eps=0.01, weight_decay=1e-6))
    batch = CountMatrix.from_matrix(x.numpy()).minibatch(np.arange(N_CELLS))
    torch.manual_seed(0)
    for _ in range(3):
        loss, reconstruction, kl = step(np.arange(N_CELLS), batch, torch.Generator(), 1.0)
        assert np.isfinite([loss, reconstruction, kl]).all()
    for name, p in model.named_parameters():
        assert not torch.equal(p.detach(), before[name]), name


@pytest.mark.parametrize(
    "options",
    [
        {"encoder_norm": "batch"},
        {"decoder_norm": "batch"},
    ],
)
def test_reference_step_is_not_used_where_it_cannot_run(options: dict) -> None:
    """Batch statistics: autograd runs those steps."""
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(3,), n_hidden=16, n_latent=4, **options)
    model = build_model(cfg)
    x, codes = _data(cfg)
    assert _made(model, x, codes, FROZEN) is None


def test_reference_step_is_not_used_for_float64() -> None:
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(3,), n_hidden=16, n_latent=4)
    model = build_model(cfg).double()
    x, codes = _data(cfg)
    assert _made(model, x, codes, FROZEN) is None


def test_a_row_outside_the_data_is_refused_before_any_pass_reads_it() -> None:
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(3,), n_hidden=16, n_latent=4)
    model = build_model(cfg)
    x, codes = _data(cfg)
    step = _step(model, x, codes, FROZEN)
    batch = CountMatrix.from_matrix(x.numpy()).minibatch(np.arange(N_CELLS))
    rows = np.arange(N_CELLS)
    rows[3] = N_CELLS + 5
    with pytest.raises(IndexError):
        step(rows, batch, torch.Generator(), 1.0)


def test_a_code_outside_the_columns_is_refused() -> None:
    cfg = ModelConfig(n_genes=N_GENES, covariate_sizes=(3,), n_hidden=16, n_latent=4)
    model = build_model(cfg)
    x, codes = _data(cfg)
    codes[4, 0] = 3
    step = _step(model, x, codes, FROZEN)
    batch = CountMatrix.from_matrix(x.numpy()).minibatch(np.arange(N_CELLS))
    with pytest.raises(ValueError, match="outside"):
        step(np.arange(N_CELLS), batch, torch.Generator(), 1.0)


@pytest.mark.parametrize("threads", [1, 2])
def test_adam_split_between_threads_is_torch_adams(threads: int) -> None:
    """Tensors large enough to be split between threads update as torch.optim.Adam's."""
    gen = torch.Generator().manual_seed(0)
    params = [torch.randn(70_001, generator=gen), torch.randn(300, 7, generator=gen)]
    ref = [p.clone().requires_grad_(True) for p in params]
    for p in params:
        p.grad = torch.zeros_like(p)
    state = fastnet.AdamState(params, AdamSettings(lr=0.01, eps=0.01, weight_decay=0.1))
    torch_adam = torch.optim.Adam(ref, lr=0.01, eps=0.01, weight_decay=0.1)
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        _adam_steps(params, ref, state, torch_adam, gen)
    finally:
        torch.set_num_threads(previous)


def _adam_steps(
    params: list[torch.Tensor],
    ref: list[torch.Tensor],
    state: fastnet.AdamState,
    torch_adam: torch.optim.Adam,
    gen: torch.Generator,
) -> None:
    with torch.no_grad():
        for step in range(1, 6):
            for p, r in zip(params, ref, strict=True):
                assert p.grad is not None
                p.grad.copy_(torch.randn(p.shape, generator=gen) * step)
                r.grad = p.grad.clone()
            state.step()
            torch_adam.step()
            for p, r in zip(params, ref, strict=True):
                torch.testing.assert_close(p, r.detach(), rtol=1e-5, atol=1e-6)
