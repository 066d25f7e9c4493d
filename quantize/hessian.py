"""Input Hessians H = sum x x^T per expert, from the imatrix's own engine pass (m1.verify.imatrix.compute_imatrix).

The collector is the imatrix's LayerCollector (so its diagonal sums and routed-token counts are collected in the
same pass) plus, for every expert, x^T x of the w1/w3 input (hidden x hidden; w1 and w3 read the same x, so one
matrix serves both) and of the w2 input (intermediate x intermediate), over exactly the tokens routed to it, in
float32 on the pass's device. Memory bound: one layer's experts, allocated as tokens reach them and written to
one file per layer before the next layer runs; for the full M1, 32 x (6144^2 + 9216^2) x 4 B = 15.7 GB per layer
(besides the engine pass's own one layer of weights and the calibration activations). The files (the same
15.7 GB per layer on disk, 1.26 TB for all 80 layers) are read one matrix at a time by the rounding and removed
when the job has finished.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from m1.config import M1Config
from m1.schemes.gptq import Rounding
from m1.verify.imatrix import LayerCollector

META = "hessians.json"
EXPERT_WEIGHT = "block_sparse_moe.experts.{expert}.{w}.weight"


class HessianCollector(LayerCollector):
    """LayerCollector plus x^T x (float32) of each expert's w1/w3 input and w2 input."""

    def __init__(self, cfg: M1Config, layer: int, device: torch.device | str = "cpu") -> None:
        super().__init__(cfg, layer, device)
        self.h: dict[str, torch.Tensor] = {}

    def __call__(self, weight: str, x: torch.Tensor) -> None:
        super().__call__(weight, x)
        if ".experts." not in weight or weight.endswith(".w3.weight"):
            return
        flat = x.detach().reshape(-1, x.shape[-1]).float()
        if weight in self.h:
            self.h[weight].addmm_(flat.T, flat)
        else:
            self.h[weight] = flat.T @ flat


@dataclass
class HessianPass:
    folder: Path
    key: str  # what identifies the pass: source, calibration token ids
    tokens: dict[int, list[int]]  # layer -> tokens routed to each expert
    seconds: float = 0.0
    peak_bytes: int = 0  # the largest layer's Hessians


def pass_key(source_identity: Any, token_sha: str) -> str:
    return hashlib.sha256(json.dumps([source_identity, token_sha], sort_keys=True, default=str).encode()).hexdigest()


def token_sha256(tokens: torch.Tensor) -> str:
    return hashlib.sha256(tokens.to(torch.int64).contiguous().numpy().tobytes()).hexdigest()


def finished_pass(folder: Path, key: str) -> HessianPass | None:
    """A pass this key already finished in `folder` (for --resume), or None."""
    try:
        meta = json.loads((folder / META).read_text())
    except (OSError, ValueError):
        return None
    if meta.get("key") != key:
        return None
    return HessianPass(folder, key, {int(k): v for k, v in meta["tokens"].items()}, meta.get("seconds", 0.0),
                       meta.get("peak_bytes", 0))


def run_pass(cfg: M1Config, source: Any, windows: Any, folder: Path, key: str, *, device: torch.device | str = "cpu",
             batch_size: int = 4, progress: Any = None) -> HessianPass:
    """The engine pass over `windows`, one file of Hessians per layer in `folder`, then its record (last)."""
    from safetensors.torch import save_file

    from m1.verify.imatrix import compute_imatrix

    if folder.exists():
        shutil.rmtree(folder)
    folder.mkdir(parents=True)
    tokens: dict[int, list[int]] = {}
    peak = [0]

    def on_layer(layer: int, collect: LayerCollector) -> None:
        assert isinstance(collect, HessianCollector)
        prefix = f"model.layers.{layer}."
        tensors = {prefix + n: h.cpu().contiguous() for n, h in collect.h.items()}
        peak[0] = max(peak[0], sum(h.numel() * 4 for h in collect.h.values()))
        counts = [collect.rows[EXPERT_WEIGHT.format(expert=e, w="w1")] for e in range(cfg.num_local_experts)]
        tokens[layer] = counts
        tmp = folder / f".layer-{layer}.tmp"
        save_file(tensors, str(tmp), metadata={"tokens": json.dumps(counts)})
        os.replace(tmp, folder / f"layer-{layer}.safetensors")
        collect.h.clear()

    start = time.monotonic()
    compute_imatrix(cfg, source, windows, device=device, batch_size=batch_size, progress=progress,
                    collector=HessianCollector, on_layer=on_layer)
    done = HessianPass(folder, key, tokens, time.monotonic() - start, peak[0])
    (folder / META).write_text(json.dumps({"key": key, "tokens": {str(k): v for k, v in tokens.items()},
                                           "seconds": done.seconds, "peak_bytes": done.peak_bytes}))
    return done


def fallbacks(tokens: dict[int, list[int]], rounding: Rounding, cfg: M1Config) -> dict[int, dict[int, int]]:
    """layer -> {expert: routed tokens} of the experts whose w1/w3 or w2 get the scheme's own rounding."""
    out = {}
    for layer, counts in sorted(tokens.items()):
        few = {e: n for e, n in enumerate(counts)
               if not (rounding.enough(n, cfg.hidden_size) and rounding.enough(n, cfg.intermediate_size))}
        if few:
            out[layer] = few
    return out


def fallback_lines(few: dict[int, dict[int, int]]) -> list[str]:
    """One line per layer naming the experts that get the scheme's own rounding, with their routed tokens."""
    lines = []
    for layer, experts in few.items():
        few = list(experts.items())
        if few:
            lines.append(f"layer {layer}: round-to-nearest for expert{'s' if len(few) > 1 else ''} "
                         + ", ".join(f"{e} ({n} tokens)" for e, n in few) + " (too few calibration tokens)")
    return lines


# ---- the job's part (m1.quantize.job) ---------------------------------------------------------------------


def hessian_folder(dest: Path) -> Path:
    """Beside the destination (which must be empty for a new run), so the pass survives an interrupted job."""
    return dest.parent / f".{dest.name}.m1-hessians"


def gptq_rounding(ckpt: Any, source: str, dest: Path, *, calibration: str | None, tokens: int, ctx: int,
                  damp: float | None, block: int | None, act_order: bool | None,
                  min_tokens: int | None) -> tuple[Rounding, Any]:
    """The Rounding a `--rounding gptq` job records (options, and the calibration text with its token ids'
    sha256, so the plan fingerprint changes with either), and the calibration windows."""
    from m1.errors import UsageError
    from m1.schemes import gptq
    from m1.verify.text import calibration_windows

    windows, what = calibration_windows(source, calibration or "mr-niah", tokens, ctx, ckpt.config.vocab_size)
    r = Rounding("gptq", gptq.DEFAULT_DAMP if damp is None else damp, gptq.DEFAULT_BLOCK if block is None else block,
                 True if act_order is None else act_order,
                 gptq.DEFAULT_MIN_TOKENS if min_tokens is None else min_tokens,
                 f"{what}; token ids sha256 {token_sha256(windows.tokens)[:16]}", int(windows.tokens.numel()),
                 int(windows.tokens.shape[1]), str(hessian_folder(dest)))
    if not 0 < r.damp < 10:
        raise UsageError(f"--damp must be in (0, 10) (a fraction of the mean Hessian diagonal), got {r.damp}")
    if r.block <= 0 or r.min_tokens < 0:
        raise UsageError("--gptq-block must be positive and --min-tokens at least 0")
    return r, windows


def hessians_for(ckpt: Any, plan: Any, rounding: Rounding, windows: Any, *, device: str, resume: bool,
                 progress: bool) -> HessianPass:
    """The finished Hessian pass for this source and calibration: reused on --resume, else run now."""
    from m1.devices import device_set, resolve_device
    from m1.progress import count_progress
    from m1.verify.sources import CheckpointWeights

    folder = Path(rounding.hessians)
    key = pass_key(plan.inputs, token_sha256(windows.tokens))
    done = finished_pass(folder, key) if resume else None
    if done is not None:
        return done
    dev = resolve_device(device_set(device)[0] if "," in device else device)
    cfg = ckpt.config
    with count_progress(cfg.num_hidden_layers, "hessians", "layers", progress) as advance:
        return run_pass(cfg, CheckpointWeights(ckpt), windows, folder, key, device=dev, progress=advance)


def rounding_record(done: HessianPass, rounding: Rounding, cfg: M1Config) -> dict[str, Any]:
    """What the job writes in m1-rounding.json: the options, the calibration, each expert's routed tokens and the
    experts that got the scheme's own rounding instead."""
    few = fallbacks(done.tokens, rounding, cfg)
    return {"rounding": rounding.record(), "hessian_seconds": round(done.seconds, 3),
            "hessian_peak_bytes": done.peak_bytes,
            "routed_tokens": {str(k): v for k, v in sorted(done.tokens.items())},
            "fallbacks": {str(k): {str(e): n for e, n in v.items()} for k, v in few.items()},
            "fallback_lines": fallback_lines(few)}
