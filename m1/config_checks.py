"""Sanity checks on the values of a config.json, before anything is computed or expanded from them.

`M1Config.from_dict` calls `check_config_values` first: each key m1 reads must have the JSON type it
stands for (an integer is not a float, a string or a boolean; a number is finite) and the sizes stay
within generous but finite bounds, ten times MiniMax-M1's own (tests/data/m1-release/config.json), so
that a damaged or hostile config (num_local_experts 10**9) is a one-line ConfigError naming the file and
the key instead of a tensor table that fills the memory.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from m1.errors import ConfigError

# MiniMax-M1's values (the released config.json; block_size is the release code's default).
M1_SIZES = {
    "hidden_size": 6144,
    "intermediate_size": 9216,
    "num_hidden_layers": 80,
    "num_attention_heads": 64,
    "num_key_value_heads": 8,
    "num_local_experts": 32,
    "num_experts_per_tok": 2,
    "vocab_size": 200064,
    "head_dim": 128,
    "rotary_dim": 64,
    "block_size": 256,
}
BOUND_FACTOR = 10
# Upper bounds: ten times M1's; kv heads, top-k and rotary_dim share the bound of what they divide or
# may not exceed (from_dict checks that), and layers x experts bounds the tensor table itself.
MAX_SIZES = {key: BOUND_FACTOR * value for key, value in M1_SIZES.items()}
MAX_SIZES["num_key_value_heads"] = MAX_SIZES["num_attention_heads"]
MAX_SIZES["num_experts_per_tok"] = MAX_SIZES["num_local_experts"]
MAX_SIZES["rotary_dim"] = MAX_SIZES["head_dim"]
MAX_LAYER_EXPERTS = BOUND_FACTOR * M1_SIZES["num_hidden_layers"] * M1_SIZES["num_local_experts"]

REQUIRED_SIZES = ("hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                  "num_key_value_heads", "num_local_experts", "num_experts_per_tok", "vocab_size")
OPTIONAL_SIZES = ("head_dim", "rotary_dim", "block_size")  # absent (or head_dim null): a default applies
POSITIVE_NUMBERS = ("rope_theta", "rms_norm_eps")  # absent: a default applies; present: a finite number > 0
# The residual scaling factors, under their release and hf names: present, they must be finite numbers.
_BLOCKS = (("full_attention", "full_attn"), ("linear_attention", "linear_attn"), ("mlp", "mlp"))
FACTOR_KEYS = (*(f"layernorm_{release}_{ab}" for release, _ in _BLOCKS for ab in ("alpha", "beta")),
               *(f"{hf}_{ab}_factor" for _, hf in _BLOCKS for ab in ("alpha", "beta")))
BOOLEANS = ("postnorm", "tie_word_embeddings")


def _is_int(value: Any) -> bool:
    return type(value) is int  # JSON integers only: not bools, not 16.0, not "16"


def _is_number(value: Any) -> bool:
    return type(value) in (int, float)


def _shown(value: Any) -> str:
    """The value as config.json spells it (null, true, "16", 16.0), cut short."""
    text = json.dumps(value)
    return text if len(text) <= 40 else text[:37] + "..."


def check_config_values(raw: dict[str, Any], source: str = "config.json", names: Mapping[str, str] | None = None,
                        hint: str = "fix this value in config.json") -> None:
    """Raise a ConfigError naming `source` and the key for the first value m1 cannot use.

    `names`: how the source spells each key where it is not a config.json (a metadata key such as
    `minimax-01.expert_count` for num_local_experts), so that the error names what the user can find in the file."""
    name = (lambda key: key) if names is None else (lambda key: names.get(key, key))
    for key in (*REQUIRED_SIZES, *OPTIONAL_SIZES):
        if key not in raw or (key == "head_dim" and raw[key] is None):
            continue  # a missing required key is reported by from_dict
        value, bound = raw[key], MAX_SIZES[key]
        if not _is_int(value) or not 1 <= value <= bound:
            raise ConfigError(f"{name(key)} must be an integer from 1 to {bound}, got {_shown(value)} (m1 reads "
                              f"sizes up to {BOUND_FACTOR}x MiniMax-M1's)", file=source, hint=hint)
    layers, experts = raw.get("num_hidden_layers"), raw.get("num_local_experts")
    if _is_int(layers) and _is_int(experts) and layers * experts > MAX_LAYER_EXPERTS:
        raise ConfigError(f"{name('num_hidden_layers')} x {name('num_local_experts')} = {layers} x {experts} = "
                          f"{layers * experts} exceeds {MAX_LAYER_EXPERTS} ({BOUND_FACTOR}x MiniMax-M1's "
                          f"{M1_SIZES['num_hidden_layers']} x {M1_SIZES['num_local_experts']})", file=source,
                          hint=hint)
    hidden, heads = raw.get("hidden_size"), raw.get("num_attention_heads")
    if raw.get("head_dim") is None and _is_int(hidden) and _is_int(heads) and hidden < heads:
        raise ConfigError(f"{name('head_dim')} is not given and {name('hidden_size')} {hidden} // "
                          f"{name('num_attention_heads')} {heads} is 0", file=source, hint=f"give {name('head_dim')}")
    for key in POSITIVE_NUMBERS:
        if key in raw and not (_is_number(raw[key]) and math.isfinite(raw[key]) and raw[key] > 0):
            raise ConfigError(f"{name(key)} must be a finite number above 0, got {_shown(raw[key])}", file=source,
                              hint=hint)
    for key in FACTOR_KEYS:
        if key in raw and not (_is_number(raw[key]) and math.isfinite(raw[key])):
            raise ConfigError(f"{name(key)} must be a finite number, got {_shown(raw[key])}", file=source, hint=hint)
    for key in BOOLEANS:
        if key in raw and type(raw[key]) is not bool:
            raise ConfigError(f"{name(key)} must be true or false, got {_shown(raw[key])}", file=source, hint=hint)
    shared = raw.get("shared_intermediate_size")
    if shared is not None and not (_is_int(shared) and shared >= 0):
        raise ConfigError(f"shared_intermediate_size must be an integer >= 0, got {_shown(shared)}", file=source,
                          hint=hint)
    qconfig = raw.get("quantization_config")
    if qconfig is not None and not isinstance(qconfig, dict):
        raise ConfigError(f"quantization_config must be an object, got {_shown(qconfig)}", file=source,
                          hint="a quantized checkpoint's config.json holds the quantization settings as an object")
