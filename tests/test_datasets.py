"""The simulator: deterministic in its seed, raw counts, batch effects, query options."""

from __future__ import annotations

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from hubarches.datasets import simulate, simulate_reference_and_query


def _assert_identical(a: ad.AnnData, b: ad.AnnData) -> None:
    for part in ("data", "indices", "indptr"):
        left, right = getattr(a.X, part), getattr(b.X, part)
        assert left.dtype == right.dtype, part
        assert left.tobytes() == right.tobytes(), part
    assert a.X.shape == b.X.shape
    pd.testing.assert_frame_equal(a.obs, b.obs)
    pd.testing.assert_frame_equal(a.var, b.var)


def test_same_seed_gives_identical_data() -> None:
    _assert_identical(
        simulate(300, n_genes=40, n_types=3, seed=2), simulate(300, n_genes=40, n_types=3, seed=2)
    )
    pairs = [
        simulate_reference_and_query(
            n_reference=200, n_query=100, n_genes=40, seed=2, missing_fraction=0.1
        )
        for _ in range(2)
    ]
    for first, second in zip(*pairs, strict=True):
        _assert_identical(first, second)


def test_different_seeds_give_different_data() -> None:
    a = simulate(300, n_genes=40, n_types=3, seed=2)
    b = simulate(300, n_genes=40, n_types=3, seed=3)
    assert list(a.var_names) != list(b.var_names)
    assert a.X.nnz != b.X.nnz or not np.array_equal(a.X.data, b.X.data)
    ref_a, _ = simulate_reference_and_query(n_reference=200, n_query=100, n_genes=40, seed=2)
    ref_b, _ = simulate_reference_and_query(n_reference=200, n_query=100, n_genes=40, seed=3)
    assert (ref_a.X != ref_b.X).nnz > 0


def test_obs_has_the_requested_batches_and_cell_types() -> None:
    adata = simulate(600, n_genes=60, n_types=4, n_batches=3, seed=1)
    assert adata.n_obs == 600
    assert adata.obs_names.is_unique
    assert adata.var_names.is_unique
    for key, expected in (
        ("batch", ["batch_0", "batch_1", "batch_2"]),
        ("cell_type", ["type_00", "type_01", "type_02", "type_03"]),
    ):
        column = adata.obs[key]
        assert isinstance(column.dtype, pd.CategoricalDtype), key
        assert list(column.cat.categories) == expected
        assert sorted(column.unique()) == expected  # every category has cells


def test_counts_are_csr_non_negative_integers_in_float32() -> None:
    ref, query = simulate_reference_and_query(n_reference=200, n_query=100, n_genes=50, seed=4)
    for adata in (simulate(200, n_genes=50, seed=4), ref, query):
        x = adata.X
        assert isinstance(x, sp.csr_matrix)
        assert x.dtype == np.float32
        assert x.nnz > 0
        assert (x.data >= 0).all()
        np.testing.assert_array_equal(x.data, np.round(x.data))
        assert x.data.max() > 1  # counts, not a binarised or normalised matrix


def _batch_log_ratio_sd(batch_sd: float) -> float:
    """Spread over genes of log(batch_0 mean / batch_1 mean) within the commonest cell type."""
    adata = simulate(1500, n_genes=80, n_types=3, n_batches=2, seed=1, batch_sd=batch_sd)
    x = adata.X.toarray()
    x /= x.sum(axis=1, keepdims=True)  # library size is a separate, per-cell effect
    obs = adata.obs
    in_type = (obs["cell_type"] == obs["cell_type"].value_counts().idxmax()).to_numpy()
    means = [
        x[in_type & (obs["batch"] == b).to_numpy()].mean(axis=0) for b in ("batch_0", "batch_1")
    ]
    expressed = (means[0] > 1e-3) & (means[1] > 1e-3)
    return float(np.std(np.log(means[0][expressed]) - np.log(means[1][expressed])))


def test_batch_effects_are_gene_wise_and_grow_with_batch_sd() -> None:
    """Without batch effects only sampling noise separates two batches of one cell type."""
    spreads = {sd: _batch_log_ratio_sd(sd) for sd in (0.0, 0.4, 1.0)}
    # Measured about 0.05, 0.58 and 1.40: log fold changes of sd σ per batch, √2·σ apart.
    assert spreads[0.4] > 4 * spreads[0.0]
    assert spreads[1.0] > 1.5 * spreads[0.4]
    assert spreads[0.4] == pytest.approx(np.sqrt(2) * 0.4, rel=0.3)


def test_library_sizes_vary() -> None:
    """Library sizes are drawn per cell, not only left to counting noise."""
    adata = simulate(500, n_genes=500, n_types=2, n_batches=1, seed=5)
    library = np.asarray(adata.X.sum(axis=1)).ravel()
    assert library.min() > 0
    obs = adata.obs
    in_type = (obs["cell_type"] == obs["cell_type"].value_counts().idxmax()).to_numpy()
    # Within one batch and type: measured 0.20 (the log-normal's sd); counting noise alone
    # gives about 0.07.
    assert np.log(library[in_type]).std() > 0.15


def test_held_out_types_are_only_in_the_query() -> None:
    ref, query = simulate_reference_and_query(
        n_reference=300, n_query=300, n_genes=40, n_types=4, seed=6, held_out_types=["type_01"]
    )
    assert "type_01" not in set(ref.obs["cell_type"])
    assert "type_01" not in list(ref.obs["cell_type"].cat.categories)
    assert (query.obs["cell_type"] == "type_01").sum() > 0
    assert set(ref.obs["cell_type"]) == {"type_00", "type_02", "type_03"}


def test_query_batches_are_new() -> None:
    ref, query = simulate_reference_and_query(
        n_reference=200, n_query=150, n_genes=40, reference_batches=3, query_batches=2, seed=7
    )
    assert (ref.n_obs, query.n_obs) == (200, 150)
    assert list(ref.obs["batch"].cat.categories) == ["ref_b0", "ref_b1", "ref_b2"]
    assert list(query.obs["batch"].cat.categories) == ["qry_b0", "qry_b1"]
    assert not set(ref.obs_names) & set(query.obs_names)


def test_missing_extra_and_shuffled_genes() -> None:
    kwargs = {"n_reference": 100, "n_query": 80, "n_genes": 50, "seed": 8}
    ref, full = simulate_reference_and_query(**kwargs)
    assert list(full.var_names) == list(ref.var_names)

    _, missing = simulate_reference_and_query(**kwargs, missing_fraction=0.2)
    assert missing.n_vars == 40
    kept = list(missing.var_names)
    assert set(kept) < set(ref.var_names)
    assert kept == [g for g in ref.var_names if g in set(kept)]  # reference order
    # The same cells, lacking the dropped genes' columns.
    np.testing.assert_array_equal(missing.X.toarray(), full[:, kept].X.toarray())

    ref_x, extra = simulate_reference_and_query(**kwargs, missing_fraction=0.2, extra_fraction=0.1)
    assert ref_x.n_vars == 50
    assert extra.n_vars == 40 + 5
    added = [g for g in extra.var_names if g not in set(ref_x.var_names)]
    assert len(added) == 5
    assert list(extra.var_names[-5:]) == added  # unshuffled: extras after the shared genes
    assert extra.X[:, -5:].nnz > 0

    ref_s, shuffled = simulate_reference_and_query(
        **kwargs, missing_fraction=0.2, extra_fraction=0.1, shuffle_genes=True
    )
    _assert_identical(ref_s, ref_x)
    assert set(shuffled.var_names) == set(extra.var_names)
    assert list(shuffled.var_names) != list(extra.var_names)
    # The same counts, columns permuted.
    np.testing.assert_array_equal(shuffled[:, list(extra.var_names)].X.toarray(), extra.X.toarray())
