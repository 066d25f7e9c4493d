"""`m1 convert`: parses, calls m1.convert.job.convert, prints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from m1.cli.options import (
    DryRunOpt,
    JsonOpt,
    OverwriteOpt,
    QuietOpt,
    ResumeOpt,
    RevisionOpt,
    ScratchOpt,
    ShardSizeOpt,
    StreamLayoutOpt,
    VerboseOpt,
    WorkersOpt,
    print_json,
    print_plan,
)
from m1.cli.registries import format_help, with_examples, with_format_options
from m1.errors import UsageError


@with_format_options
def convert_cmd(
    source: Annotated[str, typer.Argument(help="Checkpoint folder or Hub repo id.")],
    dest: Annotated[Path, typer.Argument(help="Output folder (must be empty unless --resume/--overwrite).")],
    to: Annotated[str | None, typer.Option("--to", help=format_help("the source's"))] = None,
    layout: StreamLayoutOpt = None,
    shard_size: ShardSizeOpt = "5GB",
    dtype: Annotated[str, typer.Option("--dtype", help="keep, bf16, fp16 or fp32 (dequantizes bnb experts).")] = "keep",
    router_dtype: Annotated[str, typer.Option("--router-dtype", help="Router dtype (stays fp32 by default).")] = "keep",
    revision: RevisionOpt = None,
    format_options: dict[str, Any] | None = None,  # every format's own options (m1.cli.registries)
    scratch: ScratchOpt = None,
    dry_run: DryRunOpt = False,
    verbose: VerboseOpt = False,
    workers: WorkersOpt = 1,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Convert between formats ({formats}), shard layouts and dtypes.

    Example: m1 convert tiny-m1/ out-hf/ --to hf ;
    {format examples}
    m1 convert out-hf/ back/ --to release --layout by-layer --dtype bf16
    """
    from m1.convert.job import convert
    from m1.distributed import is_main_process
    from m1.formats import format_for_path, format_names

    if to is not None and to not in format_names():
        raise UsageError(f"--to must be one of {', '.join(repr(f) for f in format_names())}, got {to!r}")
    result = convert(source, dest, to=to, layout=layout, shard_size=shard_size, dtype=dtype, router_dtype=router_dtype,
                     revision=revision, format_options=format_options, scratch=scratch, workers=workers,
                     resume=resume, overwrite=overwrite, progress=not quiet, dry_run=dry_run)
    if dry_run:
        print_plan(result.plan, dest, json_out, verbose, result.scratch)
        return
    if not is_main_process():  # under torchrun, rank 0 says what the job wrote
        return
    if json_out:
        print_json({"dest": str(dest), "shards": result.files})
    else:
        total = sum(s["size"] for s in result.files.values())
        # a destination that is a format's own file (not a folder of shards) holds files
        typer.echo(f"wrote {len(result.files)} {'files' if format_for_path(str(dest)) is not None else 'shards'} "
                   f"({total} bytes) to {dest}")


def register(app: typer.Typer) -> None:
    from m1.formats import format_names

    convert_cmd.__doc__ = with_examples(convert_cmd.command.__doc__, "convert").replace(
        "{formats}", ", ".join(format_names()))
    app.command("convert")(convert_cmd)
