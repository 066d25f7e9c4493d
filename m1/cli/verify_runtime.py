"""`m1 verify <runtime> SRC FILE` (`m1 verify llama` for llama.cpp): a file in the program that runs its format
(m1.formats.base.Runtime), against the engine on SRC. Parses, calls m1.verify.jobs.runtime_check, prints; the
command's name and words come from the format that declares the runtime."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer

from m1.cli.options import CorpusOpt, CtxOpt, IdsOpt, JsonOpt, TextOpt, TokensOpt, print_json
from m1.cli.registries import label


def _format() -> Any:
    from m1.verify.runtime import runtime_format

    return runtime_format()


def _words() -> dict[str, str]:
    fmt = _format()
    return {"file": label(fmt), "runtime": fmt.runtime.name, "package": fmt.runtime.package,
            "command": fmt.runtime.command, "example": fmt.runtime.example}


def _help(text: str) -> str:
    return text.format(**_words())


def runtime_cmd(
    source: Annotated[str, typer.Argument(help=_help("The checkpoint the {file} was made from (the reference)."))],
    file: Annotated[Path, typer.Argument(help=_help("The {file} file to run in {runtime}."), metavar=_format().name)],
    text: TextOpt = None,
    corpus: CorpusOpt = "mr-niah",
    token_ids: IdsOpt = None,
    ctx: CtxOpt = 256,
    tokens: TokensOpt = 2048,
    threads: Annotated[int, typer.Option("--threads", help=_help("{runtime} threads."))] = 2,
    max_kl: Annotated[float | None, typer.Option("--max-kl", help="Fail (exit 1) above this mean KL.")] = None,
    min_top1: Annotated[float | None, typer.Option("--min-top1", help="Fail below this top-1 agreement.")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Run a {file} in {runtime} ({package}) and compare its logits with m1's engine on the source.

    Example: m1 verify {command} tiny-m1/ {example} --tokens 2048 --ctx 256 --max-kl 1e-3
    """
    from m1.verify.jobs import runtime_check

    result = runtime_check(source, file, text=text, corpus=corpus, token_ids=token_ids, ctx=ctx, tokens=tokens,
                           threads=threads, max_kl=max_kl, min_top1=min_top1)
    if json_out:
        print_json(result)
    else:
        typer.echo(f"{_format().runtime.name} {file} vs m1 engine {source}: {result['positions']} positions "
                   f"({result['text']}): KL mean {result['kl_mean']:.3g}, p99 {result['kl_p99']:.3g}, top-1 "
                   f"{result['top1']:.2%}, PPL {result['ppl_ref']:.4f} -> {result['ppl_cand']:.4f} (ratio "
                   f"{result['ppl_ratio']:.4f}){'' if result['pass'] else ' FAIL'}")
    if not result["pass"]:
        raise typer.Exit(1)


def register(verify_app: typer.Typer) -> None:
    fmt = _format()
    if fmt is None:  # no format declares a runtime: no command
        return
    runtime_cmd.__doc__ = _help(runtime_cmd.__doc__)
    verify_app.command(fmt.runtime.command)(runtime_cmd)
