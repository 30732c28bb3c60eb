"""Training loops: loss goes down, early stopping, and mapping quality on simulated data."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp
import torch
from scipy.spatial import cKDTree

from hubarches import train as train_module
from hubarches.batching import CountMatrix, embed_matrix
from hubarches.config import ModelConfig
from hubarches.datasets import SimulatedWorld
from hubarches.errors import ModelError, TrainingError
from hubarches.model import build_model
from hubarches.surgery import grow, new_parameters, plan_surgery
from hubarches.train import TrainOptions, default_epochs, train_query, train_reference

# The mapping scenario: moderate batch effects among the reference's batches, strong ones
# (gene-wise log fold changes with three times the sd) in the query's, so that before query
# training the query sits apart from the reference and query training has to bring it in.
REFERENCE_BATCHES = ("ref_b0", "ref_b1", "ref_b2", "ref_b3")
QUERY_BATCHES = ("qry_b0", "qry_b1")
REFERENCE_BATCH_SD, QUERY_BATCH_SD = 0.3, 1.0
QUERY_EPOCHS = 100


def _strong_query_world(*, n_genes: int, n_types: int, seed: int) -> SimulatedWorld:
    """A simulated world whose query batches carry much stronger batch effects."""
    world = SimulatedWorld.create(
        n_genes=n_genes,
        n_types=n_types,
        batches=REFERENCE_BATCHES + QUERY_BATCHES,
        seed=seed,
        batch_sd=REFERENCE_BATCH_SD,
    )
    batch_lfc = world.batch_lfc.copy()
    batch_lfc[len(REFERENCE_BATCHES) :] *= QUERY_BATCH_SD / REFERENCE_BATCH_SD
    return replace(world, batch_lfc=batch_lfc)


def _sample(
    world: SimulatedWorld, n_cells: int, batches: tuple[str, ...], *, seed: int, offset: int
) -> tuple[CountMatrix, np.ndarray, np.ndarray]:
    """Counts, batch codes (shifted by ``offset``) and cell types of one sample of a world."""
    mats, frames = zip(*world.sample_chunks(n_cells, batches, seed=seed), strict=True)
    obs = pd.concat(frames, ignore_index=True)
    codes = obs["batch"].cat.codes.to_numpy().astype(np.int64)[:, None] + offset
    return (
        CountMatrix.from_matrix(sp.vstack(mats).tocsr()),
        codes,
        obs["cell_type"].astype(str).to_numpy(),
    )


@pytest.fixture(scope="module")
def mapped() -> dict[str, np.ndarray]:
    """A reference and a query with strong batch effects, mapped end to end on tensors."""
    world = _strong_query_world(n_genes=200, n_types=5, seed=5)
    ref_counts, ref_codes, ref_types = _sample(world, 800, REFERENCE_BATCHES, seed=6, offset=0)
    n_ref = len(REFERENCE_BATCHES)
    q_counts, q_codes, q_types = _sample(world, 400, QUERY_BATCHES, seed=7, offset=n_ref)
    cfg = ModelConfig(n_genes=200, covariate_sizes=(n_ref,), n_hidden=64)
    model = build_model(cfg, seed=0)
    # A reference needs on the order of a hundred epochs to integrate its own batches.
    train_reference(
        model, ref_counts, ref_codes, options=TrainOptions(epochs=100, kl_warmup_epochs=20)
    )
    plan = plan_surgery([("batch", REFERENCE_BATCHES)], {"batch": QUERY_BATCHES})
    ext = grow(model, plan.n_new, seed=0)
    untrained = embed_matrix(ext, q_counts, q_codes)
    history = train_query(
        ext,
        q_counts,
        q_codes,
        options=TrainOptions(epochs=QUERY_EPOCHS, kl_warmup_epochs=20, weight_decay=0, lr=1e-2),
    )
    return {
        "ref_latent": embed_matrix(ext, ref_counts, ref_codes),
        "query_latent": embed_matrix(ext, q_counts, q_codes),
        "untrained_query_latent": untrained,
        "ref_types": ref_types,
        "query_types": q_types,
        "losses": np.array([e.loss for e in history.epochs]),
    }


def _knn_accuracy(data: dict[str, np.ndarray], query_key: str) -> float:
    """Majority vote of each query cell's 15 nearest reference cells against its type."""
    _, idx = cKDTree(data["ref_latent"]).query(data[query_key], k=15)
    votes = data["ref_types"][idx]
    predicted = np.array([max(set(row), key=list(row).count) for row in votes])
    return float((predicted == data["query_types"]).mean())


def _neighbourhoods(data: dict[str, np.ndarray], query_key: str) -> tuple[float, float]:
    """Among each query cell's 15 nearest cells of reference and query together: the share
    of query cells with a reference cell of their own type, and the share of reference
    cells over all those neighbours."""
    ref_latent, query_latent = data["ref_latent"], data[query_key]
    joint = np.vstack([ref_latent, query_latent])
    joint_types = np.concatenate([data["ref_types"], data["query_types"]])
    _, idx = cKDTree(joint).query(query_latent, k=16)
    idx = idx[:, 1:]  # the cell itself
    is_ref = idx < len(ref_latent)
    same_type = joint_types[idx] == data["query_types"][:, None]
    return float((is_ref & same_type).any(axis=1).mean()), float(is_ref.mean())


def test_query_training_lowers_the_query_loss(mapped: dict[str, np.ndarray]) -> None:
    losses = mapped["losses"]
    assert len(losses) == QUERY_EPOCHS
    assert losses[-5:].mean() < losses[:5].mean()


def test_knn_label_transfer_reaches_ninety_percent(mapped: dict[str, np.ndarray]) -> None:
    assert _knn_accuracy(mapped, "query_latent") >= 0.9
    # Query training, not the reference alone, gets it there (measured 0.970 before, 0.998).
    assert _knn_accuracy(mapped, "query_latent") > _knn_accuracy(mapped, "untrained_query_latent")


def test_query_cells_find_reference_cells_of_their_type(mapped: dict[str, np.ndarray]) -> None:
    found, ref_share = _neighbourhoods(mapped, "query_latent")
    found_before, ref_share_before = _neighbourhoods(mapped, "untrained_query_latent")
    assert found >= 0.9
    # Mixed, not merely adjacent: a separated query would have almost no reference neighbours
    # (the share expected from the cell counts alone is about 0.67).
    assert ref_share >= 0.35
    # The untrained extension leaves the query apart (measured 0.80 and 0.29 before query
    # training, 0.93 and 0.46 after); query training is what brings it in.
    assert found >= found_before + 0.05
    assert ref_share >= ref_share_before + 0.05


def test_query_training_moves_the_query_latent(mapped: dict[str, np.ndarray]) -> None:
    """With scvi-tools' defaults the encoder never sees the batch and nothing moves."""
    shift = np.abs(mapped["query_latent"] - mapped["untrained_query_latent"]).max()
    assert shift > 1e-2


def test_reference_training_history_and_early_stopping() -> None:
    rng = np.random.default_rng(0)
    counts = CountMatrix.from_matrix(rng.poisson(3.0, (120, 25)).astype(np.float32) + 1)
    codes = (np.arange(120) % 2)[:, None]
    model = build_model(ModelConfig(n_genes=25, covariate_sizes=(2,), n_hidden=8), seed=0)
    history = train_reference(
        model,
        counts,
        codes,
        options=TrainOptions(epochs=200, lr=0.0, early_stopping_patience=2, batch_size=32),
    )
    assert history.stopped_early
    assert len(history.epochs) < 200
    assert history.n_validation_cells == 12
    assert all(e.validation_loss is not None for e in history.epochs)
    assert bool(model.trained)
    summary = history.to_dict()
    assert summary["epochs"] == len(history.epochs)
    assert summary["stopped_early"] is True


def test_kl_warmup_is_linear() -> None:
    rng = np.random.default_rng(0)
    counts = CountMatrix.from_matrix(rng.poisson(3.0, (40, 10)).astype(np.float32) + 1)
    model = build_model(ModelConfig(n_genes=10, covariate_sizes=(1,), n_hidden=8))
    history = train_reference(
        model,
        counts,
        np.zeros((40, 1), np.int64),
        options=TrainOptions(epochs=5, kl_warmup_epochs=4),
    )
    assert [e.kl_weight for e in history.epochs] == [0.0, 0.25, 0.5, 0.75, 1.0]


def test_query_training_skips_empty_cells() -> None:
    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, (30, 10)).astype(np.float32) + 1
    model = build_model(ModelConfig(n_genes=10, covariate_sizes=(1,), n_hidden=8))
    train_reference(
        model,
        CountMatrix.from_matrix(x),
        np.zeros((30, 1), np.int64),
        options=TrainOptions(epochs=1),
    )
    ext = grow(model, (1,))
    x[:10] = 0
    history = train_query(
        ext, CountMatrix.from_matrix(x), np.ones((30, 1), np.int64), options=TrainOptions(epochs=2)
    )
    assert history.n_train_cells == 20
    assert np.isfinite(history.final_loss)


def test_empty_reference_cells_and_bad_codes_are_refused() -> None:
    x = np.ones((5, 10), np.float32)
    x[2] = 0
    model = build_model(ModelConfig(n_genes=10, covariate_sizes=(2,), n_hidden=8))
    with pytest.raises(ModelError, match="at least one count"):
        train_reference(model, CountMatrix.from_matrix(x), np.zeros((5, 1), np.int64))
    with pytest.raises(ModelError, match="out of range"):
        train_reference(model, CountMatrix.from_matrix(np.ones((5, 10))), np.full((5, 1), 2))
    with pytest.raises(ModelError, match="genes"):
        train_reference(model, CountMatrix.from_matrix(np.ones((5, 9))), np.zeros((5, 1), np.int64))


def test_diverging_training_is_a_training_error() -> None:
    x = np.ones((16, 10), np.float32)
    model = build_model(ModelConfig(n_genes=10, covariate_sizes=(1,), n_hidden=8))
    with torch.no_grad():
        model.decoder.scale.bias.fill_(float("nan"))
    with pytest.raises(TrainingError, match="non-finite"):
        train_reference(
            model,
            CountMatrix.from_matrix(x),
            np.zeros((16, 1), np.int64),
            options=TrainOptions(epochs=2),
        )


def test_default_epochs_follows_scvi_heuristic() -> None:
    assert default_epochs(1_000) == 400
    assert default_epochs(40_000) == 200
    assert default_epochs(10_000_000) == 1


@pytest.mark.parametrize("by_hand", [False, True])
def test_query_training_optimizes_only_the_new_tensors(
    by_hand: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The optimizer is handed exactly the tensors surgery added, and nothing else moves.

    Through autograd (torch's Adam) and through the step by hand (Adam in C), which gene-batch
    dispersion takes too.
    """
    rng = np.random.default_rng(0)
    x = rng.poisson(3.0, (48, 12)).astype(np.float32) + 1
    cfg = ModelConfig(
        n_genes=12, covariate_sizes=(2, 2), n_hidden=8, n_layers=2, dispersion="gene-batch"
    )
    model = build_model(cfg, seed=0)
    codes = np.stack([np.arange(48) % 2, np.arange(48) // 24], axis=1)
    train_reference(model, CountMatrix.from_matrix(x), codes, options=TrainOptions(epochs=1))
    ext = grow(model, (2, 1))
    handed: list[list[torch.nn.Parameter]] = []
    optimizers: list = []
    original = train_module._adam

    def recording_adam(parameters: list[torch.nn.Parameter], options: TrainOptions):
        handed.append(list(parameters))
        optimizers.append(original(parameters, options))
        return optimizers[-1]

    monkeypatch.setattr(train_module, "_adam", recording_adam)
    steps: list = []
    real_step = train_module.query_step

    def recording_step(*a, **k):
        steps.append(real_step(*a, **k) if by_hand else None)
        return steps[-1]

    monkeypatch.setattr(train_module, "query_step", recording_step)
    query_codes = np.stack([2 + np.arange(48) % 2, np.full(48, 2)], axis=1)
    train_query(
        ext, CountMatrix.from_matrix(x), query_codes, options=TrainOptions(epochs=2, batch_size=16)
    )
    expected = new_parameters(ext)
    # Gene-batch dispersion, both covariates of both layers of encoder and decoder.
    assert len(expected) == 1 + 2 * 2 * 2
    assert len(steps) == 1
    if by_hand:
        assert steps[0] is not None
        assert not handed  # no torch optimizer: the step's Adam runs in C
        handed = [steps[0].trainable]
    assert len(handed) == 1
    assert len(handed[0]) == len(expected)
    assert all(got is want for got, want in zip(handed[0], expected, strict=True))
    held = (
        handed[0]
        if by_hand
        else [p for group in optimizers[0].param_groups for p in group["params"]]
    )
    assert len(held) == len(expected)
    assert all(got is want for got, want in zip(held, expected, strict=True))
    new_ids = {id(p) for p in expected}
    others = [(name, p) for name, p in ext.named_parameters() if id(p) not in new_ids]
    assert others
    for name, param in others:
        assert not param.requires_grad, name
        assert param.grad is None, f"{name} received a gradient"
    assert all(p.requires_grad and p.grad is not None for p in expected)


@pytest.mark.parametrize("fused", [True, False])
def test_small_adam_follows_torch_adam_step_for_step(fused: bool):
    """hubarches' optimizer is torch.optim.Adam's update (weight decay included): bitwise
    with the fused kernel, to rounding with the foreach fallback."""
    from hubarches.optim import Adam

    gen = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=gen), torch.randn(7, generator=gen)]
    ours = [torch.nn.Parameter(t.clone()) for t in start]
    theirs = [torch.nn.Parameter(t.clone()) for t in start]
    settings = {"lr": 0.05, "eps": 0.01, "weight_decay": 0.1}
    opt_ours = Adam(ours, **settings)
    opt_ours._fused = fused
    opt_theirs = torch.optim.Adam(theirs, fused=True, **settings)
    for step in range(25):
        for params, opt in ((ours, opt_ours), (theirs, opt_theirs)):
            opt.zero_grad(set_to_none=True)
            loss = (params[0] ** 3).sum()
            if step % 3:  # the second tensor sometimes has no gradient: its count lags
                loss = loss + (params[1].sin() * step).sum()
            loss.backward()
            opt.step()
    for a, b in zip(ours, theirs, strict=True):
        if fused:
            assert torch.equal(a, b)
        else:
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert ours[0].data.ne(start[0]).all()
    assert ours[1].data.ne(start[1]).all()


def test_training_does_not_import_torch_dynamo():
    """Building torch.optim.Adam imports torch._dynamo (~1 s); training must not pay it."""
    import subprocess
    import sys

    code = (
        "import sys, numpy as np, torch\n"
        "from hubarches.batching import CountMatrix\n"
        "from hubarches.config import ModelConfig\n"
        "from hubarches.model import build_model\n"
        "from hubarches.surgery import grow\n"
        "from hubarches.train import train_query\n"
        "from hubarches.config import TrainOptions\n"
        "m = build_model(ModelConfig(n_genes=30, covariate_sizes=(2,), n_hidden=16))\n"
        "m.trained.fill_(True)\n"
        "ext = grow(m, (1,))\n"
        "x = np.random.default_rng(0).poisson(2.0, (40, 30)).astype('float32') + 1\n"
        "train_query(ext, CountMatrix.from_matrix(x), np.full((40, 1), 2),\n"
        "            options=TrainOptions(epochs=1, batch_size=8))\n"
        "from hubarches.train import train_reference\n"
        "train_reference(build_model(ModelConfig(n_genes=30, covariate_sizes=(2,))),\n"
        "                CountMatrix.from_matrix(x), np.zeros((40, 1), dtype=int),\n"
        "                options=TrainOptions(epochs=1, batch_size=8))\n"
        "assert 'torch._dynamo' not in sys.modules, 'torch._dynamo was imported'\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr


def test_data_log_factorial_sums_each_cells_counts_across_blocks():
    from scipy.special import gammaln

    from hubarches.train import data_log_factorial

    rng = np.random.default_rng(3)
    dense = rng.poisson(0.7, (23, 9)).astype(np.float32) * rng.integers(1, 30, (23, 9))
    dense[[0, 5, 6, 22]] = 0.0  # empty cells, at the edges of blocks too
    counts = CountMatrix.from_matrix(sp.csr_matrix(dense))
    expected = gammaln(dense.astype(np.float64) + 1.0).sum(axis=1)
    for block in (1, 4, 7, 100):
        got = data_log_factorial(counts, block=block).numpy()
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-5)
