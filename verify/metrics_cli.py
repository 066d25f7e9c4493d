"""`m1 verify perplexity`, `m1 verify compare`, `m1 verify logits` (registered on the verify group)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from m1.cli_options import JsonOpt, QuietOpt, print_json

TextOpt = Annotated[Path | None, typer.Option("--text", help="A UTF-8 text file to evaluate on.")]
CorpusOpt = Annotated[str, typer.Option("--corpus", help="Bundled text: mr-niah (held-out part) or mr-niah-10240.")]
IdsOpt = Annotated[Path | None, typer.Option("--token-ids", help="Pre-tokenized ids: JSON list or .npy.")]
CtxOpt = Annotated[int, typer.Option("--ctx", help="Tokens per window (non-overlapping).")]
TokensOpt = Annotated[int, typer.Option("--tokens", help="Evaluate at most this many tokens.")]
HalfOpt = Annotated[bool, typer.Option("--second-half", help="Score only the second half of each window "
                                                             "(llama.cpp's perplexity convention).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Compute dtype: fp32 (default) or bf16.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward batch.")]


def _compute_dtype(name: str):  # noqa: ANN202
    import torch

    from m1.errors import UsageError

    options = {"fp32": torch.float32, "bf16": torch.bfloat16}
    if name not in options:
        raise UsageError(f"--dtype must be fp32 or bf16, got {name!r}")
    return options[name]


def _windows(tokenizer_source: str, text: Path | None, corpus: str, token_ids: Path | None, ctx: int, tokens: int,
             second_half: bool):  # noqa: ANN202
    from m1.errors import UsageError
    from m1.verify.text import corpus_text, load_token_ids, load_tokenizer, make_windows

    if token_ids is not None:
        ids, what = load_token_ids(token_ids), str(token_ids)
    else:
        if not Path(tokenizer_source).is_dir():
            raise UsageError("tokenizing needs a local checkpoint folder", file=tokenizer_source,
                             hint="pull the tokenizer files, or pass --token-ids FILE")
        tok = load_tokenizer(tokenizer_source)
        if text is not None:
            try:
                body, what = text.read_text(encoding="utf-8"), str(text)
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"cannot read the text ({type(exc).__name__})", file=str(text)) from None
        else:
            body, what = corpus_text(corpus), f"corpus {corpus} (held-out 10%)"
        ids = tok.encode(body)
    return make_windows(ids, ctx, tokens, second_half), what


def _model(source: str):  # noqa: ANN202
    from m1.verify.compare import Model
    from m1.verify.sources import CheckpointWeights

    return Model(source, CheckpointWeights.open(source))


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
    from m1.devices import resolve_device
    from m1.progress import count_progress
    from m1.verify.compare import model_perplexity

    model = _model(source)
    windows, what = _windows(source, text, corpus, token_ids, ctx, tokens, second_half)
    with count_progress(model.config.num_hidden_layers, "layers", "layers", not quiet and not json_out) as advance:
        result = model_perplexity(model, windows, resolve_device(device), _compute_dtype(dtype), batch_size, advance)
    result["text"] = what
    if json_out:
        print_json(result)
    else:
        typer.echo(f"{source}: perplexity {result['ppl']:.4f} ± {result['ppl_err']:.4f} over "
                   f"{result['tokens_scored']} tokens ({result['windows']} windows of {result['ctx']}, {what})")


def compare_cmd(
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
    report: Annotated[Path | None, typer.Option("--report", help="Write report.json, report.md, layers.png here.")]
    = None,
    device: DeviceOpt = "auto",
    dtype: DtypeOpt = "fp32",
    batch_size: BatchOpt = 4,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Agreement of candidates with a reference on the same tokens: PPL ratio, KL, top-1, per-layer error.

    Exit 1 when a threshold fails (for CI).
    Example: m1 verify compare m1-40k/ m1-nf4/ --corpus mr-niah --tokens 32768 --report report/ --max-kl 0.05
    """
    from m1.devices import resolve_device
    from m1.errors import UsageError
    from m1.progress import count_progress
    from m1.verify.compare import Thresholds, compare, compare_to_saved, load_reference
    from m1.verify.report import markdown_table, write_report

    thresholds = Thresholds(max_kl, min_top1, max_ppl_ratio)
    dev, cdtype = resolve_device(device), _compute_dtype(dtype)
    show = not quiet and not json_out
    if ref_logits is not None:
        if not models:
            raise UsageError("give at least one candidate to compare with --ref-logits")
        ref, windows, meta = load_reference(ref_logits)
        candidates = [_model(m) for m in models]
        reference, what = meta.get("source", str(ref_logits)), meta.get("text", "")
        with count_progress(candidates[0].config.num_hidden_layers * len(candidates), "layers", "layers", show) as adv:
            results = compare_to_saved(ref, candidates, windows, dev, thresholds, cdtype, batch_size, adv)
    else:
        if len(models) < 2:
            raise UsageError("compare needs REF and at least one CAND (or --ref-logits FILE and candidates)")
        loaded = [_model(m) for m in models]
        windows, what = _windows(models[0], text, corpus, token_ids, ctx, tokens, second_half)
        reference = models[0]
        with count_progress(loaded[0].config.num_hidden_layers, "layers", "layers", show) as advance:
            _, results = compare(loaded, windows, dev, thresholds, cdtype, batch_size, top_k, not no_layers, advance)
    info = {"reference": reference, "text": what, "ctx": int(windows.tokens.shape[1]),
            "tokens_scored": results[0].metrics.tokens if results else 0,
            "thresholds": {"max_kl": max_kl, "min_top1": min_top1, "max_ppl_ratio": max_ppl_ratio}}
    obj = write_report(report, info, results) if report is not None else {
        **info, "passed": all(r.passed for r in results), "candidates": [r.to_json() for r in results]}
    if json_out:
        print_json(obj)
    else:
        typer.echo(markdown_table(results))
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
    from m1.devices import resolve_device
    from m1.progress import count_progress
    from m1.verify.compare import reference_run, save_reference

    model = _model(source)
    windows, what = _windows(source, text, corpus, token_ids, ctx, tokens, second_half)
    with count_progress(model.config.num_hidden_layers, "layers", "layers", not quiet and not json_out) as advance:
        ref = reference_run(model, windows, resolve_device(device), _compute_dtype(dtype), batch_size, top_k, advance)
    save_reference(save, ref, windows, {"source": source, "text": what, "top_k": str(ref.top_ids.shape[1])})
    result = {"saved": str(save), "positions": int(ref.target_logprob.numel()), "top_k": int(ref.top_ids.shape[1])}
    if json_out:
        print_json(result)
    else:
        typer.echo(f"saved {result['positions']} positions (top-{result['top_k']}) of {source} to {save}")


def register(verify_app: typer.Typer) -> None:
    verify_app.command("perplexity")(perplexity_cmd)
    verify_app.command("compare")(compare_cmd)
    verify_app.command("logits")(logits_cmd)
