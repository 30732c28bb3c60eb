"""Query epochs with two ways of a step swapped epoch by epoch, in one run.

``--swap products`` (the default): MKL's products and hubarches' kernels for the frozen heads.
``--swap math``: the likelihood core's inline ``exp``/``log`` and libm's (``_fastcore.set_math``).
A shared host's speed drifts by tens of per cent between runs, more than the few per cent
between two such ways; swapping them every epoch inside one query training puts both under
the same load. Prints, for each, the median and the fastest epoch.

    .venv/bin/python bench/alternate_products.py [--swap products|math] [--epochs 80]
        [--ref-epochs 10] [--threads 2]

It reaches into query training's step (``hubarches.train.query_step`` and the bound
products of :class:`hubarches.gemm.FrozenProduct`), so it checks what it relies on.
"""

from __future__ import annotations

import argparse
import time
from typing import Any

import numpy as np
import torch
from common import BATCH_KEY, LABEL_KEY
from run_hubarches import ARCHITECTURE

import hubarches.train as training
from hubarches import gemm, native
from hubarches.batching import CountMatrix
from hubarches.config import ModelConfig
from hubarches.data import prepare_query, prepare_reference
from hubarches.datasets import simulate_reference_and_query
from hubarches.model import build_model
from hubarches.surgery import grow, plan_surgery
from hubarches.train import TrainOptions, train_query, train_reference

BATCH = 128


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--epochs", type=int, default=80, help="query epochs, half with each")
    ap.add_argument("--ref-epochs", type=int, default=10)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--swap", choices=["products", "math"], default="products")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    if args.swap == "math" and native._fastcore is None:
        raise SystemExit("the C core is not built: nothing to compare")
    if args.swap == "products" and not gemm.kernels_supported():
        raise SystemExit("hubarches' kernels do not run here: nothing to compare")

    ref, query = simulate_reference_and_query(
        n_reference=5000, n_query=2000, n_genes=2000, n_types=10, reference_batches=4,
        query_batches=2, seed=0,
    )  # fmt: skip
    prepared = prepare_reference(ref, batch_key=BATCH_KEY, label_key=LABEL_KEY)
    config = ModelConfig(
        n_genes=len(prepared.genes),
        covariate_sizes=tuple(len(c) for _, c in prepared.covariates),
        **ARCHITECTURE,
    )  # the harness' architecture
    model = build_model(config, seed=0)
    options = {"batch_size": BATCH, "seed": 0}
    train_reference(
        model, CountMatrix.from_matrix(prepared.X), prepared.codes,
        options=TrainOptions(epochs=args.ref_epochs, **options),
    )  # fmt: skip
    pq = prepare_query(
        query, genes=prepared.genes, covariates=prepared.covariates, batch_key=BATCH_KEY
    )
    extension = grow(model, plan_surgery(prepared.covariates, pq.covariates.new_categories).n_new)

    bound: list[tuple[Any, torch.Tensor, torch.Tensor, bool]] = []
    real_bind = gemm.FrozenProduct._bind

    def recording_bind(self: Any, a: torch.Tensor, out: torch.Tensor, *, transposed: bool) -> Any:
        bound.append((self, a, out, transposed))
        return real_bind(self, a, out, transposed=transposed)

    steps: list[Any] = []
    real_step = training.query_step

    def recording_step(*a: Any, **k: Any) -> Any:
        step = real_step(*a, **k)
        steps.append(step)
        return step

    gemm.FrozenProduct._bind = recording_bind  # type: ignore[method-assign]
    training.query_step = recording_step  # type: ignore[assignment]
    ticks: list[float] = []
    modes: list[str] = []
    ways: dict[str, tuple[Any, Any]] = {}

    def swap_math(*_: Any) -> None:
        ticks.append(time.perf_counter())
        mode = list(ways)[len(ticks) % 2]
        native._fastcore.set_math(1 if mode == "inline exp/log" else 0)
        modes.append(mode)

    def swap(*_: Any) -> None:
        ticks.append(time.perf_counter())
        step = steps[0]
        if not ways:  # after the first epoch: the full-batch buffers exist
            assert step is not None, "query training did not take the C step"
            full = {t: (a, out) for _, a, out, t in bound if a.shape[0] == BATCH}
            kernels = gemm.FrozenProduct(bound[0][0].weight, use_kernels=True)
            torch_mm = gemm.FrozenProduct(bound[0][0].weight, use_kernels=False)
            assert kernels.uses_kernels
            assert not torch_mm.uses_kernels
            for name, product in (("kernels", kernels), ("torch.mm (MKL)", torch_mm)):
                ways[name] = (
                    product.bind_forward(*full[True]),
                    product.bind_backward(*full[False]),
                )
        mode = list(ways)[len(ticks) % 2]
        step._products[BATCH] = ways[mode]
        modes.append(mode)

    if args.swap == "math":
        ways.update({"inline exp/log": (None, None), "libm exp/log": (None, None)})
    try:
        train_query(
            extension, CountMatrix.from_matrix(pq.X), pq.covariates.codes,
            options=TrainOptions(epochs=args.epochs + 1, weight_decay=0.0,
                                 dropout_in_query=True, **options),
            progress=swap_math if args.swap == "math" else swap,
        )  # fmt: skip
    finally:
        if native._fastcore is not None:
            native._fastcore.set_math(-1)
    epochs = np.diff(ticks)
    print(f"{len(epochs)} query epochs of {pq.X.shape[0]} cells, {args.threads} threads")
    for mode in ways:
        times = np.array([t for t, m in zip(epochs, modes[:-1], strict=True) if m == mode])
        median, fastest = np.median(times) * 1e3, times.min() * 1e3
        print(f"  {mode:15s} median {median:6.1f} ms, fastest {fastest:6.1f} ms")


if __name__ == "__main__":
    main()
