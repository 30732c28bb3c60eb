from __future__ import annotations

import dataclasses
import hashlib
import json
from datetime import datetime, timedelta, timezone

import pytest

from hubarches import manifest as manifest_mod
from hubarches.config import ModelConfig
from hubarches.errors import ManifestError, ManifestVersionError
from hubarches.manifest import (
    SCHEMA_VERSION,
    Lineage,
    Manifest,
    ModelSpec,
    ParentRef,
    TrainingSummary,
    canonical_json,
    json_schema,
    manifest_digest,
    manifest_json,
    migrate,
    parse_manifest,
    read_manifest,
)

DIGEST = "ab" * 32


def _data(manifest: Manifest) -> dict:
    return json.loads(manifest_json(manifest))


def _parse(data: dict) -> Manifest:
    return parse_manifest(json.dumps(data))


def test_round_trip_and_model_config(make_manifest):
    m = make_manifest(
        description="PBMC atlas",
        training=TrainingSummary(cells=100, epochs=5, seed=3, final_losses={"elbo": 1.5}),
    )
    again = parse_manifest(manifest_json(m))
    assert again == m
    assert manifest_digest(again) == manifest_digest(m)
    config = m.to_model_config()
    assert config == ModelConfig(n_genes=6, covariate_sizes=(2,), n_hidden=8)
    assert m.batch_key == "batch"
    assert m.ref is None


def test_model_spec_mirrors_model_config():
    """Every architecture setting of ModelConfig is in the manifest (sizes derive from lists)."""
    config_fields = {f.name for f in dataclasses.fields(ModelConfig)}
    assert set(ModelSpec.model_fields) == config_fields - {"n_genes", "covariate_sizes"} | {"kind"}


def test_from_model_config_checks_sizes():
    config = ModelConfig(n_genes=3, covariate_sizes=(2, 1))
    covs = {"batch": ["a", "b"], "tech": ["x"]}
    m = Manifest.from_model_config(config, genes=["A", "B", "C"], covariates=covs)
    assert m.to_model_config() == config
    with pytest.raises(ManifestError, match="3 genes but 2"):
        Manifest.from_model_config(config, genes=["A", "B"], covariates=covs)
    with pytest.raises(ManifestError, match="category counts"):
        Manifest.from_model_config(config, genes=["A", "B", "C"], covariates={"batch": ["a"]})
    with pytest.raises(ManifestError, match="description"):
        Manifest.from_model_config(config, genes=["A", "B", "C"], covariates=covs, description=3)


def test_canonical_json_and_digest(make_manifest):
    m = make_manifest()
    raw = canonical_json(m)
    assert raw == json.dumps(
        json.loads(raw), sort_keys=True, separators=(",", ":"), ensure_ascii=False
    ).encode("utf-8")
    assert manifest_digest(m) == hashlib.sha256(raw).hexdigest()
    other = make_manifest(description="changed")
    assert manifest_digest(other) != manifest_digest(m)
    # Whitespace and key order in the file do not change the digest.
    reordered = json.dumps(dict(reversed(list(_data(m).items()))), indent=7)
    assert manifest_digest(parse_manifest(reordered)) == manifest_digest(m)


def test_manifest_is_immutable(make_manifest):
    m = make_manifest()
    with pytest.raises(ValueError, match="frozen"):
        m.description = "x"


@pytest.mark.parametrize(
    "path",
    [
        ("surprise",),
        ("model", "surprise"),
        ("genes", "surprise"),
        ("covariates", 0, "surprise"),
    ],
)
def test_unknown_fields_are_refused(make_manifest, path):
    data = _data(make_manifest())
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = 1
    with pytest.raises(ManifestError, match="surprise"):
        _parse(data)


@pytest.mark.parametrize(
    ("path", "value"),
    [
        (("version",), "3"),
        (("version",), 0),
        (("model", "n_latent"), "10"),
        (("model", "n_latent"), 10.5),
        (("model", "dropout"), "0.1"),
        (("model", "encode_covariates"), "yes"),
        (("model", "likelihood"), "gaussian"),
        (("model", "kind"), "totalvi"),
        (("model", "n_layers"), 9),
        (("genes", "ids"), "G0"),
        (("genes", "id_type"), "entrez"),
        (("created",), 5),
        (("created",), "2024-01-01T00:00:00"),
        (("name",), "not a name"),
        (("files",), {"model.safetensors": {"sha256": "xyz", "size": 1}}),
        (("files",), {"model.safetensors": {"sha256": DIGEST, "size": -1}}),
        (("covariates",), []),
    ],
)
def test_wrong_types_are_refused(make_manifest, path, value):
    data = _data(make_manifest())
    target = data
    for key in path[:-1]:
        target = target[key]
    target[path[-1]] = value
    with pytest.raises(ManifestError, match=path[0]):
        _parse(data)


@pytest.mark.parametrize(
    "name",
    ["../model.safetensors", "sub/model.safetensors", "/etc/passwd", "a\\b", "..", ".", ".hidden",
     "C:model", "", "manifest.json"],
)  # fmt: skip
def test_unsafe_file_names_are_refused(make_manifest, name):
    data = _data(make_manifest())
    data["files"] = {name: {"sha256": DIGEST, "size": 1}}
    with pytest.raises(ManifestError, match="files"):
        _parse(data)


@pytest.mark.parametrize(
    ("mutate", "message"),
    [
        (lambda d: d["genes"].update(ids=["G0", "G0", "G2", "G3", "G4", "G5"]), "unique"),
        (lambda d: d["genes"].update(symbols=["A"]), "symbols"),
        (lambda d: d["covariates"][0].update(categories=["b0", "b0"]), "unique"),
        (lambda d: d["covariates"].append(dict(d["covariates"][0])), "covariate keys"),
        (lambda d: d["training"].update(final_losses={"elbo": float("nan")}), "final_losses"),
        (
            lambda d: d.update(
                lineage={
                    "parent": {"name": "org/a", "version": 1, "digest": DIGEST},
                    "added_categories": {"tissue": ["x"]},
                }
            ),
            "unknown covariate",
        ),
        (
            lambda d: d.update(
                lineage={
                    "parent": {"name": "org/a", "version": 1, "digest": DIGEST},
                    "added_categories": {"batch": ["new"]},
                }
            ),
            "lacks",
        ),
    ],
)
def test_inconsistent_manifests_are_refused(make_manifest, mutate, message):
    data = _data(make_manifest(training=TrainingSummary(cells=1, epochs=1)))
    mutate(data)
    with pytest.raises(ManifestError, match=message):
        _parse(data)


def test_lineage_and_labels(make_manifest):
    parent = ParentRef(name="org/atlas", version=2, digest=DIGEST)
    m = make_manifest(
        batches=("b0", "b1", "q0"),
        lineage=Lineage(parent=parent, added_categories={"batch": ("q0",)}),
        labels={"key": "cell_type", "categories": ("T", "B")},
    )
    again = parse_manifest(manifest_json(m))
    assert again.lineage.parent == parent
    assert again.labels.categories == ("T", "B")


def test_created_is_utc_and_must_be_aware(make_manifest):
    local = datetime(2024, 5, 1, 14, 0, tzinfo=timezone(timedelta(hours=2)))
    m = make_manifest(created=local)
    assert m.created == local
    assert m.created.utcoffset() == timedelta(0)
    assert _data(m)["created"].startswith("2024-05-01T12:00:00")


def test_newer_schema_is_refused_with_upgrade_hint(make_manifest):
    data = _data(make_manifest())
    data["schema_version"] = SCHEMA_VERSION + 1
    data["field_from_the_future"] = True
    with pytest.raises(ManifestVersionError) as info:
        _parse(data)
    assert "upgrade hubarches" in str(info.value).lower()
    assert info.value.found == SCHEMA_VERSION + 1


@pytest.mark.parametrize("value", [None, "1", True, 0, -1])
def test_invalid_schema_version(make_manifest, value):
    data = _data(make_manifest())
    data["schema_version"] = value
    if value is None:
        del data["schema_version"]
    with pytest.raises(ManifestError, match="schema_version"):
        _parse(data)


def test_migrations_run_in_order_without_touching_the_input(monkeypatch):
    calls = []

    def one_to_two(d: dict) -> dict:
        calls.append(1)
        return {**d, "schema_version": 2, "renamed": d["old"]}

    def two_to_three(d: dict) -> dict:
        calls.append(2)
        return {k: v for k, v in d.items() if k != "old"} | {"schema_version": 3}

    monkeypatch.setattr(manifest_mod, "SCHEMA_VERSION", 3)
    monkeypatch.setattr(manifest_mod, "MIGRATIONS", {1: one_to_two, 2: two_to_three})
    original = {"schema_version": 1, "old": "x"}
    assert migrate(original) == {"schema_version": 3, "renamed": "x"}
    assert original == {"schema_version": 1, "old": "x"}
    assert calls == [1, 2]
    monkeypatch.setattr(manifest_mod, "MIGRATIONS", {})
    with pytest.raises(ManifestError, match="no migration"):
        migrate(original)


@pytest.mark.parametrize(
    "raw",
    ['{"schema_version": 1, "schema_version": 1}', "[1, 2]", "{not json", b"\xff\xfe"],
)
def test_malformed_json_is_refused(raw):
    with pytest.raises(ManifestError):
        parse_manifest(raw)


def test_read_manifest_names_the_file(tmp_path, make_manifest):
    path = tmp_path / "manifest.json"
    with pytest.raises(ManifestError, match="cannot read"):
        read_manifest(path)
    data = _data(make_manifest())
    data["extra"] = 1
    path.write_text(json.dumps(data))
    with pytest.raises(ManifestError, match=str(path)):
        read_manifest(path)


def test_json_schema_documents_every_field():
    schema = json_schema()
    assert schema["additionalProperties"] is False
    assert schema["properties"]["schema_version"]["const"] == SCHEMA_VERSION
    models = [schema, *schema["$defs"].values()]
    for model in models:
        assert model["additionalProperties"] is False
        for name, prop in model["properties"].items():
            assert prop.get("description"), f"{model['title']}.{name} has no docstring"
    json.dumps(schema)  # serializable as it is
