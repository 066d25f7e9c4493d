"""CLI conventions (help, one-line errors, exit codes, M1_DEBUG) and `m1 inspect` / `m1 make-tiny`."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import typer
from safetensors.torch import load_file, save_file

from m1.cli import app, run_cli

ROOT = Path(__file__).resolve().parents[1]

# role -> name pattern, written out here independently of m1.spec
ROLES = {
    "embed": r"model\.embed_tokens\.weight",
    "head": r"lm_head\.weight",
    "final_norm": r"model\.norm\.weight",
    "layer_norm": r"model\.layers\.\d+\.(input_layernorm|post_attention_layernorm)\.weight",
    "lightning_qkv": r"model\.layers\.\d+\.self_attn\.qkv_proj\.weight",
    "lightning_gate": r"model\.layers\.\d+\.self_attn\.output_gate\.weight",
    "lightning_out": r"model\.layers\.\d+\.self_attn\.out_proj\.weight",
    "lightning_norm": r"model\.layers\.\d+\.self_attn\.norm\.weight",
    "softmax_attn": r"model\.layers\.\d+\.self_attn\.[qkvo]_proj\.weight",
    "router": r"model\.layers\.\d+\.block_sparse_moe\.gate\.weight",
    "expert": r"model\.layers\.\d+\.block_sparse_moe\.experts\.\d+\.w[123]\.weight",
}


def role_of(name: str) -> str:
    (role,) = [r for r, rx in ROLES.items() if re.fullmatch(rx, name)]
    return role


def tensors_of(root: Path) -> dict[str, torch.Tensor]:
    out: dict[str, torch.Tensor] = {}
    for f in sorted(root.glob("*.safetensors")):
        out.update(load_file(str(f)))
    return out


def one_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err
    return lines[0]


def all_commands() -> list[list[str]]:
    """Every command and group path of the m1 CLI, found by walking it (so new commands are covered too)."""
    def walk(cmd, path: list[str]):
        yield path
        for name, sub in sorted(getattr(cmd, "commands", {}).items()):
            yield from walk(sub, [*path, name])

    return list(walk(typer.main.get_command(app), []))


# ---- conventions ---------------------------------------------------------------------------------------------


def test_the_command_tree_is_complete() -> None:
    paths = {" ".join(p) for p in all_commands()}
    assert {"", "make-tiny", "inspect", "convert", "verify", "verify integrity"} <= paths


@pytest.mark.parametrize("path", all_commands(), ids=lambda p: " ".join(p) or "m1")
def test_help_has_an_example(run, path: list[str]) -> None:
    for flag in ("--help", "-h"):
        code, out, err = run(*path, flag)
        assert code == 0, err
        assert "Example" in out, f"m1 {' '.join(path)} {flag} shows no example"
        assert "Usage" in out


@pytest.mark.parametrize(
    "args",
    [
        ["convert"],  # missing arguments
        ["convert", "a", "b", "--nope"],
        ["bogus-command"],
        ["make-tiny", "x", "--layers", "four"],
        ["verify", "integrity"],
    ],
    ids=["missing-args", "unknown-option", "unknown-command", "bad-int", "verify-missing-arg"],
)
def test_usage_errors_exit_2_with_one_line(run, args: list[str]) -> None:
    code, out, err = run(*args)
    assert code == 2
    one_error(err)


def test_no_arguments_shows_the_help(run) -> None:
    code, out, err = run()
    assert code == 2
    assert "Usage" in out and "convert" in out
    assert "error" not in err


def test_usage_errors_of_m1_options(tiny: Path, tmp_path: Path, run) -> None:
    dest = tmp_path / "never"
    for bad in (["--layout", "zigzag"], ["--to", "onnx"], ["--dtype", "int3"], ["--router-dtype", "fp8"],
                ["--shard-size", "5XB"], ["--shard-size", "0"]):
        code, out, err = run("convert", tiny, dest, *bad)
        assert code == 2, bad
        line = one_error(err)
        assert bad[0] in line or bad[1] in line, line
        assert not dest.exists()


def test_input_error_is_one_line_exit_1(tmp_path: Path, run) -> None:
    (tmp_path / "config.json").write_text("{}")
    code, out, err = run("inspect", tmp_path)
    assert code == 1
    line = one_error(err)
    assert str(tmp_path / "config.json") in line


def test_internal_error_is_one_line_and_debug_raises(tiny: Path, run, monkeypatch) -> None:
    import m1.inspect

    def broken(*args, **kwargs):
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(m1.inspect, "inspect_checkpoint", broken)
    code, out, err = run("inspect", tiny)
    assert code == 3  # a bug in m1 has its own exit code
    line = one_error(err)
    assert "please report" in line
    assert "RuntimeError" in line and "boom" in line and "second line" not in line and "M1_DEBUG=1" in line
    monkeypatch.setenv("M1_DEBUG", "1")
    with pytest.raises(RuntimeError):
        run_cli(["inspect", str(tiny)])


def test_m1_debug_gives_a_traceback(tmp_path: Path, run, monkeypatch) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama"}))
    monkeypatch.delenv("M1_DEBUG", raising=False)
    code, _, err = run("inspect", tmp_path)
    assert code == 1
    assert "'llama'" in one_error(err)
    # as a real process (the `m1` entry point's main), with M1_DEBUG=1
    cmd = [sys.executable, "-m", "m1.cli", "inspect", str(tmp_path)]
    debug = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT, env={**os.environ, "M1_DEBUG": "1"},
                           timeout=120)
    assert debug.returncode != 0
    assert "Traceback" in debug.stderr and "ConfigError" in debug.stderr and "'llama'" in debug.stderr


def test_relative_paths(tiny: Path, run, monkeypatch) -> None:
    monkeypatch.chdir(tiny.parent)
    code, _, err = run("convert", tiny.name, "out", "--to", "hf", "-q")
    assert code == 0, err
    code, out, err = run("verify", "integrity", "out", "--deep", "-q")
    assert code == 0, out + err
    got, want = tensors_of(tiny.parent / "out"), tensors_of(tiny)
    assert set(got) == set(want) and all(torch.equal(got[n], want[n]) for n in want)


# ---- make-tiny -----------------------------------------------------------------------------------------------


def test_make_tiny_cli(tmp_path: Path, run) -> None:
    dest = tmp_path / "t"
    code, out, err = run("make-tiny", dest, "--layers", "6", "--experts", "3", "--softmax-every", "3", "--shards", "2",
                         "--hidden", "32", "--heads", "2", "--kv-heads", "1", "--head-dim", "16", "--rotary-dim", "16")
    assert code == 0, err
    assert sorted(p.name for p in dest.glob("*.safetensors")) == ["model-00000-of-00002.safetensors",
                                                                 "model-00001-of-00002.safetensors"]
    config = json.loads((dest / "config.json").read_text())
    assert config["attn_type_list"] == [0, 0, 1, 0, 0, 1]
    assert config["num_local_experts"] == 3 and config["rotary_dim"] == config["head_dim"] == 16
    tensors = tensors_of(dest)
    assert tensors["model.layers.2.self_attn.q_proj.weight"].shape == (32, 32)
    assert tensors["model.layers.2.self_attn.k_proj.weight"].shape == (16, 32)
    assert tensors["model.layers.0.self_attn.qkv_proj.weight"].shape == (3 * 32, 32)
    assert "model.layers.5.block_sparse_moe.experts.2.w2.weight" in tensors
    assert "model.layers.5.block_sparse_moe.experts.3.w2.weight" not in tensors
    # the release layout: one layer spread over both shards, as in the real index
    index = json.loads((dest / "model.safetensors.index.json").read_text())["weight_map"]
    assert len({f for n, f in index.items() if n.startswith("model.layers.1.")}) == 2
    # a second time into the same folder: refused
    code, out, err = run("make-tiny", dest)
    assert code == 2
    assert "not empty" in one_error(err)


# ---- inspect -------------------------------------------------------------------------------------------------


def test_inspect_json(tiny: Path, run) -> None:
    code, out, err = run("inspect", tiny, "--json")
    assert code == 0, err
    info = json.loads(out)
    config = json.loads((tiny / "config.json").read_text())
    tensors = tensors_of(tiny)
    assert info["flavour"] == "release" and info["model_type"] == "minimax_m1"
    softmax = [i for i, c in enumerate(config["attn_type_list"]) if c == 1]
    assert info["softmax_at"] == ",".join(map(str, softmax))
    assert info["softmax_layers"] == len(softmax)
    assert info["lightning_layers"] == config["num_hidden_layers"] - len(softmax)
    assert info["tensors"] == len(tensors)
    assert info["shards"] == len(list(tiny.glob("*.safetensors")))
    assert info["params"] == sum(t.numel() for t in tensors.values())
    assert info["bytes"] == sum(t.numel() * t.element_size() for t in tensors.values())
    want: dict[str, dict[str, int]] = {}
    for name, t in tensors.items():
        r = want.setdefault(role_of(name), {"tensors": 0, "params": 0, "bytes": 0})
        r["tensors"] += 1
        r["params"] += t.numel()
        r["bytes"] += t.numel() * t.element_size()
    assert info["by_role"] == want
    assert info["by_dtype"]["F32"]["tensors"] == config["num_hidden_layers"]  # the routers
    assert info["missing"] == [] and info["unexpected"] == []


def test_inspect_text(tiny: Path, run) -> None:
    code, out, err = run("inspect", tiny)
    assert code == 0, err
    assert "release flavour" in out and "minimax_m1" in out
    assert "softmax at 3" in out
    for role in ("expert", "router", "lightning_qkv", "softmax_attn", "embed", "head"):
        assert re.search(rf"^\s+{role}\s+\d+ tensors", out, re.M), role
    assert "complete, nothing unexpected" in out


def test_inspect_hf_flavour(tiny: Path, tmp_path: Path, run) -> None:
    code, _, err = run("convert", tiny, tmp_path / "hf", "--to", "hf", "-q")
    assert code == 0, err
    code, out, err = run("inspect", tmp_path / "hf", "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["flavour"] == "hf" and info["model_type"] == "minimax"
    assert info["softmax_at"] == "3"


def test_inspect_missing_and_unexpected(tiny: Path, run) -> None:
    index_path = tiny / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    gone, extra = "model.layers.1.self_attn.output_gate.weight", "model.layers.0.mlp.gate_proj.weight"
    file = index["weight_map"][gone]
    tensors = load_file(str(tiny / file))
    del tensors[gone]
    tensors[extra] = torch.zeros(4, dtype=torch.bfloat16)
    save_file(tensors, str(tiny / file))
    del index["weight_map"][gone]
    index["weight_map"][extra] = file
    index_path.write_text(json.dumps(index))

    code, out, err = run("inspect", tiny, "--json")
    assert code == 1
    info = json.loads(out)
    assert info["missing"] == [gone]
    assert info["unexpected"] == [extra]
    code, out, err = run("inspect", tiny)
    assert code == 1
    assert f"missing: {gone}" in out and f"unexpected: {extra}" in out


def test_inspect_text01(tiny: Path, run) -> None:
    config = json.loads((tiny / "config.json").read_text())
    config.update(model_type="minimax_text_01", architectures=["MiniMaxText01ForCausalLM"])
    (tiny / "config.json").write_text(json.dumps(config))
    code, out, err = run("inspect", tiny, "--json")
    assert code == 0, err
    info = json.loads(out)
    assert info["flavour"] == "release" and info["model_type"] == "minimax_text_01"


def test_help_lists_every_registered_scheme_and_format(run) -> None:
    from m1.formats import format_names
    from m1.schemes import scheme_names

    code, out, _ = run("quantize", "--help")
    assert code == 0
    flat = " ".join(out.replace("│", " ").split())
    missing = [s for s in scheme_names() if s not in flat]
    assert not missing, f"--help does not name {missing}"
    code, out, _ = run("convert", "--help")
    flat = " ".join(out.replace("│", " ").split())
    assert all(f"'{f}'" in flat for f in format_names())


def flat_help(out: str) -> str:
    return " ".join(out.replace("│", " ").split())


def test_every_formats_own_options_are_flags_of_convert_and_quantize(run) -> None:
    from m1.cli.registries import format_cli_options, option_help
    from m1.formats.base import FormatOption

    options = format_cli_options()
    assert {"attn_type", "head_type", "embed_type", "split_max_size", "tokenizer_pre", "chat_template"} <= {
        o.name for o, _ in options}
    for command in ("convert", "quantize"):
        code, out, _ = run(command, "--help")
        assert code == 0
        for option, formats in options:
            assert f"{option.flag} " in flat_help(out), (command, option.flag)
            assert flat_help(option_help(option, formats)) in flat_help(out), (command, option.flag)
            for fmt in formats:  # each format's own help, where several declare the option
                own = next(o for o in fmt.options if o == option.name)
                text = own.help if isinstance(own, FormatOption) else ""
                assert flat_help(text) in flat_help(out), (command, option.flag, fmt.name)


def test_a_registered_formats_option_is_a_flag_that_reaches_its_job(tiny: Path, tmp_path: Path, run) -> None:
    """A format registered after the CLI was built declares an option: convert and quantize show it, and the value
    given reaches the format's make_options through the job; another format refuses it."""
    import dataclasses

    from m1 import formats
    from m1.errors import UsageError
    from m1.formats import release
    from m1.formats.base import FormatOption

    given: list[dict] = []

    def make_options(dest: Path, values: dict) -> dict:
        if values["card_note"] == "bad":
            raise UsageError("--card-note 'bad' is not a note")
        given.append(values)
        return {}

    noted = dataclasses.replace(release.FORMAT, name="noted", model_types=(), claims=lambda raw: False,
                                options=(FormatOption("card_note", help="a note for the card."),),
                                make_options=make_options)
    formats.register_format(noted)
    try:
        for command in ("convert", "quantize"):
            code, out, _ = run(command, "--help")
            assert code == 0 and "--card-note" in out and "NOTED: a note for the card." in flat_help(out)
        code, _, err = run("convert", tiny, tmp_path / "a", "--to", "noted", "--card-note", "bad", "-q")
        assert code == 2 and "--card-note 'bad' is not a note" in one_error(err)
        assert not (tmp_path / "a").exists()
        code, _, err = run("convert", tiny, tmp_path / "b", "--to", "noted", "--card-note", "hello", "--dry-run")
        assert code == 0, err
        assert given == [{"card_note": "hello"}]
        code, _, err = run("quantize", tiny, tmp_path / "c", "--format", "release", "--card-note", "x", "--dry-run")
        assert code == 2 and "--card-note applies to noted output only" in one_error(err)
    finally:
        formats.unregister_format("noted")
    code, out, _ = run("convert", "--help")
    assert "--card-note" not in out
