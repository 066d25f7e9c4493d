"""The fault suite (issue 9): a generator of damaged inputs, each fed to every command that reads it.

Damage comes from four generators: shard headers (tests/test_faults_headers.py's cases, each checked against
the safetensors library there), the index, config.json values (tests/test_faults_config.py's cases) and the
data of a quantized checkpoint's companions. Every damaged checkpoint goes through inspect, verify integrity,
convert, quantize, verify compare and verify perplexity. For each run: a non-zero exit code (1 for the input, 2
for usage), one clear line (or integrity's findings), no traceback and no "internal error", nothing
complete-looking written, and nothing outside the destination touched (the source's bytes are unchanged).
"""

from __future__ import annotations

import json
from collections.abc import Callable
from pathlib import Path

import pytest
from golden import tree_hash
from test_faults_config import CASES as CONFIG_CASES
from test_faults_headers import CASES as HEADER_CASES
from test_faults_headers import damage as damage_header

Damage = Callable[[Path], None]


def _index(edit: Callable[[dict], None]) -> Damage:
    def apply(root: Path) -> None:
        path = root / "model.safetensors.index.json"
        index = json.loads(path.read_text())
        edit(index)
        path.write_text(json.dumps(index))
    return apply


def _first(index: dict) -> str:
    return next(iter(index["weight_map"]))


INDEX_CASES: dict[str, Damage] = {
    "weight_map-dot": _index(lambda i: i["weight_map"].__setitem__(_first(i), ".")),
    "weight_map-folder": _index(lambda i: i["weight_map"].__setitem__(_first(i), "sub/")),
    "weight_map-outside": _index(lambda i: i["weight_map"].__setitem__(_first(i), "../x.safetensors")),
    "weight_map-missing-shard": _index(lambda i: i["weight_map"].__setitem__(_first(i), "model-9.safetensors")),
    "weight_map-empty": _index(lambda i: i.__setitem__("weight_map", {})),
    "weight_map-list": _index(lambda i: i.__setitem__("weight_map", [])),
    "metadata-list": _index(lambda i: i.__setitem__("metadata", [1, 2])),
    "total_size-string": _index(lambda i: i["metadata"].__setitem__("total_size", "big")),
    "total_size-wrong": _index(lambda i: i["metadata"].__setitem__("total_size", 12)),
    "extra-tensor": _index(lambda i: i["weight_map"].__setitem__("model.layers.0.mystery.weight",
                                                                  next(iter(i["weight_map"].values())))),
    "not-json": lambda root: (root / "model.safetensors.index.json").write_text("{not json"),
}


def _config(update: dict) -> Damage:
    def apply(root: Path) -> None:
        path = root / "config.json"
        config = json.loads(path.read_text())
        config.update(update)
        path.write_text(json.dumps(config))
    return apply


GENERATED: dict[str, Damage] = {
    **{f"header-{case.__name__}": (lambda c: lambda root: damage_header(root, c))(case) for case in HEADER_CASES},
    **{f"index-{name}": fn for name, fn in INDEX_CASES.items()},
    # a spread of the config cases (every one of them is also checked against inspect and convert there)
    **{f"config-{name}": _config(CONFIG_CASES[name]) for name in list(CONFIG_CASES)[::3]},
}

COMMANDS: dict[str, Callable[[Path, Path, Path], list[object]]] = {
    "inspect": lambda src, good, out: ["inspect", src],
    "integrity": lambda src, good, out: ["verify", "integrity", src, "-q"],
    "convert": lambda src, good, out: ["convert", src, out, "--to", "hf", "-q"],
    "quantize": lambda src, good, out: ["quantize", src, out, "--scheme", "int8", "-q"],
    "compare": lambda src, good, out: ["verify", "compare", good, src, "--tokens", "256", "--ctx", "64", "-q"],
    "perplexity": lambda src, good, out: ["verify", "perplexity", src, "--tokens", "256", "--ctx", "64", "-q"],
}


# Damage that leaves every tensor whole: the engine may measure such a checkpoint (exit 0); every other
# command still refuses it.
HARMLESS_TO_THE_NUMBERS = {"index-total_size-wrong"}


@pytest.fixture(scope="module")
def good(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from m1.tiny import TinySpec, make_tiny

    root = tmp_path_factory.mktemp("good") / "tiny"
    make_tiny(root, TinySpec(hidden=64, intermediate=128))
    return root


# `make test` runs the first case of each generator (a header, an index and a config mutation); the whole
# matrix runs in `make test-slow`.
REPRESENTATIVE = {next(n for n in GENERATED if n.startswith(kind)) for kind in ("header-", "index-", "config-")}


@pytest.mark.parametrize("mutation", [m if m in REPRESENTATIVE else pytest.param(m, marks=pytest.mark.slow)
                                      for m in GENERATED])
def test_every_command_refuses_the_damaged_input_cleanly(good: Path, tmp_path: Path, run, mutation: str) -> None:
    import shutil

    src = tmp_path / "damaged"
    shutil.copytree(good, src)
    GENERATED[mutation](src)
    before = tree_hash(src)
    for command, args in COMMANDS.items():
        out = tmp_path / f"out-{command}"
        code, stdout, err = run(*args(src, good, out))
        where = f"{mutation} / {command}"
        if code == 0 and mutation in HARMLESS_TO_THE_NUMBERS and command in ("compare", "perplexity"):
            continue
        assert code in (1, 2), (where, code, stdout, err)
        assert "Traceback" not in err and "internal error" not in err, (where, err)
        errors = [line for line in err.strip().splitlines() if line.startswith("error: ")]
        if command in ("integrity", "inspect"):  # these report findings on stdout (and exit 1)
            assert errors or "unreadable" in stdout or "[" in stdout or "missing" in stdout \
                or "unexpected" in stdout, (where, stdout, err)
        else:
            assert len(errors) == 1, (where, err)
        assert not (out / "m1-manifest.json").exists() and not (out / "model.safetensors.index.json").exists(), where
        assert tree_hash(src) == before, f"{where} changed the source"


def test_the_suite_is_the_size_the_readme_says() -> None:
    """The README's reliability section quotes these counts; this keeps them honest."""
    import re

    readme = (Path(__file__).parent.parent / "README.md").read_text()
    m = re.search(r"\*\*Generated damage x every command:\*\* (\d+) damaged checkpoints \((\d+) header mutations"
                  r".*?; (\d+) index\s+mutations; (\d+) config values\).*?: (\d+) runs", readme, re.S)
    assert m, "the README's reliability section no longer states the suite's size"
    total, headers, index, config, runs = map(int, m.groups())
    assert (headers, index, config) == (len(HEADER_CASES), len(INDEX_CASES), len(list(CONFIG_CASES)[::3]))
    assert total == len(GENERATED) == headers + index + config
    assert runs == len(GENERATED) * len(COMMANDS)
