"""The `--to hf` output loads in transformers' native MiniMaxForCausalLM (a test-only dependency)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

transformers = pytest.importorskip("transformers")

DECAY_BUFFERS = {"slope_rate", "query_decay", "key_decay", "diagonal_decay"}


@pytest.fixture(scope="module")
def out_hf(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from m1.cli import run_cli
    from m1.tiny import TinySpec, make_tiny

    root = tmp_path_factory.mktemp("hf-load")
    # rotary_dim == head_dim: the one case where transformers' MiniMax computes what the release computes
    make_tiny(root / "tiny", TinySpec(layers=4, softmax_every=2, head_dim=16, rotary_dim=16))
    assert run_cli(["convert", str(root / "tiny"), str(root / "hf"), "--to", "hf", "-q"]) == 0
    return root / "hf"


def test_output_holds_no_decay_buffers(out_hf: Path) -> None:
    for f in out_hf.glob("*.safetensors"):
        with safe_open(str(f), framework="pt") as sf:
            assert not [k for k in sf.keys() if k.rsplit(".", 1)[-1] in DECAY_BUFFERS]


def test_config_loads_as_minimax_config(out_hf: Path) -> None:
    raw = json.loads((out_hf / "config.json").read_text())
    cfg = transformers.AutoConfig.from_pretrained(out_hf)
    assert type(cfg).__name__ == "MiniMaxConfig"
    assert list(cfg.layer_types) == raw["layer_types"] == ["linear_attention", "full_attention"] * 2
    assert cfg.block_size == raw["block_size"]
    assert cfg.full_attn_alpha_factor == raw["full_attn_alpha_factor"]
    assert cfg.mlp_beta_factor == raw["mlp_beta_factor"]
    assert cfg.head_dim == 16


def test_loads_in_transformers(out_hf: Path) -> None:
    from transformers import MiniMaxForCausalLM

    model, info = MiniMaxForCausalLM.from_pretrained(out_hf, dtype=torch.float32, output_loading_info=True)
    assert not info["unexpected_keys"], info["unexpected_keys"]
    assert not info["mismatched_keys"], info["mismatched_keys"]
    assert not info.get("error_msgs"), info["error_msgs"]
    missing = set(info["missing_keys"])
    assert all(k.rsplit(".", 1)[-1] in DECAY_BUFFERS for k in missing), missing
    lightning = [i for i, t in enumerate(model.config.layer_types) if t == "linear_attention"]
    assert missing == {f"model.layers.{i}.self_attn.{b}" for i in lightning for b in DECAY_BUFFERS}

    # the weights are the make-tiny source's (transformers renames block_sparse_moe to mlp and fuses the experts)
    state = model.state_dict()
    source: dict[str, torch.Tensor] = {}
    for f in (out_hf.parent / "tiny").glob("*.safetensors"):
        source.update({k: v.float() for k, v in load_file(str(f)).items()})
    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.qkv_proj.weight",
                 "model.layers.1.self_attn.k_proj.weight", "model.norm.weight"):
        assert torch.equal(state[name], source[name]), name
    assert torch.equal(state["model.layers.2.mlp.gate.weight"], source["model.layers.2.block_sparse_moe.gate.weight"])
    e = "model.layers.3.block_sparse_moe.experts.1."
    assert torch.equal(state["model.layers.3.mlp.experts.gate_up_proj"][1],
                       torch.cat([source[e + "w1.weight"], source[e + "w3.weight"]]))
    assert torch.equal(state["model.layers.3.mlp.experts.down_proj"][1], source[e + "w2.weight"])

    # logits: finite, the right shape, and the same on a second run and a second load
    tokens = torch.randint(0, model.config.vocab_size, (2, 40), generator=torch.Generator().manual_seed(0))
    model.eval()
    with torch.no_grad():
        first = model(input_ids=tokens, use_cache=False).logits
        second = model(input_ids=tokens, use_cache=False).logits
    assert first.shape == (2, 40, model.config.vocab_size)
    assert torch.isfinite(first).all()
    assert first.std() > 0.1
    assert torch.equal(first, second)
    again = MiniMaxForCausalLM.from_pretrained(out_hf, dtype=torch.float32).eval()
    with torch.no_grad():
        assert torch.equal(again(input_ids=tokens, use_cache=False).logits, first)
