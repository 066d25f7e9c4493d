"""`m1 verify remote`: a Hub checkpoint checked without downloading its tensors.

Shard headers come over exact range requests (in parallel) and go through the same integrity checks as
a local folder; the Hub's LFS sha256 of each shard is compared with a local copy or manifest
(`--against`) and with the m1-manifest.json pushed with the repo.
"""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m1.errors import M1Error, UsageError
from m1.hub_read import HEADER_WORKERS, HubError, _call, check_repo_id, quiet_hub_logs
from m1.index import weight_file_suffixes

if TYPE_CHECKING:
    from m1.checkpoint import Checkpoint


def fetch_headers(ckpt: Checkpoint, files: list[str] | None = None, workers: int = HEADER_WORKERS) -> None:
    """Read the headers of a remote checkpoint's shards in parallel into its cache.

    A header that is damaged is left for the integrity checks to report; a Hub or network error
    (HubError) is raised, since it says nothing about the shard.
    """
    files = [f for f in (files if files is not None else ckpt.files()) if f.endswith(".safetensors")]

    def one(file: str) -> None:
        try:
            ckpt.header(file)
        except HubError:
            raise
        except M1Error:
            pass  # reported by check_checkpoint

    if not files:
        return
    pool = ThreadPoolExecutor(max_workers=max(1, min(workers, len(files))))
    try:
        for future in [pool.submit(one, f) for f in files]:
            future.result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


# ---- verify remote --------------------------------------------------------------------------------
def verify_remote(repo_id: str, revision: str | None = None, against: Path | None = None):  # -> IntegrityReport
    """Headers over range requests checked against the spec and the index (no tensor data); the Hub's LFS
    sha256 of each shard against a local copy or manifest (`against`) and against the m1-manifest.json
    pushed with the repo, when there is one."""
    from m1.checkpoint import Checkpoint
    from m1.hub_read import HubStorage, model_info
    from m1.integrity import IntegrityReport, check_checkpoint

    check_repo_id(repo_id)
    if against is not None and not against.exists():
        raise UsageError("--against must be a local checkpoint folder or an m1-manifest.json", file=str(against))
    report = IntegrityReport(repo_id)
    with quiet_hub_logs():
        try:
            ckpt = Checkpoint.from_storage(HubStorage.open(repo_id, revision))
        except (UsageError, HubError):
            raise
        except M1Error as exc:
            report.add("unreadable", exc.message + (f" ({exc.hint})" if exc.hint else ""), exc.file, exc.tensor)
            return report
        info = model_info(repo_id, ckpt.revision, files_metadata=True)
        remote = {s.rfilename: s for s in info.siblings or []}
        fetch_headers(ckpt)  # in parallel; a network error stops here instead of reading as a corrupt shard
        check_checkpoint(ckpt, report)  # truncation shows against the Hub's sizes
        compared = 0
        for label, expected in _expected_hashes(repo_id, ckpt.revision, against, remote, report):
            compared += len(expected)
            _compare_hashes(label, expected, remote, report)
    report.stats.update(revision=ckpt.revision, remote=True, hashes_compared=compared)
    return report


def _compare_hashes(label: str, expected: dict[str, tuple[str | None, int | None]], remote: dict[str, Any],
                    report: Any) -> None:
    for file, (sha, size) in sorted(expected.items()):
        sibling = remote.get(file)
        lfs = getattr(sibling, "lfs", None)
        hub_sha = getattr(lfs, "sha256", None)
        if sibling is None:
            report.add("missing-shard", f"in the {label} but not in the Hub repo", file)
        elif size is not None and sibling.size is not None and sibling.size != size:
            report.add("sha256", f"the Hub has {sibling.size} bytes, the {label} {size}", file)
        elif hub_sha is None:
            report.add("sha256", f"the Hub has no LFS sha256 for this file to compare with the {label}", file)
        elif sha is not None and hub_sha != sha:
            report.add("sha256", f"the Hub's LFS sha256 {hub_sha[:12]}... differs from the {label}'s {sha[:12]}...",
                       file)


def _manifest_hashes(manifest: Any) -> dict[str, tuple[str | None, int | None]]:
    shards = manifest.get("shards") if isinstance(manifest, dict) else None
    out = {}
    for file, record in (shards or {}).items():
        if isinstance(record, dict):
            out[file] = (record.get("sha256"), record.get("size"))
    return out


def _expected_hashes(repo_id: str, revision: str | None, against: Path | None, remote: dict[str, Any],
                     report: Any) -> list[tuple[str, dict[str, tuple[str | None, int | None]]]]:
    """(label, {file: (sha256, size)}) for each source of expected hashes."""
    from huggingface_hub import hf_hub_download

    from m1.atomic_io import file_sha256
    from m1.manifest import MANIFEST, read_manifest

    sources = []
    if against is not None:
        if against.is_file():
            try:
                sources.append(("manifest", _manifest_hashes(json.loads(against.read_text()))))
            except (OSError, ValueError):
                raise UsageError("--against is not a readable m1-manifest.json", file=str(against)) from None
        else:
            # Local shards are hashed (the real check); a shard not on disk is taken from the local manifest.
            local = {}
            for path in sorted(against.iterdir()):
                if path.is_file() and path.name.endswith(weight_file_suffixes()):
                    local[path.name] = (file_sha256(path).hexdigest(), path.stat().st_size)
            try:
                recorded = _manifest_hashes(read_manifest(against) or {})
            except M1Error as exc:
                report.add("manifest", exc.message, exc.file)
                recorded = {}
            if local:
                sources.append(("local copy", local))
            rest = {f: v for f, v in recorded.items() if f not in local}
            if rest:
                sources.append(("local manifest", rest))
            if not local and not recorded:
                report.add("sha256", "no local shard or manifest to compare with", str(against))
    if MANIFEST in remote:
        path = _call(repo_id, revision, lambda: hf_hub_download(repo_id, MANIFEST, revision=revision), MANIFEST)
        try:
            sources.append((f"pushed {MANIFEST}", _manifest_hashes(json.loads(Path(path).read_text()))))
        except ValueError:
            report.add("manifest", f"the pushed {MANIFEST} is not valid JSON", MANIFEST)
    return sources
