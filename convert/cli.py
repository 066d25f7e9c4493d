"""`m1 convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from m1.cli_options import (
    DryRunOpt,
    JsonOpt,
    LayoutOpt,
    OverwriteOpt,
    QuietOpt,
    ResumeOpt,
    RevisionOpt,
    ShardSizeOpt,
    check_layout,
    print_json,
)


def convert_cmd(
    source: Annotated[str, typer.Argument(help="Checkpoint folder or Hub repo id.")],
    dest: Annotated[Path, typer.Argument(help="Output folder (must be empty unless --resume/--overwrite).")],
    to: Annotated[str | None, typer.Option("--to", help="'hf' (transformers' minimax) or 'release'.")] = None,
    layout: LayoutOpt = "size",
    shard_size: ShardSizeOpt = "5GB",
    dtype: Annotated[str, typer.Option("--dtype", help="keep, bf16, fp16 or fp32 (dequantizes bnb experts).")] = "keep",
    router_dtype: Annotated[str, typer.Option("--router-dtype", help="Router dtype (stays fp32 by default).")] = "keep",
    revision: RevisionOpt = None,
    dry_run: DryRunOpt = False,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Convert between the release and Hugging Face layouts, shard layouts and dtypes.

    Example: m1 convert tiny-m1/ out-hf/ --to hf ;  m1 convert out-hf/ back/ --to release --layout by-layer --dtype bf16
    """
    import warnings

    from m1.convert.job import ConvertOptions, RotaryWarning, plan_convert, rotary_warning, run_convert

    from m1.checkpoint import Checkpoint
    from m1.errors import UsageError
    from m1.writer import iter_plan_lines, parse_size

    if to not in (None, "hf", "release"):
        raise UsageError(f"--to must be 'hf' or 'release', got {to!r}")
    opts = ConvertOptions(to=to, by_layer=check_layout(layout), shard_size=parse_size(shard_size), dtype=dtype,
                          router_dtype=router_dtype)
    ckpt = Checkpoint.open(source, revision=revision)
    if dry_run:
        plan, _ = plan_convert(ckpt, opts)
        message = rotary_warning(ckpt, opts.to)
        if message:
            warnings.warn(message, RotaryWarning, stacklevel=1)
        if json_out:
            print_json({"dry_run": True, "dest": str(dest), **plan.summary(), "job": plan.job})
        else:
            typer.echo(f"plan for {dest} (dry run, nothing written):")
            for line in iter_plan_lines(plan):
                typer.echo("  " + line)
        return
    manifest = run_convert(ckpt, dest, opts, resume=resume, overwrite=overwrite, show_progress=not quiet)
    if json_out:
        print_json({"dest": str(dest), "shards": manifest["shards"]})
    else:
        total = sum(s["size"] for s in manifest["shards"].values())
        typer.echo(f"wrote {len(manifest['shards'])} shards ({total} bytes) to {dest}")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert_cmd)
