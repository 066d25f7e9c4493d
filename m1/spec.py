"""The M1 tensor table: every tensor of a MiniMax-M1 checkpoint, as data.

Each rule is a name pattern with `{layer}` / `{expert}` holes, the layer kinds it appears in, a role,
a shape written in the dimension names of `M1Config.dims()`, and the dtype the release stores it in.
`inventory(cfg)` expands the table for a config; `classify(name)` maps a name back to its rule. A name
that maps to nothing is an `UnknownTensorError`, never a skip.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from functools import lru_cache

from m1.config import M1Config
from m1.dtypes import DTYPE_BYTES
from m1.errors import UnknownTensorError
from m1.tensors import EXPERT, GLOBAL, LIGHTNING, M1_TENSORS, SOFTMAX, Role, TensorRule, name_pattern

__all__ = ["M1_TENSORS", "Role", "TensorRule", "TensorSpec", "Classified", "classify", "inventory", "spec_by_name"]


@dataclass(frozen=True)
class TensorSpec:
    name: str
    shape: tuple[int, ...]
    dtype: str
    role: Role
    layer: int | None = None
    expert: int | None = None

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * DTYPE_BYTES[self.dtype]


def _expand(rule: TensorRule, cfg: M1Config, dims: dict[str, int], layer: int | None, expert: int | None) -> TensorSpec:
    name = rule.pattern.format(layer=layer, expert=expert)
    return TensorSpec(name, tuple(dims[d] for d in rule.shape), rule.dtype, rule.role, layer, expert)


def inventory(cfg: M1Config) -> list[TensorSpec]:
    """Every tensor a checkpoint with this config holds, in release order."""
    dims = cfg.dims()
    head = [r for r in M1_TENSORS if r.scope == GLOBAL and r.role == Role.EMBED]
    tail = [r for r in M1_TENSORS if r.scope == GLOBAL and r.role != Role.EMBED]
    per_layer = [r for r in M1_TENSORS if r.scope != GLOBAL]
    out = [_expand(r, cfg, dims, None, None) for r in head]
    for layer, kind in enumerate(cfg.layer_kinds):
        for rule in per_layer:
            if rule.scope == EXPERT:
                continue
            if rule.scope in (LIGHTNING, SOFTMAX) and rule.scope != kind:
                continue
            out.append(_expand(rule, cfg, dims, layer, None))
            if rule.role == Role.ROUTER:  # experts follow the router, expert by expert
                experts = [r for r in per_layer if r.scope == EXPERT]
                for expert in range(cfg.num_local_experts):
                    out.extend(_expand(r, cfg, dims, layer, expert) for r in experts)
    out.extend(_expand(r, cfg, dims, None, None) for r in tail if not (r.role == Role.HEAD and cfg.tie_word_embeddings))
    return out


@lru_cache(maxsize=1)
def _compiled() -> tuple[tuple[re.Pattern[str], TensorRule], ...]:
    return tuple((name_pattern(rule.pattern), rule) for rule in M1_TENSORS)


@dataclass(frozen=True)
class Classified:
    rule: TensorRule
    layer: int | None
    expert: int | None
    weight_name: str  # the spec tensor this name is, or accompanies
    companion: str | None = None  # the scheme's suffix when this is a quantization companion (m1.schemes)


def classify(name: str, file: str | None = None) -> Classified:
    """Which spec tensor `name` is (or which quantized weight it accompanies)."""
    found = _match(name)
    if found is not None:
        return found
    from m1.schemes import companion_suffixes

    for suffix in companion_suffixes():
        if name.endswith("." + suffix):
            weight = name[: -len(suffix) - 1] + ".weight"
            base = _match(weight)
            if base is not None:
                return Classified(base.rule, base.layer, base.expert, weight, suffix)
    raise UnknownTensorError(
        "not a MiniMax-M1 tensor name", file=file, tensor=name,
        hint="the checkpoint has a tensor the M1 spec does not know; remove it or check the source model",
    )


def _match(name: str) -> Classified | None:
    for rx, rule in _compiled():
        m = rx.match(name)
        if m:
            groups = m.groupdict()
            layer = int(groups["layer"]) if "layer" in groups else None
            expert = int(groups["expert"]) if "expert" in groups else None
            return Classified(rule, layer, expert, name)
    return None


def spec_by_name(cfg: M1Config) -> dict[str, TensorSpec]:
    return {t.name: t for t in inventory(cfg)}
