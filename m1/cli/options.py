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
QuietOpt = Annotated[bool, typer.Option("--quiet", "-q", help="No progress bars.")]
ShardSizeOpt = Annotated[str, typer.Option("--shard-size", help="Largest shard, e.g. 5GB, 500MB.")]
StreamLayoutOpt = Annotated[
    str | None, typer.Option("--layout", help="'size' (shards up to --shard-size, the default), 'by-layer' (one "
                             "shard per layer) or 'source' (shards up to --shard-size in the source's order: what "
                             "streaming from the Hub with --scratch picks when 'size' does not fit).")
]
ScratchOpt = Annotated[str | None, typer.Option("--scratch", help="Hub source: stream it through at most this "
                                                "much disk, e.g. 40GB (each shard downloaded once, deleted after "
                                                "its last use; per node under torchrun).")]

# The calibration and evaluation text, the same options wherever the engine reads one (verify perplexity, compare,
# logits, imatrix, the runtime check; imatrix words --ctx and --tokens for its chunks).
TextOpt = Annotated[Path | None, typer.Option("--text", help="A UTF-8 text file to evaluate on.")]
CorpusOpt = Annotated[str, typer.Option("--corpus", help="Bundled text: mr-niah or mr-niah-10240 (held-out 10%), "
                                                        "or mr-niah-10k (all 30 10k-token haystacks, long context).")]
IdsOpt = Annotated[Path | None, typer.Option("--token-ids", help="Pre-tokenized ids: JSON list or .npy.")]
CtxOpt = Annotated[int, typer.Option("--ctx", help="Tokens per window (non-overlapping).")]
TokensOpt = Annotated[int, typer.Option("--tokens", help="Evaluate at most this many tokens.")]
# How the engine runs.
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Compute dtype: fp32 (default) or bf16.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward batch.")]


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

