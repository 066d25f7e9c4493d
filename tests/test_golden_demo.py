"""The demo's outputs, byte for byte, against hashes stored before the pipeline was rebuilt.

Every file of every folder the demo writes (scripts/demo.sh) must hash as it did; the manifest is
compared without the fields that describe the run (see tests/golden.py).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from golden import tree_digests

DATA = Path(__file__).parent / "data"


@pytest.fixture
def demo_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Paths as the demo types them: the report names the reference and the candidates as given.
    (tmp_path / "tests" / "data").mkdir(parents=True)
    shutil.copytree(DATA / "tiny-trained", tmp_path / "tests" / "data" / "tiny-trained")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_demo_outputs_are_byte_identical_to_the_stored_hashes(demo_dir: Path, run) -> None:
    src, out = "tests/data/tiny-trained", "demo"
    steps = [
        ["convert", src, f"{out}/tiny-hf", "--to", "hf", "--quiet"],
        ["convert", f"{out}/tiny-hf", f"{out}/tiny-release", "--to", "release", "--layout", "by-layer", "--quiet"],
        *[["quantize", src, f"{out}/tiny-{s}", "--scheme", s, "--quiet"] for s in ("nf4", "int8", "fp4")],
        ["convert", f"{out}/tiny-nf4", f"{out}/tiny-nf4-bf16", "--dtype", "bf16", "--quiet"],
        ["verify", "compare", src, f"{out}/tiny-int8", f"{out}/tiny-nf4", f"{out}/tiny-fp4", "--report",
         f"{out}/report"],
    ]
    for args in steps:
        code, _, err = run(*args)
        assert code == 0, (args, err)
    expected = json.loads((DATA / "golden" / "demo-sha256.json").read_text())
    actual = tree_digests(demo_dir / out)
    assert sorted(actual) == sorted(expected)
    changed = [name for name in expected if actual[name] != expected[name]]
    assert not changed, f"outputs differ from before the change: {changed}"
