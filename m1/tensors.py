"""The M1 tensor table as pure data: every tensor of a MiniMax-M1 checkpoint, by name pattern.

Each rule is a name pattern with `{layer}` / `{expert}` holes, the layer kinds it appears in, a role,
a shape written in the dimension names of `M1Config.dims()`, and the dtype the release stores it in.
`m1.spec` expands it for a config; the formats' name tables map their names onto these patterns.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import Enum
from functools import cache


class Role(str, Enum):
    EMBED = "embed"
    HEAD = "head"
    FINAL_NORM = "final_norm"
    LAYER_NORM = "layer_norm"
    LIGHTNING_QKV = "lightning_qkv"
    LIGHTNING_GATE = "lightning_gate"
    LIGHTNING_OUT = "lightning_out"
    LIGHTNING_NORM = "lightning_norm"
    SOFTMAX_ATTN = "softmax_attn"
    ROUTER = "router"
    EXPERT = "expert"


# Scope: which part of the model a rule repeats over.
GLOBAL, EVERY_LAYER, LIGHTNING, SOFTMAX, EXPERT = "global", "layer", "lightning", "softmax", "expert"


@dataclass(frozen=True)
class TensorRule:
    pattern: str
    role: Role
    scope: str
    shape: tuple[str, ...]
    dtype: str = "BF16"  # safetensors dtype name as the release stores it


L = "model.layers.{layer}."
E = L + "block_sparse_moe.experts.{expert}."

# Order within a layer follows the release index.
M1_TENSORS: tuple[TensorRule, ...] = (
    TensorRule("model.embed_tokens.weight", Role.EMBED, GLOBAL, ("vocab", "hidden")),
    TensorRule(L + "input_layernorm.weight", Role.LAYER_NORM, EVERY_LAYER, ("hidden",)),
    TensorRule(L + "self_attn.qkv_proj.weight", Role.LIGHTNING_QKV, LIGHTNING, ("qkv", "hidden")),
    TensorRule(L + "self_attn.output_gate.weight", Role.LIGHTNING_GATE, LIGHTNING, ("attn", "hidden")),
    TensorRule(L + "self_attn.norm.weight", Role.LIGHTNING_NORM, LIGHTNING, ("attn",)),
    TensorRule(L + "self_attn.out_proj.weight", Role.LIGHTNING_OUT, LIGHTNING, ("hidden", "attn")),
    TensorRule(L + "self_attn.q_proj.weight", Role.SOFTMAX_ATTN, SOFTMAX, ("attn", "hidden")),
    TensorRule(L + "self_attn.k_proj.weight", Role.SOFTMAX_ATTN, SOFTMAX, ("kv", "hidden")),
    TensorRule(L + "self_attn.v_proj.weight", Role.SOFTMAX_ATTN, SOFTMAX, ("kv", "hidden")),
    TensorRule(L + "self_attn.o_proj.weight", Role.SOFTMAX_ATTN, SOFTMAX, ("hidden", "attn")),
    TensorRule(L + "post_attention_layernorm.weight", Role.LAYER_NORM, EVERY_LAYER, ("hidden",)),
    # The router is stored in float32 in the release (31457280 bytes above all-bf16).
    TensorRule(L + "block_sparse_moe.gate.weight", Role.ROUTER, EVERY_LAYER, ("experts", "hidden"), "F32"),
    TensorRule(E + "w1.weight", Role.EXPERT, EXPERT, ("inter", "hidden")),
    TensorRule(E + "w3.weight", Role.EXPERT, EXPERT, ("inter", "hidden")),
    TensorRule(E + "w2.weight", Role.EXPERT, EXPERT, ("hidden", "inter")),
    TensorRule("model.norm.weight", Role.FINAL_NORM, GLOBAL, ("hidden",)),
    TensorRule("lm_head.weight", Role.HEAD, GLOBAL, ("vocab", "hidden")),
)


@cache
def name_pattern(pattern: str) -> re.Pattern[str]:
    """The regex of a name pattern: `{layer}` and `{expert}` become the named groups `layer` and `expert`, the
    rest matches literally and the whole name must match (the one compiler every name table uses)."""
    rx = re.escape(pattern).replace(r"\{layer\}", r"(?P<layer>\d+)").replace(r"\{expert\}", r"(?P<expert>\d+)")
    return re.compile(rx + r"\Z")
