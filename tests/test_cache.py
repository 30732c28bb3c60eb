from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from test_bundle import pickle_bytes, relist, snapshot

import hubarches
from hubarches.bundle import CARD_FILE, MANIFEST_FILE, WEIGHTS_FILE
from hubarches.cache import (
    BUNDLES_DIR,
    TEMP_DIR,
    cache_root,
    cached_bundle,
    cached_versions,
    pull,
)
from hubarches.errors import (
    HubarchesWarning,
    IntegrityError,
    ReferenceNotFound,
    ReferenceStringError,
    RegistryOfflineError,
    VersionNotFound,
    WeightsError,
)
from hubarches.registry import RefSpec, VersionInfo
from hubarches.registry.local import LocalRegistry


class FakeRemote:
    """A registry that is not local (as the Hub is): counts its calls, serves a local tree."""

    def __init__(self, inner: LocalRegistry, *, location: str = "https://hub.example") -> None:
        self.inner = inner
        self._location = location
        self.calls: list[str] = []
        self.corrupt: str | None = None  # a file to serve corrupted

    @property
    def location(self) -> str:
        return self._location

    def list_atlases(self) -> list[str]:
        return self.inner.list_atlases()

    def list_versions(self, name: str) -> list[VersionInfo]:
        return self.inner.list_versions(name)

    def resolve(self, spec: RefSpec) -> VersionInfo:
        self.calls.append("resolve")
        return self.inner.resolve(spec)

    def fetch(self, info: VersionInfo, dest: Path) -> None:
        self.calls.append("fetch")
        self.inner.fetch(info, dest)
        if self.corrupt:
            target = dest / self.corrupt
            data = target.read_bytes()
            target.write_bytes(data[:-1] + bytes([data[-1] ^ 1]))

    def publish(self, bundle_dir: Path, name: str) -> VersionInfo:
        return self.inner.publish(bundle_dir, name)


@pytest.fixture
def published(tmp_path, make_bundle):
    """A local registry with org/atlas@1 and @2."""
    registry = LocalRegistry(tmp_path / "reg")
    src, _ = make_bundle()
    infos = [registry.publish(src, "org/atlas") for _ in range(2)]
    return registry, infos


def _entries(root: Path) -> list[str]:
    return sorted(p.name for p in (root / BUNDLES_DIR).iterdir())


def test_pull_fetches_verifies_and_caches(published, isolated_env):
    registry, (v1, v2) = published
    pulled = pull("org/atlas", registry)
    assert pulled.info == v2
    assert pulled.path == isolated_env.cache / BUNDLES_DIR / v2.digest
    assert pulled.path == cached_bundle(v2.digest)
    assert pulled.manifest.ref == "org/atlas@2"
    for name in (MANIFEST_FILE, WEIGHTS_FILE, CARD_FILE):
        assert (pulled.path / name).read_bytes() == (registry.version_path(v2) / name).read_bytes()
    assert pull("org/atlas@1", registry).info == v1
    assert pull(f"org/atlas@sha256:{v1.digest}", registry).info == v1
    assert _entries(isolated_env.cache) == sorted([v1.digest, v2.digest])
    assert cached_versions("org/atlas", registry=registry) == [v1, v2]
    assert not (isolated_env.cache / TEMP_DIR).exists()  # work in progress leaves nothing


def test_pull_uses_the_cache(published, monkeypatch):
    registry, _ = published
    first = pull("org/atlas", registry)

    def no_fetch(*args, **kwargs):
        raise AssertionError("fetched although the cache had it")

    monkeypatch.setattr(LocalRegistry, "fetch", no_fetch)
    assert pull("org/atlas@2", registry) == first


def test_pull_with_registry_from_env(published, monkeypatch):
    registry, (_, v2) = published
    monkeypatch.setenv("HUBARCHES_REGISTRY", str(registry.root))
    assert pull("org/atlas").info == v2


@pytest.mark.parametrize("damage", ["flip", "truncate", "delete", "delete-manifest"])
def test_damaged_cache_entry_is_fetched_again(published, damage):
    registry, _ = published
    entry = pull("org/atlas", registry).path
    good = (entry / WEIGHTS_FILE).read_bytes()
    if damage == "flip":
        (entry / WEIGHTS_FILE).write_bytes(good[:-1] + bytes([good[-1] ^ 1]))
    elif damage == "truncate":
        (entry / WEIGHTS_FILE).write_bytes(good[:10])
    elif damage == "delete":
        (entry / WEIGHTS_FILE).unlink()
    else:
        (entry / MANIFEST_FILE).unlink()
    with pytest.warns(HubarchesWarning, match="fetching it again"):
        again = pull("org/atlas", registry)
    assert again.path == entry
    assert (entry / WEIGHTS_FILE).read_bytes() == good


def test_corrupt_download_is_refused_and_not_cached(published, isolated_env):
    registry, (_, v2) = published
    remote = FakeRemote(registry)
    remote.corrupt = WEIGHTS_FILE
    with pytest.raises(IntegrityError, match=WEIGHTS_FILE):
        pull("org/atlas", remote)
    root = isolated_env.cache
    assert not (root / BUNDLES_DIR / v2.digest).exists()
    assert not (root / TEMP_DIR).exists()  # work in progress leaves nothing
    assert cached_versions("org/atlas", registry=remote) == []


def test_a_version_changed_under_its_digest_is_refused(published, isolated_env):
    """The registry says one digest and serves another manifest: the digest check catches it."""
    registry, (v1, _) = published
    remote = FakeRemote(registry)
    lying = VersionInfo("org/atlas", 2, v1.digest)
    remote.resolve = lambda spec: lying  # type: ignore[method-assign]
    with pytest.raises(IntegrityError, match=MANIFEST_FILE):
        pull("org/atlas", remote)
    assert not (isolated_env.cache / BUNDLES_DIR / v1.digest).exists()


def test_wrong_identity_is_refused(published, tmp_path, make_bundle):
    """A bundle that verifies but is another atlas' version is not accepted under this name."""
    registry, (v1, _) = published
    remote = FakeRemote(registry)
    remote.resolve = lambda spec: VersionInfo("org/other", 1, v1.digest)  # type: ignore[method-assign]
    remote.fetch = lambda info, dest: registry.fetch(v1, dest)  # type: ignore[method-assign]
    with pytest.raises(IntegrityError, match="not org/other@1"):
        pull("org/other", remote)


def test_offline_uses_the_cache_only(published):
    registry, (v1, v2) = published
    remote = FakeRemote(registry)
    pull("org/atlas@1", remote)
    remote.calls.clear()
    assert pull("org/atlas@1", remote, offline=True).info == v1
    assert pull(f"org/atlas@sha256:{v1.digest}", remote, offline=True).info == v1
    assert remote.calls == []
    with pytest.raises(RegistryOfflineError, match="Cached versions: 1") as info:
        pull("org/atlas", remote, offline=True)
    assert info.value.cached == [1]
    with pytest.raises(RegistryOfflineError):
        pull("org/atlas@2", remote, offline=True)
    with pytest.raises(RegistryOfflineError):
        pull(f"org/atlas@sha256:{v2.digest}", remote, offline=True)
    assert remote.calls == []


def test_offline_refuses_a_damaged_entry_it_cannot_refetch(published):
    registry, _ = published
    remote = FakeRemote(registry)
    entry = pull("org/atlas@1", remote).path
    (entry / CARD_FILE).write_text("edited")
    with pytest.raises(IntegrityError, match=CARD_FILE):
        pull("org/atlas@1", remote, offline=True)
    assert remote.calls == ["resolve", "fetch"]


def test_offline_local_registry_still_resolves(published):
    registry, (_, v2) = published
    assert pull("org/atlas", registry, offline=True).info == v2


def test_cached_versions_are_per_registry(published):
    registry, (_, v2) = published
    a = FakeRemote(registry, location="https://a.example")
    b = FakeRemote(registry, location="https://b.example")
    pull("org/atlas@2", a)
    assert cached_versions("org/atlas", registry=a) == [v2]
    assert cached_versions("org/atlas", registry=b) == []
    assert cached_versions("org/unknown", registry=a) == []
    shutil.rmtree(cached_bundle(v2.digest))
    assert cached_versions("org/atlas", registry=a) == []  # index entry without its bundle


def test_bad_references(published):
    registry, _ = published
    with pytest.raises(ReferenceStringError):
        pull("not-a-ref", registry)
    with pytest.raises(ReferenceNotFound):
        pull("org/nothing", registry)
    with pytest.raises(VersionNotFound):
        pull("org/atlas@3", registry)
    with pytest.raises(ValueError, match="digest"):
        cached_bundle("abc")


def test_cache_root(isolated_env, monkeypatch, tmp_path):
    assert cache_root() == isolated_env.cache
    assert cache_root(tmp_path / "c") == tmp_path / "c"
    monkeypatch.delenv("HUBARCHES_CACHE")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_root() == tmp_path / "xdg" / "hubarches"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_root() == tmp_path / "home" / ".cache" / "hubarches"


def test_demo_atlases_are_pullable_through_the_default_registry(tmp_path, make_bundle, monkeypatch):
    """Reads fall through to the demo registry; the bundle lands in the cache."""
    import hubarches.registry.select as select

    demo_root = tmp_path / "demo"
    src, _ = make_bundle()
    info = LocalRegistry(demo_root).publish(src, "hubarches/demo")
    monkeypatch.setattr(select, "demo_registry_path", lambda: demo_root)
    pulled = pull("hubarches/demo")
    assert pulled.info == info
    assert pulled.manifest.name == "hubarches/demo"


@pytest.mark.parametrize("remote", [False, True])
def test_a_planted_pickle_is_never_cached(published, isolated_env, tmp_path, remote):
    """A version whose weights are a pickle relisted with its sha256, put there bypassing push."""
    registry, (v1, _) = published
    planted = registry.root / "org" / "atlas" / "3"
    shutil.copytree(registry.version_path(v1), planted)
    marker = tmp_path / "UNPICKLED"
    (planted / WEIGHTS_FILE).write_bytes(pickle_bytes(marker))
    relist(planted, WEIGHTS_FILE, version=3)
    source = FakeRemote(registry) if remote else registry
    before = snapshot(isolated_env.cache)
    for ref in ("org/atlas@3", "org/atlas"):
        with pytest.raises(WeightsError, match=f"{WEIGHTS_FILE} is not a safetensors file"):
            pull(ref, source)
        with pytest.raises(WeightsError, match="never unpickles"):
            hubarches.load_reference(ref, source)
    after = snapshot(isolated_env.cache)
    assert [p for p in after if p not in before] == []  # fetches left nothing behind
    assert not (isolated_env.cache / TEMP_DIR).exists()  # work in progress leaves nothing
    assert cached_versions("org/atlas", registry=source) == []
    assert not marker.exists()
