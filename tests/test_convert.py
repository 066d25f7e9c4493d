"""`m1 convert`: round trips, layouts, dtypes, dry runs, and interrupted / resumed / disk-full runs.

Tensor data is always compared with what the safetensors library reads from the make-tiny source.
"""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import m1.atomic_io
import m1.ops
import m1.safetensors_io

SHARD = re.compile(r"^model-(\d{5})-of-(\d{5})\.safetensors$")
LAYER = re.compile(r"^model\.layers\.(\d+)\.")
ROUTER = re.compile(r"\.block_sparse_moe\.gate\.weight$")


def tensors_of(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        part = load_file(str(f))
        assert not set(part) & set(out), f"{f.name} repeats a tensor"
        out.update(part)
    return out


def assert_same_tensors(got: dict[str, torch.Tensor], want: dict[str, torch.Tensor]) -> None:
    assert set(got) == set(want)
    for name, t in want.items():
        assert got[name].dtype == t.dtype, name
        assert got[name].shape == t.shape, name
        assert torch.equal(got[name], t), name


def shards_of(root: Path) -> dict[str, list[str]]:
    out = {}
    for f in sorted(root.glob("*.safetensors")):
        with safe_open(str(f), framework="pt") as sf:
            out[f.name] = list(sf.keys())
    return out


def assert_index_matches_files(root: Path) -> None:
    index = json.loads((root / "model.safetensors.index.json").read_text())
    from_files = {name: file for file, names in shards_of(root).items() for name in names}
    assert index["weight_map"] == from_files
    total = sum(t.numel() * t.element_size() for t in tensors_of(root).values())
    assert index["metadata"]["total_size"] == total


def assert_one_based_names(root: Path) -> list[str]:
    files = sorted(p.name for p in root.glob("*.safetensors"))
    n = len(files)
    assert files == [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(1, n + 1)]
    return files


def one_error(err: str) -> str:
    """stderr holds exactly one error line (warnings aside) and no traceback; returns it."""
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def config_of(root: Path) -> dict:
    return json.loads((root / "config.json").read_text())


@pytest.fixture
def convert_ok(run):
    def call(*args: object) -> Path:
        code, out, err = run("convert", *args, "-q")
        assert code == 0, err
        return Path(str(args[1]))

    return call


# ---- round trips ----------------------------------------------------------------------------------------


def test_release_hf_release_round_trip(tiny: Path, tmp_path: Path, convert_ok, run) -> None:
    source = tensors_of(tiny)
    hf = convert_ok(tiny, tmp_path / "hf", "--to", "hf")
    back = convert_ok(hf, tmp_path / "back", "--to", "release")
    assert config_of(hf)["model_type"] == "minimax"
    assert config_of(hf)["layer_types"] == ["full_attention" if c else "linear_attention"
                                           for c in config_of(tiny)["attn_type_list"]]
    assert_same_tensors(tensors_of(hf), source)
    assert_same_tensors(tensors_of(back), source)
    assert config_of(back) == config_of(tiny)
    for out in (hf, back):
        assert_one_based_names(out)
        assert_index_matches_files(out)
        code, _, err = run("verify", "integrity", out)
        assert code == 0, err


def test_manifest_and_json_output(tiny: Path, tmp_path: Path, run) -> None:
    import hashlib

    dest = tmp_path / "hf"
    code, out, err = run("convert", tiny, dest, "--to", "hf", "--shard-size", "300KB", "--json", "-q")
    assert code == 0, err
    result = json.loads(out)
    manifest = json.loads((dest / "m1-manifest.json").read_text())
    files = assert_one_based_names(dest)
    assert sorted(result["shards"]) == sorted(manifest["shards"]) == files
    for f in files:
        data = (dest / f).read_bytes()
        assert manifest["shards"][f] == {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data)}
        assert result["shards"][f]["sha256"] == manifest["shards"][f]["sha256"]
    for name, digest in manifest["files"].items():
        assert hashlib.sha256((dest / name).read_bytes()).hexdigest() == digest, name
    assert {"config.json", "model.safetensors.index.json", "tokenizer_config.json"} <= set(manifest["files"])
    assert [p["file"] for p in manifest["plan"]] == files
    assert [sorted(p["tensors"]) for p in manifest["plan"]] == [sorted(shards_of(dest)[f]) for f in files]
    assert manifest["job"]["to"] == "hf" and manifest["job"]["command"] == "convert"
    assert not (dest / ".m1-progress.json").exists()


def test_by_layer_fp32_and_back_to_bf16(tiny: Path, tmp_path: Path, convert_ok) -> None:
    source = tensors_of(tiny)
    wide = convert_ok(tiny, tmp_path / "wide", "--to", "hf", "--layout", "by-layer", "--dtype", "fp32")
    got = tensors_of(wide)
    assert set(got) == set(source)
    for name, t in source.items():
        assert got[name].dtype == torch.float32, name
        assert torch.equal(got[name], t.float()), name
    assert config_of(wide)["torch_dtype"] == "float32"

    back = convert_ok(wide, tmp_path / "back", "--to", "release", "--dtype", "bf16")
    assert_same_tensors(tensors_of(back), source)  # the router came back F32, the rest BF16, bit for bit
    cfg = config_of(back)
    assert cfg.pop("torch_dtype") == "bfloat16"
    assert cfg == config_of(tiny)


def test_router_stays_fp32_unless_asked(tiny: Path, tmp_path: Path, convert_ok) -> None:
    source = tensors_of(tiny)
    routers = [n for n in source if ROUTER.search(n)]
    assert routers and all(source[n].dtype == torch.float32 for n in routers)

    half = tensors_of(convert_ok(tiny, tmp_path / "fp16", "--dtype", "fp16"))
    for name, t in source.items():
        want = t if ROUTER.search(name) else t.to(torch.float16)
        assert half[name].dtype == want.dtype and torch.equal(half[name], want), name

    both = tensors_of(convert_ok(tiny, tmp_path / "bf16", "--dtype", "bf16", "--router-dtype", "bf16"))
    for name in routers:
        assert both[name].dtype == torch.bfloat16
        assert torch.equal(both[name], source[name].to(torch.bfloat16))


def test_shard_size_is_respected(tiny: Path, tmp_path: Path, convert_ok) -> None:
    out = convert_ok(tiny, tmp_path / "small", "--shard-size", "100KB")
    files = assert_one_based_names(out)
    assert len(files) > 3
    limit = 100_000
    for f in files:
        part = load_file(str(out / f))
        size = sum(t.numel() * t.element_size() for t in part.values())
        assert size <= limit or len(part) == 1, f
    assert_index_matches_files(out)
    assert_same_tensors(tensors_of(out), tensors_of(tiny))
    # a size smaller than any tensor: one tensor per shard
    one = convert_ok(tiny, tmp_path / "one", "--shard-size", "1KB")
    assert all(len(names) == 1 for names in shards_of(one).values())
    assert len(shards_of(one)) == len(tensors_of(tiny))


def test_by_layer_puts_each_layer_in_one_shard(make_tiny_ckpt, tmp_path: Path, convert_ok) -> None:
    src = make_tiny_ckpt(layers=5, softmax_every=2, shards=4)
    out = convert_ok(src, tmp_path / "bylayer", "--layout", "by-layer")
    files = assert_one_based_names(out)
    layer_files: dict[int, set[str]] = {}
    for file, names in shards_of(out).items():
        layers = {int(m.group(1)) if (m := LAYER.match(n)) else None for n in names}
        assert len(layers) == 1, f"{file} mixes layers {layers}"
        for n in names:
            if m := LAYER.match(n):
                layer_files.setdefault(int(m.group(1)), set()).add(file)
    assert sorted(layer_files) == list(range(5))
    assert all(len(v) == 1 for v in layer_files.values())
    assert len(files) == 5 + 2  # embedding, one per layer, final norm + head
    assert shards_of(out)[files[0]] == ["model.embed_tokens.weight"]
    assert set(shards_of(out)[files[-1]]) == {"model.norm.weight", "lm_head.weight"}
    assert_same_tensors(tensors_of(out), tensors_of(src))


def test_extra_files_are_copied(tiny: Path, tmp_path: Path, convert_ok) -> None:
    (tiny / "tokenizer.json").write_text('{"model": {"type": "BPE"}}')
    (tiny / "special_tokens_map.json").write_text("{}")
    (tiny / "modeling_minimax_m1.py").write_text("# remote code\n")
    hf = convert_ok(tiny, tmp_path / "hf", "--to", "hf")
    release = convert_ok(tiny, tmp_path / "release")
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json"):
        assert (hf / name).read_bytes() == (tiny / name).read_bytes(), name
        assert (release / name).read_bytes() == (tiny / name).read_bytes(), name
    assert not (hf / "modeling_minimax_m1.py").exists()  # transformers' native code needs no remote code
    assert (release / "modeling_minimax_m1.py").read_bytes() == (tiny / "modeling_minimax_m1.py").read_bytes()


@pytest.mark.parametrize("layout", ["single", "bin"])
def test_convert_from_single_file_and_bin(tiny: Path, tmp_path: Path, convert_ok, layout: str) -> None:
    source = tensors_of(tiny)
    src = tmp_path / layout
    src.mkdir()
    shutil.copy(tiny / "config.json", src / "config.json")
    if layout == "single":
        save_file(source, str(src / "model.safetensors"))
    else:
        torch.save(source, src / "pytorch_model.bin")
    out = convert_ok(src, tmp_path / "out", "--to", "hf", "--shard-size", "200KB")
    assert_one_based_names(out)
    assert_same_tensors(tensors_of(out), source)


def test_dry_run_writes_nothing_and_prints_the_plan(tiny: Path, tmp_path: Path, run, convert_ok) -> None:
    dest = tmp_path / "planned"
    code, out, err = run("convert", tiny, dest, "--to", "hf", "--shard-size", "200KB", "--dry-run")
    assert code == 0, err
    assert not dest.exists()
    real = convert_ok(tiny, tmp_path / "real", "--to", "hf", "--shard-size", "200KB")
    real_shards = shards_of(real)
    for file in real_shards:
        assert file in out
    assert "tokenizer_config.json" in out and "generation_config.json" in out

    code, out, err = run("convert", tiny, dest, "--to", "hf", "--shard-size", "200KB", "--dry-run", "--json")
    assert code == 0, err
    assert not dest.exists()
    plan = json.loads(out)
    assert plan["dry_run"] is True
    assert plan["shards"] == len(real_shards)
    assert plan["tensors"] == len(tensors_of(tiny))
    assert [f["file"] for f in plan["files"]] == list(real_shards)
    assert [f["tensors"] for f in plan["files"]] == [len(v) for v in real_shards.values()]
    assert plan["bytes"] == sum(t.numel() * t.element_size() for t in tensors_of(real).values())
    assert sorted(plan["extra_files"]) == ["generation_config.json", "tokenizer.json", "tokenizer_config.json"]


def test_destination_equal_to_source_is_refused(tiny: Path, run) -> None:
    before = tensors_of(tiny)
    for dest in (tiny, tiny.parent):
        code, out, err = run("convert", tiny, dest, "--to", "hf", "--overwrite", "-q")
        assert code == 2
        assert "source" in one_error(err)
    assert_same_tensors(tensors_of(tiny), before)


def test_hf_to_hf_keeps_the_config(tiny: Path, tmp_path: Path, convert_ok) -> None:
    hf = convert_ok(tiny, tmp_path / "hf", "--to", "hf")
    again = convert_ok(hf, tmp_path / "again", "--layout", "by-layer")
    assert config_of(again) == config_of(hf)
    assert_same_tensors(tensors_of(again), tensors_of(tiny))


# ---- interrupted runs, resume, disk full --------------------------------------------------------------------

ARGS = ("--to", "hf", "--shard-size", "200KB")


@pytest.fixture
def reference(tiny: Path, tmp_path: Path, convert_ok) -> Path:
    """An uninterrupted run with ARGS, to compare resumed runs against."""
    return convert_ok(tiny, tmp_path / "reference", *ARGS)


def count_writes(monkeypatch: pytest.MonkeyPatch, fail_after: int | None = None,
                 exc: BaseException | None = None) -> list[str]:
    """Wrap the writer's shard writes: record the shards written; raise `exc` instead of writing number fail_after+1."""
    real = m1.safetensors_io.write_shard_unsynced
    written: list[str] = []

    def wrapped(path: Path, *args, **kwargs):
        if fail_after is not None and len(written) == fail_after:
            raise exc or KeyboardInterrupt()
        out = real(path, *args, **kwargs)
        written.append(path.name)
        return out

    monkeypatch.setattr(m1.safetensors_io, "write_shard_unsynced", wrapped)
    return written


def assert_looks_incomplete(dest: Path, run) -> None:
    assert not (dest / "model.safetensors.index.json").exists()
    assert not (dest / "m1-manifest.json").exists()
    assert not [p.name for p in dest.iterdir() if p.name.endswith(".tmp")]
    code, _, _ = run("verify", "integrity", dest)
    assert code == 1


def assert_same_output(dest: Path, reference: Path) -> None:
    files = sorted(p.name for p in reference.iterdir())
    assert sorted(p.name for p in dest.iterdir()) == files  # no progress or temporary files left
    for name in files:
        if name == "m1-manifest.json":
            a, b = (json.loads((d / name).read_text()) for d in (dest, reference))
            a.pop("created"), b.pop("created")
            assert a == b
        else:
            assert (dest / name).read_bytes() == (reference / name).read_bytes(), name


def stamps(dest: Path) -> dict[str, tuple[int, int]]:
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns) for p in dest.glob("*.safetensors")}


@pytest.mark.parametrize("where", ["between shards", "inside a shard"])
def test_interrupt_then_resume(tiny: Path, tmp_path: Path, run, reference: Path, monkeypatch, where: str) -> None:
    planned = list(shards_of(reference).values())
    assert len(planned) >= 4
    dest = tmp_path / "out"
    if where == "between shards":
        count_writes(monkeypatch, fail_after=2)
    else:  # Ctrl-C halfway through the third shard
        stop_at = len(planned[0]) + len(planned[1]) + len(planned[2]) // 2
        real_produce = m1.ops.OpRunner.__call__
        calls: list[str] = []

        def produce_then_stop(self, name: str):
            calls.append(name)
            if len(calls) > stop_at:
                raise KeyboardInterrupt
            return real_produce(self, name)

        monkeypatch.setattr(m1.ops.OpRunner, "__call__", produce_then_stop)
    code, _, err = run("convert", tiny, dest, *ARGS, "-q")
    monkeypatch.undo()
    assert code == 130
    assert "--resume" in err and "Traceback" not in err
    assert sorted(p.name for p in dest.glob("*.safetensors")) == list(shards_of(reference))[:2]
    assert_looks_incomplete(dest, run)

    before = stamps(dest)
    written = count_writes(monkeypatch)
    code, _, err = run("convert", tiny, dest, *ARGS, "--resume", "-q")
    assert code == 0, err
    assert written == list(shards_of(reference))[2:]  # only the unfinished shards were written
    after = stamps(dest)
    assert all(after[name] == stamp for name, stamp in before.items())
    assert_same_output(dest, reference)


def test_resume_with_different_options_is_refused(tiny: Path, tmp_path: Path, run, monkeypatch) -> None:
    dest = tmp_path / "out"
    count_writes(monkeypatch, fail_after=1)
    code, _, _ = run("convert", tiny, dest, *ARGS, "-q")
    assert code == 130
    monkeypatch.undo()
    for other in (("--to", "hf", "--shard-size", "300KB"), ("--to", "hf", "--shard-size", "200KB", "--dtype", "fp32"),
                  ("--to", "release", "--shard-size", "200KB")):
        code, out, err = run("convert", tiny, dest, *other, "--resume", "-q")
        assert code == 2, err
        line = one_error(err)
        assert "different plan" in line and str(dest) in line
    assert_looks_incomplete(dest, run)


def test_resume_of_a_finished_run_writes_nothing(tiny: Path, tmp_path: Path, run, reference: Path,
                                                 monkeypatch) -> None:
    dest = tmp_path / "out"
    code, _, err = run("convert", tiny, dest, *ARGS, "-q")
    assert code == 0, err
    written = count_writes(monkeypatch)
    code, _, err = run("convert", tiny, dest, *ARGS, "--resume", "-q")
    assert code == 0, err
    assert written == []
    assert_same_output(dest, reference)
    code, _, err = run("convert", tiny, dest, "--to", "release", "--resume", "-q")
    assert code == 2 and "different plan" in err


def test_non_empty_destination(tiny: Path, tmp_path: Path, run) -> None:
    dest = tmp_path / "busy"
    dest.mkdir()
    (dest / "notes.txt").write_text("mine")
    code, out, err = run("convert", tiny, dest, "--to", "hf", "-q")
    assert code == 2
    line = one_error(err)
    assert "not empty" in line and "--resume" in line and "--overwrite" in line
    assert (dest / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in dest.iterdir()) == ["notes.txt"]
    # --overwrite empties only a folder that an m1 run wrote (issue 9: never delete what is not ours)
    code, _, err = run("convert", tiny, dest, "--to", "hf", "--overwrite", "-q")
    assert code == 2 and "not an m1 output" in one_error(err)
    assert (dest / "notes.txt").read_text() == "mine"
    code, _, err = run("convert", tiny, tmp_path / "ours", "--to", "hf", "-q")
    assert code == 0, err
    (tmp_path / "ours" / "notes.txt").write_text("left in an m1 output")
    code, _, err = run("convert", tiny, tmp_path / "ours", "--to", "hf", "--overwrite", "-q")
    assert code == 0, err
    assert not (tmp_path / "ours" / "notes.txt").exists()
    assert_same_tensors(tensors_of(tmp_path / "ours"), tensors_of(tiny))


class _FullDisk:
    """A file whose writes fail with ENOSPC once `room` bytes are written."""

    def __init__(self, f, room: int) -> None:
        self._f, self._room = f, room

    def write(self, data) -> int:
        n = len(memoryview(data).cast("B"))
        if n > self._room:
            raise OSError(errno.ENOSPC, "No space left on device")
        self._room -= n
        return self._f.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc) -> None:
        self._f.close()

    def __getattr__(self, name: str):
        return getattr(self._f, name)


def fill_disk_at(monkeypatch: pytest.MonkeyPatch, file_name: str, room: int = 1000) -> None:
    """Make the writes of `file_name` (its temporary file) run out of space after `room` bytes."""
    import builtins

    def full_open(path, mode="r", *args, **kwargs):
        f = builtins.open(path, mode, *args, **kwargs)
        name = Path(path).name
        if "w" in mode and name.startswith(f".{file_name}.") and name.endswith(".tmp"):
            return _FullDisk(f, room)
        return f

    monkeypatch.setattr(m1.atomic_io, "open", full_open, raising=False)

    # Shards are written through file descriptors (os.write / copy_file_range): fail those too.
    real_write_all = m1.atomic_io.write_all
    left = {"room": room}

    def full_write_all(fd: int, chunk) -> None:
        target = os.path.basename(os.readlink(f"/proc/self/fd/{fd}"))
        if target.startswith(f".{file_name}.") and target.endswith(".tmp"):
            left["room"] -= len(chunk)
            if left["room"] < 0:
                raise OSError(errno.ENOSPC, "No space left on device")
        real_write_all(fd, chunk)

    monkeypatch.setattr(m1.atomic_io, "write_all", full_write_all)


@pytest.mark.parametrize("target", ["model-00002-of-{n:05d}.safetensors", "model.safetensors.index.json"])
def test_disk_full(tiny: Path, tmp_path: Path, run, reference: Path, monkeypatch, target: str) -> None:
    target = target.format(n=len(shards_of(reference)))
    dest = tmp_path / "out"
    fill_disk_at(monkeypatch, target)
    code, out, err = run("convert", tiny, dest, *ARGS, "-q")
    monkeypatch.undo()
    assert code == 1
    line = one_error(err)
    assert "disk full" in line and target in line and "--resume" in line
    assert not (dest / target).exists()
    assert_looks_incomplete(dest, run)
    code, _, err = run("convert", tiny, dest, *ARGS, "--resume", "-q")
    assert code == 0, err
    assert_same_output(dest, reference)
