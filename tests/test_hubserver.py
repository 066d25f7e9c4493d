"""The test Hub server against the real huggingface_hub client (no network)."""

from __future__ import annotations

import hashlib
import json
import os
import struct
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

try:
    from tests.hubserver import DEFAULT_TOKEN, HubServer, SparseFile, hub_env
except ImportError:  # tests/ is not a package: pytest puts tests/ itself on sys.path
    from hubserver import DEFAULT_TOKEN, HubServer, SparseFile, hub_env

from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)


@pytest.fixture
def server(tmp_path):
    with HubServer() as srv, hub_env(srv, home=tmp_path / "hf_home"):
        yield srv


def _sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def _st_bytes(tmp_path: Path, name: str, tensors: dict) -> bytes:
    path = tmp_path / name
    save_file(tensors, path)
    return path.read_bytes()


def _header_len(data: bytes) -> int:
    return 8 + struct.unpack("<Q", data[:8])[0]


def _model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    folder.mkdir()
    save_file({"w": torch.arange(2048, dtype=torch.float32), "b": torch.ones(4, 4)}, folder / "model.safetensors")
    (folder / "config.json").write_text(json.dumps({"model_type": "minimax_m1", "architectures": ["X"]}))
    return folder


def _sharded_repo(server: HubServer, tmp_path: Path, repo_id: str = "org/sharded") -> dict[str, bytes]:
    s1 = _st_bytes(tmp_path, "s1", {"a": torch.zeros(1000), "b": torch.ones(10, 10)})
    s2 = _st_bytes(tmp_path, "s2", {"c": torch.arange(50_000, dtype=torch.int32)})  # > 100 kB: partial Range read
    index = {"metadata": {"total_size": 4400 + 200_000},
             "weight_map": {"a": "model-00001-of-00002.safetensors", "b": "model-00001-of-00002.safetensors",
                            "c": "model-00002-of-00002.safetensors"}}
    files = {"config.json": b"{}", "model.safetensors.index.json": json.dumps(index).encode(),
             "model-00001-of-00002.safetensors": s1, "model-00002-of-00002.safetensors": s2}
    server.add_repo(repo_id, files)
    return files


# ------------------------------------------------------------------------------------------------ upload / download


def test_upload_folder_then_info_and_download(server, tmp_path):
    folder = _model_folder(tmp_path)
    weights = (folder / "model.safetensors").read_bytes()
    api = HfApi()
    url = api.create_repo("org/tiny")
    assert url.repo_id == "org/tiny" and url.startswith(server.url)
    assert api.create_repo("org/tiny", exist_ok=True).repo_id == "org/tiny"
    with pytest.raises(HfHubHTTPError) as exc:
        api.create_repo("org/tiny")
    assert exc.value.response.status_code == 409

    commit = api.upload_folder(repo_id="org/tiny", folder_path=folder, commit_message="add model")
    assert server.lfs_uploads == [("org/tiny", _sha256(weights), len(weights))]
    assert server.lfs_bytes_uploaded == len(weights)
    assert [r.kind for r in server.requests_for(method="PUT")] == ["lfs-upload"]

    info = api.model_info("org/tiny", files_metadata=True)
    assert info.sha == commit.oid == server.head("org/tiny")
    sib = {s.rfilename: s for s in info.siblings}
    assert set(sib) == {".gitattributes", "config.json", "model.safetensors"}
    assert sib["model.safetensors"].lfs.sha256 == _sha256(weights)
    assert sib["model.safetensors"].lfs.size == sib["model.safetensors"].size == len(weights)
    assert sib["config.json"].lfs is None and sib["config.json"].size == (folder / "config.json").stat().st_size
    assert info.safetensors.total == 2048 + 16
    assert info.config == {"model_type": "minimax_m1", "architectures": ["X"]}

    server.reset_counters()
    path = hf_hub_download("org/tiny", "model.safetensors")
    assert Path(path).read_bytes() == weights
    assert str(path).startswith(str(constants.HF_HUB_CACHE))
    assert [(r.method, r.status) for r in server.requests_for(kind="resolve")] == [("HEAD", 200), ("GET", 200)]
    assert server.bytes_sent_by_file == {("org/tiny", "model.safetensors"): len(weights)}
    assert server.tensor_bytes_sent == len(weights) - _header_len(weights)
    assert server.files_transferred() == {"model.safetensors"}

    # cached: a second call sends a HEAD only, no content
    server.reset_counters()
    assert hf_hub_download("org/tiny", "model.safetensors") == path
    assert [r.method for r in server.requests] == ["HEAD"] and server.files_transferred() == set()
    assert api.list_repo_files("org/tiny") == [".gitattributes", "config.json", "model.safetensors"]
    assert server.server_errors == []


def test_rerun_upload_skips_lfs_and_resumes_after_failed_commit(server, tmp_path):
    folder = _model_folder(tmp_path)
    api = HfApi()
    api.create_repo("org/resume")
    server.inject_fault(r"/api/models/org/resume/commit/", mode=500, times=1)
    with pytest.raises(HfHubHTTPError):
        api.upload_folder(repo_id="org/resume", folder_path=folder)
    assert len(server.lfs_uploads) == 1  # the shard got uploaded, the commit failed
    assert server.list_files("org/resume") == [".gitattributes"]

    server.reset_counters()
    commit = api.upload_folder(repo_id="org/resume", folder_path=folder)
    assert server.lfs_bytes_uploaded == 0 and server.lfs_uploads == []
    assert server.requests_for(method="PUT") == []
    assert server.requests_for(kind="lfs-batch")[0].status == 200
    assert server.list_files("org/resume") == [".gitattributes", "config.json", "model.safetensors"]
    assert commit.oid == server.head("org/resume")

    # nothing changed: no LFS bytes, no new commit
    server.reset_counters()
    assert api.upload_folder(repo_id="org/resume", folder_path=folder).oid == commit.oid
    assert server.lfs_bytes_uploaded == 0 and server.requests_for(kind="commit") == []


def test_upload_retries_reset_put_and_multipart(server, tmp_path):
    folder = _model_folder(tmp_path)
    weights = (folder / "model.safetensors").read_bytes()
    api = HfApi()
    api.create_repo("org/retry", private=True, token=DEFAULT_TOKEN)
    server.lfs_multipart_chunk_size = 4096
    fault = server.inject_fault(r"^/__lfs/.*/part/1$", mode="reset", method="PUT")
    api.upload_folder(repo_id="org/retry", folder_path=folder, token=DEFAULT_TOKEN)
    assert fault.hits == 1
    n_parts = -(-len(weights) // 4096)
    assert len(server.requests_for(kind="lfs-part")) == n_parts + 1  # one part re-sent
    assert server.file_content("org/retry", "model.safetensors") == weights
    assert HfApi().model_info("org/retry", token=DEFAULT_TOKEN).private is True


def test_create_pr_and_revisions(server, tmp_path):
    first = server.add_repo("org/revs", {"config.json": b'{"v": 1}', "weights.bin": b"\x00" * 100})
    api = HfApi()
    folder = tmp_path / "up"
    folder.mkdir()
    (folder / "config.json").write_text('{"v": 2}')
    commit = api.upload_folder(repo_id="org/revs", folder_path=folder, create_pr=True, commit_message="bump")
    assert commit.pr_revision == "refs/pr/1" and commit.pr_num == 1
    assert server.head("org/revs", "main") == first
    assert server.head("org/revs", "refs/pr/1") == commit.oid
    assert api.model_info("org/revs", revision="refs/pr/1").sha == commit.oid
    assert Path(hf_hub_download("org/revs", "config.json", revision="refs/pr/1")).read_text() == '{"v": 2}'
    assert Path(hf_hub_download("org/revs", "config.json")).read_text() == '{"v": 1}'
    assert Path(hf_hub_download("org/revs", "config.json", revision=first)).read_text() == '{"v": 1}'
    refs = api.list_repo_refs("org/revs", include_pull_requests=True)
    assert [b.name for b in refs.branches] == ["main"] and [p.ref for p in refs.pull_requests] == ["refs/pr/1"]
    assert [c.commit_id for c in api.list_repo_commits("org/revs", revision="refs/pr/1")][:2] == [commit.oid, first]
    api.create_branch("org/revs", branch="dev", revision=first)
    assert api.model_info("org/revs", revision="dev").sha == first
    server.add_tag("org/revs", "v1", revision=first)
    assert api.model_info("org/revs", revision="v1").sha == first
    assert api.model_info("org/revs", revision=first[:10]).sha == first  # short sha


def test_tree_and_snapshot_download(server, tmp_path):
    big = _st_bytes(tmp_path, "big", {"x": torch.ones(300)})
    server.add_repo("org/tree", {"a.json": b"{}", "sub/b.txt": b"hello", "sub/deep/model.safetensors": big})
    api = HfApi()
    entries = {e.path: e for e in api.list_repo_tree("org/tree", recursive=True)}
    assert set(entries) == {"a.json", "sub", "sub/b.txt", "sub/deep", "sub/deep/model.safetensors"}
    lfs = entries["sub/deep/model.safetensors"].lfs
    assert lfs.sha256 == _sha256(big) and lfs.size == len(big) and entries["sub/b.txt"].lfs is None
    assert entries["sub/b.txt"].blob_id == hashlib.sha1(b"blob 5\0hello").hexdigest()
    assert [e.path for e in api.list_repo_tree("org/tree", path_in_repo="sub")] == ["sub/b.txt", "sub/deep"]
    assert api.list_repo_files("org/tree") == ["a.json", "sub/b.txt", "sub/deep/model.safetensors"]
    [info] = api.get_paths_info("org/tree", ["sub/b.txt", "missing"])
    assert info.size == 5

    local = snapshot_download("org/tree", local_dir=tmp_path / "snap")
    assert (Path(local) / "sub/deep/model.safetensors").read_bytes() == big
    assert (Path(local) / "sub/b.txt").read_bytes() == b"hello"


# ------------------------------------------------------------------------------------------------ safetensors / ranges


def test_get_safetensors_metadata_sharded(server, tmp_path):
    files = _sharded_repo(server, tmp_path)
    s1, s2 = files["model-00001-of-00002.safetensors"], files["model-00002-of-00002.safetensors"]
    meta = HfApi().get_safetensors_metadata("org/sharded")
    assert meta.sharded and meta.metadata == {"total_size": 204_400}
    assert meta.weight_map["c"] == "model-00002-of-00002.safetensors"
    assert meta.files_metadata["model-00002-of-00002.safetensors"].tensors["c"].shape == [50_000]
    assert meta.parameter_count == {"F32": 1100, "I32": 50_000}

    gets = server.requests_for(method="GET", kind="resolve")
    shard_gets = {r.filename: r for r in gets if r.filename.endswith("-of-00002.safetensors")}
    assert {f: (r.range, r.status) for f, r in shard_gets.items()} == {
        "model-00001-of-00002.safetensors": ("bytes=0-100000", 206),
        "model-00002-of-00002.safetensors": ("bytes=0-100000", 206)}
    # The client always reads the first 100,001 bytes: all of a small shard, part of a big one.
    assert server.bytes_sent_by_file[("org/sharded", "model-00001-of-00002.safetensors")] == len(s1)
    assert server.bytes_sent_by_file[("org/sharded", "model-00002-of-00002.safetensors")] == 100_001
    assert server.tensor_bytes_sent == (len(s1) - _header_len(s1)) + (100_001 - _header_len(s2))

    # get_sharded_safetensors_metadata: one API call, no file bytes at all
    server.reset_counters()
    meta2 = HfApi().get_sharded_safetensors_metadata("org/sharded")
    assert meta2.weight_map == meta.weight_map
    assert [r.kind for r in server.requests] == ["safetensors-metadata"] and server.tensor_bytes_sent == 0


def test_range_requests_are_counted(server, tmp_path):
    data = _st_bytes(tmp_path, "r", {"t": torch.arange(1000, dtype=torch.float32)})
    hl = _header_len(data)
    server.add_repo("org/range", {"model.safetensors": data})
    from huggingface_hub.utils import get_session

    url = f"{server.url}/org/range/resolve/main/model.safetensors"
    r = get_session().get(url, headers={"Range": f"bytes=0-{hl - 1}"})
    assert r.status_code == 206 and r.content == data[:hl]
    assert r.headers["Content-Range"] == f"bytes 0-{hl - 1}/{len(data)}"
    assert server.tensor_bytes_sent == 0
    assert server.bytes_sent_by_path["/org/range/resolve/main/model.safetensors"] == hl
    r = get_session().get(url, headers={"Range": "bytes=-10"})
    assert r.status_code == 206 and r.content == data[-10:]
    assert server.tensor_bytes_sent == 10 and server.tensor_bytes_requested == 10
    r = get_session().get(url, headers={"Range": f"bytes={len(data)}-"})
    assert r.status_code == 416
    r = get_session().head(url)
    assert r.headers["X-Linked-Size"] == str(len(data)) and r.headers["X-Linked-Etag"] == f'"{_sha256(data)}"'
    assert r.headers["X-Repo-Commit"] == server.head("org/range") and "X-Xet-Hash" not in r.headers
    assert [x.range for x in server.requests] == [f"bytes=0-{hl - 1}", "bytes=-10", f"bytes={len(data)}-", None]
    assert sum(x.bytes_sent for x in server.requests if x.status in (200, 206)) == hl + 10


def test_sparse_replica_serves_headers_without_data(server, tmp_path):
    shards, weight_map = {}, {}
    for i in range(1, 4):
        name = f"model-{i:05d}-of-00003.safetensors"
        header = _st_bytes(tmp_path, name, {f"layer{i}.w": torch.zeros(8)})
        header = header[: _header_len(header)]
        shards[name] = SparseFile(header, total_size=5 * 1024**3, sha256=f"{i:064x}")
        weight_map[f"layer{i}.w"] = name
    index = {"metadata": {"total_size": 15 * 1024**3}, "weight_map": weight_map}
    server.add_repo("org/replica", {"model.safetensors.index.json": json.dumps(index).encode(), **shards})

    api = HfApi()
    info = api.model_info("org/replica", files_metadata=True)
    sib = {s.rfilename: s for s in info.siblings}
    assert sib["model-00002-of-00003.safetensors"].size == 5 * 1024**3
    assert sib["model-00002-of-00003.safetensors"].lfs.sha256 == f"{2:064x}"

    meta = api.get_sharded_safetensors_metadata("org/replica")
    assert sorted(meta.files_metadata) == sorted(shards) and server.tensor_bytes_sent == 0

    meta = api.get_safetensors_metadata("org/replica")  # reads 100,001 bytes per shard: the rest is zeros
    assert meta.weight_map == weight_map
    assert server.tensor_bytes_sent == sum(100_001 - len(s.header_bytes) for s in shards.values())
    assert server.tensor_bytes_requested == server.tensor_bytes_sent

    server.sparse_read_limit = 1024
    with pytest.raises(HfHubHTTPError) as exc:
        hf_hub_download("org/replica", "model-00001-of-00003.safetensors")
    assert exc.value.response.status_code == 403


# ------------------------------------------------------------------------------------------------ errors / auth


def test_error_mapping(server):
    server.add_repo("org/public", {"config.json": b"{}"})
    server.add_repo("org/private", {"config.json": b"{}"}, private=True)
    server.add_repo("org/gated", {"config.json": b"{}"}, gated=True)
    api = HfApi()

    with pytest.raises(RepositoryNotFoundError):
        api.model_info("org/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/missing", "config.json")
    with pytest.raises(RevisionNotFoundError):
        api.model_info("org/public", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download("org/public", "config.json", revision="nope")
    with pytest.raises(RevisionNotFoundError):
        api.list_repo_files("org/public", revision="0123456789abcdef0123456789abcdef01234567")
    with pytest.raises(EntryNotFoundError):
        hf_hub_download("org/public", "nope.json")
    assert not api.file_exists("org/public", "nope.json") and api.file_exists("org/public", "config.json")

    with pytest.raises(RepositoryNotFoundError) as exc:
        api.model_info("org/private")
    assert exc.value.response.status_code == 401
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download("org/private", "config.json")
    assert api.model_info("org/private", token=DEFAULT_TOKEN).private is True

    assert api.model_info("org/gated").gated == "auto"  # metadata is public, files are not
    with pytest.raises(GatedRepoError):
        hf_hub_download("org/gated", "config.json")
    with pytest.raises(GatedRepoError):
        api.get_safetensors_metadata("org/gated")
    assert Path(hf_hub_download("org/gated", "config.json", token=DEFAULT_TOKEN)).read_bytes() == b"{}"

    with pytest.raises(HfHubHTTPError) as exc:
        api.model_info("org/public", token="hf_wrong")
    assert exc.value.response.status_code == 401 and not isinstance(exc.value, RepositoryNotFoundError)
    assert server.server_errors == []


def test_token_from_env_and_allowed_tokens(tmp_path):
    with HubServer(valid_tokens={"hf_a", "hf_b"}) as srv:
        srv.add_repo("org/priv", {"x.txt": b"x"}, private=True, allowed_tokens={"hf_a"})
        srv.add_repo("org/gate", {"x.txt": b"x"}, gated=True, allowed_tokens={"hf_a"})
        with hub_env(srv, token="hf_a", home=tmp_path / "a"):
            assert HfApi().model_info("org/priv").id == "org/priv"
            assert Path(hf_hub_download("org/gate", "x.txt")).read_bytes() == b"x"
            assert srv.requests[-1].authorization
        with hub_env(srv, token="hf_b", home=tmp_path / "b"):
            with pytest.raises(RepositoryNotFoundError):
                HfApi().model_info("org/priv")
            with pytest.raises(GatedRepoError) as exc:
                hf_hub_download("org/gate", "x.txt")
            assert exc.value.response.status_code == 403


# ------------------------------------------------------------------------------------------------ faults


def test_download_survives_truncated_body_and_head_500(server, tmp_path):
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(24 * 1024 * 1024))
    data = big.read_bytes()
    server.add_repo("org/flaky", {"model.bin": big, "small.bin": data[:1000]})
    head_fault = server.inject_fault(r"/org/flaky/resolve/main/model", mode=500, method="HEAD")
    get_fault = server.inject_fault(r"/org/flaky/resolve/main/model", mode="truncate", method="GET")
    server.inject_fault(r"/org/flaky/resolve/main/small", mode="truncate", method="GET")
    path = hf_hub_download("org/flaky", "model.bin")
    assert Path(path).read_bytes() == data
    assert head_fault.hits == 1 and get_fault.hits == 1
    gets = server.requests_for(method="GET", kind="resolve", filename="model.bin")
    # The client resumes from the last complete 10 MiB chunk it received (DOWNLOAD_CHUNK_SIZE).
    chunk = constants.DOWNLOAD_CHUNK_SIZE
    resumed_at = (len(data) // 2) // chunk * chunk
    assert [(g.range, g.status, g.fault) for g in gets] == [(None, 200, "truncate"),
                                                            (f"bytes={resumed_at}-", 206, None)]
    assert server.bytes_sent_by_file[("org/flaky", "model.bin")] == len(data) // 2 + len(data) - resumed_at

    # below one chunk, a truncated download starts over without a Range
    assert Path(hf_hub_download("org/flaky", "small.bin")).read_bytes() == data[:1000]
    assert [g.range for g in server.requests_for(method="GET", filename="small.bin")] == [None, None]


def test_corrupt_file_keeps_metadata(server, tmp_path):
    data = _st_bytes(tmp_path, "c", {"t": torch.ones(100)})
    server.add_repo("org/corrupt", {"model.safetensors": data, "other.safetensors": data})
    server.corrupt_file("org/corrupt", "model.safetensors")
    server.corrupt_file("org/corrupt", "other.safetensors", declared_sha256="f" * 64)
    api = HfApi()
    sib = {s.rfilename: s for s in api.model_info("org/corrupt", files_metadata=True).siblings}
    assert sib["model.safetensors"].lfs.sha256 == _sha256(data)
    assert sib["other.safetensors"].lfs.sha256 == "f" * 64
    got = Path(hf_hub_download("org/corrupt", "model.safetensors")).read_bytes()
    assert len(got) == len(data) and got != data and got[:-1] == data[:-1]
    assert _sha256(Path(hf_hub_download("org/corrupt", "other.safetensors")).read_bytes()) != "f" * 64


def test_hub_env_restores_client_state(tmp_path):
    before = (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_CACHE,
              constants.HF_HUB_DISABLE_XET)
    with HubServer() as srv, hub_env(srv, home=tmp_path / "h") as env:
        assert constants.ENDPOINT == srv.url == env.endpoint
        assert constants.HF_HUB_DISABLE_XET is True and constants.HF_HUB_CACHE == str(tmp_path / "h" / "hub")
        from huggingface_hub.utils._runtime import is_xet_available

        assert not is_xet_available()
    assert (constants.ENDPOINT, constants.HUGGINGFACE_CO_URL_TEMPLATE, constants.HF_HUB_CACHE,
            constants.HF_HUB_DISABLE_XET) == before
