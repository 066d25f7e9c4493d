"""The fault suite for GGUF (issue 17): damaged tensor infos and absurd metadata, fed to every command that reads
a GGUF.

Each case edits the bytes of a tiny M1 exported as GGUF (BF16 by `m1 convert --to gguf`, Q4_0 by `m1 quantize
--format gguf`): tensor infos (two at the same bytes, an offset off the alignment, past the end, moved onto its
neighbour, a tensor count one short, a size that runs into the next tensor) and metadata (expert and layer
counts of 2^30, arrays of 2^40 entries). Every damaged file goes through inspect, verify integrity (with and
without --deep) and convert back to a release folder: a non-zero exit (1 for the input, 2 for usage), one clear
line (or integrity's and inspect's findings), no traceback, within seconds and without the memory growing,
nothing complete-looking written, and not a byte of the source changed.
"""

from __future__ import annotations

import resource
import signal
import struct
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import gguf
import pytest
from golden import tree_hash

from m1.errors import CheckpointError, ConfigError
from m1.gguf.reader import GGUFStorage

SECONDS = 15  # per command; a sound reader needs well under one on this tiny file
MAX_GROWTH_KB = 1 << 20  # 1 GiB more peak memory than the test process had is a failure

Damage = Callable[[bytearray, gguf.GGUFReader], None]


# ---- where things are in the file (gguf-py's reader of the sound file says) ----------------------------------


def _tensor(reader: gguf.GGUFReader, name: str) -> gguf.ReaderTensor:
    return next(t for t in reader.tensors if t.name == name)


def _info_part(reader: gguf.GGUFReader, name: str, part: int) -> int:
    """File offset of part `part` of a tensor info: 0 name length, 1 name, 2 n_dims, 3 dims, 4 type, 5 offset."""
    field = _tensor(reader, name).field
    return field.offset + sum(int(p.nbytes) for p in field.parts[:part])


def _offset_of(reader: gguf.GGUFReader, name: str) -> int:
    t = _tensor(reader, name)
    return int(t.data_offset) - int(reader.data_offset)


def _set_offset(data: bytearray, reader: gguf.GGUFReader, name: str, value: int) -> None:
    struct.pack_into("<Q", data, _info_part(reader, name, 5), value)


def _value_at(reader: gguf.GGUFReader, key: str) -> int:
    """File offset of a metadata value (of an array: its element type, then its uint64 length)."""
    field = reader.fields[key]
    return field.offset + sum(int(p.nbytes) for p in field.parts[:3])


def _set_uint32(key: str, value: int) -> Damage:
    def apply(data: bytearray, reader: gguf.GGUFReader) -> None:
        assert reader.fields[key].types == [gguf.GGUFValueType.UINT32], key
        struct.pack_into("<I", data, _value_at(reader, key), value)
    return apply


def _array_length(key: str, value: int) -> Damage:
    def apply(data: bytearray, reader: gguf.GGUFReader) -> None:
        assert reader.fields[key].types[0] == gguf.GGUFValueType.ARRAY, key
        struct.pack_into("<Q", data, _value_at(reader, key) + 4, value)
    return apply


# ---- the damage ---------------------------------------------------------------------------------------------

GATE, UP = "blk.0.ffn_gate_exps.weight", "blk.0.ffn_up_exps.weight"  # same type and shape
NORM = "blk.1.attn_norm.weight"  # F32 [64], between two tensors
HEAD = "output.weight"  # the last tensor


def same_offset(data: bytearray, reader: gguf.GGUFReader) -> None:
    _set_offset(data, reader, UP, _offset_of(reader, GATE))


def offset_unaligned(data: bytearray, reader: gguf.GGUFReader) -> None:
    _set_offset(data, reader, NORM, _offset_of(reader, NORM) + 8)


def offset_onto_neighbour(data: bytearray, reader: gguf.GGUFReader) -> None:
    _set_offset(data, reader, NORM, _offset_of(reader, NORM) + 32)  # aligned, but into the next tensor


def offset_past_end(data: bytearray, reader: gguf.GGUFReader) -> None:
    end = len(data) - int(reader.data_offset)
    _set_offset(data, reader, HEAD, end + (-end % 32))


def offset_far_past_end(data: bytearray, reader: gguf.GGUFReader) -> None:
    _set_offset(data, reader, HEAD, 1 << 40)


def head_runs_past_end(data: bytearray, reader: gguf.GGUFReader) -> None:
    _set_offset(data, reader, HEAD, _offset_of(reader, HEAD) + 64)  # aligned, its last 64 bytes past the end


def count_one_short(data: bytearray, reader: gguf.GGUFReader) -> None:
    (count,) = struct.unpack_from("<Q", data, 8)
    struct.pack_into("<Q", data, 8, count - 1)  # the head's info becomes padding, the data section shifts


def size_into_next(data: bytearray, reader: gguf.GGUFReader) -> None:
    struct.pack_into("<Q", data, _info_part(reader, NORM, 3), 2 * int(_tensor(reader, NORM).shape[0]))


TENSOR_INFO_CASES: dict[str, Damage] = {f.__name__.replace("_", "-"): f for f in (
    same_offset, offset_unaligned, offset_onto_neighbour, offset_past_end, offset_far_past_end, head_runs_past_end,
    count_one_short, size_into_next)}

A = "minimax-01."
METADATA_CASES: dict[str, Damage] = {
    "expert_count-2^30": _set_uint32(A + "expert_count", 1 << 30),
    "expert_count-2^32-1": _set_uint32(A + "expert_count", (1 << 32) - 1),
    "expert_used_count-2^30": _set_uint32(A + "expert_used_count", 1 << 30),
    "block_count-2^30": _set_uint32(A + "block_count", 1 << 30),
    "embedding_length-2^31": _set_uint32(A + "embedding_length", 1 << 31),
    "feed_forward_length-2^31": _set_uint32(A + "feed_forward_length", 1 << 31),
    "head_count-2^30": _set_uint32(A + "attention.head_count", 1 << 30),
    "vocab_size-2^31": _set_uint32(A + "vocab_size", 1 << 31),
    "recurrent_layers-2^40": _array_length(A + "attention.recurrent_layers", 1 << 40),
    "tokens-2^40": _array_length("tokenizer.ggml.tokens", 1 << 40),
    "token_type-2^33": _array_length("tokenizer.ggml.token_type", 1 << 33),
}

CASES: dict[str, Damage] = {**{f"info-{k}": v for k, v in TENSOR_INFO_CASES.items()},
                            **{f"meta-{k}": v for k, v in METADATA_CASES.items()}}

COMMANDS: dict[str, Callable[[Path, Path], list[object]]] = {
    "inspect": lambda src, out: ["inspect", src],
    "integrity": lambda src, out: ["verify", "integrity", src, "-q"],
    "integrity-deep": lambda src, out: ["verify", "integrity", src, "--deep", "-q"],
    "convert": lambda src, out: ["convert", src, out, "--to", "release", "-q"],
}


# ---- fixtures -----------------------------------------------------------------------------------------------


class TookTooLong(BaseException):  # noqa: N818  (not an Exception: the CLI's own handler must not swallow it)
    pass


@contextmanager
def bounded(what: str) -> Iterator[None]:
    """Fail when the body runs past SECONDS or raises the process's peak memory by more than MAX_GROWTH_KB."""
    def expire(signum: int, frame: object) -> None:
        raise TookTooLong(f"{what} ran past {SECONDS} s")

    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    old = signal.signal(signal.SIGALRM, expire)
    signal.alarm(SECONDS)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    grown = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - before
    assert grown < MAX_GROWTH_KB, f"{what} raised the peak memory by {grown >> 10} MB"


@pytest.fixture(autouse=True)
def cache_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))


@pytest.fixture(scope="module")
def sound(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """The tiny M1 as a BF16 GGUF and as a Q4_0 GGUF, made by the commands a user runs."""
    from m1.cli import run_cli
    from m1.tiny import TinySpec, make_tiny

    root = tmp_path_factory.mktemp("sound")
    make_tiny(root / "tiny", TinySpec(hidden=64, intermediate=128))
    made = {"bf16": root / "tiny-bf16.gguf", "q4_0": root / "tiny-q4_0.gguf"}
    assert run_cli(["convert", str(root / "tiny"), str(made["bf16"]), "--to", "gguf", "-q"]) == 0
    assert run_cli(["quantize", str(root / "tiny"), str(made["q4_0"]), "--format", "gguf", "--scheme", "q4_0",
                    "-q"]) == 0
    return made


def damaged(sound: dict[str, Path], kind: str, case: str, folder: Path) -> Path:
    src = sound[kind]
    data = bytearray(src.read_bytes())
    CASES[case](data, gguf.GGUFReader(src))
    path = folder / src.name  # no manifest beside it: the damage must be found from the file alone
    path.write_bytes(bytes(data))
    return path


# ---- the suite ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("case", list(CASES))
def test_every_command_refuses_the_damaged_gguf_cleanly(sound: dict[str, Path], tmp_path: Path, run,
                                                        case: str) -> None:
    kind = "q4_0" if case.startswith("info-") and "same-offset" in case else "bf16"
    folder = tmp_path / "src"
    folder.mkdir()
    src = damaged(sound, kind, case, folder)
    before = tree_hash(folder)
    for command, args in COMMANDS.items():
        out = tmp_path / f"out-{command}"
        where = f"{case} / {command}"
        with bounded(where):
            code, stdout, err = run(*args(src, out))
        assert code in (1, 2), (where, code, stdout, err)
        assert "Traceback" not in err and "internal error" not in err, (where, err)
        errors = [line for line in err.strip().splitlines() if line.startswith("error: ")]
        if command.startswith("integrity"):
            findings = [line for line in stdout.splitlines() if line.startswith("[")]
            assert errors or findings, (where, stdout, err)
        elif command == "inspect":
            assert len(errors) == 1 or "problems:" in stdout or "missing:" in stdout, (where, stdout, err)
            assert "complete, nothing unexpected" not in stdout, (where, stdout)
        else:
            assert len(errors) == 1 and str(src) in errors[0], (where, err)
        assert not (out / "m1-manifest.json").exists() and not (out / "model.safetensors.index.json").exists(), where
        assert not any(out.glob("*.safetensors")) if out.exists() else True, where
        assert tree_hash(folder) == before, f"{where} changed the source"


def test_the_q4_0_file_fails_the_same_way(sound: dict[str, Path], tmp_path: Path) -> None:
    """Every tensor-info case on the Q4_0 file too (block types size their extents by blocks): opening refuses."""
    for case in TENSOR_INFO_CASES:
        folder = tmp_path / case
        folder.mkdir()
        with pytest.raises(CheckpointError) as exc:
            GGUFStorage(damaged(sound, "q4_0", f"info-{case}", folder))
        assert "tiny-q4_0.gguf" in exc.value.one_line(), case


@pytest.mark.parametrize(("case", "words"), [
    ("info-same-offset", ["blk.0.ffn_up_exps.weight", "blk.0.ffn_gate_exps.weight", "same bytes"]),
    ("info-offset-unaligned", ["blk.1.attn_norm.weight", "alignment 32"]),
    ("info-offset-onto-neighbour", ["blk.1.attn_norm.weight", "overlaps"]),
    ("info-offset-past-end", ["output.weight", "past the end"]),
    ("info-head-runs-past-end", ["output.weight", "past the end"]),
    ("info-count-one-short", ["tensor count", "unclaimed"]),
    ("info-size-into-next", ["blk.1.attn_norm.weight", "overlaps"]),
])
def test_the_layout_error_names_the_file_the_tensor_and_the_fault(sound: dict[str, Path], tmp_path: Path, case: str,
                                                                  words: list[str]) -> None:
    path = damaged(sound, "bf16", case, tmp_path)
    with pytest.raises(CheckpointError) as exc:
        GGUFStorage(path)
    line = exc.value.one_line()
    assert str(path) in line and "\n" not in line and "re-export" in line, line
    for word in words:
        assert word in line, (word, line)


@pytest.mark.parametrize(("case", "key"), [
    ("meta-expert_count-2^30", "minimax-01.expert_count"),
    ("meta-block_count-2^30", "minimax-01.block_count"),
    ("meta-embedding_length-2^31", "minimax-01.embedding_length"),
    ("meta-recurrent_layers-2^40", "minimax-01.attention.recurrent_layers"),
    ("meta-tokens-2^40", "tokenizer.ggml.tokens"),
])
def test_absurd_metadata_is_one_line_naming_the_gguf_key(sound: dict[str, Path], tmp_path: Path, case: str,
                                                         key: str) -> None:
    path = damaged(sound, "bf16", case, tmp_path)
    with bounded(case), pytest.raises((CheckpointError, ConfigError)) as exc:
        GGUFStorage(path)
    line = exc.value.one_line()
    assert str(path) in line and key in line and "\n" not in line, line


def test_a_long_but_bounded_array_is_refused_before_it_is_parsed(sound: dict[str, Path], tmp_path: Path) -> None:
    """An array that fits the file but is far longer than any M1 needs (4M bools) is refused by its length."""
    src = sound["bf16"]
    reader = gguf.GGUFReader(src)
    key = A + "attention.recurrent_layers"
    at = _value_at(reader, key)
    n = 4_000_000
    data = bytearray(src.read_bytes())
    (old,) = struct.unpack_from("<Q", data, at + 4)
    data[at + 4: at + 12 + old] = struct.pack("<Q", n) + b"\x01" * n  # a real array of 4M entries
    path = tmp_path / src.name
    path.write_bytes(bytes(data))
    with bounded("4M-entry array"), pytest.raises(CheckpointError) as exc:
        GGUFStorage(path)
    assert key in exc.value.one_line() and "4000000" in exc.value.one_line()


def test_a_sound_file_still_opens(sound: dict[str, Path]) -> None:
    """The checks refuse the damage only: both sound files open, tile their data sections and keep the head."""
    for path in sound.values():
        storage = GGUFStorage(path)
        assert "lm_head.weight" in storage.slots and storage.config.tie_word_embeddings is False


# ---- inspect of a quantized GGUF (class 8) ---------------------------------------------------------------


def test_inspect_of_a_q4_0_gguf_reports_the_stored_types_and_sizes(sound: dict[str, Path], run) -> None:
    path = sound["q4_0"]
    code, out, err = run("inspect", path, "--json")
    assert code == 0, err
    import json

    info = json.loads(out)
    stored = GGUFStorage(path).stored_types()
    assert set(info["by_dtype"]) == {"Q4_0", "BF16", "F32"}
    assert {k: v["bytes"] for k, v in info["by_dtype"].items()} == {k: v["bytes"] for k, v in stored.items()}
    size = path.stat().st_size
    assert size * 0.95 < info["bytes"] <= size  # the stored bytes, not the decoded F32 view
    assert info["quantization"] is not None and "Q4_0" in info["quantization"]
    code, out, err = run("inspect", path)
    assert code == 0 and "quantization: none" not in out and "Q4_0" in out, out


def test_inspect_of_a_q4_k_gguf_reports_the_stored_types_and_sizes(tmp_path: Path, run) -> None:
    """Q4_K (ggml's own quantizer, blocks of 256): stored types and sizes, and the layout checks pass it."""
    from m1.schemes import ggml_lib
    from m1.tiny import TinySpec, make_tiny

    if not ggml_lib.available():
        pytest.skip("llama-cpp-python (m1[gguf-k]) is not installed")
    make_tiny(tmp_path / "tiny", TinySpec(hidden=256, intermediate=256, head_dim=64, rotary_dim=32, vocab=256))
    path = tmp_path / "tiny-q4_k.gguf"
    code, _, err = run("quantize", tmp_path / "tiny", path, "--format", "gguf", "--scheme", "q4_k", "-q")
    assert code == 0, err
    code, out, err = run("inspect", path)
    assert code == 0 and "quantization: gguf Q4_K" in out and "Q4_K " in out, out + err
    stored = GGUFStorage(path).stored_types()
    assert sum(t["bytes"] for t in stored.values()) <= path.stat().st_size
    data = bytearray(path.read_bytes())
    count_one_short(data, gguf.GGUFReader(path))
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="tensor count"):
        GGUFStorage(path)
