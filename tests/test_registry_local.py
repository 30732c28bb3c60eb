from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
import types
from pathlib import Path

import pytest
from test_bundle import BAD_MANIFESTS, pickle_bytes, relist, snapshot, spoil_manifest

import hubarches
from hubarches.bundle import (
    CARD_FILE,
    EMBEDDING_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    make_temp_dir,
    verify_bundle,
)
from hubarches.cache import pull
from hubarches.errors import (
    IntegrityError,
    PushError,
    ReferenceNotFound,
    ReferenceStringError,
    RegistryError,
    VersionExistsError,
    VersionNotFound,
    WeightsError,
)
from hubarches.registry import Registry, VersionInfo, parse_ref
from hubarches.registry.local import TEMP_DIR, LocalRegistry
from hubarches.registry.select import (
    default_registry_path,
    demo_registry_path,
    get_registry,
    parse_hf_endpoint,
)

REPO = Path(__file__).resolve().parents[1]
SUBPROCESS_TIMEOUT_S = 120


@pytest.fixture
def registry(tmp_path):
    return LocalRegistry(tmp_path / "reg")


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_publish_assigns_versions_and_stamps_them(registry, make_bundle):
    src, _ = make_bundle()
    infos = [registry.publish(src, "org/atlas") for _ in range(3)]
    assert [i.version for i in infos] == [1, 2, 3]
    assert len({i.digest for i in infos}) == 3
    assert isinstance(registry, Registry)
    for info in infos:
        path = registry.root / "org" / "atlas" / str(info.version)
        assert path == registry.version_path(info)
        m = verify_bundle(path, expected_digest=info.digest)
        assert (m.name, m.version) == ("org/atlas", info.version)
        assert f"org/atlas@{info.version}" in (path / CARD_FILE).read_text()
        assert (path / WEIGHTS_FILE).read_bytes() == (src / WEIGHTS_FILE).read_bytes()
    assert registry.list_versions("org/atlas") == infos
    assert registry.list_atlases() == ["org/atlas"]
    # A fresh instance (no memoized digests) sees the same.
    assert LocalRegistry(registry.root).list_versions("org/atlas") == infos


def test_resolve(registry, make_bundle):
    src, _ = make_bundle()
    v1 = registry.publish(src, "org/atlas")
    v2 = registry.publish(src, "org/atlas")
    registry.publish(src, "org/other")
    assert registry.resolve(parse_ref("org/atlas")) == v2
    assert registry.resolve(parse_ref("org/atlas@1")) == v1
    assert registry.resolve(parse_ref(f"org/atlas@sha256:{v1.digest}")) == v1
    assert registry.list_atlases() == ["org/atlas", "org/other"]


def test_a_damaged_version_does_not_hide_the_others_from_a_digest_lookup(registry, make_bundle):
    src, _ = make_bundle()
    v1 = registry.publish(src, "org/atlas")
    v2 = registry.publish(src, "org/atlas")
    v3 = registry.publish(src, "org/atlas")
    manifest = registry.version_path(v2) / "manifest.json"
    manifest.chmod(0o644)
    manifest.write_text("{ not json")
    assert registry.resolve(parse_ref(f"org/atlas@sha256:{v1.digest}")) == v1
    assert registry.resolve(parse_ref(f"org/atlas@sha256:{v3.digest}")) == v3
    with pytest.raises(VersionNotFound):
        registry.resolve(parse_ref(f"org/atlas@sha256:{'0' * 64}"))


def test_unknown_atlas_lists_what_exists(registry, make_bundle):
    src, _ = make_bundle()
    registry.publish(src, "org/atlas")
    with pytest.raises(ReferenceNotFound, match="org/atlas") as info:
        registry.resolve(parse_ref("org/missing"))
    assert info.value.available == ["org/atlas"]
    with pytest.raises(ReferenceNotFound):
        registry.list_versions("org/missing")
    with pytest.raises(ReferenceNotFound, match="none"):
        LocalRegistry(registry.root / "empty").resolve(parse_ref("org/atlas"))


def test_unknown_version_lists_the_versions(registry, make_bundle):
    src, _ = make_bundle()
    registry.publish(src, "org/atlas")
    registry.publish(src, "org/atlas")
    with pytest.raises(VersionNotFound, match="Versions: 1, 2") as info:
        registry.resolve(parse_ref("org/atlas@7"))
    assert info.value.available == [1, 2]
    with pytest.raises(VersionNotFound, match="sha256:"):
        registry.resolve(parse_ref("org/atlas@sha256:" + "0" * 64))
    with pytest.raises(VersionNotFound):
        registry.fetch(VersionInfo("org/atlas", 9, "0" * 64), registry.root / "x")


@pytest.mark.parametrize("ref", ["", "atlas", "org/", "org/a/b", "org/a@0", "org/a@x", "../a/b"])
def test_malformed_references(ref):
    with pytest.raises(ReferenceStringError):
        parse_ref(ref)


def test_bad_names_are_refused(registry, make_bundle):
    src, _ = make_bundle()
    with pytest.raises(ReferenceStringError):
        registry.publish(src, "../escape")
    with pytest.raises(ReferenceStringError):
        registry.list_versions("org/..")
    assert not registry.root.exists() or not any(registry.root.glob("*/*/*"))


def test_pushing_to_an_existing_version_is_refused(registry, make_bundle):
    src, _ = make_bundle()
    registry.publish(src, "org/atlas")
    before = _tree(registry.root / "org")
    with pytest.raises(VersionExistsError, match="never change"):
        registry.publish(src, "org/atlas", version=1)
    assert _tree(registry.root / "org") == before
    assert registry.publish(src, "org/atlas", version=5).version == 5
    assert registry.publish(src, "org/atlas").version == 6
    assert not (registry.root / TEMP_DIR).exists()  # work in progress leaves nothing


def test_explicit_version_race_is_version_exists(registry, make_bundle, monkeypatch):
    """The rename itself detects a version that appeared after the up-front check."""
    src, _ = make_bundle()
    other = registry.publish(src, "org/atlas")
    monkeypatch.setattr(registry, "_numbers", lambda name: {})
    with pytest.raises(VersionExistsError):
        registry.publish(src, "org/atlas", version=other.version)
    monkeypatch.undo()
    assert registry.list_versions("org/atlas") == [other]
    verify_bundle(registry.version_path(other), expected_digest=other.digest)
    assert not (registry.root / TEMP_DIR).exists()  # work in progress leaves nothing


def test_push_of_a_tampered_bundle_writes_nothing(registry, make_bundle):
    src, _ = make_bundle()
    data = bytearray((src / WEIGHTS_FILE).read_bytes())
    data[-1] ^= 1
    (src / WEIGHTS_FILE).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match=WEIGHTS_FILE):
        registry.publish(src, "org/atlas")
    assert registry.list_atlases() == []
    assert not (registry.root / TEMP_DIR).exists()  # work in progress leaves nothing


def test_listing_ignores_temp_dirs_and_strays(registry, make_bundle):
    src, _ = make_bundle()
    info = registry.publish(src, "org/atlas")
    atlas = registry.root / "org" / "atlas"
    make_temp_dir(registry.root / TEMP_DIR, prefix="push")
    (atlas / ".2.tmp-x").mkdir()
    (atlas / "02").mkdir()
    (atlas / "3").mkdir()  # no manifest: not a version
    (atlas / "notes.txt").write_text("hi")
    (registry.root / ".hidden" / "atlas" / "1").mkdir(parents=True)
    assert registry.list_versions("org/atlas") == [info]
    assert registry.list_atlases() == ["org/atlas"]
    # A directory blocking a number is skipped, not retried forever.
    (atlas / "2").mkdir()
    (atlas / "2" / "junk").write_text("x")
    assert registry.publish(src, "org/atlas").version == 3


def test_fetch_copies_the_bundle(registry, make_bundle, tmp_path):
    src, _ = make_bundle()
    info = registry.publish(src, "org/atlas")
    dest = tmp_path / "fetched"
    registry.fetch(info, dest)
    assert _tree(dest) == _tree(registry.version_path(info))
    assert verify_bundle(dest, expected_digest=info.digest).version == 1


def test_read_only_fallback(tmp_path, make_bundle):
    src, _ = make_bundle()
    demo_root = tmp_path / "demo"
    demo_info = LocalRegistry(demo_root).publish(src, "demo/atlas")
    demo = LocalRegistry(demo_root, read_only=True)
    with pytest.raises(PushError, match="read-only"):
        demo.publish(src, "demo/atlas")
    before = _tree(demo_root)
    reg = LocalRegistry(tmp_path / "mine", fallback=demo)
    assert reg.list_atlases() == ["demo/atlas"]
    assert reg.resolve(parse_ref("demo/atlas")) == demo_info
    reg.fetch(demo_info, tmp_path / "f")
    verify_bundle(tmp_path / "f", expected_digest=demo_info.digest)
    # A push goes to the primary, numbered after the fallback's versions.
    mine = reg.publish(src, "demo/atlas")
    assert mine.version == 2
    assert (tmp_path / "mine" / "demo" / "atlas" / "2" / MANIFEST_FILE).is_file()
    assert reg.list_versions("demo/atlas") == [demo_info, mine]
    assert reg.resolve(parse_ref("demo/atlas")) == mine
    with pytest.raises(VersionExistsError):
        reg.publish(src, "demo/atlas", version=1)
    assert _tree(demo_root) == before
    assert "demo" in reg.location


# --- choosing a registry ----------------------------------------------------------------------


def test_get_registry_refuses_a_file(tmp_path, monkeypatch):
    """A file would read as an empty registry and fail only on push: refused at once."""
    plain = tmp_path / "registry.txt"
    plain.write_text("not a registry")
    with pytest.raises(RegistryError, match="is a file, not a directory"):
        get_registry(plain)
    monkeypatch.setenv("HUBARCHES_REGISTRY", str(plain))
    with pytest.raises(RegistryError, match="is a file, not a directory"):
        get_registry()
    assert plain.read_text() == "not a registry"


def test_get_registry_from_argument_env_and_default(tmp_path, isolated_env, monkeypatch):
    reg = get_registry(tmp_path / "x")
    assert isinstance(reg, LocalRegistry)
    assert reg.root == tmp_path / "x"
    assert reg.fallback is not None
    assert reg.fallback.read_only
    assert reg.fallback.root == REPO / "registry"
    assert get_registry(str(tmp_path / "y")).root == tmp_path / "y"
    assert get_registry().root == isolated_env.registry
    monkeypatch.delenv("HUBARCHES_REGISTRY")
    assert get_registry().root == isolated_env.data_home / "hubarches" / "registry"
    monkeypatch.delenv("XDG_DATA_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    expected = tmp_path / "home" / ".local" / "share" / "hubarches" / "registry"
    assert default_registry_path() == expected
    assert get_registry().root == expected
    assert get_registry(reg) is reg
    with pytest.raises(TypeError):
        get_registry(3)  # type: ignore[arg-type]


def test_naming_the_demo_folder_gives_it_without_fallback():
    reg = get_registry(REPO / "registry")
    assert reg.fallback is None
    assert not reg.read_only


@pytest.fixture
def fake_hub(monkeypatch):
    created = []

    class HubRegistry:
        def __init__(self, endpoint=None):
            self.endpoint = endpoint
            created.append(self)

    module = types.ModuleType("hubarches.registry.hf")
    module.HubRegistry = HubRegistry
    monkeypatch.setitem(sys.modules, "hubarches.registry.hf", module)
    return created


@pytest.mark.parametrize(
    ("value", "endpoint"),
    [
        ("hf", None),
        ("hf://", None),
        ("hf://hub.example.org", "https://hub.example.org"),
        ("hf://http://127.0.0.1:8080/", "http://127.0.0.1:8080"),
    ],
)
def test_get_registry_hf(fake_hub, monkeypatch, value, endpoint):
    assert parse_hf_endpoint(value) == endpoint
    reg = get_registry(value)
    assert reg is fake_hub[-1]
    assert reg.endpoint == endpoint
    monkeypatch.setenv("HUBARCHES_REGISTRY", value)
    assert get_registry() is fake_hub[-1]
    assert len(fake_hub) == 2


@pytest.mark.parametrize("with_init", [False, True])
def test_demo_registry_found_as_installed_package_data(tmp_path, monkeypatch, with_init):
    """After a non-editable install the demo atlases are package data of hubarches."""
    installed = tmp_path / "site" / "hubarches" / "demo_registry"
    installed.mkdir(parents=True)
    if with_init:
        (installed / "__init__.py").write_text("")
    monkeypatch.setattr(hubarches, "__path__", [*hubarches.__path__, str(installed.parent)])
    sys.modules.pop("hubarches.demo_registry", None)
    try:
        assert demo_registry_path() == installed
    finally:
        sys.modules.pop("hubarches.demo_registry", None)
    monkeypatch.undo()
    assert demo_registry_path() == REPO / "registry"  # the source checkout's folder


# --- concurrency and crashes ------------------------------------------------------------------

_PUSHER = """
import sys, time
from pathlib import Path
from hubarches.registry.local import LocalRegistry
root, bundle, go, n = sys.argv[1:5]
while not Path(go).exists():
    time.sleep(0.005)
registry = LocalRegistry(root)
for _ in range(int(n)):
    info = registry.publish(Path(bundle), "org/atlas")
    print(info.version, info.digest, flush=True)
"""

_KILLED_PUSHER = """
import sys, time
from pathlib import Path
import hubarches.bundle as bundle
from hubarches.registry.local import LocalRegistry
root, src, ready = sys.argv[1:4]

def copy_half_then_hang(source, dest, name, expected):
    data = source.read_bytes()
    with dest.open("wb") as fh:
        fh.write(data[: len(data) // 2])
        fh.flush()
    Path(ready).touch()
    time.sleep(600)

bundle._copy_verified = copy_half_then_hang
LocalRegistry(root).publish(Path(src), "org/atlas")
"""


def _python(code: str, *args: object) -> subprocess.Popen[str]:
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]),
    }
    return subprocess.Popen(
        [sys.executable, "-c", code, *map(str, args)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_concurrent_pushes_get_distinct_versions(registry, make_bundle, tmp_path):
    src, _ = make_bundle()
    go = tmp_path / "go"
    n_procs, n_each = 8, 5
    procs = [_python(_PUSHER, registry.root, src, go, n_each) for _ in range(n_procs)]
    go.touch()
    pushed = []
    for proc in procs:
        out, err = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        assert proc.returncode == 0, err
        pushed += [
            VersionInfo("org/atlas", int(v), d) for v, d in map(str.split, out.split("\n")[:-1])
        ]
    assert sorted(i.version for i in pushed) == list(range(1, n_procs * n_each + 1))
    listed = registry.list_versions("org/atlas")
    assert listed == sorted(pushed, key=lambda i: i.version)
    for info in listed:
        m = verify_bundle(registry.version_path(info), expected_digest=info.digest)
        assert m.version == info.version
    assert not (registry.root / TEMP_DIR).exists()  # work in progress leaves nothing


def test_push_killed_midway_leaves_no_version(registry, make_bundle, tmp_path):
    src, _ = make_bundle()
    first = registry.publish(src, "org/atlas")
    ready = tmp_path / "ready"
    proc = _python(_KILLED_PUSHER, registry.root, src, ready)
    deadline = time.monotonic() + SUBPROCESS_TIMEOUT_S
    while not ready.exists():
        assert proc.poll() is None, proc.communicate()[1]
        assert time.monotonic() < deadline, "the pusher never started writing"
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
    leftovers = list((registry.root / TEMP_DIR).iterdir())
    assert len(leftovers) == 1  # the half-written version, invisible
    assert registry.list_versions("org/atlas") == [first]
    assert not (registry.root / "org" / "atlas" / "2").exists()
    second = registry.publish(src, "org/atlas")
    assert second.version == 2
    verify_bundle(registry.version_path(second), expected_digest=second.digest)
    assert not leftovers[0].exists()  # its writer is dead: cleaned up by the next push


# --- bundles that must never be published or cached -------------------------------------------


def _relisted_pickle(src: Path, marker: Path, filename: str = WEIGHTS_FILE) -> None:
    """Put a live pickle where a safetensors file belongs, and relist it (right sha256)."""
    (src / filename).write_bytes(pickle_bytes(marker))
    relist(src, filename)


@pytest.mark.parametrize("filename", [WEIGHTS_FILE, EMBEDDING_FILE])
def test_push_of_a_relisted_pickle_writes_nothing(registry, make_bundle, tmp_path, filename):
    src, _ = make_bundle()
    if filename == EMBEDDING_FILE:  # add an embedding file to the bundle first
        (src / EMBEDDING_FILE).write_bytes((src / WEIGHTS_FILE).read_bytes())
        relist(src, EMBEDDING_FILE)
    marker = tmp_path / "UNPICKLED"
    _relisted_pickle(src, marker, filename)
    with pytest.raises(WeightsError, match=f"{filename} is not a safetensors file"):
        registry.publish(src, "org/atlas")
    with pytest.raises(WeightsError, match="never unpickles"):
        hubarches.push(src, "org/atlas", registry=registry)
    assert snapshot(registry.root) == []  # no version, no temp dir, not even the root
    other = make_bundle(seed=1)[0]
    registry.publish(other, "org/atlas")
    before = snapshot(registry.root)
    with pytest.raises(WeightsError):
        registry.publish(src, "org/atlas")
    assert snapshot(registry.root) == before
    assert [i.version for i in registry.list_versions("org/atlas")] == [1]
    assert not marker.exists()


def test_push_refuses_weights_that_do_not_fit_the_manifest(registry, make_bundle):
    """hubarches.push loads the weights strictly into the architecture the manifest gives."""
    src, _ = make_bundle()  # safetensors, but of made-up tensors
    with pytest.raises(WeightsError, match="do not match the architecture") as info:
        hubarches.push(src, "org/atlas", registry=registry)
    assert "encoder.weight" in info.value.unexpected
    assert snapshot(registry.root) == []


@pytest.mark.parametrize("kind", sorted(BAD_MANIFESTS))
def test_bad_manifests_are_never_pushed_pulled_or_loaded(registry, make_bundle, isolated_env, kind):
    src, _ = make_bundle()
    good = registry.publish(src, "org/atlas")
    error, pattern = spoil_manifest(src, kind)
    before = snapshot(registry.root), snapshot(isolated_env.cache)
    with pytest.raises(error, match=pattern):
        registry.publish(src, "org/atlas")
    with pytest.raises(error, match=pattern):
        hubarches.push(src, "org/atlas", registry=registry)
    with pytest.raises(error, match=pattern):
        hubarches.load_reference(src)
    assert (snapshot(registry.root), snapshot(isolated_env.cache)) == before
    # The same manifest planted into the registry, bypassing push, is never pulled.
    planted = registry.root / "org" / "planted" / "1"
    shutil.copytree(registry.version_path(good), planted)
    spoil_manifest(planted, kind)
    before = snapshot(registry.root), snapshot(isolated_env.cache)
    for ref in ("org/planted", "org/planted@1"):
        with pytest.raises(error, match=pattern):
            pull(ref, registry)
        with pytest.raises(error, match=pattern):
            hubarches.load_reference(ref, registry)
    assert (snapshot(registry.root), snapshot(isolated_env.cache)) == before
