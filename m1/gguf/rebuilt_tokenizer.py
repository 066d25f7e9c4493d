"""tokenizer.json and tokenizer_config.json rebuilt from a GGUF's `tokenizer.ggml.*`, the way back of
m1.gguf.tokenizer: GPT-2 style byte-level BPE only (llama.cpp's `gpt2` model, a pre-tokenizer of
`PRE_TOKENIZERS`); anything else has no tokenizer files."""

from __future__ import annotations

from typing import Any

from m1.gguf.layout import Fields, contents

TokenizerFiles = tuple[dict[str, Any], dict[str, Any]]  # (tokenizer.json, tokenizer_config.json)


def rebuild_tokenizer(fields: Fields, model_max_length: int) -> TokenizerFiles | None:
    """tokenizer.json and tokenizer_config.json from tokenizer.ggml.* (GPT-2 style byte-level BPE only)."""
    from gguf import TokenType

    from m1.gguf.tokenizer import PRE_TOKENIZERS

    get = lambda key: contents(fields.get(key))  # noqa: E731
    if get("tokenizer.ggml.model") != "gpt2" or get("tokenizer.ggml.pre") not in PRE_TOKENIZERS:
        return None
    tokens = get("tokenizer.ggml.tokens") or []
    types = get("tokenizer.ggml.token_type") or [int(TokenType.NORMAL)] * len(tokens)
    if len(types) != len(tokens):
        return None
    vocab: dict[str, int] = {}
    added = []
    for i, (text, kind) in enumerate(zip(tokens, types, strict=True)):
        if kind == TokenType.UNUSED:  # the export's [PAD{id}] rows past the tokenizer's ids
            continue
        vocab.setdefault(text, i)  # added tokens too: tokenizers keeps their ids only when the vocab has them
        if kind in (TokenType.CONTROL, TokenType.USER_DEFINED):
            added.append({"id": i, "content": text, "single_word": False, "lstrip": False, "rstrip": False,
                          "normalized": kind != TokenType.CONTROL, "special": kind == TokenType.CONTROL})
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True, "use_regex": True}
    pre = get("tokenizer.ggml.pre")
    if pre == "gpt-2":
        pre_tokenizer: dict[str, Any] = byte_level
    else:
        pre_tokenizer = {"type": "Sequence", "pretokenizers": [
            *({"type": "Split", "pattern": {"Regex": r}, "behavior": "Isolated", "invert": False}
              for r in PRE_TOKENIZERS[pre]),
            {**byte_level, "use_regex": False}]}
    merges = [m.split(" ", 1) for m in get("tokenizer.ggml.merges") or []]
    tokenizer = {
        "version": "1.0", "truncation": None, "padding": None, "added_tokens": added, "normalizer": None,
        "pre_tokenizer": pre_tokenizer, "post_processor": None,
        "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True, "use_regex": True},
        "model": {"type": "BPE", "dropout": None, "unk_token": None, "continuing_subword_prefix": None,
                  "end_of_word_suffix": None, "fuse_unk": False, "byte_fallback": False, "ignore_merges": False,
                  "vocab": vocab, "merges": merges},
    }
    config: dict[str, Any] = {"tokenizer_class": "GPT2TokenizerFast", "model_max_length": model_max_length}
    for key, gguf_key in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"),
                          ("unk_token", "unknown_token_id"), ("pad_token", "padding_token_id")):
        token_id = get("tokenizer.ggml." + gguf_key)
        if isinstance(token_id, int) and 0 <= token_id < len(tokens):
            config[key] = tokens[token_id]
    for key in ("add_bos_token", "add_eos_token"):
        value = get("tokenizer.ggml." + key)
        if value is not None:
            config[key] = bool(value)
    template = get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tokenizer, config
