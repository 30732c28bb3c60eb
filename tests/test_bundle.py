from __future__ import annotations

import builtins
import json
import os
import pickle
import stat
from pathlib import Path

import pytest
import torch

from hubarches.bundle import (
    CARD_FILE,
    EMBEDDING_FILE,
    MANIFEST_FILE,
    WEIGHTS_FILE,
    check_publishable,
    check_tensor_files,
    clean_stale_temp_dirs,
    copy_payload,
    file_entry,
    make_temp_dir,
    read_bundle_manifest,
    read_tensors,
    restamp_bundle,
    verify_bundle,
    write_bundle,
)
from hubarches.cards import CARD_TEMPLATE, render_card
from hubarches.errors import (
    BundleError,
    IntegrityError,
    ManifestError,
    ManifestVersionError,
    WeightsError,
)
from hubarches.manifest import (
    SCHEMA_VERSION,
    Lineage,
    ParentRef,
    TrainingSummary,
    manifest_digest,
    manifest_json,
    read_manifest,
)

REPO = Path(__file__).resolve().parents[1]


def _weights(seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {
        "encoder.weight": torch.randn(8, 6, generator=gen),
        "encoder.bias": torch.randn(8, generator=gen),
        "codes": torch.arange(5, dtype=torch.int64),
    }


def relist(bundle: Path, filename: str, **changes: object) -> None:
    """Rewrite the manifest so it lists ``filename``'s current bytes (a consistent forgery).

    ``changes`` replace other manifest fields too (e.g. ``version`` for a planted version).
    """
    m = read_manifest(bundle / MANIFEST_FILE)
    files = {**m.files, filename: file_entry(bundle / filename)}
    forged = m.model_copy(update={**changes, "files": files})
    (bundle / MANIFEST_FILE).write_text(manifest_json(forged))


# A manifest each reader must refuse: kind → (edit of its JSON, error type, message pattern).
BAD_MANIFESTS = {
    "newer-schema": (
        lambda d: d.update(schema_version=SCHEMA_VERSION + 1),
        ManifestVersionError,
        "Upgrade hubarches",
    ),
    "unknown-field": (lambda d: d.update(surprise=1), ManifestError, "surprise"),
    "unknown-nested-field": (lambda d: d["model"].update(surprise=1), ManifestError, "surprise"),
    "dotdot-file": (lambda d: _list_as(d, "../x"), ManifestError, "not a plain file name"),
    "absolute-file": (lambda d: _list_as(d, "/abs"), ManifestError, "not a plain file name"),
    "nested-file": (lambda d: _list_as(d, "a/b"), ManifestError, "not a plain file name"),
}


def _list_as(data: dict, name: str) -> None:
    data["files"][name] = data["files"][WEIGHTS_FILE]


def spoil_manifest(bundle: Path, kind: str) -> tuple[type[Exception], str]:
    """Edit a bundle's manifest into a BAD_MANIFESTS kind; returns (error type, pattern)."""
    edit, error, pattern = BAD_MANIFESTS[kind]
    data = json.loads((bundle / MANIFEST_FILE).read_text())
    edit(data)
    (bundle / MANIFEST_FILE).write_text(json.dumps(data))
    return error, pattern


def snapshot(root: Path) -> list[str]:
    """Every path under ``root`` (directories too), to show that nothing was written."""
    if not root.exists():
        return []
    return sorted(str(p.relative_to(root)) for p in root.rglob("*"))


def test_write_verify_read_round_trip(tmp_path, make_manifest):
    weights = _weights()
    embedding = {"latent": torch.randn(20, 3), "labels": torch.zeros(20, dtype=torch.int64)}
    dest = tmp_path / "out" / "bundle"
    m = write_bundle(dest, make_manifest(), weights, embedding=embedding)
    assert sorted(p.name for p in dest.iterdir()) == sorted(
        [MANIFEST_FILE, WEIGHTS_FILE, CARD_FILE, EMBEDDING_FILE]
    )
    assert set(m.files) == {WEIGHTS_FILE, CARD_FILE, EMBEDDING_FILE}
    for name, entry in m.files.items():
        assert entry == file_entry(dest / name)
    assert verify_bundle(dest, expected_digest=manifest_digest(m)) == m
    loaded = read_tensors(dest, m)
    assert loaded.keys() == weights.keys()
    for k, v in weights.items():
        assert torch.equal(loaded[k], v)
        assert loaded[k].dtype == v.dtype
    emb = read_tensors(dest, m, EMBEDDING_FILE)
    assert torch.equal(emb["latent"], embedding["latent"])
    payload = {k: v for k, v in m.files.items() if k != CARD_FILE}
    assert (dest / CARD_FILE).read_text() == render_card(m.model_copy(update={"files": payload}))
    assert [p.name for p in (tmp_path / "out").iterdir()] == ["bundle"]  # no temp dir left


def test_loaded_tensors_do_not_depend_on_the_file(tmp_path, make_manifest):
    m = write_bundle(tmp_path / "b", make_manifest(), _weights())
    loaded = read_tensors(tmp_path / "b", m)
    (tmp_path / "b" / WEIGHTS_FILE).write_bytes(b"\0" * m.files[WEIGHTS_FILE].size)
    assert torch.equal(loaded["encoder.weight"], _weights()["encoder.weight"])


def test_write_refuses_an_existing_destination(tmp_path, make_manifest):
    dest = tmp_path / "b"
    dest.mkdir()
    (dest / "keep.txt").write_text("mine")
    with pytest.raises(BundleError, match="exists already"):
        write_bundle(dest, make_manifest(), _weights())
    assert [p.name for p in dest.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["b"]


@pytest.mark.parametrize(
    "weights",
    [{}, {"w": [1.0, 2.0]}, {"a": torch.ones(4), "b": None}],
)
def test_bad_weights_write_nothing(tmp_path, make_manifest, weights):
    with pytest.raises(WeightsError):
        write_bundle(tmp_path / "b", make_manifest(), weights)
    assert list(tmp_path.iterdir()) == []


def test_shared_memory_tensors_are_a_weights_error(tmp_path, make_manifest):
    base = torch.randn(4, 4)
    with pytest.raises(WeightsError, match="cloned"):
        write_bundle(tmp_path / "b", make_manifest(), {"a": base, "b": base})
    assert list(tmp_path.iterdir()) == []


def test_non_contiguous_tensors_are_saved(tmp_path, make_manifest):
    t = torch.randn(4, 6).t()
    m = write_bundle(tmp_path / "b", make_manifest(), {"t": t})
    assert torch.equal(read_tensors(tmp_path / "b", m)["t"], t)


@pytest.fixture
def bundle(make_bundle):
    return make_bundle()


@pytest.mark.parametrize("filename", [WEIGHTS_FILE, CARD_FILE])
def test_tampered_file_is_named(bundle, filename):
    path, m = bundle
    data = bytearray((path / filename).read_bytes())
    data[len(data) // 2] ^= 0xFF
    (path / filename).write_bytes(bytes(data))
    with pytest.raises(IntegrityError, match="sha256") as info:
        verify_bundle(path)
    assert info.value.filename == filename
    assert filename in str(info.value)
    if filename == WEIGHTS_FILE:
        with pytest.raises(IntegrityError, match=filename):
            read_tensors(path, m)


def test_truncated_file_is_a_size_mismatch(bundle):
    path, m = bundle
    data = (path / WEIGHTS_FILE).read_bytes()
    (path / WEIGHTS_FILE).write_bytes(data[:-10])
    with pytest.raises(IntegrityError, match="bytes where the manifest lists") as info:
        verify_bundle(path)
    assert info.value.filename == WEIGHTS_FILE
    with pytest.raises(IntegrityError, match="size"):
        read_tensors(path, m, verify=False)


@pytest.mark.parametrize("filename", [WEIGHTS_FILE, CARD_FILE, MANIFEST_FILE])
def test_missing_file(bundle, filename):
    path, _ = bundle
    (path / filename).unlink()
    with pytest.raises(IntegrityError, match="missing") as info:
        verify_bundle(path)
    assert info.value.filename == filename


def test_missing_bundle_directory(tmp_path):
    with pytest.raises(IntegrityError, match="no bundle directory"):
        verify_bundle(tmp_path / "nowhere")


def test_symlinked_file_is_refused(bundle, tmp_path):
    path, _ = bundle
    outside = tmp_path / "elsewhere.safetensors"
    (path / WEIGHTS_FILE).rename(outside)
    (path / WEIGHTS_FILE).symlink_to(outside)
    with pytest.raises(IntegrityError, match="not a regular file"):
        verify_bundle(path)


def test_expected_digest_mismatch_names_the_manifest(bundle):
    path, m = bundle
    assert verify_bundle(path, expected_digest=manifest_digest(m)) == m
    with pytest.raises(IntegrityError, match="digest") as info:
        verify_bundle(path, expected_digest="0" * 64)
    assert info.value.filename == MANIFEST_FILE


def test_edited_manifest_changes_the_digest(bundle):
    path, m = bundle
    data = json.loads((path / MANIFEST_FILE).read_text())
    data["description"] = "edited by hand"
    (path / MANIFEST_FILE).write_text(json.dumps(data))
    verify_bundle(path)  # still self-consistent ...
    with pytest.raises(IntegrityError, match=MANIFEST_FILE):  # ... but not the pinned version
        verify_bundle(path, expected_digest=manifest_digest(m))


@pytest.mark.parametrize("unlisted", [WEIGHTS_FILE, CARD_FILE])
def test_manifest_must_list_weights_and_card(bundle, unlisted):
    path, m = bundle
    files = {k: v for k, v in m.files.items() if k != unlisted}
    (path / MANIFEST_FILE).write_text(manifest_json(m.model_copy(update={"files": files})))
    with pytest.raises(ManifestError, match=unlisted):
        verify_bundle(path)


def test_path_traversal_in_manifest_is_refused(bundle, tmp_path):
    path, _ = bundle
    secret = tmp_path / "secret.txt"
    secret.write_text("do not read")
    data = json.loads((path / MANIFEST_FILE).read_text())
    data["files"]["../secret.txt"] = file_entry(secret).model_dump()
    (path / MANIFEST_FILE).write_text(json.dumps(data))
    with pytest.raises(ManifestError, match="secret"):
        verify_bundle(path)


class PicklePayload:
    """Unpickling this calls open(marker, "w"): the marker appears iff it was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (builtins.open, (str(self.marker), "w"))


def pickle_bytes(marker: Path) -> bytes:
    return pickle.dumps({"encoder.weight": PicklePayload(marker)})


def torch_zip_bytes(marker: Path, tmp_path: Path) -> bytes:
    out = tmp_path / "ckpt.pt"
    torch.save({"encoder.weight": PicklePayload(marker)}, out)
    return out.read_bytes()


def test_payloads_are_live(tmp_path):
    """The payloads below really run code when unpickled (so the next test means something)."""
    marker = tmp_path / "proof"
    pickle.loads(pickle_bytes(marker))
    assert marker.exists()
    marker2 = tmp_path / "proof2"
    (tmp_path / "x.pt").write_bytes(torch_zip_bytes(marker2, tmp_path))
    torch.load(tmp_path / "x.pt", weights_only=False)
    assert marker2.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch.save"])
@pytest.mark.parametrize("relisted", [False, True])
def test_pickle_in_place_of_weights_is_never_unpickled(bundle, tmp_path, kind, relisted):
    path, m = bundle
    marker = tmp_path / "UNPICKLED"
    payload = pickle_bytes(marker) if kind == "pickle" else torch_zip_bytes(marker, tmp_path)
    (path / WEIGHTS_FILE).write_bytes(payload)
    if relisted:  # the hash is right: only the format check stands between us and pickle
        relist(path, WEIGHTS_FILE)
        m = verify_bundle(path)
        with pytest.raises(WeightsError, match="not a safetensors file"):
            read_tensors(path, m)
        with pytest.raises(WeightsError, match=f"{WEIGHTS_FILE} is not a safetensors file"):
            check_tensor_files(path, m)
        with pytest.raises(WeightsError, match="never unpickles"):
            check_publishable(path)
        dest = tmp_path / "out" / "stamped"
        with pytest.raises(WeightsError):
            restamp_bundle(path, dest, name="org/atlas", version=1)
        assert snapshot(tmp_path / "out") == []  # neither the bundle nor a temp dir
    else:
        with pytest.raises(IntegrityError):
            verify_bundle(path)
        with pytest.raises(IntegrityError):
            read_tensors(path, m)
    assert not marker.exists()


@pytest.mark.parametrize(
    "content",
    [
        b"",
        b"short",
        b'\x10\x00\x00\x00\x00\x00\x00\x00{"a": 1}',  # header longer than the file
        b'\x08\x00\x00\x00\x00\x00\x00\x00{"a": 1}',  # parses, but is no tensor table
        b"\xff" * 8 + b"{}",
    ],
)
def test_garbage_weights_are_a_weights_error(bundle, content):
    path, _ = bundle
    (path / WEIGHTS_FILE).write_bytes(content)
    relist(path, WEIGHTS_FILE)
    m = verify_bundle(path)
    with pytest.raises(WeightsError):
        read_tensors(path, m)
    with pytest.raises(WeightsError, match=WEIGHTS_FILE):
        check_tensor_files(path, m)


def test_tensor_files_are_checked_from_their_header(bundle, tmp_path, make_manifest):
    path, m = bundle
    check_tensor_files(path, m)  # a real bundle passes
    dest = tmp_path / "with-embedding"
    m2 = write_bundle(dest, make_manifest(), _weights(), embedding={"latent": torch.ones(3, 2)})
    check_tensor_files(dest, m2)
    marker = tmp_path / "UNPICKLED"
    (dest / EMBEDDING_FILE).write_bytes(pickle_bytes(marker))
    relist(dest, EMBEDDING_FILE)
    with pytest.raises(WeightsError, match=f"{EMBEDDING_FILE} is not a safetensors file"):
        check_tensor_files(dest, verify_bundle(dest))
    assert not marker.exists()
    # Checked against the listed size (cheaply, without hashing), then the header.
    (path / WEIGHTS_FILE).write_bytes((path / WEIGHTS_FILE).read_bytes()[:-1])
    with pytest.raises(IntegrityError, match="bytes where the manifest lists"):
        check_tensor_files(path, m)


def test_copy_payload_checks_the_copied_tensor_files(bundle, tmp_path):
    """The copy is what gets published: a pickle in it is refused, hashes notwithstanding."""
    src, m = bundle
    marker = tmp_path / "UNPICKLED"
    dest = tmp_path / "copy"
    dest.mkdir()
    assert copy_payload(src, dest) == m
    (src / WEIGHTS_FILE).write_bytes(pickle_bytes(marker))
    relist(src, WEIGHTS_FILE)
    dest2 = tmp_path / "copy2"
    dest2.mkdir()
    with pytest.raises(WeightsError, match="Python pickle"):
        copy_payload(src, dest2)
    assert not marker.exists()


@pytest.mark.parametrize("kind", sorted(BAD_MANIFESTS))
def test_bad_manifests_are_refused_before_anything_is_written(bundle, tmp_path, kind):
    path, _ = bundle
    error, pattern = spoil_manifest(path, kind)
    for check in (verify_bundle, read_bundle_manifest, check_publishable):
        with pytest.raises(error, match=pattern):
            check(path)
    with pytest.raises(error, match=pattern):
        restamp_bundle(path, tmp_path / "out" / "stamped", name="org/atlas", version=1)
    assert snapshot(tmp_path / "out") == []


def test_read_tensors_of_an_unlisted_file(bundle):
    path, m = bundle
    with pytest.raises(IntegrityError, match="does not list"):
        read_tensors(path, m, EMBEDDING_FILE)


def test_restamp_bundle(bundle, tmp_path):
    src, m = bundle
    before = {p.name: p.read_bytes() for p in src.iterdir()}
    dest = tmp_path / "stamped"
    out = restamp_bundle(src, dest, name="org/atlas", version=4)
    assert (out.name, out.version, out.ref) == ("org/atlas", 4, "org/atlas@4")
    assert verify_bundle(dest, expected_digest=manifest_digest(out)) == out
    assert (dest / WEIGHTS_FILE).read_bytes() == before[WEIGHTS_FILE]
    card = (dest / CARD_FILE).read_text()
    assert "hubarches map org/atlas@4 query.h5ad --batch-key batch" in card
    assert out.files[CARD_FILE] != m.files[CARD_FILE]
    assert {p.name: p.read_bytes() for p in src.iterdir()} == before  # source untouched
    with pytest.raises(BundleError, match="exists already"):
        restamp_bundle(src, dest, name="org/atlas", version=5)
    with pytest.raises(ManifestError, match="name"):
        restamp_bundle(src, tmp_path / "bad", name="no slash", version=1)
    assert not (tmp_path / "bad").exists()


def test_restamp_refuses_a_tampered_source(bundle, tmp_path):
    src, _ = bundle
    (src / WEIGHTS_FILE).write_bytes(b"x" + (src / WEIGHTS_FILE).read_bytes()[1:])
    with pytest.raises(IntegrityError, match=WEIGHTS_FILE):
        restamp_bundle(src, tmp_path / "out", name="org/atlas", version=1)
    assert not (tmp_path / "out").exists()
    assert [p for p in tmp_path.iterdir() if "tmp" in p.name] == []


def test_card_content(make_manifest):
    m = make_manifest(
        batches=("b0", "b1", "q0"),
        name="org/pbmc",
        version=3,
        description="Blood atlas.",
        license="mit",
        citation="@article{x}",
        labels={"key": "cell_type", "categories": ("T", "B")},
        training=TrainingSummary(cells=500, epochs=20, seed=1, final_losses={"elbo": 3.25}),
        lineage=Lineage(
            parent=ParentRef(name="org/pbmc", version=2, digest="cd" * 32),
            added_categories={"batch": ("q0",)},
        ),
    )
    card = render_card(m)
    front, body = card.split("---\n", 2)[1:]
    assert 'license: "mit"' in front
    assert "library_name: hubarches" in front
    assert "- single-cell" in front
    assert "# org/pbmc (version 3)" in body
    assert "hubarches map org/pbmc@3 query.h5ad --batch-key batch" in body
    assert 'hubarches.load_reference("org/pbmc@3")' in body
    assert 'ref.map(adata, batch_key="batch")' in body
    assert "`org/pbmc@2`" in body
    assert "`q0`" in body
    assert "`cell_type`" in body
    assert "Cells: 500" in body
    assert "@article{x}" in body
    assert "$" not in card


def test_card_quotes_awkward_keys(make_manifest):
    m = make_manifest(batches=("a|b", "c"))
    m = m.model_copy(
        update={"covariates": (m.covariates[0].model_copy(update={"key": "my batch"}),)}
    )
    card = render_card(m)
    assert "--batch-key 'my batch'" in card
    assert 'batch_key="my batch"' in card
    assert "`a\\|b`" in card


def test_template_file_matches_the_package():
    """model_cards/template.md is a copy of hubarches.cards.CARD_TEMPLATE; fix by copying."""
    assert (REPO / "model_cards" / "template.md").read_text(encoding="utf-8") == CARD_TEMPLATE


def test_stale_temp_dirs_are_cleaned(tmp_path):
    fresh = make_temp_dir(tmp_path, prefix="push")  # our own pid: alive, kept
    dead = tmp_path / fresh.name.replace(f"-{os.getpid()}-", "-999999999-")
    dead.mkdir()
    unrelated = tmp_path / "keep"
    unrelated.mkdir()
    removed = clean_stale_temp_dirs(tmp_path)
    assert removed == [dead]
    assert fresh.exists()
    assert unrelated.exists()
    assert clean_stale_temp_dirs(tmp_path, max_age_s=-1) == [fresh]


def test_temp_dir_survives_its_parent_vanishing_during_mkdir(tmp_path, monkeypatch):
    """Another writer may create the temp root and remove it (empty) while we create it.

    Path.mkdir(exist_ok=True) then raises FileExistsError for a folder that is gone; seen
    as a failed concurrent push. make_temp_dir must try again instead.
    """
    parent = tmp_path / ".tmp"
    real_mkdir = Path.mkdir
    raced = []

    def racing_mkdir(self, *args, **kwargs):
        if self == parent and not raced:
            raced.append(self)
            raise FileExistsError(17, "File exists", str(self))  # made and removed meanwhile
        return real_mkdir(self, *args, **kwargs)

    monkeypatch.setattr(Path, "mkdir", racing_mkdir)
    made = make_temp_dir(parent, prefix="push")
    assert raced == [parent]
    assert made.is_dir()
    assert made.parent == parent


def test_temp_dir_under_a_file_is_refused(tmp_path):
    blocker = tmp_path / ".tmp"
    blocker.write_text("not a folder")
    with pytest.raises(NotADirectoryError):
        make_temp_dir(blocker, prefix="push")


def test_written_bundles_follow_the_umask_not_0700(tmp_path, make_manifest) -> None:
    """A shared registry's other users must be able to read published versions."""
    old = os.umask(0o022)
    try:
        dest = tmp_path / "bundle"
        write_bundle(dest, make_manifest(), {"w": torch.zeros(2)})
    finally:
        os.umask(old)
    assert stat.S_IMODE(dest.stat().st_mode) == 0o755
