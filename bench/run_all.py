"""Run every benchmark and print one JSON document (the figures in the README come from these).

    python bench/run_all.py            # everything that runs on a CPU box (the dense convert slice needs ~55 GB)
    python bench/run_all.py --quick    # skip the 27 GB dense convert slice
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent


def run(args: list[str]) -> dict:
    out = subprocess.run([sys.executable, *args], check=True, capture_output=True, text=True, cwd=ROOT.parent)
    return json.loads(out.stdout[out.stdout.index("{"):])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    results = {"convert": run([str(ROOT / "bench_convert.py"), "sparse" if args.quick else "all"])}
    results["engine"] = run([str(ROOT / "bench_engine.py")])
    quantize = ROOT / "bench_quantize.py"
    if quantize.exists():
        results["quantize"] = run([str(quantize), "--json"])
    print(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
