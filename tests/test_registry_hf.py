"""The Hugging Face Hub backend, against the fake Hub of tests/hubserver.py (no internet).

The real ``huggingface_hub`` client talks HTTP to the fake server. The CLI's ``pull``,
``map`` and ``push`` against this server belong with the CLI's tests.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import types
import uuid

import pytest
import torch
from hubserver import HubServer, hub_server  # noqa: F401
from huggingface_hub import CommitOperationAdd, HfApi
from test_bundle import BAD_MANIFESTS, pickle_bytes, relist, snapshot, spoil_manifest

import hubarches
from hubarches.bundle import WEIGHTS_FILE, verify_bundle, write_bundle
from hubarches.cache import cached_versions, pull
from hubarches.errors import (
    IntegrityError,
    PushError,
    ReferenceNotFound,
    RegistryAccessError,
    RegistryError,
    RegistryOfflineError,
    VersionExistsError,
    VersionNotFound,
    WeightsError,
)
from hubarches.manifest import MANIFEST_FILE, parse_manifest
from hubarches.registry import Registry, VersionInfo, parse_ref
from hubarches.registry.hf import MAX_PUSH_ATTEMPTS, HubRegistry
from hubarches.registry.select import get_registry

# huggingface_hub's own LFS upload passes a file as data= to its HTTP library, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")

TOKEN = "hf_aliceWriteTokenForTests0123456789"
READER = "hf_bobReadOnlyTokenForTests0123456"
WRONG = "hf_thisTokenIsUnknownToTheServer0000"
ATLAS = "org/atlas"
BUNDLE_FILES = ["README.md", "manifest.json", "model.safetensors"]
# Read at import: the autouse isolation fixture removes HF_TOKEN before each test runs.
LIVE = bool(os.environ.get("HUBARCHES_LIVE_HUB")) and bool(os.environ.get("HF_TOKEN"))
LIVE_TOKEN = os.environ.get("HF_TOKEN") if LIVE else None


@pytest.fixture
def hub(hub_server: HubServer) -> HubServer:  # noqa: F811
    hub_server.add_token(TOKEN, "alice", orgs=("org",))
    hub_server.add_token(READER, "bob", can_write=False)
    return hub_server


@pytest.fixture
def registry(hub: HubServer) -> HubRegistry:
    return HubRegistry(hub.endpoint, TOKEN)


@pytest.fixture
def pushed(registry, make_bundle, make_manifest, tmp_path):
    """v1 (with an embedding file) and an extension of it (without one) as v2."""
    gen = torch.Generator().manual_seed(0)
    v1_dir = tmp_path / "v1-bundle"
    write_bundle(
        v1_dir,
        make_manifest(description="reference"),
        {"encoder.weight": torch.randn(8, 6, generator=gen)},
        embedding={"latent": torch.randn(4, 2, generator=gen)},
    )
    v1 = registry.publish(v1_dir, ATLAS)
    lineage = {
        "parent": {"name": ATLAS, "version": 1, "digest": v1.digest},
        "added_categories": {"batch": ("q0",)},
    }
    ext_dir, _ = make_bundle(
        seed=1, batches=("b0", "b1", "q0"), description="extension", lineage=lineage
    )
    v2 = registry.publish(ext_dir, ATLAS)
    return v1, v2


def manifest_at(hub: HubServer, revision: str, name: str = ATLAS):
    repo = hub.repo(name)
    entry = repo.resolve(revision).files[MANIFEST_FILE]
    return parse_manifest(hub.state.blobs[entry.key])


def plant(hub: HubServer, bundle, version: int, name: str = ATLAS) -> None:
    """Commit a bundle's files as they are and tag them ``v<version>``, bypassing hubarches."""
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    if name not in hub.state.repos:
        api.create_repo(name)
    operations = [CommitOperationAdd(p.name, str(p)) for p in sorted(bundle.iterdir())]
    commit = api.create_commit(name, operations, commit_message="planted outside hubarches")
    api.create_tag(name, tag=f"v{version}", revision=commit.oid)


def hub_snapshot(hub: HubServer) -> dict[str, tuple[dict[str, str], dict[str, str]]]:
    """Every repo's branches and tags: what a push that publishes nothing leaves unchanged."""
    return {r.repo_id: (dict(r.branches), dict(r.tags)) for r in hub.state.repos.values()}


def error_text(err: BaseException) -> str:
    """Everything an error shows, its causes included."""
    parts = []
    while err is not None:
        parts += [str(err), repr(err)]
        err = err.__cause__ or err.__context__
    return "\n".join(parts)


# --- push and pull --------------------------------------------------------------------------


def test_push_v1_and_extension_then_pull_by_number_digest_and_latest(registry, pushed, tmp_path):
    v1, v2 = pushed
    assert (v1.version, v2.version) == (1, 2)
    assert v1.digest != v2.digest
    assert registry.list_versions(ATLAS) == [v1, v2]
    cases = {
        f"{ATLAS}@1": v1,
        f"{ATLAS}@v2": v2,
        f"{ATLAS}@sha256:{v1.digest}": v1,
        f"{ATLAS}@sha256:{v2.digest}": v2,
        ATLAS: v2,
    }
    for i, (ref, expected) in enumerate(cases.items()):
        info = registry.resolve(parse_ref(ref))
        assert info == expected, ref
        dest = tmp_path / f"fetched-{i}"
        registry.fetch(info, dest)
        manifest = verify_bundle(dest, expected_digest=expected.digest)
        assert (manifest.name, manifest.version) == (ATLAS, expected.version)
        extra = ["embedding.safetensors"] if expected.version == 1 else []
        assert sorted(p.name for p in dest.iterdir()) == sorted(BUNDLE_FILES + extra)
    assert manifest.lineage.parent.digest == v1.digest


def test_versions_are_tagged_commits_with_the_bundle_at_the_repo_root(hub, pushed):
    repo = hub.repo(ATLAS)
    v1_commit, v2_commit = repo.commits[repo.tags["v1"]], repo.commits[repo.tags["v2"]]
    assert repo.branches["main"] == v2_commit.oid
    assert v2_commit.parent == v1_commit.oid
    assert set(v1_commit.files) == {".gitattributes", "embedding.safetensors", *BUNDLE_FILES}
    # A file the new bundle lacks is deleted from the root, not left over from v1.
    assert set(v2_commit.files) == {".gitattributes", *BUNDLE_FILES}
    assert v2_commit.files["model.safetensors"].lfs
    for tag in ("v1", "v2"):
        assert manifest_at(hub, tag).version == int(tag[1:])
    card = hub.state.blobs[v2_commit.files["README.md"].key].decode()
    assert card.startswith("---")
    assert "library_name: hubarches" in card


def test_pulls_pin_the_tag_commit_even_when_main_moves(hub, registry, pushed):
    _, v2 = pushed
    api = HfApi(endpoint=hub.endpoint, token=TOKEN)
    api.create_commit(
        ATLAS,
        [CommitOperationAdd("model.safetensors", b"not the weights of v2")],
        commit_message="an edit outside hubarches",
    )
    pulled = pull(f"{ATLAS}@2", registry)
    assert pulled.info == v2
    assert pull(ATLAS, registry).info == v2  # "latest" is the highest tag, not main


def test_tampered_bytes_served_by_the_hub_are_rejected(hub, pushed, tmp_path):
    _, v2 = pushed
    hub.tamper(ATLAS, "model.safetensors", revision="v2")
    fresh = HubRegistry(hub.endpoint, TOKEN)  # nothing cached from before the tampering
    info = fresh.resolve(parse_ref(f"{ATLAS}@2"))
    dest = tmp_path / "tampered"
    fresh.fetch(info, dest)  # the client only checks sizes: the download "succeeds"
    manifest = parse_manifest((dest / MANIFEST_FILE).read_bytes())
    assert (dest / "model.safetensors").stat().st_size == manifest.files["model.safetensors"].size
    with pytest.raises(IntegrityError, match=r"model\.safetensors"):
        verify_bundle(dest, expected_digest=v2.digest)
    with pytest.raises(IntegrityError, match=r"model\.safetensors"):
        pull(f"{ATLAS}@2", fresh)
    assert cached_versions(ATLAS, registry=fresh) == []


# --- bundles that must never be published or cached ---------------------------------------


def test_push_of_a_relisted_pickle_publishes_nothing(hub, registry, pushed, make_bundle, tmp_path):
    src, _ = make_bundle(seed=7)
    marker = tmp_path / "UNPICKLED"
    (src / WEIGHTS_FILE).write_bytes(pickle_bytes(marker))
    relist(src, WEIGHTS_FILE)
    before, n_requests = hub_snapshot(hub), len(hub.requests)
    for name in (ATLAS, "org/fresh"):  # an atlas with versions, and one a push would create
        with pytest.raises(WeightsError, match=f"{WEIGHTS_FILE} is not a safetensors file"):
            registry.publish(src, name)
        with pytest.raises(WeightsError, match="never unpickles"):
            hubarches.push(src, name, registry=registry)
    assert hub_snapshot(hub) == before  # no repo created, no commit, no tag
    assert hub.requests[n_requests:] == []  # refused before the Hub was contacted
    assert not marker.exists()


def test_a_pickle_served_by_the_hub_is_never_cached(
    hub, registry, pushed, make_bundle, tmp_path, isolated_env
):
    src, _ = make_bundle(seed=7)
    marker = tmp_path / "UNPICKLED"
    (src / WEIGHTS_FILE).write_bytes(pickle_bytes(marker))
    relist(src, WEIGHTS_FILE, name=ATLAS, version=3)
    plant(hub, src, 3)
    before = snapshot(isolated_env.cache)
    for ref in (f"{ATLAS}@3", ATLAS):
        with pytest.raises(WeightsError, match=f"{WEIGHTS_FILE} is not a safetensors file"):
            pull(ref, registry)
        with pytest.raises(WeightsError, match="never unpickles"):
            hubarches.load_reference(ref, registry)
    assert [p for p in snapshot(isolated_env.cache) if p not in before] == []  # nothing left
    assert cached_versions(ATLAS, registry=registry) == []
    assert not marker.exists()


@pytest.mark.parametrize("kind", sorted(BAD_MANIFESTS))
def test_bad_manifests_are_never_pushed_or_pulled(
    hub, registry, pushed, make_bundle, isolated_env, kind
):
    src, _ = make_bundle(seed=7)
    error, pattern = spoil_manifest(src, kind)
    before, cache_before = hub_snapshot(hub), snapshot(isolated_env.cache)
    for name in (ATLAS, "org/fresh"):
        with pytest.raises(error, match=pattern):
            registry.publish(src, name)
        with pytest.raises(error, match=pattern):
            hubarches.push(src, name, registry=registry)
    assert hub_snapshot(hub) == before
    # The same manifest committed and tagged outside hubarches is never pulled.
    plant(hub, src, 3)
    for ref in (f"{ATLAS}@3", ATLAS):
        with pytest.raises(error, match=pattern):
            pull(ref, registry)
    assert snapshot(isolated_env.cache) == cache_before


def test_a_damaged_version_does_not_hide_the_others_from_a_digest_lookup(
    hub, registry, pushed, make_bundle
):
    v1, v2 = pushed
    src, _ = make_bundle(seed=7)
    spoil_manifest(src, "unknown-field")
    plant(hub, src, 3)  # the highest tag, read first, and unreadable
    assert registry.resolve(parse_ref(f"{ATLAS}@sha256:{v1.digest}")) == v1
    assert registry.resolve(parse_ref(f"{ATLAS}@sha256:{v2.digest}")) == v2
    with pytest.raises(VersionNotFound):
        registry.resolve(parse_ref(f"{ATLAS}@sha256:{'0' * 64}"))


# --- access ---------------------------------------------------------------------------------


def test_private_atlas_without_a_valid_token_gives_the_access_error(
    hub, make_bundle, monkeypatch, caplog, tmp_path
):
    caplog.set_level(logging.DEBUG)
    owner = HubRegistry(hub.endpoint, TOKEN, private=True)
    info = owner.publish(make_bundle()[0], "org/secret")
    assert hub.repo("org/secret").private
    for token in (None, WRONG, READER):
        other = HubRegistry(hub.endpoint, token)
        with pytest.raises(RegistryAccessError, match="HF_TOKEN") as exc:
            other.resolve(parse_ref("org/secret@1"))
        assert "no access" in str(exc.value)
        with pytest.raises(RegistryAccessError):
            other.fetch(info, tmp_path / "denied")
        for secret in (TOKEN, READER, WRONG):
            assert secret not in error_text(exc.value)
            assert secret not in repr(other)
    assert not any(TOKEN.encode() in data for data in hub.state.blobs.values())
    monkeypatch.setenv("HF_TOKEN", TOKEN)  # the client's usual token sources are used
    assert HubRegistry(hub.endpoint).resolve(parse_ref("org/secret@1")) == info
    for secret in (TOKEN, READER, WRONG):
        assert secret not in caplog.text


def test_push_without_a_write_token_fails_and_publishes_nothing(hub, pushed, make_bundle):
    bundle = make_bundle(seed=3)[0]
    before = dict(hub.repo(ATLAS).tags), hub.repo(ATLAS).branches["main"]
    with pytest.raises(RegistryAccessError, match="HF_TOKEN") as exc:
        HubRegistry(hub.endpoint, WRONG).publish(bundle, ATLAS)
    assert WRONG not in error_text(exc.value)
    with pytest.raises(PushError, match="cannot write") as exc:
        HubRegistry(hub.endpoint, READER).publish(bundle, ATLAS)
    assert READER not in error_text(exc.value)
    assert (dict(hub.repo(ATLAS).tags), hub.repo(ATLAS).branches["main"]) == before


def test_unknown_versions_digests_and_atlases(hub, registry, pushed):
    with pytest.raises(VersionNotFound, match=r"Versions: 1, 2") as exc:
        registry.resolve(parse_ref(f"{ATLAS}@9"))
    assert exc.value.available == [1, 2]
    with pytest.raises(VersionNotFound):
        registry.resolve(parse_ref(f"{ATLAS}@sha256:{'0' * 64}"))
    HfApi(endpoint=hub.endpoint, token=TOKEN).create_repo("org/empty")
    with pytest.raises(ReferenceNotFound, match="org/atlas"):  # lists what exists
        registry.resolve(parse_ref("org/empty"))
    # The Hub answers alike for a missing repo and a private one: "not found or no access".
    with pytest.raises(RegistryAccessError):
        registry.resolve(parse_ref("org/nothing"))


def test_list_atlases_shows_what_the_token_can_read(hub, registry, pushed, make_bundle):
    HubRegistry(hub.endpoint, TOKEN, private=True).publish(make_bundle()[0], "org/secret")
    assert registry.list_atlases() == [ATLAS, "org/secret"]
    assert HubRegistry(hub.endpoint).list_atlases() == [ATLAS]


# --- races ----------------------------------------------------------------------------------


def test_two_concurrent_pushers_get_distinct_versions(hub, registry, make_bundle):
    registry.publish(make_bundle(description="base")[0], ATLAS)
    bundles = {d: make_bundle(seed=i, description=d)[0] for i, d in enumerate("AB", start=1)}
    hub.state.hold_commits(2)  # both commits arrive before either lands: one must lose
    results: dict[str, VersionInfo | BaseException] = {}

    def push(description: str) -> None:
        try:
            results[description] = HubRegistry(hub.endpoint, TOKEN).publish(
                bundles[description], ATLAS
            )
        except BaseException as err:  # reported by the assertion below
            results[description] = err

    threads = [threading.Thread(target=push, args=(d,)) for d in bundles]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert all(isinstance(r, VersionInfo) for r in results.values()), results
    assert sorted(r.version for r in results.values()) == [2, 3]
    assert hub.state.refusals["parent-commit"] >= 1
    assert sorted(hub.repo(ATLAS).tags) == ["v1", "v2", "v3"]
    for description, info in results.items():
        manifest = manifest_at(hub, f"v{info.version}")
        assert (manifest.version, manifest.description) == (info.version, description)
    assert manifest_at(hub, "v1").description == "base"


def test_a_tag_claimed_by_another_push_makes_this_one_take_the_next(hub, registry, make_bundle):
    v1 = registry.publish(make_bundle()[0], ATLAS)
    repo, v1_commit = hub.repo(ATLAS), hub.repo(ATLAS).tags["v1"]

    def claim_v2_once(repo_id: str, commit: str) -> None:
        if "v2" not in repo.tags:
            hub.state.tag(repo, v1_commit, "v2")  # another pusher tags v2 first

    hub.state.on_commit = claim_v2_once
    info = registry.publish(make_bundle(seed=5, description="late")[0], ATLAS)
    assert (info.version, hub.state.refusals["tag-exists"]) == (3, 1)
    assert repo.tags["v2"] == v1_commit  # the other push's tag is untouched
    assert manifest_at(hub, "v3").description == "late"
    assert registry.resolve(parse_ref(f"{ATLAS}@1")) == v1


def test_a_push_that_keeps_losing_gives_up_cleanly(hub, registry, make_bundle):
    registry.publish(make_bundle()[0], ATLAS)
    repo = hub.repo(ATLAS)

    def always_claim_next(repo_id: str, commit: str) -> None:
        number = max(int(t[1:]) for t in repo.tags) + 1
        hub.state.tag(repo, repo.tags["v1"], f"v{number}")

    hub.state.on_commit = always_claim_next
    with pytest.raises(PushError, match="claimed"):
        registry.publish(make_bundle(seed=2)[0], ATLAS)
    assert hub.state.refusals["tag-exists"] == MAX_PUSH_ATTEMPTS
    assert set(repo.tags.values()) == {repo.tags["v1"]}  # no tag points at this push


def test_an_explicit_version_that_exists_is_refused(hub, registry, pushed, make_bundle):
    with pytest.raises(VersionExistsError):
        registry.publish(make_bundle(seed=4)[0], ATLAS, version=2)
    assert sorted(hub.repo(ATLAS).tags) == ["v1", "v2"]


# --- offline --------------------------------------------------------------------------------


def test_offline_pulls_cached_versions_and_refuses_latest(hub, registry, pushed, monkeypatch):
    v1, _ = pushed
    pull(f"{ATLAS}@1", registry)
    hub.stop()
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    offline = HubRegistry(hub.endpoint, TOKEN)
    assert offline.offline
    assert pull(f"{ATLAS}@1", offline).info == v1
    assert pull(f"{ATLAS}@sha256:{v1.digest}", offline).info == v1
    assert offline.list_versions(ATLAS) == [v1]
    with pytest.raises(RegistryOfflineError, match="Cached versions: 1") as exc:
        pull(ATLAS, offline)
    assert exc.value.cached == [1]
    with pytest.raises(RegistryOfflineError):
        pull(f"{ATLAS}@2", offline)  # never pulled
    # The cache's own offline switch works with the same registry too.
    assert pull(f"{ATLAS}@1", registry, offline=True).info == v1


def test_hf_hub_offline_is_honoured_while_the_server_is_up(
    hub, registry, pushed, make_bundle, monkeypatch
):
    """The server could answer: only HF_HUB_OFFLINE keeps every request from reaching it."""
    v1, v2 = pushed
    bundle = make_bundle(seed=9)[0]
    pull(f"{ATLAS}@1", registry)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    hub.requests.clear()
    for offline in (HubRegistry(hub.endpoint, TOKEN), get_registry(f"hf://{hub.endpoint}")):
        assert offline.offline
        assert pull(f"{ATLAS}@1", offline).info == v1
        assert pull(f"{ATLAS}@sha256:{v1.digest}", offline).info == v1
        assert offline.list_versions(ATLAS) == [v1]
        with pytest.raises(RegistryOfflineError, match="cannot resolve the latest") as exc:
            pull(ATLAS, offline)
        assert exc.value.cached == [1]
        assert "Cached versions: 1" in str(exc.value)
        with pytest.raises(RegistryOfflineError, match="not in the cache"):
            pull(f"{ATLAS}@2", offline)
        with pytest.raises(PushError, match="offline"):
            offline.publish(bundle, ATLAS)
    assert hub.requests == []
    monkeypatch.delenv("HF_HUB_OFFLINE")
    assert pull(ATLAS, HubRegistry(hub.endpoint, TOKEN)).info == v2  # it was up all along
    assert hub.requests


def test_an_unreachable_endpoint_still_serves_pinned_cached_versions(hub, registry, pushed):
    v1, _ = pushed
    pull(f"{ATLAS}@1", registry)
    hub.stop()
    again = HubRegistry(hub.endpoint, TOKEN)
    assert pull(f"{ATLAS}@1", again).info == v1
    with pytest.raises(RegistryOfflineError) as exc:
        pull(ATLAS, again)
    assert exc.value.cached == [1]


def test_listing_an_unreachable_endpoint_fails_at_once(hub, monkeypatch):
    """No retries with back-off (~23 s) when the endpoint does not answer at all."""
    import huggingface_hub.utils._http as hf_http

    hub.stop()

    waits: list[float] = []  # recorded, not raised: the listing turns any error into its own
    clock = types.SimpleNamespace(**{n: getattr(time, n) for n in dir(time) if n[0] != "_"})
    clock.sleep = waits.append  # the client's module alone, not the process's time.sleep
    monkeypatch.setattr(hf_http, "time", clock)
    with pytest.raises(RegistryError, match="could not list the atlases") as exc:
        HubRegistry(hub.endpoint).list_atlases()
    assert "HF_ENDPOINT" in (exc.value.hint or "")
    assert waits == []  # no retries with back-off


# --- selection ------------------------------------------------------------------------------


def test_selected_by_hf_url_or_endpoint_env(hub, monkeypatch):
    selected = get_registry(f"hf://{hub.endpoint}")
    assert isinstance(selected, HubRegistry)
    assert isinstance(selected, Registry)
    assert selected.location == hub.endpoint
    monkeypatch.setenv("HF_ENDPOINT", hub.endpoint + "/")
    assert HubRegistry().location == hub.endpoint


# --- the real Hub, opt-in -------------------------------------------------------------------


@pytest.mark.live_hub
@pytest.mark.skipif(not LIVE, reason="set HUBARCHES_LIVE_HUB=1 and HF_TOKEN to run")
def test_live_hub_round_trip(make_bundle):
    registry = HubRegistry(token=LIVE_TOKEN, private=True)  # the client's default endpoint
    user = HfApi(token=LIVE_TOKEN).whoami()["name"]
    name = f"{user}/hubarches-live-test-{uuid.uuid4().hex[:8]}"
    try:
        info = registry.publish(make_bundle()[0], name)
        assert info.version == 1
        assert pull(name, registry).info == info
    finally:
        HfApi(token=LIVE_TOKEN).delete_repo(name, missing_ok=True)
