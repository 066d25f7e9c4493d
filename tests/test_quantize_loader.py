"""`m1.load_pretrained`: transformers' MiniMaxForCausalLM with bitsandbytes-quantized experts.

The reference is transformers' own model (its default fused experts) loaded with the dequantized
weights that `m1 convert --dtype fp32` writes; in float32 the two agree to rounding, because the
quantized experts dequantize to exactly those weights. Memory is measured as the bytes the model's
expert modules hold.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

import m1
from m1.checkpoint import Checkpoint
from m1.cli import run_cli
from m1.quantize.loader import QuantizedExperts, bf16_expert_nbytes, expert_nbytes
from m1.tiny import TinySpec, make_tiny

SPEC = TinySpec(intermediate=128, rotary_dim=16, shards=2)  # rotary over the whole head: transformers == release


def reference_model(path: Path) -> torch.nn.Module:
    """transformers' MiniMaxForCausalLM (fp32, fused experts) with a plain checkpoint's weights."""
    from transformers import MiniMaxConfig, MiniMaxForCausalLM

    ckpt = Checkpoint.open(path)
    cfg = ckpt.config
    model = MiniMaxForCausalLM(MiniMaxConfig(**cfg.to_dict("hf"))).eval()
    state = {n.replace(".block_sparse_moe.", ".mlp."): ckpt.get(n).float() for n in ckpt.names()
             if ".experts." not in n}
    for layer in range(cfg.num_hidden_layers):
        p = f"model.layers.{layer}.block_sparse_moe.experts."
        experts = range(cfg.num_local_experts)
        state[f"model.layers.{layer}.mlp.experts.gate_up_proj"] = torch.stack(
            [torch.cat([ckpt.get(f"{p}{e}.w1.weight"), ckpt.get(f"{p}{e}.w3.weight")]) for e in experts]).float()
        state[f"model.layers.{layer}.mlp.experts.down_proj"] = torch.stack(
            [ckpt.get(f"{p}{e}.w2.weight") for e in experts]).float()
    missing, unexpected = model.load_state_dict(state, strict=False)
    assert not unexpected and all(k.rsplit(".", 1)[-1] in {"slope_rate", "query_decay", "key_decay",
                                                            "diagonal_decay"} for k in missing)
    return model


def logits(model: torch.nn.Module, tokens: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=tokens, use_cache=False).logits.float()


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("loader")
    make_tiny(root / "src", SPEC)
    out = {"src": root / "src"}
    for key, args in {"nf4": ["--scheme", "nf4"], "int8": ["--scheme", "int8"],
                      "mixed": ["--scheme", "fp4", "--keep", r"re:layers\.0\.", "--no-double-quant"]}.items():
        out[key] = root / key
        assert run_cli(["quantize", str(root / "src"), str(out[key]), "--quiet", *args]) == 0
        # fp32: int8 dequantizes to float32 (4-bit to its source bf16, which fp32 holds exactly)
        for dtype in ("fp32", "bf16") if key == "nf4" else ("fp32",):
            out[f"{key}-{dtype}"] = root / f"{key}-{dtype}"
            assert run_cli(["convert", str(out[key]), str(out[f"{key}-{dtype}"]), "--dtype", dtype, "--quiet"]) == 0
    return out


TOKENS = torch.randint(0, 256, (2, 40), generator=torch.Generator().manual_seed(0))  # 40: blocks of 16 + a rest


@pytest.mark.parametrize("key", ["nf4", "int8", "mixed"])
def test_logits_match_transformers_with_dequantized_weights(checkpoints: dict[str, Path], key: str) -> None:
    ours = m1.load_pretrained(str(checkpoints[key]), dtype=torch.float32)
    assert isinstance(ours.model.layers[0].mlp.experts, QuantizedExperts)
    theirs = reference_model(checkpoints[key + "-fp32"])
    a, b = logits(ours, TOKENS), logits(theirs, TOKENS)
    assert b.std() > 0.5  # a non-degenerate comparison
    assert (a - b).abs().max() < 1e-4


def test_bf16_matches_the_dequantized_checkpoint_exactly(checkpoints: dict[str, Path]) -> None:
    quantized = m1.load_pretrained(str(checkpoints["nf4"]))
    plain = m1.load_pretrained(str(checkpoints["nf4-bf16"]))
    assert quantized.model.embed_tokens.weight.dtype == torch.bfloat16
    assert torch.equal(logits(quantized, TOKENS), logits(plain, TOKENS))
    out = quantized.generate(TOKENS[:1, :8], max_new_tokens=4, do_sample=False)
    assert out.shape == (1, 12)


@pytest.mark.parametrize(("key", "ratio"), [("nf4", 0.33), ("int8", 0.55)])
def test_resident_expert_memory_is_the_quantized_size(checkpoints: dict[str, Path], key: str, ratio: float) -> None:
    model = m1.load_pretrained(str(checkpoints[key]))
    bf16 = bf16_expert_nbytes(str(checkpoints[key]))
    held = expert_nbytes(model)
    # tiny experts carry relatively more state (nf4: 5320 of 16384 bytes a weight, int8: 8704; the full M1 in
    # nf4: 0.26 of bf16)
    assert held < ratio * bf16
    ckpt = Checkpoint.open(checkpoints[key])
    stored = sum(ckpt.info(n).nbytes for n in ckpt.names()
                 if ".experts." in n and "quant_state" not in n and "weight_format" not in n)
    assert stored <= held <= stored + 4 * 3 * SPEC.experts * SPEC.layers  # + the nested offset scalars
    # nothing in the model is an expert-sized bf16 tensor
    expert_numel = SPEC.intermediate * SPEC.hidden
    for name, t in [*model.named_parameters(), *model.named_buffers()]:
        assert not (t.is_floating_point() and t.numel() >= expert_numel and ".experts." in name), name
    everything = sum(t.numel() * t.element_size() for t in [*model.parameters(), *model.buffers()])
    assert everything - held < 0.7 * bf16  # the rest is the small non-expert part, not the bf16 experts


def test_load_pretrained_rejects_a_non_bnb_config(checkpoints: dict[str, Path], tmp_path: Path) -> None:
    import json
    import shutil

    from m1.errors import ConfigError

    bad = tmp_path / "gptq"
    shutil.copytree(checkpoints["nf4"], bad)
    config = json.loads((bad / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "gptq", "bits": 4}
    (bad / "config.json").write_text(json.dumps(config))
    with pytest.raises(ConfigError, match="only bitsandbytes"):
        m1.load_pretrained(str(bad))
