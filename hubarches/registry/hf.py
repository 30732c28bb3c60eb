"""The Hugging Face Hub as a registry: one model repo per atlas, one tagged commit per version.

Version ``N`` of ``org/name`` is a commit of the repo ``org/name`` holding the bundle at its
root (``README.md`` is the model card, so the Hub page shows it), tagged ``vN``. Tags never
move, so a version pins a commit: pulls resolve the tag to its commit and download that
commit, never a branch. A push commits with ``parent_commit=`` the head it read, so of two
concurrent pushes the server lands one and refuses the other (412/409); then it creates the
tag, which the server refuses when another push claimed the number first. Either refusal
makes the push start over with the next number, a bounded number of times.

Manifests read to resolve versions are kept in the usual Hugging Face cache (``HF_HUB_CACHE``
or ``HF_HOME``); bundles are cached and verified by :mod:`hubarches.cache`, never here.
Offline (``HF_HUB_OFFLINE=1``) or when the endpoint is unreachable, pinned versions resolve
from the bundles in that cache, and "latest" says it cannot and which versions are cached.

Listing atlases relies on the card's ``library_name: hubarches`` front matter, which the Hub
indexes: it lists the public atlases plus the private ones your token can read.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import tempfile
from collections.abc import Iterable
from pathlib import Path

from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    get_session,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub import constants as hf_constants
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.hf_api import RepoFile
from huggingface_hub.utils import build_hf_headers

from hubarches._version import __version__
from hubarches.bundle import check_tensor_files, restamp_bundle, verify_bundle
from hubarches.errors import (
    BundleError,
    HubarchesError,
    ManifestError,
    PushError,
    ReferenceNotFound,
    RegistryAccessError,
    RegistryError,
    RegistryOfflineError,
    VersionExistsError,
    VersionNotFound,
)
from hubarches.manifest import MANIFEST_FILE, manifest_digest, read_manifest
from hubarches.registry import RefSpec, VersionInfo, validate_name

__all__ = ["HUB_LIBRARY", "MAX_PUSH_ATTEMPTS", "HubRegistry", "default_cache_dir"]

logger = logging.getLogger(__name__)

HUB_LIBRARY = "hubarches"
"""The ``library_name`` of atlas cards; the Hub indexes it, and listing filters on it."""
MAX_PUSH_ATTEMPTS = 5
"""Pushes that lose a race start over with the next number at most this many times in all."""
CONFLICT_STATUSES = frozenset({409, 412})
"""Answers by which the Hub refuses a stale ``parent_commit`` or an existing tag."""
ACCESS_STATUSES = frozenset({401, 403})
PROBE_TIMEOUT_S = 10.0
"""Seconds the one-request reachability check before a listing waits for the endpoint."""
BRANCH = "main"
_TAG_RE = re.compile(r"^v([1-9][0-9]*)$")

try:  # the transport errors of the client's HTTP library (httpx2 in huggingface_hub 2.x)
    import httpx2

    _NETWORK_ERRORS: tuple[type[BaseException], ...] = (httpx2.TransportError,)
except ImportError:  # pragma: no cover - older clients raise requests' ConnectionError (OSError)
    _NETWORK_ERRORS = ()
_UNREACHABLE = (OfflineModeIsEnabled, LocalEntryNotFoundError, *_NETWORK_ERRORS)


def _env_flag(name: str) -> bool:
    return os.environ.get(name, "").strip().upper() in {"1", "ON", "YES", "TRUE"}


def default_cache_dir() -> Path:
    """Locate the Hugging Face hub cache from the environment now (the client reads it once)."""
    for var in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(var):
            return Path(os.environ[var]).expanduser()
    if os.environ.get("HF_HOME"):
        return Path(os.environ["HF_HOME"]).expanduser() / "hub"
    return Path(hf_constants.HF_HUB_CACHE)


def _status(err: BaseException) -> int | None:
    response = getattr(err, "response", None)
    return getattr(response, "status_code", None)


class HubRegistry:
    """A registry on the Hugging Face Hub (or any Hub-compatible endpoint).

    ``endpoint`` defaults to ``HF_ENDPOINT``, then the client's default. ``token`` defaults to
    the client's usual sources (``HF_TOKEN``, ``hf auth login``); it is never logged nor put
    into errors. ``offline`` defaults to ``HF_HUB_OFFLINE``. ``private`` applies to repos a
    push creates. ``cache_dir`` is the Hugging Face cache that keeps resolved manifests.
    """

    def __init__(
        self,
        endpoint: str | None = None,
        token: str | None = None,
        *,
        offline: bool | None = None,
        private: bool | None = None,
        cache_dir: Path | str | None = None,
    ) -> None:
        url = endpoint or os.environ.get("HF_ENDPOINT") or hf_constants.ENDPOINT
        self._endpoint = url.rstrip("/")
        self._token = token
        self._offline = _env_flag("HF_HUB_OFFLINE") if offline is None else offline
        self._private = private
        self._cache_dir = Path(cache_dir) if cache_dir is not None else default_cache_dir()
        self._api = HfApi(
            endpoint=self._endpoint,
            token=token,
            library_name=HUB_LIBRARY,
            library_version=__version__,
        )
        self._commits: dict[tuple[str, int], str] = {}

    def __repr__(self) -> str:
        return f"HubRegistry({self._endpoint!r}, offline={self._offline})"

    @property
    def location(self) -> str:
        """The endpoint URL."""
        return self._endpoint

    @property
    def offline(self) -> bool:
        """Whether this registry answers from the local cache only."""
        return self._offline

    # --- reading ---------------------------------------------------------------------------

    def list_atlases(self) -> list[str]:
        """Atlases the Hub indexes under ``library_name: hubarches`` that you can read.

        Offline: the atlases whose manifests are in the local Hugging Face cache.
        """
        if self._offline:
            root = self._cache_dir
            return sorted(
                p.name.removeprefix("models--").replace("--", "/", 1)
                for p in (root.iterdir() if root.is_dir() else ())
                if p.name.startswith("models--") and any(p.glob(f"snapshots/*/{MANIFEST_FILE}"))
            )
        try:
            self._probe()
            return sorted(m.id for m in self._api.list_models(filter=HUB_LIBRARY))
        except Exception as err:
            if _status(err) in ACCESS_STATUSES:
                raise RegistryAccessError("the atlas listing", registry=self.location) from err
            raise RegistryError(
                f"could not list the atlases on {self.location}",
                hint="Check your network and HF_ENDPOINT, or name the atlas directly",
            ) from err

    def _probe(self) -> None:
        """One request, without retries, so that an unreachable endpoint fails at once.

        The client's listing retries connection errors with back-off (about 23 s in all);
        that suits a flaky link, not a Hub that is down or an endpoint that is mistyped.
        """
        get_session().get(
            f"{self._endpoint}/api/models",
            params={"filter": HUB_LIBRARY, "limit": 1},
            headers=build_hf_headers(
                token=self._token, library_name=HUB_LIBRARY, library_version=__version__
            ),
            timeout=PROBE_TIMEOUT_S,
        )

    def list_versions(self, name: str) -> list[VersionInfo]:
        """Every tagged version of an atlas, ascending (offline: the cached ones)."""
        validate_name(name)
        if self._offline:
            cached = self._cached(name)
            if not cached:
                raise RegistryOfflineError(name)
            return cached
        tags = self._remote_tags(name)
        if not tags:
            raise self._not_found(name)
        return [self._info(name, version, tags[version]) for version in sorted(tags)]

    def resolve(self, spec: RefSpec) -> VersionInfo:
        """Resolve a reference to a version; pinned versions resolve offline when cached."""
        validate_name(spec.name)
        if self._offline:
            return self._resolve_cached(spec)
        try:
            tags = self._remote_tags(spec.name)
        except RegistryOfflineError:
            if spec.version is None and spec.digest is None:
                raise
            logger.info("%s is unreachable; resolving %s from the cache", self.location, spec)
            return self._resolve_cached(spec)
        return self._pick(spec, tags)

    def fetch(self, info: VersionInfo, dest: Path) -> None:
        """Download the commit of ``info``'s tag into ``dest``, unverified."""
        dest = Path(dest)
        if self._offline:
            raise RegistryOfflineError(
                info.name, cached=self.cached_versions(info.name), pin=str(info.version)
            )
        commit = self._commit_of(info)
        dest.mkdir(parents=True, exist_ok=True)
        try:
            snapshot_download(
                info.name,
                revision=commit,
                local_dir=dest,
                endpoint=self._endpoint,
                token=self._token,
                library_name=HUB_LIBRARY,
                library_version=__version__,
            )
        except RevisionNotFoundError as err:
            raise VersionNotFound(info.name, str(info.version)) from err
        except Exception as err:
            raise self._translate(err, info.name) from err
        finally:  # the client's bookkeeping (.cache/) and .gitattributes are not bundle files
            for path in dest.glob(".*"):
                if path.is_dir():
                    shutil.rmtree(path, ignore_errors=True)
                else:
                    path.unlink(missing_ok=True)

    def cached_versions(self, name: str) -> list[int]:
        """Versions of ``name`` from this endpoint whose bundles are in the hubarches cache."""
        return [info.version for info in self._cached(name)]

    # --- publishing -------------------------------------------------------------------------

    def publish(self, bundle_dir: Path, name: str, *, version: int | None = None) -> VersionInfo:
        """Publish a bundle as the next version (or as ``version``, if free).

        The bundle is verified (sha256, manifest, safetensors headers) before the Hub is
        contacted; commits on the head it read, then tags ``vN``; a lost race starts over with
        the next number. VersionExistsError when ``version`` is taken, BundleError subclasses
        for a bad bundle, PushError on other failures.
        """
        validate_name(name)
        if self._offline:
            raise PushError(
                f"cannot publish {name} while offline",
                hint="Unset HF_HUB_OFFLINE to push to the Hub",
            )
        # Verified in full before the Hub is touched: even creating the repo is a write.
        # Each attempt re-verifies the copy it stages, so a later change is caught too.
        check_tensor_files(Path(bundle_dir), verify_bundle(Path(bundle_dir)))
        try:  # create only when missing: the client's exist_ok path fails on other endpoints
            if not self._api.repo_exists(name):
                self._api.create_repo(name, exist_ok=True, private=self._private)
        except Exception as err:
            raise self._push_error(err, name) from err
        for attempt in range(1, MAX_PUSH_ATTEMPTS + 1):
            info = self._try_publish(Path(bundle_dir), name, version)
            if info is not None:
                logger.info("published %s (attempt %d)", info, attempt)
                return info
        raise PushError(
            f"could not publish {name}: other pushes claimed the next version "
            f"{MAX_PUSH_ATTEMPTS} times in a row; nothing of this push was tagged",
            hint="Push again in a moment",
        )

    def _try_publish(self, bundle_dir: Path, name: str, wanted: int | None) -> VersionInfo | None:
        """One attempt; None when a concurrent push won the race (the caller starts over)."""
        try:
            refs = self._api.list_repo_refs(name)
            head = next(b.target_commit for b in refs.branches if b.name == BRANCH)
            taken = {int(m[1]) for t in refs.tags if (m := _TAG_RE.match(t.name))}
            if wanted in taken:
                raise VersionExistsError(name, wanted)
            version = wanted or max(taken, default=0) + 1
            remote = {
                f.path
                for f in self._api.list_repo_tree(name, revision=head, recursive=True)
                if isinstance(f, RepoFile)
            }
        except Exception as err:
            raise self._push_error(err, name) from err
        with tempfile.TemporaryDirectory(prefix="hubarches-push-") as tmp:
            staged = Path(tmp) / "bundle"
            manifest = restamp_bundle(bundle_dir, staged, name=name, version=version)
            digest = manifest_digest(manifest)
            files = sorted(p for p in staged.iterdir() if p.is_file())
            stale = remote - {p.name for p in files} - {".gitattributes"}
            operations: list[CommitOperationAdd | CommitOperationDelete] = [
                CommitOperationAdd(path_in_repo=p.name, path_or_fileobj=str(p)) for p in files
            ]
            operations += [CommitOperationDelete(path_in_repo=p) for p in sorted(stale)]
            try:
                commit = self._api.create_commit(
                    name,
                    operations,
                    commit_message=f"Publish {name}@{version}",
                    commit_description=f"hubarches manifest digest sha256:{digest}",
                    revision=BRANCH,
                    parent_commit=head,
                )
            except HfHubHTTPError as err:
                if _status(err) not in CONFLICT_STATUSES:
                    raise self._push_error(err, name) from err
                logger.info("%s moved while pushing v%d; starting over", name, version)
                return None
            except Exception as err:
                raise self._push_error(err, name) from err
        try:
            self._api.create_tag(
                name, tag=f"v{version}", revision=commit.oid, tag_message=f"sha256:{digest}"
            )
        except HfHubHTTPError as err:
            if _status(err) not in CONFLICT_STATUSES:
                raise self._push_error(err, name) from err
            if wanted is not None:
                raise VersionExistsError(name, wanted) from err
            logger.info("v%d of %s was claimed by another push; starting over", version, name)
            return None
        except Exception as err:
            raise self._push_error(err, name) from err
        self._commits[(name, version)] = commit.oid
        return VersionInfo(name, version, digest)

    # --- helpers ----------------------------------------------------------------------------

    def _remote_tags(self, name: str) -> dict[int, str]:
        """Version → commit, from the repo's ``vN`` tags."""
        try:
            refs = self._api.list_repo_refs(name)
        except Exception as err:
            raise self._translate(err, name) from err
        tags = {int(m[1]): t.target_commit for t in refs.tags if (m := _TAG_RE.match(t.name))}
        for version, commit in tags.items():
            self._commits[(name, version)] = commit
        return tags

    def _pick(self, spec: RefSpec, tags: dict[int, str]) -> VersionInfo:
        name = spec.name
        if not tags:
            raise self._not_found(name)
        if spec.version is not None:
            if spec.version not in tags:
                raise VersionNotFound(name, str(spec.version), available=sorted(tags))
            return self._info(name, spec.version, tags[spec.version])
        if spec.digest is not None:
            for version in sorted(tags, reverse=True):
                try:
                    info = self._info(name, version, tags[version])
                except BundleError as err:  # an unreadable manifest cannot have that digest
                    logger.warning("skipping %s@%d in a digest lookup: %s", name, version, err)
                    continue
                if info.digest == spec.digest:
                    return info
            raise VersionNotFound(name, f"sha256:{spec.digest}", available=sorted(tags))
        latest = max(tags)
        return self._info(name, latest, tags[latest])

    def _cached(self, name: str) -> list[VersionInfo]:
        from hubarches.cache import cached_versions  # the cache builds on the registries

        return cached_versions(name, registry=self)

    def _resolve_cached(self, spec: RefSpec) -> VersionInfo:
        cached = self._cached(spec.name)
        for info in cached:
            if (spec.version, spec.digest) in {(info.version, None), (None, info.digest)}:
                return info
        raise RegistryOfflineError(
            spec.name, cached=[info.version for info in cached], pin=spec.pin
        )

    def _info(self, name: str, version: int, commit: str) -> VersionInfo:
        """Read a version's manifest (kept in the Hugging Face cache) for its digest."""
        try:
            path = hf_hub_download(
                name,
                MANIFEST_FILE,
                revision=commit,
                cache_dir=self._cache_dir,
                endpoint=self._endpoint,
                token=self._token,
                library_name=HUB_LIBRARY,
                library_version=__version__,
            )
        except RevisionNotFoundError as err:
            raise VersionNotFound(name, str(version)) from err
        except EntryNotFoundError as err:
            if isinstance(err, LocalEntryNotFoundError):
                raise self._translate(err, name) from err
            raise RegistryError(
                f"v{version} of {name} on {self.location} has no {MANIFEST_FILE}",
                hint="It is not a hubarches bundle; check the atlas name",
            ) from err
        except Exception as err:
            raise self._translate(err, name) from err
        manifest = read_manifest(Path(path))
        if manifest.version != version:
            raise ManifestError(
                f"the manifest tagged v{version} of {name} says version {manifest.version}",
                hint="The repo was changed outside hubarches; pin the version by digest",
            )
        return VersionInfo(name, version, manifest_digest(manifest))

    def _commit_of(self, info: VersionInfo) -> str:
        commit = self._commits.get((info.name, info.version))
        if commit is None:
            commit = self._remote_tags(info.name).get(info.version)
        if commit is None:
            raise VersionNotFound(info.name, str(info.version))
        return commit

    def _not_found(self, name: str) -> ReferenceNotFound:
        available: Iterable[str] = ()
        if not self._offline:
            try:
                available = self.list_atlases()
            except RegistryError:
                logger.debug("could not list atlases for an error message", exc_info=True)
        return ReferenceNotFound(name, registry=self.location, available=list(available))

    def _translate(self, err: BaseException, name: str) -> HubarchesError:
        """Map a client error to a hubarches one, whose message never quotes the client's."""
        if isinstance(err, HubarchesError):
            return err
        if isinstance(err, RepositoryNotFoundError) or _status(err) in ACCESS_STATUSES:
            return RegistryAccessError(name, registry=self.location)
        if isinstance(err, _UNREACHABLE):
            return RegistryOfflineError(name, cached=self.cached_versions(name))
        status = _status(err)
        what = f"HTTP {status}" if status else type(err).__name__
        return RegistryError(
            f"{self.location} failed for {name!r} ({what})",
            hint="Try again later; if it persists, check HF_ENDPOINT and your network",
        )

    def _push_error(self, err: BaseException, name: str) -> HubarchesError:
        if isinstance(err, HubarchesError):
            return err
        if _status(err) == 403:
            return PushError(
                f"your token cannot write to {name} on {self.location}",
                hint=f"Use a token with write access to {name.split('/')[0]} (HF_TOKEN or "
                "`hf auth login`)",
            )
        if isinstance(err, _UNREACHABLE):
            return PushError(
                f"cannot reach {self.location} to publish {name}",
                hint="Check your network and HF_ENDPOINT; nothing was published",
            )
        translated = self._translate(err, name)
        if type(translated) is RegistryError:
            return PushError(translated.message, hint=translated.hint)
        return translated
