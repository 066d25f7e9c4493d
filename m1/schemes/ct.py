"""The compressed-tensors family: its pack-quantized int schemes (m1.schemes.ct_pack) and its float-quantized
fp8 (m1.schemes.ct_float), and which of them each module of a compressed-tensors config gets."""

from __future__ import annotations

from typing import Any

from m1.errors import ConfigError
from m1.schemes import Family, Scheme
from m1.schemes.ct_float import FLOAT_FORMAT, FLOAT_SCHEMES, FloatScheme
from m1.schemes.ct_pack import COMPANIONS, FAMILY_NAME, PACK_FORMAT, SCHEMES, PackScheme


def scheme_of_group(group_name: str, group: Any, default_format: Any, file: str | None) -> PackScheme:
    """The scheme of one `config_groups` entry, by its format (the group's own, else the config's)."""
    where = f"quantization_config.config_groups.{group_name}"
    if not isinstance(group, dict) or not isinstance(group.get("weights"), dict):
        raise ConfigError(f"{where} has no weights scheme", file=file)
    fmt = group.get("format") or default_format
    kinds: dict[Any, type[PackScheme]] = {PACK_FORMAT: PackScheme, FLOAT_FORMAT: FloatScheme}
    if fmt not in kinds:
        raise ConfigError(f"{where} is in the format {fmt!r}; m1 reads compressed-tensors' {PACK_FORMAT} and "
                          f"{FLOAT_FORMAT}", file=file,
                          hint="dequantize it with compressed-tensors' convert_checkpoint first")
    return kinds[fmt].from_group(where, group, file)


class CtSchemes:
    """The weight schemes of a compressed-tensors quantization_config, and which one a module gets: that of its
    most specific target, in the order compressed-tensors' own `match_targets` gives (an exact name, then a
    regex, then a class such as Linear), a later group's target replacing an earlier one's as in its
    `apply_quantization_config`."""

    def __init__(self, by_target: dict[str, PackScheme]) -> None:
        self.by_target = by_target
        self._module: Any = None

    @classmethod
    def from_quantization_config(cls, qc: dict[str, Any], file: str | None = None) -> CtSchemes:
        """The schemes of a compressed-tensors config of weight-only (A16) int or fp8 groups."""
        if not isinstance(qc, dict) or qc.get("quant_method") != "compressed-tensors":
            raise ConfigError("quantization_config is not compressed-tensors'", file=file)
        for key, what in (("transform_config", "transforms (rotations) the weights"),
                          ("sparsity_config", "sparsifies the weights")):
            if qc.get(key):  # decoding the codes alone would give other weights than the model's
                raise ConfigError(f"quantization_config.{key} {what}; m1 reads plain pack-quantized weights",
                                  file=file, hint="dequantize it with compressed-tensors' convert_checkpoint first")
        groups = qc.get("config_groups")
        if not isinstance(groups, dict) or not groups:
            raise ConfigError("quantization_config.config_groups is empty or not an object", file=file,
                              hint="a compressed-tensors checkpoint names its schemes there")
        by_target: dict[str, PackScheme] = {}
        for name, group in groups.items():
            scheme = scheme_of_group(name, group, qc.get("format"), file)
            targets = group.get("targets")
            if not isinstance(targets, list) or not targets or not all(isinstance(t, str) for t in targets):
                raise ConfigError(f"quantization_config.config_groups.{name}.targets is not a list of names",
                                  file=file)
            by_target.update(dict.fromkeys(targets, scheme))
        return cls(by_target)

    def for_module(self, module: str) -> PackScheme | None:
        """The scheme of a quantized Linear named `module`; None when no group targets it."""
        import torch
        from compressed_tensors.utils.match import match_targets

        if self._module is None:
            self._module = torch.nn.Linear(1, 1, device="meta")
        matched = match_targets(module, self._module, self.by_target)
        return self.by_target[matched[0]] if matched else None


def _make(name: str, **options: Any) -> Scheme:
    return (FloatScheme if name in FLOAT_SCHEMES else PackScheme).make(name, **options)


def _read_elsewhere(qc: dict[str, Any], file: str | None = None) -> Scheme:
    """A compressed-tensors config reached through the registry: the checkpoint was not opened through its
    format's storage view, and planning its companions without a `<module>.weight` would lose the experts."""
    raise ConfigError("a compressed-tensors checkpoint is read through its own reader, which decodes its experts",
                      file=file, hint="open it with m1.checkpoint.Checkpoint.open (as every command does)")


FAMILY = Family(
    name=FAMILY_NAME,
    schemes=(*SCHEMES, *FLOAT_SCHEMES),
    companions=COMPANIONS,
    make=_make,
    # Its checkpoints hold no `<module>.weight`: only the format's storage view reads them (it decodes the weights
    # and shows the rest of m1 a dense checkpoint, calling CtSchemes.from_quantization_config itself). A config
    # that reaches the registry another way is refused with a line saying so, never planned.
    claims=lambda qc: qc.get("quant_method") == "compressed-tensors",
    from_quantization_config=_read_elsewhere,
    storage_dtypes=frozenset({"I32", "F8_E4M3"}),
    gptq_schemes=tuple(SCHEMES),
)
