from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

from hubarches.batching import embed_matrix
from hubarches.config import ModelConfig
from hubarches.data import prepare_query
from hubarches.errors import GeneAlignmentError, HubarchesWarning
from hubarches.genes import (
    MIN_SHARED_FRACTION,
    WARN_SHARED_FRACTION,
    align_genes,
    gene_id_type,
    query_gene_names,
)
from hubarches.manifest import Manifest
from hubarches.model import build_model
from hubarches.reference import Reference

REFERENCE = [f"GENE{i}" for i in range(20)]


def counts(n_cells: int, n_genes: int, *, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    x = rng.poisson(1.0, (n_cells, n_genes)).astype(np.float32)
    x[rng.random(x.shape) < 0.5] = 0
    return x


def align_quietly(query, reference, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", HubarchesWarning)
        return align_genes(query, reference, **kwargs)


def test_thresholds_are_ordered():
    assert 0 < MIN_SHARED_FRACTION < WARN_SHARED_FRACTION < 1


def test_identical_genes_align_to_identity():
    x = counts(6, 20)
    alignment = align_genes(REFERENCE, REFERENCE)
    assert alignment.report.rule == "exact"
    assert alignment.report.fraction_shared == 1.0
    assert alignment.report.n_missing == alignment.report.n_extra == 0
    np.testing.assert_array_equal(alignment.source_index, np.arange(20))
    out = alignment.transform(x)
    assert isinstance(out, sp.csr_matrix)
    assert out.dtype == np.float32
    np.testing.assert_array_equal(out.toarray(), x)


def test_permutation_invariance():
    x = counts(8, 20)
    order = np.random.default_rng(1).permutation(20)
    shuffled_genes = [REFERENCE[i] for i in order]
    ordered = align_genes(REFERENCE, REFERENCE).transform(sp.csr_matrix(x))
    shuffled = align_genes(shuffled_genes, REFERENCE).transform(sp.csr_matrix(x[:, order]))
    np.testing.assert_array_equal(shuffled.toarray(), ordered.toarray())
    assert shuffled.has_sorted_indices
    np.testing.assert_array_equal(shuffled.indices, ordered.indices)


def _query_adata(x, genes):
    obs = pd.DataFrame(
        {"batch": pd.Categorical(["b0", "b1"] * (len(x) // 2))},
        index=[f"cell{i}" for i in range(len(x))],
    )
    return ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=pd.DataFrame(index=genes))


def test_permutation_invariance_of_the_prepared_query_and_its_embedding():
    x = counts(12, 20, seed=3) * 3
    order = np.random.default_rng(4).permutation(20)
    ordered = _query_adata(x, REFERENCE)
    shuffled = _query_adata(x[:, order], [REFERENCE[i] for i in order])
    covariates = [("batch", ("b0", "b1"))]
    prepared = [
        prepare_query(a, genes=REFERENCE, covariates=covariates, batch_key="batch")
        for a in (ordered, shuffled)
    ]
    for part in ("indptr", "indices", "data"):
        np.testing.assert_array_equal(getattr(prepared[1].X, part), getattr(prepared[0].X, part))
    np.testing.assert_array_equal(prepared[1].covariates.codes, prepared[0].covariates.codes)
    config = ModelConfig(n_genes=20, covariate_sizes=(2,), n_hidden=16, n_latent=4)
    manifest = Manifest.from_model_config(config, genes=REFERENCE, covariates=dict(covariates))
    reference = Reference(manifest=manifest, model=build_model(config, seed=0))
    expected = reference.embed(ordered)
    np.testing.assert_array_equal(reference.embed(shuffled), expected)
    np.testing.assert_array_equal(
        embed_matrix(reference.model, prepared[1].counts, prepared[1].covariates.codes), expected
    )
    # The model does read the genes: the same counts under the wrong names embed elsewhere.
    mislabelled = _query_adata(x[:, order], REFERENCE)
    assert not np.allclose(reference.embed(mislabelled), expected)


def test_missing_genes_are_zero_and_extra_genes_dropped():
    query = [*REFERENCE[2:], "EXTRA1", "EXTRA2"]
    x = counts(5, len(query)) + 1  # every value non-zero
    alignment = align_genes(query, REFERENCE)
    report = alignment.report
    assert (report.n_shared, report.n_missing, report.n_extra) == (18, 2, 2)
    assert report.missing_examples == ("GENE0", "GENE1")
    assert report.extra_examples == ("EXTRA1", "EXTRA2")
    assert report.fraction_shared == pytest.approx(0.9)
    assert alignment.source_index[:3].tolist() == [-1, -1, 0]
    out = alignment.transform(x).toarray()
    assert out.shape == (5, 20)
    np.testing.assert_array_equal(out[:, :2], 0)
    np.testing.assert_array_equal(out[:, 2:], x[:, :18])


def test_refuses_below_min_fraction_with_numbers():
    n_keep = int(MIN_SHARED_FRACTION * 20) - 1
    query = REFERENCE[:n_keep] + [f"OTHER{i}" for i in range(10)]
    with pytest.raises(GeneAlignmentError) as info:
        align_genes(query, REFERENCE)
    err = info.value
    assert (err.n_shared, err.n_reference) == (n_keep, 20)
    assert f"only {n_keep} of 20 reference genes" in str(err)
    assert err.hint


def test_warns_between_thresholds_and_points_at_caller():
    n_keep = int(WARN_SHARED_FRACTION * 20) - 1
    with pytest.warns(HubarchesWarning, match=f"only {n_keep} of 20") as record:
        alignment = align_genes(REFERENCE[:n_keep], REFERENCE)
    assert record[0].filename == __file__
    assert alignment.report.n_shared == n_keep


def test_no_warning_at_warn_fraction():
    n_keep = int(WARN_SHARED_FRACTION * 20)
    with warnings.catch_warnings():
        warnings.simplefilter("error", HubarchesWarning)
        align_genes(REFERENCE[:n_keep], REFERENCE)


ENSEMBL = [f"ENSG{i:011d}" for i in range(1, 21)]


@pytest.mark.parametrize("versioned_side", ["query", "reference"])
def test_ensembl_version_suffixes_are_stripped(versioned_side):
    versioned = [f"{g}.{i % 3 + 1}" for i, g in enumerate(ENSEMBL)]
    query, reference = (versioned, ENSEMBL) if versioned_side == "query" else (ENSEMBL, versioned)
    order = np.random.default_rng(2).permutation(20)
    query = [query[i] for i in order]
    x = counts(4, 20)
    alignment = align_genes(query, reference)
    assert alignment.report.rule == "ensembl-version-stripped"
    assert alignment.report.n_shared == 20
    assert any("version suffixes were stripped" in n for n in alignment.report.notes)
    np.testing.assert_array_equal(alignment.transform(x).toarray(), x[:, np.argsort(order)])


def test_stripped_versions_that_collide_are_refused():
    query = ["ENSG00000000001.1", "ENSG00000000001.2", *ENSEMBL[1:]]
    with pytest.raises(GeneAlignmentError, match=r"ENSG00000000001\.1, ENSG00000000001\.2"):
        align_genes(query, ENSEMBL)


def test_ids_against_symbols_suggests_the_var_column():
    symbols = [f"SYM{i}" for i in range(20)]
    var = pd.DataFrame({"gene_ids": ENSEMBL, "feature_types": ["Gene Expression"] * 20})
    var.index = symbols
    with pytest.raises(GeneAlignmentError) as info:
        align_genes(symbols, ENSEMBL, query_var=var)
    message = str(info.value)
    assert "Ensembl ids" in message
    assert "gene symbols" in message
    assert "gene_key='gene_ids'" in info.value.hint
    assert "20 of 20" in info.value.hint
    # Following the hint works.
    alignment = align_genes(list(var["gene_ids"]), ENSEMBL, query_var=var, gene_key="gene_ids")
    assert alignment.report.n_shared == 20


def test_symbols_against_ids_suggests_var_names_back():
    symbols = [f"SYM{i}" for i in range(20)]
    var = pd.DataFrame({"gene_ids": ENSEMBL}, index=symbols)
    with pytest.raises(GeneAlignmentError) as info:
        align_genes(ENSEMBL, symbols, query_var=var, gene_key="gene_ids")
    assert "omit gene_key" in info.value.hint


def test_ids_against_symbols_without_a_better_column_says_what_to_add():
    symbols = [f"SYM{i}" for i in range(20)]
    with pytest.raises(GeneAlignmentError) as info:
        align_genes(symbols, ENSEMBL, query_var=pd.DataFrame(index=symbols))
    assert "Add a var column with Ensembl ids" in info.value.hint


def test_mouse_style_symbols_against_human_are_diagnosed_not_matched():
    human = ["CD4", "CD8A", "PTPRC", "MS4A1", "LYZ", "NKG7", "GNLY", "CST3", "FCGR3A", "PPBP"]
    mouse = [g[0] + g[1:].lower() for g in human]
    with pytest.raises(GeneAlignmentError) as info:
        align_genes(mouse, human)
    assert info.value.n_shared == 0
    assert "10 missing reference genes match a query gene only when case is ignored" in str(
        info.value
    )
    assert "another species" in info.value.hint


def test_few_case_differences_are_noted():
    query = [*REFERENCE[:-1], REFERENCE[-1].lower()]
    alignment = align_genes(query, REFERENCE)
    assert alignment.report.n_missing == 1
    assert any("case is ignored" in n for n in alignment.report.notes)


def test_duplicate_reference_genes_in_query_are_refused_by_name():
    query = [*REFERENCE, "GENE3", "GENE7", "GENE7"]
    with pytest.raises(GeneAlignmentError, match=r"GENE3 \(2×\), GENE7 \(3×\)"):
        align_genes(query, REFERENCE)


def test_duplicates_outside_the_reference_are_dropped_with_a_note():
    query = [*REFERENCE, "OTHER", "OTHER"]
    alignment = align_genes(query, REFERENCE)
    assert alignment.report.n_extra == 2
    assert any("repeated names" in n for n in alignment.report.notes)


def test_invalid_reference_gene_list_is_refused():
    with pytest.raises(GeneAlignmentError, match="GENE1"):
        align_genes(REFERENCE, [*REFERENCE, "GENE1"])
    with pytest.raises(GeneAlignmentError, match="no genes"):
        align_genes(REFERENCE, [])


def test_unnamed_query_genes_match_nothing():
    query = [*REFERENCE, None, float("nan")]
    alignment = align_genes(query, REFERENCE)
    assert alignment.report.n_shared == 20
    assert alignment.report.extra_examples == ("<no name>", "<no name>")


@pytest.mark.parametrize(
    "convert",
    [
        np.asarray,
        sp.csr_matrix,
        sp.csc_matrix,
        sp.coo_matrix,
        sp.csr_array,
        sp.csc_array,
        lambda x: sp.csr_matrix(x.astype(np.int64)),
        lambda x: x.astype(np.int32),
    ],
)
def test_dense_and_sparse_inputs_give_identical_results(convert):
    query = [*REFERENCE[3:], "EXTRA1", "EXTRA2"][::-1]
    x = counts(7, len(query), seed=5)
    alignment = align_genes(query, REFERENCE)
    expected = align_genes(query, REFERENCE).transform(x)
    source = convert(x)
    before = source.copy()
    out = alignment.transform(source)
    assert isinstance(out, sp.csr_matrix)
    assert out.dtype == np.float32
    assert out.has_canonical_format
    np.testing.assert_array_equal(out.indptr, expected.indptr)
    np.testing.assert_array_equal(out.indices, expected.indices)
    np.testing.assert_array_equal(out.data, expected.data)
    after = source.toarray() if sp.issparse(source) else np.asarray(source)
    np.testing.assert_array_equal(after, before.toarray() if sp.issparse(before) else before)


def test_transform_drops_explicit_zeros_and_sums_duplicates():
    matrix = sp.csr_matrix(
        (np.array([0.0, 2.0, 3.0]), np.array([0, 1, 1]), np.array([0, 3])), shape=(1, 20)
    )
    out = align_genes(REFERENCE, REFERENCE).transform(matrix)
    assert out.nnz == 1
    assert out[0, 1] == 5.0


def test_transform_refuses_a_matrix_of_other_genes():
    alignment = align_genes(REFERENCE, REFERENCE)
    with pytest.raises(GeneAlignmentError, match="21 gene columns"):
        alignment.transform(np.zeros((2, 21)))


def test_report_is_json_able():
    alignment = align_quietly([*REFERENCE[:15], "X"], REFERENCE)
    data = json.loads(json.dumps(alignment.report.to_dict()))
    assert data["n_shared"] == 15
    assert data["missing_examples"] == REFERENCE[15:]
    assert data["rule"] == "exact"


def test_gene_id_type():
    assert gene_id_type(ENSEMBL) == "ensembl"
    assert gene_id_type([f"ENSMUSG{i:011d}.2" for i in range(3)]) == "ensembl"
    assert gene_id_type(REFERENCE) == "symbol"
    assert gene_id_type([]) == "symbol"


class _FakeAnnData:
    def __init__(self, var: pd.DataFrame) -> None:
        self.var = var
        self.var_names = var.index


def test_query_gene_names_from_var_names_or_a_column():
    var = pd.DataFrame({"symbol": ["A", np.nan, "C"]}, index=["g1", "g2", "g3"])
    adata = _FakeAnnData(var)
    assert list(query_gene_names(adata)) == ["g1", "g2", "g3"]
    assert list(query_gene_names(adata, gene_key="symbol")) == ["A", "", "C"]
    with pytest.raises(GeneAlignmentError, match="no column 'ids'") as info:
        query_gene_names(adata, gene_key="ids")
    assert "symbol" in info.value.hint


@pytest.mark.parametrize("convert", [np.asarray, sp.csr_matrix, sp.csc_matrix])
def test_transform_never_shares_memory_with_its_input(convert):
    source = convert(counts(4, 20))
    out = align_genes(REFERENCE, REFERENCE).transform(source)
    arrays = [source.data, source.indices, source.indptr] if sp.issparse(source) else [source]
    for mine in (out.data, out.indices, out.indptr):
        assert not any(np.shares_memory(mine, theirs) for theirs in arrays)
