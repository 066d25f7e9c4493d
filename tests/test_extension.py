"""The registries are real extension points: a toy format and a toy scheme, defined here in a few dozen
lines, run through `m1 convert`, `m1 quantize`, `m1 verify integrity` and back, end to end; and a GGUF-like
toy format of its own files (its plan stacks the experts, its sink writes a single-file container, its
storage reads it back, its option sets the alignment), added without touching any other file."""

from __future__ import annotations

import hashlib
import json
import math
import re
import struct
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

import m1
from m1 import formats, schemes, sinks
from m1.atomic_io import ChunkSink, PendingShard, Produced
from m1.errors import CheckpointError, InternalError, UsageError
from m1.formats import Format, FormatPlan, NameTable, PlanInput
from m1.formats import release as release_format
from m1.formats.tensor_plan import plan_by_tensor
from m1.index import Index
from m1.manifest import MANIFEST
from m1.plan import OutputFile, OutputTensor, Plan, SourceTensor, TensorOp
from m1.safetensors_io import Header, TensorInfo
from m1.schemes import Family, Piece
from m1.storage import Storage
from m1.tensors import M1_TENSORS

# ---- a toy format: one unsharded model.safetensors, every tensor renamed --------------------------------

TOY_NAMES = NameTable(tuple((r.pattern, "toy." + r.pattern.replace("model.layers.{layer}.", "blk.{layer}."))
                            for r in M1_TENSORS))


def toy_write_config(cfg: Any, out: dict[str, Any]) -> None:
    release_format.write_config(cfg, out)  # the release's keys, under its own model_type
    out["model_type"] = "toy_m1"
    out.pop("auto_map")


TOY = Format(name="toy", description="one file, renamed tensors", model_types=("toy_m1",),
             claims=lambda raw: raw.get("model_type") == "toy_m1", read_config=release_format.read_config,
             write_config=toy_write_config, config_keys=release_format.CONFIG_KEYS, names=TOY_NAMES,
             plan_ops=plan_by_tensor, single_file="model.safetensors", extra_file=lambda name: name.endswith(".json"))


# ---- a toy scheme: int8 per row, scale beside the weight ---------------------------------------------------


class RowInt8(schemes.Scheme):
    name, family, formats = "rowint8", "toyquant", ("release", "hf", "toy")

    def describe(self) -> str:
        return "rowint8 (toy)"

    def options(self) -> dict[str, Any]:
        return {}

    def check_weight(self, name: str, dtype: str, shape: tuple[int, ...], file: str | None = None) -> None:
        if len(shape) != 2:
            raise UsageError("rowint8 needs a 2-D weight", file=file, tensor=name)

    def pieces(self, dtype: str, shape: tuple[int, ...]) -> list[Piece]:
        return [Piece("weight", "I8", shape, math.prod(shape)), Piece("row_scale", "F32", (shape[0],), 4 * shape[0])]

    def quantization_config(self, kept_experts: list[str]) -> dict[str, Any]:
        return {"quant_method": "toyquant", "kept": kept_experts}

    def quantize(self, weight: torch.Tensor, device: Any, name: str = "") -> list[tuple[str, torch.Tensor]]:
        scale = weight.float().abs().amax(dim=1).clamp(min=1e-12) / 127
        return [("weight", (weight.float() / scale[:, None]).round().to(torch.int8)), ("row_scale", scale)]

    def dequantize(self, pieces: dict[str, torch.Tensor], device: Any = "cpu", name: str = "",
                   shape: tuple[int, ...] | None = None) -> torch.Tensor:
        return pieces["weight"].float() * pieces["row_scale"][:, None]

    def check_pieces(self, weight: str, found: dict[str, tuple[str, tuple[int, ...]]], shape: tuple[int, ...],
                     file: str | None = None) -> None:
        if found.get("row_scale", (None, None))[1] != (shape[0],):
            raise CheckpointError("row_scale does not fit the weight", file=file, tensor=weight)


TOYQUANT = Family(name="toyquant", schemes=("rowint8",), companions=("row_scale",), make=lambda name, **_: RowInt8(),
                  claims=lambda qc: qc.get("quant_method") == "toyquant",
                  from_quantization_config=lambda qc, file: RowInt8(), storage_dtypes=frozenset({"I8"}))


# ---- a GGUF-like toy format: one model.toybox (magic, header length, JSON header, aligned tensor data), each
# layer's experts stacked into one 3-D tensor, the config inside the header; its own plan, sink and reader --------

MAGIC = b"TOYBOX1\0"
BOX = "model.toybox"
EXPERT = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(\d+)\.(w[123]\.weight)$")
STACK = re.compile(r"^(model\.layers\.\d+\.block_sparse_moe\.experts)\.(w[123]\.weight)$")


def toybox_plan(job: PlanInput) -> FormatPlan:
    """One file: every tensor copied as it is, a layer's experts stacked (in expert order) per projection."""
    request = job.request
    if job.cfg.quantization_config is not None or request.dtype != "keep" or request.router_dtype != "keep":
        raise UsageError("a toybox holds the source's float tensors as they are", file=job.source,
                         hint="convert without --dtype/--router-dtype, from an unquantized checkpoint")
    stacks: dict[str, list[Any]] = {}
    for t in job.tensors:
        stacks.setdefault(EXPERT.sub(r"\1.\3", t.name), []).append(t)
    ops = []
    for name, members in stacks.items():
        c = job.classified[members[0].name]
        srcs = tuple(SourceTensor(t.name, t.file, t.dtype, tuple(t.shape), t.nbytes) for t in members)
        shape = (len(members), *members[0].shape) if c.expert is not None else tuple(members[0].shape)
        out = OutputTensor(name, members[0].dtype, shape, sum(t.nbytes for t in members))
        ops.append(TensorOp("stack" if c.expert is not None else "copy", srcs, (out,), c.rule.role.value, c.layer,
                            sum(math.prod(t.shape) for t in members)))
    align = request.format_options.get("align", 32)
    return FormatPlan([OutputFile(BOX, tuple(ops))], job={"to": job.format.name, "align": align},
                      sink_data={"config": job.cfg.to_dict("release"), "align": align})


def toybox_options(dest: Path, given: dict[str, Any]) -> dict[str, Any]:
    align = int(given.get("toybox_align") or 32)
    if align < 8 or align & (align - 1):
        raise UsageError(f"--toybox-align must be a power of two from 8, got {align}")
    return {"align": align}


def toybox_header(plan: Plan, file: OutputFile) -> bytes:
    align, offset, entries = plan.sink_data["align"], 0, []
    for t in file.tensors:
        entries.append({"name": t.name, "dtype": t.dtype, "shape": list(t.shape), "offset": offset, "nbytes": t.nbytes})
        offset += t.nbytes + -t.nbytes % align
    body = json.dumps({"config": plan.sink_data["config"], "align": align, "tensors": entries}).encode()
    length = len(body) + -(len(MAGIC) + 8 + len(body)) % align  # the data starts aligned
    return MAGIC + struct.pack("<Q", length) + body.ljust(length, b" ")


class ToyboxSink:
    name = "toybox"
    first_last = False

    def check(self, plan: Plan) -> None:
        pass

    def write_file(self, path: Path, file: OutputFile, produce: Callable[[str], Produced],
                   on_bytes: Callable[[int], None] | None = None, plan: Plan | None = None
                   ) -> tuple[str, int, PendingShard]:
        assert plan is not None
        tmp, sha, align = path.with_name(f".{path.name}.tmp"), hashlib.sha256(), plan.sink_data["align"]
        with open(tmp, "wb", buffering=0) as f, ChunkSink(f.fileno(), sha) as out:
            out.put(toybox_header(plan, file))
            for t in file.tensors:
                written = out.put_all(produce(t.name).chunks, on_bytes)
                if written != t.nbytes:
                    raise InternalError(f"produced {written} bytes, planned {t.nbytes}", tensor=t.name)
                out.put(b"\0" * (-written % align))
        return sha.hexdigest(), tmp.stat().st_size, PendingShard(tmp, path)

    def finish(self, dest: Path, plan: Plan) -> list[str]:
        return []  # the file carries its own table: no index

    def file_bytes(self, plan: Plan, file: OutputFile) -> int:
        align = plan.sink_data["align"]
        return len(toybox_header(plan, file)) + sum(t.nbytes + -t.nbytes % align for t in file.tensors)

    def finish_bytes(self, plan: Plan) -> dict[str, int]:
        return {}


class ToyboxStorage(Storage):
    """A model.toybox read back: the spec's tensors as byte ranges of it (an expert: its slice of the stack)."""

    own_format = "toybox"

    def __init__(self, path: Path) -> None:
        self.path, self.root = path, str(path)
        with open(path, "rb") as f:
            magic, (length,) = f.read(len(MAGIC)), struct.unpack("<Q", f.read(8))
            if magic != MAGIC:
                raise CheckpointError("not a toybox file", file=self.root)
            self.head = json.loads(f.read(length))
        start = len(MAGIC) + 8 + length
        self.tensors: dict[str, TensorInfo] = {}
        for t in self.head["tensors"]:
            at, shape, m = start + t["offset"], tuple(t["shape"]), STACK.match(t["name"])
            if m is None:
                self.tensors[t["name"]] = TensorInfo(t["name"], t["dtype"], shape, BOX, at, at + t["nbytes"])
                continue
            per = t["nbytes"] // shape[0]
            for e in range(shape[0]):
                name = f"{m[1]}.{e}.{m[2]}"
                self.tensors[name] = TensorInfo(name, t["dtype"], shape[1:], BOX, at + e * per, at + (e + 1) * per)
        self.data_start = start

    def display(self, name: str) -> str:
        return self.root if name == BOX else f"{self.root} (its {name})"

    def exists(self, name: str) -> bool:
        return name in ("config.json", BOX)

    def read_bytes(self, name: str) -> bytes:
        if name != "config.json":
            raise CheckpointError("not in this toybox", file=self.display(name))
        return json.dumps(self.head["config"]).encode()

    def header(self, file: str) -> Header:
        return Header(file, dict(self.tensors), {}, self.data_start, self.path.stat().st_size)

    def local_path(self, file: str) -> Path:
        return self.path

    def extra_files(self) -> list[str]:
        return []

    def identity(self, files: list[str]) -> dict[str, Any]:
        st = self.path.stat()
        return dict.fromkeys(files, [st.st_size, st.st_mtime_ns])

    def index(self) -> Index:
        return Index(dict.fromkeys(self.tensors, BOX))

    def sources(self) -> list[Path]:
        return [self.path]

    def findings(self, check_hashes: bool = True) -> list[tuple[str, str, str | None, str | None]]:
        """The file against the sha256 the job's manifest beside it recorded."""
        manifest = self.path.parent / MANIFEST
        if not check_hashes or not manifest.is_file():
            return []
        recorded = json.loads(manifest.read_text())["shards"][self.path.name]["sha256"]
        if hashlib.sha256(self.path.read_bytes()).hexdigest() != recorded:
            return [("sha256", "sha256 differs from the manifest: the file changed after it was written", BOX, None)]
        return []


TOYBOX = Format(name="toybox", description="one container file, experts stacked", model_types=(),
                claims=lambda raw: False, read_config=release_format.read_config,
                write_config=lambda cfg, out: None, config_keys=(), names=release_format.FORMAT.names,
                plan_ops=toybox_plan, sink="toybox", writes_config=False,
                opens=lambda source: source.endswith(".toybox"),
                open_storage=lambda source: ToyboxStorage(Path(source)) if Path(source).is_file() else None,
                options=("toybox_align",), make_options=toybox_options)


@pytest.fixture
def toybox():
    formats.register_format(TOYBOX)
    sinks.register_sink(ToyboxSink())
    yield
    formats.unregister_format("toybox")
    sinks.unregister_sink("toybox")


def box_header(path: Path) -> dict[str, Any]:
    data = path.read_bytes()
    (length,) = struct.unpack("<Q", data[len(MAGIC):len(MAGIC) + 8])
    return {**json.loads(data[len(MAGIC) + 8:len(MAGIC) + 8 + length]), "data_start": len(MAGIC) + 8 + length}


def test_a_gguf_like_toy_format_of_its_own_files(toybox, make_tiny_ckpt, tmp_path: Path, run) -> None:
    src = make_tiny_ckpt()
    original = tensors(src)
    code, _, err = run("convert", src, tmp_path / "box", "--to", "toybox", "-q")  # the CLI's --to sees it
    assert code == 0, err
    assert sorted(p.name for p in (tmp_path / "box").iterdir()) == [MANIFEST, BOX]  # no config.json, no index
    head = box_header(tmp_path / "box" / BOX)
    names = [t["name"] for t in head["tensors"]]
    stacked = next(t for t in head["tensors"] if t["name"] == "model.layers.1.block_sparse_moe.experts.w2.weight")
    assert stacked["shape"] == [4, 64, 96] and not any(EXPERT.match(n) for n in names)
    assert head["align"] == 32 and head["data_start"] % 32 == 0 and all(t["offset"] % 32 == 0 for t in head["tensors"])
    data = (tmp_path / "box" / BOX).read_bytes()
    at = head["data_start"] + stacked["offset"] + 3 * stacked["nbytes"] // 4  # expert 3, as the sink stacked it
    w2 = original["model.layers.1.block_sparse_moe.experts.3.w2.weight"]
    assert data[at:at + stacked["nbytes"] // 4] == w2.contiguous().view(torch.uint8).numpy().tobytes()

    box = str(tmp_path / "box" / BOX)  # read back by its storage, through Format.opens/open_storage
    code, out, err = run("inspect", box, "--json")
    assert code == 0, err
    seen = json.loads(out)
    assert seen["tensors"] == len(original) and seen["missing"] == [] and seen["flavour"] == "release"
    assert run("verify", "integrity", box)[0] == 0

    code, _, err = run("convert", box, tmp_path / "back", "--to", "release", "-q")
    assert code == 0, err
    code, _, err = run("convert", src, tmp_path / "direct", "--to", "release", "-q")
    assert code == 0, err
    for name in ("model-00001-of-00001.safetensors", "model.safetensors.index.json", "config.json"):
        assert (tmp_path / "back" / name).read_bytes() == (tmp_path / "direct" / name).read_bytes(), name

    with open(box, "r+b") as f:  # one flipped bit in a tensor: the storage's own check finds it
        f.seek(head["data_start"] + stacked["offset"] + 5)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 1]))
    code, out, _ = run("verify", "integrity", box)
    assert code == 1 and "[sha256]" in out


def test_the_toy_formats_option_is_its_own(toybox, make_tiny_ckpt, tmp_path: Path) -> None:
    src = make_tiny_ckpt()
    result = m1.convert(src, tmp_path / "wide", to="toybox", format_options={"toybox_align": 4096}, progress=False)
    head = box_header(tmp_path / "wide" / BOX)
    assert result.plan.job["align"] == 4096 and head["data_start"] % 4096 == 0
    assert all(t["offset"] % 4096 == 0 for t in head["tensors"])
    assert result.files[BOX]["size"] == (tmp_path / "wide" / BOX).stat().st_size
    with pytest.raises(UsageError, match="power of two"):
        m1.convert(src, tmp_path / "odd", to="toybox", format_options={"toybox_align": 48}, dry_run=True)
    with pytest.raises(UsageError, match="applies to toybox output only"):
        m1.convert(src, tmp_path / "rel", to="release", format_options={"toybox_align": 64}, dry_run=True)
    with pytest.raises(UsageError, match="toybox"):  # it has no scheme
        m1.quantize(src, tmp_path / "q", to="toybox", scheme="nf4", dry_run=True, progress=False)


def test_unregistered_the_toybox_is_unknown(make_tiny_ckpt, tmp_path: Path, run) -> None:
    assert formats.format_for_path(str(tmp_path / BOX)) is None
    code, _, err = run("convert", make_tiny_ckpt(), tmp_path / "box", "--to", "toybox", "-q")
    assert code == 2 and "toybox" in err


@pytest.fixture
def registered():
    formats.register_format(TOY)
    schemes.register_family(TOYQUANT)
    yield
    formats.unregister_format("toy")
    schemes.unregister_family("toyquant")


def tensors(folder: Path) -> dict[str, torch.Tensor]:
    out = {}
    for path in sorted(folder.glob("*.safetensors")):
        with safe_open(str(path), "pt") as f:
            out.update({k: f.get_tensor(k) for k in f.keys()})
    return out


def test_a_toy_format_and_scheme_run_end_to_end(registered, make_tiny_ckpt, tmp_path: Path, run) -> None:
    src = make_tiny_ckpt(hidden=64, intermediate=128)
    original = tensors(src)

    code, _, err = run("convert", src, tmp_path / "toy", "--to", "toy", "-q")
    assert code == 0, err
    toy = tensors(tmp_path / "toy")
    assert [p.name for p in (tmp_path / "toy").glob("*.safetensors")] == ["model.safetensors"]
    assert set(toy) == {TOY_NAMES.from_spec(n) for n in original}
    assert "toy.blk.0.input_layernorm.weight" in toy
    assert json.loads((tmp_path / "toy" / "config.json").read_text())["model_type"] == "toy_m1"
    assert run("verify", "integrity", tmp_path / "toy")[0] == 0

    code, _, err = run("convert", tmp_path / "toy", tmp_path / "back", "--to", "release", "-q")  # read through it
    assert code == 0, err
    back = tensors(tmp_path / "back")
    assert set(back) == set(original) and all(torch.equal(back[n], original[n]) for n in original)

    code, _, err = run("quantize", tmp_path / "toy", tmp_path / "toyq", "--scheme", "rowint8", "-q")
    assert code == 0, err
    quant = tensors(tmp_path / "toyq")
    w = "toy.blk.1.block_sparse_moe.experts.2.w1.weight"
    assert quant[w].dtype == torch.int8 and quant[w[: -len("weight")] + "row_scale"].shape == (128,)
    assert run("verify", "integrity", tmp_path / "toyq")[0] == 0
    assert run("inspect", tmp_path / "toyq")[0] == 0

    code, _, err = run("convert", tmp_path / "toyq", tmp_path / "deq", "--to", "release", "--dtype", "fp32", "-q")
    assert code == 0, err
    deq = tensors(tmp_path / "deq")
    name = "model.layers.1.block_sparse_moe.experts.2.w1.weight"
    ref = original[name].float()
    assert (deq[name] - ref).abs().max() <= ref.abs().amax(dim=1).max() / 127  # within the toy's own rounding
    assert torch.equal(deq["model.norm.weight"], original["model.norm.weight"].float())


def test_without_registration_the_toy_scheme_is_unknown(make_tiny_ckpt, tmp_path: Path, run) -> None:
    code, _, err = run("quantize", make_tiny_ckpt(), tmp_path / "x", "--scheme", "rowint8", "-q")
    assert code == 2 and "unknown scheme" in err
