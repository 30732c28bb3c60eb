"""The local registry: bundles in a directory tree ``<root>/<org>/<name>/<version>/``.

A version appears atomically: it is written into a temporary directory under
``<root>/.tmp/`` and renamed onto its version directory. Renaming onto an existing version
fails, which is how a concurrent push notices it lost the race; it then stamps the next
number and tries again, so concurrent pushes each get a distinct version and none is lost
or half-visible. Temporary directories are ignored by listing; those left by a killed push
are removed by a later one. A registry can fall back, read-only, to another (the demo
atlases shipped with hubarches): reads see both, pushes go to the primary only, and
version numbers are never reused across the two.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
from pathlib import Path

from hubarches.bundle import (
    check_publishable,
    clean_stale_temp_dirs,
    copy_payload,
    finish_bundle,
    make_temp_dir,
    move_into_place,
    remove_if_empty,
)
from hubarches.errors import (
    BundleError,
    PushError,
    ReferenceNotFound,
    VersionExistsError,
    VersionNotFound,
)
from hubarches.manifest import MANIFEST_FILE, manifest_digest, read_manifest
from hubarches.registry import RefSpec, VersionInfo, validate_name

__all__ = ["LocalRegistry"]

logger = logging.getLogger(__name__)

TEMP_DIR = ".tmp"
"""Temporary versions are written here, inside the root, so a rename can publish them."""
MAX_PUSH_ATTEMPTS = 10_000
"""Give up after losing this many races in a row (it does not happen in practice)."""
_PART = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,95}$")
_VERSION = re.compile(r"^[1-9][0-9]{0,8}$")


class LocalRegistry:
    """A registry in a local directory; see the module docstring for the layout."""

    def __init__(
        self,
        root: str | os.PathLike[str],
        *,
        read_only: bool = False,
        fallback: LocalRegistry | None = None,
    ) -> None:
        self.root = Path(root).expanduser().absolute()
        self.read_only = read_only
        self.fallback = fallback
        self._digests: dict[Path, str] = {}

    def __repr__(self) -> str:
        extra = ", read_only=True" if self.read_only else ""
        extra += f", fallback={self.fallback!r}" if self.fallback is not None else ""
        return f"LocalRegistry({str(self.root)!r}{extra})"

    @property
    def location(self) -> str:
        """The root directory (and the fallback's), for messages."""
        if self.fallback is None:
            return str(self.root)
        return f"{self.root} (and, read-only, {self.fallback.location})"

    # --- reading ----------------------------------------------------------------------------

    def _own_atlases(self) -> list[str]:
        names = []
        try:
            orgs = [p for p in self.root.iterdir() if _PART.match(p.name) and p.is_dir()]
        except (FileNotFoundError, NotADirectoryError):
            return []
        for org in orgs:
            for atlas in org.iterdir():
                if _PART.match(atlas.name) and ".." not in atlas.name and self._own_numbers(atlas):
                    names.append(f"{org.name}/{atlas.name}")
        return names

    @staticmethod
    def _own_numbers(atlas_dir: Path) -> list[int]:
        """Version numbers present in an atlas directory (temp dirs and stray files ignored)."""
        try:
            return sorted(
                int(p.name)
                for p in atlas_dir.iterdir()
                if _VERSION.match(p.name) and (p / MANIFEST_FILE).is_file()
            )
        except (FileNotFoundError, NotADirectoryError):
            return []

    def _atlas_dir(self, name: str) -> Path:
        spec = RefSpec(validate_name(name))
        return self.root / spec.org / spec.atlas

    def list_atlases(self) -> list[str]:
        """Names ``org/name`` of every atlas, sorted (the fallback's included)."""
        names = set(self._own_atlases())
        if self.fallback is not None:
            names.update(self.fallback.list_atlases())
        return sorted(names)

    def _numbers(self, name: str) -> dict[int, LocalRegistry]:
        """Version number → the registry (self or a fallback) that holds it."""
        found: dict[int, LocalRegistry] = {}
        if self.fallback is not None:
            found.update(self.fallback._numbers(name))
        found.update(dict.fromkeys(self._own_numbers(self._atlas_dir(name)), self))
        return found

    def version_path(self, info: VersionInfo | RefSpec) -> Path:
        """Return the directory that holds ``name@version`` (VersionNotFound if none)."""
        version = info.version
        holders = self._numbers(info.name)
        if version is None or version not in holders:
            self._raise_missing(info.name, str(version), holders)
        return holders[version]._atlas_dir(info.name) / str(version)

    def _digest(self, path: Path) -> str:
        """Digest of the manifest in a version directory (versions never change: memoized)."""
        if path not in self._digests:
            self._digests[path] = manifest_digest(read_manifest(path / MANIFEST_FILE))
        return self._digests[path]

    def _info(self, name: str, version: int, holder: LocalRegistry) -> VersionInfo:
        path = holder._atlas_dir(name) / str(version)
        return VersionInfo(name, version, self._digest(path))

    def _raise_missing(self, name: str, what: str, holders: dict[int, LocalRegistry]) -> None:
        if not holders:
            raise ReferenceNotFound(name, registry=self.location, available=self.list_atlases())
        raise VersionNotFound(name, what, available=sorted(holders))

    def list_versions(self, name: str) -> list[VersionInfo]:
        """Every version of an atlas, ascending; ReferenceNotFound if there is none."""
        holders = self._numbers(name)
        if not holders:
            self._raise_missing(name, "", holders)
        return [self._info(name, v, holders[v]) for v in sorted(holders)]

    def resolve(self, spec: RefSpec) -> VersionInfo:
        """Resolve a reference to a version: the latest, a number, or a manifest digest."""
        holders = self._numbers(spec.name)
        if spec.digest is not None:
            # A version whose manifest cannot be read cannot have the digest asked for; it
            # must not hide the others (loading it by number still reports the damage).
            for number in sorted(holders):
                try:
                    info = self._info(spec.name, number, holders[number])
                except (BundleError, OSError) as err:
                    logger.warning("skipping %s@%d in a digest lookup: %s", spec.name, number, err)
                    continue
                if info.digest == spec.digest:
                    return info
            self._raise_missing(spec.name, f"sha256:{spec.digest}", holders)
        version = max(holders, default=None) if spec.version is None else spec.version
        if version is None or version not in holders:
            self._raise_missing(spec.name, str(spec.version), holders)
        return self._info(spec.name, version, holders[version])

    def fetch(self, info: VersionInfo, dest: Path) -> None:
        """Copy a version's manifest and listed files into ``dest`` (created if needed).

        Files are copied as they are; the caller verifies them against ``info.digest``.
        """
        src = self.version_path(info)
        dest = Path(dest)
        dest.mkdir(parents=True, exist_ok=True)
        manifest = read_manifest(src / MANIFEST_FILE)
        shutil.copyfile(src / MANIFEST_FILE, dest / MANIFEST_FILE)
        for filename in manifest.files:
            if (src / filename).is_file():  # a missing file is reported by verification
                shutil.copyfile(src / filename, dest / filename)

    # --- writing ----------------------------------------------------------------------------

    def publish(self, bundle_dir: Path, name: str, *, version: int | None = None) -> VersionInfo:
        """Publish a bundle as the next version of ``name`` (or as ``version``, if free).

        A bundle whose manifest or safetensors files are unusable is refused before anything
        is written; the bundle is verified while it is copied, and the copy checked again;
        the version is stamped into the manifest and card; the version directory appears
        atomically. Raises VersionExistsError when ``version`` is taken, PushError when
        read-only, BundleError subclasses for a bad bundle.
        """
        if self.read_only:
            raise PushError(
                f"{self.root} is read-only (it holds the demo atlases)",
                hint="Push to your own registry: pass --registry PATH or set HUBARCHES_REGISTRY",
            )
        validate_name(name)
        check_publishable(Path(bundle_dir))  # a bad bundle is refused before anything is written
        if version is not None and version in self._numbers(name):
            raise VersionExistsError(name, version)
        temp_root = self.root / TEMP_DIR
        clean_stale_temp_dirs(temp_root)
        tmp = make_temp_dir(temp_root, prefix="push")
        try:
            base = copy_payload(Path(bundle_dir), tmp)
            atlas_dir = self._atlas_dir(name)
            atlas_dir.mkdir(parents=True, exist_ok=True)
            taken = 0  # a directory that blocks a rename without being a version counts too
            for _ in range(MAX_PUSH_ATTEMPTS):
                number = version or max([taken, *self._numbers(name)]) + 1
                final = finish_bundle(
                    tmp, base.model_copy(update={"name": name, "version": number})
                )
                try:
                    move_into_place(tmp, atlas_dir / str(number))
                except FileExistsError:
                    if version is not None:
                        raise VersionExistsError(name, version) from None
                    logger.debug("%s@%d was taken meanwhile; trying the next number", name, number)
                    taken = number
                    continue
                info = VersionInfo(name, number, manifest_digest(final))
                self._digests[atlas_dir / str(number)] = info.digest
                return info
            raise PushError(f"could not find a free version of {name} to publish")
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
            remove_if_empty(temp_root)
