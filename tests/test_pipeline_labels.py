"""Label transfer and mapping quality through the public API, on mapped simulated data.

One reference is trained per module (a reference needs ~100+ epochs to integrate its
batches): six cell types, ``type_05`` held out of the reference but present in the query.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from safetensors.numpy import load_file

import hubarches
from hubarches.bundle import EMBEDDING_FILE
from hubarches.datasets import simulate_reference_and_query
from hubarches.errors import HubarchesWarning, IntegrityError
from hubarches.labels import MAPPING_QUALITY_THRESHOLD, UNKNOWN_LABEL, stratified_subsample

HELD_OUT = "type_05"
LABEL_COLUMNS = (
    "hubarches_label",
    "hubarches_label_probability",
    "hubarches_label_uncertainty",
)
QUALITY_COLUMNS = ("hubarches_mapping_score", "hubarches_mapping_ok")


@pytest.fixture(scope="module")
def mapped() -> dict:
    """Train a labelled reference once and map the query onto it."""
    ref, query = simulate_reference_and_query(
        n_reference=1500,
        n_query=600,
        n_genes=300,
        n_types=6,
        held_out_types=[HELD_OUT],
        seed=1,
    )
    trained = hubarches.train_atlas(
        ref,
        batch_key="batch",
        label_key="cell_type",
        options=hubarches.TrainOptions(epochs=150, kl_warmup_epochs=20),
    )
    result = trained.reference.map(query, batch_key="batch", epochs=50, kl_warmup_epochs=20)
    truth = query.obs["cell_type"].astype(str).to_numpy()
    return {
        "ref": ref,
        "query": query,
        "reference": trained.reference,
        "result": result,
        "truth": truth,
        "held": truth == HELD_OUT,
    }


@pytest.fixture(scope="module")
def unlabelled() -> dict:
    """A small reference trained without labels, and a query mapped onto it."""
    ref, query = simulate_reference_and_query(
        n_reference=300, n_query=120, n_genes=80, n_types=3, seed=4
    )
    trained = hubarches.train_atlas(
        ref, batch_key="batch", options=hubarches.TrainOptions(epochs=10, kl_warmup_epochs=2)
    )
    result = trained.reference.map(query, batch_key="batch", epochs=5, kl_warmup_epochs=2)
    return {"reference": trained.reference, "result": result, "query": query}


def _tamper(path: Path) -> None:
    """Flip one byte in the middle of a file, keeping its size (only the sha256 tells)."""
    path.chmod(0o644)
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


# --- a labelled reference -------------------------------------------------------------------


def test_known_types_are_transferred_accurately(mapped):
    obs = mapped["result"].adata.obs
    known = ~mapped["held"]
    predicted = obs["hubarches_label"].astype(str).to_numpy()
    # Measured (seed 1, two runs across training-code changes): 0.95–0.96 of known cells get
    # their own type, 0.04–0.05 Unknown (tails of types flagged by mapping quality), none a
    # wrong type.
    assert (predicted[known] == mapped["truth"][known]).mean() >= 0.85
    labelled = known & (predicted != UNKNOWN_LABEL)
    assert (predicted[labelled] == mapped["truth"][labelled]).mean() >= 0.97
    assert np.median(obs["hubarches_mapping_score"][known]) <= 1.15  # measured 1.02–1.03
    assert obs["hubarches_mapping_ok"][known].mean() >= 0.85  # measured 0.95–0.96


def test_unseen_type_is_mostly_unknown_and_flagged(mapped):
    obs = mapped["result"].adata.obs
    held = mapped["held"]
    assert held.sum() >= 30  # the query does hold the unseen type
    # Measured (seed 1): 0.93–0.96 of type_05 cells flagged and Unknown; score median 1.54–1.6.
    assert (~obs["hubarches_mapping_ok"].to_numpy()[held]).mean() >= 0.8
    assert (obs["hubarches_label"].to_numpy()[held] == UNKNOWN_LABEL).mean() >= 0.8
    scores = obs["hubarches_mapping_score"].to_numpy()
    assert np.median(scores[held]) > MAPPING_QUALITY_THRESHOLD
    assert np.median(scores[held]) >= np.median(scores[~held]) + 0.3
    assert HELD_OUT not in set(obs["hubarches_label"].cat.categories)
    # The kNN vote alone is confident for them (measured: 56–57 of 57 below the uncertainty
    # threshold): the mapping-quality flag is what makes them Unknown.
    result = mapped["result"]
    assert (result.labels.uncertainty[held] <= result.labels.threshold).mean() >= 0.5
    assert result.report["labels"]["n_flagged_unknown"] >= 0.5 * held.sum()


def test_label_columns_and_report(mapped):
    result = mapped["result"]
    obs = result.adata.obs
    cats = mapped["reference"].manifest.labels.categories
    assert HELD_OUT not in cats
    assert list(obs["hubarches_label"].cat.categories) == [*cats, UNKNOWN_LABEL]
    prob = obs["hubarches_label_probability"].to_numpy()
    assert ((prob >= 0.0) & (prob <= 1.0)).all()
    np.testing.assert_allclose(obs["hubarches_label_uncertainty"], 1.0 - prob, atol=1e-6)
    assert obs["hubarches_mapping_ok"].dtype == bool
    np.testing.assert_array_equal(
        obs["hubarches_mapping_ok"], obs["hubarches_mapping_score"] <= MAPPING_QUALITY_THRESHOLD
    )
    report = json.loads(json.dumps(result.report))
    assert report["labels_note"] is None
    assert report["labels"]["key"] == "cell_type"
    counts = report["labels"]["counts"]
    assert counts == obs["hubarches_label"].value_counts().reindex(list(counts)).to_dict()
    quality = report["mapping_quality"]
    assert quality["n_flagged"] == int((~obs["hubarches_mapping_ok"]).sum())
    assert quality["threshold"] == MAPPING_QUALITY_THRESHOLD
    # Every flagged cell is Unknown, whatever its vote.
    assert (obs["hubarches_label"][~obs["hubarches_mapping_ok"]] == UNKNOWN_LABEL).all()
    assert result.adata.uns["hubarches"]["labels"]["key"] == "cell_type"


def test_labelled_bundle_stores_a_stratified_embedding(mapped, tmp_path):
    reference = mapped["reference"]
    path = reference.save(tmp_path / "bundle")
    assert EMBEDDING_FILE in hubarches.load_reference(path).manifest.files
    tensors = load_file(path / EMBEDDING_FILE)
    assert set(tensors) == {"latent", "labels", "spread", "spread_k"}
    n_ref = mapped["ref"].n_obs
    assert tensors["latent"].shape == (n_ref, reference.manifest.model.n_latent)
    cats = reference.manifest.labels.categories
    expected = pd.Categorical(mapped["ref"].obs["cell_type"], categories=cats).codes
    np.testing.assert_array_equal(tensors["labels"], expected)


def test_embedding_cap_stores_a_label_stratified_sample(tmp_path):
    """At most ``embedding_cap`` reference cells are stored, every label among them."""
    ref, _ = simulate_reference_and_query(
        n_reference=240, n_query=10, n_genes=40, n_types=3, seed=5
    )
    cell_type = ref.obs["cell_type"].cat.add_categories("rare")
    cell_type.iloc[:3] = "rare"  # 3 of 240 cells: 0.3 of the 24 kept, by proportion alone
    ref.obs["cell_type"] = cell_type
    cap = 24
    trained = hubarches.train_atlas(
        ref,
        batch_key="batch",
        label_key="cell_type",
        config={"n_hidden": 16, "n_latent": 4},
        options=hubarches.TrainOptions(epochs=2, kl_warmup_epochs=1, device="cpu"),
        embedding_cap=cap,
    )
    reference = trained.reference
    cats = reference.manifest.labels.categories
    assert "rare" in cats
    codes = pd.Categorical(ref.obs["cell_type"], categories=cats).codes
    emb = reference.embedding
    assert emb.latent.shape == (cap, 4)
    kept = np.bincount(emb.labels, minlength=len(cats))
    assert (kept >= 1).all()  # every label keeps a cell, the rare one too
    share = np.bincount(codes, minlength=len(cats)) / len(codes)
    assert np.abs(kept - cap * share).max() <= 2  # otherwise in proportion to label sizes
    keep = stratified_subsample(codes, cap, seed=0)
    np.testing.assert_array_equal(emb.labels, codes[keep])
    np.testing.assert_allclose(emb.latent, reference.embed(ref)[keep], atol=1e-5)
    assert emb.spread.shape == (cap,)

    path = reference.save(tmp_path / "bundle")
    tensors = load_file(path / EMBEDDING_FILE)
    assert tensors["latent"].shape == (cap, 4)
    np.testing.assert_array_equal(tensors["labels"], emb.labels)
    assert hubarches.load_reference(path).embedding.latent.shape == (cap, 4)


def test_stored_spread_gives_the_scores_computed_from_scratch(mapped):
    """The bundle's precomputed neighbour spread is only a shortcut for mapping quality."""
    from hubarches.neighbors import build_index
    from hubarches.quality import mapping_quality

    emb = mapped["reference"].embedding
    assert emb.spread_k == 15
    latent = mapped["result"].latent
    stored = mapping_quality(build_index(emb.latent, spread=(emb.spread_k, emb.spread)), latent)
    fresh = mapping_quality(build_index(emb.latent), latent)
    np.testing.assert_allclose(stored.score, fresh.score, rtol=1e-5)
    np.testing.assert_array_equal(stored.ok, fresh.ok)


def test_embedding_survives_push_and_pull(mapped):
    info = hubarches.push(mapped["reference"], "lab/atlas")
    loaded = hubarches.load_reference("lab/atlas")
    assert loaded.info == info
    assert loaded.manifest.labels == mapped["reference"].manifest.labels
    np.testing.assert_array_equal(loaded.embedding.latent, mapped["reference"].embedding.latent)
    np.testing.assert_array_equal(loaded.embedding.labels, mapped["reference"].embedding.labels)


# --- the embedding file is verified like every other file -----------------------------------


def test_tampered_embedding_in_the_registry_is_refused(mapped, tmp_path):
    info = hubarches.push(mapped["reference"], "lab/tamper")
    _tamper(hubarches.get_registry().version_path(info) / EMBEDDING_FILE)
    with pytest.raises(IntegrityError, match="sha256") as err:
        hubarches.load_reference("lab/tamper", cache_dir=tmp_path / "fresh-cache")
    assert err.value.filename == EMBEDDING_FILE


def test_tampered_embedding_in_a_bundle_directory_is_refused(mapped, tmp_path):
    path = mapped["reference"].save(tmp_path / "bundle")
    _tamper(path / EMBEDDING_FILE)
    with pytest.raises(IntegrityError) as err:
        hubarches.load_reference(path)
    assert err.value.filename == EMBEDDING_FILE
    (path / EMBEDDING_FILE).unlink()
    with pytest.raises(IntegrityError) as err:
        hubarches.load_reference(path)
    assert err.value.filename == EMBEDDING_FILE


def test_tampered_embedding_in_the_cache_is_fetched_again(mapped, isolated_env):
    hubarches.push(mapped["reference"], "lab/cached")
    first = hubarches.load_reference("lab/cached")
    assert first.path.is_relative_to(isolated_env.cache)
    _tamper(first.path / EMBEDDING_FILE)
    # The cached copy fails verification, so it is not used: the registry's is fetched anew.
    with pytest.warns(HubarchesWarning, match="failed verification"):
        again = hubarches.load_reference("lab/cached")
    np.testing.assert_array_equal(again.embedding.latent, mapped["reference"].embedding.latent)


# --- a reference without labels -------------------------------------------------------------


def test_bundle_without_labels_stores_no_labels(unlabelled, tmp_path):
    reference = unlabelled["reference"]
    assert reference.manifest.labels is None
    assert reference.embedding.labels is None
    path = reference.save(tmp_path / "bundle")
    loaded = hubarches.load_reference(path)
    assert EMBEDDING_FILE in loaded.manifest.files
    assert loaded.manifest.labels is None
    assert set(load_file(path / EMBEDDING_FILE)) == {"latent", "spread", "spread_k"}
    assert loaded.embedding.labels is None
    assert loaded.embedding.latent.shape[0] == reference.embedding.latent.shape[0]


def test_bundle_without_labels_maps_without_label_columns_and_says_so(unlabelled):
    result = unlabelled["result"]
    obs = result.adata.obs
    assert not set(LABEL_COLUMNS) & set(obs.columns)
    assert set(QUALITY_COLUMNS) <= set(obs.columns)
    assert np.isfinite(obs["hubarches_mapping_score"]).all()
    assert result.labels is None
    assert result.quality is not None
    report = json.loads(json.dumps(result.report))
    assert report["labels"] is None
    assert "no cell labels" in report["labels_note"]
    assert report["mapping_quality"]["n_cells"] == unlabelled["query"].n_obs
    assert "labels_note" in result.adata.uns["hubarches"]
