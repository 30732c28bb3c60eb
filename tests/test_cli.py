"""The command line: every command, its JSON, its errors, and a real subprocess.

Tiny references are trained once per module; maps run 2 epochs. The autouse fixture in
conftest.py isolates the registry, the cache and the Hugging Face home of every test.
"""

from __future__ import annotations

import io
import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import anndata as ad
import numpy as np
import pytest
from click.testing import CliRunner
from hubserver import HubServer, hub_server  # noqa: F401
from safetensors.numpy import load_file

from hubarches import cli_render
from hubarches.bundle import CARD_FILE, EMBEDDING_FILE, verify_bundle
from hubarches.cli import EXIT_ERROR, EXIT_INTERRUPTED, EXIT_USAGE, cli
from hubarches.datasets import simulate_reference_and_query
from hubarches.errors import IntegrityError
from hubarches.labels import (
    DEFAULT_UNCERTAINTY_THRESHOLD,
    MAPPING_QUALITY_THRESHOLD,
    UNKNOWN_LABEL,
)
from hubarches.manifest import MANIFEST_FILE, read_manifest
from hubarches.pipeline import push, train_atlas
from hubarches.registry import VersionInfo
from hubarches.train import EpochStats, TrainOptions

# huggingface_hub's own LFS upload passes a file as data= to its HTTP library, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")

ATLAS = "org/atlas"
N_LATENT = 4
TOKEN = "hf_aliceWriteTokenForTests0123456789"
SUBPROCESS_TIMEOUT_S = 120
TINY = ("--n-hidden", "16", "--n-latent", str(N_LATENT), "--epochs", "3", "--device", "cpu")


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny atlas and a query (new batches, missing/extra/shuffled genes) as .h5ad files."""
    root = tmp_path_factory.mktemp("data")
    ref, query = simulate_reference_and_query(
        n_reference=150,
        n_query=60,
        n_genes=40,
        n_types=3,
        reference_batches=2,
        query_batches=2,
        seed=3,
        missing_fraction=0.1,
        extra_fraction=0.05,
        shuffle_genes=True,
    )
    ref.write_h5ad(root / "atlas.h5ad")
    query.write_h5ad(root / "query.h5ad")
    return root


@pytest.fixture(scope="module")
def bundle(data: Path) -> Path:
    """An unpublished bundle trained with labels on the tiny atlas."""
    result = train_atlas(
        ad.read_h5ad(data / "atlas.h5ad"),
        batch_key="batch",
        label_key="cell_type",
        config={"n_hidden": 16, "n_latent": N_LATENT},
        options=TrainOptions(epochs=3, device="cpu"),
    )
    return result.reference.save(data / "bundle")


@pytest.fixture
def published(bundle: Path) -> VersionInfo:
    """The tiny bundle published as org/atlas@1 in the test's isolated registry."""
    return push(bundle, ATLAS)


def run(*args: object, code: int = 0, env: dict[str, str] | None = None):
    result = CliRunner().invoke(cli, [str(a) for a in args], env=env)
    assert result.exit_code == code, (result.stdout, result.stderr)
    return result


def error_line(result, kind: str) -> str:
    """The single stderr line of a failed command, checked to name ``kind``."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith(f"error ({kind}): "), lines[0]
    assert "Traceback" not in result.stderr
    return lines[0]


def map_args(data: Path, out: Path, *extra: object, ref: str = ATLAS) -> list[object]:
    return [
        "map", ref, data / "query.h5ad", "--batch-key", "batch", "--out", out,
        "--epochs", "2", "--device", "cpu", *extra,
    ]  # fmt: skip


# --- help -----------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["pull", "map", "push", "train", "info", "list"])
def test_every_command_explains_its_options(command):
    text = " ".join(run(command, "--help").stdout.split())
    assert text.startswith(f"Usage: hubarches {command} ")
    assert "--registry" in text or command == "train"
    if command in {"map", "train"}:
        assert "[default: 0]" in text  # the seed's default is shown
        assert "[default: (400 up to 20,000 cells, fewer above)" in text


def test_group_help_and_version():
    result = run("--help")
    for command in ("pull", "map", "push", "train", "info", "list"):
        assert f"  {command} " in result.stdout
    assert run("--version").stdout.startswith("hubarches, version ")


# --- pull, info, list, push -----------------------------------------------------------------


def test_pull_prints_what_it_got(published, isolated_env):
    out = run("pull", ATLAS).stdout
    assert f"Name:       {ATLAS}" in out
    assert "Version:    1" in out
    assert f"Digest:     sha256:{published.digest}" in out
    assert "Genes:      40 (symbol)" in out
    assert "batch (batch key, 2): ref_b0, ref_b1" in out
    assert "cell_type (3)" in out
    assert "root (trained from scratch)" in out
    assert str(isolated_env.cache) in out


def test_pull_json_is_one_document(published):
    doc = json.loads(run("pull", f"{ATLAS}@1", "--json").stdout)
    assert (doc["name"], doc["version"], doc["digest"]) == (ATLAS, 1, published.digest)
    assert Path(doc["path"], MANIFEST_FILE).is_file()
    assert doc["manifest"]["covariates"][0]["categories"] == ["ref_b0", "ref_b1"]


def test_info_and_list_in_text_and_json(published, bundle):
    push(bundle, ATLAS)  # v2
    text = run("info", f"{ATLAS}@1").stdout
    assert "Versions:    1, 2 (latest)" in text
    assert "Model:       scvi: n_latent 4, n_hidden 16" in text
    assert "model.safetensors (" in text
    doc = json.loads(run("info", ATLAS, "--json").stdout)
    assert doc["version"] == 2
    assert [v["version"] for v in doc["versions"]] == [1, 2]
    assert doc["manifest"]["name"] == ATLAS

    listing = run("list").stdout
    row = next(line for line in listing.splitlines() if line.startswith(ATLAS))
    assert row.split()[:4] == [ATLAS, "1,", "2", "2"]
    doc = json.loads(run("list", "--json").stdout)
    atlas = next(a for a in doc["atlases"] if a["name"] == ATLAS)
    assert atlas["latest"] == 2
    assert [v["version"] for v in atlas["versions"]] == [1, 2]


def test_info_reads_an_unpublished_bundle_directory(bundle):
    text = run("info", bundle).stdout
    assert "Name:        (unpublished)" in text
    assert f"Location:    {bundle}" in text


def test_push_prints_the_new_version(bundle, tmp_path):
    registry = tmp_path / "elsewhere"
    out = run("push", bundle, ATLAS, "--registry", registry).stdout
    assert out.startswith(f"Published {ATLAS}@1 (sha256:")
    assert f"hubarches pull {ATLAS}@1 --registry {registry}" in out
    doc = json.loads(run("push", bundle, ATLAS, "--registry", registry, "--json").stdout)
    assert (doc["version"], doc["ref"]) == (2, f"{ATLAS}@2")
    assert read_manifest(registry / "org" / "atlas" / "2" / MANIFEST_FILE).version == 2


# --- map ------------------------------------------------------------------------------------


def test_map_writes_the_mapped_file_and_a_summary(published, data, tmp_path):
    out = tmp_path / "mapped.h5ad"
    result = run(*map_args(data, out))
    query = ad.read_h5ad(data / "query.h5ad")
    mapped = ad.read_h5ad(out)
    assert list(mapped.obs_names) == list(query.obs_names)
    assert list(mapped.var_names) == list(query.var_names)
    assert set(query.obs.columns) < set(mapped.obs.columns)
    assert mapped.obsm["X_hubarches"].shape == (query.n_obs, N_LATENT)
    assert np.isfinite(mapped.obsm["X_hubarches"]).all()
    report = mapped.uns["hubarches"]
    assert report["reference"]["name"] == ATLAS
    assert int(report["reference"]["version"]) == 1
    assert report["reference"]["digest"] == published.digest
    assert int(report["query"]["alignment"]["n_shared"]) == 36
    assert list(report["new_categories"]["batch"]) == ["qry_b0", "qry_b1"]
    assert int(report["training"]["epochs"]) == 2
    assert np.isfinite(float(report["training"]["final_loss"]))

    text = result.stdout
    assert f"Reference:       {ATLAS}@1 (sha256:{published.digest[:12]})" in text
    assert "60 mapped" in text
    assert "36 of 40 shared (90%), 4 missing (zero-filled), 2 extra (dropped)" in text
    assert "batch: qry_b0, qry_b1" in text
    assert "2 epochs, final loss" in text
    assert "Unknown" in text
    assert "far from the reference" in text
    assert str(out) in text
    assert "--save-model DIR" in text  # what to do next
    assert result.stderr == ""  # no progress bar when stderr is not a terminal


def test_map_json_is_the_report(published, data, tmp_path):
    out = tmp_path / "mapped.h5ad"
    doc = json.loads(run(*map_args(data, out, "--json", "--k", "5")).stdout)
    assert doc["reference"] == {"name": ATLAS, "version": 1, "digest": published.digest}
    assert doc["query"]["alignment"]["n_missing"] == 4
    assert doc["training"]["epochs"] == 2
    assert doc["labels"]["k"] == 5
    assert sum(doc["labels"]["counts"].values()) == 60
    assert doc["output"] == str(out)
    assert doc["saved_model"] is None
    assert doc["published"] is None


def test_map_save_model_then_push_then_pull_has_lineage(published, data, tmp_path):
    saved = tmp_path / "extension"
    text = run(*map_args(data, tmp_path / "m.h5ad", "--save-model", saved)).stdout
    assert f"hubarches push {saved} {ATLAS}" in text
    assert (saved / MANIFEST_FILE).is_file()
    pushed = run("push", saved, ATLAS).stdout
    assert pushed.startswith(f"Published {ATLAS}@2")
    doc = json.loads(run("pull", f"{ATLAS}@2", "--json").stdout)
    lineage = doc["manifest"]["lineage"]
    assert lineage["parent"] == {"name": ATLAS, "version": 1, "digest": published.digest}
    assert lineage["added_categories"] == {"batch": ["qry_b0", "qry_b1"]}
    text = run("pull", f"{ATLAS}@2").stdout
    assert f"extends {ATLAS}@1 (sha256:{published.digest[:12]})" in text


def test_map_push_publishes_the_next_version(published, data, tmp_path):
    doc = json.loads(run(*map_args(data, tmp_path / "m.h5ad", "--push", "--json")).stdout)
    assert doc["published"]["version"] == 2
    text = run("info", ATLAS).stdout
    assert f"extends {ATLAS}@1" in text
    assert "Versions:    1, 2 (latest)" in text


def _card_map_command(card: str) -> list[str]:
    """The ``hubarches map`` line of a model card's bash example, split as a shell would."""
    lines = [line for line in card.splitlines() if line.startswith("hubarches map ")]
    assert len(lines) == 1, card
    return shlex.split(lines[0])


def test_the_model_cards_map_command_runs(published, data, isolated_env, tmp_path, monkeypatch):
    """Copied from the card of a published version, the command maps a query as it says."""
    card = (isolated_env.registry / "org" / "atlas" / "1" / CARD_FILE).read_text()
    argv = _card_map_command(card)
    assert argv[:3] == ["hubarches", "map", f"{ATLAS}@1"]
    shutil.copy(data / "query.h5ad", tmp_path / argv[3])
    monkeypatch.chdir(tmp_path)
    # Only speed settings are added: whatever the command needs must already be in the card.
    run(*argv[1:], "--epochs", "2", "--device", "cpu")
    assert ad.read_h5ad(tmp_path / "mapped.h5ad").obsm["X_hubarches"].shape == (60, N_LATENT)


def test_map_save_model_keeps_the_reference_embedding(published, data, isolated_env, tmp_path):
    """The extension carries its parent's reference cells, listed and verified like weights."""
    saved = tmp_path / "extension"
    run(*map_args(data, tmp_path / "m.h5ad", "--save-model", saved))
    manifest = verify_bundle(saved)
    assert EMBEDDING_FILE in manifest.files
    assert manifest.files[EMBEDDING_FILE].size == (saved / EMBEDDING_FILE).stat().st_size
    parent = load_file(isolated_env.registry / "org" / "atlas" / "1" / EMBEDDING_FILE)
    extension = load_file(saved / EMBEDDING_FILE)
    assert set(extension) == set(parent)
    for name, tensor in parent.items():
        np.testing.assert_array_equal(extension[name], tensor)
    assert f"{EMBEDDING_FILE} (" in run("info", saved).stdout
    embedding = bytearray((saved / EMBEDDING_FILE).read_bytes())
    embedding[len(embedding) // 2] ^= 0xFF
    (saved / EMBEDDING_FILE).write_bytes(bytes(embedding))
    with pytest.raises(IntegrityError) as err:
        verify_bundle(saved)
    assert err.value.filename == EMBEDDING_FILE
    error_line(run("push", saved, ATLAS, code=1), "IntegrityError")


def _map_thresholds(data: Path, out: Path, *, uncertainty: str, quality: str):
    """Map with both thresholds given; return the --json report and the mapped obs."""
    thresholds = ("--uncertainty-threshold", uncertainty, "--quality-threshold", quality)
    doc = json.loads(run(*map_args(data, out, "--json", *thresholds)).stdout)
    return doc, ad.read_h5ad(out).obs


def test_map_thresholds_decide_unknown_labels_and_flags(published, data, tmp_path):
    default = json.loads(run(*map_args(data, tmp_path / "default.h5ad", "--json")).stdout)
    assert default["labels"]["threshold"] == DEFAULT_UNCERTAINTY_THRESHOLD
    assert default["mapping_quality"]["threshold"] == MAPPING_QUALITY_THRESHOLD

    # A huge quality threshold flags no cell; uncertainty 0 calls every uncertain cell Unknown.
    strict, obs = _map_thresholds(data, tmp_path / "strict.h5ad", uncertainty="0", quality="1e9")
    assert obs["hubarches_mapping_ok"].all()
    assert strict["mapping_quality"]["n_flagged"] == 0
    assert strict["mapping_quality"]["threshold"] == 1e9
    uncertain = obs["hubarches_label_uncertainty"].to_numpy() > 0
    assert uncertain.sum() > 0  # the threshold has something to decide
    unknown = (obs["hubarches_label"] == UNKNOWN_LABEL).to_numpy()
    np.testing.assert_array_equal(unknown, uncertain)
    assert strict["labels"]["threshold"] == 0
    assert strict["labels"]["n_unknown"] == strict["labels"]["counts"][UNKNOWN_LABEL]
    assert strict["labels"]["n_unknown"] == int(uncertain.sum())
    assert strict["labels"]["n_flagged_unknown"] == 0

    # Uncertainty 1 lets every cell keep its vote's winner.
    lenient, obs = _map_thresholds(data, tmp_path / "lenient.h5ad", uncertainty="1", quality="1e9")
    assert lenient["labels"]["n_unknown"] == 0
    assert lenient["labels"]["counts"][UNKNOWN_LABEL] == 0
    assert (obs["hubarches_label"] != UNKNOWN_LABEL).all()

    # A tiny quality threshold flags every cell, and flagged cells are Unknown whatever the vote.
    off, obs = _map_thresholds(data, tmp_path / "off.h5ad", uncertainty="1", quality="1e-6")
    assert not obs["hubarches_mapping_ok"].any()
    assert off["mapping_quality"]["n_flagged"] == 60
    assert off["labels"]["n_unknown"] == off["labels"]["n_flagged_unknown"] == 60
    assert (obs["hubarches_label"] == UNKNOWN_LABEL).all()


def test_map_streams_a_backed_query_to_the_same_result(published, data, tmp_path):
    run(*map_args(data, tmp_path / "memory.h5ad", "--in-memory"))
    run(*map_args(data, tmp_path / "backed.h5ad", "--backed"))
    memory, backed = (ad.read_h5ad(tmp_path / f"{n}.h5ad") for n in ("memory", "backed"))
    np.testing.assert_array_equal(backed.obsm["X_hubarches"], memory.obsm["X_hubarches"])
    assert (backed.X != ad.read_h5ad(data / "query.h5ad").X).nnz == 0  # counts copied


def test_map_renders_library_warnings_as_one_line(published, data, tmp_path):
    query = ad.read_h5ad(data / "query.h5ad")
    names = list(query.var_names)
    for i in range(10):  # 26 of 40 reference genes left: between the refuse and warn levels
        names[i] = f"unknown_{i}"
    query.var_names = names
    query.write_h5ad(tmp_path / "low.h5ad")
    result = run(
        "map", ATLAS, tmp_path / "low.h5ad", "--batch-key", "batch",
        "--out", tmp_path / "m.h5ad", "--epochs", "1",
    )  # fmt: skip
    warned = [line for line in result.stderr.splitlines() if line.startswith("warning: ")]
    assert warned, result.stderr
    assert all("\n" not in w for w in warned)


# --- train ----------------------------------------------------------------------------------


def test_train_then_push(data, tmp_path):
    out = tmp_path / "trained"
    text = run(
        "train", data / "atlas.h5ad", "--batch-key", "batch", "--label-key", "cell_type",
        "--name", ATLAS, "--out", out, *TINY, "--description", "a tiny atlas",
    ).stdout  # fmt: skip
    assert f"Next: publish it: hubarches push {out} {ATLAS}" in text
    assert "150 trained on" in text
    assert "3 epochs, final loss" in text
    manifest = read_manifest(out / MANIFEST_FILE)
    assert manifest.name is None
    assert manifest.description == "a tiny atlas"
    assert manifest.model.n_latent == N_LATENT
    assert manifest.labels is not None
    assert run("push", out, ATLAS).stdout.startswith(f"Published {ATLAS}@1")
    assert json.loads(run("info", ATLAS, "--json").stdout)["manifest"]["description"] == (
        "a tiny atlas"
    )


def test_train_push_flag_and_json(data, tmp_path):
    out = tmp_path / "trained"
    doc = json.loads(
        run(
            "train", data / "atlas.h5ad", "--batch-key", "batch", "--name", ATLAS,
            "--out", out, *TINY, "--likelihood", "nb", "--extra-covariate", "cell_type",
            "--push", "--json",
        ).stdout
    )  # fmt: skip
    assert doc["published"]["version"] == 1
    assert doc["training"]["epochs"] == 3
    assert doc["manifest"]["model"]["likelihood"] == "nb"
    assert [c["key"] for c in doc["manifest"]["covariates"]] == ["batch", "cell_type"]


# --- errors ---------------------------------------------------------------------------------


def test_user_errors_are_one_typed_line_and_exit_1(published, bundle, data, tmp_path):
    out = tmp_path / "m.h5ad"
    cases = [
        (["pull", "org/missing"], "ReferenceNotFound"),
        (["pull", "not a ref"], "ReferenceStringError"),
        (["info", f"{ATLAS}@7"], "VersionNotFound"),
        (map_args(data, out, ref="org/missing"), "ReferenceNotFound"),
        (["push", tmp_path, ATLAS], "PushError"),
        (["push", bundle, "no-slash"], "ReferenceStringError"),
    ]
    for args, kind in cases:
        error_line(run(*args, code=EXIT_ERROR), kind)
    assert not out.exists()


def test_query_errors(published, data, tmp_path):
    out = tmp_path / "m.h5ad"
    missing = run(
        "map", ATLAS, tmp_path / "nope.h5ad", "--batch-key", "batch", "--out", out, code=1
    )
    assert "nope.h5ad: No such file or directory" in error_line(missing, "FileNotFoundError")
    (tmp_path / "corrupt.h5ad").write_bytes(b"not an h5ad file")
    corrupt = run(
        "map", ATLAS, tmp_path / "corrupt.h5ad", "--batch-key", "batch", "--out", out, code=1
    )
    assert "cannot read the query" in error_line(corrupt, "DataError")
    wrong_key = run(*map_args(data, out)[:3], "--batch-key", "sample", "--out", out, code=1)
    assert "'sample'" in error_line(wrong_key, "CovariateError")

    query = ad.read_h5ad(data / "query.h5ad")
    query.var_names = [f"other_{i}" for i in range(query.n_vars)]
    query.write_h5ad(tmp_path / "genes.h5ad")
    genes = run("map", ATLAS, tmp_path / "genes.h5ad", "--batch-key", "batch", "--out", out,
                code=1)  # fmt: skip
    error_line(genes, "GeneAlignmentError")
    query = ad.read_h5ad(data / "query.h5ad")
    query.X = np.log1p(query.X.toarray() * 1.5)
    query.write_h5ad(tmp_path / "log.h5ad")
    counts = run("map", ATLAS, tmp_path / "log.h5ad", "--batch-key", "batch", "--out", out,
                 code=1)  # fmt: skip
    assert "--layer" in error_line(counts, "CountsError") or "layer" in counts.stderr
    assert not out.exists()


def test_outputs_are_checked_before_any_training(published, bundle, data, tmp_path, monkeypatch):
    import hubarches.pipeline

    def fail(*args, **kwargs):
        raise AssertionError("training started")

    monkeypatch.setattr(hubarches.pipeline, "map_query", fail)
    monkeypatch.setattr(hubarches.pipeline, "train_atlas", fail)
    taken = tmp_path / "taken"
    taken.mkdir()
    error_line(run(*map_args(data, tmp_path / "m.h5ad", "--save-model", taken), code=1),
               "BundleExistsError")  # fmt: skip
    error_line(run(*map_args(data, tmp_path / "no" / "dir" / "m.h5ad"), code=1),
               "FileNotFoundError")  # fmt: skip
    unpublished = map_args(data, tmp_path / "m.h5ad", "--push", ref=bundle)
    assert "--save-model" in error_line(run(*unpublished, code=1), "PushError")
    train = ["train", data / "atlas.h5ad", "--batch-key", "batch", "--out"]
    error_line(run(*train, taken, "--name", ATLAS, code=1), "BundleExistsError")
    error_line(run(*train, tmp_path / "new", "--name", "bad name", code=1),
               "ReferenceStringError")  # fmt: skip


def test_a_corrupted_bundle_is_refused(published, isolated_env):
    weights = isolated_env.registry / "org" / "atlas" / "1" / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0xFF
    weights.write_bytes(bytes(data))
    error_line(run("pull", ATLAS, code=1), "IntegrityError")


def test_a_registry_that_is_a_file_is_refused(bundle, tmp_path):
    plain = tmp_path / "registry.txt"
    plain.write_text("not a registry")
    for args in (["list"], ["pull", "hubarches/demo"], ["info", ATLAS], ["push", bundle, ATLAS]):
        line = error_line(run(*args, "--registry", plain, code=EXIT_ERROR), "RegistryError")
        assert f"--registry names {plain}, which is a file, not a directory" in line
    line = error_line(run("list", code=EXIT_ERROR, env={"HUBARCHES_REGISTRY": str(plain)}),
                      "RegistryError")  # fmt: skip
    assert "$HUBARCHES_REGISTRY names" in line
    assert plain.read_text() == "not a registry"


# Runs the CLI with time.sleep a no-op: huggingface_hub's http_backoff retries a refused
# connection five times, sleeping 1+2+4+8+8 s in between, and no setting shortens that.
_NO_BACKOFF = (
    "import sys, time; time.sleep = lambda s: None; from hubarches.cli import main; "
    "sys.exit(main(sys.argv[1:]))"
)


def _closed_port() -> int:
    """A local TCP port nothing listens on (bound once, then released)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_an_unreachable_hub_is_one_line_without_retry_logs():
    hub = f"hf://http://127.0.0.1:{_closed_port()}"
    env = dict(os.environ)
    commands = {
        "list": (["list", "--registry", hub], env, "RegistryError"),
        "pull": (["pull", ATLAS, "--registry", hub], env, "RegistryOfflineError"),
        "debug": (["list", "--registry", hub], {**env, "HUBARCHES_DEBUG": "1"}, "RegistryError"),
    }
    procs = {
        name: subprocess.Popen(
            [sys.executable, "-c", _NO_BACKOFF, *args], env=run_env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        )
        for name, (args, run_env, _) in commands.items()
    }  # fmt: skip
    for name, proc in procs.items():
        stdout, stderr = proc.communicate(timeout=SUBPROCESS_TIMEOUT_S)
        kind = commands[name][2]
        assert proc.returncode == EXIT_ERROR, stderr
        if name == "debug":  # debug mode shows what failed underneath
            assert "Traceback" in stderr
            assert "ConnectError" in stderr
            assert stderr.strip().splitlines()[-1].startswith(f"error ({kind}): ")
            continue
        lines = (stdout + stderr).strip().splitlines()
        assert len(lines) == 1, stdout + stderr
        assert lines[0].startswith(f"error ({kind}): ")


def test_usage_errors_exit_2_with_one_line(published, data, tmp_path):
    query = data / "query.h5ad"
    cases = [
        ["map", ATLAS, query, "--out", tmp_path / "m.h5ad"],  # no --batch-key
        ["map", ATLAS, query, "--batch-key", "batch", "--out", query],  # overwrite the query
        ["pull", ATLAS, "--no-such-option"],
        ["train", query, "--batch-key", "b", "--name", ATLAS, "--out", "x", "--likelihood", "t"],
        ["map", ATLAS, query, "--batch-key", "batch", "--out", "x", "--covariate-key", "nokey"],
        ["map", ATLAS, query, "--batch-key", "batch", "--out", "x", "--device", "nonsense"],
        ["frobnicate"],
    ]
    for args in cases:
        result = run(*args, code=EXIT_USAGE)
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1, result.stderr
        assert lines[0].startswith("error (usage): ")
        assert "--help" in lines[0]


def test_interrupt_exits_130_and_bugs_say_so(published, data, tmp_path, monkeypatch):
    import hubarches.pipeline

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(hubarches.pipeline, "map_query", interrupt)
    result = run(*map_args(data, tmp_path / "m.h5ad"), code=EXIT_INTERRUPTED)
    assert "interrupted" in result.stderr

    def bug(*args, **kwargs):
        raise RuntimeError("unexpected\nstate")

    monkeypatch.setattr(hubarches.pipeline, "map_query", bug)
    line = error_line(run(*map_args(data, tmp_path / "m.h5ad"), code=1), "RuntimeError")
    assert "unexpected state" in line
    assert "HUBARCHES_DEBUG=1" in line


def test_debug_shows_the_traceback(published):
    result = run("pull", "org/missing", code=1, env={"HUBARCHES_DEBUG": "1"})
    assert "Traceback (most recent call last)" in result.stderr
    assert result.stderr.strip().splitlines()[-1].startswith("error (ReferenceNotFound): ")


# --- rendering and progress -----------------------------------------------------------------


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_bar_only_on_a_terminal_and_not_quiet():
    terminal = _Terminal()
    assert cli_render.progress_enabled(quiet=False, stream=terminal)
    assert not cli_render.progress_enabled(quiet=True, stream=terminal)
    assert not cli_render.progress_enabled(quiet=False, stream=io.StringIO())
    with cli_render.EpochBar("Training", enabled=True, stream=terminal) as bar:
        for epoch in range(2):
            bar(EpochStats(epoch, 1234.5, 1200.0, 34.5, 1.0), 2)
    assert "Training" in terminal.getvalue()
    assert "2/2" in terminal.getvalue()
    silent = _Terminal()
    with cli_render.EpochBar("Training", enabled=False, stream=silent) as bar:
        bar(EpochStats(0, 1.0, 1.0, 0.0, 1.0), 1)
    assert silent.getvalue() == ""


def test_fields_align_and_skip_missing_values():
    text = cli_render.fields([("A", 1), ("Longer", "x\ny"), ("Skipped", None)])
    assert text.splitlines() == ["A:      1", "Longer: x", "        y"]


# --- a real subprocess of the installed entry point -----------------------------------------


def _entry_point() -> Path:
    found = shutil.which("hubarches", path=str(Path(sys.executable).parent))
    # Not a skip: the installed entry point is what users run, and a missing install step
    # must fail the suite rather than hide behind a green run.
    assert found is not None, "the hubarches script is not installed beside this Python"
    return Path(found)


def test_installed_entry_point(published):
    script = _entry_point()
    env = dict(os.environ)
    runs = {
        "ok": subprocess.Popen(
            [script, "pull", ATLAS, "--json"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        ),
        "error": subprocess.Popen(
            [script, "pull", "org/missing"], env=env, stdout=subprocess.PIPE,
            stderr=subprocess.PIPE, text=True,
        ),
        "debug": subprocess.Popen(
            [script, "pull", "org/missing"], env={**env, "HUBARCHES_DEBUG": "1"},
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        ),
    }  # fmt: skip
    out = {k: (*p.communicate(timeout=SUBPROCESS_TIMEOUT_S), p.returncode) for k, p in runs.items()}
    stdout, stderr, code = out["ok"]
    assert code == 0, stderr
    assert json.loads(stdout)["digest"] == published.digest
    _, stderr, code = out["error"]
    assert code == EXIT_ERROR
    assert stderr.strip().startswith("error (ReferenceNotFound): ")
    assert len(stderr.strip().splitlines()) == 1
    _, stderr, code = out["debug"]
    assert code == EXIT_ERROR
    assert "Traceback (most recent call last)" in stderr


# --- against a Hugging Face Hub-compatible server -------------------------------------------


@pytest.fixture
def hub(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> str:  # noqa: F811
    hub_server.add_token(TOKEN, "alice", orgs=("org",))
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return f"hf://{hub_server.endpoint}"


def test_pull_map_push_against_the_hub(hub, bundle, data, tmp_path):
    results = []

    def hub_run(*args: object, code: int = 0, env: dict[str, str] | None = None):
        results.append(run(*args, code=code, env=env))
        return results[-1]

    pushed = json.loads(hub_run("push", bundle, ATLAS, "--registry", hub, "--json").stdout)
    assert pushed["version"] == 1
    assert pushed["registry"] == hub.removeprefix("hf://")
    pulled = json.loads(hub_run("pull", ATLAS, "--registry", hub, "--json").stdout)
    assert pulled["digest"] == pushed["digest"]
    doc = json.loads(
        hub_run(*map_args(data, tmp_path / "m.h5ad", "--push", "--registry", hub, "--json")).stdout
    )
    assert doc["reference"]["digest"] == pushed["digest"]
    assert doc["published"]["version"] == 2
    text = hub_run("pull", f"{ATLAS}@2", "--registry", hub).stdout
    assert f"extends {ATLAS}@1 (sha256:{pushed['digest'][:12]})" in text
    listing = json.loads(hub_run("list", "--registry", hub, "--json").stdout)
    assert [a["name"] for a in listing["atlases"]] == [ATLAS]
    assert listing["atlases"][0]["latest"] == 2
    # The Hub answers an unknown repo as it answers a private one.
    error_line(hub_run("pull", "org/other", "--registry", hub, code=1), "RegistryAccessError")
    # A push the token may not make fails, and its error (traceback too) omits the token.
    refused = ("push", bundle, "someone/else", "--registry", hub)
    error_line(hub_run(*refused, code=1), "PushError")
    assert "Traceback" in hub_run(*refused, code=1, env={"HUBARCHES_DEBUG": "1"}).stderr
    assert len(results) == 8
    for result in results:  # the token authorised every call and never shows in the output
        assert TOKEN not in result.stdout
        assert TOKEN not in result.stderr
        assert TOKEN[3:15] not in result.output
