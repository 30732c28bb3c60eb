"""The one AnnData boundary: validate counts and covariates, align genes, hand out matrices.

Everything between a user's AnnData and the tensors the model sees happens here (gene matching
itself lives in :mod:`hubarches.genes`). Inputs are never modified; sparse data stays sparse
and is read in row chunks, so backed (on-disk) AnnData works the same way as in-memory data.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hubarches import batching
from hubarches.batching import CountMatrix, Counts, StreamedCounts
from hubarches.covariates import (
    CovariateEncoding,
    encode_covariates,
    obs_column,
    require_values,
    string_codes,
)
from hubarches.errors import (
    CountsError,
    CovariateError,
    DataError,
    GeneAlignmentError,
    warn,
)
from hubarches.genes import (
    MIN_SHARED_FRACTION,
    WARN_SHARED_FRACTION,
    AlignmentReport,
    GeneAlignment,
    align_genes,
    gene_id_type,
    query_gene_names,
)

__all__ = [
    "MIN_SHARED_FRACTION",
    "WARN_SHARED_FRACTION",
    "AlignmentReport",
    "CovariateEncoding",
    "GeneAlignment",
    "PreparedQuery",
    "PreparedReference",
    "QueryReport",
    "align_genes",
    "check_counts",
    "encode_covariates",
    "prepare_query",
    "prepare_reference",
    "query_gene_names",
]

logger = logging.getLogger(__name__)

#: Rows of a dense or backed matrix read, checked and aligned at a time: bounds memory while
#: staying large enough that per-chunk overhead does not show.
CHUNK_CELLS = 65_536
#: Non-integer values further than this from an integer are not counts. Float round-off in
#: count pipelines is far smaller; normalized or log values are essentially never this close
#: to integers everywhere.
INTEGER_TOLERANCE = 1e-3
#: Non-integer data whose maximum is at most this looks log-transformed (log1p of
#: CP10k/CPM data stays below ~14) rather than merely library-size normalized.
LOG_NORMALIZED_MAX = 20.0
#: Warn when more than this share of query cells has no counts on the reference genes: a few
#: empty barcodes are normal, many suggest the wrong genes or an unfiltered matrix.
ZERO_COUNT_WARN_FRACTION = 0.05
ZERO_COUNT_POLICY = "kept and embedded; excluded from query training"

# --- counts -----------------------------------------------------------------------------------


def _layers_hint(available_layers: Sequence[str], *, estimated: bool = False) -> str:
    """Say which layer to pass instead, naming the layers the AnnData has."""
    layers = [str(name) for name in available_layers]
    likely = [n for n in layers if "count" in n.lower() or n.lower() in ("raw", "umi")]
    if likely:
        name = likely[0]
        hint = f'Pass the raw-count layer: layer="{name}" (--layer {name})'
        if len(layers) > 1:
            hint += f"; layers in this AnnData: {', '.join(layers)}"
    elif layers:
        hint = (
            f"Pass the layer that holds raw counts (layer=... / --layer ...); layers in this "
            f"AnnData: {', '.join(layers)}"
        )
    else:
        hint = (
            "This AnnData has no layers: load the raw counts (e.g. the count matrix from "
            "Cell Ranger, or adata.raw if it holds counts) into X or a layer such as "
            '"counts" and pass layer="counts" (--layer counts)'
        )
    if estimated:
        hint += (
            ". If these are estimated counts (e.g. from alevin or SoupX), round them first "
            "(np.rint); never round normalized values"
        )
    return hint


def check_counts(matrix: Any, *, source: str = "X", available_layers: Sequence[str] = ()) -> None:
    """Refuse anything but raw counts: non-negative, finite, integer-valued numbers.

    Works on one chunk at a time; of a sparse matrix only the stored values are read.
    ``source`` ("X" or a layer name) and ``available_layers`` only shape the message.
    """
    values = np.asarray(matrix.data if sp.issparse(matrix) else matrix).ravel()
    where = "X" if source == "X" else f"layer {source!r}"
    if values.size == 0 or values.dtype.kind == "b":
        return
    if values.dtype.kind not in "iuf":
        raise CountsError(
            f"{where} holds {values.dtype} values, not numbers",
            hint=_layers_hint(available_layers),
        )
    if values.dtype.kind == "u":
        return
    low, high = values.min(), values.max()
    if values.dtype.kind == "f" and not (np.isfinite(low) and np.isfinite(high)):
        n_bad = int(np.count_nonzero(~np.isfinite(values)))
        raise CountsError(
            f"{where} contains {n_bad} non-finite values (NaN or infinity); raw counts are "
            "finite integers",
            hint=_layers_hint(available_layers),
        )
    if low < 0:
        n_negative = int(np.count_nonzero(values < 0))
        raise CountsError(
            f"{where} contains {n_negative} negative values (minimum {low:.4g}): it looks "
            "scaled or centered (e.g. sc.pp.scale), not raw counts",
            hint=_layers_hint(available_layers),
        )
    if values.dtype.kind != "f":
        return
    rounded = np.rint(values)
    if np.array_equal(values, rounded):
        return
    off = np.abs(values - rounded) > INTEGER_TOLERANCE
    n_fractional = int(np.count_nonzero(off))
    if n_fractional == 0:
        return
    example = float(values[np.argmax(off)])
    if high <= LOG_NORMALIZED_MAX:
        what = "it looks log-normalized (e.g. sc.pp.log1p), not raw counts"
    else:
        what = "it looks normalized (e.g. sc.pp.normalize_total), not raw counts"
    raise CountsError(
        f"{where} contains {n_fractional} non-integer values (e.g. {example:.4g}, maximum "
        f"{high:.4g}): {what}",
        hint=_layers_hint(available_layers, estimated=high > LOG_NORMALIZED_MAX),
    )


def _source_matrix(adata: Any, layer: str | None) -> Any:
    """Return ``X`` or the layer ``layer``, refusing an unknown layer with the ones there are."""
    if layer is None:
        if adata.X is None:
            raise CountsError("the AnnData has no X", hint=_layers_hint(list(adata.layers)))
        return adata.X
    if layer not in adata.layers:
        layers = ", ".join(map(str, adata.layers)) or "none"
        raise CountsError(
            f"the AnnData has no layer {layer!r}",
            hint=f"Layers in this AnnData: {layers}; omit the layer to use X",
        )
    return adata.layers[layer]


def _row_chunks(matrix: Any, n_cells: int) -> Iterator[Any]:
    """Yield row blocks small enough to handle at once; in-memory sparse data in one piece.

    Aligning sparse data in memory needs temporaries the size of the output only, so it is
    not chunked (a row slice would copy the rows); dense and backed data are read in chunks.
    """
    if sp.issparse(matrix):
        yield matrix
        return
    if getattr(matrix, "format", None) == "csc":
        # A backed CSC matrix: row slices would each read all of it.
        yield matrix.to_memory()
        return
    for start in range(0, n_cells, CHUNK_CELLS):
        yield matrix[start : min(n_cells, start + CHUNK_CELLS)]


def _streamed_counts(adata: Any, alignment: GeneAlignment, *, layer: str | None) -> Counts:
    """A backed query as blocks read on demand; every block is aligned and checked once here.

    The checking pass also computes the library sizes, so training never meets bad counts
    half-way; later reads only align (O(nnz)) without checking again.
    """
    matrix = _source_matrix(adata, layer)
    source = "X" if layer is None else layer
    layers = list(adata.layers)

    def read(start: int, stop: int) -> sp.csr_matrix:
        return alignment.transform(matrix[start:stop])

    counts = StreamedCounts(
        read=read,
        n_cells=adata.n_obs,
        n_genes=len(alignment.reference_genes),
        block_cells=batching.BLOCK_CELLS,
    )
    library = np.empty(adata.n_obs, dtype=np.float32)
    for start, block in counts.blocks(counts.block_cells):
        check_counts(block.csr, source=source, available_layers=layers)
        library[start : start + block.n_cells] = block.library()
    counts.set_library(library)
    return counts


def _aligned_counts(adata: Any, alignment: GeneAlignment, *, layer: str | None) -> sp.csr_matrix:
    """Align and check ``X`` (or ``layer``) chunk by chunk; CSR float32, reference order."""
    matrix = _source_matrix(adata, layer)
    source = "X" if layer is None else layer
    layers = list(adata.layers)
    parts = []
    for chunk in _row_chunks(matrix, adata.n_obs):
        aligned = alignment.transform(chunk)
        check_counts(aligned, source=source, available_layers=layers)
        parts.append(aligned)
    if len(parts) == 1:
        return parts[0]
    return sp.csr_matrix(sp.vstack(parts, format="csr"))


# --- query ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class QueryReport:
    """What :func:`prepare_query` did to the query, for users and ``uns["hubarches"]``."""

    n_cells: int
    n_zero_count_cells: int
    zero_count_policy: str
    source: str
    alignment: AlignmentReport
    new_categories: dict[str, tuple[str, ...]]
    gene_key: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (lists for tuples)."""
        return {
            "n_cells": self.n_cells,
            "n_zero_count_cells": self.n_zero_count_cells,
            "zero_count_policy": self.zero_count_policy,
            "source": self.source,
            "gene_key": self.gene_key,
            "alignment": self.alignment.to_dict(),
            "new_categories": {k: list(v) for k, v in self.new_categories.items()},
        }


@dataclass(frozen=True, eq=False)
class PreparedQuery:
    """A query ready for surgery: counts in reference gene order, covariate codes, a mask.

    ``counts`` serves the model either way; ``X`` is the aligned matrix for an in-memory
    query and None for a backed one, which is streamed block by block instead.
    """

    X: sp.csr_matrix | None = field(repr=False)
    covariates: CovariateEncoding
    trainable: np.ndarray = field(repr=False)
    report: QueryReport
    counts: Counts = field(repr=False, default=None)  # type: ignore[assignment]


def _require_cells(adata: Any, what: str) -> None:
    """Refuse an AnnData without cells."""
    if adata.n_obs == 0:
        raise DataError(f"the {what} has no cells", hint="Pass an AnnData with cells in it")


def prepare_query(
    adata: Any,
    *,
    genes: Sequence[str],
    covariates: Sequence[tuple[str, Sequence[str]]],
    batch_key: str,
    layer: str | None = None,
    gene_key: str | None = None,
    covariate_keys: Mapping[str, str] | None = None,
) -> PreparedQuery:
    """Validate a query and turn it into the reference's genes and covariate codes.

    ``batch_key`` is the obs column feeding the reference's first covariate (the batch); the
    other covariates are read from obs columns of the same name unless ``covariate_keys``
    maps them. Cells with no counts on the reference genes are kept (the encoder needs no
    library size) but marked not ``trainable`` (the likelihood needs one). Counts are checked
    on the reference genes, i.e. what the model sees. ``adata`` is only read, never changed.
    """
    _require_cells(adata, "query")
    if not covariates:
        raise CovariateError(
            "the reference lists no covariates",
            key=batch_key,
            hint="The manifest is corrupted; its first covariate is the batch",
        )
    columns = dict(covariate_keys or {})
    first = covariates[0][0]
    if columns.get(first, batch_key) != batch_key:
        raise CovariateError(
            f"covariate_keys maps the batch covariate {first!r} to {columns[first]!r} but "
            f"batch_key is {batch_key!r}",
            key=first,
            hint="Pass the batch column once, as batch_key",
        )
    columns[first] = batch_key
    encoding = encode_covariates(adata.obs, covariates, columns=columns)
    alignment = align_genes(
        query_gene_names(adata, gene_key=gene_key),
        genes,
        query_var=adata.var,
        gene_key=gene_key,
    )
    if getattr(adata, "isbacked", False):
        matrix = None
        counts: Counts = _streamed_counts(adata, alignment, layer=layer)
    else:
        matrix = _aligned_counts(adata, alignment, layer=layer)
        counts = CountMatrix(matrix)
    trainable = counts.library() > 0
    n_zero = int(adata.n_obs - np.count_nonzero(trainable))
    if n_zero > ZERO_COUNT_WARN_FRACTION * adata.n_obs:
        warn(
            f"{n_zero} of {adata.n_obs} query cells have no counts on the reference genes; "
            "they are embedded but not used to train the query model. Check the gene names, "
            "and filter out empty barcodes"
        )
    report = QueryReport(
        n_cells=int(adata.n_obs),
        n_zero_count_cells=n_zero,
        zero_count_policy=ZERO_COUNT_POLICY,
        source="X" if layer is None else layer,
        alignment=alignment.report,
        new_categories=dict(encoding.new_categories),
        gene_key=gene_key,
    )
    logger.info(
        "prepared %d query cells (%d without counts on reference genes)", adata.n_obs, n_zero
    )
    return PreparedQuery(
        X=matrix, covariates=encoding, trainable=trainable, report=report, counts=counts
    )


# --- reference --------------------------------------------------------------------------------


@dataclass(frozen=True, eq=False)
class PreparedReference:
    """An atlas ready for reference training: counts, genes, covariate and label codes."""

    X: sp.csr_matrix = field(repr=False)
    genes: tuple[str, ...]
    covariates: tuple[tuple[str, tuple[str, ...]], ...]
    codes: np.ndarray = field(repr=False)
    label_key: str | None
    label_categories: tuple[str, ...] | None
    label_codes: np.ndarray | None = field(repr=False)
    gene_id_type: str
    n_zero_count_cells_dropped: int


def _labels(
    obs: pd.DataFrame, label_key: str, keep: np.ndarray
) -> tuple[tuple[str, ...], np.ndarray]:
    """Label categories (sorted strings) and codes of the kept cells, -1 where unlabeled."""
    codes, names = string_codes(obs_column(obs, label_key, key=label_key, role="the cell labels"))
    codes = codes[keep]
    present = sorted({names[c] for c in np.unique(codes) if c >= 0})
    lookup = np.array([present.index(n) if n in present else -1 for n in names] + [-1])
    return tuple(present), lookup[codes].astype(np.int64)


def _require_unique_genes(names: pd.Index, *, gene_key: str | None) -> None:
    """Refuse an atlas whose genes are unnamed or named more than once."""
    source = "var_names" if gene_key is None else f"var[{gene_key!r}]"
    n_unnamed = int(np.count_nonzero(names == ""))
    if n_unnamed:
        raise DataError(
            f"{n_unnamed} genes have no name in {source}",
            hint="Name every gene, or pass as gene_key a var column that does",
        )
    if names.has_duplicates:
        counts = names[names.duplicated(keep=False)].value_counts()
        shown = ", ".join(f"{name} ({n}×)" for name, n in counts.head(10).items())
        more = f", … ({len(counts) - 10} more)" if len(counts) > 10 else ""
        raise GeneAlignmentError(
            f"{len(counts)} gene names occur more than once in {source}: {shown}{more}",
            hint="A reference needs unique genes: sum or drop the duplicates, call "
            "adata.var_names_make_unique(), or pass as gene_key a var column of unique ids "
            "such as Ensembl ids",
        )


def prepare_reference(
    adata: Any,
    *,
    batch_key: str,
    extra_covariates: Sequence[str] = (),
    layer: str | None = None,
    label_key: str | None = None,
    gene_key: str | None = None,
) -> PreparedReference:
    """Validate an atlas for reference training and encode it; ``adata`` is not changed.

    Genes keep the atlas' order and must be unique; categories are the sorted strings of each
    covariate; cells without any counts are dropped (the likelihood needs a library size) and
    counted in ``n_zero_count_cells_dropped``. Missing labels get code -1.
    """
    _require_cells(adata, "reference")
    names = query_gene_names(adata, gene_key=gene_key)
    keys = [batch_key, *extra_covariates]
    if len(set(keys)) != len(keys):
        raise CovariateError(
            f"covariates are listed more than once: {', '.join(keys)}",
            key=batch_key,
            hint="Name each obs column once; the batch key is always the first covariate",
        )
    for key in keys:
        codes, _ = string_codes(obs_column(adata.obs, key, key=key, role="a covariate"))
        require_values(codes, column=key, key=key, role="a covariate")
    _require_unique_genes(names, gene_key=gene_key)
    identity = align_genes(names, list(names), gene_key=gene_key)
    matrix = _aligned_counts(adata, identity, layer=layer)
    keep = np.diff(matrix.indptr) > 0
    n_dropped = int(adata.n_obs - np.count_nonzero(keep))
    if n_dropped == adata.n_obs:
        raise CountsError(
            f"none of the {adata.n_obs} reference cells has any counts",
            hint=_layers_hint(list(adata.layers)),
        )
    if n_dropped:
        matrix = sp.csr_matrix(matrix[keep])
        logger.info("dropped %d reference cells without counts", n_dropped)
    obs = adata.obs.iloc[np.flatnonzero(keep)]
    reference = [(k, sorted(set(string_codes(obs[k])[1]))) for k in keys]
    encoding = encode_covariates(obs, reference)
    label_categories, label_codes = (
        _labels(adata.obs, label_key, keep) if label_key is not None else (None, None)
    )
    return PreparedReference(
        X=matrix,
        genes=tuple(names),
        covariates=tuple((k, tuple(c)) for k, c in zip(keys, encoding.categories, strict=True)),
        codes=encoding.codes,
        label_key=label_key,
        label_categories=label_categories,
        label_codes=label_codes,
        gene_id_type=gene_id_type(list(names)),
        n_zero_count_cells_dropped=n_dropped,
    )
