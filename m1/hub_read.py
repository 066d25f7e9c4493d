"""Reading checkpoints that live on the Hugging Face Hub, through huggingface_hub only.

Headers come over HTTP range requests of exactly the header bytes (no tensor data); a shard is
downloaded with `hf_hub_download` (its cache and resume) only when its data is read.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from m1.errors import CheckpointError, M1Error, UsageError
from m1.safetensors_io import MAX_HEADER_BYTES, Header, parse_header

T = TypeVar("T")


@contextmanager
def hub_errors(repo_id: str, revision: str | None = None, file: str | None = None) -> Iterator[None]:
    """Turn huggingface_hub's exceptions into one line naming the repo and what to do."""
    from huggingface_hub import errors as hf_errors

    where = f"{repo_id}@{revision}" if revision else repo_id
    try:
        yield
    except M1Error:
        raise
    except hf_errors.GatedRepoError:
        raise M1Error(f"{where} is gated or private and this token has no access", file=file,
                      hint="accept its terms on the Hub, then log in with `hf auth login` or set HF_TOKEN") from None
    except hf_errors.RevisionNotFoundError:
        raise UsageError(f"revision {revision!r} does not exist in {repo_id}", file=file,
                         hint="check the branch, tag or commit sha") from None
    except hf_errors.RepositoryNotFoundError:
        raise UsageError(f"repository {repo_id} not found (or private)", file=file,
                         hint="check the name; for a private repo log in or set HF_TOKEN") from None
    except hf_errors.EntryNotFoundError:
        raise CheckpointError(f"{where} has no such file", file=file, hint="is this an M1 checkpoint repo?") from None
    except hf_errors.SafetensorsParsingError as exc:
        raise CheckpointError(f"corrupt safetensors header on the Hub ({str(exc).splitlines()[0][:160]})",
                              file=file or where, hint="the uploaded shard is damaged; re-upload it") from None
    except hf_errors.HfHubHTTPError as exc:
        status = getattr(getattr(exc, "response", None), "status_code", "?")
        raise M1Error(f"Hub request failed for {where} (HTTP {status})", file=file,
                      hint="retry later; check HF_ENDPOINT and your network") from None
    except (OSError, ConnectionError) as exc:
        raise M1Error(f"network error talking to the Hub for {where} ({type(exc).__name__})", file=file,
                      hint="check your connection and retry; downloads resume") from None


def _call(repo_id: str, revision: str | None, fn: Callable[[], T], file: str | None = None) -> T:
    with hub_errors(repo_id, revision, file):
        return fn()


def open_remote(repo_id: str, revision: str | None = None):  # -> Checkpoint
    from huggingface_hub import HfApi, hf_hub_download

    from m1.checkpoint import INDEX_NAMES, Checkpoint, safe_relative
    from m1.config import M1Config

    api = HfApi()
    with hub_errors(repo_id, revision):
        info = api.model_info(repo_id, revision=revision, files_metadata=True)
    sizes = {s.rfilename: s.size for s in info.siblings or []}
    if "config.json" not in sizes:
        raise CheckpointError(f"{repo_id} has no config.json", hint="is this a MiniMax-M1 checkpoint repo?")
    config = M1Config.from_file(_call(repo_id, revision, lambda: hf_hub_download(repo_id, "config.json",
                                                                                 revision=revision), "config.json"))
    index_file = next((n for n in INDEX_NAMES if n in sizes and n.endswith(".safetensors.index.json")), None)
    index_meta: dict = {}
    if index_file:
        path = _call(repo_id, revision, lambda: hf_hub_download(repo_id, index_file, revision=revision), index_file)
        try:
            obj = json.loads(Path(path).read_text())
            weight_map = dict(obj["weight_map"])
        except (ValueError, KeyError, TypeError):
            raise CheckpointError("not a valid index (needs a weight_map object)", file=f"{repo_id}/{index_file}"
                                  ) from None
        index_meta = obj.get("metadata") or {}
        for file in weight_map.values():
            safe_relative(file, f"{repo_id}/{index_file}")
    elif "model.safetensors" in sizes:
        weight_map = {}
    else:
        raise CheckpointError(f"{repo_id} has no model.safetensors(.index.json)", hint="is this an M1 checkpoint?")
    ckpt = Checkpoint(repo_id, config, weight_map, index_file, index_meta, revision=info.sha or revision, remote=True)
    ckpt._remote_sizes = sizes
    if not weight_map:
        header = remote_header(repo_id, "model.safetensors", info.sha or revision, sizes["model.safetensors"])
        ckpt.weight_map.update({name: "model.safetensors" for name in header.tensors})
        ckpt._headers["model.safetensors"] = header
    return ckpt


def remote_header(repo_id: str, file: str, revision: str | None, size: int | None) -> Header:
    """A shard's safetensors header over two HTTP range requests: its 8-byte length, then exactly the header.

    (huggingface_hub's get_safetensors_metadata always asks for the first 100 kB, which for M1's small
    headers is mostly tensor data: 40 MB over the 413 shards of M1-40k.)
    """
    from huggingface_hub import constants, get_session, hf_hub_url
    from huggingface_hub.utils import build_hf_headers, hf_raise_for_status

    if size is None:
        raise CheckpointError("missing shard: the index names it but the repo has no such file",
                              file=f"{repo_id}/{file}", hint="re-upload it")
    url = hf_hub_url(repo_id, file, revision=revision, endpoint=constants.ENDPOINT)
    headers = build_hf_headers()

    def get(first: int, last: int) -> bytes:
        response = get_session().get(url, headers={**headers, "Range": f"bytes={first}-{last}"},
                                     follow_redirects=True, timeout=30)
        hf_raise_for_status(response)
        return response.content[: last - first + 1]

    with hub_errors(repo_id, revision, file):
        head = get(0, 7) if size >= 8 else b""
        if len(head) == 8:
            (n,) = struct.unpack("<Q", head)
            if 8 < 8 + n <= size and n <= MAX_HEADER_BYTES:
                head += get(8, 7 + n)
    return parse_header(head, f"{repo_id}/{file}", size)


def download_file(repo_id: str, file: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(_call(repo_id, revision, lambda: hf_hub_download(repo_id, file, revision=revision), file))


def list_extra_files(repo_id: str, revision: str | None) -> list[str]:
    from huggingface_hub import HfApi

    from m1.checkpoint import is_extra_file

    files = _call(repo_id, revision, lambda: HfApi().list_repo_files(repo_id, revision=revision))
    return sorted(f for f in files if "/" not in f and is_extra_file(f))
