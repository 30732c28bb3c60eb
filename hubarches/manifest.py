"""The manifest: everything needed to rebuild, verify and cite one version of an atlas.

A manifest is a pydantic model with ``extra="forbid"`` and a docstring under every field;
:func:`json_schema` exports its JSON schema. It carries ``schema_version``: a manifest written
by a newer schema is refused (:class:`~hubarches.errors.ManifestVersionError`), an older one is
upgraded by the pure functions in :data:`MIGRATIONS` before validation. A version's digest is
the sha256 of the manifest's canonical JSON (sorted keys, compact separators, UTF-8); since the
manifest lists the sha256 of every other file, the digest pins the whole bundle.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import fields as dataclass_fields
from datetime import datetime, timezone
from pathlib import Path
from typing import Annotated, Any, Literal

from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    Strict,
    StrictBool,
    StrictFloat,
    StrictInt,
    StrictStr,
    ValidationError,
    field_validator,
    model_validator,
)

from hubarches._version import __version__
from hubarches.config import Dispersion, Injection, Likelihood, ModelConfig, Normalization
from hubarches.errors import ManifestError, ManifestVersionError, ModelError
from hubarches.registry import validate_name

__all__ = [
    "MANIFEST_FILE",
    "MIGRATIONS",
    "SCHEMA_VERSION",
    "Categorical",
    "FileEntry",
    "Genes",
    "Lineage",
    "Manifest",
    "ModelSpec",
    "ParentRef",
    "TrainingSummary",
    "canonical_json",
    "is_digest",
    "json_schema",
    "manifest_digest",
    "manifest_json",
    "migrate",
    "parse_manifest",
    "read_manifest",
    "summarize_validation",
]

SCHEMA_VERSION = 1
MANIFEST_FILE = "manifest.json"
MAX_MANIFEST_BYTES = 64 * 1024 * 1024
"""Refuse larger manifest files outright: even 100k genes with symbols take a few MB."""
MAX_REPORTED_ERRORS = 8

Migration = Callable[[dict[str, Any]], dict[str, Any]]
MIGRATIONS: dict[int, Migration] = {}
"""``MIGRATIONS[v]`` turns a schema-``v`` manifest dict into a schema-``v + 1`` one (pure)."""

_HEX64 = re.compile(r"^[0-9a-f]{64}$")
# A bundle file is a plain name: no separators, no "..", nothing absolute, no hidden files.
_FILE_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,254}$")

Sha256Hex = Annotated[StrictStr, Field(pattern=r"^[0-9a-f]{64}$")]
Count = Annotated[StrictInt, Field(ge=0)]
Text = Annotated[StrictStr, Field(min_length=1)]
Timestamp = Annotated[AwareDatetime, Strict()]


class _Schema(BaseModel):
    """Shared settings: unknown fields are errors, instances are immutable."""

    model_config = ConfigDict(
        extra="forbid", frozen=True, use_attribute_docstrings=True, allow_inf_nan=False
    )


def _unique(values: Sequence[str], what: str) -> None:
    """Raise ValueError naming the first repeated value."""
    seen: set[str] = set()
    for v in values:
        if v in seen:
            raise ValueError(f"{what} must be unique; {v!r} appears more than once")
        seen.add(v)


class ModelSpec(_Schema):
    """The architecture: with the gene and covariate lists, it rebuilds the model exactly."""

    kind: Literal["scvi"]
    """Model family; ``scvi`` is the conditional VAE of scVI/scArches."""
    n_latent: StrictInt
    """Dimensions of the latent space."""
    n_hidden: StrictInt
    """Units per hidden layer."""
    n_layers: StrictInt
    """Hidden layers in the encoder and in the decoder."""
    dropout: StrictFloat
    """Dropout rate of the hidden layers during training."""
    likelihood: Likelihood
    """Count distribution of the decoder: ``nb``, ``zinb`` or ``poisson``."""
    dispersion: Dispersion
    """Inverse dispersion per ``gene`` or per ``gene-batch``."""
    covariate_injection: Injection
    """Covariates enter the ``first`` hidden layer only, or ``all`` of them."""
    encode_covariates: StrictBool
    """Whether the encoder sees the covariates (the decoder always does)."""
    encoder_norm: Normalization
    """Normalization of the encoder's hidden layers: ``layer``, ``batch`` or ``none``."""
    decoder_norm: Normalization
    """Normalization of the decoder's hidden layers: ``layer``, ``batch`` or ``none``."""


class Genes(_Schema):
    """The model's genes, in the order of its input and output columns."""

    ids: tuple[Text, ...] = Field(min_length=1)
    """Gene identifiers in model order; a query is reordered to this list."""
    id_type: Literal["symbol", "ensembl"]
    """What ``ids`` are: gene ``symbol`` s or ``ensembl`` ids."""
    symbols: tuple[StrictStr, ...] | None = None
    """Optional gene symbols aligned with ``ids`` (useful when ``ids`` are Ensembl ids)."""

    @model_validator(mode="after")
    def _check(self) -> Genes:
        _unique(self.ids, "gene ids")
        if self.symbols is not None and len(self.symbols) != len(self.ids):
            raise ValueError(
                f"genes.symbols has {len(self.symbols)} entries for {len(self.ids)} ids"
            )
        return self


class Categorical(_Schema):
    """A categorical obs column and its categories, in model order."""

    key: Text
    """The ``obs`` column that holds it."""
    categories: tuple[Text, ...] = Field(min_length=1)
    """Categories in the order of their one-hot columns; append-only across versions."""

    @field_validator("categories")
    @classmethod
    def _check(cls, v: tuple[str, ...]) -> tuple[str, ...]:
        _unique(v, "categories")
        return v


class TrainingSummary(_Schema):
    """How this version's parameters were trained (the query training for an extension)."""

    cells: Count
    """Cells trained on."""
    epochs: Count
    """Epochs run."""
    seed: StrictInt | None = None
    """Random seed, when one was set."""
    final_losses: dict[Text, StrictFloat] = Field(default_factory=dict)
    """Losses of the last epoch by name, e.g. ``{"elbo": ..., "kl": ...}``."""
    batch_size: Annotated[StrictInt, Field(ge=1)] | None = None
    """Cells per minibatch."""
    learning_rate: Annotated[StrictFloat, Field(gt=0)] | None = None
    """Optimizer learning rate."""
    settings: dict[Text, StrictStr | StrictInt | StrictFloat | StrictBool] = Field(
        default_factory=dict
    )
    """Other training settings worth recording (optimizer, KL warm-up, device, ...)."""


class ParentRef(_Schema):
    """The version an extension was built from."""

    name: Text
    """Atlas name ``org/name`` of the parent."""
    version: Annotated[StrictInt, Field(ge=1)]
    """Version number of the parent."""
    digest: Sha256Hex
    """Manifest digest of the parent (64 hex digits)."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        return validate_name(v)


class Lineage(_Schema):
    """Where an extension comes from and what it added."""

    parent: ParentRef
    """The reference that surgery started from."""
    added_categories: dict[Text, tuple[Text, ...]] = Field(default_factory=dict)
    """Covariate key → the categories this version added to it."""


class FileEntry(_Schema):
    """Size and sha256 of one bundle file."""

    sha256: Sha256Hex
    """Lower-case hex sha256 of the file's bytes."""
    size: Count
    """Size in bytes."""


class Manifest(_Schema):
    """One version of an atlas: identity, architecture, genes, covariates, provenance, files."""

    schema_version: Literal[1] = SCHEMA_VERSION
    """Version of this schema; newer ones need a newer hubarches."""
    written_by: StrictStr = __version__
    """Version of hubarches that wrote this manifest."""
    name: StrictStr | None = None
    """Atlas name ``org/name``; set by the registry at push (None before publication)."""
    version: Annotated[StrictInt, Field(ge=1)] | None = None
    """Version number, assigned by the registry at push (None before publication)."""
    created: Timestamp = Field(
        default_factory=lambda: datetime.now(timezone.utc).replace(microsecond=0)
    )
    """When the model was trained (UTC)."""
    description: StrictStr = ""
    """What the atlas is: tissue, organism, source data, intended use."""
    license: Text = "cc-by-4.0"
    """License identifier of the weights, as on the Hugging Face Hub (e.g. ``cc-by-4.0``)."""
    citation: StrictStr = ""
    """How to cite the atlas (BibTeX or plain text)."""
    model: ModelSpec
    """The architecture settings."""
    genes: Genes
    """The ordered gene list."""
    covariates: tuple[Categorical, ...] = Field(min_length=1)
    """Categorical covariates in model order; the first is the batch key."""
    labels: Categorical | None = None
    """Cell labels that can be transferred to a query, when the reference has them."""
    training: TrainingSummary | None = None
    """Summary of the training that produced these parameters."""
    lineage: Lineage | None = None
    """Parent and added categories, for a version made by surgery; None for a root."""
    files: dict[StrictStr, FileEntry] = Field(default_factory=dict)
    """Every file of the bundle but the manifest: name → size and sha256."""

    @field_validator("name")
    @classmethod
    def _name(cls, v: str | None) -> str | None:
        return None if v is None else validate_name(v)

    @field_validator("created")
    @classmethod
    def _utc(cls, v: datetime) -> datetime:
        return v.astimezone(timezone.utc)

    @field_validator("files")
    @classmethod
    def _file_names(cls, v: dict[str, FileEntry]) -> dict[str, FileEntry]:
        for name in v:
            if not _FILE_NAME.match(name):
                raise ValueError(
                    f"file name {name!r} is not a plain file name (letters, digits, '.', '_', "
                    "'-'; no path separators, '..', absolute paths or leading dots)"
                )
            if name == MANIFEST_FILE:
                raise ValueError(f"{MANIFEST_FILE} cannot list itself")
        return v

    @model_validator(mode="after")
    def _consistent(self) -> Manifest:
        _unique([c.key for c in self.covariates], "covariate keys")
        known = {c.key: set(c.categories) for c in self.covariates}
        if self.lineage is not None:
            for key, added in self.lineage.added_categories.items():
                if key not in known:
                    raise ValueError(f"lineage adds categories to unknown covariate {key!r}")
                missing = [c for c in added if c not in known[key]]
                if missing:
                    raise ValueError(f"lineage adds {missing} to {key!r}, which lacks them")
        try:
            self.to_model_config()
        except ModelError as err:
            raise ValueError(err.message) from err
        return self

    def to_model_config(self) -> ModelConfig:
        """Return the :class:`~hubarches.config.ModelConfig` that rebuilds this model exactly.

        (Named so because pydantic reserves ``model_config`` for its own settings.)
        """
        spec = self.model.model_dump(exclude={"kind"})
        return ModelConfig(
            n_genes=len(self.genes.ids),
            covariate_sizes=tuple(len(c.categories) for c in self.covariates),
            **spec,
        )

    @property
    def batch_key(self) -> str:
        """The obs column of the batch covariate (the first one)."""
        return self.covariates[0].key

    @property
    def ref(self) -> str | None:
        """``org/name@N`` once published, else None."""
        if self.name is None or self.version is None:
            return None
        return f"{self.name}@{self.version}"

    @classmethod
    def from_model_config(
        cls,
        config: ModelConfig,
        *,
        genes: Sequence[str] | Genes,
        covariates: Mapping[str, Sequence[str]] | Iterable[Categorical],
        id_type: Literal["symbol", "ensembl"] = "symbol",
        symbols: Sequence[str] | None = None,
        kind: Literal["scvi"] = "scvi",
        **other: Any,
    ) -> Manifest:
        """Build a manifest from a model's configuration and its gene and covariate lists.

        ``other`` holds the remaining fields (``description``, ``labels``, ``training``, ...).
        Raises :class:`ManifestError` when the lists do not match the configuration's sizes.
        """
        if not isinstance(genes, Genes):
            genes = Genes(
                ids=tuple(genes),
                id_type=id_type,
                symbols=None if symbols is None else tuple(symbols),
            )
        if isinstance(covariates, Mapping):
            covariates = [Categorical(key=k, categories=tuple(v)) for k, v in covariates.items()]
        covs = tuple(covariates)
        sizes = tuple(len(c.categories) for c in covs)
        if len(genes.ids) != config.n_genes:
            raise ManifestError(
                f"the model has {config.n_genes} genes but {len(genes.ids)} gene ids were given",
                hint="Pass the genes in the order the model was trained on",
            )
        if sizes != config.covariate_sizes:
            raise ManifestError(
                f"covariate category counts {sizes} do not match the model's "
                f"{config.covariate_sizes}",
                hint="Pass every covariate's categories in model order",
            )
        arch = {f.name: getattr(config, f.name) for f in dataclass_fields(config)}
        del arch["n_genes"], arch["covariate_sizes"]
        data = {"model": {"kind": kind, **arch}, "genes": genes, "covariates": covs, **other}
        try:
            return cls.model_validate(data)
        except ValidationError as err:
            raise ManifestError(summarize_validation(err, "the manifest")) from err


def summarize_validation(err: ValidationError, source: str) -> str:
    """One line per schema violation, bounded."""
    problems = [
        f"{'.'.join(str(p) for p in e['loc']) or '<root>'}: {e['msg']}"
        for e in err.errors(include_url=False)
    ]
    shown = "; ".join(problems[:MAX_REPORTED_ERRORS])
    more = len(problems) - MAX_REPORTED_ERRORS
    return f"{source} does not follow the manifest schema: {shown}" + (
        f" (and {more} more)" if more > 0 else ""
    )


def _no_duplicate_keys(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    """JSON object hook that refuses repeated keys (json.loads would keep the last)."""
    out: dict[str, Any] = {}
    for k, v in pairs:
        if k in out:
            raise ValueError(f"key {k!r} appears twice")
        out[k] = v
    return out


def migrate(data: dict[str, Any], *, source: str = "the manifest") -> dict[str, Any]:
    """Bring a manifest dict to :data:`SCHEMA_VERSION`, refusing one from a newer schema."""
    found = data.get("schema_version")
    if isinstance(found, bool) or not isinstance(found, int) or found < 1:
        raise ManifestError(
            f"{source} has no valid schema_version (found {found!r})",
            hint="It was not written by hubarches; write bundles with hubarches",
        )
    if found > SCHEMA_VERSION:
        raise ManifestVersionError(found, SCHEMA_VERSION)
    while found < SCHEMA_VERSION:
        step = MIGRATIONS.get(found)
        if step is None:
            raise ManifestError(f"no migration from manifest schema_version {found}")
        data = step(data)
        found += 1
        data["schema_version"] = found
    return data


def parse_manifest(raw: str | bytes, *, source: str = "the manifest") -> Manifest:
    """Parse, migrate and validate manifest JSON; ``source`` names it in error messages."""
    try:
        data = json.loads(raw, object_pairs_hook=_no_duplicate_keys)
    except (ValueError, UnicodeDecodeError) as err:
        raise ManifestError(f"{source} is not valid JSON: {err}") from err
    if not isinstance(data, dict):
        raise ManifestError(f"{source} is not a JSON object")
    data = migrate(data, source=source)
    try:
        # Through JSON again so strict typing applies JSON rules (e.g. dates as strings).
        return Manifest.model_validate_json(json.dumps(data))
    except ValidationError as err:
        raise ManifestError(summarize_validation(err, source)) from err


def read_manifest(path: Path) -> Manifest:
    """Read and validate a ``manifest.json`` (ManifestError, ManifestVersionError)."""
    path = Path(path)
    try:
        with path.open("rb") as fh:
            raw = fh.read(MAX_MANIFEST_BYTES + 1)
    except OSError as err:
        raise ManifestError(f"cannot read {path}: {err.strerror or err}") from err
    if len(raw) > MAX_MANIFEST_BYTES:
        raise ManifestError(f"{path} is larger than {MAX_MANIFEST_BYTES} bytes")
    return parse_manifest(raw, source=str(path))


def manifest_json(m: Manifest) -> str:
    """Human-readable JSON for ``manifest.json`` (field order, indented, trailing newline)."""
    return m.model_dump_json(indent=2) + "\n"


def canonical_json(m: Manifest) -> bytes:
    """Serialize for the digest: sorted keys, compact separators, UTF-8."""
    return json.dumps(
        m.model_dump(mode="json"), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")


def manifest_digest(m: Manifest) -> str:
    """Compute the version digest: sha256 of the canonical manifest JSON, 64 hex digits."""
    return hashlib.sha256(canonical_json(m)).hexdigest()


def is_digest(value: str) -> bool:
    """Whether ``value`` is 64 lower-case hex digits."""
    return bool(_HEX64.match(value))


def json_schema() -> dict[str, Any]:
    """Export the manifest's JSON schema (for editors, validators and documentation)."""
    schema = Manifest.model_json_schema()
    schema["$schema"] = "https://json-schema.org/draft/2020-12/schema"
    return schema
