"""Time ``hubarches.load_reference`` of a cached ~100 MB bundle: verify + load.

Builds an untrained reference wide enough that ``model.safetensors`` is about ``--mb`` MB
(hidden units ``--hidden``, genes chosen to fit), pushes it to a temporary local registry,
pulls it once into a temporary cache, then times ``load_reference`` of the cached version
(resolve, sha256 of every file, read, build the model) ``--repeats`` times. Also times its
parts alone, so a slow total can be traced: the sha256 check, reading the tensors, building
the model object, and loading the weights into it.

    .venv/bin/python bench/load_time.py --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

import hubarches
from hubarches.bundle import WEIGHTS_FILE, read_tensors, verify_bundle
from hubarches.datasets import simulate
from hubarches.model import CVAE
from hubarches.train import TrainOptions

ATLAS = "bench/load-time"
N_CELLS = 256  # the atlas only has to exist; the model is not trained


def _timed(call: Callable[[], object], repeats: int) -> list[float]:
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        call()
        out.append(time.perf_counter() - t0)
    return out


def run(*, mb: float, hidden: int, repeats: int, threads: int) -> dict[str, object]:
    """Build, push, pull once, then time the cached load and its parts."""
    torch.set_num_threads(threads)
    # model.safetensors ≈ 4 bytes × (G·H encoder layer 1 + 2·H·G decoder heads) for ZINB
    n_genes = max(100, round(mb * 1e6 / 4 / (3 * hidden)))
    adata = simulate(N_CELLS, n_genes=n_genes, n_types=4, n_batches=2, seed=0)
    with tempfile.TemporaryDirectory(prefix="hubarches-load-") as tmp:
        registry, cache = Path(tmp) / "registry", Path(tmp) / "cache"
        built = hubarches.train_atlas(
            adata,
            batch_key="batch",
            label_key="cell_type",
            config={"n_hidden": hidden, "likelihood": "zinb"},
            options=TrainOptions(epochs=0, device="cpu"),
        )
        info = hubarches.push(built.reference, ATLAS, registry=registry)
        ref = f"{ATLAS}@{info.version}"
        first = _timed(lambda: hubarches.load_reference(ref, registry, cache_dir=cache), 1)[0]
        loaded = hubarches.load_reference(ref, registry, cache_dir=cache)
        bundle = Path(loaded.path)
        size = (bundle / WEIGHTS_FILE).stat().st_size
        total = sum(p.stat().st_size for p in bundle.iterdir() if p.is_file())
        manifest = verify_bundle(bundle)
        config = manifest.to_model_config()
        tensors = read_tensors(bundle, manifest, verify=False)
        model = CVAE(config)
        cached = _timed(lambda: hubarches.load_reference(ref, registry, cache_dir=cache), repeats)
        parts = {
            "verify_bundle (sha256 of every file)": _timed(
                lambda: verify_bundle(bundle, expected_digest=info.digest), repeats
            ),
            "read_tensors (safetensors, no hash)": _timed(
                lambda: read_tensors(bundle, manifest, verify=False), repeats
            ),
            "CVAE(config) (build + initialise)": _timed(lambda: CVAE(config), repeats),
            "load_weights": _timed(lambda: model.load_weights(tensors), repeats),
        }
    return {
        "n_genes": n_genes,
        "n_hidden": hidden,
        "weights_bytes": size,
        "bundle_bytes": total,
        "first_pull_s": first,
        "cached_load_s": cached,
        "cached_load_median_s": statistics.median(cached),
        "cached_load_min_s": min(cached),
        "parts_median_s": {k: statistics.median(v) for k, v in parts.items()},
        "threads": torch.get_num_threads(),
    }


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mb", type=float, default=100.0, help="target size of model.safetensors")
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--json", default=None)
    args = ap.parse_args(argv)
    result = run(mb=args.mb, hidden=args.hidden, repeats=args.repeats, threads=args.threads)
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(result, indent=1))
    lines = [
        f"model.safetensors {result['weights_bytes'] / 1e6:.1f} MB "
        f"({result['n_genes']} genes × {result['n_hidden']} hidden)",
        f"first pull {result['first_pull_s']:.3f} s; cached load_reference median "
        f"{result['cached_load_median_s']:.3f} s, min {result['cached_load_min_s']:.3f} s",
    ]
    lines += [f"  {k:40s} {v:.3f} s" for k, v in result["parts_median_s"].items()]  # type: ignore[union-attr]
    sys.stdout.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
