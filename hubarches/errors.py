"""Every exception hubarches raises, in one tree.

Each error also inherits the builtin a caller would naturally catch, carries the facts
that explain it as attributes, and its message says what to do next::

    HubarchesError
    ├── RegistryError
    │   ├── ReferenceStringError       (ValueError)       malformed "org/name@version"
    │   ├── ReferenceNotFound          (LookupError)      unknown atlas; lists what exists
    │   ├── VersionNotFound            (LookupError)      unknown version; lists the versions
    │   ├── RegistryAccessError        (PermissionError)  private repo, missing or bad token
    │   ├── RegistryOfflineError       (ConnectionError)  cannot resolve without the network
    │   └── PushError                  (RuntimeError)
    │       └── VersionExistsError     (FileExistsError)  a published version never changes
    ├── BundleError
    │   ├── BundleExistsError          (FileExistsError)  never write over a directory
    │   ├── IntegrityError             (ValueError)       missing file, size or sha256 mismatch
    │   ├── ManifestError              (ValueError)       unknown fields, bad types or paths
    │   │   └── ManifestVersionError                      written by a newer hubarches
    │   └── WeightsError               (ValueError)       not safetensors, wrong tensors
    ├── DataError                      (ValueError)
    │   ├── GeneAlignmentError                            too few shared genes, duplicates, id types
    │   ├── CountsError                                   negative, non-integer, log-normalized
    │   └── CovariateError                                missing key, NaN values
    ├── ModelError                     (ValueError)       bad configuration or tensor shapes
    ├── SurgeryError                   (ValueError)       unknown covariate, untrained model
    └── TrainingError                  (RuntimeError)     non-finite loss

    HubarchesWarning (UserWarning)                        e.g. low gene overlap
"""

from __future__ import annotations

import sys
import warnings
from collections.abc import Sequence
from pathlib import Path

__all__ = [
    "BundleError",
    "BundleExistsError",
    "CountsError",
    "CovariateError",
    "DataError",
    "GeneAlignmentError",
    "HubarchesError",
    "HubarchesWarning",
    "IntegrityError",
    "ManifestError",
    "ManifestVersionError",
    "ModelError",
    "PushError",
    "ReferenceNotFound",
    "ReferenceStringError",
    "RegistryAccessError",
    "RegistryError",
    "RegistryOfflineError",
    "SurgeryError",
    "TrainingError",
    "VersionExistsError",
    "VersionNotFound",
    "WeightsError",
    "warn",
]


def _listing(items: Sequence[object], limit: int = 10) -> str:
    """Render a short, bounded list for an error message."""
    shown = ", ".join(str(i) for i in list(items)[:limit])
    more = len(items) - limit
    if not items:
        return "none"
    return f"{shown}, … ({more} more)" if more > 0 else shown


class HubarchesError(Exception):
    """Base of every hubarches error; ``hint`` says what to do next."""

    def __init__(self, message: str, *, hint: str | None = None) -> None:
        self.message = message
        self.hint = hint
        super().__init__(f"{message}. {hint}" if hint else message)


class HubarchesWarning(UserWarning):
    """Something the user should look at, though hubarches can go on."""


_PACKAGE_DIR = str(Path(__file__).resolve().parent)


def warn(message: str) -> None:
    """Warn with :class:`HubarchesWarning`, pointing at the first caller outside hubarches."""
    frame = sys._getframe(1)
    level = 2  # stacklevel 1 is this function; frame is its caller
    while frame is not None and str(Path(frame.f_code.co_filename).resolve()).startswith(
        _PACKAGE_DIR
    ):
        frame = frame.f_back
        level += 1
    warnings.warn(message, HubarchesWarning, stacklevel=level)


# --- registry -------------------------------------------------------------------------------


class RegistryError(HubarchesError):
    """A registry could not resolve, fetch or publish something."""


class ReferenceStringError(RegistryError, ValueError):
    """A reference string is not of the form ``org/name``, ``org/name@N`` or ``@sha256:…``."""

    def __init__(self, ref: str, reason: str) -> None:
        self.ref = ref
        super().__init__(
            f"{ref!r} is not a valid reference: {reason}",
            hint="Write it as org/name, org/name@3 or org/name@sha256:<64 hex digits>",
        )


class ReferenceNotFound(RegistryError, LookupError):
    """No atlas of that name in the registry."""

    def __init__(self, name: str, *, registry: str, available: Sequence[str] = ()) -> None:
        self.name = name
        self.registry = registry
        self.available = list(available)
        super().__init__(
            f"no atlas {name!r} in {registry}",
            hint=f"Atlases there: {_listing(self.available)}. Check the name or pass --registry",
        )


class VersionNotFound(RegistryError, LookupError):
    """The atlas exists, but not that version (or digest)."""

    def __init__(self, name: str, version: str, *, available: Sequence[int] = ()) -> None:
        self.name = name
        self.version = version
        self.available = list(available)
        super().__init__(
            f"atlas {name!r} has no version {version}",
            hint=f"Versions: {_listing(self.available)}. Omit the version to get the latest",
        )


class RegistryAccessError(RegistryError, PermissionError):
    """The registry refused access: a private repository or a missing/invalid token."""

    def __init__(self, name: str, *, registry: str) -> None:
        self.name = name
        self.registry = registry
        super().__init__(
            f"{name!r} was not found on {registry}, or you have no access to it",
            hint="If it is private, set HF_TOKEN (or run `hf auth login`) with a token that can "
            "read it",
        )


class RegistryOfflineError(RegistryError, ConnectionError):
    """The request needs the network, which is off or unreachable."""

    def __init__(self, name: str, *, cached: Sequence[int] = (), pin: str | None = None) -> None:
        self.name = name
        self.cached = list(cached)
        self.pin = pin
        what = (
            f"{name}@{pin} is not in the cache"
            if pin
            else (f"cannot resolve the latest version of {name!r}")
        )
        super().__init__(
            f"{what} and the registry cannot be reached (offline)",
            hint=f"Cached versions: {_listing(self.cached)}. Pin one ({name}@N) or go online",
        )


class PushError(RegistryError, RuntimeError):
    """Publishing a bundle failed; nothing was published."""


class VersionExistsError(PushError, FileExistsError):
    """A version is published already and versions are never overwritten."""

    def __init__(self, name: str, version: int) -> None:
        self.name = name
        self.version = version
        super().__init__(
            f"{name}@{version} exists already and published versions never change",
            hint="Push without a version to get the next free one",
        )


# --- bundles --------------------------------------------------------------------------------


class BundleError(HubarchesError):
    """A bundle on disk cannot be trusted or read."""


class BundleExistsError(BundleError, FileExistsError):
    """A bundle is never written over an existing directory."""

    def __init__(self, path: str) -> None:
        self.path = path
        super().__init__(f"{path} exists already", hint="Write the bundle to a new directory")


class IntegrityError(BundleError, ValueError):
    """A file is missing, or its size or sha256 differs from the manifest."""

    def __init__(self, filename: str, reason: str, *, bundle: str = "") -> None:
        self.filename = filename
        self.reason = reason
        self.bundle = bundle
        where = f" in {bundle}" if bundle else ""
        super().__init__(
            f"{filename}{where} failed verification: {reason}",
            hint="The bundle is corrupted or was tampered with; pull it again "
            "(a cached copy is fetched anew) and do not edit bundle files by hand",
        )


class ManifestError(BundleError, ValueError):
    """A manifest does not follow the schema."""


class ManifestVersionError(ManifestError):
    """The manifest was written with a newer schema than this hubarches knows."""

    def __init__(self, found: int, supported: int) -> None:
        self.found = found
        self.supported = supported
        super().__init__(
            f"manifest schema_version {found} is newer than this hubarches supports ({supported})",
            hint="Upgrade hubarches: pip install -U hubarches",
        )


class WeightsError(BundleError, ValueError):
    """Weights are not safetensors, or their tensors do not match the architecture."""

    def __init__(
        self,
        message: str,
        *,
        missing: Sequence[str] = (),
        unexpected: Sequence[str] = (),
        hint: str | None = None,
    ) -> None:
        self.missing = list(missing)
        self.unexpected = list(unexpected)
        parts = [message]
        if self.missing:
            parts.append(f"missing: {_listing(self.missing)}")
        if self.unexpected:
            parts.append(f"unexpected: {_listing(self.unexpected)}")
        super().__init__("; ".join(parts), hint=hint)


# --- data -----------------------------------------------------------------------------------


class DataError(HubarchesError, ValueError):
    """The query AnnData cannot be used as it is."""


class GeneAlignmentError(DataError):
    """The query's genes cannot be matched safely to the reference's."""

    def __init__(
        self,
        message: str,
        *,
        n_shared: int | None = None,
        n_reference: int | None = None,
        hint: str | None = None,
    ) -> None:
        self.n_shared = n_shared
        self.n_reference = n_reference
        super().__init__(message, hint=hint)


class CountsError(DataError):
    """The matrix is not raw counts (negative, non-finite, non-integer, or normalized)."""


class CovariateError(DataError):
    """A covariate column is missing or has missing values."""

    def __init__(self, message: str, *, key: str, hint: str | None = None) -> None:
        self.key = key
        super().__init__(message, hint=hint)


# --- model ----------------------------------------------------------------------------------


class ModelError(HubarchesError, ValueError):
    """A model configuration or an input tensor does not fit the model."""


class SurgeryError(HubarchesError, ValueError):
    """Architectural surgery was asked for something it cannot do."""


class TrainingError(HubarchesError, RuntimeError):
    """Training diverged or could not run."""
