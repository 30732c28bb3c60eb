"""Matrix-multiply micro-benchmark and the arithmetic floor of a query (and reference) epoch.

GEMM throughput is measured at the shapes of one training step (batch B, hidden H, genes G,
latent L), for torch's products and, where the processor has AVX-512, for hubarches' own
kernels (``hubarches.gemm``, which query training uses wherever they run: on AMD processors
at about twice MKL's rate, on an Intel Xeon ~10 % above it). The floor
of an epoch is the multiply-adds the step needs with hubarches' design, summed over the
epoch's cells and divided by the best rate measured for each term, whichever code reached it:
a query epoch cannot take less time than that on this machine, whatever else is made faster.

    .venv/bin/python bench/micro.py --threads 2 --cells 1800      # small query, 90 % split
    .venv/bin/python bench/micro.py --json micro.json --cells 18000 --ref-cells 45000
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F  # noqa: N812

from hubarches.gemm import FrozenProduct, kernels_supported

ROUNDS = 3  # best of three rounds: the machine is shared, interference only slows things down
MIN_ROUND_S = 0.2  # each round runs at least this long


@dataclass(frozen=True)
class Dims:
    """The sizes of one training step."""

    batch: int = 128
    hidden: int = 128
    genes: int = 2000
    latent: int = 10
    heads: int = 2  # G-wide decoder heads: scale (softmax logits) + ZINB dropout logits


def _shapes(d: Dims) -> dict[str, tuple[int, Callable[[], torch.Tensor]]]:
    """Named GEMMs of a step: (multiply-adds per call, the call)."""
    b, h, g, lat = d.batch, d.hidden, d.genes, d.latent
    hid = torch.randn(b, h)
    w_head = torch.randn(g, h)  # nn.Linear(H, G).weight
    bias = torch.randn(g)
    grad = torch.randn(b, g)
    w_fused = torch.randn(2 * g, h)
    bias_fused = torch.randn(2 * g)
    grad_fused = torch.randn(b, 2 * g)
    x = torch.randn(b, g)
    w_enc = torch.randn(h, g)  # nn.Linear(G, H).weight
    w_small = torch.randn(lat, h)
    big = torch.randn(2048, 2048)
    shapes = {
        # forward of one G-wide head: [B,H] @ [H,G] + bias
        "head_fwd": (b * h * g, lambda: F.linear(hid, w_head, bias)),
        # input gradient through one head: [B,G] @ [G,H]
        "head_bwd_input": (b * g * h, lambda: grad @ w_head),
        # both heads as one GEMM, [B,H] @ [H,2G] (a possible fusion)
        "heads_fused_fwd": (2 * b * h * g, lambda: F.linear(hid, w_fused, bias_fused)),
        "heads_fused_bwd_input": (2 * b * g * h, lambda: grad_fused @ w_fused),
        # weight gradient of one head, [G,B] @ [B,H]: reference training only
        "head_weight_grad": (b * g * h, lambda: grad.t() @ hid),
        # encoder first layer forward, [B,G] @ [G,H]: reference training only
        "encoder_first_fwd": (b * g * h, lambda: F.linear(x, w_enc)),
        # an H×L product: call overhead, not arithmetic, sets its time
        "small_HxL": (b * h * lat, lambda: F.linear(hid, w_small)),
        "square_2048": (2048**3, lambda: big @ big),
    }
    if kernels_supported():  # hubarches' own products with a frozen matrix (no bias)
        one = FrozenProduct(w_head, use_kernels=True)
        both = FrozenProduct(w_fused, use_kernels=True)
        out_g, out_2g, out_h = torch.empty(b, g), torch.empty(b, 2 * g), torch.empty(b, h)
        shapes |= {
            "kernel_head_fwd": (b * h * g, lambda: one.forward(hid, out_g)),
            "kernel_head_bwd_input": (b * g * h, lambda: one.backward(grad, out_h)),
            "kernel_heads_fused_fwd": (2 * b * h * g, lambda: both.forward(hid, out_2g)),
            "kernel_heads_fused_bwd_input": (
                2 * b * g * h,
                lambda: both.backward(grad_fused, out_h),
            ),
        }
    return shapes


def gemm_rates(dims: Dims, *, threads: int | None = None) -> dict[str, float]:
    """GFLOP/s (2 FLOP per multiply-add) of each named GEMM, best of :data:`ROUNDS` rounds."""
    if threads is not None:
        torch.set_num_threads(threads)
    rates: dict[str, float] = {}
    with torch.no_grad():
        for name, (macs, call) in _shapes(dims).items():
            for _ in range(3):
                call()
            t0 = time.perf_counter()
            call()
            reps = max(1, int(MIN_ROUND_S / max(time.perf_counter() - t0, 1e-7)))
            best = float("inf")
            for _ in range(ROUNDS):
                t0 = time.perf_counter()
                for _ in range(reps):
                    call()
                best = min(best, (time.perf_counter() - t0) / reps)
            rates[name] = 2.0 * macs / best / 1e9
    return rates


def floor_rates(dims: Dims, *, threads: int) -> dict[str, dict[str, float]]:
    """Rates with ``threads`` threads and with one; the floor uses the better of the two.

    n threads can always do what one does, so the better rate is what the machine offers.
    On a busy machine a multi-threaded GEMM stalls at every barrier on a descheduled thread
    and runs far below the single-thread rate; taking the maximum keeps such a stall from
    inflating the floor (and so from making a slow epoch look close to it).
    """
    measured = {threads: gemm_rates(dims, threads=threads)}
    if threads != 1:
        measured[1] = gemm_rates(dims, threads=1)
        torch.set_num_threads(threads)
    best = {k: max(r[k] for r in measured.values()) for k in measured[threads]}
    return {"best": best, **{f"{n}_threads": r for n, r in measured.items()}}


# The measured products that compute each kind of term; a term is charged at the best of them.
FORWARD = ("head_fwd", "heads_fused_fwd", "kernel_head_fwd", "kernel_heads_fused_fwd")
BACKWARD_INPUT = (
    "head_bwd_input",
    "heads_fused_bwd_input",
    "kernel_head_bwd_input",
    "kernel_heads_fused_bwd_input",
)
Term = tuple[str, int, tuple[str, ...]]


def query_step_terms(d: Dims) -> list[Term]:
    """Multiply-adds per cell of one query-training step: (term, MACs, rates it may use).

    Only the covariate columns added by surgery train; every reference weight is frozen, so
    no weight gradient is a GEMM (the new columns' gradients are gathers/scatter-adds), and
    backward needs only the input gradients on the path from the loss to those columns.
    """
    g, h, lat, n = d.genes, d.hidden, d.latent, d.heads
    # The H×L terms are <1 % of the work; timed alone they measure call overhead, so they are
    # charged at the G-wide forward rate (what they would run at if batched with it).
    return [
        # Encoder layer 1, W_x·log1p(x) + b: frozen and data-only, computed once per cell
        # before training (not per epoch); only its covariate columns are added per step.
        ("encoder layer 1 forward (cached per cell)", 0, ()),
        # Encoder heads μ and log σ²: two H→L products.
        ("encoder heads forward, 2·H·L", 2 * h * lat, FORWARD),
        # Decoder hidden layer, z → H.
        ("decoder hidden forward, L·H", lat * h, FORWARD),
        # Decoder G-wide heads: scale (softmax logits) and, for ZINB, dropout logits.
        (f"decoder heads forward, {n}·H·G", n * h * g, FORWARD),
        # Backward through the frozen heads: input gradient only, no weight gradient.
        (f"decoder heads backward (input grad), {n}·G·H", n * g * h, BACKWARD_INPUT),
        # Decoder hidden layer backward to z (the encoder's new columns act through z).
        ("decoder hidden backward (input grad), H·L", h * lat, FORWARD),
        # Encoder heads backward to their input h (its new columns act through h).
        ("encoder heads backward (input grad), 2·L·H", 2 * lat * h, FORWARD),
        # Encoder layer 1 backward: x needs no gradient and W_x is frozen: nothing.
        ("encoder layer 1 backward", 0, ()),
    ]


def reference_step_terms(d: Dims) -> list[Term]:
    """Multiply-adds per cell of one reference-training step (every weight trains)."""
    g, h, lat, n = d.genes, d.hidden, d.latent, d.heads
    return [
        ("encoder layer 1 forward, G·H", g * h, ("encoder_first_fwd",)),
        ("encoder layer 1 weight grad, G·H", g * h, ("head_weight_grad",)),
        (f"decoder heads forward, {n}·H·G", n * h * g, FORWARD),
        (f"decoder heads backward (input grad), {n}·G·H", n * g * h, BACKWARD_INPUT),
        (f"decoder heads weight grad, {n}·G·H", n * g * h, ("head_weight_grad",)),
        # encoder heads (2·H·L) and decoder hidden (L·H): forward, weight and input grads
        ("H×L layers, forward + both grads, 9·H·L", 9 * h * lat, FORWARD),
    ]


def epoch_floor(terms: list[Term], rates: dict[str, float], n_cells: int) -> dict[str, object]:
    """Seconds an epoch over ``n_cells`` needs for its multiply-adds at the best measured rates."""
    seconds = 0.0
    rows = []
    for name, macs, shapes in terms:
        measured = [s for s in shapes if s in rates]
        shape = max(measured, key=rates.__getitem__) if measured else None
        flops = 2.0 * macs * n_cells
        s = flops / (rates[shape] * 1e9) if shape and macs else 0.0
        seconds += s
        rows.append({"term": name, "macs_per_cell": macs, "rate": shape, "s": s})
    macs_cell = sum(m for _, m, _ in terms)
    return {
        "n_cells": n_cells,
        "macs_per_cell": macs_cell,
        "gflop_per_epoch": 2.0 * macs_cell * n_cells / 1e9,
        "floor_s": seconds,
        "floor_s_at_square_rate": 2.0 * macs_cell * n_cells / (rates["square_2048"] * 1e9),
        "terms": rows,
    }


def run(dims: Dims, *, threads: int, cells: int, ref_cells: int | None) -> dict[str, object]:
    """Measure the rates and compute the floors."""
    measured = floor_rates(dims, threads=threads)
    rates = measured["best"]
    out: dict[str, object] = {
        "dims": dims.__dict__,
        "threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "gflops": rates,
        "gflops_measured": {k: v for k, v in measured.items() if k != "best"},
        "query_epoch": epoch_floor(query_step_terms(dims), rates, cells),
    }
    if ref_cells:
        out["reference_epoch"] = epoch_floor(reference_step_terms(dims), rates, ref_cells)
    return out


def render(result: dict[str, object]) -> str:
    """A plain-text summary of :func:`run`'s result."""
    measured = result["gflops_measured"]
    lines = [
        f"GEMM GFLOP/s ({result['cpu_capability']}): "
        + ", ".join(measured)  # type: ignore[arg-type]
        + ", best (used for the floor)"
    ]
    for name, rate in result["gflops"].items():  # type: ignore[union-attr]
        each = "".join(f"{r[name]:9.2f}" for r in measured.values())  # type: ignore[union-attr]
        lines.append(f"  {name:30s}{each}{rate:9.2f}")
    for key in ("query_epoch", "reference_epoch"):
        floor = result.get(key)
        if not floor:
            continue
        lines.append(
            f"{key.replace('_', ' ')} over {floor['n_cells']} cells: "  # type: ignore[index]
            f"{floor['macs_per_cell'] / 1e6:.3f} M multiply-adds/cell, "  # type: ignore[index]
            f"{floor['gflop_per_epoch']:.2f} GFLOP, floor {floor['floor_s']:.4f} s"  # type: ignore[index]
        )
        for row in floor["terms"]:  # type: ignore[index]
            lines.append(f"    {row['term']:48s} {row['macs_per_cell']:>9d}  {row['s']:.4f} s")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--genes", type=int, default=2000)
    ap.add_argument("--latent", type=int, default=10)
    ap.add_argument("--likelihood", choices=["zinb", "nb", "poisson"], default="zinb")
    ap.add_argument("--cells", type=int, default=1800, help="cells a query epoch trains on")
    ap.add_argument("--ref-cells", type=int, default=None, help="cells a reference epoch trains on")
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    dims = Dims(
        batch=args.batch,
        hidden=args.hidden,
        genes=args.genes,
        latent=args.latent,
        heads=2 if args.likelihood == "zinb" else 1,
    )
    result = run(dims, threads=args.threads, cells=args.cells, ref_cells=args.ref_cells)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    sys.stdout.write(render(result) + "\n")


if __name__ == "__main__":
    main()
