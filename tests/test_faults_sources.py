"""Issue 17, the cases that live between a job and its sources: no command writes into what it reads, a source
whose manifest says it changed is refused, and a source being rewritten says so."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from contextlib import contextmanager
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


# ---- class 9: a source being rewritten says so ---------------------------------------------------------------

HOLD = """
import fcntl, os, sys, time
fd = os.open(sys.argv[1], os.O_RDONLY | os.O_DIRECTORY)
fcntl.flock(fd, fcntl.LOCK_EX)  # what m1's destination lock takes (m1.manifest.DestinationLock)
for name in sys.argv[2:]:  # what --overwrite does first: empty the folder
    os.unlink(os.path.join(sys.argv[1], name))
print("held", flush=True)
time.sleep(60)
"""


@contextmanager
def writer_holding(folder: Path, *remove: str) -> Iterator[None]:
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(folder), *remove], stdout=subprocess.PIPE)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == b"held\n"
        yield
    finally:
        proc.kill()
        proc.wait()


def test_a_source_whose_lock_is_held_is_refused_at_open(nf4: Path, tmp_path: Path, run) -> None:
    with writer_holding(nf4):
        code, _, err = run("convert", nf4, tmp_path / "deq", "--dtype", "bf16", "-q")
        assert code == 1 and "being rewritten" in one_error(err), err
        assert not (tmp_path / "deq").exists()
    assert run("convert", nf4, tmp_path / "deq", "--dtype", "bf16", "-q")[0] == 0


def test_a_read_that_fails_under_a_rewrite_says_so(nf4: Path, tmp_path: Path, run, monkeypatch) -> None:
    """The writer starts --overwrite after the reader opened its source: the read that then fails (a shard gone,
    a quant state gone) is reported as the rewrite, not as damage."""
    import m1.ops

    real = m1.ops.OpRunner.__call__
    started: list[object] = []

    def racing(self, name):  # noqa: ANN001, ANN202
        if not started:
            folder = Path(self.ckpt.root)
            folder = folder.parent if folder.suffix == ".gguf" else folder
            shards = [p.name for p in folder.iterdir() if p.suffix in (".safetensors", ".gguf")]
            started.append(writer_holding(folder, *shards))
            started[0].__enter__()
        return real(self, name)

    monkeypatch.setattr(m1.ops.OpRunner, "__call__", racing)
    try:
        code, _, err = run("convert", nf4, tmp_path / "deq", "--dtype", "bf16", "-q")
        assert code == 1 and "being rewritten" in one_error(err), err
        assert not (tmp_path / "deq" / "m1-manifest.json").exists()
    finally:
        if started:
            started[0].__exit__(None, None, None)


# ---- class 4: a source whose manifest says it changed ----------------------------------------------------------


def flip_last_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-1] ^= 0x01  # the last tensor's data: the header still parses, every check but the sha256 passes
    path.write_bytes(bytes(data))


def looks_incomplete(dest: Path) -> None:
    folder = dest.parent if dest.suffix == ".gguf" else dest
    if folder.exists():
        assert not [p for p in folder.iterdir() if p.name.endswith("m1-manifest.json")]
        assert not list(folder.glob("*.index.json")) and not list(folder.glob(".*.tmp"))
    if dest.suffix == ".gguf":
        assert not dest.exists()


@pytest.mark.parametrize("workers", [1, 2])
@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_a_changed_shard_of_an_m1_source_is_refused(make_tiny_ckpt, tmp_path: Path, run, command: str,
                                                     workers: int) -> None:
    src = make_tiny_ckpt("s0", **QUANTIZABLE)
    made = tmp_path / "made"
    assert run("convert", src, made, "--to", "hf", "--layout", "by-layer", "-q")[0] == 0
    shard = sorted(made.glob("model-*.safetensors"))[1]
    flip_last_byte(shard)
    assert run("verify", "integrity", made)[0] == 1  # what verify says: the jobs must agree
    job = ["--to", "release"] if command == "convert" else ["--scheme", "int8", "--threads", "1"]
    dest = tmp_path / "out"
    code, _, err = run(command, made, dest, *job, "--workers", workers, "-q")
    assert code == 1, err
    line = one_error(err)
    assert shard.name in line and "manifest" in line
    looks_incomplete(dest)


def test_a_changed_tokenizer_of_an_m1_source_is_refused(make_tiny_ckpt, tmp_path: Path, run) -> None:
    src = make_tiny_ckpt("s1")
    made = tmp_path / "made"
    assert run("convert", src, made, "--to", "hf", "-q")[0] == 0
    flip_last_byte(made / "tokenizer_config.json")
    code, _, err = run("convert", made, tmp_path / "out", "--to", "release", "-q")
    assert code == 1 and "tokenizer_config.json" in one_error(err) and "manifest" in err, err
    looks_incomplete(tmp_path / "out")


@pytest.mark.parametrize("command", ["convert", "quantize"])
def test_a_changed_gguf_is_refused(q40: Path, tmp_path: Path, run, command: str) -> None:
    flip_last_byte(q40)
    assert run("verify", "integrity", q40)[0] == 1
    dest = tmp_path / "o" / "back.gguf"
    job = ["--to", "gguf"] if command == "convert" else ["--format", "gguf", "--scheme", "q8_0"]
    code, _, err = run(command, q40, dest, *job, "-q")
    assert code == 1 and q40.name in one_error(err) and "manifest" in err, err
    looks_incomplete(dest)
    code, _, err = run("convert", q40, tmp_path / "rel", "--to", "release", "-q")
    assert code == 1 and q40.name in one_error(err), err
    looks_incomplete(tmp_path / "rel")


def test_a_sound_m1_source_converts_as_before(make_tiny_ckpt, tmp_path: Path, run) -> None:
    """The check reads nothing into the output: an m1-made source and the same bytes without a manifest give
    the same files, with one worker and two, into hf (another tensor order) and by layer."""
    src = make_tiny_ckpt("s0", **QUANTIZABLE)
    made = tmp_path / "made"
    assert run("convert", src, made, "--to", "hf", "--layout", "by-layer", "-q")[0] == 0
    bare = tmp_path / "bare"
    bare.mkdir()
    for p in made.iterdir():
        if p.name != "m1-manifest.json":
            (bare / p.name).write_bytes(p.read_bytes())
    for job in (["--to", "release"], ["--to", "release", "--layout", "by-layer", "--workers", "2"]):
        a, b = tmp_path / "a", tmp_path / "b"
        assert run("convert", made, a, *job, "--overwrite", "-q")[0] == 0
        assert run("convert", bare, b, *job, "--overwrite", "-q")[0] == 0
        shards = sorted(p.name for p in a.glob("*.safetensors"))
        assert shards and shards == sorted(p.name for p in b.glob("*.safetensors"))
        for name in shards:
            assert (a / name).read_bytes() == (b / name).read_bytes()


def test_the_running_hash_is_right_whatever_the_read_order(tmp_path: Path) -> None:
    """Ranges read out of order, twice, in part or not at all: the check still hashes exactly the file."""
    import hashlib
    import random

    from m1.errors import CheckpointError
    from m1.source_check import SourceCheck, SourceRecords

    data = random.Random(0).randbytes(1 << 20)
    path = tmp_path / "f.bin"
    path.write_bytes(data)
    rng = random.Random(1)
    for sha, ok in ((hashlib.sha256(data).hexdigest(), True), ("0" * 64, False)):
        records = SourceRecords(tmp_path / "m", {"f": path}, {"f": (sha, len(data))}, {"f": "out"})
        check = SourceCheck(records, set())
        check.begin("out")

        def read_then_complete(check: SourceCheck = check) -> None:
            for _ in range(40):
                a = rng.randrange(len(data))
                n = rng.randrange(1, 1 << 16)
                check.observe("f", a, n, data[a:a + n] if rng.random() < 0.5 else None)
            check.complete("out")

        if ok:
            read_then_complete()
        else:
            with pytest.raises(CheckpointError, match="sha256"):  # at the read that ends the file, or at the end
                read_then_complete()
        check.close()
