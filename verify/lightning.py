"""Lightning attention of MiniMax-M1: per-head decay rates and the block-wise causal form.

The release computes, per head with decay s, o_t = q_t . kv_t where kv_t = exp(-s) kv_{t-1} + k_t^T v_t
(no softmax, no 1/sqrt(d), no RoPE). The block-wise form below evaluates the same sum in blocks: inside a
block a decayed causal (q k^T) mask, across blocks a carried fp32 state kv. Plain torch ops only, so it is
differentiable and runs on any device.

The state can be carried across calls (`state=`, `return_state=True`): a long sequence run in chunks of
positions (the engine's chunked prefill) gives the same sums as one call, with memory of one chunk.
"""

from __future__ import annotations

import math

import torch

# Blocks evaluated together (one batched matmul per group): bounds the [B, H, blocks, bs, bs] intra-block
# scores to GROUP_POSITIONS positions at a time, whatever the sequence length.
GROUP_POSITIONS = 4096


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


def _decay_tables(s: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """For blocks of n positions and decays s [1, H, 1, 1]: query decay [1, H, n, 1] (query i sees the carried
    state decayed i+1 steps), the intra-block causal decay [1, H, n, n], key decay [1, H, n, 1] (key j reaches
    the block's end after n-1-j more steps) and the whole block's decay [1, H, 1, 1]."""
    pos = torch.arange(n, device=s.device, dtype=torch.float32)
    q_decay = torch.exp(-s * (pos + 1).view(1, 1, n, 1))
    diff = pos.view(n, 1) - pos.view(1, n)
    # clamp before exp so the masked (future) entries never overflow; they are zeroed by the where.
    diag_decay = torch.where(diff >= 0, torch.exp(-s * diff.clamp(min=0)), torch.zeros((), device=s.device))
    k_decay = torch.exp(-s * (n - 1 - pos).view(1, 1, n, 1))
    return q_decay, diag_decay, k_decay, torch.exp(-s * n)


def lightning_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    slopes: torch.Tensor,
    block_size: int,
    state: torch.Tensor | None = None,
    return_state: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Decayed causal linear attention, block-wise. q, k, v: [B, H, T, d]; slopes: [H]. Returns fp32 [B, H, T, d].

    All arithmetic is fp32 whatever the input dtype: the inter-block state accumulates over the whole
    sequence, and the release keeps it in fp32 too. `state` (fp32 [B, H, d, d_v]) is the kv state carried in
    from the positions before q's first one (zeros when None); with `return_state` the result is
    (output, state after the last position), to be passed to the next call.

    Full blocks are evaluated GROUP_POSITIONS at a time with batched matmuls (the intra-block part of every
    block at once, then the states block by block, then every block's inter-block part at once); a last
    partial block on its own, with the tables sliced as the release slices them.
    """
    if block_size <= 0:
        raise ValueError(f"block_size must be positive, got {block_size}")
    batch, heads, seq_len, d = q.shape
    e = v.shape[-1]
    if seq_len == 0:
        raise ValueError("lightning attention needs at least one position")
    q, k, v = (t.float().contiguous() for t in (q, k, v))
    s = slopes.to(device=q.device, dtype=torch.float32).view(1, heads, 1, 1)
    kv = (torch.zeros(batch, heads, d, e, device=q.device, dtype=torch.float32) if state is None
          else state.to(device=q.device, dtype=torch.float32))
    bs = min(block_size, seq_len) if seq_len else block_size
    q_decay, diag_decay, k_decay, block_decay = _decay_tables(s, bs)
    outputs = []
    n_full = seq_len // bs if seq_len >= block_size else 0
    group = max(1, GROUP_POSITIONS // bs)
    for first in range(0, n_full, group):
        nb = min(group, n_full - first)
        lo, hi = first * bs, (first + nb) * bs
        qb, kb, vb = (t[:, :, lo:hi].view(batch, heads, nb, bs, -1) for t in (q, k, v))
        scores = torch.matmul(qb, kb.transpose(-1, -2)) * diag_decay[:, :, None]
        out = torch.matmul(scores, vb)
        del scores
        block_kv = torch.matmul((kb * k_decay[:, :, None]).transpose(-1, -2), vb)  # [B, H, nb, d, e]
        # The state each block starts from: the recurrence itself, block by block (small [B, H, d, e] steps),
        # so that the sums are the release's, in its order.
        before = torch.empty_like(block_kv)
        for j in range(nb):
            before[:, :, j] = kv
            kv = block_decay * kv + block_kv[:, :, j]
        out += torch.matmul(qb * q_decay[:, :, None], before)
        outputs.append(out.view(batch, heads, hi - lo, e))
    start = n_full * bs
    if start < seq_len:  # a last partial block (or a sequence shorter than one block)
        m = seq_len - start
        qi, ki, vi = q[:, :, start:], k[:, :, start:], v[:, :, start:]
        intra = torch.matmul(torch.matmul(qi, ki.transpose(-1, -2)) * diag_decay[..., :m, :m], vi)
        inter = torch.matmul(qi * q_decay[:, :, :m], kv)
        outputs.append(intra + inter)
        pos = torch.arange(m, device=q.device, dtype=torch.float32)
        last_k_decay = torch.exp(-s * (m - 1 - pos).view(1, 1, m, 1))
        kv = torch.exp(-s * m) * kv + torch.matmul((ki * last_k_decay).transpose(-1, -2), vi)
    out = torch.cat(outputs, dim=2) if len(outputs) != 1 else outputs[0]
    return (out, kv) if return_state else out
