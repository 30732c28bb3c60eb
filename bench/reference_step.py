"""Reference training's step by hand against autograd's, paired on the same minibatches.

Two copies of one fresh model train side by side: one with :class:`hubarches.fastref.ReferenceStep`
(what ``train_reference`` uses where it can), one through ``CVAE.loss``, autograd and
hubarches' Adam (what it uses elsewhere). Each minibatch goes to both, one after the other,
and each step is timed alone, so that the host's drift falls on both alike.

    .venv/bin/python bench/reference_step.py --cells 5000 --epochs 3 --threads 2
        [--likelihood zinb|nb|poisson] [--dispersion gene|gene-batch]
"""

from __future__ import annotations

import argparse
import copy
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import numpy as np
import torch
from common import BATCH_KEY, LABEL_KEY
from run_hubarches import ARCHITECTURE

from hubarches.batching import CountMatrix
from hubarches.config import ModelConfig, TrainOptions
from hubarches.data import prepare_reference
from hubarches.datasets import simulate_reference_and_query
from hubarches.fastnet import AdamSettings
from hubarches.fastref import reference_step
from hubarches.model import build_model
from hubarches.optim import Adam
from hubarches.train import _log_library, data_log_factorial


def main() -> None:
    """Train both copies on the same minibatches and print the medians of their step times."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--cells", type=int, default=5000)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--epochs", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--skip", type=int, default=20, help="first steps left out (warm-up)")
    ap.add_argument("--likelihood", choices=["zinb", "nb", "poisson"], default="zinb")
    ap.add_argument("--dispersion", choices=["gene", "gene-batch"], default="gene")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    ref, _ = simulate_reference_and_query(
        n_reference=args.cells, n_query=10, n_genes=args.genes, n_types=10,
        reference_batches=4, query_batches=1, seed=0,
    )  # fmt: skip
    prepared = prepare_reference(ref, batch_key=BATCH_KEY, label_key=LABEL_KEY)
    config = ModelConfig(
        n_genes=len(prepared.genes),
        covariate_sizes=tuple(len(c) for _, c in prepared.covariates),
        **{**ARCHITECTURE, "likelihood": args.likelihood, "dispersion": args.dispersion},
    )
    counts = CountMatrix.from_matrix(prepared.X)
    codes = torch.as_tensor(prepared.codes, dtype=torch.int64)
    log_library, factorial = _log_library(counts.library()), data_log_factorial(counts)
    options = TrainOptions()
    by_hand = build_model(config, seed=0)
    plain = copy.deepcopy(by_hand)
    by_hand.train()
    plain.train()
    settings = AdamSettings(lr=options.lr, eps=options.adam_eps, weight_decay=options.weight_decay)
    step = reference_step(
        by_hand, codes, log_library=log_library, factorial=factorial, adam=settings
    )
    if step is None:
        raise SystemExit("the hand-written step does not run here (no C extension?)")
    adam = Adam(
        list(plain.parameters()), lr=options.lr, eps=options.adam_eps,
        weight_decay=options.weight_decay,
    )  # fmt: skip
    generator = torch.Generator().manual_seed(0)
    rng = np.random.default_rng(0)
    fast, slow = [], []
    for _ in range(args.epochs):
        for rows, batch in counts.batches(np.arange(counts.n_cells), 128, rng):
            if len(rows) < 128:
                continue
            again = counts.minibatch(rows)
            start = time.perf_counter()
            step(rows, batch, generator, 0.01)
            fast.append(time.perf_counter() - start)
            start = time.perf_counter()
            index = torch.as_tensor(rows)
            terms = plain.loss(
                again.x, codes[rows], generator=generator, nonzero=again.stored_counts(),
                factorial=factorial[index], log_library=log_library[index], x_log=again.x_log,
            )  # fmt: skip
            loss = terms.total(0.01)
            adam.zero_grad(set_to_none=True)
            loss.backward()
            adam.step()
            slow.append(time.perf_counter() - start)
    a, b = np.array(fast[args.skip :]), np.array(slow[args.skip :])
    print(
        f"{len(a)} steps of 128 cells x {args.genes} genes, {args.threads} threads: by hand "
        f"{np.median(a) * 1e3:.2f} ms, autograd {np.median(b) * 1e3:.2f} ms (medians); "
        f"autograd / by hand {np.median(b) / np.median(a):.2f}x (median of the pairs' "
        f"ratios {np.median(b / a):.2f}x)"
    )


if __name__ == "__main__":
    main()
