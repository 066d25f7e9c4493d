"""`m1 verify integrity` on damaged checkpoints, each built by editing files that make-tiny / save_file wrote.

Exit codes: 0 sound, 1 findings, 2 usage. Every finding names the file and, where there is one, the tensor.
"""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

INDEX = "model.safetensors.index.json"


# ---- editing helpers (safetensors library + plain JSON) ------------------------------------------------------


def weight_map(root: Path) -> dict[str, str]:
    return json.loads((root / INDEX).read_text())["weight_map"]


def shard_of(root: Path, tensor: str) -> str:
    return weight_map(root)[tensor]


def write_index(root: Path, wmap: dict[str, str], total: int | None = None) -> None:
    """Rewrite the index; total_size recomputed from the shards (as the safetensors library reads them)."""
    if total is None:
        total = 0
        for file in set(wmap.values()):
            if (root / file).exists():
                total += sum(t.numel() * t.element_size() for t in load_file(str(root / file)).values())
    (root / INDEX).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": wmap}, indent=2))


def edit_shard(root: Path, file: str, edit) -> None:
    path = root / file
    with safe_open(str(path), framework="pt") as sf:
        metadata = sf.metadata()
    tensors = load_file(str(path))
    edit(tensors)
    save_file(tensors, str(path), metadata=metadata)


def raw_header(path: Path) -> tuple[int, dict]:
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return n, json.loads(data[8:8 + n])


@pytest.fixture
def check(run):
    """`check(root, *flags)` -> (exit code, text output, findings from --json)."""

    def call(root: Path, *flags: str) -> tuple[int, str, list[dict]]:
        code, out, err = run("verify", "integrity", root, "-q", *flags)
        code_json, out_json, _ = run("verify", "integrity", root, "-q", "--json", *flags)
        assert code_json == code
        report = json.loads(out_json)
        assert report["ok"] == (code == 0)
        assert "Traceback" not in err
        return code, out, report["findings"]

    return call


def only(findings: list[dict], code: str) -> list[dict]:
    assert {f["code"] for f in findings} == {code}, findings
    return findings


# ---- sound ---------------------------------------------------------------------------------------------------


def test_make_tiny_is_sound(tiny: Path, check) -> None:
    code, out, findings = check(tiny, "--deep")
    assert code == 0, out
    assert findings == []
    assert "sound" in out


def test_converted_with_manifest_is_sound(tiny: Path, tmp_path: Path, run, check) -> None:
    code, _, err = run("convert", tiny, tmp_path / "hf", "--to", "hf", "-q")
    assert code == 0, err
    code, out, findings = check(tmp_path / "hf", "--deep")
    assert code == 0 and findings == [], out


def test_usage_error_exits_2(tmp_path: Path, run) -> None:
    code, out, err = run("verify", "integrity", tmp_path / "nowhere")
    assert code == 2
    assert len(err.strip().splitlines()) == 1 and "nowhere" in err


# ---- damaged shards ------------------------------------------------------------------------------------------


def test_missing_shard(tiny: Path, check) -> None:
    file = shard_of(tiny, "model.layers.0.self_attn.qkv_proj.weight")
    (tiny / file).unlink()
    code, out, findings = check(tiny)
    assert code == 1
    (f,) = only(findings, "missing-shard")
    assert f["file"] == file
    lost = [n for n, fl in weight_map(tiny).items() if fl == file]
    assert file in out and lost[0] in out


def test_truncated_shard(tiny: Path, check) -> None:
    file = shard_of(tiny, "model.embed_tokens.weight")
    path = tiny / file
    _, header = raw_header(path)
    header.pop("__metadata__", None)
    last = max(header, key=lambda name: header[name]["data_offsets"][1])
    path.write_bytes(path.read_bytes()[:-10])
    code, out, findings = check(tiny)
    assert code == 1
    (f,) = only(findings, "corrupt-shard")
    assert f["file"] == file and f["tensor"] == last
    assert "truncated" in f["message"]
    assert file in out and last in out


def test_shard_shorter_than_its_header_length(tiny: Path, check) -> None:
    file = shard_of(tiny, "lm_head.weight")
    (tiny / file).write_bytes((tiny / file).read_bytes()[:5])
    code, out, findings = check(tiny)
    assert code == 1
    (f,) = only(findings, "corrupt-shard")
    assert f["file"] == file and file in out
    assert any(name in out for name, fl in weight_map(tiny).items() if fl == file)


def test_corrupt_header(tiny: Path, check) -> None:
    file = shard_of(tiny, "model.norm.weight")
    path = tiny / file
    data = bytearray(path.read_bytes())
    data[8:40] = b"\xff" * 32  # the JSON is now garbage
    path.write_bytes(bytes(data))
    code, out, findings = check(tiny)
    assert code == 1
    (f,) = only(findings, "corrupt-shard")
    assert f["file"] == file and "corrupt header" in f["message"]
    assert file in out
    assert any(name in out for name, fl in weight_map(tiny).items() if fl == file)


def test_header_length_beyond_the_file(tiny: Path, check) -> None:
    file = shard_of(tiny, "model.norm.weight")
    path = tiny / file
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", len(data) * 2)
    path.write_bytes(bytes(data))
    code, out, findings = check(tiny)
    assert code == 1
    (f,) = only(findings, "corrupt-shard")
    assert f["file"] == file and file in out


# ---- index against shards ------------------------------------------------------------------------------------


def test_index_names_a_tensor_the_shard_lacks(tiny: Path, check) -> None:
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    file = shard_of(tiny, name)
    edit_shard(tiny, file, lambda t: t.pop(name))
    write_index(tiny, weight_map(tiny))
    code, out, findings = check(tiny)
    assert code == 1
    (f,) = only(findings, "index-mismatch")
    assert (f["file"], f["tensor"]) == (file, name)
    assert "shard lacks" in f["message"]
    assert name in out and file in out


def test_shard_holds_a_tensor_the_index_lacks(tiny: Path, check) -> None:
    name = "model.layers.2.self_attn.out_proj.weight"
    file = shard_of(tiny, name)
    wmap = weight_map(tiny)
    del wmap[name]
    write_index(tiny, wmap)
    code, out, findings = check(tiny)
    assert code == 1
    (f,) = only(findings, "index-mismatch")
    assert (f["file"], f["tensor"]) == (file, name)
    assert "index lacks" in f["message"]
    assert name in out


def test_index_maps_a_tensor_to_the_wrong_shard(tiny: Path, check) -> None:
    name = "model.norm.weight"
    wmap = weight_map(tiny)
    right = wmap[name]
    wrong = next(f for f in sorted(set(wmap.values())) if f != right)
    wmap[name] = wrong
    write_index(tiny, wmap)
    code, out, findings = check(tiny)
    assert code == 1
    assert {(f["file"], f["tensor"]) for f in only(findings, "index-mismatch")} == {(wrong, name), (right, name)}


@pytest.mark.parametrize("bad", ["../elsewhere/model.safetensors", "/tmp/model.safetensors"])
def test_weight_map_outside_the_checkpoint(tiny: Path, tmp_path: Path, check, bad: str) -> None:
    # a perfectly valid shard sits where the index points: it must not be read
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    save_file({"model.norm.weight": torch.ones(64, dtype=torch.bfloat16)}, str(outside / "model.safetensors"))
    wmap = weight_map(tiny)
    wmap["model.norm.weight"] = bad
    write_index(tiny, wmap, total=0)
    code, out, findings = check(tiny)
    assert code == 1
    (f,) = only(findings, "unreadable")
    assert f["file"].endswith(INDEX) and f["tensor"] == "model.norm.weight"
    assert bad in out and "outside" in out


def test_total_size_mismatch(tiny: Path, check) -> None:
    index = json.loads((tiny / INDEX).read_text())
    index["metadata"]["total_size"] += 2
    (tiny / INDEX).write_text(json.dumps(index))
    code, out, findings = check(tiny)
    assert code == 1
    (f,) = only(findings, "total-size")
    assert f["file"] == INDEX
    assert str(index["metadata"]["total_size"]) in out


# ---- against the spec ----------------------------------------------------------------------------------------


def test_wrong_shape(tiny: Path, check) -> None:
    name = "lm_head.weight"
    file = shard_of(tiny, name)
    edit_shard(tiny, file, lambda t: t.update({name: t[name].t().contiguous()}))  # same bytes, [64, 256]
    code, out, findings = check(tiny)
    assert code == 1
    (f,) = only(findings, "shape")
    assert (f["file"], f["tensor"]) == (file, name)
    assert "[64, 256]" in f["message"] and "[256, 64]" in f["message"]
    assert name in out and file in out


def test_wrong_shape_for_the_config(tiny: Path, check) -> None:
    """The shards are fine, the config disagrees with them: the vocabulary-sized tensors are named."""
    config = json.loads((tiny / "config.json").read_text())
    config["vocab_size"] = 300
    (tiny / "config.json").write_text(json.dumps(config))
    code, out, findings = check(tiny)
    assert code == 1
    assert {f["tensor"] for f in only(findings, "shape")} == {"model.embed_tokens.weight", "lm_head.weight"}
    assert "[300, 64]" in out


def test_wrong_dtype(tiny: Path, check) -> None:
    name = "model.layers.3.self_attn.k_proj.weight"
    file = shard_of(tiny, name)
    edit_shard(tiny, file, lambda t: t.update({name: t[name].to(torch.float16)}))
    code, out, findings = check(tiny)
    assert code == 1
    (f,) = only(findings, "dtype")
    assert (f["file"], f["tensor"]) == (file, name)
    assert "F16" in f["message"] and "BF16" in f["message"]


def test_integer_dtype(tiny: Path, check) -> None:
    name = "model.layers.0.self_attn.norm.weight"
    file = shard_of(tiny, name)
    edit_shard(tiny, file, lambda t: t.update({name: torch.zeros(t[name].shape, dtype=torch.int16)}))
    code, out, findings = check(tiny)
    assert code == 1
    (f,) = only(findings, "dtype")
    assert (f["file"], f["tensor"]) == (file, name) and "I16" in f["message"]


def test_missing_tensor(tiny: Path, check) -> None:
    name = "model.layers.3.block_sparse_moe.gate.weight"
    file = shard_of(tiny, name)
    edit_shard(tiny, file, lambda t: t.pop(name))
    wmap = weight_map(tiny)
    del wmap[name]
    write_index(tiny, wmap)
    code, out, findings = check(tiny)
    assert code == 1
    (f,) = only(findings, "missing-tensor")
    assert f["tensor"] == name
    assert "F32[4, 64]" in f["message"]  # what the spec expects: the fp32 router, experts x hidden


@pytest.mark.parametrize(
    "name, code_",
    [
        ("model.layers.0.self_attn.rotary_emb.inv_freq", "unknown-tensor"),
        ("transformer.h.0.attn.weight", "unknown-tensor"),
        ("model.layers.9.input_layernorm.weight", "unexpected-tensor"),  # only 4 layers
        ("model.layers.0.self_attn.q_proj.weight", "unexpected-tensor"),  # layer 0 is lightning
        ("model.layers.1.block_sparse_moe.experts.7.w1.weight", "unexpected-tensor"),  # only 4 experts
    ],
)
def test_unknown_and_unexpected_tensors(tiny: Path, check, name: str, code_: str) -> None:
    file = shard_of(tiny, "model.norm.weight")
    edit_shard(tiny, file, lambda t: t.update({name: torch.ones(8, dtype=torch.bfloat16)}))
    wmap = weight_map(tiny)
    wmap[name] = file
    write_index(tiny, wmap)
    code, out, findings = check(tiny)
    assert code == 1
    (f,) = only(findings, code_)
    assert (f["file"], f["tensor"]) == (file, name)
    assert name in out and file in out


def test_config_of_neither_flavour(tiny: Path, check) -> None:
    config = json.loads((tiny / "config.json").read_text())
    config["model_type"] = "mixtral"
    (tiny / "config.json").write_text(json.dumps(config))
    code, out, findings = check(tiny)
    assert code == 1
    (f,) = only(findings, "unreadable")
    assert f["file"] == str(tiny / "config.json")
    assert "'mixtral'" in out and "config.json" in out


# ---- deep and manifest ---------------------------------------------------------------------------------------


def test_nan_and_inf_with_deep(tiny: Path, check) -> None:
    nan_name = "model.layers.1.self_attn.qkv_proj.weight"
    inf_name = "model.layers.2.block_sparse_moe.gate.weight"  # the fp32 router

    def poison(name: str, value: float):
        def edit(t: dict[str, torch.Tensor]) -> None:
            t[name] = t[name].clone()
            t[name][1, 2] = value

        return edit

    edit_shard(tiny, shard_of(tiny, nan_name), poison(nan_name, math.nan))
    edit_shard(tiny, shard_of(tiny, inf_name), poison(inf_name, -math.inf))
    code, out, findings = check(tiny)
    assert code == 0 and findings == []  # headers only: nothing to see
    code, out, findings = check(tiny, "--deep")
    assert code == 1
    found = {(f["file"], f["tensor"]) for f in only(findings, "not-finite")}
    assert found == {(shard_of(tiny, nan_name), nan_name), (shard_of(tiny, inf_name), inf_name)}
    assert nan_name in out and inf_name in out and "1 NaN/Inf" in out


@pytest.fixture
def converted(tiny: Path, tmp_path: Path, run) -> Path:
    out = tmp_path / "hf"
    code, _, err = run("convert", tiny, out, "--to", "hf", "--shard-size", "300KB", "-q")
    assert code == 0, err
    return out


def test_manifest_sha256_mismatch(converted: Path, check) -> None:
    name = "model.layers.1.self_attn.out_proj.weight"
    file = shard_of(converted, name)
    path = converted / file
    n, header = raw_header(path)
    start = 8 + n + header[name]["data_offsets"][0]
    data = bytearray(path.read_bytes())
    data[start + 5] ^= 0x01  # one bit of one weight: still a valid file with a valid header
    path.write_bytes(bytes(data))
    code, out, findings = check(converted)
    assert code == 1
    (f,) = only(findings, "sha256")
    assert f["file"] == file and file in out
    code, out, findings = check(converted, "--no-hash")
    assert code == 0 and findings == []


def test_manifest_size_mismatch(converted: Path, check) -> None:
    file = sorted(p.name for p in converted.glob("*.safetensors"))[-1]
    with open(converted / file, "ab") as f:
        f.write(b"\0" * 16)
    code, out, findings = check(converted)
    assert code == 1
    # the bytes past the last tensor are also a damaged shard in their own right (the library refuses it)
    assert {f["code"] for f in findings} == {"sha256", "corrupt-shard"}, findings
    (f,) = [f for f in findings if f["code"] == "sha256"]
    assert f["file"] == file and "size" in f["message"]


def test_shard_listed_in_manifest_but_gone(converted: Path, check) -> None:
    files = sorted(p.name for p in converted.glob("*.safetensors"))
    (converted / files[0]).unlink()
    code, out, findings = check(converted)
    assert code == 1
    assert {f["code"] for f in findings} == {"missing-shard"}
    assert {f["file"] for f in findings} == {files[0]}


@pytest.mark.parametrize("layout", ["model.safetensors", "pytorch_model.bin"])
def test_single_file_and_bin(tiny: Path, tmp_path: Path, check, layout: str) -> None:
    tensors: dict[str, torch.Tensor] = {}
    for f in tiny.glob("*.safetensors"):
        tensors.update(load_file(str(f)))
    root = tmp_path / "one"
    root.mkdir()
    (root / "config.json").write_bytes((tiny / "config.json").read_bytes())
    save = (lambda t: save_file(t, str(root / layout))) if layout.endswith(".safetensors") else \
        (lambda t: torch.save(t, root / layout))
    save(tensors)
    code, out, findings = check(root, "--deep")
    assert code == 0 and findings == [], out
    name = "model.layers.0.block_sparse_moe.experts.3.w1.weight"
    tensors[name] = tensors[name].clone()
    tensors[name][0, 0] = math.inf
    save(tensors)
    code, out, findings = check(root, "--deep")
    assert code == 1
    (f,) = only(findings, "not-finite")
    assert (f["file"], f["tensor"]) == (layout, name)
