"""`m1 convert`: between formats (any registered, `m1.formats.format_names()`), shard layouts and dtypes; a
quantized source is copied as stored, or dequantized with `--dtype`. It is the pipeline's one planner and
executor without a scheme.

`convert(...)` is the job as a Python function (what the CLI calls); `plan_convert` / `run_convert` are its
two halves for callers that hold a `Checkpoint` already.
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from m1.checkpoint import Checkpoint
from m1.plan import Plan
from m1.planner import JobRequest, JobResult, by_layer, plan_checkpoint
from m1.run import RunOptions, execute


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


def convert(source: str | Path, dest: str | Path, *, to: str | None = None, layout: str | None = None,
            shard_size: int | str = "5GB", dtype: str = "keep", router_dtype: str = "keep",
            revision: str | None = None, format_options: Mapping[str, Any] | None = None,
            scratch: int | str | None = None, workers: int = 1, resume: bool = False, overwrite: bool = False,
            progress: bool = True, dry_run: bool = False) -> JobResult:
    """Convert checkpoint `source` (a folder, a file a format reads itself, or a Hub repo id) into `dest`.

    to: the output format (`m1.formats.format_names()`; None keeps the source's). layout: `size` (shards up to
    `shard_size`), `by-layer`, or `source` (the source's order). dtype / router_dtype: keep, bf16, fp16, fp32.
    format_options: the output format's own options by keyword (its `Format.options`; None: not given; another
    format's option is refused). scratch: stream a Hub source through at most this many
    bytes of disk. dry_run: plan only (the result's `plan`; nothing is written).

    Example: `m1.convert("tiny-m1", "tiny-hf", to="hf")`.
    """
    from m1.dequantized import dense_view, needs_dense_view
    from m1.formats import format_options as make_format_options
    from m1.scratch import arrange
    from m1.units import parse_size

    dest = Path(dest)
    ckpt = Checkpoint.open(str(source), revision=revision)
    if needs_dense_view(ckpt, to or ckpt.config.flavour, quantizing=False):  # e.g. fp8 into a format without it
        ckpt = dense_view(ckpt, dtype)
    opts = ConvertOptions(to=to, by_layer=by_layer(layout), shard_size=parse_size(shard_size), dtype=dtype,
                          router_dtype=router_dtype,
                          format_options=make_format_options(to or ckpt.config.flavour, dest, format_options or {}))
    bound = parse_size(scratch) if scratch is not None else None
    plan = arrange(plan_convert(ckpt, opts), ckpt, layout, opts.shard_size, bound)
    if dry_run:
        from m1.scratch import dry_run as scratch_dry_run

        warn_plan(plan)
        return JobResult(dest, plan, scratch=scratch_dry_run(plan, ckpt.storage, bound) if bound is not None else None)
    manifest = run_convert(ckpt, dest, opts, resume=resume, overwrite=overwrite, show_progress=progress,
                           workers=workers, plan=plan, scratch=bound)
    return JobResult(dest, plan, manifest)


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
