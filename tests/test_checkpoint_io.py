"""The lazy reader and the streaming shard writer, checked against the safetensors library."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from m1.atomic_io import Produced, tensor_bytes
from m1.checkpoint import Checkpoint
from m1.errors import CheckpointError, InternalError
from m1.safetensors_io import read_header, write_shard


def all_tensors(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint, read by the safetensors library."""
    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def layer_of(name: str) -> int | None:
    m = re.match(r"model\.layers\.(\d+)\.", name)
    return int(m.group(1)) if m else None


def assert_reads_like(ckpt: Checkpoint, expected: dict[str, torch.Tensor]) -> None:
    assert set(ckpt.names()) == set(expected)
    for name, want in expected.items():
        got = ckpt.get(name)
        assert got.dtype == want.dtype, name
        assert got.shape == want.shape, name
        assert torch.equal(got, want), name
        info = ckpt.info(name)
        assert info.shape == tuple(want.shape)
        # streamed in small chunks of whole rows, the bytes are the same
        pieces = [bytes(chunk) for _, chunk in ckpt.iter_chunks(name, chunk_bytes=300)]
        assert b"".join(pieces) == bytes(tensor_bytes(want)), name


def test_sharded_release_layout(tiny: Path) -> None:
    expected = all_tensors(tiny)
    ckpt = Checkpoint.open(tiny)
    assert ckpt.index_file == "model.safetensors.index.json"
    assert ckpt.config.flavour == "release"
    index = json.loads((tiny / "model.safetensors.index.json").read_text())
    assert ckpt.weight_map == index["weight_map"]
    assert ckpt.files() == sorted(p.name for p in tiny.glob("*.safetensors"))
    assert_reads_like(ckpt, expected)
    # the router is fp32 in the release, the rest bf16
    assert expected["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.float32
    assert ckpt.info("model.layers.0.block_sparse_moe.gate.weight").dtype == "F32"
    assert ckpt.info("model.embed_tokens.weight").dtype == "BF16"


def test_header_offsets_match_safe_open(tiny: Path) -> None:
    for f in tiny.glob("*.safetensors"):
        header = read_header(f)
        with safe_open(str(f), framework="pt") as sf:
            assert set(header.tensors) == set(sf.keys())
            assert header.metadata == sf.metadata()
            raw = f.read_bytes()
            for name in sf.keys():
                info = header.tensors[name]
                assert raw[info.start:info.end] == bytes(tensor_bytes(sf.get_tensor(name)))
        assert header.file_size == f.stat().st_size


def test_relative_path(tiny: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A checkpoint opened by a relative path reads its shards from there (not from root/root/shard)."""
    expected = all_tensors(tiny)
    monkeypatch.chdir(tiny.parent)
    ckpt = Checkpoint.open(tiny.name)
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.2.block_sparse_moe.gate.weight"):
        assert ckpt.info(name).file == ckpt.weight_map[name]
    assert_reads_like(ckpt, expected)


def test_single_file_safetensors(tiny: Path, tmp_path: Path) -> None:
    expected = all_tensors(tiny)
    single = tmp_path / "single"
    single.mkdir()
    shutil.copy(tiny / "config.json", single / "config.json")
    save_file(expected, str(single / "model.safetensors"))
    ckpt = Checkpoint.open(single)
    assert ckpt.index_file is None
    assert set(ckpt.weight_map.values()) == {"model.safetensors"}
    assert_reads_like(ckpt, expected)


def test_pytorch_model_bin(tiny: Path, tmp_path: Path) -> None:
    expected = all_tensors(tiny)
    binary = tmp_path / "bin"
    binary.mkdir()
    shutil.copy(tiny / "config.json", binary / "config.json")
    torch.save(expected, binary / "pytorch_model.bin")
    ckpt = Checkpoint.open(binary)
    assert set(ckpt.weight_map.values()) == {"pytorch_model.bin"}
    assert_reads_like(ckpt, expected)
    assert ckpt.info("model.layers.1.block_sparse_moe.gate.weight").dtype == "F32"


def test_sharded_pytorch_bin(tiny: Path, tmp_path: Path) -> None:
    expected = all_tensors(tiny)
    binary = tmp_path / "bins"
    binary.mkdir()
    shutil.copy(tiny / "config.json", binary / "config.json")
    names = sorted(expected)
    files = {n: f"pytorch_model-0000{i % 2 + 1}-of-00002.bin" for i, n in enumerate(names)}
    for file in set(files.values()):
        torch.save({n: expected[n] for n in names if files[n] == file}, binary / file)
    (binary / "pytorch_model.bin.index.json").write_text(json.dumps({"metadata": {}, "weight_map": files}))
    ckpt = Checkpoint.open(binary)
    assert ckpt.weight_map == files
    assert_reads_like(ckpt, expected)


def test_by_layer_reverse_index(make_tiny_ckpt) -> None:
    root = make_tiny_ckpt(layers=6, softmax_every=3, shards=4)
    names = list(all_tensors(root))
    want: dict[int | None, set[str]] = {}
    for n in names:
        want.setdefault(layer_of(n), set()).add(n)
    ckpt = Checkpoint.open(root)
    got = ckpt.by_layer()
    assert {k: set(v) for k, v in got.items()} == want
    assert set(want) == {None, 0, 1, 2, 3, 4, 5}
    assert set(ckpt.names_in_layer(None)) == {"model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"}
    assert set(ckpt.layer_weights(2)) == {n[len("model.layers.2."):] for n in want[2]}
    # layer 2 is softmax (every 3rd), layer 0 lightning
    assert "self_attn.q_proj.weight" in ckpt.layer_weights(2)
    assert "self_attn.qkv_proj.weight" in ckpt.layer_weights(0)


def test_a_layer_spread_over_shards_is_read(tiny: Path) -> None:
    """make-tiny deals tensors round-robin, so one layer lives in several shards (as in the release)."""
    ckpt = Checkpoint.open(tiny)
    files = {ckpt.weight_map[n] for n in ckpt.names_in_layer(1)}
    assert len(files) > 1
    expected = all_tensors(tiny)
    for rel, t in ckpt.layer_weights(1).items():
        assert torch.equal(t, expected["model.layers.1." + rel])


def test_tensor_missing_from_its_shard(tiny: Path) -> None:
    index_path = tiny / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    name = "model.norm.weight"
    others = sorted(set(index["weight_map"].values()) - {index["weight_map"][name]})
    index["weight_map"][name] = others[0]
    index_path.write_text(json.dumps(index))
    ckpt = Checkpoint.open(tiny)
    with pytest.raises(CheckpointError) as exc:
        ckpt.get(name)
    assert name in str(exc.value) and others[0] in str(exc.value)


@pytest.mark.parametrize("bad", ["../outside.safetensors", "/etc/passwd", "sub/../../x.safetensors", "~/x"])
def test_weight_map_outside_the_checkpoint_is_refused(tiny: Path, bad: str) -> None:
    index_path = tiny / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"]["model.norm.weight"] = bad
    index_path.write_text(json.dumps(index))
    with pytest.raises(CheckpointError) as exc:
        Checkpoint.open(tiny)
    assert bad in str(exc.value)
    assert "model.norm.weight" in str(exc.value)


def test_write_shard_is_read_back_by_safetensors(tmp_path: Path) -> None:
    gen = torch.Generator().manual_seed(3)
    tensors = {
        "a": torch.randn(5, 7, generator=gen).to(torch.bfloat16),
        "b": torch.randn(3, generator=gen),
        "c": torch.randint(-100, 100, (4, 2), generator=gen, dtype=torch.int8),
        "d": torch.randn(2, 3, generator=gen).to(torch.float16),
    }
    dtypes = {torch.bfloat16: "BF16", torch.float32: "F32", torch.int8: "I8", torch.float16: "F16"}
    planned = [(n, dtypes[t.dtype], tuple(t.shape), t.numel() * t.element_size(), True) for n, t in tensors.items()]

    def produce(name: str) -> Produced:
        t = tensors[name]
        view = tensor_bytes(t)
        return Produced(dtypes[t.dtype], tuple(t.shape), [view[:3], view[3:]])  # in two chunks

    path = tmp_path / "out.safetensors"
    sha, size = write_shard(path, planned, produce, metadata={"format": "pt"})
    import hashlib

    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    assert size == path.stat().st_size
    back = load_file(str(path))
    assert set(back) == set(tensors)
    for n, t in tensors.items():
        assert back[n].dtype == t.dtype and torch.equal(back[n], t), n
    with safe_open(str(path), framework="pt") as sf:
        assert sf.metadata() == {"format": "pt"}
    # the header is 8-byte aligned, as the safetensors format asks
    assert int.from_bytes(path.read_bytes()[:8], "little") % 8 == 0
    assert not list(tmp_path.glob(".*tmp"))


def test_write_shard_inexact_sizes(tmp_path: Path) -> None:
    """Tensors whose size is only known after producing them (quantization state): header filled in at the end."""
    tensors = {"x": torch.arange(6, dtype=torch.uint8), "y": torch.ones(3, 2)}
    planned = [("x", "U8", (4,), 4, False), ("y", "F32", (3, 2), 24, True)]

    def produce(name: str) -> Produced:
        t = tensors[name]
        return Produced("U8" if t.dtype == torch.uint8 else "F32", tuple(t.shape), [tensor_bytes(t)])

    path = tmp_path / "q.safetensors"
    sha, _ = write_shard(path, planned, produce)
    import hashlib

    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    back = load_file(str(path))
    assert torch.equal(back["x"], tensors["x"]) and torch.equal(back["y"], tensors["y"])


def test_write_shard_refuses_a_producer_that_breaks_the_plan(tmp_path: Path) -> None:
    path = tmp_path / "bad.safetensors"
    with pytest.raises(InternalError) as exc:  # the producer is m1's own: a bug, with its own exit code
        write_shard(path, [("x", "F32", (2,), 8, True)],
                    lambda name: Produced("F32", (3,), [tensor_bytes(torch.zeros(3))]))
    assert "tensor x" in str(exc.value)
    assert not path.exists()
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("error", [OSError(5, "Input/output error"), KeyboardInterrupt()], ids=["EIO", "Ctrl-C"])
def test_write_shard_failing_producer_leaves_nothing(tmp_path: Path, error: BaseException) -> None:
    import threading

    tensors = {f"t{i}": torch.full((1000,), float(i)) for i in range(4)}
    planned = [(n, "F32", (1000,), 4000, True) for n in tensors]

    def produce(name: str) -> Produced:
        if name == "t2":
            raise error
        return Produced("F32", (1000,), [tensor_bytes(tensors[name])])

    before = threading.active_count()
    with pytest.raises(type(error)):
        write_shard(tmp_path / "x.safetensors", planned, produce)
    assert list(tmp_path.iterdir()) == []
    assert threading.active_count() == before  # no writer thread left behind


@pytest.mark.parametrize("sink", ["safetensors", "gguf"])
def test_a_failing_write_stops_its_writer_threads_before_the_file_closes(tmp_path: Path,
                                                                        monkeypatch: pytest.MonkeyPatch,
                                                                        sink: str) -> None:
    """When the producer fails mid-file (disk full), the writer thread may still hold queued chunks. They must
    be written (or dropped) while the file is open: after close, its fd number is the next file's, and a late
    write lands there (it once put tensor bytes into .m1-progress.json, written by the committer meanwhile)."""
    import os
    import threading
    import time

    from m1 import atomic_io

    real = atomic_io.write_all
    seen: list[str] = []

    def slow_write(fd: int, chunk: object) -> None:
        if threading.current_thread() is not threading.main_thread():  # the sink's writer thread
            time.sleep(0.2)  # a slow disk: the producer's error arrives while chunks are queued
            try:
                seen.append(os.readlink(f"/proc/self/fd/{fd}"))
            except OSError:
                seen.append("closed")
        real(fd, chunk)

    monkeypatch.setattr(atomic_io, "write_all", slow_write)
    calls = {"n": 0}

    def produce(name: str) -> Produced:
        calls["n"] += 1
        if calls["n"] > 1:
            raise OSError(28, "No space left on device")
        return Produced("BF16", (4, 4), [b"\0" * 32])

    path = tmp_path / ("x.gguf" if sink == "gguf" else "x.safetensors")
    planned = [("a", "BF16", (4, 4), 32, True), ("b", "BF16", (4, 4), 32, True)]
    with pytest.raises(Exception, match="disk full"):
        if sink == "gguf":
            from m1.gguf import sink as gguf_sink

            monkeypatch.setattr(gguf_sink, "_header", lambda plan, f: b"GGUF")  # its content is not checked here
            _gguf_write(path, planned, produce)
        else:
            from m1.safetensors_io import write_shard_unsynced

            write_shard_unsynced(path, planned, produce)
    assert seen and all(target.endswith(f".{path.name}.tmp") for target in seen), seen
    assert not list(tmp_path.iterdir())  # and nothing is left behind


def _gguf_write(path: Path, planned: list, produce) -> None:  # noqa: ANN001
    """The GGUF sink writing a file of two tensors (only the writing matters here, not the header)."""
    from types import SimpleNamespace

    from m1.gguf import sink as gguf_sink

    file = SimpleNamespace(name=path.name, tensors=[SimpleNamespace(name=n, nbytes=b) for n, _, _, b, _ in planned])
    gguf_sink.SINK.write_file(path, file, produce, None, SimpleNamespace())
