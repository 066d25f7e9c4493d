"""M1Config and the tensor table against the real MiniMax-M1 release config and index."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from m1.config import M1Config
from m1.dtypes import DTYPE_BYTES
from m1.errors import ConfigError, UnknownTensorError
from m1.spec import Role, classify, inventory, spec_by_name

RELEASE = Path(__file__).parent / "data" / "m1-release"
FACTOR_KEYS = {  # release key -> transformers key, written out here on purpose (not imported)
    "layernorm_full_attention_alpha": "full_attn_alpha_factor",
    "layernorm_full_attention_beta": "full_attn_beta_factor",
    "layernorm_linear_attention_alpha": "linear_attn_alpha_factor",
    "layernorm_linear_attention_beta": "linear_attn_beta_factor",
    "layernorm_mlp_alpha": "mlp_alpha_factor",
    "layernorm_mlp_beta": "mlp_beta_factor",
}


@pytest.fixture(scope="module")
def release_raw() -> dict:
    return json.loads((RELEASE / "config.json").read_text())


@pytest.fixture(scope="module")
def release_index() -> dict:
    return json.loads((RELEASE / "model.safetensors.index.json").read_text())


@pytest.fixture(scope="module")
def release_cfg() -> M1Config:
    return M1Config.from_file(RELEASE / "config.json")


def test_inventory_reproduces_the_release_index(release_cfg: M1Config, release_index: dict) -> None:
    specs = inventory(release_cfg)
    names = [t.name for t in specs]
    assert len(names) == len(set(names))
    assert set(names) == set(release_index["weight_map"])
    assert len(names) == len(release_index["weight_map"]) == 8243
    total = sum(t.nbytes for t in specs)
    assert total == release_index["metadata"]["total_size"]


def test_shapes_follow_the_config(release_cfg: M1Config, release_raw: dict) -> None:
    """Shapes from the config keys, written out independently of `M1Config.dims()`."""
    h, v = release_raw["hidden_size"], release_raw["vocab_size"]
    attn = release_raw["num_attention_heads"] * release_raw["head_dim"]
    kv = release_raw["num_key_value_heads"] * release_raw["head_dim"]
    inter, experts = release_raw["intermediate_size"], release_raw["num_local_experts"]
    specs = spec_by_name(release_cfg)
    assert specs["model.embed_tokens.weight"].shape == (v, h)
    assert specs["lm_head.weight"].shape == (v, h)
    assert specs["model.layers.0.self_attn.qkv_proj.weight"].shape == (3 * attn, h)
    assert specs["model.layers.0.self_attn.out_proj.weight"].shape == (h, attn)
    assert specs["model.layers.7.self_attn.k_proj.weight"].shape == (kv, h)
    assert specs["model.layers.7.self_attn.o_proj.weight"].shape == (h, attn)
    assert specs["model.layers.3.block_sparse_moe.gate.weight"].shape == (experts, h)
    assert specs["model.layers.3.block_sparse_moe.gate.weight"].dtype == "F32"
    assert specs["model.layers.3.block_sparse_moe.experts.31.w2.weight"].shape == (h, inter)
    assert specs["model.layers.3.block_sparse_moe.experts.31.w1.weight"].dtype == "BF16"


def test_layer_kinds_come_from_attn_type_list(release_cfg: M1Config, release_raw: dict, release_index: dict) -> None:
    from_list = [i for i, code in enumerate(release_raw["attn_type_list"]) if code == 1]
    assert from_list == list(range(7, 80, 8))  # the published release: every 8th layer is softmax
    assert [i for i, k in enumerate(release_cfg.layer_kinds) if k == "softmax"] == from_list
    assert release_cfg.layer_kinds.count("lightning") == 70
    # the index agrees: q_proj exactly in the softmax layers, qkv_proj exactly in the others
    q = {int(m.group(1)) for n in release_index["weight_map"]
         if (m := re.match(r"model\.layers\.(\d+)\.self_attn\.q_proj", n))}
    qkv = {int(m.group(1)) for n in release_index["weight_map"]
           if (m := re.match(r"model\.layers\.(\d+)\.self_attn\.qkv_proj", n))}
    assert q == set(from_list)
    assert qkv == set(range(80)) - set(from_list)


def test_classify_every_release_name(release_index: dict) -> None:
    for name in release_index["weight_map"]:
        c = classify(name)
        m = re.match(r"model\.layers\.(\d+)\.", name)
        assert c.layer == (int(m.group(1)) if m else None), name
        e = re.search(r"\.experts\.(\d+)\.", name)
        assert c.expert == (int(e.group(1)) if e else None), name
        assert (c.rule.role == Role.EXPERT) == bool(e), name
    with pytest.raises(UnknownTensorError) as exc:
        classify("model.layers.0.self_attn.rotary_emb.inv_freq", file="x.safetensors")
    assert "model.layers.0.self_attn.rotary_emb.inv_freq" in str(exc.value)
    assert "x.safetensors" in str(exc.value)


def test_release_hf_release_config_round_trip(release_cfg: M1Config, release_raw: dict) -> None:
    hf = release_cfg.to_dict("hf")
    back = M1Config.from_dict(hf).to_dict("release")
    assert back == release_raw
    again = M1Config.from_dict(back)
    for f in ("flavour", "model_type"):
        assert getattr(again, f) == getattr(release_cfg, f)
    assert again == release_cfg


def test_hf_config_keys(release_cfg: M1Config, release_raw: dict) -> None:
    hf = release_cfg.to_dict("hf")
    assert hf["model_type"] == "minimax"
    assert hf["architectures"] == ["MiniMaxForCausalLM"]
    assert hf["layer_types"] == ["full_attention" if c else "linear_attention" for c in release_raw["attn_type_list"]]
    for release_key, hf_key in FACTOR_KEYS.items():
        assert hf[hf_key] == release_raw[release_key]
        assert release_key not in hf
    assert hf["block_size"] == 256
    assert "auto_map" not in hf
    assert "attn_type_list" not in hf
    assert hf["rotary_dim"] == release_raw["rotary_dim"] == 64
    assert hf["head_dim"] == release_raw["head_dim"]
    # everything else the release config says is kept as is
    for key in ("vocab_size", "rope_theta", "max_position_embeddings", "num_local_experts", "postnorm"):
        assert hf[key] == release_raw[key]
    hf_cfg = M1Config.from_dict(hf)
    assert hf_cfg.flavour == "hf"
    assert inventory(hf_cfg) == inventory(release_cfg)


def test_non_default_block_size_survives_the_round_trip(release_raw: dict) -> None:
    raw = dict(release_raw, block_size=16)
    cfg = M1Config.from_dict(raw)
    back = M1Config.from_dict(M1Config.from_dict(cfg.to_dict("hf")).to_dict("release"))
    assert back.block_size == 16
    assert back == cfg


def test_text01_flavour_is_accepted(release_raw: dict) -> None:
    raw = dict(release_raw, model_type="minimax_text_01", architectures=["MiniMaxText01ForCausalLM"])
    raw["auto_map"] = {"AutoConfig": "configuration_minimax_text_01.MiniMaxText01Config",
                       "AutoModelForCausalLM": "modeling_minimax_text_01.MiniMaxText01ForCausalLM"}
    cfg = M1Config.from_dict(raw)
    assert cfg.flavour == "release"
    assert cfg.model_type == "minimax_text_01"
    assert cfg.to_dict("release") == raw
    hf = cfg.to_dict("hf")
    assert hf["model_type"] == "minimax" and "auto_map" not in hf
    assert len(inventory(cfg)) == 8243


def test_neither_flavour_names_the_file(tmp_path: Path, release_raw: dict) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps(dict(release_raw, model_type="llama")))
    with pytest.raises(ConfigError) as exc:
        M1Config.from_file(path)
    assert exc.value.file == str(path)
    assert str(path) in exc.value.one_line()
    assert "'llama'" in exc.value.one_line()


@pytest.mark.parametrize(
    "change, words",
    [
        ({"attn_type_list": [0, 1, 2]}, "attn_type_list"),
        ({"attn_type_list": [0] * 79}, "79 layer kinds"),
        ({"hidden_size": "6144"}, "hidden_size"),
        ({"num_hidden_layers": 0}, "num_hidden_layers"),
        ({"rotary_dim": 63}, "rotary_dim"),
        ({"num_key_value_heads": 7}, "num_key_value_heads"),
        ({"layernorm_mlp_alpha": None}, "layernorm_mlp_alpha"),
    ],
)
def test_inconsistent_configs_are_config_errors(tmp_path: Path, release_raw: dict, change: dict, words: str) -> None:
    path = tmp_path / "config.json"
    path.write_text(json.dumps({**release_raw, **change}))
    with pytest.raises(ConfigError) as exc:
        M1Config.from_file(path)
    assert words in exc.value.one_line()
    assert str(path) in exc.value.one_line()


def test_config_not_json(tmp_path: Path) -> None:
    path = tmp_path / "config.json"
    path.write_text("{not json")
    with pytest.raises(ConfigError) as exc:
        M1Config.from_file(path)
    assert str(path) in exc.value.one_line()


def test_tied_embeddings_drop_the_head(release_raw: dict) -> None:
    cfg = M1Config.from_dict(dict(release_raw, tie_word_embeddings=True))
    names = {t.name for t in inventory(cfg)}
    assert "lm_head.weight" not in names
    assert len(names) == 8242


def test_dtype_bytes_match_torch() -> None:
    import torch

    from m1.dtypes import torch_dtype

    for name, size in DTYPE_BYTES.items():
        assert torch.empty(0, dtype=torch_dtype(name)).element_size() == size, name
