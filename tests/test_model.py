"""The conditional VAE on tensors: likelihoods, shapes, errors, determinism, strict loading."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats
from torch import nn

from hubarches import native
from hubarches.batching import CountMatrix, embed_matrix
from hubarches.config import ModelConfig
from hubarches.errors import ModelError, WeightsError
from hubarches.likelihoods import log_nb, log_poisson, log_zinb
from hubarches.model import CVAE, build_model
from hubarches.train import TrainOptions, train_reference

X = torch.tensor([0.0, 1.0, 3.0, 12.0, 0.0, 250.0], dtype=torch.float64)
MU = torch.tensor([0.5, 2.0, 3.0, 10.0, 7.0, 200.0], dtype=torch.float64)
THETA = torch.tensor([0.3, 1.0, 5.0, 2.0, 10.0, 50.0], dtype=torch.float64)


def test_log_nb_matches_scipy() -> None:
    expected = stats.nbinom.logpmf(X.numpy(), THETA.numpy(), (THETA / (THETA + MU)).numpy())
    np.testing.assert_allclose(log_nb(X, MU, THETA).numpy(), expected, rtol=1e-7, atol=1e-7)


def test_log_zinb_mixes_dropout_and_nb() -> None:
    pi_logits = torch.tensor([-1.0, 0.5, 2.0, -3.0, 0.0, 1.0], dtype=torch.float64)
    pi = torch.sigmoid(pi_logits).numpy()
    nb = stats.nbinom.pmf(X.numpy(), THETA.numpy(), (THETA / (THETA + MU)).numpy())
    expected = np.log(np.where(X.numpy() == 0, pi + (1 - pi) * nb, (1 - pi) * nb))
    np.testing.assert_allclose(
        log_zinb(X, MU, THETA, pi_logits).numpy(), expected, rtol=1e-5, atol=1e-5
    )


def test_log_poisson_matches_scipy() -> None:
    expected = stats.poisson.logpmf(X.numpy(), MU.numpy())
    np.testing.assert_allclose(log_poisson(X, MU).numpy(), expected, rtol=1e-7, atol=1e-7)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
@pytest.mark.parametrize("dispersion", ["gene", "gene-batch"])
@pytest.mark.parametrize("norm", ["layer", "batch", "none"])
def test_loss_is_finite_and_differentiable(likelihood: str, dispersion: str, norm: str) -> None:
    cfg = ModelConfig(
        n_genes=30,
        covariate_sizes=(3, 2),
        n_hidden=16,
        n_latent=4,
        n_layers=2,
        likelihood=likelihood,  # type: ignore[arg-type]
        dispersion=dispersion,  # type: ignore[arg-type]
        encoder_norm=norm,  # type: ignore[arg-type]
        decoder_norm=norm,  # type: ignore[arg-type]
    )
    model = build_model(cfg, seed=1)
    x = torch.poisson(torch.full((8, 30), 3.0))
    x[:, 0] += 1  # no empty cells
    codes = torch.stack([torch.arange(8) % 3, torch.arange(8) % 2], dim=1)
    terms = model.loss(x, codes)
    assert terms.reconstruction.shape == (8,)
    assert terms.kl.shape == (8,)
    loss = terms.total(1.0)
    assert torch.isfinite(loss)
    loss.backward()
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    assert grads
    assert all(torch.isfinite(g).all() for g in grads)


def test_default_config_follows_the_scarches_recommendations() -> None:
    """Covariates into the encoder, layer norm and no batch norm, scvi-tools' sizes, ZINB."""
    cfg = ModelConfig(n_genes=10, covariate_sizes=(2,))
    assert cfg.encode_covariates is True
    assert cfg.encoder_norm == "layer"
    assert cfg.decoder_norm == "layer"
    assert (cfg.n_latent, cfg.n_hidden, cfg.n_layers) == (10, 128, 1)
    assert cfg.likelihood == "zinb"
    assert cfg.covariate_injection == "all"
    model = CVAE(cfg)
    norms = [type(m) for m in model.modules() if isinstance(m, (nn.LayerNorm, nn.BatchNorm1d))]
    assert norms == [nn.LayerNorm, nn.LayerNorm]  # one hidden layer each in encoder, decoder


def test_covariates_reach_the_encoder_by_default() -> None:
    """With scvi-tools' defaults the encoder never sees the batch; ours must."""
    model = build_model(ModelConfig(n_genes=10, covariate_sizes=(2,)), seed=0)
    x = torch.ones(1, 10)
    a = model.embed(x, torch.tensor([[0]]))
    b = model.embed(x, torch.tensor([[1]]))
    assert not torch.equal(a, b)


def test_encode_covariates_false_ignores_batch() -> None:
    cfg = ModelConfig(n_genes=10, covariate_sizes=(2,), encode_covariates=False)
    model = build_model(cfg, seed=0)
    x = torch.ones(1, 10)
    assert torch.equal(model.embed(x, torch.tensor([[0]])), model.embed(x, torch.tensor([[1]])))


@pytest.mark.parametrize(
    ("injection", "expected"), [("first", [True, False]), ("all", [True, True])]
)
def test_injection_depth(injection: str, expected: list[bool]) -> None:
    cfg = ModelConfig(
        n_genes=10,
        covariate_sizes=(2,),
        n_layers=2,
        covariate_injection=injection,  # type: ignore[arg-type]
    )
    model = CVAE(cfg)
    for mlp in (model.encoder.mlp, model.decoder.mlp):
        assert [len(b.linear.covariates) > 0 for b in mlp.blocks] == expected


def test_single_category_covariate_has_its_column() -> None:
    model = CVAE(ModelConfig(n_genes=10, covariate_sizes=(1,)))
    weight = model.state_dict()["encoder.mlp.blocks.0.linear.covariates.0.weight"]
    assert weight.shape == (128, 1)


def test_same_seed_same_weights_and_training() -> None:
    rng = np.random.default_rng(0)
    counts = CountMatrix.from_matrix(rng.poisson(2.0, (64, 20)).astype(np.float32) + 1)
    codes = (np.arange(64) % 2)[:, None]
    cfg = ModelConfig(n_genes=20, covariate_sizes=(2,), n_hidden=8, n_latent=3)
    states = []
    for _ in range(2):
        model = build_model(cfg, seed=3)
        train_reference(model, counts, codes, options=TrainOptions(epochs=3, batch_size=16))
        states.append(model.state_dict())
    assert states[0].keys() == states[1].keys()
    for key in states[0]:
        assert torch.equal(states[0][key], states[1][key]), key
    other = build_model(cfg, seed=4).state_dict()
    assert not torch.equal(
        other["decoder.scale.weight"], build_model(cfg, seed=3).state_dict()["decoder.scale.weight"]
    )


def test_wrong_shapes_are_model_errors() -> None:
    model = CVAE(ModelConfig(n_genes=10, covariate_sizes=(2,)))
    with pytest.raises(ModelError, match=r"\[n_cells, 10\]"):
        model.embed(torch.ones(3, 9), torch.zeros(3, 1, dtype=torch.long))
    with pytest.raises(ModelError, match="covariate codes"):
        model.embed(torch.ones(3, 10), torch.zeros(3, 2, dtype=torch.long))
    with pytest.raises(ModelError, match="out of range"):
        model.embed(torch.ones(3, 10), torch.full((3, 1), 2, dtype=torch.long))
    with pytest.raises(ModelError, match="integers"):
        model.embed(torch.ones(3, 10), torch.zeros(3, 1))


def test_invalid_config_lists_every_problem() -> None:
    with pytest.raises(ModelError) as info:
        ModelConfig(n_genes=0, covariate_sizes=(0,), n_layers=5, likelihood="gauss")  # type: ignore[arg-type]
    message = str(info.value)
    for fragment in ("n_genes", "category", "n_layers", "likelihood"):
        assert fragment in message


def test_strict_loading_names_missing_and_unexpected() -> None:
    model = CVAE(ModelConfig(n_genes=10, covariate_sizes=(2,)))
    state = dict(model.state_dict())
    state.pop("decoder.scale.bias")
    state["surprise"] = torch.zeros(1)
    with pytest.raises(WeightsError) as info:
        model.load_weights(state)
    assert info.value.missing == ["decoder.scale.bias"]
    assert info.value.unexpected == ["surprise"]


def test_strict_loading_reports_wrong_shapes() -> None:
    model = CVAE(ModelConfig(n_genes=10, covariate_sizes=(2,)))
    other = CVAE(ModelConfig(n_genes=10, covariate_sizes=(3,)))
    with pytest.raises(WeightsError, match="wrong shapes"):
        model.load_weights(other.state_dict())


def test_embed_is_batch_size_independent_and_samples_differ() -> None:
    rng = np.random.default_rng(0)
    counts = CountMatrix.from_matrix(rng.poisson(2.0, (50, 20)).astype(np.float32))
    codes = (np.arange(50) % 2)[:, None]
    model = build_model(ModelConfig(n_genes=20, covariate_sizes=(2,), n_hidden=8), seed=0)
    whole = embed_matrix(model, counts, codes, batch_size=4096)
    pieces = embed_matrix(model, counts, codes, batch_size=7)
    np.testing.assert_allclose(whole, pieces, rtol=1e-5, atol=1e-6)
    sampled = embed_matrix(model, counts, codes, sample=True, seed=1)
    assert sampled.shape == whole.shape
    assert not np.allclose(sampled, whole)
    np.testing.assert_array_equal(sampled, embed_matrix(model, counts, codes, sample=True, seed=1))


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
@pytest.mark.parametrize("dispersion", ["gene", "gene-batch"])
def test_fused_loss_equals_plain_loss_and_gradients(likelihood: str, dispersion: str) -> None:
    """The hand-derived likelihood gradients match autograd through the plain formulas."""
    cfg = ModelConfig(
        n_genes=50,
        covariate_sizes=(3, 2),
        n_hidden=16,
        n_latent=4,
        likelihood=likelihood,  # type: ignore[arg-type]
        dispersion=dispersion,  # type: ignore[arg-type]
        dropout=0.0,
    )
    model = build_model(cfg, seed=1).double()
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(20, 50, generator=gen, dtype=torch.float64) * 4, generator=gen)
    x[:, 0] += 1
    codes = torch.stack([torch.arange(20) % 3, torch.arange(20) % 2], dim=1)
    results = []
    for fn in (model.loss, model.plain_loss):
        model.zero_grad()
        terms = fn(x, codes, generator=torch.Generator().manual_seed(5))
        terms.total(0.7).backward()
        grads = {n: p.grad.clone() for n, p in model.named_parameters()}
        results.append((terms, grads))
    (fused, g_fused), (plain, g_plain) = results
    torch.testing.assert_close(fused.reconstruction, plain.reconstruction, rtol=1e-8, atol=1e-5)
    torch.testing.assert_close(fused.kl, plain.kl)
    for name, grad in g_plain.items():
        torch.testing.assert_close(g_fused[name], grad, rtol=1e-6, atol=1e-8, msg=name)


@pytest.mark.parametrize(("n_layers", "injection"), [(1, "all"), (2, "first"), (3, "all")])
def test_query_step_with_cached_terms_equals_plain_loss(n_layers: int, injection: str) -> None:
    """Query training's shortcuts (cached first layer, per-cell log-gamma) change nothing."""
    from hubarches.surgery import grow
    from hubarches.train import first_layer_expression, frozen_log_gamma

    cfg = ModelConfig(
        n_genes=30,
        covariate_sizes=(2,),
        n_hidden=16,
        n_latent=4,
        dropout=0.0,
        n_layers=n_layers,
        covariate_injection=injection,  # type: ignore[arg-type]
    )
    ref = build_model(cfg, seed=0).double()
    ref.trained.fill_(True)
    ext = grow(ref, (2,)).double()
    ext.eval()
    gen = torch.Generator().manual_seed(1)
    x = torch.poisson(torch.rand(16, 30, generator=gen, dtype=torch.float64) * 3, generator=gen)
    x[:, 0] += 1
    codes = (torch.arange(16) % 4).unsqueeze(1)
    counts = CountMatrix.from_matrix(x.numpy())
    first = first_layer_expression(ext, counts).double()
    log_gamma = frozen_log_gamma(ext, counts, codes)
    assert log_gamma is not None
    results = []
    for use_cache in (True, False):
        ext.zero_grad()
        kwargs = {"first_expression": first, "log_gamma": log_gamma.double()} if use_cache else {}
        fn = ext.loss if use_cache else ext.plain_loss
        terms = fn(x, codes, generator=torch.Generator().manual_seed(3), **kwargs)
        terms.total(1.0).backward()
        results.append((terms, [p.grad.clone() for p in ext.parameters() if p.requires_grad]))
    (fast, g_fast), (plain, g_plain) = results
    torch.testing.assert_close(fast.reconstruction, plain.reconstruction, rtol=1e-6, atol=1e-4)
    assert len(g_fast) == len(g_plain) > 0
    for a, b in zip(g_fast, g_plain, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def _model_and_batch() -> tuple[CVAE, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A small model in eval mode, 12 cells' counts, their codes and latent noise."""
    config = ModelConfig(n_genes=30, covariate_sizes=(2,))
    model = build_model(config, seed=0).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(12, 30, generator=gen) * 3, generator=gen) + 1
    codes = torch.randint(0, 2, (12, 1), generator=gen)
    return model, x, codes, torch.randn(12, config.n_latent, generator=gen)


def test_loss_with_a_given_log_library_equals_the_computed_one() -> None:
    model, x, codes, noise = _model_and_batch()
    computed = model.loss(x, codes, noise=noise)
    given = model.loss(x, codes, noise=noise, log_library=torch.log(x.sum(-1)))
    assert torch.equal(computed.reconstruction, given.reconstruction)
    other = model.loss(x, codes, noise=noise, log_library=torch.log(x.sum(-1)) + 1.0)
    assert not torch.equal(computed.reconstruction, other.reconstruction)


def test_loss_with_a_given_log1p_equals_the_computed_one() -> None:
    """Reference training hands the encoder the minibatch's log1p, taken on nonzeros."""
    model, x, codes, noise = _model_and_batch()
    computed = model.loss(x, codes, noise=noise)
    given = model.loss(x, codes, noise=noise, x_log=torch.log1p(x))
    assert torch.equal(computed.kl, given.kl)
    assert torch.equal(computed.reconstruction, given.reconstruction)
    other = model.loss(x, codes, noise=noise, x_log=torch.log1p(x) * 2.0)
    assert not torch.equal(computed.kl, other.kl)


@pytest.mark.parametrize("likelihood", ["nb", "zinb", "poisson"])
def test_loss_on_csr_rows_equals_plain_loss(likelihood: str) -> None:
    """Reference training reads the log-gamma terms straight from the CSR rows (in C)."""
    from hubarches.fastlik import CsrRows

    cfg = ModelConfig(
        n_genes=40,
        covariate_sizes=(3,),
        n_hidden=16,
        n_latent=4,
        likelihood=likelihood,  # type: ignore[arg-type]
        dropout=0.0,
    )
    model = build_model(cfg, seed=2)
    gen = torch.Generator().manual_seed(0)
    x = torch.poisson(torch.rand(30, 40, generator=gen) ** 3 * 60, generator=gen)
    x[:, 0] += 1
    counts = CountMatrix.from_matrix(x.numpy())
    rows = np.array([4, 0, 29, 11, 4, 17, 8, 3])
    batch = counts.minibatch(rows)
    stored = batch.stored_counts()
    if native.available():
        assert isinstance(stored, CsrRows)
    codes = torch.from_numpy(rows % 3).unsqueeze(1)
    results = []
    for fn, kwargs in ((model.loss, {"nonzero": stored}), (model.plain_loss, {})):
        model.zero_grad()
        terms = fn(batch.x, codes, generator=torch.Generator().manual_seed(5), **kwargs)
        terms.total(0.7).backward()
        results.append((terms, {n: p.grad.clone() for n, p in model.named_parameters()}))
    (fast, g_fast), (plain, g_plain) = results
    torch.testing.assert_close(fast.reconstruction, plain.reconstruction, rtol=1e-5, atol=1e-2)
    for name, grad in g_plain.items():
        torch.testing.assert_close(g_fast[name], grad, rtol=1e-3, atol=1e-4, msg=name)
