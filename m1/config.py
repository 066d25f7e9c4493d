"""`M1Config`: one typed, format-neutral view of a MiniMax-M1 config.json.

What differs between formats (the release's `attn_type_list` and `layernorm_*_alpha/beta`, transformers'
`layer_types` and `*_alpha_factor`, ...) is read and written by the format modules in `m1.formats`; the
checks and fields here are common to all. Unknown keys are preserved, so a round trip release -> hf ->
release gives back an equivalent file.
"""

from __future__ import annotations

import copy
import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from m1.errors import ConfigError, UsageError

if TYPE_CHECKING:
    from m1.formats.base import Format

LayerKind = Literal["lightning", "softmax"]

FACTOR_FIELDS = ("full_attn_alpha", "full_attn_beta", "linear_attn_alpha", "linear_attn_beta", "mlp_alpha",
                 "mlp_beta")
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
    flavour: str  # the format it was read as (m1.formats): release, hf, ...
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
        from m1.formats import all_formats, format_of_config

        model_type = raw.get("model_type")
        fmt = format_of_config(raw)
        if fmt is None:
            known = "; ".join(f"{f.name}: {', '.join(f.model_types)}" for f in all_formats() if f.model_types)
            raise ConfigError(
                f"model_type {model_type!r} is neither of the MiniMax-M1 config formats m1 reads ({known})",
                file=source,
                hint="is this a MiniMax-M1 checkpoint?",
            )
        from m1.config_checks import check_config_values

        check_config_values(raw, source)  # types and bounds first: nothing below may expand a damaged value
        for key in REQUIRED_INT_KEYS:
            value = raw.get(key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise ConfigError(f"{key} must be a positive integer, got {value!r}", file=source)
        n_layers = raw["num_hidden_layers"]
        heads = raw["num_attention_heads"]
        head_dim = raw.get("head_dim") or raw["hidden_size"] // heads

        fields = fmt.read_config(raw, source)
        kinds = fields["layer_kinds"]
        if len(kinds) != n_layers:
            raise ConfigError(
                f"{len(kinds)} layer kinds listed for num_hidden_layers={n_layers}", file=source
            )
        for key in FACTOR_FIELDS:
            value = fields[key]
            if not isinstance(value, (int, float)) or isinstance(value, bool):
                raise ConfigError(f"{key} (its {fmt.name} key) must be a number, got {value!r}", file=source)
        if heads % raw["num_key_value_heads"]:
            raise ConfigError("num_attention_heads must be a multiple of num_key_value_heads", file=source)
        rotary_dim = raw.get("rotary_dim", head_dim)
        if not isinstance(rotary_dim, int) or rotary_dim <= 0 or rotary_dim > head_dim or rotary_dim % 2:
            raise ConfigError(f"rotary_dim must be an even integer in 2..head_dim={head_dim}, got {rotary_dim!r}",
                              file=source)
        if raw["num_experts_per_tok"] > raw["num_local_experts"]:
            raise ConfigError("num_experts_per_tok exceeds num_local_experts", file=source)

        return cls(
            flavour=fmt.name,
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
            **{key: float(fields[key]) for key in FACTOR_FIELDS},
            postnorm=bool(fields["postnorm"]),
            block_size=int(fields["block_size"]),
            tie_word_embeddings=bool(raw.get("tie_word_embeddings", False)),
            raw=copy.deepcopy(raw),
        )

    # ---- writing ---------------------------------------------------------------------------------
    def to_dict(self, flavour: str | Format | None = None) -> dict[str, Any]:
        """The config.json for format `flavour` (a config.json format's name, or a Format: a plan passes its
        output format; default: the one it was read as), unknown keys preserved."""
        from m1.formats import all_formats

        if flavour is None or isinstance(flavour, str):
            configs = {f.name: f for f in all_formats() if f.model_types}  # those that read a config.json
            fmt = configs.get(flavour or self.flavour)
            if fmt is None:
                raise UsageError(f"format {flavour or self.flavour!r} has no config.json",
                                 hint=f"use one of {', '.join(configs)}")
        else:
            fmt = flavour
        out = copy.deepcopy(self.raw)
        for other in all_formats():
            for key in other.config_keys:
                out.pop(key, None)
        fmt.write_config(self, out)
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
