"""Backed (streamed) queries give what in-memory ones give, block by block."""

from __future__ import annotations

import os
import stat

import anndata as ad
import numpy as np
import pytest

from hubarches import TrainOptions, batching, train_atlas
from hubarches.batching import CountMatrix, StreamedCounts, embed_matrix
from hubarches.datasets import simulate_reference_and_query
from hubarches.io import write_mapped


@pytest.fixture(scope="module")
def setup(tmp_path_factory: pytest.TempPathFactory):
    ref, query = simulate_reference_and_query(
        n_reference=500, n_query=300, n_genes=80, missing_fraction=0.05, shuffle_genes=True
    )
    reference = train_atlas(
        ref, batch_key="batch", label_key="cell_type", options=TrainOptions(epochs=3)
    ).reference
    path = tmp_path_factory.mktemp("q") / "query.h5ad"
    query.write_h5ad(path)
    return reference, query, path


def test_backed_query_maps_exactly_like_an_in_memory_one(setup) -> None:
    reference, query, path = setup
    in_memory = reference.map(query, batch_key="batch", epochs=2)
    backed = reference.map(ad.read_h5ad(path, backed="r"), batch_key="batch", epochs=2)
    np.testing.assert_array_equal(in_memory.latent, backed.latent)
    assert backed.adata.X is None  # stays on disk until written
    np.testing.assert_array_equal(
        in_memory.adata.obs["hubarches_label"], backed.adata.obs["hubarches_label"]
    )


def test_a_backed_gene_batch_query_maps_exactly_like_an_in_memory_one(setup) -> None:
    """θ per gene and batch trains in the query: the same, streamed or in memory."""
    _, query, path = setup
    ref, _ = simulate_reference_and_query(
        n_reference=500, n_query=300, n_genes=80, missing_fraction=0.05, shuffle_genes=True
    )
    reference = train_atlas(
        ref, batch_key="batch", label_key="cell_type", config={"dispersion": "gene-batch"},
        options=TrainOptions(epochs=2),
    ).reference  # fmt: skip
    in_memory = reference.map(query, batch_key="batch", epochs=2)
    backed = reference.map(ad.read_h5ad(path, backed="r"), batch_key="batch", epochs=2)
    np.testing.assert_array_equal(in_memory.latent, backed.latent)
    assert np.isfinite(backed.history.final_loss)


def test_many_blocks_stream_every_cell_once(setup, monkeypatch: pytest.MonkeyPatch) -> None:
    reference, _, path = setup
    monkeypatch.setattr(batching, "BLOCK_CELLS", 64)
    result = reference.map(ad.read_h5ad(path, backed="r"), batch_key="batch", epochs=2)
    assert result.latent.shape == (300, reference.manifest.model.n_latent)
    assert np.isfinite(result.history.final_loss)
    assert result.history.n_train_cells == 300


def test_streamed_blocks_and_batches_cover_the_matrix() -> None:
    rng = np.random.default_rng(0)
    dense = rng.poisson(1.0, (250, 12)).astype(np.float32)
    memory = CountMatrix.from_matrix(dense)
    reads: list[tuple[int, int]] = []

    def read(start: int, stop: int):
        reads.append((start, stop))
        return memory.csr[start:stop]

    streamed = StreamedCounts(read=read, n_cells=250, n_genes=12, block_cells=100)
    np.testing.assert_array_equal(streamed.library(), memory.library())
    starts = [s for s, _ in streamed.blocks(30)]
    assert starts == [0, 30, 60, 90, 100, 130, 160, 190, 200, 230]
    rows = np.arange(0, 250, 2)
    seen = []
    for batch_rows, batch in streamed.batches(rows, 16, np.random.default_rng(1)):
        np.testing.assert_array_equal(batch.x.numpy(), dense[batch_rows])
        seen.extend(batch_rows.tolist())
    assert sorted(seen) == rows.tolist()
    assert all(stop - start <= 100 for start, stop in reads)


def test_in_memory_batches_cover_the_rows_and_refuse_rows_outside() -> None:
    """Rows are checked once for the whole pass; each batch holds its rows' counts."""
    dense = np.random.default_rng(2).poisson(1.0, (40, 6)).astype(np.float32)
    memory = CountMatrix.from_matrix(dense)
    rows = np.arange(3, 40, 3, dtype=np.int32)
    seen = []
    for batch_rows, batch in memory.batches(rows, 5, np.random.default_rng(0)):
        assert batch_rows.dtype == np.int64
        np.testing.assert_array_equal(batch.x.numpy(), dense[batch_rows])
        seen.extend(batch_rows.tolist())
    assert sorted(seen) == rows.tolist()
    for bad in (-1, 40):
        with pytest.raises(IndexError, match="outside"):
            next(memory.batches(np.array([0, bad, 2]), 2, np.random.default_rng(0)))
        with pytest.raises(IndexError, match="outside"):
            memory.minibatch(np.array([bad]))


def test_streamed_embedding_equals_in_memory(setup) -> None:
    reference, _, _ = setup
    rng = np.random.default_rng(2)
    dense = rng.poisson(2.0, (130, len(reference.genes))).astype(np.float32)
    codes = np.zeros((130, 1), dtype=np.int64)
    memory = CountMatrix.from_matrix(dense)
    streamed = StreamedCounts(
        read=lambda a, b: memory.csr[a:b], n_cells=130, n_genes=dense.shape[1], block_cells=50
    )
    # Blocks cut the batches differently, and matrix products round by batch shape.
    np.testing.assert_allclose(
        embed_matrix(reference.model, memory, codes, batch_size=40),
        embed_matrix(reference.model, streamed, codes, batch_size=40),
        rtol=1e-5,
        atol=1e-6,
    )


def test_write_mapped_copies_a_backed_matrix_and_is_atomic(setup, tmp_path, monkeypatch) -> None:
    reference, query, path = setup
    result = reference.map(ad.read_h5ad(path, backed="r"), batch_key="batch", epochs=1)
    old = os.umask(0o022)
    try:
        out = write_mapped(result.adata, tmp_path / "mapped.h5ad", source=path)
    finally:
        os.umask(old)
    assert stat.S_IMODE(out.stat().st_mode) == 0o644  # the umask's mode, not mkstemp's 0600
    written = ad.read_h5ad(out)
    assert (written.X != query.X).nnz == 0
    assert written.obsm["X_hubarches"].shape == (300, reference.manifest.model.n_latent)
    assert list(written.obs_names) == list(query.obs_names)

    def broken(*_args, **_kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(ad.AnnData, "write_h5ad", broken)
    with pytest.raises(OSError, match="disk full"):
        write_mapped(result.adata, tmp_path / "other.h5ad", source=path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["mapped.h5ad"]
