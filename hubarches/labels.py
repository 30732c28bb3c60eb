"""Label transfer and mapping quality in the latent space, on plain numpy arrays.

A query cell takes the labels of its k nearest reference cells, each vote weighted by its
distance as in scArches' weighted kNN (Lotfollahi et al. 2022); its uncertainty is one minus
the winning label's probability. Separately, a mapping-quality score compares a query cell's
distance to its nearest reference cells with those cells' own distances to their neighbours
(a local density ratio, as in the local outlier factor), so cells of a type the atlas never
saw are flagged even where the kNN vote is unanimous and the encoder has placed them just
off a known cluster rather than far from every one.

The neighbour index lives in :mod:`hubarches.neighbors`, the score in
:mod:`hubarches.quality`; both are re-exported here. Query the index once and pass the
result to :func:`transfer_from_neighbors` and :func:`quality_from_neighbors`, or call
:func:`annotate`, which does exactly that.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np

from hubarches.errors import DataError, ModelError, warn
from hubarches.neighbors import (
    DEFAULT_K,
    SEARCH_EPS,
    NeighborIndex,
    build_index,
    check_neighbors,
    effective_k,
)
from hubarches.quality import (
    MAPPING_QUALITY_THRESHOLD,
    MappingQuality,
    mapping_quality,
    quality_from_neighbors,
)

__all__ = [
    "DEFAULT_EMBEDDING_CAP",
    "DEFAULT_K",
    "DEFAULT_UNCERTAINTY_THRESHOLD",
    "MAPPING_QUALITY_THRESHOLD",
    "SEARCH_EPS",
    "UNKNOWN_LABEL",
    "LabelTransfer",
    "MappingQuality",
    "NeighborIndex",
    "annotate",
    "build_index",
    "mapping_quality",
    "quality_from_neighbors",
    "stratified_subsample",
    "transfer_from_neighbors",
    "transfer_labels",
]

#: Cells whose uncertainty (1 − winning probability) exceeds this are called ``Unknown``: a
#: label is given only when it holds a majority of the neighbourhood's weight. The HLCA used a
#: stricter 0.2; with fine-grained labels that calls most boundary cells ``Unknown``.
DEFAULT_UNCERTAINTY_THRESHOLD = 0.5
UNKNOWN_LABEL = "Unknown"
#: Most reference cells a bundle stores for label transfer (see :func:`stratified_subsample`).
DEFAULT_EMBEDDING_CAP = 100_000
#: Most floats in one block of the vote tally (rows × categories), bounding its memory.
_VOTE_BLOCK = 4_000_000


def _check_codes(codes: np.ndarray, *, n: int | None = None) -> np.ndarray:
    """Validate 1-D integer label codes ≥ −1 (−1: no label); return them as int64."""
    c = np.asarray(codes)
    if c.ndim != 1 or not np.issubdtype(c.dtype, np.integer):
        raise DataError(
            f"label codes must be a 1-D integer array, got dtype {c.dtype} shape {c.shape}",
            hint="Pass the codes of a pandas Categorical (.cat.codes), −1 for a missing label",
        )
    if n is not None and c.shape[0] != n:
        raise DataError(f"there are {c.shape[0]} label codes for {n} reference cells")
    if c.size and c.min() < -1:
        raise DataError(f"label codes must be ≥ −1 (−1: missing), found {int(c.min())}")
    return c.astype(np.int64, copy=False)


# --- label transfer -----------------------------------------------------------------------


@dataclass(frozen=True)
class LabelTransfer:
    """Predicted labels of query cells with the winning probability and its uncertainty."""

    labels: np.ndarray
    """object array of ``str`` [n_query]; :data:`UNKNOWN_LABEL` where uncertain or flagged."""
    codes: np.ndarray
    """int64 [n_query]: index into ``categories``, −1 where the label is ``Unknown``."""
    probability: np.ndarray
    """float32: the winning label's share of the neighbourhood weight (before Unknown)."""
    uncertainty: np.ndarray
    """float32: ``1 − probability``."""
    categories: tuple[str, ...]
    k: int
    threshold: float
    n_unknown: int
    n_flagged_unknown: int = 0
    """Cells called Unknown only because a mask (e.g. mapping quality) said so."""

    def to_dict(self) -> dict:
        """Summarize for a JSON report: counts per label (``Unknown`` last), k, threshold."""
        counts = np.bincount(self.codes + 1, minlength=len(self.categories) + 1)
        by_label = {c: int(n) for c, n in zip(self.categories, counts[1:], strict=True)}
        by_label[UNKNOWN_LABEL] = int(counts[0])
        n = int(self.codes.shape[0])
        return {
            "n_cells": n,
            "k": self.k,
            "threshold": self.threshold,
            "n_unknown": self.n_unknown,
            "n_flagged_unknown": self.n_flagged_unknown,
            "mean_uncertainty": float(self.uncertainty.mean()) if n else None,
            "counts": by_label,
        }


def _kernel_weights(distances: np.ndarray) -> np.ndarray:
    """Weight neighbours as scArches does, normalized per row.

    scArches: ``w_j ∝ exp(−d_j / (2/σ)²)`` with σ the (population) std of the row's k
    distances. Written as ``exp(−(d_j − d_min)·σ²/4)`` it needs no division, so identical
    distances (σ = 0) give equal weights instead of 0/0, and the largest weight is 1, so a
    row never underflows to all zeros; the shift cancels in the normalization.
    """
    d = distances.astype(np.float64, copy=False)
    sd2 = d.var(axis=1, keepdims=True)
    w = np.exp(-(d - d.min(axis=1, keepdims=True)) * (sd2 / 4.0))
    return w / w.sum(axis=1, keepdims=True)


def _vote(weights: np.ndarray, codes: np.ndarray, n_categories: int) -> tuple[np.ndarray, ...]:
    """Winning code and its summed weight per row; ties go to the lowest code; −1 abstains."""
    n = weights.shape[0]
    best = np.zeros(n, dtype=np.int64)
    prob = np.zeros(n, dtype=np.float64)
    rows = max(1, _VOTE_BLOCK // n_categories)
    for start in range(0, n, rows):
        c, w = codes[start : start + rows], weights[start : start + rows]
        m = c.shape[0]
        valid = c >= 0
        slot = (np.arange(m, dtype=np.int64)[:, None] * n_categories + c)[valid]
        tally = np.bincount(slot, weights=w[valid], minlength=m * n_categories)
        tally = tally.reshape(m, n_categories)
        win = tally.argmax(axis=1)  # first maximum: the lowest code wins a tie
        best[start : start + m] = win
        prob[start : start + m] = tally[np.arange(m), win]
    return best, prob


def _check_categories(categories: Sequence[str], codes: np.ndarray) -> tuple[str, ...]:
    """Validate categories: unique strings that every code indexes; return a tuple."""
    cats = tuple(str(c) for c in categories)
    if not cats:
        raise DataError("the reference has no label categories")
    if len(set(cats)) != len(cats):
        raise DataError("label categories must be unique")
    if codes.size and codes.max() >= len(cats):
        raise DataError(f"label code {int(codes.max())} is out of range for {len(cats)} categories")
    if not (codes >= 0).any():
        raise DataError(
            "no reference cell has a label (every code is −1)",
            hint="Use a reference whose embedding stores labels, or map without label transfer",
        )
    if UNKNOWN_LABEL in cats:
        warn(
            f"the reference has a category named {UNKNOWN_LABEL!r}; query cells given it "
            "cannot be told apart from uncertain ones"
        )
    return cats


def _check_threshold(threshold: float) -> float:
    """Validate an uncertainty threshold: it lies in [0, 1]."""
    if not 0.0 <= float(threshold) <= 1.0:
        raise ModelError(f"the uncertainty threshold must be in [0, 1], got {threshold!r}")
    return float(threshold)


def transfer_from_neighbors(
    distances: np.ndarray,
    indices: np.ndarray,
    reference_codes: np.ndarray,
    categories: Sequence[str],
    *,
    threshold: float = DEFAULT_UNCERTAINTY_THRESHOLD,
    unknown_mask: np.ndarray | None = None,
) -> LabelTransfer:
    """Weighted kNN vote from precomputed neighbours (as :meth:`NeighborIndex.query` gives).

    The probability of a label is the normalized weight of the neighbours carrying it.
    Unlabelled neighbours (code −1) vote for nothing but keep their weight, so a cell among
    unannotated reference cells gets a low probability rather than a confident label from
    the few annotated ones. Cells whose uncertainty exceeds ``threshold``, that have no
    labelled neighbour, or where ``unknown_mask`` is true are labelled ``Unknown``.
    """
    return _transfer(distances, indices, reference_codes, categories, threshold, unknown_mask)


def _transfer(
    distances: np.ndarray,
    indices: np.ndarray,
    reference_codes: np.ndarray,
    categories: Sequence[str],
    threshold: float,
    unknown_mask: np.ndarray | None,
) -> LabelTransfer:
    """Do the work of :func:`transfer_from_neighbors` (public callers call this directly)."""
    threshold = _check_threshold(threshold)
    codes = _check_codes(reference_codes)
    dist, idx = check_neighbors(distances, indices, codes.shape[0])
    cats = _check_categories(categories, codes)
    n = dist.shape[0]
    if unknown_mask is None:
        forced = np.zeros(n, dtype=bool)
    else:
        forced = np.asarray(unknown_mask, dtype=bool)
        if forced.shape != (n,):
            raise ModelError(f"unknown_mask has shape {forced.shape}, expected ({n},)")

    best, prob = _vote(_kernel_weights(dist), codes[idx], len(cats))
    prob = np.clip(prob, 0.0, 1.0)
    uncertainty = 1.0 - prob
    uncertain = (uncertainty > threshold) | (prob <= 0.0)
    unknown = uncertain | forced
    out_codes = np.where(unknown, -1, best)
    names = np.array([*cats, UNKNOWN_LABEL], dtype=object)
    return LabelTransfer(
        labels=names[np.where(unknown, len(cats), best)],
        codes=out_codes,
        probability=prob.astype(np.float32),
        uncertainty=uncertainty.astype(np.float32),
        categories=cats,
        k=int(dist.shape[1]),
        threshold=threshold,
        n_unknown=int(unknown.sum()),
        n_flagged_unknown=int((forced & ~uncertain).sum()),
    )


def transfer_labels(
    index: NeighborIndex,
    reference_codes: np.ndarray,
    categories: Sequence[str],
    query_latent: np.ndarray,
    *,
    k: int = DEFAULT_K,
    threshold: float = DEFAULT_UNCERTAINTY_THRESHOLD,
) -> LabelTransfer:
    """Label query cells by a distance-weighted vote of their k nearest reference cells."""
    codes = _check_codes(reference_codes, n=index.n_cells)
    threshold = _check_threshold(threshold)
    k_eff = effective_k(index, k)
    dist, idx = index.query(query_latent, k_eff)
    return _transfer(dist, idx, codes, categories, threshold, None)


def annotate(
    index: NeighborIndex,
    reference_codes: np.ndarray,
    categories: Sequence[str],
    query_latent: np.ndarray,
    *,
    k: int = DEFAULT_K,
    threshold: float = DEFAULT_UNCERTAINTY_THRESHOLD,
    quality_threshold: float = MAPPING_QUALITY_THRESHOLD,
    unknown_if_flagged: bool = True,
) -> tuple[LabelTransfer, MappingQuality]:
    """Label transfer and mapping quality from a single neighbour query.

    A kNN vote is unanimous for a cell far from every reference cell when its neighbours
    share one type, so with ``unknown_if_flagged`` cells failing mapping quality are called
    ``Unknown`` too (``LabelTransfer.n_flagged_unknown`` counts those).
    """
    codes = _check_codes(reference_codes, n=index.n_cells)
    threshold = _check_threshold(threshold)
    k_eff = effective_k(index, k)
    dist, idx = index.query(query_latent, k_eff)
    quality = quality_from_neighbors(index, dist, idx, threshold=quality_threshold)
    mask = ~quality.ok if unknown_if_flagged else None
    transfer = _transfer(dist, idx, codes, categories, threshold, mask)
    return transfer, quality


# --- bundle subsampling -------------------------------------------------------------------


def _allocate(counts: np.ndarray, cap: int) -> np.ndarray:
    """Share ``cap`` among groups: one each, the rest by size (largest remainder)."""
    extra = cap - counts.shape[0]
    spare = counts - 1
    quota = extra * spare / spare.sum() if spare.sum() else np.zeros(counts.shape[0])
    alloc = np.floor(quota).astype(np.int64)
    left = extra - int(alloc.sum())
    # Fractions sum to `left` and each is < 1, so at least `left` groups have one > 0 and
    # none gets more than it has; a stable sort breaks equal remainders by label order.
    order = np.argsort(-(quota - alloc), kind="stable")
    alloc[order[:left]] += 1
    return alloc + 1


def stratified_subsample(codes: np.ndarray, cap: int, *, seed: int = 0) -> np.ndarray:
    """Sorted indices of at most ``cap`` cells, every label kept, sizes proportional otherwise.

    Keeps bundles' reference embeddings small. Each label (−1, unlabelled, counts as one)
    keeps at least one cell; the remaining room is shared in proportion to label sizes, so
    the result has exactly ``cap`` cells whenever there are more. Deterministic in ``seed``.
    """
    c = _check_codes(codes)
    if isinstance(cap, bool) or not isinstance(cap, (int, np.integer)) or cap < 1:
        raise ModelError(f"cap must be an integer ≥ 1, got {cap!r}")
    n = c.shape[0]
    if n <= cap:
        return np.arange(n, dtype=np.int64)
    _, group, counts = np.unique(c, return_inverse=True, return_counts=True)
    if counts.shape[0] > cap:
        raise ModelError(
            f"cap {cap} is below the number of labels ({counts.shape[0]}), and every label "
            "keeps at least one cell; raise the cap"
        )
    alloc = _allocate(counts, int(cap))
    keys = np.random.default_rng(seed).random(n)
    order = np.lexsort((keys, group))  # by label, then at random within it
    starts = np.concatenate(([0], np.cumsum(counts)[:-1]))
    rank = np.arange(n) - starts[group[order]]
    return np.sort(order[rank < alloc[group[order]]]).astype(np.int64)
