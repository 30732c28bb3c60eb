"""Gene alignment: match a query's genes to a reference's ordered gene list, or say why not.

Matching is by exact name, after one automatic and safe normalization: Ensembl version
suffixes (``ENSG00000141510.16`` → ``ENSG00000141510``) are stripped when that matches more
genes. Anything riskier (case, ids against symbols) is diagnosed and explained, never applied:
a wrong match silently feeds the model another gene's counts, which is worse than a refusal.
"""

from __future__ import annotations

import logging
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

import numpy as np
import pandas as pd
import scipy.sparse as sp

from hubarches.errors import GeneAlignmentError, warn

__all__ = [
    "MIN_SHARED_FRACTION",
    "WARN_SHARED_FRACTION",
    "AlignmentReport",
    "GeneAlignment",
    "align_genes",
    "gene_id_type",
    "query_gene_names",
]

logger = logging.getLogger(__name__)

#: Refuse when fewer than half of the reference genes are in the query: the encoder would then
#: read more fabricated zeros than measurements, and such overlaps come from id-type or species
#: mismatches far more often than from real gene panels.
MIN_SHARED_FRACTION = 0.5
#: Warn below 80 %, the ratio below which scvi-tools' ``prepare_query_anndata`` warns
#: (``MIN_VAR_NAME_RATIO``); scArches mappings degrade gradually as missing genes grow.
WARN_SHARED_FRACTION = 0.8
#: How many missing/extra gene names a report and a message show.
MAX_EXAMPLES = 10
#: A gene list counts as Ensembl ids when at least this share of its names look like one.
ENSEMBL_FRACTION = 0.5
#: A var column is suggested when it shares at least this much more of the reference.
SUGGEST_MARGIN = 0.1
#: A symbol list has a case style (CD4 or Cd4) when this share of its names follow it.
STYLE_FRACTION = 0.7

_ENSEMBL_RE = re.compile(r"^ENS[A-Z]*G\d{6,}")
_VERSIONED_RE = re.compile(r"^(ENS[A-Z]*G\d{6,})\.\d+$")
_EXACT = "exact"
_STRIPPED = "ensembl-version-stripped"


@dataclass(frozen=True)
class AlignmentReport:
    """What :func:`align_genes` matched, what it could not, and how."""

    n_reference: int
    n_query_genes: int
    n_shared: int
    n_missing: int
    n_extra: int
    fraction_shared: float
    missing_examples: tuple[str, ...]
    extra_examples: tuple[str, ...]
    rule: str
    notes: tuple[str, ...] = ()
    reference_id_type: str = "symbol"
    query_id_type: str = "symbol"

    def to_dict(self) -> dict[str, Any]:
        """Return a JSON-able dict (lists for tuples), e.g. for ``uns["hubarches"]``."""
        return {
            "n_reference": self.n_reference,
            "n_query_genes": self.n_query_genes,
            "n_shared": self.n_shared,
            "n_missing": self.n_missing,
            "n_extra": self.n_extra,
            "fraction_shared": self.fraction_shared,
            "missing_examples": list(self.missing_examples),
            "extra_examples": list(self.extra_examples),
            "rule": self.rule,
            "notes": list(self.notes),
            "reference_id_type": self.reference_id_type,
            "query_id_type": self.query_id_type,
        }


@dataclass(frozen=True, eq=False)
class GeneAlignment:
    """A fixed mapping from a query's gene columns to the reference's gene order."""

    reference_genes: tuple[str, ...]
    source_index: np.ndarray = field(repr=False)
    report: AlignmentReport

    @cached_property
    def _present(self) -> tuple[np.ndarray, np.ndarray]:
        """(query columns in reference order, their reference positions), both int64."""
        positions = np.flatnonzero(self.source_index >= 0)
        return self.source_index[positions].astype(np.int64), positions.astype(np.int64)

    def transform(self, matrix: Any) -> sp.csr_matrix:
        """Map a chunk (cells × query genes; dense, CSR or CSC) to CSR float32 in reference order.

        Missing genes are zero columns, extra genes are dropped, explicit zeros are removed and
        the result has sorted indices. Cost is O(nnz) for sparse input; the input is not changed.
        """
        shape = getattr(matrix, "shape", None)
        if shape is None or len(shape) != 2:
            raise GeneAlignmentError(f"expected a 2-d matrix, got {type(matrix).__name__}")
        n_cells, n_columns = int(shape[0]), int(shape[1])
        if n_columns != self.report.n_query_genes:
            raise GeneAlignmentError(
                f"the matrix has {n_columns} gene columns but the alignment was made for "
                f"{self.report.n_query_genes} query genes",
                hint="Align with the gene names of this same matrix",
            )
        columns, positions = self._present
        n_reference = len(self.reference_genes)
        if sp.issparse(matrix):
            source = matrix if matrix.format in ("csr", "csc") else matrix.tocsr()
            # scipy's column fancy-indexing runs in C++ in O(nnz); from CSC it also avoids
            # touching the extra genes at all.
            picked = sp.csr_matrix(source[:, columns])
        else:
            dense = np.asarray(matrix)
            picked = sp.csr_matrix(dense[:, columns])
        indices = picked.indices
        if columns.size < n_reference:
            # picked's column p is reference gene positions[p]; the map is increasing, so
            # sorted rows stay sorted.
            indices = positions.astype(indices.dtype)[indices]
        # picked is new (fancy indexing always allocates), so its arrays are ours to reuse.
        out = sp.csr_matrix(
            (picked.data.astype(np.float32, copy=False), indices, picked.indptr),
            shape=(n_cells, n_reference),
        )
        out.sum_duplicates()
        out.eliminate_zeros()
        return out


def gene_id_type(names: Sequence[str]) -> Literal["ensembl", "symbol"]:
    """Whether a gene list holds Ensembl gene ids or (anything else, taken as) symbols."""
    named = [n for n in names if n]
    if not named:
        return "symbol"
    hits = sum(1 for n in named if _ENSEMBL_RE.match(n))
    return "ensembl" if hits / len(named) >= ENSEMBL_FRACTION else "symbol"


def _strip_version(name: str) -> str:
    """``ENSG00000141510.16`` → ``ENSG00000141510``; any other name unchanged."""
    m = _VERSIONED_RE.match(name)
    return m.group(1) if m else name


def _as_names(values: Any) -> list[str]:
    """Strings for gene names; missing values (NaN, None) become ``""`` (matches nothing)."""
    series = pd.Series(np.asarray(values, dtype=object), dtype=object)
    return series.astype(str).where(series.notna(), "").tolist()


def query_gene_names(adata: Any, *, gene_key: str | None = None) -> pd.Index:
    """Return the names to match genes by: ``var_names``, or the ``var`` column ``gene_key``."""
    if gene_key is None:
        return pd.Index(_as_names(adata.var_names), dtype=object)
    if gene_key not in adata.var.columns:
        columns = ", ".join(map(str, adata.var.columns)) or "none"
        raise GeneAlignmentError(
            f"the AnnData's var has no column {gene_key!r}",
            hint=f"var columns: {columns}. Pass one of them as gene_key, or omit gene_key "
            "to match by var_names",
        )
    return pd.Index(_as_names(adata.var[gene_key]), dtype=object)


def _listing(items: Sequence[str], limit: int = MAX_EXAMPLES) -> str:
    """Render a short, bounded, comma-separated list for a message."""
    shown = ", ".join(items[:limit])
    return f"{shown}, … ({len(items) - limit} more)" if len(items) > limit else shown


def _symbol_style(names: Sequence[str]) -> str:
    """``"upper"`` (human-style, CD4), ``"capitalized"`` (mouse-style, Cd4) or ``"mixed"``."""
    lettered = [n for n in names if any(c.isalpha() for c in n)]
    if not lettered:
        return "mixed"
    upper = sum(1 for n in lettered if n == n.upper())
    capital = sum(
        1 for n in lettered if n[:1].isupper() and n[1:] == n[1:].lower() != n[1:].upper()
    )
    if upper / len(lettered) >= STYLE_FRACTION:
        return "upper"
    if capital / len(lettered) >= STYLE_FRACTION:
        return "capitalized"
    return "mixed"


def _candidate_columns(
    query_var: pd.DataFrame | None, gene_key: str | None
) -> list[tuple[str, list[str]]]:
    """Other gene-name sources in ``var`` (string columns, and var_names if a column is used)."""
    if query_var is None:
        return []
    found: list[tuple[str, list[str]]] = []
    if gene_key is not None:
        found.append(("var_names", _as_names(query_var.index)))
    for column in query_var.columns:
        if column == gene_key:
            continue
        values = query_var[column]
        if isinstance(values.dtype, pd.CategoricalDtype):
            kind = values.cat.categories.dtype.kind
        else:
            kind = values.dtype.kind
        if kind in ("O", "U", "S", "T") or pd.api.types.is_string_dtype(values):
            found.append((str(column), _as_names(values)))
    return found


def _diagnose(
    query: list[str],
    reference: list[str],
    *,
    missing: list[str],
    extra: list[str],
    id_types: tuple[str, str],
    query_var: pd.DataFrame | None,
    gene_key: str | None,
) -> tuple[list[str], list[str]]:
    """Explain missing genes and a poor overlap (notes), and say what to do (hints)."""
    notes: list[str] = []
    hints: list[str] = []
    n_ref = len(reference)
    fraction = (n_ref - len(missing)) / n_ref
    ref_type, query_type = id_types
    source = "var_names" if gene_key is None else f"var[{gene_key!r}]"

    # Case differences are diagnosed only: ignoring case is not an orthology mapping.
    unmatched = {_strip_version(q).casefold(): q for q in extra if q}
    by_case = [
        (g, unmatched[key]) for g in missing if (key := _strip_version(g).casefold()) in unmatched
    ]
    if by_case:
        ref_style, query_style = _symbol_style(reference), _symbol_style(query)
        pairs = ", ".join(f"{r} ↔ {q}" for r, q in by_case[:3])
        notes.append(
            f"{len(by_case)} missing reference genes match a query gene only when case is "
            f"ignored (e.g. {pairs}); they were not matched"
        )
        if {ref_style, query_style} == {"upper", "capitalized"}:
            hints.append(
                f"The reference's symbols are {_STYLE_WORDS[ref_style]} and the query's "
                f"{_STYLE_WORDS[query_style]}: is the query from another species? Convert it "
                "to the reference species' orthologs first; hubarches does not match genes "
                "by ignoring case"
            )
        else:
            hints.append(
                "If those are the same genes, rename them in the query to the reference's spelling"
            )

    if fraction >= WARN_SHARED_FRACTION:
        return notes, hints
    if ref_type != query_type:
        notes.append(
            f"the reference's genes are {_TYPE_WORDS[ref_type]} (e.g. {reference[0]}) but the "
            f"query's {source} look like {_TYPE_WORDS[query_type]} "
            f"(e.g. {next((q for q in query if q), '?')})"
        )
    ref_keys = {_strip_version(g) for g in reference}
    best: tuple[int, str] | None = None
    for column, names in _candidate_columns(query_var, gene_key):
        hits = len(ref_keys & {_strip_version(n) for n in names if n})
        if best is None or hits > best[0]:
            best = (hits, column)
    if best is not None and best[0] / n_ref >= fraction + SUGGEST_MARGIN:
        hits, column = best
        if column == "var_names":
            where, use = "var_names", "omit gene_key"
        else:
            where, use = f"var column {column!r}", f"pass gene_key={column!r} (--gene-key {column})"
        hints.insert(
            0,
            f"The query's {where} matches {hits} of {n_ref} reference genes "
            f"({hits / n_ref:.0%}): {use}",
        )
    elif ref_type != query_type:
        hints.append(
            f"Add a var column with {_TYPE_WORDS[ref_type]} for the query's genes (e.g. from "
            "the features file of the count matrix, or a BioMart lookup) and pass it as "
            "gene_key"
        )
    if not hints:
        hints.append(
            "Check that the query is from the reference's species and names genes the same "
            f"way (reference: {_listing(reference, 3)}; query: "
            f"{_listing([q for q in query if q], 3)})"
        )
    return notes, hints


_TYPE_WORDS = {"ensembl": "Ensembl ids", "symbol": "gene symbols"}
_STYLE_WORDS = {"upper": "human-style (CD4)", "capitalized": "mouse-style (Cd4)"}


def _count_matches(query_keys: list[str], reference_keys: list[str]) -> set[str]:
    """Return the reference keys that occur among the (non-empty) query keys."""
    return set(reference_keys) & {k for k in query_keys if k}


def _refuse_duplicates(
    query: list[str],
    query_keys: list[str],
    repeated: pd.Index,
    shared: set[str],
    *,
    gene_key: str | None,
) -> None:
    """Raise when a reference gene occurs more than once among the query's (matching) names."""
    ambiguous = sorted({k for k in repeated if k in shared})
    if not ambiguous:
        return
    originals: dict[str, list[str]] = {}
    for name, key in zip(query, query_keys, strict=True):
        if key in shared:
            originals.setdefault(key, []).append(name)
    named = [
        f"{k} ({len(originals[k])}×)"
        if len(set(originals[k])) == 1
        else f"{k} ({', '.join(originals[k])})"
        for k in ambiguous
    ]
    source = "var_names" if gene_key is None else f"var[{gene_key!r}]"
    raise GeneAlignmentError(
        f"{len(ambiguous)} reference genes occur more than once in the query's {source}: "
        f"{_listing(named)}",
        hint="Keep one column per gene (sum the duplicates or drop all but one), or pass as "
        "gene_key a var column with unique ids such as Ensembl ids",
    )


def align_genes(
    query_genes: Sequence[str],
    reference_genes: Sequence[str],
    *,
    query_var: pd.DataFrame | None = None,
    gene_key: str | None = None,
) -> GeneAlignment:
    """Match query genes to the reference's ordered genes; refuse or warn on poor overlap.

    ``query_var`` (the query's ``var``) is only searched for a better gene column when the
    overlap is poor; ``gene_key`` names the column ``query_genes`` came from, for messages.
    Raises :class:`GeneAlignmentError` on duplicated genes or an overlap below
    :data:`MIN_SHARED_FRACTION`; warns with :class:`HubarchesWarning` below
    :data:`WARN_SHARED_FRACTION`.
    """
    reference = _as_names(reference_genes)
    query = _as_names(query_genes)
    if not reference:
        raise GeneAlignmentError("the reference lists no genes", n_shared=0, n_reference=0)
    ref_index = pd.Index(reference)
    if ref_index.has_duplicates or "" in ref_index:
        dups = sorted(set(ref_index[ref_index.duplicated()]))
        raise GeneAlignmentError(
            f"the reference's gene list is invalid (empty or repeated names: {_listing(dups)})",
            hint="The manifest is corrupted; pull the reference again or re-create it",
        )

    rule, ref_keys, query_keys = _EXACT, reference, query
    shared = _count_matches(query, reference)
    notes: list[str] = []
    if any(_VERSIONED_RE.match(g) for g in (*reference, *query)):
        ref_stripped = [_strip_version(g) for g in reference]
        query_stripped = [_strip_version(q) for q in query]
        stripped_shared = _count_matches(query_stripped, ref_stripped)
        if len(set(ref_stripped)) == len(reference) and len(stripped_shared) > len(shared):
            example = next(g for g in (*query, *reference) if _VERSIONED_RE.match(g))
            notes.append(
                f"Ensembl version suffixes were stripped before matching (e.g. {example} → "
                f"{_strip_version(example)}): {len(stripped_shared)} genes matched instead of "
                f"{len(shared)}"
            )
            rule, ref_keys, query_keys, shared = (
                _STRIPPED,
                ref_stripped,
                query_stripped,
                stripped_shared,
            )

    keys = pd.Index(query_keys, dtype=object)
    duplicated = keys.duplicated(keep=False) & (keys != "")
    if duplicated.any():
        _refuse_duplicates(query, query_keys, keys[duplicated], shared, gene_key=gene_key)
        notes.append(
            f"{int(duplicated.sum())} query genes with repeated names that the reference "
            "does not use were dropped"
        )
    usable = np.flatnonzero(~duplicated & (keys != ""))
    found = pd.Index(keys[usable]).get_indexer(ref_keys)
    source_index = np.where(found >= 0, usable[np.maximum(found, 0)], -1).astype(np.int64)

    n_ref, n_shared = len(reference), int((source_index >= 0).sum())
    fraction = n_shared / n_ref
    used = np.zeros(len(query), dtype=bool)
    used[source_index[source_index >= 0]] = True
    missing = [g for g, s in zip(reference, source_index, strict=True) if s < 0]
    extra = [q for q, u in zip(query, used, strict=True) if not u]
    id_types = gene_id_type(reference), gene_id_type(query)
    diag_notes, hints = (
        _diagnose(
            query,
            reference,
            missing=missing,
            extra=extra,
            id_types=id_types,
            query_var=query_var,
            gene_key=gene_key,
        )
        if missing
        else ([], [])
    )
    report = AlignmentReport(
        n_reference=n_ref,
        n_query_genes=len(query),
        n_shared=n_shared,
        n_missing=len(missing),
        n_extra=len(extra),
        fraction_shared=fraction,
        missing_examples=tuple(missing[:MAX_EXAMPLES]),
        extra_examples=tuple(e or "<no name>" for e in extra[:MAX_EXAMPLES]),
        rule=rule,
        notes=tuple(notes + diag_notes),
        reference_id_type=id_types[0],
        query_id_type=id_types[1],
    )
    summary = (
        f"only {n_shared} of {n_ref} reference genes ({fraction:.1%}) are in the query "
        f"(missing: {_listing(missing, 5)})"
    )
    if fraction < MIN_SHARED_FRACTION:
        detail = "; ".join(diag_notes)
        raise GeneAlignmentError(
            f"{summary}; at least {MIN_SHARED_FRACTION:.0%} are needed"
            + (f" ({detail})" if detail else ""),
            n_shared=n_shared,
            n_reference=n_ref,
            hint=". ".join(hints),
        )
    if fraction < WARN_SHARED_FRACTION:
        warn(
            f"{summary}. Missing genes are filled with zeros, which the model reads as no "
            "expression, so the mapping may be less accurate"
            + (f". {'. '.join(hints)}" if hints else "")
        )
    logger.info(
        "aligned %d query genes to %d reference genes: %d shared (%s)",
        len(query),
        n_ref,
        n_shared,
        rule,
    )
    return GeneAlignment(tuple(reference), source_index, report)
