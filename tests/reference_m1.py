"""Test-only reference of the MiniMax-M1 release equations, written for clarity, not speed.

Independent of verify/engine.py on purpose (shares none of its code): float64 throughout, one token at a
time, plain loops. Lightning attention is the recurrent form kv_t = exp(-s) kv_{t-1} + k_t^T v_t,
o_t = q_t kv_t; softmax attention attends position by position; the MoE routes token by token.
"""

from __future__ import annotations

import math

import torch

from m1.config import M1Config

f64 = torch.float64


def release_slopes(n: int) -> list[float]:
    """The release's `_build_slope_tensor` recipe, transcribed."""

    def power_of_2(n: int) -> list[float]:
        start = 2 ** (-(2 ** -(math.log2(n) - 3)))
        return [start * start**i for i in range(n)]

    if math.log2(n).is_integer():
        return power_of_2(n)
    closest = 2 ** math.floor(math.log2(n))
    return power_of_2(closest) + release_slopes(2 * closest)[0::2][: n - closest]


def rmsnorm(x: torch.Tensor, w: torch.Tensor, eps: float) -> torch.Tensor:
    return w * x / torch.sqrt((x * x).mean() + eps)


def recurrent_lightning(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor) -> torch.Tensor:
    """q, k, v: [H, T, d]; slopes [H]. The release's decode-time recurrence, token by token."""
    heads, seq_len, d = q.shape
    out = torch.zeros(heads, seq_len, v.shape[-1], dtype=f64)
    for h in range(heads):
        kv = torch.zeros(d, v.shape[-1], dtype=f64)
        ratio = math.exp(-float(slopes[h]))
        for t in range(seq_len):
            kv = ratio * kv + torch.outer(k[h, t].to(f64), v[h, t].to(f64))
            out[h, t] = q[h, t].to(f64) @ kv
    return out


def rope_rotate(x: torch.Tensor, pos: int, rotary_dim: int, theta: float) -> torch.Tensor:
    """NeoX RoPE of one head vector at one position: dims i and i + rotary_dim/2 rotate together."""
    out = x.clone()
    half = rotary_dim // 2
    for i in range(half):
        angle = pos * theta ** (-(2 * i) / rotary_dim)
        c, s = math.cos(angle), math.sin(angle)
        a, b = x[i], x[i + half]
        out[i] = a * c - b * s
        out[i + half] = b * c + a * s
    return out


def reference_logits(cfg: M1Config, tensors: dict[str, torch.Tensor], tokens: list[int]) -> torch.Tensor:
    """Logits [T, vocab] (float64) of one sequence under the release equations."""
    W = {name: t.to(f64) for name, t in tensors.items()}
    H, hd, kvh = cfg.num_attention_heads, cfg.head_dim, cfg.num_key_value_heads
    L, T = cfg.num_hidden_layers, len(tokens)
    x = [W["model.embed_tokens.weight"][tok] for tok in tokens]
    base = torch.tensor(release_slopes(H), dtype=f64)
    for layer in range(L):
        p = f"model.layers.{layer}."
        h = [rmsnorm(xt, W[p + "input_layernorm.weight"], cfg.rms_norm_eps) for xt in x]
        if cfg.layer_kinds[layer] == "lightning":
            slopes = base * (1 - layer / (L - 1) + 1e-5) if L > 1 else base * (1 + 1e-5)
            qkv = [torch.nn.functional.silu(W[p + "self_attn.qkv_proj.weight"] @ ht) for ht in h]
            # head hh owns rows hh*3*hd + [q | k | v] of the fused projection
            q, k, v = (
                torch.stack([torch.stack([qkv[t][(3 * hh + part) * hd : (3 * hh + part + 1) * hd] for t in range(T)])
                             for hh in range(H)])
                for part in range(3)
            )
            o = recurrent_lightning(q, k, v, slopes)  # [H, T, hd]
            attn = []
            for t in range(T):
                ot = torch.cat([o[hh, t] for hh in range(H)])
                ot = rmsnorm(ot, W[p + "self_attn.norm.weight"], 1e-6)
                ot = torch.sigmoid(W[p + "self_attn.output_gate.weight"] @ h[t]) * ot
                attn.append(W[p + "self_attn.out_proj.weight"] @ ot)
            alpha, beta = cfg.linear_attn_alpha, cfg.linear_attn_beta
        else:
            group = H // kvh
            qs = [(W[p + "self_attn.q_proj.weight"] @ ht).view(H, hd) for ht in h]
            ks = [(W[p + "self_attn.k_proj.weight"] @ ht).view(kvh, hd) for ht in h]
            vs = [(W[p + "self_attn.v_proj.weight"] @ ht).view(kvh, hd) for ht in h]
            rd, theta = cfg.rotary_dim, cfg.rope_theta
            qs = [torch.stack([rope_rotate(qt[i], t, rd, theta) for i in range(H)]) for t, qt in enumerate(qs)]
            ks = [torch.stack([rope_rotate(kt[i], t, rd, theta) for i in range(kvh)]) for t, kt in enumerate(ks)]
            attn = []
            for t in range(T):
                heads_out = []
                for i in range(H):
                    g = i // group  # query head i reads kv head i // (H / kvh)
                    scores = torch.stack([qs[t][i] @ ks[j][g] for j in range(t + 1)]) / math.sqrt(hd)
                    probs = torch.softmax(scores, dim=0)
                    heads_out.append(sum(probs[j] * vs[j][g] for j in range(t + 1)))
                attn.append(W[p + "self_attn.o_proj.weight"] @ torch.cat(heads_out))
            alpha, beta = cfg.full_attn_alpha, cfg.full_attn_beta
        resid = h if cfg.postnorm else x
        x1 = [resid[t] * alpha + attn[t] * beta for t in range(T)]
        h2 = [rmsnorm(xt, W[p + "post_attention_layernorm.weight"], cfg.rms_norm_eps) for xt in x1]
        moe = []
        for t in range(T):
            probs = torch.softmax(W[p + "block_sparse_moe.gate.weight"] @ h2[t], dim=0)
            chosen = sorted(range(cfg.num_local_experts), key=lambda e: -float(probs[e]))[: cfg.num_experts_per_tok]
            total = sum(float(probs[e]) for e in chosen)
            acc = torch.zeros_like(h2[t])
            for e in chosen:
                ep = p + f"block_sparse_moe.experts.{e}."
                inner = torch.nn.functional.silu(W[ep + "w1.weight"] @ h2[t]) * (W[ep + "w3.weight"] @ h2[t])
                acc = acc + float(probs[e]) / total * (W[ep + "w2.weight"] @ inner)
            moe.append(acc)
        resid2 = h2 if cfg.postnorm else x1
        x = [resid2[t] * cfg.mlp_alpha + moe[t] * cfg.mlp_beta for t in range(T)]
    head = W["model.embed_tokens.weight"] if cfg.tie_word_embeddings else W["lm_head.weight"]
    return torch.stack([head @ rmsnorm(xt, W["model.norm.weight"], cfg.rms_norm_eps) for xt in x])
