"""The registries are real extension points: a toy format and a toy scheme, defined here in a few dozen
lines, run through `m1 convert`, `m1 quantize`, `m1 verify integrity` and back, end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors import safe_open

from m1 import formats, schemes
from m1.errors import CheckpointError, UsageError
from m1.formats import Format, NameTable
from m1.formats import release as release_format
from m1.schemes import Family, Piece
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
             single_file="model.safetensors", extra_file=lambda name: name.endswith(".json"))


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
