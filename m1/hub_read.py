"""Reading checkpoints that live on the Hugging Face Hub, through huggingface_hub only.

Headers come from `HfApi.get_safetensors_metadata` (HTTP range requests: no tensor data); a shard is
downloaded with `hf_hub_download` (its cache and resume) only when its data is read.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TypeVar

from m1.errors import CheckpointError, M1Error, UsageError

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

    from m1.checkpoint import Checkpoint, safe_relative
    from m1.config import M1Config
    from m1.safetensors_io import Header, TensorInfo

    api = HfApi()
    config_path = _call(repo_id, revision, lambda: hf_hub_download(repo_id, "config.json", revision=revision),
                        "config.json")
    config = M1Config.from_file(config_path)
    meta = _call(repo_id, revision, lambda: api.get_safetensors_metadata(repo_id, revision=revision))
    index_file = "model.safetensors.index.json" if meta.sharded else None
    weight_map = dict(meta.weight_map)
    for file in weight_map.values():
        safe_relative(file, f"{repo_id}/{index_file}")
    index_meta: dict = {}
    if index_file:
        path = _call(repo_id, revision, lambda: hf_hub_download(repo_id, index_file, revision=revision), index_file)
        index_meta = json.loads(Path(path).read_text()).get("metadata") or {}
    headers = {}
    for file, fm in meta.files_metadata.items():
        # Offsets are relative to the data section: the header length is not exposed by the client.
        infos = {
            name: TensorInfo(name, ti.dtype, tuple(ti.shape), file, ti.data_offsets[0], ti.data_offsets[1])
            for name, ti in fm.tensors.items()
        }
        headers[file] = Header(file, infos, dict(fm.metadata or {}), 0, 0)
    ckpt = Checkpoint(repo_id, config, weight_map, index_file, index_meta, revision=revision, remote=True)
    ckpt._headers.update(headers)
    return ckpt


def download_file(repo_id: str, file: str, revision: str | None) -> Path:
    from huggingface_hub import hf_hub_download

    return Path(_call(repo_id, revision, lambda: hf_hub_download(repo_id, file, revision=revision), file))


def list_extra_files(repo_id: str, revision: str | None) -> list[str]:
    from huggingface_hub import HfApi

    from m1.checkpoint import is_extra_file

    files = _call(repo_id, revision, lambda: HfApi().list_repo_files(repo_id, revision=revision))
    return sorted(f for f in files if "/" not in f and is_extra_file(f))
