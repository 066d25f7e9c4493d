"""Quantization schemes as registered families.

A scheme is a frozen config that round-trips through config.json's `quantization_config`, declares the
companion tensors it writes beside a weight (`pieces`: names, dtypes, shapes, so a plan sizes files before
a byte is quantized), quantizes and dequantizes through its library (never m1's own arithmetic), checks
stored companions against a weight before any use, and says which formats can store it. `inspect`,
`verify integrity`, the loader, dequantizing convert and the Hub card ask this registry; no other module
names a companion suffix. bitsandbytes (nf4, fp4, int8), the ggml block types and compressed-tensors' w4a16 /
w8a16 are built in; a family is one module with a `FAMILY` and one `register_family` call.
"""

from __future__ import annotations

import importlib
import math
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from m1.errors import ConfigError, UsageError

if TYPE_CHECKING:
    import torch


@dataclass(frozen=True)
class Piece:
    """One tensor written for a quantized weight: `suffix` follows the module name (e.g. 'weight.absmax')."""

    suffix: str
    dtype: str
    shape: tuple[int, ...] | None  # None: not predictable (e.g. a JSON state's length)
    nbytes: int  # exact when `exact`, else an upper bound
    exact: bool = True


class Scheme:
    """What every scheme offers (bitsandbytes' `BnbScheme` is the model). A scheme subclasses this and gives the
    required members; the optional ones have their defaults here."""

    name: str
    family: str
    formats: tuple[str, ...]  # the formats that can store it

    def describe(self) -> str:
        raise NotImplementedError

    def options(self) -> dict[str, Any]:  # for the job record and the plan fingerprint
        raise NotImplementedError

    def check_weight(self, name: str, dtype: str, shape: tuple[int, ...], file: str | None = None) -> None:
        raise NotImplementedError

    def pieces(self, dtype: str, shape: tuple[int, ...]) -> list[Piece]:
        raise NotImplementedError

    def quantization_config(self, kept_experts: list[str]) -> dict[str, Any]:
        raise NotImplementedError

    def quantize(self, weight: torch.Tensor, device: Any, name: str = "") -> list[tuple[str, torch.Tensor]]:
        raise NotImplementedError

    def dequantize(self, pieces: dict[str, torch.Tensor], device: Any = "cpu", name: str = "") -> torch.Tensor:
        raise NotImplementedError

    def check_pieces(self, weight: str, found: dict[str, tuple[str, tuple[int, ...]]], shape: tuple[int, ...],
                     file: str | None = None) -> None:
        raise NotImplementedError

    # ---- optional, with defaults ----
    def check_supported(self, device: Any) -> None:
        """Does its library take these options on this device? (a UsageError if not)"""

    def like(self, name: str) -> Scheme:
        """Scheme `name` made with this one's shared inputs (a ggml type's imatrix), for a mix of schemes."""
        return make_scheme(name)

    def params_per_second(self) -> float | None:
        """Measured quantization speed on one CPU core (params/s), for a dry run's time estimate; None: unmeasured."""
        return None

    def for_attention(self, name: str) -> Scheme | None:
        """This scheme when `--attn-type name` quantizes the attention projections too (its config then says so),
        in a format that stores the spec's tensors one to one; None: it does not take attention."""
        return None

    def straddles_rows(self, shape: tuple[int, ...]) -> bool:
        """Whether a weight of this shape hits a known limitation of its library's readers (a warning)."""
        return False


@dataclass(frozen=True)
class Family:
    name: str  # e.g. "bitsandbytes"
    schemes: tuple[str, ...]  # the scheme names it makes
    companions: tuple[str, ...]  # every suffix it may write beside `<module>.` (in state-dict order)
    make: Callable[..., Scheme]  # (name, **command-line options) -> Scheme; usage errors for bad options
    claims: Callable[[dict[str, Any]], bool]  # does this quantization_config belong to the family?
    from_quantization_config: Callable[[dict[str, Any], str | None], Scheme]
    storage_dtypes: frozenset[str]  # dtypes its quantized weights are stored in (so "weight" is not a float)
    # The schemes whose codes `--rounding gptq` can choose within the library's own scales: their `make` takes
    # `rounding` (an m1.schemes.gptq.Rounding) and their `quantize` reads its Hessians.
    gptq_schemes: tuple[str, ...] = ()


_FAMILIES: dict[str, Family] = {}
_BUILTIN: list[bool] = []
# The built-in families, each a module with a `FAMILY`, imported on first use (they import this module).
BUILTIN_MODULES = ("m1.schemes.bnb", "m1.schemes.ggml", "m1.schemes.fp8", "m1.schemes.ct")


def register_family(family: Family) -> Family:
    _builtins()
    _FAMILIES[family.name] = family
    return family


def unregister_family(name: str) -> None:
    _FAMILIES.pop(name, None)


def _builtins() -> None:
    if not _BUILTIN:
        _BUILTIN.append(True)
        for module in BUILTIN_MODULES:
            family = vars(importlib.import_module(module))["FAMILY"]
            _FAMILIES.setdefault(family.name, family)


def families() -> list[Family]:
    _builtins()
    return list(_FAMILIES.values())


def scheme_names() -> list[str]:
    return [s for f in families() for s in f.schemes]


def gptq_scheme_names() -> list[str]:
    """The schemes `--rounding gptq` applies to."""
    return [s for f in families() for s in f.gptq_schemes]


def make_scheme(name: str, **options: Any) -> Scheme:
    for family in families():
        if name in family.schemes:
            return family.make(name, **options)
    raise UsageError(f"unknown scheme {name!r}", hint=f"use one of {', '.join(scheme_names())}")


def scheme_from_config(qc: Any, file: str | None = None) -> Scheme:
    """The scheme a checkpoint's `quantization_config` describes; a ConfigError for one m1 cannot read."""
    if isinstance(qc, dict):
        for family in families():
            if family.claims(qc):
                return family.from_quantization_config(qc, file)
    method = qc.get("quant_method") if isinstance(qc, dict) else None
    known = ", ".join(f.name for f in families())
    raise ConfigError(f"quantization_config.quant_method is {method!r}; only {known} is understood", file=file,
                      hint="m1 reads the quantization schemes it writes")


def companion_suffixes() -> tuple[str, ...]:
    """Every companion suffix of every family, in a fixed order (companions sort after their weight)."""
    return tuple(s for f in families() for s in f.companions)


def module_of(weight_name: str) -> str:
    return weight_name[: -len(".weight")] if weight_name.endswith(".weight") else weight_name


def companions_in(weight_name: str, names: Any) -> dict[str, str]:
    """suffix -> full name of the companions of `weight_name` present among `names` (a set or mapping)."""
    module = module_of(weight_name)
    return {s: f"{module}.{s}" for s in companion_suffixes() if f"{module}.{s}" in names}


def check_float_matrix(scheme: str, name: str, dtype: str, shape: tuple[int, ...], file: str | None,
                       floats: frozenset[str] | tuple[str, ...] | None = None) -> None:
    """What a scheme of [out, in] weights asks of every weight: a float dtype (`floats`, default every float
    m1 reads) and two dimensions; a UsageError naming the tensor otherwise."""
    from m1.dtypes import FLOAT_DTYPES

    if dtype not in (FLOAT_DTYPES if floats is None else floats):
        raise UsageError(f"dtype {dtype} cannot be quantized to {scheme}", file=file, tensor=name,
                         hint="convert it to a float dtype first: m1 convert SRC DST --dtype bf16")
    if len(shape) != 2:
        raise UsageError(f"expected a 2-D [out, in] weight, got shape {list(shape)}", file=file, tensor=name,
                         hint="keep it unquantized with --keep")


def numel(shape: tuple[int, ...]) -> int:
    return math.prod(shape)
