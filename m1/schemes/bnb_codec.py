"""Quantize and dequantize one weight with bitsandbytes' own functions, in its own serialization.

Nothing here does quantization arithmetic by hand: 4-bit goes through `bnb.functional.quantize_4bit`
and `QuantState.as_dict(packed=True)` (what `Linear4bit._save_to_state_dict` writes), int8 through
`int8_vectorwise_quant` on fp16 (what `Int8Params` does before `Linear8bitLt._save_to_state_dict`).
On CPU a weight goes through bitsandbytes a few rows at a time (same bytes, checked; far less memory).
Reading back rebuilds the state with `QuantState.from_dict` and calls `dequantize_4bit` over the
flattened tensor, or `int8_vectorwise_dequant` (weight * SCB / 127).
"""

from __future__ import annotations

import json
import math
from typing import Protocol

import torch

from m1.errors import CheckpointError, UsageError
from m1.schemes.bnb_layout import NESTED_BLOCKSIZE, STATE_DTYPES


class Scheme(Protocol):
    """The options of a bitsandbytes scheme (m1.schemes.bnb.BnbScheme) that its calls need."""

    name: str
    blocksize: int | None
    double_quant: bool

    @property
    def four_bit(self) -> bool: ...
    @property
    def state_suffix(self) -> str: ...
    def describe(self) -> str: ...

_BNB: list = []


def bnb_functional():  # -> the bitsandbytes.functional module
    """bitsandbytes.functional, imported without its import-time noise on m1's stderr: a notice about an
    optional CPU matmul kernel that quantizing never uses, and torch deprecation warnings."""
    if not _BNB:
        import logging
        import warnings

        logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            import bitsandbytes.functional as F

        _BNB.append(F)
    return _BNB[0]


def check_supported(scheme: Scheme, device: torch.device) -> None:
    """Ask bitsandbytes itself whether it takes this blocksize on this device (one tiny quantization).

    This also imports bitsandbytes (seconds) before any timing starts or worker process is forked."""
    F = bnb_functional()
    if not scheme.four_bit:
        F.int8_vectorwise_quant(torch.ones(2, 64, dtype=torch.float16, device=device))
        return
    probe = torch.zeros(max(scheme.blocksize or 64, 64), dtype=torch.bfloat16, device=device)
    try:
        F.quantize_4bit(probe, blocksize=scheme.blocksize, compress_statistics=scheme.double_quant,
                        quant_type=scheme.name)
    except (ValueError, RuntimeError, AssertionError, NotImplementedError) as exc:
        import bitsandbytes

        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise UsageError(f"bitsandbytes {bitsandbytes.__version__} on {device.type} does not support --blocksize "
                         f"{scheme.blocksize} for {scheme.name} ({reason})",
                         hint="use a power of two such as 64 (the default), 128 or 256") from None


# ---- quantizing -------------------------------------------------------------------------------------


# bitsandbytes' CPU quantize_4bit makes several float32 copies of its input (~9x a bf16 tensor at peak);
# quantizing a few million values at a time keeps a worker's peak near the tensor's own size.
CHUNK_VALUES = 4 << 20
_CHUNKING_CHECKED: dict[tuple[str, int | None, bool], bool] = {}


def quantize_weight(scheme: Scheme, weight: torch.Tensor, device: torch.device,
                    name: str = "") -> list[tuple[str, torch.Tensor]]:
    """(suffix after the module name, CPU tensor) in the order bitsandbytes' state dict lists them."""
    F = bnb_functional()

    w = weight.to(device, non_blocking=False)
    rows = max(1, CHUNK_VALUES // max(1, w.shape[-1])) if w.device.type == "cpu" else w.shape[0]
    if scheme.four_bit:
        packed, state = quantize_4bit(scheme, w, rows)
        scales = torch.cat([state.state2.absmax, state.offset.reshape(1)]) if state.nested else state.absmax
        pieces = [("weight", packed)] + [("weight." + k, v) for k, v in state.as_dict(packed=True).items()]
    else:
        # Int8Params._quantize: fp16, then row-wise absmax scaling; no outlier columns held back (threshold 0).
        # Rows are independent, so row chunks give the same bytes with a bounded fp16 copy.
        parts = [F.int8_vectorwise_quant(w[i : i + rows].to(torch.float16))[:2] for i in range(0, w.shape[0], rows)]
        cb = torch.cat([p[0] for p in parts]) if len(parts) > 1 else parts[0][0]
        scb = torch.cat([p[1] for p in parts]) if len(parts) > 1 else parts[0][1]
        scales = scb
        pieces = [("weight", cb), ("SCB", scb), ("weight_format", torch.tensor(0, dtype=torch.uint8))]
    # A NaN/Inf (or, for int8, a value beyond fp16's range) poisons a whole block's scale: refuse it.
    if not bool(torch.isfinite(scales).all()):
        why = "NaN/Inf in the weight" + (" or values beyond fp16's +-65504 (LLM.int8 goes through fp16)"
                                         if not scheme.four_bit else "")
        raise CheckpointError(f"cannot quantize: {why}", tensor=name or None,
                              hint="check the source with m1 verify integrity --deep, or keep this tensor with --keep")
    return [(suffix, t.detach().to("cpu").contiguous()) for suffix, t in pieces]


def quantize_4bit(scheme: Scheme, w: torch.Tensor, rows: int):  # -> (packed, bitsandbytes QuantState)
    """bnb.functional.quantize_4bit(w, ...), computed `rows` rows at a time when that gives the same result.

    Blocks lie inside rows (Scheme.check_weight), so row chunks quantize to exactly the packed bytes and
    absmax of the whole tensor; the double quant of the absmax is then the two calls quantize_4bit itself
    makes (mean offset, quantize_blockwise with blocksize 256). Whether this composition still equals
    bitsandbytes' own result is checked once per process on a small tensor; if not, no chunking.
    """
    F = bnb_functional()
    kwargs = dict(blocksize=scheme.blocksize, quant_type=scheme.name, quant_storage=torch.uint8)
    if rows >= w.shape[0] or w.shape[-1] % scheme.blocksize or not _chunking_matches(scheme):
        return F.quantize_4bit(w, compress_statistics=scheme.double_quant, **kwargs)
    parts = [F.quantize_4bit(w[i : i + rows], compress_statistics=False, **kwargs) for i in range(0, w.shape[0], rows)]
    packed = torch.cat([p for p, _ in parts])
    absmax = torch.cat([s.absmax for _, s in parts])
    first = parts[0][1]
    del parts
    if not scheme.double_quant:
        return packed, F.QuantState(absmax=absmax, shape=w.shape, code=first.code, blocksize=scheme.blocksize,
                                    quant_type=scheme.name, dtype=w.dtype)
    offset = absmax.mean()
    qabsmax, state2 = F.quantize_blockwise(absmax - offset, blocksize=NESTED_BLOCKSIZE)
    return packed, F.QuantState(absmax=qabsmax, shape=w.shape, code=first.code, blocksize=scheme.blocksize,
                                quant_type=scheme.name, dtype=w.dtype, offset=offset, state2=state2)


def _chunking_matches(scheme: Scheme) -> bool:
    key = (scheme.name, scheme.blocksize, scheme.double_quant)
    if key not in _CHUNKING_CHECKED:
        F = bnb_functional()
        sample = torch.randn(6, 2 * scheme.blocksize, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
        _CHUNKING_CHECKED[key] = True  # so the call below takes the chunked path
        ours = quantize_4bit(scheme, sample, 2)
        theirs = F.quantize_4bit(sample, blocksize=scheme.blocksize, compress_statistics=scheme.double_quant,
                                 quant_type=scheme.name, quant_storage=torch.uint8)
        same = torch.equal(ours[0], theirs[0])
        a, b = ours[1].as_dict(packed=True), theirs[1].as_dict(packed=True)
        same = same and a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
        _CHUNKING_CHECKED[key] = same
    return _CHUNKING_CHECKED[key]


# ---- reading back -----------------------------------------------------------------------------------


def quant_state(pieces: dict[str, torch.Tensor], device: torch.device | str = "cpu", weight_name: str = ""):
    """bitsandbytes' QuantState for a 4-bit weight, rebuilt by QuantState.from_dict."""
    QuantState = bnb_functional().QuantState

    qs_dict = {k[len("weight."):]: v for k, v in pieces.items() if k.startswith("weight.")}
    try:
        return QuantState.from_dict(qs_dict, device=torch.device(device))
    except (ValueError, KeyError, AssertionError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"bitsandbytes cannot rebuild the 4-bit quant state ({type(exc).__name__}: {exc})",
                              tensor=weight_name, hint="the quantized tensors are damaged or incomplete") from None


def dequantize_pieces(pieces: dict[str, torch.Tensor], device: torch.device | str = "cpu",
                      weight_name: str = "", scheme: Scheme | None = None,
                      shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """The weight back in floating point: the source dtype for 4-bit (it is in the state), float32 for int8.

    With `scheme` and `shape` (what config.json and the spec say), every stored value that bitsandbytes
    would trust is checked first: a short absmax would be read past its end, another blocksize or quant
    type would decode to other numbers, silently."""
    F = bnb_functional()

    if scheme is not None and shape is not None:
        check_data(pieces, scheme, shape, weight_name)
    weight = pieces["weight"].to(device)
    if "SCB" in pieces:
        fmt = pieces.get("weight_format")
        if fmt is not None and int(fmt.reshape(-1)[0]) != 0:
            raise CheckpointError(f"int8 weight_format {int(fmt.reshape(-1)[0])} is not row-major (0)",
                                  tensor=weight_name, hint="only row-major int8 (bitsandbytes >= 0.45) is supported")
        return F.int8_vectorwise_dequant(weight, pieces["SCB"].to(device))
    state = quant_state(pieces, device, weight_name)
    return dequantize_flat(weight, state)


def dequantize_flat(weight: torch.Tensor, state) -> torch.Tensor:  # state: bitsandbytes QuantState
    """dequantize_4bit over the flattened tensor, reshaped back.

    bitsandbytes quantizes the flattened tensor in blocks; its CPU dequantize kernel (0.50) instead
    assumes blocks never straddle rows and returns wrong values for other checkpoints' shapes (rows
    not a multiple of the blocksize). Asking for the 1-D shape is the same bitsandbytes call on every
    backend and is right for any shape.
    """
    F = bnb_functional()
    shape = state.shape
    state.shape = torch.Size([shape.numel()])
    try:
        return F.dequantize_4bit(weight, state).reshape(shape)
    finally:
        state.shape = shape


def check_data(pieces: dict[str, torch.Tensor], scheme: Scheme, shape: tuple[int, ...], name: str) -> None:
    def bad(message: str) -> CheckpointError:
        return CheckpointError(message, tensor=name, hint="the quantized tensors are damaged or were made with "
                               "other options than config.json's quantization_config says; re-run m1 quantize")

    n = math.prod(shape)
    if not scheme.four_bit:
        if "SCB" not in pieces:
            raise bad("an int8 weight without its SCB (row scales)")
        if tuple(pieces["weight"].shape) != tuple(shape) or pieces["SCB"].numel() != shape[0]:
            raise bad(f"int8 weight {list(pieces['weight'].shape)} with {pieces['SCB'].numel()} row scales, "
                      f"the spec says {list(shape)}")
        return
    state_key = scheme.state_suffix
    if state_key not in pieces:
        raise bad(f"a {scheme.describe()} weight without its {state_key}")
    try:
        state = json.loads(bytes(pieces[state_key].reshape(-1).tolist()).decode())
    except (UnicodeDecodeError, ValueError):
        raise bad("the 4-bit quant state is not valid JSON") from None
    if not isinstance(state, dict):
        raise bad("the 4-bit quant state is not a JSON object")
    if state.get("quant_type") != scheme.name:
        raise bad(f"the quant state says {state.get('quant_type')!r}, config.json says {scheme.name}")
    blocksize = state.get("blocksize")
    if not isinstance(blocksize, int) or blocksize <= 0 or (scheme.blocksize and blocksize != scheme.blocksize):
        raise bad(f"the quant state says blocksize {blocksize!r}, config.json says {scheme.blocksize}")
    if list(state.get("shape") or []) != list(shape):
        raise bad(f"the quant state says shape {state.get('shape')}, the spec says {list(shape)}")
    if state.get("dtype") not in STATE_DTYPES.values():
        raise bad(f"the quant state's dtype {state.get('dtype')!r} is not a float dtype")
    blocks = math.ceil(n / blocksize)
    if pieces["weight"].numel() != (n + 1) // 2:
        raise bad(f"{pieces['weight'].numel()} packed bytes for {n} values (needs {(n + 1) // 2})")
    absmax = pieces.get("weight.absmax")
    if absmax is None or absmax.numel() != blocks:
        raise bad(f"absmax holds {None if absmax is None else absmax.numel()} values for {blocks} blocks")
    if scheme.double_quant != ("weight.nested_absmax" in pieces):
        raise bad("double quant per config.json and the stored tensors disagree")
    if scheme.double_quant:
        nested = pieces["weight.nested_absmax"].numel()
        want = math.ceil(blocks / int(state.get("nested_blocksize") or NESTED_BLOCKSIZE))
        if state.get("nested_blocksize") != NESTED_BLOCKSIZE or nested != want:
            raise bad(f"nested absmax holds {nested} values for {blocks} blocks in groups of "
                      f"{state.get('nested_blocksize')!r} (needs {want} in groups of {NESTED_BLOCKSIZE})")
