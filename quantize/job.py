"""`m1 quantize`: `m1 convert` with a scheme. The pipeline's planner decides which weights the policy
quantizes (by default exactly the experts) and sizes every file; its executor streams one tensor at a
time through the scheme's library (bitsandbytes) into new shards, in this process or `--workers`.

Memory: a worker holds the source tensor being quantized (on a GPU also the next one, read ahead) and
one weight's quantized pieces; on CPU bitsandbytes works on a few million values at a time; kept tensors
are copied as byte ranges. Peak RSS is bounded by the largest tensor (per worker), not by the model.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

from m1.checkpoint import Checkpoint
from m1.config import M1Config
from m1.plan import Plan
from m1.planner import JobResult, by_layer, plan_job
from m1.policy import Policy
from m1.quantize.options import QuantizeOptions, plan_from_checkpoint
from m1.run import RunOptions, execute
from m1.safetensors_io import TensorInfo

ROUNDING_FILE = "m1-rounding.json"  # a --rounding gptq job's record: options, calibration, routed tokens, fallbacks


def quantize(source: str | Path, dest: str | Path, *, scheme: str = "nf4", blocksize: int | None = None,
             double_quant: bool | None = None, keep: Sequence[str] = (), only: Sequence[str] = (),
             to: str | None = None, layout: str | None = None, shard_size: int | str = "5GB",
             revision: str | None = None, imatrix: str | Path | None = None,
             format_options: Mapping[str, Any] | None = None, budget: str | None = None,
             candidates: str | None = None, head_candidates: str | None = None,
             calibration: str | None = None, calibration_tokens: int = 4096,
             calibration_ctx: int = 256, metric: str = "kl", sensitivity: str | Path | None = None,
             recipe: str | Path | None = None, device: str = "auto", workers: int = 1, threads: int | None = None,
             scratch: int | str | None = None, resume: bool = False, overwrite: bool = False, progress: bool = True,
             dry_run: bool = False, rounding: str = "nearest", damp: float | None = None,
             gptq_block: int | None = None, act_order: bool | None = None,
             min_tokens: int | None = None) -> JobResult:
    """Quantize the experts of checkpoint `source` into `dest` (everything else kept), or a measured mix.

    scheme: a registered scheme (`m1.schemes.scheme_names()`: bitsandbytes nf4/fp4/int8, ggml types, each with
    `to` one of the formats that store it, `make_scheme(name).formats`), with its options (blocksize,
    double_quant for bitsandbytes; imatrix, a format's importance-matrix file, for the ggml K-quants).
    keep / only: names or `re:REGEX` left unquantized / the only ones quantized. budget: a size (240GB) or bits
    per weight (4.6bpw) that a mix of `candidates` (comma-separated; `head_candidates` the head's, in a format
    whose mix plans it) must fit, measured on `calibration` (a
    bundled corpus, a text file or token ids) or sized by a stated prior; sensitivity: reuse a recipe's
    measurements; recipe: replay an m1-recipe.json. rounding: "nearest" (the scheme's own) or "gptq" (the schemes
    of `m1.schemes.gptq_scheme_names()`: codes chosen by GPTQ within the library's own scales, from Hessians of
    `calibration` measured in the layer-streamed engine; damp, gptq_block, act_order, min_tokens: its options,
    m1.schemes.gptq). A quantized source (fp8, bitsandbytes) is dequantized as it is read (m1.dequantized).
    The other arguments are `m1.convert`'s.

    Example: `m1.quantize("tiny-m1", "tiny-nf4", scheme="nf4")`; the result's `stats` says what was written.
    """
    from m1.dequantized import dense_view, needs_dense_view
    from m1.devices import resolve_device
    from m1.errors import UsageError
    from m1.formats import format_options as make_format_options
    from m1.schemes import gptq_scheme_names, make_scheme
    from m1.schemes.gptq import Rounding
    from m1.scratch import arrange
    from m1.units import parse_size

    dest = Path(dest)
    imatrix_path = str(imatrix) if imatrix is not None else None
    if rounding not in ("nearest", "gptq"):
        raise UsageError(f"--rounding must be nearest or gptq, got {rounding!r}")
    gptq = rounding == "gptq"
    if not gptq and any(v is not None for v in (damp, gptq_block, act_order, min_tokens)):
        raise UsageError("--damp, --gptq-block, --act-order and --min-tokens apply with --rounding gptq only")
    mixing = budget is not None or recipe is not None
    if gptq and not mixing and scheme not in gptq_scheme_names():
        raise UsageError(f"--rounding gptq does not apply to {scheme}: it takes the scheme's own rounding only",
                         hint=f"GPTQ chooses the codes of {', '.join(gptq_scheme_names())}")
    # Under --budget with --candidates the imatrix serves the candidates: the --scheme (nf4 by default) takes it
    # only when it is one of them. (A --recipe replay keeps it on the --scheme, which may be the recipe's own.)
    named = {c.strip() for c in f"{candidates or ''},{head_candidates or ''}".split(",")}
    main_imatrix = None if budget is not None and candidates is not None and scheme not in named else imatrix_path
    options = dict(blocksize=blocksize, double_quant=double_quant, imatrix=main_imatrix)
    chosen = make_scheme(scheme, **options, **({"rounding": Rounding("gptq")} if gptq and not mixing else {}))
    chosen.check_supported(resolve_device(device))
    ckpt = Checkpoint.open(str(source), revision=revision)
    if needs_dense_view(ckpt, to or ckpt.config.flavour, quantizing=True):  # an fp8 or bnb source: decoded in passing
        ckpt = dense_view(ckpt)
    windows = None
    how = None
    if gptq:
        from m1.quantize.hessian import gptq_rounding

        how, windows = gptq_rounding(ckpt, str(source), dest, calibration=calibration, tokens=calibration_tokens,
                                     ctx=calibration_ctx, damp=damp, block=gptq_block, act_order=act_order,
                                     min_tokens=min_tokens)
        if not mixing:
            chosen = make_scheme(scheme, **options, rounding=how)
    fmt = to or ckpt.config.flavour
    opts = QuantizeOptions(scheme=chosen, policy=Policy.from_options(list(keep), list(only)),
                           by_layer=by_layer(layout), shard_size=parse_size(shard_size), to=to,
                           format_options=make_format_options(fmt, dest, format_options or {}))
    mix = None
    if budget is not None or recipe is not None:
        from m1.quantize.budget import mix_plan

        mix = mix_plan(ckpt, opts, fmt, source=str(source), budget=budget, candidates=candidates,
                       head_candidates=head_candidates, calibration=calibration,
                       calibration_tokens=calibration_tokens,
                       calibration_ctx=calibration_ctx, metric=metric,
                       sensitivity=Path(sensitivity) if sensitivity is not None else None,
                       recipe=Path(recipe) if recipe is not None else None, device=device, imatrix=imatrix_path)
        plan = mix.plan
        if how is not None:  # measured with the schemes' own rounding; written with GPTQ's where a scheme takes it
            from m1.quantize.budget import round_mix_with

            round_mix_with(plan, how)
            mix.recipe["rounding"] = plan.job["rounding"]  # the recipe says how its weights were rounded
    elif (candidates is not None or head_candidates is not None or (calibration is not None and not gptq)
          or sensitivity is not None):
        raise UsageError("--candidates, --head-candidates, a calibration text (--corpus, --text, --token-ids) and "
                         "--sensitivity apply with --budget only (a text also with --rounding gptq)",
                         hint="add --budget 240GB (or 4.6bpw)")
    else:
        plan = plan_from_checkpoint(ckpt, opts)
    bound = parse_size(scratch) if scratch is not None else None
    plan = arrange(plan, ckpt, layout, opts.shard_size, bound)
    if dry_run:
        from m1.scratch import dry_run as scratch_dry_run

        return JobResult(dest, plan, scratch=scratch_dry_run(plan, ckpt.storage, bound) if bound is not None else None,
                         mix=mix)
    recipe_file = None
    if mix is not None:
        from m1.quantize.budget import attach_recipe

        recipe_file = attach_recipe(dest, plan, mix.recipe)
    record = None
    ranks = None
    if gptq:
        from m1.atomic_io import json_text
        from m1.distributed import current
        from m1.quantize.hessian import hessians_for, rounding_record
        from m1.quantize.recipe import own_file

        ranks = current()  # under torchrun one Hessian pass serves every rank: rank 0's, the others wait for it
        done = None
        if ranks is None or ranks.main:
            done = hessians_for(ckpt, plan, how, windows, device=device, resume=resume, progress=progress)
        if ranks is not None:
            done = ranks.broadcast(done)
        record = rounding_record(done, how, ckpt.config)
        plan.written[own_file(dest, plan, ROUNDING_FILE).name] = json_text(record)
    stats = run_quantize(ckpt, dest, opts, device=device, workers=workers, threads=threads, resume=resume,
                         overwrite=overwrite, show_progress=progress, plan=plan, scratch=bound,
                         inputs=tuple(Path(p) for p in (imatrix, recipe) if p is not None))
    if recipe_file is not None:
        stats["recipe"] = str(recipe_file)
    if record is not None:
        import shutil

        if ranks is not None:
            ranks.gather(None)  # every rank has read the Hessians it needed
        if ranks is None or ranks.main:
            shutil.rmtree(how.hessians, ignore_errors=True)  # the job is done: its Hessians are not kept
        stats["rounding"] = record
    return JobResult(dest, plan, stats.pop("manifest"), stats=stats, mix=mix, recipe=recipe_file)


def plan_quantize(cfg: M1Config, tensors: list[TensorInfo], opts: QuantizeOptions, *, source: str,
                  extra_files: list[str] | tuple[str, ...] = (), base_model: str | None = None,
                  revision: str | None = None) -> Plan:
    """The plan from a config and tensor list alone (see m1.planner.index_tensors): no data read."""
    return plan_job(cfg, tensors, opts.request(), source=source, extra_files=extra_files, base_model=base_model,
                    revision=revision)


def run_quantize(ckpt: Checkpoint, dest: Path, opts: QuantizeOptions, *, device: str = "auto", workers: int = 1,
                 threads: int | None = None, resume: bool = False, overwrite: bool = False,
                 show_progress: bool = True, plan: Plan | None = None, scratch: int | None = None,
                 inputs: tuple[Path, ...] = ()) -> dict[str, Any]:
    """Quantize `ckpt` into `dest`; returns what was written and how fast (per device too).

    `device` is a --device value (m1.devices: a set or `cuda` gives each worker its own GPU); `scratch`
    streams a Hub source through at most that many bytes of disk (m1.scratch); `inputs`: the other files
    the job reads (an imatrix, a recipe), which it must not write over."""
    from m1.devices import resolve_device

    dev = resolve_device(device)
    opts.scheme.check_supported(dev)
    plan = plan or plan_from_checkpoint(ckpt, opts)
    spec = device if "," in device else str(dev)  # a set of devices goes to the executor as it is
    run = execute(plan, dest, ckpt, RunOptions(resume=resume, overwrite=overwrite, workers=workers, threads=threads,
                                               device=spec, show_progress=show_progress, label="quantize",
                                               scratch=scratch, inputs=inputs))
    params_done = sum(f.params for f in plan.files if f.name in run.written)
    shards = run.manifest["shards"]
    return {
        "manifest": run.manifest,
        "dest": str(dest),
        "scheme": plan.scheme.name,
        "device": spec,
        "workers": run.workers,
        "threads": run.threads,
        "shards": shards,
        "bytes": sum(s["size"] for s in shards.values()),
        "params": params_done,
        "seconds": round(run.seconds, 3),
        "params_per_s": round(params_done / run.seconds) if run.seconds > 0 else None,
        "timing": {k: round(v, 3) for k, v in asdict(run.timing).items()},
        "devices": run.devices,
        "writer_devices": run.writer_devices,
        "rank": run.rank,
        "world": run.world,
        **({"scratch": run.scratch} if run.scratch is not None else {}),
        **plan.totals(),
    }
