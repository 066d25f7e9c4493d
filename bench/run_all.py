"""Run every benchmark and print one JSON document (the figures in the README come from these).

    python bench/run_all.py            # everything that runs on a CPU box (the dense slices need ~55 GB of disk)
    python bench/run_all.py --quick    # skip the 27 GB dense slices (convert against cp, GGUF against llama.cpp),
                                       # llama.cpp's low-bit presets against m1's mix (bench_lowbit, ~16 min) and
                                       # GPTQ against the libraries' own rounding (bench_gptq, ~6 min)

The GPU checks are one command of their own (bench/bench_gpu.py), for a machine with a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def run(args: list[str]) -> dict:
    """The benchmark's JSON: its output from the first line that opens an object."""
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True, cwd=ROOT.parent)
    lines = out.stdout.splitlines()
    first = next(i for i, line in enumerate(lines) if line.startswith("{"))
    return json.JSONDecoder().raw_decode("\n".join(lines[first:]))[0]


def run_plain(args: list[str]) -> None:
    subprocess.run([sys.executable, *args], check=True, cwd=ROOT.parent, stdout=sys.stderr)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    results = {"convert": run([str(ROOT / "bench_convert.py"), "sparse" if args.quick else "all"])}
    results["engine"] = run([str(ROOT / "bench_engine.py")])
    quantize = ROOT / "bench_quantize.py"
    if quantize.exists():
        results["quantize"] = run([str(quantize), "--json"])
    results["kquant"] = run([str(ROOT / "bench_kquant.py"), "--json"])
    results["gguf_export"] = run([str(ROOT / "bench_gguf.py")])
    if not args.quick:  # llama.cpp's converter on the dense slice: its figures are in the file it writes
        run_plain([str(ROOT / "bench_gguf_peer.py")])
        # llama.cpp's presets against m1's mix (builds llama-quantize when missing): its table is what it prints
        run_plain([str(ROOT / "bench_lowbit.py"), "--json", str(ROOT.parent / "build" / "bench_lowbit.json")])
        # GPTQ against each library's own rounding at the same bytes (~6 min): its tables are what it prints
        run_plain([str(ROOT / "bench_gptq.py")])
        results["gguf_peer"] = json.loads((ROOT / "out" / "gguf_peer.json").read_text())
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
