"""Cross-training: each tool's query mapping on each tool's reference, to locate a quality gap.

For each training seed it runs four children, all on the data of ``--seed``:

- hubarches end to end, saving its reference; scvi-tools end to end, saving its reference;
- hubarches' query mapping on scvi-tools' reference; scvi-tools' on hubarches'.

The reference weights pass through ``exchange.py``. Each importing run also embeds the
reference cells, and the report checks that latent against the exporting tool's (the two
models must compute the same function). One table of kNN accuracy and mixing by reference
trainer × query trainer, means over seeds, goes to stdout and ``--results``.

    .venv/bin/python bench/cross.py --size medium --seeds 0 1 2 --epochs 30 \
        --peer-python /path/to/peer/venv/bin/python
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import SIZES, knn_quality, write_json
from compare import BENCH, DEFAULT_OUT, cpu_model, ensure_data, find_peer, run_child, side_cmd

TOOLS = {"hubarches": "run_hubarches.py", "scvi-tools": "peer_scvi.py"}
# Float32 round-off between the tools' kernels is ~1e-6; a wrong exchange shows as ~1.
GAP_TOLERANCE = 1e-4


def run_one(
    args: argparse.Namespace,
    data: tuple[Path, Path],
    python: str,
    tool: str,
    seed: int,
    extra: list[str],
    name: str,
) -> dict[str, Any]:
    """One child run; its result JSON with quality and the latents' file added."""
    base = Path(args.out) / "runs" / name
    cmd = side_cmd(python, TOOLS[tool], data, base, args, seed) + extra
    run_child(name, cmd, log=base.with_suffix(".log"), threads=args.threads)
    result = json.loads(base.with_suffix(".json").read_text())
    z = np.load(base.with_suffix(".npz"))
    result["quality"] = knn_quality(z["z_ref"], z["y_ref"], z["z_query"], z["y_query"])
    result["latents"] = str(base.with_suffix(".npz"))
    return result


def reference_gap(importer: dict[str, Any], exporter: dict[str, Any]) -> float:
    """Largest difference between the two tools' latents of the reference cells."""
    a, b = np.load(importer["latents"])["z_ref"], np.load(exporter["latents"])["z_ref"]
    if a.shape != b.shape:
        raise SystemExit(f"[cross] reference latents differ in shape: {a.shape} vs {b.shape}")
    gap = float(np.max(np.abs(a - b)))
    if gap > GAP_TOLERANCE:
        raise SystemExit(
            f"[cross] {importer['latents']}: the imported reference embeds its cells {gap:.2g} "
            "away from the exporting tool's latent; the exchange is broken"
        )
    return gap


def one_seed(
    args: argparse.Namespace, data: tuple[Path, Path], peer: str, seed: int
) -> dict[str, Any]:
    """The four runs of one training seed, keyed ``reference/query``."""
    refs = Path(args.out) / "references"
    refs.mkdir(parents=True, exist_ok=True)
    tag = f"{args.size}_seed{seed}"
    py = {"hubarches": sys.executable, "scvi-tools": peer}
    saved = {tool: refs / f"{tag}_{tool}.npz" for tool in TOOLS}
    runs: dict[str, Any] = {}
    for tool in TOOLS:
        extra = ["--save-reference", str(saved[tool])]
        runs[f"{tool}/{tool}"] = run_one(args, data, py[tool], tool, seed, extra, f"{tag}_{tool}")
    for query, reference in (("hubarches", "scvi-tools"), ("scvi-tools", "hubarches")):
        extra = ["--load-reference", str(saved[reference])]
        name = f"{tag}_{query}_on_{reference}"
        run = run_one(args, data, py[query], query, seed, extra, name)
        run["reference_gap"] = reference_gap(run, runs[f"{reference}/{reference}"])
        runs[f"{reference}/{query}"] = run
    return runs


def machine_line(args: argparse.Namespace) -> str:
    """Where and when the runs were made (the table's second line)."""
    day = time.strftime("%Y-%m-%d")
    return f"{day}, {cpu_model()}, {args.threads} threads"


def render(per_seed: dict[int, dict[str, Any]], args: argparse.Namespace, machine: str) -> str:
    """Markdown: per cell, mean kNN accuracy and mixing over seeds, and each seed's mixing."""
    seeds = sorted(per_seed)
    first = per_seed[seeds[0]]
    versions = ", ".join(f"{tool} {first[f'{tool}/{tool}']['versions'][tool]}" for tool in TOOLS)
    lines = [
        f"# Cross-training: {args.size}, {args.epochs} + {args.epochs} epochs, "
        f"training seeds {', '.join(map(str, seeds))}",
        "",
        f"Run: {machine}; {versions}.",
        "",
        f"Command: `python bench/cross.py --size {args.size} --seeds "
        f"{' '.join(map(str, seeds))} --epochs {args.epochs} --threads {args.threads} "
        f"--seed {args.seed} --peer-python <peer-python>`",
        "",
        "Rows: who trained the reference; columns: who mapped the query on it (surgery, query "
        "training, embedding). Mixing as in `shared/bench/README.md` (observed share of "
        "reference neighbours); kNN accuracy of label transfer.",
        "",
        "| reference ↓ / query → | hubarches: mixing (per seed) | hubarches: kNN "
        "| scvi-tools: mixing (per seed) | scvi-tools: kNN |",
        "|---|---|---|---|---|",
    ]
    for reference in TOOLS:
        cells = [reference]
        for query in TOOLS:
            key = f"{reference}/{query}"
            mix = [per_seed[s][key]["quality"]["mixing_observed"] for s in seeds]
            acc = [per_seed[s][key]["quality"]["knn_accuracy"] for s in seeds]
            each = " / ".join(f"{m:.3f}" for m in mix)
            cells += [f"{np.mean(mix):.3f} ({each})", f"{np.mean(acc):.3f}"]
        lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Paired by reference (the same weights; only the query trainer differs), "
        "hubarches' mixing − scvi-tools', mean (range over seeds):",
        "",
    ]
    for reference in TOOLS:
        diff = [
            per_seed[s][f"{reference}/hubarches"]["quality"]["mixing_observed"]
            - per_seed[s][f"{reference}/scvi-tools"]["quality"]["mixing_observed"]
            for s in seeds
        ]
        lines.append(
            f"- on {reference}' references: {np.mean(diff):+.3f} "
            f"({min(diff):+.3f} to {max(diff):+.3f})"
        )
    gaps = [r["reference_gap"] for s in seeds for r in per_seed[s].values() if "reference_gap" in r]
    lines += [
        "",
        "Check of the exchange: largest difference between the importing and the exporting "
        f"tool's latents of the reference cells over all runs: {max(gaps):.2e}.",
        "",
    ]
    return "\n".join(lines)


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--size", choices=list(SIZES), default="medium")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="training seeds")
    ap.add_argument("--epochs", type=int, default=30, help="reference and query epochs")
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0, help="seed of the simulated data")
    ap.add_argument("--peer-python", default=None, help="a Python with scvi-tools installed")
    ap.add_argument("--out", default=str(DEFAULT_OUT / "cross"), help="logs, JSON, weights")
    ap.add_argument("--results", default=str(BENCH / "CROSS.md"), help="where the table goes")
    ap.add_argument(
        "--rerender",
        action="store_true",
        help="run nothing: render the table again from --out's cross.json",
    )
    args = ap.parse_args(argv)
    if args.epochs < 1:
        ap.error("--epochs must be ≥ 1")
    args.ref_epochs = args.query_epochs = args.epochs
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.rerender:
        saved = json.loads((Path(args.out) / "cross.json").read_text())
        machine = saved.pop("machine", None) or machine_line(args)
        per_seed = {int(s): r for s, r in saved.items() if int(s) in args.seeds}
        if sorted(per_seed) != sorted(args.seeds):
            raise SystemExit(f"[cross] cross.json holds seeds {sorted(saved)}, not {args.seeds}")
        text = render(per_seed, args, machine)
        sys.stdout.write(text)
        Path(args.results).write_text(text)
        return
    peer = find_peer(args.peer_python)
    if peer is None:
        raise SystemExit("[cross] needs scvi-tools: pass --peer-python")
    data = ensure_data(args.size, args.seed, Path(DEFAULT_OUT) / "data")
    per_seed = {seed: one_seed(args, data, peer, seed) for seed in args.seeds}
    machine = machine_line(args)
    saved: dict[str, Any] = {str(s): r for s, r in per_seed.items()}
    write_json(Path(args.out) / "cross.json", {"machine": machine, **saved})
    text = render(per_seed, args, machine)
    sys.stdout.write(text)
    Path(args.results).write_text(text)


if __name__ == "__main__":
    main()
