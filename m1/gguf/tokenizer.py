"""Tokenizer metadata for GGUF (`tokenizer.ggml.*`) from a checkpoint's `tokenizer.json` / `tokenizer_config.json`.

Only GPT-2 style byte-level BPE (llama.cpp's `gpt2` tokenizer model) is exported, which is what MiniMax-M1
and the project's tiny models use. What llama.cpp needs that the files do not say directly:

- the token list exactly as long as the embedding has rows: ids the tokenizer does not use are padded
  with `[PAD{id}]` tokens of type UNUSED;
- the merges key present, even when empty (gguf-py's `add_array` silently drops an empty list, and
  llama.cpp then refuses the file: "cannot find tokenizer merges in model file");
- the pre-tokenizer under llama.cpp's own name for the split regex (`gpt-2`, not `gpt2`, which it refuses):
  `PRE_TOKENIZERS` maps the regexes we know, anything else needs `pre=NAME`;
- `tokenizer.ggml.suppress_tokens` as INT32 (its loader throws otherwise): the ids at or above the
  tokenizer's vocabulary whose embedding rows are all zero.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gguf import GGUFValueType, TokenType

from m1.errors import UsageError
from m1.gguf.metadata import KV, array, string

T = "tokenizer.ggml."

# The split regex of tokenizers' ByteLevel pre-tokenizer with use_regex (GPT-2's).
GPT2_REGEX = r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)|\s+"

# llama.cpp pre-tokenizer name -> the split regexes of tokenizer.json it stands for (as tokenizers writes them).
PRE_TOKENIZERS: dict[str, tuple[str, ...]] = {
    "gpt-2": (GPT2_REGEX,),
    "llama-bpe": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+",
    ),
    "qwen2": (
        r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+"
        r"|\s+(?!\S)|\s+",
    ),
    "gpt-4o": (
        r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
        r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+",
    ),
}

# The release's template indexes the content as a list of parts: a plain string content is dropped.
LIST_CONTENT_MARKERS = ("['content'][0]['text']", '["content"][0]["text"]', "content[0].text",
                        "['content'][0]", "| selectattr('type'")
CHAT_TEMPLATE_WARNING = (
    "the chat template reads message['content'][0]['text'] (content as a list of parts), so messages whose "
    "content is a plain string (what llama.cpp's server and mlx-lm pass) render with that text silently "
    "dropped; the GGUF keeps the model's template as is: pass --chat-template FILE to embed another"
)
CHAT_TEMPLATE_REWRITTEN = (
    "the chat template reads message content as a list of parts only; the GGUF carries it rewritten to render "
    "plain-string content too (list content renders as before; m1.gguf.chat_template): pass --chat-template FILE "
    "to embed another"
)


@dataclass(frozen=True)
class TokenizerFiles:
    tokenizer: dict[str, Any]
    config: dict[str, Any]
    chat_template: str | None  # chat_template.jinja beside the files, if any
    source: str


def read_tokenizer_files(folder: str | Path) -> TokenizerFiles:
    """tokenizer.json (required), tokenizer_config.json and chat_template.jinja (optional) of a checkpoint."""
    root = Path(folder)
    path = root / "tokenizer.json"
    try:
        tokenizer = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise UsageError("no tokenizer.json: a GGUF carries its tokenizer", file=str(root),
                         hint="add the model's tokenizer.json to the checkpoint folder") from None
    except ValueError as exc:
        raise UsageError(f"tokenizer.json is not valid JSON ({exc})", file=str(path)) from None
    config: dict[str, Any] = {}
    if (root / "tokenizer_config.json").exists():
        try:
            config = json.loads((root / "tokenizer_config.json").read_text(encoding="utf-8"))
        except ValueError as exc:
            raise UsageError(f"not valid JSON ({exc})", file=str(root / "tokenizer_config.json")) from None
    jinja = root / "chat_template.jinja"
    template = jinja.read_text(encoding="utf-8") if jinja.exists() else None
    return TokenizerFiles(tokenizer, config, template, str(path))


def base_vocab_size(tokenizer: dict[str, Any]) -> int:
    """The BPE model's own vocabulary size (added tokens not counted), as transformers' `vocab_size`."""
    vocab = tokenizer.get("model", {}).get("vocab") or {}
    return max(vocab.values(), default=-1) + 1


def split_regexes(pre: dict[str, Any] | None, source: str) -> tuple[list[str], bool]:
    """(split regexes in order, whether a ByteLevel step is present) of a tokenizer.json pre_tokenizer."""
    if pre is None:
        return [], False
    kind = pre.get("type")
    if kind == "Sequence":
        regexes, byte_level = [], False
        for step in pre.get("pretokenizers", []):
            r, b = split_regexes(step, source)
            regexes += r
            byte_level |= b
        return regexes, byte_level
    if kind == "ByteLevel":
        if pre.get("add_prefix_space"):
            raise UsageError("the ByteLevel pre-tokenizer adds a prefix space, which llama.cpp's BPE does not do",
                             file=source)
        return ([GPT2_REGEX] if pre.get("use_regex", True) else []), True
    if kind == "Split":
        pattern = pre.get("pattern", {})
        if "Regex" in pattern:
            return [pattern["Regex"]], False
        raise UsageError(f"a Split pre-tokenizer on a plain string {pattern!r}", file=source,
                         hint="pass --tokenizer-pre NAME with the llama.cpp pre-tokenizer that matches it")
    raise UsageError(f"pre-tokenizer {kind!r} has no llama.cpp equivalent we know", file=source,
                     hint="pass --tokenizer-pre NAME with the llama.cpp pre-tokenizer that matches it")


def pre_tokenizer_name(tokenizer: dict[str, Any], source: str = "tokenizer.json") -> str:
    """llama.cpp's name for the tokenizer's split regex (`PRE_TOKENIZERS`), or a UsageError."""
    regexes, _ = split_regexes(tokenizer.get("pre_tokenizer"), source)
    for name, known in PRE_TOKENIZERS.items():
        if tuple(regexes) == known:
            return name
    shown = " + ".join(regexes) or "none"
    raise UsageError(f"unknown pre-tokenizer split regex {shown!r}", file=source,
                     hint=f"pass --tokenizer-pre NAME, a llama.cpp pre-tokenizer (known here: "
                          f"{', '.join(PRE_TOKENIZERS)})")


def _merges(model: dict[str, Any]) -> list[str]:
    out = []
    for merge in model.get("merges") or []:
        out.append(merge if isinstance(merge, str) else " ".join(merge))
    return out


def _token_id(config: dict[str, Any], key: str, ids: dict[str, int]) -> int | None:
    value = config.get(key)
    if isinstance(value, dict):
        value = value.get("content")
    return ids.get(value) if isinstance(value, str) else None


def chat_template_of(files: TokenizerFiles) -> str | None:
    template = files.chat_template or files.config.get("chat_template")
    if isinstance(template, list):  # [{"name": "default", "template": ...}, ...]
        named = {t.get("name"): t.get("template") for t in template if isinstance(t, dict)}
        template = named.get("default") or next(iter(named.values()), None)
    return template if isinstance(template, str) and template else None


def chat_template_warnings(template: str | None) -> list[str]:
    if template and any(marker in template for marker in LIST_CONTENT_MARKERS):
        return [CHAT_TEMPLATE_WARNING]
    return []


def embedded_template(template: str) -> tuple[str, list[str]]:
    """The template a GGUF carries for the model's own template, and what to tell the user: a list-only template
    rewritten to take string content too (m1.gguf.chat_template), or kept with a warning when it cannot be."""
    from m1.gguf.chat_template import string_content_template

    if not chat_template_warnings(template):
        return template, []
    rewritten = string_content_template(template)
    if rewritten is None:
        return template, [CHAT_TEMPLATE_WARNING]
    return rewritten, [CHAT_TEMPLATE_REWRITTEN]


def tokenizer_metadata(
    files: TokenizerFiles,
    *,
    n_rows: int,
    zero_rows: Sequence[int] = (),
    pre: str | None = None,
    chat_template: str | None = None,
) -> tuple[list[KV], list[str]]:
    """The `tokenizer.ggml.*` keys (and `tokenizer.chat_template`) plus warnings for the user.

    n_rows: the embedding's row count (the token list is padded to it); zero_rows: the ids whose embedding
    row is all zero (those at or above the base vocabulary become suppress_tokens); pre: llama.cpp
    pre-tokenizer name override; chat_template: replaces the model's template.
    """
    tok, source = files.tokenizer, files.source
    model = tok.get("model") or {}
    if model.get("type") != "BPE":
        raise UsageError(f"tokenizer model {model.get('type')!r}: only byte-level BPE exports to GGUF", file=source)
    if model.get("byte_fallback"):
        raise UsageError("a BPE with byte_fallback (sentencepiece style), not byte-level", file=source)
    _, byte_level = split_regexes(tok.get("pre_tokenizer"), source)
    if not byte_level and pre is None:
        raise UsageError("the pre-tokenizer has no ByteLevel step: not a GPT-2 style byte-level BPE", file=source,
                         hint="pass --tokenizer-pre NAME if llama.cpp's gpt2 tokenizer fits it anyway")
    pre_name = pre or pre_tokenizer_name(tok, source)

    by_id: dict[int, tuple[str, int]] = {i: (t, TokenType.NORMAL) for t, i in (model.get("vocab") or {}).items()}
    for added in tok.get("added_tokens") or []:
        kind = TokenType.CONTROL if added.get("special") else TokenType.USER_DEFINED
        by_id[int(added["id"])] = (added["content"], kind)
    n_tokens = max(by_id, default=-1) + 1
    if n_tokens > n_rows:
        raise UsageError(f"the tokenizer has {n_tokens} token ids but the embedding only {n_rows} rows",
                         file=source, hint="the tokenizer does not belong to this checkpoint")
    tokens, types = [], []
    for i in range(n_rows):
        text, kind = by_id.get(i, (f"[PAD{i}]", TokenType.UNUSED))
        tokens.append(text)
        types.append(int(kind))
    ids = {text: i for i, (text, _) in by_id.items()}

    kvs = [
        string(T + "model", "gpt2"),
        string(T + "pre", pre_name),
        array(T + "tokens", tokens, GGUFValueType.STRING),
        array(T + "token_type", types, GGUFValueType.INT32),
        array(T + "merges", _merges(model), GGUFValueType.STRING),  # present even when empty
    ]
    for key, name in (("bos_token", "bos_token_id"), ("eos_token", "eos_token_id"), ("unk_token", "unknown_token_id"),
                      ("pad_token", "padding_token_id")):
        token_id = _token_id(files.config, key, ids)
        if token_id is not None:
            kvs.append(KV(T + name, token_id, GGUFValueType.UINT32))
    for key in ("add_bos_token", "add_eos_token"):
        kvs.append(KV(T + key, bool(files.config.get(key, False)), GGUFValueType.BOOL))
    base = base_vocab_size(tok)
    suppress = sorted(i for i in zero_rows if base <= i < n_rows)
    if suppress:
        kvs.append(array(T + "suppress_tokens", suppress, GGUFValueType.INT32))

    warnings: list[str] = []
    template = chat_template if chat_template is not None else chat_template_of(files)
    if template:
        if chat_template is None:
            template, notes = embedded_template(template)
            warnings += notes
        kvs.append(string("tokenizer.chat_template", template))
    return kvs, warnings
