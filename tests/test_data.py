from __future__ import annotations

import json
import warnings

import anndata as ad
import numpy as np
import pandas as pd
import pytest
import scipy.sparse as sp

import hubarches.data as data
from hubarches.data import (
    ZERO_COUNT_POLICY,
    check_counts,
    encode_covariates,
    prepare_query,
    prepare_reference,
)
from hubarches.datasets import simulate_reference_and_query
from hubarches.errors import (
    CountsError,
    CovariateError,
    DataError,
    GeneAlignmentError,
    HubarchesWarning,
)


@pytest.fixture(scope="module")
def pair() -> tuple[ad.AnnData, ad.AnnData]:
    return simulate_reference_and_query(
        n_reference=300,
        n_query=120,
        n_genes=60,
        missing_fraction=0.05,
        extra_fraction=0.05,
        shuffle_genes=True,
        seed=3,
    )


@pytest.fixture(scope="module")
def reference(pair):
    return prepare_reference(pair[0], batch_key="batch", label_key="cell_type")


def prepare(query: ad.AnnData, reference, **kwargs):
    return prepare_query(
        query, genes=reference.genes, covariates=reference.covariates, batch_key="batch", **kwargs
    )


def aligned_matrix(prepared) -> sp.csr_matrix:
    """The aligned counts, whether held in memory (X) or streamed from a backed file."""
    if prepared.X is not None:
        return prepared.X
    return sp.csr_matrix(sp.vstack([b.csr for _, b in prepared.counts.blocks(10**9)]))


def assert_same_query(a, b):
    xa, xb = aligned_matrix(a), aligned_matrix(b)
    np.testing.assert_array_equal(xa.indptr, xb.indptr)
    np.testing.assert_array_equal(xa.indices, xb.indices)
    np.testing.assert_array_equal(xa.data, xb.data)
    np.testing.assert_array_equal(a.covariates.codes, b.covariates.codes)
    np.testing.assert_array_equal(a.trainable, b.trainable)
    assert a.report == b.report


# --- counts ---------------------------------------------------------------------------------


def test_check_counts_accepts_integer_counts_in_any_dtype():
    x = np.array([[0, 1, 5], [2, 0, 7]])
    for matrix in (x, x.astype(np.float32), x.astype(np.uint16), sp.csr_matrix(x * 1.0)):
        check_counts(matrix)
    check_counts(x + 1e-5)  # float round-off is not a reason to refuse
    check_counts(np.zeros((0, 3)))


def test_log_normalized_input_is_refused_with_the_layers_to_use():
    x = np.log1p(np.array([[0.0, 1.0, 5.0], [2.0, 0.0, 7.0]]) * 1e4 / 15)
    with pytest.raises(CountsError, match="log-normalized") as info:
        check_counts(sp.csr_matrix(x), available_layers=["counts", "log1p"])
    assert 'layer="counts"' in info.value.hint
    assert "--layer counts" in info.value.hint
    assert "log1p" in info.value.hint


def test_normalized_input_is_refused_and_estimated_counts_explained():
    x = np.array([[0.0, 1.5, 500.25]])
    with pytest.raises(CountsError, match="normalized") as info:
        check_counts(x)
    assert "no layers" in info.value.hint
    assert "estimated counts" in info.value.hint


@pytest.mark.parametrize(
    ("value", "message"),
    [
        (-1.0, "1 negative values"),
        (np.nan, "1 non-finite values"),
        (np.inf, "1 non-finite values"),
        (2.5, "1 non-integer values"),
    ],
)
@pytest.mark.parametrize("convert", [np.asarray, sp.csr_matrix, sp.csc_matrix])
def test_bad_values_are_refused(value, message, convert):
    x = np.array([[0.0, 1.0, 3.0], [4.0, 0.0, 1.0]])
    x[1, 2] = value
    with pytest.raises(CountsError, match=message):
        check_counts(convert(x), source="raw")


def test_negative_integers_are_refused():
    with pytest.raises(CountsError, match="negative"):
        check_counts(np.array([[1, -2]], dtype=np.int32))


def test_only_stored_sparse_values_are_read():
    matrix = sp.csr_matrix((np.array([3.0]), np.array([1]), np.array([0, 1])), shape=(1, 10**6))
    check_counts(matrix)  # a dense view of this would not be cheap


def test_layer_selection(pair, reference):
    query = pair[1].copy()
    query.layers["counts"] = query.X.copy()
    query.X = query.X.log1p()
    with pytest.raises(CountsError, match="X contains") as info:
        prepare(query, reference)
    assert 'layer="counts"' in info.value.hint
    from_layer = prepare(query, reference, layer="counts")
    assert from_layer.report.source == "counts"
    assert_same_query_values(from_layer, prepare(pair[1], reference))
    with pytest.raises(CountsError, match="no layer 'raw'") as info:
        prepare(query, reference, layer="raw")
    assert "counts" in info.value.hint


def assert_same_query_values(a, b):
    np.testing.assert_array_equal(a.X.toarray(), b.X.toarray())
    np.testing.assert_array_equal(a.trainable, b.trainable)


# --- covariates -----------------------------------------------------------------------------


def test_known_categories_are_reused_and_new_ones_appended_sorted():
    obs = pd.DataFrame({"batch": ["b2", "z9", "b1", "a0", "z9"]})
    encoding = encode_covariates(obs, [("batch", ["b1", "b2"])])
    assert encoding.categories == (("b1", "b2", "a0", "z9"),)
    assert encoding.new_categories == {"batch": ("a0", "z9")}
    assert encoding.codes[:, 0].tolist() == [1, 3, 0, 2, 3]
    assert encoding.codes.dtype == np.int64


def test_categories_are_compared_as_strings():
    obs = pd.DataFrame({"batch": pd.Categorical([1, 2, 2]), "donor": [3.0, 4.0, 3.0]})
    encoding = encode_covariates(obs, [("batch", ["1", "2"]), ("donor", ("3", "4"))])
    assert encoding.new_categories == {}
    assert encoding.codes.tolist() == [[0, 0], [1, 1], [1, 0]]


def test_extra_covariates_are_read_from_mapped_columns():
    obs = pd.DataFrame({"sample": ["s1", "s2"], "chem": ["v3", "v2"]})
    encoding = encode_covariates(
        obs,
        [("batch", ["s1"]), ("assay", ["v3"])],
        columns={"batch": "sample", "assay": "chem"},
    )
    assert encoding.keys == ("batch", "assay")
    assert encoding.columns == ("sample", "chem")
    assert encoding.new_categories == {"batch": ("s2",), "assay": ("v2",)}
    assert encoding.codes.tolist() == [[0, 0], [1, 1]]


def test_missing_batch_key_is_refused_naming_the_columns(pair, reference):
    with pytest.raises(CovariateError, match="no column 'sample'") as info:
        prepare_query(
            pair[1], genes=reference.genes, covariates=reference.covariates, batch_key="sample"
        )
    assert info.value.key == "batch"
    assert "cell_type" in info.value.hint


@pytest.mark.parametrize("missing", [np.nan, None, "", "nan"])
def test_missing_batch_values_are_refused_with_their_count(pair, reference, missing):
    query = pair[1].copy()
    values = query.obs["batch"].astype(object).to_numpy()
    values[[0, 5, 7]] = missing
    query.obs["batch"] = values
    with pytest.raises(CovariateError, match="has 3 of 120 cells with a missing value"):
        prepare(query, reference)


def test_conflicting_batch_columns_are_refused(pair, reference):
    with pytest.raises(CovariateError, match="batch_key"):
        prepare(pair[1], reference, covariate_keys={"batch": "cell_type"})


# --- prepare_query --------------------------------------------------------------------------


def test_prepare_query_aligns_and_encodes(pair, reference):
    _, query = pair
    prepared = prepare(query, reference)
    report = prepared.report
    assert prepared.X.shape == (120, 60)
    assert prepared.X.dtype == np.float32
    assert report.alignment.n_shared == 57
    assert report.alignment.n_missing == 3
    assert report.new_categories == {"batch": ("qry_b0", "qry_b1")}
    assert prepared.covariates.categories[0][:3] == ("ref_b0", "ref_b1", "ref_b2")
    # Each reference gene's column holds that gene's counts from the shuffled query.
    gene = reference.genes[10]
    column = list(query.var_names).index(gene)
    np.testing.assert_array_equal(prepared.X[:, 10].toarray(), query.X[:, column].toarray())
    assert json.loads(json.dumps(report.to_dict()))["alignment"]["n_missing"] == 3


def test_dense_csr_csc_and_shuffled_queries_give_identical_results(pair, reference):
    _, query = pair
    expected = prepare(query, reference)
    for convert in (sp.csc_matrix, lambda x: x.toarray(), lambda x: x.astype(np.int32)):
        variant = query.copy()
        variant.X = convert(query.X)
        assert_same_query(prepare(variant, reference), expected)
    order = np.random.default_rng(0).permutation(query.n_vars)
    assert_same_query_values(prepare(query[:, order].copy(), reference), expected)


def test_zero_count_cells_are_kept_but_not_trainable(pair, reference):
    query = pair[1].copy()
    x = query.X.tolil()
    x[[2, 9], :] = 0
    query.X = x.tocsr()
    prepared = prepare(query, reference)
    assert prepared.X.shape[0] == 120
    assert prepared.report.n_zero_count_cells == 2
    assert prepared.report.zero_count_policy == ZERO_COUNT_POLICY
    assert np.flatnonzero(~prepared.trainable).tolist() == [2, 9]
    assert prepared.covariates.codes.shape == (120, 1)


def test_many_zero_count_cells_warn(pair, reference):
    query = pair[1].copy()
    x = query.X.tolil()
    x[:30, :] = 0
    query.X = x.tocsr()
    with pytest.warns(HubarchesWarning, match="30 of 120 query cells") as record:
        prepare(query, reference)
    assert record[0].filename == __file__


def test_caller_anndata_is_not_changed(pair, reference):
    query = pair[1].copy()
    before = query.copy()
    prepared = prepare(query, reference)
    prepared.X.data[:] = -1
    assert (query.X != before.X).nnz == 0
    pd.testing.assert_frame_equal(query.obs, before.obs)
    pd.testing.assert_frame_equal(query.var, before.var)


def test_chunked_processing_gives_the_same_result(pair, reference, monkeypatch):
    expected = prepare(pair[1], reference)
    monkeypatch.setattr(data, "CHUNK_CELLS", 7)
    for convert in (None, sp.csc_matrix, lambda x: x.toarray()):
        query = pair[1].copy()
        if convert is not None:
            query.X = convert(query.X)
        assert_same_query(prepare(query, reference), expected)


@pytest.mark.parametrize("convert", [None, sp.csc_matrix, lambda x: x.toarray()])
def test_backed_anndata(pair, reference, tmp_path, monkeypatch, convert):
    monkeypatch.setattr(data, "CHUNK_CELLS", 50)
    query = pair[1].copy()
    if convert is not None:
        query.X = convert(query.X)
    query.write_h5ad(tmp_path / "query.h5ad")
    backed = ad.read_h5ad(tmp_path / "query.h5ad", backed="r")
    try:
        assert_same_query(prepare(backed, reference), prepare(pair[1], reference))
    finally:
        backed.file.close()


def test_gene_key_and_id_mismatch_hint(pair, reference):
    query = pair[1].copy()
    query.var["symbol"] = query.var_names.copy()
    query.var_names = [f"ENSG{i:011d}" for i in range(query.n_vars)]
    with pytest.raises(GeneAlignmentError) as info:
        prepare(query, reference)
    assert "gene_key='symbol'" in info.value.hint
    prepared = prepare(query, reference, gene_key="symbol")
    assert prepared.report.gene_key == "symbol"
    assert_same_query_values(prepared, prepare(pair[1], reference))


def test_duplicate_query_genes_are_refused_by_name(pair, reference):
    query = pair[1].copy()
    names = list(query.var_names)
    names[1] = names[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # anndata: non-unique var names
        query.var_names = names
    with pytest.raises(GeneAlignmentError, match=rf"{names[0]} \(2×\)"):
        prepare(query, reference)


def test_empty_query_is_refused(pair, reference):
    with pytest.raises(DataError, match="no cells"):
        prepare(pair[1][:0].copy(), reference)


# --- prepare_reference ----------------------------------------------------------------------


def test_prepare_reference(pair, reference):
    atlas = pair[0]
    assert reference.genes == tuple(atlas.var_names)
    assert reference.gene_id_type == "symbol"
    assert reference.covariates == (("batch", ("ref_b0", "ref_b1", "ref_b2")),)
    assert reference.codes[:, 0].tolist() == atlas.obs["batch"].cat.codes.tolist()
    assert reference.label_categories == tuple(sorted(atlas.obs["cell_type"].cat.categories))
    assert reference.n_zero_count_cells_dropped == 0
    assert reference.X.dtype == np.float32
    np.testing.assert_array_equal(reference.X.toarray(), atlas.X.toarray())


def test_reference_drops_zero_cells_and_sorts_categories_as_strings():
    x = np.array([[1, 0], [0, 0], [2, 3], [0, 1], [5, 5]], dtype=np.float32)
    obs = pd.DataFrame(
        {
            "batch": [10, 2, 10, 9, 2],
            "tech": ["b", "a", "b", "b", "b"],
            "label": ["T", "B", None, "NK", "T"],
        },
        index=[f"c{i}" for i in range(5)],
    )
    var = pd.DataFrame({"ids": [f"ENSG{i:011d}.4" for i in range(2)]}, index=["A", "B"])
    atlas = ad.AnnData(X=sp.csr_matrix(x), obs=obs, var=var)
    prepared = prepare_reference(
        atlas, batch_key="batch", extra_covariates=["tech"], label_key="label", gene_key="ids"
    )
    assert prepared.n_zero_count_cells_dropped == 1
    assert prepared.X.shape == (4, 2)
    assert prepared.covariates == (("batch", ("10", "2", "9")), ("tech", ("b",)))
    assert prepared.codes.tolist() == [[0, 0], [0, 0], [2, 0], [1, 0]]
    assert prepared.label_categories == ("NK", "T")
    assert prepared.label_codes.tolist() == [1, -1, 0, 1]
    assert prepared.gene_id_type == "ensembl"
    assert prepared.genes == ("ENSG00000000000.4", "ENSG00000000001.4")


def test_reference_refuses_duplicate_genes_and_missing_covariates():
    obs = pd.DataFrame({"batch": ["a", None]}, index=["c0", "c1"])
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        atlas = ad.AnnData(
            X=np.ones((2, 3), np.float32), obs=obs, var=pd.DataFrame(index=["A", "B", "A"])
        )
    with pytest.raises(CovariateError, match="1 of 2 cells"):
        prepare_reference(atlas, batch_key="batch")
    atlas.obs["batch"] = ["a", "b"]
    with pytest.raises(GeneAlignmentError, match=r"A \(2×\)") as info:
        prepare_reference(atlas, batch_key="batch")
    assert "var_names_make_unique" in info.value.hint
    with pytest.raises(CovariateError, match="no column 'donor'"):
        prepare_reference(atlas, batch_key="batch", extra_covariates=["donor"])


def test_reference_counts_are_checked():
    atlas = ad.AnnData(
        X=np.full((2, 2), 0.5, np.float32), obs=pd.DataFrame({"b": ["x", "y"]}, index=["c0", "c1"])
    )
    with pytest.raises(CountsError, match="non-integer"):
        prepare_reference(atlas, batch_key="b")
    atlas = ad.AnnData(
        X=np.zeros((2, 2), np.float32), obs=pd.DataFrame({"b": ["x", "y"]}, index=["c0", "c1"])
    )
    with pytest.raises(CountsError, match="none of the 2"):
        prepare_reference(atlas, batch_key="b")


def test_every_chunk_is_checked(pair, reference, monkeypatch):
    monkeypatch.setattr(data, "CHUNK_CELLS", 16)
    query = pair[1].copy()
    x = query.X.toarray()
    x[-1] = np.log1p(x[-1])  # only the last cell is log-transformed
    query.X = x
    with pytest.raises(CountsError, match="non-integer values"):
        prepare(query, reference)


def test_extra_reference_covariates_are_mapped_to_query_columns(pair):
    atlas, query = pair[0].copy(), pair[1].copy()
    atlas.obs["assay"] = np.where(np.arange(atlas.n_obs) % 2, "v2", "v3")
    query.obs["chemistry"] = "v3"
    query.obs["sample"] = query.obs["batch"]
    ref = prepare_reference(atlas, batch_key="batch", extra_covariates=["assay"])
    assert ref.covariates[1] == ("assay", ("v2", "v3"))
    prepared = prepare_query(
        query,
        genes=ref.genes,
        covariates=ref.covariates,
        batch_key="sample",
        covariate_keys={"assay": "chemistry"},
    )
    assert prepared.covariates.columns == ("sample", "chemistry")
    assert prepared.report.new_categories == {"batch": ("qry_b0", "qry_b1")}
    assert set(prepared.covariates.codes[:, 1]) == {1}
    with pytest.raises(CovariateError, match="no column 'assay'") as info:
        prepare_query(query, genes=ref.genes, covariates=ref.covariates, batch_key="sample")
    assert info.value.key == "assay"
