"""The bitsandbytes schemes (nf4, fp4, int8): which tensors bitsandbytes writes for one weight, and their config.

A scheme is pure data: it predicts names, dtypes and shapes of what `m1.schemes.bnb_codec` will produce
(so a plan can size shards before a byte is quantized) and the `quantization_config` that tells
transformers and bitsandbytes how to read it back. The formulas follow bitsandbytes 0.50:

- int8 (LLM.int8, `Linear8bitLt` state dict): `weight` int8 [out, in], `SCB` float32 [out] (row absmax),
  `weight_format` uint8 scalar (0 = row-major).
- nf4 / fp4 (`Linear4bit` state dict): `weight` uint8 [ceil(n/2), 1] (two 4-bit codes a byte),
  `weight.absmax` (float32 per block, or uint8 codes with double quant), `weight.quant_map` float32 [16],
  with double quant `weight.nested_absmax` float32 [ceil(blocks/256)] and `weight.nested_quant_map`
  float32 [256], and `weight.quant_state.bitsandbytes__<type>` uint8: the JSON of the non-tensor state.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

from m1.dtypes import DTYPE_BYTES
from m1.errors import CheckpointError, ConfigError, UsageError
from m1.schemes import Family, Piece, Scheme
from m1.schemes.bnb_layout import NESTED_BLOCKSIZE, STATE_DTYPES
from m1.schemes.gptq import Rounding

SCHEMES = ("nf4", "fp4", "int8")
FAMILY_NAME = "bitsandbytes"
# What bitsandbytes writes beside a quantized `<module>.weight`, in state-dict order.
COMPANIONS: tuple[str, ...] = (
    "weight.absmax",
    "weight.quant_map",
    "weight.nested_absmax",
    "weight.nested_quant_map",
    "weight.quant_state.bitsandbytes__nf4",
    "weight.quant_state.bitsandbytes__fp4",
    "SCB",
    "weight_format",
)
DEFAULT_BLOCKSIZE = 64  # bitsandbytes' own default for quantize_4bit
# Non-expert modules that stay in their source dtype, as leaf names: transformers 4.x matches them as
# substrings of module names and 5.x as name components, so both honour this form.
SKIP_MODULES = ("qkv_proj", "output_gate", "out_proj", "q_proj", "k_proj", "v_proj", "o_proj", "gate", "lm_head")
FLOAT_REPR_MAX = 24  # longest repr() of a Python float, e.g. -2.2250738585072014e-308


@dataclass(frozen=True)
class BnbScheme(Scheme):
    name: str  # nf4 | fp4 | int8
    blocksize: int | None = None  # 4-bit only; None when a config did not record it
    double_quant: bool = False  # 4-bit only
    rounding: Rounding = Rounding()  # how the codes are chosen within bitsandbytes' scales (m1.schemes.gptq)
    family = FAMILY_NAME
    formats = ("release", "hf")  # safetensors checkpoints that transformers + bitsandbytes load

    @classmethod
    def make(cls, name: str, blocksize: int | None = None, double_quant: bool | None = None,
             imatrix: str | None = None, rounding: Rounding | None = None) -> BnbScheme:
        """From command-line options; unknown names and options that do not apply are usage errors."""
        if imatrix is not None:
            raise UsageError("--imatrix does not apply to bitsandbytes schemes",
                             hint="it serves the ggml K-quants, in the format that stores ggml types: --scheme q4_k "
                                  "--imatrix FILE")
        if name not in SCHEMES:
            raise UsageError(f"unknown scheme {name!r}", hint=f"use one of {', '.join(SCHEMES)}")
        if name == "int8":
            if blocksize is not None:
                raise UsageError("--blocksize does not apply to int8 (LLM.int8 scales each row)",
                                 hint="drop --blocksize, or use --scheme nf4/fp4")
            if double_quant is not None:
                raise UsageError("--double-quant does not apply to int8", hint="drop it, or use --scheme nf4/fp4")
            return cls("int8", rounding=rounding or Rounding())
        blocksize = DEFAULT_BLOCKSIZE if blocksize is None else blocksize
        if blocksize <= 0:
            raise UsageError(f"--blocksize must be positive, got {blocksize}")
        return cls(name, blocksize, True if double_quant is None else double_quant, rounding or Rounding())

    @property
    def four_bit(self) -> bool:
        return self.name in ("nf4", "fp4")

    @property
    def state_suffix(self) -> str:
        return f"weight.quant_state.bitsandbytes__{self.name}"

    def options(self) -> dict[str, Any]:
        gptq = {"rounding": self.rounding.record()} if self.rounding.gptq else {}
        return {"blocksize": self.blocksize, "double_quant": self.double_quant, **gptq}

    def describe(self) -> str:
        gptq = ", GPTQ rounding" if self.rounding.gptq else ""
        if not self.four_bit:
            return "int8 (LLM.int8, row-wise)" + gptq
        return f"{self.name}, blocksize {self.blocksize}" + (", double quant" if self.double_quant else "") + gptq

    # ---- what gets written -------------------------------------------------------------------------
    def check_weight(self, name: str, dtype: str, shape: tuple[int, ...], file: str | None = None) -> None:
        """Can bitsandbytes quantize this weight under this scheme? A usage error naming it if not."""
        if dtype not in STATE_DTYPES:
            raise UsageError(f"dtype {dtype} cannot be quantized (bitsandbytes takes bf16, fp16 or fp32)",
                             file=file, tensor=name, hint="convert it first: m1 convert SRC DST --dtype bf16")
        if len(shape) != 2:
            raise UsageError(f"expected a 2-D [out, in] weight, got shape {list(shape)}", file=file, tensor=name,
                             hint="keep it unquantized with --keep")
        n = math.prod(shape)
        if self.four_bit and self.blocksize and n % self.blocksize:
            raise UsageError(f"shape {list(shape)} ({n} values) is not a multiple of --blocksize {self.blocksize}",
                             file=file, tensor=name,
                             hint="pick a blocksize that divides it (e.g. 64), or keep this tensor with --keep")

    def straddles_rows(self, shape: tuple[int, ...]) -> bool:
        """Whether some 4-bit block spans two rows (rows not a multiple of the blocksize).

        The format is fine (bitsandbytes blocks the flattened tensor, as its CUDA kernels and m1's readers
        do), but bitsandbytes 0.50's CPU kernels (dequantize_4bit of a 2-D state, Linear4bit on CPU)
        assume blocks inside rows and read such a weight back wrong.
        """
        return self.four_bit and bool(self.blocksize) and shape[-1] % self.blocksize != 0

    def pieces(self, dtype: str, shape: tuple[int, ...]) -> list[Piece]:
        """The tensors written for one weight, in the order bitsandbytes' state dict lists them."""
        n = math.prod(shape)
        if not self.four_bit:
            out, _ = shape
            return [Piece("weight", "I8", tuple(shape), n), Piece("SCB", "F32", (out,), 4 * out),
                    Piece("weight_format", "U8", (), 1)]
        packed = (n + 1) // 2
        blocks = math.ceil(n / self.blocksize) if self.blocksize else None
        out = [Piece("weight", "U8", (packed, 1), packed)]
        absmax_dtype = "U8" if self.double_quant else "F32"
        out.append(_piece("weight.absmax", absmax_dtype, blocks))
        out.append(Piece("weight.quant_map", "F32", (16,), 64))
        if self.double_quant:
            nested = math.ceil(blocks / NESTED_BLOCKSIZE) if blocks is not None else None
            out.append(_piece("weight.nested_absmax", "F32", nested))
            out.append(Piece("weight.nested_quant_map", "F32", (256,), 1024))
        state = self.state_json(dtype, shape)
        # With double quant the JSON holds the absmax mean as a float: its length is known only after quantizing.
        out.append(Piece(self.state_suffix, "U8", (len(state),), len(state), exact=not self.double_quant))
        return out

    def state_json(self, dtype: str, shape: tuple[int, ...]) -> bytes:
        """QuantState.as_dict(packed=True)'s JSON; with double quant an upper bound (longest float offset)."""
        state: dict[str, Any] = {"quant_type": self.name, "blocksize": self.blocksize, "dtype": STATE_DTYPES[dtype],
                                 "shape": list(shape)}
        if self.double_quant:
            state.update(nested_blocksize=NESTED_BLOCKSIZE, nested_dtype="float32", nested_offset=0.0)
            text = json.dumps(state)
            return text.replace("0.0}", "0" * FLOAT_REPR_MAX + "}").encode()
        return json.dumps(state).encode()

    def bytes_after(self, dtype: str, shape: tuple[int, ...]) -> int:
        return sum(p.nbytes for p in self.pieces(dtype, shape))

    def check_pieces(self, weight: str, found: dict[str, tuple[str, tuple[int, ...]]], shape: tuple[int, ...],
                     file: str | None = None) -> None:
        """Stored companions (suffix -> dtype, shape, from headers) against what this scheme writes for a
        weight of `shape`: a CheckpointError naming the first tensor that is missing, extra or misshapen."""
        module = weight[: -len(".weight")]
        expected = {p.suffix: p for p in self.pieces("BF16", shape)}
        for suffix, piece in expected.items():
            name = f"{module}.{suffix}"
            if suffix not in found:
                raise CheckpointError(f"a {self.describe()} weight lacks its bitsandbytes tensor {suffix}", file=file,
                                      tensor=name, hint="the quantized checkpoint is incomplete; re-run m1 quantize")
            dtype, got = found[suffix]
            if dtype != piece.dtype:
                raise CheckpointError(f"dtype {dtype}, {self.describe()} stores {piece.dtype}", file=file, tensor=name,
                                      hint="the quantized tensors do not match config.json's quantization_config")
            # the JSON state's length depends on the source dtype's name: its values are checked on reading
            sized = piece.exact and piece.shape is not None and suffix != self.state_suffix
            if sized and tuple(got) != tuple(piece.shape):
                raise CheckpointError(f"shape {list(got)}, {self.describe()} of a {list(shape)} weight stores "
                                      f"{list(piece.shape)}", file=file, tensor=name,
                                      hint="the quantized tensors are damaged or were made with other options")
        for suffix in found:
            if suffix not in expected:
                raise CheckpointError(f"bitsandbytes tensor {suffix} is not part of {self.describe()}", file=file,
                                      tensor=f"{module}.{suffix}",
                                      hint="the quantized tensors do not match config.json's quantization_config")

    def check_supported(self, device: Any) -> None:
        from m1.schemes.bnb_codec import check_supported

        check_supported(self, device)

    def quantize(self, weight: Any, device: Any, name: str = "") -> list[tuple[str, Any]]:
        from m1.schemes.bnb_codec import quantize_weight

        if self.rounding.gptq:
            from m1.schemes.bnb_gptq import quantize_gptq
            from m1.schemes.gptq import load_hessian

            h, tokens = load_hessian(self.rounding.hessians, name)
            if h is not None and self.rounding.enough(tokens, weight.shape[-1]):
                return quantize_gptq(self, weight, h, self.rounding, device, name)[0]
        return quantize_weight(self, weight, device, name)

    def dequantize(self, pieces: dict[str, Any], device: Any = "cpu", name: str = "",
                   shape: tuple[int, ...] | None = None) -> Any:
        from m1.schemes.bnb_codec import dequantize_pieces

        return dequantize_pieces(pieces, device, name, scheme=self, shape=shape)

    # ---- config.json ---------------------------------------------------------------------------------
    def quantization_config(self, kept_experts: list[str]) -> dict[str, Any]:
        """The `quantization_config` block, in transformers' BitsAndBytesConfig.to_dict() vocabulary.

        llm_int8_skip_modules: the non-expert leaf names, plus the full module names of experts kept
        unquantized (`kept_experts`, weight names)."""
        skip_modules = [*SKIP_MODULES, *(name[: -len(".weight")] for name in kept_experts)]
        qc: dict[str, Any] = {
            "quant_method": "bitsandbytes",
            "load_in_4bit": self.four_bit,
            "load_in_8bit": not self.four_bit,
            "llm_int8_threshold": 6.0,
            "llm_int8_skip_modules": list(skip_modules),
            "llm_int8_enable_fp32_cpu_offload": False,
            "llm_int8_has_fp16_weight": False,
        }
        if self.four_bit:
            qc.update(bnb_4bit_quant_type=self.name, bnb_4bit_use_double_quant=self.double_quant,
                      bnb_4bit_compute_dtype="bfloat16", bnb_4bit_quant_storage="uint8",
                      m1_blocksize=self.blocksize)  # BitsAndBytesConfig has no field for it
        if self.rounding.gptq:  # how the codes were chosen (the decoder is the same)
            qc["m1_rounding"] = self.rounding.record()
        return qc

    @classmethod
    def from_quantization_config(cls, qc: dict[str, Any], file: str | None = None) -> BnbScheme:
        if not isinstance(qc, dict) or qc.get("quant_method") != "bitsandbytes":
            method = qc.get("quant_method") if isinstance(qc, dict) else None
            raise ConfigError(f"quantization_config.quant_method is {method!r}; only bitsandbytes is understood",
                              file=file)
        if qc.get("load_in_8bit"):
            return cls("int8")
        if qc.get("load_in_4bit"):
            quant_type = qc.get("bnb_4bit_quant_type", "fp4")  # transformers' default
            if quant_type not in ("nf4", "fp4"):
                raise ConfigError(f"bnb_4bit_quant_type {quant_type!r} is neither nf4 nor fp4", file=file)
            blocksize = qc.get("m1_blocksize")
            return cls(quant_type, int(blocksize) if blocksize else None, bool(qc.get("bnb_4bit_use_double_quant")))
        raise ConfigError("quantization_config sets neither load_in_4bit nor load_in_8bit", file=file)


def _piece(suffix: str, dtype: str, count: int | None) -> Piece:
    if count is None:
        return Piece(suffix, dtype, None, 0)
    return Piece(suffix, dtype, (count,), count * DTYPE_BYTES[dtype])


FAMILY = Family(
    name=FAMILY_NAME,
    schemes=SCHEMES,
    companions=COMPANIONS,
    make=BnbScheme.make,
    claims=lambda qc: qc.get("quant_method") == "bitsandbytes",
    from_quantization_config=BnbScheme.from_quantization_config,
    storage_dtypes=frozenset({"U8", "I8"}),
    gptq_schemes=SCHEMES,
)
