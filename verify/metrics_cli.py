"""`m1 verify perplexity`, `m1 verify compare`, `m1 verify logits` (registered on the verify group)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Annotated

import typer

from m1.cli_options import JsonOpt, QuietOpt, print_json

if TYPE_CHECKING:
    from m1.verify.compare import Model

TextOpt = Annotated[Path | None, typer.Option("--text", help="A UTF-8 text file to evaluate on.")]
CorpusOpt = Annotated[str, typer.Option("--corpus", help="Bundled text: mr-niah or mr-niah-10240 (held-out 10%), "
                                                        "or mr-niah-10k (all 30 10k-token haystacks, long context).")]
IdsOpt = Annotated[Path | None, typer.Option("--token-ids", help="Pre-tokenized ids: JSON list or .npy.")]
CtxOpt = Annotated[int, typer.Option("--ctx", help="Tokens per window (non-overlapping).")]
TokensOpt = Annotated[int, typer.Option("--tokens", help="Evaluate at most this many tokens.")]
HalfOpt = Annotated[bool, typer.Option("--second-half", help="Score only the second half of each window "
                                                             "(llama.cpp's perplexity convention).")]
DeviceOpt = Annotated[str, typer.Option("--device", help="auto, cpu or cuda.")]
DtypeOpt = Annotated[str, typer.Option("--dtype", help="Compute dtype: fp32 (default) or bf16.")]
BatchOpt = Annotated[int, typer.Option("--batch-size", help="Windows per forward batch.")]


def _compute_dtype(name: str):  # noqa: ANN202
    from m1.dtypes import DTYPE_OPTIONS, torch_dtype
    from m1.errors import UsageError

    if name not in ("fp32", "bf16"):  # the engine's compute dtypes
        raise UsageError(f"--dtype must be fp32 or bf16, got {name!r}")
    return torch_dtype(DTYPE_OPTIONS[name])


def _at_least_one(option: str, value: int) -> int:
    from m1.errors import UsageError

    if value < 1:
        raise UsageError(f"{option} must be at least 1, got {value}")
    return value


def _windows(tokenizer_source: str, text: Path | None, corpus: str, token_ids: Path | None, ctx: int, tokens: int,
             second_half: bool, vocab_size: int | None = None, holdout: bool = True,
             spread: bool = False):  # noqa: ANN202
    """The windows every command reads text as: token ids, a text file, or a bundled corpus (its held-out part,
    or with holdout=False the calibration part the scoring commands never see). `spread`: see make_windows."""
    from m1.errors import UsageError
    from m1.verify.text import check_token_ids, corpus_text, load_token_ids, load_tokenizer, make_windows

    _at_least_one("--tokens", tokens)
    if token_ids is not None:
        ids, what = load_token_ids(token_ids), str(token_ids)
        if vocab_size is not None:
            check_token_ids(ids, vocab_size, str(token_ids), tokenizer_source)
    else:
        if tokenizer_source.endswith(".gguf"):  # a GGUF carries its tokenizer: rebuilt as tokenizer.json
            from m1.gguf.reader import GGUFStorage

            tokenizer_source = str(GGUFStorage(tokenizer_source).tokenizer_folder())
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
            body = corpus_text(corpus, holdout=holdout)
            what = _corpus_description(corpus) if holdout else f"corpus {corpus} (first 90%, calibration)"
        ids = tok.encode(body)
        if vocab_size is not None:
            check_token_ids(ids, vocab_size, str(text) if text is not None else tokenizer_source, tokenizer_source)
    return make_windows(ids, ctx, tokens, second_half, spread=spread), what


def _corpus_description(corpus: str) -> str:
    from m1.verify.text import WHOLE_TEXT

    return f"corpus {corpus} ({'whole text' if corpus in WHOLE_TEXT else 'held-out 10%'})"


def _refuse_ignored_options(context: typer.Context, path: Path, windows, ref, meta: dict[str, str],  # noqa: ANN001
                            values: dict[str, object]) -> None:
    """With --ref-logits the tokens, windows and top-k come from the file: an option given on the command line
    that would change them cannot apply, so it is a usage error instead of being silently ignored. An option
    that agrees with the file (the same --ctx, say) is accepted."""
    from m1.errors import UsageError
    from m1.verify.text import CORPORA

    n, ctx = (int(d) for d in windows.tokens.shape)
    stored = {
        "ctx": ctx,
        "tokens": n * ctx,
        "second_half": windows.first_scored == ctx // 2 and windows.first_scored > 0,
        "top_k": int(ref.top_ids.shape[1]),
        "corpus": next((c for c in CORPORA if _corpus_description(c) == meta.get("text")), None),
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


def _model(source: str):  # noqa: ANN202
    from m1.verify.compare import Model
    from m1.verify.engine import check_runnable
    from m1.verify.sources import CheckpointWeights

    model = Model(source, CheckpointWeights.open(source))
    check_runnable(model.config, str(Path(source) / "config.json"))  # before any text is read or layer run
    return model


def _guard(dest: Path, models: list[Model], *files: Path) -> None:
    """Nothing verify writes (a report folder, a saved reference) may be or hold what it reads."""
    from m1.manifest import guard_source

    guard_source([dest], [*(p for m in models for p in m.source.ckpt.storage.sources()), *files])


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

    from m1.devices import resolve_device
    from m1.errors import M1Error
    from m1.progress import count_progress
    from m1.verify.compare import model_perplexity

    _at_least_one("--batch-size", batch_size)
    model = _model(source)
    windows, what = _windows(source, text, corpus, token_ids, ctx, tokens, second_half, model.config.vocab_size)
    with count_progress(model.config.num_hidden_layers, "layers", "layers", not quiet and not json_out) as advance:
        result = model_perplexity(model, windows, resolve_device(device), _compute_dtype(dtype), batch_size, advance)
    result["text"] = what
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
    from m1.devices import resolve_device
    from m1.errors import UsageError
    from m1.progress import count_progress
    from m1.verify.compare import Thresholds, compare, compare_to_saved, load_reference
    from m1.verify.report import markdown_table, position_table, write_report

    thresholds = Thresholds(max_kl, min_top1, max_ppl_ratio)
    dev, cdtype = resolve_device(device), _compute_dtype(dtype)
    _at_least_one("--batch-size", batch_size)
    _at_least_one("--top-k", top_k)
    if report is not None and report.exists() and not report.is_dir():
        raise UsageError("--report names a file; it must be a folder (report.json, report.md, layers.png go there)",
                         file=str(report))
    show = not quiet and not json_out
    if ref_logits is not None:
        if not models:
            raise UsageError("give at least one candidate to compare with --ref-logits")
        ref, windows, meta = load_reference(ref_logits)
        _refuse_ignored_options(context, ref_logits, windows, ref, meta, {
            "text": text, "corpus": corpus, "token_ids": token_ids, "ctx": ctx, "tokens": tokens,
            "second_half": second_half, "top_k": top_k})
        candidates = [_model(m) for m in models]
        if report is not None:
            _guard(report, candidates, ref_logits)
        reference, what = meta.get("source", str(ref_logits)), meta.get("text", "")
        with count_progress(candidates[0].config.num_hidden_layers * len(candidates), "layers", "layers", show) as adv:
            results = compare_to_saved(ref, candidates, windows, dev, thresholds, cdtype, batch_size, adv,
                                       meta=meta, path=ref_logits, by_position=by_position)
    else:
        if len(models) < 2:
            raise UsageError("compare needs REF and at least one CAND (or --ref-logits FILE and candidates)")
        loaded = [_model(m) for m in models]
        if report is not None:
            _guard(report, loaded)
        windows, what = _windows(models[0], text, corpus, token_ids, ctx, tokens, second_half,
                                 loaded[0].config.vocab_size)
        reference = models[0]
        with count_progress(loaded[0].config.num_hidden_layers, "layers", "layers", show) as advance:
            _, results = compare(loaded, windows, dev, thresholds, cdtype, batch_size, top_k, not no_layers, advance,
                                 by_position=by_position)
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
    from m1.devices import resolve_device
    from m1.errors import UsageError
    from m1.progress import count_progress
    from m1.verify.compare import model_signature, reference_run, save_reference

    _at_least_one("--batch-size", batch_size)
    _at_least_one("--top-k", top_k)
    if save.is_dir():
        raise UsageError("--save names a folder; it must be a file", file=str(save),
                         hint=f"e.g. --save {save / 'ref-logits.safetensors'}")
    if not save.parent.is_dir():
        raise UsageError("the folder for --save does not exist", file=str(save), hint="create it first")
    model = _model(source)
    _guard(save, [model])
    windows, what = _windows(source, text, corpus, token_ids, ctx, tokens, second_half, model.config.vocab_size)
    with count_progress(model.config.num_hidden_layers, "layers", "layers", not quiet and not json_out) as advance:
        ref = reference_run(model, windows, resolve_device(device), _compute_dtype(dtype), batch_size, top_k, advance)
    save_reference(save, ref, windows, {"source": source, "text": what, "top_k": str(ref.top_ids.shape[1]),
                                        **model_signature(model.config)})
    result = {"saved": str(save), "positions": int(ref.target_logprob.numel()), "top_k": int(ref.top_ids.shape[1])}
    if json_out:
        print_json(result)
    else:
        typer.echo(f"saved {result['positions']} positions (top-{result['top_k']}) of {source} to {save}")


def register(verify_app: typer.Typer) -> None:
    verify_app.command("perplexity")(perplexity_cmd)
    verify_app.command("compare")(compare_cmd)
    verify_app.command("logits")(logits_cmd)
