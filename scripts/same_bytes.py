"""Do two builds of m1 write the same bytes? A refactoring's check, on a held-out tiny M1.

    python scripts/same_bytes.py --ref /path/to/other/checkout/.venv/bin/m1 [--work DIR] [--keep]

Runs the same jobs with this checkout's m1 (`python -m m1`) and with `--ref` (another build's console script,
e.g. a worktree of an earlier commit with its own venv): make a held-out tiny M1 (sizes no test uses), convert
it to hf, release (by layer), gguf (one file and split), quantize it with every bitsandbytes scheme and every
ggml type (K-quants with an importance matrix both builds read from one file), a GGUF with attention and head
types, and replay one measured mix's recipe in both families. Every file of every output is compared byte for
byte; the script prints one line per job and exits 1 on the first difference it reports (all are listed).
Only inputs both builds accept are used: the jobs' flags are those that existed before the redesign.
"""

from __future__ import annotations

import argparse
import filecmp
import json
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

TINY = ["--layers", "5", "--hidden", "256", "--intermediate", "512", "--heads", "4", "--kv-heads", "2",
        "--head-dim", "64", "--rotary-dim", "32", "--experts", "6", "--top-k", "2", "--vocab", "320",
        "--softmax-every", "3", "--shards", "4", "--seed", "11"]
BNB = ["nf4", "fp4", "int8"]
CALIBRATION = ["--calibration", "mr-niah", "--calibration-tokens", "1024", "--calibration-ctx", "128"]
BUDGET = {"gguf": ["--budget", "12MB", "--candidates", "q4_k,q6_k,q8_0", *CALIBRATION],
          "bnb": ["--budget", "12MB", "--candidates", "nf4,int8", *CALIBRATION]}
NEEDS_IMATRIX = {"q2_k", "iq4_xs"}  # ggml refuses or badly rounds these without one at this size


def jobs(src: str, imatrix: str, recipe_gguf: str, recipe_bnb: str) -> list[tuple[str, list[str]]]:
    """(output name, arguments after `m1`) for every job both builds run; {out} is the output path."""
    out = [
        ("hf", ["convert", src, "{out}", "--to", "hf"]),
        ("release-by-layer", ["convert", src, "{out}", "--to", "release", "--layout", "by-layer"]),
        ("release-fp16", ["convert", src, "{out}", "--dtype", "fp16", "--shard-size", "2MB"]),
        ("bf16.gguf", ["convert", src, "{out}", "--to", "gguf"]),
        ("split.gguf", ["convert", src, "{out}", "--to", "gguf", "--split-max-size", "3M"]),
        ("types.gguf", ["convert", src, "{out}", "--to", "gguf", "--attn-type", "q8_0", "--head-type", "q8_0",
                        "--embed-type", "f16"]),
    ]
    out += [(f"bnb-{s}", ["quantize", src, "{out}", "--scheme", s]) for s in BNB]
    out += [("bnb-nf4-hf-keep", ["quantize", src, "{out}", "--scheme", "nf4", "--format", "hf", "--keep",
                                 "re:layers\\.1\\."])]
    for t in ["q4_0", "q4_1", "q5_0", "q5_1", "q8_0", "q2_k", "q3_k", "q4_k", "q5_k", "q6_k", "iq4_xs", "mxfp4"]:
        extra = ["--imatrix", imatrix] if t in NEEDS_IMATRIX or t.endswith("_k") else []
        out.append((f"{t}.gguf", ["quantize", src, "{out}", "--format", "gguf", "--scheme", t, *extra]))
    out += [("mix.gguf", ["quantize", src, "{out}", "--format", "gguf", "--scheme", "q4_k", "--imatrix", imatrix,
                          "--recipe", recipe_gguf]),
            ("mix-bnb", ["quantize", src, "{out}", "--scheme", "nf4", "--recipe", recipe_bnb]),
            # the measurement itself, in both builds (its floats come from the same box, so the same bytes)
            ("budget.gguf", ["quantize", src, "{out}", "--format", "gguf", "--scheme", "q4_k", "--imatrix", imatrix,
                             *BUDGET["gguf"]]),
            ("budget-bnb", ["quantize", src, "{out}", "--scheme", "nf4", *BUDGET["bnb"]])]
    return out


def run(m1: list[str], args: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*m1, *args, "--quiet"] if args[0] in ("convert", "quantize") else [*m1, *args],
                          cwd=cwd, capture_output=True, text=True)


def files_of(path: Path) -> dict[str, Path]:
    if path.is_file():
        return {p.name: p for p in path.parent.iterdir() if p.is_file() and _of_stem(p.name, path.stem)}
    return {str(p.relative_to(path)): p for p in sorted(path.rglob("*")) if p.is_file()}


def _of_stem(name: str, stem: str) -> bool:  # x.gguf, x-00001-of-00002.gguf, x.m1-manifest.json
    return name.startswith((stem + ".", stem + "-0"))


def differences(a: Path, b: Path) -> list[str]:
    fa, fb = files_of(a), files_of(b)
    out = [f"only in one: {name}" for name in sorted(set(fa) ^ set(fb))]
    out += [f"differs: {name}" for name in sorted(set(fa) & set(fb)) if not _same(fa[name], fb[name])]
    return out


def _same(a: Path, b: Path) -> bool:
    """Byte for byte; a manifest's bytes but for the line of its `created` time."""
    if not a.name.endswith("m1-manifest.json"):
        return filecmp.cmp(a, b, shallow=False)
    return _timeless(a) == _timeless(b)


def _timeless(path: Path) -> list[bytes]:
    return [line for line in path.read_bytes().splitlines() if not line.lstrip().startswith(b'"created": ')]


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ref", required=True, help="the other build's m1 console script")
    ap.add_argument("--work", type=Path, help="where to write (default: a temporary folder, removed)")
    ap.add_argument("--keep", action="store_true", help="keep --work's outputs")
    ap.add_argument("--only", help="run only the jobs whose output name contains this")
    opts = ap.parse_args()
    work = opts.work or Path(tempfile.mkdtemp(prefix="m1-same-bytes-"))
    work.mkdir(parents=True, exist_ok=True)
    new, ref = [sys.executable, "-m", "m1"], [opts.ref]
    try:
        src = work / "tiny"
        if not src.exists():
            made = run(ref, ["make-tiny", str(src), *TINY], work)
            if made.returncode:
                sys.exit(f"make-tiny failed: {made.stderr.strip()}")
        shutil.rmtree(work / "tiny-new", ignore_errors=True)
        mine = run(new, ["make-tiny", str(work / "tiny-new"), *TINY], work)
        diff = differences(src, work / "tiny-new") if mine.returncode == 0 else [mine.stderr.strip()]
        print(f"{'same' if not diff else 'DIFFERENT'}  make-tiny" + "".join(f"\n    {d}" for d in diff))
        failures = int(bool(diff))
        imatrix = work / "imatrix.gguf"  # one file both builds read: the K-quants' bytes depend on it
        if not imatrix.exists():
            made = run(ref, ["verify", "imatrix", str(src), str(imatrix), "--tokens", "2048", "--ctx", "128"], work)
            if made.returncode:
                sys.exit(f"verify imatrix failed: {made.stderr.strip()}")
        recipes = {}
        for kind in ("gguf", "bnb"):
            recipe = work / f"recipe-{kind}.json"
            recipes[kind] = recipe
            if recipe.exists():
                continue
            dest = work / ("recipe.gguf" if kind == "gguf" else "recipe-bnb")
            fmt = ["--format", "gguf", "--scheme", "q4_k", "--imatrix", str(imatrix)] if kind == "gguf" else \
                ["--scheme", "nf4"]
            made = run(ref, ["quantize", str(src), str(dest), *fmt, *BUDGET[kind]], work)
            if made.returncode:
                sys.exit(f"quantize --budget ({kind}) failed: {made.stderr.strip()}")
            written = dest.parent / f"{dest.stem}.m1-recipe.json" if kind == "gguf" else dest / "m1-recipe.json"
            shutil.copyfile(written, recipe)
        for name, args in jobs(str(src), str(imatrix), str(recipes["gguf"]), str(recipes["bnb"])):
            if opts.only and opts.only not in name:
                continue
            outs = {}
            for who, m1 in (("ref", ref), ("new", new)):
                dest = work / who / name
                if dest.is_dir():
                    shutil.rmtree(dest)
                for old in dest.parent.iterdir() if dest.parent.exists() else []:
                    if old.is_file() and _of_stem(old.name, Path(name).stem):
                        old.unlink()
                dest.parent.mkdir(parents=True, exist_ok=True)
                done = run(m1, [a.replace("{out}", str(dest)) for a in args], work)
                outs[who] = (dest, done)
            (a, ra), (b, rb) = outs["ref"], outs["new"]
            if ra.returncode or rb.returncode:
                diff = [] if ra.returncode and rb.returncode and ra.returncode == rb.returncode else \
                    [f"exit {ra.returncode} (ref) vs {rb.returncode} (new): "
                     f"{(ra.stderr or rb.stderr).strip().splitlines()[-1:]}"]
                note = f" (both refuse: {json.dumps(ra.stderr.strip().splitlines()[-1:])})" if not diff else ""
            else:
                diff, note = differences(a, b), ""
            failures += bool(diff)
            print(f"{'same' if not diff else 'DIFFERENT'}  {name}{note}" + "".join(f"\n    {d}" for d in diff))
        print(f"{failures} different" if failures else "all the same")
        return 1 if failures else 0
    finally:
        if opts.work is None and not opts.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
