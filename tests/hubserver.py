"""A small Hugging Face Hub-compatible HTTP server for tests (standard library only).

It serves the subset of the Hub API that the real `huggingface_hub` client (2.x, httpx2-based) uses for model
repos, so tests can point the real client at it and observe every request it makes:

    with HubServer() as server, hub_env(server):
        server.add_repo("org/tiny", {"config.json": b"{}", "model.safetensors": Path("x.safetensors")})
        path = hf_hub_download("org/tiny", "config.json")
        assert server.bytes_sent_by_file[("org/tiny", "config.json")] == 2

Served (model repos only):
  GET  /api/models/{repo}[/revision/{rev}]            model_info / repo_info (?blobs=true => files_metadata)
  GET  /api/models/{repo}/tree/{rev}[/{path}]         list_repo_tree / list_repo_files (?recursive=true)
  POST /api/models/{repo}/paths-info/{rev}            get_paths_info
  GET  /api/models/{repo}/refs, /commits/{rev}        list_repo_refs / list_repo_commits
  POST|DELETE /api/models/{repo}/branch/{branch}      create_branch / delete_branch
  GET  /api/models/{repo}/safetensors-metadata/{f}    get_sharded_safetensors_metadata (no Range reads)
  POST /api/models/{repo}/preupload/{rev}             upload modes (lfs/regular) + remote oids
  POST /api/models/{repo}/commit/{rev}                NDJSON commit (?create_pr=1 => refs/pr/N)
  POST /{repo}.git/info/lfs/objects/batch             LFS batch API (basic, optional multipart)
  PUT  /__lfs/...  POST /__lfs/.../verify             LFS upload targets handed out by the batch API
  HEAD|GET /{repo}/resolve/{rev}/{path}               downloads, with ETag/X-Repo-Commit/X-Linked-* and Range
  POST /api/repos/create, DELETE /api/repos/delete, GET /api/whoami-v2, POST /api/validate-yaml

Errors use the headers the client maps to exceptions (`X-Error-Code`: RepoNotFound, RevisionNotFound,
EntryNotFound, GatedRepo). Xet is never advertised (no `X-Xet-Hash`), so downloads and uploads use plain HTTP/LFS.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import fnmatch
import hashlib
import itertools
import json
import os
import re
import shutil
import socket
import struct
import tempfile
import threading
import time
import traceback
from collections.abc import Iterable, Iterator, Mapping
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from urllib.parse import parse_qs, quote, unquote, urlsplit

__all__ = [
    "Fault",
    "HubEnv",
    "HubServer",
    "RequestRecord",
    "SparseFile",
    "hub_env",
    "hub",
    "hub_server",
]

DEFAULT_TOKEN = "hf_hubserver_test_token"
DEFAULT_USER = "test-user"

# Default `.gitattributes` LFS patterns of a new Hub repo (subset), used to pick the upload mode.
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5", "*.joblib", "*.lfs.*",
    "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz", "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle",
    "*.pkl", "*.pt", "*.pth", "*.rar", "*.safetensors", "*.tar", "*.tar.*", "*.tflite", "*.tgz", "*.wasm",
    "*.xz", "*.zip", "*.zst", "*tfevents*",
)  # fmt: skip
GITATTRIBUTES = "".join(f"{p} filter=lfs diff=lfs merge=lfs -text\n" for p in LFS_PATTERNS).encode()
LFS_SIZE_THRESHOLD = 10 * 1024 * 1024  # the Hub refuses regular (non-LFS) files above 10 MB

_CHUNK = 1 << 20
_HEX40 = re.compile(r"[0-9a-f]{7,40}")
_REPO_SUBPATHS = {
    "revision", "tree", "paths-info", "refs", "commits", "branch", "preupload", "commit", "safetensors-metadata",
}  # fmt: skip


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.000Z")


def git_blob_sha1(data: bytes) -> str:
    """`git hash-object` of `data`."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


# --------------------------------------------------------------------------------------------------------------------
# Blobs: where file content comes from
# --------------------------------------------------------------------------------------------------------------------


class _Blob:
    size: int
    sparse_from: int | None = None  # bytes at/after this offset are fake (zeros)

    def read(self, start: int, end: int) -> bytes:  # [start, end)
        raise NotImplementedError

    def iter_range(self, start: int, end: int, chunk: int = _CHUNK) -> Iterator[bytes]:
        pos = start
        while pos < end:
            n = min(chunk, end - pos)
            yield self.read(pos, pos + n)
            pos += n


class _BytesBlob(_Blob):
    def __init__(self, data: bytes):
        self.data = bytes(data)
        self.size = len(self.data)

    def read(self, start: int, end: int) -> bytes:
        return self.data[start:end]


class _FileBlob(_Blob):
    def __init__(self, path: Path):
        self.path = Path(path)
        self.size = self.path.stat().st_size

    def read(self, start: int, end: int) -> bytes:
        with open(self.path, "rb") as f:
            f.seek(start)
            return f.read(max(0, end - start))


class _SparseBlob(_Blob):
    """First `len(header)` bytes are real, the rest up to `size` read as zeros (and are never stored)."""

    def __init__(self, header: bytes, size: int):
        if size < len(header):
            raise ValueError("total_size is smaller than header_bytes")
        self.header = bytes(header)
        self.size = size
        self.sparse_from = len(self.header)

    def read(self, start: int, end: int) -> bytes:
        end = min(end, self.size)
        real = self.header[start:end] if start < len(self.header) else b""
        return real + bytes(max(0, end - start - len(real)))


class _FlippedBlob(_Blob):
    """`base` with one byte inverted: same size, different content (a corrupt copy)."""

    def __init__(self, base: _Blob, offset: int):
        self.base = base
        self.size = base.size
        self.offset = offset % base.size
        self.sparse_from = base.sparse_from

    def read(self, start: int, end: int) -> bytes:
        data = self.base.read(start, end)
        if start <= self.offset < end:
            i = self.offset - start
            data = data[:i] + bytes([data[i] ^ 0xFF]) + data[i + 1 :]
        return data


@dataclasses.dataclass(frozen=True)
class SparseFile:
    """A file value for `HubServer.add_repo`: only `header_bytes` are real, `total_size` and `sha256` are declared."""

    header_bytes: bytes
    total_size: int
    sha256: str


@dataclasses.dataclass
class _Entry:
    blob: _Blob
    lfs: bool
    sha256: str  # declared content sha256 (what metadata says; LFS oid)
    git_oid: str  # git blob id: of the content (regular) or of the LFS pointer
    size: int  # declared size
    _st: Any = dataclasses.field(default=None, repr=False)  # cached (tensor_start, header dict) or False

    @property
    def pointer_size(self) -> int:
        return len(lfs_pointer(self.sha256, self.size))

    def safetensors_header(self) -> tuple[int, dict] | None:
        """(data section start, parsed JSON header) if the content looks like safetensors, else None."""
        if self._st is None:
            self._st = False
            try:
                if self.blob.size >= 8:
                    (n,) = struct.unpack("<Q", self.blob.read(0, 8))
                    if 2 <= n <= 100_000_000 and 8 + n <= self.blob.size:
                        header = json.loads(self.blob.read(8, 8 + n))
                        if isinstance(header, dict):
                            self._st = (8 + n, header)
            except (ValueError, UnicodeDecodeError):
                pass
        return self._st or None

    def tensor_start(self, path: str) -> int | None:
        """Offset where tensor data begins (bytes at/after it count as tensor bytes); None if not safetensors."""
        blob = self.blob
        st = self.safetensors_header() if path.endswith(".safetensors") or blob.sparse_from is not None else None
        start = st[0] if st else None
        if blob.sparse_from is not None:
            start = blob.sparse_from if start is None else min(start, blob.sparse_from)
        return start


@dataclasses.dataclass
class _Commit:
    sha: str
    parent: str | None
    tree: dict[str, _Entry]
    title: str
    message: str
    date: str


@dataclasses.dataclass
class _Repo:
    repo_id: str
    private: bool = False
    gated: bool = False
    allowed_tokens: set[str] | None = None  # None: any valid token may read (private/gated)
    created_at: str = dataclasses.field(default_factory=_now_iso)
    branches: dict[str, str] = dataclasses.field(default_factory=dict)
    tags: dict[str, str] = dataclasses.field(default_factory=dict)
    prs: dict[int, str] = dataclasses.field(default_factory=dict)
    commits: dict[str, _Commit] = dataclasses.field(default_factory=dict)
    lfs_oids: set[str] = dataclasses.field(default_factory=set)

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        if revision.startswith("refs/heads/") and revision[11:] in self.branches:
            return self.branches[revision[11:]]
        if revision in self.tags:
            return self.tags[revision]
        if revision.startswith("refs/tags/") and revision[10:] in self.tags:
            return self.tags[revision[10:]]
        m = re.fullmatch(r"refs/pr/(\d+)", revision)
        if m:
            return self.prs.get(int(m.group(1)))
        if _HEX40.fullmatch(revision):
            hits = [sha for sha in self.commits if sha.startswith(revision)]
            if len(hits) == 1:
                return hits[0]
        return None

    def is_branch_ref(self, revision: str) -> str | None:
        """The writable ref name for `revision` (a branch or a PR ref), or None."""
        if revision in self.branches:
            return revision
        if revision.startswith("refs/heads/") and revision[11:] in self.branches:
            return revision[11:]
        m = re.fullmatch(r"refs/pr/(\d+)", revision)
        if m and int(m.group(1)) in self.prs:
            return revision
        return None

    def head(self, ref: str) -> str:
        m = re.fullmatch(r"refs/pr/(\d+)", ref)
        return self.prs[int(m.group(1))] if m else self.branches[ref]

    def set_head(self, ref: str, sha: str) -> None:
        m = re.fullmatch(r"refs/pr/(\d+)", ref)
        if m:
            self.prs[int(m.group(1))] = sha
        else:
            self.branches[ref] = sha


# --------------------------------------------------------------------------------------------------------------------
# Counters and faults
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class RequestRecord:
    """One request as the server saw it. Byte counts are updated while the response streams."""

    method: str
    path: str  # unquoted URL path, e.g. "/org/repo/resolve/main/model.safetensors"
    query: dict[str, list[str]]
    range: str | None
    authorization: bool  # whether a Bearer token was sent
    kind: str = ""  # "info", "tree", "resolve", "lfs-batch", "lfs-upload", "commit", "preupload", ...
    repo_id: str | None = None
    revision: str | None = None
    filename: str | None = None
    status: int | None = None
    bytes_sent: int = 0  # response body bytes
    bytes_received: int = 0  # request body bytes
    tensor_bytes: int = 0  # response bytes at/after a safetensors file's data section (or sparse zeros)
    fault: str | None = None  # injected fault applied to this request, if any


@dataclasses.dataclass
class Fault:
    """A fault injected with `HubServer.inject_fault`. `hits` counts the requests it hit."""

    pattern: re.Pattern
    mode: int | str | None
    times: int | None
    method: str | None
    delay: float = 0.0
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        if self.times is not None and self.hits >= self.times:
            return False
        if self.method is not None and self.method.upper() != method:
            return False
        return self.pattern.search(path) is not None


class _HttpError(Exception):
    def __init__(self, status: int, message: str, code: str | None = None, headers: Mapping[str, str] | None = None,
                 body: Mapping[str, Any] | None = None):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.body = dict(body or {})


class _Truncated(Exception):
    pass


# --------------------------------------------------------------------------------------------------------------------
# The server
# --------------------------------------------------------------------------------------------------------------------


class HubServer:
    """In-process Hub-compatible server on 127.0.0.1 (random free port). Use as a context manager.

    Attributes tests use:
      url                      "http://127.0.0.1:PORT" (set HF_ENDPOINT to it, or use `hub_env`)
      requests                 list[RequestRecord], every request except client telemetry/agent-registry noise
      bytes_sent_by_path       {unquoted URL path: response body bytes}
      bytes_sent_by_file       {(repo_id, filename): body bytes served by /resolve}
      tensor_bytes_sent        total response bytes that lay in safetensors data sections (or sparse zeros)
      tensor_bytes_by_file     {(repo_id, filename): such bytes}
      tensor_bytes_requested   tensor bytes asked for by Range/GET, including refused sparse reads
      lfs_bytes_uploaded       bytes received by the LFS upload endpoints (PUT)
      lfs_uploads              [(repo_id, oid, size)] for each completed LFS object upload
      valid_tokens             set of accepted Bearer tokens (default {DEFAULT_TOKEN})
      require_auth_for_writes  if True, create/commit/preupload/LFS need a valid token (default False)
      lfs_multipart_chunk_size if set, LFS objects larger than this are uploaded multipart (default None)
      sparse_read_limit        max zero bytes of a sparse file served by one request (larger => 403)
    """

    def __init__(
        self,
        *,
        valid_tokens: Iterable[str] = (DEFAULT_TOKEN,),
        username: str = DEFAULT_USER,
        initial_gitattributes: bool = True,
        host: str = "127.0.0.1",
        port: int = 0,
    ):
        self.valid_tokens: set[str] = set(valid_tokens)
        self.token = next(iter(sorted(self.valid_tokens)), None)
        self.username = username
        self.initial_gitattributes = initial_gitattributes
        self.require_auth_for_writes = False
        self.lfs_multipart_chunk_size: int | None = None
        self.tree_page_size = 1000
        self.sparse_read_limit = 256 * 1024 * 1024
        self.lfs_threshold = LFS_SIZE_THRESHOLD
        self._host, self._port = host, port
        self._lock = threading.RLock()
        self._repos: dict[str, _Repo] = {}
        self._lfs_store: dict[str, _Blob] = {}
        self._faults: list[Fault] = []
        self.server_errors: list[str] = []  # tracebacks of server bugs (answered with a 500)
        self._commit_counter = itertools.count(1)
        self._pr_counter: dict[str, itertools.count] = {}
        self._httpd: _Server | None = None
        self._thread: threading.Thread | None = None
        self._tmp: str | None = None
        self.reset_counters()

    # ---------------------------------------------------------------- lifecycle

    def start(self) -> HubServer:
        if self._httpd is not None:
            return self
        self._tmp = tempfile.mkdtemp(prefix="hubserver-")
        self._httpd = _Server((self._host, self._port), _Handler)
        self._httpd.hub = self
        self._thread = threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05},
                                        name="hubserver", daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        httpd, self._httpd = self._httpd, None
        if httpd is None:
            return
        httpd.shutdown()
        httpd.close_all_connections()
        httpd.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        if self._tmp:
            shutil.rmtree(self._tmp, ignore_errors=True)

    def __enter__(self) -> HubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("HubServer is not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # ---------------------------------------------------------------- counters

    def reset_counters(self) -> None:
        with self._lock:
            self.requests: list[RequestRecord] = []
            self.bytes_sent_by_path: dict[str, int] = {}
            self.bytes_sent_by_file: dict[tuple[str, str], int] = {}
            self.tensor_bytes_sent = 0
            self.tensor_bytes_by_file: dict[tuple[str, str], int] = {}
            self.tensor_bytes_requested = 0
            self.lfs_bytes_uploaded = 0
            self.lfs_uploads: list[tuple[str, str, int]] = []

    def requests_for(self, *, method: str | None = None, kind: str | None = None, repo_id: str | None = None,
                     filename: str | None = None) -> list[RequestRecord]:
        """The recorded requests matching all given filters."""
        with self._lock:
            return [r for r in self.requests
                    if (method is None or r.method == method.upper()) and (kind is None or r.kind == kind)
                    and (repo_id is None or r.repo_id == repo_id) and (filename is None or r.filename == filename)]

    def files_transferred(self, repo_id: str | None = None) -> set[str]:
        """Filenames whose content bytes were served by /resolve (GET with a non-empty body)."""
        with self._lock:
            return {f for (r, f), n in self.bytes_sent_by_file.items() if n > 0 and (repo_id is None or r == repo_id)}

    def _count_sent(self, rec: RequestRecord, n: int, tensor: int = 0) -> None:
        with self._lock:
            rec.bytes_sent += n
            rec.tensor_bytes += tensor
            self.bytes_sent_by_path[rec.path] = self.bytes_sent_by_path.get(rec.path, 0) + n
            if rec.kind == "resolve" and rec.repo_id and rec.filename:
                key = (rec.repo_id, rec.filename)
                self.bytes_sent_by_file[key] = self.bytes_sent_by_file.get(key, 0) + n
                if tensor:
                    self.tensor_bytes_by_file[key] = self.tensor_bytes_by_file.get(key, 0) + tensor
            self.tensor_bytes_sent += tensor

    # ---------------------------------------------------------------- faults

    def inject_fault(self, path_regex: str, *, mode: int | str | None = 500, times: int | None = 1,
                     method: str | None = None, delay: float = 0.0) -> Fault:
        """Make requests whose unquoted URL path matches `path_regex` (re.search) fail `times` times (None: always).

        mode: an HTTP status (500, 503, 429, ...) answered with a JSON error;
              "reset"      the connection is aborted (SO_LINGER 0 => TCP RST), no response; the client sees
                           RemoteProtocolError or ReadError depending on timing (http_backoff retries both);
              "disconnect" the connection is closed without a response (client: RemoteProtocolError);
              "truncate"   headers with the full Content-Length, then half the body, then close (client:
                           RemoteProtocolError "peer closed connection without sending complete message body");
              None         no failure (use with `delay`).
        delay: seconds to sleep before handling (applies to the faulty requests only).
        Matching requests are those with `method` (if given). Returns the Fault; `fault.hits` counts hits.
        """
        fault = Fault(re.compile(path_regex), mode, times, method, delay)
        with self._lock:
            self._faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self._faults.clear()

    def _take_fault(self, method: str, path: str) -> Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.matches(method, path):
                    fault.hits += 1
                    return fault
        return None

    # ---------------------------------------------------------------- seeding

    def add_repo(self, repo_id: str, files: Mapping[str, bytes | str | Path | SparseFile] | None = None, *,
                 private: bool = False, gated: bool = False, allowed_tokens: Iterable[str] | None = None,
                 revision: str = "main", commit_message: str = "Initial commit",
                 lfs: Iterable[str] | None = None) -> str:
        """Create `repo_id` (if needed) and commit `files` on branch `revision` (created from main if missing).

        Values: bytes or str (content), Path (read lazily from disk; hashed now), or SparseFile.
        A file is stored with LFS if it matches the usual `.gitattributes` patterns, is larger than 10 MB, looks
        binary, or is listed in `lfs`. `allowed_tokens` restricts which valid tokens may read a private/gated repo.
        Returns the new commit sha.
        """
        with self._lock:
            repo = self._repos.get(repo_id)
            if repo is None:
                repo = self._new_repo(repo_id, private=private, gated=gated, gitattributes=False)
            else:
                repo.private, repo.gated = private or repo.private, gated or repo.gated
            if allowed_tokens is not None:
                repo.allowed_tokens = set(allowed_tokens)
            if revision not in repo.branches:
                repo.branches[revision] = repo.branches["main"]
            force_lfs = set(lfs or ())
            tree = dict(repo.commits[repo.branches[revision]].tree)
            for path, value in (files or {}).items():
                tree[path] = self._make_entry(repo, path, value, force_lfs=path in force_lfs)
            return self._commit(repo, revision, tree, commit_message)

    def add_sparse_file(self, repo_id: str, path: str, header_bytes: bytes, total_size: int, sha256: str, *,
                        revision: str = "main", private: bool = False, gated: bool = False) -> str:
        """Commit a sparse LFS file: only `header_bytes` are real; `total_size`/`sha256` are declared metadata.

        Reads beyond the header return zeros and count as tensor bytes (`tensor_bytes_sent`); one request may not
        read more than `sparse_read_limit` such bytes (it gets a 403 instead). Use `add_repo` with `SparseFile`
        values to add many files in one commit.
        """
        return self.add_repo(repo_id, {path: SparseFile(header_bytes, total_size, sha256)}, revision=revision,
                             private=private, gated=gated, commit_message=f"Add {path}")

    def add_tag(self, repo_id: str, tag: str, revision: str = "main") -> str:
        """Point tag `tag` at `revision`; returns the commit sha."""
        with self._lock:
            repo = self._repos[repo_id]
            sha = repo.resolve(revision)
            if sha is None:
                raise KeyError(revision)
            repo.tags[tag] = sha
            return sha

    def delete_repo(self, repo_id: str) -> None:
        with self._lock:
            self._repos.pop(repo_id, None)

    def corrupt_file(self, repo_id: str, path: str, *, revision: str = "main", flip_offset: int | None = None,
                     declared_sha256: str | None = None) -> None:
        """Make `path` at `revision` inconsistent with its metadata, in place (every commit sharing the file).

        flip_offset: invert the byte at this offset of the served content (negative: from the end); size, sha256,
                     ETag and LFS metadata keep describing the original. Default when `declared_sha256` is not
                     given: -1, the last byte, so a safetensors header stays readable.
        declared_sha256: declare this sha256 in the metadata/ETag (model_info, tree, X-Linked-Etag) while the
                     content stays as it is.
        """
        if flip_offset is None and declared_sha256 is None:
            flip_offset = -1
        with self._lock:
            repo = self._repos[repo_id]
            entry = repo.commits[repo.resolve(revision)].tree[path]
            if declared_sha256 is not None:
                entry.sha256 = declared_sha256.lower()
                if entry.lfs:
                    entry.git_oid = git_blob_sha1(lfs_pointer(entry.sha256, entry.size))
            if flip_offset is not None:
                entry.blob = _FlippedBlob(entry.blob, flip_offset)
                entry._st = None

    def head(self, repo_id: str, revision: str = "main") -> str:
        """Commit sha that `revision` points to."""
        with self._lock:
            sha = self._repos[repo_id].resolve(revision)
            if sha is None:
                raise KeyError(revision)
            return sha

    def file_content(self, repo_id: str, path: str, revision: str = "main") -> bytes:
        """The bytes the server would serve for `path` (for assertions; not counted)."""
        with self._lock:
            repo = self._repos[repo_id]
            entry = repo.commits[repo.resolve(revision)].tree[path]
        return entry.blob.read(0, entry.blob.size)

    def list_files(self, repo_id: str, revision: str = "main") -> list[str]:
        with self._lock:
            repo = self._repos[repo_id]
            return sorted(repo.commits[repo.resolve(revision)].tree)

    def refs(self, repo_id: str) -> dict[str, str]:
        """{ref name: sha} for branches ("main"), tags and PR refs ("refs/pr/1")."""
        with self._lock:
            repo = self._repos[repo_id]
            out = dict(repo.branches)
            out.update({f"refs/tags/{k}": v for k, v in repo.tags.items()})
            out.update({f"refs/pr/{n}": v for n, v in repo.prs.items()})
            return out

    def has_repo(self, repo_id: str) -> bool:
        with self._lock:
            return repo_id in self._repos

    # ---------------------------------------------------------------- internals (call with the lock held)

    def _new_repo(self, repo_id: str, *, private: bool, gated: bool, gitattributes: bool) -> _Repo:
        repo = _Repo(repo_id, private=private, gated=gated)
        self._repos[repo_id] = repo
        self._pr_counter[repo_id] = itertools.count(1)
        tree: dict[str, _Entry] = {}
        if gitattributes:
            tree[".gitattributes"] = self._make_entry(repo, ".gitattributes", GITATTRIBUTES, force_lfs=False)
        sha = self._new_sha(repo_id, "initial")
        repo.commits[sha] = _Commit(sha, None, tree, "initial commit", "", _now_iso())
        repo.branches["main"] = sha
        return repo

    def _new_sha(self, *parts: object) -> str:
        seed = "\0".join(map(str, (*parts, next(self._commit_counter), time.time_ns())))
        return hashlib.sha1(seed.encode()).hexdigest()

    def _commit(self, repo: _Repo, ref: str, tree: dict[str, _Entry], title: str, message: str = "",
                parent: str | None = None) -> str:
        parent = parent if parent is not None else repo.head(ref)
        sha = self._new_sha(repo.repo_id, ref, title, len(tree))
        repo.commits[sha] = _Commit(sha, parent, tree, title, message, _now_iso())
        repo.set_head(ref, sha)
        return sha

    def _is_lfs(self, path: str, size: int, sample: bytes) -> bool:
        name = path.rsplit("/", 1)[-1]
        return (size > self.lfs_threshold or b"\0" in sample
                or any(fnmatch.fnmatchcase(name, p) or fnmatch.fnmatchcase(path, p) for p in LFS_PATTERNS))

    def _make_entry(self, repo: _Repo, path: str, value: Any, *, force_lfs: bool) -> _Entry:
        if isinstance(value, SparseFile):
            blob: _Blob = _SparseBlob(value.header_bytes, value.total_size)
            sha256 = value.sha256.lower()
            self._lfs_store.setdefault(sha256, blob)
            repo.lfs_oids.add(sha256)
            return _Entry(blob, True, sha256, git_blob_sha1(lfs_pointer(sha256, blob.size)), blob.size)
        if isinstance(value, str):
            value = value.encode()
        if isinstance(value, (bytes, bytearray, memoryview)):
            blob = _BytesBlob(bytes(value))
        elif isinstance(value, os.PathLike):
            blob = _FileBlob(Path(value))
        else:
            raise TypeError(f"unsupported file value for {path!r}: {type(value).__name__}")
        h256, h1 = hashlib.sha256(), hashlib.sha1(b"blob %d\0" % blob.size)
        for chunk in blob.iter_range(0, blob.size):
            h256.update(chunk)
            h1.update(chunk)
        sha256 = h256.hexdigest()
        if force_lfs or self._is_lfs(path, blob.size, blob.read(0, 512)):
            self._lfs_store.setdefault(sha256, blob)
            repo.lfs_oids.add(sha256)
            return _Entry(blob, True, sha256, git_blob_sha1(lfs_pointer(sha256, blob.size)), blob.size)
        return _Entry(blob, False, sha256, h1.hexdigest(), blob.size)

    def _tmp_path(self) -> Path:
        assert self._tmp is not None
        fd, name = tempfile.mkstemp(dir=self._tmp)
        os.close(fd)
        return Path(name)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # idle keep-alive connections must not block shutdown
    allow_reuse_address = True
    hub: HubServer

    def __init__(self, *args: Any, **kwargs: Any):
        self._conns: set[socket.socket] = set()
        self._conns_lock = threading.Lock()
        super().__init__(*args, **kwargs)

    def process_request(self, request: Any, client_address: Any) -> None:
        with self._conns_lock:
            self._conns.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: Any) -> None:
        with self._conns_lock:
            self._conns.discard(request)
        super().shutdown_request(request)

    def close_all_connections(self) -> None:
        with self._conns_lock:
            conns, self._conns = list(self._conns), set()
        for conn in conns:
            with contextlib.suppress(OSError):
                conn.shutdown(socket.SHUT_RDWR)

    def handle_error(self, request: Any, client_address: Any) -> None:  # quiet: clients hang up in tests on purpose
        pass


# --------------------------------------------------------------------------------------------------------------------
# Request handling
# --------------------------------------------------------------------------------------------------------------------


def _entry_json(path: str, entry: _Entry) -> dict:
    out: dict[str, Any] = {"type": "file", "oid": entry.git_oid, "size": entry.size, "path": path}
    if entry.lfs:
        out["lfs"] = {"oid": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
    return out


def _dir_json(path: str, tree: Mapping[str, _Entry]) -> dict:
    prefix = path + "/"
    digest = hashlib.sha1(
        "\n".join(f"{p}:{e.git_oid}" for p, e in sorted(tree.items()) if p.startswith(prefix)).encode()
    ).hexdigest()
    return {"type": "directory", "oid": digest, "size": 0, "path": path}


def _dirs_of(tree: Mapping[str, _Entry]) -> set[str]:
    dirs: set[str] = set()
    for p in tree:
        parts = p.split("/")[:-1]
        for i in range(1, len(parts) + 1):
            dirs.add("/".join(parts[:i]))
    return dirs


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "hubserver/1.0"
    timeout = 60
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - stdlib signature
        pass

    # ---------------------------------------------------------------- plumbing

    def do_GET(self) -> None:  # noqa: N802
        self._dispatch()

    def do_HEAD(self) -> None:  # noqa: N802
        self._dispatch()

    def do_POST(self) -> None:  # noqa: N802
        self._dispatch()

    def do_PUT(self) -> None:  # noqa: N802
        self._dispatch()

    def do_DELETE(self) -> None:  # noqa: N802
        self._dispatch()

    @property
    def hub(self) -> HubServer:
        return self.server.hub

    def _dispatch(self) -> None:
        split = urlsplit(self.path)
        self._raw_segments = [s for s in split.path.split("/") if s != ""]
        self._segments = [unquote(s) for s in self._raw_segments]
        upath = unquote(split.path)
        self._query = parse_qs(split.query, keep_blank_values=True)
        self._body_read = False
        self._body: bytes = b""
        self._truncate = False
        auth = self.headers.get("Authorization", "")
        self._token = auth[7:].strip() if auth.lower().startswith("bearer ") else None
        self._rec = RequestRecord(self.command, upath, self._query, self.headers.get("Range"), self._token is not None)
        with self.hub._lock:
            self._rec.kind, self._rec.repo_id, self._rec.revision, self._rec.filename = self._classify()
        noise = self._rec.kind == "noise"
        if not noise:
            with self.hub._lock:
                self.hub.requests.append(self._rec)
        fault = None if noise else self.hub._take_fault(self.command, upath)
        try:
            if fault is not None:
                self._rec.fault = str(fault.mode) if fault.mode is not None else None
                if fault.delay:
                    time.sleep(fault.delay)
                if fault.mode == "reset":
                    self._abort(rst=True)
                    return
                if fault.mode == "disconnect":
                    self._abort(rst=False)
                    return
                if fault.mode == "truncate":
                    self._truncate = True
                elif isinstance(fault.mode, int):
                    self._read_body()
                    raise _HttpError(fault.mode, f"hubserver: injected HTTP {fault.mode}")
            if self._token is not None and self._token not in self.hub.valid_tokens and not noise:
                self._read_body()
                raise _HttpError(401, "Invalid credentials in Authorization header")
            self._route()
        except _HttpError as err:
            self._read_body()
            self._send_error(err)
        except _Truncated:
            self._abort(rst=False)
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True
        except Exception as exc:  # a bug in the server: a 500 for the client, the traceback for the test
            with self.hub._lock:
                self.hub.server_errors.append(traceback.format_exc())
            with contextlib.suppress(Exception):
                self._read_body()
                self._send_error(_HttpError(500, f"hubserver internal error: {type(exc).__name__}: {exc}"))
            self.close_connection = True

    def _abort(self, *, rst: bool) -> None:
        self.close_connection = True
        with contextlib.suppress(OSError):
            if rst:
                self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                self.connection.close()
            else:
                self.connection.shutdown(socket.SHUT_RDWR)

    def _read_body(self, sink: Any = None) -> bytes:
        """Read the request body (Content-Length or chunked). With `sink`, stream chunks to sink(chunk)."""
        if self._body_read:
            return self._body
        self._body_read = True
        parts: list[bytes] = []
        emit = sink or parts.append
        total = 0
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass
                    break
                remaining = size
                while remaining:
                    chunk = self.rfile.read(min(remaining, _CHUNK))
                    if not chunk:
                        raise ConnectionResetError("client closed mid-body")
                    emit(chunk)
                    total += len(chunk)
                    remaining -= len(chunk)
                self.rfile.readline(3)
        else:
            remaining = int(self.headers.get("Content-Length") or 0)
            while remaining:
                chunk = self.rfile.read(min(remaining, _CHUNK))
                if not chunk:
                    raise ConnectionResetError("client closed mid-body")
                emit(chunk)
                total += len(chunk)
                remaining -= len(chunk)
        self._rec.bytes_received = total
        self._body = b"" if sink else b"".join(parts)
        return self._body

    def _start(self, status: int, headers: Mapping[str, str], length: int) -> None:
        self._rec.status = status
        self.send_response(status)
        for k, v in headers.items():
            self.send_header(k, v)
        self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def _write(self, chunks: Iterable[bytes], length: int, tensor_ranges: tuple[int, int | None] | None = None) -> None:
        """Write the body, counting bytes before each write. tensor_ranges: (offset of first byte, tensor_start)."""
        if self.command == "HEAD":
            return
        limit = length // 2 if self._truncate else None
        sent = 0
        for chunk in chunks:
            if limit is not None and sent + len(chunk) > limit:
                chunk = chunk[: limit - sent]
            tensor = 0
            if tensor_ranges is not None and tensor_ranges[1] is not None:
                lo = tensor_ranges[0] + sent
                tensor = max(0, lo + len(chunk) - max(lo, tensor_ranges[1]))
            self.hub._count_sent(self._rec, len(chunk), tensor)
            if chunk:
                self.wfile.write(chunk)
            sent += len(chunk)
            if limit is not None and sent >= limit:
                raise _Truncated()

    def _send_bytes(self, status: int, data: bytes, headers: Mapping[str, str] | None = None) -> None:
        self._start(status, headers or {}, len(data))
        self._write([data], len(data))

    def _send_json(self, obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> None:
        self._send_bytes(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

    def _send_error(self, err: _HttpError) -> None:
        headers = {"Content-Type": "application/json", "X-Error-Message": err.message, **err.headers}
        if err.code:
            headers["X-Error-Code"] = err.code
        self._send_bytes(err.status, json.dumps({"error": err.message, **err.body}).encode(), headers)

    # ---------------------------------------------------------------- auth helpers

    def _token_valid(self) -> bool:
        return self._token is not None and self._token in self.hub.valid_tokens

    def _get_repo(self, repo_id: str, *, files: bool = False) -> _Repo:
        """The repo if this request may read it (files=True: file contents, which gating restricts)."""
        repo = self.hub._repos.get(repo_id)
        not_found = _HttpError(401 if not self._token_valid() else 404, "Repository not found", "RepoNotFound")
        if repo is None:
            raise not_found
        allowed = self._token_valid() and (repo.allowed_tokens is None or self._token in repo.allowed_tokens)
        if repo.private and not allowed:
            raise not_found
        if repo.gated and files and not allowed:
            status = 403 if self._token_valid() else 401
            raise _HttpError(status, f"Access to model {repo_id} is restricted. You must have access to it and be "
                                     "authenticated to access it. Please log in.", "GatedRepo")
        return repo

    def _check_write(self) -> None:
        if self.hub.require_auth_for_writes and not self._token_valid():
            raise _HttpError(401, "You must be authenticated to write to a repo")

    def _commit_of(self, repo: _Repo, revision: str) -> _Commit:
        sha = repo.resolve(revision)
        if sha is None:
            raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return repo.commits[sha]

    # ---------------------------------------------------------------- routing

    def _split_repo(self, segs: list[str]) -> tuple[str, list[str]]:
        """Split [ns, name, rest...] or [name, rest...] into (repo_id, rest)."""
        repos = self.hub._repos
        if len(segs) >= 2 and f"{segs[0]}/{segs[1]}" in repos:
            return f"{segs[0]}/{segs[1]}", segs[2:]
        if segs and segs[0] in repos:
            return segs[0], segs[1:]
        if len(segs) == 1 or (len(segs) >= 2 and segs[1] in _REPO_SUBPATHS):
            return segs[0], segs[1:]
        return f"{segs[0]}/{segs[1]}", segs[2:]

    def _classify(self) -> tuple[str, str | None, str | None, str | None]:
        """(kind, repo_id, revision, filename) of this request, from its method and path alone."""
        segs, method = self._segments, self.command
        if segs[:2] == ["api", "agent-harnesses"] or segs[:2] == ["api", "telemetry"]:
            return "noise", None, None, None
        if segs[:2] == ["api", "whoami-v2"]:
            return "whoami", None, None, None
        if segs[:2] == ["api", "validate-yaml"] and method == "POST":
            return "validate-yaml", None, None, None
        if segs[:3] == ["api", "repos", "create"] and method == "POST":
            return "create-repo", None, None, None
        if segs[:3] == ["api", "repos", "delete"] and method == "DELETE":
            return "delete-repo", None, None, None
        if len(segs) >= 3 and segs[:2] == ["api", "models"]:
            repo_id, rest = self._split_repo(segs[2:])
            head, args = (rest[0], rest[1:]) if rest else ("", [])
            joined = "/".join(args)
            table = {
                ("", "GET"): ("info", "main", None),
                ("revision", "GET"): ("info", joined, None),
                ("tree", "GET"): ("tree", args[0] if args else "", "/".join(args[1:])),
                ("paths-info", "POST"): ("paths-info", joined, None),
                ("refs", "GET"): ("refs", None, None),
                ("commits", "GET"): ("commits", joined or "main", None),
                ("branch", "POST"): ("branch", None, joined),
                ("branch", "DELETE"): ("branch", None, joined),
                ("preupload", "POST"): ("preupload", joined, None),
                ("commit", "POST"): ("commit", joined, None),
                ("safetensors-metadata", "GET"): ("safetensors-metadata", "main",
                                                  joined or "model.safetensors.index.json"),
            }
            hit = table.get((head, method))
            if hit is not None and (head in ("", "refs", "safetensors-metadata", "commits") or args):
                return hit[0], repo_id, hit[1], hit[2]
            return "unknown", repo_id, None, None
        if segs and segs[0] == "__lfs":
            m = re.fullmatch(r"(?P<repo>.+)/(?P<oid>[0-9a-f]{64})/(?P<size>\d+)(?P<tail>/.*)?", "/".join(segs[1:]))
            if m is None:
                return "unknown", None, None, None
            tail = m["tail"] or ""
            kind = {"": "lfs-upload", "/verify": "lfs-verify", "/complete": "lfs-complete"}.get(tail, "lfs-part")
            return kind, m["repo"], None, m["oid"]
        if (method == "POST" and len(segs) >= 5 and segs[-4:] == ["info", "lfs", "objects", "batch"]
                and segs[-5].endswith(".git")):
            return "lfs-batch", "/".join(segs[:-4])[: -len(".git")], None, None
        if method in ("GET", "HEAD") and "resolve" in segs[1:3]:
            i = segs.index("resolve", 1)
            if len(segs) > i + 2:  # {repo}/resolve/{revision}/{path...}
                return "resolve", "/".join(segs[:i]), segs[i + 1], "/".join(segs[i + 2 :])
        return "unknown", None, None, None

    def _route(self) -> None:
        rec, hub = self._rec, self.hub
        kind, repo_id, revision, filename = rec.kind, rec.repo_id, rec.revision, rec.filename
        if kind == "noise":
            return self._send_json({"standardEnvVars": [], "harnesses": {}} if "agent" in rec.path else {})
        if kind == "whoami":
            if not self._token_valid():
                raise _HttpError(401, "Invalid credentials in Authorization header")
            return self._send_json({"type": "user", "id": "0" * 24, "name": hub.username, "fullname": hub.username,
                                    "email": None, "orgs": [], "isPro": False, "canPay": False,
                                    "auth": {"type": "access_token",
                                             "accessToken": {"displayName": "hubserver", "role": "write"}}})
        if kind == "validate-yaml":
            self._read_body()
            return self._send_json({"errors": [], "warnings": []})
        if kind == "create-repo":
            return self._create_repo()
        if kind == "delete-repo":
            return self._delete_repo()
        if kind == "resolve":
            return self._resolve(repo_id, revision, filename)
        if kind == "lfs-batch":
            return self._lfs_batch(repo_id)
        if kind.startswith("lfs-"):
            return self._lfs_endpoint(self._segments[1:])
        handlers = {
            "info": lambda: self._info(repo_id, revision),
            "tree": lambda: self._tree(repo_id, revision, filename),
            "paths-info": lambda: self._paths_info(repo_id, revision),
            "refs": lambda: self._refs(repo_id),
            "commits": lambda: self._commits(repo_id, revision),
            "branch": lambda: self._branch(repo_id, filename),
            "preupload": lambda: self._preupload(repo_id, revision),
            "commit": lambda: self._commit_endpoint(repo_id, revision),
            "safetensors-metadata": lambda: self._st_metadata(repo_id, filename),
        }
        if kind in handlers:
            with hub._lock:
                return handlers[kind]()
        raise _HttpError(404, f"hubserver: no route for {self.command} {rec.path}")

    # ---------------------------------------------------------------- repos

    def _create_repo(self) -> None:
        self._check_write()
        body = json.loads(self._read_body() or b"{}")
        if body.get("type") not in (None, "model"):
            raise _HttpError(400, "hubserver only serves model repos")
        org = body.get("organization") or self.hub.username
        repo_id = f"{org}/{body['name']}"
        self._rec.repo_id = repo_id
        private = body.get("visibility") == "private" or bool(body.get("private"))
        with self.hub._lock:
            if repo_id in self.hub._repos:
                raise _HttpError(409, "You already created this model repo",
                                 body={"url": f"{self.hub.url}/{repo_id}"})
            self.hub._new_repo(repo_id, private=private, gated=False, gitattributes=self.hub.initial_gitattributes)
        self._send_json({"url": f"{self.hub.url}/{repo_id}", "name": repo_id, "id": hashlib.sha1(
            repo_id.encode()).hexdigest()[:24]})

    def _delete_repo(self) -> None:
        self._check_write()
        body = json.loads(self._read_body() or b"{}")
        repo_id = f"{body.get('organization') or self.hub.username}/{body['name']}"
        self._rec.repo_id = repo_id
        with self.hub._lock:
            self._get_repo(repo_id)
            del self.hub._repos[repo_id]
        self._send_json({})

    def _info(self, repo_id: str, revision: str) -> None:
        self._rec.revision = revision
        repo = self._get_repo(repo_id)
        commit = self._commit_of(repo, revision)
        blobs = self._query.get("blobs", ["false"])[-1].lower() in ("1", "true")
        siblings = []
        for path, entry in sorted(commit.tree.items()):
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=entry.size, blobId=entry.git_oid)
                if entry.lfs:
                    sib["lfs"] = {"sha256": entry.sha256, "size": entry.size, "pointerSize": entry.pointer_size}
            siblings.append(sib)
        data: dict[str, Any] = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24], "id": repo_id, "modelId": repo_id,
            "author": repo_id.split("/")[0] if "/" in repo_id else None, "sha": commit.sha,
            "lastModified": commit.date, "createdAt": repo.created_at, "private": repo.private,
            "gated": "auto" if repo.gated else False, "disabled": False, "downloads": 0, "likes": 0, "tags": [],
            "library_name": None, "siblings": siblings, "spaces": [],
            "usedStorage": sum(e.size for e in commit.tree.values()),
        }
        config = commit.tree.get("config.json")
        if config is not None and config.size < 1_000_000:
            with contextlib.suppress(ValueError, UnicodeDecodeError):
                cfg = json.loads(config.blob.read(0, config.size))
                if isinstance(cfg, dict):
                    data["config"] = {k: cfg[k] for k in ("architectures", "model_type") if k in cfg}
        params: dict[str, int] = {}
        for path, entry in commit.tree.items():
            st = entry.safetensors_header() if path.endswith(".safetensors") else None
            for name, t in (st[1] if st else {}).items():
                if name != "__metadata__" and isinstance(t, dict) and "shape" in t:
                    n = 1
                    for d in t["shape"]:
                        n *= int(d)
                    params[t.get("dtype", "?")] = params.get(t.get("dtype", "?"), 0) + n
        if params:
            data["safetensors"] = {"parameters": params, "total": sum(params.values())}
        self._send_json(data)

    def _tree(self, repo_id: str, revision: str, path: str) -> None:
        self._rec.revision = revision
        repo = self._get_repo(repo_id)
        tree = self._commit_of(repo, revision).tree
        recursive = self._query.get("recursive", ["false"])[-1].lower() in ("1", "true")
        path = path.strip("/")
        dirs = _dirs_of(tree)
        if path and path not in dirs:
            raise _HttpError(404, f"Entry not found: {path}", "EntryNotFound")
        prefix = path + "/" if path else ""
        items: list[dict] = []
        for d in sorted(dirs):
            if d.startswith(prefix) and (recursive or "/" not in d[len(prefix):]):
                items.append(_dir_json(d, tree))
        for p, e in sorted(tree.items()):
            if p.startswith(prefix) and (recursive or "/" not in p[len(prefix):]):
                items.append(_entry_json(p, e))
        items.sort(key=lambda it: it["path"])
        cursor = int(self._query.get("cursor", ["0"])[-1] or 0)
        page = items[cursor : cursor + self.hub.tree_page_size]
        headers = {}
        if cursor + self.hub.tree_page_size < len(items):
            q = "&".join(f"{k}={quote(v[-1])}" for k, v in self._query.items() if k != "cursor")
            nxt = f"{self.hub.url}{quote(self._rec.path)}?{q}&cursor={cursor + self.hub.tree_page_size}"
            headers["Link"] = f'<{nxt}>; rel="next"'
        self._send_json(page, headers=headers)

    def _paths_info(self, repo_id: str, revision: str) -> None:
        self._rec.revision = revision
        body = self._read_body()
        repo = self._get_repo(repo_id)
        tree = self._commit_of(repo, revision).tree
        ctype = self.headers.get("Content-Type", "")
        if "json" in ctype:
            paths = json.loads(body or b"{}").get("paths", [])
        else:
            paths = parse_qs(body.decode(), keep_blank_values=True).get("paths", [])
        dirs = _dirs_of(tree)
        out = []
        for p in paths:
            p = p.strip("/")
            if p in tree:
                out.append(_entry_json(p, tree[p]))
            elif p in dirs:
                out.append(_dir_json(p, tree))
        self._send_json(out)

    def _refs(self, repo_id: str) -> None:
        repo = self._get_repo(repo_id)

        def ref(name: str, full: str, sha: str) -> dict:
            return {"name": name, "ref": full, "targetCommit": sha}

        data = {
            "branches": [ref(b, f"refs/heads/{b}", s) for b, s in sorted(repo.branches.items())],
            "tags": [ref(t, f"refs/tags/{t}", s) for t, s in sorted(repo.tags.items())],
            "converts": [],
        }
        if self._query.get("include_prs"):
            data["pullRequests"] = [ref(f"refs/pr/{n}", f"refs/pr/{n}", s) for n, s in sorted(repo.prs.items())]
        self._send_json(data)

    def _commits(self, repo_id: str, revision: str) -> None:
        self._rec.revision = revision
        repo = self._get_repo(repo_id)
        commit: _Commit | None = self._commit_of(repo, revision)
        out = []
        while commit is not None:
            out.append({"id": commit.sha, "title": commit.title, "message": commit.message,
                        "authors": [{"user": self.hub.username}], "date": commit.date})
            commit = repo.commits.get(commit.parent) if commit.parent else None
        self._send_json(out)

    def _branch(self, repo_id: str, branch: str) -> None:
        self._check_write()
        body = json.loads(self._read_body() or b"{}")
        repo = self._get_repo(repo_id)
        if self.command == "POST":
            if branch in repo.branches:
                raise _HttpError(409, f"Reference already exists: refs/heads/{branch}")
            repo.branches[branch] = self._commit_of(repo, body.get("startingPoint") or "main").sha
        elif self.command == "DELETE":
            if branch not in repo.branches or branch == "main":
                raise _HttpError(404, f"Invalid rev id: {branch}", "RevisionNotFound")
            del repo.branches[branch]
        else:
            raise _HttpError(405, "method not allowed")
        self._send_json({})

    def _st_metadata(self, repo_id: str, filename: str) -> None:
        repo = self._get_repo(repo_id, files=True)
        tree = self._commit_of(repo, "main").tree
        if filename not in tree:
            raise _HttpError(404, f"Entry not found: {filename}", "EntryNotFound")
        index = json.loads(tree[filename].blob.read(0, tree[filename].size))
        headers = {}
        base = filename.rsplit("/", 1)[0] + "/" if "/" in filename else ""
        for shard in sorted(set(index.get("weight_map", {}).values())):
            entry = tree.get(base + shard)
            st = entry.safetensors_header() if entry is not None else None
            if st is None:
                raise _HttpError(404, f"Entry not found or not safetensors: {shard}", "EntryNotFound")
            headers[shard] = st[1]
        self._send_json({"index": {k: v for k, v in index.items() if k != "weight_map"}, "headers": headers})

    # ---------------------------------------------------------------- downloads

    def _resolve(self, repo_id: str, revision: str, filename: str) -> None:
        with self.hub._lock:
            repo = self._get_repo(repo_id, files=True)
            commit = self._commit_of(repo, revision)
            entry = commit.tree.get(filename)
        if entry is None:
            raise _HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": commit.sha})
        size = entry.blob.size
        headers = {
            "X-Repo-Commit": commit.sha,
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "ETag": f'"{entry.sha256 if entry.lfs else entry.git_oid}"',
        }
        if entry.lfs:
            headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            headers["X-Linked-Size"] = str(entry.size)
        start, end, status = 0, size, 200  # [start, end)
        rng = self.headers.get("Range")
        if rng:
            m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", rng)
            if m and (m.group(1) or m.group(2)):
                if m.group(1):
                    start = int(m.group(1))
                    end = min(size, int(m.group(2)) + 1) if m.group(2) else size
                else:
                    start, end = max(0, size - int(m.group(2))), size
                if start >= size or start >= end:
                    raise _HttpError(416, "Requested range not satisfiable",
                                     headers={"Content-Range": f"bytes */{size}"})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{end - 1}/{size}"
        tensor_start = entry.tensor_start(filename)
        if self.command == "GET" and tensor_start is not None:
            tensor = max(0, end - max(start, tensor_start))
            with self.hub._lock:
                self.hub.tensor_bytes_requested += tensor
            sparse_from = entry.blob.sparse_from
            if sparse_from is not None and end - max(start, sparse_from) > self.hub.sparse_read_limit:
                raise _HttpError(403, f"hubserver: refusing to stream {end - max(start, sparse_from)} bytes of "
                                      f"sparse data of {filename} (sparse_read_limit={self.hub.sparse_read_limit})")
        self._start(status, headers, end - start)
        self._write(entry.blob.iter_range(start, end), end - start, (start, tensor_start))

    # ---------------------------------------------------------------- uploads

    def _preupload(self, repo_id: str, revision: str) -> None:
        self._check_write()
        self._rec.revision = revision
        body = json.loads(self._read_body() or b"{}")
        repo = self._get_repo(repo_id)
        commit = self._commit_of(repo, revision)
        files = []
        for f in body.get("files", []):
            path = f["path"]
            sample = base64.b64decode(f.get("sample") or "")
            mode = "lfs" if self.hub._is_lfs(path, int(f.get("size", 0)), sample) else "regular"
            info: dict[str, Any] = {"path": path, "uploadMode": mode, "shouldIgnore": False}
            existing = commit.tree.get(path)
            if existing is not None:
                info["oid"] = existing.sha256 if existing.lfs else existing.git_oid
            files.append(info)
        self._send_json({"files": files, "commitOid": commit.sha})

    def _lfs_batch(self, repo_id: str) -> None:
        self._check_write()
        body = json.loads(self._read_body() or b"{}")
        if body.get("operation") != "upload":
            raise _HttpError(400, "hubserver: only LFS uploads are supported")
        with self.hub._lock:
            repo = self._get_repo(repo_id)
            objects = []
            cs = self.hub.lfs_multipart_chunk_size
            for obj in body.get("objects", []):
                oid, size = str(obj["oid"]).lower(), int(obj["size"])
                out: dict[str, Any] = {"oid": oid, "size": size}
                if oid not in repo.lfs_oids:
                    base = f"{self.hub.url}/__lfs/{quote(repo_id)}/{oid}/{size}"
                    verify = {"href": f"{base}/verify", "header": {}}
                    if cs and size > cs and "multipart" in body.get("transfers", ["basic"]):
                        nparts = -(-size // cs)
                        header = {"chunk_size": str(cs)}
                        header.update({f"{i:05d}": f"{base}/part/{i}" for i in range(1, nparts + 1)})
                        out["actions"] = {"upload": {"href": f"{base}/complete", "header": header},
                                          "verify": verify}
                    else:
                        out["actions"] = {"upload": {"href": base, "header": {}}, "verify": verify}
                    out["authenticated"] = True
                objects.append(out)
        self._send_json({"transfer": "basic", "objects": objects, "hash_algo": "sha256"},
                        headers={"Content-Type": "application/vnd.git-lfs+json"})

    def _lfs_endpoint(self, segs: list[str]) -> None:
        # /__lfs/{repo_id quoted as one or more segments}/{oid}/{size}[/verify|/complete|/part/{n}]
        m = re.fullmatch(r"(?P<repo>.+)/(?P<oid>[0-9a-f]{64})/(?P<size>\d+)(?P<tail>/.*)?", "/".join(segs))
        if m is None:
            raise _HttpError(404, "hubserver: bad LFS url")
        repo_id, oid, size, tail = m["repo"], m["oid"], int(m["size"]), m["tail"] or ""
        self._rec.repo_id, self._rec.filename = repo_id, oid
        hub = self.hub
        # These URLs stand for pre-signed storage URLs: the client sends no Authorization header to them.
        if not hub.has_repo(repo_id):
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        if tail == "" and self.command == "PUT":
            path = hub._tmp_path()
            h = hashlib.sha256()
            with open(path, "wb") as f:

                def sink(chunk: bytes) -> None:
                    h.update(chunk)
                    f.write(chunk)
                    with hub._lock:
                        hub.lfs_bytes_uploaded += len(chunk)

                self._read_body(sink)
            got = path.stat().st_size
            if h.hexdigest() != oid or got != size:
                path.unlink(missing_ok=True)
                raise _HttpError(400, f"LFS object mismatch: got sha256 {h.hexdigest()} size {got}")
            self._store_lfs(repo_id, oid, _FileBlob(path))
            return self._send_bytes(200, b"")
        if tail.startswith("/part/") and self.command == "PUT":
            n = int(tail[6:])
            path = Path(hub._tmp) / f"{oid}.part{n:05d}"  # type: ignore[arg-type]
            with open(path, "wb") as f:

                def sink_part(chunk: bytes) -> None:
                    f.write(chunk)
                    with hub._lock:
                        hub.lfs_bytes_uploaded += len(chunk)

                self._read_body(sink_part)
            etag = hashlib.md5(path.read_bytes()).hexdigest()
            return self._send_bytes(200, b"", {"ETag": f'"{etag}"'})
        if tail == "/complete" and self.command == "POST":
            body = json.loads(self._read_body() or b"{}")
            parts = sorted(body.get("parts", []), key=lambda p: p["partNumber"])
            path = hub._tmp_path()
            h = hashlib.sha256()
            with open(path, "wb") as out:
                for p in parts:
                    part = Path(hub._tmp) / f"{oid}.part{int(p['partNumber']):05d}"  # type: ignore[arg-type]
                    data = part.read_bytes()
                    if f'"{hashlib.md5(data).hexdigest()}"' != p["etag"] and hashlib.md5(data).hexdigest() != p["etag"]:
                        raise _HttpError(400, f"bad etag for part {p['partNumber']}")
                    h.update(data)
                    out.write(data)
                    part.unlink()
            if h.hexdigest() != oid or path.stat().st_size != size:
                raise _HttpError(400, "LFS multipart object mismatch")
            self._store_lfs(repo_id, oid, _FileBlob(path))
            return self._send_json({"success": True})
        if tail == "/verify" and self.command == "POST":
            body = json.loads(self._read_body() or b"{}")
            with hub._lock:
                ok = oid in hub._repos[repo_id].lfs_oids
            ok = ok and body.get("oid") == oid and int(body.get("size", -1)) == size
            if not ok:
                raise _HttpError(404, "LFS object not found")
            return self._send_json({"success": True})
        raise _HttpError(404, "hubserver: bad LFS request")

    def _store_lfs(self, repo_id: str, oid: str, blob: _Blob) -> None:
        with self.hub._lock:
            self.hub._lfs_store.setdefault(oid, blob)
            repo = self.hub._repos.get(repo_id)
            if repo is not None:
                repo.lfs_oids.add(oid)
            self.hub.lfs_uploads.append((repo_id, oid, blob.size))

    def _commit_endpoint(self, repo_id: str, revision: str) -> None:
        self._check_write()
        self._rec.revision = revision
        lines = [json.loads(x) for x in self._read_body().splitlines() if x.strip()]
        create_pr = self._query.get("create_pr", ["0"])[-1] in ("1", "true", "True")
        hub = self.hub
        with hub._lock:
            repo = self._get_repo(repo_id)
            ref = repo.is_branch_ref(revision)
            if ref is None:
                raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            header = next((x["value"] for x in lines if x.get("key") == "header"), {})
            parent = repo.head(ref)
            if header.get("parentCommit"):
                pc = repo.resolve(header["parentCommit"])
                if pc is None:
                    raise _HttpError(404, f"Invalid rev id: {header['parentCommit']}", "RevisionNotFound")
                if create_pr:
                    parent = pc
                elif pc != parent:
                    raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
            tree = dict(repo.commits[parent].tree)
            for item in lines:
                key, value = item.get("key"), item.get("value", {})
                if key == "file":
                    content = value.get("content", "")
                    data = base64.b64decode(content) if value.get("encoding") == "base64" else content.encode()
                    tree[value["path"]] = _Entry(_BytesBlob(data), False, hashlib.sha256(data).hexdigest(),
                                                 git_blob_sha1(data), len(data))
                elif key == "lfsFile":
                    oid = str(value["oid"]).lower()
                    blob = hub._lfs_store.get(oid)
                    if oid not in repo.lfs_oids or blob is None:
                        raise _HttpError(422, f"LFS object {oid} for {value['path']} was not uploaded")
                    size = int(value.get("size", blob.size))
                    tree[value["path"]] = _Entry(blob, True, oid, git_blob_sha1(lfs_pointer(oid, size)), size)
                elif key == "deletedFile":
                    if tree.pop(value["path"], None) is None:
                        raise _HttpError(404, "A file with this name doesn't exist", "EntryNotFound")
                elif key == "deletedFolder":
                    prefix = value["path"].rstrip("/") + "/"
                    for p in [p for p in tree if p.startswith(prefix)]:
                        del tree[p]
                elif key in ("header", None):
                    continue
                else:
                    raise _HttpError(400, f"hubserver: unsupported commit line {key!r}")
            title = header.get("summary", "")
            pr_url = None
            if create_pr:
                n = next(hub._pr_counter[repo_id])
                ref = f"refs/pr/{n}"
                repo.prs[n] = parent
                pr_url = f"{hub.url}/{repo_id}/discussions/{n}"
            sha = hub._commit(repo, ref, tree, title, header.get("description", ""), parent=parent)
        self._send_json({"success": True, "commitOid": sha, "commitUrl": f"{hub.url}/{repo_id}/commit/{sha}",
                         "pullRequestUrl": pr_url, "hookOutput": ""})


# --------------------------------------------------------------------------------------------------------------------
# Pointing huggingface_hub at the server
# --------------------------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class HubEnv:
    server: HubServer
    endpoint: str
    home: Path
    cache_dir: Path
    token: str | None


_ENV_CLEARED = ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HF_OIDC_RESOURCE", "HF_OIDC_ID_TOKEN", "HUGGINGFACE_CO_STAGING",
                "HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE", "HF_ASSETS_CACHE", "HUGGINGFACE_ASSETS_CACHE", "HF_XET_CACHE",
                "HF_TOKEN_PATH", "TRANSFORMERS_OFFLINE", "HF_HUB_DISABLE_IMPLICIT_TOKEN", "HF_HUB_ENABLE_HF_TRANSFER")


@contextlib.contextmanager
def hub_env(server: HubServer, *, token: str | None = None, home: str | Path | None = None,
            progress_bars: bool = False) -> Iterator[HubEnv]:
    """Point huggingface_hub (already imported or not) and child processes at `server`, with isolated caches.

    Sets HF_ENDPOINT, HF_HOME (a temp dir unless `home`), HF_HUB_OFFLINE=0, HF_HUB_DISABLE_TELEMETRY=1,
    HF_HUB_DISABLE_XET=1 and HF_TOKEN=`token` (unset when None: anonymous), clears other token/cache variables, and
    patches the values huggingface_hub copied at import time (constants.ENDPOINT, HUGGINGFACE_CO_URL_TEMPLATE, the
    cache paths, HF_HUB_DISABLE_XET, ..., the module-level `HfApi` behind `huggingface_hub.model_info` & co).
    Everything is restored on exit. `HfApi()` objects must be created inside the block (they copy the endpoint).
    """
    tmp = None
    if home is None:
        tmp = tempfile.TemporaryDirectory(prefix="hf-home-")
        home = tmp.name
    home = Path(home)
    home.mkdir(parents=True, exist_ok=True)
    cache = home / "hub"
    endpoint = server.url
    new_env = {
        "HF_ENDPOINT": endpoint, "HF_HOME": str(home), "HF_HUB_OFFLINE": "0", "HF_HUB_DISABLE_TELEMETRY": "1",
        "HF_HUB_DISABLE_XET": "1", "HF_HUB_DISABLE_UPDATE_CHECK": "1",
    }
    if token is not None:
        new_env["HF_TOKEN"] = token
    saved_env = {k: os.environ.get(k) for k in (*new_env, *_ENV_CLEARED)}
    for k in _ENV_CLEARED:
        os.environ.pop(k, None)
    os.environ.update(new_env)

    import huggingface_hub
    from huggingface_hub import constants
    from huggingface_hub import hf_api as hf_api_mod
    from huggingface_hub.utils import (
        _detect_agent,
        _http,
        are_progress_bars_disabled,
        disable_progress_bars,
        enable_progress_bars,
    )

    patches: list[tuple[Any, str, Any]] = []

    def patch(obj: Any, name: str, value: Any) -> None:
        if hasattr(obj, name) or obj is constants:
            patches.append((obj, name, getattr(obj, name, _MISSING)))
            setattr(obj, name, value)

    host = urlsplit(endpoint).hostname or "127.0.0.1"
    values = {
        "ENDPOINT": endpoint,
        "HUGGINGFACE_CO_URL_TEMPLATE": endpoint + "/{repo_id}/resolve/{revision}/{filename}",
        "HF_URL_HOSTS": frozenset(constants.HF_URL_HOSTS | {host}),
        "HF_HOME": str(home),
        "HF_HUB_CACHE": str(cache), "HUGGINGFACE_HUB_CACHE": str(cache),
        "HF_ASSETS_CACHE": str(home / "assets"), "HUGGINGFACE_ASSETS_CACHE": str(home / "assets"),
        "HF_XET_CACHE": str(home / "xet"),
        "HF_TOKEN_PATH": str(home / "token"), "HF_STORED_TOKENS_PATH": str(home / "stored_tokens"),
        "HF_HUB_OFFLINE": False, "HF_HUB_DISABLE_TELEMETRY": True, "HF_HUB_DISABLE_XET": True,
        "HF_HUB_DISABLE_IMPLICIT_TOKEN": False, "HF_HUB_DISABLE_UPDATE_CHECK": True,
        "AGENT_HARNESSES_PATH": str(home / ".agent_harnesses.json"),
        "CHECK_FOR_UPDATE_DONE_PATH": str(home / ".check_for_update_done"),
        "CHECK_FOR_SKILL_UPDATE_DONE_PATH": str(home / ".check_for_skill_update_done"),
        "_staging_mode": False,
    }
    progress_was_disabled = are_progress_bars_disabled()
    try:
        for name, value in values.items():
            if hasattr(constants, name):
                patch(constants, name, value)
        patch(hf_api_mod.api, "endpoint", endpoint)
        patch(_http, "_HUB_ORIGINS", frozenset(_http._HUB_ORIGINS | {_http._url_origin(endpoint)}))
        if getattr(_detect_agent, "_registry", None) is None:
            patch(_detect_agent, "_registry", {"standardEnvVars": [], "harnesses": {}})
        for modname, attr, value in (
            ("huggingface_hub.utils._cache_manager", "HF_HUB_CACHE", str(cache)),
            ("huggingface_hub.utils._cache_assets", "HF_ASSETS_CACHE", str(home / "assets")),
            ("huggingface_hub.utils._git_credential", "ENDPOINT", endpoint),
        ):
            mod = __import__(modname, fromlist=[attr])
            patch(mod, attr, value)
        if "HUGGINGFACE_CO_URL_TEMPLATE" in vars(huggingface_hub):
            patch(huggingface_hub, "HUGGINGFACE_CO_URL_TEMPLATE", values["HUGGINGFACE_CO_URL_TEMPLATE"])
        if not progress_bars:
            disable_progress_bars()
        _http.close_session()  # no pooled connection to a previous server on a reused port
        yield HubEnv(server, endpoint, home, cache, token)
    finally:
        _http.close_session()
        if not progress_bars and not progress_was_disabled:
            enable_progress_bars()
        for obj, name, old in reversed(patches):
            if old is _MISSING:
                with contextlib.suppress(AttributeError):
                    delattr(obj, name)
            else:
                setattr(obj, name, old)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        if tmp is not None:
            tmp.cleanup()


_MISSING = object()


# --------------------------------------------------------------------------------------------------------------------
# pytest fixtures (register with `pytest_plugins = ["hubserver"]` in a conftest, or import them into a test module)
# --------------------------------------------------------------------------------------------------------------------

try:
    import pytest
except ImportError:  # pragma: no cover - the server itself does not need pytest
    pytest = None  # type: ignore[assignment]

if pytest is not None:

    @pytest.fixture
    def hub_server() -> Iterator[HubServer]:
        """A started HubServer (not yet wired to huggingface_hub)."""
        with HubServer() as server:
            yield server

    @pytest.fixture
    def hub(hub_server: HubServer, tmp_path: Path) -> Iterator[HubServer]:
        """A started HubServer with huggingface_hub pointed at it (anonymous, HF_HOME under tmp_path)."""
        with hub_env(hub_server, home=tmp_path / "hf_home"):
            yield hub_server


def _main() -> None:  # pragma: no cover - manual use: serve local folders as repos
    import argparse

    parser = argparse.ArgumentParser(description="Serve local folders as Hub model repos.")
    parser.add_argument("repos", nargs="*", help="REPO_ID=FOLDER")
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    server = HubServer(port=args.port).start()
    for spec in args.repos:
        repo_id, folder = spec.split("=", 1)
        files = {p.relative_to(folder).as_posix(): p for p in Path(folder).rglob("*") if p.is_file()}
        server.add_repo(repo_id, files)
    print(f"HF_ENDPOINT={server.url}  token={server.token}", flush=True)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        server.stop()


if __name__ == "__main__":
    _main()
