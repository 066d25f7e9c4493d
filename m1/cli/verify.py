"""`m1 verify ...`: the command group and `m1 verify integrity`; the other checks live in the verify_* modules."""

from __future__ import annotations

from typing import Annotated

import typer

from m1.cli.options import JsonOpt, QuietOpt, RevisionOpt

verify_app = typer.Typer(
    help="Check checkpoints: integrity, agreement, perplexity.\n\nExample: m1 verify integrity out-hf/ --deep",
    no_args_is_help=True,
)


@verify_app.command("integrity")
def integrity_cmd(
    source: Annotated[str, typer.Argument(help="Checkpoint folder (or Hub repo id: headers only).")],
    deep: Annotated[bool, typer.Option("--deep", help="Also read every tensor and check it is finite.")] = False,
    no_hash: Annotated[bool, typer.Option("--no-hash", help="Skip the manifest sha256 check.")] = False,
    layers: Annotated[
        str | None, typer.Option("--layers", help="Only these layers, e.g. 0-3,79 (a folder from m1 pull --layers).")
    ] = None,
    revision: RevisionOpt = None,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Index against shard headers, inventory against the M1 spec, manifest sha256; --deep: every tensor finite.

    Exit 0 when sound, 1 with a list of findings, 2 on usage errors.
    Example: m1 verify integrity out-hf/ --deep --json
    """
    from m1.cli.options import print_report
    from m1.hub import parse_layers
    from m1.integrity import check_integrity

    report = check_integrity(source, deep=deep, check_hashes=not no_hash, revision=revision,
                             show_progress=not quiet and not json_out,
                             layers=parse_layers(layers) if layers else None)
    print_report(report, source, deep, json_out)


def register(app: typer.Typer) -> typer.Typer:
    """Adds `m1 verify` to `app`; returns the group, so that other modules add their checks to it."""
    from m1.cli.verify_imatrix import register as register_imatrix
    from m1.cli.verify_metrics import register as register_metrics
    from m1.cli.verify_runtime import register as register_runtime

    register_metrics(verify_app)
    register_imatrix(verify_app)
    register_runtime(verify_app)
    app.add_typer(verify_app, name="verify")
    return verify_app
