"""Shared fixtures: a tiny M1 on disk and the CLI run in-process."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest


@pytest.fixture
def make_tiny_ckpt(tmp_path: Path) -> Callable[..., Path]:
    """`make_tiny_ckpt(name="tiny", **TinySpec fields)` -> a fresh tiny M1 (release layout) under tmp_path."""
    from m1.tiny import TinySpec, make_tiny

    def make(name: str = "tiny", **spec: object) -> Path:
        dest = tmp_path / name
        make_tiny(dest, TinySpec(**spec))
        return dest

    return make


@pytest.fixture
def tiny(make_tiny_ckpt: Callable[..., Path]) -> Path:
    """The default tiny M1 (4 layers, softmax at layer 3, 3 zero-based shards)."""
    return make_tiny_ckpt()


@pytest.fixture
def nf4(make_tiny_ckpt: Callable[..., Path], tmp_path: Path, run: Callable[..., tuple[int, str, str]]) -> Path:
    """A tiny M1 (rows of whole 64-value blocks) with its experts quantized to nf4."""
    src = make_tiny_ckpt("src", hidden=64, intermediate=128)
    code, _, err = run("quantize", src, tmp_path / "nf4", "--scheme", "nf4", "-q")
    assert code == 0, err
    return tmp_path / "nf4"


@pytest.fixture
def run(capsys: pytest.CaptureFixture[str]) -> Callable[..., tuple[int, str, str]]:
    """`run("convert", src, dst, "--to", "hf")` -> (exit code, stdout, stderr) of the m1 CLI, in-process."""
    from m1.cli import run_cli

    def call(*args: object) -> tuple[int, str, str]:
        capsys.readouterr()  # drop anything printed before
        code = run_cli([str(a) for a in args])
        out, err = capsys.readouterr()
        return code, out, err

    return call
