"""Reference forward engine for MiniMax-M1: a compact, layer-streamed torch forward of the release model.

It follows the release's `modeling_minimax_m1.py`, not transformers' `minimax` port, where the two differ:
partial RoPE on the first `rotary_dim` dims of each head (transformers rotates all of them), and the
release's ALiBi slope recipe for any head count.

Weights come from a `WeightSource`, one layer at a time: `run` embeds every sequence, then for each layer
loads that layer's weights, pushes every sequence through it and drops the weights, so peak memory is one
layer plus the activations. Everything is computed in `dtype` (fp32 by default), weights are cast at use,
and the router, RoPE tables, lightning state and lm_head are always fp32.

The building blocks (`forward_layer`, `embed`, `head`) are plain differentiable torch functions over a dict
of tensors, so they serve training (scripts/train_tiny.py) and per-layer error metrics alike: "isolated" mode
feeds a candidate layer the reference's layer input with `forward_layer` / `run_layer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
import torch.nn.functional as F

from m1.config import M1Config
from m1.verify.lightning import layer_slopes, lightning_attention

LIGHTNING_NORM_EPS = 1e-6  # the release builds the lightning output RMSNorm with its default eps

Tokens = torch.Tensor | Sequence[int]
Output = Literal["logits", "log_probs"]
# on_layer(layer, inputs, outputs) -> replacement outputs or None; inputs/outputs are one tensor per batch.
LayerHook = Callable[[int, list[torch.Tensor], list[torch.Tensor]], "list[torch.Tensor] | None"]
# observe(weight, x): x [..., in_features] is the input of the linear layer whose weight is `weight` (named as in
# the layer's weights); an expert's w1/w3/w2 see only the tokens routed to it. For m1 verify imatrix.
Observer = Callable[[str, torch.Tensor], None]


class WeightSource(Protocol):
    """Where the engine reads weights from, a layer at a time."""

    def layer_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """The tensors of `model.layers.{layer}.`, named relative to that prefix (`self_attn.qkv_proj.weight`)."""
        ...

    def global_weights(self) -> dict[str, torch.Tensor]:
        """The tensors outside the layers, full names (`model.embed_tokens.weight`, `model.norm.weight`, ...)."""
        ...


def _layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


class DictSource:
    """A `WeightSource` over an in-memory mapping of full tensor names (tests, training, tiny models)."""

    def __init__(self, tensors: Mapping[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def layer_weights(self, layer: int) -> dict[str, torch.Tensor]:
        prefix = _layer_prefix(layer)
        return {name[len(prefix) :]: t for name, t in self.tensors.items() if name.startswith(prefix)}

    def global_weights(self) -> dict[str, torch.Tensor]:
        return {name: t for name, t in self.tensors.items() if not name.startswith("model.layers.")}


# ---- building blocks ----------------------------------------------------------------------------------


def _w(
    weights: Mapping[str, torch.Tensor], name: str, like: torch.Tensor, dtype: torch.dtype | None = None
) -> torch.Tensor:
    """Weight `name` on like's device in `dtype` (default like's); a no-op, autograd kept, when it already is."""
    try:
        t = weights[name]
    except KeyError:
        raise KeyError(f"weight {name!r} missing from the layer's weights") from None
    if not t.is_floating_point():
        raise TypeError(f"weight {name!r} is {t.dtype}: the engine needs float weights (dequantize first)")
    return t.to(device=like.device, dtype=dtype or like.dtype)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm as the release: statistics in fp32, back to x's dtype, then times the weight."""
    xf = x.float()
    normed = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    return weight.to(device=x.device, dtype=x.dtype) * normed.to(x.dtype)


def lightning_block(cfg: M1Config, layer: int, weights: Mapping[str, torch.Tensor], x: torch.Tensor,
                    observe: Observer | None = None) -> torch.Tensor:
    """The lightning attention block of layer `layer` on its (normed) input x: [B, T, hidden]."""
    batch, seq_len, _ = x.shape
    if observe is not None:
        observe("self_attn.qkv_proj.weight", x)
        observe("self_attn.output_gate.weight", x)
    heads, hd = cfg.num_attention_heads, cfg.head_dim
    qkv = F.silu(F.linear(x, _w(weights, "self_attn.qkv_proj.weight", x)))
    # Heads are interleaved: head h owns rows h*3*hd + [q | k | v].
    q, k, v = qkv.view(batch, seq_len, heads, 3 * hd).transpose(1, 2).split(hd, dim=-1)
    slopes = layer_slopes(heads, layer, cfg.num_hidden_layers)
    out = lightning_attention(q, k, v, slopes, cfg.block_size).to(x.dtype)
    out = out.transpose(1, 2).reshape(batch, seq_len, heads * hd)
    out = rms_norm(out, _w(weights, "self_attn.norm.weight", x), LIGHTNING_NORM_EPS)
    out = torch.sigmoid(F.linear(x, _w(weights, "self_attn.output_gate.weight", x))) * out
    if observe is not None:
        observe("self_attn.out_proj.weight", out)
    return F.linear(out, _w(weights, "self_attn.out_proj.weight", x))


def rope_tables(cfg: M1Config, seq_len: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [T, rotary_dim] for positions 0..T-1, NeoX layout (the frequencies repeated twice)."""
    rd = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rd, 2, device=device, dtype=torch.float32) / rd))
    freqs = torch.outer(torch.arange(seq_len, device=device, dtype=torch.float32), inv_freq)
    emb = torch.cat((freqs, freqs), dim=-1)
    return emb.cos(), emb.sin()


def apply_partial_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate-half RoPE on the first cos.shape[-1] dims of x [B, H, T, d]; the rest pass through. fp32 math."""
    rd = cos.shape[-1]
    rot, rest = x[..., :rd].float(), x[..., rd:]
    half = rd // 2
    rotated = torch.cat((-rot[..., half:], rot[..., :half]), dim=-1)
    out = rot * cos + rotated * sin
    return torch.cat((out.to(x.dtype), rest), dim=-1)


def softmax_block(
    cfg: M1Config,
    weights: Mapping[str, torch.Tensor],
    x: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    observe: Observer | None = None,
) -> torch.Tensor:
    """GQA causal softmax attention with partial RoPE on its (normed) input x: [B, T, hidden]."""
    batch, seq_len, _ = x.shape
    if observe is not None:
        for proj in ("q_proj", "k_proj", "v_proj"):
            observe(f"self_attn.{proj}.weight", x)
    hd = cfg.head_dim
    q = F.linear(x, _w(weights, "self_attn.q_proj.weight", x)).view(batch, seq_len, cfg.num_attention_heads, hd)
    k = F.linear(x, _w(weights, "self_attn.k_proj.weight", x)).view(batch, seq_len, cfg.num_key_value_heads, hd)
    v = F.linear(x, _w(weights, "self_attn.v_proj.weight", x)).view(batch, seq_len, cfg.num_key_value_heads, hd)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    cos, sin = rope if rope is not None else rope_tables(cfg, seq_len, x.device)
    q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
    out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=1.0 / math.sqrt(hd), enable_gqa=True)
    out = out.transpose(1, 2).reshape(batch, seq_len, cfg.num_attention_heads * hd)
    if observe is not None:
        observe("self_attn.o_proj.weight", out)
    return F.linear(out, _w(weights, "self_attn.o_proj.weight", x))


def route(
    cfg: M1Config, weights: Mapping[str, torch.Tensor], x: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Router on tokens x [N, hidden]: (fp32 logits [N, E], top-k weights renormalised [N, k], expert ids [N, k])."""
    logits = F.linear(x.float(), _w(weights, "block_sparse_moe.gate.weight", x, torch.float32))
    probs = torch.softmax(logits, dim=-1)
    top_w, top_i = torch.topk(probs, cfg.num_experts_per_tok, dim=-1)
    return logits, top_w / top_w.sum(dim=-1, keepdim=True), top_i


def moe_block(
    cfg: M1Config, weights: Mapping[str, torch.Tensor], x: torch.Tensor, trace: dict[str, torch.Tensor] | None = None,
    observe: Observer | None = None,
) -> torch.Tensor:
    """Top-k mixture of SwiGLU experts w2(silu(w1 x) * w3 x) on x: [B, T, hidden]."""
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if observe is not None:
        observe("block_sparse_moe.gate.weight", flat)
    logits, top_w, top_i = route(cfg, weights, flat)
    if trace is not None:
        trace["router_logits"] = logits
        trace["expert_ids"] = top_i
    out = torch.zeros_like(flat)
    for expert in range(cfg.num_local_experts):
        rows, slot = torch.where(top_i == expert)
        if rows.numel() == 0:
            continue  # an expert nobody picked costs nothing, not even its weight cast
        p = f"block_sparse_moe.experts.{expert}."
        xe = flat[rows]
        if observe is not None:
            observe(p + "w1.weight", xe)
            observe(p + "w3.weight", xe)
        h = F.silu(F.linear(xe, _w(weights, p + "w1.weight", x))) * F.linear(xe, _w(weights, p + "w3.weight", x))
        if observe is not None:
            observe(p + "w2.weight", h)
        y = F.linear(h, _w(weights, p + "w2.weight", x)) * top_w[rows, slot, None].to(x.dtype)
        out.index_add_(0, rows, y)  # in place: the out-of-place form copies `out` and is ~80x slower on CPU
    return out.view(shape)


def check_runnable(cfg: M1Config, source: str | None = None) -> None:
    """A ConfigError (one line, exit 1) for a config the engine cannot run: a shared-expert MoE is not M1's."""
    if cfg.raw.get("shared_intermediate_size", 0):
        from m1.errors import ConfigError

        raise ConfigError(f"shared_intermediate_size is {cfg.raw['shared_intermediate_size']}: a shared-expert MoE "
                          "is not part of MiniMax-M1 (its config has 0), so the verify engine cannot run it",
                          file=source, hint="m1 verifies MiniMax-M1 checkpoints only")


def forward_layer(
    cfg: M1Config,
    layer: int,
    weights: Mapping[str, torch.Tensor],
    hidden: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    rope: tuple[torch.Tensor, torch.Tensor] | None = None,
    trace: dict[str, torch.Tensor] | None = None,
    observe: Observer | None = None,
) -> torch.Tensor:
    """One decoder layer: hidden [B, T, hidden] (or [T, hidden]) -> same shape, computed in `dtype` (default hidden's).

    `weights` are named relative to `model.layers.{layer}.`. With `trace` (a dict), the intermediates
    attn_in, attn_out, mlp_in, moe_out, router_logits, expert_ids are stored in it for diagnostics.
    With `observe`, every linear layer's input is passed to it (see `Observer`).
    """
    check_runnable(cfg)
    if hidden.dim() == 2:
        return forward_layer(cfg, layer, weights, hidden[None], dtype=dtype, rope=rope, trace=trace,
                             observe=observe)[0]
    x = hidden.to(dtype) if dtype is not None else hidden
    kind = cfg.layer_kind(layer)
    h = rms_norm(x, _w(weights, "input_layernorm.weight", x), cfg.rms_norm_eps)
    if kind == "lightning":
        attn = lightning_block(cfg, layer, weights, h, observe)
        alpha, beta = cfg.linear_attn_alpha, cfg.linear_attn_beta
    else:
        attn = softmax_block(cfg, weights, h, rope, observe)
        alpha, beta = cfg.full_attn_alpha, cfg.full_attn_beta
    # postnorm: the residual branch carries the normed input; prenorm: the raw input.
    x1 = (h if cfg.postnorm else x) * alpha + attn * beta
    h2 = rms_norm(x1, _w(weights, "post_attention_layernorm.weight", x1), cfg.rms_norm_eps)
    moe = moe_block(cfg, weights, h2, trace, observe)
    if trace is not None:
        trace.update(attn_in=h, attn_out=attn, mlp_in=h2, moe_out=moe)
    return (h2 if cfg.postnorm else x1) * cfg.mlp_alpha + moe * cfg.mlp_beta


def embed(
    globals_: Mapping[str, torch.Tensor], tokens: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Token ids [..., T] -> hidden [..., T, hidden] in `dtype`, on the tokens' device."""
    table = globals_["model.embed_tokens.weight"]
    return F.embedding(tokens.to(table.device), table).to(device=tokens.device, dtype=dtype)


def head(cfg: M1Config, globals_: Mapping[str, torch.Tensor], hidden: torch.Tensor) -> torch.Tensor:
    """Final RMSNorm then lm_head, in fp32: hidden [..., T, hidden] -> logits [..., T, vocab]."""
    h = rms_norm(hidden, _w(globals_, "model.norm.weight", hidden), cfg.rms_norm_eps)
    name = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
    return F.linear(h.float(), _w(globals_, name, h, torch.float32))


def next_token_nll(logits: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
    """Per-position negative log-likelihood of tokens[..., 1:] under logits[..., :-1, :], fp32 [..., T-1]."""
    logp = torch.log_softmax(logits[..., :-1, :].float(), dim=-1)
    return -logp.gather(-1, tokens[..., 1:, None].to(logits.device)).squeeze(-1)


# ---- layer-streamed runs --------------------------------------------------------------------------------


@dataclass
class EngineOutput:
    """What `run` returns. One entry per input batch, in input order, on the CPU.

    logits: fp32 [.., T, vocab] (log-probs when run(output="log_probs")), leading dims as the input's.
    hidden: with capture_hidden, hidden[i][b] is batch b's input to layer i (i = 0 .. L-1) and
            hidden[L][b] the last layer's output (before the final norm), each [.., T, hidden] in `dtype`.
    """

    logits: list[torch.Tensor]
    hidden: list[list[torch.Tensor]] | None = None


def _as_batches(token_batches: Sequence[Tokens], device: torch.device) -> tuple[list[torch.Tensor], list[bool]]:
    batches, squeeze = [], []
    for tokens in token_batches:
        t = torch.as_tensor(tokens, dtype=torch.long)
        if t.dim() not in (1, 2) or t.shape[-1] == 0:
            raise ValueError(f"a token batch must be non-empty [T] or [B, T] ids, got shape {tuple(t.shape)}")
        squeeze.append(t.dim() == 1)
        batches.append((t[None] if t.dim() == 1 else t).to(device))
    return batches, squeeze


def _to_device(weights: Mapping[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    # Move once per layer in the stored dtype; casts to the compute dtype happen at use, a tensor at a time.
    return {name: t.to(device) for name, t in weights.items()}


def _like(replacement: torch.Tensor, output: torch.Tensor) -> torch.Tensor:
    # A [T] input's captured states are [T, hidden]; accept them back for its [1, T, hidden] state.
    if replacement.dim() == output.dim() - 1 and output.shape[0] == 1:
        replacement = replacement[None]
    if replacement.shape != output.shape:
        raise ValueError(f"on_layer returned shape {tuple(replacement.shape)} for an output of {tuple(output.shape)}")
    return replacement


@torch.no_grad()
def run_layer(
    cfg: M1Config,
    source: WeightSource,
    layer: int,
    hidden: Sequence[torch.Tensor],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
) -> list[torch.Tensor]:
    """Load one layer from `source` and run each given input through it ("isolated" per-layer checks)."""
    device = torch.device(device)
    weights = _to_device(source.layer_weights(layer), device)
    out = [forward_layer(cfg, layer, weights, h.to(device=device, dtype=dtype)).cpu() for h in hidden]
    del weights
    return out


@torch.no_grad()
def run(
    cfg: M1Config,
    source: WeightSource,
    token_batches: Sequence[Tokens],
    *,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    output: Output = "logits",
    capture_hidden: bool = False,
    on_layer: LayerHook | None = None,
) -> EngineOutput:
    """Forward every token batch ([T] or [B, T] ids) through the model, streaming one layer at a time.

    `on_layer(layer, inputs, outputs)` is called after each layer with one tensor per batch (on `device`)
    and may return replacement outputs, e.g. to splice in another model's hidden states.
    """
    if output not in ("logits", "log_probs"):
        raise ValueError(f"output must be 'logits' or 'log_probs', got {output!r}")
    device = torch.device(device)
    batches, squeeze = _as_batches(token_batches, device)
    globals_ = _to_device(source.global_weights(), device)
    states = [embed(globals_, t, dtype) for t in batches]
    captured: list[list[torch.Tensor]] | None = [] if capture_hidden else None
    # Positions are shared by all softmax layers: build the RoPE tables once per distinct length.
    ropes = {t.shape[-1]: rope_tables(cfg, t.shape[-1], device) for t in batches}

    for layer in range(cfg.num_hidden_layers):
        if captured is not None:
            captured.append([s.cpu() for s in states])
        weights = _to_device(source.layer_weights(layer), device)
        outputs = [forward_layer(cfg, layer, weights, s, dtype=dtype, rope=ropes[s.shape[-2]]) for s in states]
        del weights  # free this layer before the next one loads
        if on_layer is not None:
            replaced = on_layer(layer, states, outputs)
            if replaced is not None:
                if len(replaced) != len(outputs):
                    raise ValueError("on_layer must return one tensor per batch")
                outputs = [_like(r, o).to(device=device, dtype=dtype) for r, o in zip(replaced, outputs, strict=True)]
        states = outputs
    if captured is not None:
        captured.append([s.cpu() for s in states])

    logits = []
    for state, sq in zip(states, squeeze, strict=True):
        out = head(cfg, globals_, state)
        if output == "log_probs":
            out = torch.log_softmax(out, dim=-1)
        logits.append((out[0] if sq else out).cpu())
    if captured is not None:
        captured = [[h[0] if sq else h for h, sq in zip(per_layer, squeeze, strict=True)] for per_layer in captured]
    return EngineOutput(logits=logits, hidden=captured)
