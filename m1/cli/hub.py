"""`m1 push`, `m1 pull` and `m1 verify remote`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from m1.cli.options import JsonOpt, RevisionOpt, print_json, print_report

RepoIdArg = Annotated[str, typer.Argument(help="Hub repo id, owner/name.")]


def push_cmd(
    folder: Annotated[Path, typer.Argument(help="Checkpoint folder made by m1 (must pass m1 verify integrity).")],
    repo_id: RepoIdArg,
    private: Annotated[bool, typer.Option("--private", help="Create the repo private.")] = False,
    revision: RevisionOpt = None,
    create_pr: Annotated[bool, typer.Option("--create-pr", help="Open a pull request instead of committing.")] = False,
    report: Annotated[
        Path | None, typer.Option("--report", help="The report/ of m1 verify compare, shown in the model card.")
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Upload a checkpoint folder in one commit, with a model card (re-run to resume an interrupted upload).

    The token comes from HF_TOKEN or the saved login and is never printed.
    Example: m1 push m1-nf4/ my-org/MiniMax-M1-40k-experts-nf4 --private --report report/
    """
    from m1.hub import push

    result = push(folder, repo_id, private=private, revision=revision, create_pr=create_pr, report_path=report)
    if json_out:
        print_json(result)
    elif not result["changed"]:
        typer.echo(f"nothing to push: {repo_id}@{result['revision']} already holds {folder}"
                   f"{' (no pull request opened)' if create_pr else ''}; {result['commit_url']}")
    else:
        typer.echo(f"pushed {folder} to {result['pr_url'] or result['commit_url']}")
    if result["model_card"] != "written":
        typer.echo("warning: kept your README.md (it has no m1 marker), so the model card was not written", err=True)


def pull_cmd(
    repo_id: RepoIdArg,
    dest: Annotated[Path, typer.Argument(help="Local folder.")],
    layers: Annotated[str | None, typer.Option("--layers", help="Only the shards holding these layers, e.g. 0-3,79.")]
    = None,
    with_globals: Annotated[
        bool, typer.Option("--with-embeddings", help="Also the shards with the embedding, final norm and head.")
    ] = False,
    revision: RevisionOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Download a checkpoint, or only the shards that hold some layers (plus config, tokenizer and index).

    Example: m1 pull MiniMaxAI/MiniMax-M1-40k m1-40k/ --layers 0-3,79
    """
    from m1.hub import parse_layers, pull
    from m1.units import human_bytes

    result = pull(repo_id, dest, parse_layers(layers) if layers else None, with_globals, revision)
    if json_out:
        print_json(result.to_json())
    else:
        typer.echo(f"pulled {len(result.shards)} shards of {repo_id}@{(result.commit or '?')[:12]} into {dest} "
                   f"({len(result.files)} files, {human_bytes(result.bytes)})")


def remote_cmd(
    repo_id: RepoIdArg,
    revision: RevisionOpt = None,
    against: Annotated[
        Path | None,
        typer.Option("--against", help="A local copy (folder) or its m1-manifest.json: compare sha256 with the Hub's."),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Check a Hub repo without downloading tensor data: headers over range requests against the spec and index.

    Also compares the Hub's LFS sha256 of each shard with --against and with the repo's own m1-manifest.json.
    Exit 0 when sound, 1 with findings, 2 on usage errors.
    Example: m1 verify remote MiniMaxAI/MiniMax-M1-40k --against m1-40k/ --json
    """
    from m1.hub_verify import verify_remote

    report = verify_remote(repo_id, revision=revision, against=against)
    print_report(report, repo_id, False, json_out)


def register(app: typer.Typer, verify_app: typer.Typer) -> None:
    app.command("push")(push_cmd)
    app.command("pull")(pull_cmd)
    verify_app.command("remote")(remote_cmd)
