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
