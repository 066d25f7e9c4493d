"""Option types shared by every command, so the same flag means the same thing everywhere."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from m1.integrity import IntegrityReport
    from m1.plan import Plan

JsonOpt = Annotated[bool, typer.Option("--json", help="Print a machine-readable JSON result on stdout.")]
RevisionOpt = Annotated[
    str | None, typer.Option("--revision", help="Hub branch, tag or commit sha (for a Hub repo id).")
]
DryRunOpt = Annotated[bool, typer.Option("--dry-run", help="Print the plan (shards, tensors, bytes); write nothing.")]
ResumeOpt = Annotated[bool, typer.Option("--resume", help="Finish an interrupted run into the same destination.")]
OverwriteOpt = Annotated[bool, typer.Option("--overwrite", help="Replace a non-empty destination.")]
VerboseOpt = Annotated[bool, typer.Option("--verbose", "-v", help="With --dry-run: every tensor operation.")]
WorkersOpt = Annotated[int, typer.Option("--workers", help="Processes writing files in parallel.")]
AttnTypeOpt = Annotated[str | None, typer.Option("--attn-type", help="GGUF: attention projections' type (bf16, "
                                                 "f16, f32, q8_0; default: their source precision).")]
HeadTypeOpt = Annotated[str | None, typer.Option("--head-type", help="GGUF: the LM head's type (default bf16 or the "
                                                 "source's; never below q8_0).")]
EmbedTypeOpt = Annotated[str | None, typer.Option("--embed-type", help="GGUF: the embedding's type.")]
SplitOpt = Annotated[str | None, typer.Option("--split-max-size", help="GGUF: split into llama.cpp's -0000i-of-0000n "
                                              "files of at most this size, e.g. 50G.")]
TokenizerPreOpt = Annotated[str | None, typer.Option("--tokenizer-pre", help="GGUF: llama.cpp's pre-tokenizer name, "
                                                     "when the tokenizer's split regex is not one it knows.")]
ChatTemplateOpt = Annotated[Path | None, typer.Option("--chat-template", help="GGUF: a Jinja file that replaces the "
                                                      "model's chat template.")]
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ShardSizeOpt = Annotated[str, typer.Option("--shard-size", help="Largest shard, e.g. 5GB, 500MB.")]
StreamLayoutOpt = Annotated[
    str | None, typer.Option("--layout", help="'size' (shards up to --shard-size, the default), 'by-layer' (one "
                             "shard per layer) or 'source' (shards up to --shard-size in the source's order: what "
                             "streaming from the Hub with --scratch picks when 'size' does not fit).")
]


def format_help(default: str) -> str:
    """--to / --format's help, from the format registry."""
    from m1.formats import all_formats

    return f"Output format ({default} by default): " + "; ".join(f"'{f.name}': {f.description}"
                                                                for f in all_formats()) + "."


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def print_report(report: IntegrityReport, source: str, deep: bool, json_out: bool) -> None:
    """Findings one per line (or JSON), a verdict line, and exit 1 when there are findings."""
    if json_out:
        print_json(report.to_json())
    else:
        for finding in report.findings:
            typer.echo(finding.line())
        stats = report.stats
        verdict = "sound" if report.ok else f"{len(report.findings)} findings"
        typer.echo(f"{source}: {verdict} ({stats.get('tensors', '?')} tensors in {stats.get('shards', '?')} shards"
                   f"{', deep' if deep else ''})")
    if not report.ok:
        raise typer.Exit(1)


ScratchOpt = Annotated[str | None, typer.Option("--scratch", help="Hub source: stream it through at most this "
                                                "much disk, e.g. 40GB (each shard downloaded once, deleted after "
                                                "its last use; per node under torchrun).")]


def print_plan(plan: Plan, dest: Path, json_out: bool, verbose: bool, scratch: Any = None) -> None:
    """--dry-run: the plan's summary (every op with --verbose), or JSON; nothing is written. `scratch`: an
    m1.scratch.ScratchPlan, whose peak disk and downloads are stated too."""
    if json_out:
        extra = {"scratch": scratch.summary()} if scratch is not None else {}
        print_json({"dry_run": True, "dest": str(dest), **plan.summary(verbose), "job": plan.job, **extra})
        return
    typer.echo(f"plan for {dest} (dry run, nothing written):")
    for line in plan.lines():
        typer.echo("  " + line)
    for line in scratch.lines() if scratch is not None else []:
        typer.echo("  " + line)
    if verbose:
        for line in plan.op_lines():
            typer.echo("  " + line)


def format_option_values(attn_type: str | None = None, head_type: str | None = None, embed_type: str | None = None,
                 split_max_size: str | None = None, tokenizer_pre: str | None = None,
                 chat_template: Path | None = None) -> dict[str, Any]:
    """The format options the command line declares, by keyword (the output format refuses those not its own)."""
    return {"attn_type": attn_type, "head_type": head_type, "embed_type": embed_type,
            "split_max_size": split_max_size, "tokenizer_pre": tokenizer_pre, "chat_template": chat_template}
