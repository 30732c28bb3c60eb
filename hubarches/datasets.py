"""A deterministic negative-binomial simulator of cell types × batches.

Tests, the demo atlas and the benchmarks all draw their data from here, so the same seed
gives the same counts everywhere. The generative story follows ``shared/bench/make_data.py``:
lineage and type programs with marker genes over log-normal base means, shared continuous
programs, gene-wise multiplicative batch effects and a per-batch library shift, log-normal
library sizes, and Gamma-Poisson (negative-binomial) counts with gene-wise dispersion.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

__all__ = ["SimulatedWorld", "simulate", "simulate_reference_and_query"]

_FAMILIES = (
    "CD", "IL", "CCL", "CXCL", "ZNF", "KLF", "RPL", "RPS", "HLA", "TNF", "SLC", "KRT", "COL",
    "GATA", "SOX", "FOX", "NR", "ATP", "NDUF", "MRPL", "PRDM", "TMEM", "FAM", "CCDC", "ANKRD",
    "LRRC", "KIAA", "ABCA", "ADAM", "CDK", "GZM", "LY", "MS4A", "FCGR", "S100A", "IFIT", "KLR",
)  # fmt: skip


def _gene_symbols(n: int, rng: np.random.Generator) -> list[str]:
    """Unique names that look like gene symbols."""
    names: list[str] = []
    seen: set[str] = set()
    while len(names) < n:
        fam = _FAMILIES[rng.integers(len(_FAMILIES))]
        suffix = "" if rng.random() < 0.8 else "ABCDEFGHIJKL"[rng.integers(12)]
        name = f"{fam}{int(rng.integers(1, 400))}{suffix}"
        if name not in seen:
            seen.add(name)
            names.append(name)
    return names


@dataclass(frozen=True)
class SimulatedWorld:
    """Everything shared by all samples of one simulation: genes, types, batch effects."""

    genes: tuple[str, ...]
    cell_types: tuple[str, ...]
    batches: tuple[str, ...]
    base: np.ndarray
    type_lfc: np.ndarray
    type_probs: np.ndarray
    programs: np.ndarray
    theta: np.ndarray
    batch_lfc: np.ndarray
    batch_lib: np.ndarray
    lib_mean: float
    lib_sd: float

    @classmethod
    def create(
        cls,
        *,
        n_genes: int,
        n_types: int,
        batches: Sequence[str],
        seed: int,
        batch_sd: float = 0.4,
        lib_mean: float = 4000.0,
        lib_sd: float = 0.2,
        n_programs: int = 3,
    ) -> SimulatedWorld:
        """Draw a world; ``batch_sd`` is the sd of the gene-wise log batch effects."""
        rng = np.random.default_rng(seed)
        genes = _gene_symbols(n_genes, rng)
        base = rng.normal(0.0, 1.5, n_genes)
        n_lineages = max(2, round(np.sqrt(n_types)))
        lineages = np.zeros((n_lineages, n_genes))
        for lin in lineages:
            de = rng.random(n_genes) < 0.08
            lin[de] = rng.normal(0.0, 1.2, de.sum())
        type_lfc = np.zeros((n_types, n_genes))
        for k in range(n_types):
            de = rng.random(n_genes) < 0.04
            t = lineages[k % n_lineages].copy()
            t[de] += rng.normal(0.0, 0.8, de.sum())
            markers = rng.choice(n_genes, min(5, n_genes), replace=False)
            t[markers] += rng.uniform(2.0, 3.0, markers.size)
            type_lfc[k] = t
        type_probs = rng.dirichlet(np.full(n_types, 3.0))
        programs = np.zeros((n_programs, n_genes))
        for p in programs:
            de = rng.random(n_genes) < 0.05
            p[de] = rng.normal(0.0, 0.7, de.sum())
        theta = np.exp(rng.normal(np.log(5.0), 0.7, n_genes))
        batch_lfc = rng.normal(0.0, batch_sd, (len(batches), n_genes))
        batch_lib = rng.normal(0.0, 0.1, len(batches))
        return cls(
            genes=tuple(genes),
            cell_types=tuple(f"type_{k:02d}" for k in range(n_types)),
            batches=tuple(batches),
            base=base,
            type_lfc=type_lfc,
            type_probs=type_probs,
            programs=programs,
            theta=theta,
            batch_lfc=batch_lfc,
            batch_lib=batch_lib,
            lib_mean=lib_mean,
            lib_sd=lib_sd,
        )

    def sample_chunks(
        self,
        n_cells: int,
        batches: Sequence[str],
        *,
        seed: int,
        cell_types: Sequence[str] | None = None,
        chunk: int = 4000,
    ) -> Iterator[tuple[sp.csr_matrix, pd.DataFrame]]:
        """Yield ``(counts, obs)`` chunks, so that very large samples never sit in memory.

        ``cell_types`` restricts the sample to those types (e.g. to hold types out of a
        reference); composition within each batch is perturbed around the global one.
        """
        rng = np.random.default_rng(seed)
        batch_idx = np.array([self.batches.index(b) for b in batches])
        allowed = np.arange(len(self.cell_types))
        if cell_types is not None:
            allowed = np.array([self.cell_types.index(t) for t in cell_types])
        probs = self.type_probs[allowed] / self.type_probs[allowed].sum()
        batch_of = rng.integers(len(batches), size=n_cells)
        types = np.empty(n_cells, dtype=np.int64)
        for i in range(len(batches)):
            in_batch = batch_of == i
            p = rng.dirichlet(50.0 * probs)
            types[in_batch] = allowed[rng.choice(len(p), size=in_batch.sum(), p=p)]
        cat_batches = pd.CategoricalDtype(list(batches))
        cat_types = pd.CategoricalDtype(list(self.cell_types))
        for start in range(0, n_cells, chunk):
            stop = min(n_cells, start + chunk)
            t = types[start:stop]
            b = batch_idx[batch_of[start:stop]]
            scores = rng.normal(0.0, 0.5, (stop - start, self.programs.shape[0]))
            logit = self.base + self.type_lfc[t] + scores @ self.programs + self.batch_lfc[b]
            logit -= logit.max(axis=1, keepdims=True)
            p = np.exp(logit)
            p /= p.sum(axis=1, keepdims=True)
            lib = np.exp(rng.normal(np.log(self.lib_mean) + self.batch_lib[b], self.lib_sd))
            mu = p * lib[:, None]
            lam = rng.gamma(self.theta, mu / self.theta)
            counts = sp.csr_matrix(rng.poisson(lam).astype(np.float32))
            obs = pd.DataFrame(
                {
                    "batch": pd.Categorical.from_codes(batch_of[start:stop], dtype=cat_batches),
                    "cell_type": pd.Categorical.from_codes(t, dtype=cat_types),
                }
            )
            yield counts, obs


def _to_anndata(
    chunks: Iterator[tuple[sp.csr_matrix, pd.DataFrame]], genes: Sequence[str], prefix: str
) -> ad.AnnData:
    """Stack simulator chunks into one AnnData with raw counts in ``X`` (CSR float32)."""
    mats, obs = zip(*chunks, strict=True)
    frame = pd.concat(obs, ignore_index=True)
    frame.index = pd.Index([f"{prefix}{i}" for i in range(len(frame))])
    var = pd.DataFrame(index=pd.Index(list(genes)))
    return ad.AnnData(X=sp.vstack(mats).tocsr(), obs=frame, var=var)


def simulate(
    n_cells: int = 2000,
    *,
    n_genes: int = 500,
    n_types: int = 6,
    n_batches: int = 3,
    seed: int = 0,
    batch_sd: float = 0.4,
) -> ad.AnnData:
    """One simulated data set with ``batch`` and ``cell_type`` in ``obs``.

    Counts are integers stored as float32 in a CSR ``X``; genes are symbol-like names.
    """
    names = [f"batch_{i}" for i in range(n_batches)]
    world = SimulatedWorld.create(
        n_genes=n_genes, n_types=n_types, batches=names, seed=seed, batch_sd=batch_sd
    )
    return _to_anndata(world.sample_chunks(n_cells, names, seed=seed + 1), world.genes, "cell_")


def simulate_reference_and_query(
    *,
    n_reference: int = 2000,
    n_query: int = 800,
    n_genes: int = 500,
    n_types: int = 6,
    reference_batches: int = 3,
    query_batches: int = 2,
    seed: int = 0,
    batch_sd: float = 0.4,
    held_out_types: Sequence[str] = (),
    missing_fraction: float = 0.0,
    extra_fraction: float = 0.0,
    shuffle_genes: bool = False,
) -> tuple[ad.AnnData, ad.AnnData]:
    """A reference and a query drawn from one world, the query from new batches.

    ``held_out_types`` are absent from the reference but present in the query. The query can
    lack a fraction of the reference genes, carry extra genes, and come with shuffled genes,
    as real queries do.
    """
    ref_names = [f"ref_b{i}" for i in range(reference_batches)]
    qry_names = [f"qry_b{i}" for i in range(query_batches)]
    n_extra = int(np.ceil(extra_fraction * n_genes))
    world = SimulatedWorld.create(
        n_genes=n_genes + n_extra,
        n_types=n_types,
        batches=ref_names + qry_names,
        seed=seed,
        batch_sd=batch_sd,
    )
    ref_types = [t for t in world.cell_types if t not in set(held_out_types)]
    ref = _to_anndata(
        world.sample_chunks(n_reference, ref_names, seed=seed + 1, cell_types=ref_types),
        world.genes,
        "ref_",
    )[:, :n_genes].copy()
    ref.obs["cell_type"] = ref.obs["cell_type"].cat.remove_unused_categories()
    query = _to_anndata(world.sample_chunks(n_query, qry_names, seed=seed + 2), world.genes, "qry_")
    rng = np.random.default_rng(seed + 3)
    n_missing = round(missing_fraction * n_genes)
    keep = np.sort(rng.choice(n_genes, n_genes - n_missing, replace=False))
    cols = np.concatenate([keep, np.arange(n_genes, n_genes + n_extra)])
    if shuffle_genes:
        cols = rng.permutation(cols)
    return ref, query[:, cols].copy()
