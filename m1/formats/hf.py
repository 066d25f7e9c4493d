"""The hf format: transformers' native `minimax` (`layer_types`, `*_alpha_factor`, `block_size`), with
the same tensor names as the release; only config.json differs."""

from __future__ import annotations

from typing import Any

from m1.errors import ConfigError
from m1.formats.base import ConfigView, Format, identity_table
from m1.formats.tensor_plan import OPTIONS, make_options, plan_by_tensor

MODEL_TYPE = "minimax"
ARCHITECTURE = "MiniMaxForCausalLM"
NORM_FACTOR_KEYS = {
    "full_attn_alpha": "full_attn_alpha_factor",
    "full_attn_beta": "full_attn_beta_factor",
    "linear_attn_alpha": "linear_attn_alpha_factor",
    "linear_attn_beta": "linear_attn_beta_factor",
    "mlp_alpha": "mlp_alpha_factor",
    "mlp_beta": "mlp_beta_factor",
}
KIND_NAMES = {"linear_attention": "lightning", "full_attention": "softmax"}
CONFIG_KEYS = ("layer_types", "block_size", *NORM_FACTOR_KEYS.values())


def read_config(raw: dict[str, Any], source: str) -> dict[str, Any]:
    names = raw.get("layer_types")
    if not isinstance(names, list) or any(not isinstance(n, str) or n not in KIND_NAMES for n in names):
        raise ConfigError("layer_types must list 'linear_attention' and 'full_attention'", file=source)
    for theirs in NORM_FACTOR_KEYS.values():
        value = raw.get(theirs)
        if not isinstance(value, (int, float)) or isinstance(value, bool):
            raise ConfigError(f"{theirs} must be a number, got {value!r}", file=source)
    return {"layer_kinds": tuple(KIND_NAMES[n] for n in names),
            **{ours: raw.get(theirs) for ours, theirs in NORM_FACTOR_KEYS.items()},
            "postnorm": raw.get("postnorm", True), "block_size": raw.get("block_size", 256)}


def write_config(cfg: ConfigView, out: dict[str, Any]) -> None:
    out["model_type"] = MODEL_TYPE
    out["architectures"] = [ARCHITECTURE]
    out["layer_types"] = ["linear_attention" if k == "lightning" else "full_attention" for k in cfg.layer_kinds]
    out.update({theirs: getattr(cfg, ours) for ours, theirs in NORM_FACTOR_KEYS.items()})
    out["block_size"] = cfg.block_size
    out["postnorm"] = cfg.postnorm
    # transformers ignores rotary_dim (it rotates all head dims); kept so nothing is lost.
    out["rotary_dim"] = cfg.rotary_dim


def rotary_warnings(cfg: ConfigView) -> list[str]:
    """transformers' MiniMax rotates every head dim; the release rotates only rotary_dim of them."""
    if cfg.rotary_dim < cfg.head_dim and "softmax" in cfg.layer_kinds:
        n = cfg.layer_kinds.count("softmax")
        return [f"rotary_dim={cfg.rotary_dim} < head_dim={cfg.head_dim}: transformers' MiniMax ignores rotary_dim "
                f"and rotates all {cfg.head_dim} dims, so its {n} softmax-attention layers (of "
                f"{cfg.num_hidden_layers}) differ from the release; use m1's verify engine or the release code "
                "for exact outputs"]
    return []


FORMAT = Format(
    name="hf",
    description="transformers' native MiniMaxForCausalLM layout",
    model_types=(MODEL_TYPE,),
    claims=lambda raw: raw.get("model_type") == MODEL_TYPE,
    read_config=read_config,
    write_config=write_config,
    config_keys=CONFIG_KEYS,
    names=identity_table(),
    plan_ops=plan_by_tensor,
    options=OPTIONS,
    make_options=make_options,
    extra_file=lambda name: not name.endswith(".py"),  # the release's remote code does not belong here
    warnings=rotary_warnings,
)
