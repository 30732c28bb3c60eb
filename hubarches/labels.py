"""Label transfer and mapping quality in the latent space, on plain numpy arrays.

A query cell takes the labels of its k nearest reference cells, each vote weighted by its
distance as in scArches' weighted kNN (Lotfollahi et al. 2022); its uncertainty is one minus
the winning label's probability. Separately, a mapping-quality score compares a query cell's
distance to its nearest reference cells with those cells' own distances to their neighbours
(a local density ratio, as in the local outlier factor), so cells of a type the atlas never
saw are flagged even where the kNN vote is unanimous and the encoder has placed them just
off a known cluster rather than far from every one.

The neighbour search is exact: a ``scipy.spatial.cKDTree`` over the reference latent. Latents
have ~10 dimensions, where an exact kd-tree maps 100k onto 100k cells in seconds
(``bench/bench_labels.py``); an approximate index (pynndescent, not a dependency) would buy
little and cost reproducibility, which tests and published mappings rely on.
Query once with :meth:`NeighborIndex.query` and pass the result to :func:`transfer_from_neighbors`
and :func:`quality_from_neighbors`, or call :func:`annotate`, which does exactly that.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
from scipy.spatial import cKDTree

from hubarches.errors import DataError, HubarchesWarning, ModelError

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

#: Neighbours per query cell, as scanpy's default: enough for a stable vote (steps of 1/15),
#: and a rare type of a few dozen reference cells is not outvoted as with scArches' 50.
DEFAULT_K = 15
#: Cells whose uncertainty (1 − winning probability) exceeds this are called ``Unknown``: a
#: label is given only when it holds a majority of the neighbourhood's weight. The HLCA used a
#: stricter 0.2; with fine-grained labels that calls most boundary cells ``Unknown``.
DEFAULT_UNCERTAINTY_THRESHOLD = 0.5
UNKNOWN_LABEL = "Unknown"
#: Most reference cells a bundle stores for label transfer (see :func:`stratified_subsample`).
DEFAULT_EMBEDDING_CAP = 100_000
#: A query cell is flagged when its mapping-quality score (see :func:`quality_from_neighbors`)
#: exceeds this: its k nearest reference cells are 1.3× farther from it, on average, than
#: from their own neighbours (in a 10-dim latent, ~1.3¹⁰ ≈ 14× lower density). Measured on
#: simulated data mapped through the VAE (1500 reference / 600 query cells, 300 genes, six
#: types, type_05 held out of the reference; seeds 1, 2, 3): reference cells' own score
#: (leave-self-out) has P95 1.31–1.36, P99 1.50–1.61; above 1.3 lie 2–11 % of query cells of
#: known types (the tails of their types; median 1.03–1.05) and 96–98 % of the held-out type
#: (median 1.53–1.87). 1.4 would flag 1–5 % of known cells but only 84–96 % of unseen ones.
MAPPING_QUALITY_THRESHOLD = 1.3
#: Neighbour search is exact by default. cKDTree's ``eps`` bounds an approximate search
#: (still deterministic): on 10-dim Gaussian blobs eps=0.25 was ~2× faster with 99.9 % of
#: neighbours and 99.98 % of labels unchanged (bench/bench_labels.py --eps 0 0.25).
SEARCH_EPS = 0.0
#: kd-tree leaf size: 32 queried 10-dim latents as fast as or faster than scipy's 16.
_LEAF_SIZE = 32
#: Coarse cells that set the spatial order of large queries, and the query size from which
#: ordering pays for itself.
_COARSE_CELLS = 2048
_ORDER_MIN_QUERY = 4096
#: Most floats in one block of the vote tally (rows × categories), bounding its memory.
_VOTE_BLOCK = 4_000_000


def _check_k(k: int) -> int:
    """Validate k: an integer ≥ 1 (a bool is refused)."""
    if isinstance(k, bool) or not isinstance(k, (int, np.integer)) or k < 1:
        raise ModelError(f"k must be an integer ≥ 1, got {k!r}")
    return int(k)


def _check_latent(latent: np.ndarray, *, what: str, n_dims: int | None = None) -> np.ndarray:
    """Return a finite 2-D float64 array of the expected width, or raise ModelError."""
    x = np.asarray(latent)
    if x.ndim != 2:
        raise ModelError(f"the {what} must be 2-D (cells × latent dimensions), got {x.shape}")
    if not (np.issubdtype(x.dtype, np.floating) or np.issubdtype(x.dtype, np.integer)):
        raise ModelError(f"the {what} must be numeric, got dtype {x.dtype}")
    if n_dims is not None and x.shape[1] != n_dims:
        raise ModelError(
            f"the {what} has {x.shape[1]} dimensions but the reference has {n_dims}",
            hint="Embed the query with the reference's model (or its extension)",
        )
    x = np.ascontiguousarray(x, dtype=np.float64)
    bad = ~np.isfinite(x).all(axis=1)
    if bad.any():
        raise ModelError(
            f"the {what} has non-finite values (NaN or inf) in {int(bad.sum())} of "
            f"{x.shape[0]} cells",
            hint="The model produced them: check the training losses and that the input is "
            "raw counts of the reference's genes",
        )
    return x


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


def _check_neighbors(
    distances: np.ndarray, indices: np.ndarray, n_reference: int
) -> tuple[np.ndarray, np.ndarray]:
    """Validate ``[n, k≥1]`` neighbour distances and indices into ``n_reference`` cells."""
    dist = np.asarray(distances)
    idx = np.asarray(indices)
    if dist.ndim != 2 or dist.shape != idx.shape or dist.shape[1] < 1:
        raise ModelError(f"distances {dist.shape} and indices {idx.shape} must both be [n, k≥1]")
    if not np.issubdtype(idx.dtype, np.integer):
        raise ModelError(f"neighbour indices must be integers, got dtype {idx.dtype}")
    if idx.size and (idx.min() < 0 or idx.max() >= n_reference):
        raise DataError(f"neighbour indices fall outside the {n_reference} reference cells")
    if not np.isfinite(dist).all() or (dist < 0).any():
        raise ModelError("neighbour distances must be finite and non-negative")
    return dist, idx


@dataclass(frozen=True, eq=False)
class NeighborIndex:
    """An exact nearest-neighbour index over a reference latent; build it once, query often."""

    tree: cKDTree = field(repr=False)
    coarse: cKDTree = field(repr=False)
    """A few reference cells spread over the latent, to put query cells in spatial order."""
    eps: float = SEARCH_EPS
    """0: exact. Otherwise each k-th neighbour is within ``(1 + eps)`` of the true one."""
    _spread: dict[int, np.ndarray] = field(default_factory=dict, repr=False)
    """Per k, each reference cell's leave-self-out mean kNN distance (NaN: not computed yet)."""

    @property
    def n_cells(self) -> int:
        """Reference cells in the index."""
        return int(self.tree.n)

    @property
    def n_dims(self) -> int:
        """Latent dimensions."""
        return int(self.tree.m)

    def query(self, latent: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
        """Distances (float32) and indices (int64) of each cell's nearest reference cells.

        Both are ``[n, min(k, n_cells)]``, nearest first; ties keep the kd-tree's order.
        """
        x = _check_latent(latent, what="query latent", n_dims=self.n_dims)
        k_eff = min(_check_k(k), self.n_cells)
        return _search(self.tree, x, k_eff, eps=self.eps, order=self._spatial_order(x))

    def _spatial_order(self, x: np.ndarray) -> np.ndarray | None:
        """Order query cells by their nearest coarse cell, or None for small queries.

        Consecutive queries then walk the same branches of the tree, which stay in cache:
        about twice as fast for large random-order queries. Results do not depend on it.
        """
        if x.shape[0] < _ORDER_MIN_QUERY:
            return None
        _, nearest = self.coarse.query(x, k=1, workers=-1)
        return np.argsort(nearest, kind="stable")


def _search(
    tree: cKDTree, x: np.ndarray, k: int, *, eps: float, order: np.ndarray | None
) -> tuple[np.ndarray, np.ndarray]:
    """Query ``tree`` for ``[n, k]`` float32 distances and int64 indices, in ``x``'s order."""
    shape = (x.shape[0], k)
    dist = np.empty(shape, dtype=np.float32)
    idx = np.empty(shape, dtype=np.int64)
    rows = slice(None) if order is None else order
    d, i = tree.query(x[rows], k=k, eps=eps, workers=-1)
    dist[rows] = np.reshape(d, shape)
    idx[rows] = np.reshape(i, shape)
    return dist, idx


def build_index(reference_latent: np.ndarray, *, eps: float = SEARCH_EPS) -> NeighborIndex:
    """Index a reference latent ``[n_cells, n_dims]`` for Euclidean kNN queries.

    ``eps`` > 0 trades exactness for speed, deterministically (see :data:`SEARCH_EPS`).
    """
    if not float(eps) >= 0.0:
        raise ModelError(f"eps must be ≥ 0 (0: exact search), got {eps!r}")
    x = _check_latent(reference_latent, what="reference latent")
    if x.shape[0] == 0:
        raise DataError("the reference latent has no cells", hint="Embed the reference first")
    tree = cKDTree(x, leafsize=_LEAF_SIZE)
    # Every step-th cell in leaf order: spread over the latent as the cells are, no RNG.
    step = max(1, x.shape[0] // _COARSE_CELLS)
    return NeighborIndex(tree=tree, coarse=cKDTree(x[tree.indices[::step]]), eps=float(eps))


def _effective_k(index: NeighborIndex, k: int, *, stacklevel: int) -> int:
    """Clip k to the reference size, warning when it is clipped."""
    k = _check_k(k)
    if k > index.n_cells:
        warnings.warn(
            f"k={k} exceeds the {index.n_cells} reference cells; using k={index.n_cells}",
            HubarchesWarning,
            stacklevel=stacklevel + 1,
        )
    return min(k, index.n_cells)


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
        warnings.warn(
            f"the reference has a category named {UNKNOWN_LABEL!r}; query cells given it "
            "cannot be told apart from uncertain ones",
            HubarchesWarning,
            stacklevel=4,
        )
    return cats


def _check_quality_threshold(threshold: float) -> float:
    """Validate a mapping-quality threshold: it is > 0 (inf flags nothing)."""
    if not float(threshold) > 0.0:
        raise ModelError(f"the mapping-quality threshold must be > 0, got {threshold!r}")
    return float(threshold)


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
    dist, idx = _check_neighbors(distances, indices, codes.shape[0])
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
    k_eff = _effective_k(index, k, stacklevel=2)
    dist, idx = index.query(query_latent, k_eff)
    return _transfer(dist, idx, codes, categories, threshold, None)


# --- mapping quality ----------------------------------------------------------------------


@dataclass(frozen=True)
class MappingQuality:
    """How far each query cell lies from its nearest reference cells, relative to their spread."""

    score: np.ndarray
    """float32 [n_query]: mean distance to the k nearest reference cells ÷ the mean of those
    cells' own leave-self-out mean kNN distance; ≈1 for a cell like its neighbours."""
    ok: np.ndarray
    """bool [n_query]: ``score <= threshold``."""
    threshold: float
    n_flagged: int
    k: int
    n_degenerate: int = 0
    """Cells whose k neighbours all coincide with other reference cells (spread 0); they
    score 0 on those points and inf off them."""

    def to_dict(self) -> dict:
        """Summarize for a JSON report: flagged count and share, threshold, k, quantiles."""
        n = int(self.score.shape[0])
        finite = self.score[np.isfinite(self.score)]
        quantiles = (
            {f"q{q}": float(np.percentile(finite, q)) for q in (50, 95, 99)} if finite.size else {}
        )
        return {
            "n_cells": n,
            "n_flagged": self.n_flagged,
            "fraction_flagged": self.n_flagged / n if n else 0.0,
            "threshold": self.threshold,
            "k": self.k,
            "score": "local distance ratio: a cell's mean distance to its k nearest reference "
            "cells over theirs to their own k nearest",
            "n_degenerate": self.n_degenerate,
            "score_quantiles": quantiles,
        }


def _spread(index: NeighborIndex, needed: np.ndarray, k: int) -> np.ndarray:
    """Each reference cell's mean distance to its k nearest *other* cells, as float64 [n_cells].

    Computed only for the ``needed`` cells not computed before (others may be NaN) and
    cached on the index per k: a large query needs most of the reference once, later
    queries little. A cell's own distance is 0, the smallest, so dropping the first column
    of a (k+1)-query leaves exactly the leave-self-out distances, duplicates included.
    """
    cache = index._spread.get(k)
    if cache is None:
        cache = np.full(index.n_cells, np.nan)
        index._spread[k] = cache
    todo = np.zeros(index.n_cells, dtype=bool)
    todo[needed] = True
    todo &= np.isnan(cache)
    # In leaf order, consecutive searches share branches of the tree (as in `query`).
    cells = index.tree.indices[todo[index.tree.indices]]
    if cells.size:
        dist, _ = _search(index.tree, index.tree.data[cells], k + 1, eps=index.eps, order=None)
        cache[cells] = dist[:, 1:].mean(axis=1, dtype=np.float64)
    return cache


def quality_from_neighbors(
    index: NeighborIndex,
    distances: np.ndarray,
    indices: np.ndarray,
    *,
    threshold: float = MAPPING_QUALITY_THRESHOLD,
) -> MappingQuality:
    """Score query cells from their precomputed reference neighbours (``index.query``).

    With N(i) the k nearest reference cells of query cell i and s_j the mean distance of
    reference cell j to its own k nearest other reference cells,
    ``score_i = mean_{j∈N(i)} d(i, j) / mean_{j∈N(i)} s_j``. A global scale misses cells
    the encoder puts just off a dense known cluster; this ratio compares each cell with its
    own neighbourhood. Cells with ``score > threshold`` are flagged.
    """
    return _quality(index, distances, indices, threshold)


def _quality(
    index: NeighborIndex, distances: np.ndarray, indices: np.ndarray, threshold: float
) -> MappingQuality:
    """Do the work of :func:`quality_from_neighbors` (public callers call this directly)."""
    threshold = _check_quality_threshold(threshold)
    dist, idx = _check_neighbors(distances, indices, index.n_cells)
    if index.n_cells < 2:
        raise DataError(
            "mapping quality needs a reference of at least 2 cells (it compares reference "
            "cells with each other)"
        )
    k = min(dist.shape[1], index.n_cells - 1)
    idx = idx[:, :k]
    stat = dist[:, :k].mean(axis=1, dtype=np.float64)
    local = _spread(index, idx, k)[idx].mean(axis=1)
    degenerate = local <= 0.0
    with np.errstate(divide="ignore", invalid="ignore"):
        score = np.where(degenerate, np.where(stat > 0.0, np.inf, 0.0), stat / local)
    n_degenerate = int(degenerate.sum())
    if n_degenerate:
        warnings.warn(
            f"{n_degenerate} query cells have only coinciding reference cells as neighbours "
            "(their kNN distances are 0); those not on the same points are flagged",
            HubarchesWarning,
            stacklevel=3,
        )
    ok = score <= threshold
    return MappingQuality(
        score=score.astype(np.float32),
        ok=ok,
        threshold=threshold,
        n_flagged=int((~ok).sum()),
        k=k,
        n_degenerate=n_degenerate,
    )


def mapping_quality(
    index: NeighborIndex,
    query_latent: np.ndarray,
    *,
    k: int = DEFAULT_K,
    threshold: float = MAPPING_QUALITY_THRESHOLD,
) -> MappingQuality:
    """Flag query cells that lie farther from their reference neighbours than those from theirs."""
    threshold = _check_quality_threshold(threshold)
    k_eff = _effective_k(index, k, stacklevel=2)
    dist, idx = index.query(query_latent, k_eff)
    return _quality(index, dist, idx, threshold)


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
    quality_threshold = _check_quality_threshold(quality_threshold)
    k_eff = _effective_k(index, k, stacklevel=2)
    dist, idx = index.query(query_latent, k_eff)
    quality = _quality(index, dist, idx, quality_threshold)
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
