"""The Python API end to end: train → save → push → pull → embed/map, with lineage."""

from __future__ import annotations

import numpy as np
import pytest
from hubserver import HubServer, hub_server  # noqa: F401

import hubarches
from hubarches.datasets import simulate_reference_and_query
from hubarches.errors import CovariateError, PushError
from hubarches.keys import LATENT_KEY, UNS_KEY
from hubarches.registry.hf import HubRegistry

# huggingface_hub's own LFS upload passes a file as data= to its HTTP library, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")

TOKEN = "hf_aliceWriteTokenForTests0123456789"


@pytest.fixture(scope="module")
def atlas():
    ref, query = simulate_reference_and_query(
        n_reference=400, n_query=200, n_genes=60, n_types=4, missing_fraction=0.05, seed=5
    )
    result = hubarches.train_atlas(
        ref,
        batch_key="batch",
        label_key="cell_type",
        config={"n_hidden": 16, "n_latent": 4},
        options=hubarches.TrainOptions(epochs=3),
        description="a tiny test atlas",
    )
    return ref, query, result


def test_round_trip_embeds_exactly_like_the_original(atlas, tmp_path) -> None:
    ref, _, result = atlas
    original = result.reference.embed(ref)
    bundle = result.reference.save(tmp_path / "bundle")
    info = hubarches.push(bundle, "lab/tiny", registry=tmp_path / "reg")
    assert (info.name, info.version) == ("lab/tiny", 1)
    pulled = hubarches.load_reference("lab/tiny", registry=tmp_path / "reg")
    assert pulled.info == info
    assert pulled.version == 1
    assert pulled.digest == info.digest
    np.testing.assert_array_equal(pulled.embed(ref), original)
    by_digest = hubarches.load_reference(f"lab/tiny@sha256:{info.digest}", tmp_path / "reg")
    np.testing.assert_array_equal(by_digest.embed(ref), original)
    from_dir = hubarches.load_reference(bundle)
    np.testing.assert_array_equal(from_dir.embed(ref), original)


def test_map_returns_extension_latent_adata_and_report(atlas, tmp_path) -> None:
    ref, query, result = atlas
    hubarches.push(result.reference, "lab/tiny", registry=tmp_path / "reg")
    reference = hubarches.load_reference("lab/tiny", registry=tmp_path / "reg")
    mapped = reference.map(query, batch_key="batch", epochs=2)
    assert mapped.latent.shape == (query.n_obs, 4)
    assert list(mapped.adata.obs_names) == list(query.obs_names)
    np.testing.assert_array_equal(mapped.adata.obsm[LATENT_KEY], mapped.latent)
    report = mapped.adata.uns[UNS_KEY]
    assert report["reference"]["name"] == "lab/tiny"
    assert report["reference"]["version"] == 1
    assert report["new_categories"] == {"batch": ["qry_b0", "qry_b1"]}
    assert report["training"]["epochs"] == 2
    extension = mapped.reference
    assert extension.version is None  # unpublished until pushed
    assert extension.manifest.lineage is not None
    assert extension.manifest.lineage.parent.digest == reference.digest
    # Reference cells embed bitwise the same through the extension.
    np.testing.assert_array_equal(extension.embed(ref), reference.embed(ref))
    info = hubarches.push(extension, "lab/tiny", registry=tmp_path / "reg")
    assert info.version == 2
    v2 = hubarches.load_reference("lab/tiny", registry=tmp_path / "reg")
    parent = v2.manifest.lineage.parent
    assert (parent.name, parent.version, parent.digest) == ("lab/tiny", 1, reference.digest)
    assert v2.covariates[0][1][-2:] == ("qry_b0", "qry_b1")
    np.testing.assert_array_equal(v2.embed(query, batch_key="batch"), extension.embed(query))


def test_embedding_new_categories_needs_map(atlas) -> None:
    _, query, result = atlas
    with pytest.raises(CovariateError, match="Map the query"):
        result.reference.embed(query)


def test_push_refuses_a_directory_that_is_not_a_bundle(tmp_path) -> None:
    with pytest.raises(PushError, match="not a bundle directory"):
        hubarches.push(tmp_path, "lab/tiny", registry=tmp_path / "reg")


def _extend_and_push(reference, query, registry) -> hubarches.Reference:
    """Map the query onto ``reference``, push the extension as the next version, pull it back."""
    extension = reference.map(query, batch_key="batch", epochs=1).reference
    info = hubarches.push(extension, reference.name, registry=registry)
    return hubarches.load_reference(f"{info.name}@{info.version}", registry)


def test_lineage_names_the_parent_atlas_locally_and_on_the_hub(
    atlas,
    tmp_path,
    hub_server: HubServer,  # noqa: F811
) -> None:
    _, query, result = atlas
    hub_server.add_token(TOKEN, "alice", orgs=("lab",))
    registries = {"local": tmp_path / "reg", "hub": HubRegistry(hub_server.endpoint, TOKEN)}
    for where, registry in registries.items():
        root = hubarches.push(result.reference, "lab/tiny", registry=registry)
        v1 = hubarches.load_reference("lab/tiny@1", registry)
        v2 = _extend_and_push(v1, query, registry)
        parent = v2.manifest.lineage.parent
        assert (parent.name, parent.version, parent.digest) == ("lab/tiny", 1, root.digest), where
        assert (v2.name, v2.version) == ("lab/tiny", 2), where
        # Pushed under another name (a fork), the extension still names the atlas it extends.
        fork = hubarches.push(v2, "lab/fork", registry=registry)
        forked = hubarches.load_reference(f"lab/fork@{fork.version}", registry)
        assert forked.manifest.lineage.parent.name == "lab/tiny", where
        v3 = _extend_and_push(forked, query, registry)
        parent = v3.manifest.lineage.parent
        assert (parent.name, parent.version, parent.digest) == ("lab/fork", 1, fork.digest), where
