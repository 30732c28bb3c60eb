"""Bundle I/O: one version of an atlas as a directory of verified files.

A bundle holds ``manifest.json``, ``model.safetensors`` (the weights), ``README.md`` (the
model card, rendered from the manifest) and optionally ``embedding.safetensors`` (the
reference latent and label codes). The manifest lists every other file with its size and
sha256; a bundle is verified file by file before anything in it is read, and tensors are read
with safetensors only, so nothing is ever unpickled. A listed ``*.safetensors`` file that is
not one (a pickle relisted with its right sha256) is refused before the bundle is published
or cached (:func:`check_tensor_files`). Bundles are built in a temporary
directory beside their destination and renamed into place, so a half-written bundle is never
visible. torch is imported lazily: listing and publishing need no torch.
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import logging
import os
import secrets
import shutil
import socket
import stat
import struct
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import TYPE_CHECKING

from pydantic import ValidationError

from hubarches._version import __version__
from hubarches.cards import render_card
from hubarches.errors import (
    BundleExistsError,
    IntegrityError,
    ManifestError,
    WeightsError,
)
from hubarches.manifest import (
    MANIFEST_FILE,
    FileEntry,
    Manifest,
    manifest_digest,
    manifest_json,
    read_manifest,
    summarize_validation,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "CARD_FILE",
    "EMBEDDING_FILE",
    "MANIFEST_FILE",
    "REQUIRED_FILES",
    "TENSOR_SUFFIX",
    "WEIGHTS_FILE",
    "check_publishable",
    "check_tensor_files",
    "clean_stale_temp_dirs",
    "copy_payload",
    "file_entry",
    "finish_bundle",
    "make_temp_dir",
    "move_into_place",
    "read_bundle_manifest",
    "read_tensors",
    "remove_if_empty",
    "restamp_bundle",
    "verify_bundle",
    "write_bundle",
]

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "model.safetensors"
CARD_FILE = "README.md"
EMBEDDING_FILE = "embedding.safetensors"
REQUIRED_FILES = (WEIGHTS_FILE, CARD_FILE)
TENSOR_SUFFIX = ".safetensors"
"""A listed file with this suffix must be safetensors: checked before it is published or cached."""
HASH_BLOCK_BYTES = 4 * 1024 * 1024
"""sha256 is streamed in blocks of this size: large enough to be fast, small in memory."""
STALE_TEMP_SECONDS = 24 * 3600
"""A temporary directory this old is abandoned even if its writer's pid looks alive."""
MAX_SAFETENSORS_HEADER = 100 * 1024 * 1024
"""safetensors' own limit on the JSON header."""
_TEMP_MARK = ".tmp-"


# --- hashing and verification ---------------------------------------------------------------


def file_entry(path: Path) -> FileEntry:
    """Size and sha256 of a file, streamed in :data:`HASH_BLOCK_BYTES` blocks."""
    h = hashlib.sha256()
    buf = bytearray(HASH_BLOCK_BYTES)
    view = memoryview(buf)
    size = 0
    with Path(path).open("rb", buffering=0) as fh:
        while n := fh.readinto(view):
            h.update(view[:n])
            size += n
    return FileEntry(sha256=h.hexdigest(), size=size)


def _regular_file(bundle: Path, name: str) -> os.stat_result:
    """Stat a bundle file (not following links); refuse a missing, linked or special file."""
    try:
        st = (bundle / name).lstat()
    except FileNotFoundError as err:
        raise IntegrityError(name, "the file is missing", bundle=str(bundle)) from err
    if not stat.S_ISREG(st.st_mode):
        raise IntegrityError(name, "it is not a regular file", bundle=str(bundle))
    return st


def _verify_file(bundle: Path, name: str, expected: FileEntry) -> None:
    """Check one listed file's size (cheap, first) and sha256."""
    st = _regular_file(bundle, name)
    if st.st_size != expected.size:
        raise IntegrityError(
            name,
            f"it has {st.st_size} bytes where the manifest lists {expected.size} "
            "(truncated or altered)",
            bundle=str(bundle),
        )
    actual = file_entry(bundle / name)
    if actual.sha256 != expected.sha256:
        raise IntegrityError(
            name,
            f"its sha256 is {actual.sha256} where the manifest lists {expected.sha256}",
            bundle=str(bundle),
        )


def _check_required(bundle: Path, manifest: Manifest) -> None:
    missing = [f for f in REQUIRED_FILES if f not in manifest.files]
    if missing:
        raise ManifestError(
            f"the manifest of {bundle} does not list {', '.join(missing)}",
            hint="Write bundles with hubarches.bundle.write_bundle",
        )


def read_bundle_manifest(path: Path) -> Manifest:
    """Read a bundle's manifest and check that it lists the weights and the card.

    No file is hashed: this is the cheap first look (ManifestError, ManifestVersionError,
    IntegrityError for a missing or linked manifest).
    """
    bundle = Path(path)
    if not bundle.is_dir():
        raise IntegrityError(str(bundle), "there is no bundle directory there")
    _regular_file(bundle, MANIFEST_FILE)
    manifest = read_manifest(bundle / MANIFEST_FILE)
    _check_required(bundle, manifest)
    return manifest


def verify_bundle(path: Path, *, expected_digest: str | None = None) -> Manifest:
    """Verify a bundle and return its manifest.

    Checks the manifest (schema, and its digest when ``expected_digest`` is given), that it
    lists the weights and the card, and every listed file's size and sha256. Raises
    IntegrityError naming the first file that fails, ManifestError, ManifestVersionError.
    """
    bundle = Path(path)
    manifest = read_bundle_manifest(bundle)
    if expected_digest is not None:
        actual = manifest_digest(manifest)
        if actual != expected_digest:
            raise IntegrityError(
                MANIFEST_FILE,
                f"its digest is sha256:{actual} where sha256:{expected_digest} was expected",
                bundle=str(bundle),
            )
    for name, entry in sorted(manifest.files.items()):
        _verify_file(bundle, name, entry)
    return manifest


def check_publishable(path: Path) -> Manifest:
    """Refuse, before anything is written, a bundle that cannot be published; its manifest.

    Reads the manifest (:func:`read_bundle_manifest`) and the header of every listed
    safetensors file (:func:`check_tensor_files`), checking sizes but not hashes: those are
    checked as the files are copied, and the copy is checked again.
    """
    manifest = read_bundle_manifest(path)
    check_tensor_files(path, manifest)
    return manifest


# --- tensors --------------------------------------------------------------------------------


def _check_safetensors(path: Path, name: str) -> None:
    """Refuse, with a useful message, a file that is not safetensors (e.g. a pickle)."""
    with path.open("rb") as fh:
        head = fh.read(9)
    size = path.stat().st_size
    if head.startswith(b"PK\x03\x04"):
        kind = "a zip archive (a torch.save checkpoint, which holds a pickle)"
    elif head[:1] == b"\x80":
        kind = "a Python pickle"
    elif len(head) < 9:
        kind = "too short"
    else:
        (n,) = struct.unpack("<Q", head[:8])
        if n <= MAX_SAFETENSORS_HEADER and 8 + n <= size and head[8:9] == b"{":
            return
        kind = "not a safetensors header"
    raise WeightsError(
        f"{name} is not a safetensors file: {kind}; hubarches never unpickles weights",
        hint="Save tensors with safetensors.torch.save_file, or write the bundle with "
        "hubarches.bundle.write_bundle",
    )


def _parse_safetensors_header(path: Path, name: str) -> None:
    """Parse a safetensors header with the safetensors library (no tensor data is read).

    safetensors checks the JSON, the dtypes and shapes against the byte ranges, and that the
    ranges cover the file exactly; nothing in the format can run code.
    """
    from safetensors import safe_open

    try:
        with safe_open(str(path), framework="numpy") as fh:
            fh.keys()
    except Exception as err:  # SafetensorError, and OSError for an unreadable file
        raise WeightsError(
            f"{name} is not a valid safetensors file: {err}",
            hint="Save tensors with safetensors.torch.save_file, or write the bundle with "
            "hubarches.bundle.write_bundle",
        ) from err


def check_tensor_files(path: Path, manifest: Manifest) -> None:
    """Check that every ``*.safetensors`` file the manifest lists is one, from its header.

    Each must be a regular file of the listed size (IntegrityError) whose header parses as
    safetensors (WeightsError: a pickle or a torch.save checkpoint is named as such). Hashes
    are not checked here; :func:`verify_bundle` does that. Cheap: only the header is read.
    """
    bundle = Path(path)
    for name, entry in sorted(manifest.files.items()):
        if not name.endswith(TENSOR_SUFFIX):
            continue
        st = _regular_file(bundle, name)
        if st.st_size != entry.size:
            raise IntegrityError(
                name,
                f"it has {st.st_size} bytes where the manifest lists {entry.size}",
                bundle=str(bundle),
            )
        _check_safetensors(bundle / name, name)
        _parse_safetensors_header(bundle / name, name)


def _load_safetensors(path: Path) -> dict[str, torch.Tensor]:
    """Read every tensor into memory it owns (not an mmap of the file)."""
    from safetensors.torch import load_file

    try:
        return load_file(path, backend="pread")
    except TypeError:  # safetensors < 0.7 has no backend choice: copy out of the mmap
        return {k: v.clone() for k, v in load_file(path).items()}


def read_tensors(
    path: Path, manifest: Manifest, filename: str = WEIGHTS_FILE, *, verify: bool = True
) -> dict[str, torch.Tensor]:
    """Read a safetensors file of a bundle, checking it against the manifest first.

    The size is always checked; the sha256 too unless ``verify=False`` (for a bundle that
    :func:`verify_bundle` has just verified). A file that is not safetensors is a
    WeightsError before any of it is parsed.
    """
    bundle = Path(path)
    entry = manifest.files.get(filename)
    if entry is None:
        raise IntegrityError(filename, "the manifest does not list it", bundle=str(bundle))
    if verify:
        _verify_file(bundle, filename, entry)
    elif _regular_file(bundle, filename).st_size != entry.size:
        raise IntegrityError(
            filename, f"its size differs from the manifest's {entry.size}", bundle=str(bundle)
        )
    _check_safetensors(bundle / filename, filename)
    try:
        return _load_safetensors(bundle / filename)
    except Exception as err:  # safetensors raises its own SafetensorError and others
        raise WeightsError(f"{filename} could not be read as safetensors: {err}") from err


def _save_tensors(tensors: Mapping[str, torch.Tensor], path: Path, what: str) -> FileEntry:
    """Write tensors as safetensors and return the file's entry."""
    import torch
    from safetensors.torch import save_file

    if not tensors:
        raise WeightsError(f"no {what} tensors to save")
    bad = [k for k, v in tensors.items() if not isinstance(k, str) or not torch.is_tensor(v)]
    if bad:
        raise WeightsError(
            f"{what}: every key must be a str and every value a torch.Tensor; "
            f"offending keys: {bad[:5]}"
        )
    data = {k: v.detach().to("cpu").contiguous() for k, v in tensors.items()}
    try:
        # One metadata key: safetensors writes several in a random (hash map) order, which
        # would give the same tensors different bytes, and a bundle a different digest.
        save_file(data, path, metadata={"format": "pt"})
    except (RuntimeError, ValueError) as err:
        raise WeightsError(
            f"{what} could not be saved as safetensors: {err}",
            hint="Tensors that share memory must be cloned first",
        ) from err
    return file_entry(path)


# --- temporary directories and atomic moves -------------------------------------------------


def make_temp_dir(parent: Path, *, prefix: str) -> Path:
    """Create a fresh directory in ``parent`` named ``<prefix>.tmp-<host>-<pid>-<random>``."""
    parent = Path(parent)
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"
    while True:
        path = parent / f"{prefix}{_TEMP_MARK}{host}-{os.getpid()}-{secrets.token_hex(6)}"
        try:
            # Inside the try: another writer may create ``parent`` and remove it again
            # (remove_if_empty) between mkdir's attempt and its is_dir check, and then
            # exist_ok=True raises FileExistsError for a directory that is not there.
            parent.mkdir(parents=True, exist_ok=True)
            # Not tempfile.mkdtemp: its 0700 would make a published version unreadable to
            # the other users of a shared registry; mkdir applies the user's umask instead.
            path.mkdir(mode=0o777)
        except (FileExistsError, FileNotFoundError):  # taken, or ``parent`` just removed
            try:
                mode = parent.stat().st_mode  # one call: exists() then is_dir() would race
            except FileNotFoundError:
                continue
            if not stat.S_ISDIR(mode):  # a file where the folder should be: never resolves
                raise NotADirectoryError(errno.ENOTDIR, "not a directory", str(parent)) from None
            continue
        return path


def remove_if_empty(folder: Path) -> None:
    """Remove ``folder`` when nothing is left in it (others' work in progress keeps it)."""
    with contextlib.suppress(OSError):
        folder.rmdir()


def _writer_is_gone(name: str) -> bool:
    """Whether a temp dir's name says it belongs to a dead process on this host."""
    _, _, rest = name.partition(_TEMP_MARK)
    host = "".join(c if c.isalnum() else "_" for c in socket.gethostname())[:40] or "host"
    if not rest.startswith(host + "-"):
        return False
    pid_text = rest[len(host) + 1 :].split("-", 1)[0]
    if not pid_text.isdigit() or os.name != "posix":
        return False
    try:
        os.kill(int(pid_text), 0)
    except ProcessLookupError:
        return True
    except OSError:
        return False
    return False


def clean_stale_temp_dirs(parent: Path, *, max_age_s: float = STALE_TEMP_SECONDS) -> list[Path]:
    """Remove temp dirs in ``parent`` whose writer died (same host) or that are too old."""
    removed: list[Path] = []
    try:
        entries = list(Path(parent).iterdir())
    except FileNotFoundError:
        return removed
    now = time.time()
    for entry in entries:
        if _TEMP_MARK not in entry.name or not entry.is_dir():
            continue
        try:
            old = now - entry.stat().st_mtime > max_age_s
        except FileNotFoundError:
            continue
        if old or _writer_is_gone(entry.name):
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
            logger.debug("removed stale temporary directory %s", entry)
    return removed


def move_into_place(tmp: Path, dest: Path) -> None:
    """Rename a finished directory to ``dest``; FileExistsError if ``dest`` exists already.

    A rename is atomic, and renaming onto an existing non-empty directory fails, which is
    how concurrent writers of the same destination find out.
    """
    try:
        Path(tmp).rename(dest)
    except OSError as err:
        if isinstance(err, FileExistsError) or err.errno in (errno.EEXIST, errno.ENOTEMPTY):
            raise FileExistsError(errno.EEXIST, "destination exists", str(dest)) from err
        raise


def _ensure_absent(dest: Path) -> None:
    if dest.exists() or dest.is_symlink():
        raise BundleExistsError(str(dest))


# --- writing --------------------------------------------------------------------------------


def finish_bundle(directory: Path, manifest: Manifest) -> Manifest:
    """Render the card and write ``README.md`` and ``manifest.json`` into ``directory``.

    ``manifest.files`` must list the payload files already in ``directory`` (any card entry
    is replaced); returns the final manifest, stamped with this hubarches version.
    """
    directory = Path(directory)
    payload = {k: v for k, v in manifest.files.items() if k != CARD_FILE}
    staged = _updated(manifest, files=payload, written_by=__version__)
    card = directory / CARD_FILE
    card.write_text(render_card(staged), encoding="utf-8")
    final = _updated(staged, files={**payload, CARD_FILE: file_entry(card)})
    (directory / MANIFEST_FILE).write_text(manifest_json(final), encoding="utf-8")
    return final


def _updated(manifest: Manifest, **changes: object) -> Manifest:
    """Copy a manifest with some fields replaced, validating it (ManifestError if invalid)."""
    try:
        return Manifest.model_validate({**dict(manifest), **changes})
    except ValidationError as err:
        raise ManifestError(summarize_validation(err, "the manifest")) from err


def write_bundle(
    dest: Path,
    manifest: Manifest,
    weights: Mapping[str, torch.Tensor],
    *,
    embedding: Mapping[str, torch.Tensor] | None = None,
) -> Manifest:
    """Write a new bundle at ``dest`` (which must not exist) and return its final manifest.

    ``manifest.files`` is filled in and the card rendered; everything is written to a
    temporary directory beside ``dest`` and renamed into place.
    """

    def fill(tmp: Path) -> Manifest:
        files = {WEIGHTS_FILE: _save_tensors(weights, tmp / WEIGHTS_FILE, "weights")}
        if embedding is not None:
            files[EMBEDDING_FILE] = _save_tensors(embedding, tmp / EMBEDDING_FILE, "embedding")
        return finish_bundle(tmp, _updated(manifest, files=files))

    return _build_in_place(Path(dest), fill)


def _build_in_place(dest: Path, fill: Callable[[Path], Manifest]) -> Manifest:
    """Have ``fill`` write a bundle beside ``dest``, then rename it into place.

    On any failure the temporary directory goes and ``dest`` never appears.
    """
    _ensure_absent(dest)
    tmp = make_temp_dir(dest.parent, prefix=f".{dest.name}")
    try:
        final = fill(tmp)
        _ensure_absent(dest)
        move_into_place(tmp, dest)
    except FileExistsError as err:
        shutil.rmtree(tmp, ignore_errors=True)
        raise BundleExistsError(str(dest)) from err
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return final


def _copy_verified(src: Path, dst: Path, name: str, expected: FileEntry) -> None:
    """Copy one file, hashing the bytes as they are copied, and check them."""
    _regular_file(src.parent, src.name)
    h = hashlib.sha256()
    buf = bytearray(HASH_BLOCK_BYTES)
    view = memoryview(buf)
    size = 0
    with src.open("rb", buffering=0) as fin, dst.open("xb", buffering=0) as fout:
        while n := fin.readinto(view):
            h.update(view[:n])
            fout.write(view[:n])
            size += n
    if size != expected.size or h.hexdigest() != expected.sha256:
        raise IntegrityError(
            name, "its bytes differ from the manifest's size and sha256", bundle=str(src.parent)
        )


def copy_payload(src: Path, dest: Path) -> Manifest:
    """Copy a bundle's files except card and manifest into ``dest``, verifying each.

    The copied safetensors files are then checked (:func:`check_tensor_files`), so a pickle
    relisted with its right sha256 is refused. Returns the source manifest; its own card is
    verified too, though it is re-rendered by :func:`finish_bundle` afterwards.
    """
    src, dest = Path(src), Path(dest)
    manifest = read_bundle_manifest(src)
    for name, entry in sorted(manifest.files.items()):
        if name == CARD_FILE:
            _verify_file(src, name, entry)
        else:
            _copy_verified(src / name, dest / name, name, entry)
    # The copy's bytes are the ones published: check them, not the source's, which could
    # have changed since the first look.
    check_tensor_files(dest, manifest)
    return manifest


def restamp_bundle(src: Path, dest: Path, *, name: str, version: int) -> Manifest:
    """Copy a bundle to ``dest`` as ``name@version``: manifest stamped, card re-rendered."""

    def fill(tmp: Path) -> Manifest:
        manifest = copy_payload(src, tmp)
        return finish_bundle(tmp, _updated(manifest, name=name, version=version))

    return _build_in_place(Path(dest), fill)
