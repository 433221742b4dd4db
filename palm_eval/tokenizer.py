"""Tokenizers behind one small interface: encode, decode, eos_id, vocab_size.

Two kinds: GPT-NeoX-20B (what the published checkpoints use; a `tokenizers` JSON file or a hub id)
and a byte-level tokenizer for the small bundled models (no file needed, identical on every machine).
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Protocol

import numpy as np

from palm_eval.errors import PalmEvalError

NEOX_HUB_ID = "EleutherAI/gpt-neox-20b"


class Tokenizer(Protocol):
    name: str
    eos_id: int
    vocab_size: int
    fingerprint: str  # equal for tokenizers that map text to the same ids

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...

    def token_byte_lengths(self) -> np.ndarray:
        """Bytes of text each id stands for, int64 [vocab_size] (bits per byte = nll sum / ln 2 / bytes)."""
        ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, end-of-text as 256."""

    name = fingerprint = "byte"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def token_byte_lengths(self) -> np.ndarray:
        lengths = np.ones(self.vocab_size, dtype=np.int64)
        lengths[self.eos_id] = 0
        return lengths


class HFTokenizer:
    """A Hugging Face `tokenizers` JSON tokenizer (GPT-NeoX-20B: end-of-text `<|endoftext|>` = 0)."""

    def __init__(self, path: str | os.PathLike, name: str | None = None, eos_token: str = "<|endoftext|>"):
        from tokenizers import Tokenizer as _Tokenizer

        try:
            self._tok = _Tokenizer.from_file(str(path))
        except Exception as e:  # the tokenizers library raises a bare Exception for bad JSON
            raise PalmEvalError(f"cannot read tokenizer file {path}: {str(e).splitlines()[0]}") from None
        eos = self._tok.token_to_id(eos_token)
        if eos is None:
            raise PalmEvalError(f"tokenizer {path} has no end-of-text token {eos_token!r}")
        self.name = name or str(path)
        self.eos_id = eos
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.fingerprint = "sha256:" + hashlib.sha256(self._tok.to_str().encode()).hexdigest()[:16]

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)

    def token_byte_lengths(self) -> np.ndarray:
        """The sum over a document's tokens is its UTF-8 length; special tokens (end-of-text) count 0 bytes."""
        decoder = json.loads(self._tok.to_str()).get("decoder") or {}
        byte_level = decoder.get("type") == "ByteLevel"  # byte-level BPE spells every byte as one character
        added = self._tok.get_added_tokens_decoder()
        lengths = np.zeros(self.vocab_size, dtype=np.int64)
        for i in range(self.vocab_size):
            if i in added:
                lengths[i] = 0 if added[i].special else len(added[i].content.encode("utf-8"))
            elif byte_level:
                lengths[i] = len(self._tok.id_to_token(i))
            else:
                lengths[i] = len(self._tok.decode([i]).encode("utf-8"))
        return lengths


def load_tokenizer(name_or_path: str | os.PathLike) -> Tokenizer:
    """`byte`, a tokenizer JSON file (or a folder holding tokenizer.json), or a Hugging Face hub id."""
    spec = str(name_or_path)
    if spec == "byte":
        return ByteTokenizer()
    path = Path(spec).expanduser()
    if path.is_dir():
        path = path / "tokenizer.json"
    if path.is_file():
        return HFTokenizer(path, name=spec)
    if path.suffix == ".json" or spec.startswith((".", "/", "~")):
        raise PalmEvalError(f"tokenizer file not found: {path}")
    return HFTokenizer(_hub_tokenizer_file(spec), name=spec)


def _hub_tokenizer_file(repo_id: str) -> str:
    """tokenizer.json of a hub repo: from the Hugging Face cache, else downloaded."""
    from palm_eval.hub import hub_file

    try:
        return hub_file(repo_id, "tokenizer.json")
    except PalmEvalError as e:
        hint = " (for GPT-NeoX-20B, e.g. ../shared/data/gpt-neox-20b-tokenizer.json)" if repo_id == NEOX_HUB_ID else ""
        raise PalmEvalError(
            f"cannot get tokenizer.json for {repo_id!r} ({e}); download it and pass its path instead, "
            f"e.g. --tokenizer /path/to/tokenizer.json{hint}"
        ) from None
