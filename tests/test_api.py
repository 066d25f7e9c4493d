"""The documented Python API does what the CLI does: the same bytes for the same job (the CLI only parses,
calls these functions and prints)."""

from __future__ import annotations

import json
from pathlib import Path

import m1


def _files(root: Path) -> dict[str, bytes]:
    # The manifest records the run (time, job); everything else must be the same bytes.
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*"))
            if p.is_file() and not p.name.endswith("m1-manifest.json")}


def test_convert_to_gguf_gives_the_cli_bytes(tiny: Path, tmp_path: Path, run) -> None:
    code, _, err = run("convert", tiny, tmp_path / "cli" / "m.gguf", "--to", "gguf", "-q")
    assert code == 0, err
    result = m1.convert(tiny, tmp_path / "api" / "m.gguf", to="gguf", progress=False)
    assert not result.dry_run and list(result.files) == ["m.gguf"]
    assert _files(tmp_path / "api") == _files(tmp_path / "cli")


def test_quantize_a_mix_and_replay_its_recipe_give_the_cli_bytes(make_tiny_ckpt, tmp_path: Path, run) -> None:
    src = make_tiny_ckpt("big", hidden=128, intermediate=256)  # experts large enough for a real nf4/int8 mix
    uniform = {s: m1.quantize(src, tmp_path / s, scheme=s, dry_run=True).plan.total_bytes for s in ("nf4", "int8")}
    budget = f"{(uniform['nf4'] + uniform['int8']) // 2}B"
    code, _, err = run("quantize", src, tmp_path / "cli", "--budget", budget, "--candidates", "nf4,int8", "-q")
    assert code == 0, err
    mix = m1.quantize(src, tmp_path / "api", budget=budget, candidates="nf4,int8", progress=False)
    assert len(set(mix.mix.recipe["groups"].values())) == 2, "not a mix: the test would prove less"
    assert mix.recipe == tmp_path / "api" / "m1-recipe.json"
    assert _files(tmp_path / "api") == _files(tmp_path / "cli")
    code, _, err = run("quantize", src, tmp_path / "cli-again", "--recipe", tmp_path / "cli" / "m1-recipe.json", "-q")
    assert code == 0, err
    m1.quantize(src, tmp_path / "api-again", recipe=tmp_path / "cli" / "m1-recipe.json", progress=False)
    assert _files(tmp_path / "api-again") == _files(tmp_path / "cli-again")
    assert {k: v for k, v in _files(tmp_path / "api-again").items() if k != "m1-recipe.json"} == \
        {k: v for k, v in _files(tmp_path / "api").items() if k != "m1-recipe.json"}


def test_verify_compare_gives_the_cli_figures(tiny: Path, tmp_path: Path, run) -> None:
    m1.quantize(tiny, tmp_path / "int8", scheme="int8", progress=False)
    args = ("--tokens", "256", "--ctx", "64")
    code, out, err = run("verify", "compare", tiny, tmp_path / "int8", *args, "--json")
    assert code == 0, err
    cli = json.loads(out)
    api = m1.verify.compare(str(tiny), str(tmp_path / "int8"), tokens=256, ctx=64, progress=False)
    assert api.passed and api.report == cli
    ppl = m1.verify.perplexity(str(tiny), tokens=256, ctx=64, progress=False)
    assert ppl["ppl"] == cli["candidates"][0]["metrics"]["ppl_ref"]
