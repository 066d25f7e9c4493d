"""`m1 verify compare` and `m1 verify perplexity` as Python functions (what the CLI commands call).

`m1.verify.compare(reference, candidate, ...)` and `m1.verify.perplexity(source, ...)` read the text the way every
command does (`m1.verify.text.read_windows`: a bundled corpus's held-out part, a text file or token ids), run
the layer-streamed engine and return what the CLI prints or writes as JSON.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from m1.verify.compare import CandidateResult, Model
from m1.verify.text import Windows


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

    models: REF, CAND [, CAND ...] (folders, .gguf files), or only candidates with `ref_logits` (a file from
    `m1 verify logits --save`; the text then comes from it, and `on_reference(ref, windows, meta)` may refuse
    options that would not apply). The thresholds set `passed`. report: a folder for report.json, report.md
    and the plots.

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
