"""The `m1 verify` checks that run the engine, as Python functions (what the CLI commands call).

`m1.verify.compare(reference, candidate, ...)`, `m1.verify.perplexity(source, ...)`, and here `logits`, `imatrix`
and `runtime_check` read the text the way every command does (`m1.verify.text.read_windows`: a bundled corpus's
held-out part, a text file or token ids), run the layer-streamed engine and return what the CLI prints or writes
as JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from m1.verify.compare import CandidateResult, Model
from m1.verify.text import Windows

if TYPE_CHECKING:
    from m1.verify.imatrix import ImportanceStats
    from m1.verify.imatrix import Plan as ImatrixPlan


@dataclass(frozen=True)
class CompareResult:
    """The candidates' agreement with the reference, and the report (report.json's content)."""

    results: list[CandidateResult]
    report: dict[str, Any]
    windows: Windows

    @property
    def passed(self) -> bool:
        return all(r.passed for r in self.results)


def load_model(source: str) -> Model:
    """A checkpoint as the engine runs it, refused before any text is read if the engine cannot compute it."""
    from m1.verify.engine import check_runnable
    from m1.verify.sources import CheckpointWeights

    model = Model(source, CheckpointWeights.open(source))
    check_runnable(model.config, str(Path(source) / "config.json"))
    return model


def guard_outputs(dest: Path, models: Sequence[Model], *files: Path) -> None:
    """Nothing verify writes (a report folder, a saved reference) may be or hold what it reads."""
    from m1.manifest import guard_source

    guard_source([dest], [*(p for m in models for p in m.source.ckpt.storage.sources()), *files])


def compare(*models: str, ref_logits: str | Path | None = None, text: str | Path | None = None,
            corpus: str = "mr-niah", token_ids: str | Path | None = None, ctx: int = 256, tokens: int = 8192,
            second_half: bool = False, top_k: int = 256, max_kl: float | None = None,
            min_top1: float | None = None, max_ppl_ratio: float | None = None, layers: bool = True,
            by_position: bool = False, report: str | Path | None = None, device: str = "auto",
            dtype: str = "fp32", batch_size: int = 4, progress: bool = True,
            on_reference: Callable[[Any, Windows, dict[str, str]], None] | None = None) -> CompareResult:
    """Agreement of candidates with a reference on the same tokens: PPL ratio, KL, top-1, per-layer error.

    models: REF, CAND [, CAND ...] (folders, or files a format reads itself), or only candidates with
    `ref_logits` (a file from `m1 verify logits --save`; the text then comes from it, and
    `on_reference(ref, windows, meta)` may refuse options that would not apply). The thresholds set `passed`.
    report: a folder for report.json, report.md and the plots.

    Example: `m1.verify.compare("tiny-m1", "tiny-nf4", tokens=4096).report["candidates"][0]["metrics"]["kl_mean"]`.
    """
    from m1.devices import resolve_device
    from m1.errors import UsageError
    from m1.progress import count_progress
    from m1.verify.compare import Thresholds, compare_to_saved, load_reference
    from m1.verify.compare import compare as run_compare
    from m1.verify.report import write_report
    from m1.verify.text import at_least_one, compute_dtype, read_windows

    thresholds = Thresholds(max_kl, min_top1, max_ppl_ratio)
    dev, cdtype = resolve_device(device), compute_dtype(dtype)
    at_least_one("--batch-size", batch_size)
    at_least_one("--top-k", top_k)
    dest = Path(report) if report is not None else None
    if dest is not None and dest.exists() and not dest.is_dir():
        raise UsageError("--report names a file; it must be a folder (report.json, report.md, layers.png go there)",
                         file=str(dest))
    if ref_logits is not None:
        if not models:
            raise UsageError("give at least one candidate to compare with --ref-logits")
        ref_path = Path(ref_logits)
        ref, windows, meta = load_reference(ref_path)
        if on_reference is not None:
            on_reference(ref, windows, meta)
        candidates = [load_model(m) for m in models]
        if dest is not None:
            guard_outputs(dest, candidates, ref_path)
        reference, what = meta.get("source", str(ref_path)), meta.get("text", "")
        n = candidates[0].config.num_hidden_layers * len(candidates)
        with count_progress(n, "layers", "layers", progress) as advance:
            results = compare_to_saved(ref, candidates, windows, dev, thresholds, cdtype, batch_size, advance,
                                       meta=meta, path=ref_path, by_position=by_position)
    else:
        if len(models) < 2:
            raise UsageError("compare needs REF and at least one CAND (or --ref-logits FILE and candidates)")
        loaded = [load_model(m) for m in models]
        if dest is not None:
            guard_outputs(dest, loaded)
        windows, what = read_windows(models[0], _path(text), corpus, _path(token_ids), ctx, tokens, second_half,
                                     loaded[0].config.vocab_size)
        reference = models[0]
        with count_progress(loaded[0].config.num_hidden_layers, "layers", "layers", progress) as advance:
            _, results = run_compare(loaded, windows, dev, thresholds, cdtype, batch_size, top_k, layers, advance,
                                     by_position=by_position)
    info = {"reference": reference, "text": what, "ctx": int(windows.tokens.shape[1]),
            "tokens_scored": results[0].metrics.tokens if results else 0,
            "thresholds": {"max_kl": max_kl, "min_top1": min_top1, "max_ppl_ratio": max_ppl_ratio}}
    obj = write_report(dest, info, results) if dest is not None else {
        **info, "passed": all(r.passed for r in results), "candidates": [r.to_json() for r in results]}
    return CompareResult(results, obj, windows)


def perplexity(source: str, *, text: str | Path | None = None, corpus: str = "mr-niah",
               token_ids: str | Path | None = None, ctx: int = 256, tokens: int = 8192, second_half: bool = False,
               device: str = "auto", dtype: str = "fp32", batch_size: int = 4, progress: bool = True) -> dict[str, Any]:
    """Perplexity of a checkpoint over a text with the layer-streamed engine: {"ppl", "ppl_err", "tokens_scored",
    "windows", "ctx", "nonfinite_positions", "text", ...}.

    Example: `m1.verify.perplexity("tiny-m1", corpus="mr-niah", tokens=4096)["ppl"]`.
    """
    from m1.devices import resolve_device
    from m1.progress import count_progress
    from m1.verify.compare import model_perplexity
    from m1.verify.text import at_least_one, compute_dtype, read_windows

    at_least_one("--batch-size", batch_size)
    model = load_model(source)
    windows, what = read_windows(source, _path(text), corpus, _path(token_ids), ctx, tokens, second_half,
                                 model.config.vocab_size)
    with count_progress(model.config.num_hidden_layers, "layers", "layers", progress) as advance:
        result = model_perplexity(model, windows, resolve_device(device), compute_dtype(dtype), batch_size, advance)
    result["text"] = what
    return result


def _path(value: str | Path | None) -> Path | None:
    return Path(value) if value is not None else None


def logits(source: str, save: str | Path, *, text: str | Path | None = None, corpus: str = "mr-niah",
           token_ids: str | Path | None = None, ctx: int = 256, tokens: int = 8192, second_half: bool = False,
           top_k: int = 256, device: str = "auto", dtype: str = "fp32", batch_size: int = 4,
           progress: bool = True) -> dict[str, Any]:
    """Run the reference once and store what compare needs (token ids, top-k log-probs, log-sum-exp) in `save`
    (.safetensors): {"saved", "positions", "top_k"}.

    Example: `m1.verify.jobs.logits("tiny-m1", "ref.safetensors", tokens=4096)`; then
    `m1.verify.compare("tiny-nf4", ref_logits="ref.safetensors")`.
    """
    from m1.devices import resolve_device
    from m1.errors import UsageError
    from m1.progress import count_progress
    from m1.verify.compare import model_signature, reference_run, save_reference
    from m1.verify.text import at_least_one, compute_dtype, read_windows

    save = Path(save)
    at_least_one("--batch-size", batch_size)
    at_least_one("--top-k", top_k)
    if save.is_dir():
        raise UsageError("--save names a folder; it must be a file", file=str(save),
                         hint=f"e.g. --save {save / 'ref-logits.safetensors'}")
    if not save.parent.is_dir():
        raise UsageError("the folder for --save does not exist", file=str(save), hint="create it first")
    model = load_model(source)
    guard_outputs(save, [model])
    windows, what = read_windows(source, _path(text), corpus, _path(token_ids), ctx, tokens, second_half,
                                 model.config.vocab_size)
    with count_progress(model.config.num_hidden_layers, "layers", "layers", progress) as advance:
        ref = reference_run(model, windows, resolve_device(device), compute_dtype(dtype), batch_size, top_k, advance)
    save_reference(save, ref, windows, {"source": source, "text": what, "top_k": str(ref.top_ids.shape[1]),
                                        **model_signature(model.config)})
    return {"saved": str(save), "positions": int(ref.target_logprob.numel()), "top_k": int(ref.top_ids.shape[1])}


@dataclass(frozen=True)
class ImatrixResult:
    """What `imatrix` wrote (`summary`, what --json prints; `stats`), or with dry_run only its `plan`."""

    summary: dict[str, Any]
    stats: ImportanceStats | None = None
    plan: ImatrixPlan | None = None

    @property
    def unseen_experts(self) -> dict[int, list[int]]:
        return self.stats.unseen_experts() if self.stats is not None else {}


def imatrix(source: str, out: str | Path, *, text: str | Path | None = None, corpus: str = "mr-niah",
            corpus_part: str = "calibration", token_ids: str | Path | None = None, ctx: int = 512,
            tokens: int = 65536, process_output: bool = False, device: str = "auto", dtype: str = "fp32",
            batch_size: int = 4, overwrite: bool = False, dry_run: bool = False,
            progress: bool = True) -> ImatrixResult:
    """An importance matrix of checkpoint `source` in file `out` (the format's whose importance-matrix file has
    OUT's suffix, m1.verify.imatrix.imatrix_file), one layer at a time with the reference engine, from `tokens`
    calibration tokens in chunks of `ctx` (corpus_part: 'calibration', the corpus's first 90%, or 'held-out').
    process_output: also the head's input. dry_run: the layer order and peak memory only, no tensor data read.

    Example: `m1.verify.jobs.imatrix("tiny-m1", "imatrix." + suffix, tokens=4096).summary["entries"]`.
    """
    from m1.checkpoint import Checkpoint
    from m1.errors import UsageError
    from m1.verify.imatrix import imatrix_file, plan_imatrix
    from m1.verify.text import at_least_one, compute_dtype

    out = Path(out)
    at_least_one("--batch-size", batch_size)
    at_least_one("--tokens", tokens)
    if ctx < 2:
        raise UsageError(f"--ctx must be at least 2, got {ctx}")
    cdtype = compute_dtype(dtype)
    file = imatrix_file(out)
    if out.is_dir():
        raise UsageError("OUT names a folder; it must be a file", file=str(out), hint=f"e.g. {out / file.example}")
    if dry_run:
        plan = plan_imatrix(Checkpoint.open(source), tokens, ctx, batch_size, cdtype, process_output, file.entry)
        return ImatrixResult({"source": source, "dry_run": True, **plan.as_dict()}, plan=plan)
    from m1.devices import resolve_device
    from m1.manifest import guard_source
    from m1.progress import count_progress
    from m1.verify.imatrix import compute_imatrix
    from m1.verify.sources import CheckpointWeights
    from m1.verify.text import read_windows

    weights = CheckpointWeights.open(source)
    guard_source([out], weights.ckpt.storage.sources())
    if out.exists() and not overwrite:
        raise UsageError("OUT exists", file=str(out), hint="pass --overwrite to replace it")
    if not out.parent.is_dir():
        raise UsageError("the folder for OUT does not exist", file=str(out), hint="create it first")
    cfg = weights.config
    if corpus_part not in ("calibration", "held-out"):
        raise UsageError(f"--corpus-part must be calibration or held-out, got {corpus_part!r}")
    windows, what = read_windows(source, _path(text), corpus, _path(token_ids), ctx, tokens, False, cfg.vocab_size,
                                 holdout=corpus_part == "held-out")
    with count_progress(cfg.num_hidden_layers, "layers", "layers", progress) as advance:
        stats = compute_imatrix(cfg, weights, windows, device=resolve_device(device), dtype=cdtype,
                                batch_size=batch_size, datasets=[what], process_output=process_output,
                                progress=advance)
    size = file.write(out, stats)
    n_tokens = int(windows.tokens.numel())
    summary = {"source": source, "out": str(out), "bytes": size, "entries": len({file.entry(n) for n in stats.weights}),
               "tokens": n_tokens, "chunks": stats.chunk_count, "chunk_size": stats.chunk_size, "text": what,
               "seconds": round(stats.seconds, 3),
               "seconds_per_million_tokens_per_layer": round(
                   stats.seconds / cfg.num_hidden_layers / (n_tokens / 1e6), 3),
               "unseen_experts": {str(k): v for k, v in stats.unseen_experts().items()},
               "routed_tokens": {str(i): stats.routed_tokens(i).tolist() for i in range(cfg.num_hidden_layers)}}
    return ImatrixResult(summary, stats)


def runtime_check(source: str, path: str | Path, *, text: str | Path | None = None, corpus: str = "mr-niah",
                  token_ids: str | Path | None = None, ctx: int = 256, tokens: int = 2048, threads: int = 2,
                  max_kl: float | None = None, min_top1: float | None = None) -> dict[str, Any]:
    """File `path` in the runtime its format declares (m1.verify.runtime), against the engine on `source`: KL
    mean and p99, top-1, both perplexities, and "pass" (under max_kl, at least min_top1).

    Example: `m1.verify.jobs.runtime_check("tiny-m1", path, tokens=2048, max_kl=1e-3)["pass"]`.
    """
    from m1.checkpoint import Checkpoint
    from m1.errors import UsageError
    from m1.verify.runtime import compare_in_runtime, runtime_format
    from m1.verify.text import read_windows

    fmt = runtime_format()
    if fmt is None:
        raise UsageError("no registered format declares a runtime to run its files in")
    fmt.runtime.require()  # one line saying what to install, before any work
    cfg = Checkpoint.open(source).config
    windows, what = read_windows(source, _path(text), corpus, _path(token_ids), ctx, tokens, False, cfg.vocab_size)
    result = {"source": source, fmt.name: str(path), "text": what,
              **compare_in_runtime(source, Path(path), windows.tokens, threads, fmt.runtime)}
    result["pass"] = ((max_kl is None or result["kl_mean"] <= max_kl)
                      and (min_top1 is None or result["top1"] >= min_top1))
    return result
