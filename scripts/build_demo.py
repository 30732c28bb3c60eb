"""Build the demo atlas shipped with hubarches, byte for byte.

Writes, from the simulator in :mod:`hubarches.datasets` with fixed seeds:

- ``registry/hubarches/demo/1/``: a reference trained with cell-type labels on four batches;
- ``registry/hubarches/demo/2/``: its extension, mapped by scArches surgery from two new
  query batches (its lineage names version 1);
- ``registry/demo_query.h5ad``: an example query from two further batches, with some genes
  missing, some extra and the columns shuffled, and the same cell types (``obs["cell_type"]``
  is the simulator's truth, to compare with the transferred labels);
- ``model_cards/hubarches-demo-v1.md`` and ``-v2.md``: copies of the bundles' cards.

Reproducible: fixed seeds, fixed ``created`` timestamps, torch on one CPU thread, h5ad
files without timestamps and safetensors headers in a canonical order, so a rebuild on the
same machine gives the same bytes (another CPU may round floats differently). Run from the
repository root::

    .venv/bin/python scripts/build_demo.py              # rebuild what is shipped
    .venv/bin/python scripts/build_demo.py --size tiny --registry /tmp/r --cards /tmp/c
"""

from __future__ import annotations

import argparse
import dataclasses
import shutil
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import anndata as ad
import numpy as np
import torch
from scipy.spatial import cKDTree

from hubarches.datasets import simulate_reference_and_query
from hubarches.pipeline import map_query, train_atlas
from hubarches.reference import Reference
from hubarches.registry import VersionInfo
from hubarches.registry.local import LocalRegistry
from hubarches.train import TrainOptions

REPO = Path(__file__).resolve().parents[1]
ATLAS = "hubarches/demo"
CARD_NAME = "hubarches-demo-v{version}.md"
QUERY_FILE = "demo_query.h5ad"
BATCH_KEY = "batch"
LABEL_KEY = "cell_type"
SEED = 2024
DEVICE = "cpu"  # CUDA kernels are not bitwise reproducible across runs
CREATED = {
    1: datetime(2025, 1, 1, tzinfo=timezone.utc),
    2: datetime(2025, 1, 2, tzinfo=timezone.utc),
}
"""Fixed ``created`` timestamps, so manifests (and digests) do not change with the clock."""
MIXING_K = 15
"""Neighbours for the batch-mixing check printed at the end."""
LICENSE = "cc0-1.0"
CITATION = (
    "Simulated data; no citation needed. Cite the method: Lotfollahi et al., Mapping single-"
    "cell data to reference atlases by transfer learning, Nature Biotechnology 40, 121-130 "
    "(2022)."
)
DESCRIPTION_V1 = (
    "A small demo atlas of simulated single-cell counts (not biology): {types} cell types in "
    "{batches} batches of a negative-binomial simulator with gene-wise batch effects, built by "
    "scripts/build_demo.py in the hubarches repository. Use it to try pulling, mapping "
    "(registry/demo_query.h5ad is an example query) and pushing."
)
DESCRIPTION_V2 = (
    "Version 2 of the demo atlas: version 1 extended by scArches surgery with the query "
    "batches {added}, whose new batch weights were trained with everything else frozen. "
    "Simulated data, built by scripts/build_demo.py in the hubarches repository."
)


@dataclasses.dataclass(frozen=True)
class DemoSize:
    """How big the demo is: the shipped ``full`` one, or ``tiny`` for tests."""

    n_genes: int
    n_types: int
    n_reference: int
    reference_batches: int
    n_query: int
    """Cells of the four query batches together: half for version 2, half for the example."""
    reference_epochs: int
    kl_warmup_epochs: int
    query_epochs: int
    n_hidden: int
    n_latent: int


SIZES = {
    # ~100+ epochs are needed for the reference to mix its batches; about a minute on one core.
    "full": DemoSize(
        n_genes=1000,
        n_types=8,
        n_reference=2000,
        reference_batches=4,
        n_query=800,
        reference_epochs=150,
        kl_warmup_epochs=100,
        query_epochs=100,
        n_hidden=128,
        n_latent=10,
    ),
    "tiny": DemoSize(
        n_genes=60,
        n_types=3,
        n_reference=150,
        reference_batches=2,
        n_query=80,
        reference_epochs=3,
        kl_warmup_epochs=2,
        query_epochs=2,
        n_hidden=16,
        n_latent=4,
    ),
}
EXTENSION_BATCHES = ("qry_b0", "qry_b1")
"""Query batches mapped into version 2."""
EXAMPLE_BATCHES = ("qry_b2", "qry_b3")
"""Query batches of the example query (new to both versions)."""
MISSING_FRACTION = 0.05
"""Share of the reference genes the query lacks."""
EXTRA_FRACTION = 0.03
"""Genes the query has beyond the reference's, as a share of them."""


def batch_mixing(
    latent: np.ndarray, batches: np.ndarray, *, k: int = MIXING_K
) -> tuple[float, float]:
    """Share of each cell's k neighbours from its own batch, and that share if fully mixed."""
    _, idx = cKDTree(latent).query(latent, k + 1)
    same = float((batches[idx[:, 1:]] == batches[:, None]).mean())
    _, counts = np.unique(batches, return_counts=True)
    return same, float(((counts / counts.sum()) ** 2).sum())


def simulate(size: DemoSize) -> tuple[ad.AnnData, ad.AnnData]:
    """Simulate the reference cells and the four query batches exactly as the demo does."""
    return simulate_reference_and_query(
        n_reference=size.n_reference,
        n_query=size.n_query,
        n_genes=size.n_genes,
        n_types=size.n_types,
        reference_batches=size.reference_batches,
        query_batches=len(EXTENSION_BATCHES) + len(EXAMPLE_BATCHES),
        seed=SEED,
        missing_fraction=MISSING_FRACTION,
        extra_fraction=EXTRA_FRACTION,
        shuffle_genes=True,
    )


def _stamp(reference: Reference, *, version: int, description: str) -> Reference:
    """Fix the manifest's ``created`` time and description before the bundle is written."""
    manifest = reference.manifest.model_copy(
        update={"created": CREATED[version], "description": description}
    )
    return dataclasses.replace(reference, manifest=manifest)


def _publish(
    registry: LocalRegistry, reference: Reference, version: int, work: Path
) -> VersionInfo:
    """Save a reference and publish it as ``ATLAS@version``."""
    bundle = reference.save(work / f"v{version}")
    return registry.publish(bundle, ATLAS, version=version)


def build(size: DemoSize, *, registry_root: Path, cards_dir: Path) -> dict[str, float]:
    """Build both versions, the example query and the cards; return quality figures."""
    torch.set_num_threads(1)
    return _build(size, registry_root=registry_root, cards_dir=cards_dir)


def _build(size: DemoSize, *, registry_root: Path, cards_dir: Path) -> dict[str, float]:
    reference_data, query = simulate(size)
    batches = query.obs[BATCH_KEY].astype(str)
    extension_query = query[batches.isin(EXTENSION_BATCHES).to_numpy()].copy()
    example = query[batches.isin(EXAMPLE_BATCHES).to_numpy()].copy()
    for adata in (extension_query, example):
        adata.obs[BATCH_KEY] = adata.obs[BATCH_KEY].cat.remove_unused_categories()

    atlas_dir = registry_root / ATLAS
    if atlas_dir.exists():
        shutil.rmtree(atlas_dir)  # the script's own previous output
    registry_root.mkdir(parents=True, exist_ok=True)
    cards_dir.mkdir(parents=True, exist_ok=True)
    # Named explicitly, the folder is opened writable and without the demo fallback.
    registry = LocalRegistry(registry_root)
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="hubarches-demo-") as tmp:
        work = Path(tmp)
        trained = train_atlas(
            reference_data,
            batch_key=BATCH_KEY,
            label_key=LABEL_KEY,
            config={"n_hidden": size.n_hidden, "n_latent": size.n_latent},
            options=TrainOptions(
                epochs=size.reference_epochs,
                kl_warmup_epochs=size.kl_warmup_epochs,
                seed=SEED,
                device=DEVICE,
            ),
            description=DESCRIPTION_V1.format(types=size.n_types, batches=size.reference_batches),
            license=LICENSE,
            citation=CITATION,
        )
        v1 = _stamp(
            trained.reference, version=1, description=trained.reference.manifest.description
        )
        v1_info = _publish(registry, v1, 1, work)
        figures["reference_final_loss"] = float(trained.history.final_loss or np.nan)
        latent = trained.reference.embed(reference_data)
        same, expected = batch_mixing(latent, reference_data.obs[BATCH_KEY].to_numpy())
        figures["same_batch_neighbours"], figures["same_batch_if_mixed"] = same, expected

        parent = Reference.from_bundle(registry.version_path(v1_info), info=v1_info)
        mapped = map_query(
            parent,
            extension_query,
            batch_key=BATCH_KEY,
            epochs=size.query_epochs,
            seed=SEED,
            device=DEVICE,
        )
        added = ", ".join(EXTENSION_BATCHES)
        v2 = _stamp(mapped.reference, version=2, description=DESCRIPTION_V2.format(added=added))
        _publish(registry, v2, 2, work)
        if mapped.labels is not None:
            truth = extension_query.obs[LABEL_KEY].astype(str).to_numpy()
            figures["extension_label_accuracy"] = float((mapped.labels.labels == truth).mean())
    shutil.rmtree(registry_root / ".tmp", ignore_errors=True)  # the registry's empty scratch dir

    for version in (1, 2):
        shutil.copyfile(
            registry_root / ATLAS / str(version) / "README.md",
            cards_dir / CARD_NAME.format(version=version),
        )
    example.write_h5ad(registry_root / QUERY_FILE, compression="gzip")
    return figures


def main(argv: list[str] | None = None) -> int:
    """Parse the command line, build, and print what was built."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--registry",
        type=Path,
        default=REPO / "registry",
        help="registry folder to publish into (default: the repo's registry/)",
    )
    parser.add_argument(
        "--cards",
        type=Path,
        default=REPO / "model_cards",
        help="folder for the rendered cards (default: the repo's model_cards/)",
    )
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default="full",
        help="full: the shipped demo; tiny: seconds, for tests",
    )
    args = parser.parse_args(argv)
    start = time.perf_counter()
    figures = build(SIZES[args.size], registry_root=args.registry, cards_dir=args.cards)
    for key, value in figures.items():
        print(f"{key}: {value:.4g}")
    print(f"built {ATLAS} v1, v2 and {QUERY_FILE} in {time.perf_counter() - start:.0f} s")
    return 0


if __name__ == "__main__":
    sys.exit(main())
