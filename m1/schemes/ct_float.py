"""compressed-tensors' `float-quantized` FP8 (`fp8-dynamic`, its FP8_DYNAMIC preset): float8_e4m3fn weights
with one scale per output channel, activations quantized dynamically per token by the runtime (nothing stored).

For one `<module>.weight` [out, in] it writes `weight` float8_e4m3fn [out, in] and `weight_scale` in the weight's
dtype [out, 1]. The scales come from compressed-tensors' `calculate_qparams` on each row's min and max (what
llm-compressor's min-max observer gives a channel-wise weight), the cast from its `FloatQuantizationCompressor`,
and reading back is that compressor's `decompress`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from m1.dtypes import DTYPE_BYTES
from m1.errors import ConfigError, UsageError
from m1.schemes import Piece, check_float_matrix
from m1.schemes.ct_pack import PackScheme, require

FLOAT_FORMAT = "float-quantized"
FLOAT_SCHEMES = ("fp8-dynamic",)
PRESET = "FP8_DYNAMIC"


@dataclass(frozen=True)
class FloatScheme(PackScheme):
    name: str = "fp8-dynamic"
    num_bits: int = 8
    group_size: int | None = None
    symmetric: bool = True
    ct_format = FLOAT_FORMAT
    primary = "weight"

    @classmethod
    def make(cls, name: str, blocksize: int | None = None, double_quant: bool | None = None,
             imatrix: str | None = None) -> FloatScheme:
        if name not in FLOAT_SCHEMES:
            raise UsageError(f"unknown compressed-tensors scheme {name!r}", hint=f"use {', '.join(FLOAT_SCHEMES)}")
        for flag, value in (("--blocksize", blocksize), ("--double-quant", double_quant), ("--imatrix", imatrix)):
            if value is not None:
                raise UsageError(f"{flag} does not apply to {name} (a scale per output channel)", hint="drop it")
        require()
        return cls(name)

    def describe(self) -> str:
        return (f"{self.name} (compressed-tensors {FLOAT_FORMAT}, float8_e4m3fn, a scale per output channel, "
                "activations dynamic per token)")

    def options(self) -> dict[str, Any]:
        return {}

    def args(self) -> Any:
        from compressed_tensors.quantization import preset_name_to_scheme

        return preset_name_to_scheme(PRESET, ["Linear"]).weights

    def ct_scheme(self, targets: list[str]) -> Any:
        from compressed_tensors.quantization import preset_name_to_scheme

        scheme = preset_name_to_scheme(PRESET, targets)
        scheme.format = FLOAT_FORMAT
        return scheme

    def check_weight(self, name: str, dtype: str, shape: tuple[int, ...], file: str | None = None) -> None:
        check_float_matrix(self.name, name, dtype, shape, file)

    def pieces(self, dtype: str, shape: tuple[int, ...]) -> list[Piece]:
        out_dim, in_dim = shape
        return [Piece("weight", "F8_E4M3", (out_dim, in_dim), out_dim * in_dim),
                Piece("weight_scale", dtype, (out_dim, 1), DTYPE_BYTES[dtype] * out_dim)]

    def quantize(self, weight: Any, device: Any, name: str = "") -> list[tuple[str, Any]]:
        import torch
        from compressed_tensors.compressors import FloatQuantizationCompressor
        from compressed_tensors.quantization.utils.helpers import calculate_qparams

        w = weight.to(device)
        low, high = torch.aminmax(w, dim=1, keepdim=True)
        scale, zero_point = calculate_qparams(low, high, self.args())
        state = {"weight": w, "weight_scale": scale, "weight_zero_point": zero_point}
        out = FloatQuantizationCompressor.compress(state, self.ct_scheme(["Linear"]))
        return [(p.suffix, out[p.suffix].contiguous().cpu()) for p in self.pieces("BF16", tuple(w.shape))]

    def dequantize(self, pieces: dict[str, Any], device: Any = "cpu", name: str = "",
                   shape: tuple[int, ...] | None = None) -> Any:
        from compressed_tensors.compressors import FloatQuantizationCompressor

        state = {k: v.to(device) for k, v in pieces.items()}
        return FloatQuantizationCompressor.decompress(state, self.ct_scheme(["Linear"]))["weight"]

    @classmethod
    def from_group(cls, where: str, group: dict[str, Any], file: str | None) -> FloatScheme:
        w = group["weights"]
        if w.get("type") != "float" or w.get("num_bits") != 8 or w.get("strategy") != "channel":
            raise ConfigError(f"{where}.weights is {w.get('type')} {w.get('num_bits')}-bit by {w.get('strategy')!r}; "
                              "m1 reads float8 with a scale per channel", file=file)
        acts = group.get("input_activations")
        if acts is not None and not (isinstance(acts, dict) and acts.get("dynamic") is True):
            raise ConfigError(f"{where} stores static activation scales; m1 reads dynamic ones (nothing stored)",
                              file=file)
        return cls()
