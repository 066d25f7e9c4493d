"""`m1 verify perplexity`, `m1 verify compare`, `m1 verify logits` (registered on the verify group): each parses,
calls its job in m1.verify.jobs, prints."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from m1.cli.options import (
    BatchOpt,
    CorpusOpt,
    CtxOpt,
    DeviceOpt,
    DtypeOpt,
    IdsOpt,
    JsonOpt,
    QuietOpt,
    TextOpt,
    TokensOpt,
    print_json,
)

HalfOpt = Annotated[bool, typer.Option("--second-half", help="Score only the second half of each window "
                                                             "(llama.cpp's perplexity convention).")]


def _refuse_ignored_options(context: typer.Context, path: Path, windows, ref, meta: dict[str, str],  # noqa: ANN001
                            values: dict[str, object]) -> None:
    """With --ref-logits the tokens, windows and top-k come from the file: an option given on the command line
    that would change them cannot apply, so it is a usage error instead of being silently ignored. An option
    that agrees with the file (the same --ctx, say) is accepted."""
    from m1.errors import UsageError
    from m1.verify.text import CORPORA, corpus_description

    n, ctx = (int(d) for d in windows.tokens.shape)
    stored = {
        "ctx": ctx,
        "tokens": n * ctx,
        "second_half": windows.first_scored == ctx // 2 and windows.first_scored > 0,
        "top_k": int(ref.top_ids.shape[1]),
        "corpus": next((c for c in CORPORA if corpus_description(c) == meta.get("text")), None),
    }
    made = f"{n} windows of {ctx} tokens from {meta.get('text') or 'an unknown text'}, top-{stored['top_k']}"
    for name, value in values.items():
        source = context.get_parameter_source(name)  # click's ParameterSource (typer vendors its own click)
        if source is None or source.name in ("DEFAULT", "DEFAULT_MAP"):
            continue
        if name in stored and stored[name] == value:
            continue
        option = "--" + name.replace("_", "-")
        shown = option if isinstance(value, bool) else f"{option} {value}"
        raise UsageError(f"{shown} does not apply with --ref-logits: the reference was made from {made}",
                         file=str(path), hint="drop the option, or make a new reference with m1 verify logits "
                                              f"REF --save FILE {option} ...")


def perplexity_cmd(
    source: Annotated[str, typer.Argument(help="Checkpoint folder.")],
    text: TextOpt = None,
    corpus: CorpusOpt = "mr-niah",
    token_ids: IdsOpt = None,
    ctx: CtxOpt = 256,
    tokens: TokensOpt = 8192,
    second_half: HalfOpt = False,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    batch_size: BatchOpt = 4,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Perplexity of a checkpoint over a text, with the layer-streamed reference engine.

    Example: m1 verify perplexity m1-40k/ --text wiki.txt --ctx 2048 --tokens 65536 --device cuda
    """
    import math

    from m1.errors import M1Error
    from m1.verify.jobs import perplexity

    result = perplexity(source, text=text, corpus=corpus, token_ids=token_ids, ctx=ctx, tokens=tokens,
                        second_half=second_half, device=device, dtype=dtype, batch_size=batch_size,
                        progress=not quiet and not json_out)
    what = result["text"]
    if json_out:
        print_json(result)
    else:
        typer.echo(f"{source}: perplexity {result['ppl']:.4f} ± {result['ppl_err']:.4f} over "
                   f"{result['tokens_scored']} tokens ({result['windows']} windows of {result['ctx']}, {what})")
    bad = result["nonfinite_positions"]
    if bad or not math.isfinite(result["ppl"]):
        why = (f"NaN or infinite logits at {bad} of {result['tokens_scored']} scored positions" if bad
               else "the mean negative log-likelihood overflows")
        raise M1Error(f"perplexity is {result['ppl']}: {why}", file=source,
                      hint="the model is broken; check its weights with m1 verify integrity --deep")


def compare_cmd(
    context: typer.Context,
    models: Annotated[list[str], typer.Argument(help="REF CAND [CAND ...], or only candidates with --ref-logits.")],
    ref_logits: Annotated[
        Path | None, typer.Option("--ref-logits", help="Stored reference from m1 verify logits --save.")
    ] = None,
    text: TextOpt = None,
    corpus: CorpusOpt = "mr-niah",
    token_ids: IdsOpt = None,
    ctx: CtxOpt = 256,
    tokens: TokensOpt = 8192,
    second_half: HalfOpt = False,
    top_k: Annotated[int, typer.Option("--top-k", help="Reference log-probs kept per position for KL.")] = 256,
    max_kl: Annotated[float | None, typer.Option("--max-kl", help="Fail when the mean KL is above this.")] = None,
    min_top1: Annotated[float | None, typer.Option("--min-top1", help="Fail when top-1 agreement is below.")] = None,
    max_ppl_ratio: Annotated[float | None, typer.Option("--max-ppl-ratio", help="Fail above this PPL ratio.")] = None,
    no_layers: Annotated[bool, typer.Option("--no-layers", help="Skip the per-layer errors.")] = False,
    by_position: Annotated[bool, typer.Option("--by-position", help="Also KL, top-1 and NLL per position bucket "
                                                                    "(powers of two up to --ctx).")] = False,
    report: Annotated[Path | None, typer.Option(
        "--report", help="Write report.json, report.md, layers.png (positions.png with --by-position) here.")] = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    batch_size: BatchOpt = 4,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Agreement of candidates with a reference on the same tokens: PPL ratio, KL, top-1, per-layer error.

    Exit 1 when a threshold fails (for CI).
    Example: m1 verify compare m1-40k/ m1-nf4/ --corpus mr-niah --tokens 32768 --report report/ --max-kl 0.05
    Long context: m1 verify compare m1-40k/ m1-nf4/ --corpus mr-niah-10k --ctx 65536 --tokens 65536 --by-position
    """
    from m1.verify.jobs import compare
    from m1.verify.report import markdown_table, position_table

    def refuse_ignored(ref, windows, meta: dict[str, str]) -> None:  # noqa: ANN001
        _refuse_ignored_options(context, Path(ref_logits), windows, ref, meta, {
            "text": text, "corpus": corpus, "token_ids": token_ids, "ctx": ctx, "tokens": tokens,
            "second_half": second_half, "top_k": top_k})

    outcome = compare(*models, ref_logits=ref_logits, text=text, corpus=corpus, token_ids=token_ids, ctx=ctx,
                      tokens=tokens, second_half=second_half, top_k=top_k, max_kl=max_kl, min_top1=min_top1,
                      max_ppl_ratio=max_ppl_ratio, layers=not no_layers, by_position=by_position, report=report,
                      device=device, dtype=dtype, batch_size=batch_size, progress=not quiet and not json_out,
                      on_reference=refuse_ignored)
    results, obj = outcome.results, outcome.report
    if json_out:
        print_json(obj)
    else:
        typer.echo(markdown_table(results))
        for r in results:
            if r.positions:
                typer.echo("\n" + position_table(r))
        for r in results:
            if r.failures:
                typer.echo(f"FAIL {r.name}: " + "; ".join(r.failures))
    if not all(r.passed for r in results):
        raise typer.Exit(1)


def logits_cmd(
    source: Annotated[str, typer.Argument(help="The reference checkpoint folder.")],
    save: Annotated[Path, typer.Option("--save", help="Where to write the reference (.safetensors).")],
    text: TextOpt = None,
    corpus: CorpusOpt = "mr-niah",
    token_ids: IdsOpt = None,
    ctx: CtxOpt = 256,
    tokens: TokensOpt = 8192,
    second_half: HalfOpt = False,
    top_k: Annotated[int, typer.Option("--top-k", help="Log-probs kept per position.")] = 256,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    batch_size: BatchOpt = 4,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Run the reference once and store what compare needs (token ids, top-k log-probs, log-sum-exp).

    Example: m1 verify logits m1-40k/ --save ref-logits.safetensors ; m1 verify compare --ref-logits ... m1-nf4/
    """
    from m1.verify.jobs import logits

    result = logits(source, save, text=text, corpus=corpus, token_ids=token_ids, ctx=ctx, tokens=tokens,
                    second_half=second_half, top_k=top_k, device=device, dtype=dtype, batch_size=batch_size,
                    progress=not quiet and not json_out)
    if json_out:
        print_json(result)
    else:
        typer.echo(f"saved {result['positions']} positions (top-{result['top_k']}) of {source} to {save}")


def register(verify_app: typer.Typer) -> None:
    verify_app.command("perplexity")(perplexity_cmd)
    verify_app.command("compare")(compare_cmd)
    verify_app.command("logits")(logits_cmd)
