#!/usr/bin/env python
"""Map a million-cell query from disk in bounded memory (issue 8's streaming target).

1. Simulates a reference (5k cells, 2000 genes, labelled) and trains it briefly.
2. Writes a query of ``--cells`` cells × 2000 genes as ``.h5ad`` in chunks: the simulator
   yields 4,000 cells at a time, appended to resizable HDF5 datasets, so the file is never
   held in memory while it is written.
3. Runs ``hubarches map REF QUERY.h5ad --backed --epochs E --out MAPPED.h5ad`` in a fresh
   process and reports its peak RSS, wall time, and cells per second of query training.

Usage::

    python bench/stream_1m.py --out bench/out/stream [--cells 1000000] [--epochs 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

import anndata as ad
import h5py
import numpy as np
import pandas as pd
import torch

from hubarches import TrainOptions, train_atlas
from hubarches.datasets import SimulatedWorld

N_GENES = 2000
REF_CELLS = 5000
LIB_MEAN = 2000.0
"""UMIs per cell: about 600 of 2000 genes nonzero, close to real 10x data on 2000 HVGs."""
CHUNK = 4000


def _world(seed: int) -> SimulatedWorld:
    batches = [f"ref_b{i}" for i in range(4)] + [f"qry_b{i}" for i in range(2)]
    return SimulatedWorld.create(
        n_genes=N_GENES, n_types=10, batches=batches, seed=seed, lib_mean=LIB_MEAN
    )


def _reference(world: SimulatedWorld, out: Path, seed: int) -> Path:
    """Train a small labelled reference on the world's reference batches; save its bundle."""
    bundle = out / "reference"
    if (bundle / "manifest.json").is_file():
        return bundle
    mats, obs = zip(
        *world.sample_chunks(
            REF_CELLS, [b for b in world.batches if b.startswith("ref")], seed=seed + 1
        ),
        strict=True,
    )
    import scipy.sparse as sp

    frame = pd.concat(obs, ignore_index=True)
    frame.index = [f"ref_{i}" for i in range(len(frame))]
    adata = ad.AnnData(
        X=sp.vstack(mats).tocsr(), obs=frame, var=pd.DataFrame(index=list(world.genes))
    )
    result = train_atlas(
        adata,
        batch_key="batch",
        label_key="cell_type",
        options=TrainOptions(epochs=20, seed=seed),
        description="stream benchmark reference",
    )
    result.reference.save(bundle)
    return bundle


def write_query(world: SimulatedWorld, path: Path, n_cells: int, seed: int) -> float:
    """Write the query .h5ad chunk by chunk; return the seconds it took."""
    start = time.perf_counter()
    tmp = path.with_suffix(".tmp.h5ad")
    query_batches = [b for b in world.batches if b.startswith("qry")]
    obs_parts = []
    with h5py.File(tmp, "w") as f:
        group = f.create_group("X")
        data = group.create_dataset(
            "data", (0,), maxshape=(None,), dtype="float32", chunks=(1 << 20,)
        )
        indices = group.create_dataset(
            "indices", (0,), maxshape=(None,), dtype="int32", chunks=(1 << 20,)
        )
        indptr = [0]
        for counts, obs in world.sample_chunks(n_cells, query_batches, seed=seed + 2, chunk=CHUNK):
            n = data.shape[0]
            data.resize((n + counts.nnz,))
            indices.resize((n + counts.nnz,))
            data[n:] = counts.data
            indices[n:] = counts.indices
            indptr.extend((counts.indptr[1:] + n).tolist())
            obs_parts.append(obs)
        group.create_dataset("indptr", data=np.asarray(indptr, dtype=np.int64))
        group.attrs.update(
            {
                "encoding-type": "csr_matrix",
                "encoding-version": "0.1.0",
                "shape": (n_cells, N_GENES),
            }
        )
    # obs and var through anndata (small), then the matrix group moved in.
    frame = pd.concat(obs_parts, ignore_index=True)
    frame.index = [f"qry_{i}" for i in range(n_cells)]
    ad.AnnData(obs=frame, var=pd.DataFrame(index=list(world.genes))).write_h5ad(path)
    with h5py.File(tmp, "r") as src, h5py.File(path, "r+") as dst:
        if "X" in dst:
            del dst["X"]
        src.copy(src["X"], dst, name="X")
    tmp.unlink()
    return time.perf_counter() - start


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--out", type=Path, default=Path("bench/out/stream"))
    ap.add_argument("--cells", type=int, default=1_000_000)
    ap.add_argument("--epochs", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    args.out.mkdir(parents=True, exist_ok=True)
    world = _world(args.seed)
    bundle = _reference(world, args.out, args.seed)
    query = args.out / f"query_{args.cells}.h5ad"
    write_s = None
    if not query.is_file():
        write_s = write_query(world, query, args.cells, args.seed)
    mapped = args.out / "mapped.h5ad"
    cmd = [
        sys.executable, "-m", "hubarches", "map", str(bundle), str(query),
        "--batch-key", "batch", "--out", str(mapped), "--backed", "--epochs", str(args.epochs),
        "--quiet", "--json",
    ]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads)}
    start = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True, env=env, check=False)
    wall = time.perf_counter() - start
    if done.returncode != 0:
        sys.exit(f"map failed ({done.returncode}):\n{done.stderr}")
    peak_gb = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024**2
    report = json.loads(done.stdout)
    timings = report.get("report", report).get("timings_s", {})
    result = {
        "cells": args.cells,
        "genes": N_GENES,
        "query_file_gb": round(query.stat().st_size / 1024**3, 2),
        "write_query_s": None if write_s is None else round(write_s, 1),
        "epochs": args.epochs,
        "map_wall_s": round(wall, 1),
        "map_peak_rss_gb": round(peak_gb, 2),
        "timings_s": {k: round(v, 1) for k, v in timings.items()},
        "training_cells_per_s": round(args.cells * args.epochs / timings["query_training"])
        if timings.get("query_training")
        else None,
        "embedding_cells_per_s": round(args.cells / timings["embedding"])
        if timings.get("embedding")
        else None,
    }
    print(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
