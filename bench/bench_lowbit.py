"""m1's measured mix against llama.cpp's own presets, at each preset's file size, judged in llama.cpp.

On a trained tiny M1 (default tests/data/tiny8-trained) with its held-out text:
1. `m1 verify imatrix` on the calibration part (the corpus's first 90%);
2. `m1 convert --to gguf`: the bf16 GGUF llama-quantize starts from;
3. for each preset, `llama-quantize --imatrix IMATRIX BF16 OUT PRESET` (llama.cpp's own per-tensor rules: its
   mixes quantize attention, embedding and head too);
4. `m1 quantize --format gguf --budget <that file's bytes>B --imatrix IMATRIX --candidates ...`: the
   sensitivities are measured once (the first preset), the other budgets reuse them (`--sensitivity`);
5. every file in llama.cpp (llama-cpp-python) on the held-out windows against m1's engine on the bf16 source,
   computed once: size, bits per weight, KL mean and p99, top-1, PPL ratio. The KL ratio m1/preset is also
   given on each half of the held-out windows: the spread of the ranking over the text it is judged on.

llama-quantize comes from `bench/build_llama_imatrix.sh` (built here when missing: about 745 CPU-seconds).

  .venv/bin/python bench/bench_lowbit.py [--presets IQ1_S,Q4_K_M] [--calib-tokens 2048] [--readme]

--readme writes the table between the README's `bench_lowbit` markers.
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
sys.path.insert(0, str(ROOT))
M1 = [sys.executable, "-m", "m1"]
PRESETS = ("IQ1_S", "IQ1_M", "IQ2_XXS", "IQ2_XS", "IQ2_M", "Q2_K_S", "Q2_K", "Q3_K_S", "Q3_K_M", "Q4_K_M")
CANDIDATES = "iq1_s,iq1_m,iq2_xxs,iq2_xs,iq2_s,iq3_xxs,iq3_s,q2_k,q3_k,q4_k,q5_k,q6_k,q8_0"
HEAD_CANDIDATES = "q2_k,q3_k,q4_k,q5_k,q6_k,q8_0"  # as low as llama.cpp's presets put the head (q2_k..)
BEGIN, END = "<!-- bench_lowbit begin -->", "<!-- bench_lowbit end -->"


def m1(*args: str) -> str:
    return subprocess.run([*M1, *args], capture_output=True, text=True, check=True).stdout


def llama_quantize() -> Path:
    path = Path(os.environ.get("M1_LLAMA_QUANTIZE", ROOT / "build" / "llama-imatrix" / "llama-quantize"))
    if not path.is_file():
        print("building llama-quantize (bench/build_llama_imatrix.sh) ...", file=sys.stderr, flush=True)
        subprocess.run(["bash", str(ROOT / "bench" / "build_llama_imatrix.sh")], check=True, stdout=subprocess.DEVNULL)
    return path


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--source", default=str(ROOT / "tests" / "data" / "tiny8-trained"))
    ap.add_argument("--presets", default=",".join(PRESETS))
    ap.add_argument("--imatrix-tokens", type=int, default=4096)
    ap.add_argument("--calib-tokens", type=int, default=2048, help="the mix's sensitivity measurement")
    ap.add_argument("--eval-tokens", type=int, default=0, help="held-out tokens to judge on (0: all of them)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--readme", action="store_true")
    ap.add_argument("--json", type=Path, help="also write the rows here")
    a = ap.parse_args()

    import gguf

    from m1.formats import get_format
    from m1.verify.runtime import agreement, engine_logits
    from m1.verify.text import corpus_text, load_tokenizer, make_windows

    quantizer = llama_quantize()
    load = os.getloadavg()[0]
    src = a.source
    windows = make_windows(load_tokenizer(src).encode(corpus_text("mr-niah")), 256, a.eval_tokens or None).tokens
    runtime = get_format("gguf").runtime
    rows = []
    with tempfile.TemporaryDirectory() as tmp_name:
        tmp = Path(tmp_name)
        imatrix, bf16 = tmp / "imatrix.gguf", tmp / "bf16.gguf"
        m1("verify", "imatrix", src, str(imatrix), "--corpus", "mr-niah", "--tokens", str(a.imatrix_tokens), "-q")
        m1("convert", src, str(bf16), "--to", "gguf", "-q")
        params = sum(t.n_elements for t in gguf.GGUFReader(bf16).tensors)
        ref = engine_logits(src, windows)
        half = windows.shape[0] // 2

        def judge(label: str, path: Path, seconds: float) -> dict:
            _, cand = runtime.run(path, windows, lambda: ref, a.threads)
            size = path.stat().st_size
            parts = [agreement(ref[s], cand[s], windows[s]) for s in (slice(None), slice(0, half), slice(half, None))]
            return {"file": label, "bytes": size, "bpw": 8 * size / params, "seconds": round(seconds, 1),
                    **parts[0], "kl_mean_halves": [parts[1]["kl_mean"], parts[2]["kl_mean"]]}

        sensitivity = None
        for preset in a.presets.split(","):
            out = tmp / f"{preset}.gguf"
            start = time.monotonic()
            subprocess.run([str(quantizer), "--imatrix", str(imatrix), str(bf16), str(out), preset, "1"],
                           check=True, capture_output=True)
            theirs = judge(f"llama.cpp {preset}", out, time.monotonic() - start)
            mix = tmp / f"m1-{preset}.gguf"
            start = time.monotonic()
            m1("quantize", src, str(mix), "--format", "gguf", "--budget", f"{theirs['bytes']}B", "--imatrix",
               str(imatrix), "--candidates", CANDIDATES, "--head-candidates", HEAD_CANDIDATES,
               *(["--sensitivity", str(sensitivity)] if sensitivity else
                 ["--corpus", "mr-niah", "--tokens", str(a.calib_tokens)]), "-q")
            sensitivity = sensitivity or tmp / f"m1-{preset}.m1-recipe.json"
            ours = judge(f"m1 mix at {preset}'s size", mix, time.monotonic() - start)
            ours["groups"] = json.loads((tmp / f"m1-{preset}.m1-recipe.json").read_text())["groups"]
            ratio = ours["kl_mean"] / theirs["kl_mean"]
            halves = [o / t for o, t in zip(ours["kl_mean_halves"], theirs["kl_mean_halves"], strict=True)]
            rows.append({"preset": preset, "llama": theirs, "m1": ours, "kl_ratio": ratio, "kl_ratio_halves": halves})
            print(f"{preset}: llama.cpp {theirs['bytes']} B KL {theirs['kl_mean']:.5f}; m1 {ours['bytes']} B KL "
                  f"{ours['kl_mean']:.5f}; ratio {ratio:.3f} (halves {halves[0]:.3f}, {halves[1]:.3f})", flush=True)
    tokens = int(windows.numel())
    head = (f"`python bench/bench_lowbit.py{' --readme' if a.readme else ''}` ({time.strftime('%Y-%m-%d')}, "
            f"{Path(src).name}, imatrix from {a.imatrix_tokens} calibration tokens, mix sensitivities from "
            f"{a.calib_tokens}, judged in llama.cpp on {tokens} held-out tokens; box load {load:.2f} on "
            f"{os.cpu_count()} CPUs):")
    lines = [head, "", "| preset | file | size | bits per weight | KL mean | KL p99 | top-1 | PPL ratio "
             "| m1 / preset KL (halves of the text) |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        for who in ("llama", "m1"):
            x = r[who]
            tail = (f"**{r['kl_ratio']:.3f}** ({r['kl_ratio_halves'][0]:.3f}, {r['kl_ratio_halves'][1]:.3f})"
                    if who == "m1" else "")
            lines.append(f"| {r['preset']} | {x['file']} | {x['bytes']:,} B | {x['bpw']:.3f} | {x['kl_mean']:.5f} | "
                         f"{x['kl_p99']:.4f} | {x['top1']:.2%} | {x['ppl_ratio']:.4f} | {tail} |")
    worst = max(r["kl_ratio"] for r in rows)
    lines += ["", f"Worst m1 / preset KL ratio: {worst:.3f} (floor 0.8: {'met' if worst <= 0.8 else 'NOT met'} "
              f"at every preset)."]
    table = "\n".join(lines)
    print(table)
    if a.json:
        a.json.write_text(json.dumps(rows, indent=2))
    if a.readme:
        readme = ROOT / "README.md"
        text = readme.read_text()
        if BEGIN not in text:
            raise SystemExit(f"README.md has no {BEGIN} marker")
        before, rest = text.split(BEGIN, 1)
        readme.write_text(before + BEGIN + "\n" + table + "\n" + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
