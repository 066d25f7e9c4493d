"""Quantized checkpoints (fp8 block-wise, bitsandbytes nf4) as sources of jobs whose output cannot hold their
scheme: quantize to another scheme and export to GGUF, through the dense view of m1.dequantized.

What the view gives must be what dequantizing first gives: each job from the quantized source writes the same
tensors, byte for byte, as the same job from `m1 convert SRC DENSE --dtype bf16`'s output, whose dequantization
tests/test_fp8.py and tests/test_bnb_reference.py check against transformers and bitsandbytes' own decoders.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from safetensors.torch import load_file

SPEC = {"layers": 2, "softmax_every": 2, "hidden": 128, "intermediate": 256}


def tensors_of(path: Path) -> dict[str, np.ndarray]:
    """Every tensor's bytes: a GGUF's through gguf-py's reader, a folder's through safetensors."""
    if path.suffix == ".gguf":
        return {t.name: np.asarray(t.data).view(np.uint8).copy() for t in gguf.GGUFReader(path).tensors}
    out: dict[str, np.ndarray] = {}
    for shard in sorted(path.glob("*.safetensors")):
        out.update({k: v.contiguous().view(-1).view(torch.uint8).numpy() for k, v in load_file(str(shard)).items()})
    return out


@pytest.fixture(scope="module", params=["fp8", "nf4"])
def quantized(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path, Path]:
    """(scheme, a tiny M1 quantized with it, that checkpoint dequantized to bf16 by convert --dtype), made once
    per scheme for the module (the tests only read them)."""
    from m1.cli import run_cli
    from m1.tiny import TinySpec, make_tiny

    root = tmp_path_factory.mktemp(f"dequantized-{request.param}")
    make_tiny(root / "src", TinySpec(**SPEC))
    q, dense = root / request.param, root / f"{request.param}-bf16"
    assert run_cli(["quantize", str(root / "src"), str(q), "--scheme", request.param, "-q"]) == 0
    assert run_cli(["convert", str(q), str(dense), "--dtype", "bf16", "-q"]) == 0
    return request.param, q, dense


@pytest.mark.parametrize("job", [
    pytest.param(("quantize", "--scheme", "int8"), marks=pytest.mark.slow),
    ("quantize", "--scheme", "nf4"),
    ("convert", "--to", "gguf"),
    pytest.param(("quantize", "--format", "gguf", "--scheme", "q8_0"), marks=pytest.mark.slow),
], ids=["int8", "nf4", "gguf-bf16", "gguf-q8_0"])
def test_a_quantized_source_gives_what_its_dequantized_copy_gives(quantized: tuple[str, Path, Path],
                                                                  tmp_path: Path, job: tuple[str, ...],
                                                                  run: Callable[..., tuple[int, str, str]]) -> None:
    scheme, q, dense = quantized
    command, *options = job
    suffix = ".gguf" if "gguf" in options else ""
    direct, via = tmp_path / f"direct{suffix}", tmp_path / f"via{suffix}"
    code, out, err = run(command, q, direct, *options, "--dry-run")
    assert code == 0 and f"its {scheme} weights are dequantized to BF16 as they are read" in out, out + err
    code, _, err = run(command, q, direct, *options, "-q")
    assert code == 0, err
    assert run(command, dense, via, *options, "-q")[0] == 0
    a, b = tensors_of(direct), tensors_of(via)
    assert sorted(a) == sorted(b) and len(a) > 20
    assert [n for n in a if not np.array_equal(a[n], b[n])] == []
    manifest = direct.with_suffix(".m1-manifest.json") if suffix else direct / "m1-manifest.json"
    assert json.loads(manifest.read_text())["job"]["source_dequantized"] == f"{scheme} -> BF16"
    code, _, err = run("verify", "integrity", direct)
    assert code == 0, err


def test_a_job_that_keeps_the_scheme_copies_it_as_stored(quantized: tuple[str, Path, Path], tmp_path: Path,
                                                          run: Callable[..., tuple[int, str, str]]) -> None:
    """A reshard keeps the source's scheme (no view): the companions travel as stored."""
    scheme, q, _ = quantized
    code, out, _ = run("convert", q, tmp_path / "copy", "--shard-size", "200KB", "--dry-run")
    assert code == 0 and "dequantized" not in out
    assert run("convert", q, tmp_path / "copy", "--shard-size", "200KB", "-q")[0] == 0
    a, b = tensors_of(q), tensors_of(tmp_path / "copy")
    assert sorted(a) == sorted(b) and all(np.array_equal(a[n], b[n]) for n in a)
    assert json.loads((tmp_path / "copy" / "config.json").read_text())["quantization_config"]["quant_method"]
