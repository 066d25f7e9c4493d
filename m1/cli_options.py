"""Option types shared by every command, so the same flag means the same thing everywhere."""

from __future__ import annotations

import json
import sys
from typing import TYPE_CHECKING, Annotated, Any

import typer

if TYPE_CHECKING:
    from pathlib import Path

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
LayoutOpt = Annotated[
    str, typer.Option("--layout", help="'size' (shards up to --shard-size) or 'by-layer' (one shard per layer).")
]


def print_json(obj: Any) -> None:
    sys.stdout.write(json.dumps(obj, indent=2, default=str) + "\n")


def check_layout(layout: str) -> bool:
    """True for by-layer."""
    from m1.errors import UsageError

    if layout not in ("size", "by-layer"):
        raise UsageError(f"--layout must be 'size' or 'by-layer', got {layout!r}")
    return layout == "by-layer"


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


def print_plan(plan: Plan, dest: Path, json_out: bool, verbose: bool) -> None:
    """--dry-run: the plan's summary (every op with --verbose), or JSON; nothing is written."""
    if json_out:
        print_json({"dry_run": True, "dest": str(dest), **plan.summary(verbose), "job": plan.job})
        return
    typer.echo(f"plan for {dest} (dry run, nothing written):")
    for line in plan.lines():
        typer.echo("  " + line)
    if verbose:
        for line in plan.op_lines():
            typer.echo("  " + line)
