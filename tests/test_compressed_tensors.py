"""compressed-tensors `pack-quantized` (w4a16, w8a16), in and out, checked by compressed-tensors' and
transformers' own readers and writers.

Tolerances: a dequantized expert is compared with its bf16 source within half a quantization step of its group
(`scale / 2`), plus what bf16 rounding adds: the scale is computed and stored in bf16 (two roundings, up to 2^-7
of it), which moves the group's largest value up to 2^-7 of the group's range past the clamped end of the codes
(the range is 7.5 steps each side for int4, 127.5 for int8, 15 steps in all when asymmetric), and the
product is rounded to bf16 (2^-8 of the value). Every comparison between m1 and a
third-party reader of the same files is exact (`torch.equal`).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from m1.cli import run_cli

pytest.importorskip("compressed_tensors")

RELEASE = Path(__file__).parent / "data" / "m1-release"
EXPERT = "model.layers.3.block_sparse_moe.experts.1."


def _tensors(folder: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(folder.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A tiny M1 (rows of whole 128-value groups) and its w4a16 and w8a16 outputs, side by side."""
    from m1.tiny import TinySpec, make_tiny

    root = tmp_path_factory.mktemp("ct")
    make_tiny(root / "tiny", TinySpec(hidden=128, intermediate=256))
    for scheme in ("w4a16", "w8a16", "fp8-dynamic"):
        code = run_cli(["quantize", str(root / "tiny"), str(root / scheme), "--format", "compressed-tensors",
                        "--scheme", scheme, "-q"])
        assert code == 0
    code = run_cli(["convert", str(root / "w4a16"), str(root / "w4a16-bf16"), "--dtype", "bf16", "-q"])
    assert code == 0
    return root


def _within_step(dense: torch.Tensor, source: torch.Tensor, scale: torch.Tensor, steps: float) -> None:
    group = source.shape[1] // scale.shape[1]
    step = scale.float().repeat_interleave(group, dim=1)
    err = (dense.float() - source.float()).abs()
    assert (err <= step * (0.5 + steps * 2**-7) + source.float().abs() * 2**-8 + 1e-6).all()


def test_written_as_compressed_tensors_writes_them(made: Path) -> None:
    raw = json.loads((made / "w4a16" / "config.json").read_text())
    assert raw["model_type"] == "minimax"
    qc = raw["quantization_config"]
    assert qc["quant_method"] == "compressed-tensors" and qc["format"] == "pack-quantized"
    group = qc["config_groups"]["group_0"]
    assert group["targets"] == ["Linear"] and group["format"] == "pack-quantized"
    assert group["weights"] == {"num_bits": 4, "type": "int", "symmetric": True, "group_size": 128,
                                "strategy": "group", "dynamic": False}
    assert "lm_head" in qc["ignore"]
    # compressed-tensors' own config model accepts the block, and its own preset is the same weight scheme
    from compressed_tensors.quantization import QuantizationConfig, preset_name_to_scheme

    parsed = QuantizationConfig.model_validate(qc)
    assert parsed.config_groups["group_0"].weights == preset_name_to_scheme("W4A16", ["Linear"]).weights
    t = _tensors(made / "w4a16")
    assert {k.rpartition(".")[2] for k in t if k.startswith(EXPERT + "w2.")} == {"weight_packed", "weight_scale",
                                                                                "weight_shape"}
    assert t[EXPERT + "w2.weight_packed"].dtype == torch.int32
    assert tuple(t[EXPERT + "w2.weight_packed"].shape) == (128, 256 * 4 // 32)
    assert t[EXPERT + "w2.weight_shape"].tolist() == [128, 256]
    src = _tensors(made / "tiny")
    for name, value in src.items():  # everything but the experts is the source's, bit for bit
        if ".experts." not in name:
            assert torch.equal(t[name], value), name


@pytest.mark.parametrize("scheme", ["w4a16", "w8a16", "fp8-dynamic"])
def test_compressed_tensors_dequantizer_gives_m1s_tensors(made: Path, tmp_path: Path, scheme: str) -> None:
    """compressed-tensors' convert_checkpoint with its CompressedTensorsDequantizer turns m1's files into the
    tensors m1's own dequantization gives, bit for bit; those are the source within half a step."""
    from compressed_tensors.entrypoints.convert import convert_checkpoint
    from compressed_tensors.entrypoints.convert.converters import CompressedTensorsDequantizer

    convert_checkpoint(made / scheme, tmp_path / "ct", CompressedTensorsDequantizer(made / scheme), max_workers=1,
                       device="cpu")
    theirs = _tensors(tmp_path / "ct")
    from m1.checkpoint import Checkpoint

    ckpt = Checkpoint.open(made / scheme)
    assert set(theirs) == set(ckpt.weight_map)
    for name in theirs:
        assert torch.equal(theirs[name], ckpt.get(name)), name
    if scheme == "w4a16":  # and m1 convert --dtype bf16 wrote the same
        assert all(torch.equal(v, theirs[k]) for k, v in _tensors(made / "w4a16-bf16").items())
    src, stored = _tensors(made / "tiny"), _tensors(made / scheme)
    if scheme == "fp8-dynamic":  # e4m3: 3 mantissa bits, so within 2^-4 of the value (subnormals: of the scale)
        for name in (EXPERT + "w1.weight", EXPERT + "w2.weight"):
            scale = stored[name + "_scale"].float()
            err = (theirs[name].float() - src[name].float()).abs()
            assert (err <= src[name].float().abs() * (2**-4 + 2**-7) + scale * 2**-9).all()
        return
    for name in (EXPERT + "w1.weight", EXPERT + "w2.weight"):
        _within_step(theirs[name], src[name], stored[name[: -len("weight")] + "weight_scale"],
                     7.5 if scheme == "w4a16" else 127.5)


@pytest.mark.filterwarnings("ignore:You passed `quantization_config`")
@pytest.mark.parametrize("scheme", ["w4a16", "fp8-dynamic"])
def test_transformers_loads_it_with_compressed_tensors_decompression(made: Path, scheme: str) -> None:
    transformers = pytest.importorskip("transformers")
    from m1.checkpoint import Checkpoint

    model = transformers.MiniMaxForCausalLM.from_pretrained(
        made / scheme, dtype=torch.bfloat16,
        quantization_config=transformers.CompressedTensorsConfig(dequantize=True))
    state = model.state_dict()
    ckpt = Checkpoint.open(made / scheme)
    for layer in range(4):
        for e in range(4):
            x = f"model.layers.{layer}.block_sparse_moe.experts.{e}."
            fused = torch.cat([ckpt.get(x + "w1.weight"), ckpt.get(x + "w3.weight")])
            assert torch.equal(state[f"model.layers.{layer}.mlp.experts.gate_up_proj"][e], fused)
            assert torch.equal(state[f"model.layers.{layer}.mlp.experts.down_proj"][e], ckpt.get(x + "w2.weight"))
    assert torch.equal(state["lm_head.weight"], ckpt.get("lm_head.weight"))
    with torch.no_grad():
        logits = model(input_ids=torch.arange(16)[None], use_cache=False).logits
    assert torch.isfinite(logits).all()


def _write_with_compressed_tensors(src: Path, dst: Path, int8_modules: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """A tiny M1 (hf layout) compressed by compressed-tensors itself: its Linear modules rebuilt from the state
    dict, its config applied (asymmetric int4, group 64: a layout m1 does not write; with `int8_modules`, a
    first config group giving those modules by exact name symmetric int8, group 128), qparams from its
    min/max, ModelCompressor's compress_model and update_config. Returns what compressed-tensors' own
    fake quantization (quantize then dequantize with those qparams) makes of each quantized weight."""
    from compressed_tensors.compressors import ModelCompressor
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        apply_quantization_config,
    )
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp
    from torch import nn

    root = nn.Module()
    for name, value in _tensors(src).items():
        *path, leaf = name.split(".")
        module = root
        for i, part in enumerate(path):
            if not hasattr(module, part):
                linear = i == len(path) - 1 and value.ndim == 2
                child = nn.Linear(value.shape[1], value.shape[0], bias=False) if linear else nn.Module()
                module.add_module(part, child)
            module = getattr(module, part)
        if isinstance(module, nn.Linear):
            module.weight = nn.Parameter(value, requires_grad=False)
        else:
            module.register_buffer(leaf, value)
    args = QuantizationArgs(num_bits=4, type="int", symmetric=False, strategy="group", group_size=64)
    targets = [r"re:.*block_sparse_moe\.experts\.\d+\.w[123]$"]
    groups = {"group_0": QuantizationScheme(targets=targets, weights=args)}
    if int8_modules:
        int8 = QuantizationArgs(num_bits=8, type="int", symmetric=True, strategy="group", group_size=128)
        groups = {"group_0": QuantizationScheme(targets=list(int8_modules), weights=int8),
                  "group_1": groups["group_0"]}
    apply_quantization_config(root, QuantizationConfig(config_groups=groups))
    from compressed_tensors.quantization.lifecycle.forward import fake_quantize

    intended = {}
    for name, module in root.named_modules():
        scheme = getattr(module, "quantization_scheme", None)
        if scheme is not None:
            scale, zero_point = compute_dynamic_scales_and_zp(module.weight, scheme.weights, module)
            module.weight_scale.data.copy_(scale)
            module.weight_zero_point.data.copy_(zero_point)
            intended[f"{name}.weight"] = fake_quantize(module.weight, module.weight_scale, module.weight_zero_point,
                                                       scheme.weights)
    compressor = ModelCompressor.from_pretrained_model(root, "pack-quantized")
    compressor.compress_model(root)
    dst.mkdir()
    save_file({k: v.contiguous() for k, v in root.state_dict().items()}, str(dst / "model.safetensors"))
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / name, dst / name)
    compressor.update_config(str(dst))
    return intended


def test_a_checkpoint_compressed_tensors_writes_is_read(made: Path, tmp_path: Path,
                                                        capsys: pytest.CaptureFixture[str]) -> None:
    assert run_cli(["convert", str(made / "tiny"), str(tmp_path / "hf"), "--to", "hf", "-q"]) == 0
    _write_with_compressed_tensors(tmp_path / "hf", tmp_path / "theirs")
    stored = _tensors(tmp_path / "theirs")
    assert EXPERT + "w1.weight_zero_point" in stored and EXPERT + "w1.weight" not in stored
    assert run_cli(["verify", "integrity", str(tmp_path / "theirs")]) == 0
    capsys.readouterr()
    assert run_cli(["convert", str(tmp_path / "theirs"), str(tmp_path / "dense"), "--dtype", "bf16", "-q"]) == 0
    dense, src = _tensors(tmp_path / "dense"), _tensors(made / "tiny")
    assert set(dense) == set(src)
    for name, value in src.items():
        if ".experts." not in name:
            assert torch.equal(dense[name], value), name
        else:  # asymmetric: the step is (max - min) / 15, so half of it
            _within_step(dense[name], value, stored[name[: -len("weight")] + "weight_scale"], 15)
    # and to another scheme from it
    assert run_cli(["quantize", str(tmp_path / "theirs"), str(tmp_path / "nf4"), "--scheme", "nf4", "-q"]) == 0


def test_a_checkpoint_of_two_config_groups_is_read_module_by_module(made: Path, tmp_path: Path) -> None:
    """Layer 0's w2 experts in a config group of their own (int8, by exact name), the other experts asymmetric
    int4: m1 gives each module its group's scheme as compressed-tensors' matching does (an exact name over a
    regex), and reads every weight as compressed-tensors' own fake quantization makes it. (compressed-tensors'
    convert_checkpoint is no reference here: its dequantizer gives a module to the first group in the config that
    names it, and ModelCompressor wrote the regex group first.)"""
    from m1.checkpoint import Checkpoint

    assert run_cli(["convert", str(made / "tiny"), str(tmp_path / "hf"), "--to", "hf", "-q"]) == 0
    int8 = tuple(f"model.layers.0.block_sparse_moe.experts.{e}.w2" for e in range(4))
    intended = _write_with_compressed_tensors(tmp_path / "hf", tmp_path / "theirs", int8_modules=int8)
    stored = _tensors(tmp_path / "theirs")
    assert stored[int8[0] + ".weight_packed"].shape[1] * 32 == 8 * 256  # int8 codes: 8 bits a value
    assert stored["model.layers.1.block_sparse_moe.experts.0.w2.weight_packed"].shape[1] * 32 == 4 * 256
    assert run_cli(["verify", "integrity", str(tmp_path / "theirs")]) == 0
    ckpt, src = Checkpoint.open(tmp_path / "theirs"), _tensors(made / "tiny")
    assert set(ckpt.weight_map) == set(src) and len(intended) == 4 * 4 * 3  # layers x experts x w1-w3
    for name, value in intended.items():
        assert torch.equal(ckpt.get(name), value), name
    for module in int8:
        _within_step(ckpt.get(module + ".weight"), src[module + ".weight"], stored[module + ".weight_scale"], 127.5)
    assert ckpt.storage.stored_as(int8[0] + ".weight")[0] == "w8a16"
    assert ckpt.storage.stored_as("model.layers.0.block_sparse_moe.experts.0.w1.weight")[0] == "w4a16"


def test_a_measured_mix_is_refused_before_anything_is_measured(made: Path, tmp_path: Path, run) -> None:  # noqa: ANN001
    code, _, err = run("quantize", made / "tiny", tmp_path / "mix", "--format", "compressed-tensors", "--budget",
                       "1MB", "--corpus", "mr-niah")
    assert code == 2 and "holds one" in err and "get_experts_scheme" in err and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "mix").exists()


def _damaged(made: Path, dest: Path, change: str) -> Path:
    shutil.copytree(made / "w4a16", dest)
    (dest / "m1-manifest.json").unlink()  # damage from outside m1, not a file changed after m1 wrote it
    shard = next(dest.glob("*.safetensors"))
    t = load_file(str(shard))
    if change == "scale-shape":
        t[EXPERT + "w2.weight_scale"] = t[EXPERT + "w2.weight_scale"][:, :1].contiguous()
    elif change == "missing-scale":
        del t[EXPERT + "w2.weight_scale"]
    elif change == "weight-shape":
        t[EXPERT + "w2.weight_shape"] = torch.tensor([256, 128])
    save_file(t, str(shard), metadata={"format": "pt"})
    index = json.loads((dest / "model.safetensors.index.json").read_text())
    index["weight_map"] = {k: v for k, v in index["weight_map"].items() if k in t}
    index["metadata"].pop("total_size", None)
    (dest / "model.safetensors.index.json").write_text(json.dumps(index))
    return shard


@pytest.mark.parametrize("change, tensor, says", [
    ("scale-shape", "w2.weight_scale", "shape [128, 1]"),
    ("missing-scale", "w2.weight_scale", "lacks"),
    ("weight-shape", "w2.weight_shape", "weight_shape holds [256, 128]"),
])
def test_a_bad_companion_is_one_line_naming_file_and_tensor(made: Path, tmp_path: Path, run, change: str,
                                                            tensor: str, says: str) -> None:
    shard = _damaged(made, tmp_path / "bad", change)
    code, out, err = run("convert", tmp_path / "bad", tmp_path / "out", "--dtype", "bf16", "-q")
    assert code == 1
    lines = err.strip().splitlines()
    assert len(lines) == 1 and shard.name in lines[0] and EXPERT + tensor in lines[0] and says in lines[0], err
    assert "Traceback" not in err
    assert not (tmp_path / "out" / "m1-manifest.json").exists()
    assert not (tmp_path / "out" / "model.safetensors.index.json").exists()
    code, out, _ = run("verify", "integrity", tmp_path / "bad")
    assert code == 1 and EXPERT + tensor in out


def test_full_m1_w4a16_plan_from_the_release_index() -> None:
    """W4A16 experts of the real M1-40k from its config and index alone: int4 codes, a bf16 scale per 128."""
    from m1.config import M1Config
    from m1.planner import index_tensors
    from m1.quantize.job import QuantizeOptions, plan_quantize
    from m1.schemes.ct_pack import PackScheme

    cfg = M1Config.from_file(RELEASE / "config.json")
    weight_map = json.loads((RELEASE / "model.safetensors.index.json").read_text())["weight_map"]
    plan = plan_quantize(cfg, index_tensors(cfg, weight_map),
                         QuantizeOptions(PackScheme.make("w4a16"), to="compressed-tensors"), source=str(RELEASE))
    totals = plan.totals()
    n = 80 * 32 * 3
    per_weight = 9216 * 6144 // 2 + 2 * 9216 * 6144 // 128 + 16  # packed int4, bf16 scales, weight_shape
    assert totals["quantized"]["tensors"] == n
    assert totals["quantized"]["bytes_after"] == n * per_weight  # 224.23 GB
    assert 42.3e9 < totals["kept"]["bytes_after"] < 42.7e9
    total = totals["quantized"]["bytes_after"] + totals["kept"]["bytes_after"]
    assert 266.5e9 < total < 266.9e9, total
    assert plan.config["quantization_config"]["quant_method"] == "compressed-tensors"
    from m1.schemes import make_scheme

    fp8 = plan_quantize(cfg, index_tensors(cfg, weight_map),
                        QuantizeOptions(make_scheme("fp8-dynamic"), to="compressed-tensors"), source=str(RELEASE))
    per_expert = 3 * 9216 * 6144 + 2 * (9216 + 9216 + 6144)  # e4m3 codes, a bf16 scale per output row of w1, w3, w2
    assert fp8.totals()["quantized"]["bytes_after"] == 80 * 32 * per_expert  # 434.99 GB


def test_a_transformed_checkpoint_is_refused_not_misread(made: Path, tmp_path: Path, run) -> None:
    """A transform_config (e.g. Hadamard rotations) changes what the codes mean: refused in one line."""
    shutil.copytree(made / "w4a16", tmp_path / "rotated")
    config = tmp_path / "rotated" / "config.json"
    raw = json.loads(config.read_text())
    raw["quantization_config"]["transform_config"] = {"config_groups": {"u": {"type": "hadamard"}}}
    config.write_text(json.dumps(raw))
    code, _, err = run("inspect", tmp_path / "rotated")
    assert code == 1 and "transform_config" in err and str(config) in err and len(err.strip().splitlines()) == 1, err


def test_a_config_read_without_its_storage_is_refused(made: Path) -> None:
    """Through the scheme registry (not its format's storage view) the config is refused, never planned."""
    from m1.errors import ConfigError
    from m1.schemes import scheme_from_config

    qc = json.loads((made / "w4a16" / "config.json").read_text())["quantization_config"]
    with pytest.raises(ConfigError, match="read through its own reader"):
        scheme_from_config(qc, "repo/config.json")


@pytest.mark.slow  # a Hub server and four jobs through it
def test_a_compressed_tensors_repo_on_the_hub_is_a_source(made: Path, tmp_path: Path, monkeypatch) -> None:  # noqa: ANN001
    """A compressed-tensors repo is read from the Hub through the same view as a local folder: inspect,
    integrity, dequantizing convert and quantize to another scheme give what the local folder gives."""
    from hubserver import HubServer, hub_env

    from m1 import hub_read

    monkeypatch.setattr(hub_read, "RETRY_WAIT_S", 0.0)
    repo = "someone/tiny-w4a16"
    with HubServer() as server, hub_env(server, home=tmp_path / "hf_home"):
        server.add_repo(repo, {p.name: p for p in (made / "w4a16").iterdir() if p.is_file()})
        assert run_cli(["verify", "integrity", repo]) == 0
        assert run_cli(["inspect", repo]) == 0
        assert run_cli(["convert", repo, str(tmp_path / "dense"), "--dtype", "bf16", "-q"]) == 0
        assert run_cli(["quantize", repo, str(tmp_path / "nf4"), "--scheme", "nf4", "-q"]) == 0
    assert run_cli(["quantize", str(made / "w4a16"), str(tmp_path / "nf4-local"), "--scheme", "nf4", "-q"]) == 0
    dense, local = _tensors(tmp_path / "dense"), _tensors(made / "w4a16-bf16")
    assert sorted(dense) == sorted(local) and all(torch.equal(dense[n], local[n]) for n in dense)
    nf4, nf4_local = _tensors(tmp_path / "nf4"), _tensors(tmp_path / "nf4-local")
    assert sorted(nf4) == sorted(nf4_local) and all(torch.equal(nf4[n], nf4_local[n]) for n in nf4)
