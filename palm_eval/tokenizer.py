"""Tokenizers behind one small interface: encode, decode, eos_id, vocab_size.

Two kinds: GPT-NeoX-20B (what the published checkpoints use; a `tokenizers` JSON file or a hub id)
and a byte-level tokenizer for the small bundled models (no file needed, identical on every machine).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Protocol

from palm_eval.errors import PalmEvalError

NEOX_HUB_ID = "EleutherAI/gpt-neox-20b"


class Tokenizer(Protocol):
    name: str
    eos_id: int
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: list[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes as ids 0-255, end-of-text as 256."""

    name = "byte"
    eos_id = 256
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: list[int]) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


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

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def encode_batch(self, texts: list[str]) -> list[list[int]]:
        return [e.ids for e in self._tok.encode_batch(texts, add_special_tokens=False)]

    def decode(self, ids: list[int]) -> str:
        return self._tok.decode(list(ids), skip_special_tokens=False)


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
    from huggingface_hub import hf_hub_download

    try:
        return hf_hub_download(repo_id, "tokenizer.json")
    except Exception as e:
        hint = " (for GPT-NeoX-20B, e.g. ../shared/data/gpt-neox-20b-tokenizer.json)" if repo_id == NEOX_HUB_ID else ""
        raise PalmEvalError(
            f"cannot get tokenizer.json for {repo_id!r} from the Hugging Face hub or its cache "
            f"({type(e).__name__}); download it and pass its path instead, e.g. --tokenizer /path/to/tokenizer.json{hint}"
        ) from None
