"""Reading checkpoints that live on the Hugging Face Hub, through huggingface_hub only.

Headers come over HTTP range requests of exactly the header bytes (no tensor data); a shard is
downloaded with `hf_hub_download` (its cache and resume) only when its data is read.

Every Hub error becomes one `M1Error` line naming the repo and what to do (`hub_errors`). Errors that
say nothing about the checkpoint itself (network, HTTP, access) are `HubError`s, so that
`m1 verify remote` stops on them instead of reporting a sound shard as corrupt. Reads are retried
with backoff on network errors and 408/429/5xx (`with_retries`), then fail with a clear line.
"""

from __future__ import annotations

import errno
import logging
import re
import struct
import time
import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from m1.errors import CheckpointError, M1Error, UsageError
from m1.safetensors_io import MAX_HEADER_BYTES, Header, parse_header, read_header
from m1.storage import Storage

if TYPE_CHECKING:
    from m1.config import M1Config

T = TypeVar("T")

RETRIES = 4  # extra attempts after the first, for reads
RETRY_WAIT_S = 0.5  # first wait; doubles each time (tests set 0)
RETRY_STATUS = (408, 429, 500, 502, 503, 504)
HEADER_WORKERS = 16  # shard headers fetched in parallel (413 shards x 2 small requests for M1-40k)


class HubError(M1Error):
    """The Hub could not be reached or refused the request: nothing is known about the checkpoint."""


def _status(exc: BaseException) -> int | None:
    return getattr(getattr(exc, "response", None), "status_code", None)


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None, file: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's (and httpx's) exceptions into one line naming the repo and what to do."""
    import httpx2
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except M1Error:
        raise
    except hf_errors.GatedRepoError:
        raise HubError(f"{where} is gated and this token has no access", file=file,
                       hint="accept its terms on the Hub, then log in with `hf auth login` or set HF_TOKEN") from None
    except hf_errors.RevisionNotFoundError:
        raise UsageError(f"revision {revision!r} does not exist in {repo_id}", file=file,
                         hint="check the branch, tag or commit sha") from None
    except hf_errors.RepositoryNotFoundError:
        raise UsageError(f"repository {repo_id} not found (or private)", file=file,
                         hint="check the name; for a private repo log in with `hf auth login` or set HF_TOKEN"
                         ) from None
    except hf_errors.DisabledRepoError:
        raise HubError(f"{repo_id} is disabled on the Hub", file=file, hint="ask its owner") from None
    except hf_errors.LocalEntryNotFoundError:  # hf_hub_download could not reach the Hub and had no cached copy
        raise HubError(f"cannot reach the Hub for {where} and the file is not in the local cache", file=file,
                       hint="check your connection (and HF_HUB_OFFLINE, HF_ENDPOINT) and re-run") from None
    except hf_errors.EntryNotFoundError:
        raise CheckpointError(f"{where} has no such file", file=file, hint="is this an M1 checkpoint repo?") from None
    except hf_errors.SafetensorsParsingError as exc:
        raise CheckpointError(f"corrupt safetensors header on the Hub ({str(exc).splitlines()[0][:160]})",
                              file=file or where, hint="the uploaded shard is damaged; re-upload it") from None
    except hf_errors.HfHubHTTPError as exc:
        status = _status(exc)
        if status == 401:
            message, hint = "the Hub wants a valid token", "log in with `hf auth login` or set HF_TOKEN, then re-run"
        elif status == 403:
            message, hint = "this token may not do that", "use a token with write access to the repo (or its org)"
        elif status == 429:
            message, hint = "rate-limited by the Hub", "wait a few minutes and re-run; finished files are kept"
        elif status is not None and status >= 500:
            message, hint = "the Hub failed", "retry later; re-running resumes where it stopped"
        else:
            message, hint = "the Hub refused the request", "check the repo id, revision and token"
        raise HubError(f"{message} for {where} (HTTP {status or '?'})", file=file, hint=hint) from None
    except hf_errors.OfflineModeIsEnabled:
        raise HubError(f"HF_HUB_OFFLINE is set, so {where} cannot be reached", file=file,
                       hint="unset HF_HUB_OFFLINE to use the Hub") from None
    except hf_errors.HFValidationError:
        raise UsageError(f"{repo_id!r} is not a valid Hub repo id (or revision)", file=file,
                         hint="write it as owner/name") from None
    except (PermissionError, FileNotFoundError, IsADirectoryError, NotADirectoryError) as exc:
        raise M1Error(f"cannot use the local file {exc.filename or '?'} ({exc.strerror or type(exc).__name__})",
                      hint="check the folder and its permissions (and HF_HOME for the cache)") from None
    except OSError as exc:
        if exc.errno == errno.ENOSPC:
            raise M1Error(f"the disk is full ({exc.filename or 'download'})", file=file,
                          hint="free space (or point HF_HOME / the destination elsewhere) and re-run; it resumes"
                          ) from None
        raise HubError(f"network error talking to the Hub for {where} ({type(exc).__name__})", file=file,
                       hint="check your connection and re-run; finished downloads and uploads are not repeated"
                       ) from None
    except (httpx2.HTTPError, httpx2.StreamError) as exc:
        raise HubError(f"network error talking to the Hub for {where} ({type(exc).__name__})", file=file,
                       hint="check your connection and re-run; finished downloads and uploads are not repeated"
                       ) from None


def _transient(exc: BaseException) -> bool:
    import httpx2
    from huggingface_hub import errors as hf_errors

    if isinstance(exc, (hf_errors.RepositoryNotFoundError, hf_errors.RevisionNotFoundError,
                        hf_errors.EntryNotFoundError)):
        return False
    if isinstance(exc, hf_errors.HfHubHTTPError):
        return _status(exc) in RETRY_STATUS
    return isinstance(exc, (httpx2.TransportError, ConnectionError, TimeoutError))


def with_retries(fn: Callable[[], T], what: str = "Hub request") -> T:
    """Run a read `fn`, again after a network error or 408/429/5xx (up to RETRIES times, with backoff)."""
    wait = RETRY_WAIT_S
    for attempt in range(RETRIES + 1):
        try:
            return fn()
        except Exception as exc:
            if attempt == RETRIES or not _transient(exc):
                raise
            warnings.warn(f"{what}: {type(exc).__name__}, retrying ({attempt + 1}/{RETRIES})", stacklevel=2)
        time.sleep(wait)
        wait = min(8.0, wait * 2)
    raise AssertionError("unreachable")


@contextmanager
def quiet_hub_logs() -> Iterator[None]:
    """huggingface_hub's own retry and 'no files changed' warnings would add lines to ours: mute them."""
    logger = logging.getLogger("huggingface_hub")
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        yield
    finally:
        logger.setLevel(level)


def _call(repo_id: str, revision: str | None, fn: Callable[[], T], file: str | None = None) -> T:
    with hub_errors(repo_id, revision, file):
        return with_retries(fn, f"{repo_id}/{file}" if file else repo_id)


REPO_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def check_repo_id(repo_id: str) -> str:
    if not REPO_ID.match(repo_id):
        raise UsageError(f"{repo_id!r} is not a Hub repo id",
                         hint="write it as owner/name, e.g. MiniMaxAI/MiniMax-M1-40k")
    return repo_id


def model_info(repo_id: str, revision: str | None = None, files_metadata: bool = True):  # -> ModelInfo
    from huggingface_hub import HfApi

    check_repo_id(repo_id)
    api = HfApi()
    return _call(repo_id, revision, lambda: api.model_info(repo_id, revision=revision, files_metadata=files_metadata))


def remote_config(repo_id: str, sha: str | None, revision: str | None = None) -> M1Config:
    """config.json at commit `sha`; errors name it in the repo, not in the download cache."""
    from huggingface_hub import hf_hub_download

    from m1.config import M1Config

    path = _call(repo_id, revision, lambda: hf_hub_download(repo_id, "config.json", revision=sha), "config.json")
    try:
        return M1Config.from_file(path)
    except M1Error as exc:
        exc.file = f"{repo_id}/config.json"
        raise


class HubStorage(Storage):
    """A Hub repo, pinned to one commit: headers by exact range reads, files downloaded on first need."""

    remote = True

    def __init__(self, repo_id: str, commit: str | None, sizes: dict[str, int | None]) -> None:
        self.root = repo_id
        self.revision = commit
        self.sizes = sizes
        self._paths: dict[str, Path] = {}
        self.scratch: Any = None  # an m1.scratch.Scratch while a job streams shards through bounded disk

    @property
    def copy_in_kernel(self) -> bool:
        """Whether a reader may hand out byte ranges of a shard file to be copied later (not while streaming:
        a shard is deleted once its last reader is done)."""
        return self.scratch is None

    @classmethod
    def open(cls, repo_id: str, revision: str | None = None) -> HubStorage:
        info = model_info(repo_id, revision)
        sha = info.sha or revision  # every later read at this commit, even if the branch moves meanwhile
        sizes = {s.rfilename: s.size for s in info.siblings or []}
        if "config.json" not in sizes:
            raise CheckpointError(f"{repo_id} has no config.json", hint="is this a MiniMax-M1 checkpoint repo?")
        if not any(n in sizes for n in ("model.safetensors.index.json", "model.safetensors")):
            raise CheckpointError(f"{repo_id} has no model.safetensors(.index.json)", hint="is this an M1 checkpoint?")
        return cls(repo_id, sha, sizes)

    def display(self, name: str) -> str:
        return f"{self.root}/{name}"

    def exists(self, name: str) -> bool:
        # .bin checkpoints are not read from the Hub (pickles are loaded only from local folders)
        return name in self.sizes and not name.endswith((".bin", ".bin.index.json"))

    def read_bytes(self, name: str) -> bytes:
        return self.local_path(name).read_bytes()

    def header(self, file: str) -> Header:
        if file in self._paths:  # already downloaded: the local file is what tensors are read from
            return read_header(self._paths[file], self.display(file), relative=file)
        return remote_header(self.root, file, self.revision, self.sizes.get(file))

    def local_path(self, file: str) -> Path:
        if self.scratch is not None and self.scratch.manages(file):
            return self.scratch.path(file)  # downloaded into the scratch area, deleted after its last use
        if file not in self._paths:
            self._paths[file] = download_file(self.root, file, self.revision)
        return self._paths[file]

    def download_to(self, file: str, folder: Path) -> Path:
        """`file` downloaded into `folder` (not the Hugging Face cache), with huggingface_hub's retries."""
        return download_file(self.root, file, self.revision, folder)

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "scratch": None}  # a worker process reads through its own storage

    def extra_files(self) -> list[str]:
        return list_extra_files(self.root, self.revision)

    def sources(self) -> list[Path]:
        return []  # nothing local to protect: shards go to the Hub cache or a scratch folder

    def manifest_path(self) -> Path | None:
        return None

    def identity(self, files: list[str]) -> dict[str, Any]:
        return {name: self.sizes.get(name) for name in files}

    def shard_sizes(self) -> dict[str, int] | None:
        return {name: int(size) for name, size in self.sizes.items() if size is not None}


def remote_header(repo_id: str, file: str, revision: str | None, size: int | None) -> Header:
    """A shard's safetensors header over two HTTP range requests: its 8-byte length, then exactly the header.

    (huggingface_hub's get_safetensors_metadata always asks for the first 100 kB, which for M1's small
    headers is mostly tensor data: 40 MB over the 413 shards of M1-40k.) A server that ignores Range is
    read only as far as needed, never to the end of the shard.
    """
    from huggingface_hub import constants, get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    if size is None:
        raise CheckpointError("missing shard: the index names it but the repo has no such file",
                              file=f"{repo_id}/{file}", hint="re-upload it")
    url = hf_hub_url(repo_id, file, revision=revision, endpoint=constants.ENDPOINT)
    headers = build_hf_headers()

    def get(first: int, last: int) -> bytes:
        want = last - first + 1
        with get_session().stream("GET", url, headers={**headers, "Range": f"bytes={first}-{last}"},
                                  follow_redirects=True, timeout=30) as response:
            hf_raise_for_status(response)
            skip = first if response.status_code == 200 else 0  # Range ignored: the body starts at byte 0
            out = bytearray()
            for chunk in response.iter_bytes():
                out += chunk
                if len(out) >= skip + want:
                    break
        return bytes(out[skip: skip + want])

    display = f"{repo_id}/{file}"
    with hub_errors(repo_id, revision, file):
        head = with_retries(lambda: get(0, 7), display) if size >= 8 else b""
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if 8 < 8 + n <= size and n <= MAX_HEADER_BYTES:
                head += with_retries(lambda: get(8, 7 + n), display)
    return parse_header(head, display, size, relative=file)


def download_file(repo_id: str, file: str, revision: str | None, local_dir: Path | None = None) -> Path:
    """`file` at `revision` through hf_hub_download: into its cache, or into `local_dir` when given."""
    from huggingface_hub import hf_hub_download

    return Path(_call(repo_id, revision, lambda: hf_hub_download(repo_id, file, revision=revision,
                                                                 local_dir=local_dir), file))


def list_extra_files(repo_id: str, revision: str | None) -> list[str]:
    from huggingface_hub import HfApi

    from m1.storage import is_extra_file

    files = _call(repo_id, revision, lambda: HfApi().list_repo_files(repo_id, revision=revision))
    return sorted(f for f in files if "/" not in f and is_extra_file(f))
