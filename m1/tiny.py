"""`m1 make-tiny`: a small random M1 in the exact release layout, for tests and the demo.

Same tensor names, interleaved layer kinds (softmax every `softmax_every`-th layer, like layers
7, 15, ... 79 of the release), fp32 router, bf16 elsewhere, zero-based shard names and a layer's
tensors spread over several shards, as in the real index. Written with the safetensors library so
that our own reader is tested against files it did not write.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from m1.config import M1Config
from m1.spec import Role, inventory
from m1.writer import prepare_destination

BYTE_TOKENIZER_CONFIG = {"tokenizer_class": "m1-bytes", "m1_byte_level": True, "model_max_length": 1 << 20}


@dataclass(frozen=True)
class TinySpec:
    layers: int = 4
    hidden: int = 64
    heads: int = 4
    kv_heads: int = 2
    head_dim: int = 16
    rotary_dim: int = 8
    intermediate: int = 96
    experts: int = 4
    top_k: int = 2
    vocab: int = 256
    softmax_every: int = 4
    block_size: int = 16
    shards: int = 3
    seed: int = 0


def tiny_config(spec: TinySpec) -> dict[str, Any]:
    kinds = [1 if (i + 1) % spec.softmax_every == 0 else 0 for i in range(spec.layers)]
    alpha = (2 * spec.layers) ** 0.25
    return {
        "architectures": ["MiniMaxM1ForCausalLM"],
        "attention_dropout": 0.0,
        "attn_type_list": kinds,
        "auto_map": {
            "AutoConfig": "configuration_minimax_m1.MiniMaxM1Config",
            "AutoModelForCausalLM": "modeling_minimax_m1.MiniMaxM1ForCausalLM",
        },
        "bos_token_id": None,
        "eos_token_id": None,
        "head_dim": spec.head_dim,
        "hidden_act": "silu",
        "hidden_size": spec.hidden,
        "initializer_range": 0.02,
        "intermediate_size": spec.intermediate,
        "layernorm_full_attention_alpha": alpha,
        "layernorm_full_attention_beta": 1.0,
        "layernorm_linear_attention_alpha": alpha,
        "layernorm_linear_attention_beta": 1.0,
        "layernorm_mlp_alpha": alpha,
        "layernorm_mlp_beta": 1.0,
        "max_position_embeddings": 4096,
        "model_type": "minimax_m1",
        "num_attention_heads": spec.heads,
        "num_experts_per_tok": spec.top_k,
        "num_hidden_layers": spec.layers,
        "num_key_value_heads": spec.kv_heads,
        "num_local_experts": spec.experts,
        "output_router_logits": False,
        "postnorm": True,
        "rms_norm_eps": 1e-05,
        "rope_theta": 10000000,
        "rotary_dim": spec.rotary_dim,
        "block_size": spec.block_size,
        "router_aux_loss_coef": 0.001,
        "router_jitter_noise": 0.0,
        "shared_intermediate_size": 0,
        "shared_moe_mode": "sigmoid",
        "sliding_window": None,
        "tie_word_embeddings": False,
        "transformers_version": "4.45.2",
        "use_cache": True,
        "vocab_size": spec.vocab,
    }


def random_weights(cfg: M1Config, seed: int = 0) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    out: dict[str, torch.Tensor] = {}
    for t in inventory(cfg):
        if t.role in (Role.LAYER_NORM, Role.FINAL_NORM, Role.LIGHTNING_NORM):
            value = 1.0 + 0.1 * torch.randn(t.shape, generator=gen)
        else:
            value = torch.randn(t.shape, generator=gen) / math.sqrt(t.shape[-1])
        out[t.name] = value.to(torch.float32 if t.dtype == "F32" else torch.bfloat16)
    return out


def save_release(dest: Path, config: dict[str, Any], weights: dict[str, torch.Tensor], shards: int,
                 tokenizer_config: dict[str, Any] | None = None) -> None:
    """Save in the release layout: zero-based shard names, tensors dealt round-robin over shards."""
    names = list(weights)
    n = max(1, min(shards, len(names)))
    files = [f"model-{i:05d}-of-{n:05d}.safetensors" for i in range(n)]
    weight_map = {name: files[i % n] for i, name in enumerate(names)}
    for file in files:
        part = {k: weights[k].contiguous() for k in names if weight_map[k] == file}
        save_file(part, str(dest / file), metadata={"format": "pt"})
    total = sum(w.numel() * w.element_size() for w in weights.values())
    (dest / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2) + "\n"
    )
    (dest / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (dest / "tokenizer_config.json").write_text(json.dumps(tokenizer_config or BYTE_TOKENIZER_CONFIG, indent=2) + "\n")
    (dest / "generation_config.json").write_text(json.dumps({"do_sample": False, "max_new_tokens": 64}) + "\n")


def make_tiny(dest: Path, spec: TinySpec = TinySpec(), overwrite: bool = False) -> M1Config:
    raw = tiny_config(spec)
    cfg = M1Config.from_dict(raw, source="make-tiny")
    prepare_destination(dest, resume=False, overwrite=overwrite)
    save_release(dest, raw, random_weights(cfg, spec.seed), spec.shards)
    return cfg
