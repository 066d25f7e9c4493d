"""`M1Config`: one typed view of the two config.json flavours of MiniMax-M1.

- release: what MiniMax ships (`minimax_m1` / `minimax_text_01`, remote code, `attn_type_list`,
  `layernorm_*_alpha/beta`).
- hf: transformers' native `minimax` (`layer_types`, `*_alpha_factor`, `block_size`).

The tensor names are the same in both; only config.json differs. Unknown keys are preserved so a
round trip release -> hf -> release gives back an equivalent file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from m1.errors import ConfigError

Flavour = Literal["release", "hf"]
LayerKind = Literal["lightning", "softmax"]

RELEASE_MODEL_TYPES = {
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
HF_MODEL_TYPE = "minimax"
HF_ARCHITECTURE = "MiniMaxForCausalLM"

# release key -> hf key, for the residual scaling of each block type.
NORM_FACTOR_KEYS = {
    "layernorm_full_attention_alpha": "full_attn_alpha_factor",
    "layernorm_full_attention_beta": "full_attn_beta_factor",
    "layernorm_linear_attention_alpha": "linear_attn_alpha_factor",
    "layernorm_linear_attention_beta": "linear_attn_beta_factor",
    "layernorm_mlp_alpha": "mlp_alpha_factor",
    "layernorm_mlp_beta": "mlp_beta_factor",
}
RELEASE_KIND_CODES = {0: "lightning", 1: "softmax"}
HF_KIND_NAMES = {"linear_attention": "lightning", "full_attention": "softmax"}

REQUIRED_INT_KEYS = (
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "num_local_experts",
    "num_experts_per_tok",
    "vocab_size",
)


@dataclass(frozen=True)
class M1Config:
    flavour: Flavour
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    num_key_value_heads: int
    head_dim: int
    num_local_experts: int
    num_experts_per_tok: int
    vocab_size: int
    rotary_dim: int
    rope_theta: float
    rms_norm_eps: float
    layer_kinds: tuple[LayerKind, ...]
    # residual scaling (postnorm): x = alpha * norm(x) + beta * block(norm(x))
    full_attn_alpha: float
    full_attn_beta: float
    linear_attn_alpha: float
    linear_attn_beta: float
    mlp_alpha: float
    mlp_beta: float
    postnorm: bool
    block_size: int
    tie_word_embeddings: bool
    raw: dict[str, Any] = field(repr=False, compare=False, hash=False)

    # ---- derived dimensions used by the tensor table -------------------------------------------
    def dims(self) -> dict[str, int]:
        return {
            "vocab": self.vocab_size,
            "hidden": self.hidden_size,
            "inter": self.intermediate_size,
            "experts": self.num_local_experts,
            "attn": self.num_attention_heads * self.head_dim,
            "qkv": 3 * self.num_attention_heads * self.head_dim,
            "kv": self.num_key_value_heads * self.head_dim,
        }

    @property
    def quantization_config(self) -> dict[str, Any] | None:
        return self.raw.get("quantization_config")

    def layer_kind(self, layer: int) -> LayerKind:
        return self.layer_kinds[layer]

    # ---- reading ---------------------------------------------------------------------------------
    @classmethod
    def from_file(cls, path: str | Path) -> M1Config:
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
        except FileNotFoundError:
            raise ConfigError("config.json not found", file=str(path), hint="point at a checkpoint directory") from None
        except json.JSONDecodeError as exc:
            raise ConfigError(f"not valid JSON ({exc.msg} at line {exc.lineno})", file=str(path)) from None
        return cls.from_dict(raw, source=str(path))

    @classmethod
    def from_dict(cls, raw: dict[str, Any], source: str = "config.json") -> M1Config:
        if not isinstance(raw, dict):
            raise ConfigError("config is not a JSON object", file=source)
        model_type = raw.get("model_type")
        if model_type in RELEASE_MODEL_TYPES:
            flavour: Flavour = "release"
        elif model_type == HF_MODEL_TYPE:
            flavour = "hf"
        else:
            raise ConfigError(
                f"model_type {model_type!r} is neither the MiniMax-M1 release flavour (minimax_m1, minimax_text_01) "
                "nor the Hugging Face flavour (minimax)",
                file=source,
                hint="is this a MiniMax-M1 checkpoint?",
            )
        for key in REQUIRED_INT_KEYS:
            value = raw.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}", file=source)
        n_layers = raw["num_hidden_layers"]
        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads

        if flavour == "release":
            codes = raw.get("attn_type_list")
            if not isinstance(codes, list) or any(c not in RELEASE_KIND_CODES for c in codes):
                raise ConfigError("attn_type_list must be a list of 0 (lightning) and 1 (softmax)", file=source)
            kinds = tuple(RELEASE_KIND_CODES[c] for c in codes)
            factors = {k: raw.get(k) for k in NORM_FACTOR_KEYS}
        else:
            names = raw.get("layer_types")
            if not isinstance(names, list) or any(n not in HF_KIND_NAMES for n in names):
                raise ConfigError("layer_types must list 'linear_attention' and 'full_attention'", file=source)
            kinds = tuple(HF_KIND_NAMES[n] for n in names)
            factors = {k: raw.get(v) for k, v in NORM_FACTOR_KEYS.items()}
        if len(kinds) != n_layers:
            raise ConfigError(
                f"{len(kinds)} layer kinds listed for num_hidden_layers={n_layers}", file=source
            )
        for key, value in factors.items():
            if not isinstance(value, (int, float)):
                raise ConfigError(f"{key} (or its hf name) must be a number, got {value!r}", file=source)
        if heads % raw["num_key_value_heads"]:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads", file=source)
        rotary_dim = raw.get("rotary_dim", head_dim)
        if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim > head_dim or rotary_dim % 2:
            raise ConfigError(f"rotary_dim must be an even integer in 2..head_dim={head_dim}, got {rotary_dim!r}",
                              file=source)
        if raw["num_experts_per_tok"] > raw["num_local_experts"]:
            raise ConfigError("num_experts_per_tok exceeds num_local_experts", file=source)

        return cls(
            flavour=flavour,
            model_type=model_type,
            hidden_size=raw["hidden_size"],
            intermediate_size=raw["intermediate_size"],
            num_hidden_layers=n_layers,
            num_attention_heads=heads,
            num_key_value_heads=raw["num_key_value_heads"],
            head_dim=head_dim,
            num_local_experts=raw["num_local_experts"],
            num_experts_per_tok=raw["num_experts_per_tok"],
            vocab_size=raw["vocab_size"],
            rotary_dim=rotary_dim,
            rope_theta=float(raw.get("rope_theta", 10000.0)),
            rms_norm_eps=float(raw.get("rms_norm_eps", 1e-5)),
            layer_kinds=kinds,
            full_attn_alpha=float(factors["layernorm_full_attention_alpha"]),
            full_attn_beta=float(factors["layernorm_full_attention_beta"]),
            linear_attn_alpha=float(factors["layernorm_linear_attention_alpha"]),
            linear_attn_beta=float(factors["layernorm_linear_attention_beta"]),
            mlp_alpha=float(factors["layernorm_mlp_alpha"]),
            mlp_beta=float(factors["layernorm_mlp_beta"]),
            postnorm=bool(raw.get("postnorm", flavour == "hf")),
            block_size=int(raw.get("block_size", 256)),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            raw=copy.deepcopy(raw),
        )

    # ---- writing ---------------------------------------------------------------------------------
    def to_dict(self, flavour: Flavour | None = None) -> dict[str, Any]:
        """The config.json for `flavour` (default: the one it was read as), unknown keys preserved."""
        flavour = flavour or self.flavour
        out = copy.deepcopy(self.raw)
        flavour_keys = ("attn_type_list", "layer_types", "auto_map", "block_size", *NORM_FACTOR_KEYS,
                        *NORM_FACTOR_KEYS.values())
        for key in flavour_keys:
            out.pop(key, None)
        factors = {
            "layernorm_full_attention_alpha": self.full_attn_alpha,
            "layernorm_full_attention_beta": self.full_attn_beta,
            "layernorm_linear_attention_alpha": self.linear_attn_alpha,
            "layernorm_linear_attention_beta": self.linear_attn_beta,
            "layernorm_mlp_alpha": self.mlp_alpha,
            "layernorm_mlp_beta": self.mlp_beta,
        }
        if flavour == "release":
            model_type = self.model_type if self.model_type in RELEASE_MODEL_TYPES else "minimax_m1"
            arch, auto_config, auto_model = RELEASE_MODEL_TYPES[model_type]
            out["model_type"] = model_type
            out["architectures"] = [arch]
            out["auto_map"] = {"AutoConfig": auto_config, "AutoModelForCausalLM": auto_model}
            out["attn_type_list"] = [0 if k == "lightning" else 1 for k in self.layer_kinds]
            out.update(factors)
            out["postnorm"] = self.postnorm
            if self.block_size != 256:  # the release code's default; keep any other value (make-tiny uses 16)
                out["block_size"] = self.block_size
        else:
            out["model_type"] = HF_MODEL_TYPE
            out["architectures"] = [HF_ARCHITECTURE]
            out["layer_types"] = [
                "linear_attention" if k == "lightning" else "full_attention" for k in self.layer_kinds
            ]
            out.update({NORM_FACTOR_KEYS[k]: v for k, v in factors.items()})
            out["block_size"] = self.block_size
            out["postnorm"] = self.postnorm
            # transformers ignores rotary_dim (it rotates all head dims); kept so nothing is lost.
            out["rotary_dim"] = self.rotary_dim
        out["head_dim"] = self.head_dim
        return out

    def with_raw(self, **updates: Any) -> M1Config:
        """A copy whose raw config has `updates` applied (None deletes a key), e.g. quantization_config."""
        raw = copy.deepcopy(self.raw)
        for key, value in updates.items():
            if value is None:
                raw.pop(key, None)
            else:
                raw[key] = value
        return dataclasses.replace(self, raw=raw)
