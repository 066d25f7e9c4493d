"""The tensor groups of a measured mix: which weights take one candidate together, as data from the spec.

Per layer: the experts' gate and up projections (`w13`: w1 + w3, one stacked tensor each in a format that
stacks experts), their down projections (`w2`), and the layer's attention projections (`attn`: qkv, gate and
out of a lightning layer, q, k, v and o of a softmax layer, by the spec's roles). Global: the embedding
(`embed`) and the head (`head`; none when tied to the embedding). Norms and the router are in no group: they
are never quantized. Which parts a format's mix plans is the format's (`Format.mix_parts`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from m1.config import M1Config
from m1.errors import UsageError
from m1.tensors import GLOBAL, M1_TENSORS, Role

EXPERT_PARTS = ("w13", "w2")  # expert tensor groups of a layer
LAYER_PARTS = (*EXPERT_PARTS, "attn")
GLOBAL_PARTS = ("embed", "head")
ALL_PARTS = (*LAYER_PARTS, *GLOBAL_PARTS)
PART_WEIGHTS = {"w13": ("w1", "w3"), "w2": ("w2",)}
ATTN_ROLES = (Role.LIGHTNING_QKV, Role.LIGHTNING_GATE, Role.LIGHTNING_OUT, Role.SOFTMAX_ATTN)
GLOBAL_ROLES = {"embed": Role.EMBED, "head": Role.HEAD}
EXPERT = "block_sparse_moe.experts.{e}.{w}.weight"
PREFIX = "model.layers.{layer}."


@dataclass(frozen=True)
class Group:
    layer: int | None  # None: a global group (embed, head)
    part: str  # w13 | w2 | attn | embed | head

    @property
    def key(self) -> str:
        return self.part if self.layer is None else f"{self.layer}.{self.part}"

    @property
    def experts(self) -> bool:
        return self.part in EXPERT_PARTS

    def local_names(self, cfg: M1Config) -> list[str]:
        """The group's weights as a WeightSource gives them: relative to `model.layers.{layer}.` for a layer's
        group, full names for a global one."""
        if self.part in PART_WEIGHTS:
            return [EXPERT.format(e=e, w=w) for e in range(cfg.num_local_experts) for w in PART_WEIGHTS[self.part]]
        if self.part == "attn":
            assert self.layer is not None
            kind = cfg.layer_kinds[self.layer]
            return [r.pattern[len(PREFIX):] for r in M1_TENSORS if r.role in ATTN_ROLES and r.scope == kind]
        return [r.pattern for r in M1_TENSORS if r.scope == GLOBAL and r.role == GLOBAL_ROLES[self.part]]

    def weight_names(self, cfg: M1Config) -> list[str]:
        """Spec names (a safetensors recipe's keys)."""
        if self.layer is None:
            return self.local_names(cfg)
        return [PREFIX.format(layer=self.layer) + n for n in self.local_names(cfg)]

    def recipe_names(self, cfg: M1Config, fmt: str) -> list[str]:
        """A recipe's keys for the group in output format `fmt`: the spec names, or in a format that stacks
        experts its own names (the stacked tensors, one per weight kind, for the experts)."""
        from m1.formats import get_format

        form = get_format(fmt)
        if form.expert_stacks is None:
            return self.weight_names(cfg)
        if not self.experts:
            return [form.names.from_spec(n) for n in self.weight_names(cfg)]
        first = PREFIX.format(layer=self.layer) + EXPERT  # expert 0 names its stack
        return [form.expert_stacks.from_spec(first.format(e=0, w=w)) for w in PART_WEIGHTS[self.part]]


def groups_of(cfg: M1Config, parts: Sequence[str] = EXPERT_PARTS) -> list[Group]:
    """The groups of `parts`, in model order: the embedding, each layer's, the head."""
    for p in parts:
        if p not in ALL_PARTS:
            raise UsageError(f"unknown tensor group {p!r}", hint=f"use {', '.join(ALL_PARTS)}")
    out = [Group(None, "embed")] if "embed" in parts else []
    out += [Group(layer, p) for layer in range(cfg.num_hidden_layers) for p in LAYER_PARTS if p in parts]
    if "head" in parts and not cfg.tie_word_embeddings:
        out.append(Group(None, "head"))
    return out


_LAST_SPECS: list[tuple[M1Config, dict[str, Any]]] = []  # the last config's tensors: a mix asks 242 groups


def _specs(cfg: M1Config) -> dict[str, Any]:
    from m1.spec import spec_by_name

    if not _LAST_SPECS or _LAST_SPECS[0][0] is not cfg:
        _LAST_SPECS[:] = [(cfg, spec_by_name(cfg))]
    return _LAST_SPECS[0][1]


def group_params(cfg: M1Config, group: Group | str) -> int:
    """Parameters of one group (every expert's weights of that part; a str: an expert part, as before)."""
    if isinstance(group, str):
        group = Group(0, group)
    specs = _specs(cfg)
    return sum(math.prod(specs[n].shape) for n in group.weight_names(cfg))


def active_params(cfg: M1Config, group: Group) -> int:
    """Parameters one token goes through: top-k of the experts, every attention and head weight, one row of
    the embedding (the stated prior's weight of a group)."""
    n = group_params(cfg, group)
    if group.experts:
        return n * cfg.num_experts_per_tok // cfg.num_local_experts
    if group.part == "embed":
        return cfg.hidden_size
    return n
