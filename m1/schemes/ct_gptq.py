"""GPTQ codes within compressed-tensors' own scales, in compressed-tensors' own packing (w4a16, w8a16).

compressed-tensors computes each group's scale (and zero point) from the weight first (`compute_dynamic_scales_and_zp`,
as for the scheme's own rounding); GPTQ (m1.schemes.gptq) then only chooses every weight's integer code, column
by column, among the codes that group's scale allows. A column's candidates are rounded and decoded by
compressed-tensors' own `quantize` / `dequantize` on that column with its group's scale (its channel strategy on
a one-column slice is the same per-element arithmetic its group decoder runs), so the values GPTQ intends are
the values `PackedQuantizationCompressor.decompress` returns; the codes are packed by its `pack_to_int32`.
"""

from __future__ import annotations

from typing import Any

import torch

from m1.schemes.gptq import Rounding, gptq_round


class GroupGrid:
    """The nearest code of column j under its group's scale, and the value compressed-tensors decodes it to."""

    def __init__(self, scale: torch.Tensor, zero_point: torch.Tensor | None, group: int | None, args: Any) -> None:
        from compressed_tensors.quantization import QuantizationArgs

        self.scale, self.zero_point, self.group = scale, zero_point, group
        self.args = QuantizationArgs(num_bits=args.num_bits, type="int", symmetric=args.symmetric, strategy="channel")

    def __call__(self, w: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        from compressed_tensors.quantization.lifecycle.forward import dequantize, quantize

        g = int(col) // self.group if self.group else 0
        scale = self.scale[:, g : g + 1]
        zp = self.zero_point[:, g : g + 1] if self.zero_point is not None else None
        codes = quantize(x=w[:, None], scale=scale, zero_point=zp, args=self.args, dtype=torch.int8)
        values = dequantize(codes, scale, zp, self.args)
        return values[:, 0].float(), codes[:, 0].long()


def quantize_gptq(scheme: Any, weight: torch.Tensor, h: torch.Tensor, rounding: Rounding, device: torch.device,
                  name: str = "") -> tuple[list[tuple[str, torch.Tensor]], torch.Tensor]:
    """(the scheme's pieces with GPTQ's codes, the values GPTQ intends, in the scales' dtype). `scheme`: a
    m1.schemes.ct_pack.PackScheme."""
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32
    from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

    w = weight.to(device)
    args = scheme.args()
    scale, zero_point = compute_dynamic_scales_and_zp(w, args, module=None)
    grid = GroupGrid(scale, zero_point, scheme.group_size, args)
    values, codes = gptq_round(w.float(), h.to(device), grid, damp=rounding.damp, block=rounding.block,
                               act_order=rounding.act_order)
    pieces = {"weight_packed": pack_to_int32(codes.to(torch.int8), scheme.num_bits), "weight_scale": scale,
              "weight_shape": torch.tensor(tuple(w.shape))}  # symmetric (all m1 writes): no zero point stored
    order = [p.suffix for p in scheme.pieces("BF16", tuple(w.shape))]
    return [(s, pieces[s].contiguous().cpu()) for s in order], values.to(scale.dtype).cpu()
