"""Pieces shared by the benchmark harness and both of its sides (hubarches and scvi-tools).

Only the standard library and numpy: the scvi-tools side imports this file from the peer's own
Python, where hubarches is not installed. Holds the data shapes, phase and epoch clocks that
also record how busy the rest of the machine was, the result file format, and the quality
metrics (computed by the harness from each side's latents, so both are scored by one code).
"""

from __future__ import annotations

import json
import os
import resource
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

# name: (reference cells, query cells); 2000 genes, 10 types, 4 + 2 batches (make_data.py's).
SIZES: dict[str, tuple[int, int]] = {"small": (5_000, 2_000), "medium": (50_000, 20_000)}
N_GENES = 2_000
N_TYPES = 10
REFERENCE_BATCHES = 4
QUERY_BATCHES = 2
BATCH_SD = 0.4
MISSING_FRACTION = 0.05
EXTRA_FRACTION = 0.03
BATCH_KEY = "batch"
LABEL_KEY = "cell_type"

K_NEIGHBOURS = 15  # kNN accuracy and mixing (shared/bench/README.md)
TRAIN_FRACTION = 0.9  # scvi-tools' default train_size
KNN_CHUNK = 512  # query rows per brute-force distance block: 512 × 70k floats ≈ 140 MB

_HZ = os.sysconf("SC_CLK_TCK")


# --- machine load ---------------------------------------------------------------------------


def cpu_sample() -> tuple[float, int, int]:
    """(wall seconds, busy jiffies of the whole machine, jiffies of this process)."""
    with Path("/proc/stat").open() as fh:
        v = [int(x) for x in fh.readline().split()[1:9]]
    busy = sum(v) - v[3] - v[4]  # minus idle and iowait
    with Path("/proc/self/stat").open() as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    own = int(fields[11]) + int(fields[12])  # utime + stime of all threads
    return time.perf_counter(), busy, own


def others_cores(before: tuple[float, int, int], after: tuple[float, int, int]) -> float:
    """Cores used on average by *other* processes between two samples."""
    wall = max(after[0] - before[0], 1e-9)
    others = (after[1] - before[1]) - (after[2] - before[2])
    return max(others / _HZ / wall, 0.0)


def peak_rss_mb() -> float:
    """Peak resident set size of this process so far, MiB (ru_maxrss is KiB on Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


# --- clocks ---------------------------------------------------------------------------------


EMBED_REPEATS = ("ref_embed_2", "ref_embed_3")
"""Phases that embed the reference cells again, after everything else: with the first
embedding they give a best-of-three throughput, free of one-time warm-up."""


def embed_passes(run: dict[str, Any]) -> list[float]:
    """Seconds of each of a run's reference embeddings: the first pass, then the repeats."""
    return [run["phases"][p]["s"] for p in ("ref_embed", *EMBED_REPEATS) if p in run["phases"]]


def best_embed_s(run: dict[str, Any]) -> float | None:
    """The fastest of a run's reference embeddings, in seconds."""
    times = embed_passes(run)
    return min(times) if times else None


@dataclass
class Phases:
    """Wall-clock seconds per named phase, with the load other processes put on the machine."""

    seconds: dict[str, float] = field(default_factory=dict)
    others: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def __call__(self, name: str) -> Iterator[None]:
        """Time the ``with`` block as phase ``name``."""
        s0 = cpu_sample()
        try:
            yield
        finally:
            s1 = cpu_sample()
            self.seconds[name] = s1[0] - s0[0]
            self.others[name] = others_cores(s0, s1)

    def to_dict(self) -> dict[str, dict[str, float]]:
        """``{phase: {"s": ..., "others_cores": ...}}``."""
        return {k: {"s": v, "others_cores": self.others[k]} for k, v in self.seconds.items()}


@dataclass
class EpochClock:
    """Seconds between consecutive epoch ends; the first counts from :meth:`start`.

    Both sides use this one definition (end of epoch to end of epoch), so per-epoch work
    outside the inner loop (metrics, validation, bookkeeping) is counted the same way.
    """

    seconds: list[float] = field(default_factory=list)
    others: list[float] = field(default_factory=list)
    _last: tuple[float, int, int] | None = None

    def start(self) -> None:
        """Mark the start of training (before any setup the first epoch includes)."""
        self._last = cpu_sample()

    def tick(self) -> None:
        """Mark the end of an epoch."""
        now = cpu_sample()
        if self._last is not None:
            self.seconds.append(now[0] - self._last[0])
            self.others.append(others_cores(self._last, now))
        self._last = now

    def to_dict(self, n_train_cells: int) -> dict[str, Any]:
        """Per-epoch seconds, load of other processes, and the cells each epoch trains on."""
        return {
            "s": [round(s, 6) for s in self.seconds],
            "others_cores": [round(o, 3) for o in self.others],
            "n_train_cells": int(n_train_cells),
        }


def mapping_seconds(result: dict[str, Any]) -> float:
    """Query mapping of one run: surgery + query training (all of it) + query embedding."""
    return float(sum(result["phases"][p]["s"] for p in ("surgery", "query_train", "query_embed")))


def steady_epoch(epochs: dict[str, Any]) -> float | None:
    """Median seconds per epoch, the first epoch (warm-up and setup) excluded when possible."""
    s = list(epochs.get("s", []))
    if not s:
        return None
    return float(np.median(s[1:] if len(s) > 1 else s))


def fastest_epoch(epochs: dict[str, Any]) -> float | None:
    """The shortest epoch after the first: what the code does when nothing else disturbs it."""
    s = list(epochs.get("s", []))
    return float(min(s[1:] if len(s) > 1 else s)) if s else None


# --- results --------------------------------------------------------------------------------


def write_json(path: str | os.PathLike[str], payload: dict[str, Any]) -> None:
    """Write a result file atomically (the harness may read it as soon as the child exits)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(payload, indent=1, default=str))
    tmp.replace(path)


def save_latents(
    path: str | os.PathLike[str],
    *,
    z_ref: np.ndarray,
    y_ref: np.ndarray,
    z_query: np.ndarray,
    y_query: np.ndarray,
) -> None:
    """Save both latents and their cell-type labels for the harness to score."""
    np.savez(
        path,
        z_ref=np.asarray(z_ref, np.float32),
        y_ref=np.asarray(y_ref).astype(str),
        z_query=np.asarray(z_query, np.float32),
        y_query=np.asarray(y_query).astype(str),
    )


def train_rows(n_cells: int, fraction: float, seed: int) -> np.ndarray:
    """The sorted rows a tool trains on when it holds ``1 - fraction`` of the cells out."""
    n_train = int(np.ceil(fraction * n_cells))
    return np.sort(np.random.default_rng(seed).permutation(n_cells)[:n_train])


# --- quality --------------------------------------------------------------------------------


def knn_indices(points: np.ndarray, queries: np.ndarray, k: int) -> np.ndarray:
    """Indices of the ``k`` nearest ``points`` (Euclidean) of each query row, nearest first.

    Exact brute force in blocks; latents have ~10 dimensions, so this is a few GFLOP even
    for the medium set, and it needs no dependency beyond numpy.
    """
    points = np.asarray(points, np.float64)
    queries = np.asarray(queries, np.float64)
    k = min(k, len(points))
    sq_points = np.einsum("ij,ij->i", points, points)
    out = np.empty((len(queries), k), dtype=np.int64)
    for start in range(0, len(queries), KNN_CHUNK):
        q = queries[start : start + KNN_CHUNK]
        d = sq_points[None, :] - 2.0 * (q @ points.T) + np.einsum("ij,ij->i", q, q)[:, None]
        part = np.argpartition(d, k - 1, axis=1)[:, :k]
        order = np.argsort(np.take_along_axis(d, part, axis=1), axis=1, kind="stable")
        out[start : start + len(q)] = np.take_along_axis(part, order, axis=1)
    return out


def knn_quality(
    z_ref: np.ndarray,
    y_ref: np.ndarray,
    z_query: np.ndarray,
    y_query: np.ndarray,
    *,
    k: int = K_NEIGHBOURS,
) -> dict[str, float]:
    """kNN label-transfer accuracy and mixing, as defined in shared/bench/README.md.

    Accuracy: majority vote of the ``k`` nearest reference cells (ties to the first label in
    sorted order, as scikit-learn does). Mixing: the mean share of each query cell's ``k``
    neighbours in the joint latent (itself excluded) that are reference cells, against the
    share expected from cell counts within its true type (composition-aware) and overall.
    """
    y_ref = np.asarray(y_ref).astype(str)
    y_query = np.asarray(y_query).astype(str)
    classes, ref_codes = np.unique(y_ref, return_inverse=True)
    votes = ref_codes[knn_indices(z_ref, z_query, k)]
    counts = np.zeros((len(z_query), len(classes)), dtype=np.int64)
    np.add.at(counts, (np.arange(len(z_query))[:, None], votes), 1)
    pred = classes[counts.argmax(axis=1)]
    correct = pred == y_query
    present = np.unique(y_query)
    balanced = float(np.mean([correct[y_query == c].mean() for c in present]))

    n_ref = len(z_ref)
    joint = np.vstack([z_ref, z_query])
    neighbours = knn_indices(joint, z_query, k + 1)
    self_index = np.arange(len(z_query)) + n_ref
    share = np.empty(len(z_query))
    for i, row in enumerate(neighbours):
        share[i] = np.mean(row[row != self_index[i]][:k] < n_ref)
    expected_type = np.empty(len(z_query))
    for c in present:
        in_c = y_query == c
        nr, nq = int(np.sum(y_ref == c)), int(in_c.sum())
        expected_type[in_c] = nr / max(nr + nq - 1, 1)
    observed = float(share.mean())
    expected = float(expected_type.mean())
    return {
        "knn_accuracy": float(correct.mean()),
        "knn_balanced_accuracy": balanced,
        "mixing_observed": observed,
        "mixing_expected": expected,
        "mixing_ratio": observed / expected if expected > 0 else float("nan"),
        "mixing_expected_global": n_ref / (n_ref + len(z_query) - 1),
    }
