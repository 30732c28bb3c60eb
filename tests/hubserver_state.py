"""The data and the rules of the fake Hub in tests/hubserver.py, apart from HTTP.

Repos hold immutable commits (a commit is a whole tree of files), branches that move
(``main``), and tags that point at commits and never move. Access follows the Hub: anyone
reads a public repo; a private repo, or one that does not exist, answers 401 to anonymous
callers and 404 to others; writing needs a write token of the repo's namespace. The
preconditions the real Hub enforces and that hubarches relies on are enforced here too: a
commit with a ``parentCommit`` other than the branch head is refused (412) and a tag that
exists already is refused (409).
"""

from __future__ import annotations

import base64
import hashlib
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field

import yaml

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".h5", ".h5ad", ".npz", ".zip", ".gz")
LFS_MIN_SIZE = 10 * 1024 * 1024
GITATTRIBUTES = "".join(f"*{s} filter=lfs diff=lfs merge=lfs -text\n" for s in LFS_SUFFIXES)
_HEX = frozenset("0123456789abcdef")


class HubHTTPError(Exception):
    """An HTTP error answer: status, message and the Hub's ``X-Error-Code`` when it has one."""

    def __init__(
        self, status: int, message: str, *, code: str | None = None, headers: Mapping[str, str] = {}
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers)


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob, as ``git hash-object`` computes it."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    """The git-lfs pointer file that stands in the git tree for an LFS object."""
    return (
        f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()
    )


@dataclass(frozen=True)
class FileEntry:
    """One file of a commit's tree; ``key`` names its bytes in the blob store."""

    size: int
    oid: str
    sha256: str
    lfs: bool

    @property
    def key(self) -> str:
        """Content address of the bytes: sha256 for LFS objects, the git oid otherwise."""
        return self.sha256 if self.lfs else self.oid

    @property
    def etag(self) -> str:
        """What the Hub puts in ETag: the sha256 for LFS files, the git blob oid otherwise."""
        return self.key

    def tree_json(self, path: str) -> dict:
        """The entry as ``/api/models/{repo}/tree/{rev}`` lists it."""
        entry: dict = {"type": "file", "path": path, "size": self.size, "oid": self.oid}
        if self.lfs:
            pointer = lfs_pointer(self.sha256, self.size)
            entry["lfs"] = {"oid": self.sha256, "size": self.size, "pointerSize": len(pointer)}
        return entry


@dataclass(frozen=True)
class Commit:
    """An immutable commit: the whole tree, its parent and its title."""

    oid: str
    parent: str | None
    title: str
    date: str
    files: Mapping[str, FileEntry]


@dataclass
class Repo:
    """A model repo: commits by oid, moving branches, fixed tags."""

    repo_id: str
    private: bool
    created_at: str
    commits: dict[str, Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)

    @property
    def namespace(self) -> str:
        """The user or organisation that owns the repo."""
        return self.repo_id.split("/", 1)[0]

    def resolve(self, revision: str) -> Commit:
        """The commit a branch, a tag or a full commit oid names; 404 RevisionNotFound if none."""
        oid = self.branches.get(revision) or self.tags.get(revision)
        if oid is None and len(revision) == 40 and set(revision) <= _HEX:
            oid = revision if revision in self.commits else None
        if oid is None:
            raise HubHTTPError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")
        return self.commits[oid]


@dataclass(frozen=True)
class Identity:
    """Who a token belongs to, which namespaces it acts for, and whether it may write."""

    user: str
    orgs: tuple[str, ...] = ()
    can_write: bool = True

    def member(self, namespace: str) -> bool:
        """Whether the token acts for ``namespace``."""
        return namespace == self.user or namespace in self.orgs


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime())


class HubState:
    """Everything the fake Hub stores, behind one lock, with the Hub's access and ref rules."""

    def __init__(self) -> None:
        self.lock = threading.RLock()
        self.repos: dict[str, Repo] = {}
        self.blobs: dict[str, bytes] = {}
        self.tokens: dict[str, Identity] = {}
        self.refusals: Counter[str] = Counter()
        self.on_commit: Callable[[str, str], None] | None = None
        self._barrier: threading.Barrier | None = None
        self._held = 0
        self._counter = 0

    def hold_commits(self, parties: int) -> None:
        """Make the next ``parties`` commits wait for each other, so they race from one head."""
        with self.lock:
            self._barrier, self._held = threading.Barrier(parties), parties

    # --- identity and access ---------------------------------------------------------------

    def identify(self, authorization: str | None) -> Identity | None:
        """The identity of an ``Authorization: Bearer`` header; 401 for a token it does not know."""
        if not authorization:
            return None
        token = authorization.removeprefix("Bearer ").strip()
        with self.lock:
            ident = self.tokens.get(token)
        if ident is None:
            msg = "Invalid credentials in Authorization header"
            raise HubHTTPError(401, msg, headers={"X-Error-Message": msg})
        return ident

    def readable(self, repo_id: str, ident: Identity | None) -> Repo:
        """The repo if the caller may read it; else the Hub's 401 (anonymous) or 404 answer."""
        repo = self.repos.get(repo_id)
        if repo is not None and (not repo.private or (ident and ident.member(repo.namespace))):
            return repo
        msg = "Repository not found"
        headers = {"X-Error-Message": msg}
        raise HubHTTPError(401 if ident is None else 404, msg, code="RepoNotFound", headers=headers)

    def writable(self, repo_id: str, ident: Identity | None) -> Repo:
        """The repo if the caller may write to it; else 401/404 as for reading, or 403."""
        repo = self.readable(repo_id, ident)
        if ident is None:
            raise HubHTTPError(401, "You must be authenticated to write", code="RepoNotFound")
        if not ident.can_write or not ident.member(repo.namespace):
            raise HubHTTPError(403, "You don't have the rights to write to this repository")
        return repo

    # --- repos, blobs, commits, tags ---------------------------------------------------------

    def _new_commit(
        self, repo: Repo, parent: str | None, title: str, files: Mapping[str, FileEntry]
    ) -> Commit:
        self._counter += 1
        listing = "".join(f"{p}\0{e.oid}\n" for p, e in sorted(files.items()))
        seed = f"{repo.repo_id}\n{parent}\n{title}\n{self._counter}\n{listing}".encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), parent, title, _now(), dict(files))
        repo.commits[commit.oid] = commit
        return commit

    def store_regular(self, data: bytes) -> FileEntry:
        """Keep the bytes of a file committed inline (not through LFS)."""
        entry = FileEntry(len(data), git_blob_oid(data), hashlib.sha256(data).hexdigest(), False)
        with self.lock:
            self.blobs[entry.key] = data
        return entry

    def store_lfs(self, sha256: str, data: bytes) -> None:
        """Keep an uploaded LFS object after checking that its bytes hash to ``sha256``."""
        if hashlib.sha256(data).hexdigest() != sha256:
            raise HubHTTPError(400, "The uploaded object does not match its sha256")
        with self.lock:
            self.blobs[sha256] = data

    def create_repo(self, repo_id: str, ident: Identity | None, *, private: bool) -> Repo:
        """Create a repo with the Hub's initial commit (``.gitattributes`` on ``main``)."""
        if ident is None:
            raise HubHTTPError(401, "You must be authenticated to create a repo")
        namespace = repo_id.split("/", 1)[0]
        if not ident.can_write or not ident.member(namespace):
            raise HubHTTPError(
                403, f"You don't have the rights to create a model under {namespace}"
            )
        with self.lock:
            if repo_id in self.repos:
                raise HubHTTPError(409, "You already created this model repo")
            repo = Repo(repo_id, private, _now())
            files = {".gitattributes": self.store_regular(GITATTRIBUTES.encode())}
            repo.branches["main"] = self._new_commit(repo, None, "initial commit", files).oid
            self.repos[repo_id] = repo
            return repo

    def lfs_entry(self, sha256: str, size: int) -> FileEntry:
        """The tree entry of an LFS object that was uploaded before; 400 if it was not."""
        with self.lock:
            data = self.blobs.get(sha256)
        if data is None or len(data) != size:
            raise HubHTTPError(400, f"LFS object {sha256} was not uploaded")
        return FileEntry(size, git_blob_oid(lfs_pointer(sha256, size)), sha256, True)

    def commit(
        self,
        repo: Repo,
        branch: str,
        *,
        title: str,
        parent: str | None,
        changes: Iterable[tuple[str, FileEntry | None]],
    ) -> Commit:
        """Commit ``changes`` (path → entry, or None to delete) on top of ``branch``.

        The parent check and the branch update happen under one lock: a compare-and-swap,
        so of two commits made from the same head exactly one lands.
        """
        with self.lock:
            barrier, self._held = (self._barrier, self._held - 1) if self._held else (None, 0)
        if barrier is not None:
            barrier.wait(timeout=30)
        with self.lock:
            if branch not in repo.branches:
                raise HubHTTPError(404, f"Invalid rev id: {branch}", code="RevisionNotFound")
            head = repo.commits[repo.branches[branch]]
            if parent is not None and not head.oid.startswith(parent.lower()):
                self.refusals["parent-commit"] += 1
                raise HubHTTPError(
                    412, "A commit has happened since. Please refresh and try again."
                )
            files = dict(head.files)
            for path, entry in changes:
                if entry is not None:
                    files[path] = entry
                elif path.endswith("/"):
                    files = {p: e for p, e in files.items() if not p.startswith(path)}
                elif files.pop(path, None) is None:
                    msg = f"A file with this name doesn't exist: {path}"
                    raise HubHTTPError(404, msg, code="EntryNotFound")
            commit = self._new_commit(repo, head.oid, title, files)
            repo.branches[branch] = commit.oid
        if self.on_commit is not None:
            self.on_commit(repo.repo_id, commit.oid)
        return commit

    def tag(self, repo: Repo, revision: str, tag: str) -> None:
        """Point a new tag at a revision; 409 if the tag exists (tags never move)."""
        with self.lock:
            commit = repo.resolve(revision)
            if tag in repo.tags or tag in repo.branches:
                self.refusals["tag-exists"] += 1
                raise HubHTTPError(409, f"Tag {tag} already exists")
            repo.tags[tag] = commit.oid

    def card_tags(self, repo: Repo) -> list[str]:
        """Tags the Hub derives from the README front matter at ``main`` (``tags``, library)."""
        entry = repo.resolve("main").files.get("README.md")
        text = self.blobs[entry.key].decode("utf-8", "replace") if entry else ""
        if not text.startswith("---"):
            return []
        front = text.split("---", 2)[1] if text.count("---") >= 2 else ""
        try:
            meta = yaml.safe_load(front) or {}
        except yaml.YAMLError:
            return []
        if not isinstance(meta, dict):
            return []
        tags = [str(t) for t in meta.get("tags") or [] if isinstance(t, (str, int))]
        if meta.get("library_name"):
            tags.append(str(meta["library_name"]))
        return tags

    def tamper(self, repo_id: str, path: str, *, revision: str = "main") -> None:
        """Flip the bytes of a stored file, keeping its size and its advertised hashes."""
        with self.lock:
            entry = self.repos[repo_id].resolve(revision).files[path]
            data = self.blobs[entry.key]
            self.blobs[entry.key] = bytes(b ^ 0xFF for b in data[:8]) + data[8:]

    @staticmethod
    def decode_inline(value: Mapping[str, str]) -> bytes:
        """The bytes of a ``file`` line of a commit payload."""
        if value.get("encoding", "base64") != "base64":
            raise HubHTTPError(400, f"Unsupported encoding {value.get('encoding')!r}")
        return base64.b64decode(value["content"])
