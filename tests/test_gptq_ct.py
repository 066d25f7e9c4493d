"""GPTQ rounding for compressed-tensors' w4a16 and w8a16 (m1.schemes.ct_gptq).

Every GPTQ tensor is decoded by compressed-tensors' own decompressor and must equal the values GPTQ intended
exactly, with compressed-tensors' own scales (only the codes differ from its rounding); GPTQ's layer error must
beat round-to-nearest's on a calibrated layer; a `--rounding gptq` checkpoint of the trained tiny M1 is turned
into dense tensors by compressed-tensors' convert_checkpoint exactly as m1 reads it, and is closer to its source
(KL, judged by m1's engine) than the nearest rounding at the same bytes.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from calibrated import calibrated_layer
from safetensors.torch import load_file

from m1.schemes.ct_gptq import quantize_gptq
from m1.schemes.ct_pack import PackScheme
from m1.schemes.gptq import Rounding, layer_error

pytest.importorskip("compressed_tensors")

TRAINED = Path(__file__).parent / "data" / "tiny-trained"
CPU = torch.device("cpu")


@pytest.mark.parametrize(("name", "group", "shape"), [
    ("w4a16", None, (48, 256)), ("w4a16", 64, (48, 128)), ("w8a16", None, (48, 256)),
])
def test_compressed_tensors_decodes_exactly_what_gptq_intended(name: str, group: int | None,
                                                               shape: tuple[int, int]) -> None:
    from compressed_tensors.compressors import PackedQuantizationCompressor

    scheme = PackScheme.make(name, blocksize=group, rounding=Rounding("gptq"))
    w, h = calibrated_layer(*shape)
    pieces, intended = quantize_gptq(scheme, w, h, scheme.rounding, CPU)
    stored = dict(pieces)
    decoded = PackedQuantizationCompressor.decompress(stored, scheme.ct_scheme(["Linear"]))["weight"]
    assert decoded.dtype == intended.dtype == torch.bfloat16
    assert torch.equal(decoded, intended)
    rtn = dict(PackScheme.make(name, blocksize=group).quantize(w, CPU))
    assert sorted(stored) == sorted(rtn) == ["weight_packed", "weight_scale", "weight_shape"]
    for suffix in ("weight_scale", "weight_shape"):  # compressed-tensors' own scales; only the codes differ
        assert torch.equal(stored[suffix], rtn[suffix]), suffix
    assert stored["weight_packed"].dtype == rtn["weight_packed"].dtype
    assert not torch.equal(stored["weight_packed"], rtn["weight_packed"])


@pytest.mark.parametrize("name", ["w4a16", "w8a16"])
def test_gptq_layer_error_is_below_round_to_nearest(name: str) -> None:
    scheme = PackScheme.make(name, rounding=Rounding("gptq"))
    w, h = calibrated_layer(64, 256, seed=1)
    _, ours = quantize_gptq(scheme, w, h, scheme.rounding, CPU)
    plain = PackScheme.make(name)
    rtn = plain.dequantize(dict(plain.quantize(w, CPU)), "cpu", shape=(64, 256))
    assert layer_error(w, ours, h) < 0.8 * layer_error(w, rtn, h)


@pytest.mark.slow  # a Hessian pass, two jobs and a comparison; the decoding tests above stay in make test
def test_a_gptq_w4a16_checkpoint_reads_back_in_compressed_tensors_and_beats_nearest(
        tmp_path: Path, run: Callable[..., tuple[int, str, str]]) -> None:
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    from m1.checkpoint import Checkpoint
    from m1.cli import run_cli

    ct = ["--format", "compressed-tensors", "--scheme", "w4a16", "--quiet"]
    gptq, nearest = tmp_path / "gptq", tmp_path / "nearest"
    assert run_cli(["quantize", str(TRAINED), str(gptq), *ct, "--rounding", "gptq", "--tokens", "2048"]) == 0
    assert run_cli(["quantize", str(TRAINED), str(nearest), *ct]) == 0
    shard = "model-00001-of-00001.safetensors"
    assert (gptq / shard).stat().st_size == (nearest / shard).stat().st_size
    assert json.loads((gptq / "m1-manifest.json").read_text())["job"]["rounding"]["method"] == "gptq"
    assert (gptq / "m1-rounding.json").is_file()

    convert_checkpoint(gptq, tmp_path / "dense", CompressedTensorsDequantizer(gptq), max_workers=1, device="cpu")
    theirs: dict[str, torch.Tensor] = {}
    for f in sorted((tmp_path / "dense").glob("*.safetensors")):
        theirs.update(load_file(str(f)))
    ckpt = Checkpoint.open(gptq)
    assert set(theirs) == set(ckpt.weight_map)
    assert all(torch.equal(theirs[n], ckpt.get(n)) for n in theirs)

    code, out, err = run("verify", "compare", TRAINED, nearest, gptq, "--tokens", "2048", "--json", "-q")
    assert code == 0, err
    kl = {Path(c["name"]).name: c["metrics"]["kl_mean"] for c in json.loads(out)["candidates"]}
    assert kl["gptq"] < 0.8 * kl["nearest"], kl
