"""The compare report: report.json (for CI), report.md (for people and model cards), layers.png, and with
--by-position positions.png (agreement by position bucket)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from m1.atomic_io import write_bytes_atomic
from m1.verify.compare import CandidateResult

COLUMNS = ("candidate", "tokens", "PPL ref", "PPL cand", "PPL ratio", "KL mean", "KL median", "KL p99", "KL max",
           "top-1", "RMS Δp", "pass")


def table_rows(results: list[CandidateResult]) -> list[list[str]]:
    rows = []
    for r in results:
        m = r.metrics
        rows.append([r.name, str(m.tokens), f"{m.ppl_ref:.4f}", f"{m.ppl_cand:.4f}", f"{m.ppl_ratio:.4f}",
                     f"{m.kl_mean:.6f}", f"{m.kl_median:.6f}", f"{m.kl_p99:.6f}", f"{m.kl_max:.6f}",
                     f"{100 * m.top1:.2f}%", f"{100 * m.rms_dp:.3f}%", "yes" if r.passed else "NO"])
    return rows


def markdown_table(results: list[CandidateResult]) -> str:
    lines = ["| " + " | ".join(COLUMNS) + " |", "|" + "|".join("---" if i == 0 else "---:" for i in range(len(COLUMNS)))
             + "|"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    return "\n".join(lines)


def layer_table(result: CandidateResult) -> str:
    lines = [f"#### {result.name}", "", "| layer | kind | drift cos | drift rel-L2 | isolated cos | isolated rel-L2 |",
             "|---:|---|---:|---:|---:|---:|"]
    for row in result.layers:
        lines.append(f"| {row.layer} | {row.kind} | {row.drift_cos:.6f} | {row.drift_rel_l2:.3e} | "
                     f"{row.isolated_cos:.6f} | {row.isolated_rel_l2:.3e} |")
    return "\n".join(lines)


def plot_layers(results: list[CandidateResult], path: Path) -> bool:
    if not any(r.layers for r in results):
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(9, 4.5))
    for r in results:
        if not r.layers:
            continue
        xs = [row.layer for row in r.layers]
        ax.plot(xs, [row.isolated_rel_l2 for row in r.layers], marker="o", label=f"{r.name}: isolated rel-L2")
        ax.plot(xs, [row.drift_rel_l2 for row in r.layers], marker=".", linestyle="--", label=f"{r.name}: drift rel-L2")
        ax.plot(xs, [max(1 - row.isolated_cos, 1e-12) for row in r.layers], linestyle=":",
                label=f"{r.name}: isolated 1-cos")
    from matplotlib.ticker import MaxNLocator

    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_yscale("log")
    ax.set_xlabel("layer")
    ax.set_ylabel("error of the layer's output vs the reference")
    ax.set_title("Per-layer error")
    ax.legend(fontsize=7)
    _save(fig, path)
    return True


def position_table(result: CandidateResult) -> str:
    lines = [f"#### {result.name}: by position", "",
             "| positions | tokens | KL mean | KL p99 | top-1 | NLL ref | NLL cand | NLL diff |",
             "|---|---:|---:|---:|---:|---:|---:|---:|"]
    for b in result.positions or []:
        lines.append(f"| {b['start']}-{b['end'] - 1} | {b['tokens']} | {b['kl_mean']:.6f} | {b['kl_p99']:.6f} | "
                     f"{100 * b['top1']:.2f}% | {b['nll_ref']:.4f} | {b['nll_cand']:.4f} | {b['nll_diff']:+.4f} |")
    return "\n".join(lines)


def plot_positions(results: list[CandidateResult], path: Path) -> bool:
    """KL mean and p99, top-1 disagreement and NLL difference against the position bucket (log scale)."""
    shown = [r for r in results if r.positions]
    if not shown:
        return False
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 3, figsize=(13, 4))
    for r in shown:
        xs = [max(b["start"], 0.5) for b in r.positions or []]  # bucket [start, end): plotted at its start
        bs = r.positions or []
        axes[0].plot(xs, [max(b["kl_mean"], 1e-12) for b in bs], marker="o", label=f"{r.name}: mean")
        axes[0].plot(xs, [max(b["kl_p99"], 1e-12) for b in bs], marker=".", linestyle="--", label=f"{r.name}: p99")
        axes[1].plot(xs, [max(1 - b["top1"], 1e-6) for b in bs], marker="o", label=r.name)
        axes[2].plot(xs, [b["nll_diff"] for b in bs], marker="o", label=r.name)
    for ax, title in zip(axes, ("KL(ref || cand)", "top-1 disagreement", "NLL cand - ref"), strict=True):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("position in the window (bucket start)")
        ax.set_title(title)
    axes[0].set_yscale("log")
    axes[1].set_yscale("log")
    axes[2].axhline(0.0, color="grey", linewidth=0.5)
    axes[0].legend(fontsize=7)
    _save(fig, path)
    return True


def write_report(dest: Path, info: dict[str, Any], results: list[CandidateResult]) -> dict[str, Any]:
    dest.mkdir(parents=True, exist_ok=True)
    obj = {**info, "passed": all(r.passed for r in results), "candidates": [r.to_json() for r in results]}
    has_plot = plot_layers(results, dest / "layers.png")
    has_positions = plot_positions(results, dest / "positions.png")
    md = [f"# m1 verify compare: {info.get('reference', '')}", "",
          f"{info.get('tokens_scored', '')} scored tokens from {info.get('text', '')}, ctx {info.get('ctx', '')}.", "",
          markdown_table(results), ""]
    if has_plot:
        md += ["![per-layer error](layers.png)", ""]
    if has_positions:
        md += ["![agreement by position](positions.png)", ""]
    for r in results:
        if r.positions:
            md += [position_table(r), ""]
        if r.layers:
            md += [layer_table(r), ""]
        if r.failures:
            md += [f"**{r.name} failed:** " + "; ".join(r.failures), ""]
    write_bytes_atomic(dest / "report.md", "\n".join(md).encode())
    write_bytes_atomic(dest / "report.json", (json.dumps(obj, indent=2) + "\n").encode())
    return obj


def _save(fig: Any, path: Path) -> None:
    """The plot as PNG bytes in memory, then one atomic write (no temporary PNG to read back)."""
    import io

    import matplotlib.pyplot as plt

    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=110)
    plt.close(fig)
    write_bytes_atomic(path, buf.getvalue())
