"""Damaged config.json values (issue 9): types and bounds are checked before anything is expanded, and each
is one ConfigError line naming config.json and the key, from inspect and convert alike."""

from __future__ import annotations

import json
import tracemalloc
from pathlib import Path

import pytest

from m1.config import M1Config
from m1.config_checks import M1_SIZES, MAX_LAYER_EXPERTS, MAX_SIZES, check_config_values
from m1.errors import ConfigError

RELEASE = Path(__file__).parent / "data" / "m1-release" / "config.json"
NAN, INF = float("nan"), float("inf")

CASES = {
    "experts-1e30": {"num_local_experts": 1e30},
    "experts-10**9": {"num_local_experts": 10**9},
    "layers-10**7": {"num_hidden_layers": 10**7},
    "vocab-10**12": {"vocab_size": 10**12},
    "hidden-10**9": {"hidden_size": 10**9},
    "intermediate-10**12": {"intermediate_size": 10**12},
    "head_dim-10**9": {"head_dim": 10**9},
    "layers-x-experts": {"num_hidden_layers": 800, "num_local_experts": 320},
    "rope_theta-abc": {"rope_theta": "abc"},
    "rope_theta-true": {"rope_theta": True},
    "rope_theta-negative": {"rope_theta": -1},
    "rope_theta-inf": {"rope_theta": INF},
    "rms_norm_eps-null": {"rms_norm_eps": None},
    "rms_norm_eps-negative": {"rms_norm_eps": -1e-5},
    "rms_norm_eps-0": {"rms_norm_eps": 0},
    "block_size-x": {"block_size": "x"},
    "block_size-0": {"block_size": 0},
    "block_size-negative": {"block_size": -16},
    "block_size-huge": {"block_size": 10**6},
    "head_dim-string": {"head_dim": "16"},
    "head_dim-negative": {"head_dim": -16},
    "head_dim-0": {"head_dim": 0},
    "head_dim-float": {"head_dim": 16.0},
    "head_dim-true": {"head_dim": True},
    "hidden_size-negative": {"hidden_size": -64},
    "hidden_size-true": {"hidden_size": True},
    "heads-float": {"num_attention_heads": 4.0},
    "kv_heads-string": {"num_key_value_heads": "2"},
    "rotary_dim-true": {"rotary_dim": True},
    "postnorm-string": {"postnorm": "yes"},
    "tie_word_embeddings-string": {"tie_word_embeddings": "false"},
    "alpha-nan": {"layernorm_mlp_alpha": NAN},
    "beta-inf": {"layernorm_full_attention_beta": -INF},
    "quantization_config-string": {"quantization_config": "nf4"},
    "shared_intermediate_size-string": {"shared_intermediate_size": "0"},
}


def one_error(err: str) -> str:
    lines = [line for line in err.strip().splitlines() if not line.startswith("warning: ")]
    assert len(lines) == 1 and lines[0].startswith("error: "), err
    assert "Traceback" not in err and "internal error" not in err, err
    return lines[0]


def damage(root: Path, update: dict) -> Path:
    path = root / "config.json"
    config = json.loads(path.read_text())
    config.update(update)
    path.write_text(json.dumps(config))  # NaN and Infinity as Python's json writes (and reads) them
    return path


@pytest.mark.parametrize("case", CASES, ids=str)
def test_inspect_and_convert_refuse_a_bad_value(tiny: Path, tmp_path: Path, run, case) -> None:
    update = CASES[case]
    config = damage(tiny, update)
    key = next(iter(update))
    code, out, err = run("inspect", tiny)
    assert code == 1, out + err
    line = one_error(err)
    assert str(config) in line and key in line, line
    dest = tmp_path / "out"
    code, out, err = run("convert", tiny, dest, "--to", "hf", "-q")
    assert code == 1
    line = one_error(err)
    assert str(config) in line and key in line, line
    assert not dest.exists()


def test_hf_flavour_keys_are_checked_too(tiny: Path, tmp_path: Path, run) -> None:
    hf = tmp_path / "hf"
    assert run("convert", tiny, hf, "--to", "hf", "-q")[0] == 0
    for update in ({"mlp_alpha_factor": NAN}, {"block_size": "x"}, {"linear_attn_beta_factor": "1"}):
        original = (hf / "config.json").read_text()
        config = damage(hf, update)
        code, out, err = run("inspect", hf)
        line = one_error(err)
        assert code == 1 and str(config) in line and next(iter(update)) in line, line
        (hf / "config.json").write_text(original)
    assert run("inspect", hf)[0] == 0


def test_huge_counts_fail_before_the_tensor_table_is_built(tiny: Path, run) -> None:
    damage(tiny, {"num_local_experts": 10**9})
    tracemalloc.start()
    try:
        code, out, err = run("inspect", tiny, "--json")
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert code == 1 and "num_local_experts" in one_error(err)
    assert peak < 64 << 20, peak


def test_the_real_m1_config_is_well_inside_the_bounds() -> None:
    raw = json.loads(RELEASE.read_text())
    check_config_values(raw, str(RELEASE))
    cfg = M1Config.from_dict(raw, str(RELEASE))
    assert cfg.num_hidden_layers == 80 and cfg.num_local_experts == 32
    for key, value in M1_SIZES.items():
        assert raw.get(key, value) == value, key  # the table holds M1's own values
        assert MAX_SIZES[key] >= 10 * value, key
    assert MAX_LAYER_EXPERTS >= 10 * raw["num_hidden_layers"] * raw["num_local_experts"]


def test_errors_name_the_file_and_the_key() -> None:
    raw = json.loads(RELEASE.read_text())
    with pytest.raises(ConfigError) as info:
        M1Config.from_dict({**raw, "head_dim": "128"}, "some/config.json")
    assert info.value.file == "some/config.json"
    line = info.value.one_line()
    assert line.startswith('file some/config.json: head_dim must be an integer from 1 to 1280, got "128"'), line
