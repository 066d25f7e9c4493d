"""GGUF metadata of a MiniMax-M1 for llama.cpp's `minimax-01`, as data: a list of `KV` from an `M1Config`.

`model_metadata(cfg)` refuses, with one `UsageError` line, the configs that llama.cpp's `minimax-01`
graph cannot compute as the release does (it hard-codes postnorm residuals with one scale, betas of 1,
the power-of-two ALiBi slope recipe, SiLU experts with softmax top-k routing renormalised over the k).
`apply(writer, kvs)` puts a list of KVs on a `gguf.GGUFWriter`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from gguf import GGUFValueType

from m1.config import M1Config
from m1.errors import UsageError
from m1.gguf.names import ARCH

A = ARCH + "."


@dataclass(frozen=True)
class KV:
    key: str
    value: Any
    type: GGUFValueType
    sub_type: GGUFValueType | None = None  # element type of an ARRAY

    def __post_init__(self) -> None:
        if self.type == GGUFValueType.ARRAY and self.sub_type is None:
            raise ValueError(f"{self.key}: an array needs its element type")


def u32(key: str, value: int) -> KV:
    return KV(key, int(value), GGUFValueType.UINT32)


def f32(key: str, value: float) -> KV:
    return KV(key, float(value), GGUFValueType.FLOAT32)


def string(key: str, value: str) -> KV:
    return KV(key, value, GGUFValueType.STRING)


def array(key: str, values: Iterable[Any], sub_type: GGUFValueType) -> KV:
    return KV(key, list(values), GGUFValueType.ARRAY, sub_type)


def check_runnable(cfg: M1Config, source: str = "config.json") -> None:
    """Raise UsageError unless llama.cpp's minimax-01 computes this config as the release does."""

    def refuse(why: str, hint: str) -> None:
        raise UsageError(f"llama.cpp's {ARCH} cannot run this model: {why}", file=source, hint=hint)

    alphas = (cfg.full_attn_alpha, cfg.linear_attn_alpha, cfg.mlp_alpha)
    betas = (cfg.full_attn_beta, cfg.linear_attn_beta, cfg.mlp_beta)
    if len(set(alphas)) != 1:
        refuse(f"the residual alphas differ (full attention {alphas[0]}, lightning {alphas[1]}, mlp {alphas[2]})",
               "it has one residual_scale for all three; only configs with equal layernorm_*_alpha export")
    if any(b != 1.0 for b in betas):
        refuse(f"a residual beta is not 1.0 (full attention {betas[0]}, lightning {betas[1]}, mlp {betas[2]})",
               "its graph adds the block output unscaled; only layernorm_*_beta = 1.0 exports")
    if not cfg.postnorm:
        refuse("postnorm is false", "its graph carries the normed input on the residual branch (postnorm) only")
    kinds = set(cfg.layer_kinds)
    if len(kinds) == 1:
        refuse(f"every layer is {kinds.pop()}",
               "its hybrid memory needs at least one lightning and one softmax layer (it aborts on an empty cache "
               "buffer otherwise)")
    heads = cfg.num_attention_heads
    if "lightning" in cfg.layer_kinds:
        if heads & (heads - 1):
            refuse(f"{heads} attention heads is not a power of two",
                   "its lightning decay slopes follow ALiBi's power-of-two recipe only")
        if cfg.num_hidden_layers < 2:
            refuse("one layer", "its lightning slope scale divides by num_hidden_layers - 1")
    act = cfg.raw.get("hidden_act", "silu")
    if act != "silu":
        refuse(f"hidden_act is {act!r}", "its MoE experts are SwiGLU with SiLU")
    if cfg.raw.get("shared_intermediate_size", 0):
        refuse("shared experts (shared_intermediate_size > 0)", "MiniMax-M1 has none; this is another model")
    scaling = cfg.raw.get("rope_scaling")
    if scaling:
        refuse(f"rope_scaling {scaling!r}", "the exporter writes plain RoPE only")


def size_label(cfg: M1Config) -> str:
    """`general.size_label` as llama.cpp's converter computes it (GGUFWriter.get_total_parameter_count, then
    gguf.size_label): "{experts}x{shared + one expert's params, rounded}" for an MoE, e.g. 32x15B for M1."""
    import gguf

    from m1.spec import Role, inventory

    total = expert = 0
    for spec in inventory(cfg):
        n = math.prod(spec.shape)
        total += n
        if spec.role == Role.EXPERT:  # one expert's slice of a stacked ffn_*_exps tensor
            expert += n
    experts = cfg.num_local_experts
    return gguf.size_label(total, total - expert, expert // experts, experts)


def model_metadata(cfg: M1Config, *, name: str | None = None, file_type: int | None = None,
                   source: str = "config.json") -> list[KV]:
    """The `general.*` and `minimax-01.*` keys for `cfg` (checked with `check_runnable` first). The general keys
    are those llama.cpp's convert_hf_to_gguf.py writes (general.type "model", the name, the size label, the file
    type, the quantization version: it writes GGML_QUANT_VERSION for float files too, and llama-quantize sets it)."""
    from gguf import GGML_QUANT_VERSION

    check_runnable(cfg, source)
    kvs = [string("general.type", "model")]
    if name:
        kvs.append(string("general.name", name))
    kvs.append(string("general.size_label", size_label(cfg)))
    if file_type is not None:
        kvs.append(u32("general.file_type", file_type))
    kvs.append(u32("general.quantization_version", GGML_QUANT_VERSION))
    context = cfg.raw.get("max_position_embeddings") or 4096
    kvs += [
        u32(A + "block_count", cfg.num_hidden_layers),
        u32(A + "context_length", context),
        u32(A + "embedding_length", cfg.hidden_size),
        u32(A + "feed_forward_length", cfg.intermediate_size),
        u32(A + "attention.head_count", cfg.num_attention_heads),
        u32(A + "attention.head_count_kv", cfg.num_key_value_heads),
        u32(A + "attention.key_length", cfg.head_dim),
        u32(A + "attention.value_length", cfg.head_dim),
        f32(A + "rope.freq_base", cfg.rope_theta),
        u32(A + "rope.dimension_count", cfg.rotary_dim),
        f32(A + "attention.layer_norm_rms_epsilon", cfg.rms_norm_eps),
        u32(A + "expert_count", cfg.num_local_experts),
        u32(A + "expert_used_count", cfg.num_experts_per_tok),
        f32(A + "residual_scale", cfg.mlp_alpha),
        # Written explicitly: without it llama.cpp assumes a softmax layer every 8th, wrong for other patterns.
        array(A + "attention.recurrent_layers", (k == "lightning" for k in cfg.layer_kinds), GGUFValueType.BOOL),
        u32(A + "vocab_size", cfg.vocab_size),
    ]
    for kv in kvs:
        if kv.type == GGUFValueType.FLOAT32 and not math.isfinite(kv.value):
            raise UsageError(f"{kv.key} is {kv.value}", file=source)
    return kvs


def apply(writer: Any, kvs: Iterable[KV]) -> None:
    """Add each KV to a gguf.GGUFWriter (arrays with their element type, so an empty one is kept too)."""
    for kv in kvs:
        writer.add_key_value(kv.key, kv.value, kv.type, sub_type=kv.sub_type)
