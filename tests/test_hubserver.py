"""The fake Hub itself, driven by the real huggingface_hub client: it behaves like the Hub."""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest
from hubserver import HubServer, hub_server  # noqa: F401
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    hf_hub_download,
    snapshot_download,
)
from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

# huggingface_hub's own LFS upload passes a file as data= to its HTTP library, which warns.
pytestmark = pytest.mark.filterwarnings("ignore:Use 'content=:DeprecationWarning")

TOKEN = "hf_serverTestTokenOfAlice000000000"
OTHER = "hf_serverTestTokenOfMallory0000000"
REPO = "org/demo"
WEIGHTS = bytes(range(256)) * 8
CARD = b"---\nlibrary_name: hubarches\n---\n# demo\n"


@pytest.fixture
def hub(hub_server: HubServer) -> HubServer:  # noqa: F811
    hub_server.add_token(TOKEN, "alice", orgs=("org",))
    hub_server.add_token(OTHER, "mallory")
    return hub_server


@pytest.fixture
def api(hub: HubServer) -> HfApi:
    return HfApi(endpoint=hub.endpoint, token=TOKEN)


def head(api: HfApi, repo: str = REPO) -> str:
    return next(b.target_commit for b in api.list_repo_refs(repo).branches if b.name == "main")


def commit_v1(api: HfApi) -> str:
    api.create_repo(REPO, private=True)
    info = api.create_commit(
        REPO,
        [CommitOperationAdd("README.md", CARD), CommitOperationAdd("model.safetensors", WEIGHTS)],
        commit_message="v1",
        parent_commit=head(api),
    )
    api.create_tag(REPO, tag="v1", revision=info.oid)
    return info.oid


def test_commits_are_trees_main_moves_and_tags_stay(hub, api):
    api.create_repo(REPO)
    initial = head(api)
    assert [f.path for f in api.list_repo_tree(REPO)] == [".gitattributes"]
    one = api.create_commit(
        REPO, [CommitOperationAdd("model.safetensors", WEIGHTS)], commit_message="one"
    ).oid
    api.create_tag(REPO, tag="v1", revision=one)
    two = api.create_commit(
        REPO, [CommitOperationDelete("model.safetensors")], commit_message="two"
    ).oid
    refs = api.list_repo_refs(REPO)
    assert {t.name: t.target_commit for t in refs.tags} == {"v1": one}
    assert head(api) == two != initial
    assert [f.path for f in api.list_repo_tree(REPO, revision="v1")] == [
        ".gitattributes",
        "model.safetensors",
    ]
    assert [f.path for f in api.list_repo_tree(REPO, revision=two)] == [".gitattributes"]
    assert api.model_info(REPO, revision="v1").sha == one


def test_weights_go_through_lfs_and_download_with_commit_and_etag(hub, api, tmp_path):
    commit = commit_v1(api)
    assert any(r.startswith("PUT /_lfs/upload/") for r in hub.requests)
    entry = next(
        f for f in api.list_repo_tree(REPO, revision="v1") if f.path == "model.safetensors"
    )
    assert entry.lfs.sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    meta = api.get_hf_file_metadata(url=f"{hub.endpoint}/{REPO}/resolve/v1/model.safetensors")
    assert (meta.commit_hash, meta.etag, meta.size) == (commit, entry.lfs.sha256, len(WEIGHTS))
    path = hf_hub_download(
        REPO,
        "model.safetensors",
        revision=commit,
        endpoint=hub.endpoint,
        token=TOKEN,
        cache_dir=tmp_path / "cache",
    )
    assert Path(path).read_bytes() == WEIGHTS
    folder = snapshot_download(
        REPO, revision="v1", endpoint=hub.endpoint, token=TOKEN, local_dir=tmp_path / "snap"
    )
    assert (tmp_path / "snap" / "README.md").read_bytes() == CARD
    assert folder == str((tmp_path / "snap").resolve())


def test_stale_parent_commit_and_existing_tag_are_refused(hub, api):
    commit = commit_v1(api)
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_commit(
            REPO,
            [CommitOperationAdd("x.txt", b"x")],
            commit_message="late",
            parent_commit=hub.repo(REPO).commits[commit].parent,  # stale: main moved on
        )
    assert exc.value.response.status_code == 412
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_tag(REPO, tag="v1", revision="main")
    assert exc.value.response.status_code == 409
    assert {t.name: t.target_commit for t in api.list_repo_refs(REPO).tags} == {"v1": commit}
    assert hub.state.refusals == {"parent-commit": 1, "tag-exists": 1}


def test_private_repos_answer_like_the_hub(hub, api, tmp_path):
    commit_v1(api)
    anonymous = HfApi(endpoint=hub.endpoint, token=False)
    with pytest.raises(RepositoryNotFoundError) as exc:
        anonymous.list_repo_refs(REPO)
    assert exc.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError) as exc:
        HfApi(endpoint=hub.endpoint, token=OTHER).list_repo_refs(REPO)
    assert exc.value.response.status_code == 404
    with pytest.raises(HfHubHTTPError) as exc:
        HfApi(endpoint=hub.endpoint, token="hf_unknown").list_repo_refs(REPO)
    assert exc.value.response.status_code == 401
    assert not isinstance(exc.value, RepositoryNotFoundError)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(REPO, "README.md", endpoint=hub.endpoint, token=False, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_tree(REPO, revision="v9").__next__()
    assert api.whoami()["name"] == "alice"


def test_tampered_bytes_keep_their_size_and_the_client_accepts_them(hub, api, tmp_path):
    commit = commit_v1(api)
    hub.tamper(REPO, "model.safetensors")
    path = hf_hub_download(
        REPO,
        "model.safetensors",
        revision=commit,
        endpoint=hub.endpoint,
        token=TOKEN,
        cache_dir=tmp_path,
    )
    data = Path(path).read_bytes()
    assert len(data) == len(WEIGHTS)
    assert data != WEIGHTS


def test_models_are_listed_by_card_library_and_visibility(hub, api):
    commit_v1(api)
    api.create_repo("org/other")
    assert [m.id for m in api.list_models(filter="hubarches")] == [REPO]
    assert [m.id for m in api.list_models(author="org")] == [REPO, "org/other"]
    assert [m.id for m in HfApi(endpoint=hub.endpoint, token=False).list_models()] == ["org/other"]
