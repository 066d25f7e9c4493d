"""The demo's outputs against those stored before the pipeline was rebuilt (see tests/golden.py).

Shards, indexes, configs and manifests byte for byte; the compare report (floats from torch kernels whose
summation order varies with the CPU and the thread count) number by number within golden.REL_TOL / ABS_TOL.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
from golden import json_differences, png_size, text_differences, tree_digests

DATA = Path(__file__).parent / "data"
GOLDEN = DATA / "golden"
PLOT_SIZE = (990, 495)  # figsize 9 x 4.5 at matplotlib's default 110 dpi


@pytest.fixture
def demo_dir(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    # Paths as the demo types them: the report names the reference and the candidates as given.
    (tmp_path / "tests" / "data").mkdir(parents=True)
    shutil.copytree(DATA / "tiny-trained", tmp_path / "tests" / "data" / "tiny-trained")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_demo_outputs_match_the_stored_ones(demo_dir: Path, run) -> None:
    src, out = "tests/data/tiny-trained", "demo"
    steps = [
        ["convert", src, f"{out}/tiny-hf", "--to", "hf", "--quiet"],
        ["convert", f"{out}/tiny-hf", f"{out}/tiny-release", "--to", "release", "--layout", "by-layer", "--quiet"],
        *[["quantize", src, f"{out}/tiny-{s}", "--scheme", s, "--quiet"] for s in ("nf4", "int8", "fp4")],
        ["convert", f"{out}/tiny-nf4", f"{out}/tiny-nf4-bf16", "--dtype", "bf16", "--quiet"],
        ["verify", "compare", src, f"{out}/tiny-int8", f"{out}/tiny-nf4", f"{out}/tiny-fp4", "--report",
         f"{out}/report"],
    ]
    for args in steps:
        code, _, err = run(*args)
        assert code == 0, (args, err)
    expected = json.loads((GOLDEN / "demo-sha256.json").read_text())
    actual = tree_digests(demo_dir / out)
    assert sorted(actual) == sorted(expected)
    changed = [name for name in expected if actual[name] != expected[name]]
    assert not changed, f"outputs differ from before the change: {changed}"
    report = demo_dir / out / "report"
    assert sorted(p.name for p in report.iterdir()) == ["layers.png", "report.json", "report.md"]
    diffs = json_differences(json.loads((report / "report.json").read_text()),
                             json.loads((GOLDEN / "demo-report.json").read_text()))
    assert not diffs, diffs[:10]
    diffs = text_differences((report / "report.md").read_text(), (GOLDEN / "demo-report.md").read_text())
    assert not diffs, diffs[:10]
    assert png_size(report / "layers.png") == PLOT_SIZE


def _perturb(text: str, digit: int) -> str:
    """Every float in `text` changed in its `digit`-th significant digit (by one unit there)."""
    def bump(m: re.Match[str]) -> str:
        x = float(m.group())
        if x == 0:
            return m.group()
        return repr(x + abs(x) * 10.0 ** (-(digit - 1)) * (1 if f"{abs(x):e}"[0] != "9" else -1))
    return re.sub(r"-?\d+\.\d+(?:e[+-]\d+)?", bump, text)


@pytest.mark.parametrize("digit, equal", [(7, True), (3, False)])
def test_the_report_comparison_tolerates_the_7th_significant_digit_and_not_the_3rd(digit: int, equal: bool) -> None:
    stored = (GOLDEN / "demo-report.json").read_text()
    assert (not json_differences(json.loads(_perturb(stored, digit)), json.loads(stored))) is equal
    md = (GOLDEN / "demo-report.md").read_text()
    # A printed number moves by a unit of its 3rd significant digit; at the 7th it prints the same.
    printed = re.sub(r"\d+\.\d+(?:e[+-]\d+)?", lambda m: _bump_printed(m.group(), digit), md)
    assert (not text_differences(printed, md)) is equal


def _bump_printed(number: str, digit: int) -> str:
    mantissa, _, exponent = number.partition("e")
    if digit > len(mantissa.replace(".", "").lstrip("0")):
        return number  # below what is printed: the same text
    digits = mantissa.replace(".", "")
    lead = len(digits) - len(digits.lstrip("0"))
    i = lead + digit - 1
    bumped = digits[:i] + str((int(digits[i]) + 1) % 10) + digits[i + 1:]
    point = mantissa.index(".")
    out = bumped[:point] + "." + bumped[point:]
    return out + ("e" + exponent if exponent else "")
