"""The release format: what MiniMax ships (`minimax_m1` / `minimax_text_01`, remote code,
`attn_type_list`, `layernorm_*_alpha/beta`), in safetensors shards with the spec's own tensor names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from m1.errors import ConfigError
from m1.formats.base import ConfigView, Format, identity_table
from m1.formats.tensor_plan import OPTIONS, make_options, plan_by_tensor

MODEL_TYPES = {
    "minimax_m1": (
        "MiniMaxM1ForCausalLM",
        "configuration_minimax_m1.MiniMaxM1Config",
        "modeling_minimax_m1.MiniMaxM1ForCausalLM",
    ),
    "minimax_text_01": (
        "MiniMaxText01ForCausalLM",
        "configuration_minimax_text_01.MiniMaxText01Config",
        "modeling_minimax_text_01.MiniMaxText01ForCausalLM",
    ),
}
# The residual scaling of each block type, by M1Config field.
NORM_FACTOR_KEYS = {
    "full_attn_alpha": "layernorm_full_attention_alpha",
    "full_attn_beta": "layernorm_full_attention_beta",
    "linear_attn_alpha": "layernorm_linear_attention_alpha",
    "linear_attn_beta": "layernorm_linear_attention_beta",
    "mlp_alpha": "layernorm_mlp_alpha",
    "mlp_beta": "layernorm_mlp_beta",
}
KIND_CODES = {0: "lightning", 1: "softmax"}
DEFAULT_BLOCK_SIZE = 256  # the release code's default
CONFIG_KEYS = ("attn_type_list", "auto_map", "block_size", *NORM_FACTOR_KEYS.values())


def read_config(raw: dict[str, Any], source: str) -> dict[str, Any]:
    codes = raw.get("attn_type_list")
    if not isinstance(codes, list) or any(c not in KIND_CODES or isinstance(c, bool) for c in codes):
        raise ConfigError("attn_type_list must be a list of 0 (lightning) and 1 (softmax)", file=source)
    for theirs in NORM_FACTOR_KEYS.values():
        value = raw.get(theirs)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{theirs} must be a number, got {value!r}", file=source)
    return {"layer_kinds": tuple(KIND_CODES[c] for c in codes),
            **{ours: raw.get(theirs) for ours, theirs in NORM_FACTOR_KEYS.items()},
            "postnorm": raw.get("postnorm", False), "block_size": raw.get("block_size", DEFAULT_BLOCK_SIZE)}


def write_config(cfg: ConfigView, out: dict[str, Any]) -> None:
    model_type = cfg.model_type if cfg.model_type in MODEL_TYPES else "minimax_m1"
    arch, auto_config, auto_model = MODEL_TYPES[model_type]
    out["model_type"] = model_type
    out["architectures"] = [arch]
    out["auto_map"] = {"AutoConfig": auto_config, "AutoModelForCausalLM": auto_model}
    out["attn_type_list"] = [0 if k == "lightning" else 1 for k in cfg.layer_kinds]
    out.update({theirs: getattr(cfg, ours) for ours, theirs in NORM_FACTOR_KEYS.items()})
    out["postnorm"] = cfg.postnorm
    if cfg.block_size != DEFAULT_BLOCK_SIZE:  # keep any other value (make-tiny uses 16)
        out["block_size"] = cfg.block_size


# MiniMax's config.json lists its keys sorted; block_size, which it leaves to its code's default, follows
# rotary_dim. A config.json written from scratch (make-tiny's, one a format without a config.json of its own
# implies) takes this order (new_config); a converted one keeps its source's (M1Config.to_dict).
KEY_ORDER = (
    "architectures", "attention_dropout", "attn_type_list", "auto_map", "bos_token_id", "eos_token_id", "head_dim",
    "hidden_act", "hidden_size", "initializer_range", "intermediate_size", "layernorm_full_attention_alpha",
    "layernorm_full_attention_beta", "layernorm_linear_attention_alpha", "layernorm_linear_attention_beta",
    "layernorm_mlp_alpha", "layernorm_mlp_beta", "max_position_embeddings", "model_type", "num_attention_heads",
    "num_experts_per_tok", "num_hidden_layers", "num_key_value_heads", "num_local_experts", "output_router_logits",
    "postnorm", "rms_norm_eps", "rope_theta", "rotary_dim", "block_size", "router_aux_loss_coef",
    "router_jitter_noise", "shared_intermediate_size", "shared_moe_mode", "sliding_window", "tie_word_embeddings",
    "transformers_version", "use_cache", "vocab_size",
)


@dataclass(frozen=True)
class NewModel:
    """A ConfigView of a model that has no config.json yet: what write_config reads, for new_config."""

    layer_kinds: tuple[str, ...]
    head_dim: int
    rotary_dim: int
    full_attn_alpha: float
    linear_attn_alpha: float
    mlp_alpha: float
    full_attn_beta: float = 1.0
    linear_attn_beta: float = 1.0
    mlp_beta: float = 1.0
    postnorm: bool = True
    block_size: int = DEFAULT_BLOCK_SIZE
    model_type: str = "minimax_m1"

    @property
    def num_hidden_layers(self) -> int:
        return len(self.layer_kinds)


def new_config(model: NewModel, common: dict[str, Any]) -> dict[str, Any]:
    """A release config.json written from scratch: `common` (the keys no format owns) and this format's own
    (write_config), in KEY_ORDER; a key it does not list follows, in the order given."""
    out = dict(common)
    write_config(model, out)
    rank = {key: i for i, key in enumerate(KEY_ORDER)}
    return dict(sorted(out.items(), key=lambda item: rank.get(item[0], len(rank))))


FORMAT = Format(
    name="release",
    description="MiniMax's release layout (remote code, minimax_m1)",
    model_types=tuple(MODEL_TYPES),
    claims=lambda raw: raw.get("model_type") in MODEL_TYPES,
    read_config=read_config,
    write_config=write_config,
    config_keys=CONFIG_KEYS,
    names=identity_table(),
    plan_ops=plan_by_tensor,
    options=OPTIONS,
    make_options=make_options,
)
