"""Tokenizers: the GPT-NeoX-20B file the published models use, and the byte tokenizer."""

from __future__ import annotations

import pytest

import palm_eval
from palm_eval.tokenizer import ByteTokenizer


def test_neox_tokenizer_matches_its_documented_ids(neox_tokenizer):
    # ../shared/data/README.md: "Hello world" -> [12092, 1533]; <|endoftext|> = 0; 50,277 entries
    assert neox_tokenizer.encode("Hello world") == [12092, 1533]
    assert neox_tokenizer.eos_id == 0
    assert neox_tokenizer.vocab_size == 50277
    text = "Long contexts: 32,768 tokens — and beyond."
    assert neox_tokenizer.decode(neox_tokenizer.encode(text)) == text


def test_byte_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    text = "naïve café ✓"
    ids = tok.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert tok.decode(ids + [tok.eos_id]) == text
    assert palm_eval.load_tokenizer("byte").vocab_size == 257


def test_tokenizer_errors(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(palm_eval.PalmEvalError, match="tokenizer file not found"):
        palm_eval.load_tokenizer(tmp_path / "absent.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(palm_eval.PalmEvalError, match="cannot read tokenizer file"):
        palm_eval.load_tokenizer(tmp_path / "bad.json")
    with pytest.raises(palm_eval.PalmEvalError, match="gpt-neox-20b-tokenizer.json"):
        palm_eval.load_tokenizer("EleutherAI/gpt-neox-20b")
