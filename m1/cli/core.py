"""`m1 make-tiny` and `m1 inspect`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from m1.cli.options import JsonOpt, OverwriteOpt, RevisionOpt, print_json


def make_tiny_cmd(
    dest: Annotated[Path, typer.Argument(help="Folder to create.")],
    layers: Annotated[int, typer.Option(help="Number of layers.")] = 4,
    hidden: Annotated[int, typer.Option(help="Hidden size.")] = 64,
    heads: Annotated[int, typer.Option(help="Attention heads.")] = 4,
    kv_heads: Annotated[int, typer.Option(help="KV heads of the softmax layers.")] = 2,
    head_dim: Annotated[int, typer.Option(help="Head dim.")] = 16,
    rotary_dim: Annotated[int, typer.Option(help="Rotated dims per head (release: half).")] = 8,
    intermediate: Annotated[int, typer.Option(help="Expert intermediate size.")] = 96,
    experts: Annotated[int, typer.Option(help="Experts per layer.")] = 4,
    top_k: Annotated[int, typer.Option(help="Experts per token.")] = 2,
    vocab: Annotated[int, typer.Option(help="Vocabulary size.")] = 256,
    softmax_every: Annotated[int, typer.Option(help="Every n-th layer is softmax attention.")] = 4,
    shards: Annotated[int, typer.Option(help="Number of zero-based shards.")] = 3,
    seed: Annotated[int, typer.Option(help="Random seed.")] = 0,
    overwrite: OverwriteOpt = False,
) -> None:
    """A small random M1 in the exact release layout.

    Example: m1 make-tiny tiny-m1/ --layers 8 --experts 8
    """
    from m1.tiny import TinySpec, make_tiny

    spec = TinySpec(layers=layers, hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=head_dim,
                    rotary_dim=rotary_dim, intermediate=intermediate, experts=experts, top_k=top_k, vocab=vocab,
                    softmax_every=softmax_every, shards=shards, seed=seed)
    cfg = make_tiny(dest, spec, overwrite=overwrite)
    typer.echo(f"wrote a tiny M1 to {dest}: {cfg.num_hidden_layers} layers "
               f"({cfg.layer_kinds.count('softmax')} softmax), {cfg.num_local_experts} experts, {shards} shards")


def inspect_cmd(
    source: Annotated[str, typer.Argument(help="Checkpoint folder or Hub repo id (headers only).")],
    revision: RevisionOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """What is this checkpoint? Flavour, layer kinds, parameters and bytes by role and dtype, what is missing.

    Example: m1 inspect MiniMaxAI/MiniMax-M1-40k
    """
    from m1.inspect import inspect_checkpoint, render_inspect

    info = inspect_checkpoint(source, revision)
    if json_out:
        print_json(info)
    else:
        typer.echo(render_inspect(info))
    if info["missing"] or info["unexpected"] or info["unreadable"] or info["problems"]:
        raise typer.Exit(1)


def register(app: typer.Typer) -> None:
    app.command("make-tiny")(make_tiny_cmd)
    app.command("inspect")(inspect_cmd)
