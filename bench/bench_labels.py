"""Time label transfer + mapping quality: 100k query cells onto 100k reference cells.

Usage: .venv/bin/python bench/bench_labels.py [--n-ref 100000] [--n-query 100000] [--dims 10]
       [--decay 1.0] [--eps 0 0.25]
Latents are Gaussian blobs, one per type, with a few types only in the query. ``--decay 1``
gives isotropic blobs, the hardest case for a kd-tree (intrinsic dimension = dims); a trained
cVAE's latent has a decaying spectrum (try ``--decay 0.7``: sd × 0.7^j along axis j). Prints
seconds for the index build, the neighbour query, the vote, mapping quality (including the
leave-self-out spread of every reference cell that is some query cell's neighbour: a second
search, of up to n-ref cells), the total, query cells per second and the process CPU time
(a check on wall times taken on a busy machine); with several ``--eps``, agreement with the
first.
"""

from __future__ import annotations

import argparse
import os
import time

import numpy as np

from hubarches import labels
from hubarches.neighbors import reference_spread


def blobs(
    n: int, centres: np.ndarray, decay: float, rng: np.random.Generator
) -> tuple[np.ndarray, np.ndarray]:
    codes = rng.integers(0, len(centres), n)
    sd = 0.6 * decay ** np.arange(centres.shape[1])
    x = centres[codes] + rng.normal(0.0, 1.0, (n, centres.shape[1])) * sd
    return x.astype(np.float32), codes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--n-ref", type=int, default=100_000)
    p.add_argument("--n-query", type=int, default=100_000)
    p.add_argument("--dims", type=int, default=10)
    p.add_argument("--types", type=int, default=30)
    p.add_argument("--unseen", type=int, default=3, help="query-only types")
    p.add_argument("--decay", type=float, default=1.0, help="per-axis sd decay within a type")
    p.add_argument("--k", type=int, default=labels.DEFAULT_K)
    p.add_argument("--eps", type=float, nargs="+", default=[labels.SEARCH_EPS])
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument(
        "--stored-spread",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="seed the index with the reference spread a bundle stores (as map does)",
    )
    a = p.parse_args()

    rng = np.random.default_rng(0)
    centres = rng.normal(0.0, 2.0, (a.types + a.unseen, a.dims))
    ref, ref_codes = blobs(a.n_ref, centres[: a.types], a.decay, rng)
    query, query_codes = blobs(a.n_query, centres, a.decay, rng)
    cats = tuple(f"type{i}" for i in range(a.types))
    cpus = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"reference {a.n_ref} × {a.dims}, query {a.n_query}, k={a.k}, decay {a.decay}, "
        f"{cpus} CPUs, load average {os.getloadavg()[0]:.1f}"
    )

    # What a bundle stores at training: each reference cell's own neighbour spread, so that
    # a mapping's quality score needs no search of the whole reference (timed separately).
    t = time.perf_counter()
    stored = (a.k, reference_spread(labels.build_index(ref), np.arange(len(ref)), a.k))
    print(f"reference spread, computed once at training: {time.perf_counter() - t:.3f}s")

    first = None
    for eps in a.eps:
        for rep in range(a.repeats):
            c0 = time.process_time()
            t0 = time.perf_counter()
            index = labels.build_index(ref, eps=eps, spread=stored if a.stored_spread else None)
            t1 = time.perf_counter()
            dist, idx = index.query(query, a.k)
            t2 = time.perf_counter()
            transfer = labels.transfer_from_neighbors(dist, idx, ref_codes, cats)
            t3 = time.perf_counter()
            quality = labels.quality_from_neighbors(index, dist, idx)
            t4 = time.perf_counter()
            cpu = time.process_time() - c0
            total = t4 - t0
            print(
                f"eps {eps} run {rep}: build {t1 - t0:.3f}s  query {t2 - t1:.3f}s  "
                f"vote {t3 - t2:.3f}s  quality {t4 - t3:.3f}s  total {total:.3f}s  "
                f"{a.n_query / total:,.0f} cells/s  (CPU time {cpu:.2f}s)"
            )
        seen = query_codes < a.types
        print(
            f"  seen types: accuracy {(transfer.codes[seen] == query_codes[seen]).mean():.4f}, "
            f"Unknown {np.mean(transfer.codes[seen] < 0):.4f}, flagged "
            f"{np.mean(~quality.ok[seen]):.4f}; unseen types: flagged "
            f"{np.mean(~quality.ok[~seen]):.3f}, Unknown by vote alone "
            f"{np.mean(transfer.codes[~seen] < 0):.3f}"
        )
        if first is None:
            first = (idx, transfer, quality)
        else:
            same = (idx[:, :, None] == first[0][:, None, :]).any(axis=2).mean()
            print(
                f"  vs eps {a.eps[0]}: neighbours shared {same:.4f}, labels equal "
                f"{np.mean(transfer.codes == first[1].codes):.5f}, flags equal "
                f"{np.mean(quality.ok == first[2].ok):.5f}"
            )


if __name__ == "__main__":
    main()
