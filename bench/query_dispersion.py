"""Query epochs by dispersion (one θ per gene, or per gene and batch), by hand and by autograd.

With gene-batch dispersion the query's new θ columns train, so the likelihood's log-gamma
terms are no constants of query training; the step by hand takes them every step
(:mod:`hubarches.fasttheta`). This prints, for each dispersion, the median query epoch of the
step by hand and of the autograd step on the same small simulated set. The ratios are far
beyond the host's drift; for a few per cent use an alternating comparison instead.

    .venv/bin/python bench/query_dispersion.py [--epochs 12] [--threads 2]
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from common import BATCH_KEY, LABEL_KEY
from run_hubarches import ARCHITECTURE

import hubarches.train as training
from hubarches.batching import CountMatrix
from hubarches.config import ModelConfig
from hubarches.data import prepare_query, prepare_reference
from hubarches.datasets import simulate_reference_and_query
from hubarches.model import build_model
from hubarches.surgery import grow, plan_surgery
from hubarches.train import TrainOptions, train_query, train_reference


def main() -> None:
    """Train one reference per dispersion, then time its query epochs both ways."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=12, help="query epochs per way")
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref, query = simulate_reference_and_query(
        n_reference=3000, n_query=2000, n_genes=2000, n_types=10, reference_batches=4,
        query_batches=2, seed=0,
    )  # fmt: skip
    prepared = prepare_reference(ref, batch_key=BATCH_KEY, label_key=LABEL_KEY)
    pq = prepare_query(
        query, genes=prepared.genes, covariates=prepared.covariates, batch_key=BATCH_KEY
    )
    n_new = plan_surgery(prepared.covariates, pq.covariates.new_categories).n_new
    sizes = tuple(len(c) for _, c in prepared.covariates)
    real_step = training.query_step
    for dispersion in ("gene", "gene-batch"):
        config = ModelConfig(
            n_genes=len(prepared.genes), covariate_sizes=sizes,
            **{**ARCHITECTURE, "dispersion": dispersion},
        )  # fmt: skip
        model = build_model(config, seed=0)
        train_reference(
            model, CountMatrix.from_matrix(prepared.X), prepared.codes,
            options=TrainOptions(epochs=2, batch_size=128, seed=0),
        )  # fmt: skip
        medians = {}
        for way in ("by hand", "autograd"):
            used: list[bool] = []

            def step(*a: object, _way: str = way, _used: list[bool] = used, **k: object) -> object:
                made = real_step(*a, **k) if _way == "by hand" else None  # type: ignore[arg-type]
                _used.append(made is not None)
                return made

            training.query_step = step  # type: ignore[assignment]
            ticks: list[float] = []
            try:
                train_query(
                    grow(model, n_new, seed=0), CountMatrix.from_matrix(pq.X),
                    pq.covariates.codes,
                    options=TrainOptions(epochs=args.epochs + 1, weight_decay=0.0,
                                         dropout_in_query=True, batch_size=128, seed=0),
                    progress=lambda *_, _t=ticks: _t.append(time.perf_counter()),
                )  # fmt: skip
            finally:
                training.query_step = real_step
            if used != [way == "by hand"]:
                raise SystemExit(f"{dispersion}: the step by hand did not run where asked")
            medians[way] = float(np.median(np.diff(ticks))) * 1e3
        print(
            f"{dispersion:10s} query epoch ({pq.X.shape[0]} cells, {args.threads} threads): "
            f"by hand {medians['by hand']:.1f} ms, autograd {medians['autograd']:.1f} ms "
            f"({medians['autograd'] / medians['by hand']:.1f}x)"
        )


if __name__ == "__main__":
    main()
