"""The tiny models' tokenizer.json: a real byte-level BPE whose ids are the bytes the models were trained on."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from tokenizers import Tokenizer

from m1.tiny import MERGE_ID, UNREACHABLE_MERGE, byte_tokenizer_json, gpt2_byte_alphabet
from m1.verify.text import ByteTokenizer, corpus_text, load_tokenizer

TRAINED = Path(__file__).parent / "data" / "tiny-trained"


@pytest.mark.parametrize("holdout", [True, False], ids=["held-out", "training"])
def test_tokenizers_encodes_the_corpus_to_the_byte_ids(holdout: bool) -> None:
    text = corpus_text("mr-niah", holdout=holdout)
    tok = Tokenizer.from_file(str(TRAINED / "tokenizer.json"))
    ids = tok.encode(text, add_special_tokens=False).ids
    assert ids == ByteTokenizer().encode(text) == load_tokenizer(TRAINED).encode(text)
    assert tok.decode(ids) == text


def test_every_utf8_byte_is_its_own_id() -> None:
    tok = Tokenizer.from_str(byte_tokenizer_json())
    text = "".join(chr(c) for c in range(0x11000) if not 0xD800 <= c < 0xE000) + "\U0010ffff"
    assert tok.encode(text, add_special_tokens=False).ids == list(text.encode("utf-8"))
    assert tok.get_vocab_size() == 256


def test_the_one_merge_joins_bytes_no_utf8_text_holds() -> None:
    model = json.loads(byte_tokenizer_json())["model"]
    alphabet = gpt2_byte_alphabet()
    assert set(alphabet) == set(__import__("tokenizers").pre_tokenizers.ByteLevel.alphabet())
    assert model["type"] == "BPE" and model["merges"] == [[alphabet[b] for b in UNREACHABLE_MERGE]]
    assert model["vocab"]["".join(alphabet[b] for b in UNREACHABLE_MERGE)] == MERGE_ID
    every_char = "".join(chr(c) for c in range(0x110000) if not 0xD800 <= c < 0xE000).encode("utf-8")
    assert not {*UNREACHABLE_MERGE, MERGE_ID} & set(every_char)


def test_the_bundled_trained_model_carries_the_generated_tokenizer() -> None:
    assert (TRAINED / "tokenizer.json").read_text(encoding="utf-8") == byte_tokenizer_json()


def test_make_tiny_writes_it(make_tiny_ckpt) -> None:
    tiny = make_tiny_ckpt()
    assert (tiny / "tokenizer.json").read_text(encoding="utf-8") == byte_tokenizer_json()
    assert not (make_tiny_ckpt("small-vocab", vocab=200) / "tokenizer.json").exists()  # byte ids would not fit
