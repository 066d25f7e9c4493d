"""Reference forward engine for MiniMax-M1: a compact, layer-streamed torch forward of the release model.

It follows the release's `modeling_minimax_m1.py`, not transformers' `minimax` port, where the two differ:
partial RoPE on the first `rotary_dim` dims of each head (transformers rotates all of them), and the
release's ALiBi slope recipe for any head count.

Weights come from a `WeightSource`, one layer at a time: `run` embeds every sequence, then for each layer
loads that layer's weights, pushes every sequence through it and drops the weights, so peak memory is one
layer plus the activations. Everything is computed in `dtype` (fp32 by default), weights are cast at use
(a layer's experts once, as they are stacked for grouped matmuls: `load_layer`, `stack_experts`), and the
router, RoPE tables, lightning state and lm_head are always fp32.

Long sequences run in chunks of positions (chunked prefill, `forward_layer_chunked`): each chunk goes through
the whole layer before the next, carrying the layer's state across chunks (`LayerState`: the fp32 lightning
kv state, or the softmax layer's keys and values), so a layer's workspace is one chunk's, and a softmax
layer attends over its keys flash-style (no [T, T] scores). Chunks start at fixed absolute positions, so the
first positions of a long run are computed by exactly the same operations on the same shapes as in a short
run: the logits of a shared prefix are bitwise the same (tests/test_long_context.py).

The building blocks (`forward_layer`, `embed`, `head`) are plain differentiable torch functions over a dict
of tensors, so they serve training (scripts/train_tiny.py) and per-layer error metrics alike: "isolated" mode
feeds a candidate layer the reference's layer input with `forward_layer` / `run_layer`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Literal

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

DEFAULT_CHUNK = 4096  # positions per prefill chunk (rounded down to a multiple of the lightning block size)
# How a later chunk's queries attend over the earlier keys: "auto" is torch's CPU flash kernel (it returns the
# log-sum-exp, so prefix and chunk merge exactly) on the CPU and masked SDPA in query slices elsewhere.
PREFIX_ATTENTION: Literal["auto", "masked"] = "auto"
MASKED_SCORES = 1 << 24  # masked path: at most this many (query, key) pairs per SDPA call


@dataclass
class LayerState:
    """What one layer carries from one chunk of positions to the next (chunked prefill).

    offset: the positions already done. lightning: the fp32 kv state [B, H, d, d] after them. keys/values:
    a softmax layer's keys (RoPE applied) and values [B, kv_heads, positions, d] in the compute dtype,
    preallocated for `capacity` positions when that is known.
    """

    capacity: int | None = None
    offset: int = 0
    lightning: torch.Tensor | None = None
    keys: torch.Tensor | None = None
    values: torch.Tensor | None = None

    def append_kv(self, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store a chunk's keys and values after the earlier ones; returns all of them so far."""
        end = self.offset + k.shape[-2]
        if self.keys is None or self.values is None:
            size = max(self.capacity or end, end)
            self.keys = k.new_empty(*k.shape[:-2], size, k.shape[-1])
            self.values = v.new_empty(*v.shape[:-2], size, v.shape[-1])
        elif end > self.keys.shape[-2]:  # no (or a too small) capacity given: grow geometrically
            grow = max(end, 2 * self.keys.shape[-2]) - self.keys.shape[-2]
            self.keys, self.values = (torch.cat([t, t.new_empty(*t.shape[:-2], grow, t.shape[-1])], -2)
                                      for t in (self.keys, self.values))
        self.keys[..., self.offset : end, :] = k
        self.values[..., self.offset : end, :] = v
        return self.keys[..., :end, :], self.values[..., :end, :]


class WeightSource:
    """Where the engine reads weights from, a layer at a time. A source subclasses this and gives
    `layer_weights` and `global_weights`; the other members are optional, with their defaults here."""

    def layer_weights(self, layer: int) -> dict[str, torch.Tensor]:
        """The tensors of `model.layers.{layer}.`, named relative to that prefix (`self_attn.qkv_proj.weight`)."""
        raise NotImplementedError

    def global_weights(self) -> dict[str, torch.Tensor]:
        """The tensors outside the layers, full names (`model.embed_tokens.weight`, `model.norm.weight`, ...)."""
        raise NotImplementedError

    def global_weight(self, name: str) -> torch.Tensor:
        """One tensor outside the layers (a source that reads tensors one at a time reads only it)."""
        return self.global_weights()[name]

    def stacked_layer_weights(self, layer: int, dtype: torch.dtype,
                              reuse: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor] | None:
        """`layer_weights` with the experts already stacked as GATE_UP and DOWN in `dtype` on the CPU (see
        `stack_experts`), for a source that can read them straight into place; None: `load_layer` stacks them.
        `reuse`: an earlier layer's stacked weights that the caller is done with, whose GATE_UP and DOWN may be
        overwritten with this layer's."""
        return None


def _layer_prefix(layer: int) -> str:
    return f"model.layers.{layer}."


class DictSource(WeightSource):
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
                    observe: Observer | None = None, state: LayerState | None = None) -> torch.Tensor:
    """The lightning attention block of layer `layer` on its (normed) input x: [B, T, hidden].

    With `state`, x holds the positions after `state.offset`, and the kv state is carried in and out."""
    batch, seq_len, _ = x.shape
    if observe is not None:
        observe("self_attn.qkv_proj.weight", x)
        observe("self_attn.output_gate.weight", x)
    heads, hd = cfg.num_attention_heads, cfg.head_dim
    qkv = F.silu(F.linear(x, _w(weights, "self_attn.qkv_proj.weight", x)))
    # Heads are interleaved: head h owns rows h*3*hd + [q | k | v]. One copy to [3, B, H, T, hd].
    q, k, v = qkv.view(batch, seq_len, heads, 3, hd).permute(3, 0, 2, 1, 4).contiguous().unbind(0)
    slopes = layer_slopes(heads, layer, cfg.num_hidden_layers)
    if state is None:
        out = lightning_attention(q, k, v, slopes, cfg.block_size).to(x.dtype)
    else:
        out, state.lightning = lightning_attention(q, k, v, slopes, cfg.block_size, state.lightning, True)
        out = out.to(x.dtype)
    out = out.transpose(1, 2).reshape(batch, seq_len, heads * hd)
    out = rms_norm(out, _w(weights, "self_attn.norm.weight", x), LIGHTNING_NORM_EPS)
    out = torch.sigmoid(F.linear(x, _w(weights, "self_attn.output_gate.weight", x))) * out
    if observe is not None:
        observe("self_attn.out_proj.weight", out)
    return F.linear(out, _w(weights, "self_attn.out_proj.weight", x))


def rope_tables(
    cfg: M1Config, seq_len: int, device: torch.device | str, start: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """fp32 cos/sin [T, rotary_dim] for positions start..start+T-1, NeoX layout (the frequencies repeated twice)."""
    rd = cfg.rotary_dim
    inv_freq = 1.0 / (cfg.rope_theta ** (torch.arange(0, rd, 2, device=device, dtype=torch.float32) / rd))
    positions = torch.arange(start, start + seq_len, device=device, dtype=torch.float32)
    freqs = torch.outer(positions, inv_freq)
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
    state: LayerState | None = None,
) -> torch.Tensor:
    """GQA causal softmax attention with partial RoPE on its (normed) input x: [B, T, hidden].

    `rope`: the tables of x's positions (built when None). With `state`, x holds the positions after
    `state.offset`: its keys and values are appended to the state's, and its queries attend over all of them."""
    batch, seq_len, _ = x.shape
    if observe is not None:
        for proj in ("q_proj", "k_proj", "v_proj"):
            observe(f"self_attn.{proj}.weight", x)
    hd = cfg.head_dim
    q = F.linear(x, _w(weights, "self_attn.q_proj.weight", x)).view(batch, seq_len, cfg.num_attention_heads, hd)
    k = F.linear(x, _w(weights, "self_attn.k_proj.weight", x)).view(batch, seq_len, cfg.num_key_value_heads, hd)
    v = F.linear(x, _w(weights, "self_attn.v_proj.weight", x)).view(batch, seq_len, cfg.num_key_value_heads, hd)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    offset = state.offset if state is not None else 0
    cos, sin = rope if rope is not None else rope_tables(cfg, seq_len, x.device, offset)
    q, k = apply_partial_rope(q, cos, sin), apply_partial_rope(k, cos, sin)
    scale = 1.0 / math.sqrt(hd)
    if state is not None:
        keys, values = state.append_kv(k, v)
    if offset == 0:
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale, enable_gqa=True)
    else:
        out = attend_after_prefix(q, keys, values, offset, scale)
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


# A layer's experts stacked (`stack_experts`): expert e's w1 rows then its w3 rows, and its w2.
GATE_UP = "block_sparse_moe.experts.gate_up_proj"  # [E, 2 * intermediate, hidden]
DOWN = "block_sparse_moe.experts.down_proj"  # [E, hidden, intermediate]


def stack_experts(
    cfg: M1Config, weights: Mapping[str, torch.Tensor], dtype: torch.dtype | None = None
) -> dict[str, torch.Tensor]:
    """The layer's weights with every expert's w1/w3/w2 replaced by the stacked GATE_UP and DOWN (in `dtype`,
    default the stored one), so that the MoE runs as two grouped matmuls. The cast to the compute dtype is the
    one copy (the per-expert form casts at every use instead)."""
    if GATE_UP in weights:
        return dict(weights)
    out = {n: t for n, t in weights.items() if not n.startswith("block_sparse_moe.experts.")}
    p = "block_sparse_moe.experts.{}.{}.weight"
    if p.format(0, "w1") not in weights:
        raise KeyError(f"weight {p.format(0, 'w1')!r} missing from the layer's weights")
    first = weights[p.format(0, "w1")]
    n_exp, (inter, hidden) = cfg.num_local_experts, first.shape
    dtype = dtype or first.dtype
    gate_up = first.new_empty((n_exp, 2 * inter, hidden), dtype=dtype)
    down = first.new_empty((n_exp, hidden, inter), dtype=dtype)
    for e in range(n_exp):
        gate_up[e, :inter].copy_(_w(weights, p.format(e, "w1"), gate_up))
        gate_up[e, inter:].copy_(_w(weights, p.format(e, "w3"), gate_up))
        down[e].copy_(_w(weights, p.format(e, "w2"), down))
    out[GATE_UP], out[DOWN] = gate_up, down
    return out


_GROUPED_MM = hasattr(F, "grouped_mm")


def _grouped_linear(x: torch.Tensor, w: torch.Tensor, counts: list[int]) -> torch.Tensor:
    """x [S, in] whose rows come in groups of counts[e] rows for expert e, w [E, out, in]: each group times its
    w[e]^T, [S, out]. One grouped matmul where torch has one for these tensors (no autograd on the CPU), else
    a matmul per expert (the results are the same: the CPU kernel multiplies group by group)."""
    global _GROUPED_MM
    if _GROUPED_MM and not (torch.is_grad_enabled() and (x.requires_grad or w.requires_grad)):
        offs = torch.tensor(counts, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(x.device)
        try:
            return F.grouped_mm(x, w.transpose(-1, -2), offs=offs)
        except (RuntimeError, NotImplementedError):  # alignment, dtype or device this torch cannot group
            pass
    out = x.new_empty((x.shape[0], w.shape[1]))
    start = 0
    for e, count in enumerate(counts):
        if count:
            out[start : start + count] = F.linear(x[start : start + count], w[e])
        start += count
    return out


def moe_block(
    cfg: M1Config, weights: Mapping[str, torch.Tensor], x: torch.Tensor, trace: dict[str, torch.Tensor] | None = None,
    observe: Observer | None = None,
) -> torch.Tensor:
    """Top-k mixture of SwiGLU experts w2(silu(w1 x) * w3 x) on x: [B, T, hidden].

    The experts come per expert (`block_sparse_moe.experts.{e}.w1.weight`, ...) or stacked (`stack_experts`).
    """
    shape = x.shape
    flat = x.reshape(-1, shape[-1])
    if observe is not None:
        observe("block_sparse_moe.gate.weight", flat)
    logits, top_w, top_i = route(cfg, weights, flat)
    if trace is not None:
        trace["router_logits"] = logits
        trace["expert_ids"] = top_i
    # Dispatch by sorting the (token, slot) pairs by expert: one gather in, each expert's rows a contiguous
    # slice (its tokens in order), one scatter back and a sum over the k slots.
    k = top_i.shape[-1]
    flat_ids = top_i.reshape(-1)
    order = torch.argsort(flat_ids, stable=True)
    counts = torch.bincount(flat_ids, minlength=cfg.num_local_experts).tolist()
    xs = flat.index_select(0, order // k)
    ws = top_w.reshape(-1).index_select(0, order).to(x.dtype)[:, None]
    p = "block_sparse_moe.experts.{}.{}.weight"
    if GATE_UP in weights:
        gate_up, down = _w(weights, GATE_UP, x), _w(weights, DOWN, x)
        inter = down.shape[-1]
        a = _grouped_linear(xs, gate_up, counts)
        h = F.silu(a[:, :inter]) * a[:, inter:]
        del a
        if observe is not None:
            start = 0
            for e, count in enumerate(counts):
                if count:
                    observe(p.format(e, "w1"), xs[start : start + count])
                    observe(p.format(e, "w3"), xs[start : start + count])
                    observe(p.format(e, "w2"), h[start : start + count])
                start += count
        ys = _grouped_linear(h, down, counts) * ws
    else:
        ys = torch.empty_like(xs)
        start = 0
        for e, count in enumerate(counts):
            if count == 0:
                continue  # an expert nobody picked costs nothing, not even its weight cast
            xe = xs[start : start + count]
            if observe is not None:
                observe(p.format(e, "w1"), xe)
                observe(p.format(e, "w3"), xe)
            w1, w3 = _w(weights, p.format(e, "w1"), x), _w(weights, p.format(e, "w3"), x)
            h = F.silu(F.linear(xe, w1)) * F.linear(xe, w3)
            if observe is not None:
                observe(p.format(e, "w2"), h)
            ys[start : start + count] = F.linear(h, _w(weights, p.format(e, "w2"), x)) * ws[start : start + count]
            start += count
    unsorted = torch.empty_like(ys)
    unsorted[order] = ys
    return unsorted.view(-1, k, shape[-1]).sum(1).view(shape)


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
    state: LayerState | None = None,
) -> torch.Tensor:
    """One decoder layer: hidden [B, T, hidden] (or [T, hidden]) -> same shape, computed in `dtype` (default hidden's).

    `rope`: cos/sin tables of the positions of `hidden` (built when None). With `state` (chunked prefill),
    hidden holds the positions after `state.offset`; the layer's state is carried in and updated.

    `weights` are named relative to `model.layers.{layer}.`. With `trace` (a dict), the intermediates
    attn_in, attn_out, mlp_in, moe_out, router_logits, expert_ids are stored in it for diagnostics.
    With `observe`, every linear layer's input is passed to it (see `Observer`).
    """
    check_runnable(cfg)
    if hidden.dim() == 2:
        return forward_layer(cfg, layer, weights, hidden[None], dtype=dtype, rope=rope, trace=trace,
                             observe=observe, state=state)[0]
    x = hidden.to(dtype) if dtype is not None else hidden
    kind = cfg.layer_kind(layer)
    h = rms_norm(x, _w(weights, "input_layernorm.weight", x), cfg.rms_norm_eps)
    if kind == "lightning":
        attn = lightning_block(cfg, layer, weights, h, observe, state)
        alpha, beta = cfg.linear_attn_alpha, cfg.linear_attn_beta
    else:
        attn = softmax_block(cfg, weights, h, rope, observe, state)
        alpha, beta = cfg.full_attn_alpha, cfg.full_attn_beta
    # postnorm: the residual branch carries the normed input; prenorm: the raw input.
    x1 = _scaled_sum(h if cfg.postnorm else x, alpha, attn, beta)
    h2 = rms_norm(x1, _w(weights, "post_attention_layernorm.weight", x1), cfg.rms_norm_eps)
    moe = moe_block(cfg, weights, h2, trace, observe)
    if trace is not None:
        trace.update(attn_in=h, attn_out=attn, mlp_in=h2, moe_out=moe)
    if state is not None:
        state.offset += x.shape[-2]
    return _scaled_sum(h2 if cfg.postnorm else x1, cfg.mlp_alpha, moe, cfg.mlp_beta)


def _scaled_sum(a: torch.Tensor, alpha: float, b: torch.Tensor, beta: float) -> torch.Tensor:
    """a * alpha + b * beta, without the multiplication by a beta of 1 (every MiniMax-M1 config): b * 1.0 is b."""
    return a * alpha + (b if beta == 1.0 else b * beta)


def chunk_positions(cfg: M1Config, chunk_size: int | None) -> int | None:
    """The prefill chunk for `chunk_size` (None: no chunking): a multiple of the lightning block size."""
    if chunk_size is None:
        return None
    if chunk_size < 1:
        raise ValueError(f"chunk_size must be at least 1, got {chunk_size}")
    return max(cfg.block_size, chunk_size // cfg.block_size * cfg.block_size)


def forward_layer_chunked(
    cfg: M1Config,
    layer: int,
    weights: Mapping[str, torch.Tensor],
    hidden: torch.Tensor,
    *,
    dtype: torch.dtype | None = None,
    chunk_size: int | None = DEFAULT_CHUNK,
    observe: Observer | None = None,
) -> torch.Tensor:
    """`forward_layer` on hidden [B, T, hidden] (or [T, hidden]) in chunks of positions (chunked prefill).

    Each chunk runs through the whole layer before the next; the lightning kv state and the softmax keys and
    values are carried across chunks (`LayerState`), so the result is the one-call result (within float
    rounding) with one chunk's workspace plus the layer's keys and values. Sequences no longer than one
    chunk take the one-call path. Chunk c always covers positions [c * chunk, (c + 1) * chunk): a prefix
    shared by two runs is computed identically in both.
    """
    if hidden.dim() == 2:
        return forward_layer_chunked(cfg, layer, weights, hidden[None], dtype=dtype, chunk_size=chunk_size,
                                     observe=observe)[0]
    seq_len = hidden.shape[-2]
    chunk = chunk_positions(cfg, chunk_size)
    if chunk is None or seq_len <= chunk:
        return forward_layer(cfg, layer, weights, hidden, dtype=dtype, observe=observe)
    if not torch.is_grad_enabled():  # the experts cast and stacked once, not once per chunk
        weights = stack_experts(cfg, weights, dtype or hidden.dtype)
    state = LayerState(capacity=seq_len)
    out: torch.Tensor | None = None
    for start in range(0, seq_len, chunk):
        part = hidden[:, start : start + chunk].contiguous()
        y = forward_layer(cfg, layer, weights, part, dtype=dtype, observe=observe, state=state)
        if out is None:
            out = torch.empty(hidden.shape, dtype=y.dtype, device=y.device)
        out[:, start : start + chunk] = y
    assert out is not None
    return out


def attend_after_prefix(q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, offset: int,
                        scale: float) -> torch.Tensor:
    """Causal GQA attention of a chunk's queries q [B, H, T, d] at positions offset.. over keys/values
    [B, kv_heads, offset + T, d] (the earlier positions' then the chunk's own), without [T, offset + T] scores.

    On the CPU: torch's flash kernel twice, over the earlier keys (no mask) and over the chunk's own (causal),
    each giving its log-sum-exp, merged exactly. Elsewhere (or PREFIX_ATTENTION = "masked"): SDPA with a
    boolean mask, in query slices of at most MASKED_SCORES (query, key) pairs.
    """
    flash = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
    if PREFIX_ATTENTION == "auto" and flash is not None and q.device.type == "cpu":
        o1, l1 = flash(q, keys[..., :offset, :], values[..., :offset, :], 0.0, False, scale=scale)
        o2, l2 = flash(q, keys[..., offset:, :], values[..., offset:, :], 0.0, True, scale=scale)
        top = torch.maximum(l1, l2)
        w1, w2 = (l1 - top).exp_().unsqueeze(-1), (l2 - top).exp_().unsqueeze(-1)
        return ((o1.float() * w1 + o2.float() * w2) / (w1 + w2)).to(q.dtype)
    seq_len, n_keys = q.shape[-2], keys.shape[-2]
    step = max(1, min(seq_len, MASKED_SCORES // n_keys))
    key_pos = torch.arange(n_keys, device=q.device)
    outs = []
    for a in range(0, seq_len, step):
        query_pos = torch.arange(offset + a, offset + min(seq_len, a + step), device=q.device)
        mask = key_pos[None, :] <= query_pos[:, None]
        outs.append(F.scaled_dot_product_attention(q[..., a : a + step, :], keys, values, attn_mask=mask,
                                                   scale=scale, enable_gqa=True))
    return torch.cat(outs, dim=-2)


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


def head_chunked(cfg: M1Config, globals_: Mapping[str, torch.Tensor], hidden: torch.Tensor,
                 chunk_size: int | None = DEFAULT_CHUNK, log_probs: bool = False) -> torch.Tensor:
    """`head` (then log-softmax with `log_probs`) over hidden [..., T, hidden] a chunk of positions at a time
    (the same chunks as the layers), into one fp32 [..., T, vocab]."""
    chunk = chunk_positions(cfg, chunk_size)
    seq_len = hidden.shape[-2]
    if chunk is None or seq_len <= chunk:
        out = head(cfg, globals_, hidden)
        return torch.log_softmax(out, dim=-1) if log_probs else out
    out = None
    for start in range(0, seq_len, chunk):
        part = head(cfg, globals_, hidden[..., start : start + chunk, :].contiguous())
        if log_probs:
            part = torch.log_softmax(part, dim=-1)
        if out is None:
            out = part.new_empty((*hidden.shape[:-1], part.shape[-1]))
        out[..., start : start + chunk, :] = part
    assert out is not None
    return out


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


def load_layer(cfg: M1Config, source: WeightSource, layer: int, device: torch.device,
               dtype: torch.dtype, reuse: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """One layer's weights on `device`, the experts stacked in the compute dtype (read straight into the stacked
    tensors when the source can, on the CPU, into `reuse`'s when given: see `WeightSource.stacked_layer_weights`)."""
    stacked = source.stacked_layer_weights(layer, dtype, reuse) if device.type == "cpu" else None
    if stacked is not None:
        return stacked
    return stack_experts(cfg, _to_device(source.layer_weights(layer), device), dtype)


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
    chunk_size: int | None = DEFAULT_CHUNK,
) -> list[torch.Tensor]:
    """Load one layer from `source` and run each given input through it ("isolated" per-layer checks)."""
    device = torch.device(device)
    weights = load_layer(cfg, source, layer, device, dtype)
    out = [forward_layer_chunked(cfg, layer, weights, h.to(device=device, dtype=dtype), chunk_size=chunk_size).cpu()
           for h in hidden]
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
    chunk_size: int | None = DEFAULT_CHUNK,
) -> EngineOutput:
    """Forward every token batch ([T] or [B, T] ids) through the model, streaming one layer at a time.

    Sequences longer than `chunk_size` positions run in chunks (`forward_layer_chunked`); None: in one call.

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

    # The next layer is read into this one's stacked experts once it has run: the same memory (one layer's), and
    # no fresh pages to fault in and zero for every layer (that cost as much as reading the weights).
    spare: dict[str, torch.Tensor] | None = None
    for layer in range(cfg.num_hidden_layers):
        if captured is not None:
            captured.append([s.cpu() for s in states])
        weights = load_layer(cfg, source, layer, device, dtype, reuse=spare)
        spare = None
        outputs = [forward_layer_chunked(cfg, layer, weights, s, dtype=dtype, chunk_size=chunk_size) for s in states]
        spare = {n: weights[n] for n in (GATE_UP, DOWN) if n in weights}
        del weights  # free the rest of this layer before the next one loads
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
        out = head_chunked(cfg, globals_, state, chunk_size, log_probs=output == "log_probs")
        logits.append((out[0] if sq else out).cpu())
    if captured is not None:
        captured = [[h[0] if sq else h for h, sq in zip(per_layer, squeeze, strict=True)] for per_layer in captured]
    return EngineOutput(logits=logits, hidden=captured)
