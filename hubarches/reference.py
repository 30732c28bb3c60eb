"""A reference in memory: its manifest, its model and (optionally) its cells' embedding.

``Reference`` is what :func:`hubarches.load_reference` returns and what mapping produces as
an extension. It converts between bundles on disk and models in memory, and embeds AnnData
whose categories it knows. Mapping itself lives in :mod:`hubarches.pipeline`.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from hubarches.batching import embed_matrix
from hubarches.bundle import EMBEDDING_FILE, read_tensors, verify_bundle, write_bundle
from hubarches.errors import CovariateError, WeightsError
from hubarches.manifest import Manifest, manifest_digest
from hubarches.model import CVAE

if TYPE_CHECKING:
    import anndata as ad

    from hubarches.pipeline import MappingResult
    from hubarches.registry import VersionInfo
    from hubarches.train import Progress

__all__ = ["Reference", "ReferenceEmbedding"]

LATENT_TENSOR = "latent"
LABELS_TENSOR = "labels"
SPREAD_TENSOR = "spread"
SPREAD_K_TENSOR = "spread_k"


@dataclass(frozen=True, eq=False)
class ReferenceEmbedding:
    """Latent means of (a stratified sample of) the reference cells, with label codes.

    Stored in ``embedding.safetensors``; mapping uses it for label transfer and for the
    mapping-quality score. ``labels`` holds codes into the manifest's label categories
    (-1 for unlabeled cells), or is None when the atlas has no labels.
    """

    latent: np.ndarray = field(repr=False)
    labels: np.ndarray | None = field(default=None, repr=False)
    spread: np.ndarray | None = field(default=None, repr=False)
    """Each cell's mean distance to its ``spread_k`` nearest other cells (mapping quality's
    denominator), computed once at training instead of at every mapping."""
    spread_k: int | None = None

    @classmethod
    def from_tensors(cls, tensors: Mapping[str, torch.Tensor]) -> ReferenceEmbedding:
        """Read the tensors of an embedding file, checking names and shapes."""
        expected = {LATENT_TENSOR, LABELS_TENSOR, SPREAD_TENSOR, SPREAD_K_TENSOR}
        unexpected = sorted(set(tensors) - expected)
        if LATENT_TENSOR not in tensors or unexpected:
            raise WeightsError(
                f"{EMBEDDING_FILE} must hold '{LATENT_TENSOR}' and optionally "
                f"'{LABELS_TENSOR}', '{SPREAD_TENSOR}' and '{SPREAD_K_TENSOR}'",
                missing=[] if LATENT_TENSOR in tensors else [LATENT_TENSOR],
                unexpected=unexpected,
            )
        latent = tensors[LATENT_TENSOR].numpy().astype(np.float32, copy=False)
        labels = tensors.get(LABELS_TENSOR)
        codes = None if labels is None else labels.numpy().astype(np.int64, copy=False)
        spread = tensors.get(SPREAD_TENSOR)
        spread_k = tensors.get(SPREAD_K_TENSOR)
        n = latent.shape[0] if latent.ndim == 2 else -1
        if (
            latent.ndim != 2
            or (codes is not None and codes.shape != (n,))
            or (spread is None) != (spread_k is None)
            or (spread is not None and tuple(spread.shape) != (n,))
            or (spread_k is not None and spread_k.numel() != 1)
        ):
            raise WeightsError(f"{EMBEDDING_FILE} has tensors of inconsistent shapes")
        return cls(
            latent=latent,
            labels=codes,
            spread=None if spread is None else spread.numpy().astype(np.float64),
            spread_k=None if spread_k is None else int(spread_k.item()),
        )

    def to_tensors(self) -> dict[str, torch.Tensor]:
        """The tensors to save as ``embedding.safetensors``."""
        out = {LATENT_TENSOR: torch.from_numpy(np.ascontiguousarray(self.latent))}
        if self.labels is not None:
            out[LABELS_TENSOR] = torch.from_numpy(np.ascontiguousarray(self.labels))
        if self.spread is not None and self.spread_k is not None:
            out[SPREAD_TENSOR] = torch.from_numpy(self.spread.astype(np.float32))
            out[SPREAD_K_TENSOR] = torch.tensor(self.spread_k, dtype=torch.int64)
        return out


@dataclass(eq=False)
class Reference:
    """A reference model with its manifest; published (``info`` set) or not yet.

    Attributes
    ----------
    manifest
        The manifest; ``name``/``version`` are None until the reference is pushed.
    model
        The conditional VAE, in eval mode.
    embedding
        The reference cells' latent (and labels), if the bundle carries one.
    info
        Name, version and digest when the reference came from a registry.
    path
        The verified bundle directory it was loaded from, if any.
    """

    manifest: Manifest
    model: CVAE
    embedding: ReferenceEmbedding | None = None
    info: VersionInfo | None = None
    path: Path | None = None

    def __post_init__(self) -> None:
        self.model.eval()

    def __repr__(self) -> str:
        where = str(self.info) if self.info is not None else "unpublished"
        return (
            f"Reference({where}, {len(self.manifest.genes.ids)} genes, covariates "
            f"{[c.key for c in self.manifest.covariates]}, labels "
            f"{None if self.manifest.labels is None else self.manifest.labels.key})"
        )

    # --- identity -----------------------------------------------------------------------

    @property
    def name(self) -> str | None:
        """``org/name`` once published."""
        return self.manifest.name

    @property
    def version(self) -> int | None:
        """Version number once published."""
        return self.manifest.version

    @property
    def digest(self) -> str:
        """sha256 of the canonical manifest (identifies a published version)."""
        return manifest_digest(self.manifest)

    @property
    def genes(self) -> tuple[str, ...]:
        """The ordered gene list a query is aligned to."""
        return self.manifest.genes.ids

    @property
    def covariates(self) -> list[tuple[str, tuple[str, ...]]]:
        """``(key, categories)`` of each covariate, in model order; the first is the batch."""
        return [(c.key, c.categories) for c in self.manifest.covariates]

    # --- files --------------------------------------------------------------------------

    @classmethod
    def from_bundle(
        cls,
        path: str | Path,
        *,
        info: VersionInfo | None = None,
        verified: Manifest | None = None,
    ) -> Reference:
        """Load a bundle directory, verifying every file first (unless just ``verified``)."""
        path = Path(path)
        manifest = verified if verified is not None else verify_bundle(path)
        tensors = read_tensors(path, manifest, verify=False)
        model = CVAE.from_weights(manifest.to_model_config(), tensors)
        embedding = None
        if EMBEDDING_FILE in manifest.files:
            embedding = ReferenceEmbedding.from_tensors(
                read_tensors(path, manifest, EMBEDDING_FILE, verify=False)
            )
        return cls(manifest=manifest, model=model, embedding=embedding, info=info, path=path)

    def save(self, path: str | Path) -> Path:
        """Write this reference as a new bundle directory (atomically) and return its path."""
        path = Path(path)
        write_bundle(
            path,
            self.manifest,
            self.model.state_dict(),
            embedding=None if self.embedding is None else self.embedding.to_tensors(),
        )
        return path

    # --- use ----------------------------------------------------------------------------

    def embed(
        self,
        adata: ad.AnnData,
        *,
        batch_key: str | None = None,
        layer: str | None = None,
        gene_key: str | None = None,
        covariate_keys: Mapping[str, str] | None = None,
        sample: bool = False,
        seed: int = 0,
    ) -> np.ndarray:
        """Latent means (or samples) of cells whose categories this reference knows.

        ``batch_key`` defaults to the reference's own batch column. A query with new
        categories needs surgery first: use :meth:`map`.
        """
        from hubarches.data import prepare_query

        prepared = prepare_query(
            adata,
            genes=self.genes,
            covariates=self.covariates,
            batch_key=batch_key or self.manifest.batch_key,
            layer=layer,
            gene_key=gene_key,
            covariate_keys=covariate_keys,
        )
        if prepared.covariates.new_categories:
            new = {k: list(v) for k, v in prepared.covariates.new_categories.items()}
            raise CovariateError(
                f"the reference has no columns for the categories {new}",
                key=next(iter(new)),
                hint="Map the query instead (Reference.map / hubarches map), which adds them",
            )
        return embed_matrix(
            self.model,
            prepared.counts,
            prepared.covariates.codes,
            sample=sample,
            seed=seed,
        )

    def map(
        self,
        adata: ad.AnnData,
        *,
        batch_key: str,
        epochs: int | None = None,
        seed: int = 0,
        batch_size: int = 128,
        progress: Progress | None = None,
        **options: Any,
    ) -> MappingResult:
        """Map a query onto this reference: align, surgery, query training, embed, label.

        See :func:`hubarches.pipeline.map_query` for every option.
        """
        from hubarches.pipeline import map_query

        return map_query(
            self,
            adata,
            batch_key=batch_key,
            epochs=epochs,
            seed=seed,
            batch_size=batch_size,
            progress=progress,
            **options,
        )
