"""Time query preparation on a large synthetic sparse query (issue 4).

A CSR query of ``--cells`` cells × ``--genes`` genes with a few hundred non-zeros per cell
(log-normal library sizes; a dense block of commonly detected genes, the rest sparse) is
aligned to a ``--ref-genes`` reference drawn mostly from the commonly detected genes, in
shuffled order, with a few reference genes absent from the query. Reported: gene matching,
the alignment (``GeneAlignment.transform``), the count check on the aligned values (what
prepare_query checks) and on all stored query values, and ``prepare_query`` end to end.

    .venv/bin/python bench/bench_align.py                       # 1M cells × 30k genes → 2k
    .venv/bin/python bench/bench_align.py --cells 100000 --json out.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import time
from pathlib import Path

import anndata as ad
import numpy as np
import pandas as pd
import scipy.sparse as sp

from hubarches.data import check_counts, prepare_query
from hubarches.genes import align_genes

N_COMMON = 5000  # commonly detected genes (first columns before names are shuffled)
COMMON_NNZ, RARE_NNZ = 200, 100  # mean non-zeros per cell in each block
REF_FROM_COMMON = 0.85  # share of reference genes drawn from the commonly detected block
REF_MISSING = 0.03  # share of reference genes the query lacks


def _block(rng, n, lo, hi, k):
    """Sorted unique column indices in [lo, hi) per row, k[i] draws for row i; (cols, valid)."""
    kmax = int(min(hi - lo, max(1, k.max())))
    cols = rng.integers(lo, hi, size=(n, kmax), dtype=np.int32)
    cols[np.arange(kmax)[None, :] >= k[:, None]] = np.iinfo(np.int32).max
    cols.sort(axis=1)
    valid = cols < hi
    valid[:, 1:] &= cols[:, 1:] != cols[:, :-1]
    return cols, valid


def synthetic_query(n_cells, n_genes, seed, chunk=20_000):
    """A CSR float32 count matrix with sorted indices, generated in row chunks."""
    rng = np.random.default_rng(seed)
    datas, indices, row_nnz = [], [], []
    for start in range(0, n_cells, chunk):
        n = min(chunk, n_cells - start)
        size = rng.lognormal(0.0, 0.4, n)
        size /= np.exp(0.08)  # mean 1
        k_common = np.minimum(rng.poisson(COMMON_NNZ * size), 3 * COMMON_NNZ)
        k_rare = np.minimum(rng.poisson(RARE_NNZ * size), 3 * RARE_NNZ)
        a, va = _block(rng, n, 0, N_COMMON, k_common)
        b, vb = _block(rng, n, N_COMMON, n_genes, k_rare)
        cols, valid = np.concatenate([a, b], axis=1), np.concatenate([va, vb], axis=1)
        picked = cols[valid]
        indices.append(picked)
        row_nnz.append(valid.sum(axis=1))
        datas.append(rng.geometric(0.45, size=picked.size).astype(np.float32))
    indptr = np.zeros(n_cells + 1, dtype=np.int64)
    np.cumsum(np.concatenate(row_nnz), out=indptr[1:])
    if indptr[-1] < np.iinfo(np.int32).max:
        indptr = indptr.astype(np.int32)
    matrix = sp.csr_matrix(
        (np.concatenate(datas), np.concatenate(indices), indptr), shape=(n_cells, n_genes)
    )
    matrix.has_sorted_indices = True
    return matrix


def gene_lists(n_genes, n_reference, seed):
    """Query gene names (shuffled over columns) and a reference list in its own order."""
    rng = np.random.default_rng(seed + 1)
    names = np.array([f"GENE{i}" for i in range(n_genes)], dtype=object)
    query_names = names[rng.permutation(n_genes)]
    n_missing = int(REF_MISSING * n_reference)
    n_common = int(REF_FROM_COMMON * (n_reference - n_missing))
    n_rare = n_reference - n_missing - n_common
    columns = np.concatenate(
        [
            rng.choice(N_COMMON, n_common, replace=False),
            N_COMMON + rng.choice(n_genes - N_COMMON, n_rare, replace=False),
        ]
    )
    reference = [*query_names[columns], *(f"ABSENT{i}" for i in range(n_missing))]
    return list(query_names), [reference[i] for i in rng.permutation(n_reference)]


CPU = {}  # label → process CPU seconds, beside the wall-clock figures (shared machines)


def timed(fn, label=None):
    start, cpu = time.perf_counter(), time.process_time()
    result = fn()
    if label:
        CPU[label] = time.process_time() - cpu
    return result, time.perf_counter() - start


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cells", type=int, default=1_000_000)
    parser.add_argument("--genes", type=int, default=30_000)
    parser.add_argument("--ref-genes", type=int, default=2_000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    matrix, t_gen = timed(lambda: synthetic_query(args.cells, args.genes, args.seed))
    matrix_gb = (matrix.data.nbytes + matrix.indices.nbytes + matrix.indptr.nbytes) / 2**30
    query_genes, reference_genes = gene_lists(args.genes, args.ref_genes, args.seed)
    n = args.cells
    print(
        f"query: {n:,} cells × {args.genes:,} genes, {matrix.nnz / n:.0f} non-zeros per cell "
        f"({matrix.nnz:,} in all), generated in {t_gen:.1f} s; reference: {args.ref_genes:,} "
        "genes"
    )

    alignment, t_match = timed(lambda: align_genes(query_genes, reference_genes), "match")

    # As prepare_query does: an in-memory sparse query is aligned in one piece (only
    # output-sized temporaries), then its aligned values are checked.
    aligned, t_align = timed(lambda: alignment.transform(matrix), "align")
    aligned_nnz = aligned.nnz
    _, t_check = timed(lambda a=aligned: check_counts(a), "check")
    del aligned
    _, t_check_raw = timed(lambda: check_counts(matrix), "check_all")

    adata = ad.AnnData(
        X=matrix,
        obs=pd.DataFrame(
            {"batch": pd.Categorical(np.arange(n) % 4).rename_categories(lambda c: f"b{c}")},
            index=pd.RangeIndex(n).astype(str),
        ),
        var=pd.DataFrame(index=pd.Index(query_genes)),
    )
    prepared, t_prepare = timed(
        lambda: prepare_query(
            adata,
            genes=reference_genes,
            covariates=[("batch", ("b0", "b1"))],
            batch_key="batch",
        ),
        "prepare",
    )

    figures = {
        "cells": n,
        "query_genes": args.genes,
        "reference_genes": args.ref_genes,
        "nnz_per_cell": matrix.nnz / n,
        "aligned_nnz_per_cell": aligned_nnz / n,
        "fraction_shared": alignment.report.fraction_shared,
        "gene_matching_s": t_match,
        "align_s": t_align,
        "count_check_aligned_s": t_check,
        "count_check_all_stored_values_s": t_check_raw,
        "prepare_query_s": t_prepare,
        "prepare_query_cells_per_s": n / t_prepare,
        "zero_count_cells": prepared.report.n_zero_count_cells,
        "cpu_s": CPU,
        "cpus": os.cpu_count(),
        "machine": platform.processor() or platform.machine(),
    }
    rows = [
        ("gene matching (names only)", t_match, "match"),
        ("alignment (GeneAlignment.transform)", t_align, "align"),
        ("count check, aligned values", t_check, "check"),
        ("count check, all stored values", t_check_raw, "check_all"),
        ("prepare_query end to end", t_prepare, "prepare"),
    ]
    print(f"{'':<36} {'wall':>8}   {'wall rate':>14}          {'CPU':>6}")
    for label, seconds, key in rows:
        rate = f"{n / seconds:>14,.0f} cells/s" if seconds > 0 and key != "match" else " " * 22
        print(f"{label:<36} {seconds:8.2f} s {rate} {CPU[key]:6.2f} s")
    peak_gb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20
    figures["peak_rss_gb"] = peak_gb
    print(
        f"aligned: {aligned_nnz / n:.0f} non-zeros per cell, "
        f"{alignment.report.fraction_shared:.1%} of reference genes shared; "
        f"peak RSS {peak_gb:.1f} GB (the query itself: {matrix_gb:.1f} GB)"
    )
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2))


if __name__ == "__main__":
    main()
