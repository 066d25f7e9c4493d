"""compressed-tensors' `pack-quantized` schemes (w4a16, w8a16): integer weights in groups along the input
dimension, packed into int32, as llm-compressor writes them and vLLM and transformers read them (the family,
with its `float-quantized` fp8-dynamic of m1.schemes.ct_float, is m1.schemes.ct).

For one `<module>.weight` [out, in] compressed-tensors 0.20 writes (`PackedQuantizationCompressor`):
`weight_packed` int32 [out, ceil(in * bits / 32)] (dense cross-element packing), `weight_scale` in the weight's
dtype [out, in / group], `weight_shape` int64 [2] (the dense shape, as values), and `weight_zero_point` int32
[ceil(out * bits / 32), in / group] (packed along the rows) only when asymmetric. There is no `<module>.weight`:
a checkpoint of this format is read by its own storage (m1.formats.ct_storage), which decodes the weights.

The scales come from compressed-tensors' own min/max (`compute_dynamic_scales_and_zp`, what llm-compressor's
memoryless min-max observer computes for a weight), the codes and the packing from its compressor, and reading
back is the compressor's `decompress`: nothing here does quantization arithmetic.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from m1.dtypes import DTYPE_BYTES, FLOAT_DTYPES
from m1.errors import CheckpointError, ConfigError, UsageError
from m1.schemes import Piece, Scheme, check_float_matrix
from m1.schemes.gptq import Rounding

FAMILY_NAME = "compressed-tensors"
FORMAT_NAME = "compressed-tensors"  # the one format that stores these (m1.formats.ct)
SCHEMES = {"w4a16": 4, "w8a16": 8}
DEFAULT_GROUP = 128
PACK_FORMAT = "pack-quantized"
COMPANIONS = ("weight_packed", "weight_scale", "weight_shape", "weight_zero_point")
# What stays dense, for readers that target every Linear (vLLM, transformers): everything but the experts.
# The embedding and the norms too: compressed-tensors' own dequantizer takes every `.weight` of a targeted,
# not-ignored name as a quantized one (float-quantized stores the codes as `weight`).
IGNORE = ("lm_head", "model.embed_tokens", r"re:.*norm$", r"re:.*self_attn\..*", r"re:.*block_sparse_moe\.gate$")


def require() -> None:
    """One line saying what to install when the compressed-tensors library is missing (found, not imported)."""
    import importlib.util

    if importlib.util.find_spec("compressed_tensors") is None:
        raise UsageError("the compressed-tensors schemes and checkpoints need the compressed-tensors library",
                         hint="pip install 'm1[compressed-tensors]'")


@dataclass(frozen=True)
class PackScheme(Scheme):
    name: str  # w4a16 | w8a16
    num_bits: int = 4
    group_size: int | None = DEFAULT_GROUP  # None: one scale per row (channel strategy, read only)
    symmetric: bool = True
    rounding: Rounding = Rounding()  # how the codes are chosen within compressed-tensors' scales (m1.schemes.gptq)
    family = FAMILY_NAME
    formats = (FORMAT_NAME,)
    ct_format = PACK_FORMAT  # compressed-tensors' name for how the weights are stored
    primary = "weight_packed"  # the stored tensor that stands for the weight (its header's place, its codes)

    @classmethod
    def make(cls, name: str, blocksize: int | None = None, double_quant: bool | None = None,
             imatrix: str | None = None, rounding: Rounding | None = None) -> PackScheme:
        if name not in SCHEMES:
            raise UsageError(f"unknown compressed-tensors scheme {name!r}", hint=f"use one of {', '.join(SCHEMES)}")
        for flag, value in (("--double-quant", double_quant), ("--imatrix", imatrix)):
            if value is not None:
                raise UsageError(f"{flag} does not apply to {name}", hint="drop it; --blocksize sets the group size")
        require()
        group = DEFAULT_GROUP if blocksize is None else blocksize
        if group <= 0:
            raise UsageError(f"--blocksize (the group size) must be positive, got {group}")
        return cls(name, SCHEMES[name], group, rounding=rounding or Rounding())

    def describe(self) -> str:
        grouping = f"group {self.group_size}" if self.group_size else "per channel"
        kind = "symmetric" if self.symmetric else "asymmetric"
        gptq = ", GPTQ rounding" if self.rounding.gptq else ""
        return f"{self.name} (compressed-tensors {PACK_FORMAT}, int{self.num_bits}, {grouping}, {kind}{gptq})"

    def options(self) -> dict[str, Any]:
        gptq = {"rounding": self.rounding.record()} if self.rounding.gptq else {}
        return {"num_bits": self.num_bits, "group_size": self.group_size, "symmetric": self.symmetric, **gptq}

    def check_supported(self, device: Any) -> None:
        pass  # compressed-tensors' torch code runs on any device

    # ---- compressed-tensors' own objects --------------------------------------------------------------
    def args(self) -> Any:
        from compressed_tensors.quantization import QuantizationArgs

        strategy = "group" if self.group_size else "channel"
        return QuantizationArgs(num_bits=self.num_bits, type="int", symmetric=self.symmetric, strategy=strategy,
                                group_size=self.group_size)  # as its W4A16 / W8A16 presets

    def ct_scheme(self, targets: list[str]) -> Any:
        from compressed_tensors.quantization import QuantizationScheme

        return QuantizationScheme(targets=targets, weights=self.args(), format=PACK_FORMAT)

    # ---- what gets written -------------------------------------------------------------------------
    def check_weight(self, name: str, dtype: str, shape: tuple[int, ...], file: str | None = None) -> None:
        check_float_matrix(self.name, name, dtype, shape, file)
        if self.group_size and shape[1] % self.group_size:
            raise UsageError(f"rows of {shape[1]} values do not split into groups of {self.group_size}", file=file,
                             tensor=name, hint="choose a --blocksize (group size) that divides them, or --keep it")

    def pieces(self, dtype: str, shape: tuple[int, ...]) -> list[Piece]:
        out_dim, in_dim = shape
        groups = math.ceil(in_dim / self.group_size) if self.group_size else 1
        cols = math.ceil(in_dim * self.num_bits / 32)
        pieces = [Piece("weight_packed", "I32", (out_dim, cols), 4 * out_dim * cols),
                  Piece("weight_scale", dtype, (out_dim, groups), DTYPE_BYTES[dtype] * out_dim * groups),
                  Piece("weight_shape", "I64", (2,), 16)]
        if not self.symmetric:
            rows = math.ceil(out_dim * self.num_bits / 32)
            pieces.append(Piece("weight_zero_point", "I32", (rows, groups), 4 * rows * groups))
        return pieces

    def quantize(self, weight: Any, device: Any, name: str = "") -> list[tuple[str, Any]]:
        from compressed_tensors.compressors import PackedQuantizationCompressor
        from compressed_tensors.quantization.utils.helpers import compute_dynamic_scales_and_zp

        if self.rounding.gptq:
            from m1.schemes.ct_gptq import quantize_gptq
            from m1.schemes.gptq import load_hessian

            h, tokens = load_hessian(self.rounding.hessians, name)
            if h is not None and self.rounding.enough(tokens, weight.shape[-1]):
                return quantize_gptq(self, weight, h, self.rounding, device, name)[0]
        w = weight.to(device)
        scale, zero_point = compute_dynamic_scales_and_zp(w, self.args(), module=None)
        state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}
        packed = PackedQuantizationCompressor.compress(state, self.ct_scheme(["Linear"]))
        return [(p.suffix, packed[p.suffix].contiguous().cpu()) for p in self.pieces("BF16", tuple(w.shape))]

    def check_pieces(self, weight: str, found: dict[str, tuple[str, tuple[int, ...]]], shape: tuple[int, ...],
                     file: str | None = None) -> None:
        """Stored companions (suffix -> dtype, shape) against what this scheme writes for a weight of `shape`."""
        module = weight[: -len(".weight")]
        scale_dtype = found.get("weight_scale", ("BF16", ()))[0]
        dtype = scale_dtype if scale_dtype in FLOAT_DTYPES else "BF16"
        expected = {p.suffix: p for p in self.pieces(dtype, shape)}
        for suffix, piece in expected.items():
            name = f"{module}.{suffix}"
            if suffix not in found:
                raise CheckpointError(f"a {self.name} weight lacks its compressed-tensors tensor {suffix}", file=file,
                                      tensor=name, hint="the quantized checkpoint is incomplete; re-run the job "
                                      "that wrote it")
            got_dtype, got_shape = found[suffix]
            if got_dtype != piece.dtype:
                raise CheckpointError(f"dtype {got_dtype}, {self.describe()} stores {piece.dtype}", file=file,
                                      tensor=name, hint="the tensors do not match config.json's quantization_config")
            if tuple(got_shape) != piece.shape:
                raise CheckpointError(f"shape {list(got_shape)}, {self.describe()} of a {list(shape)} weight stores "
                                      f"{list(piece.shape)}", file=file, tensor=name,
                                      hint="the quantized tensors are damaged or were made with other options")
        for suffix in found:
            if suffix not in expected:
                raise CheckpointError(f"{suffix} is not part of {self.describe()}", file=file,
                                      tensor=f"{module}.{suffix}",
                                      hint="the tensors do not match config.json's quantization_config")

    def dequantize(self, pieces: dict[str, Any], device: Any = "cpu", name: str = "",
                   shape: tuple[int, ...] | None = None) -> Any:
        """compressed-tensors' own decompression, after checking `weight_shape`'s values against `shape`."""
        from compressed_tensors.compressors import PackedQuantizationCompressor

        stored = [int(v) for v in pieces["weight_shape"].tolist()]
        if shape is not None and tuple(stored) != tuple(shape):
            raise CheckpointError(f"weight_shape holds {stored}, the config implies {list(shape)}",
                                  tensor=name[: -len(".weight")] + ".weight_shape" if name else None,
                                  hint="the quantized tensors are damaged or belong to another model")
        state = {k: v.to(device) for k, v in pieces.items()}
        return PackedQuantizationCompressor.decompress(state, self.ct_scheme(["Linear"]))["weight"]

    # ---- config.json ---------------------------------------------------------------------------------
    def quantization_config(self, kept_experts: list[str]) -> dict[str, Any]:
        """The block compressed-tensors 0.20's `ModelCompressor.update_config` writes for a model compressed
        with this scheme: every Linear targeted, what stays dense ignored (the attention, the router, the head,
        and the experts kept by name)."""
        import compressed_tensors
        from compressed_tensors.quantization import QuantizationConfig

        ignore = [*IGNORE, *(name[: -len(".weight")] for name in kept_experts)]
        qc = QuantizationConfig(config_groups={"group_0": self.ct_scheme(["Linear"])}, format=self.ct_format,
                                quantization_status="compressed", ignore=ignore)
        return {"version": compressed_tensors.__version__, "quant_method": "compressed-tensors",
                "sparsity_config": {}, "transform_config": {}, **qc.model_dump(mode="json", exclude={"quant_method"})}

    @classmethod
    def from_group(cls, where: str, group: dict[str, Any], file: str | None) -> PackScheme:
        """The scheme of one pack-quantized config group (its `weights` an object, checked by the family)."""
        if group.get("input_activations") is not None:
            raise ConfigError(f"{where} quantizes activations too; m1 reads weight-only (A16) schemes", file=file)
        w = group["weights"]
        bits, strategy, size = w.get("num_bits"), w.get("strategy"), w.get("group_size")
        if w.get("type") != "int" or bits not in SCHEMES.values():
            raise ConfigError(f"{where}.weights is {w.get('type')} with {bits} bits; m1 reads int4 and int8",
                              file=file)
        if strategy == "group" and isinstance(size, int) and not isinstance(size, bool) and size > 0:
            group_size: int | None = size
        elif strategy == "channel":
            group_size = None
        else:
            raise ConfigError(f"{where}.weights has strategy {strategy!r} (group_size {size!r}); m1 reads group and "
                              "channel", file=file)
        if w.get("actorder") not in (None, "static", False):
            raise ConfigError(f"{where}.weights uses actorder {w.get('actorder')!r} (a g_idx); m1 does not read it",
                              file=file)
        name = next(n for n, b in SCHEMES.items() if b == bits)
        return cls(name, bits, group_size, bool(w.get("symmetric", True)))
