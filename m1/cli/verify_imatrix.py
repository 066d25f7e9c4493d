"""`m1 verify imatrix SRC OUT`: parses, calls m1.verify.jobs.imatrix (an importance matrix from the engine, in the
file a format declares, m1.formats.base.ImatrixFile), prints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from m1.cli.options import BatchOpt, CorpusOpt, DeviceOpt, DtypeOpt, IdsOpt, JsonOpt, QuietOpt, TextOpt, print_json
from m1.cli.registries import imatrix_files, label

CtxOpt = Annotated[int, typer.Option("--ctx", help="Tokens per chunk (llama-imatrix's -c; each chunk from an empty "
                                                   "state).")]
TokensOpt = Annotated[int, typer.Option("--tokens", help="Use at most this many calibration tokens.")]
PartOpt = Annotated[str, typer.Option("--corpus-part", help="With --corpus: 'calibration' (the first 90%, which "
                                                            "verify perplexity/compare never score) or 'held-out'.")]


def _source_help() -> str:
    from m1.formats import all_formats

    folders = " or ".join(f.name for f in all_formats() if f.open_storage is None)
    files = "".join(f", or a {label(f)}" for f in all_formats() if f.open_storage is not None)
    return f"Checkpoint folder ({folders} layout{files})."


def _out_help() -> str:
    return "The imatrix file to write (" + "; ".join(f"{Path(file.example).suffix}, {file.what}"
                                                     for _, file in imatrix_files()) + ")."


def _print_plan(source: str, plan, json_out: bool) -> None:  # noqa: ANN001
    from m1.units import human_bytes

    if json_out:
        print_json({"source": source, "dry_run": True, **plan.as_dict()})
        return
    typer.echo(f"m1 verify imatrix {source}: plan (sizes from the {plan.sizes_from}; no tensor data read)")
    typer.echo(f"  {plan.tokens} tokens in chunks of {plan.ctx}, batches of {plan.batch_size} chunks, "
               f"{plan.dtype_bytes * 8}-bit compute")
    typer.echo(f"  read the embedding ({human_bytes(plan.embedding_bytes)}), then layer by layer:")
    shown = plan.layers if len(plan.layers) <= 12 else [*plan.layers[:8], None, *plan.layers[-2:]]
    for lp in shown:
        if lp is None:
            typer.echo("    ...")
            continue
        typer.echo(f"    layer {lp.layer:>3} {lp.kind:<9} read {human_bytes(lp.weight_bytes):>10}, "
                   f"{lp.entries} imatrix entries")
    total = sum(lp.weight_bytes for lp in plan.layers)
    biggest = max(plan.layers, key=lambda lp: lp.weight_bytes)
    typer.echo(f"  reads {human_bytes(total + plan.embedding_bytes)} once; writes "
               f"{sum(lp.entries for lp in plan.layers)} entries, about {human_bytes(plan.output_bytes)}")
    typer.echo(f"  peak memory about {human_bytes(plan.peak_bytes)}: one layer's weights "
               f"{human_bytes(biggest.weight_bytes)} (layer {biggest.layer}) + the activations of every token "
               f"{human_bytes(plan.hidden_bytes)} (layer input and output) + one batch's working set "
               f"{human_bytes(plan.batch_bytes)} (estimate)")


def imatrix_cmd(
    source: Annotated[str, typer.Argument(help=_source_help())],
    out: Annotated[Path, typer.Argument(help=_out_help())],
    text: TextOpt = None,
    corpus: CorpusOpt = "mr-niah",
    corpus_part: PartOpt = "calibration",
    token_ids: IdsOpt = None,
    ctx: CtxOpt = 512,
    tokens: TokensOpt = 65536,
    process_output: Annotated[bool, typer.Option("--process-output", help="Also the LM head's input "
                                                 "(output.weight), as llama-imatrix --process-output.")] = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    batch_size: BatchOpt = 4,
    overwrite: Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it exists.")] = False,
    dry_run: Annotated[bool, typer.Option("--dry-run", help="Print the layer order and peak memory; read no tensor "
                                                            "data, write nothing.")] = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Importance matrix for {used by}, one layer at a time with the reference engine.

    Per linear input (attention projections, router, each expert's w1/w3 and w2 input, counted per expert with
    the tokens routed to it): the per-column sum of squares and the token count, in {what}.
    Experts no token reached are reported.
    Example: m1 verify imatrix m1-40k/ {example} --corpus mr-niah --tokens 200000 --device cuda
    """
    from m1.verify.jobs import imatrix

    result = imatrix(source, out, text=text, corpus=corpus, corpus_part=corpus_part, token_ids=token_ids, ctx=ctx,
                     tokens=tokens, process_output=process_output, device=device, dtype=dtype, batch_size=batch_size,
                     overwrite=overwrite, dry_run=dry_run, progress=not quiet and not json_out)
    if result.plan is not None:
        _print_plan(source, result.plan, json_out)
        return
    summary = result.summary
    if json_out:
        print_json(summary)
        return
    typer.echo(f"{out}: {summary['entries']} imatrix entries from {summary['tokens']} tokens ({summary['chunks']} "
               f"chunks of {summary['chunk_size']}, {summary['text']}) in {result.stats.seconds:.1f} s")
    unseen = result.unseen_experts
    for layer, experts in unseen.items():
        typer.echo(f"layer {layer}: no token was routed to expert{'s' if len(experts) > 1 else ''} "
                   f"{', '.join(map(str, experts))} (llama-quantize then weighs all its columns 1; calibrate on "
                   "more or more varied text)")
    if not unseen:
        typer.echo("every expert of every layer saw calibration tokens")


def register(verify_app: typer.Typer) -> None:
    files = imatrix_files()
    if not files:  # no format has an importance-matrix file: no command to write one
        return
    imatrix_cmd.__doc__ = (imatrix_cmd.__doc__.replace("{used by}", " and ".join(f.used_by for _, f in files))
                           .replace("{what}", "; ".join(f.what for _, f in files))
                           .replace("{example}", files[0][1].example))
    verify_app.command("imatrix")(imatrix_cmd)
