"""GPTQ nf4 vs round-to-nearest nf4 at the same bytes, on the trained tiny M1 (tests/data/tiny-trained).

Both are `m1 quantize --scheme nf4` (blocksize 64, double quant), the same files and bytes; GPTQ chooses the codes
within bitsandbytes' scales from Hessians of the calibration part of mr-niah (its first 90%). The KL is measured
by `m1 verify compare` (m1's engine, bitsandbytes' own dequantizer) on the held-out 10%, which calibration never
sees. Each job runs in its own process so its peak RSS is its own. Time and memory of the Hessian pass and of
the rounding come from the job's record; the full-M1 estimate scales them (see the printout).

  .venv/bin/python bench/bench_gptq.py [--tokens 4096] [--ctx 256] [--eval-tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "tests" / "data" / "tiny-trained"
M1 = [sys.executable, "-m", "m1"]


def job(args: list[str]) -> tuple[dict, float, int]:
    """(its --json, seconds, peak RSS of the process in bytes)."""
    before = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    start = time.monotonic()
    out = subprocess.run([*M1, *args, "--json"], capture_output=True, text=True, check=True).stdout
    seconds = time.monotonic() - start
    peak = resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss
    return json.loads(out[out.index("{"):]), seconds, max(peak, before) * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    a = ap.parse_args()
    load = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        rtn, rtn_s, _ = job(["quantize", str(TRAINED), f"{tmp}/rtn", "--scheme", "nf4", "--quiet"])
        gptq, gptq_s, gptq_rss = job(["quantize", str(TRAINED), f"{tmp}/gptq", "--scheme", "nf4", "--rounding", "gptq",
                                      "--corpus", "mr-niah", "--tokens", str(a.tokens), "--ctx", str(a.ctx), "--quiet"])
        cmp, _, _ = job(["verify", "compare", str(TRAINED), f"{tmp}/rtn", f"{tmp}/gptq", "--corpus", "mr-niah",
                         "--tokens", str(a.eval_tokens), "--no-layers"])
    kl = {Path(c["name"]).name: c["metrics"] for c in cmp["candidates"]}
    r = gptq["rounding"]
    print(f"box load {load:.2f} (1-min avg), {os.cpu_count()} CPUs; calibration {r['rounding']['calibration']}")
    print(f"eval: {cmp['text']}, {cmp['tokens_scored']} tokens scored")
    print("| rounding | bytes | KL mean | KL p99 | top-1 | PPL ratio | job seconds |")
    print("|---|---|---|---|---|---|---|")
    for name, stats, s in (("nearest (bitsandbytes)", rtn, rtn_s), ("GPTQ", gptq, gptq_s)):
        m = kl["rtn" if stats is rtn else "gptq"]
        print(f"| {name} | {stats['bytes']} | {m['kl_mean']:.5f} | {m['kl_p99']:.4f} | {m['top1']:.4f} | "
              f"{m['ppl_ratio']:.4f} | {s:.1f} |")
    ratio = kl["gptq"]["kl_mean"] / kl["rtn"]["kl_mean"]
    print(f"GPTQ / nearest KL: {ratio:.3f} (floor 0.8: {'met' if ratio <= 0.8 else 'NOT met'})")
    q = gptq["timing"]["quantize_s"]
    print(f"Hessian pass {r['hessian_seconds']:.2f} s over {r['rounding']['calibration_tokens']} tokens, Hessians at "
          f"most {r['hessian_peak_bytes']} B a layer; rounding (bitsandbytes + GPTQ, 48 weights) {q:.2f} s vs "
          f"{rtn['timing']['quantize_s']:.2f} s round-to-nearest; peak RSS of the largest job "
          f"{gptq_rss / 2**20:.0f} MiB")


if __name__ == "__main__":
    main()
