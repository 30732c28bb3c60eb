"""A Hugging Face Hub-compatible HTTP server for offline tests, and its pytest fixture.

It implements what the real ``huggingface_hub`` client calls to create a repo, commit
(preupload, LFS batch + upload + verify, NDJSON commit), tag, list refs, trees and models,
read repo info and download files (``resolve`` with ``X-Repo-Commit`` and ``ETag``), with
token checks. It runs in a thread on 127.0.0.1, port 0. Use it through the ``hub_server``
fixture, which also turns off the client's Xet upload path (Xet needs a write token a local
server cannot give)::

    from hubserver import hub_server  # noqa: F401

    def test_x(hub_server):
        hub_server.add_token("hf_test", "alice", orgs=("org",))
        api = HfApi(endpoint=hub_server.endpoint, token="hf_test")

The data model and rules live in tests/hubserver_state.py.
"""

from __future__ import annotations

import base64
import json
import re
import secrets
import threading
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

import pytest
from hubserver_state import LFS_MIN_SIZE, LFS_SUFFIXES, HubHTTPError, HubState, Identity, Repo
from huggingface_hub import constants as hf_constants

__all__ = ["HubServer", "hub_server"]

Query = Mapping[str, list[str]]
Reply = tuple[int, dict[str, str], bytes]
_REPO = r"(?P<repo>[^/]+/[^/]+)"


def _json(payload: object, status: int = 200, headers: Mapping[str, str] = {}) -> Reply:
    return status, {"Content-Type": "application/json", **headers}, json.dumps(payload).encode()


class HubServer:
    """The fake Hub: start it, hand out tokens, tamper with stored bytes, stop it.

    ``state`` holds repos and rules (``state.on_commit``, ``state.hold_commits`` and
    ``state.refusals`` help tests stage races); ``requests`` records ``"METHOD /path"``.
    """

    def __init__(self) -> None:
        self.state = HubState()
        self.requests: list[str] = []
        self.uploads: dict[str, tuple[str, int]] = {}
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
        self._httpd.daemon_threads = True
        self._httpd.hub = self  # type: ignore[attr-defined]
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True
        )
        self._thread.start()

    def add_token(
        self, token: str, user: str, *, can_write: bool = True, orgs: tuple[str, ...] = ()
    ) -> None:
        """Accept ``token`` as ``user``, who also acts for ``orgs``; writes need ``can_write``."""
        with self.state.lock:
            self.state.tokens[token] = Identity(user, tuple(orgs), can_write)

    def tamper(self, repo_id: str, path: str, *, revision: str = "main") -> None:
        """Corrupt the stored bytes of a file (same size, same advertised hashes)."""
        self.state.tamper(repo_id, path, revision=revision)

    def repo(self, repo_id: str) -> Repo:
        """The stored repo, for assertions."""
        return self.state.repos[repo_id]

    def stop(self) -> None:
        """Stop serving; later requests fail to connect."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=10)


# --- routes ------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    """What a route sees: the server, the caller, the path match, the query and the body."""

    hub: HubServer
    ident: Identity | None
    m: re.Match[str]
    q: Query
    body: bytes

    @property
    def state(self) -> HubState:
        """The server's data."""
        return self.hub.state

    def json(self) -> Any:
        """The body parsed as JSON."""
        return json.loads(self.body or b"{}")

    def flag(self, key: str) -> bool:
        """Whether a boolean query parameter is set."""
        return self.q.get(key, ["false"])[0].lower() in ("1", "true")


Route = Callable[[Request], Reply]
_ROUTES: list[tuple[frozenset[str], re.Pattern[str], Route]] = []


def _route(methods: str, pattern: str) -> Callable[[Route], Route]:
    def register(fn: Route) -> Route:
        _ROUTES.append((frozenset(methods.split()), re.compile(f"^{pattern}$"), fn))
        return fn

    return register


def _ref_list(refs: Mapping[str, str], kind: str) -> list[dict[str, str]]:
    return [{"name": n, "ref": f"refs/{kind}/{n}", "targetCommit": c} for n, c in refs.items()]


@_route("GET", "/api/whoami-v2")
def _whoami(r: Request) -> Reply:
    if r.ident is None:
        raise HubHTTPError(401, "Invalid username or password.")
    role = "write" if r.ident.can_write else "read"
    orgs = [{"name": o, "type": "org"} for o in r.ident.orgs]
    access = {"type": "access_token", "accessToken": {"displayName": "test", "role": role}}
    return _json({"type": "user", "name": r.ident.user, "orgs": orgs, "auth": access})


@_route("POST", "/api/validate-yaml")
def _validate_yaml(r: Request) -> Reply:
    return _json({"errors": [], "warnings": []})


@_route("POST", "/api/repos/create")
def _create_repo(r: Request) -> Reply:
    data = r.json()
    if data.get("type", "model") != "model":
        raise HubHTTPError(400, "This server only hosts model repos")
    namespace = data.get("organization") or (r.ident.user if r.ident else "anonymous")
    repo_id = f"{namespace}/{data['name']}"
    private = data.get("visibility") == "private" or bool(data.get("private"))
    url = f"{r.hub.endpoint}/{repo_id}"
    try:
        r.state.create_repo(repo_id, r.ident, private=private)
    except HubHTTPError as err:
        if err.status != 409:
            raise
        return _json({"error": err.message, "url": url}, 409)
    return _json({"url": url, "name": repo_id, "id": repo_id})


@_route("GET", "/api/models")
def _list_models(r: Request) -> Reply:
    out = []
    with r.state.lock:
        for repo in r.state.repos.values():
            if repo.private and not (r.ident and r.ident.member(repo.namespace)):
                continue
            tags = r.state.card_tags(repo)
            if "author" in r.q and repo.namespace != r.q["author"][0]:
                continue
            if "search" in r.q and r.q["search"][0].lower() not in repo.repo_id.lower():
                continue
            if not set(r.q.get("filter", [])) <= set(tags):
                continue
            head = repo.resolve("main")
            out.append(
                {
                    "id": repo.repo_id,
                    "author": repo.namespace,
                    "private": repo.private,
                    "sha": head.oid,
                    "tags": tags,
                    "lastModified": head.date,
                    "createdAt": repo.created_at,
                }
            )
    return _json(sorted(out, key=lambda item: item["id"]))


@_route("GET", f"/api/models/{_REPO}(?:/revision/(?P<rev>[^/]+))?")
def _model_info(r: Request) -> Reply:
    with r.state.lock:
        repo = r.state.readable(r.m["repo"], r.ident)
        commit = repo.resolve(unquote(r.m["rev"] or "main"))
        info = {
            "id": repo.repo_id,
            "modelId": repo.repo_id,
            "author": repo.namespace,
            "sha": commit.oid,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "tags": r.state.card_tags(repo),
            "siblings": [{"rfilename": p} for p in sorted(commit.files)],
        }
    return _json(info)


@_route("GET", f"/api/models/{_REPO}/refs")
def _refs(r: Request) -> Reply:
    with r.state.lock:
        repo = r.state.readable(r.m["repo"], r.ident)
        branches, tags = _ref_list(repo.branches, "heads"), _ref_list(repo.tags, "tags")
    return _json({"branches": branches, "converts": [], "tags": tags, "pullRequests": []})


@_route("GET", f"/api/models/{_REPO}/tree/(?P<rev>[^/]+)(?:/(?P<path>.*))?")
def _tree(r: Request) -> Reply:
    with r.state.lock:
        commit = r.state.readable(r.m["repo"], r.ident).resolve(unquote(r.m["rev"]))
    prefix = unquote(r.m["path"] or "").strip("/")
    prefix = f"{prefix}/" if prefix else ""
    entries, folders = [], set()
    for path, entry in sorted(commit.files.items()):
        if not path.startswith(prefix):
            continue
        rest = path[len(prefix) :]
        if "/" in rest and not r.flag("recursive"):
            folders.add(prefix + rest.split("/", 1)[0])
            continue
        entries.append(entry.tree_json(path))
    if prefix and not entries and not folders:
        raise HubHTTPError(404, f"{prefix} does not exist", code="EntryNotFound")
    dirs = [{"type": "directory", "path": f, "oid": "0" * 40} for f in sorted(folders)]
    return _json(dirs + entries)


@_route("POST", f"/api/models/{_REPO}/preupload/(?P<rev>[^/]+)")
def _preupload(r: Request) -> Reply:
    with r.state.lock:
        commit = r.state.writable(r.m["repo"], r.ident).resolve(unquote(r.m["rev"]))
    files = []
    for item in r.json()["files"]:
        sample = base64.b64decode(item.get("sample", ""))
        lfs = item["path"].endswith(LFS_SUFFIXES) or item["size"] >= LFS_MIN_SIZE or b"\0" in sample
        current = commit.files.get(item["path"])
        oid = (current.sha256 if current.lfs else current.oid) if current else None
        mode = "lfs" if lfs else "regular"
        files.append({"path": item["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
    return _json({"files": files, "commitOid": commit.oid})


@_route("POST", rf"/{_REPO}\.git/info/lfs/objects/batch")
def _lfs_batch(r: Request) -> Reply:
    r.state.writable(r.m["repo"], r.ident)
    objects = []
    for obj in r.json()["objects"]:
        oid, size = obj["oid"], obj["size"]
        known = r.state.blobs.get(oid)
        if known is not None and len(known) == size:
            objects.append({"oid": oid, "size": size})
            continue
        ticket = secrets.token_hex(16)
        r.hub.uploads[ticket] = (oid, size)
        actions = {
            "upload": {"href": f"{r.hub.endpoint}/_lfs/upload/{ticket}"},
            "verify": {"href": f"{r.hub.endpoint}/_lfs/verify"},
        }
        objects.append({"oid": oid, "size": size, "authenticated": True, "actions": actions})
    return _json({"transfer": "basic", "objects": objects})


@_route("PUT", "/_lfs/upload/(?P<ticket>[0-9a-f]+)")
def _lfs_upload(r: Request) -> Reply:
    ticket = r.hub.uploads.pop(r.m["ticket"], None)
    if ticket is None:
        raise HubHTTPError(403, "Unknown or used upload URL")
    oid, size = ticket
    if len(r.body) != size:
        raise HubHTTPError(400, f"Expected {size} bytes, got {len(r.body)}")
    r.state.store_lfs(oid, r.body)
    return 200, {"ETag": f'"{oid}"'}, b""


@_route("POST", "/_lfs/verify")
def _lfs_verify(r: Request) -> Reply:
    obj = r.json()
    data = r.state.blobs.get(obj["oid"])
    if data is None or len(data) != obj["size"]:
        raise HubHTTPError(404, "Object not found")
    return _json({"success": True})


@_route("POST", f"/api/models/{_REPO}/commit/(?P<rev>[^/]+)")
def _commit(r: Request) -> Reply:
    state = r.state
    repo = state.writable(r.m["repo"], r.ident)
    if r.flag("create_pr"):
        raise HubHTTPError(400, "Pull requests are not supported by this server")
    lines = [json.loads(line) for line in r.body.splitlines() if line.strip()]
    if not lines or lines[0].get("key") != "header":
        raise HubHTTPError(400, "The first line of a commit must be its header")
    header, changes = lines[0]["value"], []
    for line in lines[1:]:
        key, value = line["key"], line["value"]
        if key == "file":
            changes.append((value["path"], state.store_regular(state.decode_inline(value))))
        elif key == "lfsFile":
            size = value.get("size", len(state.blobs.get(value["oid"], b"")))
            changes.append((value["path"], state.lfs_entry(value["oid"], size)))
        elif key == "deletedFile":
            changes.append((value["path"], None))
        elif key == "deletedFolder":
            changes.append((value["path"].rstrip("/") + "/", None))
        else:
            raise HubHTTPError(400, f"Unknown commit operation {key!r}")
    commit = state.commit(
        repo,
        unquote(r.m["rev"]),
        title=header.get("summary", ""),
        parent=header.get("parentCommit"),
        changes=changes,
    )
    url = f"{r.hub.endpoint}/{repo.repo_id}/commit/{commit.oid}"
    return _json({"commitUrl": url, "commitOid": commit.oid, "pullRequestUrl": None})


@_route("POST", f"/api/models/{_REPO}/tag/(?P<rev>[^/]+)")
def _tag(r: Request) -> Reply:
    repo = r.state.writable(r.m["repo"], r.ident)
    r.state.tag(repo, unquote(r.m["rev"]), r.json()["tag"])
    return _json({})


@_route("GET HEAD", f"/{_REPO}/resolve/(?P<rev>[^/]+)/(?P<path>.+)")
def _resolve(r: Request) -> Reply:
    with r.state.lock:
        commit = r.state.readable(r.m["repo"], r.ident).resolve(unquote(r.m["rev"]))
        entry = commit.files.get(unquote(r.m["path"]))
        if entry is None:
            headers = {"X-Repo-Commit": commit.oid}
            raise HubHTTPError(404, "Entry not found", code="EntryNotFound", headers=headers)
        data = r.state.blobs[entry.key]
    headers = {
        "Content-Type": "application/octet-stream",
        "X-Repo-Commit": commit.oid,
        "ETag": f'"{entry.etag}"',
    }
    if entry.lfs:
        headers |= {"X-Linked-Etag": f'"{entry.etag}"', "X-Linked-Size": str(entry.size)}
    return 200, headers, data


# --- HTTP plumbing -----------------------------------------------------------------------------


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    @property
    def hub(self) -> HubServer:
        return self.server.hub  # type: ignore[attr-defined]

    def log_message(self, format: str, *args: object) -> None:
        """Stay quiet: test output is not the place for an access log."""

    def _body(self) -> bytes:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            chunks = []
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                chunks.append(self.rfile.read(size))
                self.rfile.readline()
            while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                pass
            return b"".join(chunks)
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length else b""

    def _dispatch(self, method: str) -> None:
        url = urlsplit(self.path)
        body = self._body()
        self.hub.requests.append(f"{method} {url.path}")
        try:
            ident = self.hub.state.identify(self.headers.get("Authorization"))
            for methods, pattern, route in _ROUTES:
                match = pattern.match(url.path)
                if method in methods and match:
                    request = Request(self.hub, ident, match, parse_qs(url.query), body)
                    status, headers, payload = route(request)
                    break
            else:
                raise HubHTTPError(404, f"No route for {method} {url.path}")
        except HubHTTPError as err:
            extra = {**err.headers, **({"X-Error-Code": err.code} if err.code else {})}
            status, headers, payload = _json({"error": err.message}, err.status, extra)
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(payload)))
        # One request per connection, so that after stop() no pooled connection still answers.
        self.send_header("Connection", "close")
        self.end_headers()
        if method != "HEAD":
            self.wfile.write(payload)

    def do_GET(self) -> None:
        self._dispatch("GET")

    def do_HEAD(self) -> None:
        self._dispatch("HEAD")

    def do_POST(self) -> None:
        self._dispatch("POST")

    def do_PUT(self) -> None:
        self._dispatch("PUT")


@pytest.fixture
def hub_server(monkeypatch: pytest.MonkeyPatch) -> Iterator[HubServer]:
    """A running fake Hub; the client's Xet upload path is off while it runs."""
    monkeypatch.setenv("HF_HUB_DISABLE_XET", "1")
    monkeypatch.setattr(hf_constants, "HF_HUB_DISABLE_XET", True)
    server = HubServer()
    yield server
    server.stop()
