"""The demo atlas shipped in registry/, its cards in model_cards/, and the script that builds it.

The shipped weights are not compared with freshly trained ones (another CPU may round
differently); the build's determinism is checked by building a tiny demo twice.
"""

from __future__ import annotations

import importlib.util
import shlex
import shutil
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner

import hubarches
from hubarches.bundle import CARD_FILE, verify_bundle
from hubarches.cli import cli
from hubarches.manifest import manifest_digest

REPO = Path(__file__).resolve().parents[1]
REGISTRY = REPO / "registry"
CARDS = REPO / "model_cards"
ATLAS_DIR = REGISTRY / "hubarches" / "demo"
QUERY = REGISTRY / "demo_query.h5ad"
VERSIONS = (1, 2)
MAX_BUNDLE_BYTES = 4 * 1024 * 1024
"""Bundles stay small enough to ship inside the package."""
MAX_QUERY_BYTES = 1024 * 1024
MIN_LABEL_ACCURACY = 0.8
"""Share of demo-query cells whose transferred label matches the simulator's truth."""
MAX_SAME_BATCH_EXCESS = 0.2
"""How much more often a cell's neighbours share its batch than under perfect mixing.

Without integration nearly all neighbours do (~0.75 above the 0.25 of perfect mixing)."""
SUBPROCESS_TIMEOUT_S = 300


def _load_build_script() -> ModuleType:
    spec = importlib.util.spec_from_file_location("build_demo", REPO / "scripts" / "build_demo.py")
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up while it executes
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build_demo() -> ModuleType:
    return _load_build_script()


@pytest.fixture(scope="module")
def manifests():
    return {v: verify_bundle(ATLAS_DIR / str(v)) for v in VERSIONS}


def test_shipped_bundles_verify_and_stay_small(manifests):
    assert sorted(int(p.name) for p in ATLAS_DIR.iterdir()) == list(VERSIONS)
    for version, m in manifests.items():
        assert (m.name, m.version) == ("hubarches/demo", version)
        assert len(m.genes.ids) == 1000
        assert m.labels is not None
        assert m.labels.key == "cell_type"
        assert sum(e.size for e in m.files.values()) < MAX_BUNDLE_BYTES
    v1, v2 = manifests[1], manifests[2]
    assert v1.lineage is None
    assert v2.lineage is not None
    assert v2.lineage.parent.name == "hubarches/demo"
    assert v2.lineage.parent.version == 1
    assert v2.lineage.parent.digest == manifest_digest(v1)
    added = v2.lineage.added_categories["batch"]
    assert v2.covariates[0].categories == (*v1.covariates[0].categories, *added)


def test_model_cards_are_the_bundles_readmes():
    for version in VERSIONS:
        card = CARDS / f"hubarches-demo-v{version}.md"
        assert card.read_bytes() == (ATLAS_DIR / str(version) / CARD_FILE).read_bytes()
        text = card.read_text()
        assert text.startswith("---\nlicense: ")
        assert "library_name: hubarches" in text
        assert f"# hubarches/demo (version {version})" in text
    shipped = {p.name for p in CARDS.glob("hubarches-demo-v*.md")}
    assert shipped == {f"hubarches-demo-v{v}.md" for v in VERSIONS}


@pytest.mark.parametrize("version", VERSIONS)
def test_the_shipped_cards_map_command_runs(version, tmp_path, monkeypatch):
    """The card's bash example, copied as is, maps the demo query (rebuild the demo if not)."""
    card = (CARDS / f"hubarches-demo-v{version}.md").read_text()
    lines = [line for line in card.splitlines() if line.startswith("hubarches map ")]
    assert len(lines) == 1
    argv = shlex.split(lines[0])
    assert argv[:3] == ["hubarches", "map", f"hubarches/demo@{version}"]
    shutil.copy(QUERY, tmp_path / argv[3])
    monkeypatch.chdir(tmp_path)
    # Only speed settings are added: whatever the command needs must already be in the card.
    result = CliRunner().invoke(cli, [*argv[1:], "--epochs", "1", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    assert (tmp_path / "mapped.h5ad").is_file()


def test_the_example_query_has_new_batches_and_imperfect_genes(manifests):
    assert QUERY.stat().st_size < MAX_QUERY_BYTES
    query = ad.read_h5ad(QUERY)
    genes = set(manifests[2].genes.ids)
    assert set(query.obs["batch"].astype(str)).isdisjoint(manifests[2].covariates[0].categories)
    assert set(query.obs["cell_type"].astype(str)) <= set(manifests[1].labels.categories)
    assert 0 < len(genes - set(query.var_names)) < 0.2 * len(genes)  # some missing
    assert len(set(query.var_names) - genes) > 0  # some extra
    shared = [g for g in query.var_names if g in genes]
    order = [manifests[2].genes.ids.index(g) for g in shared]
    assert order != sorted(order)  # shuffled


def test_the_demo_resolves_everywhere_and_maps_its_query():
    """The default registry falls back to the demo; its query maps with correct labels."""
    reference = hubarches.load_reference("hubarches/demo")
    assert reference.version == 2
    query = ad.read_h5ad(QUERY)
    result = reference.map(query, batch_key="batch", epochs=2, device="cpu")
    truth = query.obs["cell_type"].astype(str).to_numpy()
    predicted = result.adata.obs["hubarches_label"].astype(str).to_numpy()
    assert (predicted == truth).mean() >= MIN_LABEL_ACCURACY


def test_version_1_integrates_its_batches(build_demo):
    """Re-simulate the reference cells and check that v1 mixes their batches."""
    reference_data, _ = build_demo.simulate(build_demo.SIZES["full"])
    latent = hubarches.load_reference("hubarches/demo@1").embed(reference_data)
    same, mixed = build_demo.batch_mixing(latent, reference_data.obs["batch"].to_numpy())
    assert same - mixed < MAX_SAME_BATCH_EXCESS


def _tree(root: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()
    }


def test_the_build_is_deterministic(tmp_path):
    script = REPO / "scripts" / "build_demo.py"
    builds = [tmp_path / "a", tmp_path / "b"]
    procs = [
        subprocess.Popen(
            [sys.executable, script, "--size", "tiny", "--registry", out / "registry",
             "--cards", out / "cards"],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        for out in builds
    ]  # fmt: skip
    for proc in procs:
        _, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        assert proc.returncode == 0, stderr
    first, second = (_tree(out) for out in builds)
    assert first == second
    shipped = {
        str(p.relative_to(REPO)).replace("model_cards", "cards", 1)
        for p in [*REGISTRY.rglob("*"), *CARDS.glob("hubarches-demo-*.md")]
        if p.is_file() and "__pycache__" not in p.parts
    }
    assert set(first) == shipped  # the same files as what is shipped
    for version in VERSIONS:
        verify_bundle(builds[0] / "registry" / "hubarches" / "demo" / str(version))
    tiny = ad.read_h5ad(builds[0] / "registry" / "demo_query.h5ad")
    assert np.all(tiny.X.data == np.round(tiny.X.data))  # raw counts
