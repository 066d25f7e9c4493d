"""Issue 17, the cases that live between a job and its sources: no command writes into what it reads, a source
whose manifest says it changed is refused, and a source being rewritten says so."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_faults_pipeline import QUANTIZABLE, one_error, snapshot

IMATRIX = ["--tokens", "64", "--ctx", "32", "-q"]


@pytest.fixture
def q40(make_tiny_ckpt, tmp_path: Path, run) -> Path:
    """An m1-made Q4_0 GGUF (with its q40.m1-manifest.json) alone in its folder."""
    src = make_tiny_ckpt("s1", **QUANTIZABLE)
    out = tmp_path / "g" / "q40.gguf"
    code, _, err = run("quantize", src, out, "--format", "gguf", "--scheme", "q4_0", "-q")
    assert code == 0, err
    return out


def refused(result: tuple[int, str, str], *paths: Path) -> str:
    code, _, err = result
    assert code in (1, 2), err
    line = one_error(err)
    assert "source" in line
    for p in paths:
        assert str(p) in line or p.name in line, line
    return line


# ---- class 1: the output is the source ------------------------------------------------------------------------


def test_verify_imatrix_never_replaces_a_shard_of_its_source(make_tiny_ckpt, run) -> None:
    src = make_tiny_ckpt("s1", **QUANTIZABLE)
    before = snapshot(src)
    shard = src / "model-00000-of-00003.safetensors"
    refused(run("verify", "imatrix", src, shard, "--overwrite", *IMATRIX), shard)
    refused(run("verify", "imatrix", src, src / "imatrix.gguf", *IMATRIX))  # inside the source
    assert snapshot(src) == before


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_a_gguf_is_never_its_own_destination(q40: Path, run, command: str) -> None:
    before = snapshot(q40.parent)
    link = q40.parent / "link.gguf"
    link.symlink_to(q40.name)
    job = ["--to", "gguf"] if command == "convert" else ["--format", "gguf", "--scheme", "q8_0"]
    for dest in (q40, link):
        refused(run(command, q40, dest, *job, "--overwrite", "-q"), dest)
    link.unlink()
    assert snapshot(q40.parent) == before


def test_a_gguf_output_may_not_take_the_sources_manifest(make_tiny_ckpt, tmp_path: Path, run) -> None:
    """A split set q-0000N-of-0000M.gguf has q.m1-manifest.json: an output q.gguf beside it would replace it."""
    src = make_tiny_ckpt("s1", **QUANTIZABLE)
    split = tmp_path / "g" / "q.gguf"
    code, _, err = run("quantize", src, split, "--format", "gguf", "--scheme", "q4_0", "--split-max-size", "200KB",
                       "-q")
    assert code == 0, err
    first = sorted(split.parent.glob("q-*.gguf"))[0]
    assert (split.parent / "q.m1-manifest.json").is_file() and not split.exists()
    before = snapshot(split.parent)
    refused(run("convert", first, split, "--to", "gguf", "--overwrite", "-q"))
    assert snapshot(split.parent) == before


def test_a_folder_inside_the_source_is_refused(make_tiny_ckpt, run) -> None:
    src = make_tiny_ckpt("s1", **QUANTIZABLE)
    before = snapshot(src)
    refused(run("convert", src, src / "out", "--to", "hf", "-q"))
    refused(run("quantize", src, src / "q.gguf", "--format", "gguf", "--scheme", "q8_0", "-q"))
    assert snapshot(src) == before


def test_quantize_never_replaces_its_imatrix(make_tiny_ckpt, tmp_path: Path, run) -> None:
    src = make_tiny_ckpt("s1", hidden=256, intermediate=256)  # whole q4_k blocks
    imatrix = tmp_path / "imatrix.gguf"
    assert run("verify", "imatrix", src, imatrix, *IMATRIX)[0] == 0
    before = imatrix.read_bytes()
    refused(run("quantize", src, imatrix, "--format", "gguf", "--scheme", "q4_k", "--imatrix", imatrix,
                 "--overwrite", "-q"), imatrix)
    assert imatrix.read_bytes() == before


def test_verify_logits_and_the_compare_report_stay_out_of_their_sources(make_tiny_ckpt, tmp_path: Path,
                                                                         run) -> None:
    src = make_tiny_ckpt("s1", **QUANTIZABLE)
    cand = make_tiny_ckpt("s2", **QUANTIZABLE)
    before = snapshot(tmp_path)
    few = ["--tokens", "64", "--ctx", "32", "--top-k", "8", "-q"]
    refused(run("verify", "logits", src, "--save", src / "ref.safetensors", *few))
    for report in (cand, cand / "report", tmp_path):  # the candidate, a folder inside it, one that holds both
        refused(run("verify", "compare", src, cand, "--report", report, *few))
    assert snapshot(tmp_path) == before
    ref = tmp_path / "ref.safetensors"
    assert run("verify", "logits", src, "--save", ref, *few)[0] == 0
    refused(run("verify", "compare", "--ref-logits", ref, cand, "--report", tmp_path, "--top-k", "8", "-q"))


def test_the_rule_is_one_function(tmp_path: Path) -> None:
    from m1.errors import DestinationError
    from m1.manifest import guard_source

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "a.gguf").write_bytes(b"x")
    (tmp_path / "hard.gguf").hardlink_to(tmp_path / "src" / "a.gguf")
    for dest in (tmp_path / "src", tmp_path, tmp_path / "src" / "new", tmp_path / "src" / "a.gguf",
                 tmp_path / "hard.gguf"):
        with pytest.raises(DestinationError):
            guard_source([dest], [tmp_path / "src" / "a.gguf", tmp_path / "src"])
    guard_source([tmp_path / "other"], [tmp_path / "src"])
    guard_source([tmp_path / "srcx"], [tmp_path / "src"])  # a name that starts like the source is not inside it
