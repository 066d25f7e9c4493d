"""FP8 block-wise (m1.schemes.fp8) against the readers and writers of the field, on the CPU.

transformers 5.x loads m1's fp8 output (it dequantizes on a CPU) with the same weights as m1's own
dequantization, bit for bit, and on a GPU would make exactly the experts FP8 (checked on a meta model);
compressed-tensors' FP8BlockDequantizer, through its convert_checkpoint, gives the same dense tensors; an fp8
checkpoint quantized by transformers' own Fp8Quantize is read by m1 and agrees with its source; damaged
companions and dimensions that are not whole blocks are one-line errors.
"""

from __future__ import annotations

import json
import math
import shutil
from collections.abc import Callable
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from m1.checkpoint import Checkpoint
from m1.quantized import dequantize_weight

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")  # transformers loads no fp8 checkpoint without it

EXPERT = "block_sparse_moe.experts."


def read_all(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def one_line_error(err: str) -> str:
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    return lines[0]


@pytest.fixture(scope="module")
def made(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny M1 with 128x256 experts (rotary over all head dims, so transformers computes what the release
    does) and its fp8 quantization in the hf and release layouts."""
    from m1.cli import run_cli
    from m1.tiny import TinySpec, make_tiny

    root = tmp_path_factory.mktemp("fp8")
    make_tiny(root / "src", TinySpec(layers=2, softmax_every=2, hidden=128, intermediate=256, head_dim=16,
                                     rotary_dim=16))
    assert run_cli(["quantize", str(root / "src"), str(root / "hf"), "--scheme", "fp8", "--format", "hf", "-q"]) == 0
    assert run_cli(["quantize", str(root / "src"), str(root / "rel"), "--scheme", "fp8", "-q"]) == 0
    return {"src": root / "src", "hf": root / "hf", "rel": root / "rel"}


def test_what_m1_writes(made: dict[str, Path]) -> None:
    tensors, source = read_all(made["rel"]), read_all(made["src"])
    qc = json.loads((made["rel"] / "config.json").read_text())["quantization_config"]
    assert {k: qc[k] for k in ("quant_method", "activation_scheme", "weight_block_size")} == {
        "quant_method": "fp8", "activation_scheme": "dynamic", "weight_block_size": [128, 128]}
    assert qc["modules_to_not_convert"] == qc["ignored_layers"] and "lm_head" in qc["ignored_layers"]
    w2 = "model.layers.1.block_sparse_moe.experts.2.w2"
    assert tensors[f"{w2}.weight"].dtype == torch.float8_e4m3fn and tensors[f"{w2}.weight"].shape == (128, 256)
    scale = tensors[f"{w2}.weight_scale_inv"]
    assert scale.dtype == torch.float32 and scale.shape == (1, 2)
    # each block's scale is its amax / 448, and its largest value lands on float8's largest
    block = source[f"{w2}.weight"].float()[:, 128:]
    assert math.isclose(float(scale[0, 1]), float(block.abs().max()) / 448, rel_tol=1e-6)
    assert float(tensors[f"{w2}.weight"][:, 128:].float().abs().max()) == 448
    quantized = [n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn]
    assert quantized and all(EXPERT in n for n in quantized)  # experts only by default
    for name, t in tensors.items():
        if EXPERT not in name:
            assert torch.equal(t, source[name]), name


def test_transformers_loads_it_with_m1s_weights(made: dict[str, Path]) -> None:
    from transformers import MiniMaxForCausalLM

    model, info = MiniMaxForCausalLM.from_pretrained(made["hf"], dtype=torch.float32, output_loading_info=True)
    assert not info["unexpected_keys"] and not info["mismatched_keys"], info
    assert all(k.rsplit(".", 1)[-1] in ("slope_rate", "query_decay", "key_decay", "diagonal_decay")
               for k in info["missing_keys"])  # buffers transformers computes itself
    state, ckpt = model.state_dict(), Checkpoint.open(str(made["hf"]))
    for layer in range(2):
        gate_up, down = (state[f"model.layers.{layer}.mlp.experts.{p}"] for p in ("gate_up_proj", "down_proj"))
        for e in range(4):
            w = {k: dequantize_weight(ckpt, f"model.layers.{layer}.{EXPERT}{e}.{k}.weight") for k in ("w1", "w2", "w3")}
            assert torch.equal(gate_up[e], torch.cat([w["w1"], w["w3"]])), (layer, e)
            assert torch.equal(down[e], w["w2"]), (layer, e)
    source = read_all(made["src"])
    assert torch.equal(state["model.layers.0.self_attn.qkv_proj.weight"],
                       source["model.layers.0.self_attn.qkv_proj.weight"].float())
    tokens = torch.randint(0, 256, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        logits = model.eval()(input_ids=tokens, use_cache=False).logits
    assert torch.isfinite(logits).all() and logits.std() > 0.1


def test_transformers_on_a_gpu_would_make_exactly_the_experts_fp8(made: dict[str, Path]) -> None:
    """The skip list as transformers' FineGrainedFP8 applies it (its own module replacement, on a meta model)."""
    from transformers import AutoConfig, FineGrainedFP8Config, MiniMaxForCausalLM
    from transformers.quantizers.auto import AutoHfQuantizer

    qc = FineGrainedFP8Config.from_dict(json.loads((made["hf"] / "config.json").read_text())["quantization_config"])
    qc.dequantize = False  # what it does where a GPU is present
    quantizer = AutoHfQuantizer.from_config(qc, pre_quantized=True)
    with torch.device("meta"):
        model = MiniMaxForCausalLM(AutoConfig.from_pretrained(made["hf"]))
    quantizer._process_model_before_weight_loading(model)
    fp8 = {n for n, m in model.named_modules() if type(m).__module__.endswith("finegrained_fp8")}
    assert fp8 == {f"model.layers.{i}.mlp.experts" for i in range(2)}
    assert type(model.lm_head) is torch.nn.Linear and type(model.model.layers[1].self_attn.q_proj) is torch.nn.Linear


def test_compressed_tensors_dequantizes_to_m1s_tensors(made: dict[str, Path], tmp_path: Path) -> None:
    from compressed_tensors.entrypoints.convert import FP8BlockDequantizer, convert_checkpoint

    converter = FP8BlockDequantizer.from_pretrained(str(made["rel"]), dtype=torch.float32)
    convert_checkpoint(str(made["rel"]), str(tmp_path / "ct"), converter, max_workers=1, device="cpu")
    dense, ckpt = read_all(tmp_path / "ct"), Checkpoint.open(str(made["rel"]))
    experts = [n for n in dense if EXPERT in n]
    assert len(experts) == 2 * 4 * 3 and not [n for n in dense if n.endswith("scale_inv")]
    for name in experts:
        assert torch.equal(dense[name], dequantize_weight(ckpt, name)), name


def fp8_copy(src: Path, dest: Path, quantize: Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]],
             skip: list[str]) -> None:
    """`src` with its experts quantized by `quantize` (weight -> fp8 weight, weight_scale_inv) into one file,
    with a DeepSeek/MiniMax-M2-style quantization_config."""
    tensors = {}
    for name, t in read_all(src).items():
        if EXPERT in name:
            tensors[name], tensors[name.replace(".weight", ".weight_scale_inv")] = quantize(t)
        else:
            tensors[name] = t
    dest.mkdir()
    save_file(tensors, str(dest / "model.safetensors"))
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                                     "weight_block_size": [128, 128], "ignored_layers": skip}
    (dest / "config.json").write_text(json.dumps(config))
    for extra in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(src / extra, dest / extra)


def transformers_quantize(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """transformers' own FP8 block quantizer (what `save_pretrained` of a model quantized on load writes)."""
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Quantize

    class Quantizer:
        quantization_config = FineGrainedFP8Config()

    out = Fp8Quantize(Quantizer()).convert({"w.weight": weight})
    return out["w.weight"], out["w.weight_scale_inv"]


def test_a_checkpoint_transformers_quantized_is_read_and_verifies(made: dict[str, Path], tmp_path: Path,
                                                                  run: Callable[..., tuple[int, str, str]]) -> None:
    from transformers import FineGrainedFP8Config
    from transformers.integrations.finegrained_fp8 import Fp8Dequantize

    theirs = tmp_path / "theirs"
    fp8_copy(made["src"], theirs, transformers_quantize, ["gate", "lm_head"])  # MiniMax-M2's style of skip list
    code, out, err = run("verify", "integrity", theirs)
    assert code == 0 and "sound" in out, out + err
    code, out, err = run("inspect", theirs)
    assert code == 0 and "quantization: fp8" in out, err
    assert run("convert", theirs, tmp_path / "back", "--dtype", "fp32", "-q")[0] == 0
    back, stored, source = read_all(tmp_path / "back"), read_all(theirs), read_all(made["src"])

    class Quantizer:
        quantization_config = FineGrainedFP8Config()

    dequantize = Fp8Dequantize(Quantizer())
    for name in (n for n in source if EXPERT in n):
        scale = stored[name.replace(".weight", ".weight_scale_inv")]
        assert torch.equal(back[name], dequantize._dequantize_one(stored[name], scale, torch.float32)), name
        assert float((back[name] - source[name].float()).norm() / source[name].float().norm()) < 0.05, name
    code, out, err = run("verify", "compare", made["src"], theirs, "--tokens", "512", "--max-kl", "0.05",
                         "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["passed"] and report["candidates"][0]["metrics"]["kl_mean"] < 0.01, out


def test_damaged_companions_are_one_line_errors(made: dict[str, Path], tmp_path: Path,
                                                run: Callable[..., tuple[int, str, str]]) -> None:
    scale = "model.layers.1.block_sparse_moe.experts.3.w1.weight_scale_inv"
    for damage, new in (("dtype", lambda t: t.to(torch.bfloat16)), ("shape", lambda t: t.reshape(1, 2).repeat(2, 1)),
                        ("value", lambda t: -t)):
        bad = tmp_path / damage
        shutil.copytree(made["rel"], bad)
        (bad / "m1-manifest.json").unlink()  # the shard is changed on purpose: damage past the manifest
        shard = bad / json.loads((bad / "model.safetensors.index.json").read_text())["weight_map"][scale]
        tensors = load_file(str(shard))
        tensors[scale] = new(tensors[scale])
        save_file(tensors, str(shard))
        index = json.loads((bad / "model.safetensors.index.json").read_text())
        index["metadata"]["total_size"] = sum(t.numel() * t.element_size() for t in tensors.values())
        (bad / "model.safetensors.index.json").write_text(json.dumps(index))
        for job in (("convert", "--dtype", "bf16"), ("quantize", "--scheme", "nf4"), ("convert", "--to", "gguf")):
            out = tmp_path / f"out-{damage}-{job[-1]}{'.gguf' if job[-1] == 'gguf' else ''}"
            code, _, err = run(job[0], bad, out, *job[1:], "-q")
            line = one_line_error(err)
            assert code != 0 and shard.name in line and scale in line, (job, line)
            assert not (out / "m1-manifest.json").exists() and not out.with_suffix(".m1-manifest.json").exists()
            assert not out.is_file()


def test_dimensions_that_are_not_whole_blocks(make_tiny_ckpt: Callable[..., Path], tmp_path: Path,
                                              run: Callable[..., tuple[int, str, str]]) -> None:
    """m1 refuses to write a partial block (transformers' CPU reader would mis-scale it); one written the DeepSeek
    way (scale grid ceil-divided, the last block partial) is read as compressed-tensors reads it."""
    from compressed_tensors.entrypoints.convert import FP8BlockDequantizer
    from compressed_tensors.quantization.utils.helpers import maybe_pad_tensor_for_block_quant

    src = make_tiny_ckpt("ragged", layers=2, softmax_every=2, hidden=128, intermediate=200)
    code, _, err = run("quantize", src, tmp_path / "refused", "--scheme", "fp8")
    line = one_line_error(err)
    assert code == 2 and "128x128" in line and "experts.0.w1.weight" in line and "--keep" in line, line
    assert not (tmp_path / "refused").exists()

    def padded(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        q, scale = transformers_quantize(maybe_pad_tensor_for_block_quant(weight, (128, 128)))
        return q[: weight.shape[0], : weight.shape[1]].contiguous(), scale

    theirs = tmp_path / "theirs"
    fp8_copy(src, theirs, padded, ["block_sparse_moe.gate", "lm_head"])
    assert run("convert", theirs, tmp_path / "back", "--dtype", "fp32", "-q")[0] == 0
    # its dequantizer itself: compressed-tensors 0.20's convert_checkpoint cannot save the result (a cropped,
    # non-contiguous view, which safetensors refuses)
    dense = FP8BlockDequantizer.from_pretrained(str(theirs), dtype=torch.float32).process(read_all(theirs))
    back, source = read_all(tmp_path / "back"), read_all(src)
    assert read_all(theirs)["model.layers.0.block_sparse_moe.experts.0.w2.weight_scale_inv"].shape == (1, 2)
    for name in (n for n in source if EXPERT in n):
        assert torch.equal(back[name], dense[name]), name
        assert float((back[name] - source[name].float()).norm() / source[name].float().norm()) < 0.05, name


def test_full_m1_fp8_plan_from_the_release_index() -> None:
    """FP8 experts of the real M1-40k from its config and index alone: 434.87 GB of fp8 weights and 0.11 GB of
    block scales beside 42.48 GB kept, about 477 GB in all (half the release's 912 GB)."""
    from m1.config import M1Config
    from m1.planner import index_tensors
    from m1.policy import Policy
    from m1.quantize.job import QuantizeOptions, plan_quantize
    from m1.schemes import make_scheme

    release = Path(__file__).parent / "data" / "m1-release"
    cfg = M1Config.from_file(release / "config.json")
    tensors = index_tensors(cfg, json.loads((release / "model.safetensors.index.json").read_text())["weight_map"])
    plan = plan_quantize(cfg, tensors, QuantizeOptions(make_scheme("fp8"), Policy()), source=str(release))
    totals = plan.totals()
    experts = 80 * 32 * 3
    assert totals["quantized"]["tensors"] == experts
    assert totals["quantized"]["bytes_after"] == experts * (9216 * 6144 + 72 * 48 * 4)  # fp8 + fp32 scales
    assert 42.3e9 < totals["kept"]["bytes_after"] < 42.7e9
    total = sum(f.nbytes for f in plan.files)
    assert 476.5e9 < total < 478e9, total
    assert all(f.nbytes <= 5e9 for f in plan.files)


def test_attention_fp8_when_asked(make_tiny_ckpt: Callable[..., Path], tmp_path: Path,
                                  run: Callable[..., tuple[int, str, str]]) -> None:
    """--attn-type fp8: the attention projections fp8 too, read by transformers as m1 reads them; a projection
    --keep leaves out is named in the skip list; other schemes and a copy refuse it."""
    from transformers import MiniMaxForCausalLM

    src = make_tiny_ckpt("attn", layers=2, softmax_every=2, hidden=128, intermediate=128, heads=4, kv_heads=4,
                         head_dim=32, rotary_dim=32)
    out = tmp_path / "fp8"
    code, _, err = run("quantize", src, out, "--scheme", "fp8", "--attn-type", "fp8", "--keep",
                       "model.layers.1.self_attn.v_proj.weight", "--format", "hf", "-q")
    assert code == 0, err
    assert run("verify", "integrity", out)[0] == 0
    tensors = read_all(out)
    fp8 = {n for n, t in tensors.items() if t.dtype == torch.float8_e4m3fn}
    attn = {n for n in fp8 if "self_attn" in n}
    assert len(attn) == 3 + 3 and "model.layers.1.self_attn.v_proj.weight" not in attn
    skip = json.loads((out / "config.json").read_text())["quantization_config"]["ignored_layers"]
    assert "model.layers.1.self_attn.v_proj" in skip and "self_attn.q_proj" not in skip and "lm_head" in skip
    model = MiniMaxForCausalLM.from_pretrained(out, dtype=torch.float32)
    state, ckpt = model.state_dict(), Checkpoint.open(str(out))
    for name in attn:
        assert torch.equal(state[name], dequantize_weight(ckpt, name)), name
    code, _, err = run("quantize", src, tmp_path / "nf4", "--scheme", "nf4", "--attn-type", "fp8")
    assert code == 2 and "goes with m1 quantize --scheme fp8" in one_line_error(err)
    code, _, err = run("convert", src, tmp_path / "copy", "--attn-type", "fp8")
    assert code == 2 and "--attn-type fp8" in one_line_error(err)


def test_an_fp8_source_quantized_or_exported_directly(made: dict[str, Path], tmp_path: Path,
                                                       run: Callable[..., tuple[int, str, str]]) -> None:
    """An fp8 source goes straight into nf4 and GGUF (tests/test_dequantized.py checks the bytes against
    dequantizing first); its dequantization by convert --dtype is m1's own, which transformers agrees with."""
    assert run("quantize", made["rel"], tmp_path / "nf4", "--scheme", "nf4", "-q")[0] == 0
    assert run("convert", made["rel"], tmp_path / "m1.gguf", "--to", "gguf", "-q")[0] == 0
    assert run("verify", "integrity", tmp_path / "m1.gguf")[0] == 0
    assert run("convert", made["rel"], tmp_path / "fp32", "--dtype", "fp32", "-q")[0] == 0
    ckpt, back = Checkpoint.open(str(made["rel"])), read_all(tmp_path / "fp32")
    name = "model.layers.0.block_sparse_moe.experts.1.w3.weight"
    assert torch.equal(back[name], dequantize_weight(ckpt, name))


def gguf_tensors(path: Path) -> dict[str, tuple[str, tuple[int, ...], bytes]]:
    import gguf
    import numpy as np

    return {t.name: (t.tensor_type.name, tuple(int(d) for d in t.shape), np.asarray(t.data).tobytes())
            for t in gguf.GGUFReader(path).tensors}


@pytest.mark.slow
def test_llama_cpps_converter_reads_m1s_fp8(made: dict[str, Path], make_tiny_ckpt: Callable[..., Path],
                                             tmp_path: Path, run: Callable[..., tuple[int, str, str]]) -> None:
    """llama.cpp's own convert_hf_to_gguf.py (llama-cpp-python 0.3.36's, fetched if missing) on m1's fp8 output:
    it writes the same GGUF tensors, byte for byte, as `m1 convert FP8/ --to gguf`; and on a source whose
    values fp8 holds exactly (every 128x128 block an e4m3 grid scaled by a power of two, its largest value
    448 times that), the same tensors as m1's GGUF of the bf16 source itself."""
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1] / "bench"))
    from llama_converter import ConverterMissing, convert_with_llama_cpp, converter_tree

    workdir = Path(__file__).parents[1] / "build" / "llama-cpp"
    try:
        tree = converter_tree(workdir)
    except ConverterMissing as exc:
        pytest.skip(str(exc))
    assert run("convert", made["rel"], tmp_path / "m1.gguf", "--to", "gguf", "-q")[0] == 0
    convert_with_llama_cpp(tree, workdir, made["rel"], tmp_path / "peer.gguf")
    ours, theirs = gguf_tensors(tmp_path / "m1.gguf"), gguf_tensors(tmp_path / "peer.gguf")
    assert sorted(ours) == sorted(theirs) and any(".ffn_gate_exps." in n for n in ours)
    assert [n for n in ours if ours[n] != theirs[n]] == []

    src = make_tiny_ckpt("exact", layers=2, softmax_every=2, hidden=128, intermediate=256, head_dim=16,
                         rotary_dim=16)
    grid = torch.arange(256, dtype=torch.uint8).view(torch.float8_e4m3fn).float()
    grid = grid[torch.isfinite(grid)]
    index = json.loads((src / "model.safetensors.index.json").read_text())["weight_map"]
    for shard in sorted({f for n, f in index.items() if EXPERT in n}):
        tensors = load_file(str(src / shard))
        gen = torch.Generator().manual_seed(len(shard))
        for name in [n for n in tensors if EXPERT in n]:
            shape = tensors[name].shape
            values = grid[torch.randint(len(grid), shape, generator=gen)]
            values[::128, ::128] = 448.0  # each block's amax: its scale is exactly the power of two below
            tensors[name] = (values * 2.0 ** -12).to(torch.bfloat16)
        save_file(tensors, str(src / shard), metadata={"format": "pt"})
    (src / "m1-manifest.json").unlink(missing_ok=True)  # the shards were rewritten on purpose
    assert run("quantize", src, tmp_path / "exact-fp8", "--scheme", "fp8", "-q")[0] == 0
    assert run("convert", src, tmp_path / "exact-m1.gguf", "--to", "gguf", "-q")[0] == 0
    convert_with_llama_cpp(tree, workdir, tmp_path / "exact-fp8", tmp_path / "exact-peer.gguf")
    ours, theirs = gguf_tensors(tmp_path / "exact-m1.gguf"), gguf_tensors(tmp_path / "exact-peer.gguf")
    assert sorted(ours) == sorted(theirs)
    assert [n for n in ours if ours[n] != theirs[n]] == []
