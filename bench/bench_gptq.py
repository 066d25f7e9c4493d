"""GPTQ vs round-to-nearest at the same bytes, per scheme, on the trained tiny M1 (tests/data/tiny-trained).

For each scheme (default nf4, blocksize 64, double quant; int8; compressed-tensors' w4a16, group 128) both are
`m1 quantize --scheme S`, the same files and bytes; GPTQ chooses the codes within the library's scales
(bitsandbytes', compressed-tensors') from Hessians of the calibration part of mr-niah (its first 90%). The KL is
measured by `m1 verify compare` (m1's engine, the library's own dequantizer) on the held-out 10%, which
calibration never sees. Each job runs in its own process so its peak RSS is its own. Time and memory of the
Hessian pass and of the rounding come from the job's record.

The ggml K-quants (default q4_k, q3_k, q2_k) run on the trained tiny8 (rows of whole 256-value super-blocks),
both roundings with the same imatrix (`m1 verify imatrix` on the same calibration tokens), judged in llama.cpp
(`m1 verify llama`: llama-cpp-python's logits of the GGUF against m1's engine on the source, held-out text).

  .venv/bin/python bench/bench_gptq.py [--schemes nf4,int8,w4a16] [--ggml q4_k,q3_k,q2_k] [--tokens 4096] [--ctx 256]
                                       [--eval-tokens 16384]
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TRAINED = ROOT / "tests" / "data" / "tiny-trained"
TRAINED8 = ROOT / "tests" / "data" / "tiny8-trained"
M1 = [sys.executable, "-m", "m1"]
FORMAT = {"w4a16": "compressed-tensors", "w8a16": "compressed-tensors"}  # the others: the source's (release)


# Runs one job as its own child and prints that child's peak RSS (KiB) last on stderr: RUSAGE_CHILDREN of this
# process would be the largest of every job run so far.
PEAK = ("import resource, subprocess, sys; r = subprocess.run(sys.argv[1:]); "
        "print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, file=sys.stderr); sys.exit(r.returncode)")


def job(args: list[str]) -> tuple[dict, float, int]:
    """(its --json, seconds, peak RSS of the job's process in bytes)."""
    start = time.monotonic()
    proc = subprocess.run([sys.executable, "-c", PEAK, *M1, *args, "--json"], capture_output=True, text=True,
                          check=True)
    seconds = time.monotonic() - start
    peak_kib = int(proc.stderr.strip().splitlines()[-1])
    return json.loads(proc.stdout[proc.stdout.index("{"):]), seconds, peak_kib * 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--schemes", default="nf4,int8,w4a16")
    ap.add_argument("--ggml", default="q4_k,q3_k,q2_k")
    ap.add_argument("--tokens", type=int, default=4096)
    ap.add_argument("--ctx", type=int, default=256)
    ap.add_argument("--eval-tokens", type=int, default=16384)
    a = ap.parse_args()
    load = os.getloadavg()[0]
    print(f"box load {load:.2f} (1-min avg), {os.cpu_count()} CPUs")
    print("| scheme | rounding | bytes | KL mean | KL p99 | top-1 | PPL ratio | job seconds |")
    print("|---|---|---|---|---|---|---|---|")
    notes = []
    for scheme in [s for s in a.schemes.split(",") if s]:
        fmt = ["--format", FORMAT[scheme]] if scheme in FORMAT else []
        with tempfile.TemporaryDirectory() as tmp:
            rtn, rtn_s, rtn_rss = job(["quantize", str(TRAINED), f"{tmp}/rtn", "--scheme", scheme, *fmt, "--quiet"])
            gptq, gptq_s, gptq_rss = job(["quantize", str(TRAINED), f"{tmp}/gptq", "--scheme", scheme, *fmt,
                                          "--rounding", "gptq", "--corpus", "mr-niah", "--tokens", str(a.tokens),
                                          "--ctx", str(a.ctx), "--quiet"])
            cmp, _, _ = job(["verify", "compare", str(TRAINED), f"{tmp}/rtn", f"{tmp}/gptq", "--corpus", "mr-niah",
                             "--tokens", str(a.eval_tokens), "--no-layers"])
        kl = {Path(c["name"]).name: c["metrics"] for c in cmp["candidates"]}
        r = gptq["rounding"]
        for name, stats, s in (("nearest", rtn, rtn_s), ("GPTQ", gptq, gptq_s)):
            m = kl["rtn" if stats is rtn else "gptq"]
            print(f"| {scheme} | {name} | {stats['bytes']} | {m['kl_mean']:.5f} | {m['kl_p99']:.4f} | "
                  f"{m['top1']:.4f} | {m['ppl_ratio']:.4f} | {s:.1f} |", flush=True)
        ratio = kl["gptq"]["kl_mean"] / kl["rtn"]["kl_mean"]
        q = gptq["timing"]["quantize_s"]
        notes += [f"{scheme}: GPTQ / nearest KL {ratio:.3f} (floor 0.8: {'met' if ratio <= 0.8 else 'NOT met'}); "
                  f"Hessian pass {r['hessian_seconds']:.2f} s over {r['rounding']['calibration_tokens']} tokens, "
                  f"Hessians at most {r['hessian_peak_bytes']} B a layer; rounding (48 weights) {q:.2f} s vs "
                  f"{rtn['timing']['quantize_s']:.2f} s round-to-nearest; peak RSS of the GPTQ job "
                  f"{gptq_rss / 2**20:.0f} MiB, of the nearest one {rtn_rss / 2**20:.0f} MiB",
                  f"  eval: {cmp['text']}, {cmp['tokens_scored']} tokens scored; calibration "
                  f"{r['rounding']['calibration']}"]
    ggml = [t for t in a.ggml.split(",") if t]
    if ggml:
        print(f"\nggml types on {TRAINED8.name}, the same imatrix for both, judged in llama.cpp")
        print("| type | rounding | bytes | KL mean | KL p99 | top-1 | PPL ratio | job seconds |")
        print("|---|---|---|---|---|---|---|---|")
    with tempfile.TemporaryDirectory() as tmp:
        imatrix = f"{tmp}/imatrix.gguf"
        if ggml:
            job(["verify", "imatrix", str(TRAINED8), imatrix, "--corpus", "mr-niah", "--tokens", str(a.tokens),
                 "--ctx", str(a.ctx), "--quiet"])
        for qtype in ggml:
            base = ["quantize", str(TRAINED8), "--format", "gguf", "--scheme", qtype, "--imatrix", imatrix, "--quiet"]
            rtn, rtn_s, rtn_rss = job([base[0], base[1], f"{tmp}/rtn-{qtype}.gguf", *base[2:]])
            gptq, gptq_s, gptq_rss = job([base[0], base[1], f"{tmp}/gptq-{qtype}.gguf", *base[2:], "--rounding",
                                          "gptq", "--corpus", "mr-niah", "--tokens", str(a.tokens), "--ctx",
                                          str(a.ctx)])
            kl = {}
            for name in ("rtn", "gptq"):
                out, _, _ = job(["verify", "llama", str(TRAINED8), f"{tmp}/{name}-{qtype}.gguf", "--corpus",
                                 "mr-niah", "--tokens", str(a.eval_tokens)])
                kl[name] = out
            for name, stats, sec in (("nearest (ggml, imatrix)", rtn, rtn_s), ("GPTQ", gptq, gptq_s)):
                m = kl["rtn" if stats is rtn else "gptq"]
                print(f"| {qtype} | {name} | {stats['bytes']} | {m['kl_mean']:.6f} | {m['kl_p99']:.4f} | "
                      f"{m['top1']:.4f} | {m['ppl_ratio']:.4f} | {sec:.1f} |", flush=True)
            ratio = kl["gptq"]["kl_mean"] / kl["rtn"]["kl_mean"]
            notes.append(f"{qtype}: GPTQ / ggml KL {ratio:.3f} in llama.cpp (floor 0.85: "
                         f"{'met' if ratio <= 0.85 else 'NOT met'}); rounding {gptq['timing']['quantize_s']:.2f} s vs "
                         f"{rtn['timing']['quantize_s']:.2f} s; peak RSS of the GPTQ job {gptq_rss / 2**20:.0f} MiB, "
                         f"of the nearest one {rtn_rss / 2**20:.0f} MiB; Hessians at most "
                         f"{gptq['rounding']['hessian_peak_bytes'] / 2**20:.1f} MiB a layer")
    print("\n".join(notes))


if __name__ == "__main__":
    main()
