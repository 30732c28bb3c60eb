"""Orchestration: pull, train, map and push. Each returns a result object; nothing prints.

``map_query`` follows the data flow of DESIGN.md: align the query to the reference's genes
and covariates → surgery → train the new tensors → embed → transfer labels and score the
mapping → build the output AnnData and the report. The extension comes back unpublished,
ready to save or push; its lineage names the parent.
"""

from __future__ import annotations

import os
import tempfile
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import anndata as ad
import numpy as np
import pandas as pd

from hubarches._version import __version__
from hubarches.batching import CountMatrix, embed_matrix
from hubarches.bundle import check_publishable
from hubarches.cache import pull
from hubarches.config import ModelConfig
from hubarches.data import PreparedQuery, QueryReport, prepare_query, prepare_reference
from hubarches.errors import PushError
from hubarches.keys import (
    LATENT_KEY,
    OBS_LABEL,
    OBS_OK,
    OBS_PROBABILITY,
    OBS_SCORE,
    OBS_UNCERTAINTY,
    UNS_KEY,
)
from hubarches.labels import (
    DEFAULT_EMBEDDING_CAP,
    DEFAULT_K,
    DEFAULT_UNCERTAINTY_THRESHOLD,
    MAPPING_QUALITY_THRESHOLD,
    UNKNOWN_LABEL,
    LabelTransfer,
    MappingQuality,
    build_index,
    quality_from_neighbors,
    stratified_subsample,
    transfer_from_neighbors,
)
from hubarches.manifest import Categorical, Lineage, Manifest, ParentRef, TrainingSummary
from hubarches.model import build_model
from hubarches.neighbors import reference_spread
from hubarches.reference import Reference, ReferenceEmbedding
from hubarches.registry import Registry, VersionInfo
from hubarches.registry.select import get_registry
from hubarches.surgery import grow, plan_surgery
from hubarches.train import (
    QUERY_DEFAULTS,
    History,
    Progress,
    TrainOptions,
    train_query,
    train_reference,
)

__all__ = [
    "LATENT_KEY",
    "MappingResult",
    "TrainResult",
    "load_reference",
    "map_query",
    "push",
    "train_atlas",
]


RegistryArg = Registry | str | os.PathLike[str] | None


# --- pull and push ------------------------------------------------------------------------


def load_reference(
    ref: str | os.PathLike[str],
    registry: RegistryArg = None,
    *,
    offline: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> Reference:
    """Pull ``org/name[@version|@sha256:…]`` (or open a bundle directory) and load it.

    Every file is verified against the manifest's sha256 before it is read.
    """
    path = Path(ref)
    if (path / "manifest.json").is_file():
        return Reference.from_bundle(path)
    pulled = pull(str(ref), registry, offline=offline, cache_dir=cache_dir)
    return Reference.from_bundle(pulled.path, info=pulled.info, verified=pulled.manifest)


def push(
    source: Reference | str | os.PathLike[str],
    name: str,
    registry: RegistryArg = None,
) -> VersionInfo:
    """Publish a reference (or a bundle directory) as the next version of ``name``.

    The bundle is loaded first as :func:`load_reference` would load it (every file verified,
    the weights loaded strictly into the architecture its manifest describes), so a bundle
    that could not be loaded back is refused before anything is written to the registry.
    """
    reg = get_registry(registry)
    if isinstance(source, Reference):
        with tempfile.TemporaryDirectory(prefix="hubarches-push-") as tmp:
            bundle = source.save(Path(tmp) / "bundle")
            _check_loadable(bundle)
            return reg.publish(bundle, name)
    path = Path(source)
    if not (path / "manifest.json").is_file():
        raise PushError(
            f"{path} is not a bundle directory (it has no manifest.json)",
            hint="Pass a directory written by `hubarches train --out` or `map --save-model`",
        )
    _check_loadable(path)
    return reg.publish(path, name)


def _check_loadable(bundle: Path) -> None:
    """Refuse a bundle that :func:`load_reference` could not load (BundleError subclasses)."""
    check_publishable(bundle)  # cheap, and names a pickle as such whichever file holds it
    Reference.from_bundle(bundle)


# --- training a reference -----------------------------------------------------------------


@dataclass(eq=False)
class TrainResult:
    """A freshly trained, unpublished reference and its training history."""

    reference: Reference
    history: History
    n_cells_dropped: int = 0


def train_atlas(
    adata: ad.AnnData,
    *,
    batch_key: str,
    extra_covariates: Sequence[str] = (),
    label_key: str | None = None,
    layer: str | None = None,
    gene_key: str | None = None,
    config: Mapping[str, Any] | None = None,
    options: TrainOptions | None = None,
    description: str = "",
    license: str = "cc-by-4.0",
    citation: str = "",
    embedding_cap: int = DEFAULT_EMBEDDING_CAP,
    progress: Progress | None = None,
) -> TrainResult:
    """Train a reference on an atlas and return it unpublished (save or push it next).

    ``config`` holds architecture settings of :class:`~hubarches.config.ModelConfig`
    (``n_latent``, ``likelihood``, ...). The bundle carries the reference cells' embedding
    (a label-stratified sample of at most ``embedding_cap`` cells) for label transfer.
    """
    options = options or TrainOptions()
    prepared = prepare_reference(
        adata,
        batch_key=batch_key,
        extra_covariates=extra_covariates,
        layer=layer,
        label_key=label_key,
        gene_key=gene_key,
    )
    model_config = ModelConfig(
        n_genes=len(prepared.genes),
        covariate_sizes=tuple(len(c) for _, c in prepared.covariates),
        **dict(config or {}),
    )
    model = build_model(model_config, seed=options.seed)
    counts = CountMatrix.from_matrix(prepared.X)
    history = train_reference(model, counts, prepared.codes, options=options, progress=progress)
    codes = prepared.label_codes
    keep = stratified_subsample(
        codes if codes is not None else np.zeros(counts.n_cells, np.int64),
        embedding_cap,
        seed=options.seed,
    )
    latent = embed_matrix(model, counts, prepared.codes, device=options.device)[keep]
    spread_k = min(DEFAULT_K, len(latent) - 1)
    spread = None
    if spread_k >= 1:  # mapping quality's denominator, once here rather than at every map
        spread = reference_spread(build_index(latent), np.arange(len(latent)), spread_k)
    embedding = ReferenceEmbedding(
        latent=latent,
        labels=None if codes is None else codes[keep],
        spread=spread,
        spread_k=spread_k if spread is not None else None,
    )
    labels = (
        Categorical(key=prepared.label_key, categories=prepared.label_categories)
        if prepared.label_key is not None and prepared.label_categories
        else None
    )
    manifest = Manifest.from_model_config(
        model_config,
        genes=prepared.genes,
        id_type="ensembl" if prepared.gene_id_type == "ensembl" else "symbol",
        covariates=dict(prepared.covariates),
        labels=labels,
        training=_training_summary(history, options, n_cells=counts.n_cells),
        description=description,
        license=license,
        citation=citation,
    )
    reference = Reference(manifest=manifest, model=model, embedding=embedding)
    return TrainResult(reference, history, prepared.n_zero_count_cells_dropped)


def _training_summary(history: History, options: TrainOptions, *, n_cells: int) -> TrainingSummary:
    """The manifest's record of a training run."""
    last = history.epochs[-1] if history.epochs else None
    losses = (
        {}
        if last is None
        else {"loss": last.loss, "reconstruction": last.reconstruction, "kl": last.kl}
    )
    if last is not None and last.validation_loss is not None:
        losses["validation"] = last.validation_loss
    return TrainingSummary(
        cells=n_cells,
        epochs=len(history.epochs),
        seed=options.seed,
        final_losses=losses,
        batch_size=options.batch_size,
        learning_rate=options.lr,
        settings={
            "optimizer": "adam",
            "weight_decay": options.weight_decay,
            "kl_warmup_epochs": options.kl_warmup_epochs,
            "stopped_early": history.stopped_early,
        },
    )


# --- mapping a query ----------------------------------------------------------------------


@dataclass(eq=False)
class MappingResult:
    """What mapping produced.

    ``reference`` is the extension (unpublished; save or push it), ``latent`` the query's
    latent means in input cell order, ``adata`` the output AnnData (input cells, obs and X,
    plus the latent, labels and mapping score), ``report`` a JSON-able summary.
    """

    reference: Reference
    latent: np.ndarray
    adata: ad.AnnData
    report: dict[str, Any]
    history: History
    query: QueryReport
    labels: LabelTransfer | None = None
    quality: MappingQuality | None = None
    timings: dict[str, float] = field(default_factory=dict)


def map_query(
    reference: Reference,
    adata: ad.AnnData,
    *,
    batch_key: str,
    epochs: int | None = None,
    seed: int = 0,
    batch_size: int = 128,
    layer: str | None = None,
    gene_key: str | None = None,
    covariate_keys: Mapping[str, str] | None = None,
    lr: float = QUERY_DEFAULTS.lr,
    kl_warmup_epochs: int = QUERY_DEFAULTS.kl_warmup_epochs,
    dropout: bool = False,
    k: int = DEFAULT_K,
    uncertainty_threshold: float = DEFAULT_UNCERTAINTY_THRESHOLD,
    quality_threshold: float = MAPPING_QUALITY_THRESHOLD,
    device: str = "auto",
    progress: Progress | None = None,
) -> MappingResult:
    """Map a query onto a reference with scArches surgery and return the result.

    ``epochs=None`` uses scvi-tools' heuristic (400 epochs up to 20k cells, fewer beyond).
    Cells with no counts on the reference genes are embedded but not trained on, get the
    label ``Unknown`` and fail the mapping-quality check.
    """
    timings: dict[str, float] = {}
    clock = time.perf_counter()
    prepared = prepare_query(
        adata,
        genes=reference.genes,
        covariates=reference.covariates,
        batch_key=batch_key,
        layer=layer,
        gene_key=gene_key,
        covariate_keys=covariate_keys,
    )
    timings["prepare"], clock = time.perf_counter() - clock, time.perf_counter()
    plan = plan_surgery(reference.covariates, prepared.covariates.new_categories)
    model = grow(reference.model, plan.n_new, seed=seed)
    timings["surgery"], clock = time.perf_counter() - clock, time.perf_counter()
    counts = prepared.counts
    codes = prepared.covariates.codes
    options = TrainOptions(
        epochs=epochs,
        batch_size=batch_size,
        lr=lr,
        weight_decay=0.0,
        kl_warmup_epochs=kl_warmup_epochs,
        seed=seed,
        dropout_in_query=dropout,
        device=device,
    )
    history = train_query(model, counts, codes, options=options, progress=progress)
    timings["query_training"], clock = time.perf_counter() - clock, time.perf_counter()
    latent = embed_matrix(model, counts, codes, device=device)
    timings["embedding"], clock = time.perf_counter() - clock, time.perf_counter()
    labels, quality = _annotate(
        reference, latent, prepared, k=k, threshold=uncertainty_threshold, quality=quality_threshold
    )
    timings["labels"] = time.perf_counter() - clock
    extension = Reference(
        manifest=_extension_manifest(
            reference, plan.categories, plan.added_by_key(), history, options, prepared
        ),
        model=model,
        embedding=reference.embedding,  # reference cells embed bitwise the same in the extension
    )
    report = _report(reference, prepared, history, labels, quality, timings, options)
    out = _output_adata(adata, latent, labels, quality, report)
    return MappingResult(
        reference=extension,
        latent=latent,
        adata=out,
        report=report,
        history=history,
        query=prepared.report,
        labels=labels,
        quality=quality,
        timings=timings,
    )


def _annotate(
    reference: Reference,
    latent: np.ndarray,
    prepared: PreparedQuery,
    *,
    k: int,
    threshold: float,
    quality: float,
) -> tuple[LabelTransfer | None, MappingQuality | None]:
    """Mapping quality (when the bundle has reference cells) and label transfer (with labels).

    One neighbour search serves both. Cells failing the quality check, including cells
    without counts (they carry no information), are labelled ``Unknown``.
    """
    emb = reference.embedding
    if emb is None or len(emb.latent) == 0:
        return None, None
    stored = None if emb.spread is None or emb.spread_k is None else (emb.spread_k, emb.spread)
    index = build_index(emb.latent, spread=stored)
    distances, neighbors = index.query(latent, min(k, index.n_cells))
    scores = quality_from_neighbors(index, distances, neighbors, threshold=quality)
    if not prepared.trainable.all():
        ok = scores.ok & prepared.trainable
        scores = replace(scores, ok=ok, n_flagged=int((~ok).sum()))
    labels_meta = reference.manifest.labels
    if emb.labels is None or labels_meta is None:
        return None, scores
    transfer = transfer_from_neighbors(
        distances,
        neighbors,
        emb.labels,
        labels_meta.categories,
        threshold=threshold,
        unknown_mask=~scores.ok,
    )
    return transfer, scores


def _extension_manifest(
    reference: Reference,
    categories: tuple[tuple[str, ...], ...],
    added: dict[str, list[str]],
    history: History,
    options: TrainOptions,
    prepared: PreparedQuery,
) -> Manifest:
    """The parent's manifest with grown covariates, a lineage and the query training."""
    parent = reference.manifest
    covariates = tuple(
        Categorical(key=c.key, categories=cats)
        for c, cats in zip(parent.covariates, categories, strict=True)
    )
    lineage = None
    if parent.name is not None and parent.version is not None:
        lineage = Lineage(
            parent=ParentRef(name=parent.name, version=parent.version, digest=reference.digest),
            added_categories={k: tuple(v) for k, v in added.items()},
        )
    training = _training_summary(history, options, n_cells=int(prepared.trainable.sum()))
    return parent.model_copy(
        update={
            "name": None,
            "version": None,
            "created": datetime.now(timezone.utc).replace(microsecond=0),
            "written_by": __version__,
            "covariates": covariates,
            "lineage": lineage,
            "training": training,
            "files": {},
        }
    )


def _report(
    reference: Reference,
    prepared: PreparedQuery,
    history: History,
    labels: LabelTransfer | None,
    quality: MappingQuality | None,
    timings: dict[str, float],
    options: TrainOptions,
) -> dict[str, Any]:
    """The JSON-able mapping report that goes into ``uns["hubarches"]`` and ``--json``."""
    m = reference.manifest
    return {
        "hubarches_version": __version__,
        "reference": {
            "name": m.name,
            "version": m.version,
            "digest": reference.digest,
        },
        "query": prepared.report.to_dict(),
        "new_categories": {k: list(v) for k, v in prepared.covariates.new_categories.items()},
        "training": {**history.to_dict(), "seed": options.seed, "batch_size": options.batch_size},
        "labels": None
        if labels is None
        else {"key": m.labels.key if m.labels else None, **labels.to_dict()},
        "labels_note": None
        if labels is not None
        else "the reference carries no cell labels; no labels were transferred",
        "mapping_quality": None if quality is None else quality.to_dict(),
        "timings_s": dict(timings),
    }


def _for_h5ad(value: Any) -> Any:
    """Drop None (which h5ad cannot store) and turn tuples into lists, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _for_h5ad(v) for k, v in value.items() if v is not None}
    if isinstance(value, list | tuple):
        return [_for_h5ad(v) for v in value if v is not None]
    return value


def _output_adata(
    adata: ad.AnnData,
    latent: np.ndarray,
    labels: LabelTransfer | None,
    quality: MappingQuality | None,
    report: dict[str, Any],
) -> ad.AnnData:
    """The input's cells, obs, var and X (not copied), plus the mapping's results.

    A backed input's X stays on disk (X is None here); :func:`write_mapped` copies it into
    the output file without reading it into memory.
    """
    obs = adata.obs.copy()
    if labels is not None:
        categories = [*labels.categories, UNKNOWN_LABEL]
        obs[OBS_LABEL] = pd.Categorical(labels.labels.astype(str), categories=categories)
        obs[OBS_PROBABILITY] = labels.probability
        obs[OBS_UNCERTAINTY] = labels.uncertainty
    if quality is not None:
        obs[OBS_SCORE] = quality.score
        obs[OBS_OK] = quality.ok
    backed = bool(getattr(adata, "isbacked", False))
    return ad.AnnData(
        X=None if backed else adata.X,
        obs=obs,
        var=adata.var.copy(),
        layers={} if backed else dict(adata.layers.items()),
        obsm={**dict(adata.obsm), LATENT_KEY: latent},
        uns={**dict(adata.uns), UNS_KEY: _for_h5ad(report)},
    )
