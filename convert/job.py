"""`m1 convert`: between formats (release, hf), shard layouts and dtypes; a quantized source is copied as
stored, or dequantized with `--dtype`. It is the pipeline's one planner and executor without a scheme."""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m1.checkpoint import Checkpoint
from m1.execute import RunOptions, execute
from m1.plan import Plan
from m1.planner import JobRequest, plan_checkpoint


class RotaryWarning(UserWarning):
    """transformers' MiniMax rotates every head dim; the release rotates only rotary_dim of them."""


@dataclass(frozen=True)
class ConvertOptions:
    to: str | None = None  # a format name (m1.formats); None keeps the source's
    by_layer: bool = False
    shard_size: int = 5 * 10**9
    dtype: str = "keep"
    router_dtype: str = "keep"
    format_options: dict[str, Any] = field(default_factory=dict)

    def request(self) -> JobRequest:
        return JobRequest("convert", self.to, self.dtype, self.router_dtype, self.by_layer, self.shard_size,
                          format_options=self.format_options)


def plan_convert(ckpt: Checkpoint, opts: ConvertOptions) -> Plan:
    return plan_checkpoint(ckpt, opts.request())


def warn_plan(plan: Plan) -> None:
    for message in plan.warnings:
        warnings.warn(message, RotaryWarning, stacklevel=3)


def run_convert(ckpt: Checkpoint, dest: Path, opts: ConvertOptions, resume: bool = False, overwrite: bool = False,
                show_progress: bool = True, workers: int = 1, plan: Plan | None = None,
                scratch: int | None = None) -> dict[str, Any]:
    """Convert `ckpt` into `dest`; returns the manifest. `scratch`: stream a Hub source through at most that
    many bytes of disk (m1.scratch)."""
    plan = plan or plan_convert(ckpt, opts)
    warn_plan(plan)
    run = RunOptions(resume=resume, overwrite=overwrite, workers=workers, show_progress=show_progress,
                     label="convert", scratch=scratch)
    return execute(plan, dest, ckpt, run).manifest
