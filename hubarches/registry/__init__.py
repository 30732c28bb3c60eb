"""Registries: where bundles live. One Protocol, several backends.

A reference string names what to get: ``org/name`` (the latest version), ``org/name@3`` (a
version number) or ``org/name@sha256:<hex>`` (a version by the digest of its manifest).
Backends resolve it to a :class:`VersionInfo`, fetch the bundle's files, and publish new
versions; verification and caching are shared and live outside the backends.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol, runtime_checkable

from hubarches.errors import ReferenceStringError

__all__ = ["RefSpec", "Registry", "VersionInfo", "parse_ref"]

_PART = r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}"
_NAME_RE = re.compile(rf"^(?P<org>{_PART})/(?P<atlas>{_PART})$")
_DIGEST_RE = re.compile(r"^sha256:(?P<hex>[0-9a-f]{64})$")


@dataclass(frozen=True)
class RefSpec:
    """A parsed reference string; at most one of ``version`` and ``digest`` is set."""

    name: str
    version: int | None = None
    digest: str | None = None

    @property
    def org(self) -> str:
        """The organisation part of ``org/name``."""
        return self.name.split("/", 1)[0]

    @property
    def atlas(self) -> str:
        """The atlas part of ``org/name``."""
        return self.name.split("/", 1)[1]

    @property
    def pin(self) -> str | None:
        """What follows the ``@``: ``"3"``, ``"sha256:<hex>"``, or None for the latest."""
        if self.version is not None:
            return str(self.version)
        if self.digest is not None:
            return f"sha256:{self.digest}"
        return None

    def __str__(self) -> str:
        return self.name if self.pin is None else f"{self.name}@{self.pin}"


@dataclass(frozen=True)
class VersionInfo:
    """One published version: its name, number and manifest digest (64 hex digits)."""

    name: str
    version: int
    digest: str

    def __str__(self) -> str:
        return f"{self.name}@{self.version}"


def validate_name(name: str) -> str:
    """Check an atlas name ``org/name`` and return it unchanged."""
    if not _NAME_RE.match(name) or ".." in name:
        raise ReferenceStringError(
            name, "an atlas name is org/name, each part letters, digits, '.', '_' or '-'"
        )
    return name


def parse_ref(ref: str) -> RefSpec:
    """Parse ``org/name``, ``org/name@N`` or ``org/name@sha256:<hex>``."""
    if not isinstance(ref, str) or not ref.strip():
        raise ReferenceStringError(str(ref), "it is empty")
    name, sep, pin = ref.strip().partition("@")
    validate_name(name)
    if not sep:
        return RefSpec(name)
    if pin.isdigit() and not pin.startswith("0"):
        return RefSpec(name, version=int(pin))
    if pin.startswith("v") and pin[1:].isdigit() and not pin[1:].startswith("0"):
        return RefSpec(name, version=int(pin[1:]))
    match = _DIGEST_RE.match(pin.lower())
    if match:
        return RefSpec(name, digest=match["hex"])
    raise ReferenceStringError(
        ref, "the part after '@' must be a version number ≥ 1 or sha256:<64 hex digits>"
    )


@runtime_checkable
class Registry(Protocol):
    """What every registry backend provides. Backends never verify; callers do."""

    @property
    def location(self) -> str:
        """Where this registry is, for messages (a path or an endpoint URL)."""
        ...

    def list_atlases(self) -> list[str]:
        """Names ``org/name`` of every atlas, sorted."""
        ...

    def list_versions(self, name: str) -> list[VersionInfo]:
        """Every published version of an atlas, ascending; ``ReferenceNotFound`` if none."""
        ...

    def resolve(self, spec: RefSpec) -> VersionInfo:
        """The version a reference string means (latest when unpinned)."""
        ...

    def fetch(self, info: VersionInfo, dest: Path) -> None:
        """Copy the files of a version's bundle into the empty directory ``dest``."""
        ...

    def publish(self, bundle_dir: Path, name: str) -> VersionInfo:
        """Publish a bundle as the next version of ``name``; never overwrites a version.

        The backend assigns the version number, stamps it (with ``name``) into the
        manifest, re-renders the model card, recomputes the file hashes, and makes the
        version visible atomically.
        """
        ...
