"""`m1 verify llama SRC X.gguf`: the GGUF in a real llama.cpp, against the engine on SRC."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from m1.cli_options import JsonOpt, print_json
from m1.verify.metrics_cli import CorpusOpt, CtxOpt, IdsOpt, TextOpt, TokensOpt


def llama_cmd(
    source: Annotated[str, typer.Argument(help="The checkpoint the GGUF was made from (the reference).")],
    gguf: Annotated[Path, typer.Argument(help="The GGUF file to run in llama.cpp.")],
    text: TextOpt = None,
    corpus: CorpusOpt = "mr-niah",
    token_ids: IdsOpt = None,
    ctx: CtxOpt = 256,
    tokens: TokensOpt = 2048,
    threads: Annotated[int, typer.Option("--threads", help="llama.cpp threads.")] = 2,
    max_kl: Annotated[float | None, typer.Option("--max-kl", help="Fail (exit 1) above this mean KL.")] = None,
    min_top1: Annotated[float | None, typer.Option("--min-top1", help="Fail below this top-1 agreement.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run a GGUF in llama.cpp (llama-cpp-python) and compare its logits with m1's engine on the source.

    Example: m1 verify llama tiny-m1/ tiny-q8.gguf --tokens 2048 --ctx 256 --max-kl 1e-3
    """
    from m1.checkpoint import Checkpoint
    from m1.verify.llama_run import compare_in_llama, llama_cpp

    llama_cpp()  # one line saying what to install, before any work
    cfg = Checkpoint.open(source).config
    from m1.verify.text import read_windows

    windows, what = read_windows(source, text, corpus, token_ids, ctx, tokens, False, cfg.vocab_size)
    result = {"source": source, "gguf": str(gguf), "text": what, **compare_in_llama(source, gguf, windows.tokens)}
    passed = (max_kl is None or result["kl_mean"] <= max_kl) and (min_top1 is None or result["top1"] >= min_top1)
    result["pass"] = passed
    if json_out:
        print_json(result)
    else:
        typer.echo(f"llama.cpp {gguf} vs m1 engine {source}: {result['positions']} positions ({what}): "
                   f"KL mean {result['kl_mean']:.3g}, p99 {result['kl_p99']:.3g}, top-1 {result['top1']:.2%}, "
                   f"PPL {result['ppl_ref']:.4f} -> {result['ppl_cand']:.4f} (ratio {result['ppl_ratio']:.4f})"
                   f"{'' if passed else ' FAIL'}")
    if not passed:
        raise typer.Exit(1)


def register(verify_app: typer.Typer) -> None:
    verify_app.command("llama")(llama_cmd)
