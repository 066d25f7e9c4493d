"""`m1 convert`: between the release and Hugging Face layouts, shard layouts and dtypes.

The tensor names are the same in both flavours; only config.json changes. A conversion that keeps a
tensor's dtype copies its bytes in row chunks (no tensor is ever whole in memory); a dtype change
converts chunk by chunk; a bitsandbytes-quantized expert with `--dtype` other than keep is
dequantized back (one expert at a time).
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from m1.checkpoint import Checkpoint
from m1.config import Flavour
from m1.errors import UsageError
from m1.safetensors_io import DTYPE_NAMES, FLOAT_DTYPES, TORCH_DTYPES, Produced, file_ranges, tensor_bytes
from m1.spec import DTYPE_BYTES, QUANT_COMPANIONS, Role, classify, inventory
from m1.writer import OutTensor, WritePlan, execute, plan_shards

DTypeOption = Literal["keep", "bf16", "fp16", "fp32"]
DTYPE_OPTIONS: dict[str, str | None] = {"keep": None, "bf16": "BF16", "fp16": "F16", "fp32": "F32"}


class RotaryWarning(UserWarning):
    """transformers' MiniMax rotates every head dim; the release rotates only rotary_dim of them."""


@dataclass(frozen=True)
class ConvertOptions:
    to: Flavour | None = None  # None: keep the source flavour
    by_layer: bool = False
    shard_size: int = 5 * 10**9
    dtype: str = "keep"
    router_dtype: str = "keep"


def _target_dtype(source: str, role: Role, opts: ConvertOptions) -> str:
    wanted = DTYPE_OPTIONS[opts.router_dtype if role == Role.ROUTER else opts.dtype]
    if role == Role.ROUTER and opts.router_dtype == "keep":
        return source  # the router stays fp32 unless asked
    if wanted is None or source not in FLOAT_DTYPES:
        return source
    return wanted


def ordered_names(ckpt: Checkpoint) -> list[str]:
    """Source names in spec order; a quantized weight's companions right after it. Unknown -> error."""
    position = {t.name: i for i, t in enumerate(inventory(ckpt.config))}
    keyed = []
    for name, file in ckpt.weight_map.items():
        c = classify(name, file)
        rank = QUANT_COMPANIONS.index(c.companion) + 1 if c.companion else 0
        keyed.append((position.get(c.weight_name, len(position)), rank, name))
    return [name for *_, name in sorted(keyed)]


def plan_convert(ckpt: Checkpoint, opts: ConvertOptions) -> tuple[WritePlan, dict[str, tuple[str, str]]]:
    """The plan, and for each output tensor (source name, how: copy|cast|dequantize)."""
    for key in ("dtype", "router_dtype"):
        if getattr(opts, key) not in DTYPE_OPTIONS:
            raise UsageError(f"--{key.replace('_', '-')} must be one of {', '.join(DTYPE_OPTIONS)}")
    cfg = ckpt.config
    dequantize = cfg.quantization_config is not None and opts.dtype != "keep"
    specs = {t.name: t for t in inventory(cfg)}
    outs: list[OutTensor] = []
    how: dict[str, tuple[str, str]] = {}
    for name in ordered_names(ckpt):
        c = classify(name, ckpt.weight_map[name])
        if dequantize and c.companion is not None:
            continue  # folded into the dequantized weight
        info = ckpt.info(name)
        if dequantize and c.rule.role == Role.EXPERT and info.dtype not in FLOAT_DTYPES:
            spec = specs[name]
            dtype = DTYPE_OPTIONS[opts.dtype] or "BF16"
            outs.append(OutTensor(name, dtype, spec.shape, spec.numel * DTYPE_BYTES[dtype], c.layer))
            how[name] = (name, "dequantize")
            continue
        dtype = _target_dtype(info.dtype, c.rule.role, opts)
        outs.append(OutTensor(name, dtype, info.shape, info.numel * DTYPE_BYTES[dtype], c.layer))
        how[name] = (name, "copy" if dtype == info.dtype else "cast")

    flavour = opts.to or cfg.flavour
    config = cfg.to_dict(flavour)
    if dequantize:
        config.pop("quantization_config", None)
    if opts.dtype != "keep":
        config["torch_dtype"] = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[opts.dtype]
    extra = [f for f in ckpt.extra_files() if not (flavour == "hf" and f.endswith(".py"))]
    shards = plan_shards(outs, opts.shard_size, opts.by_layer)
    job = {"command": "convert", "source": str(ckpt.root), "revision": ckpt.revision, "to": flavour,
           "layout": "by-layer" if opts.by_layer else f"shard-size {opts.shard_size}", "dtype": opts.dtype,
           "router_dtype": opts.router_dtype, "base_model": base_model_of(ckpt)}
    return WritePlan(shards, config, extra, job), how


def base_model_of(ckpt: Checkpoint) -> str | None:
    """What the checkpoint was made from: its own manifest's base, or the repo id it was read from."""
    if ckpt.remote:
        return ckpt.root
    from m1.writer import read_manifest

    manifest = read_manifest(Path(ckpt.root))
    return (manifest or {}).get("job", {}).get("base_model")


def rotary_warning(ckpt: Checkpoint, to: Flavour | None) -> str | None:
    cfg = ckpt.config
    if to == "hf" and cfg.rotary_dim < cfg.head_dim and "softmax" in cfg.layer_kinds:
        n = cfg.layer_kinds.count("softmax")
        return (f"rotary_dim={cfg.rotary_dim} < head_dim={cfg.head_dim}: transformers' MiniMax ignores rotary_dim "
                f"and rotates all {cfg.head_dim} dims, so its {n} softmax-attention layers (of "
                f"{cfg.num_hidden_layers}) differ from the release; use m1's verify engine or the release code "
                "for exact outputs")
    return None


def make_producer(ckpt: Checkpoint, plan: WritePlan, how: dict[str, tuple[str, str]]):
    targets = {t.name: t for s in plan.shards for t in s.tensors}

    def produce(name: str) -> Produced:
        source, mode = how[name]
        out = targets[name]
        if mode == "copy":
            info = ckpt.info(source)
            if info.file.endswith(".safetensors"):  # byte ranges: copied in the kernel, like cp
                return Produced(out.dtype, out.shape, file_ranges(ckpt.local_path(info.file), info.start, info.nbytes))
            return Produced(out.dtype, out.shape, (chunk for _, chunk in ckpt.iter_chunks(source)))
        import torch

        if mode == "cast":
            src = TORCH_DTYPES[ckpt.info(source).dtype]
            dst = TORCH_DTYPES[out.dtype]
            return Produced(out.dtype, out.shape,
                            (tensor_bytes(torch.frombuffer(chunk, dtype=src).to(dst))
                             for _, chunk in ckpt.iter_chunks(source, 32 << 20)))
        from m1.quantize.codec import dequantize_weight

        weight = dequantize_weight(ckpt, source).to(TORCH_DTYPES[out.dtype])
        assert DTYPE_NAMES[weight.dtype] == out.dtype
        return Produced(out.dtype, tuple(weight.shape), [tensor_bytes(weight)])

    return produce


def run_convert(ckpt: Checkpoint, dest: Path, opts: ConvertOptions, resume: bool = False, overwrite: bool = False,
                show_progress: bool = True) -> dict:
    from m1.progress import byte_progress

    plan, how = plan_convert(ckpt, opts)
    message = rotary_warning(ckpt, opts.to)
    if message:
        warnings.warn(message, RotaryWarning, stacklevel=2)
    with byte_progress(plan.total_bytes, "convert", show_progress) as advance:
        return execute(plan, dest, make_producer(ckpt, plan, how), source_root=None if ckpt.remote else ckpt.root,
                       fetch_extra=(lambda f: _fetch_remote(ckpt, f)) if ckpt.remote else None,
                       resume=resume, overwrite=overwrite, progress=advance)


def _fetch_remote(ckpt: Checkpoint, name: str) -> Path:
    from m1.hub_read import download_file

    return download_file(ckpt.root, name, ckpt.revision)
