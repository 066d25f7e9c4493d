"""`m1 quantize`: what it writes, read back by independent readers (safetensors.safe_open, bitsandbytes).

Tiny random M1s with hidden 64 and intermediate 128, so every expert row (64 or 128 values) splits into
whole 64-value blocks: bitsandbytes' CPU kernels need blocks inside rows (make-tiny's default
intermediate 96 does not, and is refused). The full-size plan is checked against the real release
index, from the config and index alone.
"""

from __future__ import annotations

import errno
import json
import math
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

from m1.cli import run_cli
from m1.config import M1Config
from m1.integrity import check_integrity
from m1.planner import index_tensors
from m1.policy import Policy
from m1.quantize.job import QuantizeOptions, plan_quantize
from m1.quantized import expected_tensors
from m1.schemes.bnb import SKIP_MODULES
from m1.schemes.bnb import BnbScheme as Scheme
from m1.schemes.bnb_codec import bnb_functional
from m1.spec import Role, classify, spec_by_name
from m1.tiny import TinySpec, make_tiny

RELEASE = Path(__file__).parent / "data" / "m1-release"
SCHEMES = {"nf4": [], "fp4": [], "nf4-no-dq": ["--no-double-quant"], "int8": []}


# ---- helpers ------------------------------------------------------------------------------------------


def read_all(root: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a checkpoint, through the safetensors library (not m1's reader)."""
    index = json.loads((root / "model.safetensors.index.json").read_text())
    out: dict[str, torch.Tensor] = {}
    for file in sorted(set(index["weight_map"].values())):
        with safe_open(str(root / file), framework="pt") as f:
            for name in f.keys():
                out[name] = f.get_tensor(name)
    assert set(out) == set(index["weight_map"])
    return out


def quantize(src: Path, dest: Path, *args: str) -> None:
    assert run_cli(["quantize", str(src), str(dest), "--quiet", *args]) == 0


def bnb_dequantize(tensors: dict[str, torch.Tensor], module: str, flat: bool = False) -> torch.Tensor:
    """Dequantize with bitsandbytes directly: QuantState.from_dict + dequantize_4bit, or weight * SCB / 127.

    flat: ask for the 1-D shape and reshape, for weights whose blocks span rows (bitsandbytes 0.50's CPU
    kernel gets those wrong for the 2-D shape)."""
    F = bnb_functional()
    weight = tensors[f"{module}.weight"]
    if f"{module}.SCB" in tensors:
        assert int(tensors[f"{module}.weight_format"]) == 0
        return weight.float() * tensors[f"{module}.SCB"][:, None] / 127
    prefix = f"{module}.weight."
    state = F.QuantState.from_dict({k[len(prefix):]: v for k, v in tensors.items() if k.startswith(prefix)},
                                   device=torch.device("cpu"))
    shape = state.shape
    if flat:
        state.shape = torch.Size([shape.numel()])
    return F.dequantize_4bit(weight, state).float().reshape(shape)


def expert_modules(tensors: dict[str, torch.Tensor]) -> list[str]:
    return sorted({n[: -len(".weight")] for n in tensors if classify(n).rule.role == Role.EXPERT
                   and n.endswith(".weight") and classify(n).companion is None})


@pytest.fixture(scope="module")
def src(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("tiny") / "src"
    make_tiny(path, TinySpec(shards=3, intermediate=128))
    return path


@pytest.fixture(scope="module")
def outputs(src: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """One quantized copy per scheme, made once."""
    root = tmp_path_factory.mktemp("quantized")
    out = {}
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr("m1.schemes.bnb_codec.CHUNK_VALUES", 1000)  # quantize a few rows at a time, as for full-size experts
        for key, extra in SCHEMES.items():
            out[key] = root / key
            quantize(src, out[key], "--scheme", key.split("-")[0], *extra)
    return out


# ---- what is written ------------------------------------------------------------------------------------


@pytest.mark.parametrize("key", list(SCHEMES))
def test_experts_read_back_with_bitsandbytes_within_the_scheme_error(src: Path, outputs: dict[str, Path],
                                                                     key: str) -> None:
    source, quantized = read_all(src), read_all(outputs[key])
    scheme = key.split("-")[0]
    modules = expert_modules(source)
    assert len(modules) == 4 * 4 * 3
    for module in modules:
        original = source[f"{module}.weight"].float()
        back = bnb_dequantize(quantized, module)
        assert back.shape == original.shape
        if scheme == "int8":
            assert quantized[f"{module}.weight"].dtype == torch.int8
            step = quantized[f"{module}.SCB"][:, None] / 127  # one int8 step per row
            assert ((back - original).abs() <= 0.51 * step + 1e-6).all()
        else:
            assert quantized[f"{module}.weight"].dtype == torch.uint8
            code = quantized[f"{module}.weight.quant_map"].sort().values
            half_gap = float((code[1:] - code[:-1]).max()) / 2
            absmax = original.reshape(-1, 64).abs().amax(1, keepdim=True)
            err = (back - original).reshape(-1, 64).abs()
            assert (err <= absmax * (half_gap + 0.02)).all(), module
        rel = float((back - original).norm() / original.norm())
        assert rel < {"int8": 0.012, "nf4": 0.11, "fp4": 0.14}[scheme]
    # every other tensor is bit-identical, dtype included (the router stays fp32)
    for name, tensor in source.items():
        if classify(name).rule.role != Role.EXPERT:
            assert quantized[name].dtype == tensor.dtype, name
            assert torch.equal(quantized[name].view(torch.uint8), tensor.view(torch.uint8)), name
    assert quantized["model.layers.0.block_sparse_moe.gate.weight"].dtype == torch.float32


@pytest.mark.parametrize("scheme", ["nf4", "fp4", "int8"])
def test_bytes_equal_what_bitsandbytes_modules_serialize(outputs: dict[str, Path], src: Path, scheme: str) -> None:
    """Our pieces for one expert are exactly Linear4bit / Linear8bitLt's state_dict for the same weight."""
    import bitsandbytes as bnb

    module = "model.layers.2.block_sparse_moe.experts.1.w2"
    weight = read_all(src)[f"{module}.weight"]
    out, inp = weight.shape
    if scheme == "int8":
        linear = bnb.nn.Linear8bitLt(inp, out, bias=False, has_fp16_weights=False)
        linear.weight = bnb.nn.Int8Params(weight, requires_grad=False, has_fp16_weights=False)
    else:
        linear = bnb.nn.Linear4bit(inp, out, bias=False, compress_statistics=True, quant_type=scheme,
                                   quant_storage=torch.uint8)
        linear.weight = bnb.nn.Params4bit(weight, requires_grad=False, compress_statistics=True,
                                          quant_type=scheme, blocksize=64)
    theirs = linear.to("cpu").state_dict()
    ours = {k[len(module) + 1:]: v for k, v in read_all(outputs[scheme]).items() if k.startswith(module + ".")}
    assert set(ours) == set(theirs)
    # ... stored in state-dict order, as save_pretrained would (data order in the shard)
    from m1.safetensors_io import read_header

    shard = next(outputs[scheme].glob("model-*.safetensors"))
    stored = [n[len(module) + 1:] for n in read_header(shard).tensors if n.startswith(module + ".")]
    assert stored == list(theirs)
    for k, v in theirs.items():
        assert ours[k].dtype == v.dtype and ours[k].shape == v.shape, k
        if k.startswith("weight.quant_state") or k in ("weight.absmax", "weight.nested_absmax"):
            continue  # the nested offset is a float mean: its last bit depends on the reduction's thread count
        assert torch.equal(ours[k], v), k


@pytest.mark.parametrize("scheme", [Scheme.make("nf4"), Scheme.make("fp4", 128, False), Scheme.make("int8")])
def test_row_chunks_quantize_to_the_same_bytes(scheme: Scheme, monkeypatch: pytest.MonkeyPatch) -> None:
    from m1.schemes import bnb_codec as codec

    w = (torch.randn(300, 256, generator=torch.Generator().manual_seed(1)) * 0.02).to(torch.bfloat16)
    whole = codec.quantize_weight(scheme, w, torch.device("cpu"))
    monkeypatch.setattr(codec, "CHUNK_VALUES", 7 * 256)  # 43 chunks of 7 rows, the last one short
    chunked = codec.quantize_weight(scheme, w, torch.device("cpu"))
    assert [k for k, _ in chunked] == [k for k, _ in whole]
    assert all(torch.equal(a, b) for (_, a), (_, b) in zip(chunked, whole, strict=True))


def test_bitsandbytes_linear4bit_loads_our_tensors(outputs: dict[str, Path]) -> None:
    """bitsandbytes' own loading path (Params4bit.from_prequantized, as transformers uses it) runs our tensors."""
    import bitsandbytes as bnb

    module = "model.layers.1.block_sparse_moe.experts.3.w1"
    tensors = read_all(outputs["nf4"])
    stats = {k[len(module) + len(".weight."):]: v for k, v in tensors.items() if k.startswith(module + ".weight.")}
    linear = bnb.nn.Linear4bit(64, 128, bias=False, compute_dtype=torch.float32, quant_type="nf4")
    linear.weight = bnb.nn.Params4bit.from_prequantized(tensors[f"{module}.weight"], stats, device="cpu",
                                                        module=linear)
    x = torch.randn(3, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        got = linear(x)
    expected = x @ bnb_dequantize(tensors, module).T
    # bitsandbytes' CPU path (avx512-bf16 machines) repacks the absmax in bf16: agreement to bf16 precision
    assert (got - expected).abs().max() < 1e-2 * expected.abs().max()


@pytest.mark.parametrize("key", ["nf4", "int8"])
def test_config_integrity_inspect(src: Path, outputs: dict[str, Path], key: str) -> None:
    from m1.inspect import inspect_checkpoint
    from m1.integrity import check_integrity

    config = json.loads((outputs[key] / "config.json").read_text())
    qc = config["quantization_config"]
    assert qc["quant_method"] == "bitsandbytes"
    assert config["model_type"] == "minimax_m1" and "auto_map" in config  # the source's flavour is kept
    assert qc["llm_int8_skip_modules"] == list(SKIP_MODULES)
    if key == "int8":
        assert qc["load_in_8bit"] and not qc["load_in_4bit"]
    else:
        assert qc["load_in_4bit"] and not qc["load_in_8bit"]
        assert qc["bnb_4bit_quant_type"] == "nf4" and qc["bnb_4bit_use_double_quant"] is True
        assert qc["bnb_4bit_compute_dtype"] == "bfloat16" and qc["bnb_4bit_quant_storage"] == "uint8"
        assert qc["m1_blocksize"] == 64
    from transformers import BitsAndBytesConfig

    parsed = BitsAndBytesConfig.from_dict(qc)
    assert parsed.load_in_4bit == (key != "int8") and parsed.llm_int8_skip_modules == list(SKIP_MODULES)
    report = check_integrity(str(outputs[key]))
    assert report.ok, [f.line() for f in report.findings]
    info = inspect_checkpoint(str(outputs[key]))
    assert info["quantization"] == key and not info["missing"] and not info["unexpected"]
    assert info["params"] == inspect_checkpoint(str(src))["params"]  # parameters, not packed bytes


@pytest.mark.parametrize("key", ["nf4", "int8"])
def test_convert_dequantizes_to_plain_bf16(outputs: dict[str, Path], tmp_path: Path, key: str) -> None:
    from m1.integrity import check_integrity

    dest = tmp_path / "bf16"
    assert run_cli(["convert", str(outputs[key]), str(dest), "--dtype", "bf16", "--quiet"]) == 0
    assert "quantization_config" not in json.loads((dest / "config.json").read_text())
    report = check_integrity(str(dest))
    assert report.ok, [f.line() for f in report.findings]
    quantized, plain = read_all(outputs[key]), read_all(dest)
    for module in expert_modules(plain):
        assert plain[f"{module}.weight"].dtype == torch.bfloat16
        expected = bnb_dequantize(quantized, module).to(torch.bfloat16)
        assert torch.equal(plain[f"{module}.weight"], expected), module


def test_expected_tensors_for_a_kept_weight_is_empty() -> None:
    cfg = M1Config.from_file(RELEASE / "config.json")
    spec = spec_by_name(cfg)["model.layers.3.block_sparse_moe.experts.5.w2.weight"]
    qc = Scheme.make("nf4").quantization_config([])
    assert expected_tensors(qc, spec, {spec.name: "a.safetensors"}) == {}
    quantized = {spec.name: "a", spec.name[:-len("weight")] + "weight.absmax": "a"}
    group = expected_tensors(qc, spec, quantized)
    n = 6144 * 9216
    assert group[spec.name] == ("U8", (n // 2, 1))
    assert group[spec.name + ".absmax"] == ("U8", (n // 64,))
    assert group[spec.name + ".nested_absmax"] == ("F32", (math.ceil(n / 64 / 256),))
    assert group[spec.name + ".quant_state.bitsandbytes__nf4"] == ("U8", None)


# ---- policy, flavours, plans --------------------------------------------------------------------------


def test_keep_and_only(src: Path, tmp_path: Path) -> None:
    from m1.integrity import check_integrity

    dest = tmp_path / "mixed"
    quantize(src, dest, "--scheme", "nf4", "--keep", r"re:layers\.0\.", "--only", r"re:experts\.[01]\.")
    source, out = read_all(src), read_all(dest)
    quantized = {m for m in expert_modules(source) if f"{m}.weight.absmax" in out}
    expected = {m for m in expert_modules(source)
                if ".layers.0." not in m and (".experts.0." in m or ".experts.1." in m)}
    assert quantized == expected and len(expected) == 3 * 2 * 3
    for module in set(expert_modules(source)) - quantized:
        assert torch.equal(out[f"{module}.weight"], source[f"{module}.weight"])
        assert not any(n.startswith(module + ".weight.") for n in out)
    skip = json.loads((dest / "config.json").read_text())["quantization_config"]["llm_int8_skip_modules"]
    assert "model.layers.0.block_sparse_moe.experts.0.w1" in skip and "model.layers.1.block_sparse_moe.experts.0.w1" \
        not in skip
    report = check_integrity(str(dest))
    assert report.ok, [f.line() for f in report.findings]
    back = tmp_path / "back"
    assert run_cli(["convert", str(dest), str(back), "--dtype", "bf16", "--quiet"]) == 0
    assert check_integrity(str(back)).ok


def test_hf_flavour_stays_hf(src: Path, tmp_path: Path) -> None:
    hf = tmp_path / "hf"
    assert run_cli(["convert", str(src), str(hf), "--to", "hf", "--quiet"]) == 0
    quantize(hf, tmp_path / "q", "--scheme", "fp4")
    config = json.loads((tmp_path / "q" / "config.json").read_text())
    assert config["model_type"] == "minimax" and "layer_types" in config
    assert config["quantization_config"]["bnb_4bit_quant_type"] == "fp4"


def test_dry_run_lists_roles_and_writes_nothing(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dest = tmp_path / "never"
    assert run_cli(["quantize", str(src), str(dest), "--scheme", "nf4", "--dry-run"]) == 0
    text = capsys.readouterr().out
    assert "expert" in text and "router" in text and "quantized: 48 weights" in text
    assert not dest.exists()
    assert run_cli(["quantize", str(src), str(dest), "--scheme", "int8", "--dry-run", "--json"]) == 0
    plan = json.loads(capsys.readouterr().out)
    assert plan["dry_run"] and plan["quantized"]["tensors"] == 48 and plan["by_role"]["expert"]["quantized"] == 48
    # int8 per weight: the int8 matrix, a float32 scale per row, one weight_format byte (w1, w3: 128 rows; w2: 64)
    assert plan["quantized"]["bytes_after"] == 16 * sum(128 * 64 + 4 * rows + 1 for rows in (128, 128, 64))
    assert not dest.exists()


def test_full_m1_plan_from_the_release_index() -> None:
    """nf4 + double quant of the real M1: ~224 GB of experts, ~42.5 GB kept, from config + index alone."""
    cfg = M1Config.from_file(RELEASE / "config.json")
    weight_map = json.loads((RELEASE / "model.safetensors.index.json").read_text())["weight_map"]
    tensors = index_tensors(cfg, weight_map)
    opts = QuantizeOptions(Scheme.make("nf4"), Policy.from_options(keep=[r"re:layers\.(0|79)\."]))
    plan = plan_quantize(cfg, tensors, QuantizeOptions(Scheme.make("nf4")), source=str(RELEASE))
    totals = plan.totals()
    assert totals["quantized"]["tensors"] == 80 * 32 * 3
    assert totals["quantized"]["bytes_before"] == 80 * 32 * 3 * 9216 * 6144 * 2  # 869.8 GB of bf16 experts
    assert 223.5e9 < totals["quantized"]["bytes_after"] < 224.5e9
    assert 42.3e9 < totals["kept"]["bytes_after"] < 42.7e9
    assert totals["kept"]["bytes_after"] == totals["kept"]["bytes_before"]
    lines = "\n".join(plan.lines())
    assert "869.73 GB   224.34 GB" in lines and "kept:      563 tensors at their source dtype, 42.48 GB" in lines
    # a quantized weight is never split from its companions, and no shard exceeds 5 GB
    for shard in plan.files:
        names = {t.name for t in shard.tensors}
        for name in names:
            c = classify(name)
            if c.companion:
                assert c.weight_name in names
        assert shard.nbytes <= 5e9
    kept = plan_quantize(cfg, tensors, opts, source=str(RELEASE)).totals()
    assert kept["quantized"]["tensors"] == 78 * 32 * 3


# ---- workers, resume, disk full -----------------------------------------------------------------------


def test_two_workers_write_the_same_bytes(src: Path, tmp_path: Path) -> None:
    quantize(src, tmp_path / "one", "--layout", "by-layer", "--workers", "1", "--threads", "1")
    quantize(src, tmp_path / "two", "--layout", "by-layer", "--workers", "2", "--threads", "1")
    one = json.loads((tmp_path / "one" / "m1-manifest.json").read_text())["shards"]
    two = json.loads((tmp_path / "two" / "m1-manifest.json").read_text())["shards"]
    assert len(one) == 6 and one == two


def test_disk_full_mid_run_then_resume(src: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                       capsys: pytest.CaptureFixture) -> None:
    from m1 import safetensors_io
    from m1.integrity import check_integrity

    real = safetensors_io.write_shard_unsynced
    calls = {"shards": 0}

    def full_disk(path, planned, produce, *args, **kwargs):  # noqa: ANN001, ANN202
        calls["shards"] += 1
        if calls["shards"] < 3:
            return real(path, planned, produce, *args, **kwargs)
        produced = {"n": 0}

        def failing(name: str):  # noqa: ANN202
            produced["n"] += 1
            if produced["n"] > 5:
                raise OSError(errno.ENOSPC, "No space left on device")
            return produce(name)

        return real(path, planned, failing, *args, **kwargs)

    monkeypatch.setattr(safetensors_io, "write_shard_unsynced", full_disk)
    dest = tmp_path / "out"
    args = ["quantize", str(src), str(dest), "--quiet", "--layout", "by-layer", "--threads", "1"]
    assert run_cli(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "disk full" in err and "--resume" in err
    assert not (dest / "model.safetensors.index.json").exists() and not (dest / "m1-manifest.json").exists()
    assert not list(dest.glob(".*.tmp"))
    assert len(list(dest.glob("model-*.safetensors"))) == 2

    monkeypatch.setattr(safetensors_io, "write_shard_unsynced", real)  # the disk is freed
    assert run_cli([*args, "--resume"]) == 0
    assert check_integrity(str(dest)).ok
    clean = tmp_path / "clean"
    assert run_cli(["quantize", str(src), str(clean), "--quiet", "--layout", "by-layer", "--threads", "1"]) == 0
    assert json.loads((dest / "m1-manifest.json").read_text())["shards"] == \
        json.loads((clean / "m1-manifest.json").read_text())["shards"]


# ---- bad input: one line, non-zero exit, nothing written ------------------------------------------------


def run_bad(args: list[str], capsys: pytest.CaptureFixture) -> tuple[int, str]:
    code = run_cli(["quantize", *args])
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert err.startswith("error: ") and "internal error" not in err
    return code, err


@pytest.mark.parametrize(
    ("extra", "needle"),
    [
        (["--scheme", "nf3"], "unknown scheme 'nf3'"),
        (["--blocksize", "100"], "does not support --blocksize 100"),
        (["--scheme", "int8", "--blocksize", "64"], "--blocksize does not apply to int8"),
        (["--keep", "model.layers.9.block_sparse_moe.gate.weight"], "matches no tensor"),
        (["--keep", r"re:layers\.42\."], "matches no tensor"),
        (["--only", "re:self_attn"], "matches no expert weight"),
        (["--keep", "re:("], "not a valid regular expression"),
        (["--keep", "re:experts"], "nothing left to quantize"),
        (["--workers", "0"], "--workers must be at least 1"),
    ],
)
def test_bad_options(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture, extra: list[str], needle: str) -> None:
    dest = tmp_path / "out"
    code, err = run_bad([str(src), str(dest), *extra], capsys)
    assert code == 2 and needle in err
    assert not dest.exists()


def test_shape_error_names_the_tensor(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    odd = tmp_path / "odd"
    make_tiny(odd, TinySpec())  # experts of 96 x 64 = 6144 values
    code, err = run_bad([str(odd), str(tmp_path / "out"), "--blocksize", "4096"], capsys)
    assert code == 2 and "tensor model.layers.0.block_sparse_moe.experts.0.w1.weight" in err
    assert "6144 values" in err and "--blocksize 4096" in err and "--keep" in err
    assert not (tmp_path / "out").exists()


def test_blocks_spanning_rows_warn_and_read_back_flat(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """make-tiny's default w2 has rows of 96 values: 64-value blocks span rows. Allowed (the format is flat),
    with one warning line, and read back right by bitsandbytes over the flat shape and by m1 convert."""
    odd = tmp_path / "odd"
    make_tiny(odd, TinySpec())
    capsys.readouterr()
    assert run_cli(["quantize", str(odd), str(tmp_path / "q"), "--quiet", "--scheme", "fp4"]) == 0
    warning = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    assert len(warning) == 1 and warning[0].startswith("warning: 16 weights have rows of 96 values")
    assert run_cli(["convert", str(tmp_path / "q"), str(tmp_path / "back"), "--dtype", "bf16", "--quiet"]) == 0
    source, quantized, back = read_all(odd), read_all(tmp_path / "q"), read_all(tmp_path / "back")
    for module in expert_modules(source):
        flat = bnb_dequantize(quantized, module, flat=True)
        assert float((flat - source[f"{module}.weight"].float()).norm() / flat.norm()) < 0.14, module
        assert torch.equal(back[f"{module}.weight"], flat.to(torch.bfloat16)), module


def test_already_quantized(outputs: dict[str, Path], tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """A quantized source is dequantized as it is read (tests/test_dequantized.py checks the bytes); bitsandbytes
    tensors without the quantization_config that says how to read them are refused, naming a tensor."""
    dest = tmp_path / "again"
    assert run_cli(["quantize", str(outputs["nf4"]), str(tmp_path / "int8"), "--scheme", "int8", "-q"]) == 0
    assert check_integrity(str(tmp_path / "int8")).ok
    stripped = tmp_path / "stripped"
    stripped.mkdir()
    for p in outputs["nf4"].iterdir():
        (stripped / p.name).write_bytes(p.read_bytes())
    config = json.loads((stripped / "config.json").read_text())
    del config["quantization_config"]
    (stripped / "config.json").write_text(json.dumps(config))
    code, err = run_bad([str(stripped), str(dest)], capsys)
    assert code == 2 and "already quantized" in err and "tensor model.layers." in err
    assert not dest.exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a GPU")
def test_cuda_without_a_gpu(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dest = tmp_path / "out"
    code, err = run_bad([str(src), str(dest), "--device", "cuda"], capsys)
    assert code == 2 and "--device cuda" in err and "no CUDA GPU" in err
    assert not dest.exists()


def test_destination_is_the_source(src: Path, capsys: pytest.CaptureFixture) -> None:
    code, err = run_bad([str(src), str(src), "--overwrite"], capsys)
    assert code == 2 and "destination is the source" in err
    assert (src / "config.json").exists()


@pytest.mark.parametrize(("scheme", "value", "needle"), [("nf4", float("nan"), "NaN/Inf"),
                                                         ("int8", 1e6, "beyond fp16")])
def test_bad_values_in_an_expert(tmp_path: Path, capsys: pytest.CaptureFixture, scheme: str, value: float,
                                 needle: str) -> None:
    from safetensors.torch import load_file, save_file

    src = tmp_path / "src"
    make_tiny(src, TinySpec(intermediate=128, layers=2, softmax_every=2))
    name = "model.layers.1.block_sparse_moe.experts.2.w3.weight"
    file = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"][name]
    tensors = load_file(str(src / file))
    tensors[name][5, 7] = value
    save_file(tensors, str(src / file), metadata={"format": "pt"})
    dest = tmp_path / "out"
    code, err = run_bad([str(src), str(dest), "--scheme", scheme], capsys)
    assert code == 1 and needle in err and name in err
    assert not (dest / "model.safetensors.index.json").exists() and not (dest / "m1-manifest.json").exists()


def test_resume_with_other_options_is_refused(src: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    dest = tmp_path / "out"
    quantize(src, dest, "--scheme", "nf4")
    code, err = run_bad([str(src), str(dest), "--scheme", "fp4", "--resume"], capsys)
    assert code == 2 and "different plan" in err
    quantize(src, dest, "--scheme", "nf4", "--resume")  # the same options: nothing left to do, still whole
