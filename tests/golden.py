"""Hashes of every file the demo writes, so a refactor can prove it changed no output byte.

The manifest's fields that describe the run rather than the output (`created`, `job`, `fingerprint`, and
the per-shard timing) are left out; everything else, shards and indexes included, is hashed whole.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

RUN_FIELDS = ("created", "job", "fingerprint", "tool")


def file_digest(path: Path) -> str:
    if path.name == "m1-manifest.json":
        manifest = json.loads(path.read_text())
        for key in RUN_FIELDS:
            manifest.pop(key, None)
        data = json.dumps(manifest, sort_keys=True).encode()
    else:
        data = path.read_bytes()
    return hashlib.sha256(data).hexdigest()


def tree_digests(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): file_digest(p) for p in sorted(root.rglob("*")) if p.is_file()}


if __name__ == "__main__":
    import sys

    print(json.dumps(tree_digests(Path(sys.argv[1])), indent=2, sort_keys=True))
