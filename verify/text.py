"""Evaluation text: the bundled MR-NIAH corpus, a text file, or pre-tokenized ids; and the windows.

Tokenizer: the checkpoint's `tokenizer.json` via the `tokenizers` package; a byte-level tokenizer for
the tiny models (their tokenizer_config.json says `m1_byte_level`).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from m1.errors import UsageError

CORPORA = {
    "mr-niah": "mr-niah-en-2048.jsonl",
    "mr-niah-10240": "mr-niah-en-10240.jsonl",
    "mr-niah-10k": "mr-niah-en-10240.jsonl",
}
# Long-context corpora: the whole text (all 30 English ~10k-token haystacks of MR-NIAH, 1.13 MB, in file
# order), not a held-out tail, so that --ctx 65536 has whole windows with a real tokenizer too. For agreement
# by position (compare --by-position), not for perplexity claims about unseen text.
WHOLE_TEXT = frozenset({"mr-niah-10k"})


def corpus_dir() -> Path:
    """The bundled corpus: in the source tree (tests/data/corpus), or installed package data."""
    here = Path(__file__).resolve().parents[1]
    for candidate in (here / "tests" / "data" / "corpus", here / "m1" / "data" / "corpus"):
        if candidate.is_dir():
            return candidate
    raise UsageError("the bundled corpus is not available in this installation", hint="pass --text FILE")


def corpus_text(name: str, holdout: bool = True) -> str:
    """The dialogue text of a bundled corpus; holdout=True gives the last 10% (never used in training).

    The long-context corpora (WHOLE_TEXT) are always the whole text."""
    if name not in CORPORA:
        raise UsageError(f"unknown corpus {name!r}", hint=f"choose one of {', '.join(CORPORA)}")
    lines = (corpus_dir() / CORPORA[name]).read_text(encoding="utf-8").splitlines()
    # The same text and the same byte cut as the tiny model's training recipe (scripts/train_tiny.py).
    data = "\n".join(
        m["content"] for line in lines if line.strip() for m in json.loads(line)["messages"] if m.get("content")
    ).encode("utf-8")
    if name in WHOLE_TEXT:
        return data.decode("utf-8")
    cut = int(len(data) * 0.9)
    while cut < len(data) and data[cut] & 0xC0 == 0x80:  # not inside a UTF-8 character
        cut += 1
    return (data[cut:] if holdout else data[:cut]).decode("utf-8")


class ByteTokenizer:
    """UTF-8 bytes as token ids 0..255 (the tiny models' vocabulary)."""

    vocab_size = 256

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))


class HFTokenizer:
    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self._tok = Tokenizer.from_file(str(path))

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids


def load_tokenizer(checkpoint_dir: str | Path) -> ByteTokenizer | HFTokenizer:
    root = Path(checkpoint_dir)
    config = root / "tokenizer_config.json"
    if config.exists():
        try:
            if json.loads(config.read_text()).get("m1_byte_level"):
                return ByteTokenizer()
        except ValueError:
            pass
    if (root / "tokenizer.json").exists():
        return HFTokenizer(root / "tokenizer.json")
    raise UsageError("no tokenizer.json (and not a byte-level tiny model)", file=str(root),
                     hint="pass --token-ids FILE with pre-tokenized ids")


def load_token_ids(path: str | Path) -> list[int]:
    """A JSON list of ints or a .npy array of ids."""
    path = Path(path)
    try:
        if path.suffix == ".npy":
            ids = np.load(path, allow_pickle=False).reshape(-1).tolist()
        else:
            ids = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UsageError(f"cannot read token ids ({exc})", file=str(path),
                         hint="give a JSON list of ints or a .npy array") from None
    if not isinstance(ids, list) or not all(type(i) is int and i >= 0 for i in ids):  # bools are not ids
        raise UsageError("token ids must be non-negative integers", file=str(path),
                         hint="give a JSON list of ints or a .npy array of integers")
    return ids


def check_token_ids(ids: list[int], vocab_size: int, file: str, model: str) -> None:
    """Every id inside the model's vocabulary (an id past it would index outside the embedding)."""
    if not ids or 0 <= min(ids) and max(ids) < vocab_size:
        return
    for position, i in enumerate(ids):
        if not 0 <= i < vocab_size:
            raise UsageError(f"token id {i} at position {position} is outside the vocabulary of {model} "
                             f"(vocab_size {vocab_size})", file=file,
                             hint="tokenize the text with this model's own tokenizer")


@dataclass(frozen=True)
class Windows:
    """Non-overlapping windows of `ctx` tokens; `first_scored` positions of each are context only."""

    tokens: torch.Tensor  # [n_windows, ctx] int64
    first_scored: int

    @property
    def scored_per_window(self) -> int:
        return self.tokens.shape[1] - 1 - self.first_scored

    def targets(self) -> torch.Tensor:
        """The next-token ids of every scored position, flattened window by window."""
        return self.tokens[:, self.first_scored + 1 :].reshape(-1)


def make_windows(ids: list[int], ctx: int, max_tokens: int | None, second_half: bool = False,
                 spread: bool = False) -> Windows:
    """Split into whole windows; `second_half` scores only the second half (llama.cpp's convention).

    `spread`: when the text holds more whole windows than `max_tokens` asks for, take them evenly spaced
    over the whole text rather than the first ones (calibration: one stretch of text can rank quantization
    choices differently from the rest; see the README's measured-mix section)."""
    if ctx < 2:
        raise UsageError(f"--ctx must be at least 2, got {ctx}")
    if max_tokens is not None and max_tokens < 1:
        raise UsageError(f"--tokens must be at least 1, got {max_tokens}")
    available = len(ids) // ctx
    wanted = available if max_tokens is None else min(available, max_tokens // ctx)
    if spread and 0 < wanted < available:
        starts = [(i * available // wanted) * ctx for i in range(wanted)]
        ids = [t for s in starts for t in ids[s : s + ctx]]
    elif max_tokens is not None:
        ids = ids[:max_tokens]
    n = len(ids) // ctx
    if n == 0:
        raise UsageError(f"the text has {len(ids)} tokens, fewer than one window of --ctx {ctx}",
                         hint="lower --ctx or give more text")
    tokens = torch.tensor(ids[: n * ctx], dtype=torch.int64).reshape(n, ctx)
    return Windows(tokens, ctx // 2 if second_half else 0)


# ---- what every command that reads a text calls ----------------------------------------------------------


def compute_dtype(name: str) -> torch.dtype:
    """--dtype of the engine commands: fp32 or bf16."""
    from m1.dtypes import DTYPE_OPTIONS, torch_dtype

    if name not in ("fp32", "bf16"):  # the engine's compute dtypes
        raise UsageError(f"--dtype must be fp32 or bf16, got {name!r}")
    return torch_dtype(DTYPE_OPTIONS[name])


def at_least_one(option: str, value: int) -> int:
    if value < 1:
        raise UsageError(f"{option} must be at least 1, got {value}")
    return value


def read_windows(tokenizer_source: str, text: Path | None, corpus: str, token_ids: Path | None, ctx: int,
                 tokens: int, second_half: bool, vocab_size: int | None = None, holdout: bool = True,
                 spread: bool = False) -> tuple[Windows, str]:
    """The windows every command reads text as: token ids, a text file, or a bundled corpus (its held-out part,
    or with holdout=False the calibration part the scoring commands never see). `spread`: see make_windows."""
    at_least_one("--tokens", tokens)
    if token_ids is not None:
        ids, what = load_token_ids(token_ids), str(token_ids)
        if vocab_size is not None:
            check_token_ids(ids, vocab_size, str(token_ids), tokenizer_source)
    else:
        from m1.formats import format_for_path

        fmt = format_for_path(tokenizer_source)  # a file format that carries its tokenizer (rebuilt from it)
        storage = fmt.open_storage(tokenizer_source) if fmt is not None and fmt.open_storage is not None else None
        if storage is not None:
            tokenizer_source = str(storage.tokenizer_folder())
        if not Path(tokenizer_source).is_dir():
            raise UsageError("tokenizing needs a local checkpoint folder", file=tokenizer_source,
                             hint="pull the tokenizer files, or pass --token-ids FILE")
        tok = load_tokenizer(tokenizer_source)
        if text is not None:
            try:
                body, what = text.read_text(encoding="utf-8"), str(text)
            except (OSError, UnicodeDecodeError) as exc:
                raise UsageError(f"cannot read the text ({type(exc).__name__})", file=str(text)) from None
        else:
            body = corpus_text(corpus, holdout=holdout)
            what = corpus_description(corpus) if holdout else f"corpus {corpus} (first 90%, calibration)"
        ids = tok.encode(body)
        if vocab_size is not None:
            check_token_ids(ids, vocab_size, str(text) if text is not None else tokenizer_source, tokenizer_source)
    return make_windows(ids, ctx, tokens, second_half, spread=spread), what


def corpus_description(corpus: str) -> str:
    return f"corpus {corpus} ({'whole text' if corpus in WHOLE_TEXT else 'held-out 10%'})"


def calibration_windows(source: str, calibration: str, tokens: int, ctx: int, vocab_size: int
                        ) -> tuple[Windows, str]:
    """The calibration text (--corpus, --text, --token-ids) as `m1 verify perplexity` reads its input: a bundled
    corpus name (its first 90%, never the held-out part that `verify compare --corpus` judges on), token ids
    (.json/.npy) or a text file. The windows are spread evenly over the whole text when it holds more than
    --tokens."""
    path = Path(calibration)
    if calibration in CORPORA:
        windows, what = read_windows(source, None, calibration, None, ctx, tokens, False, vocab_size, holdout=False,
                                 spread=True)
    elif path.suffix in (".json", ".npy"):
        windows, what = read_windows(source, None, "mr-niah", path, ctx, tokens, False, vocab_size, spread=True)
    elif not path.is_file():
        raise UsageError(f"calibration text {calibration!r} is neither a bundled corpus nor a file",
                         hint=f"use {', '.join(CORPORA)}, a UTF-8 text file, or token ids (.json/.npy)")
    else:
        windows, what = read_windows(source, path, "mr-niah", None, ctx, tokens, False, vocab_size, spread=True)
    return windows, f"{what}, {windows.tokens.shape[0]} windows of {ctx} spread over it"
