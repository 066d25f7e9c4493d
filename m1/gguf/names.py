"""The GGUF name table of MiniMax-M1 (llama.cpp architecture `minimax-01`), as data.

Like gguf-py's `tensor_mapping`: each row pairs a spec tensor pattern (m1.spec, `{layer}`/`{expert}`
holes) with the GGUF tensor name llama.cpp's `minimax-01` loader asks for. Rows with an `{expert}` hole
on the spec side are *stacked*: the experts of one layer go, in expert order, into one 3-D GGUF tensor
(torch shape [experts, rows, cols]; GGUF's ne is the reverse). The published `gguf` package (0.19)
predates MiniMax, so the architecture and names are written here as strings.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from functools import lru_cache

from m1.tensors import name_pattern

ARCH = "minimax-01"

L = "model.layers.{layer}."
E = L + "block_sparse_moe.experts.{expert}."
B = "blk.{layer}."


@dataclass(frozen=True)
class NameRule:
    spec: str  # m1.spec pattern
    gguf: str  # GGUF pattern: `{layer}` only; stacked over experts when the spec has `{expert}`

    @property
    def stacked(self) -> bool:
        return "{expert}" in self.spec


GGUF_NAMES: tuple[NameRule, ...] = (
    NameRule("model.embed_tokens.weight", "token_embd.weight"),
    NameRule(L + "input_layernorm.weight", B + "attn_norm.weight"),
    # lightning layers: the fused, per-head interleaved qkv is kept as is (llama.cpp applies SiLU, then splits)
    NameRule(L + "self_attn.qkv_proj.weight", B + "attn_qkv.weight"),
    NameRule(L + "self_attn.output_gate.weight", B + "attn_gate.weight"),
    NameRule(L + "self_attn.norm.weight", B + "attn_norm_2.weight"),
    NameRule(L + "self_attn.out_proj.weight", B + "attn_output.weight"),
    # softmax layers
    NameRule(L + "self_attn.q_proj.weight", B + "attn_q.weight"),
    NameRule(L + "self_attn.k_proj.weight", B + "attn_k.weight"),
    NameRule(L + "self_attn.v_proj.weight", B + "attn_v.weight"),
    NameRule(L + "self_attn.o_proj.weight", B + "attn_output.weight"),
    NameRule(L + "post_attention_layernorm.weight", B + "ffn_norm.weight"),
    NameRule(L + "block_sparse_moe.gate.weight", B + "ffn_gate_inp.weight"),
    NameRule(E + "w1.weight", B + "ffn_gate_exps.weight"),
    NameRule(E + "w3.weight", B + "ffn_up_exps.weight"),
    NameRule(E + "w2.weight", B + "ffn_down_exps.weight"),
    NameRule("model.norm.weight", "output_norm.weight"),
    NameRule("lm_head.weight", "output.weight"),
)


@lru_cache(maxsize=1)
def _compiled() -> tuple[tuple[re.Pattern[str], re.Pattern[str], NameRule], ...]:
    return tuple((name_pattern(r.spec), name_pattern(r.gguf), r) for r in GGUF_NAMES)


@dataclass(frozen=True)
class GGUFName:
    name: str  # the GGUF tensor name
    expert: int | None  # the index along the stacked (first) axis, for an expert


def to_gguf(spec_name: str) -> GGUFName:
    """The GGUF tensor that spec tensor `spec_name` goes into (and its slot, for an expert)."""
    for spec_rx, _, rule in _compiled():
        m = spec_rx.match(spec_name)
        if m:
            groups = m.groupdict()
            expert = int(groups["expert"]) if "expert" in groups else None
            return GGUFName(rule.gguf.format(layer=groups.get("layer")), expert)
    raise KeyError(f"{spec_name!r} has no GGUF name (not a MiniMax-M1 tensor)")


def from_gguf(gguf_name: str, layer_kinds: tuple[str, ...] | None = None, n_experts: int | None = None) -> list[str]:
    """The spec tensor names that GGUF tensor `gguf_name` holds, in stacking order.

    `blk.N.attn_output.weight` is `out_proj` in a lightning layer and `o_proj` in a softmax layer, so
    `layer_kinds` (M1Config.layer_kinds) says which; a stacked expert tensor needs `n_experts`.
    """
    found = []
    for _, gguf_rx, rule in _compiled():
        m = gguf_rx.match(gguf_name)
        if not m:
            continue
        layer = m.groupdict().get("layer")
        if rule.stacked:
            if n_experts is None:
                raise ValueError(f"{gguf_name!r} stacks the experts: pass n_experts")
            return [rule.spec.format(layer=layer, expert=e) for e in range(n_experts)]
        found.append(rule.spec.format(layer=layer))
    if not found:
        raise KeyError(f"{gguf_name!r} is not a minimax-01 tensor name")
    if len(found) > 1:  # attn_output
        if layer_kinds is None:
            raise ValueError(f"{gguf_name!r} depends on the layer kind: pass layer_kinds")
        layer = int(re.match(r"blk\.(\d+)\.", gguf_name).group(1))  # type: ignore[union-attr]
        want = "self_attn.out_proj." if layer_kinds[layer] == "lightning" else "self_attn.o_proj."
        found = [name for name in found if want in name]
    return found
