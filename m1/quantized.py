"""Quantized weights as a checkpoint stores them: which weights are quantized, their companions, and
reading one back in floating point, always through the scheme its config.json names (m1.schemes).

Every read checks the companions' headers against the scheme and the weight's spec shape first, and the
scheme checks their values before its library decodes them: damaged input is an error, never numbers.
"""

from __future__ import annotations

from collections.abc import Container
from typing import TYPE_CHECKING

from m1.errors import CheckpointError
from m1.schemes import Scheme, companions_in, module_of, scheme_from_config

if TYPE_CHECKING:
    import torch

    from m1.checkpoint import Checkpoint
    from m1.spec import TensorSpec


def is_quantized(weight_name: str, names: Container[str]) -> bool:
    """Whether the checkpoint stores this weight quantized: any companion beside it."""
    return bool(companions_in(weight_name, names))


def checkpoint_scheme(ckpt: Checkpoint, weight_name: str | None = None) -> Scheme:
    """The scheme config.json names (for `weight_name`, the one a measured mix gives it)."""
    qc = ckpt.config.quantization_config
    if qc is None:
        raise CheckpointError("the checkpoint holds quantization tensors but config.json has no quantization_config",
                              file=f"{ckpt.root}/config.json", hint="restore config.json from the quantized output")
    return scheme_for_weight(qc, weight_name, f"{ckpt.root}/config.json")


def scheme_for_weight(qc: dict, weight_name: str | None, file: str | None = None) -> Scheme:
    """A mix (`m1_mix`: per-weight schemes beside the main one) gives some weights another scheme."""
    mix = qc.get("m1_mix") if isinstance(qc, dict) else None
    if isinstance(mix, dict) and weight_name is not None:
        name = (mix.get("weights") or {}).get(weight_name)
        if name is not None:
            try:
                return scheme_from_config(mix["schemes"][name], file)
            except (KeyError, TypeError):
                raise CheckpointError(f"m1_mix gives {weight_name} the scheme {name!r} but does not describe it",
                                      file=file, tensor=weight_name, hint="re-run m1 quantize") from None
    return scheme_from_config(qc, file)


def check_stored(ckpt: Checkpoint, weight_name: str, shape: tuple[int, ...]) -> Scheme:
    """The scheme of a stored quantized weight, after checking its companions' headers against it."""
    scheme = checkpoint_scheme(ckpt, weight_name)
    found = {"weight": (ckpt.info(weight_name).dtype, ckpt.info(weight_name).shape)}
    for suffix, name in companions_in(weight_name, ckpt.weight_map).items():
        info = ckpt.info(name)
        found[suffix] = (info.dtype, info.shape)
    scheme.check_pieces(weight_name, found, shape, ckpt.weight_map.get(weight_name))
    return scheme


def read_pieces(ckpt: Checkpoint, weight_name: str) -> dict[str, torch.Tensor]:
    """The stored tensors of one quantized weight, keyed by suffix after the module name."""
    out = {"weight": ckpt.get(weight_name)}
    for suffix, name in companions_in(weight_name, ckpt.weight_map).items():
        out[suffix] = ckpt.get(name)
    return out


def dequantize_weight(ckpt: Checkpoint, weight_name: str, shape: tuple[int, ...] | None = None) -> torch.Tensor:
    """One weight of a checkpoint in floating point on CPU: dequantized if stored quantized, else as stored."""
    if not is_quantized(weight_name, ckpt.weight_map):
        return ckpt.get(weight_name)
    if shape is None:
        from m1.spec import spec_by_name

        spec = spec_by_name(ckpt.config).get(weight_name)
        if spec is None:
            raise CheckpointError("not part of this config's M1", file=ckpt.weight_map.get(weight_name),
                                  tensor=weight_name)
        shape = spec.shape
    scheme = check_stored(ckpt, weight_name, shape)
    try:
        return scheme.dequantize(read_pieces(ckpt, weight_name), "cpu", weight_name, shape=shape)
    except CheckpointError as exc:
        exc.file = exc.file or ckpt.weight_map.get(weight_name)
        raise


def expected_tensors(qconfig: dict, spec: TensorSpec,
                     names: Container[str]) -> dict[str, tuple[str, tuple[int, ...] | None]]:
    """The tensors that stand for `spec` in a checkpoint quantized per `qconfig` (name -> dtype, shape).

    {} when the weight is stored unquantized (kept by policy, e.g. the router or `--keep`). A shape of
    None means "not predictable" (a JSON state's length; absmax counts when no blocksize was recorded).
    """
    if not spec.name.endswith(".weight") or len(spec.shape) != 2 or not is_quantized(spec.name, names):
        return {}
    scheme = scheme_for_weight(qconfig, spec.name)
    module = module_of(spec.name)
    out: dict[str, tuple[str, tuple[int, ...] | None]] = {}
    for piece in scheme.pieces(spec.dtype if spec.dtype in ("BF16", "F16", "F32") else "BF16", spec.shape):
        out[f"{module}.{piece.suffix}"] = (piece.dtype, piece.shape if piece.exact else None)
    return out
