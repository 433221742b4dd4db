"""Documents and token streams, built exactly the way the published models were trained.

Training data was C4 tokenized with GPT-NeoX-20B, one end-of-text token appended after every document,
the documents concatenated and cut into 8,192-token blocks. Evaluation uses the same stream: either
raw documents through `token_stream`, or the pre-tokenized blocks through `read_pretokenized`; both
give the same tokens for the same documents.

Sources `read_documents` understands: parquet / jsonl / json(.gz) files with a `text` field (allenai/c4),
any other file as one document, a directory (every file inside, sorted), `builtin:train` /
`builtin:heldout` (this Python's standard library sources, identical on every machine with the same
Python), and Hugging Face dataset names (`hf:allenai/c4:en@validation`, needs `datasets` and a network).
"""

from __future__ import annotations

import gzip
import hashlib
import json
import os
import sysconfig
from collections.abc import Iterable, Iterator
from pathlib import Path

import numpy as np
from tqdm import tqdm

from palm_eval.errors import PalmEvalError

BLOCK_SIZE = 8192  # tokens per row of the published pre-tokenized C4
HELDOUT_PERCENT = 5  # share of standard-library files in builtin:heldout
RECORD_SUFFIXES = (".parquet", ".jsonl", ".json", ".jsonl.gz", ".json.gz")
_EXCLUDED_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "__pycache__"}


# ----------------------------------------------------------------------------------------------
# the built-in corpus: the standard library's own sources


def _stdlib_files() -> list[tuple[str, Path]]:
    """(relative posix path, path) of the standard library's .py files without tests, sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in root.rglob("*.py"):
        rel = path.relative_to(root)
        if _EXCLUDED_DIRS & set(rel.parts[:-1]) or path.name.startswith("test_"):
            continue
        files.append((rel.as_posix(), path))
    return sorted(files)


def _is_heldout(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest()[:8], 16) % 100 < HELDOUT_PERCENT


def _builtin_files(split: str) -> list[tuple[str, Path]]:
    if split not in ("train", "heldout"):
        raise PalmEvalError(f"unknown built-in split {split!r}: use builtin:train or builtin:heldout")
    return [(rel, p) for rel, p in _stdlib_files() if _is_heldout(rel) == (split == "heldout")]


def builtin_documents(split: str) -> list[str]:
    """The standard library's sources (tests excluded), split by a hash of each file's relative path.

    Files that are not valid UTF-8 are skipped; the order is the sorted relative paths.
    """
    docs = []
    for _, path in _builtin_files(split):
        try:
            docs.append(path.read_bytes().decode("utf-8"))
        except (UnicodeDecodeError, OSError):
            continue
    return docs


def builtin_fingerprint(split: str) -> str:
    """sha256 over the relative paths and contents of the split's files: equal on equal Pythons."""
    h = hashlib.sha256()
    for rel, path in _builtin_files(split):
        h.update(rel.encode() + b"\0" + hashlib.sha256(path.read_bytes()).digest())
    return "sha256:" + h.hexdigest()


# ----------------------------------------------------------------------------------------------
# reading documents


def read_documents(source: str | os.PathLike) -> Iterator[str]:
    """Documents from a file, a directory, `builtin:<split>` or `hf:<name>[:<config>][@<split>]`, lazily."""
    spec = str(source)
    if spec.startswith("builtin:"):
        yield from builtin_documents(spec.split(":", 1)[1])
        return
    if spec.startswith("hf:"):
        yield from _hf_documents(spec[3:])
        return
    path = Path(spec).expanduser()
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        if not files:
            raise PalmEvalError(f"no files in {path}: put text, parquet or jsonl documents there")
        for file in files:
            yield from _file_documents(file)
    elif path.is_file():
        yield from _file_documents(path)
    else:
        raise PalmEvalError(f"data not found: {path} (a file, a directory, builtin:heldout or hf:<dataset name>)")


def _file_documents(path: Path) -> Iterator[str]:
    name = path.name.lower()
    if name.endswith(".parquet"):
        yield from _parquet_texts(path)
    elif name.endswith(RECORD_SUFFIXES[1:]):
        yield from _json_texts(path)
    else:
        try:
            yield path.read_bytes().decode("utf-8")
        except UnicodeDecodeError:
            raise PalmEvalError(f"{path} is not UTF-8 text (documents must be text, parquet or jsonl)") from None


def _parquet_texts(path: Path) -> Iterator[str]:
    import pyarrow.parquet as pq

    try:
        pf = pq.ParquetFile(path)
    except Exception as e:
        raise PalmEvalError(f"{path} is not a readable parquet file: {str(e).splitlines()[0]}") from None
    if "text" not in pf.schema_arrow.names:
        hint = " (pre-tokenized data: use it as a pre-tokenized source)" if "input_ids" in pf.schema_arrow.names else ""
        raise PalmEvalError(f"{path} has no `text` column (columns: {', '.join(pf.schema_arrow.names)}){hint}")
    for batch in pf.iter_batches(columns=["text"], batch_size=1024):
        yield from (t for t in batch.column(0).to_pylist() if t is not None)


def _json_texts(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.lower().endswith(".gz") else open
    try:
        with opener(path, "rt", encoding="utf-8") as f:
            head = f.read(1)
            f.seek(0)
            if path.name.lower().endswith((".json", ".json.gz")) and head == "[":  # one JSON list of records
                records: Iterable = json.load(f)
            else:
                records = (json.loads(line) for line in f if line.strip())
            for i, record in enumerate(records):
                if not isinstance(record, dict) or not isinstance(record.get("text"), str):
                    raise PalmEvalError(
                        f"{path}: record {i + 1} has no string `text` field (expected {{\"text\": ...}})"
                    )
                yield record["text"]
    except (OSError, UnicodeDecodeError, json.JSONDecodeError, EOFError) as e:
        raise PalmEvalError(f"{path} is not readable JSON lines: {str(e).splitlines()[0]}") from None


def _hf_documents(spec: str) -> Iterator[str]:
    """`name[:config][@split]` (split defaults to validation), streamed so large corpora need not download."""
    spec, _, split = spec.partition("@")
    name, _, config = spec.partition(":")
    try:
        import datasets

        ds = datasets.load_dataset(name, config or None, split=split or "validation", streaming=True)
        for record in ds:
            yield record["text"]
    except ImportError:
        raise PalmEvalError("reading Hugging Face datasets needs `datasets`: pip install 'palm-eval[hf]'") from None
    except PalmEvalError:
        raise
    except Exception as e:
        reason = str(e).splitlines()[0][:150] if str(e) else ""
        raise PalmEvalError(
            f"cannot read Hugging Face dataset {name!r} ({type(e).__name__}: {reason}); "
            "offline? download it and pass a local parquet/jsonl file instead"
        ) from None


# ----------------------------------------------------------------------------------------------
# token streams


def token_stream(
    documents: Iterable[str], tokenizer, append_eos: bool = True, max_tokens: int | None = None
) -> np.ndarray:
    """Every document tokenized, end-of-text appended after each, concatenated: int32 [tokens].

    With max_tokens, documents stop being read once the stream is that long (the prefix is the same).
    """
    parts: list[np.ndarray] = []
    total = 0
    eos = np.array([tokenizer.eos_id], dtype=np.int32)
    batch: list[str] = []

    def flush() -> None:
        nonlocal total
        encoded = tokenizer.encode_batch(batch) if hasattr(tokenizer, "encode_batch") else map(tokenizer.encode, batch)
        for ids in encoded:
            parts.append(np.asarray(ids, dtype=np.int32))
            if append_eos:
                parts.append(eos)
            total += len(ids) + append_eos
        batch.clear()

    for doc in documents:
        batch.append(doc)
        if len(batch) == 64:
            flush()
            if max_tokens is not None and total >= max_tokens:
                break
    flush()
    stream = np.concatenate(parts) if parts else np.zeros(0, dtype=np.int32)
    return stream if max_tokens is None else stream[:max_tokens]


def read_pretokenized(path: str | os.PathLike) -> np.ndarray:
    """Rows of an `input_ids` parquet column (a file or a directory of them) concatenated: int32 [tokens].

    Positions whose `attention_mask` is 0 (padding), when that column exists, are dropped.
    """
    import pyarrow.compute as pc
    import pyarrow.parquet as pq

    path = Path(path).expanduser()
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].is_file():
        raise PalmEvalError(f"pre-tokenized data not found: {path} (parquet with an `input_ids` column)")
    parts = []
    for file in files:
        try:
            table = pq.read_table(file)
        except Exception as e:
            raise PalmEvalError(f"{file} is not a readable parquet file: {str(e).splitlines()[0]}") from None
        if "input_ids" not in table.column_names:
            raise PalmEvalError(f"{file} has no `input_ids` column (columns: {', '.join(table.column_names)})")
        ids = pc.list_flatten(table.column("input_ids")).to_numpy()
        if "attention_mask" in table.column_names:
            ids = ids[pc.list_flatten(table.column("attention_mask")).to_numpy().astype(bool)]
        parts.append(ids.astype(np.int32))
    return np.concatenate(parts)


def is_pretokenized(path: str | os.PathLike) -> bool:
    """Whether a parquet source holds `input_ids` (pre-tokenized) rather than `text`."""
    import pyarrow.parquet as pq

    path = Path(path)
    files = sorted(path.rglob("*.parquet")) if path.is_dir() else [path]
    if not files or not files[0].is_file() or files[0].suffix != ".parquet":
        return False
    try:
        return "input_ids" in pq.ParquetFile(files[0]).schema_arrow.names
    except Exception:
        return False


def fingerprint(tokens: np.ndarray) -> str:
    """sha256 of the token ids as little-endian int32: the same stream gives the same string anywhere."""
    return "sha256:" + hashlib.sha256(np.ascontiguousarray(tokens, dtype="<i4").tobytes()).hexdigest()


def load_token_stream(
    source: str | os.PathLike, tokenizer, max_tokens: int | None = None, progress: bool = False
) -> np.ndarray:
    """The evaluation stream of any source: pre-tokenized parquet as stored, everything else tokenized."""
    if not str(source).startswith(("builtin:", "hf:")) and is_pretokenized(source):
        return read_pretokenized(source)[:max_tokens]
    documents = tqdm(read_documents(source), desc=f"tokenizing {source}", unit=" docs", leave=False,
                     disable=None if progress else True)  # None: only in a terminal
    return token_stream(documents, tokenizer, max_tokens=max_tokens)
