"""Lightning attention of MiniMax-M1: per-head decay rates and the block-wise causal form.

The release computes, per head with decay s, o_t = q_t . kv_t where kv_t = exp(-s) kv_{t-1} + k_t^T v_t
(no softmax, no 1/sqrt(d), no RoPE). The block-wise form below evaluates the same sum in blocks: inside a
block a decayed causal (q k^T) mask, across blocks a carried fp32 state kv. Plain torch ops only, so it is
differentiable and runs on any device.
"""

from __future__ import annotations

import math

import torch


def alibi_slopes(n_heads: int) -> list[float]:
    """ALiBi's per-head slopes, as the release's `_build_slope_tensor` builds them."""
    if n_heads <= 0:
        raise ValueError(f"n_heads must be positive, got {n_heads}")
    if math.log2(n_heads).is_integer():
        # 2^(-8/n) * 2^(-8i/n) = 2^(-8(i+1)/n)
        return [2.0 ** (-8.0 * (i + 1) / n_heads) for i in range(n_heads)]
    # Not a power of two: the closest lower power's slopes, then every other slope of twice that power.
    closest = 2 ** math.floor(math.log2(n_heads))
    return alibi_slopes(closest) + alibi_slopes(2 * closest)[0::2][: n_heads - closest]


def layer_decay_factor(layer: int, num_layers: int) -> float:
    """How much layer `layer` scales the slopes: 1 at the first layer, ~1e-5 at the last (release formula).

    The release divides by num_layers - 1; a one-layer model would divide by zero there, so it gets 1.
    (transformers writes layer/(num_layers - 1 + 1e-5), a relative difference of ~1e-5 / num_layers.)
    """
    ratio = layer / (num_layers - 1) if num_layers > 1 else 0.0
    return 1.0 - ratio + 1e-5


def layer_slopes(n_heads: int, layer: int, num_layers: int) -> torch.Tensor:
    """Per-head decay rates s_h of one lightning layer, fp32 [H]; the decay per step is exp(-s_h)."""
    return torch.tensor(alibi_slopes(n_heads), dtype=torch.float32) * layer_decay_factor(layer, num_layers)


def lightning_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, slopes: torch.Tensor, block_size: int
) -> torch.Tensor:
    """Decayed causal linear attention, block-wise. q, k, v: [B, H, T, d]; slopes: [H]. Returns fp32 [B, H, T, d].

    All arithmetic is fp32 whatever the input dtype: the inter-block state accumulates over the whole
    sequence, and the release keeps it in fp32 too.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    batch, heads, seq_len, d = q.shape
    q, k, v = q.float(), k.float(), v.float()
    s = slopes.to(device=q.device, dtype=torch.float32).view(1, heads, 1, 1)
    n = min(block_size, seq_len)
    pos = torch.arange(n, device=q.device, dtype=torch.float32)
    # Full-block decay tables, sliced for a shorter last block exactly as the release slices them.
    q_decay = torch.exp(-s * (pos + 1).view(1, 1, n, 1))  # query i sees the carried state decayed i+1 steps
    diff = pos.view(n, 1) - pos.view(1, n)
    # clamp before exp so the masked (future) entries never overflow; they are zeroed by the where.
    diag_decay = torch.where(diff >= 0, torch.exp(-s * diff.clamp(min=0)), torch.zeros((), device=q.device))

    kv = torch.zeros(batch, heads, d, v.shape[-1], device=q.device, dtype=torch.float32)
    outputs = []
    for start in range(0, seq_len, block_size):
        m = min(block_size, seq_len - start)
        qi, ki, vi = q[:, :, start : start + m], k[:, :, start : start + m], v[:, :, start : start + m]
        intra = torch.matmul(torch.matmul(qi, ki.transpose(-1, -2)) * diag_decay[..., :m, :m], vi)
        inter = torch.matmul(qi * q_decay[:, :, :m], kv)
        outputs.append(intra + inter)
        # key j of this block reaches the block's end after m-1-j more steps
        k_decay = torch.exp(-s * (m - 1 - pos[:m]).view(1, 1, m, 1))
        kv = torch.exp(-s * m) * kv + torch.matmul((ki * k_decay).transpose(-1, -2), vi)
    return torch.cat(outputs, dim=2)
