"""GPTQ codes within ggml's own K-quant scales (q2_k, q3_k, q4_k, q5_k, q6_k), in ggml's own blocks.

ggml quantizes the weight first (with the imatrix, as llama-quantize does): its super-block scales, sub-block
scales and mins are kept byte for byte; GPTQ (m1.schemes.gptq) then only chooses every weight's code. What a code
means at a weight is asked of ggml's own dequantizer, never computed here: the blocks are rewritten with every
weight at code k, for each k, and decoded (`ggml_lib.dequantize_rows`), which gives the exact value each code
decodes to at each position. GPTQ picks among those, and the codes are written back into the blocks at the bit
positions ggml's `dequantize_row_*` reads them from (`LAYOUTS`, from ggml-common.h and ggml-quants.c), so ggml
decodes the result to exactly the values GPTQ intended (tests/test_gptq_ggml.py checks it, and llama.cpp runs the
files).

Rows are rounded in chunks (a code's value table is levels x rows x columns of float32), each row with the same
Cholesky factor: GPTQ's column sweep never mixes rows.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from m1.schemes.gptq import Rounding, gptq_factor, gptq_round

QK_K = 256  # values in a K-quant super-block
TABLE_BYTES = 256 << 20  # at most this much value table at a time: rows are rounded in chunks that fit it


def _split_2bit(codes: np.ndarray) -> np.ndarray:
    """Codes [.., 256] -> the 64 bytes ggml's q2_K/q3_K `qs` holds: value 128 n + 32 j + l at bits 2j of byte
    32 n + l."""
    c = codes.reshape(*codes.shape[:-1], 2, 4, 32).astype(np.uint8)
    out = c[..., 0, :] | (c[..., 1, :] << 2) | (c[..., 2, :] << 4) | (c[..., 3, :] << 6)
    return out.reshape(*codes.shape[:-1], 64)


def _write_q2_k(blocks: np.ndarray, codes: np.ndarray) -> None:  # block: scales[16] qs[64] d dmin
    blocks[..., 16:80] = _split_2bit(codes & 3)


def _write_q3_k(blocks: np.ndarray, codes: np.ndarray) -> None:  # block: hmask[32] qs[64] scales[12] d
    # code k decodes to dl * (k - 4): the low 2 bits in qs, the high bit set in hmask (bit 4 n + j of byte l)
    blocks[..., 32:96] = _split_2bit(codes & 3)
    high = (codes >> 2).reshape(*codes.shape[:-1], 2, 4, 32).astype(np.uint8)
    mask = np.zeros((*codes.shape[:-1], 32), dtype=np.uint8)
    for n in range(2):
        for j in range(4):
            mask |= high[..., n, j, :] << (4 * n + j)
    blocks[..., 0:32] = mask


def _write_q4_k(blocks: np.ndarray, codes: np.ndarray) -> None:  # block: d dmin scales[12] qs[128]
    c = codes.reshape(*codes.shape[:-1], 4, 2, 32).astype(np.uint8)  # 64-value chunks: low then high nibbles
    blocks[..., 16:144] = (c[..., 0, :] | (c[..., 1, :] << 4)).reshape(*codes.shape[:-1], 128)


def _write_q5_k(blocks: np.ndarray, codes: np.ndarray) -> None:  # block: d dmin scales[12] qh[32] qs[128]
    _write_q4_k(blocks[..., 32:], codes & 15)  # qs at 48: the q4_K layout shifted by qh's 32 bytes
    high = (codes >> 4).reshape(*codes.shape[:-1], 4, 2, 32).astype(np.uint8)
    qh = np.zeros((*codes.shape[:-1], 32), dtype=np.uint8)
    for j in range(4):  # chunk j's low half at bit 2 j of qh[l], its high half at bit 2 j + 1
        qh |= (high[..., j, 0, :] << (2 * j)) | (high[..., j, 1, :] << (2 * j + 1))
    blocks[..., 16:48] = qh


def _write_q6_k(blocks: np.ndarray, codes: np.ndarray) -> None:  # block: ql[128] qh[64] scales[16] d
    # per 128-value half n, l < 32: values l, l+32, l+64, l+96 take ql[64 n + l] low/ -, ql[64 n + 32 + l] low,
    # ql[64 n + l] high, ql[64 n + 32 + l] high, and bits 0-1, 2-3, 4-5, 6-7 of qh[32 n + l] (ggml-quants.c)
    c = codes.reshape(*codes.shape[:-1], 2, 4, 32).astype(np.uint8)
    low, high = c & 15, c >> 4
    ql = np.concatenate([low[..., 0, :] | (low[..., 2, :] << 4), low[..., 1, :] | (low[..., 3, :] << 4)], axis=-1)
    qh = high[..., 0, :] | (high[..., 1, :] << 2) | (high[..., 2, :] << 4) | (high[..., 3, :] << 6)
    blocks[..., 0:128] = ql.reshape(*codes.shape[:-1], 128)
    blocks[..., 128:192] = qh.reshape(*codes.shape[:-1], 64)


@dataclass(frozen=True)
class Layout:
    levels: int  # codes 0 .. levels - 1
    block_bytes: int
    write: Callable[[np.ndarray, np.ndarray], None]  # (blocks [.., block_bytes] uint8, codes [.., 256]) in place


LAYOUTS = {
    "q2_k": Layout(4, 84, _write_q2_k),
    "q3_k": Layout(8, 110, _write_q3_k),
    "q4_k": Layout(16, 144, _write_q4_k),
    "q5_k": Layout(32, 176, _write_q5_k),
    "q6_k": Layout(64, 210, _write_q6_k),
}


def with_codes(name: str, blocks: np.ndarray, codes: np.ndarray) -> np.ndarray:
    """A copy of ggml blocks [rows, row_bytes] with every weight's code replaced by `codes` [rows, cols]."""
    layout = LAYOUTS[name]
    rows, cols = codes.shape
    out = blocks.copy().reshape(rows, cols // QK_K, layout.block_bytes)
    layout.write(out, codes.reshape(rows, cols // QK_K, QK_K))
    return out.reshape(blocks.shape)


def value_table(name: str, blocks: np.ndarray, cols: int) -> torch.Tensor:
    """float32 [levels, rows, cols]: what ggml's dequantizer makes of each code at each weight, these scales."""
    from m1.schemes import ggml_lib

    rows = blocks.shape[0]
    table = np.empty((LAYOUTS[name].levels, rows, cols), dtype=np.float32)
    for k in range(table.shape[0]):
        table[k] = ggml_lib.dequantize_rows(name, with_codes(name, blocks, np.full((rows, cols), k)), cols)
    return torch.from_numpy(table)


class TableGrid:
    """The nearest of the values ggml decodes at column j of these rows, and its code."""

    def __init__(self, table: torch.Tensor) -> None:
        self.table = table

    def __call__(self, w: torch.Tensor, col: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        candidates = self.table[:, :, int(col)]  # [levels, rows]
        codes = (candidates - w[None, :]).abs().argmin(dim=0)
        return candidates.gather(0, codes[None, :])[0], codes


def quantize_gptq(name: str, weight: torch.Tensor, h: torch.Tensor, rounding: Rounding,
                  importance: np.ndarray | None, tensor: str = "") -> tuple[np.ndarray, torch.Tensor]:
    """(ggml blocks uint8 [rows, row_bytes] of type `name` with GPTQ's codes, the values GPTQ intends, f32)."""
    from m1.schemes import ggml_lib

    w = weight.to(torch.float32).contiguous()
    rows, cols = w.shape
    blocks = ggml_lib.quantize_rows(name, w.numpy(), importance, tensor=tensor or None,
                                    threads=torch.get_num_threads())
    factor = gptq_factor(h.to(torch.float32), rounding.damp, rounding.act_order)
    step = max(1, TABLE_BYTES // (LAYOUTS[name].levels * cols * 4))
    codes = np.empty((rows, cols), dtype=np.int64)
    values = torch.empty((rows, cols), dtype=torch.float32)
    for first in range(0, rows, step):
        part = slice(first, min(first + step, rows))
        grid = TableGrid(value_table(name, blocks[part], cols))
        v, c = gptq_round(w[part], h, grid, block=rounding.block, factor=factor)
        values[part], codes[part] = v, c.numpy()
    return with_codes(name, blocks, codes), values
