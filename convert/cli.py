"""`m1 convert`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from m1.cli_options import (
    AttnTypeOpt,
    ChatTemplateOpt,
    DryRunOpt,
    EmbedTypeOpt,
    HeadTypeOpt,
    JsonOpt,
    OverwriteOpt,
    QuietOpt,
    ResumeOpt,
    RevisionOpt,
    ScratchOpt,
    ShardSizeOpt,
    SplitOpt,
    StreamLayoutOpt,
    TokenizerPreOpt,
    VerboseOpt,
    WorkersOpt,
    format_help,
    format_option_values,
    print_json,
    print_plan,
)
from m1.errors import UsageError


def convert_cmd(
    source: Annotated[str, typer.Argument(help="Checkpoint folder or Hub repo id.")],
    dest: Annotated[Path, typer.Argument(help="Output folder (must be empty unless --resume/--overwrite).")],
    to: Annotated[str | None, typer.Option("--to", help=format_help("the source's"))] = None,
    layout: StreamLayoutOpt = None,
    shard_size: ShardSizeOpt = "5GB",
    dtype: Annotated[str, typer.Option("--dtype", help="keep, bf16, fp16 or fp32 (dequantizes bnb experts).")] = "keep",
    router_dtype: Annotated[str, typer.Option("--router-dtype", help="Router dtype (stays fp32 by default).")] = "keep",
    revision: RevisionOpt = None,
    attn_type: AttnTypeOpt = None,
    head_type: HeadTypeOpt = None,
    embed_type: EmbedTypeOpt = None,
    split_max_size: SplitOpt = None,
    tokenizer_pre: TokenizerPreOpt = None,
    chat_template: ChatTemplateOpt = None,
    scratch: ScratchOpt = None,
    dry_run: DryRunOpt = False,
    verbose: VerboseOpt = False,
    workers: WorkersOpt = 1,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Convert between formats (release, hf, gguf), shard layouts and dtypes.

    Example: m1 convert tiny-m1/ out-hf/ --to hf ;
    m1 convert out-hf/ back/ --to release --layout by-layer --dtype bf16 ;
    m1 convert m1-40k/ m1-bf16.gguf --to gguf ;  m1 convert m1-q4.gguf back/ --to release
    """
    from m1.convert.job import convert
    from m1.distributed import is_main_process
    from m1.formats import format_names

    if to is not None and to not in format_names():
        raise UsageError(f"--to must be one of {', '.join(repr(f) for f in format_names())}, got {to!r}")
    given = format_option_values(attn_type, head_type, embed_type, split_max_size, tokenizer_pre, chat_template)
    result = convert(source, dest, to=to, layout=layout, shard_size=shard_size, dtype=dtype, router_dtype=router_dtype,
                     revision=revision, format_options=given, scratch=scratch, workers=workers, resume=resume,
                     overwrite=overwrite, progress=not quiet, dry_run=dry_run)
    if dry_run:
        print_plan(result.plan, dest, json_out, verbose, result.scratch)
        return
    if not is_main_process():  # under torchrun, rank 0 says what the job wrote
        return
    if json_out:
        print_json({"dest": str(dest), "shards": result.files})
    else:
        total = sum(s["size"] for s in result.files.values())
        typer.echo(f"wrote {len(result.files)} {'files' if str(dest).endswith('.gguf') else 'shards'} "
                   f"({total} bytes) to {dest}")


def register(app: typer.Typer) -> None:
    app.command("convert")(convert_cmd)
