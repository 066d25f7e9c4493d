"""GPTQ codes within bitsandbytes' own scales, in bitsandbytes' own bytes.

bitsandbytes quantizes the weight first (m1.schemes.bnb_codec.quantize_weight: its absmax, double quant, code
table and state are kept as they are); GPTQ (m1.quantize.gptq) then only chooses each weight's code:

- nf4 / fp4: the value code[k] * absmax[block], with the 16 values of the QuantState's own code table
  (bitsandbytes' get_4bit_type) and the absmax as stored and decoded (with double quant: dequantize_blockwise of
  the uint8 absmax plus the offset, as dequantize_4bit does). bitsandbytes blocks run along the flattened weight,
  so every weight's scale is absmax[flat index // blocksize]: a per-element scale map, the same whether a block
  lies inside a row (in % blocksize == 0, M1's case) or straddles two; GPTQ's column sweep reads column j's
  scales from it. The codes are packed as bitsandbytes packs them (two a byte, the first in the high nibble).
- int8 (LLM.int8, row-wise): the value q * SCB[row] / 127 for q in [-127, 127], decoded per column with
  bitsandbytes' own int8_vectorwise_dequant.
"""

from __future__ import annotations

from typing import Any

import torch

from m1.schemes.bnb_codec import Scheme, bnb_functional, quant_state, quantize_weight
from m1.schemes.gptq import Rounding, gptq_round


def decoded_absmax(state: Any) -> torch.Tensor:  # state: bitsandbytes QuantState
    """The per-block absmax bitsandbytes' dequantize_4bit multiplies by (float32)."""
    if not state.nested:
        return state.absmax.float()
    F = bnb_functional()
    return (F.dequantize_blockwise(state.absmax, state.state2) + state.offset).float()


def pack_4bit(codes: torch.Tensor) -> torch.Tensor:
    """Codes 0..15 (any shape) as bitsandbytes' packed uint8 [ceil(n/2), 1]."""
    flat = codes.reshape(-1).to(torch.uint8)
    if flat.numel() % 2:
        flat = torch.nn.functional.pad(flat, (0, 1))
    return ((flat[0::2] << 4) | flat[1::2]).unsqueeze(1)


class FourBitGrid:
    """Nearest value of code * scale for column j, with the scale of each weight's bitsandbytes block."""

    def __init__(self, state: Any, shape: tuple[int, int], blocksize: int) -> None:
        code = state.code.float().to(state.absmax.device)
        self.order = torch.argsort(code)
        self.sorted = code[self.order]
        self.mid = (self.sorted[1:] + self.sorted[:-1]) / 2
        self.code = code
        n = shape[0] * shape[1]
        self.scale = decoded_absmax(state).repeat_interleave(blocksize)[:n].view(shape)
        self.zero = int(torch.argmin(code.abs()))

    def __call__(self, w: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        s = self.scale[:, col]
        live = s > 0
        x = torch.where(live, w / torch.where(live, s, 1), 0).clamp(-1, 1)
        idx = self.order[torch.bucketize(x, self.mid)]
        idx = torch.where(live, idx, self.zero)
        return self.code[idx] * s, idx


class Int8Grid:
    def __init__(self, scb: torch.Tensor) -> None:
        self.scb = scb.float()

    def __call__(self, w: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        F = bnb_functional()
        live = self.scb > 0
        q = torch.where(live, w * 127 / torch.where(live, self.scb, 1), 0).round().clamp(-127, 127)
        values = F.int8_vectorwise_dequant(q.to(torch.int8)[:, None], self.scb)[:, 0].float()
        return values, q.long()


def quantize_gptq(scheme: Scheme, weight: torch.Tensor, h: torch.Tensor, rounding: Rounding, device: torch.device,
                  name: str = "") -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
    """(bitsandbytes' pieces with GPTQ's codes, the values GPTQ intends in the dtype the decoder returns)."""
    pieces = quantize_weight(scheme, weight, device, name)  # bitsandbytes' own scales and state
    w = weight.to(device).float()
    h = h.to(device)
    if scheme.four_bit:
        state = quant_state(dict(pieces), device, name)
        grid: Any = FourBitGrid(state, tuple(w.shape), scheme.blocksize)
    else:
        grid = Int8Grid(dict(pieces)["SCB"].to(device))
    values, codes = gptq_round(w, h, grid, damp=rounding.damp, block=rounding.block, act_order=rounding.act_order)
    if scheme.four_bit:
        stored = pack_4bit(codes)
        intended = values.to(weight.dtype)  # dequantize_4bit: fp32 products, cast to the state's dtype
    else:
        stored = codes.to(torch.int8)
        intended = values
    out = [(suffix, stored.cpu().contiguous() if suffix == "weight" else t) for suffix, t in pieces]
    return out, intended.cpu()
