"""Training loops: loss goes down, early stopping, and mapping quality on simulated data."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.spatial import cKDTree

from hubarches.batching import CountMatrix, embed_matrix
from hubarches.config import ModelConfig
from hubarches.datasets import simulate_reference_and_query
from hubarches.errors import ModelError, TrainingError
from hubarches.model import build_model
from hubarches.surgery import grow, plan_surgery
from hubarches.train import TrainOptions, default_epochs, train_query, train_reference


def _codes(values: np.ndarray, categories: tuple[str, ...]) -> np.ndarray:
    lookup = {c: i for i, c in enumerate(categories)}
    return np.array([lookup[str(v)] for v in values], dtype=np.int64)[:, None]


@pytest.fixture(scope="module")
def mapped() -> dict[str, np.ndarray]:
    """A reference and a query with strong batch effects, mapped end to end on tensors."""
    ref, query = simulate_reference_and_query(
        n_reference=1500, n_query=600, n_genes=300, n_types=5, batch_sd=0.8, seed=3
    )
    ref_cats = tuple(sorted(ref.obs["batch"].astype(str).unique()))
    cfg = ModelConfig(n_genes=300, covariate_sizes=(len(ref_cats),), n_hidden=64)
    model = build_model(cfg, seed=0)
    ref_counts = CountMatrix.from_matrix(ref.X)
    ref_codes = _codes(ref.obs["batch"].to_numpy(), ref_cats)
    # A reference needs on the order of a hundred epochs to integrate its own batches.
    train_reference(
        model, ref_counts, ref_codes, options=TrainOptions(epochs=150, kl_warmup_epochs=20)
    )
    plan = plan_surgery([("batch", ref_cats)], {"batch": sorted(query.obs["batch"].unique())})
    ext = grow(model, plan.n_new, seed=0)
    q_counts = CountMatrix.from_matrix(query.X)
    q_codes = _codes(query.obs["batch"].to_numpy(), plan.categories[0])
    untrained = embed_matrix(ext, q_counts, q_codes)
    history = train_query(
        ext, q_counts, q_codes, options=TrainOptions(epochs=40, kl_warmup_epochs=20, weight_decay=0)
    )
    return {
        "ref_latent": embed_matrix(ext, ref_counts, ref_codes),
        "query_latent": embed_matrix(ext, q_counts, q_codes),
        "untrained_query_latent": untrained,
        "ref_types": ref.obs["cell_type"].astype(str).to_numpy(),
        "query_types": query.obs["cell_type"].astype(str).to_numpy(),
        "losses": np.array([e.loss for e in history.epochs]),
    }


def _knn_accuracy(data: dict[str, np.ndarray], query_key: str) -> float:
    _, idx = cKDTree(data["ref_latent"]).query(data[query_key], k=15)
    votes = data["ref_types"][idx]
    predicted = np.array([max(set(row), key=list(row).count) for row in votes])
    return float((predicted == data["query_types"]).mean())


def test_query_training_lowers_the_query_loss(mapped: dict[str, np.ndarray]) -> None:
    losses = mapped["losses"]
    assert len(losses) == 40
    assert losses[-5:].mean() < losses[:5].mean()


def test_knn_label_transfer_reaches_ninety_percent(mapped: dict[str, np.ndarray]) -> None:
    assert _knn_accuracy(mapped, "query_latent") >= 0.9


def test_query_cells_find_reference_cells_of_their_type(mapped: dict[str, np.ndarray]) -> None:
    ref_latent, query_latent = mapped["ref_latent"], mapped["query_latent"]
    joint = np.vstack([ref_latent, query_latent])
    joint_types = np.concatenate([mapped["ref_types"], mapped["query_types"]])
    _, idx = cKDTree(joint).query(query_latent, k=16)
    idx = idx[:, 1:]
    is_ref = idx < len(ref_latent)
    same_type = joint_types[idx] == mapped["query_types"][:, None]
    found = (is_ref & same_type).any(axis=1)
    assert found.mean() >= 0.9
    # Mixed, not merely adjacent: a separated query would have almost no reference neighbours
    # (the share expected from the cell counts alone is about 0.7; measured about 0.5).
    assert is_ref.mean() >= 0.35


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
