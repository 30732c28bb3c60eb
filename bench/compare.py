"""hubarches against scvi-tools on simulated scArches query mapping: one command, one table.

Generates the small and/or medium simulated sets once (cached under ``--out``), runs
hubarches (``run_hubarches.py``) and, when available, scvi-tools (``peer_scvi.py``, in the
peer's own Python) each in a fresh process with the same architecture, epochs, batch size,
learning rate, seed and thread count, scores both latents with one kNN code, runs the GEMM
micro-benchmark and arithmetic floor (``micro.py``) and the cached ``load_reference`` timing
(``load_time.py``), and prints one report, also written to ``bench/RESULTS.md``.

    .venv/bin/python bench/compare.py --sizes small --ref-epochs 3 --query-epochs 3 \
        --peer-python /path/to/peer/venv/bin/python
    .venv/bin/python bench/compare.py --sizes small medium     # hubarches only, 20 + 20 epochs
"""

from __future__ import annotations

import argparse
import datetime as dt
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))

from common import (
    BATCH_SD,
    EXTRA_FRACTION,
    MISSING_FRACTION,
    N_GENES,
    N_TYPES,
    QUERY_BATCHES,
    REFERENCE_BATCHES,
    SIZES,
    knn_quality,
    mapping_seconds,
    steady_epoch,
    write_json,
)
from report import render

BENCH = Path(__file__).resolve().parent
REPO = BENCH.parent
DEFAULT_OUT = BENCH / "out"
DEFAULT_RESULTS = BENCH / "RESULTS.md"


# --- data -------------------------------------------------------------------------------------


def ensure_data(size: str, seed: int, folder: Path) -> tuple[Path, Path]:
    """The reference and query .h5ad of ``size``, generated once and cached by size and seed."""
    n_ref, n_query = SIZES[size]
    tag = f"{size}_g{N_GENES}_seed{seed}"
    ref_path, query_path = folder / f"{tag}_ref.h5ad", folder / f"{tag}_query.h5ad"
    if ref_path.is_file() and query_path.is_file():
        return ref_path, query_path
    from hubarches.datasets import simulate_reference_and_query

    folder.mkdir(parents=True, exist_ok=True)
    ref, query = simulate_reference_and_query(
        n_reference=n_ref,
        n_query=n_query,
        n_genes=N_GENES,
        n_types=N_TYPES,
        reference_batches=REFERENCE_BATCHES,
        query_batches=QUERY_BATCHES,
        seed=seed,
        batch_sd=BATCH_SD,
        missing_fraction=MISSING_FRACTION,
        extra_fraction=EXTRA_FRACTION,
        shuffle_genes=True,
    )
    for adata, path in ((ref, ref_path), (query, query_path)):
        tmp = path.with_name(path.stem + ".partial.h5ad")
        adata.write_h5ad(tmp)
        tmp.replace(path)
    return ref_path, query_path


# --- children -------------------------------------------------------------------------------


def child_env(threads: int) -> dict[str, str]:
    """The environment of a child: BLAS/OpenMP pools pinned to the same thread count."""
    env = dict(os.environ)
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        env[var] = str(threads)
    env["PYTHONUNBUFFERED"] = "1"
    return env


def run_child(name: str, cmd: list[str], *, log: Path, threads: int) -> None:
    """Run one side to completion, its output in ``log``; raise with the log's tail on failure."""
    log.parent.mkdir(parents=True, exist_ok=True)
    sys.stderr.write(f"[compare] {name}: running …\n")
    t0 = time.perf_counter()
    with log.open("w") as fh:
        proc = subprocess.run(
            cmd, stdout=fh, stderr=subprocess.STDOUT, env=child_env(threads), check=False
        )
    if proc.returncode != 0:
        tail = "".join(log.read_text(errors="replace").splitlines(keepends=True)[-30:])
        raise SystemExit(f"[compare] {name} failed (exit {proc.returncode}); log {log}:\n{tail}")
    sys.stderr.write(f"[compare] {name}: done in {time.perf_counter() - t0:.0f} s\n")


def side_cmd(
    python: str, script: str, data: tuple[Path, Path], base: Path, args: Any, seed: int
) -> list[str]:
    """The command line of one side, training with ``seed``."""
    return [
        python,
        str(BENCH / script),
        "--ref",
        str(data[0]),
        "--query",
        str(data[1]),
        "--json",
        str(base.with_suffix(".json")),
        "--latents",
        str(base.with_suffix(".npz")),
        "--ref-epochs",
        str(args.ref_epochs),
        "--query-epochs",
        str(args.query_epochs),
        "--batch-size",
        str(args.batch_size),
        "--lr",
        str(args.lr),
        "--threads",
        str(args.threads),
        "--seed",
        str(seed),
    ]


def run_side(
    tool: str,
    python: str,
    script: str,
    data: tuple[Path, Path],
    args: Any,
    extra: list[str],
    *,
    seed: int | None = None,
) -> dict[str, Any]:
    """Run one side, then score its latents; the result JSON with ``quality`` added.

    ``seed`` (default ``--seed``) seeds training only; the data stay those of ``--seed``.
    """
    seed = args.seed if seed is None else seed
    tag = "" if seed == args.seed else f"_train{seed}"
    base = Path(args.out) / "runs" / f"{data[0].stem.removesuffix('_ref')}_{tool}{tag}"
    run_child(
        tool if not tag else f"{tool} (training seed {seed})",
        side_cmd(python, script, data, base, args, seed) + extra,
        log=base.with_suffix(".log"),
        threads=args.threads,
    )
    result = json.loads(base.with_suffix(".json").read_text())
    z = np.load(base.with_suffix(".npz"))
    result["quality"] = knn_quality(z["z_ref"], z["y_ref"], z["z_query"], z["y_query"])
    return result


def replicates(
    data: tuple[Path, Path],
    args: Any,
    peer: str | None,
    hub: dict[str, Any],
    peer_result: dict[str, Any] | None,
) -> dict[str, Any]:
    """Quality of each tool over ``--quality-seeds`` training seeds (the main run first)."""
    seeds = [args.seed + i for i in range(args.quality_seeds)]
    out: dict[str, Any] = {
        "seeds": seeds,
        "hubarches": [hub["quality"]],
        "peer": None,
        "timing": {"hubarches": [_timing(hub)], "peer": None},
    }
    hub_extra = ["--split", args.split]
    if peer and peer_result:
        out["peer"] = [peer_result["quality"]]
        out["timing"]["peer"] = [_timing(peer_result)]
    # The tools take turns seed by seed: a shared host's speed drifts over minutes, and a
    # seed's pair of runs then meets about the same drift.
    for seed in seeds[1:]:
        result = run_side(
            "hubarches", sys.executable, "run_hubarches.py", data, args, hub_extra, seed=seed
        )
        out["hubarches"].append(result["quality"])
        out["timing"]["hubarches"].append(_timing(result))
        if out["peer"] is not None:
            result = run_side("scvi-tools", peer, "peer_scvi.py", data, args, [], seed=seed)
            out["peer"].append(result["quality"])
            out["timing"]["peer"].append(_timing(result))
    return out


def _timing(result: dict[str, Any]) -> dict[str, float | None]:
    """The timings a replicate keeps: query mapping and the steady query and reference epochs."""
    return {
        "mapping_s": mapping_seconds(result),
        "query_epoch_s": steady_epoch(result["query_epochs"]),
        "ref_epoch_s": steady_epoch(result["ref_epochs"]),
    }


def run_json_tool(name: str, cmd: list[str], out_json: Path, args: Any) -> dict[str, Any]:
    """Run micro.py or load_time.py and return its JSON."""
    run_child(
        name,
        [*cmd, "--json", str(out_json)],
        log=out_json.with_suffix(".log"),
        threads=args.threads,
    )
    return json.loads(out_json.read_text())


def find_peer(peer_python: str | None) -> str | None:
    """The Python to run scvi-tools with: the one given, this one if it has scvi, or None."""
    if peer_python:
        return peer_python
    return sys.executable if importlib.util.find_spec("scvi") is not None else None


# --- machine --------------------------------------------------------------------------------


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def git_state() -> str:
    """Short commit of the checkout, with ``+dirty`` when tracked files have changed."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--untracked-files=no"],
            cwd=REPO,
            capture_output=True,
            text=True,
            check=True,
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head + ("+dirty" if dirty else "")


def machine(args: Any) -> dict[str, Any]:
    """What the report says about the machine and the run."""
    import torch

    import hubarches

    return {
        "cpu": cpu_model(),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "hubarches": hubarches.__version__,
        "commit": git_state(),
        "date": dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "loadavg_start": os.getloadavg(),
        "command": command_line(args),
    }


def command_line(args: Any) -> str:
    """The command that reproduces this run, with no machine-specific path in it."""
    parts = ["python bench/compare.py", "--sizes", *args.sizes]
    parts += ["--ref-epochs", str(args.ref_epochs), "--query-epochs", str(args.query_epochs)]
    parts += ["--threads", str(args.threads), "--seed", str(args.seed)]
    if args.batch_size != 128 or args.lr != 1e-3:
        parts += ["--batch-size", str(args.batch_size), "--lr", str(args.lr)]
    if args.split != "subset":
        parts += ["--split", args.split]
    if args.peer_python:
        parts += ["--peer-python", "<peer-python>"]
    if args.skip_load:
        parts.append("--skip-load")
    if args.quality_seeds != 3 or args.quality_sizes != ["small"]:
        parts += ["--quality-seeds", str(args.quality_seeds), "--quality-sizes"]
        parts += args.quality_sizes
    return " ".join(parts)


# --- main -----------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--sizes", nargs="+", choices=list(SIZES), default=["small"])
    ap.add_argument("--ref-epochs", type=int, default=20)
    ap.add_argument("--query-epochs", type=int, default=20)
    ap.add_argument("--batch-size", type=int, default=128)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument(
        "--split",
        choices=["subset", "validation"],
        default="subset",
        help="how hubarches holds 10%% out: subset (train on 90%%, no validation pass, the "
        "peer's work) or validation (validation_fraction=0.1, a validation loss every epoch)",
    )
    ap.add_argument(
        "--quality-seeds",
        type=int,
        default=3,
        help="training seeds per tool for the quality comparison of --quality-sizes, the main"
        " run's (--seed) first: kNN accuracy and mixing differ by a few hundredths from seed to"
        " seed, more than between the tools (default 3; 1 for the main run alone)",
    )
    ap.add_argument("--quality-sizes", nargs="+", choices=list(SIZES), default=["small"])
    ap.add_argument("--peer-python", default=None, help="a Python with scvi-tools installed")
    ap.add_argument("--no-peer", action="store_true", help="never run scvi-tools")
    ap.add_argument("--skip-load", action="store_true", help="skip the load_reference timing")
    ap.add_argument("--out", default=str(DEFAULT_OUT), help="data, logs and JSON (scratch)")
    ap.add_argument("--results", default=str(DEFAULT_RESULTS), help="where the report goes")
    ap.add_argument(
        "--rerender",
        default=None,
        metavar="RESULTS_JSON",
        help="run nothing: render the report again from a results.json of an earlier run",
    )
    args = ap.parse_args(argv)
    if min(args.ref_epochs, args.query_epochs) < 1:
        ap.error("--ref-epochs and --query-epochs must be ≥ 1")
    if args.quality_seeds < 1:
        ap.error("--quality-seeds must be ≥ 1")
    return args


def main(argv: list[str] | None = None) -> None:
    args = parse(argv)
    if args.rerender:
        saved = json.loads(Path(args.rerender).read_text())
        text = render(saved["machine"], saved["runs"], saved["load"])
        sys.stdout.write(text)
        Path(args.results).write_text(text)
        return
    out = Path(args.out)
    peer = None if args.no_peer else find_peer(args.peer_python)
    info = machine(args)
    runs: dict[str, dict[str, Any]] = {}
    for size in args.sizes:
        sys.stderr.write(f"[compare] {size}: data …\n")
        data = ensure_data(size, args.seed, out / "data")
        hub = run_side(
            "hubarches", sys.executable, "run_hubarches.py", data, args, ["--split", args.split]
        )
        peer_result = run_side("scvi-tools", peer, "peer_scvi.py", data, args, []) if peer else None
        micro = run_json_tool(
            "micro",
            [
                sys.executable,
                str(BENCH / "micro.py"),
                "--threads",
                str(args.threads),
                "--batch",
                str(args.batch_size),
                "--genes",
                str(hub["data"]["n_genes_ref"]),
                "--cells",
                str(hub["query_epochs"]["n_train_cells"]),
                "--ref-cells",
                str(hub["ref_epochs"]["n_train_cells"]),
            ],
            out / "runs" / f"{size}_micro.json",
            args,
        )
        runs[size] = {"hubarches": hub, "peer": peer_result, "micro": micro}
        if size in args.quality_sizes and args.quality_seeds > 1:
            runs[size]["replicates"] = replicates(data, args, peer, hub, peer_result)
    load = None
    if not args.skip_load:
        load = run_json_tool(
            "load_reference",
            [sys.executable, str(BENCH / "load_time.py"), "--threads", str(args.threads)],
            out / "runs" / "load_time.json",
            args,
        )
    info["loadavg_end"] = os.getloadavg()
    info["peer"] = "run" if peer else "not run (no --peer-python and no scvi here)"
    text = render(info, runs, load)
    sys.stdout.write(text)
    Path(args.results).write_text(text)
    write_json(out / "results.json", {"machine": info, "runs": runs, "load": load})
    sys.stderr.write(f"[compare] report written to {args.results}\n")


if __name__ == "__main__":
    main()
