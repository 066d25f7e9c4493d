"""`m1 quantize`."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from m1.cli_options import (
    AttnTypeOpt,
    ChatTemplateOpt,
    DryRunOpt,
    EmbedTypeOpt,
    HeadTypeOpt,
    JsonOpt,
    OverwriteOpt,
    QuietOpt,
    ResumeOpt,
    RevisionOpt,
    ScratchOpt,
    ShardSizeOpt,
    SplitOpt,
    StreamLayoutOpt,
    TokenizerPreOpt,
    VerboseOpt,
    WorkersOpt,
    check_layout,
    format_options,
    print_json,
    print_plan,
)
from m1.errors import UsageError


def quantize_cmd(
    source: Annotated[str, typer.Argument(help="Checkpoint folder or Hub repo id (bf16/fp16/fp32 experts).")],
    dest: Annotated[Path, typer.Argument(help="Output folder (must be empty unless --resume/--overwrite).")],
    scheme: Annotated[str, typer.Option("--scheme", help="bitsandbytes nf4, fp4 (4-bit, blockwise) or int8 (LLM.int8); "
                                        "with --format gguf a ggml type: q8_0, q4_0, q4_1, q5_0, q5_1, mxfp4.")
                      ] = "nf4",
    blocksize: Annotated[int | None, typer.Option("--blocksize", help="4-bit block size (default 64).")] = None,
    double_quant: Annotated[
        bool | None, typer.Option("--double-quant/--no-double-quant", help="4-bit: quantize the absmax too "
                                  "(default on).")
    ] = None,
    keep: Annotated[list[str] | None, typer.Option("--keep", help="Leave matching tensors unquantized: a name or "
                                                   "re:REGEX (repeatable).")] = None,
    only: Annotated[list[str] | None, typer.Option("--only", help="Quantize only matching expert weights: a name "
                                                   "or re:REGEX (repeatable).")] = None,
    device: Annotated[str, typer.Option("--device", help="auto, cpu, cuda (each worker its own GPU, round robin), "
                                        "cuda:N, or a set such as cuda:0,cuda:3: where bitsandbytes runs.")
                      ] = "auto",
    workers: WorkersOpt = 1,
    threads: Annotated[int | None, typer.Option("--threads", help="Torch threads per worker (default: CPUs / "
                                                "workers).")] = None,
    layout: StreamLayoutOpt = None,
    shard_size: ShardSizeOpt = "5GB",
    revision: RevisionOpt = None,
    imatrix: Annotated[Path | None, typer.Option("--imatrix", help="GGUF K-quants: an importance matrix from m1 "
                                                 "verify imatrix (or llama.cpp's llama-imatrix).")] = None,
    out_format: Annotated[str | None, typer.Option("--format", help="Output format: the source's (default), "
                                                   "'release', 'hf' or 'gguf'.")] = None,
    attn_type: AttnTypeOpt = None,
    head_type: HeadTypeOpt = None,
    embed_type: EmbedTypeOpt = None,
    split_max_size: SplitOpt = None,
    tokenizer_pre: TokenizerPreOpt = None,
    chat_template: ChatTemplateOpt = None,
    scratch: ScratchOpt = None,
    budget: Annotated[str | None, typer.Option("--budget", help="A measured mix under a size: 240GB, or 4.6bpw "
                                               "(bits per weight over all parameters).")] = None,
    candidates: Annotated[str | None, typer.Option("--candidates", help="--budget: the schemes a group may get, "
                                                   "e.g. nf4,int8 or q4_k,q5_k,q6_k,q8_0 (keep: unquantized).")
                          ] = None,
    calibration: Annotated[str | None, typer.Option("--calibration", help="--budget: measure on a bundled corpus "
                                                    "(mr-niah: its first 90%), a text file or token ids (.json/.npy), "
                                                    "in windows spread over it; without it a stated prior sizes "
                                                    "the mix.")] = None,
    calibration_tokens: Annotated[int, typer.Option("--calibration-tokens", help="Calibration tokens.")] = 4096,
    calibration_ctx: Annotated[int, typer.Option("--calibration-ctx", help="Calibration window.")] = 256,
    metric: Annotated[str, typer.Option("--metric", help="--budget: kl (at the head) or rel_l2 (layer output).")
                      ] = "kl",
    sensitivity: Annotated[Path | None, typer.Option("--sensitivity", help="--budget: reuse the sensitivities of "
                                                     "an m1-recipe.json instead of measuring.")] = None,
    recipe: Annotated[Path | None, typer.Option("--recipe", help="Replay a mix (an m1-recipe.json), measuring "
                                                "nothing.")] = None,
    dry_run: DryRunOpt = False,
    verbose: VerboseOpt = False,
    resume: ResumeOpt = False,
    overwrite: OverwriteOpt = False,
    quiet: QuietOpt = False,
    json_out: JsonOpt = False,
) -> None:
    """Quantize the experts with bitsandbytes (nf4/fp4 + double quant, or int8); everything else is kept as is.

    Example: m1 quantize tiny-m1/ tiny-nf4/ --scheme nf4 --workers 2 ;
    m1 quantize SRC DST --scheme fp4 --keep 're:layers\\.(0|79)\\.' --dry-run ;
    m1 quantize m1-40k/ m1-q4.gguf --format gguf --scheme q4_0 ;
    m1 quantize m1-40k/ m1-q4k.gguf --format gguf --scheme q4_k --imatrix imatrix.gguf ;
    m1 quantize m1-40k/ m1-mix/ --budget 240GB --candidates nf4,int8 --calibration mr-niah --dry-run ;
    m1 quantize m1-40k/ again/ --recipe m1-mix/m1-recipe.json
    """
    from m1.checkpoint import Checkpoint
    from m1.devices import resolve_device
    from m1.distributed import is_main_process
    from m1.formats import format_names
    from m1.policy import Policy
    from m1.quantize.job import QuantizeOptions, plan_from_checkpoint, run_quantize
    from m1.schemes import make_scheme
    from m1.units import parse_size

    if out_format is not None and out_format not in format_names():
        raise UsageError(f"--format must be one of {', '.join(format_names())}, got {out_format!r}")
    chosen_scheme = make_scheme(scheme, blocksize=blocksize, double_quant=double_quant,
                                imatrix=str(imatrix) if imatrix is not None else None)
    chosen_scheme.check_supported(resolve_device(device))
    ckpt = Checkpoint.open(source, revision=revision)
    fmt = out_format or ckpt.config.flavour
    opts = QuantizeOptions(
        scheme=chosen_scheme,
        policy=Policy.from_options(keep or [], only or []),
        by_layer=check_layout("size" if layout in (None, "source") else layout),
        shard_size=parse_size(shard_size),
        to=out_format,
        format_options=format_options(fmt, dest, attn_type, head_type, embed_type, split_max_size, tokenizer_pre,
                                      chat_template),
    )
    mix = None
    if budget is not None or recipe is not None:
        from m1.quantize.budget import mix_plan

        mix = mix_plan(ckpt, opts, fmt, source=source, budget=budget, candidates=candidates,
                       calibration=calibration, calibration_tokens=calibration_tokens,
                       calibration_ctx=calibration_ctx, metric=metric, sensitivity=sensitivity, recipe=recipe,
                       device=device, imatrix=str(imatrix) if imatrix is not None else None)
        plan = mix.plan
    elif candidates is not None or calibration is not None or sensitivity is not None:
        raise UsageError("--candidates, --calibration and --sensitivity apply with --budget only",
                         hint="add --budget 240GB (or 4.6bpw)")
    else:
        plan = plan_from_checkpoint(ckpt, opts)
    bound = parse_size(scratch) if scratch is not None else None
    if layout == "source" or bound is not None:
        from m1.scratch import choose_layout, in_source_order

        plan = (in_source_order(plan, ckpt, parse_size(shard_size)) if layout == "source"
                else choose_layout(plan, ckpt, bound, layout, parse_size(shard_size)))
    if dry_run:
        from m1.scratch import dry_run as scratch_dry_run

        if mix is not None and not json_out:
            for line in mix.lines:
                typer.echo(line)
        if mix is not None and json_out:
            from m1.quantize.budget import recipe_summary

            print_json({"dry_run": True, "dest": str(dest), **plan.summary(verbose), "job": plan.job,
                        "mix": recipe_summary(mix.recipe)})
            return
        print_plan(plan, dest, json_out, verbose,
                   scratch_dry_run(plan, ckpt.storage, bound) if bound is not None else None)
        return
    recipe_file = None
    if mix is not None:
        from m1.quantize.budget import attach_recipe

        recipe_file = attach_recipe(dest, plan, mix.recipe)
    result = run_quantize(ckpt, dest, opts, device=device, workers=workers, threads=threads, resume=resume,
                          overwrite=overwrite, show_progress=not quiet, plan=plan, scratch=bound,
                          inputs=tuple(p for p in (imatrix, recipe) if p is not None))
    if not is_main_process():  # under torchrun, rank 0 says what the job wrote
        return
    if recipe_file is not None:
        result["recipe"] = str(recipe_file)
    if json_out:
        print_json(result)
    else:
        from m1.units import human_bytes, human_count

        q = result["quantized"]
        rate = f", {human_count(result['params_per_s'])} params/s" if result["params_per_s"] else ""
        typer.echo(f"wrote {len(result['shards'])} shards ({human_bytes(result['bytes'])}) to {dest}: "
                   f"{q['tensors']} expert weights {human_bytes(q['bytes_before'])} -> "
                   f"{human_bytes(q['bytes_after'])} ({'a mix of ' + '/'.join(plan.schemes) if mix else scheme}) "
                   f"in {result['seconds']:.1f} s{rate}")
        if mix is not None:
            for line in mix.recipe.get("layer_map", []):
                typer.echo("  " + line)
            typer.echo(f"recipe: {result['recipe']}")
