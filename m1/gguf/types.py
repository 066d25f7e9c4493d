"""GGML tensor types for the export, by name, and which tensors get which (the type policy), as data.

Blocks are quantized by gguf-py (`gguf.quants.quantize`, bit-exact with ggml) or llama.cpp's ggml
(m1.schemes.ggml_lib); nothing here re-implements a block format.
Types are named as llama.cpp's `--type` names them, lower case.
"""

from __future__ import annotations

from dataclasses import dataclass

from gguf import GGML_QUANT_SIZES, GGMLQuantizationType, LlamaFileType

from m1.errors import UsageError
from m1.spec import Role

Q = GGMLQuantizationType
GGML_TYPES: dict[str, GGMLQuantizationType] = {
    "f32": Q.F32, "f16": Q.F16, "bf16": Q.BF16,
    "q8_0": Q.Q8_0, "q4_0": Q.Q4_0, "q4_1": Q.Q4_1, "q5_0": Q.Q5_0, "q5_1": Q.Q5_1, "mxfp4": Q.MXFP4,
    # quantized by llama.cpp's own ggml (m1.schemes.ggml_lib, extra m1[gguf-k]), with an optional imatrix
    "q2_k": Q.Q2_K, "q3_k": Q.Q3_K, "q4_k": Q.Q4_K, "q5_k": Q.Q5_K, "q6_k": Q.Q6_K, "iq4_xs": Q.IQ4_XS,
    "iq1_s": Q.IQ1_S, "iq1_m": Q.IQ1_M, "iq2_xxs": Q.IQ2_XXS, "iq2_xs": Q.IQ2_XS, "iq2_s": Q.IQ2_S,
    "iq3_xxs": Q.IQ3_XXS, "iq3_s": Q.IQ3_S, "iq4_nl": Q.IQ4_NL, "tq1_0": Q.TQ1_0, "tq2_0": Q.TQ2_0,
}
# the types llama.cpp's ggml quantizes (m1.schemes.ggml.GGML_LIB_TYPES): K-quants, i-quants, ternary
K_TYPES = ("q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs", "iq1_s", "iq1_m", "iq2_xxs", "iq2_xs", "iq2_s",
           "iq3_xxs", "iq3_s", "iq4_nl", "tq1_0", "tq2_0")
EXPERT_TYPES = tuple(GGML_TYPES)
DENSE_TYPES = ("bf16", "f16", "f32", "q8_0")  # attention, head, embedding: never below q8_0
FLOAT_TYPES = ("f32", "f16", "bf16")

# general.file_type: what the bulk of the file (the experts) is: the llama.cpp ftype whose default tensor type
# (llama-quant.cpp llama_ftype_get_default_type) is the experts' type, so IQ2_S is llama-quantize's IQ2_M.
FILE_TYPES: dict[str, LlamaFileType] = {
    "f32": LlamaFileType.ALL_F32, "f16": LlamaFileType.MOSTLY_F16, "bf16": LlamaFileType.MOSTLY_BF16,
    "q8_0": LlamaFileType.MOSTLY_Q8_0, "q4_0": LlamaFileType.MOSTLY_Q4_0, "q4_1": LlamaFileType.MOSTLY_Q4_1,
    "q5_0": LlamaFileType.MOSTLY_Q5_0, "q5_1": LlamaFileType.MOSTLY_Q5_1, "mxfp4": LlamaFileType.MOSTLY_MXFP4_MOE,
    "q2_k": LlamaFileType.MOSTLY_Q2_K, "q3_k": LlamaFileType.MOSTLY_Q3_K_M, "q4_k": LlamaFileType.MOSTLY_Q4_K_M,
    "q5_k": LlamaFileType.MOSTLY_Q5_K_M, "q6_k": LlamaFileType.MOSTLY_Q6_K, "iq4_xs": LlamaFileType.MOSTLY_IQ4_XS,
    "iq1_s": LlamaFileType.MOSTLY_IQ1_S, "iq1_m": LlamaFileType.MOSTLY_IQ1_M, "iq2_xxs": LlamaFileType.MOSTLY_IQ2_XXS,
    "iq2_xs": LlamaFileType.MOSTLY_IQ2_XS, "iq2_s": LlamaFileType.MOSTLY_IQ2_M,
    "iq3_xxs": LlamaFileType.MOSTLY_IQ3_XXS, "iq3_s": LlamaFileType.MOSTLY_IQ3_S,
    "iq4_nl": LlamaFileType.MOSTLY_IQ4_NL, "tq1_0": LlamaFileType.MOSTLY_TQ1_0, "tq2_0": LlamaFileType.MOSTLY_TQ2_0,
}
SOURCE_TYPES = {"F32": "f32", "F16": "f16", "BF16": "bf16"}  # safetensors dtype -> the type that keeps it exactly


def ggml_type(name: str, allowed: tuple[str, ...] = EXPERT_TYPES, what: str = "type") -> GGMLQuantizationType:
    if name not in allowed:
        raise UsageError(f"{what} {name!r} is not one of {', '.join(allowed)}")
    return GGML_TYPES[name]


def block_size(qtype: GGMLQuantizationType) -> int:
    return GGML_QUANT_SIZES[qtype][0]


def type_name(qtype: GGMLQuantizationType) -> str:
    return next(n for n, t in GGML_TYPES.items() if t == qtype)


@dataclass(frozen=True)
class TypePolicy:
    """Which GGML type each kind of tensor gets.

    None for attention/head/embed: the experts' type when that is a float type (a plain f32/f16/bf16
    export), else the type that keeps the source exactly (bf16 for anything else). Norms, the lightning
    norm, the router and every 1-D tensor are always F32, whatever is asked.
    """

    experts: str = "bf16"
    attention: str | None = None
    head: str | None = None
    embed: str | None = None

    def __post_init__(self) -> None:
        ggml_type(self.experts, EXPERT_TYPES, "expert type")
        for what, value in (("attention type", self.attention), ("head type", self.head),
                            ("embedding type", self.embed)):
            if value is not None:
                ggml_type(value, DENSE_TYPES, what)

    def for_tensor(self, role: Role, ndim: int, source_dtype: str) -> GGMLQuantizationType:
        if ndim == 1 or role in (Role.LAYER_NORM, Role.FINAL_NORM, Role.LIGHTNING_NORM, Role.ROUTER):
            return Q.F32
        if role == Role.EXPERT:
            return GGML_TYPES[self.experts]
        asked = {Role.HEAD: self.head, Role.EMBED: self.embed}.get(role, self.attention)
        if asked is None:
            asked = self.experts if self.experts in FLOAT_TYPES else SOURCE_TYPES.get(source_dtype, "bf16")
        return GGML_TYPES[asked]

    @property
    def file_type(self) -> LlamaFileType:
        return FILE_TYPES[self.experts]
