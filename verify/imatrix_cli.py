"""`m1 verify imatrix SRC OUT.gguf`: llama.cpp's importance matrix from the layer-streamed engine (imatrix.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from m1.cli_options import JsonOpt, QuietOpt, print_json
from m1.verify.metrics_cli import BatchOpt, CorpusOpt, DeviceOpt, DtypeOpt, IdsOpt, TextOpt

CtxOpt = Annotated[int, typer.Option("--ctx", help="Tokens per chunk (llama-imatrix's -c; each chunk from an empty "
                                                   "state).")]
TokensOpt = Annotated[int, typer.Option("--tokens", help="Use at most this many calibration tokens.")]
PartOpt = Annotated[str, typer.Option("--corpus-part", help="With --corpus: 'calibration' (the first 90%, which "
                                                            "verify perplexity/compare never score) or 'held-out'.")]


def _calibration(source: str, text: Path | None, corpus: str, part: str, token_ids: Path | None, ctx: int,
                 tokens: int, vocab_size: int):  # noqa: ANN202
    from m1.errors import UsageError
    from m1.verify.text import read_windows

    if part not in ("calibration", "held-out"):
        raise UsageError(f"--corpus-part must be calibration or held-out, got {part!r}")
    return read_windows(source, text, corpus, token_ids, ctx, tokens, False, vocab_size, holdout=part == "held-out")


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
    source: Annotated[str, typer.Argument(help="Checkpoint folder (release or hf layout, or a GGUF).")],
    out: Annotated[Path, typer.Argument(help="The imatrix file to write (.gguf, llama.cpp's format).")],
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
    """Importance matrix for llama.cpp's K-quants and IQ types, one layer at a time with the reference engine.

    Per linear input (attention projections, router, each expert's w1/w3 and w2 input, counted per expert with
    the tokens routed to it): the per-column sum of squares and the token count, in llama.cpp's GGUF imatrix
    format (llama-quantize --imatrix reads it). Experts no token reached are reported.
    Example: m1 verify imatrix m1-40k/ imatrix.gguf --corpus mr-niah --tokens 200000 --device cuda
    """
    from m1.checkpoint import Checkpoint
    from m1.errors import UsageError
    from m1.verify.imatrix import plan_imatrix
    from m1.verify.text import at_least_one, compute_dtype

    at_least_one("--batch-size", batch_size)
    at_least_one("--tokens", tokens)
    if ctx < 2:
        raise UsageError(f"--ctx must be at least 2, got {ctx}")
    cdtype = compute_dtype(dtype)
    if out.is_dir():
        raise UsageError("OUT names a folder; it must be a file", file=str(out), hint=f"e.g. {out / 'imatrix.gguf'}")
    if dry_run:
        plan = plan_imatrix(Checkpoint.open(source), tokens, ctx, batch_size, cdtype, process_output)
        _print_plan(source, plan, json_out)
        return
    from m1.devices import resolve_device
    from m1.gguf.imatrix import write_imatrix
    from m1.manifest import guard_source
    from m1.progress import count_progress
    from m1.verify.imatrix import compute_imatrix
    from m1.verify.sources import CheckpointWeights

    weights = CheckpointWeights.open(source)
    guard_source([out], weights.ckpt.storage.sources())
    if out.exists() and not overwrite:
        raise UsageError("OUT exists", file=str(out), hint="pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UsageError("the folder for OUT does not exist", file=str(out), hint="create it first")
    cfg = weights.config
    windows, what = _calibration(source, text, corpus, corpus_part, token_ids, ctx, tokens, cfg.vocab_size)
    with count_progress(cfg.num_hidden_layers, "layers", "layers", not quiet and not json_out) as advance:
        result = compute_imatrix(cfg, weights, windows, device=resolve_device(device), dtype=cdtype,
                                 batch_size=batch_size, datasets=[what], process_output=process_output,
                                 progress=advance)
    size = write_imatrix(out, result)
    unseen = result.unseen_experts()
    n_tokens = int(windows.tokens.numel())
    summary = {"source": source, "out": str(out), "bytes": size, "entries": len(result.entries),
               "tokens": n_tokens, "chunks": result.chunk_count, "chunk_size": result.chunk_size, "text": what,
               "seconds": round(result.seconds, 3),
               "seconds_per_million_tokens_per_layer": round(
                   result.seconds / cfg.num_hidden_layers / (n_tokens / 1e6), 3),
               "unseen_experts": {str(k): v for k, v in unseen.items()},
               "routed_tokens": {str(i): result.routed_tokens(i).tolist() for i in range(cfg.num_hidden_layers)}}
    if json_out:
        print_json(summary)
        return
    typer.echo(f"{out}: {len(result.entries)} imatrix entries from {n_tokens} tokens ({result.chunk_count} chunks "
               f"of {result.chunk_size}, {what}) in {result.seconds:.1f} s")
    for layer, experts in unseen.items():
        typer.echo(f"layer {layer}: no token was routed to expert{'s' if len(experts) > 1 else ''} "
                   f"{', '.join(map(str, experts))} (llama-quantize then weighs all its columns 1; calibrate on "
                   "more or more varied text)")
    if not unseen:
        typer.echo("every expert of every layer saw calibration tokens")


def register(verify_app: typer.Typer) -> None:
    verify_app.command("imatrix")(imatrix_cmd)
