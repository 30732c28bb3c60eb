"""How the command line shows things: aligned text, JSON documents, a progress bar.

Every function here takes result objects and returns a string (or draws on a stream it is
given), so :mod:`hubarches.cli` stays a thin layer of options and calls, and tests can check
rendering without running a command. Human output is short and aligned, like ``pip show``;
``--json`` documents are the result objects' ``to_dict()``/report, made JSON-safe.
"""

from __future__ import annotations

import json
import math
import shlex
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import click

from hubarches.keys import LATENT_KEY, OBS_LABEL, UNS_KEY
from hubarches.labels import UNKNOWN_LABEL
from hubarches.manifest import manifest_digest

if TYPE_CHECKING:
    from types import TracebackType

    from hubarches.cache import PulledBundle
    from hubarches.manifest import Categorical, Manifest
    from hubarches.pipeline import MappingResult, TrainResult
    from hubarches.registry import VersionInfo
    from hubarches.train import EpochStats

__all__ = [
    "EpochBar",
    "Published",
    "digest_short",
    "fields",
    "json_document",
    "manifest_document",
    "map_document",
    "one_line",
    "progress_enabled",
    "render_info",
    "render_list",
    "render_map",
    "render_pull",
    "render_push",
    "render_train",
    "train_document",
    "version_document",
]

SHOWN_CATEGORIES = 6
"""Categories quoted per covariate in text output; ``info`` and ``--json`` give them all."""
SHOWN_LABELS = 12
"""Label counts shown in the map summary before the rest are summed up."""
DIGEST_CHARS = 12
"""Hex digits of a digest shown in text output (``--json`` gives all 64)."""


def one_line(text: object) -> str:
    """Collapse whitespace and newlines, so a message is exactly one line."""
    return " ".join(str(text).split())


def digest_short(digest: str | None) -> str:
    """``sha256:<first 12 hex digits>``, or a dash."""
    return f"sha256:{digest[:DIGEST_CHARS]}" if digest else "-"


def _count(n: int | None) -> str:
    return "-" if n is None else f"{n:,}"


def _float(x: float | None) -> str:
    """Format a loss or score for people: 4 significant digits, grouped thousands."""
    if x is None or not math.isfinite(x):
        return "-" if x is None else str(x)
    if abs(x) >= 1000:
        return f"{x:,.1f}"
    return f"{x:.4g}"


def _percent(part: int, whole: int) -> str:
    return f"{100 * part / whole:.1f}%" if whole else "0%"


def _preview(items: Sequence[str], limit: int = SHOWN_CATEGORIES) -> str:
    shown = ", ".join(str(i) for i in items[:limit])
    rest = len(items) - limit
    return f"{shown}, … ({rest} more)" if rest > 0 else shown


def fields(rows: Iterable[tuple[str, object]], *, indent: str = "") -> str:
    """Align ``label: value`` rows like ``pip show``; rows whose value is None are skipped."""
    kept = [(k, str(v)) for k, v in rows if v is not None]
    if not kept:
        return ""
    width = max(len(k) for k, _ in kept) + 1
    lines = []
    for key, value in kept:
        first, *rest = value.split("\n") or [""]
        lines.append(f"{indent}{key + ':':<{width}} {first}".rstrip())
        lines.extend(f"{indent}{'':<{width}} {line}".rstrip() for line in rest)
    return "\n".join(lines)


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """Lay out a plain text table, left-aligned columns two spaces apart."""
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    lines = [
        "  ".join(f"{c:<{w}}" for c, w in zip(row, widths, strict=True)).rstrip()
        for row in [header, *rows]
    ]
    return "\n".join(lines)


# --- JSON -----------------------------------------------------------------------------------


def _jsonable(value: Any) -> Any:
    """Turn numpy scalars/arrays, paths, tuples and sets into JSON types, recursively."""
    if isinstance(value, Mapping):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple, set, frozenset)):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    if hasattr(value, "tolist"):  # numpy scalars and arrays
        return _jsonable(value.tolist())
    if isinstance(value, float) and not math.isfinite(value):
        return None  # JSON has no NaN/inf
    return value


def json_document(document: Mapping[str, Any]) -> str:
    """One indented JSON document (ends without a newline; ``click.echo`` adds it)."""
    return json.dumps(_jsonable(document), indent=2, ensure_ascii=False)


def version_document(info: VersionInfo, *, registry: str | None = None) -> dict[str, Any]:
    """``{"name", "version", "digest", "ref"}`` of a published version (+ its registry)."""
    doc: dict[str, Any] = {
        "name": info.name,
        "version": info.version,
        "digest": info.digest,
        "ref": f"{info.name}@{info.version}",
    }
    if registry is not None:
        doc["registry"] = registry
    return doc


def manifest_document(manifest: Manifest) -> dict[str, Any]:
    """Return the manifest as JSON types (its ``manifest.json`` content)."""
    return manifest.model_dump(mode="json")


@dataclass(frozen=True)
class Published:
    """Where a command published something: the version and the registry's location."""

    info: VersionInfo
    registry: str


def map_document(
    result: MappingResult,
    *,
    output: Path,
    saved_model: Path | None,
    published: Published | None,
) -> dict[str, Any]:
    """``map --json``: the mapping report plus where the outputs went."""
    return {
        **result.report,
        "output": str(output),
        "saved_model": None if saved_model is None else str(saved_model),
        "published": None
        if published is None
        else version_document(published.info, registry=published.registry),
    }


def train_document(
    result: TrainResult,
    *,
    manifest: Manifest,
    bundle: Path,
    name: str,
    published: Published | None,
) -> dict[str, Any]:
    """``train --json``: where the bundle is, its manifest and the training history."""
    return {
        "bundle": str(bundle),
        "name": name,
        "digest": manifest_digest(manifest),
        "n_cells_dropped": result.n_cells_dropped,
        "training": result.history.to_dict(),
        "manifest": manifest_document(manifest),
        "published": None
        if published is None
        else version_document(published.info, registry=published.registry),
    }


# --- text -----------------------------------------------------------------------------------


def _covariate_lines(covariates: Iterable[Categorical], batch_key: str | None = None) -> str:
    lines = []
    for c in covariates:
        role = "batch key, " if c.key == batch_key else ""
        lines.append(f"{c.key} ({role}{len(c.categories)}): {_preview(c.categories)}")
    return "\n".join(lines)


def _lineage(manifest: Manifest) -> str:
    lineage = manifest.lineage
    if lineage is None:
        return "root (trained from scratch)"
    p = lineage.parent
    text = f"extends {p.name}@{p.version} ({digest_short(p.digest)})"
    added = "; ".join(f"{k} +{_preview(v)}" for k, v in lineage.added_categories.items())
    return f"{text}\nadded: {added}" if added else text


def _identity_rows(manifest: Manifest, digest: str) -> list[tuple[str, object]]:
    labels = manifest.labels
    return [
        ("Name", manifest.name or "(unpublished)"),
        ("Version", manifest.version),
        ("Digest", f"sha256:{digest}"),
        ("Genes", f"{len(manifest.genes.ids):,} ({manifest.genes.id_type})"),
        ("Covariates", _covariate_lines(manifest.covariates, manifest.batch_key)),
        (
            "Labels",
            "none"
            if labels is None
            else f"{labels.key} ({len(labels.categories)}): {_preview(labels.categories)}",
        ),
        ("Lineage", _lineage(manifest)),
    ]


def render_pull(pulled: PulledBundle) -> str:
    """``pull``: what was fetched, verified and where it is."""
    return fields([*_identity_rows(pulled.manifest, pulled.info.digest), ("Location", pulled.path)])


def render_info(
    manifest: Manifest,
    *,
    digest: str,
    versions: Sequence[VersionInfo] = (),
    path: Path | None = None,
) -> str:
    """``info``: the manifest in full, plus the atlas' versions."""
    m = manifest
    spec = m.model
    t = m.training
    training = None
    if t is not None:
        losses = ", ".join(f"{k} {_float(v)}" for k, v in t.final_losses.items())
        training = f"{t.cells:,} cells, {t.epochs} epochs" + (f"; final {losses}" if losses else "")
    latest = max((v.version for v in versions), default=None)
    rows = [
        *_identity_rows(m, digest),
        (
            "Versions",
            ", ".join(f"{v.version}{' (latest)' if v.version == latest else ''}" for v in versions)
            or None,
        ),
        ("Description", one_line(m.description) or "-"),
        (
            "Model",
            f"{spec.kind}: n_latent {spec.n_latent}, n_hidden {spec.n_hidden}, "
            f"n_layers {spec.n_layers}, {spec.likelihood}, dispersion {spec.dispersion}, "
            f"injection {spec.covariate_injection}",
        ),
        ("Training", training),
        ("Created", m.created.isoformat().replace("+00:00", "Z")),
        ("Written by", f"hubarches {m.written_by}"),
        ("License", m.license),
        ("Citation", one_line(m.citation) or "-"),
        ("Files", "\n".join(f"{n} ({e.size:,} bytes)" for n, e in sorted(m.files.items()))),
        ("Location", path),
    ]
    return fields(rows)


def render_list(location: str, atlases: Mapping[str, Sequence[VersionInfo]]) -> str:
    """``list``: one row per atlas with its versions and the latest digest."""
    if not atlases:
        return f"No atlases in {location}."
    rows = []
    for name, versions in atlases.items():
        latest = versions[-1] if versions else None
        rows.append(
            [
                name,
                ", ".join(str(v.version) for v in versions),
                str(latest.version) if latest else "-",
                digest_short(latest.digest if latest else None),
            ]
        )
    header = ["ATLAS", "VERSIONS", "LATEST", "DIGEST"]
    return f"{_table(header, rows)}\n\nRegistry: {location}"


def render_push(info: VersionInfo, *, registry: str, registry_option: str | None) -> str:
    """``push``: the new version and how to pull it."""
    suffix = f" --registry {shlex.quote(registry_option)}" if registry_option else ""
    return "\n".join(
        [
            f"Published {info.name}@{info.version} ({digest_short(info.digest)})",
            fields([("Registry", registry)], indent="  "),
            f"Pull it with: hubarches pull {info.name}@{info.version}{suffix}",
        ]
    )


def _labels_line(labels: Mapping[str, Any]) -> str:
    counts: dict[str, int] = dict(labels.get("counts", {}))
    unknown = counts.pop(UNKNOWN_LABEL, 0)
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))
    shown = [f"{k} {n:,}" for k, n in ranked[:SHOWN_LABELS] if n > 0]
    rest = sum(n for _, n in ranked[SHOWN_LABELS:])
    if rest:
        shown.append(f"other {rest:,}")
    shown.append(f"{UNKNOWN_LABEL} {unknown:,}")
    key = labels.get("key") or "labels"
    return f"{', '.join(shown)}\n(obs[{OBS_LABEL!r}], transferred from {key!r})"


def render_map(
    result: MappingResult,
    *,
    output: Path,
    saved_model: Path | None,
    published: Published | None,
    push_hint: str | None,
) -> str:
    """``map``: the short summary of a mapping and what to do next."""
    r = result.report
    ref = r["reference"]
    name = f"{ref['name']}@{ref['version']}" if ref.get("name") else "an unpublished reference"
    align = r["query"]["alignment"]
    training = r["training"]
    n_cells = r["query"]["n_cells"]
    new = "; ".join(f"{k}: {_preview(v)}" for k, v in r["new_categories"].items()) or "none"
    quality = r.get("mapping_quality")
    rows: list[tuple[str, object]] = [
        ("Reference", f"{name} ({digest_short(ref['digest'])})"),
        (
            "Cells",
            f"{n_cells:,} mapped"
            + (
                f" ({r['query']['n_zero_count_cells']:,} without counts)"
                if r["query"]["n_zero_count_cells"]
                else ""
            ),
        ),
        (
            "Genes",
            f"{align['n_shared']:,} of {align['n_reference']:,} shared "
            f"({align['fraction_shared']:.0%}), {align['n_missing']:,} missing "
            f"(zero-filled), {align['n_extra']:,} extra (dropped)",
        ),
        ("New categories", new),
        (
            "Training",
            f"{training['epochs']} epochs"
            + (
                ""
                if training["final_loss"] is None
                else f", final loss {_float(training['final_loss'])}"
            )
            + (" (stopped early)" if training.get("stopped_early") else ""),
        ),
        ("Labels", _labels_line(r["labels"]) if r.get("labels") else r.get("labels_note")),
        (
            "Mapping quality",
            None
            if not quality
            else f"{quality['n_flagged']:,} cells ({_percent(quality['n_flagged'], n_cells)}) "
            f"far from the reference (score > {quality['threshold']:g})",
        ),
        ("Output", f"{output}\n(latent in obsm[{LATENT_KEY!r}], report in uns[{UNS_KEY!r}])"),
        ("Model saved", saved_model),
        (
            "Published",
            None
            if published is None
            else f"{published.info.name}@{published.info.version} "
            f"({digest_short(published.info.digest)}) to {published.registry}",
        ),
    ]
    notes = list(align.get("notes") or [])
    text = fields(rows)
    if notes:
        text += "\n" + "\n".join(f"note: {one_line(n)}" for n in notes)
    if push_hint:
        text += f"\n\nNext: {push_hint}"
    return text


def render_train(
    result: TrainResult,
    *,
    manifest: Manifest,
    bundle: Path,
    name: str,
    published: Published | None,
    push_hint: str | None,
) -> str:
    """``train``: what was trained, where the bundle is, and the push command."""
    m = manifest
    history = result.history
    last = history.epochs[-1] if history.epochs else None
    size = sum(e.size for e in m.files.values()) if m.files else None
    rows: list[tuple[str, object]] = [
        ("Atlas", f"{name} (unpublished)" if published is None else name),
        (
            "Cells",
            f"{history.n_train_cells + history.n_validation_cells:,} trained on"
            + (
                f", {result.n_cells_dropped:,} without counts dropped"
                if result.n_cells_dropped
                else ""
            ),
        ),
        ("Genes", f"{len(m.genes.ids):,} ({m.genes.id_type})"),
        ("Covariates", _covariate_lines(m.covariates, m.batch_key)),
        (
            "Labels",
            "none"
            if m.labels is None
            else f"{m.labels.key} ({len(m.labels.categories)}): {_preview(m.labels.categories)}",
        ),
        (
            "Training",
            f"{len(history.epochs)} epochs"
            + ("" if last is None else f", final loss {_float(last.loss)}")
            + (" (stopped early)" if history.stopped_early else ""),
        ),
        ("Bundle", bundle if size is None else f"{bundle} ({size:,} bytes)"),
        (
            "Published",
            None
            if published is None
            else f"{published.info.name}@{published.info.version} "
            f"({digest_short(published.info.digest)}) to {published.registry}",
        ),
    ]
    text = fields(rows)
    if push_hint:
        text += f"\n\nNext: {push_hint}"
    return text


# --- progress -------------------------------------------------------------------------------


def progress_enabled(*, quiet: bool, stream: IO[str]) -> bool:
    """Draw progress bars only when not ``--quiet`` and the stream is a terminal."""
    if quiet:
        return False
    isatty = getattr(stream, "isatty", None)
    try:
        return bool(isatty and isatty())
    except ValueError:  # a closed stream
        return False


class EpochBar:
    """A :data:`~hubarches.train.Progress` callback that draws one bar on ``stream``.

    It opens on the first epoch (when the planned number is known) and closes on exit;
    when ``enabled`` is false it draws nothing at all.
    """

    def __init__(self, label: str, *, enabled: bool, stream: IO[str]) -> None:
        self.label = label
        self.enabled = enabled
        self.stream = stream
        self._bar: Any = None

    def __enter__(self) -> EpochBar:
        return self

    def __call__(self, stats: EpochStats, total: int) -> None:
        """Advance the bar by one epoch and show its loss."""
        if not self.enabled:
            return
        if self._bar is None:
            self._bar = click.progressbar(
                length=total,
                label=self.label,
                file=self.stream,
                show_eta=True,
                show_pos=True,
                item_show_func=lambda s: None if s is None else f"loss {_float(s.loss)}",
            )
            self._bar.__enter__()
        self._bar.update(1, stats)

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._bar is not None:
            self._bar.__exit__(exc_type, exc, tb)
            self._bar = None
