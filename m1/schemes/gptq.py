"""GPTQ (Frantar et al., 2022): round one input column at a time, pushing each column's rounding error onto the
columns not yet rounded through the Cholesky factor of the inverse of the input Hessian H = sum x x^T.

The format's scales are fixed beforehand (bitsandbytes' per-block absmax, LLM.int8's row absmax): this module
only chooses, for every weight, one value of the grid the format allows at that weight's position (`Grid`), so
the stored scales and the decoder stay the library's own. The column loop is the reference algorithm with lazy
batch updates (`block` columns at a time) and optional act-order (columns by decreasing H diagonal).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import torch

DEFAULT_DAMP = 0.01  # of the mean diagonal, as GPTQ, AutoGPTQ and llm-compressor
DEFAULT_BLOCK = 128  # columns per lazy batch update
DEFAULT_MIN_TOKENS = 0  # 0: at least as many routed tokens as the weight has input columns / 8 (see min_tokens)


@dataclass(frozen=True)
class Rounding:
    """How a scheme's codes are chosen: the scheme's own round-to-nearest, or GPTQ with its options."""

    method: str = "nearest"  # nearest | gptq
    damp: float = DEFAULT_DAMP
    block: int = DEFAULT_BLOCK
    act_order: bool = True
    min_tokens: int = DEFAULT_MIN_TOKENS
    calibration: str = ""  # what the Hessians were measured on (recorded, and in the plan fingerprint)
    calibration_tokens: int = 0
    calibration_ctx: int = 0
    hessians: str = ""  # folder of the Hessian pass's files (m1.quantize.hessian); not part of the record

    @property
    def gptq(self) -> bool:
        return self.method == "gptq"

    def record(self) -> dict[str, Any]:
        """For the job record, config.json and the plan fingerprint."""
        if not self.gptq:
            return {"method": self.method}
        return {"method": "gptq", "damp": self.damp, "block": self.block, "act_order": self.act_order,
                "min_tokens": self.min_tokens, "calibration": self.calibration,
                "calibration_tokens": self.calibration_tokens, "calibration_ctx": self.calibration_ctx}

    def enough(self, tokens: int, in_features: int) -> bool:
        """Whether an expert's routed tokens make a usable Hessian; else the scheme's own rounding."""
        need = self.min_tokens if self.min_tokens > 0 else max(1, in_features // 8)
        return tokens >= need


class Grid(Protocol):
    def __call__(self, w: torch.Tensor, cols: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """w: float32 [rows] (column `cols` of the weight, in its original column index): (the chosen values,
        their codes) of the grid the format allows there."""
        ...


def inverse_factor(h: torch.Tensor, damp: float) -> torch.Tensor:
    """Upper Cholesky factor of (H + damp * mean(diag H) * I)^-1; dead columns (never active) get 1 on the
    diagonal, so their error is not spread. More damping if H is not positive definite in float32."""
    h = h.clone()
    diag = torch.diagonal(h)
    dead = diag == 0
    diag[dead] = 1
    mean = float(diag.mean())
    for attempt in range(6):
        step = h.clone()
        torch.diagonal(step).add_(damp * (10**attempt) * mean)
        factor, info = torch.linalg.cholesky_ex(step)
        if int(info) == 0:
            inv = torch.cholesky_inverse(factor)
            upper, info = torch.linalg.cholesky_ex(inv, upper=True)
            if int(info) == 0:
                return upper
    raise ArithmeticError("the Hessian is not positive definite even with 1e5 x the damping")


def gptq_factor(h: torch.Tensor, damp: float = DEFAULT_DAMP,
                act_order: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """(the column order, the upper Cholesky factor of the damped inverse Hessian in that order): what every row
    of a weight shares, so rows may be rounded in chunks."""
    h = h.to(torch.float32)
    n = h.shape[0]
    perm = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(n, device=h.device)
    return perm, inverse_factor(h[perm][:, perm], damp)


def gptq_round(weight: torch.Tensor, h: torch.Tensor, grid: Grid, *, damp: float = DEFAULT_DAMP,
               block: int = DEFAULT_BLOCK, act_order: bool = True,
               factor: tuple[torch.Tensor, torch.Tensor] | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """(values float32 [out, in], codes int64 [out, in]) for weight [out, in] and its input Hessian h [in, in]
    (`factor`: gptq_factor's, when computed once for several row chunks of one weight)."""
    w = weight.detach().float().clone()
    perm, hinv = factor if factor is not None else gptq_factor(h.to(w.device), damp, act_order)
    perm, hinv = perm.to(w.device), hinv.to(w.device)
    n = w.shape[1]
    w = w[:, perm]
    values = torch.empty_like(w)
    codes = torch.empty(w.shape, dtype=torch.int64, device=w.device)
    for i1 in range(0, n, block):
        i2 = min(i1 + block, n)
        w1 = w[:, i1:i2].clone()
        err1 = torch.empty_like(w1)
        h1 = hinv[i1:i2, i1:i2]
        for i in range(i2 - i1):
            col = w1[:, i]
            q, c = grid(col, perm[i1 + i])
            values[:, i1 + i], codes[:, i1 + i] = q, c
            err = (col - q) / h1[i, i]
            w1[:, i:] -= err[:, None] * h1[i, i:][None, :]
            err1[:, i] = err
        w[:, i2:] -= err1 @ hinv[i1:i2, i2:]
    inv = torch.argsort(perm)
    return values[:, inv], codes[:, inv]


def layer_error(weight: torch.Tensor, values: torch.Tensor, h: torch.Tensor) -> float:
    """||W X - Q X||_F^2 = tr((W - Q) H (W - Q)^T), from the Hessian alone."""
    d = (weight.float() - values.float()).to(h.device)
    return float(torch.einsum("oi,ij,oj->", d, h.float(), d))


def hessian_key(name: str) -> str:
    """The stored matrix of a spec expert weight name: w3 reads w1's input."""
    return name.replace(".w3.weight", ".w1.weight")


def load_hessian(folder: str | Path, name: str) -> tuple[torch.Tensor | None, int]:
    """(H float32, routed tokens) of spec expert weight `name` from the Hessian pass's files
    (m1.quantize.hessian: one safetensors file a layer, the routed tokens in its metadata); (None, 0) for a
    weight that is not an expert's, (None, n) for an expert no token reached."""
    from safetensors import safe_open

    parts = name.split(".")
    if len(parts) < 7 or parts[3] != "block_sparse_moe" or parts[4] != "experts":
        return None, 0
    layer, expert = int(parts[2]), int(parts[5])
    with safe_open(str(Path(folder) / f"layer-{layer}.safetensors"), framework="pt") as f:
        counts = json.loads((f.metadata() or {})["tokens"])
        key = hessian_key(name)
        if key not in f.keys():
            return None, counts[expert]
        return f.get_tensor(key), counts[expert]
