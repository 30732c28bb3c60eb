"""The bundle cache: pulled versions, stored by digest and verified on every use.

Layout under the cache root (``HUBARCHES_CACHE``, else ``$XDG_CACHE_HOME/hubarches``, else
``~/.cache/hubarches``)::

    bundles/<digest>/                  one verified bundle per version digest
    refs/<registry key>/<org>/<name>/<version>   the digest a registry gave that version
    tmp/                               fetches in progress (renamed into bundles/ when verified)

A version enters the cache only if it verifies against its digest and its safetensors files
parse as safetensors; an entry is used only if it verifies against its digest, and one whose
bytes changed is evicted and fetched again. The refs index lets a version be resolved with no
network (:func:`cached_versions`).
"""

from __future__ import annotations

import contextlib
import hashlib
import logging
import os
import shutil
import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path

from hubarches.bundle import (
    check_tensor_files,
    clean_stale_temp_dirs,
    make_temp_dir,
    move_into_place,
    remove_if_empty,
    verify_bundle,
)
from hubarches.errors import (
    BundleError,
    HubarchesWarning,
    IntegrityError,
    ManifestVersionError,
    RegistryOfflineError,
)
from hubarches.manifest import MANIFEST_FILE, Manifest, is_digest, read_manifest
from hubarches.registry import RefSpec, Registry, VersionInfo, parse_ref, validate_name
from hubarches.registry.local import LocalRegistry
from hubarches.registry.select import get_registry

__all__ = [
    "ENV_CACHE",
    "PulledBundle",
    "cache_root",
    "cached_bundle",
    "cached_versions",
    "pull",
]

logger = logging.getLogger(__name__)

ENV_CACHE = "HUBARCHES_CACHE"
"""Environment variable naming the cache directory."""
BUNDLES_DIR = "bundles"
REFS_DIR = "refs"
TEMP_DIR = "tmp"
REGISTRY_KEY_CHARS = 16
"""Hex digits of sha256(registry location) that name its refs directory."""


@dataclass(frozen=True)
class PulledBundle:
    """A verified bundle in the cache: where it is, which version, and its manifest."""

    path: Path
    info: VersionInfo
    manifest: Manifest


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the cache directory: the argument, ``HUBARCHES_CACHE``, or the per-user default."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    if os.environ.get(ENV_CACHE):
        return Path(os.environ[ENV_CACHE]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or str(Path("~/.cache").expanduser())
    return Path(base) / "hubarches"


def cached_bundle(digest: str, *, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Return the directory a bundle with this digest has (or would have) in the cache."""
    if not is_digest(digest):
        raise ValueError(f"{digest!r} is not a sha256 digest (64 lower-case hex digits)")
    return cache_root(cache_dir) / BUNDLES_DIR / digest


def _registry_location(registry: Registry | str | os.PathLike[str] | None) -> str:
    if isinstance(registry, Registry):
        return registry.location
    return get_registry(registry).location


def _refs_dir(root: Path, location: str, name: str) -> Path:
    key = hashlib.sha256(location.encode("utf-8")).hexdigest()[:REGISTRY_KEY_CHARS]
    spec = RefSpec(validate_name(name))
    return root / REFS_DIR / key / spec.org / spec.atlas


def cached_versions(
    name: str,
    *,
    registry: Registry | str | os.PathLike[str] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
) -> list[VersionInfo]:
    """Versions of an atlas from ``registry`` that are in the cache, ascending; no network.

    ``registry`` is what :func:`~hubarches.registry.select.get_registry` takes; an entry
    counts when its bundle directory is present (it is verified when pulled).
    """
    return _cached_versions(cache_root(cache_dir), _registry_location(registry), name)


def _cached_versions(root: Path, location: str, name: str) -> list[VersionInfo]:
    refs = _refs_dir(root, location, name)
    try:
        entries = list(refs.iterdir())
    except FileNotFoundError:
        return []
    found = []
    for entry in entries:
        if not entry.name.isdigit() or not entry.is_file():
            continue
        digest = entry.read_text(encoding="ascii", errors="replace").strip()
        if is_digest(digest) and (root / BUNDLES_DIR / digest / MANIFEST_FILE).is_file():
            found.append(VersionInfo(name, int(entry.name), digest))
    return sorted(found, key=lambda i: i.version)


def _record(root: Path, location: str, info: VersionInfo) -> None:
    """Note in the refs index which digest a registry gave ``name@version``."""
    refs = _refs_dir(root, location, info.name)
    ref_file = refs / str(info.version)
    with contextlib.suppress(OSError):
        if ref_file.read_text(encoding="ascii").strip() == info.digest:
            return
    refs.mkdir(parents=True, exist_ok=True)
    marker = refs.parent.parent / "location"
    if not marker.exists():
        marker.write_text(location + "\n", encoding="utf-8")
    fd, tmp = tempfile.mkstemp(prefix=f".{info.version}.", suffix=".tmp", dir=refs)
    with os.fdopen(fd, "w", encoding="ascii") as fh:
        fh.write(info.digest + "\n")
    Path(tmp).replace(ref_file)


def _resolve_offline(spec: RefSpec, location: str, root: Path) -> VersionInfo:
    """Resolve a pinned reference from the cache alone."""
    cached = _cached_versions(root, location, spec.name)
    if spec.digest is not None:
        entry = root / BUNDLES_DIR / spec.digest
        if (entry / MANIFEST_FILE).is_file():
            m = read_manifest(entry / MANIFEST_FILE)
            if m.name == spec.name and m.version is not None:
                return VersionInfo(spec.name, m.version, spec.digest)
    elif spec.version is not None:
        for info in cached:
            if info.version == spec.version:
                return info
    raise RegistryOfflineError(spec.name, cached=[i.version for i in cached], pin=spec.pin)


def _evict(root: Path, entry: Path) -> None:
    """Move a bad entry out of the way (atomically), then delete it."""
    trash = make_temp_dir(root / TEMP_DIR, prefix="evict")
    with contextlib.suppress(FileNotFoundError):  # someone else evicted it first
        entry.rename(trash / "bundle")
    shutil.rmtree(trash, ignore_errors=True)
    remove_if_empty(root / TEMP_DIR)


def _check_cached(entry: Path, info: VersionInfo) -> tuple[Manifest | None, BundleError | None]:
    """Verify a cache entry: its manifest if it verifies, else the reason it does not."""
    if not entry.is_dir():
        return None, None
    try:
        return verify_bundle(entry, expected_digest=info.digest), None
    except ManifestVersionError:
        raise
    except BundleError as err:
        return None, err


def _check_identity(path: Path, manifest: Manifest, info: VersionInfo) -> None:
    if manifest.name != info.name or manifest.version != info.version:
        raise IntegrityError(
            MANIFEST_FILE,
            f"it describes {manifest.name}@{manifest.version}, not {info}",
            bundle=str(path),
        )


def pull(
    ref: str | RefSpec,
    registry: Registry | str | os.PathLike[str] | None = None,
    *,
    offline: bool = False,
    cache_dir: str | os.PathLike[str] | None = None,
) -> PulledBundle:
    """Resolve a reference, and return its verified bundle from the cache, fetching if needed.

    With ``offline=True`` a remote registry is not contacted: pinned references resolve
    from the cache (RegistryOfflineError otherwise). Local registries work either way.
    """
    spec = parse_ref(ref) if isinstance(ref, str) else ref
    reg = get_registry(registry)
    root = cache_root(cache_dir)
    remote = not isinstance(reg, LocalRegistry)
    info = _resolve_offline(spec, reg.location, root) if offline and remote else reg.resolve(spec)
    entry = root / BUNDLES_DIR / info.digest
    manifest, problem = _check_cached(entry, info)
    if problem is not None:
        if offline and remote:
            raise problem
        warnings.warn(
            f"the cached copy of {info} failed verification ({problem.message}); fetching it again",
            HubarchesWarning,
            stacklevel=2,
        )
        _evict(root, entry)
    if manifest is None:
        manifest = _fetch(reg, info, root, entry)
    _check_identity(entry, manifest, info)
    _record(root, reg.location, info)
    return PulledBundle(path=entry, info=info, manifest=manifest)


def _fetch(reg: Registry, info: VersionInfo, root: Path, entry: Path) -> Manifest:
    """Fetch a version into a temp dir, verify it, and rename it into the cache."""
    temp_root = root / TEMP_DIR
    clean_stale_temp_dirs(temp_root)
    tmp = make_temp_dir(temp_root, prefix="pull")
    try:
        reg.fetch(info, tmp)
        manifest = verify_bundle(tmp, expected_digest=info.digest)
        _check_identity(tmp, manifest, info)
        # Once, at insertion: a pickle relisted with its right sha256 never enters the cache.
        # Later uses verify the sha256, which pins these checked bytes.
        check_tensor_files(tmp, manifest)
        entry.parent.mkdir(parents=True, exist_ok=True)
        try:
            move_into_place(tmp, entry)
        except FileExistsError:  # a concurrent pull finished first; use its copy
            logger.debug("%s was cached concurrently", info)
            return verify_bundle(entry, expected_digest=info.digest)
        logger.info("cached %s at %s", info, entry)
        return manifest
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        remove_if_empty(temp_root)
