"""FP8 block-wise (DeepSeek-V3 style), the serving format of MiniMax-M2 and transformers' FineGrainedFP8.

A quantized `<module>.weight` is stored as float8_e4m3fn of its own shape, beside `<module>.weight_scale_inv`,
float32 [ceil(out/128), ceil(in/128)]: one scale per 128x128 block, amax/448, which the reader multiplies
the block by (the name is DeepSeek's: the inverse of the factor the weight was multiplied by). config.json
says `quant_method: fp8, activation_scheme: dynamic, weight_block_size: [128, 128]` and lists the modules left
in bf16 (router, norms, embedding, head, attention unless asked) under `modules_to_not_convert` and
`ignored_layers` (transformers reads either; MiniMax ships the latter).

The math is torch's own float8 cast. m1 writes only whole blocks: transformers 5.24's CPU reader
(`Fp8Dequantize`) derives the block from the scale grid (rows // grid rows), which mis-scales a ragged
(ceil-div) grid, so a dimension that is not a multiple of 128 is refused. Reading, a ragged grid is taken as
the DeepSeek convention says (the last block of a row or column is partial), as compressed-tensors'
`FP8BlockDequantizer` and transformers' kernels do.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from typing import Any

from m1.errors import CheckpointError, ConfigError, UsageError
from m1.schemes import Family, Piece, Scheme, check_float_matrix, module_of

SCHEMES = ("fp8",)
FAMILY_NAME = "fp8-block"  # the family (help: "fp8-block fp8"); its one scheme is fp8
SCALE = "weight_scale_inv"
COMPANIONS: tuple[str, ...] = (SCALE,)
BLOCK = (128, 128)
FP8_MAX = 448.0  # torch.finfo(torch.float8_e4m3fn).max
# Kept in their source dtype, as module-name suffixes: transformers matches a suffix (`endswith`) or a prefix;
# they are specific enough that `block_sparse_moe.gate` never hits `self_attn.output_gate`.
ALWAYS_KEPT = ("model.embed_tokens", "input_layernorm", "post_attention_layernorm", "self_attn.norm",
               "block_sparse_moe.gate", "model.norm", "lm_head")
ATTENTION = ("self_attn.qkv_proj", "self_attn.output_gate", "self_attn.out_proj", "self_attn.q_proj",
             "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj")
FLOATS = ("F32", "F16", "BF16")


@dataclass(frozen=True)
class Fp8Scheme(Scheme):
    name: str = "fp8"
    block: tuple[int, int] = BLOCK
    attention: bool = False  # the attention projections are FP8 too (their names leave the skip list)
    family = FAMILY_NAME
    formats = ("release", "hf")  # safetensors checkpoints that transformers' FineGrainedFP8 loads

    @classmethod
    def make(cls, name: str, blocksize: int | None = None, double_quant: bool | None = None,
             imatrix: str | None = None) -> Fp8Scheme:
        for flag, value in (("--blocksize", blocksize), ("--double-quant", double_quant), ("--imatrix", imatrix)):
            if value is not None:
                raise UsageError(f"{flag} does not apply to fp8 (128x128 blocks, one fp32 scale each)",
                                 hint=f"drop {flag}")
        if name not in SCHEMES:
            raise UsageError(f"unknown scheme {name!r}", hint=f"use one of {', '.join(SCHEMES)}")
        return cls(name)

    def describe(self) -> str:
        return f"fp8 (float8_e4m3fn, {self.block[0]}x{self.block[1]} blocks, fp32 weight_scale_inv)"

    def options(self) -> dict[str, Any]:
        return {"weight_block_size": list(self.block), "attention": self.attention}

    def check_supported(self, device: Any) -> None:
        pass  # torch casts to float8 on every device

    def for_attention(self, name: str) -> Fp8Scheme | None:
        return replace(self, attention=True) if name == self.name else None

    def grid(self, shape: tuple[int, ...]) -> tuple[int, int]:
        return math.ceil(shape[0] / self.block[0]), math.ceil(shape[1] / self.block[1])

    # ---- what gets written -------------------------------------------------------------------------
    def check_weight(self, name: str, dtype: str, shape: tuple[int, ...], file: str | None = None) -> None:
        check_float_matrix(self.name, name, dtype, shape, file, FLOATS)
        if shape[0] % self.block[0] or shape[1] % self.block[1]:
            raise UsageError(f"shape {list(shape)} is not a whole number of {self.block[0]}x{self.block[1]} fp8 "
                             "blocks (transformers' CPU reader would mis-scale a partial block)", file=file,
                             tensor=name, hint="keep this tensor with --keep, or quantize with another scheme")

    def pieces(self, dtype: str, shape: tuple[int, ...]) -> list[Piece]:
        rows, cols = self.grid(shape)
        return [Piece("weight", "F8_E4M3", tuple(shape), math.prod(shape)),
                Piece(SCALE, "F32", (rows, cols), 4 * rows * cols)]

    def quantize(self, weight: Any, device: Any, name: str = "") -> list[tuple[str, Any]]:
        import torch

        w = weight.to(device=device, dtype=torch.float32)
        (out, inp), (br, bc) = w.shape, self.block
        blocks = w.reshape(out // br, br, inp // bc, bc)
        amax = blocks.abs().amax(dim=(1, 3))
        if not bool(torch.isfinite(amax).all()):
            raise CheckpointError("the weight holds NaN or Inf values: it cannot be scaled to fp8", tensor=name,
                                  hint="m1 verify integrity --deep SRC finds them; fix the source")
        scale = torch.where(amax > 0, amax / FP8_MAX, torch.ones_like(amax))  # an all-zero block keeps scale 1
        q = (blocks / scale[:, None, :, None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
        return [("weight", q.reshape(out, inp).cpu()), (SCALE, scale.cpu())]

    def dequantize(self, pieces: dict[str, Any], device: Any = "cpu", name: str = "",
                   shape: tuple[int, ...] | None = None) -> Any:
        """weight x its block's weight_scale_inv, in fp32; a partial last block (a ragged grid) as DeepSeek's."""
        import torch

        q, scale = pieces["weight"], pieces.get(SCALE)
        if scale is None or q.dtype != torch.float8_e4m3fn or scale.dtype != torch.float32 or q.dim() != 2 \
                or tuple(scale.shape) != self.grid(tuple(q.shape)):
            raise CheckpointError("not an fp8 weight with its fp32 block scales", tensor=name,
                                  hint="re-run m1 quantize")
        if not bool((torch.isfinite(scale) & (scale > 0)).all()):
            raise CheckpointError("holds a scale that is not a positive finite number",
                                  tensor=f"{module_of(name)}.{SCALE}" if name else SCALE,
                                  hint="the quantized tensors are damaged; re-run m1 quantize")
        (out, inp), (br, bc) = q.shape, self.block
        rows, cols = scale.shape
        w = torch.zeros(rows * br, cols * bc, dtype=torch.float32, device=device)
        w[:out, :inp] = q.to(device=device, dtype=torch.float32)
        w = (w.reshape(rows, br, cols, bc) * scale.to(device)[:, None, :, None]).reshape(rows * br, cols * bc)
        return w[:out, :inp].contiguous()

    def check_pieces(self, weight: str, found: dict[str, tuple[str, tuple[int, ...]]], shape: tuple[int, ...],
                     file: str | None = None) -> None:
        """The stored weight and its scale (headers) against what fp8 stores for a weight of `shape`."""
        module = weight[: -len(".weight")]
        for piece in self.pieces("BF16", shape):
            name = f"{module}.{piece.suffix}"
            if piece.suffix not in found:
                raise CheckpointError(f"an fp8 weight lacks its {piece.suffix}", file=file, tensor=name,
                                      hint="the quantized checkpoint is incomplete; re-run m1 quantize")
            dtype, got = found[piece.suffix]
            if dtype != piece.dtype:
                raise CheckpointError(f"dtype {dtype}, {self.describe()} stores {piece.dtype}", file=file, tensor=name,
                                      hint="the quantized tensors do not match config.json's quantization_config")
            if tuple(got) != tuple(piece.shape):
                raise CheckpointError(f"shape {list(got)}, {self.describe()} of a {list(shape)} weight stores "
                                      f"{list(piece.shape)}", file=file, tensor=name,
                                      hint="the quantized tensors are damaged or were made with another block size")
        for suffix in found:
            if suffix not in ("weight", SCALE):
                raise CheckpointError(f"{suffix} is not part of {self.describe()}", file=file,
                                      tensor=f"{module}.{suffix}",
                                      hint="the quantized tensors do not match config.json's quantization_config")

    # ---- config.json ---------------------------------------------------------------------------------
    def skip_modules(self, kept_experts: list[str]) -> list[str]:
        kept = [*ALWAYS_KEPT, *(() if self.attention else ATTENTION)]
        return [*kept, *(name[: -len(".weight")] for name in kept_experts)]

    def quantization_config(self, kept_experts: list[str]) -> dict[str, Any]:
        """FineGrainedFP8Config's vocabulary (DeepSeek-V3's and MiniMax-M2's keys); the skip list twice."""
        skip = self.skip_modules(kept_experts)
        return {"quant_method": "fp8", "activation_scheme": "dynamic", "fmt": "e4m3",
                "weight_block_size": list(self.block), "modules_to_not_convert": skip, "ignored_layers": list(skip)}

    @classmethod
    def from_quantization_config(cls, qc: dict[str, Any], file: str | None = None) -> Fp8Scheme:
        if not isinstance(qc, dict) or qc.get("quant_method") != "fp8":
            raise ConfigError(f"quantization_config.quant_method is {qc.get('quant_method')!r}, not fp8", file=file)
        if qc.get("activation_scheme", "dynamic") != "dynamic":
            raise ConfigError(f"activation_scheme {qc.get('activation_scheme')!r}: m1 reads dynamic-activation fp8 "
                              "(weights and their block scales) only", file=file)
        if qc.get("scale_fmt", "float") != "float" or qc.get("expert_dtype", "fp8") != "fp8":
            raise ConfigError("fp8 with ue8m0 scales or fp4 experts is not read by m1 (fp32 block scales only)",
                              file=file)
        block = qc.get("weight_block_size")
        if not (isinstance(block, list | tuple) and len(block) == 2
                and all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
            raise ConfigError(f"weight_block_size {block!r} is not two positive integers (per-tensor fp8 is not "
                              "read by m1)", file=file, hint="m1 reads block-wise fp8, e.g. [128, 128]")
        skip = qc.get("modules_to_not_convert") or qc.get("ignored_layers") or []
        return cls("fp8", (int(block[0]), int(block[1])), attention=not any(n in skip for n in ATTENTION))


FAMILY = Family(
    name=FAMILY_NAME,
    schemes=SCHEMES,
    companions=COMPANIONS,
    make=Fp8Scheme.make,
    claims=lambda qc: qc.get("quant_method") == "fp8",
    from_quantization_config=Fp8Scheme.from_quantization_config,
    storage_dtypes=frozenset({"F8_E4M3"}),
)
