"""Damaged safetensors headers (issue 9): m1 is as strict as the safetensors library, names the file and
the tensor in one line, and no command reads past the damage.

Each case edits the header (or the data section) of a shard of the tiny M1, then checks that the
safetensors library itself rejects the file, so m1 refuses exactly what the library refuses.
"""

from __future__ import annotations

import json
import struct
from collections.abc import Callable
from pathlib import Path

import pytest
from safetensors import safe_open

from m1.errors import CheckpointError
from m1.safetensors_io import parse_header, read_header

SHARD = "model-00000-of-00003.safetensors"
GATE = "model.layers.2.block_sparse_moe.gate.weight"  # F32 [4, 64], bytes 0..1024 of the data section
HEAD = "lm_head.weight"
W3_0 = "model.layers.0.block_sparse_moe.experts.0.w3.weight"
W3_1 = "model.layers.0.block_sparse_moe.experts.1.w3.weight"
NORM = "model.layers.0.post_attention_layernorm.weight"  # BF16 [64]


def rewrite(path: Path, edit: Callable[[dict, bytearray], bytearray | None]) -> None:
    """Rewrite a shard with `edit(header, data)` applied (the header dict and the data section)."""
    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8 : 8 + n])
    data = bytearray(raw[8 + n :])
    data = edit(header, data) or data
    body = json.dumps(header).encode()
    body += b" " * (-len(body) % 8)
    path.write_bytes(struct.pack("<Q", len(body)) + body + bytes(data))


def library_loads(path: Path) -> bool:
    try:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                f.get_tensor(name)
    except Exception:
        return False
    return True


def shift_after(header: dict, first: int, by: int) -> None:
    """Move the data of every tensor that starts at or after `first` by `by` bytes."""
    for name, entry in header.items():
        if name != "__metadata__" and entry["data_offsets"][0] >= first:
            entry["data_offsets"] = [o + by for o in entry["data_offsets"]]


# Each case damages the shard and returns the words the error must hold besides the file name.
def overlap(h: dict, data: bytearray) -> list[str]:
    h[W3_1]["data_offsets"] = list(h[W3_0]["data_offsets"])  # same dtype and shape: only the offsets are wrong
    return ["overlap", W3_1, W3_0]


def gap(h: dict, data: bytearray) -> list[str]:
    end = h[HEAD]["data_offsets"][1]
    shift_after(h, end, 8)
    data[end:end] = b"\0" * 8
    return ["8 bytes before", "belong to no tensor"]


def leading_gap(h: dict, data: bytearray) -> list[str]:
    shift_after(h, 0, 16)
    data[0:0] = b"\0" * 16
    return ["16 bytes before", GATE]


def trailing_bytes(h: dict, data: bytearray) -> list[str]:
    data += b"\0" * 8
    return ["8 bytes after the last tensor"]


def float_offsets(h: dict, data: bytearray) -> list[str]:
    h[GATE]["data_offsets"] = [float(o) for o in h[GATE]["data_offsets"]]
    return ["data_offsets", "[0.0, 1024.0]", GATE]


def float_dim(h: dict, data: bytearray) -> list[str]:
    h[NORM]["shape"] = [64.0]
    return ["shape", "64.0", NORM]


def bool_dim(h: dict, data: bytearray) -> list[str]:
    h[NORM]["shape"] = [True, 64]  # True == 1: the size still fits, only the JSON type is wrong
    return ["shape", "true", NORM]


def negative_dims(h: dict, data: bytearray) -> list[str]:
    h[NORM]["shape"] = [-1, -64]  # the product is still 64
    return ["shape", "-64", NORM]


def string_dim(h: dict, data: bytearray) -> list[str]:
    h[NORM]["shape"] = ["64"]
    return ["shape", '"64"', NORM]


def negative_offset(h: dict, data: bytearray) -> list[str]:
    h[GATE]["data_offsets"] = [-1024, 0]
    return ["data_offsets", "-1024", GATE]


def three_offsets(h: dict, data: bytearray) -> list[str]:
    h[GATE]["data_offsets"] = [0, 1024, 1024]
    return ["data_offsets", GATE]


def metadata_int_value(h: dict, data: bytearray) -> list[str]:
    h["__metadata__"] = {"format": 1}
    return ["__metadata__", "strings to strings"]


def metadata_list(h: dict, data: bytearray) -> list[str]:
    h["__metadata__"] = ["pt"]
    return ["__metadata__", "strings to strings"]


def metadata_nested(h: dict, data: bytearray) -> list[str]:
    h["__metadata__"] = {"format": {"pt": "yes"}}
    return ["__metadata__", "strings to strings"]


def unknown_dtype(h: dict, data: bytearray) -> list[str]:
    h[GATE]["dtype"] = "F31"
    return ["unknown dtype", "F31", GATE]


def lowercase_dtype(h: dict, data: bytearray) -> list[str]:
    h[GATE]["dtype"] = "f32"
    return ["unknown dtype", "f32", GATE]


def entry_not_object(h: dict, data: bytearray) -> list[str]:
    h[GATE] = [0, 1024]
    return ["not an object", GATE]


def no_shape(h: dict, data: bytearray) -> list[str]:
    del h[GATE]["shape"]
    return ["'shape'", GATE]


CASES = [overlap, gap, leading_gap, trailing_bytes, float_offsets, float_dim, bool_dim, negative_dims, string_dim,
         negative_offset, three_offsets, metadata_int_value, metadata_list, metadata_nested, unknown_dtype,
         lowercase_dtype, entry_not_object, no_shape]


def damage(root: Path, case: Callable[[dict, bytearray], list[str]]) -> list[str]:
    words: list[str] = []

    def edit(h: dict, data: bytearray) -> None:
        words.extend(case(h, data))

    rewrite(root / SHARD, edit)
    return words


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__)
def test_parse_header_refuses_what_the_library_refuses(tiny: Path, case) -> None:
    words = damage(tiny, case)
    assert not library_loads(tiny / SHARD)
    with pytest.raises(CheckpointError) as info:
        read_header(tiny / SHARD, display=SHARD)
    line = info.value.one_line()
    assert "\n" not in line and line.startswith(f"file {SHARD}")
    for w in words:
        assert w in line, (w, line)
    if case not in (gap, trailing_bytes, metadata_int_value, metadata_list, metadata_nested):
        assert info.value.tensor is not None


@pytest.mark.parametrize("case", CASES, ids=lambda f: f.__name__)
def test_commands_refuse_the_damaged_shard(tiny: Path, tmp_path: Path, run, case) -> None:
    words = damage(tiny, case)

    code, out, err = run("verify", "integrity", tiny, "-q")
    assert code == 1, (out, err)
    assert "Traceback" not in err and "internal error" not in err
    finding = next(line for line in out.splitlines() if "[corrupt-shard]" in line)
    for w in [SHARD, *words]:
        assert w in finding, (w, finding)

    code, out, err = run("inspect", tiny)
    assert code == 1, (out, err)
    assert "Traceback" not in err and "internal error" not in err
    assert SHARD in out + err

    dest = tmp_path / "out"
    code, out, err = run("convert", tiny, dest, "--to", "hf", "-q")
    assert code == 1, (out, err)
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: ") and SHARD in lines[0], err
    assert "Traceback" not in err and "internal error" not in err
    assert not (dest / "m1-manifest.json").exists() and not (dest / "model.safetensors.index.json").exists()
    assert not list(dest.glob("*.safetensors")) if dest.exists() else True


def test_a_rewritten_valid_shard_still_passes(tiny: Path, run) -> None:
    rewrite(tiny / SHARD, lambda h, data: None)  # same tensors, our own header encoding
    assert library_loads(tiny / SHARD)
    header = read_header(tiny / SHARD)
    assert GATE in header.tensors and header.metadata == {"format": "pt"}
    code, out, err = run("verify", "integrity", tiny, "-q")
    assert code == 0, out + err


def test_library_edge_cases_that_are_valid(tmp_path: Path) -> None:
    """What the library accepts, m1 accepts: zero-size tensors sharing an offset, null metadata, scalars,
    keys out of data order, and an empty file."""
    header = {
        "__metadata__": None,
        "b": {"dtype": "F32", "shape": [2], "data_offsets": [4, 12]},
        "empty": {"dtype": "BF16", "shape": [0, 3], "data_offsets": [0, 0]},
        "a": {"dtype": "F32", "shape": [], "data_offsets": [0, 4]},
        "tail": {"dtype": "U8", "shape": [0], "data_offsets": [12, 12]},
    }
    for obj, data in ((header, b"\0" * 12), ({}, b"")):
        body = json.dumps(obj).encode()
        raw = struct.pack("<Q", len(body)) + body + data
        path = tmp_path / "x.safetensors"
        path.write_bytes(raw)
        assert library_loads(path)
        parsed = parse_header(raw, "x.safetensors", len(raw))
        assert parsed.metadata == {} and len(parsed.tensors) == len(obj) - ("__metadata__" in obj)
